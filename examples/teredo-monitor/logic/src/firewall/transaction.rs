//! [`Transaction`]: one filter-engine transaction that aborts on drop unless committed.

use windows_sys::Win32::Foundation::STATUS_FWP_TXN_IN_PROGRESS;

use super::engine::{FilterEngine, FilterId, FwpError, FwpErrorKind};
use super::filters::{FilterSpec, ProviderSpec, SublayerSpec};
use crate::status::NtStatus;

/// An open read-write transaction on one engine handle (`FwpmTransactionBegin0`).
///
/// Every change made through it becomes visible to the engine's classification at once, at
/// [`commit`](Self::commit), or never: dropping the transaction without committing it
/// aborts it (`FwpmTransactionAbort0`), so an early return on error cannot leave half a
/// change behind. A failed commit is followed by an abort too (the engine may keep the
/// transaction open after a failed commit; an abort of a transaction it already ended
/// returns an error status, which is ignored).
///
/// # IRQL
///
/// `PASSIVE_LEVEL`, as every call it makes.
#[must_use = "dropping a transaction aborts it"]
pub struct Transaction<'e, E: FilterEngine> {
    engine: &'e E,
    handle: &'e E::Handle,
    /// Whether the transaction still needs an abort when dropped.
    open: bool,
}

impl<'e, E: FilterEngine> Transaction<'e, E> {
    /// `FwpmTransactionBegin0(handle, 0)`.
    ///
    /// A session has at most one transaction. If the engine refuses with
    /// `STATUS_FWP_TXN_IN_PROGRESS`, an earlier transaction of this session is still open:
    /// its abort failed (only a success status ends it), and it holds the engine's write lock
    /// and every later begin. It carries no committed change (it was being abandoned), so it
    /// is aborted now and the begin tried once more.
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal; nothing new is open then (if the abort of
    /// the stale transaction fails, the begin's status is returned and that transaction stays
    /// open for the next begin to retry).
    pub fn begin(engine: &'e E, handle: &'e E::Handle) -> Result<Self, FwpError> {
        match engine.transaction_begin(handle) {
            Err(error)
                if error.kind == FwpErrorKind::Status(NtStatus(STATUS_FWP_TXN_IN_PROGRESS)) =>
            {
                log!("  firewall: a transaction is still open: aborting it");
                if let Err(abort) = engine.transaction_abort(handle) {
                    // None was open after all, or the abort failed again: the begin's own
                    // status is the answer (the next begin retries).
                    log!("  firewall: abort: ", abort);
                    return Err(error);
                }
                engine.transaction_begin(handle)?;
            }
            result => result?,
        }
        Ok(Transaction {
            engine,
            handle,
            open: true,
        })
    }

    /// `FwpmProviderAdd0` inside the transaction.
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal.
    pub fn provider_add(&self, provider: &ProviderSpec) -> Result<(), FwpError> {
        self.engine.provider_add(self.handle, provider)
    }

    /// `FwpmSubLayerAdd0` inside the transaction.
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal.
    pub fn sublayer_add(&self, sublayer: &SublayerSpec) -> Result<(), FwpError> {
        self.engine.sublayer_add(self.handle, sublayer)
    }

    /// `FwpmFilterAdd0` inside the transaction: the id the filter will have once committed.
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal.
    pub fn filter_add(&self, filter: &FilterSpec) -> Result<FilterId, FwpError> {
        self.engine.filter_add(self.handle, filter)
    }

    /// `FwpmFilterDeleteById0` inside the transaction.
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal.
    pub fn filter_delete_by_id(&self, id: FilterId) -> Result<(), FwpError> {
        self.engine.filter_delete_by_id(self.handle, id)
    }

    /// `FwpmTransactionCommit0`; on failure the transaction is aborted before this returns.
    ///
    /// # Errors
    ///
    /// The commit's status, or the IRQL refusal; nothing of the transaction is committed
    /// then.
    pub fn commit(mut self) -> Result<(), FwpError> {
        let result = self.engine.transaction_commit(self.handle);
        // A successful commit ends the transaction; a failed one is aborted by `drop`.
        self.open = result.is_err();
        result
    }

    /// `FwpmTransactionAbort0` now, with its status (dropping aborts too, silently).
    ///
    /// # Errors
    ///
    /// The abort's status, or the IRQL refusal.
    pub fn abort(mut self) -> Result<(), FwpError> {
        self.open = false;
        self.engine.transaction_abort(self.handle)
    }
}

impl<E: FilterEngine> Drop for Transaction<'_, E> {
    fn drop(&mut self) {
        if self.open
            && let Err(error) = self.engine.transaction_abort(self.handle)
        {
            log!("  firewall: abort: ", error);
        }
    }
}
