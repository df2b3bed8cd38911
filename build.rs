//! Build script of the library.
//!
//! The library deliberately has no dependency on `wdk-build` (it refuses to build on a
//! non-Windows host and would pin drivers to one WDK configuration). What it checks here:
//! a Windows build must use the MSVC ABI, which is what the kernel and `netio.sys` speak.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(teredo_watcher_loom)");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "windows" && env != "msvc" {
        println!(
            "cargo::warning=teredo-watcher: the kernel layer targets the MSVC ABI \
             (x86_64-pc-windows-msvc); target_env `{env}` cannot produce a Windows driver"
        );
    }
}
