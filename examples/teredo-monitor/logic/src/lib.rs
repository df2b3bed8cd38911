//! # teredo-monitor-logic: what the teredo-monitor example driver does
//!
//! The driver registers for Teredo port changes when it loads (with the initial
//! notification), keeps the firewall exception set for Teredo current (the dynamic service
//! port when known, static UDP 3544, multicast group 224.0.0.253), logs every notification
//! with the IRQL it arrived at, and, given a filter engine, programs WFP filters for
//! Microsoft's Teredo exceptions that follow the port from a `PASSIVE_LEVEL` work item. At
//! unload it stops that work item, removes the filters, cancels its registration and tears
//! the handle table down so that nothing can call into the unloaded image.
//!
//! This crate is that behaviour, apart from the driver image (`teredo-monitor`, a `cdylib`
//! only, in the directory above), so that the host demo and the tests link the very same
//! code as an rlib while the image keeps LTO.
//!
//! - [`driver`]: the driver's state, the `DriverEntry` body with its rollback, the
//!   `DriverUnload` body and the event handling, generic over the library's
//!   [`PortSource`](teredo_watcher::PortSource). It logs only through `log!`.
//! - [`exceptions`], [`status`], [`slot`]: the exception set, the NTSTATUS mapping, the
//!   driver's one owned place for its state.
//! - [`firewall`]: the filter engine as a trait (`fwpkclnt.sys` on Windows targets, a mock
//!   with `host-mock`), transactions that abort on drop, the filter design built from the
//!   library's exception rules, and the manager that installs, follows the port and removes.
//! - [`log`]: `log!` and the [`Line`](log::Line) it renders into without `core::fmt`.
//! - [`platform`]: the target of `log!`, chosen by feature (below).
//! - `host` (feature `host-mock`): the host platform for the demo
//!   (`src/bin/teredo-monitor-demo.rs`) and the tests, on `teredo_watcher::mock::MockNetio`.
//!
//! The driver image binds the rest of a platform: allocator, panic handler, `DriverEntry`
//! and `DriverUnload` exports, the statics over the real netio.
//!
//! # Features
//!
//! | feature | `log!` goes to | builds on |
//! |---|---|---|
//! | `host-mock` | standard output or a capture buffer (std + the library's mock) | any host |
//! | `wdk` | ntoskrnl's `DbgPrint` | `x86_64-pc-windows-msvc` (the image itself needs the WDK) |
//! | `kernel-shim` | ntoskrnl's `DbgPrint` | `x86_64-pc-windows-msvc` |
//! | none | discarded: the logic alone | type-checks for `x86_64-pc-windows-msvc` |
#![cfg_attr(not(feature = "host-mock"), no_std)]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

#[macro_use]
pub mod log;

pub mod driver;
pub mod exceptions;
pub mod firewall;
pub mod platform;
pub mod slot;
pub mod status;

#[cfg(feature = "host-mock")]
pub mod host;

#[cfg(all(test, feature = "host-mock"))]
mod tests;

#[cfg(all(test, feature = "host-mock"))]
mod firewall_tests;
