//! Build script of the `teredo-monitor` example driver.
//!
//! With the `wdk` feature (the default: the real driver), [`wdk_build`] configures the
//! driver binary build from the WDK found on this Windows host (linker flags, entry point,
//! libraries), as every windows-drivers-rs driver does. `wdk-build` refuses to compile on a
//! non-Windows host, so it is an optional build-dependency enabled only by that feature.
//!
//! With `host-mock` (the Linux main job) nothing is configured: the crate builds for the
//! host with `std`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo::rerun-if-changed=build.rs");
    let wdk = std::env::var_os("CARGO_FEATURE_WDK").is_some();
    let host = std::env::var_os("CARGO_FEATURE_HOST_MOCK").is_some();
    if wdk && host {
        return Err(
            "teredo-monitor: features `wdk` and `host-mock` select two platforms; \
                    for the host build use `--no-default-features --features host-mock`"
                .into(),
        );
    }
    #[cfg(feature = "wdk")]
    wdk_build::configure_wdk_binary_build()?;
    Ok(())
}
