//! The Windows kernel backend: ntoskrnl primitives and the real netio port source.
//!
//! Compiled for `target_os = "windows"` only. Nothing here depends on `wdk-sys`; the
//! declarations are in [`crate::sys`].

use core::ffi::c_void;

use crate::error::{Error, NetioCall};
use crate::irql::{Irql, IrqlBound};
use crate::kernel::{Kernel, ThreadToken};
use crate::source::{PortSource, RawHandle};
use crate::sync::atomic::AtomicUsize;
use crate::sys;

/// The Windows kernel (`ntoskrnl.exe`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NtKernel;

// SAFETY: `KeAcquireSpinLockRaiseToDpc`/`KeReleaseSpinLock` are the kernel's spin lock:
// mutual exclusion with acquire/release semantics, raising to DISPATCH_LEVEL and restoring
// the given IRQL. `KeGetCurrentIrql` reports the processor's IRQL, which the running thread
// keeps while at DISPATCH_LEVEL. `PsGetCurrentThreadId` is unique among live threads and
// never zero (thread ids are non-zero multiples of 4).
unsafe impl Kernel for NtKernel {
    // `KSPIN_LOCK` is a `ULONG_PTR` that `KeInitializeSpinLock` sets to zero; an atomic of the
    // same size and alignment lets the kernel modify it through a shared reference.
    type RawSpinLock = AtomicUsize;

    #[cfg(not(teredo_watcher_loom))]
    const UNLOCKED: AtomicUsize = AtomicUsize::new(0);

    #[cfg(teredo_watcher_loom)]
    fn new_lock() -> AtomicUsize {
        AtomicUsize::new(0)
    }

    #[inline]
    fn current_irql() -> Irql {
        // SAFETY: `KeGetCurrentIrql` has no preconditions and may be called at any IRQL.
        Irql::from_raw(unsafe { sys::KeGetCurrentIrql() })
    }

    #[inline]
    fn current_thread() -> ThreadToken {
        // SAFETY: `PsGetCurrentThreadId` has no preconditions and may be called at any IRQL.
        let id = unsafe { sys::PsGetCurrentThreadId() };
        ThreadToken::from_raw(id.addr())
    }

    #[inline]
    unsafe fn acquire(lock: &AtomicUsize) -> Irql {
        // SAFETY: the caller is at <= DISPATCH_LEVEL and does not hold the lock (this
        // function's contract). The lock word lives in an atomic, so the kernel writing it
        // through this pointer while other threads read it is not a data race.
        Irql::from_raw(unsafe { sys::KeAcquireSpinLockRaiseToDpc(lock.as_ptr()) })
    }

    #[inline]
    unsafe fn release(lock: &AtomicUsize, previous: Irql) {
        // SAFETY: the caller holds the lock and `previous` is what the acquire returned
        // (this function's contract).
        unsafe { sys::KeReleaseSpinLock(lock.as_ptr(), previous.raw()) }
    }

    fn relax() {
        // A relative interval of one 100 ns unit: gives up the rest of the quantum.
        let mut interval: i64 = -1;
        // SAFETY: callers run at < DISPATCH_LEVEL (every wait loop in this crate checks its
        // IRQL first); `interval` outlives the call. KernelMode = 0, not alertable.
        let _ = unsafe { sys::KeDelayExecutionThread(0, 0, &raw mut interval) };
    }

    fn irql_violation(operation: &'static str, current: Irql, required: IrqlBound) {
        debug_assert!(
            false,
            "teredo-watcher: {operation} called at {current}, requires {required}"
        );
    }
}

/// The real netio Teredo API (`netio.sys`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NetioPortSource;

impl NetioPortSource {
    /// The netio port source.
    #[must_use]
    pub const fn new() -> Self {
        NetioPortSource
    }
}

// SAFETY: this is the documented API itself: serialized callbacks, at <= DISPATCH_LEVEL,
// context passed through, and `CancelMibChangeNotify2` waits for a callback in flight.
unsafe impl PortSource for NetioPortSource {
    type Kernel = NtKernel;

    unsafe fn notify(
        &self,
        callback: sys::TeredoPortChangeCallback,
        context: *mut c_void,
        initial_notification: bool,
    ) -> Result<RawHandle, Error> {
        let mut handle: sys::HANDLE = core::ptr::null_mut();
        // SAFETY: the caller guarantees `callback(context, ..)` stays sound until a cancel
        // succeeds (this function's contract); `handle` is a valid out pointer.
        let status = unsafe {
            sys::NotifyTeredoPortChange(
                callback,
                context,
                u8::from(initial_notification),
                &raw mut handle,
            )
        };
        Error::check(NetioCall::NotifyTeredoPortChange, status)?;
        RawHandle::new(handle.addr()).ok_or(Error::InvalidHandle {
            call: NetioCall::NotifyTeredoPortChange,
            status: crate::NetioStatus(status),
        })
    }

    fn teredo_port(&self) -> Result<u16, Error> {
        let mut port = 0u16;
        // SAFETY: `port` is a valid out pointer for the duration of the call.
        let status = unsafe { sys::GetTeredoPort(&raw mut port) };
        Error::check(NetioCall::GetTeredoPort, status)?;
        Ok(port)
    }

    unsafe fn cancel(&self, handle: RawHandle) -> Result<(), Error> {
        // The handle is an identity the kernel gave us; it is never dereferenced here.
        let raw = core::ptr::without_provenance_mut::<c_void>(handle.get());
        // SAFETY: `handle` is a live registration of this source and we are not inside its
        // callback (this function's contract).
        let status = unsafe { sys::CancelMibChangeNotify2(raw) };
        Error::check(NetioCall::CancelMibChangeNotify2, status)
    }
}
