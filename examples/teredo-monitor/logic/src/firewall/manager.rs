//! [`FirewallManager`]: the driver's filters in the engine, from install to removal, and the
//! dynamic-port filter kept on the current port.

use teredo_watcher::TeredoPort;

use super::engine::{FilterEngine, FilterId, FwpCall, FwpError};
use super::filters::{
    self, FilterSpec, PROVIDER, SESSION, STATIC_PERMIT_FILTERS, SUBLAYER, demo_block_filters,
    dynamic_port_filters, permit_filters,
};
use super::transaction::Transaction;
use crate::log::Port;
use crate::status::NtStatus;

/// The ids of the static filters: the exception permits and the demo blocks.
const STATIC_FILTERS: usize = STATIC_PERMIT_FILTERS + 3;

/// Filter ids, at most `N`, without allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FilterIds<const N: usize> {
    ids: [FilterId; N],
    len: usize,
}

impl<const N: usize> FilterIds<N> {
    const fn new() -> Self {
        FilterIds {
            ids: [FilterId(0); N],
            len: 0,
        }
    }

    /// Adds `id`; `false` when full (the caller's count is a constant of the design).
    fn push(&mut self, id: FilterId) -> bool {
        match self.ids.get_mut(self.len) {
            Some(slot) => {
                *slot = id;
                self.len += 1;
                true
            }
            None => false,
        }
    }

    fn as_slice(&self) -> &[FilterId] {
        self.ids.get(..self.len).unwrap_or_default()
    }
}

/// The error of a filter the design has no room for (never: the counts are constants).
const fn no_room() -> FwpError {
    FwpError::status(FwpCall::FilterAdd, NtStatus::INSUFFICIENT_RESOURCES.0)
}

/// Adds `filters` in `txn`, recording their ids in `ids`.
fn add_all<'a, E: FilterEngine, const N: usize>(
    txn: &Transaction<'_, E>,
    filters: impl IntoIterator<Item = &'a FilterSpec>,
    ids: &mut FilterIds<N>,
) -> Result<(), FwpError> {
    for filter in filters {
        let id = txn.filter_add(filter)?;
        if !ids.push(id) {
            return Err(no_room());
        }
    }
    Ok(())
}

/// What [`FirewallManager::set_port`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortChange {
    /// The committed dynamic-port filters already match the port.
    Unchanged,
    /// Committed: the filters for `to` were added and those for `from` deleted, in one
    /// transaction.
    Replaced {
        /// The port whose filters were deleted, if any.
        from: Option<TeredoPort>,
        /// The port whose filters were added, if any.
        to: Option<TeredoPort>,
    },
}

/// What removing the filters did ([`FirewallManager::remove`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct RemoveReport {
    /// Filters deleted by the committed removal transaction (0 if it failed).
    pub deleted: usize,
    /// Why the removal transaction failed, if it did: closing the dynamic session then
    /// deletes the filters.
    pub removal: Option<FwpError>,
    /// `FwpmEngineClose0`.
    pub close: Result<(), FwpError>,
}

/// The driver's objects in the filter engine, over one dynamic session.
///
/// - [`install`](Self::install): opens the engine and commits, in one transaction, the
///   provider, the sublayer, the static permit filters, the demo blocks and the dynamic
///   port's filters for the port known then.
/// - [`set_port`](Self::set_port): makes the dynamic-port filters follow the port, adding
///   the new ones before deleting the old ones in one transaction. On failure the old ones
///   stay committed and the port is kept as the intended one: the next call retries it.
/// - [`remove`](Self::remove), or dropping the manager: deletes every filter in one
///   transaction, then closes the engine (which deletes what is left of a dynamic session).
///
/// # IRQL
///
/// `PASSIVE_LEVEL` for everything, dropping included: the driver owns it from `DriverEntry`
/// and then from its `PASSIVE_LEVEL` subscriber's closure (dropped by the library at
/// `< DISPATCH_LEVEL` only; a call at `APC_LEVEL` is refused by the engine's IRQL check and
/// reported).
///
/// # Invariants
///
/// `handle` is `Some` from `install` until `remove`/drop takes it. `dynamic_ids` are the
/// committed filters of `dynamic_port`, `static_ids` the committed static filters.
pub struct FirewallManager<E: FilterEngine> {
    engine: E,
    handle: Option<E::Handle>,
    static_ids: FilterIds<STATIC_FILTERS>,
    dynamic_port: Option<TeredoPort>,
    dynamic_ids: FilterIds<2>,
    intended: Option<TeredoPort>,
    failed_changes: u32,
}

impl<E: FilterEngine> FirewallManager<E> {
    /// Opens the engine with the driver's dynamic session and commits, in one transaction,
    /// the provider, the sublayer, the static permit filters, the demo blocks and the
    /// dynamic port's filters for `port`.
    ///
    /// # Errors
    ///
    /// The first call that failed. The transaction is aborted and the engine closed before
    /// this returns: nothing is left in the engine (a close that fails is logged; the
    /// session's objects were never committed).
    ///
    /// # IRQL
    ///
    /// `PASSIVE_LEVEL`.
    pub fn install(engine: E, port: Option<TeredoPort>) -> Result<Self, FwpError> {
        let handle = engine.engine_open(&SESSION)?;
        match Self::install_filters(&engine, &handle, port) {
            Ok((static_ids, dynamic_ids)) => {
                log!(
                    "  firewall: committed provider, sublayer, ",
                    static_ids.len,
                    " static filters (",
                    STATIC_PERMIT_FILTERS,
                    " exception permits, 3 test-VM blocks) and ",
                    dynamic_ids.len,
                    " for the dynamic port ",
                    Port(port)
                );
                // INVARIANT: the handle is open; the ids are those just committed.
                Ok(FirewallManager {
                    engine,
                    handle: Some(handle),
                    static_ids,
                    dynamic_port: port,
                    dynamic_ids,
                    intended: port,
                    failed_changes: 0,
                })
            }
            Err(error) => {
                if let Err(close) = engine.engine_close(handle) {
                    log!(
                        "  firewall: closing the engine after a failed install: ",
                        close
                    );
                }
                Err(error)
            }
        }
    }

    /// The install transaction; aborted on any error (the transaction's drop).
    fn install_filters(
        engine: &E,
        handle: &E::Handle,
        port: Option<TeredoPort>,
    ) -> Result<(FilterIds<STATIC_FILTERS>, FilterIds<2>), FwpError> {
        let txn = Transaction::begin(engine, handle)?;
        txn.provider_add(&PROVIDER)?;
        txn.sublayer_add(&SUBLAYER)?;
        let mut static_ids = FilterIds::new();
        for rule in filters::static_rules() {
            if let Ok(specs) = permit_filters(&rule) {
                add_all(&txn, specs.iter(), &mut static_ids)?;
            } else {
                // Never for the static set (no UPnP); a rule without a filter is allowed by
                // no permit, so the test-VM policy blocks it: said in the log.
                log!("  firewall: a ", rule.source, " rule has no static filter");
            }
        }
        add_all(&txn, demo_block_filters().iter(), &mut static_ids)?;
        let mut dynamic_ids = FilterIds::new();
        if let Some(port) = port {
            add_all(&txn, dynamic_port_filters(port).iter(), &mut dynamic_ids)?;
        }
        txn.commit()?;
        Ok((static_ids, dynamic_ids))
    }

    /// The port whose dynamic-port filters are committed.
    #[must_use]
    pub fn committed_port(&self) -> Option<TeredoPort> {
        self.dynamic_port
    }

    /// The port the filters should follow: the last one given to
    /// [`set_port`](Self::set_port) (equal to [`committed_port`](Self::committed_port)
    /// unless its change failed).
    #[must_use]
    pub fn intended_port(&self) -> Option<TeredoPort> {
        self.intended
    }

    /// Port changes that failed and were kept for a retry.
    #[must_use]
    pub fn failed_changes(&self) -> u32 {
        self.failed_changes
    }

    /// The committed filters' ids: static first, then the dynamic port's.
    pub fn filter_ids(&self) -> impl Iterator<Item = FilterId> + '_ {
        self.static_ids
            .as_slice()
            .iter()
            .chain(self.dynamic_ids.as_slice())
            .copied()
    }

    /// Makes the dynamic-port filters follow `port`: in one transaction, adds the filters
    /// for `port` (if any), then deletes those of the committed port (if any), then
    /// commits. There is no committed state without the filters of the committed port: the
    /// new ones are committed together with the deletion of the old ones.
    ///
    /// `port` becomes the intended port first, so a failed change is retried by the next
    /// call (with that call's port, the newest).
    ///
    /// # Errors
    ///
    /// The first call that failed; the transaction is aborted, the filters of the committed
    /// port stay.
    ///
    /// # IRQL
    ///
    /// `PASSIVE_LEVEL`.
    pub fn set_port(&mut self, port: Option<TeredoPort>) -> Result<PortChange, FwpError> {
        self.intended = port;
        let result = self.apply();
        match &result {
            Ok(PortChange::Unchanged) => {}
            Ok(PortChange::Replaced { from, to }) => log!(
                "  firewall: dynamic port ",
                Port(*from),
                " -> ",
                Port(*to),
                match (from, to) {
                    (Some(_), Some(_)) => {
                        " committed (the new filters added before the old ones were deleted, \
                         one transaction)"
                    }
                    (None, _) => " committed (its filters added, one transaction)",
                    (_, None) => " committed (the old filters deleted, one transaction)",
                }
            ),
            Err(error) => {
                self.failed_changes = self.failed_changes.saturating_add(1);
                log!(
                    "  firewall: changing the dynamic port ",
                    Port(self.dynamic_port),
                    " -> ",
                    Port(port),
                    " failed (",
                    *error,
                    "); aborted: ",
                    Port(self.dynamic_port),
                    " stays committed, retried on the next port change"
                );
            }
        }
        result
    }

    fn apply(&mut self) -> Result<PortChange, FwpError> {
        let from = self.dynamic_port;
        let to = self.intended;
        if from == to {
            return Ok(PortChange::Unchanged);
        }
        let Some(handle) = self.handle.as_ref() else {
            // Not reachable: the handle is taken only by `remove`, which consumes the
            // manager (type invariant). Kept total rather than panicking.
            return Err(FwpError::status(
                FwpCall::TransactionBegin,
                NtStatus::INVALID_HANDLE.0,
            ));
        };
        let txn = Transaction::begin(&self.engine, handle)?;
        let mut added = FilterIds::new();
        if let Some(port) = to {
            add_all(&txn, dynamic_port_filters(port).iter(), &mut added)?;
        }
        for id in self.dynamic_ids.as_slice() {
            txn.filter_delete_by_id(*id)?;
        }
        txn.commit()?;
        // INVARIANT: committed: the filters of `to` are in, those of `from` are gone.
        self.dynamic_port = to;
        self.dynamic_ids = added;
        Ok(PortChange::Replaced { from, to })
    }

    /// Deletes every filter of the driver in one transaction, then closes the engine (which
    /// deletes whatever a failed deletion left: the session is dynamic).
    ///
    /// # IRQL
    ///
    /// `PASSIVE_LEVEL`.
    pub fn remove(mut self) -> RemoveReport {
        self.remove_now()
    }

    fn remove_now(&mut self) -> RemoveReport {
        let Some(handle) = self.handle.take() else {
            return RemoveReport {
                deleted: 0,
                removal: None,
                close: Ok(()),
            };
        };
        let removal = self.delete_all(&handle);
        let close = self.engine.engine_close(handle);
        let report = RemoveReport {
            deleted: *removal.as_ref().unwrap_or(&0),
            removal: removal.err(),
            close,
        };
        match (report.removal, report.close) {
            (None, Ok(())) => log!(
                "  firewall: ",
                report.deleted,
                " filters deleted (one transaction), engine closed"
            ),
            (Some(error), Ok(())) => log!(
                "  firewall: deleting the filters failed (",
                error,
                "); engine closed: the dynamic session's filters go with it"
            ),
            (_, Err(error)) => log!(
                "  firewall: closing the engine failed (",
                error,
                "); ",
                report.deleted,
                " filters were deleted"
            ),
        }
        report
    }

    fn delete_all(&self, handle: &E::Handle) -> Result<usize, FwpError> {
        let txn = Transaction::begin(&self.engine, handle)?;
        let mut deleted = 0;
        // The dynamic port's first: while the transaction is open nothing is visible, and the
        // order keeps the deletion the reverse of the install.
        for id in self
            .dynamic_ids
            .as_slice()
            .iter()
            .chain(self.static_ids.as_slice())
        {
            txn.filter_delete_by_id(*id)?;
            deleted += 1;
        }
        txn.commit()?;
        Ok(deleted)
    }
}

impl<E: FilterEngine> Drop for FirewallManager<E> {
    fn drop(&mut self) {
        let _ = self.remove_now();
    }
}

impl<E: FilterEngine> core::fmt::Debug for FirewallManager<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FirewallManager")
            .field("open", &self.handle.is_some())
            .field("static_filters", &self.static_ids.len)
            .field("dynamic_port", &self.dynamic_port)
            .field("intended", &self.intended)
            .finish_non_exhaustive()
    }
}
