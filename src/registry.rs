//! The callback registry: many subscribers behind one OS registration.
//!
//! # How invocations are serialized
//!
//! One word, `state`, holds the generation of the last notification, a *delivery active*
//! bit and the last known port. A notification (a *pass*) claims the word with one
//! compare-and-swap that publishes the new port and generation and sets the active bit,
//! calls each live subscriber with no lock held, then clears the bit. The OS serializes
//! invocations of one registration's callback, so passes never overlap; the bit turns a
//! broken contract into a dropped notification (counted) instead of overlapping calls.
//!
//! The spin lock guards membership (free list, deferred reclaims, id tags). Subscribe and
//! unsubscribe take it for a few instructions; no user code, allocation or wait happens under
//! it. A pass does not take it at all, so fan-out costs one CAS plus one load and one
//! indirect call per subscriber.
//!
//! Each slot has a state: `FREE`, `INIT` (the subscribing thread owns it and may be calling
//! it with a snapshot), `MISSED` (a pass found it in `INIT`), `LIVE`, `REMOVED`.
//! - **Subscribe** publishes the slot in `INIT`, reads `state` (generation `g`, port `p`),
//!   records `start_gen = g`, optionally calls the subscriber with `Snapshot(p)`, then moves
//!   `INIT -> LIVE` with a CAS. A pass that reached the slot meanwhile moved it to `MISSED`
//!   instead, so the CAS fails and the subscriber repeats with the newer state. Passes only
//!   call `LIVE` slots with `start_gen < generation`: a subscriber sees each notification
//!   after its subscription exactly once, in OS order, never an older port after a newer one,
//!   and never two calls at once.
//! - **Unsubscribe** stores `REMOVED` (`SeqCst`), then reads `state` (`SeqCst`). A pass stores
//!   the active bit (`SeqCst` CAS) before it loads a slot's state (`SeqCst`). In the single total
//!   order of those operations either the pass sees `REMOVED` and skips the slot, or the
//!   unsubscriber sees the active bit and waits for that pass to end. So no call starts after
//!   unsubscribe returns. From inside a callback of the running pass the wait would never
//!   end; there the slot is only marked and reclaimed later (deferred), which is still safe
//!   because that pass checks the state before each call.
//!
//! # IRQL
//!
//! Subscribers run on the thread and at the IRQL of the OS callback (`<= DISPATCH_LEVEL`,
//! not documented further) for notifications, and on the subscribing thread at its IRQL
//! (`< DISPATCH_LEVEL`) for the snapshot. Write them for `DISPATCH_LEVEL`: no waits, no
//! paged memory.

use alloc::alloc::{Layout, alloc, dealloc};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;

use crate::error::Error;
use crate::event::{TeredoEvent, TeredoPort};
use crate::irql::{self, IrqlBound};
use crate::kernel::{Kernel, SpinLock};
use crate::sync::UnsafeCell;
use crate::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

const FREE: u8 = 0;
const INIT: u8 = 1;
const MISSED: u8 = 2;
const LIVE: u8 = 3;
const REMOVED: u8 = 4;

const PORT_MASK: u64 = 0xFFFF;
const ACTIVE: u64 = 1 << 16;
const GEN_SHIFT: u32 = 17;
const NONE: u32 = u32::MAX;

#[inline]
const fn port_of(state: u64) -> u16 {
    (state & PORT_MASK) as u16
}

#[inline]
const fn gen_of(state: u64) -> u64 {
    state >> GEN_SHIFT
}

#[inline]
const fn pack(generation: u64, active: bool, port: Option<TeredoPort>) -> u64 {
    let port = match port {
        Some(p) => p.get() as u64,
        None => 0,
    };
    (generation << GEN_SHIFT) | if active { ACTIVE } else { 0 } | port
}

/// Identifies one subscription of one watcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubscriberId {
    index: u32,
    tag: u32,
}

/// A type-erased `FnMut(TeredoEvent) + Send`, owned.
///
/// # Invariants
///
/// `data` points to a live `F` (or is dangling and `F` is zero-sized) allocated with
/// `Layout::new::<F>()`; `call` and `drop_fn` are the monomorphized functions for that `F`.
struct Subscriber {
    data: NonNull<()>,
    call: unsafe fn(NonNull<()>, TeredoEvent),
    drop_fn: unsafe fn(NonNull<()>),
}

// SAFETY: the erased closure is `Send` (required by `Subscriber::new`), and a `Subscriber` is
// only ever used by one thread at a time (the registry's slot protocol).
unsafe impl Send for Subscriber {}

impl Subscriber {
    fn new<F: FnMut(TeredoEvent) + Send + 'static>(f: F) -> Result<Subscriber, Error> {
        unsafe fn call<F: FnMut(TeredoEvent)>(data: NonNull<()>, event: TeredoEvent) {
            // SAFETY: the caller passes the `data` of a `Subscriber` built for this `F` and
            // has exclusive access to it (`Subscriber::call` takes `&mut self`).
            let f = unsafe { data.cast::<F>().as_mut() };
            f(event);
        }
        unsafe fn drop_fn<F>(data: NonNull<()>) {
            let layout = Layout::new::<F>();
            // SAFETY: called once, from `Subscriber::drop`, with the `data` of a subscriber
            // built for this `F`; it is live and nothing else refers to it any more.
            unsafe { core::ptr::drop_in_place(data.cast::<F>().as_ptr()) };
            if layout.size() != 0 {
                // SAFETY: allocated in `Subscriber::new` with this very layout.
                unsafe { dealloc(data.as_ptr().cast(), layout) };
            }
        }

        let layout = Layout::new::<F>();
        let data = if layout.size() == 0 {
            NonNull::<F>::dangling()
        } else {
            // SAFETY: the layout has a non-zero size.
            let raw = unsafe { alloc(layout) }.cast::<F>();
            NonNull::new(raw).ok_or(Error::AllocationFailed {
                bytes: layout.size(),
            })?
        };
        // SAFETY: `data` is valid for writes of an `F` and suitably aligned (fresh allocation
        // of `Layout::new::<F>()`, or dangling-but-aligned for a zero-sized `F`).
        unsafe { data.as_ptr().write(f) };
        // INVARIANT: `data` holds the `F` just written; `call`/`drop_fn` are for `F`.
        Ok(Subscriber {
            data: data.cast(),
            call: call::<F>,
            drop_fn: drop_fn::<F>,
        })
    }

    #[inline]
    fn call(&mut self, event: TeredoEvent) {
        // SAFETY: by the type invariant `data` is a live `F` matching `call`; `&mut self`
        // gives exclusive access.
        unsafe { (self.call)(self.data, event) }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        // SAFETY: by the type invariant; this is the only drop of the subscriber.
        unsafe { (self.drop_fn)(self.data) }
    }
}

/// # Invariants
///
/// `callback` is `Some` in states `INIT`, `MISSED`, `LIVE` and `REMOVED` (until reclaimed),
/// and `None` in `FREE`. Only the subscribing thread touches it in `INIT`/`MISSED`, only a
/// pass touches it in `LIVE`, and only the reclaiming thread in `REMOVED` once no pass can
/// still be calling it.
struct Slot {
    state: AtomicU8,
    tag: AtomicU32,
    next: AtomicU32,
    start_gen: AtomicU64,
    callback: UnsafeCell<Option<Subscriber>>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            state: AtomicU8::new(FREE),
            tag: AtomicU32::new(0),
            next: AtomicU32::new(NONE),
            start_gen: AtomicU64::new(0),
            callback: UnsafeCell::new(None),
        }
    }
}

/// Membership books, under the spin lock.
struct Books {
    free_head: u32,
    zombie_head: u32,
    live: usize,
}

/// Counters a driver can log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Notifications delivered (passes run), the initial one included.
    pub notifications: u64,
    /// Notifications dropped because the OS overlapped two invocations of one
    /// registration's callback, which its contract rules out. Expected to stay zero.
    pub overlapping: u64,
    /// Subscribers currently registered.
    pub subscribers: usize,
    /// Capacity of the subscriber table.
    pub capacity: usize,
}

/// A pass found `slot` in `state`, not LIVE: if the subscribing thread owns it (INIT), tells
/// it that it missed this pass (INIT -> MISSED). Returns whether the slot is LIVE after all
/// (its subscriber moved it INIT -> LIVE first), so the pass calls it like any LIVE slot.
#[cold]
#[inline(never)]
fn missed_or_now_live(slot: &Slot, state: u8) -> bool {
    state == INIT
        && slot
            .state
            .compare_exchange(INIT, MISSED, Ordering::SeqCst, Ordering::SeqCst)
            == Err(LIVE)
}

/// The registry. Lives in the context handed to the OS; see the module docs.
pub(crate) struct Registry<K: Kernel> {
    state: AtomicU64,
    deliverer: AtomicUsize,
    high_water: AtomicUsize,
    overlapping: AtomicU64,
    /// Set by a watcher that failed to cancel and gave the registry up to the handle table,
    /// whose teardown frees it after cancelling (an atomic: any IRQL, no lock).
    orphaned: AtomicBool,
    slots: Box<[Slot]>,
    books: SpinLock<K, Books>,
}

impl<K: Kernel> Registry<K> {
    /// A registry with room for `capacity` subscribers (allocated now, fallibly).
    pub(crate) fn new(capacity: usize) -> Result<Self, Error> {
        let capacity = capacity.min(u32::MAX as usize - 1);
        let mut slots = Vec::new();
        slots
            .try_reserve_exact(capacity)
            .map_err(|_| Error::AllocationFailed {
                bytes: capacity.saturating_mul(core::mem::size_of::<Slot>()),
            })?;
        for i in 0..capacity {
            let slot = Slot::new();
            #[allow(clippy::cast_possible_truncation, reason = "capacity < u32::MAX")]
            let next = if i + 1 < capacity {
                (i + 1) as u32
            } else {
                NONE
            };
            slot.next.store(next, Ordering::Relaxed);
            slots.push(slot);
        }
        Ok(Registry {
            state: AtomicU64::new(0),
            deliverer: AtomicUsize::new(0),
            high_water: AtomicUsize::new(0),
            overlapping: AtomicU64::new(0),
            orphaned: AtomicBool::new(false),
            slots: slots.into_boxed_slice(),
            books: SpinLock::new(Books {
                free_head: if capacity == 0 { NONE } else { 0 },
                zombie_head: NONE,
                live: 0,
            }),
        })
    }

    /// Marks the registry as given up by its watcher (see the `orphaned` field).
    pub(crate) fn orphan(&self) {
        self.orphaned.store(true, Ordering::SeqCst);
    }

    /// Whether the watcher gave the registry up.
    pub(crate) fn is_orphaned(&self) -> bool {
        self.orphaned.load(Ordering::SeqCst)
    }

    /// The last known port: one atomic load, any IRQL `<= DISPATCH_LEVEL`.
    #[inline]
    pub(crate) fn current_port(&self) -> Option<TeredoPort> {
        TeredoPort::new(port_of(self.state.load(Ordering::Acquire)))
    }

    /// The generation of the last notification and the delivery-active bit (for seeding).
    pub(crate) fn snapshot_state(&self) -> u64 {
        self.state.load(Ordering::SeqCst)
    }

    /// Records `port` as the last known port if no notification arrived since `before`
    /// (a value from [`snapshot_state`](Self::snapshot_state)). Delivers nothing.
    pub(crate) fn seed(&self, before: u64, port: Option<TeredoPort>) -> bool {
        if before & ACTIVE != 0 {
            return false;
        }
        self.state
            .compare_exchange(
                before,
                pack(gen_of(before), false, port),
                Ordering::SeqCst,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// Whether the calling thread is inside a pass of this registry (a subscriber callback
    /// for an OS notification).
    pub(crate) fn delivering_on_current_thread(&self) -> bool {
        self.state.load(Ordering::SeqCst) & ACTIVE != 0
            && self.deliverer.load(Ordering::Relaxed) == K::current_thread().raw()
    }

    pub(crate) fn stats(&self) -> RegistryStats {
        let subscribers = self.books.lock().live;
        RegistryStats {
            // One generation per pass: the generation counts the notifications.
            notifications: gen_of(self.state.load(Ordering::Acquire)),
            overlapping: self.overlapping.load(Ordering::Relaxed),
            subscribers,
            capacity: self.slots.len(),
        }
    }

    /// One OS notification: the pass. Runs on the OS thread; no lock, no allocation, no wait.
    pub(crate) fn deliver(&self, event: TeredoEvent) {
        let mut current = self.state.load(Ordering::Relaxed);
        let (generation, port) = loop {
            if current & ACTIVE != 0 {
                // Two invocations of one registration overlap: the OS contract says this
                // cannot happen. Drop this one rather than call subscribers concurrently.
                self.overlapping.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let generation = gen_of(current) + 1;
            let port = event.apply(TeredoPort::new(port_of(current)));
            match self.state.compare_exchange_weak(
                current,
                pack(generation, true, port),
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => break (generation, port),
                Err(now) => current = now,
            }
        };
        self.deliverer
            .store(K::current_thread().raw(), Ordering::Relaxed);

        // Dekker point: the CAS above, then the loads of `high_water` and slot states.
        crate::sync::seq_cst_point();
        let high_water = self.high_water.load(Ordering::SeqCst);
        // Clamped to the table, so the slicing cannot panic on the OS's thread, and the loop
        // has a single bound (performance: `iter().take(n)` tested two per slot).
        let in_use = &self.slots[..high_water.min(self.slots.len())];
        for slot in in_use {
            let state = slot.state.load(Ordering::SeqCst);
            // Performance: the common case, LIVE, is tested first and INIT is handled in a
            // cold function, with the same meaning as before (one compare per LIVE slot).
            if state != LIVE && !missed_or_now_live(slot, state) {
                continue;
            }
            if slot.start_gen.load(Ordering::Relaxed) < generation {
                slot.callback.with_mut(|cb| {
                    // SAFETY: the slot is LIVE, so by the `Slot` invariant only this pass
                    // touches the callback; passes do not overlap (the ACTIVE bit), and an
                    // unsubscriber waits for this pass to end before reclaiming it.
                    if let Some(cb) = unsafe { &mut *cb } {
                        cb.call(event);
                    }
                });
            }
        }

        self.deliverer.store(0, Ordering::Relaxed);
        // Only this pass writes `state` while ACTIVE is set (seeding refuses then), so a plain
        // release store ends it.
        self.state
            .store(pack(generation, false, port), Ordering::Release);
    }

    /// Adds a subscriber; with `snapshot`, calls it first with the current state.
    ///
    /// IRQL: `< DISPATCH_LEVEL` (checked by the caller).
    pub(crate) fn subscribe<F>(&self, f: F, snapshot: bool) -> Result<SubscriberId, Error>
    where
        F: FnMut(TeredoEvent) + Send + 'static,
    {
        self.reclaim_deferred();
        let subscriber = Subscriber::new(f)?;
        let (index, tag) = {
            let mut books = self.books.lock();
            let index = books.free_head;
            if index == NONE {
                drop(books);
                drop(subscriber);
                return Err(Error::SubscriberTableFull {
                    capacity: self.slots.len(),
                });
            }
            let slot = &self.slots[index as usize];
            books.free_head = slot.next.load(Ordering::Relaxed);
            books.live += 1;
            slot.callback.with_mut(|cb| {
                // SAFETY: the slot is FREE (it was on the free list), so no pass and no other
                // thread touches its callback (`Slot` invariant); we hold the books lock.
                unsafe { *cb = Some(subscriber) };
            });
            slot.state.store(INIT, Ordering::SeqCst);
            self.high_water
                .fetch_max(index as usize + 1, Ordering::SeqCst);
            (index, slot.tag.load(Ordering::Relaxed))
        };

        let slot = &self.slots[index as usize];
        // The state (generation and port) the subscriber was last shown in a snapshot.
        let mut shown = None;
        loop {
            // Dekker point: the stores of the slot state (INIT) and `high_water`, then `state`.
            crate::sync::seq_cst_point();
            let state = self.state.load(Ordering::SeqCst);
            slot.start_gen.store(gen_of(state), Ordering::Relaxed);
            // A pass can mark the slot MISSED after the subscriber has already seen that
            // pass's state (read while the pass was active): the retry then finds the same
            // state, which is not shown twice.
            // regression: loom model `notification_races_subscribe_with_snapshot` at
            // LOOM_MAX_PREEMPTIONS=3 (duplicate `Snapshot` of one state).
            if snapshot && shown != Some(state & !ACTIVE) {
                shown = Some(state & !ACTIVE);
                let event = TeredoEvent::Snapshot {
                    port: TeredoPort::new(port_of(state)),
                };
                slot.callback.with_mut(|cb| {
                    // SAFETY: the slot is INIT or MISSED: only this thread touches it.
                    if let Some(cb) = unsafe { &mut *cb } {
                        cb.call(event);
                    }
                });
            }
            match slot
                .state
                .compare_exchange(INIT, LIVE, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(_missed) => slot.state.store(INIT, Ordering::SeqCst),
            }
        }
        Ok(SubscriberId { index, tag })
    }

    /// Removes a subscriber. When this returns `Ok`, it is not running and never runs again.
    ///
    /// IRQL: `< DISPATCH_LEVEL`, or any `<= DISPATCH_LEVEL` from inside a subscriber callback
    /// of this registry's notification (then the reclaim is deferred).
    pub(crate) fn unsubscribe(&self, id: SubscriberId) -> Result<(), Error> {
        let inside = self.delivering_on_current_thread();
        if !inside {
            irql::check::<K>("TeredoPortWatcher::unsubscribe", IrqlBound::BelowDispatch)?;
        }
        let slot = self
            .slots
            .get(id.index as usize)
            .ok_or(Error::UnknownSubscriber)?;
        {
            let mut books = self.books.lock();
            if slot.tag.load(Ordering::Relaxed) != id.tag
                || slot.state.load(Ordering::SeqCst) != LIVE
            {
                return Err(Error::UnknownSubscriber);
            }
            slot.tag.store(id.tag.wrapping_add(1), Ordering::Relaxed);
            slot.state.store(REMOVED, Ordering::SeqCst);
            books.live -= 1;
            if inside {
                slot.next.store(books.zombie_head, Ordering::Relaxed);
                books.zombie_head = id.index;
                return Ok(());
            }
        }
        self.wait_for_pass();
        self.reclaim(id.index);
        Ok(())
    }

    /// Waits until the pass running now, if any, has ended.
    fn wait_for_pass(&self) {
        // Dekker point: the caller's store of REMOVED, then `state`.
        crate::sync::seq_cst_point();
        let seen = self.state.load(Ordering::SeqCst);
        if seen & ACTIVE == 0 {
            return;
        }
        let mut spins = 0u32;
        while self.state.load(Ordering::SeqCst) == seen {
            if spins < 64 {
                crate::sync::spin_hint();
                spins += 1;
            } else {
                K::relax();
            }
        }
    }

    /// Frees the callback of a REMOVED slot no pass can be calling, and frees the slot.
    fn reclaim(&self, index: u32) {
        let slot = &self.slots[index as usize];
        let subscriber = slot.callback.with_mut(|cb| {
            // SAFETY: the slot is REMOVED and the pass that could have been calling it has
            // ended (the caller waited), so this thread alone touches the callback.
            unsafe { (*cb).take() }
        });
        {
            let mut books = self.books.lock();
            slot.state.store(FREE, Ordering::SeqCst);
            slot.next.store(books.free_head, Ordering::Relaxed);
            books.free_head = index;
        }
        // The user's destructor runs here: outside the lock, at the caller's IRQL.
        drop(subscriber);
    }

    /// Reclaims subscribers removed from inside a callback, once their pass is over.
    pub(crate) fn reclaim_deferred(&self) {
        if self.delivering_on_current_thread() {
            return;
        }
        let mut next = {
            let mut books = self.books.lock();
            core::mem::replace(&mut books.zombie_head, NONE)
        };
        if next == NONE {
            return;
        }
        self.wait_for_pass();
        while next != NONE {
            let index = next;
            next = self.slots[index as usize].next.load(Ordering::Relaxed);
            self.reclaim(index);
        }
    }
}

// SAFETY: all shared state is atomics or behind the spin lock, except the slot callbacks,
// whose access is exclusive by the slot protocol (module docs); the callbacks are `Send`.
unsafe impl<K: Kernel> Sync for Registry<K> {}
// SAFETY: as above; moving the registry moves `Send` callbacks.
unsafe impl<K: Kernel> Send for Registry<K> {}

/// The `PTEREDO_PORT_CHANGE_CALLBACK` handed to the OS: decodes the raw arguments and runs a
/// pass. No panic, allocation or wait of its own (subscribers are the caller's code).
///
/// # Safety
///
/// `context` is a `Registry<K>` that stays valid for the duration of the call, and calls
/// with the same `context` do not overlap (the OS serializes them).
pub(crate) unsafe extern "system" fn trampoline<K: Kernel>(
    context: *mut core::ffi::c_void,
    port: u16,
    notification_type: i32,
) {
    // SAFETY: the context is the registry the watcher registered and keeps alive until the
    // cancel of this registration succeeds (this function's contract).
    let registry = unsafe { &*context.cast::<Registry<K>>() };
    registry.deliver(TeredoEvent::from_raw(port, notification_type));
}
