//! The kernel primitives the library runs on, and the spin lock built on them.
//!
//! One `unsafe trait` ([`Kernel`]) with a written contract lets the same registry, handle
//! table and watcher run on the Windows kernel ([`crate::nt::NtKernel`]) and on the host mock
//! (`mock::MockKernel`), the way Rust-for-Linux's lock `Backend` does.

use core::ffi::c_void;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;

use alloc::boxed::Box;

use crate::error::Error;
use crate::irql::{Irql, IrqlBound};
use crate::sync::UnsafeCell;
use crate::sys;

/// An opaque identity of the current thread, never zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ThreadToken(pub(crate) usize);

impl ThreadToken {
    /// Wraps a thread identity; `raw` must differ between live threads and must not be zero.
    #[must_use]
    pub const fn from_raw(raw: usize) -> Self {
        ThreadToken(raw)
    }
    /// The raw identity.
    #[must_use]
    pub const fn raw(self) -> usize {
        self.0
    }
}

/// The kernel services the library needs: IRQL, spin locks, thread identity, events, work
/// items.
///
/// # Safety
///
/// An implementation guarantees that:
/// - [`acquire`](Kernel::acquire) and [`release`](Kernel::release) on the same lock give mutual
///   exclusion between threads, with acquire ordering on `acquire` and release ordering on
///   `release`; `acquire` raises the current IRQL to `DISPATCH_LEVEL` and returns the previous
///   one, and `release` restores the IRQL it is given;
/// - [`current_irql`](Kernel::current_irql) reports the IRQL of the calling thread, including
///   raises made by `acquire`;
/// - [`current_thread`](Kernel::current_thread) returns a value that no other live thread
///   returns at the same time, and never zero;
/// - the event functions behave as a notification event (`KeInitializeEvent` with
///   `NotificationEvent`): [`event_set`](Kernel::event_set) signals it and releases every
///   thread in [`event_wait`](Kernel::event_wait) and every later wait until
///   [`event_clear`](Kernel::event_clear); a set happens-before the return of a wait it
///   releases;
/// - the work item functions behave as `IoInitializeWorkItem`, `IoQueueWorkItemEx` on the
///   `DelayedWorkQueue`, and `IoUninitializeWorkItem`: a queued item's routine runs exactly
///   once per queueing, at `PASSIVE_LEVEL`, on a thread that is not the queueing thread's
///   current call stack, and the queueing call happens-before the routine starts.
pub unsafe trait Kernel: Send + Sync + 'static {
    /// Storage of one spin lock (`KSPIN_LOCK` in the kernel).
    type RawSpinLock: Send + Sync;

    /// A new, released lock.
    #[cfg(not(teredo_watcher_loom))]
    const UNLOCKED: Self::RawSpinLock;

    /// A new, released lock (loom's atomics cannot be built in a `const`).
    #[cfg(teredo_watcher_loom)]
    fn new_lock() -> Self::RawSpinLock;

    /// The IRQL of the calling thread.
    fn current_irql() -> Irql;

    /// The identity of the calling thread.
    fn current_thread() -> ThreadToken;

    /// Raises to `DISPATCH_LEVEL` and acquires `lock`, returning the previous IRQL.
    ///
    /// # Safety
    ///
    /// The caller runs at `<= DISPATCH_LEVEL` and does not already hold `lock`.
    unsafe fn acquire(lock: &Self::RawSpinLock) -> Irql;

    /// Releases `lock` and lowers the IRQL to `previous`.
    ///
    /// # Safety
    ///
    /// The calling thread holds `lock`, and `previous` is what the matching `acquire` returned.
    unsafe fn release(lock: &Self::RawSpinLock, previous: Irql);

    /// Storage of one notification event (`KEVENT`), not yet initialized.
    type Event: Send + Sync;

    /// Storage for an event, to be initialized in place with
    /// [`event_init`](Kernel::event_init).
    #[cfg(not(teredo_watcher_loom))]
    const EVENT: Self::Event;

    /// Storage for an event (loom's primitives cannot be built in a `const`).
    #[cfg(teredo_watcher_loom)]
    fn new_event() -> Self::Event;

    /// `KeInitializeEvent(NotificationEvent, FALSE)`: a non-signalled event.
    ///
    /// # Safety
    ///
    /// No other thread uses `event` yet, and it does not move until it is dropped.
    unsafe fn event_init(event: &Self::Event);

    /// `KeSetEvent(.., FALSE)`. IRQL `<= DISPATCH_LEVEL`.
    ///
    /// # Safety
    ///
    /// `event` was initialized with [`event_init`](Kernel::event_init) and has not moved.
    unsafe fn event_set(event: &Self::Event);

    /// `KeClearEvent`. IRQL `<= DISPATCH_LEVEL`.
    ///
    /// # Safety
    ///
    /// As [`event_set`](Kernel::event_set).
    unsafe fn event_clear(event: &Self::Event);

    /// `KeWaitForSingleObject(.., Executive, KernelMode, FALSE, NULL)`: waits until the
    /// event is signalled. IRQL `< DISPATCH_LEVEL`.
    ///
    /// # Safety
    ///
    /// As [`event_set`](Kernel::event_set), and the caller is at `< DISPATCH_LEVEL`.
    unsafe fn event_wait(event: &Self::Event);

    /// Called when an entry point runs above the IRQL it documents, before the error is
    /// returned. The kernel backend makes it a debug assertion; the mock can record it.
    fn irql_violation(operation: &'static str, current: Irql, required: IrqlBound);

    /// `IoSizeofWorkItem()`: the bytes of storage one `IO_WORKITEM` needs (the library
    /// allocates it 16-byte aligned, in non-paged memory). Any IRQL.
    fn work_item_size() -> usize;

    /// `IoInitializeWorkItem(io_object, item)`: makes the storage at `item` a work item of
    /// `io_object`. IRQL `<= DISPATCH_LEVEL`.
    ///
    /// # Safety
    ///
    /// `io_object` is a `DRIVER_OBJECT` or `DEVICE_OBJECT` that outlives the work item;
    /// `item` points to at least [`work_item_size`](Kernel::work_item_size) bytes, 16-byte
    /// aligned, non-paged, that stay at that address and are not used otherwise until
    /// [`work_item_uninit`](Kernel::work_item_uninit) returns; the item is not initialized
    /// already.
    unsafe fn work_item_init(io_object: *mut c_void, item: NonNull<u8>);

    /// `IoQueueWorkItemEx(item, routine, DelayedWorkQueue, context)`: queues the item; a
    /// system worker thread calls `routine(io_object, context, item)` at `PASSIVE_LEVEL`.
    /// The I/O manager keeps `io_object` (and so the driver image) referenced until the
    /// routine has returned, and dequeues the item before it calls the routine, so the
    /// routine may queue it again or uninitialize it. IRQL `<= DISPATCH_LEVEL`.
    ///
    /// # Safety
    ///
    /// `item` was initialized with [`work_item_init`](Kernel::work_item_init) and is not
    /// queued (it has never been queued, or the routine of its last queueing has started);
    /// `routine(io_object, context, item)` is sound to call once on any system thread, and
    /// the storage stays valid until that call has started.
    unsafe fn work_item_queue(
        item: NonNull<u8>,
        routine: sys::IoWorkItemRoutineEx,
        context: *mut c_void,
    );

    /// `IoUninitializeWorkItem(item)`: undoes [`work_item_init`](Kernel::work_item_init);
    /// the storage may then be freed. IRQL `<= DISPATCH_LEVEL`; allowed inside the item's own
    /// routine (the item is dequeued before its routine runs).
    ///
    /// # Safety
    ///
    /// `item` was initialized with [`work_item_init`](Kernel::work_item_init), is not
    /// queued, and is not used again until it is initialized again.
    unsafe fn work_item_uninit(item: NonNull<u8>);
}

/// A spin lock protecting a `T`, on the kernel backend `K`.
///
/// # IRQL
///
/// [`lock`](SpinLock::lock) may be called at `<= DISPATCH_LEVEL`; it raises to
/// `DISPATCH_LEVEL` until the guard drops. Nothing that may wait, touch paged memory or run
/// user code is ever done while a guard is held in this crate.
pub(crate) struct SpinLock<K: Kernel, T> {
    raw: K::RawSpinLock,
    data: UnsafeCell<T>,
}

// SAFETY: the lock hands out access to `T` to one thread at a time (the `Kernel` contract),
// so sharing the lock is sharing a `T` that moves between threads: `T: Send` is enough.
unsafe impl<K: Kernel, T: Send> Sync for SpinLock<K, T> {}
// SAFETY: moving the lock moves the `T`; `K::RawSpinLock: Send` by the trait bound.
unsafe impl<K: Kernel, T: Send> Send for SpinLock<K, T> {}

impl<K: Kernel, T> SpinLock<K, T> {
    #[cfg(not(teredo_watcher_loom))]
    pub(crate) const fn new(value: T) -> Self {
        SpinLock {
            raw: K::UNLOCKED,
            data: UnsafeCell::new(value),
        }
    }

    #[cfg(teredo_watcher_loom)]
    pub(crate) fn new(value: T) -> Self {
        SpinLock {
            raw: K::new_lock(),
            data: UnsafeCell::new(value),
        }
    }

    /// Acquires the lock for `operation`, or refuses with [`Error::IrqlTooHigh`] above
    /// `DISPATCH_LEVEL` (checked in every build: acquiring a spin lock there is a bugcheck).
    pub(crate) fn lock(&self, operation: &'static str) -> Result<SpinLockGuard<'_, K, T>, Error> {
        crate::irql::check::<K>(operation, IrqlBound::AtMostDispatch)?;
        // SAFETY: the caller is at `<= DISPATCH_LEVEL` (checked above), and no code path
        // acquires a lock it already holds (guards are never held across calls that could
        // come back into the same lock: no user code runs under a guard).
        let previous = unsafe { K::acquire(&self.raw) };
        // INVARIANT: the lock is held until the guard is dropped.
        Ok(SpinLockGuard {
            lock: self,
            previous,
            _not_send: PhantomData,
        })
    }
}

/// Holds a [`SpinLock`]; releases it (and restores the IRQL) on drop.
///
/// # Invariants
///
/// The current thread holds `lock.raw`, acquired by a call that returned `previous`.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub(crate) struct SpinLockGuard<'a, K: Kernel, T> {
    lock: &'a SpinLock<K, T>,
    previous: Irql,
    // A spin lock must be released on the processor (thread) that acquired it.
    _not_send: PhantomData<*mut ()>,
}

impl<K: Kernel, T> Deref for SpinLockGuard<'_, K, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: by the type invariant the lock is held, so no other reference to the data
        // is live; the reference is bounded by the guard's borrow.
        self.lock.data.with(|p| unsafe { &*p })
    }
}

impl<K: Kernel, T> DerefMut for SpinLockGuard<'_, K, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only access through the guard.
        self.lock.data.with_mut(|p| unsafe { &mut *p })
    }
}

impl<K: Kernel, T> Drop for SpinLockGuard<'_, K, T> {
    fn drop(&mut self) {
        // SAFETY: by the type invariant this thread holds the lock and `previous` came from
        // the matching acquire.
        unsafe { K::release(&self.lock.raw, self.previous) };
    }
}

/// A notification event of the kernel backend `K`, initialized at its final address.
///
/// [`Event::new_boxed`] allocates the storage, then initializes it in place, so the `KEVENT`
/// never moves after `KeInitializeEvent` (the kernel links waiters to its address).
/// [`Event::unstarted`] builds the storage in a `const`, for a `static`;
/// [`Event::init_in_place`] initializes it there before its first use.
///
/// # Invariants
///
/// Once `set`, `clear` or `wait` is called, `raw` was initialized with [`Kernel::event_init`]
/// at the address it has now, and it never moves: it lives in a `Box` that is never moved
/// out of, or in a `static` (the owner of an unstarted event upholds this by calling
/// `init_in_place` first).
pub(crate) struct Event<K: Kernel> {
    raw: K::Event,
}

impl<K: Kernel> Event<K> {
    /// Storage for an event in a `static`, not initialized: see
    /// [`init_in_place`](Self::init_in_place).
    #[cfg(not(teredo_watcher_loom))]
    pub(crate) const fn unstarted() -> Self {
        Event { raw: K::EVENT }
    }

    /// `KeInitializeEvent` at the event's address.
    ///
    /// # Safety
    ///
    /// The event does not move any more, no other thread uses it now, and it has not been
    /// initialized before.
    #[cfg(not(teredo_watcher_loom))]
    pub(crate) unsafe fn init_in_place(&self) {
        // SAFETY: this function's contract.
        unsafe { K::event_init(&self.raw) };
    }

    /// A new, non-signalled event in pool memory.
    pub(crate) fn new_boxed() -> Result<Box<Self>, Error> {
        #[cfg(not(teredo_watcher_loom))]
        let raw = K::EVENT;
        #[cfg(teredo_watcher_loom)]
        let raw = K::new_event();
        let event = crate::alloc_util::try_box(Event { raw })?;
        // SAFETY: the box was just made, so no other thread sees the event, and a boxed value
        // does not move; it is never moved out of the box (the field is private and no
        // method gives it away).
        unsafe { K::event_init(&event.raw) };
        // INVARIANT: initialized at its final address, inside a box.
        Ok(event)
    }

    /// Signals the event. IRQL `<= DISPATCH_LEVEL` (the caller's).
    pub(crate) fn set(&self) {
        // SAFETY: initialized at this address (type invariant).
        unsafe { K::event_set(&self.raw) }
    }

    /// Resets the event to non-signalled. IRQL `<= DISPATCH_LEVEL` (the caller's).
    pub(crate) fn clear(&self) {
        // SAFETY: initialized at this address (type invariant).
        unsafe { K::event_clear(&self.raw) }
    }

    /// Waits until the event is signalled. The caller checked `< DISPATCH_LEVEL`.
    pub(crate) fn wait(&self) {
        debug_assert!(K::current_irql() < Irql::DISPATCH_LEVEL);
        // SAFETY: initialized at this address (type invariant); every caller in this crate
        // checks `< DISPATCH_LEVEL` before it waits.
        unsafe { K::event_wait(&self.raw) }
    }
}
