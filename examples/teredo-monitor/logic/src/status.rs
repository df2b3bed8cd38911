//! `NTSTATUS` values the driver returns, and how library errors map to them.
//!
//! The values are the documented ones (`ntstatus.h`); they are spelled here so that the
//! driver logic does not depend on `wdk-sys` (the binding converts at the boundary; both are
//! an `i32`).

use teredo_watcher::{Error, sys};

use crate::log::{Line, LogText};

/// An `NTSTATUS`: negative values are errors.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct NtStatus(pub i32);

impl NtStatus {
    /// `STATUS_SUCCESS`.
    pub const SUCCESS: NtStatus = NtStatus(0);
    /// `STATUS_UNSUCCESSFUL`.
    pub const UNSUCCESSFUL: NtStatus = NtStatus(0xC000_0001_u32.cast_signed());
    /// `STATUS_INVALID_HANDLE`.
    pub const INVALID_HANDLE: NtStatus = NtStatus(0xC000_0008_u32.cast_signed());
    /// `STATUS_INVALID_PARAMETER`.
    pub const INVALID_PARAMETER: NtStatus = NtStatus(0xC000_000D_u32.cast_signed());
    /// `STATUS_INSUFFICIENT_RESOURCES`.
    pub const INSUFFICIENT_RESOURCES: NtStatus = NtStatus(0xC000_009A_u32.cast_signed());
    /// `STATUS_DEVICE_NOT_READY`.
    pub const DEVICE_NOT_READY: NtStatus = NtStatus(0xC000_00A3_u32.cast_signed());
    /// `STATUS_OBJECT_NAME_COLLISION`: the driver state is already in place.
    pub const OBJECT_NAME_COLLISION: NtStatus = NtStatus(0xC000_0035_u32.cast_signed());
    /// `STATUS_INVALID_DEVICE_STATE`: called at the wrong IRQL, or after teardown.
    pub const INVALID_DEVICE_STATE: NtStatus = NtStatus(0xC000_0184_u32.cast_signed());
    /// `STATUS_POSSIBLE_DEADLOCK`: a cancel from inside the registration's own callback.
    pub const POSSIBLE_DEADLOCK: NtStatus = NtStatus(0xC000_0194_u32.cast_signed());

    /// `NT_SUCCESS(status)`.
    #[must_use]
    pub const fn is_success(self) -> bool {
        self.0 >= 0
    }

    /// The status a `DriverEntry` returns for a library error.
    ///
    /// A netio failure returns the raw status the OS gave when it is an `NTSTATUS`; the
    /// Win32 codes the documentation mixes in are mapped to their `NTSTATUS` equivalents.
    #[must_use]
    pub fn from_error(error: &Error) -> NtStatus {
        if let Some(status) = error.status() {
            return match status.0 {
                raw if raw < 0 => NtStatus(raw),
                // The Win32 codes (positive) the documentation names.
                sys::ERROR_INVALID_HANDLE => NtStatus::INVALID_HANDLE,
                sys::ERROR_NOT_ENOUGH_MEMORY => NtStatus::INSUFFICIENT_RESOURCES,
                sys::ERROR_NOT_READY => NtStatus::DEVICE_NOT_READY,
                sys::ERROR_INVALID_PARAMETER => NtStatus::INVALID_PARAMETER,
                _ => NtStatus::UNSUCCESSFUL,
            };
        }
        match error {
            Error::AllocationFailed { .. }
            | Error::SubscriberTableFull { .. }
            | Error::HandleTableFull { .. } => NtStatus::INSUFFICIENT_RESOURCES,
            Error::IrqlTooHigh { .. } | Error::HandleTableClosed => NtStatus::INVALID_DEVICE_STATE,
            Error::CancelFromCallback => NtStatus::POSSIBLE_DEADLOCK,
            Error::UnknownSubscriber => NtStatus::INVALID_PARAMETER,
            _ => NtStatus::UNSUCCESSFUL,
        }
    }
}

impl core::fmt::Debug for NtStatus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(self, f)
    }
}

/// `0x` and eight hexadecimal digits, as C's `%#010x`.
impl LogText for NtStatus {
    fn write_to(&self, line: &mut Line) {
        line.push_hex32(self.0.cast_unsigned());
    }
}

impl core::fmt::Display for NtStatus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut line = Line::new();
        self.write_to(&mut line);
        f.write_str(line.as_str())
    }
}
