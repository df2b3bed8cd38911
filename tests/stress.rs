//! Stress: concurrent notifications, subscriptions and readers on the host mock.
//!
//! - **Delivering**: two producer threads inject notifications concurrently (`notify_raw`,
//!   `MibParameterNotification`), each with its own encoded sequence in the port. The mock
//!   queues each to every registration and delivers on that registration's own thread
//!   (serialized per registration, as the API documents); with two watchers, two passes run at
//!   once on two threads, at `DISPATCH_LEVEL`.
//! - **Churn**: two threads subscribe (alternately with and without snapshot) and unsubscribe
//!   on both watchers.
//! - **Readers**: two threads read `current_port` and `exceptions` in a loop.
//!
//! Checked: every subscriber sees each producer's notifications contiguously and in order
//! after its subscription (snapshots only first; a second snapshot restarts the baseline),
//! the two permanent subscribers see every notification, both watchers end on the final
//! port, readers only ever read produced ports, and the counting allocator is back at its
//! baseline once everything is dropped. Bounded by counts, not by time.
//!
//! Default: 100,000 notifications and 10,000 subscribe/unsubscribe pairs; `TEREDO_LONG=1`:
//! 1,000,000 and 100,000; under Miri: 1,000 and 40.

mod reliability_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::Instant;

use teredo_watcher::mock::MockNetio;
use teredo_watcher::{HandleTable, Irql, TeredoEvent, TeredoPortWatcher, WatcherOptions, sys};

use reliability_common::{CountingAlloc, exclusive, live, long_mode, settle, warm_up};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Sequence numbers per producer wrap at this many values (15 bits, zero excluded).
const SEQ_SPAN: u32 = 0x7FFF;
/// The port of the last notification, sent once the producers are done.
const FINAL: u16 = 0x8000;
/// At most this many notifications queued per registration before producers yield.
const MAX_QUEUED: usize = 4_096;

fn encode(producer: u16, seq: u32) -> u16 {
    #[allow(clippy::cast_possible_truncation, reason = "seq % SEQ_SPAN < 0x7FFF")]
    let low = (seq % SEQ_SPAN) as u16 + 1;
    (producer << 15) | low
}

/// `(producer, seq mod SEQ_SPAN)` of a produced port; `None` for `FINAL` or zero.
fn decode(port: u16) -> Option<(usize, u32)> {
    let low = u32::from(port & 0x7FFF);
    (low != 0).then(|| (usize::from(port >> 15), low - 1))
}

/// Checks one subscriber's stream (see the module docs); counts violations, never panics
/// (it runs on the mock's delivery threads).
struct Checker {
    last: [Option<u32>; 2],
    seen_change: bool,
    events: u64,
    finished: bool,
    violations: Arc<AtomicUsize>,
    received: Option<Arc<AtomicU64>>,
}

impl Checker {
    fn new(violations: &Arc<AtomicUsize>, received: Option<&Arc<AtomicU64>>) -> Self {
        Checker {
            last: [None, None],
            seen_change: false,
            events: 0,
            finished: false,
            violations: Arc::clone(violations),
            received: received.map(Arc::clone),
        }
    }

    fn violation(&self) {
        self.violations.fetch_add(1, Ordering::Relaxed);
    }

    fn on(&mut self, event: TeredoEvent) {
        self.events += 1;
        if let Some(r) = &self.received {
            r.fetch_add(1, Ordering::Relaxed);
        }
        if self.finished {
            // Nothing is sent after FINAL.
            self.violation();
            return;
        }
        match event {
            TeredoEvent::Snapshot { port } => {
                if self.seen_change {
                    self.violation();
                }
                self.last = [None, None];
                if let Some((producer, seq)) = port.and_then(|p| decode(p.get())) {
                    self.last[producer] = Some(seq);
                }
            }
            TeredoEvent::PortChanged { port: Some(p) } if p.get() == FINAL => {
                self.finished = true;
            }
            TeredoEvent::PortChanged { port: Some(p) } => {
                self.seen_change = true;
                let Some((producer, seq)) = decode(p.get()) else {
                    self.violation();
                    return;
                };
                if let Some(last) = self.last[producer] {
                    if seq != (last + 1) % SEQ_SPAN {
                        self.violation();
                    }
                }
                self.last[producer] = Some(seq);
            }
            _ => self.violation(),
        }
    }
}

fn subscriber(checker: Checker) -> impl FnMut(TeredoEvent) + Send + 'static {
    let mut checker = checker;
    move |e| checker.on(e)
}

#[allow(
    clippy::too_many_lines,
    reason = "one scenario, its threads and its checks"
)]
/// Runs the scenario; returns `(notifications sent, current_port reads)`. Everything it
/// builds is dropped when it returns.
fn scenario(notifications: u32, churn: usize) -> (u64, u64) {
    let netio = MockNetio::new();
    netio.set_callback_irql(Irql::DISPATCH_LEVEL);
    let table = HandleTable::new(netio.clone());
    let options = WatcherOptions {
        initial_notification: false,
        max_subscribers: 8,
        seed_current_port: false,
    };
    let watchers = [
        TeredoPortWatcher::new(&table, options).expect("watcher 0"),
        TeredoPortWatcher::new(&table, options).expect("watcher 1"),
    ];
    let violations = Arc::new(AtomicUsize::new(0));
    let received = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let permanent: Vec<_> = watchers
        .iter()
        .zip(&received)
        .map(|(w, r)| {
            w.subscribe(subscriber(Checker::new(&violations, Some(r))))
                .expect("permanent subscriber")
        })
        .collect();
    let done = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let bad_reads = AtomicUsize::new(0);
    let pairs = AtomicUsize::new(0);
    let failed_ops = AtomicUsize::new(0);

    thread::scope(|s| {
        for producer in 0..2u16 {
            let netio = &netio;
            s.spawn(move || {
                for seq in 0..notifications / 2 {
                    netio.notify_raw(encode(producer, seq), sys::MIB_PARAMETER_NOTIFICATION);
                    if seq % 1_024 == 0 {
                        while netio.registrations().iter().any(|r| r.queued > MAX_QUEUED) {
                            thread::yield_now();
                        }
                    }
                }
            });
        }
        for churner in 0..2 {
            let (watchers, violations, pairs, failed_ops) =
                (&watchers, &violations, &pairs, &failed_ops);
            s.spawn(move || {
                for i in 0..churn / 2 {
                    let w = &watchers[(i + churner) % 2];
                    let checker = Checker::new(violations, None);
                    let id = if i % 2 == 0 {
                        w.subscribe_with_snapshot(subscriber(checker))
                    } else {
                        w.subscribe(subscriber(checker))
                    };
                    match id.map(|id| w.unsubscribe(id)) {
                        Ok(Ok(())) => {
                            pairs.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed_ops.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        for _ in 0..2 {
            let (watchers, done, reads, bad_reads) = (&watchers, &done, &reads, &bad_reads);
            s.spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    for w in watchers {
                        let port = w.current_port();
                        let valid = port.is_none_or(|p| decode(p.get()).is_some());
                        let exceptions = w.exceptions();
                        if !valid || exceptions.static_port != 3544 {
                            bad_reads.fetch_add(1, Ordering::Relaxed);
                        }
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                    if cfg!(miri) {
                        // Miri runs one thread at a time: do not starve the others.
                        thread::yield_now();
                    }
                }
            });
        }
        // Wait for the producers' work to be delivered before stopping the readers.
        let target = u64::from(notifications / 2 * 2);
        while received.iter().any(|r| r.load(Ordering::Relaxed) < target)
            || pairs.load(Ordering::Relaxed) + failed_ops.load(Ordering::Relaxed) < churn / 2 * 2
        {
            thread::yield_now();
        }
        done.store(true, Ordering::Relaxed);
    });

    netio.notify_raw(FINAL, sys::MIB_PARAMETER_NOTIFICATION);
    netio.wait_idle();
    let sent = u64::from(notifications / 2 * 2) + 1;
    for (i, w) in watchers.iter().enumerate() {
        assert_eq!(
            w.current_port().map(teredo_watcher::TeredoPort::get),
            Some(FINAL),
            "watcher {i} ends on the final port"
        );
        assert_eq!(
            received[i].load(Ordering::Relaxed),
            sent,
            "watcher {i}: the permanent subscriber saw every notification"
        );
        assert_eq!(w.stats().notifications, sent, "watcher {i}: passes");
        assert_eq!(
            w.stats().overlapping,
            0,
            "watcher {i}: no overlapping invocation"
        );
    }
    assert_eq!(violations.load(Ordering::Relaxed), 0, "order violations");
    assert_eq!(
        failed_ops.load(Ordering::Relaxed),
        0,
        "failed subscribe/unsubscribe"
    );
    assert_eq!(pairs.load(Ordering::Relaxed), churn / 2 * 2);
    assert_eq!(
        bad_reads.load(Ordering::Relaxed),
        0,
        "bad current_port reads"
    );
    let reads = reads.load(Ordering::Relaxed);
    assert!(reads > 0);

    for (w, id) in watchers.iter().zip(permanent) {
        w.unsubscribe(id).expect("unsubscribe permanent");
    }
    let [w0, w1] = watchers;
    w0.unregister().expect("unregister 0");
    w1.unregister().expect("unregister 1");
    assert!(table.teardown().expect("teardown").is_clean());
    assert_eq!(netio.live_registrations(), 0);
    (sent, reads)
}

fn run(notifications: u32, churn: usize) {
    let before = live();
    let started = Instant::now();
    let (sent, reads) = scenario(notifications, churn);
    // `thread::scope` returns once the scoped closures are done; their threads may still be
    // freeing their thread-local state and handles for a moment.
    settle();
    let after = live();
    assert_eq!(after, before, "leak");
    println!(
        "stress: {sent} notifications x 2 registrations, {churn} subscribe/unsubscribe pairs, \
         {reads} current_port reads, 0 violations, 0 leaked blocks, in {:.1?}",
        started.elapsed()
    );
}

#[test]
fn concurrent_notifications_subscriptions_and_reads() {
    let _serial = exclusive();
    warm_up();
    settle();
    if cfg!(miri) {
        // Miri interprets every instruction: a small run over the same code paths.
        run(1_000, 40);
    } else if long_mode() {
        run(1_000_000, 100_000);
    } else {
        run(100_000, 10_000);
    }
}
