//! The example driver as a firewall, on the mock netio and the mock filter engine: the
//! filter set `DriverEntry` commits, port changes through the `PASSIVE_LEVEL` subscriber
//! (add before delete, bursts coalesced), every engine call failing in turn at
//! `DriverEntry` and at a port change, and an unload that leaves no filter, session or
//! work item.

use std::boxed::Box;
use std::string::String;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};
use std::vec::Vec;

use teredo_watcher::mock::{MockNetio, work_items_initialized_on, work_items_run_on};
use teredo_watcher::{HandleTable, IoObject, Irql, RuleKind, TeredoPort};

use crate::driver::{self, DriverConfig, Firewall, TeredoMonitor, UnloadReport};
use crate::exceptions::AppliedExceptions;
use crate::firewall::FwpCall;
use crate::firewall::filters::{Condition, FilterKind, FilterSpec, STATIC_PERMIT_FILTERS};
use crate::firewall::mock::{self, MockFilterEngine, failure_statuses};
use crate::host;
use crate::slot::DriverSlot;
use crate::status::NtStatus;

type Slot<'t> = DriverSlot<TeredoMonitor<'t, MockNetio>>;

/// The static filters: exception permits and test-VM blocks.
const STATIC: usize = STATIC_PERMIT_FILTERS + 3;

/// A mock netio (client stopped), a handle table, a mock filter engine and a driver object
/// (a leaked byte: a distinct address per test, never dereferenced on the mock), with the
/// process-wide host binding held.
struct Fixture {
    netio: MockNetio,
    table: HandleTable<MockNetio>,
    engine: MockFilterEngine,
    io: IoObject,
    published: &'static AppliedExceptions,
    _serial: MutexGuard<'static, ()>,
}

impl Fixture {
    fn new() -> Self {
        let serial = host::exclusive();
        host::reset();
        let netio = MockNetio::new();
        let table = HandleTable::new(netio.clone());
        let object: &'static mut u8 = Box::leak(Box::new(0));
        // SAFETY: on the mock the object is never dereferenced; a leaked byte outlives every
        // watcher.
        let io =
            unsafe { IoObject::from_raw(core::ptr::from_mut(object).cast()) }.expect("non-null");
        Fixture {
            netio,
            table,
            engine: MockFilterEngine::new(),
            io,
            published: Box::leak(Box::new(AppliedExceptions::new())),
            _serial: serial,
        }
    }

    fn entry_with<'t>(&'t self, slot: &Slot<'t>, config: DriverConfig) -> NtStatus {
        let firewall = Firewall {
            engine: self.engine.clone(),
            io_object: self.io,
        };
        driver::driver_entry(&self.table, slot, self.published, config, Some(firewall))
    }

    fn entry<'t>(&'t self, slot: &Slot<'t>) -> NtStatus {
        self.entry_with(slot, DriverConfig::default())
    }

    fn unload<'t>(&'t self, slot: &Slot<'t>) -> UnloadReport {
        driver::driver_unload(&self.table, slot, self.published)
    }

    /// The committed dynamic-port filters' ports.
    fn committed_dynamic(&self) -> Vec<u16> {
        dynamic_ports(&self.engine.committed_filters())
    }

    /// Waits until the committed dynamic-port filters are those of `port` (both
    /// directions) and the engine is idle.
    fn until_committed(&self, port: Option<u16>) {
        let want: Vec<u16> = port.map(|p| [p, p].to_vec()).unwrap_or_default();
        eventually("the dynamic port's filters committed", || {
            self.committed_dynamic() == want && self.engine.open_transactions() == 0
        });
    }

    /// Nothing of the driver is left: no filter, provider, sublayer, session, transaction,
    /// work item or registration.
    fn assert_nothing_left(&self, what: &str) {
        assert_eq!(self.engine.committed(), mock::Objects::default(), "{what}");
        assert_eq!(self.engine.open_sessions(), 0, "{what}: sessions");
        assert_eq!(self.engine.open_transactions(), 0, "{what}: transactions");
        assert_eq!(
            work_items_initialized_on(self.io.as_raw()),
            0,
            "{what}: work items"
        );
        assert_eq!(self.netio.live_registrations(), 0, "{what}: registrations");
        assert_eq!(self.table.live_registrations(), 0, "{what}: handle table");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        host::reset();
    }
}

/// Polls `done` until it holds (20 s at most): the passive subscriber runs on the mock's
/// worker thread.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn dynamic_ports(set: &[FilterSpec]) -> Vec<u16> {
    set.iter()
        .filter(|f| f.kind == FilterKind::Exception(RuleKind::DynamicPort))
        .filter_map(|f| {
            f.conditions().iter().find_map(|c| match c {
                Condition::LocalPort(p) => Some(*p),
                _ => None,
            })
        })
        .collect()
}

fn position(lines: &[String], needle: &str) -> usize {
    lines
        .iter()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line contains {needle:?} in {lines:#?}"))
}

#[test]
fn entry_commits_the_exception_set_the_blocks_and_the_running_clients_port() {
    let f = Fixture::new();
    let port = f.netio.client().start();
    let slot = Slot::new();

    assert_eq!(f.entry(&slot), NtStatus::SUCCESS);
    // The subscriber's first call (the port at subscription) finds the port committed.
    eventually("the first passive call", || {
        work_items_run_on(f.io.as_raw()) >= 1
    });
    f.until_committed(Some(port));
    let committed = f.engine.committed_filters();
    assert_eq!(
        committed,
        crate::firewall::tests::design(TeredoPort::new(port)),
        "exactly the design's filters, in the order added"
    );
    assert_eq!(committed.len(), STATIC + 2);
    assert_eq!(
        committed
            .iter()
            .filter(|f| f.kind == FilterKind::DemoBlock)
            .count(),
        3
    );
    assert_eq!(f.engine.history().len(), 1, "one transaction, one commit");
    assert_eq!(f.engine.calls(FwpCall::TransactionBegin), 1);
    assert_eq!(f.engine.open_sessions(), 1);
    let objects = f.engine.committed();
    assert_eq!(objects.providers.len(), 1);
    assert_eq!(objects.sublayers.len(), 1);

    let report = f.unload(&slot);
    assert!(
        report.is_clean() && report.firewall == Some(Ok(())),
        "{report:?}"
    );
    f.assert_nothing_left("after unload");
}

#[test]
fn port_changes_replace_the_dynamic_filters_add_before_delete_and_no_committed_state_lacks_the_port()
 {
    let f = Fixture::new();
    let slot = Slot::new();
    assert_eq!(f.entry(&slot), NtStatus::SUCCESS);
    f.until_committed(None);

    let mut ports = Vec::new();
    let first = f.netio.client().start();
    f.until_committed(Some(first));
    ports.push(first);
    f.netio.set_callback_irql(Irql::DISPATCH_LEVEL);
    for _ in 0..3 {
        let next = f.netio.client().restart();
        f.until_committed(Some(next));
        ports.push(next);
    }
    f.netio.set_callback_irql(Irql::PASSIVE_LEVEL);

    // Every committed state: the static set, and from the client's start on the filters of
    // exactly one port, the port the client had then, in the client's order.
    let history = f.engine.history();
    assert!(history.iter().all(|s| s.len() >= STATIC));
    let committed: Vec<Vec<u16>> = history.iter().map(|s| dynamic_ports(s)).collect();
    let mut expected = [Vec::new()].to_vec();
    expected.extend(ports.iter().map(|&p| [p, p].to_vec()));
    assert_eq!(
        committed, expected,
        "one commit per change, never without the port"
    );
    // Each change's transaction adds both filters before it deletes any.
    let journal = f.engine.journal();
    let mut in_txn: Vec<FwpCall> = Vec::new();
    let mut changes = 0;
    for (call, result) in journal {
        assert!(result.is_ok(), "{call:?}");
        match call {
            FwpCall::TransactionBegin => in_txn.clear(),
            FwpCall::TransactionCommit => {
                if in_txn.contains(&FwpCall::FilterDeleteById) {
                    changes += 1;
                    assert_eq!(
                        in_txn,
                        [
                            FwpCall::FilterAdd,
                            FwpCall::FilterAdd,
                            FwpCall::FilterDeleteById,
                            FwpCall::FilterDeleteById
                        ]
                    );
                }
            }
            other => in_txn.push(other),
        }
    }
    assert_eq!(changes, 3, "the three restarts replaced filters");

    f.netio.client().stop();
    f.until_committed(None);
    let report = f.unload(&slot);
    assert!(report.is_clean(), "{report:?}");
    f.assert_nothing_left("after unload");
}

#[test]
fn a_burst_of_changes_while_a_transaction_runs_coalesces_to_the_newest_port() {
    let f = Fixture::new();
    let slot = Slot::new();
    assert_eq!(f.entry(&slot), NtStatus::SUCCESS);
    f.until_committed(None);

    // The first change's transaction is held at its begin, on the worker thread.
    f.engine.pause_next(FwpCall::TransactionBegin);
    let first = f.netio.client().start();
    f.engine.wait_until_paused();
    let mut last = first;
    for _ in 0..5 {
        last = f.netio.client().restart();
    }
    f.netio.wait_idle();
    f.engine.resume();
    f.until_committed(Some(last));

    assert_eq!(
        f.engine.calls(FwpCall::TransactionBegin),
        3,
        "install, the held change, one for the whole burst"
    );
    let committed: Vec<Vec<u16>> = f
        .engine
        .history()
        .iter()
        .map(|s| dynamic_ports(s))
        .collect();
    assert_eq!(
        committed,
        [Vec::new(), [first, first].to_vec(), [last, last].to_vec()]
    );
    assert!(f.unload(&slot).is_clean());
    f.assert_nothing_left("after unload");
}

#[test]
fn entry_fails_on_each_engine_call_in_turn_and_leaves_nothing() {
    let mut swept = 0;
    for n in 0.. {
        let f = Fixture::new();
        let port = f.netio.client().start();
        let slot = Slot::new();
        f.engine
            .fail_call_after(n, mock::STATUS_INSUFFICIENT_RESOURCES);
        let (status, lines) = {
            host::capture();
            let status = f.entry(&slot);
            (status, host::take_captured())
        };
        if f.engine.failure_pending() {
            // DriverEntry made fewer than n + 1 engine calls: every one was failed once.
            assert_eq!(status, NtStatus::SUCCESS);
            f.until_committed(Some(port));
            assert!(f.unload(&slot).is_clean());
            f.assert_nothing_left("after the sweep's last unload");
            break;
        }
        assert_eq!(status, NtStatus::INSUFFICIENT_RESOURCES, "engine call {n}");
        assert!(!slot.is_occupied());
        assert_eq!(f.published.raw(), AppliedExceptions::NOT_LOADED);
        let failed = position(&lines, "firewall 1/2 (open the filter engine");
        let rolled_back = position(&lines, "rolled back: registration cancelled");
        assert!(failed < rolled_back, "{lines:#?}");
        f.assert_nothing_left(&std::format!("engine call {n} failed"));
        assert_eq!(f.netio.calls()[2], 1, "the registration was cancelled");
        swept += 1;
    }
    // open, begin, provider, sublayer, 28 filters, commit.
    assert_eq!(swept, 4 + STATIC + 2 + 1);
}

#[test]
fn entry_returns_each_documented_status_of_each_call_it_makes() {
    for call in [
        FwpCall::EngineOpen,
        FwpCall::TransactionBegin,
        FwpCall::ProviderAdd,
        FwpCall::SubLayerAdd,
        FwpCall::FilterAdd,
        FwpCall::TransactionCommit,
    ] {
        for &status in failure_statuses(call) {
            let f = Fixture::new();
            let slot = Slot::new();
            f.engine.fail_next(call, status);
            // The abort that follows fails too: the close still discards the transaction.
            f.engine.fail_next(
                FwpCall::TransactionAbort,
                mock::STATUS_FWP_NO_TXN_IN_PROGRESS,
            );
            host::capture();
            let returned = f.entry(&slot);
            let _ = host::take_captured();
            assert_eq!(returned, NtStatus(status), "{call:?}");
            f.assert_nothing_left(call.name());
        }
    }
}

#[test]
fn entry_fails_when_the_filter_manager_cannot_subscribe_and_removes_the_filters() {
    let f = Fixture::new();
    let slot = Slot::new();
    host::capture();
    // Room for the logger and the tracker only.
    let status = f.entry_with(&slot, DriverConfig { max_subscribers: 2 });
    let lines = host::take_captured();
    assert_eq!(status, NtStatus::INSUFFICIENT_RESOURCES);
    // The library drops the refused closure, so the manager, before it returns the error.
    let removed = position(&lines, "filters deleted (one transaction), engine closed");
    let failed = position(&lines, "firewall 2/2 (subscribe the filter manager");
    let rolled_back = position(&lines, "rolled back: registration cancelled");
    assert!(removed < failed && failed < rolled_back, "{lines:#?}");
    assert_eq!(
        f.engine.history().len(),
        2,
        "the install's commit, the removal's"
    );
    f.assert_nothing_left("after the rollback");
}

#[test]
fn a_failed_port_change_keeps_the_old_exception_and_the_next_change_succeeds() {
    let plan = [
        (FwpCall::TransactionBegin, 0),
        (FwpCall::FilterAdd, 0),
        (FwpCall::FilterAdd, 1),
        (FwpCall::FilterDeleteById, 0),
        (FwpCall::FilterDeleteById, 1),
        (FwpCall::TransactionCommit, 0),
    ];
    for (call, skip) in plan {
        for &status in failure_statuses(call) {
            let f = Fixture::new();
            let old = f.netio.client().start();
            let slot = Slot::new();
            assert_eq!(f.entry(&slot), NtStatus::SUCCESS);
            f.until_committed(Some(old));
            let commits = f.engine.history().len();

            f.engine.fail_after(call, skip, status);
            let failed = f.netio.client().restart();
            eventually("the change's transaction ended", || {
                !f.engine.failure_pending() && f.engine.open_transactions() == 0
            });
            f.netio.wait_idle();
            assert_eq!(
                f.engine.history().len(),
                commits,
                "{call:?}: nothing committed"
            );
            assert_eq!(
                f.committed_dynamic(),
                [old, old],
                "{call:?}: the old exception stays"
            );
            assert_eq!(
                f.published.raw(),
                u32::from(failed),
                "classify follows the notification"
            );

            let next = f.netio.client().restart();
            f.until_committed(Some(next));
            assert!(
                f.engine
                    .history()
                    .iter()
                    .all(|s| !dynamic_ports(s).is_empty()),
                "{call:?}: no committed state without a dynamic-port exception"
            );
            assert!(f.unload(&slot).is_clean());
            f.assert_nothing_left(call.name());
        }
    }
}

#[test]
fn unload_waits_for_a_port_change_in_flight_then_removes_everything_in_order() {
    let f = Fixture::new();
    let first = f.netio.client().start();
    let slot = Slot::new();
    assert_eq!(f.entry(&slot), NtStatus::SUCCESS);
    f.until_committed(Some(first));

    f.engine.pause_next(FwpCall::FilterAdd);
    let next = f.netio.client().restart();
    f.engine.wait_until_paused();
    host::capture();
    let engine = f.engine.clone();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            engine.paused(),
            "the unload must wait for the change in flight"
        );
        engine.resume();
    });
    let report = f.unload(&slot);
    let lines = host::take_captured();
    releaser.join().expect("releaser");

    assert!(
        report.is_clean() && report.firewall == Some(Ok(())),
        "{report:?}"
    );
    let committed: Vec<Vec<u16>> = f
        .engine
        .history()
        .iter()
        .map(|s| dynamic_ports(s))
        .collect();
    assert_eq!(
        committed,
        [[first, first].to_vec(), [next, next].to_vec(), Vec::new()],
        "the change in flight committed, then the removal"
    );
    let stopping = position(&lines, "stopping the filter manager's work item");
    let changed = position(&lines, "committed (the new filters added before the old");
    let removed = position(&lines, "filters deleted (one transaction), engine closed");
    let stopped = position(&lines, "filter manager stopped; no work item left");
    let cancelled = position(&lines, "DriverUnload: registration cancelled");
    assert!(
        stopping < changed && changed < removed && removed < stopped && stopped < cancelled,
        "{lines:#?}"
    );
    f.assert_nothing_left("after unload");
}
