//! Teredo facts (RFC 4380 and the netio documentation) as API.

use core::net::Ipv4Addr;

use crate::event::TeredoPort;

/// The static UDP port the Teredo client listens on for multicast discovery.
pub const TEREDO_STATIC_PORT: u16 = 3544;

/// The IPv4 multicast group the Teredo client listens to on [`TEREDO_STATIC_PORT`].
pub const TEREDO_MULTICAST_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 253);

/// The exceptions a firewall should allow for Teredo right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TeredoExceptions {
    /// The dynamic service port, when the client is known to run.
    pub dynamic_port: Option<TeredoPort>,
    /// Always [`TEREDO_STATIC_PORT`].
    pub static_port: u16,
    /// Always [`TEREDO_MULTICAST_GROUP`].
    pub multicast_group: Ipv4Addr,
}

impl TeredoExceptions {
    /// The exception set for a given dynamic port.
    #[must_use]
    pub const fn for_port(dynamic_port: Option<TeredoPort>) -> Self {
        TeredoExceptions {
            dynamic_port,
            static_port: TEREDO_STATIC_PORT,
            multicast_group: TEREDO_MULTICAST_GROUP,
        }
    }

    /// Whether inbound or outbound UDP traffic on local port `port` is Teredo traffic that
    /// these exceptions allow. Cheap enough for a classify function.
    ///
    /// # Examples
    ///
    /// ```
    /// use teredo_watcher::{TeredoExceptions, TeredoPort};
    ///
    /// let now = TeredoExceptions::for_port(TeredoPort::new(50_000));
    /// assert!(now.allows_udp_port(50_000));
    /// assert!(!now.allows_udp_port(50_007));
    /// let stopped = TeredoExceptions::for_port(None);
    /// assert!(!stopped.allows_udp_port(50_000));
    /// ```
    #[must_use]
    pub const fn allows_udp_port(&self, port: u16) -> bool {
        if port == self.static_port {
            return true;
        }
        match self.dynamic_port {
            Some(p) => p.get() == port,
            None => false,
        }
    }
}

impl core::fmt::Display for TeredoExceptions {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.dynamic_port {
            Some(p) => write!(f, "dynamic {p}, ")?,
            None => f.write_str("dynamic none, ")?,
        }
        write!(
            f,
            "static udp/{} (multicast {})",
            self.static_port, self.multicast_group
        )
    }
}
