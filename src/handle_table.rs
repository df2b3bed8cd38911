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

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;

use crate::error::Error;
use crate::event::TeredoPort;
use crate::irql::{self, IrqlBound};
use crate::kernel::{Kernel, SpinLock, SpinLockGuard};
use crate::registry::{Registry, trampoline};
use crate::source::{PortSource, RawHandle};

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

/// The registry a registration delivers to, for the self-cancel check in teardown.
struct RegistryPtr<K: Kernel>(NonNull<Registry<K>>);

// SAFETY: `Registry<K>` is `Sync`; the pointer is only dereferenced (shared) under the table
// lock while its entry is `Live` or `Reserved`, during which the watcher keeps it alive.
unsafe impl<K: Kernel> Send for RegistryPtr<K> {}

struct Entry<K: Kernel> {
    state: EntryState,
    tag: u32,
    registry: Option<RegistryPtr<K>>,
}

struct Inner<K: Kernel> {
    entries: Vec<Entry<K>>,
    closed: bool,
}

/// Identifies one entry of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EntryId {
    index: usize,
    tag: u32,
}

/// What [`HandleTable::teardown`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct TeardownReport {
    /// Registrations cancelled by this teardown.
    pub cancelled: usize,
    /// Cancels that failed (their handles stay in the table, `Live`).
    pub failed: usize,
    /// Registrations skipped because the teardown ran inside their own callback.
    pub skipped_in_callback: usize,
    /// The first failure, with its raw status.
    pub first_error: Option<Error>,
}

impl TeardownReport {
    /// Whether every registration was cancelled.
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
/// netio call.
pub struct HandleTable<S: PortSource> {
    source: S,
    inner: SpinLock<S::Kernel, Inner<S::Kernel>>,
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
                closed: false,
            }),
        }
    }

    /// An empty table over `source`.
    #[cfg(teredo_watcher_loom)]
    #[must_use]
    pub fn new(source: S) -> Self {
        HandleTable {
            source,
            inner: SpinLock::new(Inner {
                entries: Vec::new(),
                closed: false,
            }),
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

    /// How many registrations are live or being set up or cancelled.
    ///
    /// # IRQL
    ///
    /// `<= DISPATCH_LEVEL`.
    pub fn live_registrations(&self) -> usize {
        self.inner
            .lock()
            .entries
            .iter()
            .filter(|e| !matches!(e.state, EntryState::Free | EntryState::Cancelled))
            .count()
    }

    /// Whether [`teardown`](Self::teardown) has run.
    ///
    /// # IRQL
    ///
    /// `<= DISPATCH_LEVEL`.
    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }

    /// Closes the table to new registrations and cancels every live one with
    /// `CancelMibChangeNotify2`, waiting for registrations and cancels in progress on other
    /// threads to finish, so that when it returns no callback of this table can run.
    /// Call it from `DriverUnload`, after dropping the watchers you still hold.
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
    pub fn teardown(&self) -> Result<TeardownReport, Error> {
        irql::check::<S::Kernel>("HandleTable::teardown", IrqlBound::Passive)?;
        let mut report = TeardownReport::default();
        self.inner.lock().closed = true;
        // Registrations in progress finish (their `notify` returns) before we look.
        self.wait_while_in_progress();
        let mut index = 0;
        loop {
            let handle = {
                let mut inner = self.inner.lock();
                let Some(entry) = inner.entries.get_mut(index) else {
                    break;
                };
                index += 1;
                if entry.state == EntryState::Cancelled && is_orphaned(entry) {
                    // Cancelled by an earlier teardown, then given up by its watcher.
                    let orphan = free_entry(entry);
                    drop(inner);
                    free_orphan(orphan);
                    continue;
                }
                let EntryState::Live(handle) = entry.state else {
                    continue;
                };
                let in_callback = entry.registry.as_ref().is_some_and(|r| {
                    // SAFETY: the entry is Live, so its watcher has not freed the registry
                    // (it frees only after moving the entry out of Live under this lock).
                    unsafe { r.0.as_ref() }.delivering_on_current_thread()
                });
                if in_callback {
                    report.skipped_in_callback += 1;
                    report.first_error.get_or_insert(Error::CancelFromCallback);
                    continue;
                }
                entry.state = EntryState::Cancelling;
                handle
            };
            // SAFETY: we moved the entry from Live to Cancelling under the lock, so nobody
            // else cancels this handle; it came from `notify` on this source; we are not in
            // its callback (checked above).
            let result = unsafe { self.source.cancel(handle) };
            let mut inner = self.inner.lock();
            let entry = &mut inner.entries[index - 1];
            match result {
                Ok(()) if is_orphaned(entry) => {
                    report.cancelled += 1;
                    let orphan = free_entry(entry);
                    drop(inner);
                    free_orphan(orphan);
                }
                Ok(()) => {
                    entry.state = EntryState::Cancelled;
                    report.cancelled += 1;
                }
                Err(e) => {
                    entry.state = EntryState::Live(handle);
                    report.failed += 1;
                    report.first_error.get_or_insert(e);
                }
            }
        }
        // A watcher may have started its own cancel meanwhile: when teardown returns, no
        // cancel is in flight, so no callback can still be running.
        self.wait_while_in_progress();
        // The guard is a temporary of this statement: the buffer is freed after it.
        let unused = take_buffer_if_unused(&mut self.inner.lock());
        drop(unused);
        Ok(report)
    }

    /// Waits (at `PASSIVE_LEVEL`) until no registration or cancel is in progress.
    fn wait_while_in_progress(&self) {
        while self
            .inner
            .lock()
            .entries
            .iter()
            .any(|e| matches!(e.state, EntryState::Reserved | EntryState::Cancelling))
        {
            <S::Kernel as Kernel>::relax();
        }
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
        let id = self.reserve(registry).map_err(|e| (e, false))?;
        // SAFETY: `trampoline::<K>` reads `context` as a `Registry<K>`, which the caller keeps
        // valid until a cancel of this registration succeeds (this function's contract).
        let result = unsafe {
            self.source.notify(
                trampoline::<S::Kernel>,
                registry.as_ptr().cast(),
                initial_notification,
            )
        };
        let mut inner = self.inner.lock();
        let entry = &mut inner.entries[id.index];
        match result {
            Ok(handle) => {
                entry.state = EntryState::Live(handle);
                Ok(id)
            }
            Err(e) => {
                free_owned(inner, id.index);
                let maybe_live = e.status().is_some_and(|s| s.0 == 0);
                Err((e, maybe_live))
            }
        }
    }

    fn reserve(&self, registry: NonNull<Registry<S::Kernel>>) -> Result<EntryId, Error> {
        loop {
            let capacity = {
                let mut inner = self.inner.lock();
                if inner.closed {
                    return Err(Error::HandleTableClosed);
                }
                if let Some(index) = inner
                    .entries
                    .iter()
                    .position(|e| e.state == EntryState::Free)
                {
                    let entry = &mut inner.entries[index];
                    entry.state = EntryState::Reserved;
                    entry.registry = Some(RegistryPtr(registry));
                    return Ok(EntryId {
                        index,
                        tag: entry.tag,
                    });
                }
                if inner.entries.len() < inner.entries.capacity() {
                    inner.entries.push(Entry {
                        state: EntryState::Reserved,
                        tag: 0,
                        registry: Some(RegistryPtr(registry)),
                    });
                    return Ok(EntryId {
                        index: inner.entries.len() - 1,
                        tag: 0,
                    });
                }
                inner.entries.capacity()
            };
            if capacity >= MAX_REGISTRATIONS {
                return Err(Error::HandleTableFull {
                    capacity: MAX_REGISTRATIONS,
                });
            }
            // Grow outside the lock (an allocation must not run at DISPATCH_LEVEL under a
            // spin lock), fallibly, then swap the buffers in if nobody grew it meanwhile.
            let wanted = (capacity * 2).clamp(4, MAX_REGISTRATIONS);
            let mut bigger = Vec::new();
            bigger
                .try_reserve_exact(wanted)
                .map_err(|_| Error::AllocationFailed {
                    bytes: wanted * core::mem::size_of::<Entry<S::Kernel>>(),
                })?;
            let mut inner = self.inner.lock();
            if inner.entries.capacity() == capacity {
                // Fits without reallocating: `wanted > capacity >= len`.
                bigger.append(&mut inner.entries);
                core::mem::swap(&mut inner.entries, &mut bigger);
            }
            drop(inner);
            // The old (or unused) buffer is freed here, outside the lock.
            drop(bigger);
        }
    }

    /// Cancels the registration of `id` unless the teardown already did, waiting for a
    /// teardown cancel in progress. `Ok` means the OS no longer uses the registry.
    ///
    /// IRQL: `PASSIVE_LEVEL` (checked by the caller), not inside the registration's callback.
    pub(crate) fn release(&self, id: EntryId) -> Result<(), Error> {
        loop {
            let handle = {
                let mut inner = self.inner.lock();
                let entry = &mut inner.entries[id.index];
                debug_assert_eq!(entry.tag, id.tag);
                match entry.state {
                    EntryState::Live(handle) => {
                        entry.state = EntryState::Cancelling;
                        handle
                    }
                    EntryState::Cancelled => {
                        free_owned(inner, id.index);
                        return Ok(());
                    }
                    EntryState::Cancelling => {
                        drop(inner);
                        <S::Kernel as Kernel>::relax();
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
            let mut inner = self.inner.lock();
            let entry = &mut inner.entries[id.index];
            return match result {
                Ok(()) => {
                    free_owned(inner, id.index);
                    Ok(())
                }
                Err(e) => {
                    // Still registered: leave it for a retry or for the teardown.
                    entry.state = EntryState::Live(handle);
                    Err(e)
                }
            };
        }
    }
}

/// Whether the watcher of `entry` gave its registry up. Called under the table lock, for an
/// entry that is `Cancelled` or `Cancelling` by the caller.
fn is_orphaned<K: Kernel>(entry: &Entry<K>) -> bool {
    entry.registry.as_ref().is_some_and(|r| {
        // SAFETY: the registry is alive: its watcher frees it only after moving the entry to
        // `Free` under the table lock (held by the caller), and an orphaned registry is freed
        // only by the teardown, after it has moved the entry to `Free` too.
        unsafe { r.0.as_ref() }.is_orphaned()
    })
}

/// Frees `entry` (under the table lock); returns its registry if the watcher had given it up.
fn free_entry<K: Kernel>(entry: &mut Entry<K>) -> Option<RegistryPtr<K>> {
    let orphaned = is_orphaned(entry);
    entry.state = EntryState::Free;
    entry.tag = entry.tag.wrapping_add(1);
    let registry = entry.registry.take();
    if orphaned { registry } else { None }
}

/// The entries' buffer when every entry is `Free`, taken out of the table so that the caller
/// frees it after releasing the lock. No `EntryId` refers to a free entry, so nothing indexes
/// the buffer any more, and a later registration allocates a new one. Without this a
/// `static` table (never dropped) keeps its buffer in the pool after `DriverUnload` or a
/// failed `DriverEntry`: a leak at every load, found by running the real `.sys` in the
/// loader harness (`harness/`, pool accounting).
fn take_buffer_if_unused<K: Kernel>(inner: &mut Inner<K>) -> Vec<Entry<K>> {
    if inner.entries.iter().all(|e| e.state == EntryState::Free) {
        core::mem::take(&mut inner.entries)
    } else {
        Vec::new()
    }
}

/// Frees the entry at `index`, whose watcher still owns its registry (so there is no orphan
/// to free), then releases the lock and frees the table's buffer if that was its last entry
/// in use.
fn free_owned<K: Kernel>(mut inner: SpinLockGuard<'_, K, Inner<K>>, index: usize) {
    let _owned_by_the_watcher = free_entry(&mut inner.entries[index]);
    let unused = take_buffer_if_unused(&mut inner);
    drop(inner);
    // The buffer, if any, is freed here, outside the lock.
    drop(unused);
}

/// Frees the registry of an orphaned entry whose registration is cancelled. Call it without
/// the table lock: the subscribers' destructors run here.
fn free_orphan<K: Kernel>(orphan: Option<RegistryPtr<K>>) {
    if let Some(registry) = orphan {
        // SAFETY: the registry came from `Box::leak` in `TeredoPortWatcher::create` (the only
        // caller of `register`); its watcher gave it up (`Registry::orphan`) and never touches
        // it again;
        // its registration was cancelled successfully, so the OS no longer uses it and no
        // callback runs; `free_entry` took the only pointer left out of the table.
        drop(unsafe { Box::from_raw(registry.0.as_ptr()) });
    }
}

impl<S: PortSource> core::fmt::Debug for HandleTable<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HandleTable")
            .field("live_registrations", &self.live_registrations())
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, feature = "mock", not(teredo_watcher_loom)))]
mod tests {
    use super::HandleTable;
    use crate::mock::MockNetio;
    use crate::{NetioCall, TeredoPortWatcher, WatcherOptions, sys};

    fn buffer_capacity(table: &HandleTable<MockNetio>) -> usize {
        table.inner.lock().entries.capacity()
    }

    // A `static` table is never dropped: its buffer must go back to the pool when the last
    // registration goes, or every load of a driver leaks it (found by the loader harness).
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
