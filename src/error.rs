//! Errors: every netio failure keeps its raw status; the documented codes have names.

use core::fmt;

use crate::irql::{Irql, IrqlBound};
use crate::sys;

/// Which netio call a status came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NetioCall {
    /// `NotifyTeredoPortChange`.
    NotifyTeredoPortChange,
    /// `GetTeredoPort`.
    GetTeredoPort,
    /// `CancelMibChangeNotify2`.
    CancelMibChangeNotify2,
}

impl fmt::Display for NetioCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetioCall::NotifyTeredoPortChange => "NotifyTeredoPortChange",
            NetioCall::GetTeredoPort => "GetTeredoPort",
            NetioCall::CancelMibChangeNotify2 => "CancelMibChangeNotify2",
        })
    }
}

/// A raw status returned by netio: an `NTSTATUS` or, as the documentation mixes them, a
/// Win32 error code. Only zero is success (Win32 error codes are positive).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct NetioStatus(pub i32);

impl NetioStatus {
    /// The documented name of this code, if it has one.
    #[must_use]
    pub fn name(self) -> Option<&'static str> {
        sys::DOCUMENTED_STATUS_CODES
            .iter()
            .find(|(_, code)| *code == self.0)
            .map(|(name, _)| *name)
    }
}

impl fmt::Debug for NetioStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for NetioStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[allow(
            clippy::cast_sign_loss,
            reason = "NTSTATUS values are shown as their bits"
        )]
        let bits = self.0 as u32;
        match self.name() {
            Some(name) => write!(f, "{name} ({bits:#010x})"),
            None => write!(f, "status {bits:#010x}"),
        }
    }
}

/// Everything that can fail in this crate.
///
/// Every netio failure keeps the call and the raw status; the documented codes have named
/// variants, anything else is [`Error::Netio`].
///
/// # Examples
///
/// ```
/// use teredo_watcher::{Error, NetioCall, NetioStatus, sys};
///
/// let e = Error::from_status(NetioCall::GetTeredoPort, sys::ERROR_NOT_READY);
/// assert!(matches!(e, Error::TeredoNotStarted { .. }));
/// assert_eq!(e.status(), Some(NetioStatus(21)));
/// assert_eq!(e.call(), Some(NetioCall::GetTeredoPort));
/// assert_eq!(
///     e.to_string(),
///     "GetTeredoPort: the Teredo client is not started: ERROR_NOT_READY (0x00000015)"
/// );
/// // An undocumented code keeps its value.
/// let other = Error::from_status(NetioCall::CancelMibChangeNotify2, 5);
/// assert!(matches!(other, Error::Netio { status: NetioStatus(5), .. }));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// `STATUS_INVALID_PARAMETER` or `ERROR_INVALID_PARAMETER`.
    InvalidParameter {
        /// The call that failed.
        call: NetioCall,
        /// The raw code.
        status: NetioStatus,
    },
    /// `ERROR_INVALID_HANDLE` or `STATUS_INVALID_HANDLE` ("an internal error occurred where
    /// an invalid handle was encountered"), or a success that returned a NULL handle.
    InvalidHandle {
        /// The call that failed.
        call: NetioCall,
        /// The raw code.
        status: NetioStatus,
    },
    /// `STATUS_NO_MEMORY`, `STATUS_INSUFFICIENT_RESOURCES` or `ERROR_NOT_ENOUGH_MEMORY`.
    OutOfMemory {
        /// The call that failed.
        call: NetioCall,
        /// The raw code.
        status: NetioStatus,
    },
    /// The Teredo client is not started (`ERROR_NOT_READY`, `STATUS_DEVICE_NOT_READY`).
    TeredoNotStarted {
        /// The call that failed.
        call: NetioCall,
        /// The raw code.
        status: NetioStatus,
    },
    /// There is no IPv6 stack (`STATUS_NOT_SUPPORTED`).
    NoIpv6Stack {
        /// The call that failed.
        call: NetioCall,
        /// The raw code.
        status: NetioStatus,
    },
    /// Any other failure status.
    Netio {
        /// The call that failed.
        call: NetioCall,
        /// The raw code.
        status: NetioStatus,
    },
    /// The call was made above the IRQL it documents; nothing was done.
    IrqlTooHigh {
        /// The entry point.
        operation: &'static str,
        /// The IRQL it was called at.
        current: Irql,
        /// What it requires.
        required: IrqlBound,
    },
    /// The watcher was asked to cancel its registration from inside its own callback, which
    /// would deadlock in `CancelMibChangeNotify2`. Nothing was done.
    CancelFromCallback,
    /// The subscriber table is full (its capacity is fixed when the watcher is created).
    SubscriberTableFull {
        /// The capacity.
        capacity: usize,
    },
    /// The subscriber id is unknown (never issued by this watcher, or already removed).
    UnknownSubscriber,
    /// The handle table already holds its maximum number of registrations.
    HandleTableFull {
        /// The maximum.
        capacity: usize,
    },
    /// The handle table was torn down; no new registration is accepted.
    HandleTableClosed,
    /// A memory allocation made by this crate failed; nothing was registered.
    AllocationFailed {
        /// Bytes requested.
        bytes: usize,
    },
    /// [`StaticTeredoWatcher::start`](crate::StaticTeredoWatcher::start) on a watcher that
    /// is registered (stop it first), or a start or stop while another thread is starting or
    /// stopping it. Nothing was done.
    StaticWatcherBusy,
}

impl Error {
    /// Maps a non-success netio status to its named variant, keeping the raw code.
    #[must_use]
    pub fn from_status(call: NetioCall, raw: i32) -> Error {
        let status = NetioStatus(raw);
        match raw {
            sys::STATUS_INVALID_PARAMETER | sys::ERROR_INVALID_PARAMETER => {
                Error::InvalidParameter { call, status }
            }
            sys::ERROR_INVALID_HANDLE | sys::STATUS_INVALID_HANDLE => {
                Error::InvalidHandle { call, status }
            }
            sys::STATUS_NO_MEMORY
            | sys::STATUS_INSUFFICIENT_RESOURCES
            | sys::ERROR_NOT_ENOUGH_MEMORY => Error::OutOfMemory { call, status },
            sys::ERROR_NOT_READY | sys::STATUS_DEVICE_NOT_READY => {
                Error::TeredoNotStarted { call, status }
            }
            sys::STATUS_NOT_SUPPORTED => Error::NoIpv6Stack { call, status },
            _ => Error::Netio { call, status },
        }
    }

    /// Turns a raw netio return value into a `Result` (only zero is success).
    ///
    /// # Errors
    ///
    /// The named variant for any non-zero `raw`.
    pub fn check(call: NetioCall, raw: i32) -> Result<(), Error> {
        if raw == sys::STATUS_SUCCESS {
            Ok(())
        } else {
            Err(Error::from_status(call, raw))
        }
    }

    /// The raw netio status, for errors that came from netio.
    #[must_use]
    pub fn status(&self) -> Option<NetioStatus> {
        match *self {
            Error::InvalidParameter { status, .. }
            | Error::InvalidHandle { status, .. }
            | Error::OutOfMemory { status, .. }
            | Error::TeredoNotStarted { status, .. }
            | Error::NoIpv6Stack { status, .. }
            | Error::Netio { status, .. } => Some(status),
            _ => None,
        }
    }

    /// The netio call that failed, for errors that came from netio.
    #[must_use]
    pub fn call(&self) -> Option<NetioCall> {
        match *self {
            Error::InvalidParameter { call, .. }
            | Error::InvalidHandle { call, .. }
            | Error::OutOfMemory { call, .. }
            | Error::TeredoNotStarted { call, .. }
            | Error::NoIpv6Stack { call, .. }
            | Error::Netio { call, .. } => Some(call),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidParameter { call, status } => {
                write!(f, "{call}: invalid parameter: {status}")
            }
            Error::InvalidHandle { call, status } => write!(f, "{call}: invalid handle: {status}"),
            Error::OutOfMemory { call, status } => write!(f, "{call}: out of memory: {status}"),
            Error::TeredoNotStarted { call, status } => {
                write!(f, "{call}: the Teredo client is not started: {status}")
            }
            Error::NoIpv6Stack { call, status } => {
                write!(f, "{call}: no IPv6 stack is installed: {status}")
            }
            Error::Netio { call, status } => write!(f, "{call} failed: {status}"),
            Error::IrqlTooHigh {
                operation,
                current,
                required,
            } => write!(
                f,
                "{operation} called at {current}; it requires IRQL {required}"
            ),
            Error::CancelFromCallback => f.write_str(
                "cannot cancel a Teredo notification from inside its own callback \
                 (CancelMibChangeNotify2 would deadlock)",
            ),
            Error::SubscriberTableFull { capacity } => {
                write!(f, "the subscriber table is full ({capacity} subscribers)")
            }
            Error::UnknownSubscriber => f.write_str("unknown or already removed subscriber"),
            Error::HandleTableFull { capacity } => {
                write!(f, "the handle table is full ({capacity} registrations)")
            }
            Error::HandleTableClosed => f.write_str("the handle table has been torn down"),
            Error::AllocationFailed { bytes } => write!(f, "allocation of {bytes} bytes failed"),
            Error::StaticWatcherBusy => {
                f.write_str("the static watcher is registered, or being started or stopped")
            }
        }
    }
}

impl core::error::Error for Error {}
