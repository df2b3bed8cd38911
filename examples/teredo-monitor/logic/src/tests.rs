//! The example driver's logic on the host mock: every `DriverEntry` step's rollback, the
//! unload, the exception set, the IRQL in the log.
//!
//! Run with `cargo test --manifest-path examples/teredo-monitor/logic/Cargo.toml
//! --features host-mock`. (Unit tests rather than `tests/`: the workspace profile's
//! `panic = "abort"` would make cargo build the library twice, with colliding output names,
//! for integration tests.)

use std::boxed::Box;
use std::format;
use std::string::String;
use std::sync::MutexGuard;
use std::vec::Vec;

use crate::driver::{self, DriverConfig, TeredoMonitor, UnloadReport};
use crate::exceptions::AppliedExceptions;
use crate::firewall::NoFilterEngine;
use crate::host;
use crate::slot::DriverSlot;
use crate::status::NtStatus;
use core::net::Ipv4Addr;
use teredo_watcher::mock::MockNetio;
use teredo_watcher::{Direction, Error, HandleTable, Irql, NetioCall, PacketView, sys};

type Slot<'t> = DriverSlot<TeredoMonitor<'t, MockNetio>>;

/// What every driver test starts from: the host binding held exclusively (it is
/// process-wide) and reset, a fresh mock netio (Teredo client stopped) and a handle table
/// over it. The driver's slot borrows the table, so each test makes its own
/// (`let slot = Slot::new();`). Dropping the fixture resets the host binding again, before
/// the exclusive hold ends.
struct Fixture {
    netio: MockNetio,
    table: HandleTable<MockNetio>,
    /// What the driver publishes for classify; `'static` as in the driver (a `static`
    /// there), one leaked word per test here.
    published: &'static AppliedExceptions,
    _serial: MutexGuard<'static, ()>,
}

impl Fixture {
    fn new() -> Self {
        let serial = host::exclusive();
        host::reset();
        let netio = MockNetio::new();
        let table = HandleTable::new(netio.clone());
        Fixture {
            netio,
            table,
            published: Box::leak(Box::new(AppliedExceptions::new())),
            _serial: serial,
        }
    }

    /// The body of `DriverEntry` on this fixture's f.table.
    fn entry<'t>(&'t self, slot: &Slot<'t>, config: DriverConfig) -> NtStatus {
        driver::driver_entry(
            &self.table,
            slot,
            self.published,
            config,
            None::<driver::Firewall<NoFilterEngine>>,
        )
    }

    /// The body of `DriverUnload` on this fixture's f.table.
    fn unload<'t>(&'t self, slot: &Slot<'t>) -> UnloadReport {
        driver::driver_unload(&self.table, slot, self.published)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        host::reset();
    }
}

/// Runs `f` with the log captured; returns its value and the lines.
/// Inbound unicast UDP to local `port` of a host address, from an ephemeral remote port.
fn unicast_to(port: u16) -> PacketView {
    PacketView::udp4(
        Direction::Inbound,
        Ipv4Addr::new(192, 168, 1, 20),
        port,
        61_000,
    )
}

fn captured<R>(f: impl FnOnce() -> R) -> (R, Vec<String>) {
    host::capture();
    let value = f();
    (value, host::take_captured())
}

fn position(lines: &[String], needle: &str) -> usize {
    lines
        .iter()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line contains {needle:?} in {lines:#?}"))
}

#[test]
fn load_follow_the_client_and_unload_cleanly() {
    let f = Fixture::new();
    let slot = Slot::new();

    let ((status, report), lines) = captured(|| {
        assert_eq!(f.published.raw(), AppliedExceptions::NOT_LOADED);
        let status = f.entry(&slot, DriverConfig::default());
        f.netio.wait_idle();
        assert_eq!(f.published.raw(), 0, "loaded, no dynamic port");
        assert!(f.published.is_teredo_local_port(3544));
        let first = f.netio.client().start();
        f.netio.wait_idle();
        assert_eq!(f.published.raw(), u32::from(first));
        assert!(f.published.allows(&unicast_to(first)));
        f.netio.set_callback_irql(Irql::DISPATCH_LEVEL);
        let second = f.netio.client().restart();
        f.netio.wait_idle();
        assert_ne!(first, second);
        assert!(f.published.allows(&unicast_to(second)) && !f.published.allows(&unicast_to(first)));
        assert!(
            !f.published.allows(&unicast_to(3544)),
            "3544 is for the group only"
        );
        f.netio.client().stop();
        f.netio.wait_idle();
        assert_eq!(f.published.raw(), 0, "the client stopped");
        let report = f.unload(&slot);
        assert_eq!(f.published.raw(), AppliedExceptions::NOT_LOADED, "unloaded");
        (status, report)
    });

    assert_eq!(status, NtStatus::SUCCESS);
    assert!(report.had_state && report.is_clean(), "{report:?}");
    assert_eq!(report.notifications, 4, "initial, add, change, delete");
    assert_eq!(f.netio.live_registrations(), 0);
    assert_eq!(f.table.live_registrations(), 0);
    assert!(f.table.is_closed());
    assert!(!slot.is_occupied());
    assert_eq!(
        f.netio.calls(),
        [1, 1, 1],
        "one notify, one seed query, one cancel"
    );

    let initial = position(&lines, "event #1: MibInitialNotification");
    let added = position(
        &lines,
        "event #2: MibAddInstance (client started) port=udp/49152 at PASSIVE_LEVEL",
    );
    let opened = position(&lines, "exceptions updated (open udp/49152, close none)");
    let changed = position(
        &lines,
        "event #3: MibParameterNotification (port changed) port=udp/49159 at DISPATCH_LEVEL",
    );
    let moved = position(
        &lines,
        "exceptions updated (open udp/49159, close udp/49152)",
    );
    let deleted = position(&lines, "event #4: MibDeleteInstance");
    let closed = position(
        &lines,
        "exceptions updated (open none, close udp/49159): {dynamic none, static udp/3544 (multicast 224.0.0.253)}",
    );
    let cancelled = position(&lines, "registration cancelled after 4 notifications");
    assert!(initial < added && added < opened && opened < changed && changed < moved);
    assert!(moved < deleted && deleted < closed && closed < cancelled);
}

#[test]
fn a_client_running_at_load_is_in_the_exception_set_from_the_start() {
    let f = Fixture::new();
    let port = f.netio.client().start();
    let slot = Slot::new();

    let (status, lines) = captured(|| {
        let status = f.entry(&slot, DriverConfig::default());
        f.netio.wait_idle();
        status
    });
    assert_eq!(status, NtStatus::SUCCESS);
    position(&lines, &format!("GetTeredoPort seeded port=udp/{port}"));
    position(
        &lines,
        &format!("exception tracker subscribed (snapshot port=udp/{port}): {{dynamic udp/{port}"),
    );
    assert!(f.unload(&slot).is_clean());
}

#[test]
fn step_1_failure_returns_the_netio_status_and_leaves_nothing() {
    let f = Fixture::new();
    let slot = Slot::new();
    f.netio.fail_next(
        NetioCall::NotifyTeredoPortChange,
        sys::STATUS_INSUFFICIENT_RESOURCES,
    );

    let (status, lines) = captured(|| f.entry(&slot, DriverConfig::default()));

    assert_eq!(status, NtStatus::INSUFFICIENT_RESOURCES);
    position(&lines, "step 1/3 (register: NotifyTeredoPortChange) failed");
    assert!(!slot.is_occupied());
    assert_eq!(f.netio.live_registrations(), 0);
    assert_eq!(f.table.live_registrations(), 0);
    assert!(
        !f.table.is_closed(),
        "nothing to tear down after a refused registration"
    );
}

#[test]
fn step_1_failure_with_a_win32_code_returns_its_ntstatus() {
    let f = Fixture::new();
    let slot = Slot::new();
    f.netio
        .fail_next(NetioCall::NotifyTeredoPortChange, sys::ERROR_INVALID_HANDLE);

    let (status, _) = captured(|| f.entry(&slot, DriverConfig::default()));

    assert_eq!(status, NtStatus::INVALID_HANDLE);
    assert_eq!(f.netio.live_registrations(), 0);
}

#[test]
fn step_2_failure_cancels_the_registration() {
    let f = Fixture::new();
    let slot = Slot::new();
    // One subscriber slot: the event logger takes it, the exception tracker cannot subscribe.
    let config = DriverConfig { max_subscribers: 1 };

    let (status, lines) = captured(|| f.entry(&slot, config));

    assert_eq!(status, NtStatus::INSUFFICIENT_RESOURCES);
    let failed = position(&lines, "step 2/3 (subscribe the exception tracker) failed");
    let rolled_back = position(&lines, "rolled back: registration cancelled");
    assert!(failed < rolled_back);
    assert!(!slot.is_occupied());
    assert_eq!(f.published.raw(), AppliedExceptions::NOT_LOADED);
    assert_eq!(f.netio.live_registrations(), 0);
    assert_eq!(f.table.live_registrations(), 0);
    assert_eq!(f.netio.calls()[2], 1, "the registration was cancelled");
}

#[test]
fn step_2_failure_with_a_failing_cancel_tears_the_table_down() {
    let f = Fixture::new();
    let slot = Slot::new();
    f.netio.fail_next(
        NetioCall::CancelMibChangeNotify2,
        sys::STATUS_INVALID_PARAMETER,
    );

    let (status, lines) = captured(|| f.entry(&slot, DriverConfig { max_subscribers: 1 }));

    assert_eq!(
        status,
        NtStatus::INSUFFICIENT_RESOURCES,
        "the status of the failed step"
    );
    position(&lines, "rollback: cancel failed");
    position(&lines, "rollback: teardown cancelled 1, failed 0");
    assert_eq!(
        f.netio.live_registrations(),
        0,
        "the teardown's cancel removed it"
    );
    assert!(f.table.is_closed());
    assert_eq!(
        f.netio.calls()[2],
        2,
        "the failed cancel, then the teardown's"
    );
}

#[test]
fn step_3_failure_when_a_state_is_loaded_rolls_back_only_its_own_registration() {
    let f = Fixture::new();
    let slot = Slot::new();

    let ((first, second), lines) = captured(|| {
        let first = f.entry(&slot, DriverConfig::default());
        let second = f.entry(&slot, DriverConfig::default());
        (first, second)
    });

    assert_eq!(first, NtStatus::SUCCESS);
    assert_eq!(second, NtStatus::OBJECT_NAME_COLLISION);
    position(&lines, "step 3/3 (store the driver state) failed");
    assert_eq!(
        f.netio.live_registrations(),
        1,
        "the loaded state keeps its registration"
    );
    assert!(slot.is_occupied());
    assert_eq!(
        f.published.raw(),
        0,
        "the loaded state's set stays published"
    );

    let (report, _) = captured(|| f.unload(&slot));
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(f.netio.live_registrations(), 0);
    assert_eq!(f.netio.calls()[2], 2, "each registration cancelled once");
}

#[test]
fn unload_waits_for_a_callback_in_flight_and_nothing_runs_afterwards() {
    let f = Fixture::new();
    let slot = Slot::new();

    let (report, lines) = captured(|| {
        assert_eq!(f.entry(&slot, DriverConfig::default()), NtStatus::SUCCESS);
        f.netio.wait_idle();
        f.netio.set_callback_irql(Irql::DISPATCH_LEVEL);
        host::hold_next_callback();
        let port = f.netio.client().start();
        f.netio.notify_raw(port, sys::MIB_PARAMETER_NOTIFICATION);
        host::wait_until_held();
        let releaser = std::thread::spawn(|| {
            host::wait_for_lines_by_holder(1);
            std::thread::sleep(std::time::Duration::from_millis(100));
            assert!(
                host::callback_held(),
                "the unload must not have ended the held callback"
            );
            host::release_held_callback();
        });
        let report = f.unload(&slot);
        host::mark_unloaded();
        releaser.join().expect("releaser");
        f.netio.notify_raw(port, sys::MIB_PARAMETER_NOTIFICATION);
        f.netio.wait_idle();
        report
    });

    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        f.netio.dropped_after_cancel(),
        1,
        "the queued notification was discarded"
    );
    assert_eq!(host::late_callback_lines(), 0);
    let unloading = position(&lines, "DriverUnload at PASSIVE_LEVEL: cancelling");
    let finished = position(&lines, "exceptions updated (open udp/49152, close none)");
    let cancelled = position(&lines, "DriverUnload: registration cancelled");
    assert!(
        unloading < finished && finished < cancelled,
        "the cancel returned only after the callback in flight finished: {lines:#?}"
    );
}

#[test]
fn an_unload_that_cannot_cancel_keeps_the_image_loaded_and_silences_the_driver() {
    let f = Fixture::new();
    let slot = Slot::new();
    assert_eq!(f.entry(&slot, DriverConfig::default()), NtStatus::SUCCESS);
    // The watcher's cancel and the teardown's retry both fail.
    for _ in 0..2 {
        f.netio.fail_next(
            NetioCall::CancelMibChangeNotify2,
            sys::STATUS_INVALID_PARAMETER,
        );
    }

    let (report, lines) = captured(|| {
        let report = f.unload(&slot);
        if report.keep_image_loaded {
            host::keep_image_loaded();
        }
        report
    });

    assert!(report.keep_image_loaded && !report.is_clean(), "{report:?}");
    assert_eq!(host::image_references(), 1, "the platform keeps the image");
    let failed = position(&lines, "1 failed, 1 live");
    let kept = position(&lines, "keeping the image loaded");
    assert!(failed < kept, "{lines:#?}");
    assert_eq!(f.netio.live_registrations(), 1, "netio still holds it");

    // A late notification reaches the (still loaded) callback, whose subscribers are
    // silenced: nothing is logged.
    let ((), late) = captured(|| {
        f.netio.client().start();
        f.netio.wait_idle();
    });
    assert_eq!(
        f.netio.registrations()[0].delivered,
        2,
        "the initial notification, then the late one reached the callback"
    );
    assert!(late.is_empty(), "silenced: {late:#?}");
}

#[test]
fn a_clean_unload_does_not_keep_the_image() {
    let f = Fixture::new();
    let slot = Slot::new();
    assert_eq!(f.entry(&slot, DriverConfig::default()), NtStatus::SUCCESS);
    let (report, lines) = captured(|| f.unload(&slot));
    assert!(report.is_clean() && !report.keep_image_loaded, "{report:?}");
    assert!(
        !lines.iter().any(|l| l.contains("keeping the image loaded")),
        "{lines:#?}"
    );
}

#[test]
fn unload_without_a_state_still_tears_the_table_down() {
    let f = Fixture::new();
    let slot = Slot::new();

    let (report, lines) = captured(|| f.unload(&slot));

    assert!(!report.had_state);
    assert!(report.unregister.is_none());
    assert!(report.is_clean());
    assert!(f.table.is_closed());
    position(&lines, "no driver state");
}

#[test]
fn library_errors_map_to_documented_ntstatus_values() {
    let netio_status = |raw| Error::from_status(NetioCall::NotifyTeredoPortChange, raw);
    assert_eq!(
        NtStatus::from_error(&netio_status(sys::STATUS_NO_MEMORY)),
        NtStatus(sys::STATUS_NO_MEMORY)
    );
    assert_eq!(
        NtStatus::from_error(&netio_status(sys::ERROR_NOT_ENOUGH_MEMORY)),
        NtStatus::INSUFFICIENT_RESOURCES
    );
    assert_eq!(
        NtStatus::from_error(&netio_status(sys::ERROR_NOT_READY)),
        NtStatus::DEVICE_NOT_READY
    );
    assert_eq!(
        NtStatus::from_error(&netio_status(sys::ERROR_INVALID_PARAMETER)),
        NtStatus::INVALID_PARAMETER
    );
    assert_eq!(
        NtStatus::from_error(&netio_status(1234)),
        NtStatus::UNSUCCESSFUL
    );
    assert_eq!(
        NtStatus::from_error(&Error::AllocationFailed { bytes: 64 }),
        NtStatus::INSUFFICIENT_RESOURCES
    );
    assert_eq!(
        NtStatus::from_error(&Error::HandleTableClosed),
        NtStatus::INVALID_DEVICE_STATE
    );
    assert_eq!(
        NtStatus::from_error(&Error::CancelFromCallback),
        NtStatus::POSSIBLE_DEADLOCK
    );
    assert!(NtStatus::SUCCESS.is_success());
    assert!(!NtStatus::UNSUCCESSFUL.is_success());
    assert_eq!(
        std::format!("{}", NtStatus::INSUFFICIENT_RESOURCES),
        "0xc000009a"
    );
}

/// The driver's log renders values without `core::fmt` (`crate::log`); its text must stay
/// the text of the library's `Display` for the same values, for every value the driver logs.
#[test]
fn log_text_is_the_display_text() {
    use crate::log::{Line, LogText, Port};
    use teredo_watcher::{IrqlBound, NetioStatus, TeredoExceptions, TeredoPort};

    fn text(value: &dyn LogText) -> String {
        let mut line = Line::new();
        value.write_to(&mut line);
        line.as_str().to_owned()
    }
    use std::borrow::ToOwned;
    use std::string::ToString;

    for raw in [0, 1, 2, 3, 15, 255] {
        let irql = Irql::from_raw(raw);
        assert_eq!(text(&irql), irql.to_string());
    }
    for p in [1, 3544, 49_152, 65_535] {
        let port = TeredoPort::new(p).expect("non-zero");
        assert_eq!(text(&port), port.to_string());
        for upnp in [false, true] {
            let set = TeredoExceptions::for_port(Some(port)).with_upnp(upnp);
            assert_eq!(text(&set), set.to_string());
        }
    }
    assert_eq!(text(&Port(None)), "none");
    assert_eq!(
        text(&TeredoExceptions::for_port(None)),
        TeredoExceptions::for_port(None).to_string()
    );
    for n in [0_u64, 7, 10, 4_294_967_295, u64::MAX] {
        assert_eq!(text(&n), n.to_string());
    }
    for bits in [0_u32, 0x15, 0xC000_009A, u32::MAX] {
        assert_eq!(text(&NtStatus(bits.cast_signed())), format!("{bits:#010x}"));
    }

    let calls = [
        NetioCall::NotifyTeredoPortChange,
        NetioCall::GetTeredoPort,
        NetioCall::CancelMibChangeNotify2,
    ];
    let mut raws: Vec<i32> = sys::DOCUMENTED_STATUS_CODES
        .iter()
        .map(|(_, c)| *c)
        .collect();
    raws.push(0xC000_0001_u32.cast_signed());
    raws.push(12_345);
    let mut errors = Vec::new();
    for call in calls {
        for &raw in &raws {
            errors.push(Error::from_status(call, raw));
        }
    }
    for bound in [
        IrqlBound::Passive,
        IrqlBound::BelowDispatch,
        IrqlBound::AtMostDispatch,
    ] {
        errors.push(Error::IrqlTooHigh {
            operation: "TeredoPortWatcher::new",
            current: Irql::DISPATCH_LEVEL,
            required: bound,
        });
    }
    errors.extend([
        Error::CancelFromCallback,
        Error::SubscriberTableFull { capacity: 2 },
        Error::UnknownSubscriber,
        Error::HandleTableFull { capacity: 64 },
        Error::HandleTableClosed,
        Error::AllocationFailed { bytes: 504 },
    ]);
    let mut variants = std::collections::HashSet::new();
    for error in &errors {
        assert_eq!(text(error), error.to_string(), "{error:?}");
        variants.insert(std::mem::discriminant(error));
    }
    // Every variant the library has today (6 netio ones, then 7 others).
    assert_eq!(variants.len(), 13, "a variant is missing from this test");
    for raw in raws {
        let status = NetioStatus(raw);
        assert_eq!(text(&status), status.to_string());
    }
}
