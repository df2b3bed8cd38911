//! [`WfpEngine`]: the [`FilterEngine`] over `fwpkclnt.sys` (Windows targets).

use core::ptr;

use teredo_watcher::nt::NtKernel;
use teredo_watcher::{Irql, Kernel as _};
use windows_sys::Win32::Foundation::HANDLE;

use super::abi;
use super::engine::{FilterEngine, FilterId, FwpCall, FwpError, FwpErrorKind};
use super::filters::{FilterSpec, ProviderSpec, SessionSpec, SublayerSpec};
use super::fwpkclnt as sys;

/// The kernel's filter engine, through the management functions of `fwpkclnt.sys`.
///
/// # IRQL
///
/// Every call checks `PASSIVE_LEVEL` first (`KeGetCurrentIrql`) and returns
/// [`FwpErrorKind::IrqlTooHigh`] without calling the engine above it.
#[derive(Clone, Copy, Debug, Default)]
pub struct WfpEngine;

/// An engine handle `FwpmEngineOpen0` returned, not yet closed.
///
/// # Invariants
///
/// `0` is a handle `FwpmEngineOpen0` wrote back with a success status; only
/// [`WfpEngine::engine_close`] closes it, consuming this value.
#[derive(Debug)]
pub struct WfpHandle(HANDLE);

// SAFETY: an engine handle may be used from any thread at PASSIVE_LEVEL (the engine
// serializes the calls of one session); this type only passes it to the engine.
unsafe impl Send for WfpHandle {}

/// `Ok` at `PASSIVE_LEVEL`, else the refusal of `call`.
fn passive(call: FwpCall) -> Result<(), FwpError> {
    let irql = NtKernel::current_irql();
    if irql == Irql::PASSIVE_LEVEL {
        Ok(())
    } else {
        Err(FwpError {
            call,
            kind: FwpErrorKind::IrqlTooHigh(irql),
        })
    }
}

/// `Ok` for a success status (`NT_SUCCESS`), else the error of `call`.
fn check(call: FwpCall, status: i32) -> Result<(), FwpError> {
    if status >= 0 {
        Ok(())
    } else {
        Err(FwpError::status(call, status))
    }
}

impl FilterEngine for WfpEngine {
    type Handle = WfpHandle;

    fn engine_open(&self, session: &SessionSpec) -> Result<WfpHandle, FwpError> {
        passive(FwpCall::EngineOpen)?;
        let mut handle: HANDLE = ptr::null_mut();
        let status = abi::with_session0(session, |session| {
            // SAFETY: at PASSIVE_LEVEL (checked above); a NULL server name and identity
            // are what kernel callers pass; `session` and what it points to are valid for
            // the call (`with_session0`), and `handle` is valid for the write back.
            unsafe {
                sys::FwpmEngineOpen0(
                    ptr::null(),
                    sys::RPC_C_AUTHN_WINNT,
                    ptr::null(),
                    session,
                    &raw mut handle,
                )
            }
        });
        check(FwpCall::EngineOpen, status)?;
        // INVARIANT: written back by a successful FwpmEngineOpen0.
        Ok(WfpHandle(handle))
    }

    fn engine_close(&self, engine: WfpHandle) -> Result<(), FwpError> {
        passive(FwpCall::EngineClose)?;
        // SAFETY: an open handle (type invariant), closed once: `engine` is consumed; at
        // PASSIVE_LEVEL (checked above).
        check(FwpCall::EngineClose, unsafe {
            sys::FwpmEngineClose0(engine.0)
        })
    }

    fn transaction_begin(&self, engine: &WfpHandle) -> Result<(), FwpError> {
        passive(FwpCall::TransactionBegin)?;
        // SAFETY: an open handle (type invariant); flags 0; at PASSIVE_LEVEL.
        check(FwpCall::TransactionBegin, unsafe {
            sys::FwpmTransactionBegin0(engine.0, 0)
        })
    }

    fn transaction_commit(&self, engine: &WfpHandle) -> Result<(), FwpError> {
        passive(FwpCall::TransactionCommit)?;
        // SAFETY: an open handle (type invariant); at PASSIVE_LEVEL.
        check(FwpCall::TransactionCommit, unsafe {
            sys::FwpmTransactionCommit0(engine.0)
        })
    }

    fn transaction_abort(&self, engine: &WfpHandle) -> Result<(), FwpError> {
        passive(FwpCall::TransactionAbort)?;
        // SAFETY: an open handle (type invariant); at PASSIVE_LEVEL.
        check(FwpCall::TransactionAbort, unsafe {
            sys::FwpmTransactionAbort0(engine.0)
        })
    }

    fn provider_add(&self, engine: &WfpHandle, provider: &ProviderSpec) -> Result<(), FwpError> {
        passive(FwpCall::ProviderAdd)?;
        let status = abi::with_provider0(provider, |provider| {
            // SAFETY: an open handle (type invariant); `provider` and what it points to
            // are valid for the call (`with_provider0`); a NULL security descriptor; at
            // PASSIVE_LEVEL.
            unsafe { sys::FwpmProviderAdd0(engine.0, provider, ptr::null_mut()) }
        });
        check(FwpCall::ProviderAdd, status)
    }

    fn sublayer_add(&self, engine: &WfpHandle, sublayer: &SublayerSpec) -> Result<(), FwpError> {
        passive(FwpCall::SubLayerAdd)?;
        let status = abi::with_sublayer0(sublayer, |sublayer| {
            // SAFETY: as in `provider_add`, with `with_sublayer0`.
            unsafe { sys::FwpmSubLayerAdd0(engine.0, sublayer, ptr::null_mut()) }
        });
        check(FwpCall::SubLayerAdd, status)
    }

    fn filter_add(&self, engine: &WfpHandle, filter: &FilterSpec) -> Result<FilterId, FwpError> {
        passive(FwpCall::FilterAdd)?;
        let mut id: u64 = 0;
        let status = abi::with_filter0(filter, |filter| {
            // SAFETY: an open handle (type invariant); `filter` and what it points to (the
            // conditions, the provider key, the name) are valid for the call
            // (`with_filter0`); a NULL security descriptor; `id` is valid for the write
            // back; at PASSIVE_LEVEL.
            unsafe { sys::FwpmFilterAdd0(engine.0, filter, ptr::null_mut(), &raw mut id) }
        });
        check(FwpCall::FilterAdd, status)?;
        Ok(FilterId(id))
    }

    fn filter_delete_by_id(&self, engine: &WfpHandle, id: FilterId) -> Result<(), FwpError> {
        passive(FwpCall::FilterDeleteById)?;
        // SAFETY: an open handle (type invariant); any id is valid input (an unknown one
        // returns STATUS_FWP_FILTER_NOT_FOUND); at PASSIVE_LEVEL.
        check(FwpCall::FilterDeleteById, unsafe {
            sys::FwpmFilterDeleteById0(engine.0, id.0)
        })
    }
}
