//! `PASSIVE_LEVEL` subscribers: the newest port, delivered on a system worker thread.
//!
//! Firewall drivers change WFP filters with management calls (`FwpmTransactionBegin0`,
//! `FwpmFilterAdd0`, ...) that require `PASSIVE_LEVEL`, while the notification callback may
//! run at `DISPATCH_LEVEL`. A passive subscriber
//! ([`subscribe_passive`](crate::TeredoPortWatcher::subscribe_passive)) is an ordinary
//! registry subscriber (the *dispatch side*, which runs in the notification's round) that
//! hands the port over to a work item of the I/O manager, whose routine calls the user's
//! closure at `PASSIVE_LEVEL`.
//!
//! # Why I/O work items on the driver object
//!
//! The routine is code of the driver image. A work item made with `IoInitializeWorkItem` on
//! the caller's `DRIVER_OBJECT` (or one of its device objects) keeps that object referenced
//! while it is queued and while its routine runs, so the image cannot unload under a routine
//! that is still returning, even after the last wait of the library has ended. A work item
//! on a driver object must be queued with `IoQueueWorkItemEx` (`IoQueueWorkItem` requires a
//! device object). `ExQueueWorkItem` gives no such reference. The storage comes from
//! `IoSizeofWorkItem`, inside the subscriber's own pool block: no allocation on the
//! notification path.
//!
//! # The state word
//!
//! Each subscriber has a reference-counted *core*: the newest port (`newest`), the closure,
//! the work item, an "idle" event and one word with the flags
//! - `QUEUED`: the work item is queued (set by the dispatch side, cleared by the routine as
//!   it starts; the I/O manager dequeues an item before it runs its routine);
//! - `RUNNING`: the routine runs;
//! - `DIRTY`: a newer port came while the item was queued or running;
//! - `CLOSED`: no call starts any more (unsubscribe, the watcher's release, the teardown);
//! - `WAITERS`: a thread sleeps on the idle event;
//! - `TAKEN`: the closure was dropped by a waiter.
//!
//! **Dispatch side** (in the round, any IRQL `<= DISPATCH_LEVEL`): stores the port in
//! `newest`, then one compare-and-swap with release ordering: if `CLOSED`, nothing; if
//! `QUEUED` or `RUNNING`, set `DIRTY`; otherwise set `QUEUED` and queue the item, which owns
//! one reference to the core. No allocation, no wait, no lock, no panic. So at most one
//! item per subscriber is ever queued, and an item is queued again only after its previous
//! routine has started (it is dequeued then), which the I/O manager allows.
//!
//! **Routine** (`PASSIVE_LEVEL`): claims the word (`QUEUED -> RUNNING`, clearing `DIRTY`,
//! acquire), reads `newest` and calls the closure with it unless it equals the port of the
//! previous call (state, not events), then either clears `DIRTY` and repeats, or clears
//! `RUNNING` (and `WAITERS`, waking the waiters), in one compare-and-swap. `CLOSED` makes
//! every further iteration a no-op: a queued item cannot be dequeued, so it runs and calls
//! nothing.
//!
//! # Why the ports arrive in order, ending on the newest
//!
//! The registry calls one subscriber's dispatch side serialized and in notification order,
//! so the stores to `newest` are in that order, and each is followed by a release RMW of the
//! word. A routine reads `newest` after an acquire RMW of the word; by read-read coherence
//! each read returns a port at least as new as the previous one: never an older port after
//! a newer one. The last store of a burst is followed by its RMW: if that comes before the
//! routine's final compare-and-swap in the word's modification order, the routine sees
//! `DIRTY` (set by that RMW) and reads again, after it (so it reads the newest); if it comes
//! after, the routine is no longer `RUNNING` and the dispatch side queues a new item. Either
//! way the newest port is delivered, last. A burst of N changes while a call runs yields at
//! most one more call. Calls never overlap: only the thread that moved the word to
//! `RUNNING` calls the closure, and the next routine can claim it only after `RUNNING` was
//! cleared (release) by the previous one.
//!
//! # Stopping
//!
//! Unsubscribe, the watcher's release and the teardown set `CLOSED`, then wait until the
//! word is neither `QUEUED` nor `RUNNING`: a call in flight finishes, a queued item runs as
//! a no-op. After that nothing queues the item again (`CLOSED` is checked in the same CAS
//! that would set `QUEUED`), so no call starts after they return. Then the waiter drops the
//! closure (`TAKEN` makes it one waiter's job). The wait is the registry's: under the core's
//! spin lock a waiter clears the event and sets `WAITERS` with one `fetch_or`; if the core
//! is idle already it sets the event again and leaves; the routine clears `WAITERS` with the
//! CAS that clears `RUNNING` and, if it was set, sets the event under the lock. Every clear
//! is followed by a set: no sleeper is left behind.
//!
//! Those waits need `< DISPATCH_LEVEL`. A thread that cannot wait (at `DISPATCH_LEVEL`,
//! inside a notification callback of the same watcher, or inside the subscriber's own call)
//! only sets `CLOSED`: no new call starts, a call in flight on a worker thread may still be
//! running when it returns, a queued item runs as a no-op later, and the closure is dropped
//! by whoever waits next (the next `subscribe_passive`, once the core is idle, the watcher's
//! release, or the teardown).
//!
//! # Lifetime
//!
//! The core is freed by the last of its references: the registry's list entry, the dispatch
//! side in the registry slot, a queued or running item, and a waiter's temporary one. The
//! last one uninitializes the work item (`IoUninitializeWorkItem`, allowed inside the
//! item's own routine since the item is dequeued by then; never while queued, since a
//! queued item holds a reference) and frees the storage. A routine may thus run its tail
//! (wake the waiters, drop its reference, free the core) after a waiter returned: that code
//! runs while the I/O manager still holds the driver object, so the image stays loaded.

use alloc::alloc::Layout;
use alloc::boxed::Box;
use core::ffi::c_void;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;

use crate::alloc_util::{OverAligned, POOL_ALIGNMENT, try_box};
use crate::error::Error;
use crate::event::TeredoPort;
use crate::kernel::{Event, Kernel, SpinLock};
use crate::sync::UnsafeCell;
use crate::sync::atomic::{AtomicU32, AtomicUsize, Ordering, fence};

/// The object a driver's work items are made on: the caller's `DRIVER_OBJECT`, or one of
/// its device objects.
///
/// # Invariants
///
/// `raw` was given to [`IoObject::from_raw`], whose caller guaranteed it outlives every
/// watcher of the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoObject {
    raw: NonNull<c_void>,
}

// SAFETY: an `IoObject` is an identity handed to `IoInitializeWorkItem`; this crate never
// dereferences it, and the kernel object it names may be used from any thread.
unsafe impl Send for IoObject {}
// SAFETY: as above; it is only copied.
unsafe impl Sync for IoObject {}

impl IoObject {
    /// The object work items are made on. `None` for a null pointer.
    ///
    /// # Safety
    ///
    /// `raw` is the caller's `DRIVER_OBJECT` (or one of its device objects), which outlives
    /// every watcher: a work item made on it keeps the image loaded while it is queued or
    /// running. On the host mock any non-null address works (it is never dereferenced).
    #[must_use]
    pub unsafe fn from_raw(raw: *mut c_void) -> Option<IoObject> {
        // INVARIANT: the caller guarantees the object outlives every watcher.
        NonNull::new(raw).map(|raw| IoObject { raw })
    }

    /// The raw pointer.
    #[must_use]
    pub fn as_raw(self) -> *mut c_void {
        self.raw.as_ptr()
    }
}

const QUEUED: u32 = 1;
const RUNNING: u32 = 1 << 1;
const DIRTY: u32 = 1 << 2;
const CLOSED: u32 = 1 << 3;
const WAITERS: u32 = 1 << 4;
const TAKEN: u32 = 1 << 5;
const BUSY: u32 = QUEUED | RUNNING;
/// `last` before the first call: no port was delivered yet (ports are `u16`).
const NEVER: u32 = u32::MAX;

/// A type-erased `FnMut(Option<TeredoPort>) + Send`, owned.
///
/// # Invariants
///
/// `block.value()` points to a live `F`, aligned for `F` (see [`OverAligned`]); `call` and
/// `drop_fn` are the monomorphized functions for that `F`.
struct PassiveFn {
    block: ManuallyDrop<OverAligned>,
    call: unsafe fn(NonNull<u8>, Option<TeredoPort>),
    drop_fn: unsafe fn(NonNull<u8>),
}

// SAFETY: the erased closure is `Send` (required by `PassiveFn::new`), and it is used by one
// thread at a time (the core's protocol).
unsafe impl Send for PassiveFn {}

impl PassiveFn {
    fn new<F: FnMut(Option<TeredoPort>) + Send + 'static>(f: F) -> Result<PassiveFn, Error> {
        unsafe fn call<F: FnMut(Option<TeredoPort>)>(data: NonNull<u8>, port: Option<TeredoPort>) {
            // SAFETY: the caller passes the value pointer of a `PassiveFn` built for this `F`
            // and has exclusive access to it (`PassiveFn::call` takes `&mut self`).
            let f = unsafe { data.cast::<F>().as_mut() };
            f(port);
        }
        unsafe fn drop_fn<F>(data: NonNull<u8>) {
            // SAFETY: called once, from `PassiveFn::drop`, with the value pointer of a
            // closure built for this `F`; it is live and nothing else refers to it any more.
            unsafe { core::ptr::drop_in_place(data.cast::<F>().as_ptr()) };
        }

        let block = OverAligned::new(Layout::new::<F>())?;
        // SAFETY: `block.value()` is valid for writes of an `F` and aligned for it
        // (`OverAligned::new` with `Layout::new::<F>()`).
        unsafe { block.value().cast::<F>().as_ptr().write(f) };
        // INVARIANT: the block holds the `F` just written; `call`/`drop_fn` are for `F`.
        Ok(PassiveFn {
            block: ManuallyDrop::new(block),
            call: call::<F>,
            drop_fn: drop_fn::<F>,
        })
    }

    fn call(&mut self, port: Option<TeredoPort>) {
        // SAFETY: by the type invariant the block holds a live `F` matching `call`;
        // `&mut self` gives exclusive access.
        unsafe { (self.call)(self.block.value(), port) }
    }
}

impl Drop for PassiveFn {
    fn drop(&mut self) {
        // SAFETY: by the type invariant; this is the only drop of the closure.
        unsafe { (self.drop_fn)(self.block.value()) };
        // SAFETY: the value was just dropped and the block is taken once, here.
        let block = unsafe { ManuallyDrop::take(&mut self.block) };
        block.free();
    }
}

/// Storage of one `IO_WORKITEM`: a 16-byte-aligned pool block of `IoSizeofWorkItem` bytes.
/// Dropping it frees the block; the core uninitializes the item first.
struct ItemStorage(ManuallyDrop<OverAligned>);

impl ItemStorage {
    fn new(size: usize) -> Result<ItemStorage, Error> {
        let failed = Error::AllocationFailed { bytes: size };
        if size == 0 {
            return Err(failed);
        }
        let layout = Layout::from_size_align(size, POOL_ALIGNMENT).map_err(|_| failed)?;
        Ok(ItemStorage(ManuallyDrop::new(OverAligned::new(layout)?)))
    }

    fn ptr(&self) -> NonNull<u8> {
        self.0.value()
    }
}

impl Drop for ItemStorage {
    fn drop(&mut self) {
        // SAFETY: taken once, here; the core uninitialized the item before (or never
        // initialized it).
        let block = unsafe { ManuallyDrop::take(&mut self.0) };
        block.free();
    }
}

/// One passive subscriber (see the module docs).
///
/// # Invariants
///
/// `item` was initialized with [`Kernel::work_item_init`] on `io_object` once the core was
/// boxed, and is uninitialized only by [`CoreRef::drop`] of the last reference. `callback`
/// and `last` are touched only by the routine that moved `state` to `RUNNING` (until it
/// clears it), by the waiter that set `TAKEN` once the core was idle and `CLOSED`, and by the
/// last reference.
pub(crate) struct PassiveCore<K: Kernel> {
    refs: AtomicUsize,
    state: AtomicU32,
    /// The newest port (0: none).
    newest: AtomicU32,
    /// The thread running the closure now, or 0.
    runner: AtomicUsize,
    /// The port of the last call (`NEVER` before the first).
    last: UnsafeCell<u32>,
    callback: UnsafeCell<Option<PassiveFn>>,
    lock: SpinLock<K, ()>,
    idle: Box<Event<K>>,
    item: ItemStorage,
}

/// One counted reference to a boxed [`PassiveCore`].
///
/// # Invariants
///
/// `ptr` points to a core made by [`CoreRef::new`] whose `refs` counts this reference.
pub(crate) struct CoreRef<K: Kernel> {
    ptr: NonNull<PassiveCore<K>>,
}

// SAFETY: a core is shared between threads by design: its fields are atomics, a spin lock,
// an event, and cells whose access the state word makes exclusive (type invariant of
// `PassiveCore`); the closure it owns is `Send`.
unsafe impl<K: Kernel> Send for CoreRef<K> {}
// SAFETY: as above; every method takes `&self` and follows the protocol.
unsafe impl<K: Kernel> Sync for CoreRef<K> {}

impl<K: Kernel> CoreRef<K> {
    /// A new core for `f`, its work item initialized on `io_object`. Allocates (fallibly)
    /// the closure's block, the event, the item's storage and the core itself.
    pub(crate) fn new<F>(io_object: IoObject, f: F) -> Result<CoreRef<K>, Error>
    where
        F: FnMut(Option<TeredoPort>) + Send + 'static,
    {
        let callback = PassiveFn::new(f)?;
        let idle = Event::new_boxed()?;
        let item = ItemStorage::new(K::work_item_size())?;
        let core = try_box(PassiveCore {
            refs: AtomicUsize::new(1),
            state: AtomicU32::new(0),
            newest: AtomicU32::new(0),
            runner: AtomicUsize::new(0),
            last: UnsafeCell::new(NEVER),
            callback: UnsafeCell::new(Some(callback)),
            lock: SpinLock::new(()),
            idle,
            item,
        })?;
        // SAFETY: `io_object` outlives every watcher (`IoObject` invariant), hence this
        // item; the storage is `work_item_size()` bytes, 16-aligned, in a pool block that
        // stays where it is until the last reference frees it after uninitializing the item,
        // and nothing else uses it; it is not initialized yet.
        unsafe { K::work_item_init(io_object.as_raw(), core.item.ptr()) };
        // INVARIANT: one reference, this one; the item is initialized.
        Ok(CoreRef {
            ptr: NonNull::from(Box::leak(core)),
        })
    }

    fn core(&self) -> &PassiveCore<K> {
        // SAFETY: this reference keeps the core alive (type invariant).
        unsafe { self.ptr.as_ref() }
    }

    /// Another reference to the same core.
    pub(crate) fn clone_ref(&self) -> CoreRef<K> {
        // A new reference from an existing one: no ordering needed (as `Arc::clone`).
        self.core().refs.fetch_add(1, Ordering::Relaxed);
        // INVARIANT: counted just above.
        CoreRef { ptr: self.ptr }
    }

    /// Whether `self` and `other` are the same core.
    pub(crate) fn same(&self, other: &CoreRef<K>) -> bool {
        self.ptr == other.ptr
    }

    /// The dispatch side: records `port` as the newest and queues the work item unless one
    /// is queued or running (then marks the core dirty). Any IRQL `<= DISPATCH_LEVEL`; no
    /// allocation, wait, lock or panic.
    pub(crate) fn notify(&self, port: Option<TeredoPort>) {
        let core = self.core();
        core.newest
            .store(port.map_or(0, |p| u32::from(p.get())), Ordering::Relaxed);
        let mut current = core.state.load(Ordering::Relaxed);
        loop {
            if current & CLOSED != 0 {
                return;
            }
            let busy = current & BUSY != 0;
            // A write even when `DIRTY` is already set: the release RMW is what orders the
            // store to `newest` before the routine's next read (module docs).
            let next = if busy {
                current | DIRTY
            } else {
                current | QUEUED
            };
            match core.state.compare_exchange_weak(
                current,
                next,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) if busy => return,
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        // This thread set QUEUED on an idle core: the item is not queued (the routine of its
        // last queueing has started, it cleared QUEUED), and no other thread queues it
        // until the routine started by this queueing clears QUEUED.
        let context = ManuallyDrop::new(self.clone_ref());
        // SAFETY: the item is initialized (type invariant) and not queued (above); the
        // routine `work_routine::<K>` takes over the reference passed as `context`, which
        // keeps the core, and so the item's storage, alive until that call has finished.
        unsafe {
            K::work_item_queue(
                core.item.ptr(),
                work_routine::<K>,
                context.ptr.as_ptr().cast(),
            );
        }
    }

    /// Stops calls: none starts after this (any IRQL, no lock).
    pub(crate) fn close(&self) {
        self.core().state.fetch_or(CLOSED, Ordering::AcqRel);
    }

    /// Whether an item is queued or running.
    pub(crate) fn is_busy(&self) -> bool {
        self.core().state.load(Ordering::Acquire) & BUSY != 0
    }

    /// Whether a waiter still has something to do: an item queued or running, or the
    /// closure not yet dropped.
    pub(crate) fn needs_drain(&self) -> bool {
        let state = self.core().state.load(Ordering::Acquire);
        state & BUSY != 0 || state & TAKEN == 0
    }

    /// Whether the calling thread is inside this subscriber's call (a wait for it would
    /// never end).
    pub(crate) fn runs_on_current_thread(&self) -> bool {
        self.core().runner.load(Ordering::Relaxed) == K::current_thread().raw()
    }

    /// Waits until no item is queued or running. The caller is at `< DISPATCH_LEVEL`, not
    /// inside this subscriber's call, and closed the core first (otherwise the core may be
    /// busy again as soon as this returns).
    pub(crate) fn wait_idle(&self, operation: &'static str) -> Result<(), Error> {
        let core = self.core();
        if core.state.load(Ordering::Acquire) & BUSY == 0 {
            return Ok(());
        }
        loop {
            {
                let _lock = core.lock.lock(operation)?;
                core.idle.clear();
                let before = core.state.fetch_or(WAITERS, Ordering::AcqRel);
                if before & BUSY == 0 {
                    // Idle before this thread could sleep: undo the clear, which another
                    // sleeper may rely on (module docs).
                    core.idle.set();
                    return Ok(());
                }
            }
            core.idle.wait();
            if core.state.load(Ordering::Acquire) & BUSY == 0 {
                return Ok(());
            }
        }
    }

    /// Drops the closure now, on this thread, if the core is closed and idle and no other
    /// waiter did. Returns whether the closure is gone. Call at `< DISPATCH_LEVEL` (the
    /// user's destructor runs here).
    pub(crate) fn drop_callback_if_idle(&self) -> bool {
        let core = self.core();
        let state = core.state.load(Ordering::Acquire);
        if state & CLOSED == 0 || state & BUSY != 0 {
            return false;
        }
        if core.state.fetch_or(TAKEN, Ordering::AcqRel) & TAKEN != 0 {
            return true;
        }
        let callback = core.callback.with_mut(|cb| {
            // SAFETY: the core is CLOSED and idle (acquire load above, after the routine's
            // release of RUNNING), so no routine touches the closure again (no item can be
            // queued once CLOSED); TAKEN makes this thread the only waiter here.
            unsafe { (*cb).take() }
        });
        drop(callback);
        true
    }
}

impl<K: Kernel> Drop for CoreRef<K> {
    fn drop(&mut self) {
        if self.core().refs.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // Every other reference's uses happen-before this (as `Arc::drop`).
        fence(Ordering::Acquire);
        // SAFETY: this was the last reference, so nothing else uses the core; it came from
        // `Box::leak` in `CoreRef::new`.
        let core = unsafe { Box::from_raw(self.ptr.as_ptr()) };
        // SAFETY: the item was initialized in `CoreRef::new` (type invariant of the core),
        // and is not queued: a queued item owns a reference, and this is the last. Inside
        // the item's own routine this is allowed: the item was dequeued before it ran.
        unsafe { K::work_item_uninit(core.item.ptr()) };
        // The closure (if no waiter dropped it), the event and the storage go here.
        drop(core);
    }
}

/// The `IO_WORKITEM_ROUTINE_EX` of passive subscribers (`PASSIVE_LEVEL`, a system worker
/// thread).
///
/// # Safety
///
/// `context` is a reference to a `PassiveCore<K>` leaked by [`CoreRef::notify`] for this
/// queueing; it is taken over (and dropped) here.
unsafe extern "system" fn work_routine<K: Kernel>(
    _io_object: *mut c_void,
    context: *mut c_void,
    _item: *mut c_void,
) {
    // INVARIANT: the reference leaked by `notify` for this queueing, counted there.
    let this = CoreRef::<K> {
        // SAFETY: `context` is the non-null pointer `notify` passed (this function's
        // contract).
        ptr: unsafe { NonNull::new_unchecked(context.cast::<PassiveCore<K>>()) },
    };
    this.run();
    // Possibly the last reference: then the item is uninitialized and freed here.
    drop(this);
}

impl<K: Kernel> CoreRef<K> {
    /// The routine's loop (module docs).
    fn run(&self) {
        let core = self.core();
        let me = K::current_thread().raw();
        let mut current = core.state.load(Ordering::Relaxed);
        // Claim: QUEUED -> RUNNING. Acquire: reads what the dispatch side stored before it
        // set QUEUED or DIRTY.
        let mut claimed = loop {
            let next = (current & !(QUEUED | DIRTY)) | RUNNING;
            match core.state.compare_exchange_weak(
                current,
                next,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => break next,
                Err(now) => current = now,
            }
        };
        loop {
            if claimed & CLOSED == 0 {
                core.runner.store(me, Ordering::Relaxed);
                self.call_newest();
            }
            let mut current = core.state.load(Ordering::Relaxed);
            let again = loop {
                let again = current & DIRTY != 0 && current & CLOSED == 0;
                let next = if again {
                    current & !DIRTY
                } else {
                    current & !(RUNNING | DIRTY | WAITERS)
                };
                if !again {
                    // Before RUNNING is cleared: a thread that sees the core idle never
                    // sees itself as its runner.
                    core.runner.store(0, Ordering::Relaxed);
                }
                match core.state.compare_exchange_weak(
                    current,
                    next,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        claimed = next;
                        break again;
                    }
                    Err(now) => current = now,
                }
            };
            if again {
                continue;
            }
            if current & WAITERS != 0 {
                // The lock cannot be refused at `PASSIVE_LEVEL`; were it, the waiters would
                // find the core idle on their next look.
                if let Ok(_lock) = core.lock.lock("teredo-watcher work item") {
                    core.idle.set();
                }
            }
            return;
        }
    }

    /// Calls the closure with the newest port unless it equals the last call's.
    fn call_newest(&self) {
        let core = self.core();
        let raw = core.newest.load(Ordering::Relaxed);
        let changed = core.last.with_mut(|last| {
            // SAFETY: this routine moved the state to RUNNING and has not cleared it: it
            // alone touches `last` (type invariant of the core).
            let last = unsafe { &mut *last };
            let changed = *last != raw;
            *last = raw;
            changed
        });
        if !changed {
            return;
        }
        #[allow(clippy::cast_possible_truncation, reason = "`newest` holds a u16")]
        let port = TeredoPort::new(raw as u16);
        core.callback.with_mut(|cb| {
            // SAFETY: as above: RUNNING, and no waiter takes the closure while it is set.
            if let Some(cb) = unsafe { &mut *cb } {
                cb.call(port);
            }
        });
    }
}
