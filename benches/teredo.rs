//! Benchmarks of the two hot paths and of membership changes, each against a baseline
//! measured in the same group of the same run, then one `ratio` line per goal.
//!
//! | group | what | baseline |
//! |---|---|---|
//! | `current_port` | `TeredoPortWatcher::current_port()` | a bare `AtomicU64` load (the floor), a read under a spin lock (the naive driver) |
//! | `current_port_with_writer` | the same while another thread updates the port without pause | the same, each with its own writer |
//! | `current_port` (static) | `StaticTeredoWatcher::current_port()` on a real `static` | a bare load of a `static AtomicU64` |
//! | `fanout` | one notification delivered to N = 1, 8, 64 subscribers | a spin lock held around N boxed closures |
//! | `subscribe_unsubscribe` | subscribe + unsubscribe with 1,000 subscribers present | the same with 10 present |
//! | passive delivery (no criterion) | notification to the `PASSIVE_LEVEL` subscriber's call, on the mock's work items; calls for a burst of 1,000 changes | a bare work item queued and run on the same mock |
//!
//! Notifications are driven without the mock's threads: [`DirectSource`] gives back the
//! `extern "system"` trampoline the watcher registered, and the benchmark calls it on its
//! own thread, as netio would. The baseline is entered the same way (an `extern "system"`
//! function through a pointer) and locks with the same `MockKernel` spin lock (test-and-set
//! plus the per-thread IRQL bookkeeping), so both sides pay the same entry and lock costs.
//!
//! Run: `cargo bench --bench teredo` (full), `.ci/bench-quick` (under a minute); see
//! PERFORMANCE.md. Timing goals live here only, as ratios; nothing here fails on a miss.

use core::cell::UnsafeCell;
use core::ffi::c_void;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use criterion::{BenchmarkId, Criterion};
use teredo_watcher::mock::MockKernel;
use teredo_watcher::sys::{MIB_PARAMETER_NOTIFICATION, TeredoPortChangeCallback};
use teredo_watcher::{
    HandleTable, Kernel, StaticTeredoWatcher, TeredoEvent, TeredoPort, TeredoPortWatcher,
    WatcherOptions,
};

#[path = "support/direct_source.rs"]
#[allow(
    dead_code,
    reason = "shared with tests/alloc_free.rs, which uses other parts"
)]
mod direct_source;

use direct_source::DirectSource;

/// The port `GetTeredoPort` reports when a watcher seeds itself.
const SEED_PORT: u16 = 49_152;

/// The static form's reader, as a driver declares it: a real `static`, built by the
/// `const fn`, started in `bench_current_port`.
static STATIC_WATCHER: StaticTeredoWatcher<DirectSource, 1> =
    StaticTeredoWatcher::new(DirectSource::new(SEED_PORT));

/// The floor for [`STATIC_WATCHER`]: a bare atomic at a static address.
static STATIC_ATOMIC: AtomicU64 = AtomicU64::new(SEED_PORT as u64);

// ---------------------------------------------------------------------------------------
// The naive driver: data behind the same spin lock the library uses for membership.
// ---------------------------------------------------------------------------------------

/// A `T` behind a `MockKernel` spin lock, written the way a driver without this library
/// would: acquire (raise to `DISPATCH_LEVEL`), touch, release.
struct NaiveLocked<T> {
    lock: <MockKernel as Kernel>::RawSpinLock,
    data: UnsafeCell<T>,
}

// SAFETY: the data is only reached through `with`, which holds the lock, so one thread at a
// time has it: sharing the lock is moving a `T` between threads.
unsafe impl<T: Send> Sync for NaiveLocked<T> {}

impl<T> NaiveLocked<T> {
    fn new(value: T) -> Self {
        NaiveLocked {
            lock: <MockKernel as Kernel>::UNLOCKED,
            data: UnsafeCell::new(value),
        }
    }

    /// Runs `f` under the lock. `f` must not call `with` on the same lock (it would spin
    /// forever, as on a real kernel); no caller in this file does.
    #[inline]
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: benchmark threads run at PASSIVE_LEVEL (<= DISPATCH_LEVEL), and no caller
        // nests `with` on one lock, so this thread does not already hold it.
        let previous = unsafe { MockKernel::acquire(&self.lock) };
        // SAFETY: the lock is held until the release below, so this is the only reference.
        let result = f(unsafe { &mut *self.data.get() });
        // SAFETY: this thread holds the lock; `previous` is what the acquire returned.
        unsafe { MockKernel::release(&self.lock, previous) };
        result
    }
}

/// The naive driver's notification state: its copy of the port and its subscribers.
struct NaiveRegistry {
    port: Option<TeredoPort>,
    subscribers: Vec<Box<dyn FnMut(TeredoEvent) + Send>>,
}

/// The naive driver's OS callback: one lock around the port update and every subscriber.
///
/// # Safety
///
/// `context` is a live `NaiveLocked<NaiveRegistry>`.
unsafe extern "system" fn naive_callback(context: *mut c_void, port: u16, notification_type: i32) {
    // SAFETY: by this function's contract.
    let naive = unsafe { &*context.cast::<NaiveLocked<NaiveRegistry>>() };
    naive.with(|registry| {
        let event = TeredoEvent::from_raw(port, notification_type, registry.port);
        registry.port = event.port();
        for subscriber in &mut registry.subscribers {
            subscriber(event);
        }
    });
}

/// The subscriber both sides run: a little arithmetic on the event, kept alive by
/// `black_box`, with state of its own (8 bytes) as a real subscriber has.
fn accumulator() -> impl FnMut(TeredoEvent) + Send + 'static {
    let mut total = 0u64;
    move |event: TeredoEvent| {
        total = black_box(total.wrapping_add(u64::from(event.port().map_or(0, TeredoPort::get))));
    }
}

fn options(capacity: usize) -> WatcherOptions {
    WatcherOptions {
        initial_notification: false,
        max_subscribers: capacity,
        seed_current_port: true,
    }
}

/// Sub-batches per criterion sample; see [`fastest_batch`].
const BATCHES: u64 = 8;

/// Times `iters` calls of `routine` as [`BATCHES`] equal sub-batches and returns the fastest
/// sub-batch scaled to `iters` calls. On this shared machine a time slice lost to another
/// process (or an interrupt) inflates one sub-batch instead of the whole sample, so the
/// median over samples tracks the routine's own cost. Both sides of every single-threaded
/// ratio are timed this way; the `*_with_writer` benchmarks are not (picking the fastest
/// sub-batch would pick the one where the writer was descheduled).
fn fastest_batch<R>(iters: u64, mut routine: impl FnMut() -> R) -> Duration {
    if iters == 0 {
        return Duration::ZERO;
    }
    let batches = iters.min(BATCHES);
    let per_batch = iters / batches;
    let mut fastest = Duration::MAX;
    for _ in 0..batches {
        let start = Instant::now();
        for _ in 0..per_batch {
            black_box(routine());
        }
        fastest = fastest.min(start.elapsed());
    }
    let scaled = fastest.as_nanos() * u128::from(iters) / u128::from(per_batch);
    Duration::from_nanos(u64::try_from(scaled).unwrap_or(u64::MAX))
}

/// Sets a flag when dropped (also when unwinding).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `measure` while another thread calls `write_once` in a loop; joins that thread
/// before returning.
fn with_writer(mut write_once: impl FnMut() + Send, measure: impl FnOnce()) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                write_once();
            }
        });
        let _stop = StopOnDrop(&stop);
        measure();
    });
}

/// The next port a writer publishes: walks the dynamic range.
#[inline]
fn next_port(port: u16) -> u16 {
    if port >= 65_000 { SEED_PORT } else { port + 1 }
}

// ---------------------------------------------------------------------------------------
// current_port
// ---------------------------------------------------------------------------------------

fn bench_current_port(c: &mut Criterion) {
    let table = HandleTable::new(DirectSource::new(SEED_PORT));
    let watcher = TeredoPortWatcher::new(&table, options(1)).expect("register");
    assert_eq!(watcher.current_port().map(TeredoPort::get), Some(SEED_PORT));
    let atomic = AtomicU64::new(u64::from(SEED_PORT));
    let boxed = Box::new(AtomicU64::new(u64::from(SEED_PORT)));
    let locked = NaiveLocked::new(TeredoPort::new(SEED_PORT));

    let mut group = c.benchmark_group("current_port");
    group.bench_function("atomic_load", |b| {
        b.iter_custom(|iters| fastest_batch(iters, || black_box(&atomic).load(Ordering::Acquire)));
    });
    // The state word of a watcher lives in the heap block registered with the OS, so reading
    // it from `&TeredoPortWatcher` takes one hop (watcher -> registry) before the load. This
    // reference isolates that hop: the same load from an atomic reached through a pointer.
    group.bench_function("atomic_load_via_pointer", |b| {
        b.iter_custom(|iters| fastest_batch(iters, || black_box(&boxed).load(Ordering::Acquire)));
    });
    group.bench_function("watcher", |b| {
        b.iter_custom(|iters| fastest_batch(iters, || black_box(&watcher).current_port()));
    });
    group.bench_function("spin_lock_read", |b| {
        b.iter_custom(|iters| fastest_batch(iters, || black_box(&locked).with(|port| *port)));
    });
    let _ = STATIC_WATCHER.start().expect("start the static watcher");
    assert_eq!(
        STATIC_WATCHER.current_port().map(TeredoPort::get),
        Some(SEED_PORT)
    );
    group.bench_function("atomic_load_static", |b| {
        b.iter_custom(|iters| {
            fastest_batch(iters, || black_box(&STATIC_ATOMIC).load(Ordering::Acquire))
        });
    });
    group.bench_function("static_watcher", |b| {
        b.iter_custom(|iters| fastest_batch(iters, || black_box(&STATIC_WATCHER).current_port()));
    });
    STATIC_WATCHER.stop().expect("stop the static watcher");
    group.finish();

    // Each reader gets a writer thread that updates its port without pause, by its own
    // write path: a store; a full notification pass; a store under the lock.
    let registered = table.source().registered();
    let mut group = c.benchmark_group("current_port_with_writer");
    let mut port = SEED_PORT;
    with_writer(
        || {
            port = next_port(port);
            atomic.store(u64::from(port), Ordering::Release);
        },
        || {
            group.bench_function("atomic_load", |b| {
                b.iter(|| black_box(&atomic).load(Ordering::Acquire));
            });
        },
    );
    let mut port = SEED_PORT;
    with_writer(
        move || {
            port = next_port(port);
            // SAFETY: the watcher outlives the writer (`with_writer` joins it before
            // returning), and the writer is the only thread calling the callback meanwhile.
            unsafe { registered.fire(port, MIB_PARAMETER_NOTIFICATION) };
        },
        || {
            group.bench_function("watcher", |b| {
                b.iter(|| black_box(&watcher).current_port());
            });
        },
    );
    let mut port = SEED_PORT;
    with_writer(
        || {
            port = next_port(port);
            locked.with(|p| *p = TeredoPort::new(port));
        },
        || {
            group.bench_function("spin_lock_read", |b| {
                b.iter(|| black_box(&locked).with(|port| *port));
            });
        },
    );
    group.finish();
    drop(watcher);
}

// ---------------------------------------------------------------------------------------
// fan-out
// ---------------------------------------------------------------------------------------

const FANOUT_SIZES: [usize; 3] = [1, 8, 64];

fn bench_fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    for n in FANOUT_SIZES {
        let table = HandleTable::new(DirectSource::new(SEED_PORT));
        let watcher = TeredoPortWatcher::new(&table, options(n)).expect("register");
        for _ in 0..n {
            watcher.subscribe(accumulator()).expect("subscribe");
        }
        let registered = table.source().registered();
        group.bench_with_input(BenchmarkId::new("watcher", n), &n, |b, _| {
            b.iter_custom(|iters| {
                fastest_batch(iters, || {
                    // SAFETY: the watcher is alive for the whole benchmark and only this thread
                    // calls its callback.
                    unsafe {
                        black_box(registered)
                            .fire(black_box(SEED_PORT), MIB_PARAMETER_NOTIFICATION);
                    }
                })
            });
        });
        drop(watcher);

        let naive = NaiveLocked::new(NaiveRegistry {
            port: None,
            subscribers: (0..n)
                .map(|_| Box::new(accumulator()) as Box<dyn FnMut(TeredoEvent) + Send>)
                .collect(),
        });
        let callback: TeredoPortChangeCallback = naive_callback;
        let context = (&raw const naive).cast_mut().cast::<c_void>();
        group.bench_with_input(
            BenchmarkId::new("spin_lock_boxed_closures", n),
            &n,
            |b, _| {
                b.iter_custom(|iters| {
                    fastest_batch(iters, || {
                        // SAFETY: `context` is `naive`, alive for the whole benchmark.
                        unsafe {
                            black_box(callback)(
                                black_box(context),
                                black_box(SEED_PORT),
                                MIB_PARAMETER_NOTIFICATION,
                            );
                        }
                    })
                });
            },
        );
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------
// subscribe + unsubscribe
// ---------------------------------------------------------------------------------------

const PRESENT: [usize; 2] = [10, 1_000];

fn bench_subscribe(c: &mut Criterion) {
    let mut group = c.benchmark_group("subscribe_unsubscribe");
    for present in PRESENT {
        let table = HandleTable::new(DirectSource::new(SEED_PORT));
        let watcher = TeredoPortWatcher::new(&table, options(present + 1)).expect("register");
        for _ in 0..present {
            watcher.subscribe(accumulator()).expect("subscribe");
        }
        group.bench_with_input(BenchmarkId::new("watcher", present), &present, |b, _| {
            b.iter_custom(|iters| {
                fastest_batch(iters, || {
                    let id = watcher.subscribe(accumulator()).expect("subscribe");
                    watcher.unsubscribe(black_box(id)).expect("unsubscribe");
                })
            });
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------
// The summary: one `ratio` line per goal, from this run's medians.
// ---------------------------------------------------------------------------------------

/// Where criterion writes its reports: `$CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`,
/// else `<target dir>/criterion` found from this executable (`<target>/<profile>/deps/`).
/// Criterion is told the same directory, so the summary reads what this run wrote.
fn output_directory() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("criterion")
}

/// The median (ns) of `<dir>/<id>/new/estimates.json`, if that file was written by this run.
fn fresh_median(dir: &Path, id: &str, since: SystemTime) -> Option<f64> {
    let path = dir.join(id).join("new").join("estimates.json");
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    if modified < since {
        return None;
    }
    let json = std::fs::read_to_string(&path).ok()?;
    // `{"mean":{...},"median":{"confidence_interval":{...},"point_estimate":X,...},...}`
    let median = &json[json.find("\"median\"")?..];
    let value = &median[median.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = value.find([',', '}'])?;
    value[..end].trim().parse().ok()
}

/// A goal on a ratio.
#[derive(Clone, Copy)]
enum Goal {
    AtMost(f64),
    /// Reported for the reader; no goal.
    Info,
}

impl Goal {
    fn text(self) -> String {
        match self {
            Goal::AtMost(max) => format!("<={max}"),
            Goal::Info => "none".to_owned(),
        }
    }

    fn verdict(self, value: f64) -> &'static str {
        match self {
            Goal::AtMost(max) if value <= max => "met",
            Goal::Info => "info",
            Goal::AtMost(_) => "MISSED",
        }
    }
}

/// The cost of one more subscriber between N = 8 and N = 64, from the two medians (ns).
fn marginal(cost_64: f64, cost_8: f64) -> f64 {
    (cost_64 - cost_8) / 56.0
}

/// The ratio line of the marginal cost of one more subscriber, (cost(64) - cost(8)) / 56,
/// ours against the hand-written loop's: the per-subscriber work of the pass, without its
/// fixed cost. `true` when all four medians are from this run.
fn marginal_line(dir: &Path, since: SystemTime) -> (String, bool) {
    let medians = [
        "fanout/watcher/64",
        "fanout/watcher/8",
        "fanout/spin_lock_boxed_closures/64",
        "fanout/spin_lock_boxed_closures/8",
    ]
    .map(|id| fresh_median(dir, id, since));
    let goal = Goal::AtMost(1.2);
    let name = "fanout_marginal_per_subscriber/spin_lock_boxed_closures";
    match medians {
        [Some(o64), Some(o8), Some(b64), Some(b8)] if b64 > b8 => {
            let (ours, base) = (marginal(o64, o8), marginal(b64, b8));
            let value = ours / base;
            let line = format!(
                "ratio {name} {value:.3} goal {} {} ({ours:.3} ns / {base:.3} ns per subscriber)",
                goal.text(),
                goal.verdict(value)
            );
            (line, true)
        }
        _ => (
            format!(
                "ratio {name} n/a goal {} not-measured-in-this-run",
                goal.text()
            ),
            false,
        ),
    }
}

fn summary(dir: &Path, since: SystemTime) {
    let mut ratios: Vec<(String, &str, &str, Goal)> = vec![
        (
            "current_port/atomic_load".into(),
            "current_port/watcher",
            "current_port/atomic_load",
            Goal::AtMost(1.2),
        ),
        (
            "current_port_with_writer/atomic_load".into(),
            "current_port_with_writer/watcher",
            "current_port_with_writer/atomic_load",
            Goal::AtMost(1.2),
        ),
        (
            "current_port_static/atomic_load_static".into(),
            "current_port/static_watcher",
            "current_port/atomic_load_static",
            Goal::AtMost(1.05),
        ),
        (
            "current_port/atomic_load_via_pointer".into(),
            "current_port/watcher",
            "current_port/atomic_load_via_pointer",
            Goal::Info,
        ),
        (
            "current_port/spin_lock_read".into(),
            "current_port/watcher",
            "current_port/spin_lock_read",
            Goal::Info,
        ),
        (
            "current_port_with_writer/spin_lock_read".into(),
            "current_port_with_writer/watcher",
            "current_port_with_writer/spin_lock_read",
            Goal::Info,
        ),
    ];
    let fanout: Vec<(String, String, String)> = FANOUT_SIZES
        .iter()
        .map(|n| {
            (
                format!("fanout_{n}/spin_lock_boxed_closures"),
                format!("fanout/watcher/{n}"),
                format!("fanout/spin_lock_boxed_closures/{n}"),
            )
        })
        .collect();
    for (name, ours, base) in &fanout {
        ratios.push((name.clone(), ours, base, Goal::AtMost(1.5)));
    }
    ratios.push((
        "subscribe_unsubscribe_1000/subscribe_unsubscribe_10".into(),
        "subscribe_unsubscribe/watcher/1000",
        "subscribe_unsubscribe/watcher/10",
        Goal::AtMost(2.0),
    ));

    let mut lines = Vec::new();
    let mut measured = 0;
    for (name, ours, base, goal) in &ratios {
        match (
            fresh_median(dir, ours, since),
            fresh_median(dir, base, since),
        ) {
            (Some(a), Some(b)) if b > 0.0 => {
                measured += 1;
                let value = a / b;
                lines.push(format!(
                    "ratio {name} {value:.3} goal {} {} ({a:.2} ns / {b:.2} ns)",
                    goal.text(),
                    goal.verdict(value)
                ));
            }
            _ => lines.push(format!(
                "ratio {name} n/a goal {} not-measured-in-this-run",
                goal.text()
            )),
        }
    }
    let (line, fresh) = marginal_line(dir, since);
    lines.push(line);
    measured += usize::from(fresh);
    // `cargo bench` passes `--bench`; test mode (`cargo test --benches`) does not.
    let args: Vec<String> = std::env::args().collect();
    let benchmarking = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--list");
    if benchmarking && passive_selected() {
        lines.extend(passive::ratio_lines());
        measured += 1;
    }
    // Test mode and `--list` write no estimates: stay quiet then.
    if measured == 0 {
        return;
    }
    println!(
        "\n== teredo-watcher: ratios of medians measured in this run ({}) ==",
        dir.display()
    );
    for line in lines {
        println!("{line}");
    }
}

// ---------------------------------------------------------------------------------------
// PASSIVE_LEVEL delivery, on the mock's work items (no criterion: each sample is a round
// trip between threads, timed one by one).
// ---------------------------------------------------------------------------------------

/// Whether this run measures the passive delivery: always without a filter, else when the
/// filter names it (`.ci/bench-quick passive`).
fn passive_selected() -> bool {
    // Criterion's options that take a value (the value is not a filter).
    const WITH_VALUE: [&str; 14] = [
        "--warm-up-time",
        "--measurement-time",
        "--sample-size",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--save-baseline",
        "--baseline",
        "--load-baseline",
        "--profile-time",
        "--plotting-backend",
        "--output-format",
        "--color",
    ];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| {
            !a.starts_with('-') && (*i == 0 || !WITH_VALUE.contains(&args[i - 1].as_str()))
        })
        .map(|(_, a)| a)
        .collect();
    filters.is_empty() || filters.iter().any(|f| "passive".contains(f.as_str()))
}

mod passive {
    use std::ffi::c_void;
    use std::hint::black_box;
    use std::ptr::NonNull;
    use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::{Duration, Instant};

    use teredo_watcher::mock::MockKernel;
    use teredo_watcher::sys::MIB_PARAMETER_NOTIFICATION;
    use teredo_watcher::{HandleTable, IoObject, Kernel, TeredoPortWatcher};

    use super::{DirectSource, SEED_PORT, options};

    /// Round trips timed per side; the median is reported.
    const SAMPLES: usize = 300;
    /// Changes in the burst.
    const BURST: u16 = 1_000;
    /// How long the burst's subscriber works per call: a stand-in for a filter-engine
    /// transaction, which the burst must outlast for coalescing to show (see PERFORMANCE.md).
    const CALL_COST: Duration = Duration::from_millis(1);
    /// Any wait for the worker thread longer than this is a failure of the run.
    const TIMEOUT: Duration = Duration::from_secs(20);

    /// The driver object the work items are made on (never dereferenced by the mock).
    static DRIVER_OBJECT: u8 = 0;

    fn driver() -> IoObject {
        // SAFETY: the mock never dereferences the object, and a static outlives every item.
        unsafe { IoObject::from_raw((&raw const DRIVER_OBJECT).cast_mut().cast()) }
            .expect("a static is not null")
    }

    fn spin_until(what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
            // Yield, not spin: on a machine with few cores a spinning waiter delays the
            // worker thread it waits for by a whole time slice.
            std::thread::yield_now();
        }
    }

    fn median(mut samples: Vec<Duration>) -> Duration {
        samples.sort();
        samples[samples.len() / 2]
    }

    /// Notification (the trampoline called on this thread) to the passive subscriber's call.
    fn library_round_trip() -> Duration {
        let table = HandleTable::new(DirectSource::new(SEED_PORT));
        let watcher = TeredoPortWatcher::new(&table, options(1)).expect("register");
        let seen = Arc::new(AtomicU32::new(0));
        let store = Arc::clone(&seen);
        watcher
            .subscribe_passive(driver(), move |port| {
                store.store(port.map_or(0, |p| u32::from(p.get())), Ordering::Release);
            })
            .expect("subscribe_passive");
        spin_until("the first call", || {
            seen.load(Ordering::Acquire) == u32::from(SEED_PORT)
        });
        let registered = table.source().registered();
        let mut samples = Vec::with_capacity(SAMPLES);
        for i in 0..SAMPLES {
            let port = 50_000 + u16::try_from(i % 10_000).expect("small");
            let start = Instant::now();
            // SAFETY: the watcher is alive and only this thread calls its callback.
            unsafe { registered.fire(port, MIB_PARAMETER_NOTIFICATION) };
            spin_until("the passive call", || {
                seen.load(Ordering::Acquire) == u32::from(port)
            });
            samples.push(start.elapsed());
        }
        drop(watcher);
        median(samples)
    }

    /// A bare work item on the same mock: queue, run, observe.
    fn work_item_round_trip() -> Duration {
        struct Item {
            storage: Vec<u128>,
            ran: AtomicUsize,
        }
        unsafe extern "system" fn routine(_: *mut c_void, context: *mut c_void, _: *mut c_void) {
            // SAFETY: the context is the `Item` below, alive until its last run was seen.
            let item = unsafe { &*context.cast::<Item>() };
            item.ran.fetch_add(1, Ordering::Release);
        }
        let size = MockKernel::work_item_size();
        let mut item = Item {
            storage: vec![0; size.div_ceil(16)],
            ran: AtomicUsize::new(0),
        };
        let storage = NonNull::new(item.storage.as_mut_ptr().cast::<u8>()).expect("a vec");
        let io = driver().as_raw();
        // SAFETY: the storage is 16-byte aligned (`u128`), large enough, stays in place (the
        // vec is not touched again until uninit) and is not initialized yet; the object is a
        // static.
        unsafe { MockKernel::work_item_init(io, storage) };
        let context = (&raw const item).cast_mut().cast::<c_void>();
        let mut samples = Vec::with_capacity(SAMPLES);
        for i in 0..SAMPLES {
            let start = Instant::now();
            // SAFETY: initialized above; not queued (the previous run was seen to start and
            // finish below); `routine` is sound on any thread while `item` lives.
            unsafe { MockKernel::work_item_queue(storage, routine, context) };
            spin_until("the work item", || {
                item.ran.load(Ordering::Acquire) == i + 1
            });
            samples.push(start.elapsed());
        }
        // SAFETY: initialized above and not queued: every queueing's routine was seen to run
        // (an item is dequeued before its routine starts).
        unsafe { MockKernel::work_item_uninit(storage) };
        black_box(&mut item);
        median(samples)
    }

    /// A burst of [`BURST`] changes to a subscriber whose calls take `cost`: the calls it
    /// gets (ports, in order).
    fn burst_calls(cost: Duration) -> Vec<u16> {
        let table = HandleTable::new(DirectSource::new(SEED_PORT));
        let watcher = TeredoPortWatcher::new(&table, options(1)).expect("register");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&calls);
        watcher
            .subscribe_passive(driver(), move |port| {
                record
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(port.map_or(0, teredo_watcher::TeredoPort::get));
                let start = Instant::now();
                while start.elapsed() < cost {
                    std::hint::spin_loop();
                }
            })
            .expect("subscribe_passive");
        let lock = |c: &Mutex<Vec<u16>>| c.lock().unwrap_or_else(PoisonError::into_inner).clone();
        spin_until("the first call", || lock(&calls).last() == Some(&SEED_PORT));
        let registered = table.source().registered();
        calls.lock().unwrap_or_else(PoisonError::into_inner).clear();
        let newest = 50_000 + BURST - 1;
        for port in 50_000..=newest {
            // SAFETY: the watcher is alive and only this thread calls its callback.
            unsafe { registered.fire(port, MIB_PARAMETER_NOTIFICATION) };
        }
        spin_until("the newest port", || lock(&calls).last() == Some(&newest));
        // Quiet again: no call is still to come (drop waits for a call in flight).
        drop(watcher);
        lock(&calls)
    }

    /// The ratio lines of the passive delivery.
    pub(super) fn ratio_lines() -> Vec<String> {
        let ours = library_round_trip();
        let base = work_item_round_trip();
        let mut lines = vec![format!(
            "ratio passive_delivery/bare_work_item {:.3} goal none info ({:.2} us / {:.2} us, \
             median of {SAMPLES} round trips each)",
            ours.as_secs_f64() / base.as_secs_f64(),
            ours.as_secs_f64() * 1e6,
            base.as_secs_f64() * 1e6,
        )];
        for (name, cost, goal) in [
            ("passive_burst_1000_calls", CALL_COST, Some(2)),
            (
                "passive_burst_1000_calls_instant_subscriber",
                Duration::ZERO,
                None,
            ),
        ] {
            let calls = burst_calls(cost);
            let newest_last = calls.last() == Some(&(50_000 + BURST - 1));
            let in_order = calls.windows(2).all(|w| w[0] < w[1]);
            let verdict = match goal {
                Some(max) if calls.len() <= max && newest_last && in_order => "met",
                Some(_) => "MISSED",
                None => "info",
            };
            lines.push(format!(
                "ratio {name} {} goal {} {verdict} (calls for {BURST} changes with a {} us \
                 subscriber; newest last: {newest_last}; in order: {in_order})",
                calls.len(),
                goal.map_or_else(|| "none".to_owned(), |max| format!("<={max}")),
                cost.as_micros(),
            ));
        }
        lines
    }
}

// ---------------------------------------------------------------------------------------
// Instruction counts: the noise-free cross-check (`benches/instructions.sh`, valgrind).
// ---------------------------------------------------------------------------------------

/// Runs `iterations` operations of one single-threaded case, without criterion, for
/// `benches/instructions.sh`: it runs this binary under callgrind with two iteration counts
/// and divides the difference of the totals by the difference of the counts, so setup and
/// process start cancel out and what is left is instructions per operation.
/// Returns `false` for an unknown case.
fn run_instruction_case(case: &str, iterations: u64) -> bool {
    let table = HandleTable::new(DirectSource::new(SEED_PORT));
    let fanout = |n: usize| {
        let watcher = TeredoPortWatcher::new(&table, options(n)).expect("register");
        for _ in 0..n {
            watcher.subscribe(accumulator()).expect("subscribe");
        }
        let registered = table.source().registered();
        for _ in 0..iterations {
            // SAFETY: the watcher is alive and only this thread calls its callback.
            unsafe {
                black_box(registered).fire(black_box(SEED_PORT), MIB_PARAMETER_NOTIFICATION);
            }
        }
    };
    let baseline = |n: usize| {
        let naive = NaiveLocked::new(NaiveRegistry {
            port: None,
            subscribers: (0..n)
                .map(|_| Box::new(accumulator()) as Box<dyn FnMut(TeredoEvent) + Send>)
                .collect(),
        });
        let callback: TeredoPortChangeCallback = naive_callback;
        let context = (&raw const naive).cast_mut().cast::<c_void>();
        for _ in 0..iterations {
            // SAFETY: `context` is `naive`, alive for the whole loop.
            unsafe {
                black_box(callback)(
                    black_box(context),
                    black_box(SEED_PORT),
                    MIB_PARAMETER_NOTIFICATION,
                );
            }
        }
    };
    let subscribe = |present: usize| {
        let watcher = TeredoPortWatcher::new(&table, options(present + 1)).expect("register");
        for _ in 0..present {
            watcher.subscribe(accumulator()).expect("subscribe");
        }
        for _ in 0..iterations {
            let id = watcher.subscribe(accumulator()).expect("subscribe");
            watcher.unsubscribe(black_box(id)).expect("unsubscribe");
        }
    };
    match case {
        "current_port/atomic_load" => {
            let atomic = AtomicU64::new(u64::from(SEED_PORT));
            for _ in 0..iterations {
                black_box(black_box(&atomic).load(Ordering::Acquire));
            }
        }
        "current_port/watcher" => {
            let watcher = TeredoPortWatcher::new(&table, options(1)).expect("register");
            for _ in 0..iterations {
                black_box(black_box(&watcher).current_port());
            }
        }
        "current_port/atomic_load_static" => {
            for _ in 0..iterations {
                black_box(black_box(&STATIC_ATOMIC).load(Ordering::Acquire));
            }
        }
        "current_port/static_watcher" => {
            let _ = STATIC_WATCHER.start().expect("start");
            for _ in 0..iterations {
                black_box(black_box(&STATIC_WATCHER).current_port());
            }
            STATIC_WATCHER.stop().expect("stop");
        }
        "current_port/spin_lock_read" => {
            let locked = NaiveLocked::new(TeredoPort::new(SEED_PORT));
            for _ in 0..iterations {
                black_box(black_box(&locked).with(|port| *port));
            }
        }
        "fanout/watcher/1" => fanout(1),
        "fanout/watcher/8" => fanout(8),
        "fanout/watcher/64" => fanout(64),
        "fanout/spin_lock_boxed_closures/1" => baseline(1),
        "fanout/spin_lock_boxed_closures/8" => baseline(8),
        "fanout/spin_lock_boxed_closures/64" => baseline(64),
        "subscribe_unsubscribe/watcher/10" => subscribe(10),
        "subscribe_unsubscribe/watcher/1000" => subscribe(1_000),
        _ => return false,
    }
    true
}

fn main() {
    if let Ok(case) = std::env::var("TEREDO_BENCH_INSTRUCTIONS") {
        let iterations = std::env::var("TEREDO_BENCH_ITERATIONS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1_000);
        if !run_instruction_case(&case, iterations) {
            eprintln!("unknown TEREDO_BENCH_INSTRUCTIONS case {case:?}");
            std::process::exit(2);
        }
        return;
    }
    let started = SystemTime::now();
    let dir = output_directory();
    let mut criterion = Criterion::default()
        .output_directory(&dir)
        .configure_from_args();
    bench_current_port(&mut criterion);
    bench_fanout(&mut criterion);
    bench_subscribe(&mut criterion);
    criterion.final_summary();
    summary(&dir, started);
}
