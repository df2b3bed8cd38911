//! The mock kernel: a per-thread IRQL, a spin lock that raises it, thread tokens.

use core::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::sync::atomic::{AtomicBool, Ordering as LockOrdering};

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

    fn relax() {
        assert!(
            Self::current_irql() < Irql::DISPATCH_LEVEL,
            "mock kernel: waiting at {} would hang a real kernel",
            Self::current_irql()
        );
        // Under loom a wait loop must yield to loom's scheduler, or the model never ends.
        #[cfg(not(teredo_watcher_loom))]
        std::thread::yield_now();
        #[cfg(teredo_watcher_loom)]
        loom::thread::yield_now();
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
