//! The documented contract of netio's three Teredo calls, written once, generic over a model
//! of netio ([`Netio`]), and the library's behaviour on each ordering and fault the contract
//! allows.
//!
//! Every model of netio the project has implements [`Netio`] and runs [`run_all`]: the host
//! mock (`tests/conformance.rs`), the benchmarks' direct source (same file), the loom source
//! (`tests/loom.rs`, each check inside a loom model) and the loader harness's kernel model
//! (`harness/tests/conformance.rs`). A model that cannot produce an ordering the
//! documentation allows fails [`orders_are_complete`].
//!
//! What the documentation says (see `docs/kernel-facts.md`):
//! - with `InitialNotification = TRUE` the callback runs once with port 0 and
//!   `MibInitialNotification`, possibly before `NotifyTeredoPortChange` returns (before the
//!   handle is written back), or after it, from another thread;
//! - invocations are serialized and get the caller's context;
//! - `CancelMibChangeNotify2` waits for a callback in flight; once it returns no callback
//!   runs; it may fail, and the registration is then still live;
//! - `GetTeredoPort` fails with `ERROR_NOT_READY` when the client is not started, and may
//!   succeed with port 0;
//! - `NotifyTeredoPortChange` may succeed and return a NULL handle.
#![allow(dead_code, reason = "each model uses the checks it can run")]

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

#[cfg(not(teredo_watcher_loom))]
use teredo_watcher::StaticTeredoWatcher;
use teredo_watcher::mock::MockKernel;
use teredo_watcher::sys::{
    MIB_ADD_INSTANCE, MIB_DELETE_INSTANCE, MIB_INITIAL_NOTIFICATION, MIB_PARAMETER_NOTIFICATION,
};
use teredo_watcher::{
    Error, HandleTable, PortSource, TeredoEvent, TeredoPort, TeredoPortWatcher, WatcherOptions,
};

/// When a model delivers the initial notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Inside `NotifyTeredoPortChange`, on the calling thread, before the handle is written
    /// back.
    CallerThread,
    /// Inside `NotifyTeredoPortChange`, on another thread it waits for, before the handle is
    /// written back.
    OtherThreadBeforeReturn,
    /// After `NotifyTeredoPortChange` returned, from another thread.
    AfterReturn,
    /// While the next `GetTeredoPort` runs (the seed), from another thread.
    DuringQuery,
}

/// Every order the documentation allows.
pub const ALL_ORDERS: [Order; 4] = [
    Order::CallerThread,
    Order::OtherThreadBeforeReturn,
    Order::AfterReturn,
    Order::DuringQuery,
];

/// A model of netio's Teredo API, with the controls the checks need.
pub trait Netio: PortSource<Kernel = MockKernel> + Sized + 'static {
    /// A fresh model: client stopped, no registration, no fault queued.
    fn fresh() -> Self;
    /// The orders this model can produce (all of [`ALL_ORDERS`], or the suite fails).
    fn orders(&self) -> Vec<Order>;
    /// Chooses the order of the next registrations' initial notification.
    fn set_order(&self, order: Order);
    /// The client runs on `port` (what `GetTeredoPort` answers), or is stopped; no
    /// notification is sent.
    fn set_running(&self, port: Option<u16>);
    /// Sends one notification to every live registration and returns once it was delivered
    /// (or dropped for a cancelled one).
    fn notify_all(&self, port: u16, kind: i32);
    /// Delivers an initial notification held for after the return, and returns once no
    /// callback runs.
    fn settle(&self);
    /// Registrations netio still holds.
    fn live(&self) -> usize;
    /// The next `GetTeredoPort` succeeds with `port`.
    fn query_returns_next(&self, port: u16);
    /// The next `NotifyTeredoPortChange` registers but returns a NULL handle.
    fn notify_null_handle_next(&self);
    /// The next `CancelMibChangeNotify2` waits for a callback in flight, then fails.
    fn fail_next_cancel_after_wait(&self);
    /// Two invocations of every live registration at once (a broken contract), returning
    /// once both ended.
    fn overlap(&self, a: (u16, i32), b: (u16, i32));
}

/// Runs every check on a fresh model each.
pub fn run_all<N: Netio>() {
    orders_are_complete::<N>();
    initial_notification_once_in_each_order::<N>();
    cancel_stops_delivery::<N>();
    query_reports_the_client::<N>();
    the_watcher_learns_a_running_client_in_each_order::<N>();
    a_query_with_port_zero_means_no_port::<N>();
    // The NULL-handle case leaks the context by design (netio keeps the registration and
    // there is no handle to cancel it with), which Miri's leak check rightly reports.
    if !cfg!(miri) {
        a_null_handle_silences_the_failed_watcher::<N>();
    }
    a_cancel_that_fails_after_waiting_is_retried_by_teardown::<N>();
    overlapping_invocations_end_on_the_newest_port::<N>();
    #[cfg(not(teredo_watcher_loom))]
    {
        the_static_watcher_learns_a_running_client_in_each_order::<N>();
        the_static_watcher_retries_a_cancel_that_failed_after_waiting::<N>();
    }
}

/// A `StaticTeredoWatcher` on the heap, used as a driver uses its `static`:
/// [`Leaked::get`] gives the `'static` reference, and the drop frees it.
///
/// # Invariants
///
/// The pointer is from `Box::into_raw` and is freed only by the drop.
#[cfg(not(teredo_watcher_loom))]
struct Leaked<N: Netio>(*mut StaticTeredoWatcher<N, 2>);

#[cfg(not(teredo_watcher_loom))]
impl<N: Netio> Leaked<N> {
    fn new(watcher: StaticTeredoWatcher<N, 2>) -> Self {
        Leaked(Box::into_raw(Box::new(watcher)))
    }

    /// The watcher, as a `static` would be.
    ///
    /// # Safety
    ///
    /// The reference is not used after `self` is dropped, and the watcher is stopped before.
    unsafe fn get(&self) -> &'static StaticTeredoWatcher<N, 2> {
        // SAFETY: a live box (type invariant); the caller does not outlive it.
        unsafe { &*self.0 }
    }
}

#[cfg(not(teredo_watcher_loom))]
impl<N: Netio> Drop for Leaked<N> {
    fn drop(&mut self) {
        // SAFETY: from `Box::into_raw` (type invariant), freed once, here; the callers stop
        // the watcher first (netio holds no reference to it) and do not use it afterwards.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

/// The static form in each order: subscribers added before `start` see the initial
/// notification once, the seed or the notification leaves the running port, a deletion
/// clears it, and `stop` leaves netio nothing.
#[cfg(not(teredo_watcher_loom))]
pub fn the_static_watcher_learns_a_running_client_in_each_order<N: Netio>() {
    for order in ALL_ORDERS {
        let netio = N::fresh();
        netio.set_order(order);
        netio.set_running(Some(50_031));
        let leaked = Leaked::new(StaticTeredoWatcher::new(netio));
        // SAFETY: used only in this iteration; stopped below, before `leaked` drops.
        let watcher = unsafe { leaked.get() };
        let recorder = Recorder::default();
        watcher.subscribe(recorder.subscriber()).expect("subscribe");
        let report = watcher.start().expect("start");
        assert_eq!(report.seed_error, None, "{order:?}");
        watcher.source().settle();
        let events = recorder.events();
        assert_eq!(
            watcher.current_port(),
            TeredoPort::new(50_031),
            "{order:?}: {events:?}"
        );
        assert_eq!(
            events.last().and_then(TeredoEvent::port),
            TeredoPort::new(50_031),
            "{order:?}: {events:?}"
        );
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, TeredoEvent::Initial { .. }))
                .count(),
            1,
            "{order:?}: {events:?}"
        );
        watcher.source().notify_all(50_031, MIB_DELETE_INSTANCE);
        watcher.source().settle();
        assert_eq!(watcher.current_port(), None, "{order:?}");
        assert!(!recorder.overlapped.load(Ordering::SeqCst));
        watcher.stop().expect("stop");
        assert_eq!(watcher.source().live(), 0, "{order:?}");
        assert_eq!(
            Arc::strong_count(&recorder.events),
            1,
            "{order:?}: stop dropped the subscriber"
        );
        drop(leaked);
    }
}

/// The static form after a cancel that waited and failed: still registered, silenced, and a
/// second `stop` cancels.
#[cfg(not(teredo_watcher_loom))]
pub fn the_static_watcher_retries_a_cancel_that_failed_after_waiting<N: Netio>() {
    let leaked = Leaked::new(StaticTeredoWatcher::with_options(N::fresh(), false, false));
    // SAFETY: used only in this function; stopped below, before `leaked` drops.
    let watcher = unsafe { leaked.get() };
    let recorder = Recorder::default();
    watcher.subscribe(recorder.subscriber()).expect("subscribe");
    watcher.start().expect("start");
    watcher.source().notify_all(50_063, MIB_ADD_INSTANCE);
    watcher.source().settle();
    assert_eq!(recorder.events().len(), 1);
    watcher.source().fail_next_cancel_after_wait();
    assert!(matches!(
        watcher.stop(),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(watcher.is_running());
    assert_eq!(watcher.source().live(), 1);
    watcher
        .source()
        .notify_all(50_064, MIB_PARAMETER_NOTIFICATION);
    watcher.source().settle();
    assert_eq!(
        recorder.events().len(),
        1,
        "silenced: {:?}",
        recorder.events()
    );
    assert_eq!(watcher.current_port(), TeredoPort::new(50_064));
    watcher.stop().expect("the retry cancels");
    assert_eq!(watcher.source().live(), 0);
    assert_eq!(Arc::strong_count(&recorder.events), 1, "stop dropped it");
    drop(leaked);
}

/// The model produces every order the documentation allows.
pub fn orders_are_complete<N: Netio>() {
    let orders = N::fresh().orders();
    for order in ALL_ORDERS {
        assert!(
            orders.contains(&order),
            "the model cannot produce {order:?}"
        );
    }
}

/// What a raw callback saw.
#[derive(Default)]
struct Seen {
    calls: Mutex<Vec<(u16, i32)>>,
    inside: AtomicBool,
    overlapped: AtomicBool,
    /// Set by the test once `notify` returned: calls before it were before the handle was
    /// written back.
    returned: AtomicBool,
    before_return: AtomicUsize,
}

unsafe extern "system" fn raw_callback(context: *mut c_void, port: u16, kind: i32) {
    // SAFETY: the context is the `Seen` the check registered and keeps alive until its
    // cancel returned Ok.
    let seen = unsafe { &*context.cast::<Seen>() };
    if seen.inside.swap(true, Ordering::SeqCst) {
        seen.overlapped.store(true, Ordering::SeqCst);
    }
    if !seen.returned.load(Ordering::SeqCst) {
        seen.before_return.fetch_add(1, Ordering::SeqCst);
    }
    seen.calls
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((port, kind));
    seen.inside.store(false, Ordering::SeqCst);
}

/// The initial notification arrives once, with port 0, in the order chosen; then cancel.
pub fn initial_notification_once_in_each_order<N: Netio>() {
    for order in ALL_ORDERS {
        let netio = N::fresh();
        netio.set_order(order);
        let seen = Box::new(Seen::default());
        let context = std::ptr::from_ref(&*seen).cast_mut().cast::<c_void>();
        // SAFETY: `raw_callback` reads the context as the `Seen`, which outlives the cancel
        // below (it is dropped after it returned Ok).
        let handle = unsafe { netio.notify(raw_callback, context, true) }.expect("notify");
        seen.returned.store(true, Ordering::SeqCst);
        if order == Order::DuringQuery {
            let _ = netio.teredo_port();
        }
        netio.settle();
        let calls = seen
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        assert_eq!(calls, vec![(0, MIB_INITIAL_NOTIFICATION)], "{order:?}");
        let before = seen.before_return.load(Ordering::SeqCst);
        match order {
            Order::CallerThread | Order::OtherThreadBeforeReturn => {
                assert_eq!(before, 1, "{order:?}: before the handle was written back");
            }
            Order::AfterReturn | Order::DuringQuery => {
                assert_eq!(before, 0, "{order:?}: after notify returned");
            }
        }
        assert!(!seen.overlapped.load(Ordering::SeqCst));
        // SAFETY: the handle came from `notify` above; this thread runs no callback.
        unsafe { netio.cancel(handle) }.expect("cancel");
        assert_eq!(netio.live(), 0, "{order:?}");
        drop(seen);
    }
}

/// Notifications reach a live registration, in order and serialized, and none after cancel.
pub fn cancel_stops_delivery<N: Netio>() {
    let netio = N::fresh();
    let seen = Box::new(Seen::default());
    let context = std::ptr::from_ref(&*seen).cast_mut().cast::<c_void>();
    // SAFETY: as in `initial_notification_once_in_each_order`.
    let handle = unsafe { netio.notify(raw_callback, context, false) }.expect("notify");
    seen.returned.store(true, Ordering::SeqCst);
    netio.notify_all(50_000, MIB_ADD_INSTANCE);
    netio.notify_all(50_007, MIB_PARAMETER_NOTIFICATION);
    netio.settle();
    // SAFETY: as above.
    unsafe { netio.cancel(handle) }.expect("cancel");
    netio.notify_all(50_014, MIB_PARAMETER_NOTIFICATION);
    netio.settle();
    let calls = seen
        .calls
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(
        calls,
        vec![
            (50_000, MIB_ADD_INSTANCE),
            (50_007, MIB_PARAMETER_NOTIFICATION)
        ]
    );
    assert!(!seen.overlapped.load(Ordering::SeqCst));
    assert_eq!(netio.live(), 0);
}

/// `GetTeredoPort` reports the running client, `ERROR_NOT_READY` when stopped.
pub fn query_reports_the_client<N: Netio>() {
    let netio = N::fresh();
    assert!(matches!(
        netio.teredo_port(),
        Err(Error::TeredoNotStarted { .. })
    ));
    netio.set_running(Some(50_021));
    assert_eq!(netio.teredo_port().ok(), Some(50_021));
}

fn default_options() -> WatcherOptions {
    WatcherOptions {
        max_subscribers: 2,
        ..WatcherOptions::default()
    }
}

/// Records events and whether two calls ever overlapped.
#[derive(Clone, Default)]
struct Recorder {
    events: Arc<Mutex<Vec<TeredoEvent>>>,
    inside: Arc<AtomicBool>,
    overlapped: Arc<AtomicBool>,
}

impl Recorder {
    fn subscriber(&self) -> impl FnMut(TeredoEvent) + Send + 'static {
        let this = self.clone();
        move |event| {
            if this.inside.swap(true, Ordering::SeqCst) {
                this.overlapped.store(true, Ordering::SeqCst);
            }
            this.events
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(event);
            this.inside.store(false, Ordering::SeqCst);
        }
    }
    fn events(&self) -> Vec<TeredoEvent> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A client running at load: in every order, the watcher knows its port after creation and
/// the first subscriber's last event carries it.
pub fn the_watcher_learns_a_running_client_in_each_order<N: Netio>() {
    for order in ALL_ORDERS {
        let netio = N::fresh();
        netio.set_order(order);
        netio.set_running(Some(50_028));
        let table = HandleTable::new(netio);
        let recorder = Recorder::default();
        let (watcher, _) =
            TeredoPortWatcher::with_subscriber(&table, default_options(), recorder.subscriber())
                .expect("register");
        table.source().settle();
        let events = recorder.events();
        assert_eq!(watcher.seed_error(), None, "{order:?}");
        assert_eq!(
            watcher.current_port(),
            TeredoPort::new(50_028),
            "{order:?}: {events:?}"
        );
        assert_eq!(
            events.last().and_then(TeredoEvent::port),
            TeredoPort::new(50_028),
            "{order:?}: {events:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, TeredoEvent::Initial { .. })),
            "{order:?}: {events:?}"
        );
        // A deletion closes it.
        table.source().notify_all(50_028, MIB_DELETE_INSTANCE);
        table.source().settle();
        assert_eq!(watcher.current_port(), None);
        assert_eq!(recorder.events().last().and_then(TeredoEvent::port), None);
        assert!(!recorder.overlapped.load(Ordering::SeqCst));
        watcher.unregister().expect("cancel");
        assert_eq!(table.source().live(), 0);
    }
}

/// `GetTeredoPort` succeeding with port 0 is "no port", not an error.
pub fn a_query_with_port_zero_means_no_port<N: Netio>() {
    let netio = N::fresh();
    netio.set_running(Some(50_035));
    netio.query_returns_next(0);
    let table = HandleTable::new(netio);
    let watcher = TeredoPortWatcher::new(&table, default_options()).expect("register");
    table.source().settle();
    assert_eq!(watcher.current_port(), None);
    assert_eq!(watcher.seed_error(), None);
    watcher.unregister().expect("cancel");
}

/// A success with a NULL handle fails creation; the registration netio keeps calls nothing.
pub fn a_null_handle_silences_the_failed_watcher<N: Netio>() {
    let netio = N::fresh();
    netio.notify_null_handle_next();
    let table = HandleTable::new(netio);
    let recorder = Recorder::default();
    let quiet = WatcherOptions {
        initial_notification: false,
        seed_current_port: false,
        ..default_options()
    };
    let result = TeredoPortWatcher::with_subscriber(&table, quiet, recorder.subscriber());
    assert!(matches!(result, Err(Error::InvalidHandle { .. })));
    assert_eq!(table.source().live(), 1, "netio holds it");
    table.source().notify_all(50_042, MIB_ADD_INSTANCE);
    table.source().settle();
    assert!(recorder.events().is_empty(), "{:?}", recorder.events());
    assert_eq!(table.live_registrations(), 0);
}

/// A cancel that fails after waiting leaves the registration live, silenced; the teardown
/// cancels it and frees its subscribers.
pub fn a_cancel_that_fails_after_waiting_is_retried_by_teardown<N: Netio>() {
    let netio = N::fresh();
    let table = HandleTable::new(netio);
    let recorder = Recorder::default();
    let quiet = WatcherOptions {
        initial_notification: false,
        seed_current_port: false,
        ..default_options()
    };
    let (watcher, _) =
        TeredoPortWatcher::with_subscriber(&table, quiet, recorder.subscriber()).expect("register");
    table.source().notify_all(50_049, MIB_ADD_INSTANCE);
    table.source().settle();
    table.source().fail_next_cancel_after_wait();
    assert!(matches!(
        watcher.unregister(),
        Err(Error::InvalidParameter { .. })
    ));
    assert_eq!(table.source().live(), 1);
    table
        .source()
        .notify_all(50_056, MIB_PARAMETER_NOTIFICATION);
    table.source().settle();
    assert_eq!(
        recorder.events().len(),
        1,
        "silenced: {:?}",
        recorder.events()
    );
    let report = table.teardown().expect("passive");
    assert_eq!((report.cancelled, report.failed), (1, 0), "{report:?}");
    assert!(report.is_clean());
    assert_eq!(table.source().live(), 0);
    assert_eq!(
        Arc::strong_count(&recorder.events),
        1,
        "the teardown freed the given-up subscriber"
    );
}

/// Two invocations at once: subscribers never run twice at once, and the last event they see
/// carries the port the watcher ends on, one of the two.
pub fn overlapping_invocations_end_on_the_newest_port<N: Netio>() {
    let netio = N::fresh();
    let table = HandleTable::new(netio);
    let recorder = Recorder::default();
    let quiet = WatcherOptions {
        initial_notification: false,
        seed_current_port: false,
        ..default_options()
    };
    let (watcher, _) =
        TeredoPortWatcher::with_subscriber(&table, quiet, recorder.subscriber()).expect("register");
    table.source().overlap(
        (50_063, MIB_PARAMETER_NOTIFICATION),
        (50_070, MIB_PARAMETER_NOTIFICATION),
    );
    table.source().settle();
    let events = recorder.events();
    let end = watcher.current_port();
    assert!(
        end == TeredoPort::new(50_063) || end == TeredoPort::new(50_070),
        "{end:?}"
    );
    assert_eq!(events.last().and_then(TeredoEvent::port), end, "{events:?}");
    assert_eq!(
        events.len(),
        2,
        "delivered or coalesced, each once: {events:?}"
    );
    assert!(
        !recorder.overlapped.load(Ordering::SeqCst),
        "two calls at once"
    );
    let stats = watcher.stats();
    assert_eq!(stats.notifications, 2);
    assert!(stats.overlapping <= 1);
    watcher.unregister().expect("cancel");
}
