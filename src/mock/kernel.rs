//! The mock kernel: a per-thread IRQL, a spin lock that raises it, thread tokens.

use core::cell::Cell;
use core::ffi::c_void;
use core::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::sync::atomic::{AtomicBool, Ordering as LockOrdering};
#[cfg(teredo_watcher_loom)]
use loom::sync::{Condvar, Mutex, MutexGuard};
use std::sync::PoisonError;
#[cfg(not(teredo_watcher_loom))]
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::irql::{Irql, IrqlBound};
use crate::kernel::{Kernel, ThreadToken};
use crate::sys;

#[cfg(teredo_watcher_loom)]
pub use work::join_work_items;
pub use work::{work_items_initialized_on, work_items_run, work_items_run_on};

/// What `IoSizeofWorkItem` answers on the mock (an x64 `IO_WORKITEM` is of this order).
const MOCK_WORK_ITEM_SIZE: usize = 88;

/// What the mock does when the library reports an IRQL violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationPolicy {
    /// Panic, as the kernel build's debug assertion does (the default in debug builds).
    Panic,
    /// Only count it; the library then returns its error value, as in a release build.
    Record,
}

#[cfg(not(teredo_watcher_loom))]
std::thread_local! {
    static IRQL: Cell<u8> = const { Cell::new(0) };
    static POLICY: Cell<Option<ViolationPolicy>> = const { Cell::new(None) };
    static TOKEN: Cell<usize> = const { Cell::new(0) };
}

// loom's `thread_local!` (per loom thread, reset per model iteration) has no `const { }`
// initializer form, hence the second copy.
#[cfg(teredo_watcher_loom)]
loom::thread_local! {
    static IRQL: Cell<u8> = Cell::new(0);
    static POLICY: Cell<Option<ViolationPolicy>> = Cell::new(None);
    static TOKEN: Cell<usize> = Cell::new(0);
}

static NEXT_TOKEN: AtomicUsize = AtomicUsize::new(1);
static VIOLATIONS: AtomicUsize = AtomicUsize::new(0);
static WAITS: AtomicUsize = AtomicUsize::new(0);

/// How many times the library slept on a mock kernel event (`KeWaitForSingleObject`),
/// process-wide: waits for a round or a cancel in progress on another thread.
pub fn event_waits() -> usize {
    WAITS.load(Ordering::SeqCst)
}

/// The mock `KEVENT`: a notification event on a mutex and a condition variable (loom's
/// under `--cfg teredo_watcher_loom`). Each operation checks its documented IRQL and that the
/// event was initialized.
pub struct MockEvent {
    initialized: AtomicBool,
    signalled: Mutex<bool>,
    changed: Condvar,
}

impl MockEvent {
    fn lock(&self) -> MutexGuard<'_, bool> {
        #[cfg(not(teredo_watcher_loom))]
        {
            self.signalled
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        }
        #[cfg(teredo_watcher_loom)]
        {
            self.signalled
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        }
    }

    fn check(&self, routine: &str, bound: IrqlBound) {
        let irql = MockKernel::current_irql();
        assert!(
            bound.allows(irql),
            "mock kernel: {routine} at {irql}; the documentation requires IRQL {bound}"
        );
        assert!(
            self.initialized.load(LockOrdering::Acquire),
            "mock kernel: {routine} on an event that KeInitializeEvent never initialized"
        );
    }
}

/// Sets this thread's policy for IRQL violations reported by the library.
pub fn set_violation_policy(policy: ViolationPolicy) {
    POLICY.with(|p| p.set(Some(policy)));
}

/// How many IRQL violations the library has reported, process-wide.
pub fn irql_violations() -> usize {
    VIOLATIONS.load(Ordering::SeqCst)
}

/// Restores the previous IRQL of this thread when dropped.
#[must_use = "the IRQL is restored when the guard drops"]
pub struct IrqlGuard {
    previous: u8,
    _not_send: core::marker::PhantomData<*mut ()>,
}

impl Drop for IrqlGuard {
    fn drop(&mut self) {
        IRQL.with(|i| i.set(self.previous));
    }
}

/// Sets this thread's mock IRQL until the guard drops.
pub fn raise_irql(irql: Irql) -> IrqlGuard {
    let previous = IRQL.with(|i| i.replace(irql.raw()));
    IrqlGuard {
        previous,
        _not_send: core::marker::PhantomData,
    }
}

/// Runs `f` with this thread's mock IRQL set to `irql`.
pub fn with_irql<R>(irql: Irql, f: impl FnOnce() -> R) -> R {
    let _guard = raise_irql(irql);
    f()
}

/// The host mock kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct MockKernel;

// SAFETY: the lock is a test-and-set on an `AtomicBool` with Acquire on success and Release
// on unlock: mutual exclusion with the required ordering. `acquire` sets this thread's IRQL
// to DISPATCH_LEVEL and returns the previous one; `release` restores it; `current_irql`
// reads the same thread-local. Tokens come from a process-wide counter starting at 1, so
// they are unique and never zero. Work items (module `work`) run once per queueing, at
// `PASSIVE_LEVEL`, on a thread of their own that is spawned (or woken) after the queueing.
unsafe impl Kernel for MockKernel {
    type RawSpinLock = AtomicBool;

    #[cfg(not(teredo_watcher_loom))]
    const UNLOCKED: AtomicBool = AtomicBool::new(false);

    #[cfg(teredo_watcher_loom)]
    fn new_lock() -> AtomicBool {
        AtomicBool::new(false)
    }

    fn current_irql() -> Irql {
        Irql::from_raw(IRQL.with(Cell::get))
    }

    fn current_thread() -> ThreadToken {
        TOKEN.with(|t| {
            if t.get() == 0 {
                t.set(NEXT_TOKEN.fetch_add(1, Ordering::Relaxed));
            }
            ThreadToken::from_raw(t.get())
        })
    }

    unsafe fn acquire(lock: &AtomicBool) -> Irql {
        let previous = IRQL.with(|i| i.replace(Irql::DISPATCH_LEVEL.raw()));
        assert!(
            previous <= Irql::DISPATCH_LEVEL.raw(),
            "mock kernel: KeAcquireSpinLockRaiseToDpc at IRQL {previous} (> DISPATCH_LEVEL)"
        );
        while lock
            .compare_exchange_weak(false, true, LockOrdering::Acquire, LockOrdering::Relaxed)
            .is_err()
        {
            // Test-and-test-and-set. Not under loom: there a relaxed load may keep returning
            // older `true` stores while the holder keeps locking and unlocking (loom does not
            // model that stores become visible in finite time), an endless path loom reports
            // as "exceeded maximum number of branches"; the CAS always reads the latest value.
            #[cfg(not(teredo_watcher_loom))]
            while lock.load(LockOrdering::Relaxed) {
                crate::sync::spin_hint();
            }
            #[cfg(teredo_watcher_loom)]
            crate::sync::spin_hint();
        }
        Irql::from_raw(previous)
    }

    unsafe fn release(lock: &AtomicBool, previous: Irql) {
        lock.store(false, LockOrdering::Release);
        IRQL.with(|i| {
            debug_assert_eq!(i.get(), Irql::DISPATCH_LEVEL.raw());
            i.set(previous.raw());
        });
    }

    type Event = MockEvent;

    #[cfg(not(teredo_watcher_loom))]
    const EVENT: MockEvent = MockEvent {
        initialized: AtomicBool::new(false),
        signalled: Mutex::new(false),
        changed: Condvar::new(),
    };

    #[cfg(teredo_watcher_loom)]
    fn new_event() -> MockEvent {
        MockEvent {
            initialized: AtomicBool::new(false),
            signalled: Mutex::new(false),
            changed: Condvar::new(),
        }
    }

    unsafe fn event_init(event: &MockEvent) {
        *event.lock() = false;
        event.initialized.store(true, LockOrdering::Release);
    }

    unsafe fn event_set(event: &MockEvent) {
        event.check("KeSetEvent", IrqlBound::AtMostDispatch);
        *event.lock() = true;
        event.changed.notify_all();
    }

    unsafe fn event_clear(event: &MockEvent) {
        event.check("KeClearEvent", IrqlBound::AtMostDispatch);
        *event.lock() = false;
    }

    unsafe fn event_wait(event: &MockEvent) {
        event.check("KeWaitForSingleObject", IrqlBound::BelowDispatch);
        WAITS.fetch_add(1, Ordering::Relaxed);
        let mut signalled = event.lock();
        while !*signalled {
            signalled = event
                .changed
                .wait(signalled)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn work_item_size() -> usize {
        MOCK_WORK_ITEM_SIZE
    }

    unsafe fn work_item_init(io_object: *mut c_void, item: NonNull<u8>) {
        work::init(io_object, item);
    }

    unsafe fn work_item_queue(
        item: NonNull<u8>,
        routine: sys::IoWorkItemRoutineEx,
        context: *mut c_void,
    ) {
        work::queue(item, routine, context);
    }

    unsafe fn work_item_uninit(item: NonNull<u8>) {
        work::uninit(item);
    }

    fn irql_violation(operation: &'static str, current: Irql, required: IrqlBound) {
        VIOLATIONS.fetch_add(1, Ordering::SeqCst);
        let policy = POLICY.with(Cell::get).unwrap_or(if cfg!(debug_assertions) {
            ViolationPolicy::Panic
        } else {
            ViolationPolicy::Record
        });
        assert!(
            policy != ViolationPolicy::Panic,
            "IRQL violation: {operation} called at {current}, requires {required}"
        );
    }
}

/// The mock I/O manager's work items.
///
/// Every item is tracked by address in a process-wide table (a plain `std` mutex, never held
/// across a call into the library), so the mock checks the documented rules without reading
/// the item's storage: initialized before it is queued, never queued twice, never
/// initialized twice or uninitialized while queued, IRQL `<= DISPATCH_LEVEL` for each call.
/// A violation panics, as the rest of the mock does.
///
/// Outside loom, the items of one `IoObject` run in queue order on one worker thread of
/// that object, which exits when its queue is empty: the system's delayed work queue has
/// several threads, but one per object makes "queued behind a running item" reproducible in
/// tests. Under `--cfg teredo_watcher_loom` each queued item runs on a new loom thread, so
/// loom explores it against everything else (a routine's tail against the next routine too).
mod work {
    use core::ffi::c_void;
    use core::ptr::NonNull;
    use std::collections::BTreeMap;
    #[cfg(not(teredo_watcher_loom))]
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, PoisonError};

    use crate::irql::{Irql, IrqlBound};
    use crate::kernel::Kernel;
    use crate::sys;

    use super::MockKernel;

    struct Item {
        io_object: IoPtr,
        queued: bool,
    }

    /// The `IoObject` an item was made on, handed back to its routine with its provenance.
    #[derive(Clone, Copy)]
    struct IoPtr(*mut c_void);

    // SAFETY: the mock never dereferences it; it is only compared and handed back.
    unsafe impl Send for IoPtr {}

    #[derive(Default)]
    struct Books {
        /// Initialized items, by address.
        items: BTreeMap<usize, Item>,
        /// Routines started, per `IoObject` address.
        run: BTreeMap<usize, usize>,
        #[cfg(not(teredo_watcher_loom))]
        queues: BTreeMap<usize, VecDeque<Queued>>,
    }

    static BOOKS: Mutex<Option<Books>> = Mutex::new(None);
    static RUN: AtomicUsize = AtomicUsize::new(0);

    fn with_books<R>(f: impl FnOnce(&mut Books) -> R) -> R {
        let mut guard = BOOKS.lock().unwrap_or_else(PoisonError::into_inner);
        f(guard.get_or_insert_with(Books::default))
    }

    fn check_irql(routine: &str) {
        let irql = MockKernel::current_irql();
        assert!(
            IrqlBound::AtMostDispatch.allows(irql),
            "mock kernel: {routine} at {irql}; the documentation requires IRQL <= DISPATCH_LEVEL"
        );
    }

    /// A queued routine call; the pointers keep their provenance for the routine.
    struct Queued {
        routine: sys::IoWorkItemRoutineEx,
        io_object: *mut c_void,
        context: *mut c_void,
        item: *mut c_void,
    }

    // SAFETY: the pointers are only handed back to the routine, which the queueing caller
    // guaranteed is sound to call on any thread (`Kernel::work_item_queue`).
    unsafe impl Send for Queued {}

    impl Queued {
        /// Dequeues the item (the system does so before the routine runs), then calls the
        /// routine at `PASSIVE_LEVEL` and checks that it returns there.
        fn run(self) {
            with_books(|b| {
                let item = b
                    .items
                    .get_mut(&self.item.addr())
                    .expect("mock kernel: a queued work item was uninitialized while queued");
                item.queued = false;
                *b.run.entry(self.io_object.addr()).or_insert(0) += 1;
            });
            RUN.fetch_add(1, Ordering::SeqCst);
            assert_eq!(MockKernel::current_irql(), Irql::PASSIVE_LEVEL);
            // SAFETY: the queueing caller guaranteed `routine(io_object, context, item)` is
            // sound to call once on a system thread (`Kernel::work_item_queue`); it is called
            // once, here.
            unsafe { (self.routine)(self.io_object, self.context, self.item) };
            assert_eq!(
                MockKernel::current_irql(),
                Irql::PASSIVE_LEVEL,
                "mock kernel: a work item routine returned above PASSIVE_LEVEL"
            );
            // The storage may be gone now (uninitialized and freed by the routine): the
            // item is not looked at again.
        }
    }

    pub(super) fn init(io_object: *mut c_void, item: NonNull<u8>) {
        check_irql("IoInitializeWorkItem");
        assert!(
            !io_object.is_null(),
            "mock kernel: IoInitializeWorkItem with a NULL IoObject"
        );
        assert_eq!(
            item.as_ptr().addr() % 16,
            0,
            "mock kernel: a work item that is not 16-byte aligned"
        );
        with_books(|b| {
            let previous = b.items.insert(
                item.as_ptr().addr(),
                Item {
                    io_object: IoPtr(io_object),
                    queued: false,
                },
            );
            assert!(
                previous.is_none(),
                "mock kernel: IoInitializeWorkItem on an initialized work item"
            );
        });
    }

    pub(super) fn queue(
        item: NonNull<u8>,
        routine: sys::IoWorkItemRoutineEx,
        context: *mut c_void,
    ) {
        check_irql("IoQueueWorkItemEx");
        let io_object = with_books(|b| {
            let entry = b
                .items
                .get_mut(&item.as_ptr().addr())
                .expect("mock kernel: IoQueueWorkItemEx on a work item never initialized");
            assert!(
                !entry.queued,
                "mock kernel: IoQueueWorkItemEx on a work item already queued"
            );
            entry.queued = true;
            entry.io_object
        });
        // The routine gets back the object the item was initialized with.
        let queued = Queued {
            routine,
            io_object: io_object.0,
            context,
            item: item.as_ptr().cast(),
        };
        spawn(queued);
    }

    /// The loom threads running queued items, for [`join_work_items`].
    #[cfg(teredo_watcher_loom)]
    static THREADS: Mutex<std::vec::Vec<loom::thread::JoinHandle<()>>> =
        Mutex::new(std::vec::Vec::new());

    #[cfg(teredo_watcher_loom)]
    fn spawn(queued: Queued) {
        let handle = loom::thread::spawn(move || queued.run());
        THREADS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
    }

    /// Joins every loom thread that ran a queued item so far, including those queued by
    /// the items joined (loom runs unjoined threads to their end too; this lets a model
    /// look at what they left).
    ///
    /// # Panics
    ///
    /// If a routine panicked (a check of the mock or of the model failed there).
    #[cfg(teredo_watcher_loom)]
    pub fn join_work_items() {
        loop {
            let next = THREADS.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let Some(handle) = next else { return };
            handle.join().expect("a work item routine panicked");
        }
    }

    #[cfg(not(teredo_watcher_loom))]
    fn spawn(queued: Queued) {
        let io = queued.io_object.addr();
        let start_worker = with_books(|b| {
            let q = b.queues.entry(io).or_default();
            q.push_back(queued);
            // A queue of one: no worker runs for this object (it exits on an empty queue).
            q.len() == 1
        });
        if start_worker {
            std::thread::Builder::new()
                .name("mock work item worker".into())
                .spawn(move || worker(io))
                .expect("mock kernel: could not start a worker thread");
        }
    }

    /// Runs the items of one object until its queue is empty. The running item stays at the
    /// front of the queue until it has returned, so a new item queued meanwhile is run by
    /// this thread, after it.
    #[cfg(not(teredo_watcher_loom))]
    fn worker(io: usize) {
        loop {
            let next = with_books(|b| {
                let q = b.queues.get_mut(&io).expect("the worker's queue");
                q.front().map(|front| Queued {
                    routine: front.routine,
                    io_object: front.io_object,
                    context: front.context,
                    item: front.item,
                })
            });
            let Some(next) = next else { return };
            next.run();
            let done = with_books(|b| {
                let q = b.queues.get_mut(&io).expect("the worker's queue");
                q.pop_front();
                if q.is_empty() {
                    b.queues.remove(&io);
                    true
                } else {
                    false
                }
            });
            if done {
                return;
            }
        }
    }

    pub(super) fn uninit(item: NonNull<u8>) {
        check_irql("IoUninitializeWorkItem");
        with_books(|b| {
            let entry = b
                .items
                .remove(&item.as_ptr().addr())
                .expect("mock kernel: IoUninitializeWorkItem on a work item never initialized");
            assert!(
                !entry.queued,
                "mock kernel: IoUninitializeWorkItem on a queued work item"
            );
        });
    }

    /// How many work item routines the mock has started, process-wide.
    pub fn work_items_run() -> usize {
        RUN.load(Ordering::SeqCst)
    }

    /// How many work item routines of items made on `io_object` the mock has started.
    pub fn work_items_run_on(io_object: *mut c_void) -> usize {
        with_books(|b| b.run.get(&io_object.addr()).copied().unwrap_or(0))
    }

    /// How many work items made on `io_object` are initialized (not yet uninitialized): zero
    /// once every passive subscriber of that object is gone.
    pub fn work_items_initialized_on(io_object: *mut c_void) -> usize {
        let io = io_object.addr();
        with_books(|b| {
            b.items
                .values()
                .filter(|i| i.io_object.0.addr() == io)
                .count()
        })
    }
}
