//! Every documented status code on every netio call, and the IRQL checks at each entry point.

use teredo_watcher::mock::{MockNetio, ViolationPolicy, set_violation_policy, with_irql};
use teredo_watcher::sys::DOCUMENTED_STATUS_CODES;
use teredo_watcher::{
    Error, HandleTable, Irql, IrqlBound, NetioCall, NetioStatus, TeredoPortWatcher, WatcherOptions,
};

const UNDOCUMENTED: i32 = 0xC000_0001_u32.cast_signed(); // STATUS_UNSUCCESSFUL

/// The variant the documentation's code maps to.
fn expected_kind(raw: i32) -> &'static str {
    match raw.cast_unsigned() {
        0xC000_000D | 87 => "InvalidParameter",
        0xC000_0008 | 6 => "InvalidHandle",
        0xC000_0017 | 0xC000_009A | 8 => "OutOfMemory",
        0xC000_00A3 | 21 => "TeredoNotStarted",
        0xC000_00BB => "NoIpv6Stack",
        _ => "Netio",
    }
}

fn kind(error: &Error) -> &'static str {
    match error {
        Error::InvalidParameter { .. } => "InvalidParameter",
        Error::InvalidHandle { .. } => "InvalidHandle",
        Error::OutOfMemory { .. } => "OutOfMemory",
        Error::TeredoNotStarted { .. } => "TeredoNotStarted",
        Error::NoIpv6Stack { .. } => "NoIpv6Stack",
        Error::Netio { .. } => "Netio",
        _ => "other",
    }
}

fn failure_codes() -> Vec<i32> {
    DOCUMENTED_STATUS_CODES
        .iter()
        .map(|(_, c)| *c)
        .filter(|c| *c != 0)
        .chain([UNDOCUMENTED])
        .collect()
}

#[test]
fn every_status_on_notify_is_named_keeps_the_raw_code_and_registers_nothing() {
    for raw in failure_codes() {
        let netio = MockNetio::new();
        let table = HandleTable::new(netio.clone());
        netio.fail_next(NetioCall::NotifyTeredoPortChange, raw);
        let err = TeredoPortWatcher::new(&table, WatcherOptions::default())
            .expect_err("injected failure");
        assert_eq!(kind(&err), expected_kind(raw), "{err}");
        assert_eq!(err.status(), Some(NetioStatus(raw)));
        assert_eq!(err.call(), Some(NetioCall::NotifyTeredoPortChange));
        assert_eq!(table.live_registrations(), 0);
        assert_eq!(netio.live_registrations(), 0);
        // The table slot is free again: a retry works.
        let watcher = TeredoPortWatcher::new(&table, WatcherOptions::default()).expect("retry");
        assert_eq!(table.live_registrations(), 1);
        drop(watcher);
    }
}

#[test]
fn every_status_on_get_teredo_port_is_named_and_keeps_the_raw_code() {
    let netio = MockNetio::new();
    netio.client().start();
    let table = HandleTable::new(netio.clone());
    for raw in failure_codes() {
        netio.fail_next(NetioCall::GetTeredoPort, raw);
        let err = table.query_port().expect_err("injected failure");
        assert_eq!(kind(&err), expected_kind(raw), "{err}");
        assert_eq!(err.status(), Some(NetioStatus(raw)));
        assert_eq!(err.call(), Some(NetioCall::GetTeredoPort));
        assert!(table.query_port().expect("next call succeeds").is_some());
    }
}

#[test]
fn every_status_on_cancel_is_returned_and_the_handle_stays_for_teardown() {
    for raw in failure_codes() {
        let netio = MockNetio::new();
        let table = HandleTable::new(netio.clone());
        let watcher = TeredoPortWatcher::new(&table, WatcherOptions::default()).expect("register");
        netio.fail_next(NetioCall::CancelMibChangeNotify2, raw);
        let err = watcher.unregister().expect_err("injected failure");
        assert_eq!(kind(&err), expected_kind(raw), "{err}");
        assert_eq!(err.status(), Some(NetioStatus(raw)));
        assert_eq!(err.call(), Some(NetioCall::CancelMibChangeNotify2));
        // Not cancelled: the registration is still live, and the table still knows it.
        assert_eq!(netio.live_registrations(), 1);
        assert_eq!(table.live_registrations(), 1);
        let report = table.teardown().expect("passive");
        assert_eq!(report.cancelled, 1);
        assert!(report.is_clean());
        assert_eq!(netio.live_registrations(), 0);
    }
}

#[test]
fn status_display_names_documented_codes_and_shows_raw_bits() {
    let err = Error::from_status(NetioCall::GetTeredoPort, 21);
    assert_eq!(
        err.to_string(),
        "GetTeredoPort: the Teredo client is not started: ERROR_NOT_READY (0x00000015)"
    );
    let err = Error::from_status(NetioCall::CancelMibChangeNotify2, UNDOCUMENTED);
    assert_eq!(
        err.to_string(),
        "CancelMibChangeNotify2 failed: status 0xc0000001"
    );
    assert!(Error::check(NetioCall::GetTeredoPort, 0).is_ok());
    // Win32 codes are positive: anything non-zero is a failure.
    assert!(Error::check(NetioCall::GetTeredoPort, 1).is_err());
}

fn assert_irql_error(result: Result<impl std::fmt::Debug, Error>, op: &str, at: Irql) {
    match result {
        Err(Error::IrqlTooHigh {
            operation, current, ..
        }) => {
            assert_eq!(operation, op);
            assert_eq!(current, at);
        }
        other => panic!("expected IrqlTooHigh for {op}, got {other:?}"),
    }
}

#[test]
fn entry_points_refuse_a_too_high_irql_with_an_error_value() {
    set_violation_policy(ViolationPolicy::Record);
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());

    with_irql(Irql::DISPATCH_LEVEL, || {
        assert_irql_error(
            TeredoPortWatcher::new(&table, WatcherOptions::default()),
            "TeredoPortWatcher::new",
            Irql::DISPATCH_LEVEL,
        );
        assert_irql_error(table.query_port(), "GetTeredoPort", Irql::DISPATCH_LEVEL);
        assert_irql_error(
            table.teardown(),
            "HandleTable::teardown",
            Irql::DISPATCH_LEVEL,
        );
    });
    assert_eq!(netio.calls(), [0, 0, 0], "nothing reached netio");

    let watcher = TeredoPortWatcher::new(&table, WatcherOptions::default()).expect("passive");
    let id = watcher.subscribe(|_| {}).expect("passive");
    with_irql(Irql::DISPATCH_LEVEL, || {
        assert_irql_error(
            watcher.subscribe(|_| {}),
            "TeredoPortWatcher::subscribe",
            Irql::DISPATCH_LEVEL,
        );
        assert_irql_error(
            watcher.subscribe_with_snapshot(|_| {}),
            "TeredoPortWatcher::subscribe_with_snapshot",
            Irql::DISPATCH_LEVEL,
        );
        assert_irql_error(
            watcher.unsubscribe(id),
            "TeredoPortWatcher::unsubscribe",
            Irql::DISPATCH_LEVEL,
        );
        // Allowed at DISPATCH_LEVEL.
        let _ = watcher.current_port();
        let _ = watcher.stats();
    });
    // APC_LEVEL is below DISPATCH_LEVEL but CancelMibChangeNotify2 needs PASSIVE_LEVEL.
    let result = with_irql(Irql::APC_LEVEL, || watcher.unregister());
    assert_irql_error(result, "TeredoPortWatcher::unregister", Irql::APC_LEVEL);
    assert_eq!(netio.calls()[2], 0, "no cancel was attempted");
    // The leaked registration is still cancelled by the teardown.
    let report = table.teardown().expect("passive");
    assert_eq!(report.cancelled, 1);
    assert_eq!(netio.live_registrations(), 0);
}

#[test]
#[should_panic(expected = "IRQL violation: TeredoPortWatcher::new called at DISPATCH_LEVEL")]
#[cfg(debug_assertions)]
fn in_debug_builds_an_irql_violation_is_an_assertion() {
    set_violation_policy(ViolationPolicy::Panic);
    let netio = MockNetio::new();
    let table = HandleTable::new(netio);
    let _ = with_irql(Irql::DISPATCH_LEVEL, || {
        TeredoPortWatcher::new(&table, WatcherOptions::default())
    });
}

#[test]
#[should_panic(expected = "CancelMibChangeNotify2 called at APC_LEVEL")]
fn the_mock_netio_fails_loudly_when_its_documented_irql_is_violated() {
    use teredo_watcher::{PortSource, RawHandle};
    let netio = MockNetio::new();
    let handle = RawHandle::new(4).expect("non-zero");
    // SAFETY: the mock checks the IRQL before looking at the handle, and panics there.
    let _ = with_irql(Irql::APC_LEVEL, || unsafe { netio.cancel(handle) });
}

#[test]
fn irql_bounds_are_as_documented() {
    assert!(IrqlBound::Passive.allows(Irql::PASSIVE_LEVEL));
    assert!(!IrqlBound::Passive.allows(Irql::APC_LEVEL));
    assert!(IrqlBound::BelowDispatch.allows(Irql::APC_LEVEL));
    assert!(!IrqlBound::BelowDispatch.allows(Irql::DISPATCH_LEVEL));
    assert!(IrqlBound::AtMostDispatch.allows(Irql::DISPATCH_LEVEL));
    assert!(!IrqlBound::AtMostDispatch.allows(Irql::HIGH_LEVEL));
}
