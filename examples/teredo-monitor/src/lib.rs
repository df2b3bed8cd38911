//! # teredo-monitor: an example WDM firewall driver built on `teredo-watcher`
//!
//! The driver registers for Teredo port changes when it loads (with the initial
//! notification), keeps the firewall exception set for Teredo current (the dynamic service
//! port when known, static UDP 3544, multicast group 224.0.0.253), logs every notification
//! with the IRQL it arrived at, and at unload cancels its registration and tears the handle
//! table down so that nothing can call into the unloaded image.
//!
//! # Layout: one shared driver, one small platform binding
//!
//! - [`driver`]: everything the driver *does* (state, the `DriverEntry` body with its
//!   rollback, the `DriverUnload` body, event handling, exception tracking, NTSTATUS
//!   mapping), generic over the library's [`PortSource`](teredo_watcher::PortSource). It logs
//!   only through `log!`, and names no platform crate.
//! - `platform`: the only code that binds a platform. Exactly one is compiled:
//!   - `platform/wdk.rs` (feature `wdk`, the default): the windows-drivers-rs crates
//!     (`wdk-alloc` allocator, `wdk-panic` handler, `wdk::println!`, `wdk_sys::DRIVER_OBJECT`
//!     and `NTSTATUS`), the exported `DriverEntry` and the `DriverUnload` routine, and the
//!     driver's statics over the real netio (`NetioPortSource`);
//!   - `platform/host.rs` (feature `host-mock`): `std` output for `log!`, for the scripted
//!     scenario of `src/bin/teredo-monitor-demo.rs` on `teredo_watcher::mock::MockNetio`;
//!   - `platform/shim.rs` (feature `kernel-shim`): ntoskrnl routines directly in place of the
//!     windows-drivers-rs crates, for the `.sys` the loader harness links on Linux.
//!
//!   Each binding provides `log` and, for a driver image, the entry points, which call the
//!   same [`driver`] functions.
//!
//! # Features
//!
//! | feature | platform | builds on |
//! |---|---|---|
//! | `wdk` (default) | the real driver | a Windows host with the WDK only (`wdk-build` refuses others) |
//! | `host-mock` | std + the library's mock | any host; use with `--no-default-features` |
//! | `kernel-shim` | ntoskrnl directly (pool, `DbgPrint`, `KeBugCheckEx`) | `x86_64-pc-windows-msvc`, with `--no-default-features` |
//! | none | no platform: the driver logic alone | type-checks for `x86_64-pc-windows-msvc` as an rlib |
#![cfg_attr(not(feature = "host-mock"), no_std)]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

#[cfg(all(feature = "wdk", feature = "host-mock"))]
compile_error!(
    "teredo-monitor: `wdk` and `host-mock` select two platforms; for the host build use \
     `--no-default-features --features host-mock`"
);

#[macro_use]
mod log;

pub mod driver;
pub mod exceptions;
pub mod slot;
pub mod status;

mod platform;

#[cfg(feature = "host-mock")]
pub use platform::host;

#[cfg(all(test, feature = "host-mock"))]
mod tests;
