//! The watcher that lives in a `static` (`StaticTeredoWatcher`): built by a `const fn`,
//! started and stopped any number of times, capacity `N`, subscribers removed and dropped by
//! `stop`, a failed cancel silences and can be retried, every initial-notification order.
#![cfg(not(teredo_watcher_loom))]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use common::{DropFlag, Recorder, ports};
use teredo_watcher::mock::{
    InitialDelivery, MockKernel, MockNetio, ViolationPolicy, set_violation_policy, with_irql,
};
use teredo_watcher::sys::TeredoPortChangeCallback;
use teredo_watcher::sys::{STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_HANDLE};
use teredo_watcher::{
    Direction, Error, IoObject, Irql, NetioCall, PacketView, PortSource, RawHandle,
    StaticTeredoWatcher, TeredoEvent, TeredoPort,
};

/// A `'static` watcher over `$netio` with room for `$n` subscribers: one `OnceLock` per use,
/// so every test has its own.
macro_rules! static_watcher {
    ($netio:expr, $n:literal) => {{
        static CELL: OnceLock<StaticTeredoWatcher<MockNetio, $n>> = OnceLock::new();
        let netio: &MockNetio = &$netio;
        CELL.get_or_init(|| StaticTeredoWatcher::new(netio.clone()))
    }};
}

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out: {what}"
        );
        std::thread::yield_now();
    }
}

// ---- a true `static`, built by the `const fn` --------------------------------------------

/// The mock behind a source that is a unit struct, so the watcher can be a real `static`.
static GLOBAL_NETIO: OnceLock<MockNetio> = OnceLock::new();

fn global_netio() -> &'static MockNetio {
    GLOBAL_NETIO.get_or_init(MockNetio::new)
}

/// A `PortSource` with a `const` constructor, as `nt::NetioPortSource` has.
struct GlobalNetio;

// SAFETY: every call forwards to the mock, which upholds the `PortSource` contract.
unsafe impl PortSource for GlobalNetio {
    type Kernel = MockKernel;

    unsafe fn notify(
        &self,
        callback: TeredoPortChangeCallback,
        context: *mut core::ffi::c_void,
        initial_notification: bool,
    ) -> Result<RawHandle, Error> {
        // SAFETY: forwarded unchanged: the caller's contract is the mock's.
        unsafe { global_netio().notify(callback, context, initial_notification) }
    }

    fn teredo_port(&self) -> Result<u16, Error> {
        global_netio().teredo_port()
    }

    unsafe fn cancel(&self, handle: RawHandle) -> Result<(), Error> {
        // SAFETY: forwarded unchanged: the caller's contract is the mock's.
        unsafe { global_netio().cancel(handle) }
    }
}

static CLASSIFY_WATCHER: StaticTeredoWatcher<GlobalNetio, 2> =
    StaticTeredoWatcher::new(GlobalNetio);

/// What a WFP classify function does per packet: no `unsafe`, no driver state, one load.
fn classify_inbound_udp(local_port: u16) -> bool {
    CLASSIFY_WATCHER.exceptions().allows(&PacketView::udp4(
        Direction::Inbound,
        std::net::Ipv4Addr::new(192, 0, 2, 10),
        local_port,
        40_000,
    ))
}

#[test]
fn a_static_built_by_a_const_fn_serves_classify_without_unsafe() {
    let netio = global_netio();
    assert_eq!(CLASSIFY_WATCHER.current_port(), None, "before start");
    assert_eq!(CLASSIFY_WATCHER.stats().capacity, 2);
    let first = netio.client().start();
    let report = CLASSIFY_WATCHER.start().expect("start");
    assert_eq!(report.seed_error, None);
    assert!(CLASSIFY_WATCHER.is_running());
    assert_eq!(netio.live_registrations(), 1);
    assert!(classify_inbound_udp(first), "the seeded port is allowed");

    let second = netio.client().restart();
    netio.wait_idle();
    assert_ne!(first, second);
    assert!(classify_inbound_udp(second), "the new port is allowed");
    assert!(!classify_inbound_udp(first), "the old port is not");

    CLASSIFY_WATCHER.stop().expect("stop");
    assert!(!CLASSIFY_WATCHER.is_running());
    assert_eq!(netio.live_registrations(), 0);
}

// ---- lifecycle --------------------------------------------------------------------------

#[test]
fn subscribers_added_before_start_see_the_initial_notification_in_every_order() {
    let orders = [
        InitialDelivery::BeforeReturn,
        InitialDelivery::CallerThread,
        InitialDelivery::AfterReturn,
        InitialDelivery::DuringQuery,
    ];
    let mut exercised = 0;
    for order in orders {
        let netio = MockNetio::new();
        netio.set_initial_delivery(order);
        let running = netio.client().start();
        let watcher = match order {
            InitialDelivery::BeforeReturn => static_watcher!(netio, 1),
            InitialDelivery::CallerThread => static_watcher!(netio, 1),
            InitialDelivery::AfterReturn => static_watcher!(netio, 1),
            InitialDelivery::DuringQuery => static_watcher!(netio, 1),
        };
        let recorder = Recorder::new();
        watcher.subscribe(recorder.subscriber()).expect("subscribe");
        watcher.start().expect("start");
        netio.wait_idle();
        eventually("two events", || recorder.len() == 2);
        netio.wait_idle();
        let events = recorder.events();
        assert_eq!(events.len(), 2, "{order:?}: {events:?}");
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, TeredoEvent::Initial { .. }))
                .count(),
            1,
            "{order:?}: exactly one initial notification: {events:?}"
        );
        assert_eq!(
            ports(&events).last().copied().flatten(),
            Some(running),
            "{order:?}: the last event carries the running port: {events:?}"
        );
        assert_eq!(watcher.current_port().map(TeredoPort::get), Some(running));
        watcher.stop().expect("stop");
        assert_eq!(netio.live_registrations(), 0, "{order:?}");
        exercised += 1;
    }
    assert_eq!(exercised, orders.len());
}

#[test]
fn start_twice_is_busy_stop_when_stopped_is_ok_and_it_restarts() {
    let netio = MockNetio::new();
    let watcher = static_watcher!(netio, 2);
    assert_eq!(watcher.stop(), Ok(()), "a stopped watcher stops at once");
    let report = watcher.start().expect("start");
    assert!(
        matches!(report.seed_error, Some(Error::TeredoNotStarted { .. })),
        "{report:?}"
    );
    assert_eq!(watcher.start(), Err(Error::StaticWatcherBusy));
    assert_eq!(
        netio.live_registrations(),
        1,
        "the second start registered nothing"
    );
    watcher.stop().expect("stop");
    assert_eq!(netio.live_registrations(), 0);

    // Started again: a new registration, which delivers.
    let recorder = Recorder::new();
    watcher.subscribe(recorder.subscriber()).expect("subscribe");
    watcher.start().expect("restart");
    let port = netio.client().start();
    netio.wait_idle();
    eventually("the change", || {
        ports(&recorder.events()).last().copied().flatten() == Some(port)
    });
    watcher.stop().expect("stop again");
    assert_eq!(netio.calls()[0], 2, "two registrations in all");
}

#[test]
fn stop_removes_and_drops_every_subscriber_and_a_restart_begins_empty() {
    let netio = MockNetio::new();
    let watcher = static_watcher!(netio, 3);
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = DropFlag(Arc::clone(&dropped));
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let id = watcher
        .subscribe(move |_| {
            let _keep = &flag;
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .expect("subscribe");
    watcher.start().expect("start");
    netio.client().start();
    netio.wait_idle();
    let before_stop = calls.load(Ordering::SeqCst);
    assert!(before_stop >= 2, "initial and the start: {before_stop}");
    assert_eq!(watcher.stats().subscribers, 1);

    watcher.stop().expect("stop");
    assert!(dropped.load(Ordering::SeqCst), "stop dropped the closure");
    assert_eq!(watcher.stats().subscribers, 0);
    assert_eq!(watcher.unsubscribe(id), Err(Error::UnknownSubscriber));

    watcher.start().expect("restart");
    netio.client().restart();
    netio.wait_idle();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before_stop,
        "a removed subscriber is not called after a restart"
    );
    // An id of the new start works, one of the old does not.
    let id = watcher.subscribe(|_| {}).expect("subscribe");
    watcher.unsubscribe(id).expect("unsubscribe");
    watcher.stop().expect("stop");
}

#[test]
fn the_capacity_is_n() {
    let netio = MockNetio::new();
    let watcher = static_watcher!(netio, 2);
    let a = watcher.subscribe(|_| {}).expect("first");
    let _b = watcher.subscribe(|_| {}).expect("second");
    assert_eq!(
        watcher.subscribe(|_| {}),
        Err(Error::SubscriberTableFull { capacity: 2 })
    );
    watcher.unsubscribe(a).expect("unsubscribe");
    watcher.subscribe(|_| {}).expect("a freed slot is reused");
    assert_eq!(watcher.stats().subscribers, 2);
    // Not started: stop still removes them.
    watcher.stop().expect("stop");
    assert_eq!(
        watcher.stats().subscribers,
        2,
        "stop of a stopped watcher does nothing"
    );
    watcher.start().expect("start");
    watcher.stop().expect("stop");
    assert_eq!(watcher.stats().subscribers, 0);
}

static SELF_STOP: OnceLock<StaticTeredoWatcher<MockNetio, 1>> = OnceLock::new();

#[test]
fn stop_inside_its_own_callback_is_refused() {
    let netio = MockNetio::new();
    let watcher = SELF_STOP.get_or_init(|| StaticTeredoWatcher::new(netio.clone()));
    let results = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&results);
    watcher
        .subscribe(move |_| {
            let result = SELF_STOP.get().map(StaticTeredoWatcher::stop);
            seen.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(result);
        })
        .expect("subscribe");
    watcher.start().expect("start");
    netio.wait_idle();
    let results = results
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert!(
        !results.is_empty(),
        "the initial notification ran the subscriber"
    );
    assert!(
        results
            .iter()
            .all(|r| *r == Some(Err(Error::CancelFromCallback))),
        "{results:?}"
    );
    assert!(watcher.is_running());
    assert_eq!(netio.self_cancel_reports(), 0, "never reached netio");
    watcher.stop().expect("stop from outside");
}

#[test]
fn a_failed_cancel_silences_the_subscribers_and_a_retry_stops() {
    let netio = MockNetio::new();
    let watcher = static_watcher!(netio, 1);
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    watcher
        .subscribe(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .expect("subscribe");
    watcher.start().expect("start");
    netio.wait_idle();
    netio.fail_next(NetioCall::CancelMibChangeNotify2, STATUS_INVALID_HANDLE);
    let failed = watcher.stop();
    assert!(
        matches!(failed, Err(Error::InvalidHandle { .. })),
        "{failed:?}"
    );
    assert!(watcher.is_running(), "still registered");
    assert_eq!(netio.live_registrations(), 1);
    assert_eq!(watcher.start(), Err(Error::StaticWatcherBusy));

    let before = calls.load(Ordering::SeqCst);
    let port = netio.client().start();
    netio.wait_idle();
    assert_eq!(calls.load(Ordering::SeqCst), before, "silenced");
    assert_eq!(
        watcher.current_port().map(TeredoPort::get),
        Some(port),
        "the port is still tracked"
    );

    watcher.stop().expect("the retry cancels");
    assert_eq!(netio.live_registrations(), 0);
    assert_eq!(watcher.stats().subscribers, 0);
}

#[test]
fn a_failed_registration_leaves_it_stopped() {
    let netio = MockNetio::new();
    let watcher = static_watcher!(netio, 1);
    netio.fail_next(
        NetioCall::NotifyTeredoPortChange,
        STATUS_INSUFFICIENT_RESOURCES,
    );
    let failed = watcher.start();
    assert!(
        matches!(failed, Err(Error::OutOfMemory { .. })),
        "{failed:?}"
    );
    assert!(!watcher.is_running());
    assert_eq!(netio.live_registrations(), 0);
    watcher.start().expect("a later start registers");
    watcher.stop().expect("stop");
}

#[test]
fn start_and_stop_require_passive_level_and_current_port_works_at_any() {
    let netio = MockNetio::new();
    let watcher = static_watcher!(netio, 1);
    // The calls below are refused with an error; the mock records the violation instead of
    // failing the test on it.
    set_violation_policy(ViolationPolicy::Record);
    let refused = with_irql(Irql::APC_LEVEL, || watcher.start());
    assert!(
        matches!(refused, Err(Error::IrqlTooHigh { .. })),
        "{refused:?}"
    );
    assert_eq!(netio.live_registrations(), 0);
    let port = netio.client().start();
    watcher.start().expect("start");
    assert_eq!(
        with_irql(Irql::HIGH_LEVEL, || watcher
            .current_port()
            .map(TeredoPort::get)),
        Some(port)
    );
    let refused = with_irql(Irql::DISPATCH_LEVEL, || watcher.stop());
    assert!(
        matches!(refused, Err(Error::IrqlTooHigh { .. })),
        "{refused:?}"
    );
    assert!(watcher.is_running());
    watcher.stop().expect("stop");
}

static DRIVER_OBJECT: u8 = 0;

#[test]
fn stop_drains_and_drops_a_passive_subscriber() {
    // SAFETY: on the mock the object is never dereferenced, and a static outlives the test.
    let driver = unsafe { IoObject::from_raw((&raw const DRIVER_OBJECT).cast_mut().cast()) }
        .expect("non-null");
    let netio = MockNetio::new();
    let watcher = static_watcher!(netio, 2);
    let last = Arc::new(Mutex::new(None));
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = DropFlag(Arc::clone(&dropped));
    let seen = Arc::clone(&last);
    watcher.start().expect("start");
    watcher
        .subscribe_passive(driver, move |port| {
            let _keep = &flag;
            *seen.lock().unwrap_or_else(PoisonError::into_inner) = port.map(TeredoPort::get);
        })
        .expect("subscribe_passive");
    let port = netio.client().start();
    eventually("the passive call", || {
        *last.lock().unwrap_or_else(PoisonError::into_inner) == Some(port)
    });
    watcher.stop().expect("stop");
    assert!(
        dropped.load(Ordering::SeqCst),
        "stop dropped the passive closure"
    );
    netio.client().restart();
    netio.wait_idle();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        *last.lock().unwrap_or_else(PoisonError::into_inner),
        Some(port),
        "no passive call after stop"
    );
    // Passive subscribers may be added again after a stop.
    watcher.start().expect("restart");
    watcher
        .subscribe_passive(driver, |_| {})
        .expect("subscribe_passive after a stop");
    watcher.stop().expect("stop");
}
