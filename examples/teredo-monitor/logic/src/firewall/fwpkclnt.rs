//! The filter engine's kernel-mode management functions (`fwpmk.h`), exported by
//! `fwpkclnt.sys`: the only declarations of them in the driver.
//!
//! Declared here rather than taken from `windows-sys`: `windows-sys` 0.61 declares
//! `FwpmEngineOpen0`, `FwpmFilterAdd0`, ... (with `NTSTATUS` returns in its `Wdk` module)
//! but links them to the user-mode `fwpuclnt.dll`, which a driver must not import (the
//! kernel loader resolves a driver's imports against kernel modules only). Its structure
//! types (`FWPM_FILTER0`, ...) have the kernel layouts and are used as they are.
//!
//! `raw-dylib` with `+verbatim`, as the library imports `netio.sys`: no import library is
//! needed, in the WDK flow or with rust-lld for the harness. Every function returns an
//! `NTSTATUS` and requires `PASSIVE_LEVEL` (Microsoft's documentation of each).
//!
//! # Safety
//!
//! Every function here is called only by `wfp.rs`, and each call must meet: the caller
//! runs at `PASSIVE_LEVEL`; `engine_handle` is a handle `FwpmEngineOpen0` returned and
//! `FwpmEngineClose0` has not closed; every input pointer is valid (with everything it
//! points to) for the duration of the call; every output pointer is valid for a write of
//! its type. The engine keeps no pointer after it returns.

use core::ffi::c_void;

use windows_sys::Win32::Foundation::HANDLE;
use windows_sys::Win32::NetworkManagement::WindowsFilteringPlatform::{
    FWPM_FILTER0, FWPM_PROVIDER0, FWPM_SESSION0, FWPM_SUBLAYER0,
};

/// `RPC_C_AUTHN_WINNT`: the authentication service `FwpmEngineOpen0` takes (kernel callers
/// pass it or `RPC_C_AUTHN_DEFAULT`).
pub const RPC_C_AUTHN_WINNT: u32 = 10;

#[cfg_attr(
    windows,
    link(name = "fwpkclnt.sys", kind = "raw-dylib", modifiers = "+verbatim")
)]
unsafe extern "system" {
    /// `FwpmEngineOpen0(NULL, RPC_C_AUTHN_WINNT, NULL, session, &engine)`.
    pub fn FwpmEngineOpen0(
        server_name: *const u16,
        authn_service: u32,
        auth_identity: *const c_void,
        session: *const FWPM_SESSION0,
        engine_handle: *mut HANDLE,
    ) -> i32;
    /// `FwpmEngineClose0(engine)`.
    pub fn FwpmEngineClose0(engine_handle: HANDLE) -> i32;
    /// `FwpmTransactionBegin0(engine, flags)`; flags 0 is a read-write transaction.
    pub fn FwpmTransactionBegin0(engine_handle: HANDLE, flags: u32) -> i32;
    /// `FwpmTransactionCommit0(engine)`.
    pub fn FwpmTransactionCommit0(engine_handle: HANDLE) -> i32;
    /// `FwpmTransactionAbort0(engine)`.
    pub fn FwpmTransactionAbort0(engine_handle: HANDLE) -> i32;
    /// `FwpmProviderAdd0(engine, provider, sd)`; `sd` NULL: the default security.
    pub fn FwpmProviderAdd0(
        engine_handle: HANDLE,
        provider: *const FWPM_PROVIDER0,
        sd: *mut c_void,
    ) -> i32;
    /// `FwpmSubLayerAdd0(engine, sublayer, sd)`.
    pub fn FwpmSubLayerAdd0(
        engine_handle: HANDLE,
        sublayer: *const FWPM_SUBLAYER0,
        sd: *mut c_void,
    ) -> i32;
    /// `FwpmFilterAdd0(engine, filter, sd, &id)`.
    pub fn FwpmFilterAdd0(
        engine_handle: HANDLE,
        filter: *const FWPM_FILTER0,
        sd: *mut c_void,
        id: *mut u64,
    ) -> i32;
    /// `FwpmFilterDeleteById0(engine, id)`.
    pub fn FwpmFilterDeleteById0(engine_handle: HANDLE, id: u64) -> i32;
}
