//! A watcher that gives its registry up (dropped at `APC_LEVEL`, so it cannot cancel) while the
//! table's teardown runs on another thread must not touch the registry once the table's lock
//! is released: from then on the teardown may cancel and free it.
//!
//! The test kernel's spin-lock release has a hook: the first release on the dropping thread
//! after arming (the one in `give_up`) lets the teardown run to completion before the
//! dropping thread continues. A quarantining allocator poisons freed blocks and never
//! reuses them; any byte of a freed block that changes afterwards is a write after free.
#![cfg(not(teredo_watcher_loom))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use teredo_watcher::sys::TeredoPortChangeCallback;
use teredo_watcher::{
    Error, HandleTable, Irql, IrqlBound, Kernel, PortSource, RawHandle, TeredoPortWatcher,
    ThreadToken, WatcherOptions,
};

// ---- quarantining allocator -------------------------------------------------------------
struct Quarantine;
static QUARANTINE_ON: AtomicBool = AtomicBool::new(false);
const SLOTS: usize = 256;
static Q_PTR: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static Q_LEN: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static Q_NEXT: AtomicUsize = AtomicUsize::new(0);
const POISON: u8 = 0xA5;

// SAFETY: forwards to System; quarantined blocks are simply never returned to it.
unsafe impl GlobalAlloc for Quarantine {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged (the caller's contract is `System`'s).
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if QUARANTINE_ON.load(Ordering::SeqCst) {
            let i = Q_NEXT.fetch_add(1, Ordering::SeqCst);
            if i < SLOTS {
                // SAFETY: `ptr` is a live block of `layout.size()` bytes being freed by its
                // owner, who no longer uses it.
                unsafe { ptr.write_bytes(POISON, layout.size()) };
                Q_LEN[i].store(layout.size(), Ordering::SeqCst);
                Q_PTR[i].store(ptr as usize, Ordering::SeqCst);
                return; // leaked on purpose: never reused
            }
        }
        // SAFETY: allocated by `System` with this layout (`alloc` forwards).
        unsafe { System.dealloc(ptr, layout) }
    }
}
#[global_allocator]
static A: Quarantine = Quarantine;

/// Blocks freed while quarantining whose bytes changed afterwards: (size, offset, byte).
fn written_after_free(from: usize) -> Vec<(usize, usize, u8)> {
    let mut hits = Vec::new();
    for i in from..Q_NEXT.load(Ordering::SeqCst).min(SLOTS) {
        let (p, n) = (
            Q_PTR[i].load(Ordering::SeqCst),
            Q_LEN[i].load(Ordering::SeqCst),
        );
        for off in 0..n {
            // SAFETY: the block was quarantined: never returned to `System`, so its bytes stay
            // readable for the rest of the process.
            let b = unsafe { *((p + off) as *const u8) };
            if b != POISON {
                hits.push((n, off, b));
            }
        }
    }
    hits
}

// ---- test kernel ------------------------------------------------------------------------
thread_local! {
    static IRQL: Cell<u8> = const { Cell::new(0) };
    static TOKEN: Cell<usize> = const { Cell::new(0) };
    static HOOK: Cell<bool> = const { Cell::new(false) };
}
static NEXT: AtomicUsize = AtomicUsize::new(1);
/// 0: idle, 1: the dropping thread released the table lock in `give_up`, 2: teardown done.
static GATE: (Mutex<u8>, Condvar) = (Mutex::new(0), Condvar::new());

fn gate_set(v: u8) {
    *GATE.0.lock().unwrap() = v;
    GATE.1.notify_all();
}
fn gate_wait(v: u8) {
    let mut g = GATE.0.lock().unwrap();
    while *g != v {
        g = GATE.1.wait(g).unwrap();
    }
}

/// A notification event on a mutex and a condition variable.
pub struct TestEvent(Mutex<bool>, Condvar);
struct TestKernel;

/// A kernel whose spin-lock release can hand control to another thread (`HOOK`), so the
/// test can run the teardown exactly between `give_up` releasing the table lock and the
/// dropping thread going on.
// SAFETY: a test-and-set lock with acquire/release ordering that raises the per-thread IRQL
// to DISPATCH_LEVEL and restores it; unique non-zero tokens; a notification event on a mutex
// and condvar (a set happens-before the wait it releases returns); no work items (size 0, so
// the library never initializes or queues one).
unsafe impl Kernel for TestKernel {
    type RawSpinLock = AtomicBool;
    const UNLOCKED: AtomicBool = AtomicBool::new(false);
    fn current_irql() -> Irql {
        Irql::from_raw(IRQL.with(Cell::get))
    }
    fn current_thread() -> ThreadToken {
        TOKEN.with(|t| {
            if t.get() == 0 {
                t.set(NEXT.fetch_add(1, Ordering::SeqCst));
            }
            ThreadToken::from_raw(t.get())
        })
    }
    unsafe fn acquire(lock: &AtomicBool) -> Irql {
        let prev = IRQL.with(|i| i.replace(2));
        while lock
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        Irql::from_raw(prev)
    }
    unsafe fn release(lock: &AtomicBool, previous: Irql) {
        lock.store(false, Ordering::Release);
        IRQL.with(|i| i.set(previous.raw()));
        if HOOK.with(|h| h.replace(false)) {
            // The lock is released: let the teardown run to its end, then go on.
            gate_set(1);
            gate_wait(2);
        }
    }
    type Event = TestEvent;
    const EVENT: TestEvent = TestEvent(Mutex::new(false), Condvar::new());
    unsafe fn event_init(e: &TestEvent) {
        *e.0.lock().unwrap() = false;
    }
    unsafe fn event_set(e: &TestEvent) {
        *e.0.lock().unwrap() = true;
        e.1.notify_all();
    }
    unsafe fn event_clear(e: &TestEvent) {
        *e.0.lock().unwrap() = false;
    }
    unsafe fn event_wait(e: &TestEvent) {
        let mut s = e.0.lock().unwrap();
        while !*s {
            s = e.1.wait(s).unwrap();
        }
    }
    fn irql_violation(_: &'static str, _: Irql, _: IrqlBound) {}
    // No work items: this test never subscribes passively, so these are never called (they
    // panic if they were, which the test would report).
    fn work_item_size() -> usize {
        0
    }
    unsafe fn work_item_init(_: *mut c_void, _: std::ptr::NonNull<u8>) {
        unreachable!("no passive subscriber in this test");
    }
    unsafe fn work_item_queue(
        _: std::ptr::NonNull<u8>,
        _: teredo_watcher::sys::IoWorkItemRoutineEx,
        _: *mut c_void,
    ) {
        unreachable!("no passive subscriber in this test");
    }
    unsafe fn work_item_uninit(_: std::ptr::NonNull<u8>) {
        unreachable!("no passive subscriber in this test");
    }
}

/// A source whose registrations never call back and whose cancels always succeed.
struct Quiet;
// SAFETY: it never invokes a callback, so serialization, IRQL and "no call after a
// successful cancel" hold trivially; its handle is never NULL.
unsafe impl PortSource for Quiet {
    type Kernel = TestKernel;
    unsafe fn notify(
        &self,
        _: TeredoPortChangeCallback,
        _: *mut c_void,
        _: bool,
    ) -> Result<RawHandle, Error> {
        Ok(RawHandle::new(0x10).unwrap())
    }
    fn teredo_port(&self) -> Result<u16, Error> {
        Ok(0)
    }
    unsafe fn cancel(&self, _: RawHandle) -> Result<(), Error> {
        Ok(())
    }
}

static TABLE: HandleTable<Quiet> = HandleTable::new(Quiet);

#[test]
#[cfg_attr(
    miri,
    ignore = "the quarantining allocator keeps freed blocks on purpose"
)]
fn a_watcher_dropped_at_apc_level_never_touches_its_registry_after_the_teardown_freed_it() {
    let options = WatcherOptions {
        initial_notification: false,
        max_subscribers: 1,
        seed_current_port: false,
    };
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let watcher = TeredoPortWatcher::new(&TABLE, options).expect("register");
    let teardown = std::thread::spawn(|| {
        gate_wait(1);
        let report = TABLE.teardown().expect("passive");
        gate_set(2);
        report
    });
    let start = Q_NEXT.load(Ordering::SeqCst);
    QUARANTINE_ON.store(true, Ordering::SeqCst);
    let dropper = std::thread::spawn(move || {
        IRQL.with(|i| i.set(Irql::APC_LEVEL.raw())); // e.g. inside a FAST_MUTEX region
        HOOK.with(|h| h.set(true));
        drop(watcher); // gives the registry up under the lock, then must not touch it
    });
    dropper.join().expect("dropper");
    let report = teardown.join().expect("teardown");
    QUARANTINE_ON.store(false, Ordering::SeqCst);
    assert_eq!(report.cancelled, 1, "{report:?}");
    let hits = written_after_free(start);
    assert!(
        hits.is_empty(),
        "bytes of freed blocks written after the free (block size, offset, value): {hits:?}"
    );
}

static CONTROL_TABLE: HandleTable<Quiet> = HandleTable::new(Quiet);

/// Control: the same drop at `APC_LEVEL` with the teardown run afterwards (no overlap): the
/// detector reports nothing, so the hit above is the race, not the detector.
#[test]
#[cfg_attr(
    miri,
    ignore = "the quarantining allocator keeps freed blocks on purpose"
)]
fn control_no_overlap_no_hit() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let options = WatcherOptions {
        initial_notification: false,
        max_subscribers: 1,
        seed_current_port: false,
    };
    let watcher = TeredoPortWatcher::new(&CONTROL_TABLE, options).expect("register");
    let before = Q_NEXT.load(Ordering::SeqCst);
    QUARANTINE_ON.store(true, Ordering::SeqCst);
    std::thread::spawn(move || {
        IRQL.with(|i| i.set(Irql::APC_LEVEL.raw()));
        drop(watcher);
    })
    .join()
    .unwrap();
    let report = CONTROL_TABLE.teardown().expect("passive");
    QUARANTINE_ON.store(false, Ordering::SeqCst);
    assert_eq!(report.cancelled, 1);
    assert!(
        Q_NEXT.load(Ordering::SeqCst) > before,
        "something was quarantined"
    );
    assert!(
        written_after_free(before).is_empty(),
        "{:?}",
        written_after_free(before)
    );
}
static SERIAL: Mutex<()> = Mutex::new(());
