//! The filter design: which WFP objects the driver adds, built from the library's
//! [`ExceptionRule`]s (see the module documentation of [`super`] for the whole design).
//!
//! Everything here is data: no call into the engine. The same specs are given to the kernel
//! engine (which builds `FWPM_FILTER0` from them, `abi.rs`) and to the host mock (which
//! records them), so the tests see exactly what the driver asks the kernel for.

use core::net::Ipv4Addr;

use teredo_watcher::{
    ExceptionRule, IpVersion, Protocol, RemoteScope, RuleDirection, RuleKind, TeredoExceptions,
    TeredoPort,
};

/// A display name: the text, and the same text as a NUL-terminated UTF-16 string for
/// `FWPM_DISPLAY_DATA0.name` (the engine refuses a null name with
/// `STATUS_FWP_NULL_DISPLAY_NAME`).
#[derive(Debug, PartialEq, Eq)]
pub struct DisplayName {
    /// The text (ASCII).
    pub text: &'static str,
    /// `text` in UTF-16, NUL-terminated.
    pub wide: &'static [u16],
}

/// `text` (ASCII) as UTF-16 with a terminating NUL, at compile time. `N` is `text.len() + 1`.
///
/// # Panics
///
/// If `N` is not `text.len() + 1` or `text` has a non-ASCII or NUL byte: at compile time in
/// the `display_name!` constants, its only callers.
#[must_use]
pub const fn ascii_to_wide<const N: usize>(text: &str) -> [u16; N] {
    let bytes = text.as_bytes();
    assert!(bytes.len() + 1 == N, "N is the length plus the NUL");
    let mut wide = [0u16; N];
    let mut i = 0;
    while i < bytes.len() {
        assert!(bytes[i].is_ascii() && bytes[i] != 0, "ASCII without NUL");
        wide[i] = bytes[i] as u16;
        i += 1;
    }
    wide
}

/// A [`DisplayName`] from an ASCII literal, built at compile time.
macro_rules! display_name {
    ($text:literal) => {{
        const TEXT: &str = $text;
        const WIDE: [u16; TEXT.len() + 1] = ascii_to_wide(TEXT);
        DisplayName {
            text: TEXT,
            wide: &WIDE,
        }
    }};
}

/// Our provider's key (`FWPM_PROVIDER0.providerKey`); every sublayer and filter of the driver
/// names it, so `netsh wfp show filters` groups them under it.
pub const PROVIDER_KEY: u128 = 0x7e4b_1c52_93a0_4d6e_b1f8_2c5d_0a9e_3301;
/// Our sublayer's key: every filter of the driver is in it.
pub const SUBLAYER_KEY: u128 = 0x7e4b_1c52_93a0_4d6e_b1f8_2c5d_0a9e_3302;
/// Our sublayer's weight among the sublayers of a layer (each sublayer arbitrates on its
/// own; the engine combines their verdicts, a block winning over a permit unless a permit
/// is hard).
pub const SUBLAYER_WEIGHT: u16 = 0x8000;
/// The weight (`FWP_UINT8`) of every permit filter: above [`BLOCK_WEIGHT`], so in our
/// sublayer an exception wins over the demo policy's block.
pub const PERMIT_WEIGHT: u8 = 10;
/// The weight (`FWP_UINT8`) of the demo policy's block filters.
pub const BLOCK_WEIGHT: u8 = 1;

/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u8 = 17;
/// `IPPROTO_ICMPV6`.
pub const IPPROTO_ICMPV6: u8 = 58;

/// The session the driver opens: dynamic (`FWPM_SESSION_FLAG_DYNAMIC`), so every object it
/// adds is deleted when the engine handle is closed or the driver dies.
#[derive(Debug, PartialEq, Eq)]
pub struct SessionSpec {
    /// `displayData.name`.
    pub name: DisplayName,
    /// `FWPM_SESSION_FLAG_DYNAMIC` set.
    pub dynamic: bool,
}

/// The driver's session.
pub const SESSION: SessionSpec = SessionSpec {
    name: display_name!("teredo-monitor"),
    dynamic: true,
};

/// One provider (`FWPM_PROVIDER0`, not persistent).
#[derive(Debug, PartialEq, Eq)]
pub struct ProviderSpec {
    /// `providerKey`.
    pub key: u128,
    /// `displayData.name`.
    pub name: DisplayName,
}

/// The driver's provider.
pub const PROVIDER: ProviderSpec = ProviderSpec {
    key: PROVIDER_KEY,
    name: display_name!("teredo-monitor (Teredo firewall exceptions)"),
};

/// One sublayer (`FWPM_SUBLAYER0`, not persistent), of our provider.
#[derive(Debug, PartialEq, Eq)]
pub struct SublayerSpec {
    /// `subLayerKey`.
    pub key: u128,
    /// `displayData.name`.
    pub name: DisplayName,
    /// `providerKey`.
    pub provider: u128,
    /// `weight`.
    pub weight: u16,
}

/// The driver's sublayer.
pub const SUBLAYER: SublayerSpec = SublayerSpec {
    key: SUBLAYER_KEY,
    name: display_name!("teredo-monitor sublayer"),
    provider: PROVIDER_KEY,
    weight: SUBLAYER_WEIGHT,
};

/// The four ALE authorization layers the driver filters at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer {
    /// `FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4`: inbound IPv4.
    InboundV4,
    /// `FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6`: inbound IPv6.
    InboundV6,
    /// `FWPM_LAYER_ALE_AUTH_CONNECT_V4`: outbound IPv4.
    OutboundV4,
    /// `FWPM_LAYER_ALE_AUTH_CONNECT_V6`: outbound IPv6.
    OutboundV6,
}

impl Layer {
    /// The layer for a direction (`true`: inbound) and IP version.
    #[must_use]
    pub const fn of(inbound: bool, ip_version: IpVersion) -> Layer {
        match (inbound, ip_version) {
            (true, IpVersion::V4) => Layer::InboundV4,
            (true, IpVersion::V6) => Layer::InboundV6,
            (false, IpVersion::V4) => Layer::OutboundV4,
            (false, IpVersion::V6) => Layer::OutboundV6,
        }
    }

    /// The layer's name in `fwpmu.h`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Layer::InboundV4 => "FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4",
            Layer::InboundV6 => "FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6",
            Layer::OutboundV4 => "FWPM_LAYER_ALE_AUTH_CONNECT_V4",
            Layer::OutboundV6 => "FWPM_LAYER_ALE_AUTH_CONNECT_V6",
        }
    }
}

/// A filter's action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// `FWP_ACTION_PERMIT`.
    Permit,
    /// `FWP_ACTION_BLOCK`.
    Block,
}

/// One filter condition, always `FWP_MATCH_EQUAL`. Conditions on different fields AND;
/// conditions on the same field OR (WFP's rule; the driver never puts two on one field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Condition {
    /// `FWPM_CONDITION_IP_PROTOCOL`, `FWP_UINT8`.
    IpProtocol(u8),
    /// `FWPM_CONDITION_IP_LOCAL_PORT`, `FWP_UINT16`.
    LocalPort(u16),
    /// `FWPM_CONDITION_IP_REMOTE_PORT`, `FWP_UINT16`.
    RemotePort(u16),
    /// `FWPM_CONDITION_IP_LOCAL_ADDRESS`, `FWP_UINT32` in host byte order.
    LocalAddressV4(Ipv4Addr),
    /// `FWPM_CONDITION_ICMP_TYPE`, `FWP_UINT16`: at the ALE layers `fwpmu.h` defines it as
    /// `FWPM_CONDITION_IP_LOCAL_PORT` (the engine reports an ICMP type in the local-port
    /// field), so it is the same field key.
    IcmpType(u16),
}

/// The most conditions a filter of the driver has (protocol, local port, local address).
pub const MAX_CONDITIONS: usize = 3;

/// What a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FilterKind {
    /// A permit filter for one of the library's exception rules.
    Exception(RuleKind),
    /// The demo policy's block.
    DemoBlock,
}

/// One filter (`FWPM_FILTER0`): in our sublayer, of our provider, with a `FWP_UINT8`
/// weight, no flags and a key the engine generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterSpec {
    /// What it is for.
    pub kind: FilterKind,
    /// `displayData.name`.
    pub name: &'static DisplayName,
    /// `layerKey`.
    pub layer: Layer,
    /// `action.type`.
    pub action: Action,
    /// `weight` (`FWP_UINT8`).
    pub weight: u8,
    conditions: [Condition; MAX_CONDITIONS],
    len: usize,
}

impl FilterSpec {
    /// A filter with no condition yet.
    const fn new(kind: FilterKind, layer: Layer, action: Action, weight: u8) -> FilterSpec {
        FilterSpec {
            kind,
            name: display_name_of(kind, action),
            layer,
            action,
            weight,
            conditions: [Condition::IpProtocol(0); MAX_CONDITIONS],
            len: 0,
        }
    }

    /// Adds a condition; `None` past [`MAX_CONDITIONS`].
    const fn with(mut self, condition: Condition) -> Option<FilterSpec> {
        if self.len == MAX_CONDITIONS {
            return None;
        }
        self.conditions[self.len] = condition;
        self.len += 1;
        Some(self)
    }

    /// The conditions, in the order they are given to the engine.
    #[must_use]
    pub fn conditions(&self) -> &[Condition] {
        self.conditions.get(..self.len).unwrap_or_default()
    }

    /// `subLayerKey`.
    #[must_use]
    pub const fn sublayer(&self) -> u128 {
        SUBLAYER_KEY
    }

    /// `providerKey`.
    #[must_use]
    pub const fn provider(&self) -> u128 {
        PROVIDER_KEY
    }
}

/// The display name of each kind of filter.
const fn display_name_of(kind: FilterKind, action: Action) -> &'static DisplayName {
    const DYNAMIC: DisplayName = display_name!("Teredo: dynamic service port (UDP, local port)");
    const SERVER: DisplayName = display_name!("Teredo: server (UDP, remote port 3544)");
    const DISCOVERY: DisplayName =
        display_name!("Teredo: local discovery (UDP to 224.0.0.253, local port 3544)");
    const UPNP: DisplayName = display_name!("Teredo: UPnP (UDP, remote port 1900)");
    const ICMPV6: DisplayName = display_name!("Teredo: ICMPv6 type");
    const BLOCK: DisplayName = display_name!("teredo-monitor test-VM policy: block inbound");
    match (kind, action) {
        (FilterKind::DemoBlock, _) | (_, Action::Block) => &BLOCK,
        (FilterKind::Exception(RuleKind::DynamicPort), _) => &DYNAMIC,
        (FilterKind::Exception(RuleKind::TeredoServer), _) => &SERVER,
        (FilterKind::Exception(RuleKind::LocalDiscovery), _) => &DISCOVERY,
        (FilterKind::Exception(RuleKind::Upnp), _) => &UPNP,
        (FilterKind::Exception(RuleKind::Icmpv6), _) => &ICMPV6,
    }
}

/// Why a rule has no filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unexpressible {
    /// A remote scope of "the local subnet" depends on the interfaces' prefixes at run time;
    /// a static filter cannot name it (the UPnP rule).
    LocalSubnetScope,
    /// More conditions than a filter of the driver has.
    TooManyConditions,
}

/// The permit filters of one rule: one per direction it applies to (inbound first).
///
/// # Errors
///
/// [`Unexpressible`] for a rule a static filter cannot express.
pub fn permit_filters(rule: &ExceptionRule) -> Result<RuleFilters, Unexpressible> {
    if matches!(rule.remote_scope, RemoteScope::LocalSubnet) {
        return Err(Unexpressible::LocalSubnetScope);
    }
    let one = |inbound: bool| -> Result<FilterSpec, Unexpressible> {
        let layer = Layer::of(inbound, rule.ip_version);
        let protocol = match rule.protocol {
            Protocol::Udp => IPPROTO_UDP,
            Protocol::Icmpv6 => IPPROTO_ICMPV6,
        };
        let mut spec = FilterSpec::new(
            FilterKind::Exception(rule.kind),
            layer,
            Action::Permit,
            PERMIT_WEIGHT,
        )
        .with(Condition::IpProtocol(protocol))
        .ok_or(Unexpressible::TooManyConditions)?;
        let extra = [
            rule.local_port.map(Condition::LocalPort),
            rule.remote_port.map(Condition::RemotePort),
            rule.local_address.map(Condition::LocalAddressV4),
            rule.icmpv6_type.map(|t| Condition::IcmpType(u16::from(t))),
        ];
        for condition in extra.into_iter().flatten() {
            spec = spec
                .with(condition)
                .ok_or(Unexpressible::TooManyConditions)?;
        }
        Ok(spec)
    };
    let inbound = match rule.direction {
        RuleDirection::Inbound | RuleDirection::Both => Some(one(true)?),
        RuleDirection::Outbound => None,
    };
    let outbound = match rule.direction {
        RuleDirection::Outbound | RuleDirection::Both => Some(one(false)?),
        RuleDirection::Inbound => None,
    };
    Ok(RuleFilters([inbound, outbound]))
}

/// The filters of one rule: at most one per direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleFilters([Option<FilterSpec>; 2]);

impl RuleFilters {
    /// The filters, inbound first.
    pub fn iter(&self) -> impl Iterator<Item = &FilterSpec> {
        self.0.iter().flatten()
    }
}

/// The permit filters of the dynamic port `port` (the library's
/// [`RuleKind::DynamicPort`] rule: UDP/IPv4, local port, both directions).
#[must_use]
pub fn dynamic_port_filters(port: TeredoPort) -> RuleFilters {
    // The library's dynamic-port rule has two conditions and any remote: always expressible.
    permit_filters(&ExceptionRule::dynamic_port(port)).unwrap_or(RuleFilters([None, None]))
}

/// The exception set whose static rules the driver installs: Microsoft's required rules.
/// UPnP (a policy choice, off by default in the library) is not installed: its local-subnet
/// scope has no static filter ([`Unexpressible::LocalSubnetScope`]).
pub const STATIC_SET: TeredoExceptions = TeredoExceptions::for_port(None).with_upnp(false);

/// The static rules the driver installs permit filters for: [`STATIC_SET`]'s rules (every one
/// but the dynamic port, which has no port here).
pub fn static_rules() -> impl Iterator<Item = ExceptionRule> {
    STATIC_SET.rules()
}

/// How many static permit filters the driver installs: two for the server, one for
/// discovery, two per ICMPv6 type.
pub const STATIC_PERMIT_FILTERS: usize = 2 + 1 + 2 * teredo_watcher::TEREDO_ICMPV6_TYPES.len();

/// The demo policy (a test-VM policy): block inbound UDP over IPv4 and IPv6, and inbound
/// ICMPv6, in our sublayer, below the permits.
#[must_use]
pub const fn demo_block_filters() -> [FilterSpec; 3] {
    let udp = Condition::IpProtocol(IPPROTO_UDP);
    let icmpv6 = Condition::IpProtocol(IPPROTO_ICMPV6);
    [
        block(Layer::InboundV4, udp),
        block(Layer::InboundV6, udp),
        block(Layer::InboundV6, icmpv6),
    ]
}

/// A demo block filter at `layer` with one condition.
const fn block(layer: Layer, condition: Condition) -> FilterSpec {
    let mut spec = FilterSpec::new(FilterKind::DemoBlock, layer, Action::Block, BLOCK_WEIGHT);
    spec.conditions[0] = condition;
    spec.len = 1;
    spec
}

/// The most filters the driver has committed at once: the static permits, the blocks, and
/// the dynamic port's filters twice (old and new, inside the replacing transaction).
pub const MAX_FILTERS: usize = STATIC_PERMIT_FILTERS + 3 + 2 * 2;
