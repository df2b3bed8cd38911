//! The hot paths allocate nothing: `current_port()` (a classify function calls it for every
//! packet) and the delivery of a notification to every subscriber (inside the OS callback).
//! Proven with a counting global allocator that counts only the calling thread's allocations,
//! so the test harness's other threads cannot disturb the figures. Also measures what one
//! subscriber costs in bytes (reported in PERFORMANCE.md).
//!
//! Notifications are delivered through the watcher's real `extern "system"` trampoline,
//! called on this thread by the direct-call port source the benchmarks use.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(not(teredo_watcher_loom))]
use teredo_watcher::StaticTeredoWatcher;
use teredo_watcher::sys::{
    MIB_ADD_INSTANCE, MIB_DELETE_INSTANCE, MIB_INITIAL_NOTIFICATION, MIB_PARAMETER_NOTIFICATION,
};
use teredo_watcher::{HandleTable, TeredoEvent, TeredoPort, TeredoPortWatcher, WatcherOptions};

#[path = "../benches/support/direct_source.rs"]
#[allow(
    dead_code,
    reason = "shared with the benchmarks, which use other parts"
)]
mod direct_source;

use direct_source::DirectSource;

/// The system allocator, counting the allocations of threads that asked for it.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    static BYTES: Cell<usize> = const { Cell::new(0) };
}

/// Counts one allocation of `bytes` if this thread is counting. Const-initialized cells
/// without destructors: reading them never allocates and never fails, even late in a
/// thread's life (`try_with` all the same, since an allocator must not panic).
fn record(bytes: usize) {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
        let _ = BYTES.try_with(|b| b.set(b.get() + bytes));
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; `record` neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: forwarded unchanged; `ptr` came from this allocator, that is from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `ptr` came from this allocator, that is from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What `f` allocated on this thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Allocated {
    allocations: usize,
    bytes: usize,
}

fn allocated_by<R>(f: impl FnOnce() -> R) -> (R, Allocated) {
    ALLOCATIONS.with(|a| a.set(0));
    BYTES.with(|b| b.set(0));
    COUNTING.with(|c| c.set(true));
    let result = f();
    COUNTING.with(|c| c.set(false));
    let allocated = Allocated {
        allocations: ALLOCATIONS.with(Cell::get),
        bytes: BYTES.with(Cell::get),
    };
    (result, allocated)
}

const NOTHING: Allocated = Allocated {
    allocations: 0,
    bytes: 0,
};

fn options(capacity: usize) -> WatcherOptions {
    WatcherOptions {
        initial_notification: true,
        max_subscribers: capacity,
        seed_current_port: true,
    }
}

/// A subscriber that adds the port of each event to a shared total and counts its calls.
fn tally(calls: &Arc<AtomicU64>, ports: &Arc<AtomicU64>) -> impl FnMut(TeredoEvent) + Send + use<> {
    let calls = Arc::clone(calls);
    let ports = Arc::clone(ports);
    move |event| {
        calls.fetch_add(1, Ordering::Relaxed);
        ports.fetch_add(
            u64::from(event.port().map_or(0, TeredoPort::get)),
            Ordering::Relaxed,
        );
    }
}

#[test]
fn the_allocation_counter_sees_this_threads_allocations() {
    // Guards the other tests against passing vacuously with a counter that counts nothing.
    let (boxed, allocated) = allocated_by(|| std::hint::black_box(Box::new([0u8; 24])));
    assert_eq!(
        allocated,
        Allocated {
            allocations: 1,
            bytes: 24
        }
    );
    drop(boxed);
}

#[test]
fn current_port_allocates_nothing() {
    let table = HandleTable::new(DirectSource::new(49_152));
    let watcher = TeredoPortWatcher::new(&table, options(4)).expect("register");
    let registered = table.source().registered();

    let ((), allocated) = allocated_by(|| {
        for _ in 0..1_000 {
            assert_eq!(
                std::hint::black_box(&watcher)
                    .current_port()
                    .map(TeredoPort::get),
                Some(49_152)
            );
            std::hint::black_box(watcher.exceptions());
        }
    });
    assert_eq!(allocated, NOTHING, "current_port()/exceptions() allocated");

    // Also while the port changes between reads.
    let ((), allocated) = allocated_by(|| {
        for port in 50_000..50_100 {
            // SAFETY: the watcher is alive and only this thread calls its callback.
            unsafe { registered.fire(port, MIB_PARAMETER_NOTIFICATION) };
            assert_eq!(watcher.current_port().map(TeredoPort::get), Some(port));
        }
    });
    assert_eq!(
        allocated, NOTHING,
        "current_port() between notifications allocated"
    );
}

#[test]
fn delivering_a_notification_to_every_subscriber_allocates_nothing() {
    const SUBSCRIBERS: usize = 8;
    let table = HandleTable::new(DirectSource::new(49_152));
    let watcher = TeredoPortWatcher::new(&table, options(SUBSCRIBERS)).expect("register");
    let calls = Arc::new(AtomicU64::new(0));
    let ports = Arc::new(AtomicU64::new(0));
    for _ in 0..SUBSCRIBERS {
        watcher.subscribe(tally(&calls, &ports)).expect("subscribe");
    }
    let registered = table.source().registered();

    // Every notification type, an unknown one included, each to all subscribers.
    let notifications: [(u16, i32); 5] = [
        (0, MIB_INITIAL_NOTIFICATION),
        (50_001, MIB_ADD_INSTANCE),
        (50_002, MIB_PARAMETER_NOTIFICATION),
        (50_002, MIB_DELETE_INSTANCE),
        (50_003, 77),
    ];
    let ((), allocated) = allocated_by(|| {
        for (port, kind) in notifications {
            // SAFETY: the watcher is alive and only this thread calls its callback.
            unsafe { registered.fire(port, kind) };
        }
    });
    assert_eq!(allocated, NOTHING, "the notification path allocated");

    // The path really ran: every subscriber saw every notification.
    let expected_calls = (SUBSCRIBERS * notifications.len()) as u64;
    assert_eq!(calls.load(Ordering::Relaxed), expected_calls);
    // Each event carries the port after it: the seed's 49 152 for the initial notification,
    // none after the deletion (the unknown type leaves it so).
    let port_sum: u64 = [49_152_u64, 50_001, 50_002, 0, 0].iter().sum();
    assert_eq!(ports.load(Ordering::Relaxed), SUBSCRIBERS as u64 * port_sum);
    assert_eq!(
        watcher.stats().notifications,
        1 + notifications.len() as u64
    );
}

#[test]
fn bytes_per_subscriber() {
    // Slot table: what one more unit of capacity costs, from two capacities (the fixed part
    // of `new`, registry and handle table, cancels out).
    let bytes_of_new = |capacity: usize| {
        let table = HandleTable::new(DirectSource::new(49_152));
        let (watcher, allocated) =
            allocated_by(|| TeredoPortWatcher::new(&table, options(capacity)));
        drop(watcher.expect("register"));
        allocated.bytes
    };
    let (small, large) = (16, 16 + 1_024);
    let (bytes_small, bytes_large) = (bytes_of_new(small), bytes_of_new(large));
    let slot = (bytes_large - bytes_small) / (large - small);
    assert_eq!(
        (bytes_large - bytes_small) % (large - small),
        0,
        "not linear in capacity"
    );
    assert!(slot > 0);
    let fixed = bytes_small - small * slot;

    // Subscribing: the closure is moved to the heap, nothing else; a zero-sized closure
    // allocates nothing at all.
    let table = HandleTable::new(DirectSource::new(49_152));
    let watcher = TeredoPortWatcher::new(&table, options(4)).expect("register");
    let calls = Arc::new(AtomicU64::new(0));
    let ports = Arc::new(AtomicU64::new(0));
    let closure = tally(&calls, &ports);
    let closure_size = size_of_val(&closure);
    let (id, allocated) = allocated_by(|| watcher.subscribe(closure));
    id.expect("subscribe");
    assert_eq!(
        allocated,
        Allocated {
            allocations: 1,
            bytes: closure_size
        }
    );
    let (id, allocated) = allocated_by(|| watcher.subscribe(|_event: TeredoEvent| {}));
    id.expect("subscribe");
    assert_eq!(allocated, NOTHING, "a zero-sized subscriber allocated");

    println!(
        "bytes per subscriber: {slot} (slot, allocated with the capacity at creation) \
         + size_of the closure (allocated by subscribe; {closure_size} for a closure \
         holding two Arcs, 0 for a zero-sized one); fixed per watcher: {fixed}"
    );
}

/// Calls of [`count_call`], a subscriber with no captures (zero-sized).
#[cfg(not(teredo_watcher_loom))]
static ZST_CALLS: AtomicU64 = AtomicU64::new(0);

#[cfg(not(teredo_watcher_loom))]
fn count_call(_: TeredoEvent) {
    ZST_CALLS.fetch_add(1, Ordering::Relaxed);
}

#[cfg(not(teredo_watcher_loom))]
#[test]
fn the_static_watcher_allocates_nothing_to_start_deliver_and_stop() {
    // The `static` a driver declares; leaked here (and freed at the end) because the direct
    // source is built at run time.
    let raw = Box::into_raw(Box::new(StaticTeredoWatcher::<DirectSource, 4>::new(
        DirectSource::new(49_152),
    )));
    // SAFETY: `raw` is a live box, freed only at the end, after the last use of `watcher`.
    let watcher: &'static StaticTeredoWatcher<DirectSource, 4> = unsafe { &*raw };
    let before = ZST_CALLS.load(Ordering::Relaxed);
    let ((), allocated) = allocated_by(|| {
        watcher.subscribe(count_call).expect("subscribe");
        let report = watcher.start().expect("start");
        assert_eq!(report.seed_error, None);
        let registered = watcher.source().registered();
        for port in 50_000..50_010 {
            // SAFETY: the watcher is registered and only this thread calls its callback.
            unsafe { registered.fire(port, MIB_PARAMETER_NOTIFICATION) };
        }
        assert_eq!(watcher.current_port().map(TeredoPort::get), Some(50_009));
        watcher.stop().expect("stop");
    });
    assert_eq!(
        allocated, NOTHING,
        "subscribe (no captures), start, ten notifications and stop allocated"
    );
    // The path really ran: the initial notification, the seed and the ten changes.
    let calls = ZST_CALLS.load(Ordering::Relaxed) - before;
    assert_eq!(calls, 12, "the subscriber's calls");
    assert!(!watcher.source().is_registered());
    // SAFETY: `raw` came from `Box::into_raw` above; the watcher is stopped (netio holds
    // nothing) and `watcher` is not used again.
    drop(unsafe { Box::from_raw(raw) });
}
