//! The firewall checks: a packet source classified through the filter engine model's
//! committed filters ([`crate::kernel::fwp`]), and the oracle that judges each verdict
//! against the Teredo exception rules of the library (`teredo_watcher::TeredoExceptions`)
//! for the port committed at that moment.
//!
//! # Definitions
//!
//! - A snapshot's **open ports**: the UDP ports `P` (other than 3544) for which an inbound
//!   UDP/IPv4 unicast packet to local port `P` from a remote port that no rule names is
//!   permitted by that snapshot. The candidates are every port a `FWPM_CONDITION_IP_LOCAL_PORT`
//!   condition of the snapshot names and every port netio reported, so a filter that opens a
//!   port netio never reported is found too.
//! - A snapshot **has the policy** when inbound UDP/IPv4 to a port no rule and no filter
//!   names (9) is blocked: the demo policy's block is in effect.
//! - The **committed port** of a snapshot: the newest port netio reported that is open in
//!   it (`None` when none is).
//! - The **oracle** for a packet classified through snapshot `S`: outbound, permit; inbound,
//!   permit when `TeredoExceptions::for_port(committed(S)).allows(packet)`, else block for
//!   UDP and ICMPv6, permit for other protocols. A verdict that differs is **wrong**.
//!
//! # Commit checks ([`commit_checks`])
//!
//! Over the snapshots published while the driver ran: every open port is one netio reported;
//! a snapshot with the policy opens at most one reported port; no commit takes the
//! exception away (a **gap**: the committed port goes from `Some` to `None`, or back to an
//! older port) while the client runs; and the **exception lag** of each notification: from
//! the notification carrying a new port to the first snapshot whose committed port it is.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use teredo_watcher::{
    Direction, PacketView, TEREDO_MULTICAST_GROUP, TEREDO_STATIC_PORT, TeredoExceptions,
    TeredoPort, Transport,
};

use crate::kernel::fwp::{EngineObjects, Field, Packet, Snapshot, Value, Verdict};

/// The local host's IPv4 address in the traffic.
pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 20);
/// A remote IPv4 peer (not on the local subnet).
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
/// The local host's IPv6 address (a Teredo address, in `2001::/32`).
pub const HOST_V6: Ipv6Addr =
    Ipv6Addr::new(0x2001, 0, 0x4136, 0xe378, 0x8000, 0x63bf, 0x3fff, 0xfdd2);
/// A remote IPv6 peer.
pub const PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);
/// A remote port no rule names (not 3544, not 1900).
pub const EPHEMERAL: u16 = 61_000;
/// A local UDP port no rule names and no filter of a correct driver names.
pub const UNUSED_PORT: u16 = 9;

/// What a packet of the source is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Inbound UDP/IPv4 to the client's current port.
    CurrentPort,
    /// Inbound UDP/IPv4 to the client's previous port.
    PreviousPort,
    /// Inbound UDP/IPv4 unicast to local 3544.
    UnicastStatic,
    /// Inbound UDP/IPv4 to 224.0.0.253:3544 (local discovery).
    MulticastStatic,
    /// Inbound UDP/IPv4 from remote port 3544 (the Teredo server).
    FromServer,
    /// Outbound UDP/IPv4 to remote port 3544.
    ToServer,
    /// Outbound UDP/IPv4 from the current port.
    OutboundCurrent,
    /// Inbound ICMPv6 of a type Microsoft lists.
    Icmpv6Listed,
    /// Inbound ICMPv6 of a type Microsoft does not list.
    Icmpv6Unlisted,
    /// Outbound ICMPv6 of a type Microsoft does not list.
    OutboundIcmpv6,
    /// Inbound UDP/IPv4 to a port no rule names.
    OtherUdp,
    /// Inbound UDP/IPv6.
    Udp6,
    /// Inbound TCP/IPv4 to the current port (another protocol: no rule, no block).
    Tcp,
}

/// One round of traffic: every [`Kind`] that applies (no current port: no `CurrentPort`,
/// `OutboundCurrent`, `Tcp`; no previous one: no `PreviousPort`). `round` varies the ICMPv6
/// type and the other port.
#[must_use]
pub fn traffic(current: Option<u16>, previous: Option<u16>, round: u64) -> Vec<(Kind, Packet)> {
    const LISTED: [u8; 10] = teredo_watcher::TEREDO_ICMPV6_TYPES;
    const UNLISTED: [u8; 4] = [0, 137, 130, 200];
    let pick = |n: usize| usize::try_from(round % n as u64).unwrap_or(0);
    let udp_in = |port| Packet::udp4(true, HOST_V4, port, PEER_V4, EPHEMERAL);
    let mut out = Vec::with_capacity(13);
    if let Some(port) = current {
        out.push((Kind::CurrentPort, udp_in(port)));
        out.push((
            Kind::OutboundCurrent,
            Packet::udp4(false, HOST_V4, port, PEER_V4, EPHEMERAL),
        ));
        let mut tcp = udp_in(port);
        tcp.protocol = 6;
        out.push((Kind::Tcp, tcp));
    }
    if let Some(port) = previous.filter(|p| Some(*p) != current) {
        out.push((Kind::PreviousPort, udp_in(port)));
    }
    out.push((Kind::UnicastStatic, udp_in(TEREDO_STATIC_PORT)));
    out.push((
        Kind::MulticastStatic,
        Packet::udp4(
            true,
            TEREDO_MULTICAST_GROUP,
            TEREDO_STATIC_PORT,
            PEER_V4,
            EPHEMERAL,
        ),
    ));
    out.push((
        Kind::FromServer,
        Packet::udp4(true, HOST_V4, 50_100, PEER_V4, TEREDO_STATIC_PORT),
    ));
    out.push((
        Kind::ToServer,
        Packet::udp4(false, HOST_V4, 50_100, PEER_V4, TEREDO_STATIC_PORT),
    ));
    out.push((
        Kind::Icmpv6Listed,
        Packet::icmpv6(true, HOST_V6, PEER_V6, LISTED[pick(LISTED.len())]),
    ));
    out.push((
        Kind::Icmpv6Unlisted,
        Packet::icmpv6(true, HOST_V6, PEER_V6, UNLISTED[pick(UNLISTED.len())]),
    ));
    out.push((
        Kind::OutboundIcmpv6,
        Packet::icmpv6(false, HOST_V6, PEER_V6, UNLISTED[pick(UNLISTED.len())]),
    ));
    let other = 1000 + u16::try_from(round % 2000).unwrap_or(0);
    out.push((Kind::OtherUdp, udp_in(other)));
    out.push((
        Kind::Udp6,
        Packet {
            inbound: true,
            protocol: 17,
            local_address: IpAddr::V6(HOST_V6),
            remote_address: IpAddr::V6(PEER_V6),
            local_port: current.unwrap_or(50_000),
            remote_port: EPHEMERAL,
        },
    ));
    out
}

/// The packet as the library's per-packet check sees it.
#[must_use]
pub fn view(packet: &Packet) -> PacketView {
    let direction = if packet.inbound {
        Direction::Inbound
    } else {
        Direction::Outbound
    };
    let transport = match (packet.protocol, packet.local_address) {
        (17, _) => Transport::Udp {
            local_port: packet.local_port,
            remote_port: packet.remote_port,
        },
        (58, IpAddr::V6(_)) => Transport::Icmpv6 {
            icmp_type: u8::try_from(packet.local_port).unwrap_or(u8::MAX),
        },
        (protocol, _) => Transport::Other { protocol },
    };
    PacketView {
        direction,
        local_address: packet.local_address,
        remote_on_local_subnet: false,
        transport,
    }
}

/// The oracle's verdict for `packet` when `committed` is the committed port.
#[must_use]
pub fn expected(committed: Option<u16>, packet: &Packet) -> Verdict {
    if !packet.inbound {
        return Verdict::Permit;
    }
    let rules = TeredoExceptions::for_port(committed.and_then(TeredoPort::new));
    if rules.allows(&view(packet)) {
        return Verdict::Permit;
    }
    match (packet.protocol, packet.local_address) {
        (17, _) | (58, IpAddr::V6(_)) => Verdict::Block,
        _ => Verdict::Permit,
    }
}

/// What one snapshot means for the Teredo exception.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Analysis {
    /// The demo policy's block is in effect.
    pub policy: bool,
    /// The open ports (see the module documentation), ascending.
    pub open: Vec<u16>,
    /// The committed port.
    pub committed: Option<u16>,
}

/// Analyses `objects` given the ports netio reported, oldest first.
#[must_use]
pub fn analyse(objects: &EngineObjects, reported: &[u16]) -> Analysis {
    let probe = |port| Packet::udp4(true, HOST_V4, port, PEER_V4, EPHEMERAL);
    let policy = objects.classify(&probe(UNUSED_PORT)).0 == Verdict::Block;
    let mut candidates: BTreeSet<u16> = reported.iter().copied().collect();
    for filter in objects.filters.values() {
        for c in &filter.conditions {
            if let (Field::LocalPort, Value::U16(port)) = (c.field, c.value) {
                candidates.insert(port);
            }
        }
    }
    candidates.remove(&TEREDO_STATIC_PORT);
    let open: Vec<u16> = candidates
        .into_iter()
        .filter(|p| objects.classify(&probe(*p)).0 == Verdict::Permit)
        .collect();
    let committed = reported.iter().rev().copied().find(|p| open.contains(p));
    Analysis {
        policy,
        open,
        committed,
    }
}

/// Verdicts seen, by snapshot generation and packet (bounded: counts, not a log).
#[derive(Clone, Debug, Default)]
pub struct Verdicts {
    seen: HashMap<(u64, Kind, Packet), [u64; 2]>,
}

impl Verdicts {
    /// Records one classification.
    pub fn record(&mut self, kind: Kind, packet: Packet, verdict: Verdict, generation: u64) {
        let counts = self.seen.entry((generation, kind, packet)).or_default();
        counts[usize::from(verdict == Verdict::Block)] += 1;
    }

    /// Adds another recorder's counts.
    pub fn merge(&mut self, other: Verdicts) {
        for (key, [p, b]) in other.seen {
            let counts = self.seen.entry(key).or_default();
            counts[0] += p;
            counts[1] += b;
        }
    }

    /// Classifications recorded.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.seen.values().map(|[p, b]| p + b).sum()
    }
}

/// Classifies one round of traffic through the committed filters (one snapshot per
/// packet) into `verdicts`.
pub fn replay_round(
    current: Option<u16>,
    previous: Option<u16>,
    round: u64,
    verdicts: &mut Verdicts,
) {
    for (kind, packet) in traffic(current, previous, round) {
        let (verdict, _, generation) = crate::kernel::classify(&packet);
        verdicts.record(kind, packet, verdict, generation);
    }
}

/// The oracle's judgement of every verdict.
#[derive(Clone, Debug, Default)]
pub struct Judgement {
    /// Verdicts that permitted.
    pub permitted: u64,
    /// Verdicts that blocked.
    pub blocked: u64,
    /// Verdicts that contradict the oracle.
    pub wrong: u64,
    /// Permitted and blocked counts by kind.
    pub by_kind: BTreeMap<Kind, (u64, u64)>,
    /// Up to 8 wrong verdicts, described.
    pub examples: Vec<String>,
    /// Snapshots that classified at least one packet.
    pub generations: usize,
}

/// Judges `verdicts` against the snapshots in `history` (as published), with the ports
/// netio reported, oldest first.
#[must_use]
pub fn judge(verdicts: &Verdicts, history: &[Arc<Snapshot>], reported: &[u16]) -> Judgement {
    let by_generation: HashMap<u64, &Snapshot> =
        history.iter().map(|s| (s.generation, s.as_ref())).collect();
    let mut analyses: HashMap<u64, Option<u16>> = HashMap::new();
    let mut judgement = Judgement::default();
    for ((generation, kind, packet), [permits, blocks]) in &verdicts.seen {
        let committed = *analyses.entry(*generation).or_insert_with(|| {
            by_generation
                .get(generation)
                .and_then(|s| analyse(&s.objects, reported).committed)
        });
        judgement.permitted += permits;
        judgement.blocked += blocks;
        let entry = judgement.by_kind.entry(*kind).or_default();
        entry.0 += permits;
        entry.1 += blocks;
        let want = expected(committed, packet);
        let wrong = if want == Verdict::Permit {
            *blocks
        } else {
            *permits
        };
        if wrong > 0 {
            judgement.wrong += wrong;
            if judgement.examples.len() < 8 {
                judgement.examples.push(format!(
                    "{wrong} x {kind:?} {packet:?} at generation {generation} (committed port \
                     {committed:?}): expected {want:?}"
                ));
            }
        }
    }
    judgement.generations = analyses.len();
    judgement
}

/// What the commit checks found.
#[derive(Clone, Debug, Default)]
pub struct CommitChecks {
    /// Snapshots examined (published after the start and before the end given).
    pub examined: usize,
    /// `(generation, port)`: an open port netio never reported.
    pub unreported: Vec<(u64, u16)>,
    /// Generations of snapshots with the policy that open more than one reported port.
    pub doubles: Vec<u64>,
    /// Generations whose commit took the exception away (see the module documentation).
    pub gaps: Vec<u64>,
    /// Generations without the policy.
    pub without_policy: Vec<u64>,
    /// The exception lag of each notification that got committed.
    pub lags: Vec<Duration>,
    /// Notified ports never committed.
    pub never_committed: Vec<u16>,
}

/// Checks the snapshots of `history` published in `[from, until)` against the
/// `notifications` (when netio began delivering each port, oldest first).
#[must_use]
pub fn commit_checks(
    history: &[Arc<Snapshot>],
    notifications: &[(Instant, u16)],
    from: Instant,
    until: Instant,
) -> CommitChecks {
    let reported: Vec<u16> = notifications.iter().map(|(_, p)| *p).collect();
    let newness = |p: u16| reported.iter().rposition(|r| *r == p);
    let mut checks = CommitChecks::default();
    let mut before: Option<u16> = None;
    let mut analysed = Vec::new();
    for snapshot in history.iter().filter(|s| s.at >= from && s.at < until) {
        let a = analyse(&snapshot.objects, &reported);
        checks.examined += 1;
        if a.policy {
            for port in &a.open {
                if !reported.contains(port) {
                    checks.unreported.push((snapshot.generation, *port));
                }
            }
            if a.open.iter().filter(|p| reported.contains(p)).count() > 1 {
                checks.doubles.push(snapshot.generation);
            }
            let lost = before.is_some() && a.committed.is_none();
            let older =
                matches!((before, a.committed), (Some(b), Some(n)) if newness(n) < newness(b));
            if lost || older {
                checks.gaps.push(snapshot.generation);
            }
            before = a.committed;
        } else {
            checks.without_policy.push(snapshot.generation);
        }
        analysed.push((snapshot.at, a.committed));
    }
    for (at, port) in notifications {
        match analysed.iter().find(|(t, c)| t >= at && *c == Some(*port)) {
            Some((t, _)) => checks.lags.push(t.duration_since(*at)),
            None => checks.never_committed.push(*port),
        }
    }
    checks
}

/// `min / median / max` of `lags`, in microseconds, or `None` without any.
#[must_use]
pub fn lag_summary(lags: &[Duration]) -> Option<(Duration, Duration, Duration)> {
    let mut sorted = lags.to_vec();
    sorted.sort();
    Some((*sorted.first()?, sorted[sorted.len() / 2], *sorted.last()?))
}
