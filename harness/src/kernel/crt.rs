//! The C runtime routines ntoskrnl exports and compiled code calls by name.

use core::ffi::{CStr, c_char, c_void};

/// # Safety
///
/// `memcpy`'s contract: both ranges valid for `count` bytes.
pub(crate) unsafe extern "win64" fn memcpy(
    dest: *mut c_void,
    src: *const c_void,
    count: usize,
) -> *mut c_void {
    // SAFETY: valid ranges (contract); `copy` also tolerates an overlap.
    unsafe { core::ptr::copy(src.cast::<u8>(), dest.cast::<u8>(), count) };
    dest
}

/// # Safety
///
/// `memmove`'s contract: both ranges valid for `count` bytes.
pub(crate) unsafe extern "win64" fn memmove(
    dest: *mut c_void,
    src: *const c_void,
    count: usize,
) -> *mut c_void {
    // SAFETY: valid ranges (contract); `copy` handles the overlap.
    unsafe { core::ptr::copy(src.cast::<u8>(), dest.cast::<u8>(), count) };
    dest
}

/// # Safety
///
/// `memset`'s contract: `dest` valid for `count` bytes.
pub(crate) unsafe extern "win64" fn memset(dest: *mut c_void, c: i32, count: usize) -> *mut c_void {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "memset stores (unsigned char)c"
    )]
    let byte = c as u8;
    // SAFETY: valid range (contract).
    unsafe { dest.cast::<u8>().write_bytes(byte, count) };
    dest
}

/// # Safety
///
/// `memcmp`'s contract: both ranges valid for `count` bytes.
pub(crate) unsafe extern "win64" fn memcmp(
    a: *const c_void,
    b: *const c_void,
    count: usize,
) -> i32 {
    // SAFETY: valid ranges (contract).
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(a.cast::<u8>(), count),
            std::slice::from_raw_parts(b.cast::<u8>(), count),
        )
    };
    a.iter()
        .zip(b)
        .find(|(x, y)| x != y)
        .map_or(0, |(x, y)| i32::from(*x) - i32::from(*y))
}

/// # Safety
///
/// `strlen`'s contract: `s` is NUL-terminated.
pub(crate) unsafe extern "win64" fn strlen(s: *const c_char) -> usize {
    // SAFETY: NUL-terminated (contract).
    unsafe { CStr::from_ptr(s) }.count_bytes()
}
