//! The Windows kernel backend: ntoskrnl primitives and the real netio port source.
//!
//! Compiled for `target_os = "windows"` only. Nothing here depends on `wdk-sys`; the
//! declarations are in [`crate::sys`].

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::mem::MaybeUninit;
use core::ptr::NonNull;

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
// never zero (thread ids are non-zero multiples of 4). The event routines are the kernel's
// notification events (`KeInitializeEvent(NotificationEvent)`), which synchronize internally.
// The work item routines are the I/O manager's (`IoInitializeWorkItem`, `IoQueueWorkItemEx`
// on the `DelayedWorkQueue`, `IoUninitializeWorkItem`): the routine runs once per queueing at
// PASSIVE_LEVEL on a system worker thread, after the queueing call.
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

    type Event = NtEvent;

    #[cfg(not(teredo_watcher_loom))]
    const EVENT: NtEvent = NtEvent(UnsafeCell::new(MaybeUninit::uninit()));

    #[cfg(teredo_watcher_loom)]
    fn new_event() -> NtEvent {
        NtEvent(UnsafeCell::new(MaybeUninit::uninit()))
    }

    unsafe fn event_init(event: &NtEvent) {
        // SAFETY: the storage is a `KEVENT`-sized, -aligned block in non-paged memory that
        // does not move and that no other thread uses yet (this function's contract).
        unsafe { sys::KeInitializeEvent(event.as_ptr(), sys::NOTIFICATION_EVENT, 0) }
    }

    unsafe fn event_set(event: &NtEvent) {
        // SAFETY: initialized and not moved (contract); `Wait = FALSE` is valid at
        // `<= DISPATCH_LEVEL`, where every caller in this crate is.
        let _ = unsafe { sys::KeSetEvent(event.as_ptr(), 0, 0) };
    }

    unsafe fn event_clear(event: &NtEvent) {
        // SAFETY: initialized and not moved (contract); valid at `<= DISPATCH_LEVEL`.
        unsafe { sys::KeClearEvent(event.as_ptr()) }
    }

    unsafe fn event_wait(event: &NtEvent) {
        // SAFETY: initialized and not moved (contract); a wait with no timeout at
        // `< DISPATCH_LEVEL` (contract); Executive, KernelMode, not alertable: it returns only
        // when the event is signalled.
        let _ = unsafe {
            sys::KeWaitForSingleObject(
                event.as_ptr().cast(),
                sys::EXECUTIVE,
                sys::KERNEL_MODE,
                0,
                core::ptr::null_mut(),
            )
        };
    }

    fn irql_violation(operation: &'static str, current: Irql, required: IrqlBound) {
        debug_assert!(
            false,
            "teredo-watcher: {operation} called at {current}, requires {required}"
        );
    }

    #[inline]
    fn work_item_size() -> usize {
        // SAFETY: `IoSizeofWorkItem` has no preconditions.
        let size = unsafe { sys::IoSizeofWorkItem() };
        size as usize
    }

    unsafe fn work_item_init(io_object: *mut c_void, item: NonNull<u8>) {
        // SAFETY: `io_object` is a driver or device object that outlives the item, and
        // `item` is `IoSizeofWorkItem` bytes of non-paged, 16-aligned storage that does not
        // move and is not initialized yet (this function's contract).
        unsafe { sys::IoInitializeWorkItem(io_object, item.as_ptr().cast()) }
    }

    unsafe fn work_item_queue(
        item: NonNull<u8>,
        routine: sys::IoWorkItemRoutineEx,
        context: *mut c_void,
    ) {
        // SAFETY: the item is initialized and not queued, and `routine(.., context, ..)` is
        // sound on a system thread (this function's contract). `IoQueueWorkItemEx` is the
        // form a work item made on a driver object requires; `DelayedWorkQueue` is the queue
        // for work that may block.
        unsafe {
            sys::IoQueueWorkItemEx(
                item.as_ptr().cast(),
                routine,
                sys::DELAYED_WORK_QUEUE,
                context,
            );
        }
    }

    unsafe fn work_item_uninit(item: NonNull<u8>) {
        // SAFETY: initialized and not queued (this function's contract).
        unsafe { sys::IoUninitializeWorkItem(item.as_ptr().cast()) }
    }
}

/// Storage of one `KEVENT`, written only by the kernel's `Ke*Event` routines.
pub struct NtEvent(UnsafeCell<MaybeUninit<sys::KEVENT>>);

impl NtEvent {
    fn as_ptr(&self) -> *mut sys::KEVENT {
        self.0.get().cast()
    }
}

// SAFETY: a `KEVENT` is made to be used by many threads at once; every access goes through
// the kernel's event routines, which synchronize internally (the dispatcher lock).
unsafe impl Sync for NtEvent {}
// SAFETY: as above; moving the storage before `KeInitializeEvent` is fine, and the crate
// never moves an initialized one (`kernel::Event` keeps it boxed, or in a `static`).
unsafe impl Send for NtEvent {}

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

// A driver's `static StaticNetioWatcher<N>` is built by the `const fn` at compile time: this
// evaluates one in a constant (and forgets it, as a `static` is never dropped).
const _: () = core::mem::forget(crate::StaticNetioWatcher::<2>::new(NetioPortSource::new()));

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
