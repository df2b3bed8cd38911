//! Ports, notification types and the events subscribers receive.

use core::fmt;
use core::num::NonZeroU16;

use crate::sys;

/// A UDP port the Teredo client really uses (never zero: the C API's zero means "no port",
/// as in the initial notification).
///
/// # Examples
///
/// ```
/// use teredo_watcher::TeredoPort;
///
/// assert_eq!(TeredoPort::new(0), None, "zero is no port");
/// let port = TeredoPort::new(50_000).expect("non-zero");
/// assert_eq!(port.get(), 50_000);
/// assert_eq!(port.to_string(), "udp/50000");
/// ```
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
///
/// Every event says what the Teredo port is *after* it, as far as the watcher knows:
/// [`port`](TeredoEvent::port) is that port, `None` when no client is known to run. So a
/// subscriber can keep a firewall exception equal to `event.port()` on every event (open
/// the new port, close any other), whatever the event's kind:
///
/// ```
/// use teredo_watcher::{TeredoEvent, TeredoPort};
///
/// // What the firewall allows: exactly `event.port()`, after every event.
/// fn allowed_after(event: TeredoEvent) -> Option<TeredoPort> {
///     event.port()
/// }
/// let added = TeredoEvent::Added { port: TeredoPort::new(50_000) };
/// assert_eq!(allowed_after(added), TeredoPort::new(50_000));
/// let deleted = TeredoEvent::Deleted { previous: TeredoPort::new(50_000) };
/// assert_eq!(allowed_after(deleted), None, "a deletion closes the port, never reopens it");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TeredoEvent {
    /// The OS confirmed the registration (`MibInitialNotification`). The OS passes no port
    /// here (zero); `port` is the port the watcher already knew (from `GetTeredoPort`, or a
    /// notification that came first), usually `None`.
    Initial {
        /// The last known port, unchanged by this event.
        port: Option<TeredoPort>,
    },
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
    /// `MibDeleteInstance`: the Teredo client went away. [`port`](TeredoEvent::port) is
    /// `None`: there is no port any more.
    Deleted {
        /// The port the OS passed with the deletion: the one that just went away.
        previous: Option<TeredoPort>,
    },
    /// A notification type this crate does not know, kept raw. It does not change the port.
    Unknown {
        /// The raw `MIB_NOTIFICATION_TYPE` value.
        raw_type: i32,
        /// The raw port argument the OS passed.
        raw_port: u16,
        /// The last known port, unchanged by this event.
        port: Option<TeredoPort>,
    },
    /// The current state, delivered when the watcher learned it other than from a
    /// notification of its own: to a subscriber that asked for it when subscribing, after
    /// `GetTeredoPort` found a port at creation (the seed), and after notifications that
    /// the OS overlapped were coalesced into their newest state.
    Snapshot {
        /// The last known port.
        port: Option<TeredoPort>,
    },
}

impl TeredoEvent {
    /// The event for a raw notification from the OS, when the last known port was
    /// `previous`.
    #[must_use]
    pub const fn from_raw(port: u16, raw_type: i32, previous: Option<TeredoPort>) -> TeredoEvent {
        let raw_port = port;
        let port = TeredoPort::new(port);
        match MibNotificationType::from_raw(raw_type) {
            MibNotificationType::Initial => TeredoEvent::Initial { port: previous },
            MibNotificationType::Parameter => TeredoEvent::PortChanged { port },
            MibNotificationType::AddInstance => TeredoEvent::Added { port },
            MibNotificationType::DeleteInstance => TeredoEvent::Deleted { previous: port },
            MibNotificationType::Unknown(raw_type) => TeredoEvent::Unknown {
                raw_type,
                raw_port,
                port: previous,
            },
        }
    }

    /// The Teredo port after this event, as far as the watcher knows; `None` when no client
    /// is known to run (always `None` after [`Deleted`](TeredoEvent::Deleted)).
    #[must_use]
    pub const fn port(&self) -> Option<TeredoPort> {
        match *self {
            TeredoEvent::Deleted { .. } => None,
            TeredoEvent::Initial { port }
            | TeredoEvent::PortChanged { port }
            | TeredoEvent::Added { port }
            | TeredoEvent::Unknown { port, .. }
            | TeredoEvent::Snapshot { port } => port,
        }
    }

    /// Whether this event sets the port (a change, an addition, a deletion, a snapshot),
    /// rather than leaving it as it was (the initial notification, an unknown type).
    #[must_use]
    pub const fn sets_port(&self) -> bool {
        !matches!(
            self,
            TeredoEvent::Initial { .. } | TeredoEvent::Unknown { .. }
        )
    }
}
