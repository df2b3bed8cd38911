//! The callback registry: many subscribers behind one OS registration.
//!
//! # How invocations are serialized
//!
//! One word, `state`, holds the generation of the last delivery round, the last known port
//! and four flags:
//! - `ACTIVE`: a thread (the *deliverer*) is calling subscribers;
//! - `PENDING`: the port changed while a round was running (an overlapping OS invocation,
//!   which the contract rules out, or a seed): the deliverer runs one more round with the
//!   newest state before it lets go;
//! - `SEEDING`: a `GetTeredoPort` seed is in flight; any notification that *sets* the port
//!   clears it, and the seed only installs its port while the flag is still there;
//! - `WAITERS`: a thread sleeps on the registry's event until the current round ends;
//! - `LOCAL`: the deliverer is not inside an OS invocation (it delivers the seed), so an OS
//!   invocation that arrives meanwhile is coalesced like an overlapping one but is no breach
//!   of the OS contract and is not counted as one.
//!
//! A notification (a *pass*) claims the word with one compare-and-swap that publishes the
//! new port and the next generation and sets `ACTIVE`, calls each live subscriber with no
//! lock held, runs the rounds that `PENDING` asked for, then clears `ACTIVE`. A notification
//! that finds `ACTIVE` set publishes its port at once (so [`current_port`] is never stale),
//! records its event, sets `PENDING` and returns: subscribers are never called twice at once,
//! and the newest port always reaches them, last. The extra round delivers a coalesced
//! event with the newest port (an initial notification stays `Initial`; the seed, or an
//! event that no longer agrees with the newest port, is a `Snapshot`).
//!
//! The spin lock guards membership (free list, deferred reclaims, id tags) and the event's
//! clear/set pairs. Subscribe and unsubscribe take it for a few instructions; no user code,
//! allocation or wait happens under it. A pass takes it only to wake a waiter.
//!
//! Each slot has a state: `FREE`, `INIT` (the subscribing thread owns it and may be calling
//! it with a snapshot), `MISSED` (a pass found it in `INIT`), `FIRST` (subscribed, not called
//! by a round yet), `LIVE`, `REMOVED`.
//! - **Subscribe** publishes the slot in `INIT`, reads `state` (generation `g`, port `p`),
//!   records `start_gen = g`, optionally calls the subscriber with `Snapshot(p)`, then moves
//!   `INIT -> FIRST` with a CAS. A pass that reached the slot meanwhile moved it to `MISSED`
//!   instead, so the CAS fails and the subscriber repeats with the newer state. A round
//!   calls a `FIRST` slot unless its generation is the slot's `start_gen` (the round the
//!   subscriber already saw), moving it `FIRST -> LIVE` with a CAS first; a `LIVE` slot it
//!   calls without looking at generations (so a generation that wraps never silences it,
//!   and the common case costs one compare). A subscriber sees each round after its
//!   subscription exactly once, in order, never an older port after a newer one, and never
//!   two calls at once.
//! - **Unsubscribe** stores `REMOVED` (`SeqCst`), then reads `state` (`SeqCst`). A pass stores
//!   `ACTIVE` (`SeqCst` CAS) before it loads a slot's state (`SeqCst`). In the single total
//!   order of those operations either the pass sees `REMOVED` and skips the slot, or the
//!   unsubscriber sees `ACTIVE` and waits for that round to end. So no call starts after
//!   unsubscribe returns. From inside a callback of the running pass the wait would never
//!   end; there the slot is only marked and reclaimed later (deferred), which is still safe
//!   because that pass checks the state before each call.
//!
//! # Waiting
//!
//! A waiter (unsubscribe, reclaim) sleeps on a notification event, not in a polling loop.
//! Under the books lock it clears the event and sets `WAITERS` with one `fetch_or`; if the
//! round it waits for is still running it sleeps, otherwise it sets the event again before
//! it leaves (so a clear never strands another sleeper). The deliverer clears `WAITERS`
//! with the CAS that clears `ACTIVE` and, if it was set, sets the event under the lock.
//! Every clear is thus followed, under the lock, by a set from the deliverer of a round
//! still running or from the clearer itself: no sleeper is left behind.
//!
//! # IRQL
//!
//! Subscribers run on the thread and at the IRQL of the OS callback (`<= DISPATCH_LEVEL`,
//! not documented further) for notifications, and on the subscribing or creating thread at
//! its IRQL (`< DISPATCH_LEVEL`) for a snapshot or a seed. Write them for `DISPATCH_LEVEL`:
//! no waits, no paged memory.
//!
//! [`current_port`]: crate::TeredoPortWatcher::current_port

use alloc::alloc::Layout;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;

use crate::alloc_util::OverAligned;
use crate::error::Error;
use crate::event::{TeredoEvent, TeredoPort};
use crate::irql::{self, IrqlBound};
use crate::kernel::{Event, Kernel, SpinLock};
use crate::passive::{CoreRef, IoObject};
use crate::sync::UnsafeCell;
use crate::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

const FREE: u8 = 0;
const INIT: u8 = 1;
const MISSED: u8 = 2;
const LIVE: u8 = 3;
const REMOVED: u8 = 4;
const FIRST: u8 = 5;

const PORT_MASK: u64 = 0xFFFF;
const ACTIVE: u64 = 1 << 16;
const PENDING: u64 = 1 << 17;
const SEEDING: u64 = 1 << 18;
const WAITERS: u64 = 1 << 19;
const LOCAL: u64 = 1 << 20;
const FLAGS: u64 = ACTIVE | PENDING | SEEDING | WAITERS | LOCAL;
const GEN_SHIFT: u32 = 21;
const GEN_ONE: u64 = 1 << GEN_SHIFT;
const NONE: u32 = u32::MAX;

#[inline]
const fn port_of(state: u64) -> Option<TeredoPort> {
    TeredoPort::new((state & PORT_MASK) as u16)
}

#[inline]
const fn gen_of(state: u64) -> u64 {
    state >> GEN_SHIFT
}

#[inline]
const fn with_port(state: u64, port: Option<TeredoPort>) -> u64 {
    let raw = match port {
        Some(p) => p.get() as u64,
        None => 0,
    };
    (state & !PORT_MASK) | raw
}

/// The next generation, in the 43 bits it has (wrapping is harmless: rounds are compared
/// only for equality with a subscriber's first one).
#[inline]
const fn next_gen(state: u64) -> u64 {
    state.wrapping_add(GEN_ONE)
}

/// `pending` of a coalesced seed: the extra round delivers a `Snapshot`.
const PENDING_SNAPSHOT: u64 = 1 << 63;

/// `pending` of a coalesced OS invocation: its raw arguments.
#[inline]
const fn pending_notification(port: u16, raw_type: i32) -> u64 {
    ((raw_type.cast_unsigned() as u64) << 16) | port as u64
}

/// The event of an extra round: the last coalesced one, with the newest port.
fn coalesced_event(pending: u64, port: Option<TeredoPort>) -> TeredoEvent {
    if pending & PENDING_SNAPSHOT != 0 {
        return TeredoEvent::Snapshot { port };
    }
    #[allow(
        clippy::cast_possible_truncation,
        reason = "unpacks `pending_notification`"
    )]
    let (raw_port, raw_type) = (pending as u16, ((pending >> 16) as u32).cast_signed());
    // The record may be of a coalesced invocation older than the port (a writer records
    // before its compare-and-swap lands), so the event is made to agree with the port: what
    // a subscriber sees last is always `current_port()`.
    match TeredoEvent::from_raw(raw_port, raw_type, port) {
        TeredoEvent::PortChanged { .. } => TeredoEvent::PortChanged { port },
        TeredoEvent::Added { .. } => TeredoEvent::Added { port },
        TeredoEvent::Deleted { .. } if port.is_some() => TeredoEvent::Snapshot { port },
        other => other,
    }
}

/// Registry identities: every registry gets its own, so a [`SubscriberId`] of one watcher is
/// never taken for one of another (even one allocated later at the same address). Not a
/// loom primitive: it is only ever incremented, and no model depends on its values.
static NEXT_REGISTRY_ID: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);

/// Identifies one subscription of one watcher.
///
/// It names its watcher: given to another watcher's
/// [`unsubscribe`](crate::TeredoPortWatcher::unsubscribe), it is
/// [`UnknownSubscriber`](Error::UnknownSubscriber), and so is an id whose subscription is
/// gone, even once its slot holds a newer subscriber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubscriberId {
    registry: u64,
    index: u32,
    tag: u64,
}

/// A type-erased `FnMut(TeredoEvent) + Send`, owned.
///
/// # Invariants
///
/// `block.value()` points to a live `F`, aligned for `F` (see [`OverAligned`]); `call` and
/// `drop_fn` are the monomorphized functions for that `F`.
struct Subscriber {
    block: core::mem::ManuallyDrop<OverAligned>,
    /// Takes the event by reference: a round passes every subscriber the one copy it holds.
    call: unsafe fn(NonNull<u8>, &TeredoEvent),
    drop_fn: unsafe fn(NonNull<u8>),
}

// SAFETY: the erased closure is `Send` (required by `Subscriber::new`), and a `Subscriber` is
// only ever used by one thread at a time (the registry's slot protocol).
unsafe impl Send for Subscriber {}

impl Subscriber {
    fn new<F: FnMut(TeredoEvent) + Send + 'static>(f: F) -> Result<Subscriber, Error> {
        unsafe fn call<F: FnMut(TeredoEvent)>(data: NonNull<u8>, event: &TeredoEvent) {
            // SAFETY: the caller passes the value pointer of a `Subscriber` built for this `F`
            // and has exclusive access to it (`Subscriber::call` takes `&mut self`).
            let f = unsafe { data.cast::<F>().as_mut() };
            f(*event);
        }
        unsafe fn drop_fn<F>(data: NonNull<u8>) {
            // SAFETY: called once, from `Subscriber::drop`, with the value pointer of a
            // subscriber built for this `F`; it is live and nothing else refers to it any more.
            unsafe { core::ptr::drop_in_place(data.cast::<F>().as_ptr()) };
        }

        let block = OverAligned::new(Layout::new::<F>())?;
        // SAFETY: `block.value()` is valid for writes of an `F` and aligned for it
        // (`OverAligned::new` with `Layout::new::<F>()`).
        unsafe { block.value().cast::<F>().as_ptr().write(f) };
        // INVARIANT: the block holds the `F` just written; `call`/`drop_fn` are for `F`.
        Ok(Subscriber {
            block: core::mem::ManuallyDrop::new(block),
            call: call::<F>,
            drop_fn: drop_fn::<F>,
        })
    }

    #[inline]
    fn call(&mut self, event: &TeredoEvent) {
        // SAFETY: by the type invariant the block holds a live `F` matching `call`;
        // `&mut self` gives exclusive access.
        unsafe { (self.call)(self.block.value(), event) }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        // SAFETY: by the type invariant; this is the only drop of the subscriber.
        unsafe { (self.drop_fn)(self.block.value()) };
        // SAFETY: the value was just dropped and the block is taken once, here.
        let block = unsafe { core::mem::ManuallyDrop::take(&mut self.block) };
        block.free();
    }
}

/// # Invariants
///
/// `callback` is `Some` in states `INIT`, `MISSED`, `FIRST`, `LIVE` and `REMOVED` (until
/// reclaimed), and `None` in `FREE`. Only the subscribing thread touches it in
/// `INIT`/`MISSED`, only a pass touches it in `FIRST`/`LIVE`, and only the reclaiming thread
/// in `REMOVED` once no pass can still be calling it. `start_gen` is read only in `FIRST`.
/// A slot whose `tag` reached `u64::MAX` is retired: it never goes back to the free list, so
/// no tag is ever issued twice.
pub(crate) struct Slot {
    state: AtomicU8,
    tag: AtomicU64,
    next: AtomicU32,
    start_gen: AtomicU64,
    callback: UnsafeCell<Option<Subscriber>>,
}

impl Slot {
    #[cfg(not(teredo_watcher_loom))]
    const fn new() -> Slot {
        Slot {
            state: AtomicU8::new(FREE),
            tag: AtomicU64::new(0),
            next: AtomicU32::new(NONE),
            start_gen: AtomicU64::new(0),
            callback: UnsafeCell::new(None),
        }
    }

    #[cfg(teredo_watcher_loom)]
    fn new() -> Slot {
        Slot {
            state: AtomicU8::new(FREE),
            tag: AtomicU64::new(0),
            next: AtomicU32::new(NONE),
            start_gen: AtomicU64::new(0),
            callback: UnsafeCell::new(None),
        }
    }
}

/// Where a registry keeps its slots, its event and its passive list: on the heap
/// ([`Heap`], the watcher's context) or inline in a `static` ([`Inline`], the static
/// watcher).
pub(crate) trait Store<K: Kernel> {
    /// The passive subscribers' list, one entry per slot.
    type Passive: AsRef<[Option<PassiveEntry<K>>]> + AsMut<[Option<PassiveEntry<K>>]> + Send;
    /// The subscriber slots; their number is the capacity.
    fn slots(&self) -> &[Slot];
    /// The event waiters of a round sleep on. Only used while a round runs (`ACTIVE`), which
    /// an [`Inline`] store's owner makes sure happens only after it initialized the event.
    fn event(&self) -> &Event<K>;
}

/// A registry's storage allocated at creation, sized by `WatcherOptions::max_subscribers`.
pub(crate) struct Heap<K: Kernel> {
    slots: Box<[Slot]>,
    event: Box<Event<K>>,
}

impl<K: Kernel> Store<K> for Heap<K> {
    type Passive = Vec<Option<PassiveEntry<K>>>;
    #[inline]
    fn slots(&self) -> &[Slot] {
        &self.slots
    }
    #[inline]
    fn event(&self) -> &Event<K> {
        &self.event
    }
}

/// A registry's storage for `N` subscribers, built in a `const` (no allocation), for a
/// registry that lives in a `static`.
///
/// # Invariants
///
/// `event` is initialized ([`Event::init_in_place`]) before the registry's state first has
/// `ACTIVE` set: the owner ([`crate::StaticTeredoWatcher::start`]) initializes it before it
/// registers or seeds, the only ways a round starts.
#[cfg(not(teredo_watcher_loom))]
pub(crate) struct Inline<K: Kernel, const N: usize> {
    slots: [Slot; N],
    event: Event<K>,
}

#[cfg(not(teredo_watcher_loom))]
impl<K: Kernel, const N: usize> Store<K> for Inline<K, N> {
    type Passive = [Option<PassiveEntry<K>>; N];
    #[inline]
    fn slots(&self) -> &[Slot] {
        &self.slots
    }
    #[inline]
    fn event(&self) -> &Event<K> {
        &self.event
    }
}

/// A registry identity not given to any registry before.
fn next_registry_id() -> Result<u64, Error> {
    NEXT_REGISTRY_ID
        .fetch_update(
            core::sync::atomic::Ordering::Relaxed,
            core::sync::atomic::Ordering::Relaxed,
            |id| id.checked_add(1),
        )
        .map_err(|_| Error::AllocationFailed { bytes: 0 })
}

/// Where a passive subscriber is in its life (see [`PassiveEntry`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Membership {
    /// `subscribe_passive` is installing its registry subscriber.
    Subscribing,
    /// Subscribed as this id.
    Live(SubscriberId),
    /// Unsubscribed by a thread that could not wait for it: closed, drained later.
    Removed,
}

/// A passive subscriber's core, as the registry keeps it so that unsubscribe, the watcher's
/// release and the table's teardown can all reach it (the list owns one reference).
pub(crate) struct PassiveEntry<K: Kernel> {
    membership: Membership,
    core: CoreRef<K>,
}

/// Membership books, under the spin lock.
struct Books<P> {
    free_head: u32,
    zombie_head: u32,
    /// The passive subscribers, one entry per slot at most (allocated with the slots).
    passive: P,
    /// Set by the teardown (and the registry's drop): no passive subscriber is added.
    passive_closed: bool,
    /// A passive subscriber was ever listed (until `clear_subscribers` empties the list):
    /// while false, unsubscribe skips the scan of `passive`, which is as long as the
    /// capacity.
    passive_used: bool,
}

/// Counters a driver can log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// OS invocations of the callback, the initial notification included.
    pub notifications: u64,
    /// OS invocations that overlapped a running one, which the contract rules out. Their
    /// port was published at once and delivered by the running pass (coalesced to the
    /// newest). Expected to stay zero.
    pub overlapping: u64,
    /// Subscribers currently registered.
    pub subscribers: usize,
    /// Capacity of the subscriber table.
    pub capacity: usize,
}

/// A pass of round `generation` found `slot` in `state`, not LIVE: returns whether it calls
/// the subscriber.
/// - `INIT`: tells the subscribing thread that it missed this pass (`INIT -> MISSED`), unless
///   the subscription completed first (`INIT -> FIRST`), which is then handled as `FIRST`.
/// - `FIRST`: not called in the round its subscriber already saw (`start_gen`); otherwise
///   moved `FIRST -> LIVE` and called, unless an unsubscribe removed it first (the CAS
///   fails).
/// - any other state: not called.
#[cold]
#[inline(never)]
fn first_call_or_missed(slot: &Slot, state: u8, generation: u64) -> bool {
    let state = if state == INIT {
        match slot
            .state
            .compare_exchange(INIT, MISSED, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => return false,
            Err(now) => now,
        }
    } else {
        state
    };
    // `start_gen` was stored before the CAS that made the slot FIRST, which this thread
    // read (SeqCst), so it is the subscriber's.
    state == FIRST
        && slot.start_gen.load(Ordering::Relaxed) != generation
        && slot
            .state
            .compare_exchange(FIRST, LIVE, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
}

/// The registry. Lives in the context handed to the OS; see the module docs.
pub(crate) struct Registry<K: Kernel, St: Store<K> = Heap<K>> {
    state: AtomicU64,
    deliverer: AtomicUsize,
    high_water: AtomicUsize,
    /// OS invocations that claimed a round. Only the thread holding `ACTIVE` after its claim
    /// writes it (a plain load and store: claims are ordered by the claim and release CASes),
    /// so the pass pays no locked instruction for it.
    claimed: AtomicU64,
    /// OS invocations coalesced into a running round (the rare path: a locked add).
    coalesced: AtomicU64,
    overlapping: AtomicU64,
    /// The last coalesced event (see `pending_notification`, `PENDING_SNAPSHOT`), written
    /// before the `PENDING` it comes with.
    pending: AtomicU64,
    /// Subscribers are no longer called: the watcher gave the registry up (any IRQL, no lock).
    silenced: AtomicBool,
    /// Set, under the handle table's lock, by a watcher that could not cancel and gave the
    /// registry up to the table, whose teardown frees it after cancelling.
    orphaned: AtomicBool,
    /// Subscribers registered (written under the books lock; read lock-free by `stats`).
    live: AtomicUsize,
    /// Set at creation (heap) or at each start (inline); read by subscribe and unsubscribe.
    id: AtomicU64,
    store: St,
    books: SpinLock<K, Books<St::Passive>>,
}

impl<K: Kernel> Registry<K> {
    /// A registry with room for `capacity` subscribers (allocated now, fallibly).
    pub(crate) fn new(capacity: usize) -> Result<Self, Error> {
        let capacity = capacity.min(u32::MAX as usize - 1);
        let id = next_registry_id()?;
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
        let mut passive = Vec::new();
        passive
            .try_reserve_exact(capacity)
            .map_err(|_| Error::AllocationFailed {
                bytes: capacity.saturating_mul(core::mem::size_of::<Option<PassiveEntry<K>>>()),
            })?;
        passive.resize_with(capacity, || None);
        Ok(Registry {
            state: AtomicU64::new(0),
            deliverer: AtomicUsize::new(0),
            high_water: AtomicUsize::new(0),
            claimed: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            overlapping: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            silenced: AtomicBool::new(false),
            orphaned: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            id: AtomicU64::new(id),
            store: Heap {
                slots: slots.into_boxed_slice(),
                event: Event::new_boxed()?,
            },
            books: SpinLock::new(Books {
                free_head: if capacity == 0 { NONE } else { 0 },
                zombie_head: NONE,
                passive,
                passive_closed: false,
                passive_used: false,
            }),
        })
    }
}

#[cfg(not(teredo_watcher_loom))]
impl<K: Kernel, const N: usize> Registry<K, Inline<K, N>> {
    /// A registry for `N` subscribers built in a `const`: no allocation. Its event is not
    /// initialized yet and its id is 0 until [`start`](Self::start).
    pub(crate) const fn new_inline() -> Self {
        assert!(N < NONE as usize, "too many subscriber slots");
        let mut slots = [const { Slot::new() }; N];
        let mut i = 0;
        while i < N {
            #[allow(clippy::cast_possible_truncation, reason = "N < u32::MAX, asserted")]
            let next = if i + 1 < N { (i + 1) as u32 } else { NONE };
            slots[i].next = AtomicU32::new(next);
            i += 1;
        }
        Registry {
            state: AtomicU64::new(0),
            deliverer: AtomicUsize::new(0),
            high_water: AtomicUsize::new(0),
            claimed: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            overlapping: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            silenced: AtomicBool::new(false),
            orphaned: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            id: AtomicU64::new(0),
            store: Inline {
                slots,
                event: Event::unstarted(),
            },
            books: SpinLock::new(Books {
                free_head: if N == 0 { NONE } else { 0 },
                zombie_head: NONE,
                passive: [const { None }; N],
                passive_closed: false,
                passive_used: false,
            }),
        }
    }

    /// Makes the registry ready to deliver: initializes its event the first time, takes a
    /// new id (ids of earlier starts no longer match), and lets its subscribers be called
    /// again.
    ///
    /// # Safety
    ///
    /// The registry does not move any more (it lives in a `static`, or is leaked), and no
    /// other thread calls `start` at the same time. `first` is true for the first call only.
    pub(crate) unsafe fn start(&self, first: bool) -> Result<(), Error> {
        if first {
            // SAFETY: no round ever ran, so nothing waits on the event or sets it (the
            // `Inline` invariant); it does not move (this function's contract), and no other
            // thread initializes it (only the first start does).
            unsafe { self.store.event.init_in_place() };
        }
        self.id.store(next_registry_id()?, Ordering::Relaxed);
        self.silenced.store(false, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(not(teredo_watcher_loom))]
impl<K: Kernel, St: Store<K>> Registry<K, St> {
    /// Unsubscribes every subscriber that is `FIRST` or `LIVE` (a subscribe that has not
    /// finished is left alone), reclaims the deferred ones, and drains and frees every passive
    /// subscriber; then passive subscribers may be added again. For a registry whose OS
    /// registration is cancelled, at `< DISPATCH_LEVEL` (checked by the caller), outside its
    /// callbacks.
    pub(crate) fn clear_subscribers(&self, operation: &'static str) -> Result<(), Error> {
        for index in 0..self.slots().len() {
            let slot = &self.slots()[index];
            {
                let _books = self.books.lock(operation)?;
                if !matches!(slot.state.load(Ordering::SeqCst), FIRST | LIVE) {
                    continue;
                }
                let tag = slot.tag.load(Ordering::Relaxed);
                slot.tag.store(tag.saturating_add(1), Ordering::Relaxed);
                slot.state.store(REMOVED, Ordering::SeqCst);
                self.live.fetch_sub(1, Ordering::Relaxed);
            }
            self.wait_for_round()?;
            #[allow(clippy::cast_possible_truncation, reason = "slots < u32::MAX")]
            self.reclaim(index as u32)?;
        }
        self.reclaim_deferred()?;
        while let Some(core) = self.close_passive(operation)? {
            core.wait_idle(operation)?;
            core.drop_callback_if_idle();
        }
        loop {
            let entry = {
                let mut books = self.books.lock(operation)?;
                let entry = books.passive.as_mut().iter_mut().find_map(Option::take);
                if entry.is_none() {
                    books.passive_closed = false;
                    books.passive_used = false;
                }
                entry
            };
            // Dropped outside the lock: the last reference frees the core.
            match entry {
                Some(entry) => drop(entry),
                None => return Ok(()),
            }
        }
    }
}

impl<K: Kernel, St: Store<K>> Registry<K, St> {
    #[inline]
    fn slots(&self) -> &[Slot] {
        self.store.slots()
    }

    #[inline]
    fn round_ended(&self) -> &Event<K> {
        self.store.event()
    }

    /// Stops calling subscribers, at once and at any IRQL: no call starts after this. Passive
    /// subscribers are closed too (no call of theirs starts any more), except above
    /// `DISPATCH_LEVEL`, where the books lock cannot be taken: there they are closed by the
    /// teardown or the registry's drop.
    pub(crate) fn silence(&self) {
        self.silenced.store(true, Ordering::SeqCst);
        // Checked first: above DISPATCH_LEVEL the lock would report an IRQL violation.
        if K::current_irql() > crate::Irql::DISPATCH_LEVEL {
            return;
        }
        if let Ok(books) = self.books.lock("TeredoPortWatcher::unregister") {
            for entry in books.passive.as_ref().iter().flatten() {
                entry.core.close();
            }
        }
    }

    /// Marks the registry as given up by its watcher (see the `orphaned` field). The caller
    /// holds the handle table's lock.
    pub(crate) fn orphan(&self) {
        self.orphaned.store(true, Ordering::SeqCst);
    }

    /// Whether the watcher gave the registry up.
    pub(crate) fn is_orphaned(&self) -> bool {
        self.orphaned.load(Ordering::SeqCst)
    }

    /// The last known port: one atomic load, any IRQL.
    #[inline]
    pub(crate) fn current_port(&self) -> Option<TeredoPort> {
        port_of(self.state.load(Ordering::Acquire))
    }

    /// Starts a seed: from now on, a notification that sets the port makes
    /// [`finish_seed`](Self::finish_seed) a no-op.
    pub(crate) fn begin_seed(&self) {
        self.state.fetch_or(SEEDING, Ordering::SeqCst);
    }

    /// Ends a seed with the port `GetTeredoPort` returned (`None` for a failure or port 0):
    /// installs it unless a notification set the port since [`begin_seed`](Self::begin_seed),
    /// and delivers it to the subscribers as a [`TeredoEvent::Snapshot`] if it changed the
    /// port. Runs on the creating thread (`PASSIVE_LEVEL`).
    pub(crate) fn finish_seed(&self, port: Option<TeredoPort>) {
        let mut current = self.state.load(Ordering::SeqCst);
        loop {
            if current & SEEDING == 0 {
                // A notification that set the port came after the seed began: it is newer.
                return;
            }
            let cleared = current & !SEEDING;
            let (next, deliver_now) = if port_of(current) == port || port.is_none() {
                // Nothing to install: `None` is "no port known", which the state says already
                // unless a notification said otherwise (then it is newer).
                (cleared, false)
            } else if current & ACTIVE != 0 {
                // The running pass delivers it, after its round.
                self.pending.store(PENDING_SNAPSHOT, Ordering::Release);
                (with_port(cleared, port) | PENDING, false)
            } else {
                (next_gen(with_port(cleared, port)) | ACTIVE | LOCAL, true)
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    if deliver_now {
                        self.run_rounds(next, TeredoEvent::Snapshot { port });
                    }
                    return;
                }
                Err(now) => current = now,
            }
        }
    }

    /// Whether the calling thread is inside a pass of this registry (a subscriber callback
    /// for an OS notification, or the seed's delivery).
    pub(crate) fn delivering_on_current_thread(&self) -> bool {
        self.state.load(Ordering::SeqCst) & ACTIVE != 0
            && self.deliverer.load(Ordering::Relaxed) == K::current_thread().raw()
    }

    /// Counters; lock-free, any IRQL.
    pub(crate) fn stats(&self) -> RegistryStats {
        RegistryStats {
            notifications: self
                .claimed
                .load(Ordering::Relaxed)
                .saturating_add(self.coalesced.load(Ordering::Relaxed)),
            overlapping: self.overlapping.load(Ordering::Relaxed),
            subscribers: self.live.load(Ordering::Relaxed),
            capacity: self.slots().len(),
        }
    }

    /// One OS notification: the pass. Runs on the OS thread; no allocation, no wait, and no
    /// lock unless a waiter is to be woken.
    pub(crate) fn deliver(&self, port: u16, raw_type: i32) {
        let mut current = self.state.load(Ordering::Relaxed);
        let (claimed, event) = loop {
            let event = TeredoEvent::from_raw(port, raw_type, port_of(current));
            let mut next = with_port(current, event.port());
            if event.sets_port() {
                next &= !SEEDING;
            }
            let overlapping = current & ACTIVE != 0;
            next = if overlapping {
                // Another round runs: the seed's, or another invocation of this registration
                // (which the OS contract rules out). Publish the port now and let the running
                // pass deliver this event after its round, so subscribers are never called
                // twice at once and never miss the newest port.
                self.pending
                    .store(pending_notification(port, raw_type), Ordering::Release);
                next | PENDING
            } else {
                (next_gen(next) | ACTIVE) & !LOCAL
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) if overlapping => {
                    self.coalesced.fetch_add(1, Ordering::Relaxed);
                    if current & LOCAL == 0 {
                        self.overlapping.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                Ok(_) => {
                    // This thread holds ACTIVE: no other thread writes `claimed` until it
                    // is released (see the field).
                    let claimed = self.claimed.load(Ordering::Relaxed);
                    self.claimed
                        .store(claimed.saturating_add(1), Ordering::Relaxed);
                    break (next, event);
                }
                Err(now) => current = now,
            }
        };
        self.run_rounds(claimed, event);
    }

    /// Runs the round of `claimed` (a state this thread installed with `ACTIVE` set) with
    /// `event`, then one round per `PENDING` with the newest state, then ends the pass.
    fn run_rounds(&self, claimed: u64, event: TeredoEvent) {
        let me = K::current_thread().raw();
        let (mut generation, mut event) = (gen_of(claimed), event);
        loop {
            self.deliverer.store(me, Ordering::Relaxed);
            self.round(generation, event);
            let mut current = self.state.load(Ordering::SeqCst);
            loop {
                let next = if current & PENDING != 0 {
                    next_gen(current & !PENDING)
                } else {
                    current & !(ACTIVE | WAITERS | LOCAL)
                };
                if next & ACTIVE == 0 {
                    // Cleared before the pass ends, so no thread ever sees `ACTIVE` with a
                    // stale deliverer of its own.
                    self.deliverer.store(0, Ordering::Relaxed);
                }
                match self.state.compare_exchange_weak(
                    current,
                    next,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) {
                    Ok(_) if next & ACTIVE != 0 => {
                        generation = gen_of(next);
                        // The CAS read the `PENDING` of the last coalesced event, whose
                        // record was stored before it.
                        event =
                            coalesced_event(self.pending.load(Ordering::Acquire), port_of(next));
                        break;
                    }
                    Ok(_) => {
                        if current & WAITERS != 0 {
                            self.wake_waiters();
                        }
                        return;
                    }
                    Err(now) => {
                        if now & ACTIVE != 0 {
                            self.deliverer.store(me, Ordering::Relaxed);
                        }
                        current = now;
                    }
                }
            }
        }
    }

    /// One round: calls every live subscriber, in slot order, with `event`.
    fn round(&self, generation: u64, event: TeredoEvent) {
        // Dekker point: the CAS that set `ACTIVE`, then the loads of `high_water` and slot
        // states.
        crate::sync::seq_cst_point();
        let high_water = self.high_water.load(Ordering::SeqCst);
        // Clamped to the table, so the slicing cannot panic on the OS's thread, and the loop
        // has a single bound.
        let in_use = &self.slots()[..high_water.min(self.slots().len())];
        for slot in in_use {
            let state = slot.state.load(Ordering::SeqCst);
            // The common case, LIVE, is one compare; the others are in a cold function.
            if state != LIVE && !first_call_or_missed(slot, state, generation) {
                continue;
            }
            if self.silenced.load(Ordering::SeqCst) {
                return;
            }
            slot.callback.with_mut(|cb| {
                // SAFETY: the slot was LIVE (or made LIVE by this pass), so by the `Slot`
                // invariant only this pass touches the callback; rounds do not overlap (the
                // ACTIVE bit), and an unsubscriber waits for this round to end before
                // reclaiming it.
                if let Some(cb) = unsafe { &mut *cb } {
                    cb.call(&event);
                }
            });
        }
    }

    /// Wakes the threads waiting for a round to end (the deliverer, after clearing `ACTIVE`
    /// and `WAITERS`). Takes the books lock, at the pass's IRQL (`<= DISPATCH_LEVEL`).
    #[cold]
    fn wake_waiters(&self) {
        if let Ok(_books) = self.books.lock("TeredoPortWatcher notification") {
            self.round_ended().set();
        }
    }

    /// Waits, at `< DISPATCH_LEVEL` (checked by the caller), until the round running now, if
    /// any, has ended.
    fn wait_for_round(&self) -> Result<(), Error> {
        // Dekker point: the caller's store of REMOVED, then `state`.
        crate::sync::seq_cst_point();
        let seen = self.state.load(Ordering::SeqCst);
        if seen & ACTIVE == 0 {
            return Ok(());
        }
        let ended = |state: u64| state & ACTIVE == 0 || gen_of(state) != gen_of(seen);
        loop {
            {
                let _books = self.books.lock("TeredoPortWatcher::unsubscribe")?;
                self.round_ended().clear();
                let before = self.state.fetch_or(WAITERS, Ordering::SeqCst);
                if ended(before) {
                    // The round ended before this thread could sleep: undo the clear, which
                    // another sleeper may rely on (see the module docs).
                    self.round_ended().set();
                    return Ok(());
                }
            }
            self.round_ended().wait();
            if ended(self.state.load(Ordering::SeqCst)) {
                return Ok(());
            }
        }
    }

    /// Adds a subscriber; with `snapshot`, calls it first with the current state.
    ///
    /// IRQL: `< DISPATCH_LEVEL` (checked by the caller).
    pub(crate) fn subscribe<F>(&self, f: F, snapshot: bool) -> Result<SubscriberId, Error>
    where
        F: FnMut(TeredoEvent) + Send + 'static,
    {
        self.reclaim_deferred()?;
        let subscriber = Subscriber::new(f)?;
        let (index, tag) = {
            let mut books = self.books.lock("TeredoPortWatcher::subscribe")?;
            let index = books.free_head;
            if index == NONE {
                drop(books);
                drop(subscriber);
                return Err(Error::SubscriberTableFull {
                    capacity: self.slots().len(),
                });
            }
            let slot = &self.slots()[index as usize];
            books.free_head = slot.next.load(Ordering::Relaxed);
            self.live.fetch_add(1, Ordering::Relaxed);
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

        let slot = &self.slots()[index as usize];
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
            if snapshot && shown != Some(state & !FLAGS) {
                shown = Some(state & !FLAGS);
                let event = TeredoEvent::Snapshot {
                    port: port_of(state),
                };
                slot.callback.with_mut(|cb| {
                    // SAFETY: the slot is INIT or MISSED: only this thread touches it.
                    if let Some(cb) = unsafe { &mut *cb } {
                        cb.call(&event);
                    }
                });
            }
            match slot
                .state
                .compare_exchange(INIT, FIRST, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(_missed) => slot.state.store(INIT, Ordering::SeqCst),
            }
        }
        Ok(SubscriberId {
            registry: self.id.load(Ordering::Relaxed),
            index,
            tag,
        })
    }

    /// Removes a subscriber. When this returns `Ok`, it is not running and never runs again.
    ///
    /// IRQL: `< DISPATCH_LEVEL`, or any `<= DISPATCH_LEVEL` from inside a subscriber callback
    /// of this registry's notification (then the reclaim is deferred).
    pub(crate) fn unsubscribe(&self, id: SubscriberId) -> Result<(), Error> {
        let inside = self.delivering_on_current_thread();
        let bound = if inside {
            IrqlBound::AtMostDispatch
        } else {
            IrqlBound::BelowDispatch
        };
        irql::check::<K>("TeredoPortWatcher::unsubscribe", bound)?;
        self.unsubscribe_slot(id, inside)?;
        // The registry subscriber is gone; a passive subscriber's work item is stopped next.
        self.detach_passive(id, inside)
    }

    fn unsubscribe_slot(&self, id: SubscriberId, inside: bool) -> Result<(), Error> {
        if id.registry != self.id.load(Ordering::Relaxed) {
            return Err(Error::UnknownSubscriber);
        }
        let slot = self
            .slots()
            .get(id.index as usize)
            .ok_or(Error::UnknownSubscriber)?;
        {
            let mut books = self.books.lock("TeredoPortWatcher::unsubscribe")?;
            if slot.tag.load(Ordering::Relaxed) != id.tag
                || !matches!(slot.state.load(Ordering::SeqCst), FIRST | LIVE)
            {
                return Err(Error::UnknownSubscriber);
            }
            // A tag that reaches `u64::MAX` retires the slot (see `reclaim`), so tags are
            // never reused.
            slot.tag.store(id.tag.saturating_add(1), Ordering::Relaxed);
            slot.state.store(REMOVED, Ordering::SeqCst);
            self.live.fetch_sub(1, Ordering::Relaxed);
            if inside {
                slot.next.store(books.zombie_head, Ordering::Relaxed);
                books.zombie_head = id.index;
                return Ok(());
            }
        }
        // The subscriber is REMOVED: whatever happens below, no call of it starts any more.
        self.wait_for_round()?;
        self.reclaim(id.index)
    }

    /// Frees the callback of a REMOVED slot no pass can be calling, and frees the slot.
    fn reclaim(&self, index: u32) -> Result<(), Error> {
        let slot = &self.slots()[index as usize];
        let subscriber = slot.callback.with_mut(|cb| {
            // SAFETY: the slot is REMOVED and the round that could have been calling it has
            // ended (the caller waited), so this thread alone touches the callback.
            unsafe { (*cb).take() }
        });
        {
            let mut books = self.books.lock("TeredoPortWatcher::unsubscribe")?;
            slot.state.store(FREE, Ordering::SeqCst);
            if slot.tag.load(Ordering::Relaxed) != u64::MAX {
                slot.next.store(books.free_head, Ordering::Relaxed);
                books.free_head = index;
            }
        }
        // The user's destructor runs here: outside the lock, at the caller's IRQL.
        drop(subscriber);
        Ok(())
    }

    /// Reclaims subscribers removed from inside a callback, once their round is over.
    /// IRQL `< DISPATCH_LEVEL` (checked by the callers).
    pub(crate) fn reclaim_deferred(&self) -> Result<(), Error> {
        if self.delivering_on_current_thread() {
            return Ok(());
        }
        let mut next = {
            let mut books = self.books.lock("TeredoPortWatcher::subscribe")?;
            core::mem::replace(&mut books.zombie_head, NONE)
        };
        if next == NONE {
            return Ok(());
        }
        if let Err(e) = self.wait_for_round() {
            // Put them back for a later attempt.
            if let Ok(mut books) = self.books.lock("TeredoPortWatcher::subscribe") {
                let mut last = next;
                while self.slots()[last as usize].next.load(Ordering::Relaxed) != NONE {
                    last = self.slots()[last as usize].next.load(Ordering::Relaxed);
                }
                self.slots()[last as usize]
                    .next
                    .store(books.zombie_head, Ordering::Relaxed);
                books.zombie_head = next;
            }
            return Err(e);
        }
        while next != NONE {
            let index = next;
            next = self.slots()[index as usize].next.load(Ordering::Relaxed);
            self.reclaim(index)?;
        }
        Ok(())
    }
}

impl<K: Kernel, St: Store<K>> Registry<K, St> {
    /// Adds a `PASSIVE_LEVEL` subscriber (see `crate::passive`): a core, listed in the books,
    /// and a registry subscriber (with a snapshot, so the first call has the port at
    /// subscription) whose dispatch side hands each port to the core.
    ///
    /// IRQL: `< DISPATCH_LEVEL` (checked by the caller).
    pub(crate) fn subscribe_passive<F>(
        &self,
        io_object: IoObject,
        f: F,
    ) -> Result<SubscriberId, Error>
    where
        F: FnMut(Option<TeredoPort>) + Send + 'static,
    {
        const OP: &str = "TeredoPortWatcher::subscribe_passive";
        self.reap_passive(OP)?;
        let core = CoreRef::<K>::new(io_object, f)?;
        let listed = core.clone_ref();
        let dispatch = core.clone_ref();
        let position = {
            let mut books = self.books.lock(OP)?;
            if books.passive_closed {
                Err(Error::HandleTableClosed)
            } else if let Some(i) = books.passive.as_ref().iter().position(Option::is_none) {
                books.passive_used = true;
                books.passive.as_mut()[i] = Some(PassiveEntry {
                    membership: Membership::Subscribing,
                    core: listed,
                });
                Ok(i)
            } else {
                Err(Error::SubscriberTableFull {
                    capacity: self.slots().len(),
                })
            }
        };
        // On error `listed` (not moved into the books) is dropped on return, after the lock.
        let position = position?;
        match self.subscribe(
            move |event: TeredoEvent| dispatch.notify(event.port()),
            true,
        ) {
            Ok(id) => {
                let mut books = self.books.lock(OP)?;
                if let Some(entry) = books.passive.as_mut()[position].as_mut() {
                    entry.membership = Membership::Live(id);
                }
                Ok(id)
            }
            Err(e) => {
                // Never called (every error of `subscribe` comes before the first call), so
                // nothing is queued: closing and dropping the references frees the core.
                core.close();
                let entry = self.books.lock(OP)?.passive.as_mut()[position].take();
                drop(entry);
                Err(e)
            }
        }
    }

    /// Stops the passive subscriber of `id`, if it is one: closes it, then, if this thread
    /// may wait (below `DISPATCH_LEVEL`, not inside a notification callback of this registry
    /// nor inside the subscriber's own call), waits for its queued or running item and drops
    /// it; otherwise leaves it `Removed`, drained later.
    fn detach_passive(&self, id: SubscriberId, inside: bool) -> Result<(), Error> {
        const OP: &str = "TeredoPortWatcher::unsubscribe";
        // Read before the lock, which raises to DISPATCH_LEVEL.
        let may_wait = !inside && K::current_irql() < crate::Irql::DISPATCH_LEVEL;
        let waiter = {
            let mut books = self.books.lock(OP)?;
            if !books.passive_used {
                return Ok(());
            }
            let Some(entry) = books
                .passive
                .as_mut()
                .iter_mut()
                .flatten()
                .find(|e| e.membership == Membership::Live(id))
            else {
                return Ok(());
            };
            entry.core.close();
            entry.membership = Membership::Removed;
            if !may_wait || entry.core.runs_on_current_thread() {
                return Ok(());
            }
            entry.core.clone_ref()
        };
        waiter.wait_idle(OP)?;
        waiter.drop_callback_if_idle();
        let entry = {
            let mut books = self.books.lock(OP)?;
            books
                .passive
                .as_mut()
                .iter_mut()
                .find(|e| e.as_ref().is_some_and(|e| e.core.same(&waiter)))
                .and_then(Option::take)
        };
        // References are dropped outside the lock: the last one frees the core.
        drop(entry);
        drop(waiter);
        Ok(())
    }

    /// Frees the `Removed` passive subscribers that are idle now, without waiting.
    fn reap_passive(&self, operation: &'static str) -> Result<(), Error> {
        loop {
            let entry = {
                let mut books = self.books.lock(operation)?;
                books
                    .passive
                    .as_mut()
                    .iter_mut()
                    .find(|e| {
                        e.as_ref().is_some_and(|e| {
                            e.membership == Membership::Removed && !e.core.is_busy()
                        })
                    })
                    .and_then(Option::take)
            };
            let Some(entry) = entry else {
                return Ok(());
            };
            entry.core.drop_callback_if_idle();
            drop(entry);
        }
    }

    /// For the teardown, once this registry's registration is cancelled: closes every
    /// passive subscriber and refuses new ones; returns one still to drain (queued, running
    /// or with its closure not yet dropped), skipping one whose call runs on this thread.
    /// The caller waits for it ([`CoreRef::wait_idle`]), drops its closure, and asks again
    /// until this returns `None`: closed cores never become busy again, so that ends.
    pub(crate) fn close_passive(
        &self,
        operation: &'static str,
    ) -> Result<Option<CoreRef<K>>, Error> {
        let mut books = self.books.lock(operation)?;
        books.passive_closed = true;
        let mut found = None;
        for entry in books.passive.as_ref().iter().flatten() {
            entry.core.close();
            if found.is_none() && entry.core.needs_drain() && !entry.core.runs_on_current_thread() {
                found = Some(entry.core.clone_ref());
            }
        }
        Ok(found)
    }
}

impl<K: Kernel, St: Store<K>> Drop for Registry<K, St> {
    /// Closes every passive subscriber and waits for its item (a call in flight finishes, a
    /// queued one runs as a no-op), unless this thread is inside that subscriber's call.
    /// Every caller drops a registry below `DISPATCH_LEVEL` (the watcher's release, a failed
    /// creation, the teardown's free of an orphan); the registry subscribers, which hold
    /// references to the cores, are dropped after this with the slots.
    fn drop(&mut self) {
        const OP: &str = "TeredoPortWatcher::drop";
        if K::current_irql() > crate::Irql::DISPATCH_LEVEL {
            // Not reached (see above); the cores' references are dropped with the fields.
            return;
        }
        loop {
            let entry = match self.books.lock(OP) {
                Ok(mut books) => {
                    books.passive_closed = true;
                    books.passive.as_mut().iter_mut().find_map(Option::take)
                }
                Err(_) => None,
            };
            let Some(entry) = entry else {
                return;
            };
            entry.core.close();
            if K::current_irql() < crate::Irql::DISPATCH_LEVEL
                && !entry.core.runs_on_current_thread()
                && entry.core.wait_idle(OP).is_ok()
            {
                entry.core.drop_callback_if_idle();
            }
            drop(entry);
        }
    }
}

// SAFETY: all shared state is atomics or behind the spin lock, except the slot callbacks,
// whose access is exclusive by the slot protocol (module docs); the callbacks are `Send`.
unsafe impl<K: Kernel, St: Store<K>> Sync for Registry<K, St> {}
// SAFETY: as above; moving the registry moves `Send` callbacks.
unsafe impl<K: Kernel, St: Store<K>> Send for Registry<K, St> {}

/// The `PTEREDO_PORT_CHANGE_CALLBACK` handed to the OS: decodes the raw arguments and runs a
/// pass. No panic, allocation or wait of its own (subscribers are the caller's code).
///
/// # Safety
///
/// `context` is a `Registry<K, St>` that stays valid for the duration of the call.
pub(crate) unsafe extern "system" fn trampoline<K: Kernel, St: Store<K>>(
    context: *mut core::ffi::c_void,
    port: u16,
    notification_type: i32,
) {
    // SAFETY: the context is the registry the watcher registered and keeps alive until the
    // cancel of this registration succeeds (this function's contract).
    let registry = unsafe { &*context.cast::<Registry<K, St>>() };
    registry.deliver(port, notification_type);
}

#[cfg(all(test, feature = "mock", not(teredo_watcher_loom)))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};

    use super::{GEN_SHIFT, Ordering, Registry};
    use crate::Error;
    use crate::mock::MockKernel;
    use crate::sys::MIB_PARAMETER_NOTIFICATION;

    fn counter(calls: &Arc<AtomicUsize>) -> impl FnMut(crate::TeredoEvent) + Send + 'static {
        let calls = Arc::clone(calls);
        move |_| {
            calls.fetch_add(1, StdOrdering::SeqCst);
        }
    }

    #[test]
    fn a_generation_that_wraps_never_silences_a_subscriber() {
        let registry = Registry::<MockKernel>::new(2).expect("registry");
        // The last generations before the 44-bit counter wraps to zero.
        let near_wrap = (u64::MAX >> GEN_SHIFT) - 1;
        registry
            .state
            .store(near_wrap << GEN_SHIFT, Ordering::SeqCst);
        let calls = Arc::new(AtomicUsize::new(0));
        registry
            .subscribe(counter(&calls), false)
            .expect("subscribe");
        for port in 50_000..50_006 {
            registry.deliver(port, MIB_PARAMETER_NOTIFICATION);
        }
        assert!(
            super::gen_of(registry.state.load(Ordering::SeqCst)) < near_wrap,
            "the generation wrapped"
        );
        assert_eq!(
            calls.load(StdOrdering::SeqCst),
            6,
            "every round after the wrap"
        );
        // A subscriber that joins after the wrap, at a generation equal to an older one.
        let late = Arc::new(AtomicUsize::new(0));
        registry
            .subscribe(counter(&late), false)
            .expect("subscribe");
        registry.deliver(50_010, MIB_PARAMETER_NOTIFICATION);
        assert_eq!(late.load(StdOrdering::SeqCst), 1);
        assert_eq!(calls.load(StdOrdering::SeqCst), 7);
    }

    #[test]
    fn a_slot_whose_tag_would_wrap_is_retired_not_reused() {
        let registry = Registry::<MockKernel>::new(1).expect("registry");
        registry.slots()[0]
            .tag
            .store(u64::MAX - 1, Ordering::SeqCst);
        let calls = Arc::new(AtomicUsize::new(0));
        let id = registry
            .subscribe(counter(&calls), false)
            .expect("subscribe");
        registry.unsubscribe(id).expect("unsubscribe");
        // The slot's tag reached u64::MAX: it never comes back, so no id repeats.
        assert_eq!(
            registry.subscribe(counter(&calls), false),
            Err(Error::SubscriberTableFull { capacity: 1 })
        );
        assert_eq!(registry.unsubscribe(id), Err(Error::UnknownSubscriber));
    }
}
