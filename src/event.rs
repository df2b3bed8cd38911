//! Ports, notification types and the events subscribers receive.

use core::fmt;
use core::num::NonZeroU16;

use crate::sys;

/// A UDP port the Teredo client really uses (never zero: the C API's zero means "no port",
/// as in the initial notification).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct TeredoPort(NonZeroU16);

impl TeredoPort {
    /// A port from its number; `None` for zero.
    #[must_use]
    pub const fn new(port: u16) -> Option<TeredoPort> {
        match NonZeroU16::new(port) {
            Some(p) => Some(TeredoPort(p)),
            None => None,
        }
    }

    /// The port number.
    #[must_use]
    pub const fn get(self) -> u16 {
        self.0.get()
    }
}

impl fmt::Debug for TeredoPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TeredoPort({})", self.get())
    }
}

impl fmt::Display for TeredoPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "udp/{}", self.get())
    }
}

/// `MIB_NOTIFICATION_TYPE`, decoded from the raw `i32` the OS passes.
///
/// Never transmuted: an out-of-range value becomes [`MibNotificationType::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MibNotificationType {
    /// `MibParameterNotification` (0): a parameter, here the port, changed.
    Parameter,
    /// `MibAddInstance` (1).
    AddInstance,
    /// `MibDeleteInstance` (2).
    DeleteInstance,
    /// `MibInitialNotification` (3): registration confirmed; the port argument is zero.
    Initial,
    /// Any other value, kept as received.
    Unknown(i32),
}

impl MibNotificationType {
    /// Decodes a raw value.
    #[must_use]
    pub const fn from_raw(raw: i32) -> Self {
        match raw {
            sys::MIB_PARAMETER_NOTIFICATION => MibNotificationType::Parameter,
            sys::MIB_ADD_INSTANCE => MibNotificationType::AddInstance,
            sys::MIB_DELETE_INSTANCE => MibNotificationType::DeleteInstance,
            sys::MIB_INITIAL_NOTIFICATION => MibNotificationType::Initial,
            other => MibNotificationType::Unknown(other),
        }
    }

    /// The raw value.
    #[must_use]
    pub const fn raw(self) -> i32 {
        match self {
            MibNotificationType::Parameter => sys::MIB_PARAMETER_NOTIFICATION,
            MibNotificationType::AddInstance => sys::MIB_ADD_INSTANCE,
            MibNotificationType::DeleteInstance => sys::MIB_DELETE_INSTANCE,
            MibNotificationType::Initial => sys::MIB_INITIAL_NOTIFICATION,
            MibNotificationType::Unknown(raw) => raw,
        }
    }
}

/// What a subscriber is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TeredoEvent {
    /// The OS confirmed the registration (`MibInitialNotification`). Carries no port: the
    /// C API passes zero here, which is not a port.
    Initial,
    /// `MibParameterNotification`: the Teredo port is now `port` (`None` if the OS passed 0).
    PortChanged {
        /// The new port.
        port: Option<TeredoPort>,
    },
    /// `MibAddInstance`: the Teredo client came up on `port`.
    Added {
        /// The port.
        port: Option<TeredoPort>,
    },
    /// `MibDeleteInstance`: the Teredo client went away; `port` is what the OS passed.
    Deleted {
        /// The port the OS passed with the deletion.
        port: Option<TeredoPort>,
    },
    /// A notification type this crate does not know, kept raw.
    Unknown {
        /// The raw `MIB_NOTIFICATION_TYPE` value.
        raw_type: i32,
        /// The port the OS passed.
        port: Option<TeredoPort>,
    },
    /// The current state, delivered to a subscriber that asked for it when subscribing
    /// (and, if notifications raced that subscription, once more with the newer state).
    Snapshot {
        /// The last known port.
        port: Option<TeredoPort>,
    },
}

impl TeredoEvent {
    /// The event for a raw notification from the OS.
    #[must_use]
    pub const fn from_raw(port: u16, raw_type: i32) -> TeredoEvent {
        let port = TeredoPort::new(port);
        match MibNotificationType::from_raw(raw_type) {
            MibNotificationType::Initial => TeredoEvent::Initial,
            MibNotificationType::Parameter => TeredoEvent::PortChanged { port },
            MibNotificationType::AddInstance => TeredoEvent::Added { port },
            MibNotificationType::DeleteInstance => TeredoEvent::Deleted { port },
            MibNotificationType::Unknown(raw_type) => TeredoEvent::Unknown { raw_type, port },
        }
    }

    /// The port the event carries, if any.
    #[must_use]
    pub const fn port(&self) -> Option<TeredoPort> {
        match *self {
            TeredoEvent::Initial => None,
            TeredoEvent::PortChanged { port }
            | TeredoEvent::Added { port }
            | TeredoEvent::Deleted { port }
            | TeredoEvent::Unknown { port, .. }
            | TeredoEvent::Snapshot { port } => port,
        }
    }

    /// What the last known port becomes after this event, given what it was.
    ///
    /// `Initial` and unknown types leave it unchanged; a deletion clears it.
    #[must_use]
    pub const fn apply(&self, previous: Option<TeredoPort>) -> Option<TeredoPort> {
        match *self {
            TeredoEvent::Initial | TeredoEvent::Unknown { .. } => previous,
            TeredoEvent::Deleted { .. } => None,
            TeredoEvent::PortChanged { port }
            | TeredoEvent::Added { port }
            | TeredoEvent::Snapshot { port } => port,
        }
    }
}
