//! Facade over the atomics and cells the library uses.
//!
//! Under `--cfg teredo_watcher_loom` every primitive is loom's, so the model tests in `tests/loom.rs`
//! explore the interleavings of the real code (the tokio/crossbeam pattern). In every other
//! build these are `core`'s own types with no cost.

#[cfg(not(teredo_watcher_loom))]
pub(crate) use core::sync::atomic;
#[cfg(teredo_watcher_loom)]
pub(crate) use loom::sync::atomic;

/// Spin-wait hint for loops that wait on another CPU (a `pause` instruction on x86): the
/// mock kernel's spin lock. The library itself never spins: it sleeps on kernel events.
#[cfg(any(test, feature = "mock"))]
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(not(teredo_watcher_loom))]
    core::hint::spin_loop();
    #[cfg(teredo_watcher_loom)]
    loom::thread::yield_now();
}

/// Marks the point between a `SeqCst` store and a `SeqCst` load of another location on which
/// a Dekker-style argument rests (see the registry's module docs). A no-op in real builds:
/// there the `SeqCst` operations themselves are ordered in the single total order. loom
/// treats `SeqCst` loads, stores and read-modify-writes as `AcqRel` (loom README,
/// "Unsupported features"; tokio-rs/loom#180), which would report executions the C++ memory
/// model forbids; it does model `fence(SeqCst)` exactly, so under `--cfg teredo_watcher_loom` this is one.
#[inline]
pub(crate) fn seq_cst_point() {
    #[cfg(teredo_watcher_loom)]
    loom::sync::atomic::fence(atomic::Ordering::SeqCst);
}

/// `UnsafeCell` with the closure-based API of loom's, so access is tracked under loom.
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(
    #[cfg(not(teredo_watcher_loom))] core::cell::UnsafeCell<T>,
    #[cfg(teredo_watcher_loom)] loom::cell::UnsafeCell<T>,
);

impl<T> UnsafeCell<T> {
    #[cfg(not(teredo_watcher_loom))]
    pub(crate) const fn new(value: T) -> Self {
        Self(core::cell::UnsafeCell::new(value))
    }

    #[cfg(teredo_watcher_loom)]
    pub(crate) fn new(value: T) -> Self {
        Self(loom::cell::UnsafeCell::new(value))
    }

    /// Runs `f` with a shared pointer to the value.
    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        #[cfg(not(teredo_watcher_loom))]
        {
            f(self.0.get())
        }
        #[cfg(teredo_watcher_loom)]
        {
            self.0.with(f)
        }
    }

    /// Runs `f` with an exclusive pointer to the value.
    #[inline]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        #[cfg(not(teredo_watcher_loom))]
        {
            f(self.0.get())
        }
        #[cfg(teredo_watcher_loom)]
        {
            self.0.with_mut(f)
        }
    }
}
