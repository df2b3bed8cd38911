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
//! `DriverUnload` routine, which call `teredo_monitor_logic::driver`.
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
