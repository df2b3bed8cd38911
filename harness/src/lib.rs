//! # Kernel in a box
//!
//! Links the `teredo-monitor` example driver into a real PE `.sys` with `rust-lld`
//! ([`sysbuild`]), reads the facts a Windows loader relies on ([`pe`]), maps it at a
//! non-preferred base with relocations applied and every import bound to a host
//! `extern "win64"` function ([`loader`]), and runs `DriverEntry`/`DriverUnload` against a
//! host model of the kernel as documented ([`kernel`], [`machine`]).
//!
//! What this proves and what it does not: see `docs/harness.md`.

#[cfg(not(all(target_arch = "x86_64", unix)))]
compile_error!("the harness runs Windows x64 machine code on an x86-64 Unix host only");

pub mod kernel;
pub mod loader;
pub mod machine;
pub mod pe;
pub mod sysbuild;

pub use machine::{Machine, Stop};
