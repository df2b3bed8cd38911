//! The mock kernel: a per-thread IRQL, a spin lock that raises it, thread tokens.

use core::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::sync::atomic::{AtomicBool, Ordering as LockOrdering};
#[cfg(teredo_watcher_loom)]
use loom::sync::{Condvar, Mutex, MutexGuard};
use std::sync::PoisonError;
#[cfg(not(teredo_watcher_loom))]
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::irql::{Irql, IrqlBound};
use crate::kernel::{Kernel, ThreadToken};

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
// they are unique and never zero.
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
