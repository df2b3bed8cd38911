//! Build script of the `teredo-monitor` driver image.
//!
//! With the `wdk` feature (the default: the real driver), [`wdk_build`] configures the
//! driver binary build from the WDK found on this Windows host (linker flags, entry point,
//! libraries), as every windows-drivers-rs driver does. `wdk-build` refuses to compile on a
//! non-Windows host, so it is an optional build-dependency enabled only by that feature.
//!
//! With `kernel-shim` (the loader harness's image) nothing is configured here: the harness's
//! build step passes the rust-lld linker settings on its command line.

#[cfg(feature = "wdk")]
fn main() -> Result<(), wdk_build::ConfigError> {
    println!("cargo::rerun-if-changed=build.rs");
    wdk_build::configure_wdk_binary_build()
}

#[cfg(not(feature = "wdk"))]
fn main() {
    println!("cargo::rerun-if-changed=build.rs");
}
