//! The platform binding: the only code that names a platform crate.
//!
//! Exactly one binding is compiled, chosen by feature. Each provides:
//! - `log(fmt::Arguments)`: one line of driver output, without allocating, valid at
//!   `DISPATCH_LEVEL` (the target of `log!`);
//! - the entry points and the statics the OS calls into (driver builds only), which call
//!   [`crate::driver::driver_entry`] and [`crate::driver::driver_unload`].
//!
//! | file | feature | binds |
//! |---|---|---|
//! | `wdk.rs` | `wdk` | windows-drivers-rs: `wdk-alloc`, `wdk-panic`, `wdk::println!`, `wdk-sys` |
//! | `host.rs` | `host-mock` | `std` standard output, for the demo and the tests |
//! | `shim.rs` | `kernel-shim` | ntoskrnl directly (pool, `DbgPrint`, `KeBugCheckEx`), for the loader harness |
//!
//! Without either (`--no-default-features`), `log` discards its input, so the driver logic
//! alone can be type-checked for the Windows target.

#[cfg(feature = "wdk")]
mod wdk;
#[cfg(feature = "wdk")]
pub(crate) use self::wdk::log;

#[cfg(feature = "host-mock")]
pub mod host;
#[cfg(feature = "host-mock")]
pub(crate) use self::host::log;

#[cfg(feature = "kernel-shim")]
mod shim;
#[cfg(feature = "kernel-shim")]
pub(crate) use self::shim::log;
#[cfg(all(feature = "kernel-shim", any(feature = "wdk", feature = "host-mock")))]
compile_error!(
    "teredo-monitor: `kernel-shim` is a platform of its own: use `--no-default-features`"
);

/// No platform: the output is discarded (type-checking configuration only).
#[cfg(not(any(feature = "wdk", feature = "host-mock", feature = "kernel-shim")))]
#[allow(
    clippy::needless_pass_by_value,
    reason = "same signature as the real bindings"
)]
pub(crate) fn log(args: core::fmt::Arguments<'_>) {
    let _ = args;
}
