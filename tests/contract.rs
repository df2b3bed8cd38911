//! The core contract under the orderings and faults Windows may produce, one test per way it
//! can break: the seed, the first subscriber's view, the library's own waits, teardown
//! accounting, subscriber ids, IRQL checks, silencing, overlapping invocations, waits.
//!
//! Every test that waits for something another thread does bounds the wait (`within`), so a
//! deadlock fails the test instead of hanging the run.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, LazyLock, Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use common::{DropFlag, Gate, Recorder};
use teredo_watcher::mock::{
    InitialDelivery, MockNetio, ViolationPolicy, event_waits, raise_irql, set_violation_policy,
    with_irql,
};
use teredo_watcher::sys::{MIB_PARAMETER_NOTIFICATION, STATUS_INVALID_PARAMETER};
use teredo_watcher::{
    Error, HandleTable, Irql, SubscriberId, TeredoEvent, TeredoPort, TeredoPortWatcher,
    WatcherOptions,
};

const ORDERS: [InitialDelivery; 4] = [
    InitialDelivery::BeforeReturn,
    InitialDelivery::CallerThread,
    InitialDelivery::AfterReturn,
    InitialDelivery::DuringQuery,
];

/// Runs `f` on another thread and returns its result, or fails the test after 20 s.
fn within<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    let worker = thread::spawn(move || {
        let _ = tx.send(f());
    });
    let result = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{what}: did not finish within 20 s (deadlock): {e}"));
    // It has sent its result: joining it does not wait for anything else.
    let _ = worker.join();
    result
}

/// Polls `condition` until it holds, failing the test after 20 s.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: not reached within 20 s"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

fn quiet() -> WatcherOptions {
    WatcherOptions {
        initial_notification: false,
        max_subscribers: 4,
        seed_current_port: false,
    }
}

// 1. The seed is lost.

#[test]
fn the_seed_survives_an_initial_notification_in_every_order() {
    for order in ORDERS {
        let netio = MockNetio::new();
        netio.set_initial_delivery(order);
        let running = netio.client().start();
        let table = HandleTable::new(netio.clone());
        let watcher = TeredoPortWatcher::new(&table, WatcherOptions::default()).expect("register");
        netio.wait_idle();
        assert_eq!(watcher.seed_error(), None, "{order:?}");
        assert_eq!(
            watcher.current_port().map(TeredoPort::get),
            Some(running),
            "{order:?}: the initial notification carries no port, so it must not beat the seed"
        );
        assert_eq!(watcher.stats().notifications, 1, "{order:?}");
    }
}

#[test]
fn the_seed_survives_an_unknown_notification_type_during_the_query() {
    let netio = MockNetio::new();
    let running = netio.client().start();
    let table = HandleTable::new(netio.clone());
    // The initial notification comes while GetTeredoPort runs, and queues an unknown type,
    // delivered before the query answers: neither sets the port, so the seed stands.
    netio.set_initial_delivery(InitialDelivery::DuringQuery);
    let n = netio.clone();
    let (watcher, _) =
        TeredoPortWatcher::with_subscriber(&table, WatcherOptions::default(), move |e| {
            if matches!(e, TeredoEvent::Initial { .. }) {
                n.notify_raw(7, 99);
            }
        })
        .expect("register");
    netio.wait_idle();
    assert_eq!(netio.calls()[1], 1, "one GetTeredoPort: the seed's");
    assert_eq!(
        netio.registrations()[0].delivered,
        2,
        "both came during the query"
    );
    assert_eq!(watcher.current_port().map(TeredoPort::get), Some(running));
}

#[test]
fn a_seed_loses_only_to_a_notification_that_sets_the_port() {
    let netio = MockNetio::new();
    netio.client().start();
    let table = HandleTable::new(netio.clone());
    // GetTeredoPort will answer a stale port, and a restart delivered while it runs sets a
    // newer one (the initial notification, during the query, restarts the client): the
    // notification wins over the seed.
    netio.set_initial_delivery(InitialDelivery::DuringQuery);
    netio.query_returns_next(1_234);
    let newer = Arc::new(Mutex::new(None));
    let (n, nw) = (netio.clone(), Arc::clone(&newer));
    let (watcher, _) =
        TeredoPortWatcher::with_subscriber(&table, WatcherOptions::default(), move |e| {
            let mut newer = nw.lock().unwrap_or_else(PoisonError::into_inner);
            if matches!(e, TeredoEvent::Initial { .. }) && newer.is_none() {
                *newer = Some(n.client().restart());
            }
        })
        .expect("register");
    netio.wait_idle();
    let newer = newer
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .expect("the initial notification ran");
    assert_eq!(netio.calls()[1], 1, "one GetTeredoPort: the seed's");
    assert_eq!(watcher.seed_error(), None);
    assert_eq!(watcher.current_port().map(TeredoPort::get), Some(newer));
}

#[test]
fn a_query_that_succeeds_with_port_zero_means_no_port_and_no_error() {
    let netio = MockNetio::new();
    netio.client().start();
    netio.query_returns_next(0);
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, WatcherOptions::default()).expect("register");
    assert_eq!(watcher.current_port(), None);
    assert_eq!(watcher.seed_error(), None);
}

// 2. The first subscriber never learns the running port; `Deleted` reopened it.

#[test]
fn the_first_subscriber_learns_a_client_already_running_in_every_order() {
    for order in ORDERS {
        let netio = MockNetio::new();
        netio.set_initial_delivery(order);
        let running = netio.client().start();
        let table = HandleTable::new(netio.clone());
        // The README's pattern: keep the exception equal to `event.port()`.
        let allowed = Arc::new(Mutex::new(None::<TeredoPort>));
        let a = Arc::clone(&allowed);
        let recorder = Recorder::new();
        let mut record = recorder.subscriber();
        let (watcher, _) =
            TeredoPortWatcher::with_subscriber(&table, WatcherOptions::default(), move |e| {
                *a.lock().unwrap_or_else(PoisonError::into_inner) = e.port();
                record(e);
            })
            .expect("register");
        netio.wait_idle();
        let events = recorder.events();
        assert!(
            events.contains(&TeredoEvent::Snapshot {
                port: TeredoPort::new(running)
            }),
            "{order:?}: {events:?}"
        );
        assert_eq!(
            allowed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .map(TeredoPort::get),
            Some(running),
            "{order:?}: {events:?}"
        );
        netio.client().stop();
        netio.wait_idle();
        assert_eq!(
            *allowed.lock().unwrap_or_else(PoisonError::into_inner),
            None,
            "{order:?}: a deletion must close the port, not reopen it"
        );
        drop(watcher);
    }
}

// 3. The library's own waits.

static TEARDOWN_IN_INITIAL: [LazyLock<HandleTable<MockNetio>>; 2] = [
    LazyLock::new(|| HandleTable::new(MockNetio::new())),
    LazyLock::new(|| HandleTable::new(MockNetio::new())),
];

#[test]
fn teardown_inside_the_initial_notification_completes() {
    // The initial notification runs while NotifyTeredoPortChange has not returned (its entry
    // is being set up): a teardown there must not wait for that entry.
    let orders = [InitialDelivery::BeforeReturn, InitialDelivery::CallerThread];
    for (order, table) in orders.into_iter().zip(&TEARDOWN_IN_INITIAL) {
        let table: &'static HandleTable<MockNetio> = table;
        table.source().set_initial_delivery(order);
        let reports = Arc::new(Mutex::new(Vec::new()));
        let r = Arc::clone(&reports);
        let watcher = within("teardown in the initial callback", move || {
            TeredoPortWatcher::with_subscriber(
                table,
                WatcherOptions {
                    seed_current_port: false,
                    ..WatcherOptions::default()
                },
                move |event| {
                    if matches!(event, TeredoEvent::Initial { .. }) {
                        r.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(table.teardown());
                    }
                },
            )
            .map(|(w, _)| w)
        });
        let report =
            reports.lock().unwrap_or_else(PoisonError::into_inner)[0].expect("passive level");
        assert_eq!(report.skipped_in_callback, 1, "{order:?}");
        assert!(!report.is_clean(), "{order:?}: a registration is live");
        // The table closed under it, but the registration it was making completed: the
        // watcher owns it and cancels it.
        let watcher = watcher.expect("the registration in progress completes");
        watcher.unregister().expect("cancel");
        assert_eq!(table.source().live_registrations(), 0);
        assert!(table.teardown().expect("passive").is_clean());
    }
}

static TEARDOWN_VS_DROP: LazyLock<HandleTable<MockNetio>> =
    LazyLock::new(|| HandleTable::new(MockNetio::new()));

#[test]
fn teardown_inside_a_callback_while_its_watcher_is_dropped_completes() {
    let table = &*TEARDOWN_VS_DROP;
    let netio = table.source().clone();
    let report = Arc::new(Mutex::new(None));
    let entered = Arc::new(AtomicBool::new(false));
    let (r, n, e) = (Arc::clone(&report), netio.clone(), Arc::clone(&entered));
    let (watcher, _) = TeredoPortWatcher::with_subscriber(table, quiet(), move |_| {
        e.store(true, Ordering::SeqCst);
        // Wait until the watcher's drop is cancelling (it waits for this callback).
        let start = Instant::now();
        while n.calls()[2] == 0 && start.elapsed() < Duration::from_secs(10) {
            thread::yield_now();
        }
        *r.lock().unwrap_or_else(PoisonError::into_inner) = Some(TEARDOWN_VS_DROP.teardown());
    })
    .expect("register");
    netio.client().start();
    eventually("callback running", || entered.load(Ordering::SeqCst));
    within("drop racing a teardown in the callback", move || {
        drop(watcher);
    });
    let report = report
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .expect("the callback ran")
        .expect("passive level");
    assert_eq!(report.skipped_in_callback, 1);
    assert_eq!(report.cancelled, 0);
    assert_eq!(netio.live_registrations(), 0, "the drop's cancel completed");
}

// 4. Teardown accounting.

static FAILED_MEANWHILE: LazyLock<HandleTable<MockNetio>> =
    LazyLock::new(|| HandleTable::new(MockNetio::new()));

#[test]
fn teardown_cancels_a_registration_whose_watcher_cancel_failed_meanwhile() {
    // A `static`: the threads below borrow it for `'static`.
    let table_ref: &'static HandleTable<MockNetio> = &FAILED_MEANWHILE;
    let netio = table_ref.source().clone();
    // Two watchers whose subscribers block in the first notification.
    let (gate0, gate1) = (Gate::closed(), Gate::closed());
    let _open = (gate0.opener(), gate1.opener());
    let freed1 = Arc::new(AtomicBool::new(false));
    let (g0, g1) = (gate0.clone(), gate1.clone());
    let (w0, _) =
        TeredoPortWatcher::with_subscriber(table_ref, quiet(), move |_| g0.pass()).expect("w0");
    let flag = DropFlag(Arc::clone(&freed1));
    let (w1, _) = TeredoPortWatcher::with_subscriber(table_ref, quiet(), move |_| {
        let _keep = &flag;
        g1.pass();
    })
    .expect("w1");
    netio.client().start();
    eventually("both callbacks blocked", || {
        gate0.reached() == 1 && gate1.reached() == 1
    });
    // The teardown cancels entry 0 first and waits in that cancel for w0's callback.
    let teardown = thread::spawn(move || table_ref.teardown());
    eventually("teardown cancelling w0", || netio.calls()[2] == 1);
    // Meanwhile w1 is dropped: its cancel waits for w1's callback, then fails.
    netio.fail_next_cancel_after_wait(STATUS_INVALID_PARAMETER);
    let dropper = thread::spawn(move || drop(w1));
    eventually("w1's cancel waiting", || netio.calls()[2] == 2);
    // w0's callback ends: the teardown passes entry 1 while it is being cancelled.
    gate0.open();
    thread::sleep(Duration::from_millis(200));
    // w1's cancel fails: the entry is live again, given up to the table.
    gate1.open();
    dropper.join().expect("drop");
    let report =
        within("teardown", move || teardown.join().expect("teardown")).expect("passive level");
    drop(w0);
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(
        report.cancelled, 2,
        "the failed one is cancelled too: {report:?}"
    );
    assert!(report.is_clean());
    assert_eq!(
        netio.live_registrations(),
        0,
        "a clean report with netio holding one"
    );
    assert!(
        freed1.load(Ordering::SeqCst),
        "the given-up registry (and its subscriber) was leaked"
    );
}

#[test]
fn a_failed_cancel_is_reported_as_failed_not_clean() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, quiet()).expect("register");
    netio.fail_next_cancel_after_wait(STATUS_INVALID_PARAMETER);
    assert!(watcher.unregister().is_err());
    netio.fail_next_cancel_after_wait(STATUS_INVALID_PARAMETER);
    let report = table.teardown().expect("passive");
    assert_eq!((report.cancelled, report.failed), (0, 1));
    assert!(!report.is_clean());
    assert_eq!(netio.live_registrations(), 1);
    // A second teardown retries it.
    let report = table.teardown().expect("passive");
    assert_eq!((report.cancelled, report.failed), (1, 0));
    assert_eq!(netio.live_registrations(), 0);
}

// 5. Subscriber ids are bound to their watcher.

#[test]
fn another_watchers_subscriber_id_is_unknown() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let w1 = TeredoPortWatcher::new(&table, quiet()).expect("w1");
    let w2 = TeredoPortWatcher::new(&table, quiet()).expect("w2");
    let (r1, r2) = (Recorder::new(), Recorder::new());
    let id1 = w1.subscribe(r1.subscriber()).expect("subscribe");
    let _id2 = w2.subscribe(r2.subscriber()).expect("subscribe");
    assert_eq!(w2.unsubscribe(id1), Err(Error::UnknownSubscriber));
    assert_eq!(w2.stats().subscribers, 1);
    netio.client().start();
    netio.wait_idle();
    assert_eq!((r1.len(), r2.len()), (1, 1), "both still subscribed");
    // An id of a dropped watcher is unknown to a new one, even at the same address.
    drop(w1);
    let w3 = TeredoPortWatcher::new(&table, quiet()).expect("w3");
    assert_eq!(w3.unsubscribe(id1), Err(Error::UnknownSubscriber));
}

// 6. IRQL checks in release builds; no spin lock above DISPATCH_LEVEL.

static HIGH_TABLE: LazyLock<HandleTable<MockNetio>> =
    LazyLock::new(|| HandleTable::new(MockNetio::new()));
static HIGH_WATCHER: OnceLock<TeredoPortWatcher<'static, MockNetio>> = OnceLock::new();

#[test]
fn above_dispatch_level_nothing_takes_the_spin_lock() {
    let netio = HIGH_TABLE.source().clone();
    let watcher = HIGH_WATCHER
        .get_or_init(|| TeredoPortWatcher::new(&HIGH_TABLE, quiet()).expect("register"));
    let outcome = Arc::new(Mutex::new(None));
    let ids: Arc<Mutex<Option<SubscriberId>>> = Arc::default();
    let (o, i) = (Arc::clone(&outcome), Arc::clone(&ids));
    let id = watcher
        .subscribe(move |_| {
            set_violation_policy(ViolationPolicy::Record);
            let _high = raise_irql(Irql::HIGH_LEVEL);
            if let Some(id) = *i.lock().unwrap_or_else(PoisonError::into_inner) {
                let result = HIGH_WATCHER.get().map(|w| w.unsubscribe(id));
                *o.lock().unwrap_or_else(PoisonError::into_inner) = result;
            }
        })
        .expect("subscribe");
    *ids.lock().unwrap_or_else(PoisonError::into_inner) = Some(id);
    netio.client().start();
    netio.wait_idle();
    assert!(
        matches!(
            *outcome.lock().unwrap_or_else(PoisonError::into_inner),
            Some(Err(Error::IrqlTooHigh { .. }))
        ),
        "unsubscribe above DISPATCH_LEVEL inside a callback: {:?}",
        outcome.lock().unwrap_or_else(PoisonError::into_inner)
    );
    // Lock-free readers at HIGH_LEVEL: the mock spin lock panics if anything acquires it.
    set_violation_policy(ViolationPolicy::Record);
    with_irql(Irql::HIGH_LEVEL, || {
        assert_eq!(watcher.stats().subscribers, 1, "still subscribed");
        assert_eq!(HIGH_TABLE.live_registrations(), 1);
        assert!(!HIGH_TABLE.is_closed());
        assert!(!format!("{watcher:?} {:?}", &*HIGH_TABLE).is_empty());
        assert_eq!(
            watcher.current_port(),
            netio.client().port().and_then(TeredoPort::new)
        );
    });
    // The watcher lives in a `static`; its registration ends here.
    assert_eq!(HIGH_TABLE.teardown().expect("passive").cancelled, 1);
}

// 8. A watcher that cannot cancel stops calling its subscribers at once.

#[test]
fn a_watcher_dropped_at_apc_level_silences_its_subscribers() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let calls = Arc::new(AtomicUsize::new(0));
    let freed = Arc::new(AtomicBool::new(false));
    let (c, flag) = (Arc::clone(&calls), DropFlag(Arc::clone(&freed)));
    let watcher = TeredoPortWatcher::new(&table, quiet()).expect("register");
    watcher
        .subscribe(move |_| {
            let _keep = &flag;
            c.fetch_add(1, Ordering::SeqCst);
        })
        .expect("subscribe");
    netio.client().start();
    netio.wait_idle();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    set_violation_policy(ViolationPolicy::Record);
    let result = with_irql(Irql::APC_LEVEL, || watcher.unregister());
    assert!(matches!(result, Err(Error::IrqlTooHigh { .. })));
    netio.client().restart();
    netio.wait_idle();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "silenced at once");
    assert_eq!(
        netio.live_registrations(),
        1,
        "not cancelled above PASSIVE_LEVEL"
    );
    assert!(!freed.load(Ordering::SeqCst), "not freed while registered");
    let report = table.teardown().expect("passive");
    assert_eq!(report.cancelled, 1);
    assert!(
        freed.load(Ordering::SeqCst),
        "the teardown freed the given-up context"
    );
}

#[test]
fn a_watcher_dropped_inside_its_callback_silences_the_rest_of_the_pass() {
    type Watcher = TeredoPortWatcher<'static, MockNetio>;
    static TABLE: LazyLock<HandleTable<MockNetio>> =
        LazyLock::new(|| HandleTable::new(MockNetio::new()));
    let netio = TABLE.source().clone();
    let holder: Arc<Mutex<Option<Watcher>>> = Arc::default();
    let h = Arc::clone(&holder);
    let (watcher, _) = TeredoPortWatcher::with_subscriber(&*TABLE, quiet(), move |_| {
        drop(h.lock().unwrap_or_else(PoisonError::into_inner).take());
    })
    .expect("register");
    let later = Arc::new(AtomicUsize::new(0));
    let l = Arc::clone(&later);
    watcher
        .subscribe(move |_| {
            l.fetch_add(1, Ordering::SeqCst);
        })
        .expect("subscribe");
    *holder.lock().unwrap_or_else(PoisonError::into_inner) = Some(watcher);
    netio.client().start();
    netio.wait_idle();
    assert_eq!(
        later.load(Ordering::SeqCst),
        0,
        "a subscriber of a dropped watcher ran after the drop, in the same pass"
    );
    assert!(TABLE.teardown().expect("passive").is_clean());
}

// 9. An overlapping invocation never loses the newest port.

#[test]
fn an_overlapping_invocation_publishes_and_delivers_the_newest_port() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let gate = Gate::closed();
    let _open = gate.opener();
    let inside = Arc::new(AtomicBool::new(false));
    let concurrent = Arc::new(AtomicBool::new(false));
    let recorder = Recorder::new();
    let (g, i, c, mut record) = (
        gate.clone(),
        Arc::clone(&inside),
        Arc::clone(&concurrent),
        recorder.subscriber(),
    );
    let (watcher, _) = TeredoPortWatcher::with_subscriber(&table, quiet(), move |e| {
        if i.swap(true, Ordering::SeqCst) {
            c.store(true, Ordering::SeqCst);
        }
        record(e);
        g.pass();
        i.store(false, Ordering::SeqCst);
    })
    .expect("register");
    let first = netio.client().start();
    eventually("first callback blocked", || gate.reached() == 1);
    let handle = netio.registrations()[0].handle;
    assert!(netio.invoke_overlapping(handle, 61_000, MIB_PARAMETER_NOTIFICATION));
    assert_eq!(
        watcher.current_port().map(TeredoPort::get),
        Some(61_000),
        "published at once"
    );
    gate.open();
    netio.wait_idle();
    let events = recorder.events();
    assert_eq!(
        events,
        vec![
            TeredoEvent::Added {
                port: TeredoPort::new(first)
            },
            // The coalesced invocation's own event, delivered by the running pass.
            TeredoEvent::PortChanged {
                port: TeredoPort::new(61_000)
            },
        ]
    );
    assert!(!concurrent.load(Ordering::SeqCst), "two calls at once");
    assert_eq!(watcher.stats().overlapping, 1);
    assert_eq!(watcher.stats().notifications, 2);
}

// 10. Waits sleep on an event.

#[test]
fn unsubscribe_racing_a_callback_sleeps_on_an_event() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let gate = Gate::closed();
    let _open = gate.opener();
    let g = gate.clone();
    let watcher = TeredoPortWatcher::new(&table, quiet()).expect("register");
    let id = watcher.subscribe(move |_| g.pass()).expect("subscribe");
    netio.client().start();
    eventually("callback blocked", || gate.reached() == 1);
    let waits = event_waits();
    thread::scope(|s| {
        let unsubscriber = s.spawn(|| watcher.unsubscribe(id));
        eventually("unsubscribe asleep", || event_waits() > waits);
        assert!(
            !unsubscriber.is_finished(),
            "returned while the callback runs"
        );
        gate.open();
        unsubscriber.join().expect("join").expect("unsubscribe");
    });
    assert_eq!(watcher.stats().subscribers, 0);
}

// NotifyTeredoPortChange succeeding with a NULL handle.

#[test]
#[cfg_attr(
    miri,
    ignore = "netio keeps the NULL-handle registration (and the mock its delivery thread) \
              and the context leaks by design: Miri rejects both"
)]
fn a_null_handle_leaves_nothing_callable() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    netio.notify_null_handle_next();
    let result = TeredoPortWatcher::with_subscriber(&table, quiet(), move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    });
    assert!(matches!(result, Err(Error::InvalidHandle { .. })));
    assert_eq!(netio.live_registrations(), 1, "netio registered it");
    netio.client().start();
    netio.wait_idle();
    assert_eq!(
        netio.registrations()[0].delivered,
        1,
        "netio still delivers"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "a failed creation's subscriber ran"
    );
    assert_eq!(table.live_registrations(), 0);
}

// A notification that arrives while the seed is being delivered is no breach of the OS
// contract: it is coalesced, keeps its own event, and is not counted as overlapping.

#[test]
fn a_notification_during_the_seed_delivery_keeps_its_event_and_is_not_overlapping() {
    static TABLE: LazyLock<HandleTable<MockNetio>> =
        LazyLock::new(|| HandleTable::new(MockNetio::new()));
    let table: &'static HandleTable<MockNetio> = &TABLE;
    let netio = table.source().clone();
    let running = netio.client().start();
    let gate = Gate::closed();
    let _open = gate.opener();
    let recorder = Recorder::new();
    let (g, mut record) = (gate.clone(), recorder.subscriber());
    let options = WatcherOptions {
        initial_notification: false,
        ..WatcherOptions::default()
    };
    let creator = thread::spawn(move || {
        TeredoPortWatcher::with_subscriber(table, options, move |e| {
            record(e);
            if matches!(e, TeredoEvent::Snapshot { .. }) {
                g.pass();
            }
        })
        .map(|(w, _)| w)
    });
    // The seed's Snapshot runs on the creating thread and blocks there.
    eventually("seed delivery blocked", || gate.reached() == 1);
    netio.notify_raw(7, 99);
    eventually("the OS invocation returned", || {
        netio
            .registrations()
            .first()
            .is_some_and(|r| r.delivered == 1)
    });
    gate.open();
    let watcher = creator.join().expect("join").expect("register");
    let port = TeredoPort::new(running);
    assert_eq!(
        recorder.events(),
        vec![
            TeredoEvent::Snapshot { port },
            TeredoEvent::Unknown {
                raw_type: 99,
                raw_port: 7,
                port
            },
        ]
    );
    assert_eq!(watcher.stats().overlapping, 0);
    assert_eq!(watcher.stats().notifications, 1);
    assert_eq!(watcher.current_port(), port);
    watcher.unregister().expect("cancel");
}

// Teardown accounting: one skipped registration is counted once, even when its watcher's own
// cancel starts (and waits for the callback the teardown runs in) before the teardown ends.

static SKIP_ONCE: LazyLock<HandleTable<MockNetio>> =
    LazyLock::new(|| HandleTable::new(MockNetio::new()));

#[test]
fn a_registration_skipped_by_teardown_is_counted_once() {
    let netio = SKIP_ONCE.source().clone();
    let gate1 = Gate::closed();
    let _open = gate1.opener();
    let report = Arc::new(Mutex::new(None));
    let first = Arc::new(AtomicBool::new(true));
    let (g1, r, f) = (gate1.clone(), Arc::clone(&report), Arc::clone(&first));
    // w0's callback waits until w1's callback runs, then tears the table down from inside
    // its own callback: it skips w0 and cancels w1 (waiting for w1's callback).
    let (w0, _) = TeredoPortWatcher::with_subscriber(&*SKIP_ONCE, quiet(), move |_| {
        if f.swap(false, Ordering::SeqCst) {
            let start = Instant::now();
            while g1.reached() == 0 && start.elapsed() < Duration::from_secs(20) {
                thread::yield_now();
            }
            *r.lock().unwrap_or_else(PoisonError::into_inner) = Some(SKIP_ONCE.teardown());
        }
    })
    .expect("w0");
    let g1 = gate1.clone();
    let (w1, _) =
        TeredoPortWatcher::with_subscriber(&*SKIP_ONCE, quiet(), move |_| g1.pass()).expect("w1");
    netio.client().start();
    eventually("the teardown cancelling w1", || netio.calls()[2] == 1);
    // w0 dropped meanwhile: its cancel waits for the callback the teardown runs in.
    let dropper = thread::spawn(move || drop(w0));
    eventually("w0's own cancel waiting", || netio.calls()[2] == 2);
    gate1.open();
    dropper.join().expect("drop");
    let report = report
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .expect("the teardown ran")
        .expect("passive level");
    drop(w1);
    assert_eq!(report.cancelled, 1, "{report:?}");
    assert_eq!(report.skipped_in_callback, 1, "w0 counted once: {report:?}");
    assert!(!report.is_clean());
}

// `HandleTable::new` is `const` in every build a downstream crate makes, including one with
// its own `--cfg loom` (the crate's loom models use `--cfg teredo_watcher_loom`).

/// A source that never registers anything real.
#[cfg(not(teredo_watcher_loom))]
struct Nothing;

// SAFETY: it never invokes a callback, so every point of the contract holds trivially; its
// handle is never NULL.
#[cfg(not(teredo_watcher_loom))]
unsafe impl teredo_watcher::PortSource for Nothing {
    type Kernel = teredo_watcher::mock::MockKernel;
    unsafe fn notify(
        &self,
        _callback: teredo_watcher::sys::TeredoPortChangeCallback,
        _context: *mut core::ffi::c_void,
        _initial: bool,
    ) -> Result<teredo_watcher::RawHandle, Error> {
        teredo_watcher::RawHandle::new(4).ok_or(Error::UnknownSubscriber)
    }
    fn teredo_port(&self) -> Result<u16, Error> {
        Ok(0)
    }
    unsafe fn cancel(&self, _handle: teredo_watcher::RawHandle) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(not(teredo_watcher_loom))]
static CONST_TABLE: HandleTable<Nothing> = HandleTable::new(Nothing);

#[cfg(not(teredo_watcher_loom))]
#[test]
fn a_handle_table_is_built_in_a_static() {
    let watcher = TeredoPortWatcher::new(&CONST_TABLE, quiet()).expect("register");
    assert_eq!(CONST_TABLE.live_registrations(), 1);
    watcher.unregister().expect("cancel");
    assert!(CONST_TABLE.teardown().expect("passive").is_clean());
}
