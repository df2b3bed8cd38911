//! Build script of the harness: tells the crate where to build the driver image.
//!
//! The `.sys` is built by a nested `cargo build` at run time (see `src/sysbuild.rs`), in a
//! target directory of its own beside this build's, so that it never contends for the
//! outer build's lock and never sees its flags.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let out_dir =
        std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is <target>/<profile>/build/<package>-<hash>/out.
    let profile_dir = out_dir
        .ancestors()
        .nth(3)
        .map_or_else(|| out_dir.clone(), std::path::Path::to_path_buf);
    println!(
        "cargo::rustc-env=TEREDO_HARNESS_SYS_TARGET_DIR={}",
        profile_dir.join("sys-build").display()
    );
}
