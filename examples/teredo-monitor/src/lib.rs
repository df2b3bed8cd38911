//! # teredo-monitor: an example WDM firewall driver built on `teredo-watcher`
//!
//! The driver image: the platform binding around the driver logic of
//! `teredo-monitor-logic` (`logic/`), which does all the work. Exactly one binding is
//! compiled, chosen by feature:
//!
//! | file | feature | binds |
//! |---|---|---|
//! | `wdk.rs` | `wdk` (default) | windows-drivers-rs: `wdk-alloc`, `wdk-panic`, `wdk-sys` |
//! | `shim.rs` | `kernel-shim` | ntoskrnl directly (pool, `KeBugCheckEx`), for the loader harness |
//!
//! Each provides the global allocator, the panic handler, the driver's two statics over the
//! real netio (its handle table and its state slot), the exported `DriverEntry` and the
//! `DriverUnload` routine, which call `teredo_monitor_logic::driver`. Both take the filter
//! engine from [`firewall`] below: `fwpkclnt.sys` with the feature `firewall` (a default
//! of the `wdk` build), none without it.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(not(any(feature = "wdk", feature = "kernel-shim")))]
compile_error!(
    "teredo-monitor: the driver image needs a platform: the default feature `wdk` (Windows \
     + WDK) or `--no-default-features --features kernel-shim` (the loader harness); the host \
     demo and tests are in logic/ (feature `host-mock`)"
);
#[cfg(all(feature = "wdk", feature = "kernel-shim"))]
compile_error!(
    "teredo-monitor: `kernel-shim` is a platform of its own: use `--no-default-features`"
);

#[cfg(feature = "wdk")]
mod wdk;

#[cfg(feature = "kernel-shim")]
mod shim;

/// The filter engine of this build: `fwpkclnt.sys` (feature `firewall`), or none.
#[cfg(feature = "firewall")]
type Engine = teredo_monitor_logic::firewall::wfp::WfpEngine;
/// The filter engine of this build: `fwpkclnt.sys` (feature `firewall`), or none.
#[cfg(not(feature = "firewall"))]
type Engine = teredo_monitor_logic::firewall::NoFilterEngine;

/// The firewall `DriverEntry` installs: the kernel's filter engine, with the work items of
/// its `PASSIVE_LEVEL` subscriber made on `driver_object`; `None` without the feature
/// `firewall` (or for a null object).
///
/// # Safety
///
/// `driver_object` is this driver's `DRIVER_OBJECT`, as `DriverEntry` receives it: the I/O
/// manager keeps it until after `DriverUnload` returned, so it outlives every watcher of the
/// driver (what `IoObject::from_raw` requires).
#[cfg(any(feature = "wdk", feature = "kernel-shim"))]
unsafe fn firewall(
    driver_object: *mut core::ffi::c_void,
) -> Option<teredo_monitor_logic::driver::Firewall<Engine>> {
    #[cfg(feature = "firewall")]
    {
        // SAFETY: the caller passes this driver's object, which outlives every watcher
        // (this function's contract).
        let io_object = unsafe { teredo_watcher::IoObject::from_raw(driver_object) }?;
        Some(teredo_monitor_logic::driver::Firewall {
            engine: teredo_monitor_logic::firewall::wfp::WfpEngine,
            io_object,
        })
    }
    #[cfg(not(feature = "firewall"))]
    {
        let _ = driver_object;
        None
    }
}
