//! # Kernel in a box
//!
//! Links the `teredo-monitor` example driver into a real PE `.sys` with `rust-lld`
//! ([`sysbuild`]), reads the facts a Windows loader relies on ([`pe`]), maps it at a
//! non-preferred base with relocations applied and every import bound to a host
//! `extern "win64"` function ([`loader`]), and runs `DriverEntry`/`DriverUnload` against a
//! host model of the kernel as documented ([`kernel`], [`machine`]); a driver that programs
//! the filter engine is checked by the traffic and oracle of [`firewall`].
//!
//! What this proves and what it does not: see `docs/harness.md`.

//!
//! The harness executes Windows x64 machine code in the host process, so it exists only on
//! an x86-64 Unix host: elsewhere (a Windows host, another architecture) this crate
//! compiles to nothing, and a `cargo check --workspace --all-targets` there still passes.

#[cfg(all(target_arch = "x86_64", unix))]
pub mod firewall;
#[cfg(all(target_arch = "x86_64", unix))]
pub mod kernel;
#[cfg(all(target_arch = "x86_64", unix))]
pub mod loader;
#[cfg(all(target_arch = "x86_64", unix))]
pub mod machine;
#[cfg(all(target_arch = "x86_64", unix))]
pub mod pe;
#[cfg(all(target_arch = "x86_64", unix))]
pub mod sysbuild;

#[cfg(all(target_arch = "x86_64", unix))]
pub use machine::{Exclusive, Machine, Stop};
