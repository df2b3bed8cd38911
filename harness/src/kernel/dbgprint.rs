//! Debugger output: `DbgPrint`, and the fault injection that runs a driver routine from
//! inside its own notification callback.

use core::ffi::{CStr, c_char};
use core::fmt::Write as _;
use std::cell::Cell;
use std::sync::{Mutex, PoisonError};

use super::netio::IN_CALLBACK;
use super::{STATUS_SUCCESS, lock, note};

/// `(DriverUnload, DriverObject)` to run from inside the next callback (see
/// [`run_in_next_callback`]).
pub(crate) static IN_CALLBACK_HOOK: Mutex<Option<(usize, usize)>> = Mutex::new(None);

/// Fault injection for the self-cancel scenario: the next time the driver prints from
/// inside one of its notification callbacks, the model calls `unload(driver_object)` (the
/// driver's own `DriverUnload`) on that thread, before returning from `DbgPrint`: the
/// driver then cancels its registration from inside its callback, as a driver bug would.
pub fn run_in_next_callback(unload: usize, driver_object: usize) {
    *IN_CALLBACK_HOOK
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some((unload, driver_object));
}

/// `DbgPrint(Format, ...)`: the Windows x64 convention passes variadic arguments like fixed
/// ones, so the first three after the format arrive in `a1..a3`. Supported conversions:
/// `%s`, `%d`, `%u`, `%x`, `%p`, `%%` (what this driver uses, and a little more).
///
/// # Safety
///
/// `format` is a NUL-terminated string and each `%s` argument too (`DbgPrint`'s contract).
pub(crate) unsafe extern "win64" fn dbg_print(
    format: *const c_char,
    a1: usize,
    a2: usize,
    a3: usize,
) -> i32 {
    // SAFETY: NUL-terminated (this function's contract).
    let format = unsafe { CStr::from_ptr(format) }.to_bytes();
    let args = [a1, a2, a3];
    let mut next = args.iter().copied();
    let mut out = String::new();
    let mut bytes = format.iter().copied();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(char::from(b));
            continue;
        }
        match bytes.next() {
            Some(b'%') => out.push('%'),
            Some(conversion @ (b's' | b'd' | b'u' | b'x' | b'p')) => {
                let Some(arg) = next.next() else {
                    out.push_str("<more than 3 arguments: not modelled>");
                    break;
                };
                match conversion {
                    b's' => {
                        // SAFETY: a `%s` argument is a NUL-terminated string (contract).
                        let s = unsafe {
                            CStr::from_ptr(core::ptr::with_exposed_provenance::<c_char>(arg))
                        };
                        out.push_str(&s.to_string_lossy());
                    }
                    #[allow(clippy::cast_possible_truncation, reason = "%d is a 32-bit int")]
                    b'd' => out.push_str(&(arg as u32).cast_signed().to_string()),
                    #[allow(clippy::cast_possible_truncation, reason = "%u is a 32-bit int")]
                    b'u' => out.push_str(&(arg as u32).to_string()),
                    #[allow(clippy::cast_possible_truncation, reason = "%x is a 32-bit int")]
                    b'x' => {
                        let _ = write!(out, "{:x}", arg as u32);
                    }
                    _ => {
                        let _ = write!(out, "{arg:#x}");
                    }
                }
            }
            other => {
                out.push_str("<unsupported conversion %");
                if let Some(c) = other {
                    out.push(char::from(c));
                }
                out.push('>');
            }
        }
    }
    let mut state = lock();
    for line in out.trim_end_matches('\n').split('\n') {
        if state.echo {
            println!("{line}");
        }
        state.debugger.push(line.to_owned());
    }
    drop(state);
    if IN_CALLBACK.with(Cell::get) {
        let hook = IN_CALLBACK_HOOK
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((unload, driver_object)) = hook {
            note("fault injection: running the driver's DriverUnload inside its callback");
            // SAFETY: `unload` is the image's `DRIVER_UNLOAD` routine and `driver_object`
            // the machine's driver object, both given by the machine, which keeps them
            // alive while the image runs; the routine is an NTAPI function.
            let unload =
                unsafe { std::mem::transmute::<usize, extern "win64" fn(*mut u8)>(unload) };
            unload(core::ptr::with_exposed_provenance_mut(driver_object));
        }
    }
    STATUS_SUCCESS
}
