//! [`Transaction`]: one filter-engine transaction that aborts on drop unless committed.

use super::engine::{FilterEngine, FilterId, FwpError};
use super::filters::{FilterSpec, ProviderSpec, SublayerSpec};

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
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal; nothing is open then.
    pub fn begin(engine: &'e E, handle: &'e E::Handle) -> Result<Self, FwpError> {
        engine.transaction_begin(handle)?;
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
