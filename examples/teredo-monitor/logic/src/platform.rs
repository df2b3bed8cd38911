//! The target of `log!`: one function, [`log`], chosen by feature.
//!
//! `log!` is expanded inside this crate's driver logic, so its sinks live here; the driver
//! image selects one through its own feature (`wdk` or `kernel-shim`), the host build
//! through `host-mock`. Every sink writes one line without allocating and is valid at
//! `DISPATCH_LEVEL`, because the driver logs from the OS callback.
//!
//! | feature | sink |
//! |---|---|
//! | `wdk`, `kernel-shim` | ntoskrnl's `DbgPrint("teredo-monitor: %s\n", line)` of the line rendered on the stack |
//! | `host-mock` | [`crate::host`]: standard output, or the tests' capture buffer |
//! | none | discarded (type-checking configuration only) |

#[cfg(any(
    all(feature = "wdk", feature = "host-mock"),
    all(feature = "wdk", feature = "kernel-shim"),
    all(feature = "kernel-shim", feature = "host-mock"),
))]
compile_error!(
    "teredo-monitor-logic: the features `wdk`, `kernel-shim` and `host-mock` each select a \
     platform; enable one"
);

#[cfg(feature = "host-mock")]
pub use crate::host::log;

#[cfg(any(feature = "kernel-shim", feature = "wdk"))]
pub use self::dbgprint::log;

/// No platform: the output is discarded (type-checking configuration only).
#[cfg(not(any(feature = "wdk", feature = "host-mock", feature = "kernel-shim")))]
pub fn log(line: &crate::log::Line) {
    let _ = line;
}

#[cfg(any(feature = "kernel-shim", feature = "wdk"))]
mod dbgprint {
    use core::ffi::c_char;

    use crate::log::Line;

    #[cfg(not(target_os = "windows"))]
    compile_error!("teredo-monitor-logic: `wdk` and `kernel-shim` are for x86_64-pc-windows-msvc");

    // `raw-dylib`, as the library imports its ntoskrnl routines: the same declaration links
    // in the WDK flow (beside `ntoskrnl.lib`) and with rust-lld for the harness.
    #[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
    unsafe extern "C" {
        /// `DbgPrint` (`__cdecl`, variadic; valid up to `DIRQL`).
        fn DbgPrint(format: *const c_char, ...) -> u32;
    }

    /// `DbgPrint("teredo-monitor: %s\n", line)`: no allocation, valid at `DISPATCH_LEVEL`.
    pub fn log(line: &Line) {
        let text = line.as_c_bytes();
        // SAFETY: the format and `text` are NUL-terminated (`as_c_bytes`) and outlive the
        // call, and the format has exactly one `%s` for the one variadic argument.
        unsafe {
            DbgPrint(
                c"teredo-monitor: %s\n".as_ptr(),
                text.as_ptr().cast::<c_char>(),
            )
        };
    }
}
