//! The filter engine's management calls as a trait ([`FilterEngine`]), so the same driver
//! logic runs over `fwpkclnt.sys` (the kernel engine, `wfp.rs`) and over the host mock
//! (`mock.rs`, feature `host-mock`).

use teredo_watcher::Irql;

use super::filters::{FilterSpec, ProviderSpec, SessionSpec, SublayerSpec};
use crate::log::{Line, LogText};
use crate::status::NtStatus;

/// One management call of the filter engine, named as `fwpmk.h` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FwpCall {
    /// `FwpmEngineOpen0`.
    EngineOpen,
    /// `FwpmEngineClose0`.
    EngineClose,
    /// `FwpmTransactionBegin0`.
    TransactionBegin,
    /// `FwpmTransactionCommit0`.
    TransactionCommit,
    /// `FwpmTransactionAbort0`.
    TransactionAbort,
    /// `FwpmProviderAdd0`.
    ProviderAdd,
    /// `FwpmSubLayerAdd0`.
    SubLayerAdd,
    /// `FwpmFilterAdd0`.
    FilterAdd,
    /// `FwpmFilterDeleteById0`.
    FilterDeleteById,
}

impl FwpCall {
    /// Every call, in the order of the enum.
    pub const ALL: [FwpCall; 9] = [
        FwpCall::EngineOpen,
        FwpCall::EngineClose,
        FwpCall::TransactionBegin,
        FwpCall::TransactionCommit,
        FwpCall::TransactionAbort,
        FwpCall::ProviderAdd,
        FwpCall::SubLayerAdd,
        FwpCall::FilterAdd,
        FwpCall::FilterDeleteById,
    ];

    /// The routine's name in `fwpmk.h`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            FwpCall::EngineOpen => "FwpmEngineOpen0",
            FwpCall::EngineClose => "FwpmEngineClose0",
            FwpCall::TransactionBegin => "FwpmTransactionBegin0",
            FwpCall::TransactionCommit => "FwpmTransactionCommit0",
            FwpCall::TransactionAbort => "FwpmTransactionAbort0",
            FwpCall::ProviderAdd => "FwpmProviderAdd0",
            FwpCall::SubLayerAdd => "FwpmSubLayerAdd0",
            FwpCall::FilterAdd => "FwpmFilterAdd0",
            FwpCall::FilterDeleteById => "FwpmFilterDeleteById0",
        }
    }
}

impl LogText for FwpCall {
    fn write_to(&self, line: &mut Line) {
        line.push_str(self.name());
    }
}

/// Why a management call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwpErrorKind {
    /// The engine returned this `NTSTATUS` (kernel mode returns `STATUS_FWP_*`, the
    /// `NTSTATUS` forms of the Win32 docs' `FWP_E_*` codes, or another `NTSTATUS`).
    Status(NtStatus),
    /// Not called: the caller ran above `PASSIVE_LEVEL`, the level every management call
    /// requires.
    IrqlTooHigh(Irql),
}

/// A failed management call: which call, and why. The raw status is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwpError {
    /// The call that failed.
    pub call: FwpCall,
    /// Why.
    pub kind: FwpErrorKind,
}

impl FwpError {
    /// A call that returned `status` (negative: an error).
    #[must_use]
    pub const fn status(call: FwpCall, status: i32) -> FwpError {
        FwpError {
            call,
            kind: FwpErrorKind::Status(NtStatus(status)),
        }
    }

    /// The `NTSTATUS` a `DriverEntry` returns for it: the engine's own status, or
    /// `STATUS_INVALID_DEVICE_STATE` for a call refused at the wrong IRQL (as the library's
    /// IRQL errors map, `crate::status`).
    #[must_use]
    pub const fn nt_status(&self) -> NtStatus {
        match self.kind {
            FwpErrorKind::Status(status) => status,
            FwpErrorKind::IrqlTooHigh(_) => NtStatus::INVALID_DEVICE_STATE,
        }
    }
}

/// `FwpmFilterAdd0 failed: 0xc0220009`, or `FwpmFilterAdd0 not called at DISPATCH_LEVEL; it
/// requires PASSIVE_LEVEL`.
impl LogText for FwpError {
    fn write_to(&self, line: &mut Line) {
        line.push_str(self.call.name());
        match self.kind {
            FwpErrorKind::Status(status) => {
                line.push_str(" failed: ");
                status.write_to(line);
            }
            FwpErrorKind::IrqlTooHigh(irql) => {
                line.push_str(" not called at ");
                irql.write_to(line);
                line.push_str("; it requires PASSIVE_LEVEL");
            }
        }
    }
}

/// The run-time identifier of a filter, as `FwpmFilterAdd0` returns it and
/// `FwpmFilterDeleteById0` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FilterId(pub u64);

impl LogText for FilterId {
    fn write_to(&self, line: &mut Line) {
        line.push_decimal(self.0);
    }
}

/// The management calls of the filter engine that the driver makes (`fwpmk.h`).
///
/// A [`Handle`](Self::Handle) comes only from [`engine_open`](Self::engine_open) and is
/// consumed by [`engine_close`](Self::engine_close), so safe code cannot use a closed or
/// invented engine handle. The calls inside a transaction are made through
/// [`Transaction`](super::Transaction), which aborts on drop unless committed.
///
/// # IRQL
///
/// Every call requires `PASSIVE_LEVEL`. An implementation checks it and returns
/// [`FwpErrorKind::IrqlTooHigh`] without calling the engine above it.
pub trait FilterEngine: Send + 'static {
    /// An open engine handle (one session).
    type Handle: Send;

    /// `FwpmEngineOpen0` with `session` (the driver asks for a dynamic one: everything it
    /// adds is deleted when the handle is closed, or when the driver dies).
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal.
    fn engine_open(&self, session: &SessionSpec) -> Result<Self::Handle, FwpError>;

    /// `FwpmEngineClose0`. The handle is gone whatever the outcome.
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal (then the handle stays open in the engine:
    /// a leak, reported).
    fn engine_close(&self, engine: Self::Handle) -> Result<(), FwpError>;

    /// `FwpmTransactionBegin0(engine, 0)`: a read-write transaction.
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal.
    fn transaction_begin(&self, engine: &Self::Handle) -> Result<(), FwpError>;

    /// `FwpmTransactionCommit0`.
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal.
    fn transaction_commit(&self, engine: &Self::Handle) -> Result<(), FwpError>;

    /// `FwpmTransactionAbort0`.
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal.
    fn transaction_abort(&self, engine: &Self::Handle) -> Result<(), FwpError>;

    /// `FwpmProviderAdd0(engine, provider, NULL)`.
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal.
    fn provider_add(&self, engine: &Self::Handle, provider: &ProviderSpec) -> Result<(), FwpError>;

    /// `FwpmSubLayerAdd0(engine, sublayer, NULL)`.
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal.
    fn sublayer_add(&self, engine: &Self::Handle, sublayer: &SublayerSpec) -> Result<(), FwpError>;

    /// `FwpmFilterAdd0(engine, filter, NULL, &id)`: the new filter's run-time id.
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal.
    fn filter_add(&self, engine: &Self::Handle, filter: &FilterSpec) -> Result<FilterId, FwpError>;

    /// `FwpmFilterDeleteById0`.
    ///
    /// # Errors
    ///
    /// The engine's status, or the IRQL refusal.
    fn filter_delete_by_id(&self, engine: &Self::Handle, id: FilterId) -> Result<(), FwpError>;
}

/// No filter engine: a driver built without the firewall passes `None::<Firewall<NoFilterEngine>>`.
/// The type has no value, so none of its calls can ever run.
#[derive(Debug)]
pub enum NoFilterEngine {}

impl FilterEngine for NoFilterEngine {
    type Handle = NoFilterEngine;

    fn engine_open(&self, _: &SessionSpec) -> Result<NoFilterEngine, FwpError> {
        match *self {}
    }
    fn engine_close(&self, _: NoFilterEngine) -> Result<(), FwpError> {
        match *self {}
    }
    fn transaction_begin(&self, _: &NoFilterEngine) -> Result<(), FwpError> {
        match *self {}
    }
    fn transaction_commit(&self, _: &NoFilterEngine) -> Result<(), FwpError> {
        match *self {}
    }
    fn transaction_abort(&self, _: &NoFilterEngine) -> Result<(), FwpError> {
        match *self {}
    }
    fn provider_add(&self, _: &NoFilterEngine, _: &ProviderSpec) -> Result<(), FwpError> {
        match *self {}
    }
    fn sublayer_add(&self, _: &NoFilterEngine, _: &SublayerSpec) -> Result<(), FwpError> {
        match *self {}
    }
    fn filter_add(&self, _: &NoFilterEngine, _: &FilterSpec) -> Result<FilterId, FwpError> {
        match *self {}
    }
    fn filter_delete_by_id(&self, _: &NoFilterEngine, _: FilterId) -> Result<(), FwpError> {
        match *self {}
    }
}
