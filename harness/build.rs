//! Build script of the harness: tells the crate where to build the driver images, and
//! whether the C reference driver can be built here.
//!
//! The `.sys` is built by a nested `cargo build` at run time (see `src/sysbuild.rs`), in a
//! target directory of its own beside this build's, so that it never contends for the
//! outer build's lock and never sees its flags. The C reference driver
//! (`examples/c-reference/`) needs mingw-w64's `x86_64-w64-mingw32-gcc`: without it the tests
//! on that driver are marked ignored with the reason (cfg `teredo_harness_mingw` unset), and
//! a warning says so; with `TEREDO_HARNESS_REQUIRE_MINGW=1` (CI) its absence fails the build.

use std::process::Command;

/// The compiler the C reference driver's `build.sh` uses.
const MINGW_GCC: &str = "x86_64-w64-mingw32-gcc";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=TEREDO_HARNESS_REQUIRE_MINGW");
    println!("cargo::rustc-check-cfg=cfg(teredo_harness_mingw)");
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

    let mingw = Command::new(MINGW_GCC)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if mingw {
        println!("cargo::rustc-cfg=teredo_harness_mingw");
    } else if std::env::var_os("TEREDO_HARNESS_REQUIRE_MINGW").is_some_and(|v| v == "1") {
        panic!(
            "TEREDO_HARNESS_REQUIRE_MINGW=1 but {MINGW_GCC} is not on PATH \
             (apt-get install gcc-mingw-w64-x86-64)"
        );
    } else {
        println!(
            "cargo::warning={MINGW_GCC} not found: the C reference driver tests are ignored \
             (apt-get install gcc-mingw-w64-x86-64)"
        );
    }
}
