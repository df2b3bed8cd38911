//! Counted strings: `RtlInitUnicodeString`, `RtlInitAnsiString`, `RtlCopyUnicodeString`.

use core::ffi::{CStr, c_char};

use super::bugcheck::bugcheck;
use super::irql::current_irql;
use super::{DISPATCH_LEVEL, IRQL_NOT_LESS_OR_EQUAL};

/// `UNICODE_STRING`: lengths in bytes, `Buffer` not necessarily NUL-terminated.
#[repr(C)]
pub struct UnicodeString {
    /// Bytes in use.
    pub length: u16,
    /// Bytes available.
    pub maximum_length: u16,
    /// The characters.
    pub buffer: *mut u16,
}

/// `ANSI_STRING` (`STRING`).
#[repr(C)]
pub struct AnsiString {
    /// Bytes in use.
    pub length: u16,
    /// Bytes available.
    pub maximum_length: u16,
    /// The characters.
    pub buffer: *mut c_char,
}

/// The longest `Length` `RtlInitUnicodeString` sets (it truncates longer strings).
const MAX_UNICODE_BYTES: usize = 0xFFFC;
/// The longest `Length` `RtlInitAnsiString` sets.
const MAX_ANSI_BYTES: usize = 0xFFFE;

fn check_irql(routine: &str) {
    let irql = current_irql();
    // Documented: <= DISPATCH_LEVEL when the strings are in non-paged memory, PASSIVE_LEVEL
    // otherwise; the model cannot tell paged memory from non-paged, so it checks the bound.
    if irql > DISPATCH_LEVEL {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [0, usize::from(irql), 0, 0],
            format!("{routine} at IRQL {irql}"),
        );
    }
}

/// # Safety
///
/// `destination` is valid for a write of a `UNICODE_STRING`; `source` is NULL or a
/// NUL-terminated UTF-16 string (`RtlInitUnicodeString`'s contract).
pub(crate) unsafe extern "win64" fn rtl_init_unicode_string(
    destination: *mut UnicodeString,
    source: *const u16,
) {
    check_irql("RtlInitUnicodeString");
    let (length, maximum_length) = if source.is_null() {
        (0, 0)
    } else {
        let mut units = 0usize;
        // SAFETY: NUL-terminated (this function's contract): every unit up to the NUL is
        // readable.
        while unsafe { source.add(units).read() } != 0 {
            units += 1;
        }
        let bytes = (units * 2).min(MAX_UNICODE_BYTES);
        (bytes, bytes + 2)
    };
    // SAFETY: valid for a write (this function's contract).
    unsafe {
        destination.write(UnicodeString {
            length: u16::try_from(length).unwrap_or(u16::MAX),
            maximum_length: u16::try_from(maximum_length).unwrap_or(u16::MAX),
            buffer: source.cast_mut(),
        });
    }
}

/// # Safety
///
/// `destination` is valid for a write of an `ANSI_STRING`; `source` is NULL or a
/// NUL-terminated string (`RtlInitAnsiString`'s contract).
pub(crate) unsafe extern "win64" fn rtl_init_ansi_string(
    destination: *mut AnsiString,
    source: *const c_char,
) {
    check_irql("RtlInitAnsiString");
    let (length, maximum_length) = if source.is_null() {
        (0, 0)
    } else {
        // SAFETY: NUL-terminated (this function's contract).
        let bytes = unsafe { CStr::from_ptr(source) }
            .count_bytes()
            .min(MAX_ANSI_BYTES);
        (bytes, bytes + 1)
    };
    // SAFETY: valid for a write (this function's contract).
    unsafe {
        destination.write(AnsiString {
            length: u16::try_from(length).unwrap_or(u16::MAX),
            maximum_length: u16::try_from(maximum_length).unwrap_or(u16::MAX),
            buffer: source.cast_mut(),
        });
    }
}

/// Copies `min(source.Length, destination.MaximumLength)` bytes, sets the destination's
/// `Length`, and NUL-terminates when room is left; a NULL source empties the destination.
///
/// # Safety
///
/// `destination` is a valid `UNICODE_STRING` whose buffer holds `MaximumLength` bytes;
/// `source` is NULL or a valid `UNICODE_STRING` (`RtlCopyUnicodeString`'s contract).
pub(crate) unsafe extern "win64" fn rtl_copy_unicode_string(
    destination: *mut UnicodeString,
    source: *const UnicodeString,
) {
    check_irql("RtlCopyUnicodeString");
    // SAFETY: a valid `UNICODE_STRING` (this function's contract).
    let destination = unsafe { &mut *destination };
    if source.is_null() {
        destination.length = 0;
        return;
    }
    // SAFETY: a valid `UNICODE_STRING` (this function's contract).
    let source = unsafe { &*source };
    let bytes = source.length.min(destination.maximum_length) & !1;
    // SAFETY: the source buffer holds `Length` bytes and the destination's `MaximumLength`
    // (this function's contract), `bytes` is at most both; `copy` tolerates an overlap.
    unsafe {
        core::ptr::copy(
            source.buffer.cast::<u8>(),
            destination.buffer.cast::<u8>(),
            usize::from(bytes),
        );
    }
    destination.length = bytes;
    if bytes + 2 <= destination.maximum_length {
        // SAFETY: `bytes + 2 <= MaximumLength`: the unit after the copy is in the buffer.
        unsafe { destination.buffer.add(usize::from(bytes / 2)).write(0) };
    }
}
