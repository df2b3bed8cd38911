//! The target of `log!`: one function, [`log`], chosen by feature.
//!
//! `log!` is expanded inside this crate's driver logic, so its sinks live here; the driver
//! image selects one through its own feature (`wdk` or `kernel-shim`), the host build
//! through `host-mock`. Every sink writes one line without allocating and is valid at
//! `DISPATCH_LEVEL`, because the driver logs from the OS callback.
//!
//! | feature | sink |
//! |---|---|
//! | `wdk` | `wdk::println!` (`DbgPrint`, formatted into a stack buffer) |
//! | `kernel-shim` | ntoskrnl's `DbgPrint("%s\n", ..)` of a line formatted on the stack |
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

#[cfg(feature = "kernel-shim")]
pub use self::dbgprint::log;

/// The `wdk` sink: `DbgPrint` through `wdk::println!`, valid up to `DIRQL`.
#[cfg(feature = "wdk")]
pub fn log(args: core::fmt::Arguments<'_>) {
    ::wdk::println!("teredo-monitor: {args}");
}

/// No platform: the output is discarded (type-checking configuration only).
#[cfg(not(any(feature = "wdk", feature = "host-mock", feature = "kernel-shim")))]
#[allow(
    clippy::needless_pass_by_value,
    reason = "same signature as the real sinks"
)]
pub fn log(args: core::fmt::Arguments<'_>) {
    let _ = args;
}

#[cfg(feature = "kernel-shim")]
mod dbgprint {
    use core::ffi::c_char;
    use core::fmt::{self, Write};

    #[cfg(not(target_os = "windows"))]
    compile_error!("teredo-monitor-logic: `kernel-shim` is for x86_64-pc-windows-msvc");

    #[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
    unsafe extern "C" {
        /// `DbgPrint` (`__cdecl`, variadic; valid up to `DIRQL`).
        fn DbgPrint(format: *const c_char, ...) -> u32;
    }

    /// One line of output: at most this many bytes, the rest is cut.
    const LINE_CAPACITY: usize = 480;

    /// A NUL-terminated line on the stack; writes past the capacity are dropped.
    struct LineBuffer {
        bytes: [u8; LINE_CAPACITY + 1],
        len: usize,
    }

    impl Write for LineBuffer {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            for &b in s.as_bytes() {
                if self.len == LINE_CAPACITY {
                    break;
                }
                // A NUL inside the text would end the C string early: shown as a space.
                self.bytes[self.len] = if b == 0 { b' ' } else { b };
                self.len += 1;
            }
            Ok(())
        }
    }

    /// `DbgPrint("%s\n", line)` with the line formatted on the stack (no allocation, valid
    /// at `DISPATCH_LEVEL`).
    pub fn log(args: fmt::Arguments<'_>) {
        let mut line = LineBuffer {
            bytes: [0; LINE_CAPACITY + 1],
            len: 0,
        };
        let _ = write!(line, "teredo-monitor: {args}");
        line.bytes[line.len] = 0;
        // SAFETY: both arguments are NUL-terminated strings that outlive the call, and the
        // format has exactly one `%s` for the one variadic argument.
        unsafe { DbgPrint(c"%s\n".as_ptr(), line.bytes.as_ptr().cast::<c_char>()) };
    }
}
