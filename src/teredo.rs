//! Teredo facts (RFC 4380 and the netio documentation) as API, and what a firewall must allow
//! for Teredo as rules a WFP filter can be built from.
//!
//! # The exception rules
//!
//! Sources: Microsoft's Win32 documentation, *Required Firewall Exceptions for Teredo*, and
//! Microsoft Support KB 968510, *Firewall requirements for coexisting with Teredo* (cited the
//! same way in `docs/kernel-facts.md`); RFC 4380 for the multicast group.
//!
//! | rule ([`RuleKind`]) | direction | IP | protocol | match | [`Requirement`] |
//! |---|---|---|---|---|---|
//! | [`DynamicPort`](RuleKind::DynamicPort) | both | v4 | UDP | local port = the client's service port, when known | required |
//! | [`TeredoServer`](RuleKind::TeredoServer) | both | v4 | UDP | remote port 3544, any remote address | required |
//! | [`LocalDiscovery`](RuleKind::LocalDiscovery) | inbound | v4 | UDP | local port 3544 **and** local (destination) address 224.0.0.253 | required |
//! | [`Upnp`](RuleKind::Upnp) | both | v4 | UDP | remote port 1900, remote on the local subnet | **policy choice**, off by default |
//! | [`Icmpv6`](RuleKind::Icmpv6) | both | v6 | ICMPv6 | type 1, 2, 3, 4, 128, 129, 133, 134, 135 or 136 | required |
//!
//! Choices we made where Microsoft's text leaves room, each a reading of the pages above:
//! - **UPnP is off by default** ([`TeredoExceptions::with_upnp`] turns it on). Microsoft calls
//!   it optional ("improves connectivity rates"); opening SSDP to the local subnet is a
//!   decision for the firewall's policy, not a requirement of Teredo. We read "UDP port 1900"
//!   as the remote port (SSDP's well-known port on the gateway and devices), both directions.
//! - **ICMPv6 both ways.** The pages list the types without a direction; neighbor discovery,
//!   echo (for a host-specific relay) and the error messages all flow both ways.
//!   Microsoft's fallback, "all ICMPv6 if they cannot be allowed one by one", is not
//!   expressed: WFP conditions can name the type (`FWPM_CONDITION_ICMP_TYPE`), so we name them.
//! - **Multicast discovery is inbound only.** The client's own multicast bubbles to
//!   224.0.0.253:3544 leave from its service port, so [`RuleKind::DynamicPort`] covers them.
//! - **The server rule has no local-port condition**, as Microsoft writes it: a packet from or
//!   to remote port 3544 is allowed whatever its local port, so unicast to a local 3544 *from
//!   remote port 3544* is allowed by this rule (not by discovery).
//!
//! **DNS is out of scope.** Microsoft's list also requires that the client can resolve
//! [`TEREDO_SERVER_NAME`]. That is ordinary DNS traffic to the host's configured resolvers
//! (UDP/TCP 53 to addresses we cannot know, or the local DNS client service), not traffic a
//! Teredo-specific rule can name by port or address: no [`ExceptionRule`] stands for it, and
//! [`TeredoExceptions::allows`] allows no DNS packet. A firewall that filters DNS must keep
//! its own rule that lets the host resolve [`TEREDO_SERVER_NAME`].

use core::net::{IpAddr, Ipv4Addr};

use crate::event::TeredoPort;

/// The static UDP port of Teredo: the Teredo server's port (the client talks to remote
/// 3544) and the port the client listens on for multicast discovery on
/// [`TEREDO_MULTICAST_GROUP`] (RFC 4380).
pub const TEREDO_STATIC_PORT: u16 = 3544;

/// The IPv4 multicast group the Teredo client listens to on [`TEREDO_STATIC_PORT`].
pub const TEREDO_MULTICAST_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 253);

/// The UDP port of UPnP discovery (SSDP), for the optional [`RuleKind::Upnp`] rule.
pub const UPNP_PORT: u16 = 1900;

/// The name the Teredo client resolves to find its server. Its DNS traffic is the
/// firewall's own DNS rule's business (see the module documentation).
pub const TEREDO_SERVER_NAME: &str = "teredo.ipv6.microsoft.com";

/// The ICMPv6 types Microsoft lists, in ascending order: destination unreachable (1), packet
/// too big (2), time exceeded (3), parameter problem (4), echo request/reply (128/129, for a
/// host-specific relay), router solicitation/advertisement (133/134), neighbor
/// solicitation/advertisement (135/136).
pub const TEREDO_ICMPV6_TYPES: [u8; 10] = [1, 2, 3, 4, 128, 129, 133, 134, 135, 136];

/// The most rules [`TeredoExceptions::rules`] yields: the dynamic port, the server, local
/// discovery, UPnP and one per [`TEREDO_ICMPV6_TYPES`] entry.
pub const MAX_EXCEPTION_RULES: usize = 4 + TEREDO_ICMPV6_TYPES.len();

/// The direction of one packet, from the local host's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Received by the local host.
    Inbound,
    /// Sent by the local host.
    Outbound,
}

/// The directions a rule applies to (a WFP filter per direction, or both layers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleDirection {
    /// Inbound packets only.
    Inbound,
    /// Outbound packets only.
    Outbound,
    /// Both directions.
    Both,
}

impl RuleDirection {
    /// Whether a packet going `direction` is in this rule's directions.
    #[must_use]
    pub const fn includes(self, direction: Direction) -> bool {
        matches!(
            (self, direction),
            (RuleDirection::Both, _)
                | (RuleDirection::Inbound, Direction::Inbound)
                | (RuleDirection::Outbound, Direction::Outbound)
        )
    }
}

/// An IP version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpVersion {
    /// IPv4 (Teredo's UDP transport).
    V4,
    /// IPv6 (the tunnelled traffic, ICMPv6 included).
    V6,
}

/// The protocol a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// UDP (IP protocol 17).
    Udp,
    /// ICMPv6 (IPv6 next header 58).
    Icmpv6,
}

/// Where a rule's remote end may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RemoteScope {
    /// Any remote address.
    Any,
    /// A remote address on a subnet of the interface the packet uses. Only the caller knows
    /// the interface's prefixes; it says so in [`PacketView::remote_on_local_subnet`].
    LocalSubnet,
}

/// Whether a rule is Microsoft's requirement or a policy choice of the firewall.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Requirement {
    /// Microsoft lists it as required for Teredo to work.
    Required,
    /// Microsoft calls it optional; the firewall's policy decides (see
    /// [`TeredoExceptions::with_upnp`]).
    PolicyChoice,
}

/// Which of Microsoft's exceptions a rule expresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleKind {
    /// The client's dynamic service port (what `GetTeredoPort`/`NotifyTeredoPortChange`
    /// report): local UDP port, both directions.
    DynamicPort,
    /// The Teredo server: UDP to and from remote port 3544.
    TeredoServer,
    /// Local discovery: inbound UDP to local port 3544 on the multicast group 224.0.0.253.
    LocalDiscovery,
    /// UPnP discovery: UDP to and from remote port 1900 on the local subnet (optional).
    Upnp,
    /// One of [`TEREDO_ICMPV6_TYPES`].
    Icmpv6,
}

/// One exception as a WFP filter can be built from it: every `Some`/non-`Any` field is one
/// filter condition, and a packet matches when it meets them all ([`matches`](Self::matches)).
///
/// # Invariants
///
/// The rules this module makes (its constants and constructors, hence
/// [`TeredoExceptions::rules`]) are IPv4 UDP rules without `icmpv6_type`, or IPv6 ICMPv6
/// rules with `icmpv6_type` and no port or local address. The fields are public so a filter
/// can be built from them; a rule assembled by hand is the caller's, and
/// [`matches`](Self::matches) stays total for it (a contradictory rule matches nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExceptionRule {
    /// Which of Microsoft's exceptions this is.
    pub kind: RuleKind,
    /// Microsoft's requirement or a policy choice.
    pub requirement: Requirement,
    /// The directions it applies to.
    pub direction: RuleDirection,
    /// The IP version.
    pub ip_version: IpVersion,
    /// The protocol.
    pub protocol: Protocol,
    /// The local port, if the rule names one.
    pub local_port: Option<u16>,
    /// The remote port, if the rule names one.
    pub remote_port: Option<u16>,
    /// The local address (the destination of an inbound packet), if the rule names one.
    pub local_address: Option<Ipv4Addr>,
    /// Where the remote end may be.
    pub remote_scope: RemoteScope,
    /// The ICMPv6 type, on an ICMPv6 rule.
    pub icmpv6_type: Option<u8>,
    /// Where the rule comes from (page names as `docs/kernel-facts.md` cites them).
    pub source: &'static str,
}

/// Microsoft's two pages, as cited for every rule.
const MICROSOFT: &str = "Required Firewall Exceptions for Teredo (Win32 docs); KB 968510";
/// The multicast rule's sources.
const MICROSOFT_AND_RFC: &str =
    "Required Firewall Exceptions for Teredo (Win32 docs); KB 968510; RFC 4380";

impl ExceptionRule {
    /// A UDP/IPv4 rule, both directions, any remote, required: the shape most rules share.
    const fn udp4(kind: RuleKind, local_port: Option<u16>, remote_port: Option<u16>) -> Self {
        ExceptionRule {
            kind,
            requirement: Requirement::Required,
            direction: RuleDirection::Both,
            ip_version: IpVersion::V4,
            protocol: Protocol::Udp,
            local_port,
            remote_port,
            local_address: None,
            remote_scope: RemoteScope::Any,
            icmpv6_type: None,
            source: MICROSOFT,
        }
    }

    /// The dynamic-port rule for `port`.
    #[must_use]
    pub const fn dynamic_port(port: TeredoPort) -> Self {
        Self::udp4(RuleKind::DynamicPort, Some(port.get()), None)
    }

    /// The Teredo server rule: UDP/IPv4 to and from remote port 3544.
    pub const TEREDO_SERVER: Self =
        Self::udp4(RuleKind::TeredoServer, None, Some(TEREDO_STATIC_PORT));

    /// The local discovery rule: inbound UDP/IPv4 to 224.0.0.253, local port 3544.
    pub const LOCAL_DISCOVERY: Self = ExceptionRule {
        direction: RuleDirection::Inbound,
        local_address: Some(TEREDO_MULTICAST_GROUP),
        source: MICROSOFT_AND_RFC,
        ..Self::udp4(RuleKind::LocalDiscovery, Some(TEREDO_STATIC_PORT), None)
    };

    /// The optional UPnP rule: UDP/IPv4 to and from remote port 1900 on the local subnet.
    pub const UPNP: Self = ExceptionRule {
        requirement: Requirement::PolicyChoice,
        remote_scope: RemoteScope::LocalSubnet,
        ..Self::udp4(RuleKind::Upnp, None, Some(UPNP_PORT))
    };

    /// The rule for one ICMPv6 type (both directions). Meant for [`TEREDO_ICMPV6_TYPES`];
    /// another type gives a rule Microsoft does not list.
    #[must_use]
    pub const fn icmpv6(icmpv6_type: u8) -> Self {
        ExceptionRule {
            kind: RuleKind::Icmpv6,
            requirement: Requirement::Required,
            direction: RuleDirection::Both,
            ip_version: IpVersion::V6,
            protocol: Protocol::Icmpv6,
            local_port: None,
            remote_port: None,
            local_address: None,
            remote_scope: RemoteScope::Any,
            icmpv6_type: Some(icmpv6_type),
            source: MICROSOFT,
        }
    }

    /// Whether `packet` meets every condition of this rule. No allocation, no panic.
    #[must_use]
    pub const fn matches(&self, packet: &PacketView) -> bool {
        if !self.direction.includes(packet.direction) {
            return false;
        }
        let version_ok = matches!(
            (self.ip_version, packet.local_address),
            (IpVersion::V4, IpAddr::V4(_)) | (IpVersion::V6, IpAddr::V6(_))
        );
        if !version_ok {
            return false;
        }
        if let Some(want) = self.local_address {
            match packet.local_address {
                IpAddr::V4(have) if have.to_bits() == want.to_bits() => {}
                _ => return false,
            }
        }
        if matches!(self.remote_scope, RemoteScope::LocalSubnet) && !packet.remote_on_local_subnet {
            return false;
        }
        match (self.protocol, packet.transport) {
            (
                Protocol::Udp,
                Transport::Udp {
                    local_port,
                    remote_port,
                },
            ) => {
                port_ok(self.local_port, local_port)
                    && port_ok(self.remote_port, remote_port)
                    && self.icmpv6_type.is_none()
            }
            (Protocol::Icmpv6, Transport::Icmpv6 { icmp_type }) => {
                self.local_port.is_none()
                    && self.remote_port.is_none()
                    && match self.icmpv6_type {
                        Some(want) => want == icmp_type,
                        None => true,
                    }
            }
            _ => false,
        }
    }
}

/// Whether a port condition (`None`: no condition) holds for `have`.
const fn port_ok(want: Option<u16>, have: u16) -> bool {
    match want {
        Some(want) => want == have,
        None => true,
    }
}

/// The transport part of a packet, as far as the rules look at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP with its ports, from the local host's side.
    Udp {
        /// The local host's port (the destination port of an inbound packet).
        local_port: u16,
        /// The remote end's port.
        remote_port: u16,
    },
    /// ICMPv6 with its type.
    Icmpv6 {
        /// The ICMPv6 type.
        icmp_type: u8,
    },
    /// Any other protocol (TCP, ICMP for IPv4, ...): no Teredo rule allows it.
    Other {
        /// The IP protocol number (IPv6: next header).
        protocol: u8,
    },
}

/// What a classify function knows about one packet, as far as the Teredo rules look at it.
///
/// A WFP classify function fills it from its incoming values: the layer gives the direction
/// and IP version, `FWPS_FIELD_..._IP_LOCAL_ADDRESS`, `..._IP_PROTOCOL`, `..._IP_LOCAL_PORT`
/// and `..._IP_REMOTE_PORT` the rest (for ICMP, WFP reports the type in the local-port field).
/// The IP version is `local_address`'s.
///
/// The remote address is not carried: no rule names one, and the one scope a rule has
/// ("local subnet") needs the interface's prefixes, which the caller has and this crate does
/// not; the caller decides it in [`remote_on_local_subnet`](Self::remote_on_local_subnet).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PacketView {
    /// Inbound or outbound.
    pub direction: Direction,
    /// The local host's address: the destination of an inbound packet (a multicast group
    /// for multicast), the source of an outbound one.
    pub local_address: IpAddr,
    /// Whether the remote address is on a subnet of the packet's interface (only the
    /// [`RuleKind::Upnp`] rule looks at it).
    pub remote_on_local_subnet: bool,
    /// Protocol and ports, or ICMPv6 type.
    pub transport: Transport,
}

impl PacketView {
    /// A UDP/IPv4 packet, remote not on the local subnet.
    #[must_use]
    pub const fn udp4(
        direction: Direction,
        local_address: Ipv4Addr,
        local_port: u16,
        remote_port: u16,
    ) -> Self {
        PacketView {
            direction,
            local_address: IpAddr::V4(local_address),
            remote_on_local_subnet: false,
            transport: Transport::Udp {
                local_port,
                remote_port,
            },
        }
    }

    /// An ICMPv6 packet of type `icmp_type`, remote not on the local subnet.
    #[must_use]
    pub const fn icmpv6(
        direction: Direction,
        local_address: core::net::Ipv6Addr,
        icmp_type: u8,
    ) -> Self {
        PacketView {
            direction,
            local_address: IpAddr::V6(local_address),
            remote_on_local_subnet: false,
            transport: Transport::Icmpv6 { icmp_type },
        }
    }

    /// The same packet with [`remote_on_local_subnet`](Self::remote_on_local_subnet) set.
    #[must_use]
    pub const fn on_local_subnet(mut self, on: bool) -> Self {
        self.remote_on_local_subnet = on;
        self
    }

    /// The packet's IP version (its local address's).
    #[must_use]
    pub const fn ip_version(&self) -> IpVersion {
        match self.local_address {
            IpAddr::V4(_) => IpVersion::V4,
            IpAddr::V6(_) => IpVersion::V6,
        }
    }
}

/// The exceptions a firewall should allow for Teredo right now: the state the rules are made
/// from ([`rules`](Self::rules)) and the per-packet check ([`allows`](Self::allows)).
///
/// # Examples
///
/// ```
/// use core::net::{Ipv4Addr, Ipv6Addr};
/// use teredo_watcher::{Direction, PacketView, RuleKind, TeredoExceptions, TeredoPort};
///
/// let now = TeredoExceptions::for_port(TeredoPort::new(50_000));
/// let host = Ipv4Addr::new(192, 168, 1, 20);
/// // The dynamic port, both ways.
/// assert!(now.allows(&PacketView::udp4(Direction::Inbound, host, 50_000, 61_000)));
/// // Unicast to local 3544 is not Teredo traffic ...
/// assert!(!now.allows(&PacketView::udp4(Direction::Inbound, host, 3544, 61_000)));
/// // ... multicast discovery on 224.0.0.253:3544 is.
/// let group = Ipv4Addr::new(224, 0, 0, 253);
/// assert!(now.allows(&PacketView::udp4(Direction::Inbound, group, 3544, 61_000)));
/// // The Teredo server, remote port 3544, both ways.
/// assert!(now.allows(&PacketView::udp4(Direction::Outbound, host, 61_000, 3544)));
/// // Neighbor solicitation yes, an ICMPv6 type Microsoft does not list no.
/// let v6 = Ipv6Addr::LOCALHOST;
/// assert!(now.allows(&PacketView::icmpv6(Direction::Inbound, v6, 135)));
/// assert!(!now.allows(&PacketView::icmpv6(Direction::Inbound, v6, 137)));
///
/// // The rules a WFP filter set is built from: dynamic port, server, discovery, ICMPv6.
/// assert_eq!(now.rules().len(), 13);
/// assert!(now.rules().any(|r| r.kind == RuleKind::DynamicPort && r.local_port == Some(50_000)));
/// assert_eq!(TeredoExceptions::for_port(None).rules().len(), 12);
/// assert_eq!(now.with_upnp(true).rules().len(), 14);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TeredoExceptions {
    /// The dynamic service port, when the client is known to run.
    pub dynamic_port: Option<TeredoPort>,
    /// Always [`TEREDO_STATIC_PORT`].
    pub static_port: u16,
    /// Always [`TEREDO_MULTICAST_GROUP`].
    pub multicast_group: Ipv4Addr,
    /// Whether the optional UPnP rule ([`RuleKind::Upnp`]) is part of the set: a policy
    /// choice, `false` from [`for_port`](Self::for_port).
    pub upnp: bool,
}

impl TeredoExceptions {
    /// The exception set for a given dynamic port, without the optional UPnP rule.
    #[must_use]
    pub const fn for_port(dynamic_port: Option<TeredoPort>) -> Self {
        TeredoExceptions {
            dynamic_port,
            static_port: TEREDO_STATIC_PORT,
            multicast_group: TEREDO_MULTICAST_GROUP,
            upnp: false,
        }
    }

    /// The same set with the optional UPnP rule in or out (a policy choice: Microsoft says
    /// it "improves connectivity rates"; it opens SSDP to and from the local subnet).
    #[must_use]
    pub const fn with_upnp(mut self, upnp: bool) -> Self {
        self.upnp = upnp;
        self
    }

    /// The rules of this set, in a fixed order: the dynamic port (when known), the server,
    /// local discovery, UPnP (when chosen), then one per [`TEREDO_ICMPV6_TYPES`] entry. At
    /// most [`MAX_EXCEPTION_RULES`]; no allocation.
    pub const fn rules(&self) -> Rules {
        Rules {
            set: *self,
            next: 0,
        }
    }

    /// The rule in slot `slot` of the fixed order, `None` for a slot this set leaves out (or
    /// past the end). Slots: 0 dynamic port, 1 server, 2 discovery, 3 UPnP, 4.. ICMPv6.
    const fn rule_at(&self, slot: usize) -> Option<ExceptionRule> {
        match slot {
            0 => match self.dynamic_port {
                Some(port) => Some(ExceptionRule::dynamic_port(port)),
                None => None,
            },
            1 => Some(ExceptionRule::TEREDO_SERVER),
            2 => Some(ExceptionRule::LOCAL_DISCOVERY),
            3 if self.upnp => Some(ExceptionRule::UPNP),
            3 => None,
            _ => {
                let i = slot.wrapping_sub(4);
                if i < TEREDO_ICMPV6_TYPES.len() {
                    Some(ExceptionRule::icmpv6(TEREDO_ICMPV6_TYPES[i]))
                } else {
                    None
                }
            }
        }
    }

    /// Whether `packet` matches one of [`rules`](Self::rules): the per-packet check of a
    /// classify function. Exact for the rules (the tests compare it with the rules for every
    /// UDP port): unicast to local 3544 is not allowed, multicast to 224.0.0.253:3544 is.
    /// No allocation, no panic, no lock; a few comparisons.
    ///
    /// # IRQL
    ///
    /// Any.
    #[must_use]
    pub const fn allows(&self, packet: &PacketView) -> bool {
        match (packet.local_address, packet.transport) {
            (
                IpAddr::V4(local),
                Transport::Udp {
                    local_port,
                    remote_port,
                },
            ) => {
                let dynamic = match self.dynamic_port {
                    Some(p) => p.get() == local_port,
                    None => false,
                };
                // Every UDP rule but discovery applies both ways.
                dynamic
                    || remote_port == TEREDO_STATIC_PORT
                    || (matches!(packet.direction, Direction::Inbound)
                        && local_port == TEREDO_STATIC_PORT
                        && local.to_bits() == TEREDO_MULTICAST_GROUP.to_bits())
                    || (self.upnp && remote_port == UPNP_PORT && packet.remote_on_local_subnet)
            }
            // ICMPv6 rules apply both ways, to the listed types only.
            (IpAddr::V6(_), Transport::Icmpv6 { icmp_type }) => {
                matches!(icmp_type, 1..=4 | 128 | 129 | 133..=136)
            }
            _ => false,
        }
    }

    /// Whether UDP traffic on local port `port` is the static port or the dynamic port.
    #[deprecated(
        since = "0.1.0",
        note = "allows any traffic to local 3544, but Microsoft allows 3544 only for the \
                multicast group 224.0.0.253 and the server by remote port: use \
                `TeredoExceptions::allows` with a `PacketView`"
    )]
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

/// The rules of a [`TeredoExceptions`] set ([`TeredoExceptions::rules`]): a copy of the set
/// and a slot index, no allocation.
#[derive(Clone, Debug)]
#[must_use = "an iterator does nothing unless consumed"]
pub struct Rules {
    set: TeredoExceptions,
    /// The next slot to look at; `<= MAX_EXCEPTION_RULES`.
    next: usize,
}

impl Iterator for Rules {
    type Item = ExceptionRule;

    fn next(&mut self) -> Option<ExceptionRule> {
        while self.next < MAX_EXCEPTION_RULES {
            let slot = self.next;
            self.next += 1;
            if let Some(rule) = self.set.rule_at(slot) {
                return Some(rule);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.next..MAX_EXCEPTION_RULES)
            .filter(|&slot| self.set.rule_at(slot).is_some())
            .count();
        (left, Some(left))
    }
}

impl ExactSizeIterator for Rules {}

impl core::iter::FusedIterator for Rules {}

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
        )?;
        if self.upnp {
            write!(f, ", upnp udp/{UPNP_PORT} (local subnet)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv6Addr;
    use std::string::ToString;

    const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 20);
    const V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0, 0x4136, 0xe378, 0x8000, 0x63bf, 0x3fff, 0xfdd2);
    const DIRECTIONS: [Direction; 2] = [Direction::Inbound, Direction::Outbound];

    fn port(p: u16) -> Option<TeredoPort> {
        TeredoPort::new(p)
    }

    /// The check against the rules it claims to be exact for.
    fn by_rules(set: &TeredoExceptions, packet: &PacketView) -> bool {
        set.rules().any(|r| r.matches(packet))
    }

    /// The sets the tests cover: no port, a typical port, the static port as dynamic port,
    /// the top port; each with and without UPnP.
    fn sets() -> impl Iterator<Item = TeredoExceptions> {
        [None, port(50_000), port(TEREDO_STATIC_PORT), port(u16::MAX)]
            .into_iter()
            .flat_map(|p| [false, true].map(|upnp| TeredoExceptions::for_port(p).with_upnp(upnp)))
    }

    #[test]
    fn unicast_to_local_3544_is_not_allowed_multicast_is() {
        let set = TeredoExceptions::for_port(port(50_000));
        assert!(!set.allows(&PacketView::udp4(Direction::Inbound, HOST, 3544, 61_000)));
        assert!(!set.allows(&PacketView::udp4(
            Direction::Inbound,
            Ipv4Addr::new(224, 0, 0, 252),
            3544,
            61_000
        )));
        assert!(set.allows(&PacketView::udp4(
            Direction::Inbound,
            TEREDO_MULTICAST_GROUP,
            3544,
            61_000
        )));
        // Discovery is inbound only, and on port 3544 only.
        assert!(!set.allows(&PacketView::udp4(
            Direction::Outbound,
            TEREDO_MULTICAST_GROUP,
            3544,
            61_000
        )));
        assert!(!set.allows(&PacketView::udp4(
            Direction::Inbound,
            TEREDO_MULTICAST_GROUP,
            3545,
            61_000
        )));
    }

    #[test]
    fn server_and_dynamic_port_both_ways() {
        let set = TeredoExceptions::for_port(port(50_000));
        for d in DIRECTIONS {
            assert!(
                set.allows(&PacketView::udp4(d, HOST, 61_000, 3544)),
                "{d:?}"
            );
            assert!(
                set.allows(&PacketView::udp4(d, HOST, 50_000, 61_000)),
                "{d:?}"
            );
            assert!(
                !set.allows(&PacketView::udp4(d, HOST, 50_001, 61_000)),
                "{d:?}"
            );
        }
        let stopped = TeredoExceptions::for_port(None);
        assert!(!stopped.allows(&PacketView::udp4(Direction::Inbound, HOST, 50_000, 61_000)));
        // The server rule still holds without a known client port.
        assert!(stopped.allows(&PacketView::udp4(Direction::Outbound, HOST, 50_000, 3544)));
    }

    #[test]
    fn upnp_is_a_policy_choice_off_by_default_and_local_subnet_only() {
        let off = TeredoExceptions::for_port(port(50_000));
        let on = off.with_upnp(true);
        let ssdp = PacketView::udp4(Direction::Inbound, HOST, 61_000, UPNP_PORT);
        assert!(!off.allows(&ssdp.on_local_subnet(true)));
        assert!(on.allows(&ssdp.on_local_subnet(true)));
        assert!(!on.allows(&ssdp), "remote beyond the local subnet");
        assert_eq!(ExceptionRule::UPNP.requirement, Requirement::PolicyChoice);
        assert!(
            on.rules()
                .filter(|r| r.requirement == Requirement::PolicyChoice)
                .all(|r| r.kind == RuleKind::Upnp)
        );
        assert!(off.rules().all(|r| r.requirement == Requirement::Required));
    }

    #[test]
    fn icmpv6_listed_types_only_and_only_over_ipv6() {
        let set = TeredoExceptions::for_port(None);
        for t in 0..=u8::MAX {
            let listed = TEREDO_ICMPV6_TYPES.contains(&t);
            for d in DIRECTIONS {
                let packet = PacketView::icmpv6(d, V6, t);
                assert_eq!(set.allows(&packet), listed, "type {t} {d:?}");
                assert_eq!(by_rules(&set, &packet), listed, "type {t} {d:?}");
            }
        }
        // ICMPv6 numbers on an IPv4 packet, and other protocols, are no Teredo traffic.
        let mut v4 = PacketView::icmpv6(Direction::Inbound, V6, 135);
        v4.local_address = IpAddr::V4(HOST);
        assert!(!set.allows(&v4) && !by_rules(&set, &v4));
        let tcp = PacketView {
            transport: Transport::Other { protocol: 6 },
            ..PacketView::udp4(Direction::Inbound, HOST, 3544, 3544)
        };
        assert!(!set.allows(&tcp) && !by_rules(&set, &tcp));
    }

    #[test]
    fn udp_over_ipv6_is_never_allowed() {
        // Teredo's UDP transport is IPv4; the rules are IPv4 rules.
        let set = TeredoExceptions::for_port(port(50_000)).with_upnp(true);
        for (local, remote) in [(50_000, 1), (1, 3544), (3544, 1), (1, UPNP_PORT)] {
            let mut packet = PacketView::udp4(Direction::Inbound, HOST, local, remote);
            packet.local_address = IpAddr::V6(V6);
            let packet = packet.on_local_subnet(true);
            assert!(!set.allows(&packet), "{local} {remote}");
            assert!(!by_rules(&set, &packet), "{local} {remote}");
        }
    }

    /// Property, exhaustive over ports: for every set, every direction, both kinds of local
    /// address (unicast host, the group), both subnet answers and every UDP port as the local
    /// port (remote ephemeral) and as the remote port (local ephemeral), the check equals
    /// the rules, and both equal the rules as Microsoft states them.
    /// Every port; under Miri (which interprets each instruction) the ports around every
    /// boundary of the rules and a stride over the rest.
    fn ports_to_check(set: TeredoExceptions) -> std::vec::Vec<u16> {
        if !cfg!(miri) {
            return (0..=u16::MAX).collect();
        }
        let mut ports: std::vec::Vec<u16> = (0..=u16::MAX).step_by(4_099).collect();
        let dynamic = set.dynamic_port.map_or(0, TeredoPort::get);
        for edge in [
            0,
            TEREDO_STATIC_PORT,
            UPNP_PORT,
            dynamic,
            61_000,
            61_001,
            u16::MAX,
        ] {
            ports.extend([edge.saturating_sub(1), edge, edge.saturating_add(1)]);
        }
        ports
    }

    #[test]
    fn udp_check_is_exact_for_the_rules_on_every_port() {
        for set in sets() {
            // The rules once per set (the check under test is `allows`, not the iterator).
            let rules: std::vec::Vec<ExceptionRule> = set.rules().collect();
            let by_rules = |packet: &PacketView| rules.iter().any(|r| r.matches(packet));
            for d in DIRECTIONS {
                for local_address in [HOST, TEREDO_MULTICAST_GROUP] {
                    for subnet in [false, true] {
                        for p in ports_to_check(set) {
                            let spec_local = set.dynamic_port.is_some_and(|x| x.get() == p)
                                || (d == Direction::Inbound
                                    && p == TEREDO_STATIC_PORT
                                    && local_address == TEREDO_MULTICAST_GROUP);
                            let as_local = PacketView::udp4(d, local_address, p, 61_000)
                                .on_local_subnet(subnet);
                            assert_eq!(set.allows(&as_local), spec_local, "{set} {as_local:?}");
                            assert_eq!(by_rules(&as_local), spec_local, "{set} {as_local:?}");

                            let spec_remote = p == TEREDO_STATIC_PORT
                                || (set.upnp && subnet && p == UPNP_PORT)
                                || set.dynamic_port.is_some_and(|x| x.get() == 61_001);
                            let as_remote = PacketView::udp4(d, local_address, 61_001, p)
                                .on_local_subnet(subnet);
                            assert_eq!(set.allows(&as_remote), spec_remote, "{set} {as_remote:?}");
                            assert_eq!(by_rules(&as_remote), spec_remote, "{set} {as_remote:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rules_are_in_fixed_order_with_exact_length() {
        let set = TeredoExceptions::for_port(port(50_000)).with_upnp(true);
        let mut rules = set.rules();
        assert_eq!(rules.len(), MAX_EXCEPTION_RULES);
        assert_eq!(
            rules.next(),
            Some(ExceptionRule::dynamic_port(
                TeredoPort::new(50_000).unwrap()
            ))
        );
        assert_eq!(rules.next(), Some(ExceptionRule::TEREDO_SERVER));
        assert_eq!(rules.next(), Some(ExceptionRule::LOCAL_DISCOVERY));
        assert_eq!(rules.next(), Some(ExceptionRule::UPNP));
        assert_eq!(rules.len(), TEREDO_ICMPV6_TYPES.len());
        let types: std::vec::Vec<Option<u8>> = rules.by_ref().map(|r| r.icmpv6_type).collect();
        assert_eq!(types, TEREDO_ICMPV6_TYPES.map(Some));
        assert_eq!((rules.len(), rules.next()), (0, None));
        assert_eq!(rules.next(), None, "fused");

        let stopped = TeredoExceptions::for_port(None);
        assert_eq!(stopped.rules().len(), MAX_EXCEPTION_RULES - 2);
        assert!(
            stopped
                .rules()
                .all(|r| r.kind != RuleKind::DynamicPort && r.kind != RuleKind::Upnp)
        );
    }

    #[test]
    fn rules_carry_their_conditions_and_sources() {
        let discovery = ExceptionRule::LOCAL_DISCOVERY;
        assert_eq!(discovery.direction, RuleDirection::Inbound);
        assert_eq!(discovery.local_port, Some(TEREDO_STATIC_PORT));
        assert_eq!(discovery.local_address, Some(TEREDO_MULTICAST_GROUP));
        assert!(discovery.source.contains("RFC 4380"));
        let server = ExceptionRule::TEREDO_SERVER;
        assert_eq!((server.local_port, server.remote_port), (None, Some(3544)));
        assert_eq!(server.direction, RuleDirection::Both);
        for rule in TeredoExceptions::for_port(port(1)).with_upnp(true).rules() {
            assert!(rule.source.contains("KB 968510"), "{rule:?}");
            // The invariants of `ExceptionRule`.
            match rule.protocol {
                Protocol::Udp => {
                    assert_eq!(rule.ip_version, IpVersion::V4);
                    assert!(rule.icmpv6_type.is_none());
                }
                Protocol::Icmpv6 => {
                    assert_eq!(rule.ip_version, IpVersion::V6);
                    assert!(rule.icmpv6_type.is_some() && rule.local_port.is_none());
                    assert!(rule.remote_port.is_none() && rule.local_address.is_none());
                }
            }
        }
    }

    #[test]
    fn rule_direction_includes() {
        assert!(RuleDirection::Both.includes(Direction::Inbound));
        assert!(RuleDirection::Both.includes(Direction::Outbound));
        assert!(RuleDirection::Inbound.includes(Direction::Inbound));
        assert!(!RuleDirection::Inbound.includes(Direction::Outbound));
        assert!(!RuleDirection::Outbound.includes(Direction::Inbound));
    }

    #[test]
    fn the_set_is_const_constructible() {
        // What a driver keeps in a static and a classify function reads.
        const SET: TeredoExceptions =
            TeredoExceptions::for_port(TeredoPort::new(50_000)).with_upnp(false);
        const ALLOWED: bool = SET.allows(&PacketView::udp4(
            Direction::Inbound,
            TEREDO_MULTICAST_GROUP,
            3544,
            1,
        ));
        const FIRST: Option<ExceptionRule> = SET.rule_at(0);
        // Evaluated by the compiler: the check runs in const context.
        const { assert!(ALLOWED) };
        assert_eq!(FIRST.map(|r| r.local_port), Some(Some(50_000)));
        assert_eq!(
            PacketView::icmpv6(Direction::Inbound, V6, 1).ip_version(),
            IpVersion::V6
        );
    }

    #[test]
    fn display() {
        assert_eq!(
            TeredoExceptions::for_port(None).to_string(),
            "dynamic none, static udp/3544 (multicast 224.0.0.253)"
        );
        assert_eq!(
            TeredoExceptions::for_port(port(50_000))
                .with_upnp(true)
                .to_string(),
            "dynamic udp/50000, static udp/3544 (multicast 224.0.0.253), upnp udp/1900 (local subnet)"
        );
    }

    #[test]
    #[allow(deprecated, reason = "the deprecated check keeps its old meaning")]
    fn deprecated_port_check_still_overapproximates() {
        let set = TeredoExceptions::for_port(port(50_000));
        // What it is deprecated for: it allows unicast to 3544, which `allows` does not.
        assert!(set.allows_udp_port(3544));
        assert!(!set.allows(&PacketView::udp4(Direction::Inbound, HOST, 3544, 61_000)));
        assert!(set.allows_udp_port(50_000) && !set.allows_udp_port(50_001));
    }
}
