//! Host tests of `TeredoPortWatcher` on the mock: registration, events, ports, teardown.

mod common;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{Recorder, ports};
use teredo_watcher::mock::MockNetio;
use teredo_watcher::{
    Direction, Error, HandleTable, Irql, PacketView, TEREDO_MULTICAST_GROUP, TEREDO_STATIC_PORT,
    TeredoEvent, TeredoPort, TeredoPortWatcher, WatcherOptions,
};

fn options(initial: bool) -> WatcherOptions {
    WatcherOptions {
        initial_notification: initial,
        ..WatcherOptions::default()
    }
}

#[test]
fn initial_notification_reaches_the_first_subscriber_before_new_returns() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let recorder = Recorder::new();
    let (watcher, _id) =
        TeredoPortWatcher::with_subscriber(&table, options(true), recorder.subscriber())
            .expect("register");
    // The mock delivers the initial notification before NotifyTeredoPortChange returns.
    assert_eq!(recorder.events(), vec![TeredoEvent::Initial { port: None }]);
    // The initial notification's port 0 is never surfaced as a port.
    assert_eq!(watcher.current_port(), None);
    assert_eq!(watcher.stats().notifications, 1);
    drop(watcher);
    assert_eq!(netio.live_registrations(), 0);
}

#[test]
fn without_initial_notification_nothing_is_delivered_at_registration() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let recorder = Recorder::new();
    let (watcher, _) =
        TeredoPortWatcher::with_subscriber(&table, options(false), recorder.subscriber())
            .expect("register");
    netio.wait_idle();
    assert!(recorder.events().is_empty());
    assert_eq!(watcher.stats().notifications, 0);
}

#[test]
fn client_start_restart_stop_produce_typed_events_and_track_the_port() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let recorder = Recorder::new();
    let (watcher, _) =
        TeredoPortWatcher::with_subscriber(&table, options(false), recorder.subscriber())
            .expect("register");

    let p1 = netio.client().start();
    netio.wait_idle();
    assert_eq!(watcher.current_port().map(TeredoPort::get), Some(p1));
    let p2 = netio.client().restart();
    netio.wait_idle();
    assert_ne!(p1, p2);
    assert_eq!(watcher.current_port().map(TeredoPort::get), Some(p2));
    netio.client().stop();
    netio.wait_idle();
    assert_eq!(watcher.current_port(), None);

    assert_eq!(
        recorder.events(),
        vec![
            TeredoEvent::Added {
                port: TeredoPort::new(p1)
            },
            TeredoEvent::PortChanged {
                port: TeredoPort::new(p2)
            },
            TeredoEvent::Deleted {
                previous: TeredoPort::new(p2)
            },
        ]
    );
}

#[test]
fn unknown_notification_types_are_kept_raw_and_do_not_change_the_port() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let recorder = Recorder::new();
    let (watcher, _) =
        TeredoPortWatcher::with_subscriber(&table, options(false), recorder.subscriber())
            .expect("register");
    let port = netio.client().start();
    for raw in [4, 99, -1, i32::MAX, i32::MIN] {
        netio.notify_raw(40_000, raw);
    }
    netio.wait_idle();
    let events = recorder.events();
    assert_eq!(events.len(), 6);
    for (event, raw) in events[1..].iter().zip([4, 99, -1, i32::MAX, i32::MIN]) {
        assert_eq!(
            *event,
            TeredoEvent::Unknown {
                raw_type: raw,
                raw_port: 40_000,
                port: TeredoPort::new(port)
            }
        );
    }
    assert_eq!(watcher.current_port().map(TeredoPort::get), Some(port));
}

#[test]
fn a_parameter_notification_with_port_zero_means_no_port() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, options(false)).expect("register");
    netio.client().start();
    netio.wait_idle();
    assert!(watcher.current_port().is_some());
    netio.notify_raw(0, 0);
    netio.wait_idle();
    assert_eq!(watcher.current_port(), None);
}

#[test]
fn current_port_is_seeded_from_get_teredo_port_at_creation() {
    let netio = MockNetio::new();
    let port = netio.client().start();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, options(false)).expect("register");
    assert_eq!(watcher.current_port().map(TeredoPort::get), Some(port));
    assert_eq!(netio.calls()[1], 1, "one GetTeredoPort at creation");

    let unseeded = TeredoPortWatcher::new(
        &table,
        WatcherOptions {
            seed_current_port: false,
            ..options(false)
        },
    )
    .expect("register");
    assert_eq!(unseeded.current_port(), None);
    assert_eq!(netio.calls()[1], 1, "no GetTeredoPort without seeding");
}

#[test]
fn a_failed_seed_is_not_an_error_and_leaves_the_port_unknown() {
    let netio = MockNetio::new();
    netio.client().start();
    netio.set_ipv6(false);
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, options(true)).expect("register");
    assert_eq!(watcher.current_port(), None);
    let err = watcher.seed_error().expect("the seed failed");
    assert!(matches!(err, Error::NoIpv6Stack { .. }), "{err:?}");
    assert_eq!(err.status().map(|s| s.0.cast_unsigned()), Some(0xC000_00BB));
    netio.set_ipv6(true);
    let seeded = TeredoPortWatcher::new(&table, options(true)).expect("register");
    assert_eq!(seeded.seed_error(), None);
    assert!(seeded.current_port().is_some());
}

#[test]
fn query_port_names_not_started_and_no_ipv6() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, options(false)).expect("register");
    let err = watcher.query_port().expect_err("client not started");
    assert!(matches!(err, Error::TeredoNotStarted { .. }), "{err:?}");
    assert_eq!(err.status().map(|s| s.0), Some(21));

    let port = netio.client().start();
    assert_eq!(
        watcher.query_port().expect("running"),
        TeredoPort::new(port)
    );

    netio.set_ipv6(false);
    let err = watcher.query_port().expect_err("no IPv6");
    assert!(matches!(err, Error::NoIpv6Stack { .. }), "{err:?}");
    assert_eq!(err.status().map(|s| s.0.cast_unsigned()), Some(0xC000_00BB));
}

#[test]
fn exceptions_follow_the_current_port() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, options(false)).expect("register");
    let before = watcher.exceptions();
    assert_eq!(before.dynamic_port, None);
    assert_eq!(before.static_port, TEREDO_STATIC_PORT);
    assert_eq!(before.multicast_group, TEREDO_MULTICAST_GROUP);
    let host = Ipv4Addr::new(192, 168, 1, 20);
    let inbound_to =
        |local_port: u16| PacketView::udp4(Direction::Inbound, host, local_port, 61_000);
    let discovery = PacketView::udp4(Direction::Inbound, TEREDO_MULTICAST_GROUP, 3544, 61_000);
    // Before the client runs: discovery only, and no unicast to local 3544.
    assert!(before.allows(&discovery));
    assert!(!before.allows(&inbound_to(3544)));
    let port = netio.client().start();
    netio.wait_idle();
    let after = watcher.exceptions();
    assert_eq!(after.dynamic_port.map(TeredoPort::get), Some(port));
    assert!(after.allows(&inbound_to(port)));
    assert!(!after.allows(&inbound_to(port.wrapping_add(1))));
    assert!(after.allows(&discovery));
    assert_eq!(
        after.rules().len(),
        before.rules().len() + 1,
        "the dynamic-port rule"
    );
}

#[test]
fn subscribe_with_snapshot_gets_the_current_state_first() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, options(false)).expect("register");
    let p1 = netio.client().start();
    netio.wait_idle();
    let recorder = Recorder::new();
    watcher
        .subscribe_with_snapshot(recorder.subscriber())
        .expect("subscribe");
    let p2 = netio.client().restart();
    netio.wait_idle();
    assert_eq!(ports(&recorder.events()), vec![Some(p1), Some(p2)]);
    assert!(matches!(recorder.events()[0], TeredoEvent::Snapshot { .. }));
}

#[test]
fn unsubscribed_subscribers_are_not_called_and_are_dropped() {
    struct DropFlag(Arc<AtomicBool>);
    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, options(false)).expect("register");
    let calls = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = DropFlag(Arc::clone(&dropped));
    let counter = Arc::clone(&calls);
    let id = watcher
        .subscribe(move |_| {
            let _keep = &flag;
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .expect("subscribe");
    netio.client().start();
    netio.wait_idle();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    watcher.unsubscribe(id).expect("unsubscribe");
    assert!(dropped.load(Ordering::SeqCst), "dropped by unsubscribe");
    netio.client().restart();
    netio.wait_idle();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(watcher.unsubscribe(id), Err(Error::UnknownSubscriber));
    assert_eq!(watcher.stats().subscribers, 0);
}

#[test]
fn the_subscriber_table_is_bounded_and_slots_are_reused() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(
        &table,
        WatcherOptions {
            max_subscribers: 3,
            ..options(false)
        },
    )
    .expect("register");
    let ids: Vec<_> = (0..3)
        .map(|_| watcher.subscribe(|_| {}).expect("room"))
        .collect();
    assert_eq!(
        watcher.subscribe(|_| {}),
        Err(Error::SubscriberTableFull { capacity: 3 })
    );
    watcher.unsubscribe(ids[1]).expect("unsubscribe");
    let again = watcher.subscribe(|_| {}).expect("slot reused");
    assert_ne!(again, ids[1], "a reused slot gets a new id");
    assert_eq!(watcher.unsubscribe(ids[1]), Err(Error::UnknownSubscriber));
}

#[test]
fn unsubscribing_from_inside_a_callback_stops_further_calls() {
    // Subscribers are `'static`; a callback that reaches its own watcher needs a `'static`
    // table, as a driver's `static` table is.
    static TABLE: std::sync::LazyLock<HandleTable<MockNetio>> =
        std::sync::LazyLock::new(|| HandleTable::new(MockNetio::new()));
    let netio = TABLE.source().clone();
    let watcher = Arc::new(TeredoPortWatcher::new(&TABLE, options(false)).expect("register"));
    // The id is only known after subscribe returns; hand it to the callback through a cell.
    let slot: Arc<std::sync::Mutex<Option<teredo_watcher::SubscriberId>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (w, s, c) = (Arc::clone(&watcher), Arc::clone(&slot), Arc::clone(&calls));
    let id = watcher
        .subscribe(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            if let Some(id) = s.lock().expect("lock").take() {
                w.unsubscribe(id).expect("unsubscribe from inside");
            }
        })
        .expect("subscribe");
    *slot.lock().expect("lock") = Some(id);
    netio.client().start();
    netio.client().restart();
    netio.wait_idle();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(watcher.stats().subscribers, 0);
    // A later subscribe reclaims the deferred slot (dropping the closure, which holds an Arc
    // of the watcher: break the cycle before the end of the test).
    watcher.subscribe(|_| {}).expect("subscribe");
    assert_eq!(Arc::strong_count(&watcher), 1);
}

#[test]
fn drop_waits_for_a_callback_running_on_another_thread() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let entered = Arc::new(Barrier::new(2));
    let finished = Arc::new(AtomicBool::new(false));
    let (e, f) = (Arc::clone(&entered), Arc::clone(&finished));
    let (watcher, _) = TeredoPortWatcher::with_subscriber(&table, options(false), move |_| {
        e.wait();
        std::thread::sleep(Duration::from_millis(50));
        f.store(true, Ordering::SeqCst);
    })
    .expect("register");
    netio.client().start();
    entered.wait(); // the callback is now running on the mock's delivery thread
    drop(watcher);
    assert!(
        finished.load(Ordering::SeqCst),
        "drop returned before the callback in flight finished"
    );
    assert_eq!(netio.live_registrations(), 0);
    assert_eq!(table.live_registrations(), 0);
}

#[test]
fn callbacks_run_at_the_irql_the_os_uses() {
    let netio = MockNetio::new();
    netio.set_callback_irql(Irql::DISPATCH_LEVEL);
    let table = HandleTable::new(netio.clone());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let (watcher, _) = TeredoPortWatcher::with_subscriber(&table, options(true), move |_| {
        s.lock()
            .expect("lock")
            .push(<teredo_watcher::mock::MockKernel as teredo_watcher::Kernel>::current_irql());
    })
    .expect("register");
    netio.client().start();
    netio.wait_idle();
    // Inside a DISPATCH_LEVEL callback the lock-free read is allowed.
    assert!(watcher.current_port().is_some());
    assert_eq!(
        *seen.lock().expect("lock"),
        vec![Irql::DISPATCH_LEVEL, Irql::DISPATCH_LEVEL]
    );
}

#[test]
fn many_watchers_share_a_table_and_each_gets_every_event() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let recorders: Vec<_> = (0..4).map(|_| Recorder::new()).collect();
    let watchers: Vec<_> = recorders
        .iter()
        .map(|r| {
            TeredoPortWatcher::with_subscriber(&table, options(false), r.subscriber())
                .expect("register")
                .0
        })
        .collect();
    assert_eq!(table.live_registrations(), 4);
    assert_eq!(netio.live_registrations(), 4);
    let p = netio.client().start();
    netio.wait_idle();
    for (w, r) in watchers.iter().zip(&recorders) {
        assert_eq!(w.current_port().map(TeredoPort::get), Some(p));
        assert_eq!(ports(&r.events()), vec![Some(p)]);
    }
    drop(watchers);
    assert_eq!(table.live_registrations(), 0);
    assert_eq!(netio.live_registrations(), 0);
    assert_eq!(netio.calls()[2], 4, "one cancel each");
}
