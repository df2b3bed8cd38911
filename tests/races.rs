//! Subscribe/unsubscribe racing notifications, on the mock's real delivery threads.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use teredo_watcher::mock::MockNetio;
use teredo_watcher::{HandleTable, TeredoEvent, TeredoPortWatcher, WatcherOptions};

const NOTIFICATIONS: u16 = if cfg!(miri) { 20 } else { 3_000 };
const ROUNDS: usize = if cfg!(miri) { 5 } else { 400 };

/// Checks that the ports a subscriber sees strictly increase (the notifier sends increasing
/// ports), that calls never overlap, and that no call comes after unsubscribe returned.
struct Checker {
    last: AtomicU32,
    busy: AtomicBool,
    closed: AtomicBool,
    violations: Arc<AtomicUsize>,
    calls: AtomicUsize,
}

impl Checker {
    fn new(violations: &Arc<AtomicUsize>) -> Arc<Self> {
        Arc::new(Checker {
            last: AtomicU32::new(0),
            busy: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            violations: Arc::clone(violations),
            calls: AtomicUsize::new(0),
        })
    }

    fn on_event(&self, event: TeredoEvent) {
        if self.busy.swap(true, Ordering::SeqCst) {
            self.violations.fetch_add(1, Ordering::SeqCst); // overlapping calls
        }
        if self.closed.load(Ordering::SeqCst) {
            self.violations.fetch_add(1, Ordering::SeqCst); // call after unsubscribe
        }
        let port = u32::from(event.port().map_or(0, teredo_watcher::TeredoPort::get));
        let last = self.last.swap(port, Ordering::SeqCst);
        if port != 0 && port <= last {
            self.violations.fetch_add(1, Ordering::SeqCst); // out of order or repeated
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.busy.store(false, Ordering::SeqCst);
    }
}

#[test]
fn subscribers_coming_and_going_see_ordered_events_and_nothing_after_unsubscribe() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(
        &table,
        WatcherOptions {
            initial_notification: false,
            max_subscribers: 64,
            seed_current_port: false,
        },
    )
    .expect("register");
    let violations = Arc::new(AtomicUsize::new(0));
    let stop = AtomicBool::new(false);
    let delivered_to_subscribers = AtomicUsize::new(0);

    std::thread::scope(|s| {
        // The OS: increasing ports, delivered on the mock's thread.
        s.spawn(|| {
            for port in 1..=NOTIFICATIONS {
                netio.notify_raw(port, 0);
            }
        });
        // A classify-function-like reader: the port never goes backwards.
        s.spawn(|| {
            let mut last = 0;
            while !stop.load(Ordering::SeqCst) {
                let now = watcher
                    .current_port()
                    .map_or(0, teredo_watcher::TeredoPort::get);
                if now < last {
                    violations.fetch_add(1, Ordering::SeqCst);
                }
                last = now;
            }
        });
        // Two threads subscribing (half with a snapshot) and unsubscribing.
        for t in 0..2 {
            let (watcher, violations, delivered) =
                (&watcher, &violations, &delivered_to_subscribers);
            s.spawn(move || {
                for round in 0..ROUNDS {
                    let checker = Checker::new(violations);
                    let c = Arc::clone(&checker);
                    let subscriber = move |e| c.on_event(e);
                    let id = if (round + t) % 2 == 0 {
                        watcher.subscribe_with_snapshot(subscriber)
                    } else {
                        watcher.subscribe(subscriber)
                    }
                    .expect("room");
                    std::thread::yield_now();
                    watcher.unsubscribe(id).expect("unsubscribe");
                    checker.closed.store(true, Ordering::SeqCst);
                    delivered.fetch_add(checker.calls.load(Ordering::SeqCst), Ordering::SeqCst);
                    // The closure (and its Arc) was dropped by unsubscribe.
                    assert_eq!(Arc::strong_count(&checker), 1);
                }
            });
        }
        s.spawn(|| {
            // Let the notifier finish, then stop the reader.
            while netio.registrations().first().map_or(0, |r| r.delivered)
                < u64::from(NOTIFICATIONS)
            {
                std::thread::yield_now();
            }
            stop.store(true, Ordering::SeqCst);
        });
    });
    netio.wait_idle();
    assert_eq!(violations.load(Ordering::SeqCst), 0);
    assert_eq!(
        watcher.current_port().map(teredo_watcher::TeredoPort::get),
        Some(NOTIFICATIONS),
        "the final port is the last one notified"
    );
    assert_eq!(watcher.stats().notifications, u64::from(NOTIFICATIONS));
    assert_eq!(watcher.stats().subscribers, 0);
    // The race was real: subscribers did receive notifications while coming and going.
    assert!(delivered_to_subscribers.load(Ordering::SeqCst) > 0);
}

#[test]
fn a_long_lived_subscriber_sees_every_notification_in_order_despite_churn() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    let (watcher, _) = TeredoPortWatcher::with_subscriber(
        &table,
        WatcherOptions {
            initial_notification: false,
            max_subscribers: 8,
            seed_current_port: false,
        },
        move |e: TeredoEvent| {
            s2.lock()
                .expect("lock")
                .push(e.port().map_or(0, teredo_watcher::TeredoPort::get));
        },
    )
    .expect("register");
    std::thread::scope(|s| {
        s.spawn(|| {
            for port in 1..=NOTIFICATIONS {
                netio.notify_raw(port, 0);
            }
        });
        s.spawn(|| {
            for _ in 0..ROUNDS {
                let id = watcher.subscribe(|_| {}).expect("room");
                watcher.unsubscribe(id).expect("unsubscribe");
            }
        });
    });
    netio.wait_idle();
    let seen = seen.lock().expect("lock").clone();
    let expected: Vec<u16> = (1..=NOTIFICATIONS).collect();
    assert_eq!(seen, expected);
}
