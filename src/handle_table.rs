//! The handle table: every live OS notification handle, and the teardown that cancels them.
//!
//! A driver keeps one table (typically a `static`, since [`HandleTable::new`] is `const`) and
//! creates its watchers from it. At unload, [`HandleTable::teardown`] cancels every
//! registration still live, including those of watchers that were leaked with
//! `mem::forget`, so no callback can run into an unloaded image.
//!
//! # States of an entry
//!
//! `Free -> Reserved` (before `NotifyTeredoPortChange`) `-> Live(handle)` (after it) `->
//! Cancelling` (whoever takes the handle under the lock cancels it: no double cancel) `->`
//! `Free` (the watcher's own cancel) or `Cancelled` (the teardown's, until the watcher is
//! dropped). A failed cancel puts the handle back to `Live`, so it can be retried.
//!
//! A watcher that cannot cancel (the cancel failed, it was dropped inside its own callback or
//! above `PASSIVE_LEVEL`) gives its context (registry) up to the table by marking it
//! *orphaned*; the teardown frees an orphaned context once its cancel has succeeded, so
//! nothing is left allocated at unload.

//! # Waiting
//!
//! Threads that must wait for a registration or a cancel in progress on another thread
//! (teardown, a watcher whose entry the teardown is cancelling) sleep on the table's
//! notification event. A waiter clears it under the lock after finding the entry still in
//! progress; whoever moves an entry out of `Reserved` or `Cancelling` sets it under the lock.
//! So a set always follows the last clear of a waiter still waiting. The event lives in a
//! pool block allocated with the entries' buffer (its address never changes while a waiter
//! may use it, even if the table itself is moved when empty) and is freed with it.
//!
//! A thread never waits for an entry whose callback it is running: that wait could only end
//! after the callback returns (the registration finishes, or the cancel completes, only
//! then). Such an entry is counted as skipped instead.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;

use crate::error::Error;
use crate::event::TeredoPort;
use crate::irql::{self, IrqlBound};
use crate::kernel::{Event, Kernel, SpinLock, SpinLockGuard};
use crate::registry::{Registry, trampoline};
use crate::source::{PortSource, RawHandle};
use crate::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The most registrations one table holds.
pub const MAX_REGISTRATIONS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EntryState {
    Free,
    Reserved,
    Live(RawHandle),
    Cancelling,
    Cancelled,
}

impl EntryState {
    /// Whether the OS holds (or may soon hold, or is being asked to drop) the registration.
    fn in_use(self) -> bool {
        !matches!(self, EntryState::Free | EntryState::Cancelled)
    }

    fn in_progress(self) -> bool {
        matches!(self, EntryState::Reserved | EntryState::Cancelling)
    }
}

/// The registry a registration delivers to.
struct RegistryPtr<K: Kernel>(NonNull<Registry<K>>);

// SAFETY: `Registry<K>` is `Sync`; the pointer is only dereferenced (shared) under the table
// lock while its entry is not `Free`, during which the registry is alive (see `is_orphaned`).
unsafe impl<K: Kernel> Send for RegistryPtr<K> {}

/// # Invariants
///
/// `registry` is `Some` whenever `state` is not `Free`, and points to the registry handed to
/// `register`, which stays alive until the entry is `Free`.
struct Entry<K: Kernel> {
    state: EntryState,
    tag: u64,
    registry: Option<RegistryPtr<K>>,
}

impl<K: Kernel> Entry<K> {
    /// Whether the calling thread is running a callback of this entry's registry. Call under
    /// the table lock.
    fn in_callback_on_current_thread(&self) -> bool {
        self.registry.as_ref().is_some_and(|r| {
            // SAFETY: the registry is alive while the entry is not `Free` (type invariant),
            // and `Free` entries have no registry.
            unsafe { r.0.as_ref() }.delivering_on_current_thread()
        })
    }
}

struct Inner<K: Kernel> {
    entries: Vec<Entry<K>>,
    /// Allocated with the entries' buffer, freed with it (module docs, "Waiting").
    waker: Option<Box<Event<K>>>,
    /// Threads sleeping on `waker`: it is not freed while one is.
    sleepers: usize,
    closed: bool,
}

impl<K: Kernel> Inner<K> {
    /// Wakes every waiter: an entry left `Reserved` or `Cancelling`. Under the lock.
    fn wake(&self) {
        if let Some(waker) = &self.waker {
            waker.set();
        }
    }
}

/// Identifies one entry of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryId {
    index: usize,
    tag: u64,
}

/// What [`HandleTable::teardown`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct TeardownReport {
    /// Registrations cancelled by this teardown.
    pub cancelled: usize,
    /// Registrations netio still holds because their cancel failed (their handles stay in
    /// the table, `Live`, for another teardown).
    pub failed: usize,
    /// Registrations left alone because the teardown ran inside their own callback (a cancel
    /// there would deadlock), or still being set up or cancelled by a thread that waits for
    /// that callback.
    pub skipped_in_callback: usize,
    /// The first failure, with its raw status.
    pub first_error: Option<Error>,
}

impl TeardownReport {
    /// Whether every registration was cancelled: netio holds no callback of this table.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.failed == 0 && self.skipped_in_callback == 0
    }
}

/// The table of live OS notification handles, and the port source they come from.
///
/// # IRQL
///
/// See each method. The table's spin lock is only held for bookkeeping, never across a
/// netio call or a wait.
pub struct HandleTable<S: PortSource> {
    source: S,
    inner: SpinLock<S::Kernel, Inner<S::Kernel>>,
    /// Entries in use (mirrors `inner`, written under the lock): read lock-free.
    in_use: AtomicUsize,
    /// Mirrors `inner.closed`: read lock-free.
    closed: AtomicBool,
}

impl<S: PortSource> HandleTable<S> {
    /// An empty table over `source`. `const`, so a driver can keep it in a `static`.
    #[cfg(not(teredo_watcher_loom))]
    #[must_use]
    pub const fn new(source: S) -> Self {
        HandleTable {
            source,
            inner: SpinLock::new(Inner {
                entries: Vec::new(),
                waker: None,
                sleepers: 0,
                closed: false,
            }),
            in_use: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// An empty table over `source` (loom's primitives cannot be built in a `const`).
    #[cfg(teredo_watcher_loom)]
    #[must_use]
    pub fn new(source: S) -> Self {
        HandleTable {
            source,
            inner: SpinLock::new(Inner {
                entries: Vec::new(),
                waker: None,
                sleepers: 0,
                closed: false,
            }),
            in_use: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// The port source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// `GetTeredoPort`: the port the Teredo client uses now, or `None` if it reported zero.
    ///
    /// # IRQL
    ///
    /// `< DISPATCH_LEVEL`.
    ///
    /// # Errors
    ///
    /// [`Error::TeredoNotStarted`] when the client is not started, [`Error::NoIpv6Stack`]
    /// without IPv6, [`Error::IrqlTooHigh`], or any other netio status.
    pub fn query_port(&self) -> Result<Option<TeredoPort>, Error> {
        irql::check::<S::Kernel>("GetTeredoPort", IrqlBound::BelowDispatch)?;
        Ok(TeredoPort::new(self.source.teredo_port()?))
    }

    /// How many registrations are live or being set up or cancelled. Lock-free.
    ///
    /// # IRQL
    ///
    /// Any.
    pub fn live_registrations(&self) -> usize {
        self.in_use.load(Ordering::SeqCst)
    }

    /// Whether [`teardown`](Self::teardown) has run. Lock-free.
    ///
    /// # IRQL
    ///
    /// Any.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn lock(
        &self,
        operation: &'static str,
    ) -> Result<SpinLockGuard<'_, S::Kernel, Inner<S::Kernel>>, Error> {
        self.inner.lock(operation)
    }

    /// Closes the table to new registrations and cancels every live one with
    /// `CancelMibChangeNotify2`, waiting for registrations and cancels in progress on other
    /// threads to finish, so that when it returns with a clean report no callback of this
    /// table can run. Call it from `DriverUnload`, after dropping the watchers you still hold.
    ///
    /// A registration whose watcher's own cancel failed while the teardown ran is cancelled
    /// by the teardown too (or counted as failed): a clean report means netio holds nothing.
    /// Called from inside a callback of one of its registrations, it cancels the others and
    /// counts that one (and any whose setup or cancel waits for that callback) as skipped;
    /// it never waits for the callback it runs in.
    ///
    /// `PASSIVE_LEVEL` subscribers
    /// ([`subscribe_passive`](crate::TeredoPortWatcher::subscribe_passive)) of every
    /// registration it cancels or finds cancelled are closed, and their work items waited
    /// for: a call in flight finishes, a queued one runs as a no-op, none starts after this
    /// returns, and their closures are dropped here (except one whose call runs this
    /// teardown: it is only closed). Those watchers accept no new passive subscriber
    /// ([`Error::HandleTableClosed`]). A watcher that cancels its own registration
    /// concurrently waits for its passive subscribers in its own drop.
    ///
    /// Watchers still alive afterwards stay valid: their callbacks no longer run,
    /// [`current_port`](crate::TeredoPortWatcher::current_port) keeps the last port, and
    /// dropping them frees their memory without cancelling twice.
    ///
    /// # IRQL
    ///
    /// `PASSIVE_LEVEL`.
    ///
    /// # Errors
    ///
    /// [`Error::IrqlTooHigh`] (nothing done). Cancel failures are in the report.
    ///
    /// # Examples
    ///
    /// A watcher leaked with `mem::forget` (its context leaks), still cancelled at unload:
    ///
    /// ```
    /// # #[cfg(feature = "mock")] {
    /// use teredo_watcher::mock::MockNetio;
    /// use teredo_watcher::{HandleTable, TeredoPortWatcher, WatcherOptions};
    ///
    /// let netio = MockNetio::new();
    /// let table = HandleTable::new(netio.clone());
    /// core::mem::forget(TeredoPortWatcher::new(&table, WatcherOptions::default())?);
    /// let report = table.teardown()?;
    /// assert!(report.is_clean() && report.cancelled == 1);
    /// assert_eq!(netio.live_registrations(), 0);
    /// assert!(table.is_closed());
    /// # }
    /// # Ok::<(), teredo_watcher::Error>(())
    /// ```
    pub fn teardown(&self) -> Result<TeardownReport, Error> {
        const OP: &str = "HandleTable::teardown";
        irql::check::<S::Kernel>(OP, IrqlBound::Passive)?;
        let mut report = TeardownReport::default();
        {
            let mut inner = self.lock(OP)?;
            inner.closed = true;
            self.closed.store(true, Ordering::SeqCst);
        }
        // Each entry is tried at most once per teardown (`MAX_REGISTRATIONS <= 64`).
        let mut attempted = 0u64;
        // Entries counted in `skipped_in_callback` (each at most once).
        let mut skipped = 0u64;
        loop {
            // Registrations and cancels in progress finish before we look.
            self.wait_while_in_progress(OP)?;
            let mut index = 0;
            loop {
                let handle = {
                    let mut inner = self.lock(OP)?;
                    let Some(entry) = inner.entries.get_mut(index) else {
                        break;
                    };
                    index += 1;
                    let bit = 1u64 << (index - 1);
                    if entry.state == EntryState::Cancelled && is_orphaned(entry) {
                        // Cancelled by an earlier pass or teardown, then given up by its watcher.
                        let orphan = self.free_entry(entry);
                        drop(inner);
                        free_orphan(orphan);
                        continue;
                    }
                    let EntryState::Live(handle) = entry.state else {
                        continue;
                    };
                    if attempted & bit != 0 {
                        continue;
                    }
                    attempted |= bit;
                    if entry.in_callback_on_current_thread() {
                        skipped |= bit;
                        report.skipped_in_callback += 1;
                        report.first_error.get_or_insert(Error::CancelFromCallback);
                        continue;
                    }
                    entry.state = EntryState::Cancelling;
                    handle
                };
                // SAFETY: we moved the entry from Live to Cancelling under the lock, so nobody
                // else cancels this handle; it came from `notify` on this source; we are not
                // in its callback (checked above).
                let result = unsafe { self.source.cancel(handle) };
                let mut inner = self.lock(OP)?;
                let entry = &mut inner.entries[index - 1];
                match result {
                    Ok(()) if is_orphaned(entry) => {
                        report.cancelled += 1;
                        let orphan = self.free_entry(entry);
                        inner.wake();
                        drop(inner);
                        free_orphan(orphan);
                    }
                    Ok(()) => {
                        entry.state = EntryState::Cancelled;
                        self.in_use.fetch_sub(1, Ordering::SeqCst);
                        report.cancelled += 1;
                        inner.wake();
                    }
                    Err(e) => {
                        entry.state = EntryState::Live(handle);
                        report.failed += 1;
                        report.first_error.get_or_insert(e);
                        inner.wake();
                    }
                }
            }
            // A watcher may have started its own cancel while this pass ran (the entry was
            // `Cancelling` when the pass looked): wait for it and look again, since a failed
            // cancel puts it back to `Live`, for this teardown to try.
            if !self.more_to_do(OP, attempted)? {
                break;
            }
        }
        self.drain_passive(OP)?;
        // Entries still in progress here wait for a callback this thread runs.
        report.skipped_in_callback += self.in_progress_in_own_callback(OP, skipped)?;
        let unused = take_buffer_if_unused(&mut *self.lock(OP)?);
        drop(unused);
        Ok(report)
    }

    /// Closes the `PASSIVE_LEVEL` subscribers of every cancelled registration (by this
    /// teardown or an earlier one) and waits for their work items: a call in flight finishes,
    /// a queued one runs as a no-op, and the closures are dropped here. A subscriber whose
    /// call is running on this thread (a teardown from inside it) is only closed. Each core
    /// is taken with a reference under the locks, then waited for without them, so a watcher
    /// that frees its registry meanwhile cannot free the core under this thread.
    fn drain_passive(&self, operation: &'static str) -> Result<(), Error> {
        let mut index = 0;
        loop {
            let core = {
                let inner = self.lock(operation)?;
                let Some(entry) = inner.entries.get(index) else {
                    return Ok(());
                };
                let (EntryState::Cancelled, Some(registry)) = (&entry.state, &entry.registry)
                else {
                    index += 1;
                    continue;
                };
                // SAFETY: the entry is not `Free`, so its registry is alive (`Entry`
                // invariant) while the table lock is held.
                let Some(core) = unsafe { registry.0.as_ref() }.close_passive(operation)? else {
                    index += 1;
                    continue;
                };
                core
            };
            core.wait_idle(operation)?;
            core.drop_callback_if_idle();
            drop(core);
        }
    }

    /// Waits (at `PASSIVE_LEVEL`) until no registration or cancel is in progress, except
    /// those that wait for a callback the calling thread is running.
    fn wait_while_in_progress(&self, operation: &'static str) -> Result<(), Error> {
        loop {
            let inner = self.lock(operation)?;
            let waits = inner
                .entries
                .iter()
                .any(|e| e.state.in_progress() && !e.in_callback_on_current_thread());
            if !waits {
                return Ok(());
            }
            drop(self.sleep(inner, operation)?);
        }
    }

    /// Sleeps on the table's event until an entry leaves `Reserved` or `Cancelling`, then
    /// takes the lock again. The caller found an entry in progress under `inner`.
    fn sleep<'a>(
        &'a self,
        mut inner: SpinLockGuard<'a, S::Kernel, Inner<S::Kernel>>,
        operation: &'static str,
    ) -> Result<SpinLockGuard<'a, S::Kernel, Inner<S::Kernel>>, Error> {
        let Some(waker) = inner.waker.as_deref() else {
            // No event means no buffer, hence no entry in progress: nothing to wait for.
            return Ok(inner);
        };
        // Under the lock: whoever moves an entry out of progress sets it after this.
        waker.clear();
        let waker: *const Event<S::Kernel> = waker;
        inner.sleepers += 1;
        drop(inner);
        // SAFETY: the event is freed only by `take_buffer_if_unused`, which leaves it alone
        // while `sleepers > 0`; this thread counted itself under the lock and uncounts itself
        // under the lock below, so the event outlives this wait.
        unsafe { &*waker }.wait();
        let mut inner = self.lock(operation)?;
        inner.sleepers -= 1;
        Ok(inner)
    }

    /// Whether a teardown that tried the entries in `attempted` has more to do: an entry in
    /// progress on another thread to wait for, or a `Live` one it has not tried yet.
    fn more_to_do(&self, operation: &'static str, attempted: u64) -> Result<bool, Error> {
        let inner = self.lock(operation)?;
        Ok(inner.entries.iter().enumerate().any(|(i, e)| {
            (e.state.in_progress() && !e.in_callback_on_current_thread())
                || (matches!(e.state, EntryState::Live(_)) && attempted & (1u64 << i) == 0)
        }))
    }

    /// How many entries outside `counted` are in progress and wait for a callback the
    /// calling thread runs.
    fn in_progress_in_own_callback(
        &self,
        operation: &'static str,
        counted: u64,
    ) -> Result<usize, Error> {
        let inner = self.lock(operation)?;
        Ok(inner
            .entries
            .iter()
            .enumerate()
            .filter(|(i, e)| {
                counted & (1u64 << i) == 0
                    && e.state.in_progress()
                    && e.in_callback_on_current_thread()
            })
            .count())
    }

    /// Frees `entry` (under the table lock); returns its registry if the watcher had given it
    /// up. Wakes no one: the caller does, if the entry was in progress.
    fn free_entry(&self, entry: &mut Entry<S::Kernel>) -> Option<RegistryPtr<S::Kernel>> {
        let orphaned = is_orphaned(entry);
        if entry.state.in_use() {
            self.in_use.fetch_sub(1, Ordering::SeqCst);
        }
        entry.state = EntryState::Free;
        // A tag that reaches `u64::MAX` retires the entry (`reserve` skips it): no `EntryId`
        // is ever issued twice.
        entry.tag = entry.tag.saturating_add(1);
        let registry = entry.registry.take();
        if orphaned { registry } else { None }
    }

    /// Frees the entry at `index`, whose watcher still owns its registry (so there is no
    /// orphan to free), wakes waiters, then releases the lock and frees the table's buffer if
    /// that was its last entry in use.
    fn free_owned(&self, mut inner: SpinLockGuard<'_, S::Kernel, Inner<S::Kernel>>, index: usize) {
        let _owned_by_the_watcher = self.free_entry(&mut inner.entries[index]);
        inner.wake();
        let unused = take_buffer_if_unused(&mut inner);
        drop(inner);
        // The buffer and the event, if unused, are freed here, outside the lock.
        drop(unused);
    }

    /// Registers `registry` with the OS, recording the handle.
    ///
    /// On error, the second value says whether the OS may still use `registry` (a success
    /// status with a NULL handle): then it must be leaked.
    ///
    /// # Safety
    ///
    /// `registry` stays valid until [`release`](Self::release) of the returned entry returns
    /// `Ok` (or forever). The caller is at `< DISPATCH_LEVEL`.
    pub(crate) unsafe fn register(
        &self,
        registry: NonNull<Registry<S::Kernel>>,
        initial_notification: bool,
    ) -> Result<EntryId, (Error, bool)> {
        const OP: &str = "TeredoPortWatcher::new";
        let id = self.reserve(registry).map_err(|e| (e, false))?;
        // SAFETY: `trampoline::<K>` reads `context` as a `Registry<K>`, which the caller keeps
        // valid until a cancel of this registration succeeds (this function's contract).
        let result = unsafe {
            self.source.notify(
                trampoline::<S::Kernel, crate::registry::Heap<S::Kernel>>,
                registry.as_ptr().cast(),
                initial_notification,
            )
        };
        // The caller is below DISPATCH_LEVEL, so the lock cannot be refused; if it were, the
        // entry would stay `Reserved` and the registry be leaked, never freed while in use.
        let mut inner = self.lock(OP).map_err(|e| (e, true))?;
        match result {
            Ok(handle) => {
                inner.entries[id.index].state = EntryState::Live(handle);
                inner.wake();
                Ok(id)
            }
            Err(e) => {
                // A success status with no handle: the OS may have registered the callback,
                // and there is no handle to cancel it with; the caller leaks the registry.
                let maybe_live = e.status().is_some_and(|s| s.0 == 0);
                self.free_owned(inner, id.index);
                Err((e, maybe_live))
            }
        }
    }

    fn reserve(&self, registry: NonNull<Registry<S::Kernel>>) -> Result<EntryId, Error> {
        const OP: &str = "TeredoPortWatcher::new";
        loop {
            let (capacity, has_waker) = {
                let mut inner = self.lock(OP)?;
                if inner.closed {
                    return Err(Error::HandleTableClosed);
                }
                if inner.waker.is_some() {
                    if let Some(index) = inner
                        .entries
                        .iter()
                        .position(|e| e.state == EntryState::Free && e.tag != u64::MAX)
                    {
                        let entry = &mut inner.entries[index];
                        entry.state = EntryState::Reserved;
                        entry.registry = Some(RegistryPtr(registry));
                        let tag = entry.tag;
                        self.in_use.fetch_add(1, Ordering::SeqCst);
                        return Ok(EntryId { index, tag });
                    }
                    if inner.entries.len() < inner.entries.capacity() {
                        inner.entries.push(Entry {
                            state: EntryState::Reserved,
                            tag: 0,
                            registry: Some(RegistryPtr(registry)),
                        });
                        self.in_use.fetch_add(1, Ordering::SeqCst);
                        return Ok(EntryId {
                            index: inner.entries.len() - 1,
                            tag: 0,
                        });
                    }
                }
                (inner.entries.capacity(), inner.waker.is_some())
            };
            if has_waker && capacity >= MAX_REGISTRATIONS {
                return Err(Error::HandleTableFull {
                    capacity: MAX_REGISTRATIONS,
                });
            }
            // Allocate outside the lock (an allocation must not run at DISPATCH_LEVEL under a
            // spin lock), fallibly, then swap in if nobody did it meanwhile.
            let waker = if has_waker {
                None
            } else {
                Some(Event::<S::Kernel>::new_boxed()?)
            };
            let wanted = if has_waker {
                (capacity * 2).clamp(4, MAX_REGISTRATIONS)
            } else {
                capacity.max(4)
            };
            let mut bigger = Vec::new();
            bigger
                .try_reserve_exact(wanted)
                .map_err(|_| Error::AllocationFailed {
                    bytes: wanted * core::mem::size_of::<Entry<S::Kernel>>(),
                })?;
            let mut inner = self.lock(OP)?;
            let mut unused_waker = waker;
            if inner.waker.is_none() {
                inner.waker = unused_waker.take();
            }
            if inner.entries.capacity() == capacity && wanted > capacity {
                // Fits without reallocating: `wanted > capacity >= len`.
                bigger.append(&mut inner.entries);
                core::mem::swap(&mut inner.entries, &mut bigger);
            }
            drop(inner);
            // The old (or unused) buffer and event are freed here, outside the lock.
            drop(bigger);
            drop(unused_waker);
        }
    }

    /// Cancels the registration of `id` unless the teardown already did, waiting for a
    /// teardown cancel in progress. `Ok` means the OS no longer uses the registry.
    ///
    /// On failure the registration stays `Live` and its registry is given up to the table
    /// in the same critical section (silenced and orphaned): the teardown cancels it and
    /// then frees it.
    ///
    /// IRQL: `PASSIVE_LEVEL` (checked by the caller), not inside the registration's callback.
    pub(crate) fn release(&self, id: EntryId) -> Result<(), Error> {
        const OP: &str = "TeredoPortWatcher::unregister";
        loop {
            let handle = {
                let mut inner = self.lock(OP)?;
                let entry = &mut inner.entries[id.index];
                debug_assert_eq!(entry.tag, id.tag);
                match entry.state {
                    EntryState::Live(handle) => {
                        entry.state = EntryState::Cancelling;
                        handle
                    }
                    EntryState::Cancelled => {
                        self.free_owned(inner, id.index);
                        return Ok(());
                    }
                    EntryState::Cancelling => {
                        // The teardown is cancelling it: wait for the outcome.
                        drop(self.sleep(inner, OP)?);
                        continue;
                    }
                    EntryState::Free | EntryState::Reserved => {
                        debug_assert!(false, "release of an entry that is not registered");
                        return Err(Error::HandleTableClosed);
                    }
                }
            };
            // SAFETY: we moved the entry from Live to Cancelling under the lock, so this is
            // the only cancel of the handle; it came from `notify` on this source; the caller
            // checked it is not inside the registration's callback.
            let result = unsafe { self.source.cancel(handle) };
            let mut inner = self.lock(OP)?;
            return match result {
                Ok(()) => {
                    self.free_owned(inner, id.index);
                    Ok(())
                }
                Err(e) => {
                    // Still registered: left to the teardown, which frees the registry after
                    // its cancel succeeds. Given up under the lock, so the teardown sees it.
                    let entry = &mut inner.entries[id.index];
                    entry.state = EntryState::Live(handle);
                    silence_and_orphan(entry);
                    inner.wake();
                    Err(e)
                }
            };
        }
    }

    /// The watcher of `id` cannot cancel (it runs inside its own callback, or above
    /// `PASSIVE_LEVEL`) and gives its registry up, silenced and orphaned under the lock. If
    /// the teardown already cancelled the registration and the caller `may_free` the
    /// registry, the entry is freed and the registry handed back for the caller to free;
    /// otherwise the teardown (this one or the next) frees it after its cancel. Above
    /// `DISPATCH_LEVEL` the lock cannot be taken: nothing is done.
    pub(crate) fn give_up(&self, id: EntryId, may_free: bool) -> GiveUp<S::Kernel> {
        let Ok(mut inner) = self.lock("TeredoPortWatcher::drop") else {
            return GiveUp::LockRefused;
        };
        let entry = &mut inner.entries[id.index];
        silence_and_orphan(entry);
        if may_free && entry.state == EntryState::Cancelled {
            let registry = entry.registry.as_ref().map(|r| r.0);
            // The registry is handed to the caller, not to `free_orphan`.
            let _caller_frees = self.free_entry(&mut inner.entries[id.index]);
            inner.wake();
            let unused = take_buffer_if_unused(&mut inner);
            drop(inner);
            drop(unused);
            if let Some(registry) = registry {
                return GiveUp::Freed(registry);
            }
        }
        GiveUp::GivenUp
    }
}

/// What [`HandleTable::give_up`] did.
pub(crate) enum GiveUp<K: Kernel> {
    /// The teardown had cancelled the registration: the entry is freed, and the caller owns
    /// the registry and frees it.
    Freed(NonNull<Registry<K>>),
    /// The registry is silenced and orphaned: the teardown frees it after its cancel (it may
    /// already be doing so: the caller must not touch the registry any more).
    GivenUp,
    /// Above `DISPATCH_LEVEL`: the lock was refused and nothing was done.
    LockRefused,
}

/// Silences and orphans the registry of `entry`. Under the table lock.
fn silence_and_orphan<K: Kernel>(entry: &Entry<K>) {
    if let Some(r) = &entry.registry {
        // SAFETY: the entry is not `Free`, so its registry is alive (`Entry` invariant).
        let registry = unsafe { r.0.as_ref() };
        registry.silence();
        registry.orphan();
    }
}

/// Whether the watcher of `entry` gave its registry up. Called under the table lock.
fn is_orphaned<K: Kernel>(entry: &Entry<K>) -> bool {
    entry.registry.as_ref().is_some_and(|r| {
        // SAFETY: the registry is alive: its watcher frees it only after moving the entry to
        // `Free` under the table lock (held by the caller), and an orphaned registry is freed
        // only by the teardown, after it has moved the entry to `Free` too.
        unsafe { r.0.as_ref() }.is_orphaned()
    })
}

/// The entries' buffer and the event when every entry is `Free` and no thread sleeps on the
/// event, taken out of the table so that the caller frees them after releasing the lock. No
/// `EntryId` refers to a free entry and no thread waits on the event, so nothing uses them,
/// and a later registration allocates new ones. A `static` table (never dropped) would
/// otherwise keep them in the pool after `DriverUnload` or a failed `DriverEntry`.
fn take_buffer_if_unused<K: Kernel>(
    inner: &mut Inner<K>,
) -> (Vec<Entry<K>>, Option<Box<Event<K>>>) {
    if inner.sleepers == 0 && inner.entries.iter().all(|e| e.state == EntryState::Free) {
        (core::mem::take(&mut inner.entries), inner.waker.take())
    } else {
        (Vec::new(), None)
    }
}

/// Frees the registry of an orphaned entry whose registration is cancelled. Call it without
/// the table lock: the subscribers' destructors run here.
fn free_orphan<K: Kernel>(orphan: Option<RegistryPtr<K>>) {
    if let Some(registry) = orphan {
        // SAFETY: the registry came from `Box::leak` in `TeredoPortWatcher::create` (the only
        // caller of `register`); its watcher gave it up (`Registry::orphan`, under the table
        // lock) and never touches it again; its registration was cancelled successfully, so
        // the OS no longer uses it and no callback runs; `free_entry` took the only pointer
        // left out of the table.
        drop(unsafe { Box::from_raw(registry.0.as_ptr()) });
    }
}

impl<S: PortSource> core::fmt::Debug for HandleTable<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HandleTable")
            .field("live_registrations", &self.live_registrations())
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, feature = "mock", not(teredo_watcher_loom)))]
mod tests {
    use super::HandleTable;
    use crate::mock::MockNetio;
    use crate::{NetioCall, TeredoPortWatcher, WatcherOptions, sys};

    fn buffer_capacity(table: &HandleTable<MockNetio>) -> usize {
        table.inner.lock("test").expect("lock").entries.capacity()
    }

    // A `static` table is never dropped: its buffer must go back to the pool when the last
    // registration goes, or every load of a driver leaks it.
    #[test]
    fn the_buffer_is_freed_when_the_last_registration_goes() {
        let table = HandleTable::new(MockNetio::new());
        let watcher = TeredoPortWatcher::new(&table, WatcherOptions::default()).expect("register");
        assert!(buffer_capacity(&table) > 0);
        watcher.unregister().expect("cancel");
        assert_eq!(buffer_capacity(&table), 0, "released: buffer freed");

        table
            .source()
            .fail_next(NetioCall::NotifyTeredoPortChange, sys::STATUS_NO_MEMORY);
        assert!(TeredoPortWatcher::new(&table, WatcherOptions::default()).is_err());
        assert_eq!(
            buffer_capacity(&table),
            0,
            "failed registration: buffer freed"
        );

        let kept = TeredoPortWatcher::new(&table, WatcherOptions::default()).expect("register");
        let report = table.teardown().expect("teardown");
        assert_eq!(report.cancelled, 1);
        assert!(
            buffer_capacity(&table) > 0,
            "a live watcher still refers to its entry"
        );
        drop(kept);
        assert_eq!(
            buffer_capacity(&table),
            0,
            "last entry freed after teardown"
        );
    }
}
