//! `PASSIVE_LEVEL` subscribers on the mock's work items: bursts coalesce to the newest port,
//! ports never go back, calls never overlap, and no call runs after unsubscribe, the
//! watcher's drop or the teardown returned (a queued item runs as a no-op first); IRQL and
//! allocation failures are errors.
//!
//! Every wait for another thread is bounded (`within`, `eventually`). A gate in a first call
//! holds the object's worker thread, so bursts really coalesce and an item of another
//! subscriber on the same object really stays queued (the mock runs one object's items in
//! queue order on one worker thread).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use common::{DropFlag, Gate};
use teredo_watcher::mock::{
    MockKernel, MockNetio, ViolationPolicy, event_waits, set_violation_policy, with_irql,
    work_items_initialized_on, work_items_run_on,
};
use teredo_watcher::sys::MIB_PARAMETER_NOTIFICATION;
use teredo_watcher::{
    Error, HandleTable, IoObject, Irql, Kernel, SubscriberId, TeredoEvent, TeredoPort,
    TeredoPortWatcher, WatcherOptions,
};

// ---- an allocator that fails on demand and records alignments -------------------------

/// The system allocator; on a thread that armed it, fails the n-th allocation and records
/// the largest alignment asked for.
struct Failing;

thread_local! {
    /// Allocations left before one fails (0: never fail).
    static FAIL_IN: Cell<usize> = const { Cell::new(0) };
    static MAX_ALIGN: Cell<usize> = const { Cell::new(0) };
    static TRACKING: Cell<bool> = const { Cell::new(false) };
}

/// Whether this allocation must fail; records its alignment. Never allocates or panics.
fn should_fail(layout: Layout) -> bool {
    if !TRACKING.try_with(Cell::get).unwrap_or(false) {
        return false;
    }
    let _ = MAX_ALIGN.try_with(|m| m.set(m.get().max(layout.align())));
    FAIL_IN
        .try_with(|n| match n.get() {
            0 => false,
            1 => {
                n.set(0);
                true
            }
            k => {
                n.set(k - 1);
                false
            }
        })
        .unwrap_or(false)
}

// SAFETY: every allocation that does not fail is forwarded to `System` unchanged; a failing
// one returns null, which `GlobalAlloc` allows; `should_fail` neither allocates nor unwinds.
unsafe impl GlobalAlloc for Failing {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if should_fail(layout) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Failing = Failing;

/// Runs `f` with allocation `n` of this thread failing (0: none); returns the largest
/// alignment `f` asked the allocator for.
fn tracking<R>(n: usize, f: impl FnOnce() -> R) -> (R, usize) {
    FAIL_IN.with(|c| c.set(n));
    MAX_ALIGN.with(|m| m.set(0));
    TRACKING.with(|t| t.set(true));
    let r = f();
    TRACKING.with(|t| t.set(false));
    FAIL_IN.with(|c| c.set(0));
    (r, MAX_ALIGN.with(Cell::get))
}

// ---- helpers ---------------------------------------------------------------------------

/// Scaled down under Miri.
const BURST: u16 = if cfg!(miri) { 20 } else { 1_000 };
const FIRST_PORT: u16 = 40_000;

/// How long a bounded wait lasts (Miri runs the same code far more slowly).
const BOUND: Duration = Duration::from_secs(if cfg!(miri) { 600 } else { 20 });

/// Runs `f` on another thread and returns its result, or fails the test after `BOUND`.
fn within<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(BOUND)
        .unwrap_or_else(|e| panic!("{what}: did not finish within {BOUND:?} (deadlock): {e}"))
}

/// Polls `condition` until it holds, failing the test after `BOUND`.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < BOUND,
            "{what}: not reached within {BOUND:?}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until some thread has slept on a kernel event since `before` (the thread that
/// stops the subscriber now waits for its item), then a little more.
fn blocked_since(before: usize) {
    eventually("a thread waits for the work item", || {
        event_waits() > before
    });
    settle();
}

/// Long enough for a thread that is not blocked to get somewhere.
fn settle() {
    thread::sleep(Duration::from_millis(if cfg!(miri) { 20 } else { 50 }));
}

/// A stand-in for the driver object: a unique address (never dereferenced by the mock).
struct FakeDriver(Box<u64>);

impl FakeDriver {
    fn new() -> Self {
        FakeDriver(Box::new(0))
    }
    fn raw(&self) -> *mut c_void {
        std::ptr::from_ref::<u64>(&self.0).cast_mut().cast()
    }
    fn io(&self) -> IoObject {
        // SAFETY: on the mock any non-null address works; it outlives the watchers of the
        // test (the driver is dropped last).
        unsafe { IoObject::from_raw(self.raw()) }.expect("non-null")
    }
}

/// What one passive subscriber saw, and checks it makes on every call.
#[derive(Clone, Default)]
struct Probe {
    calls: Arc<Mutex<Vec<Option<u16>>>>,
    inside: Arc<AtomicBool>,
    overlaps: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
    /// Set by the test once no call may run any more.
    stopped: Arc<AtomicBool>,
    late: Arc<AtomicUsize>,
    dropped: Arc<AtomicBool>,
}

impl Probe {
    /// A subscriber that records its ports; with a gate, its first call waits there.
    fn subscriber(&self, gate: Option<Gate>) -> impl FnMut(Option<TeredoPort>) + Send + 'static {
        let probe = self.clone();
        let flag = DropFlag(Arc::clone(&self.dropped));
        move |port| {
            let _ = &flag;
            if probe.stopped.load(Ordering::SeqCst) {
                probe.late.fetch_add(1, Ordering::SeqCst);
            }
            if probe.inside.swap(true, Ordering::SeqCst) {
                probe.overlaps.fetch_add(1, Ordering::SeqCst);
            }
            let first = {
                let mut calls = probe.calls.lock().unwrap_or_else(PoisonError::into_inner);
                calls.push(port.map(TeredoPort::get));
                calls.len() == 1
            };
            if first {
                if let Some(gate) = &gate {
                    gate.pass();
                }
            }
            probe.inside.store(false, Ordering::SeqCst);
            probe.finished.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn calls(&self) -> Vec<Option<u16>> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn count(&self) -> usize {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// No call overlapped another, and none ran after `stopped` was set.
    fn check(&self) {
        assert_eq!(self.overlaps.load(Ordering::SeqCst), 0, "calls overlapped");
        assert_eq!(
            self.late.load(Ordering::SeqCst),
            0,
            "a call ran after it was stopped"
        );
    }
}

fn options() -> WatcherOptions {
    WatcherOptions {
        initial_notification: false,
        max_subscribers: 4,
        seed_current_port: true,
    }
}

/// A table that can be shared with helper threads, and the pointer [`free`] frees it with.
fn leak_table(netio: &MockNetio) -> (&'static HandleTable<MockNetio>, *mut HandleTable<MockNetio>) {
    let raw = Box::into_raw(Box::new(HandleTable::new(netio.clone())));
    // SAFETY: a live box, freed only by `free`, once nothing borrows it.
    (unsafe { &*raw }, raw)
}

/// Frees a table made by [`leak_table`].
///
/// # Safety
///
/// `raw` came from [`leak_table`], and no watcher or other reference uses it any more.
unsafe fn free(raw: *mut HandleTable<MockNetio>) {
    // SAFETY: it came from `Box::into_raw` and nothing uses it (the caller's contract).
    drop(unsafe { Box::from_raw(raw) });
}

fn burst(netio: &MockNetio, from: u16) -> u16 {
    for i in 0..BURST {
        netio.notify_raw(from + i, MIB_PARAMETER_NOTIFICATION);
    }
    netio.wait_idle();
    from + BURST - 1
}

// ---- tests -----------------------------------------------------------------------------

#[test]
fn a_burst_coalesces_to_at_most_two_calls_ending_on_the_newest() {
    let driver = FakeDriver::new();
    let netio = MockNetio::new();
    let running = netio.client().start();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, options()).expect("register");
    netio.wait_idle();
    let probe = Probe::default();
    let gate = Gate::default();
    let _open_on_unwind = gate.opener();
    watcher
        .subscribe_passive(driver.io(), probe.subscriber(Some(gate.clone())))
        .expect("subscribe");
    // The first call (the port at subscription) holds the worker.
    eventually("first call", || gate.reached() == 1);
    let newest = burst(&netio, FIRST_PORT);
    gate.open();
    eventually("the newest port", || {
        probe.calls().last() == Some(&Some(newest))
    });
    settle();
    let calls = probe.calls();
    assert_eq!(calls, vec![Some(running), Some(newest)], "{calls:?}");
    probe.check();
    drop(watcher);
    assert!(probe.dropped.load(Ordering::SeqCst));
    eventually("the work items are uninitialized", || {
        work_items_initialized_on(driver.raw()) == 0
    });
}

#[test]
fn ports_never_go_back_and_calls_never_overlap() {
    let driver = FakeDriver::new();
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, options()).expect("register");
    let probe = Probe::default();
    watcher
        .subscribe_passive(driver.io(), probe.subscriber(None))
        .expect("subscribe");
    let newest = burst(&netio, FIRST_PORT);
    eventually("the newest port", || {
        probe.calls().last() == Some(&Some(newest))
    });
    let calls = probe.calls();
    // The first call may come before the burst (no client yet: `None`) or within it.
    let ports: Vec<u16> = calls.iter().flatten().copied().collect();
    assert!(calls.len() - ports.len() <= 1 && calls[1..].iter().all(Option::is_some));
    for pair in ports.windows(2) {
        assert!(pair[0] < pair[1], "a port went back: {calls:?}");
    }
    probe.check();
    watcher.unregister().expect("unregister");
    eventually("the work items are uninitialized", || {
        work_items_initialized_on(driver.raw()) == 0
    });
}

#[test]
fn a_call_with_the_port_of_the_previous_one_is_skipped() {
    let driver = FakeDriver::new();
    let netio = MockNetio::new();
    let running = netio.client().start();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, options()).expect("register");
    netio.wait_idle();
    let probe = Probe::default();
    let gate = Gate::default();
    let _open_on_unwind = gate.opener();
    watcher
        .subscribe_passive(driver.io(), probe.subscriber(Some(gate.clone())))
        .expect("subscribe");
    eventually("first call", || gate.reached() == 1);
    // Another port and back, while the first call runs: the state did not change.
    netio.notify_raw(FIRST_PORT, MIB_PARAMETER_NOTIFICATION);
    netio.notify_raw(running, MIB_PARAMETER_NOTIFICATION);
    netio.wait_idle();
    let before = work_items_run_on(driver.raw());
    gate.open();
    eventually("first call finished", || {
        probe.finished.load(Ordering::SeqCst) == 1
    });
    settle();
    assert_eq!(probe.calls(), vec![Some(running)]);
    assert_eq!(
        work_items_run_on(driver.raw()),
        before,
        "coalesced into the running item"
    );
    probe.check();
}

#[test]
fn unsubscribe_while_queued_waits_for_the_item_to_run_as_a_no_op() {
    let driver = FakeDriver::new();
    let netio = MockNetio::new();
    let (table, table_raw) = leak_table(&netio);
    let watcher = Arc::new(TeredoPortWatcher::new(table, options()).expect("register"));
    let (holder, queued) = (Probe::default(), Probe::default());
    let gate = Gate::default();
    let _open_on_unwind = gate.opener();
    watcher
        .subscribe_passive(driver.io(), holder.subscriber(Some(gate.clone())))
        .expect("subscribe");
    eventually("the holder runs", || gate.reached() == 1);
    // Same object: its item waits behind the holder's call.
    let id = watcher
        .subscribe_passive(driver.io(), queued.subscriber(None))
        .expect("subscribe");
    let run_before = work_items_run_on(driver.raw());
    let done = Arc::new(AtomicBool::new(false));
    let waits = event_waits();
    let unsubscribing = {
        let (watcher, done, queued) = (Arc::clone(&watcher), Arc::clone(&done), queued.clone());
        thread::spawn(move || {
            let result = watcher.unsubscribe(id);
            queued.stopped.store(true, Ordering::SeqCst);
            done.store(true, Ordering::SeqCst);
            result
        })
    };
    blocked_since(waits);
    assert!(
        !done.load(Ordering::SeqCst),
        "unsubscribe returned while its item was still queued"
    );
    gate.open();
    eventually("unsubscribe returns", || done.load(Ordering::SeqCst));
    unsubscribing.join().expect("thread").expect("unsubscribe");
    assert_eq!(queued.count(), 0, "the queued item ran as a no-op");
    assert_eq!(
        work_items_run_on(driver.raw()),
        run_before + 1,
        "the queued item ran"
    );
    assert!(
        queued.dropped.load(Ordering::SeqCst),
        "dropped by unsubscribe"
    );
    // The queued item's routine may still be returning (it drops the last reference).
    eventually("only the holder's item is left", || {
        work_items_initialized_on(driver.raw()) == 1
    });
    assert_eq!(watcher.unsubscribe(id), Err(Error::UnknownSubscriber));
    burst(&netio, FIRST_PORT);
    settle();
    assert_eq!(queued.count(), 0);
    queued.check();
    holder.check();
    drop(Arc::into_inner(watcher).expect("the only reference"));
    eventually("the work items are uninitialized", || {
        work_items_initialized_on(driver.raw()) == 0
    });
    // SAFETY: the watcher is dropped.
    unsafe { free(table_raw) };
}

#[test]
fn dropping_the_watcher_waits_for_the_running_call() {
    let driver = FakeDriver::new();
    let netio = MockNetio::new();
    let (table, table_raw) = leak_table(&netio);
    let watcher = TeredoPortWatcher::new(table, options()).expect("register");
    let probe = Probe::default();
    let gate = Gate::default();
    let _open_on_unwind = gate.opener();
    watcher
        .subscribe_passive(driver.io(), probe.subscriber(Some(gate.clone())))
        .expect("subscribe");
    eventually("the call runs", || gate.reached() == 1);
    netio.notify_raw(FIRST_PORT, MIB_PARAMETER_NOTIFICATION);
    netio.wait_idle();
    let done = Arc::new(AtomicBool::new(false));
    let waits = event_waits();
    let dropping = {
        let (done, probe) = (Arc::clone(&done), probe.clone());
        thread::spawn(move || {
            drop(watcher);
            let finished = probe.finished.load(Ordering::SeqCst);
            probe.stopped.store(true, Ordering::SeqCst);
            done.store(true, Ordering::SeqCst);
            finished
        })
    };
    blocked_since(waits);
    assert!(
        !done.load(Ordering::SeqCst),
        "drop returned during the call"
    );
    gate.open();
    let finished = within("drop", move || dropping.join().expect("thread"));
    assert_eq!(
        finished, 1,
        "the running call finished before drop returned"
    );
    settle();
    // The dirty item's next iteration was a no-op: the watcher was closing.
    assert_eq!(probe.count(), 1);
    assert!(probe.dropped.load(Ordering::SeqCst));
    probe.check();
    eventually("the work items are uninitialized", || {
        work_items_initialized_on(driver.raw()) == 0
    });
    // SAFETY: the watcher is dropped.
    unsafe { free(table_raw) };
}

#[test]
fn teardown_waits_for_a_running_and_a_queued_call() {
    let driver = FakeDriver::new();
    let netio = MockNetio::new();
    let (table, table_raw) = leak_table(&netio);
    let watcher = TeredoPortWatcher::new(table, options()).expect("register");
    let (running, queued) = (Probe::default(), Probe::default());
    let gate = Gate::default();
    let _open_on_unwind = gate.opener();
    watcher
        .subscribe_passive(driver.io(), running.subscriber(Some(gate.clone())))
        .expect("subscribe");
    eventually("the call runs", || gate.reached() == 1);
    watcher
        .subscribe_passive(driver.io(), queued.subscriber(None))
        .expect("subscribe");
    let run_before = work_items_run_on(driver.raw());
    let done = Arc::new(AtomicBool::new(false));
    let waits = event_waits();
    let tearing_down = {
        let (done, running, queued) = (Arc::clone(&done), running.clone(), queued.clone());
        thread::spawn(move || {
            let report = table.teardown();
            let seen = (
                running.finished.load(Ordering::SeqCst),
                running.dropped.load(Ordering::SeqCst),
                queued.dropped.load(Ordering::SeqCst),
            );
            running.stopped.store(true, Ordering::SeqCst);
            queued.stopped.store(true, Ordering::SeqCst);
            done.store(true, Ordering::SeqCst);
            (report, seen)
        })
    };
    blocked_since(waits);
    assert!(
        !done.load(Ordering::SeqCst),
        "teardown returned during the call"
    );
    gate.open();
    let (report, seen) = within("teardown", move || tearing_down.join().expect("thread"));
    let report = report.expect("teardown");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.cancelled, 1);
    assert_eq!(
        seen,
        (1, true, true),
        "finished and dropped before it returned"
    );
    assert_eq!(queued.count(), 0, "the queued item ran as a no-op");
    assert_eq!(work_items_run_on(driver.raw()), run_before + 1);
    netio.client().start();
    settle();
    assert_eq!(running.count(), 1);
    running.check();
    queued.check();
    // The watcher stays valid but takes no new passive subscriber.
    let late = Probe::default();
    assert_eq!(
        watcher.subscribe_passive(driver.io(), late.subscriber(None)),
        Err(Error::HandleTableClosed)
    );
    assert!(late.dropped.load(Ordering::SeqCst));
    drop(watcher);
    eventually("the work items are uninitialized", || {
        work_items_initialized_on(driver.raw()) == 0
    });
    // SAFETY: the watcher is dropped.
    unsafe { free(table_raw) };
}

#[test]
fn unsubscribe_from_a_dispatch_level_callback_only_stops_new_calls() {
    let driver = FakeDriver::new();
    let netio = MockNetio::new();
    netio.set_callback_irql(Irql::DISPATCH_LEVEL);
    let table = HandleTable::new(netio.clone());
    let watcher = Arc::new(TeredoPortWatcher::new(&table, options()).expect("register"));
    let probe = Probe::default();
    let gate = Gate::default();
    let _open_on_unwind = gate.opener();
    let id = watcher
        .subscribe_passive(driver.io(), probe.subscriber(Some(gate.clone())))
        .expect("subscribe");
    eventually("the call runs", || gate.reached() == 1);
    let outcome: Arc<Mutex<Option<Result<(), Error>>>> = Arc::default();
    // A DISPATCH_LEVEL subscriber unsubscribes the passive one from inside the callback.
    // The watcher is reached through a raw pointer: it outlives every callback (the drop
    // at the end cancels the registration first).
    let watcher_ptr = WatcherPtr(Arc::as_ptr(&watcher).cast());
    {
        let outcome = Arc::clone(&outcome);
        watcher
            .subscribe(move |_event: TeredoEvent| {
                let ptr = &watcher_ptr;
                let mut outcome = outcome.lock().unwrap_or_else(PoisonError::into_inner);
                if outcome.is_none() {
                    // SAFETY: the watcher is alive while its callbacks run (see above).
                    let watcher = unsafe { &*ptr.0 };
                    *outcome = Some(watcher.unsubscribe(id));
                }
            })
            .expect("subscribe");
    }
    netio.notify_raw(FIRST_PORT, MIB_PARAMETER_NOTIFICATION);
    netio.wait_idle();
    assert_eq!(
        *outcome.lock().unwrap_or_else(PoisonError::into_inner),
        Some(Ok(()))
    );
    // It returned while the call was still running on the worker (it could not wait).
    assert_eq!(probe.finished.load(Ordering::SeqCst), 0);
    gate.open();
    eventually("the running call ends", || {
        probe.finished.load(Ordering::SeqCst) == 1
    });
    probe.stopped.store(true, Ordering::SeqCst);
    burst(&netio, FIRST_PORT + 1);
    settle();
    assert_eq!(probe.count(), 1, "no new call after it");
    assert!(
        !probe.dropped.load(Ordering::SeqCst),
        "not dropped at DISPATCH_LEVEL"
    );
    // The next subscribe_passive (below DISPATCH_LEVEL) drops the removed one once idle.
    eventually("reaped by a later subscribe_passive", || {
        let other = Probe::default();
        let other_id = watcher
            .subscribe_passive(driver.io(), other.subscriber(None))
            .expect("subscribe");
        watcher.unsubscribe(other_id).expect("unsubscribe");
        probe.dropped.load(Ordering::SeqCst)
    });
    probe.check();
    drop(Arc::into_inner(watcher).expect("the only reference"));
    eventually("the work items are uninitialized", || {
        work_items_initialized_on(driver.raw()) == 0
    });
}

/// The watcher, for a callback of its own (see the test using it).
struct WatcherPtr(*const TeredoPortWatcher<'static, MockNetio>);
// SAFETY: the pointee is `Sync` and outlives every callback that reads it.
unsafe impl Send for WatcherPtr {}

#[test]
fn subscribe_passive_above_its_level_is_refused() {
    set_violation_policy(ViolationPolicy::Record);
    let driver = FakeDriver::new();
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, options()).expect("register");
    let probe = Probe::default();
    let refused = with_irql(Irql::DISPATCH_LEVEL, || {
        watcher.subscribe_passive(driver.io(), probe.subscriber(None))
    });
    assert!(
        matches!(
            refused,
            Err(Error::IrqlTooHigh {
                operation: "TeredoPortWatcher::subscribe_passive",
                ..
            })
        ),
        "{refused:?}"
    );
    assert!(probe.dropped.load(Ordering::SeqCst));
    eventually("the work items are uninitialized", || {
        work_items_initialized_on(driver.raw()) == 0
    });
    // APC_LEVEL is below DISPATCH_LEVEL: allowed, and the subscriber still runs at
    // PASSIVE_LEVEL on the worker.
    let at_passive = Arc::new(AtomicBool::new(false));
    let id = {
        let at_passive = Arc::clone(&at_passive);
        with_irql(Irql::APC_LEVEL, || {
            watcher.subscribe_passive(driver.io(), move |_| {
                let irql = MockKernel::current_irql();
                at_passive.store(irql == Irql::PASSIVE_LEVEL, Ordering::SeqCst);
            })
        })
        .expect("subscribe at APC_LEVEL")
    };
    eventually("the first call", || at_passive.load(Ordering::SeqCst));
    // Unsubscribe waits, so it needs < DISPATCH_LEVEL too.
    assert!(matches!(
        with_irql(Irql::DISPATCH_LEVEL, || watcher.unsubscribe(id)),
        Err(Error::IrqlTooHigh { .. })
    ));
    watcher.unsubscribe(id).expect("unsubscribe");
    eventually("the work items are uninitialized", || {
        work_items_initialized_on(driver.raw()) == 0
    });
}

#[test]
fn every_allocation_failure_is_an_error_and_leaves_nothing() {
    let driver = FakeDriver::new();
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(
        &table,
        WatcherOptions {
            max_subscribers: 2,
            ..options()
        },
    )
    .expect("register");
    // The closure's block, the event, the work item's storage, the core: allocated before
    // the work item is initialized (the mock's own bookkeeping allocates after that).
    for n in 1..=4 {
        let probe = Probe::default();
        let (result, _) = tracking(n, || {
            watcher.subscribe_passive(driver.io(), probe.subscriber(None))
        });
        assert!(
            matches!(result, Err(Error::AllocationFailed { .. })),
            "allocation {n}: {result:?}"
        );
        assert!(probe.dropped.load(Ordering::SeqCst), "closure dropped");
        eventually("the work items are uninitialized", || {
            work_items_initialized_on(driver.raw()) == 0
        });
        assert_eq!(watcher.stats().subscribers, 0);
    }
    // A failure after the work item was initialized (the registry's table is full): the
    // item is uninitialized, everything freed.
    let regular = watcher.subscribe(|_| {}).expect("subscribe");
    let first = watcher
        .subscribe_passive(driver.io(), Probe::default().subscriber(None))
        .expect("subscribe");
    let probe = Probe::default();
    assert_eq!(
        watcher.subscribe_passive(driver.io(), probe.subscriber(None)),
        Err(Error::SubscriberTableFull { capacity: 2 })
    );
    assert!(probe.dropped.load(Ordering::SeqCst));
    assert_eq!(
        work_items_initialized_on(driver.raw()),
        1,
        "the first one's"
    );
    watcher.unsubscribe(first).expect("unsubscribe");
    watcher.unsubscribe(regular).expect("unsubscribe");
    eventually("the work items are uninitialized", || {
        work_items_initialized_on(driver.raw()) == 0
    });
}

#[repr(align(64))]
struct CacheLine([u8; 64]);

#[test]
fn an_over_aligned_closure_is_placed_aligned_without_asking_for_more_than_16() {
    let driver = FakeDriver::new();
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, options()).expect("register");
    let aligned = Arc::new(AtomicBool::new(false));
    let line = CacheLine([7; 64]);
    let closure = {
        let aligned = Arc::clone(&aligned);
        move |_port: Option<TeredoPort>| {
            let at = std::ptr::from_ref(&line).addr();
            aligned.store(at.is_multiple_of(64) && line.0[63] == 7, Ordering::SeqCst);
        }
    };
    let (id, max_align) = tracking(0, || watcher.subscribe_passive(driver.io(), closure));
    let id = id.expect("subscribe");
    assert!(
        max_align <= 16,
        "asked the allocator for {max_align}-byte alignment"
    );
    eventually("the first call", || aligned.load(Ordering::SeqCst));
    watcher.unsubscribe(id).expect("unsubscribe");
}

#[test]
fn a_subscriber_may_unsubscribe_itself_from_its_own_call() {
    let driver = FakeDriver::new();
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = Arc::new(TeredoPortWatcher::new(&table, options()).expect("register"));
    let slot: Arc<Mutex<Option<SubscriberId>>> = Arc::default();
    let outcome: Arc<Mutex<Option<Result<(), Error>>>> = Arc::default();
    let watcher_ptr = WatcherPtr(Arc::as_ptr(&watcher).cast());
    let probe = Probe::default();
    let id = {
        let (slot, outcome, mut record) = (
            Arc::clone(&slot),
            Arc::clone(&outcome),
            probe.subscriber(None),
        );
        watcher
            .subscribe_passive(driver.io(), move |port| {
                record(port);
                let ptr = &watcher_ptr;
                let id = *slot.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(id) = id {
                    // SAFETY: the watcher outlives its passive calls (its drop waits).
                    let watcher = unsafe { &*ptr.0 };
                    *outcome.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(watcher.unsubscribe(id));
                }
            })
            .expect("subscribe")
    };
    eventually("the first call", || probe.count() == 1);
    *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(id);
    netio.notify_raw(FIRST_PORT, MIB_PARAMETER_NOTIFICATION);
    netio.wait_idle();
    eventually("the self-unsubscribe", || {
        outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    });
    assert_eq!(
        *outcome.lock().unwrap_or_else(PoisonError::into_inner),
        Some(Ok(()))
    );
    probe.stopped.store(true, Ordering::SeqCst);
    burst(&netio, FIRST_PORT + 1);
    settle();
    assert_eq!(probe.count(), 2);
    probe.check();
    drop(Arc::into_inner(watcher).expect("the only reference"));
    assert!(probe.dropped.load(Ordering::SeqCst));
    eventually("the work items are uninitialized", || {
        work_items_initialized_on(driver.raw()) == 0
    });
}
