//! fwpkclnt.sys: the filter engine's management calls a kernel-mode WFP client makes
//! (`fwpmk.h`), and the classification of packets through the committed filters.
//!
//! # What is modelled
//!
//! | routine | what the model does |
//! |---|---|
//! | `FwpmEngineOpen0` | opens a session (`serverName` NULL, `authnService` `RPC_C_AUTHN_WINNT` or `RPC_C_AUTHN_DEFAULT`; `FWPM_SESSION_FLAG_DYNAMIC` recorded) and writes its handle |
//! | `FwpmEngineClose0` | aborts the session's transaction; a dynamic session's objects are deleted (a commit of their removal) |
//! | `FwpmTransactionBegin0` / `Commit0` / `Abort0` | one explicit transaction per session, one read/write transaction in the engine at a time (a second session's `Begin` waits for it, up to its `txnWaitTimeoutInMSec`: `FWP_E_TIMEOUT`); changes are invisible to classification until the commit publishes them as one snapshot; abort discards them |
//! | `FwpmProviderAdd0`, `FwpmSubLayerAdd0`, `FwpmFilterAdd0` | checked as below, added to the session's transaction (or, outside one, committed at once: an implicit transaction) |
//! | `FwpmFilterDeleteById0`, `FwpmSubLayerDeleteByKey0`, `FwpmProviderDeleteByKey0` | deleted from the transaction (or at once); a sublayer or provider still referenced is `FWP_E_IN_USE` |
//!
//! Every routine requires `PASSIVE_LEVEL` (`fwpmk.h` documents them so): above it the
//! machine stops with `IRQL_NOT_LESS_OR_EQUAL`, as the kernel would when paged code runs at
//! raised IRQL.
//!
//! Statuses: `NTSTATUS`, as `fwpmk.h` declares the routines. A failure the engine reports
//! is the kernel form of its WFP error, `STATUS_FWP_*` (`0xC022xxxx`, `ntstatus.h`; the
//! driver pages also name the user-mode `FWP_E_*` forms, `0x8032xxxx`, with the same low
//! word); a handle that is not an open session is `STATUS_INVALID_HANDLE`; arguments the
//! documentation forbids outright (a server name, another `authnService`, a security
//! descriptor, which the model does not model) are `STATUS_INVALID_PARAMETER`. Fault
//! injection ([`fail_call`], [`fail_next`]) can make any call return any status instead.
//!
//! Filters: the layers `FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4/_V6` (inbound) and
//! `FWPM_LAYER_ALE_AUTH_CONNECT_V4/_V6` (outbound); another layer is `FWP_E_LAYER_NOT_FOUND`
//! (not modelled). Conditions: `FWPM_CONDITION_IP_PROTOCOL` (`FWP_UINT8`),
//! `FWPM_CONDITION_IP_LOCAL_PORT` / `_IP_REMOTE_PORT` (`FWP_UINT16`; at these layers
//! `FWPM_CONDITION_ICMP_TYPE` / `_ICMP_CODE` are the same GUIDs, as `fwpmu.h` defines them),
//! `FWPM_CONDITION_IP_LOCAL_ADDRESS` / `_IP_REMOTE_ADDRESS` (`FWP_UINT32` in host order or
//! `FWP_V4_ADDR_MASK` at the V4 layers, `FWP_BYTE_ARRAY16_TYPE` or `FWP_V6_ADDR_MASK` at the
//! V6 layers), each with `FWP_MATCH_EQUAL`. A field the model does not know is
//! `FWP_E_CONDITION_NOT_FOUND`, another match type `FWP_E_MATCH_TYPE_MISMATCH`, a value of
//! the wrong type `FWP_E_TYPE_MISMATCH`: nothing is accepted and then ignored. Conditions on
//! different fields AND, on the same field OR. Weights: `FWP_EMPTY` (engine-assigned, below
//! every explicit weight), `FWP_UINT8` 0..=15 (the top four bits of the effective weight),
//! `FWP_UINT64` (the effective weight itself); within one weight the filter with more
//! conditions weighs more, as the engine's automatic weighting does. Actions
//! `FWP_ACTION_PERMIT` and `FWP_ACTION_BLOCK`; callout actions are `FWP_E_CALLOUT_NOT_FOUND`
//! (no callouts exist here).
//!
//! # Arbitration
//!
//! Per packet, at the packet's layer, through one committed snapshot: in every sublayer the
//! matching filter of the highest effective weight decides that sublayer's verdict (on equal
//! weights, block wins); a block in any sublayer blocks the packet; no match anywhere
//! permits it. Hard and soft actions (`FWPM_FILTER_FLAG_CLEAR_ACTION_RIGHT`) and vetoes
//! across sublayers are not modelled beyond "block wins across sublayers".

use core::ffi::c_void;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use windows_sys::Win32::Foundation as f;
use windows_sys::Win32::NetworkManagement::WindowsFilteringPlatform as w;
use windows_sys::core::GUID;

use super::bugcheck::{bugcheck, halt_if_stopped};
use super::irql::current_irql;
use super::{CHANGED, IRQL_NOT_LESS_OR_EQUAL, PASSIVE_LEVEL, STATUS_SUCCESS, lock, wait};

/// `RPC_C_AUTHN_WINNT`.
pub const RPC_C_AUTHN_WINNT: u32 = 10;
/// `RPC_C_AUTHN_DEFAULT`.
pub const RPC_C_AUTHN_DEFAULT: u32 = 0xFFFF_FFFF;
/// `STATUS_INVALID_HANDLE`.
pub const STATUS_INVALID_HANDLE: i32 = f::STATUS_INVALID_HANDLE;
/// `STATUS_INVALID_PARAMETER`.
pub const STATUS_INVALID_PARAMETER: i32 = f::STATUS_INVALID_PARAMETER;
/// The first filter id the engine hands out: above `u32::MAX`, so a driver that keeps ids
/// in 32 bits deletes the wrong filter (or none) and is caught.
pub const FIRST_FILTER_ID: u64 = 0x0000_0001_0000_2000;

/// The filter-engine routines, for fault injection and the call trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FwpCall {
    /// `FwpmEngineOpen0`.
    EngineOpen,
    /// `FwpmEngineClose0`.
    EngineClose,
    /// `FwpmTransactionBegin0`.
    TransactionBegin,
    /// `FwpmTransactionCommit0`.
    TransactionCommit,
    /// `FwpmTransactionAbort0`.
    TransactionAbort,
    /// `FwpmProviderAdd0`.
    ProviderAdd,
    /// `FwpmSubLayerAdd0`.
    SubLayerAdd,
    /// `FwpmFilterAdd0`.
    FilterAdd,
    /// `FwpmFilterDeleteById0`.
    FilterDeleteById,
    /// `FwpmSubLayerDeleteByKey0`.
    SubLayerDeleteByKey,
    /// `FwpmProviderDeleteByKey0`.
    ProviderDeleteByKey,
}

/// Every [`FwpCall`], in declaration order.
pub const FWP_CALLS: [FwpCall; 11] = [
    FwpCall::EngineOpen,
    FwpCall::EngineClose,
    FwpCall::TransactionBegin,
    FwpCall::TransactionCommit,
    FwpCall::TransactionAbort,
    FwpCall::ProviderAdd,
    FwpCall::SubLayerAdd,
    FwpCall::FilterAdd,
    FwpCall::FilterDeleteById,
    FwpCall::SubLayerDeleteByKey,
    FwpCall::ProviderDeleteByKey,
];

impl FwpCall {
    /// The routine's export name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            FwpCall::EngineOpen => "FwpmEngineOpen0",
            FwpCall::EngineClose => "FwpmEngineClose0",
            FwpCall::TransactionBegin => "FwpmTransactionBegin0",
            FwpCall::TransactionCommit => "FwpmTransactionCommit0",
            FwpCall::TransactionAbort => "FwpmTransactionAbort0",
            FwpCall::ProviderAdd => "FwpmProviderAdd0",
            FwpCall::SubLayerAdd => "FwpmSubLayerAdd0",
            FwpCall::FilterAdd => "FwpmFilterAdd0",
            FwpCall::FilterDeleteById => "FwpmFilterDeleteById0",
            FwpCall::SubLayerDeleteByKey => "FwpmSubLayerDeleteByKey0",
            FwpCall::ProviderDeleteByKey => "FwpmProviderDeleteByKey0",
        }
    }

    /// The statuses the documentation names for this routine's failures, with their names
    /// (what the fault sweep injects). All are negative (`NT_SUCCESS` is false).
    #[must_use]
    pub fn documented_failures(self) -> Vec<(&'static str, i32)> {
        let mut codes = vec![
            (
                "STATUS_INSUFFICIENT_RESOURCES",
                f::STATUS_INSUFFICIENT_RESOURCES,
            ),
            ("RPC_NT_SERVER_UNAVAILABLE", f::RPC_NT_SERVER_UNAVAILABLE),
        ];
        codes.extend_from_slice(match self {
            FwpCall::EngineOpen => &[
                (
                    "STATUS_FWP_INVALID_PARAMETER",
                    f::STATUS_FWP_INVALID_PARAMETER,
                ),
                ("FWP_E_INVALID_PARAMETER", f::FWP_E_INVALID_PARAMETER),
            ][..],
            FwpCall::EngineClose => &[("STATUS_INVALID_HANDLE", f::STATUS_INVALID_HANDLE)],
            FwpCall::TransactionBegin => &[
                ("STATUS_FWP_TXN_IN_PROGRESS", f::STATUS_FWP_TXN_IN_PROGRESS),
                ("STATUS_FWP_TIMEOUT", f::STATUS_FWP_TIMEOUT),
                ("FWP_E_TIMEOUT", f::FWP_E_TIMEOUT),
            ],
            FwpCall::TransactionCommit => &[
                ("STATUS_FWP_TXN_ABORTED", f::STATUS_FWP_TXN_ABORTED),
                ("STATUS_FWP_SESSION_ABORTED", f::STATUS_FWP_SESSION_ABORTED),
                ("FWP_E_TXN_ABORTED", f::FWP_E_TXN_ABORTED),
            ],
            FwpCall::TransactionAbort => &[(
                "STATUS_FWP_NO_TXN_IN_PROGRESS",
                f::STATUS_FWP_NO_TXN_IN_PROGRESS,
            )],
            FwpCall::ProviderAdd | FwpCall::SubLayerAdd => &[
                ("STATUS_FWP_ALREADY_EXISTS", f::STATUS_FWP_ALREADY_EXISTS),
                ("FWP_E_ALREADY_EXISTS", f::FWP_E_ALREADY_EXISTS),
            ],
            FwpCall::FilterAdd => &[
                ("STATUS_FWP_ALREADY_EXISTS", f::STATUS_FWP_ALREADY_EXISTS),
                (
                    "STATUS_FWP_SUBLAYER_NOT_FOUND",
                    f::STATUS_FWP_SUBLAYER_NOT_FOUND,
                ),
                ("FWP_E_INVALID_WEIGHT", f::FWP_E_INVALID_WEIGHT),
            ],
            FwpCall::FilterDeleteById => &[
                (
                    "STATUS_FWP_FILTER_NOT_FOUND",
                    f::STATUS_FWP_FILTER_NOT_FOUND,
                ),
                ("FWP_E_FILTER_NOT_FOUND", f::FWP_E_FILTER_NOT_FOUND),
            ],
            FwpCall::SubLayerDeleteByKey => &[
                (
                    "STATUS_FWP_SUBLAYER_NOT_FOUND",
                    f::STATUS_FWP_SUBLAYER_NOT_FOUND,
                ),
                ("STATUS_FWP_IN_USE", f::STATUS_FWP_IN_USE),
            ],
            FwpCall::ProviderDeleteByKey => &[
                (
                    "STATUS_FWP_PROVIDER_NOT_FOUND",
                    f::STATUS_FWP_PROVIDER_NOT_FOUND,
                ),
                ("STATUS_FWP_IN_USE", f::STATUS_FWP_IN_USE),
            ],
        });
        codes
    }
}

/// The four ALE layers the model classifies at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer {
    /// `FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4`: inbound IPv4.
    RecvAcceptV4,
    /// `FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6`: inbound IPv6.
    RecvAcceptV6,
    /// `FWPM_LAYER_ALE_AUTH_CONNECT_V4`: outbound IPv4.
    ConnectV4,
    /// `FWPM_LAYER_ALE_AUTH_CONNECT_V6`: outbound IPv6.
    ConnectV6,
}

impl Layer {
    fn from_guid(key: &GUID) -> Option<Layer> {
        let key = guid_u128(key);
        [
            (w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4, Layer::RecvAcceptV4),
            (w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6, Layer::RecvAcceptV6),
            (w::FWPM_LAYER_ALE_AUTH_CONNECT_V4, Layer::ConnectV4),
            (w::FWPM_LAYER_ALE_AUTH_CONNECT_V6, Layer::ConnectV6),
        ]
        .into_iter()
        .find(|(g, _)| guid_u128(g) == key)
        .map(|(_, l)| l)
    }

    /// Whether the layer is IPv6.
    #[must_use]
    pub const fn is_v6(self) -> bool {
        matches!(self, Layer::RecvAcceptV6 | Layer::ConnectV6)
    }

    /// Whether the layer is inbound.
    #[must_use]
    pub const fn is_inbound(self) -> bool {
        matches!(self, Layer::RecvAcceptV4 | Layer::RecvAcceptV6)
    }
}

/// A GUID as one number (`GUID::from_u128`'s inverse).
#[must_use]
pub fn guid_u128(g: &GUID) -> u128 {
    (u128::from(g.data1) << 96)
        | (u128::from(g.data2) << 80)
        | (u128::from(g.data3) << 64)
        | u128::from(u64::from_be_bytes(g.data4))
}

/// A condition field the model knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    /// `FWPM_CONDITION_IP_PROTOCOL`.
    Protocol,
    /// `FWPM_CONDITION_IP_LOCAL_PORT` (`FWPM_CONDITION_ICMP_TYPE` at these layers).
    LocalPort,
    /// `FWPM_CONDITION_IP_REMOTE_PORT` (`FWPM_CONDITION_ICMP_CODE` at these layers).
    RemotePort,
    /// `FWPM_CONDITION_IP_LOCAL_ADDRESS`.
    LocalAddress,
    /// `FWPM_CONDITION_IP_REMOTE_ADDRESS`.
    RemoteAddress,
}

impl Field {
    fn from_guid(key: &GUID) -> Option<Field> {
        let key = guid_u128(key);
        [
            (w::FWPM_CONDITION_IP_PROTOCOL, Field::Protocol),
            (w::FWPM_CONDITION_IP_LOCAL_PORT, Field::LocalPort),
            (w::FWPM_CONDITION_IP_REMOTE_PORT, Field::RemotePort),
            (w::FWPM_CONDITION_IP_LOCAL_ADDRESS, Field::LocalAddress),
            (w::FWPM_CONDITION_IP_REMOTE_ADDRESS, Field::RemoteAddress),
        ]
        .into_iter()
        .find(|(g, _)| guid_u128(g) == key)
        .map(|(_, f)| f)
    }
}

/// What a condition compares its field with (`FWP_MATCH_EQUAL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Value {
    /// `FWP_UINT8` (the protocol).
    U8(u8),
    /// `FWP_UINT16` (a port, or an ICMP type or code).
    U16(u16),
    /// An IPv4 address and prefix mask in host order (`FWP_UINT32` has mask `!0`).
    V4 {
        /// The address.
        addr: u32,
        /// The mask (contiguous ones from the top).
        mask: u32,
    },
    /// An IPv6 address and prefix length (`FWP_BYTE_ARRAY16_TYPE` has 128).
    V6 {
        /// The address.
        addr: [u8; 16],
        /// The prefix length, 0..=128.
        prefix: u8,
    },
}

/// One filter condition, as the model stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Condition {
    /// The field.
    pub field: Field,
    /// The value it must equal.
    pub value: Value,
}

/// A filter's action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// `FWP_ACTION_PERMIT`.
    Permit,
    /// `FWP_ACTION_BLOCK`.
    Block,
}

/// The weight a filter was added with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Weight {
    /// `FWP_EMPTY`: engine-assigned.
    Empty,
    /// `FWP_UINT8`, 0..=15.
    Uint8(u8),
    /// `FWP_UINT64`.
    Uint64(u64),
}

/// A filter in the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Its 64-bit run-time id (what `FwpmFilterAdd0` wrote back).
    pub id: u64,
    /// Its key (generated when the caller passed the nil GUID).
    pub key: u128,
    /// `displayData.name`.
    pub name: String,
    /// The layer.
    pub layer: Layer,
    /// The sublayer's key (`FWPM_SUBLAYER_UNIVERSAL` when the caller passed the nil GUID).
    pub sublayer: u128,
    /// The provider's key, if any.
    pub provider: Option<u128>,
    /// The weight as given.
    pub weight: Weight,
    /// The effective weight arbitration compares.
    pub effective_weight: u64,
    /// The action.
    pub action: Action,
    /// The conditions.
    pub conditions: Vec<Condition>,
    /// The engine handle of the session that added it.
    pub session: usize,
}

/// A packet as the ALE layers classify it (for ICMP, WFP reports the type in the local-port
/// field and the code in the remote-port field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Packet {
    /// Inbound (`ALE_AUTH_RECV_ACCEPT`) or outbound (`ALE_AUTH_CONNECT`).
    pub inbound: bool,
    /// The IP protocol (IPv6: the next header): 17 UDP, 58 ICMPv6, 6 TCP, ...
    pub protocol: u8,
    /// The local address (its version chooses the layer).
    pub local_address: IpAddr,
    /// The remote address (the same version as the local one).
    pub remote_address: IpAddr,
    /// The local port, or the ICMP type.
    pub local_port: u16,
    /// The remote port, or the ICMP code.
    pub remote_port: u16,
}

impl Packet {
    /// The layer this packet is classified at.
    #[must_use]
    pub const fn layer(&self) -> Layer {
        match (self.inbound, self.local_address) {
            (true, IpAddr::V4(_)) => Layer::RecvAcceptV4,
            (true, IpAddr::V6(_)) => Layer::RecvAcceptV6,
            (false, IpAddr::V4(_)) => Layer::ConnectV4,
            (false, IpAddr::V6(_)) => Layer::ConnectV6,
        }
    }
}

/// What the engine decided for one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Permitted.
    Permit,
    /// Blocked.
    Block,
}

/// A provider in the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provider {
    /// Its key.
    pub key: u128,
    /// `displayData.name`.
    pub name: String,
    /// The engine handle of the session that added it.
    pub session: usize,
}

/// A sublayer in the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubLayer {
    /// Its key.
    pub key: u128,
    /// `displayData.name`.
    pub name: String,
    /// Its weight.
    pub weight: u16,
    /// Its provider's key, if any.
    pub provider: Option<u128>,
    /// The engine handle of the session that added it.
    pub session: usize,
}

/// One state of the engine's objects: what a commit publishes, what a transaction edits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineObjects {
    /// Providers by key.
    pub providers: BTreeMap<u128, Provider>,
    /// Sublayers by key (the built-in `FWPM_SUBLAYER_UNIVERSAL` is not listed).
    pub sublayers: BTreeMap<u128, SubLayer>,
    /// Filters by id.
    pub filters: BTreeMap<u64, Filter>,
}

impl EngineObjects {
    /// Classifies `packet` through these objects (see the module's "Arbitration"); also
    /// returns the id of the filter that decided, if one did.
    #[must_use]
    pub fn classify(&self, packet: &Packet) -> (Verdict, Option<u64>) {
        let layer = packet.layer();
        // Per sublayer: the best matching filter (highest weight; block first on a tie).
        let mut best: BTreeMap<u128, &Filter> = BTreeMap::new();
        for filter in self
            .filters
            .values()
            .filter(|f| f.layer == layer && matches_all(&f.conditions, packet))
        {
            let entry = best.entry(filter.sublayer).or_insert(filter);
            let rank = |f: &Filter| (f.effective_weight, f.action == Action::Block);
            if rank(filter) > rank(entry) {
                *entry = filter;
            }
        }
        if let Some(block) = best.values().find(|f| f.action == Action::Block) {
            return (Verdict::Block, Some(block.id));
        }
        (Verdict::Permit, best.values().next().map(|f| f.id))
    }
}

/// Conditions on different fields AND, on the same field OR.
fn matches_all(conditions: &[Condition], packet: &Packet) -> bool {
    let mut by_field: BTreeMap<Field, bool> = BTreeMap::new();
    for c in conditions {
        let hit = matches_one(c, packet);
        *by_field.entry(c.field).or_insert(false) |= hit;
    }
    by_field.values().all(|hit| *hit)
}

fn matches_one(c: &Condition, packet: &Packet) -> bool {
    let address = |a: IpAddr| match (c.value, a) {
        (Value::V4 { addr, mask }, IpAddr::V4(have)) => have.to_bits() & mask == addr & mask,
        (Value::V6 { addr, prefix }, IpAddr::V6(have)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            have.to_bits() & mask == u128::from_be_bytes(addr) & mask
        }
        _ => false,
    };
    match (c.field, c.value) {
        (Field::Protocol, Value::U8(p)) => packet.protocol == p,
        (Field::LocalPort, Value::U16(p)) => packet.local_port == p,
        (Field::RemotePort, Value::U16(p)) => packet.remote_port == p,
        (Field::LocalAddress, _) => address(packet.local_address),
        (Field::RemoteAddress, _) => address(packet.remote_address),
        _ => false,
    }
}

/// A committed state, numbered.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// 0 for the empty engine, then one more per commit (explicit, implicit, or a dynamic
    /// session's close).
    pub generation: u64,
    /// When it was published.
    pub at: Instant,
    /// What it holds.
    pub objects: EngineObjects,
    /// What published it.
    pub cause: CommitCause,
}

/// What published a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitCause {
    /// The empty engine at reset.
    Reset,
    /// `FwpmTransactionCommit0` of the session with this handle.
    Commit(usize),
    /// A call outside an explicit transaction (its own implicit transaction).
    Implicit(usize),
    /// `FwpmEngineClose0` of a dynamic session deleting its objects.
    DynamicClose(usize),
}

struct Transaction {
    read_only: bool,
    work: EngineObjects,
}

struct Session {
    dynamic: bool,
    /// `txnWaitTimeoutInMSec` (0: the system default, modelled as no limit).
    wait_ms: u32,
    txn: Option<Transaction>,
}

/// The engine's accounting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FwpStats {
    /// Calls by routine, in [`FWP_CALLS`] order.
    pub calls: [u64; 11],
    /// Calls that failed, injected or not.
    pub failed: u64,
    /// Sessions opened.
    pub sessions_opened: u64,
    /// Engine handles still open.
    pub live_sessions: Vec<usize>,
    /// Of those, the ones opened with `FWPM_SESSION_FLAG_DYNAMIC`.
    pub dynamic_sessions: Vec<usize>,
    /// Sessions with an explicit transaction open now.
    pub open_transactions: usize,
    /// Explicit commits that published.
    pub commits: u64,
    /// Transactions aborted (explicitly, by a failed commit, or by a close).
    pub aborts: u64,
    /// The committed state's object counts: providers, sublayers, filters.
    pub committed: (usize, usize, usize),
}

pub(crate) struct Fwp {
    sessions: BTreeMap<usize, Session>,
    next_handle: usize,
    next_filter_id: u64,
    next_key: u128,
    /// The session holding the engine's one read/write transaction.
    writer: Option<usize>,
    committed: Arc<Snapshot>,
    /// Every snapshot published, oldest first (`history[0]` is the reset's).
    history: Vec<Arc<Snapshot>>,
    /// Injected results: `(call, ordinal)` -> status; the ordinal counts that routine's
    /// calls since the reset, from 0.
    faults: BTreeMap<(FwpCall, u64), i32>,
    /// Queued statuses for the next calls of a routine.
    next_faults: BTreeMap<FwpCall, VecDeque<i32>>,
    trace: Vec<(FwpCall, i32)>,
    stats: FwpStats,
}

impl Default for Fwp {
    fn default() -> Self {
        let empty = Arc::new(Snapshot {
            generation: 0,
            at: Instant::now(),
            objects: EngineObjects::default(),
            cause: CommitCause::Reset,
        });
        Fwp {
            sessions: BTreeMap::new(),
            next_handle: 0xFFFF_B000_0000_2000,
            next_filter_id: FIRST_FILTER_ID,
            next_key: 0x7465_7265_646f_0000_0000_0000_0000_0001,
            writer: None,
            committed: Arc::clone(&empty),
            history: vec![empty],
            faults: BTreeMap::new(),
            next_faults: BTreeMap::new(),
            trace: Vec::new(),
            stats: FwpStats::default(),
        }
    }
}

impl Fwp {
    fn publish(&mut self, objects: EngineObjects, cause: CommitCause) {
        let snapshot = Arc::new(Snapshot {
            generation: self.committed.generation + 1,
            at: Instant::now(),
            objects,
            cause,
        });
        self.committed = Arc::clone(&snapshot);
        self.history.push(snapshot);
    }
}

/// Makes call number `ordinal` (from 0, counted per routine since the reset) of `call`
/// return `status` without doing its work. A failed `FwpmTransactionCommit0` ends the
/// transaction with nothing published (the engine rolls it back). A status that says the
/// object is gone makes it so, since the engine cannot report that and keep the object:
/// `FwpmTransactionAbort0` failing with `STATUS_FWP_NO_TXN_IN_PROGRESS` ends the session's
/// transaction with nothing published, and `FwpmEngineClose0` failing with
/// `STATUS_INVALID_HANDLE` ends the session as a close does (its transaction aborted, a
/// dynamic session's objects deleted). Any other failed call changes nothing.
pub fn fail_call(call: FwpCall, ordinal: u64, status: i32) {
    lock().fwp.faults.insert((call, ordinal), status);
}

/// Makes the next call of `call` return `status` without doing its work (queued; see
/// [`fail_call`]).
pub fn fail_next(call: FwpCall, status: i32) {
    lock()
        .fwp
        .next_faults
        .entry(call)
        .or_default()
        .push_back(status);
}

/// Every filter-engine call made since the reset, in order, with its result.
#[must_use]
pub fn fwp_trace() -> Vec<(FwpCall, i32)> {
    lock().fwp.trace.clone()
}

/// The engine's accounting now.
#[must_use]
pub fn fwp_stats() -> FwpStats {
    let guard = lock();
    let engine = &guard.fwp;
    let o = &engine.committed.objects;
    FwpStats {
        live_sessions: engine.sessions.keys().copied().collect(),
        dynamic_sessions: engine
            .sessions
            .iter()
            .filter(|(_, s)| s.dynamic)
            .map(|(h, _)| *h)
            .collect(),
        open_transactions: engine.sessions.values().filter(|s| s.txn.is_some()).count(),
        committed: (o.providers.len(), o.sublayers.len(), o.filters.len()),
        ..engine.stats.clone()
    }
}

/// The committed state now: what classification sees.
#[must_use]
pub fn committed() -> Arc<Snapshot> {
    Arc::clone(&lock().fwp.committed)
}

/// Every committed state published since the reset, oldest first.
#[must_use]
pub fn commit_history() -> Vec<Arc<Snapshot>> {
    lock().fwp.history.clone()
}

/// Classifies `packet` through the committed filters, one consistent snapshot: the
/// verdict, the deciding filter's id, and the snapshot's generation.
#[must_use]
pub fn classify(packet: &Packet) -> (Verdict, Option<u64>, u64) {
    let snapshot = committed();
    let (verdict, filter) = snapshot.objects.classify(packet);
    (verdict, filter, snapshot.generation)
}

// ---------------------------------------------------------------------------------------
// The routines
// ---------------------------------------------------------------------------------------

/// Checks `PASSIVE_LEVEL`, counts the call, and takes an injected result.
fn enter(call: FwpCall) -> Option<i32> {
    let irql = current_irql();
    if irql > PASSIVE_LEVEL {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [0, usize::from(irql), 0, call as usize],
            format!(
                "{} at IRQL {irql}; the documentation requires PASSIVE_LEVEL",
                call.name()
            ),
        );
    }
    let mut state = halt_if_stopped(lock());
    let fwp = &mut state.fwp;
    let ordinal = fwp.stats.calls[call as usize];
    fwp.stats.calls[call as usize] += 1;
    let injected = fwp
        .faults
        .remove(&(call, ordinal))
        .or_else(|| fwp.next_faults.get_mut(&call).and_then(VecDeque::pop_front));
    if let Some(status) = injected {
        fwp.trace.push((call, status));
        if status < 0 {
            fwp.stats.failed += 1;
        }
    }
    injected
}

/// Records a call's result in the trace.
fn leave(call: FwpCall, status: i32) -> i32 {
    let mut state = lock();
    state.fwp.trace.push((call, status));
    if status < 0 {
        state.fwp.stats.failed += 1;
    }
    CHANGED.notify_all();
    status
}

/// Reads a NUL-terminated UTF-16 string (at most 256 units).
///
/// # Safety
///
/// `p` is NULL or points to a NUL-terminated UTF-16 string.
unsafe fn read_wide(p: *const u16) -> Option<String> {
    if p.is_null() {
        return None;
    }
    let mut units = Vec::new();
    for i in 0..256 {
        // SAFETY: a NUL-terminated string (this function's contract), read up to its NUL.
        let unit = unsafe { p.add(i).read_unaligned() };
        if unit == 0 {
            break;
        }
        units.push(unit);
    }
    Some(String::from_utf16_lossy(&units))
}

/// # Safety
///
/// `server_name` is NULL or a string, `session` NULL or an `FWPM_SESSION0`, `engine_handle`
/// valid for a write (`FwpmEngineOpen0`'s contract).
pub(crate) unsafe extern "win64" fn fwpm_engine_open0(
    server_name: *const u16,
    authn_service: u32,
    _auth_identity: *const c_void,
    session: *const w::FWPM_SESSION0,
    engine_handle: *mut usize,
) -> i32 {
    const CALL: FwpCall = FwpCall::EngineOpen;
    if let Some(status) = enter(CALL) {
        return status;
    }
    if engine_handle.is_null() {
        return leave(CALL, f::STATUS_FWP_NULL_POINTER);
    }
    // Kernel-mode callers must pass NULL (the local engine) and one of two services.
    if !server_name.is_null() || !matches!(authn_service, RPC_C_AUTHN_WINNT | RPC_C_AUTHN_DEFAULT) {
        return leave(CALL, STATUS_INVALID_PARAMETER);
    }
    let (dynamic, wait_ms) = if session.is_null() {
        (false, 0)
    } else {
        // SAFETY: an `FWPM_SESSION0` (this function's contract); `read_unaligned` because
        // the model does not rely on the caller's alignment.
        let s = unsafe { session.read_unaligned() };
        if s.flags & !(w::FWPM_SESSION_FLAG_DYNAMIC) != 0 {
            return leave(CALL, f::STATUS_FWP_INVALID_FLAGS);
        }
        (
            s.flags & w::FWPM_SESSION_FLAG_DYNAMIC != 0,
            s.txnWaitTimeoutInMSec,
        )
    };
    let handle = {
        let mut state = lock();
        let fwp = &mut state.fwp;
        let handle = fwp.next_handle;
        fwp.next_handle += 0x10;
        fwp.sessions.insert(
            handle,
            Session {
                dynamic,
                wait_ms,
                txn: None,
            },
        );
        fwp.stats.sessions_opened += 1;
        handle
    };
    // SAFETY: valid for a write (this function's contract).
    unsafe { engine_handle.write_unaligned(handle) };
    leave(CALL, STATUS_SUCCESS)
}

pub(crate) extern "win64" fn fwpm_engine_close0(engine_handle: usize) -> i32 {
    const CALL: FwpCall = FwpCall::EngineClose;
    let injected = enter(CALL);
    // An injected `STATUS_INVALID_HANDLE` says no such session exists: it ends as closed.
    if injected.is_some_and(|status| status != STATUS_INVALID_HANDLE) {
        return injected.unwrap_or(STATUS_SUCCESS);
    }
    let status = {
        let mut state = lock();
        let fwp = &mut state.fwp;
        match fwp.sessions.remove(&engine_handle) {
            None => STATUS_INVALID_HANDLE,
            Some(session) => {
                if session.txn.is_some() {
                    fwp.stats.aborts += 1;
                }
                if fwp.writer == Some(engine_handle) {
                    fwp.writer = None;
                }
                if session.dynamic {
                    let mut objects = fwp.committed.objects.clone();
                    let before = objects.clone();
                    objects.filters.retain(|_, f| f.session != engine_handle);
                    objects.sublayers.retain(|_, s| s.session != engine_handle);
                    objects.providers.retain(|_, p| p.session != engine_handle);
                    if objects != before {
                        fwp.publish(objects, CommitCause::DynamicClose(engine_handle));
                    }
                }
                STATUS_SUCCESS
            }
        }
    };
    if let Some(status) = injected {
        // `enter` recorded the injected result.
        CHANGED.notify_all();
        return status;
    }
    leave(CALL, status)
}

pub(crate) extern "win64" fn fwpm_transaction_begin0(engine_handle: usize, flags: u32) -> i32 {
    const CALL: FwpCall = FwpCall::TransactionBegin;
    if let Some(status) = enter(CALL) {
        return status;
    }
    if flags & !w::FWPM_TXN_READ_ONLY != 0 {
        return leave(CALL, f::STATUS_FWP_INVALID_FLAGS);
    }
    let read_only = flags & w::FWPM_TXN_READ_ONLY != 0;
    let start = Instant::now();
    let mut state = lock();
    loop {
        state = halt_if_stopped(state);
        let fwp = &mut state.fwp;
        let Some(session) = fwp.sessions.get(&engine_handle) else {
            drop(state);
            return leave(CALL, STATUS_INVALID_HANDLE);
        };
        if session.txn.is_some() {
            drop(state);
            return leave(CALL, f::STATUS_FWP_TXN_IN_PROGRESS);
        }
        // One read/write transaction in the engine at a time; a read-only one needs none.
        if read_only || fwp.writer.is_none() {
            if !read_only {
                fwp.writer = Some(engine_handle);
            }
            let work = fwp.committed.objects.clone();
            if let Some(session) = fwp.sessions.get_mut(&engine_handle) {
                session.txn = Some(Transaction { read_only, work });
            }
            drop(state);
            return leave(CALL, STATUS_SUCCESS);
        }
        let limit = session.wait_ms;
        if limit != 0 && start.elapsed() >= Duration::from_millis(u64::from(limit)) {
            drop(state);
            return leave(CALL, f::STATUS_FWP_TIMEOUT);
        }
        state = wait(state);
    }
}

pub(crate) extern "win64" fn fwpm_transaction_commit0(engine_handle: usize) -> i32 {
    const CALL: FwpCall = FwpCall::TransactionCommit;
    let injected = enter(CALL);
    let status = {
        let mut state = lock();
        let fwp = &mut state.fwp;
        match fwp.sessions.get_mut(&engine_handle) {
            None => injected.unwrap_or(STATUS_INVALID_HANDLE),
            Some(session) => match session.txn.take() {
                None => injected.unwrap_or(f::STATUS_FWP_NO_TXN_IN_PROGRESS),
                Some(txn) => {
                    if fwp.writer == Some(engine_handle) {
                        fwp.writer = None;
                    }
                    if let Some(status) = injected {
                        // A failed commit: the engine rolls the transaction back.
                        fwp.stats.aborts += 1;
                        status
                    } else {
                        if !txn.read_only {
                            fwp.publish(txn.work, CommitCause::Commit(engine_handle));
                        }
                        fwp.stats.commits += 1;
                        STATUS_SUCCESS
                    }
                }
            },
        }
    };
    CHANGED.notify_all();
    if injected.is_some() {
        // `enter` recorded the injected result.
        return status;
    }
    leave(CALL, status)
}

pub(crate) extern "win64" fn fwpm_transaction_abort0(engine_handle: usize) -> i32 {
    const CALL: FwpCall = FwpCall::TransactionAbort;
    if let Some(status) = enter(CALL) {
        if status == f::STATUS_FWP_NO_TXN_IN_PROGRESS {
            // The status says the session has no transaction: it ends, never published.
            let mut state = lock();
            let fwp = &mut state.fwp;
            if fwp
                .sessions
                .get_mut(&engine_handle)
                .is_some_and(|s| s.txn.take().is_some())
            {
                if fwp.writer == Some(engine_handle) {
                    fwp.writer = None;
                }
                fwp.stats.aborts += 1;
            }
            CHANGED.notify_all();
        }
        return status;
    }
    let status = {
        let mut state = lock();
        let fwp = &mut state.fwp;
        match fwp.sessions.get_mut(&engine_handle) {
            None => STATUS_INVALID_HANDLE,
            Some(session) => {
                if session.txn.take().is_some() {
                    if fwp.writer == Some(engine_handle) {
                        fwp.writer = None;
                    }
                    fwp.stats.aborts += 1;
                    STATUS_SUCCESS
                } else {
                    f::STATUS_FWP_NO_TXN_IN_PROGRESS
                }
            }
        }
    };
    leave(CALL, status)
}

/// Runs `edit` on the session's transaction, or, outside one, on a copy of the committed
/// state that is published at once when `edit` succeeds (an implicit transaction, which
/// waits for another session's read/write transaction as `Begin` does).
fn edit(
    engine_handle: usize,
    edit: impl FnOnce(&mut EngineObjects, &mut Fwp) -> Result<(), i32>,
) -> i32 {
    let mut state = lock();
    loop {
        state = halt_if_stopped(state);
        let fwp = &mut state.fwp;
        let Some(session) = fwp.sessions.get_mut(&engine_handle) else {
            return STATUS_INVALID_HANDLE;
        };
        if let Some(txn) = session.txn.as_mut() {
            if txn.read_only {
                return f::STATUS_FWP_INCOMPATIBLE_TXN;
            }
            let mut work = std::mem::take(&mut txn.work);
            let result = edit(&mut work, fwp);
            if let Some(txn) = fwp
                .sessions
                .get_mut(&engine_handle)
                .and_then(|s| s.txn.as_mut())
            {
                txn.work = work;
            }
            return result.err().unwrap_or(STATUS_SUCCESS);
        }
        if fwp.writer.is_none() {
            let mut work = fwp.committed.objects.clone();
            return match edit(&mut work, fwp) {
                Ok(()) => {
                    fwp.publish(work, CommitCause::Implicit(engine_handle));
                    STATUS_SUCCESS
                }
                Err(status) => status,
            };
        }
        state = wait(state);
    }
}

fn new_key(fwp: &mut Fwp, given: &GUID) -> u128 {
    let key = guid_u128(given);
    if key != 0 {
        return key;
    }
    fwp.next_key += 1;
    fwp.next_key
}

/// # Safety
///
/// `provider` is NULL or an `FWPM_PROVIDER0` whose strings are NULL or NUL-terminated
/// (`FwpmProviderAdd0`'s contract).
pub(crate) unsafe extern "win64" fn fwpm_provider_add0(
    engine_handle: usize,
    provider: *const w::FWPM_PROVIDER0,
    sd: *mut c_void,
) -> i32 {
    const CALL: FwpCall = FwpCall::ProviderAdd;
    if let Some(status) = enter(CALL) {
        return status;
    }
    if provider.is_null() {
        return leave(CALL, f::STATUS_FWP_NULL_POINTER);
    }
    // SAFETY: an `FWPM_PROVIDER0` (this function's contract).
    let p = unsafe { provider.read_unaligned() };
    // SAFETY: NULL or NUL-terminated (this function's contract).
    let Some(name) = (unsafe { read_wide(p.displayData.name) }) else {
        return leave(CALL, f::STATUS_FWP_NULL_DISPLAY_NAME);
    };
    let status = if !sd.is_null() {
        // Security descriptors are not modelled.
        STATUS_INVALID_PARAMETER
    } else if p.flags & !w::FWPM_PROVIDER_FLAG_PERSISTENT != 0 {
        f::STATUS_FWP_INVALID_FLAGS
    } else {
        let persistent = p.flags & w::FWPM_PROVIDER_FLAG_PERSISTENT != 0;
        edit(engine_handle, |objects, fwp| {
            if persistent && fwp.sessions.get(&engine_handle).is_some_and(|s| s.dynamic) {
                return Err(f::STATUS_FWP_DYNAMIC_SESSION_IN_PROGRESS);
            }
            let key = new_key(fwp, &p.providerKey);
            if objects.providers.contains_key(&key) {
                return Err(f::STATUS_FWP_ALREADY_EXISTS);
            }
            objects.providers.insert(
                key,
                Provider {
                    key,
                    name,
                    session: engine_handle,
                },
            );
            Ok(())
        })
    };
    leave(CALL, status)
}

/// # Safety
///
/// `sublayer` is NULL or an `FWPM_SUBLAYER0` whose strings are NULL or NUL-terminated and
/// whose `providerKey` is NULL or a GUID (`FwpmSubLayerAdd0`'s contract).
pub(crate) unsafe extern "win64" fn fwpm_sub_layer_add0(
    engine_handle: usize,
    sublayer: *const w::FWPM_SUBLAYER0,
    sd: *mut c_void,
) -> i32 {
    const CALL: FwpCall = FwpCall::SubLayerAdd;
    if let Some(status) = enter(CALL) {
        return status;
    }
    if sublayer.is_null() {
        return leave(CALL, f::STATUS_FWP_NULL_POINTER);
    }
    // SAFETY: an `FWPM_SUBLAYER0` (this function's contract).
    let s = unsafe { sublayer.read_unaligned() };
    // SAFETY: NULL or NUL-terminated (this function's contract).
    let Some(name) = (unsafe { read_wide(s.displayData.name) }) else {
        return leave(CALL, f::STATUS_FWP_NULL_DISPLAY_NAME);
    };
    let provider = if s.providerKey.is_null() {
        None
    } else {
        // SAFETY: a GUID (this function's contract).
        Some(guid_u128(&unsafe { s.providerKey.read_unaligned() }))
    };
    let status = if !sd.is_null() {
        STATUS_INVALID_PARAMETER
    } else if s.flags & !w::FWPM_SUBLAYER_FLAG_PERSISTENT != 0 {
        f::STATUS_FWP_INVALID_FLAGS
    } else {
        let persistent = s.flags & w::FWPM_SUBLAYER_FLAG_PERSISTENT != 0;
        edit(engine_handle, |objects, fwp| {
            if persistent && fwp.sessions.get(&engine_handle).is_some_and(|s| s.dynamic) {
                return Err(f::STATUS_FWP_DYNAMIC_SESSION_IN_PROGRESS);
            }
            if provider.is_some_and(|p| !objects.providers.contains_key(&p)) {
                return Err(f::STATUS_FWP_PROVIDER_NOT_FOUND);
            }
            let key = new_key(fwp, &s.subLayerKey);
            if objects.sublayers.contains_key(&key) || key == guid_u128(&w::FWPM_SUBLAYER_UNIVERSAL)
            {
                return Err(f::STATUS_FWP_ALREADY_EXISTS);
            }
            objects.sublayers.insert(
                key,
                SubLayer {
                    key,
                    name,
                    weight: s.weight,
                    provider,
                    session: engine_handle,
                },
            );
            Ok(())
        })
    };
    leave(CALL, status)
}

/// Reads one condition, checked against the layer.
///
/// # Safety
///
/// Every pointer in `c.conditionValue` that its type names is valid.
unsafe fn read_condition(
    condition: &w::FWPM_FILTER_CONDITION0,
    layer: Layer,
) -> Result<Condition, i32> {
    let Some(field) = Field::from_guid(&condition.fieldKey) else {
        return Err(f::STATUS_FWP_CONDITION_NOT_FOUND);
    };
    if condition.matchType != w::FWP_MATCH_EQUAL {
        return Err(f::STATUS_FWP_MATCH_TYPE_MISMATCH);
    }
    let value = &condition.conditionValue;
    let kind = value.r#type;
    let v = &value.Anonymous;
    let value = match (field, kind) {
        // SAFETY: `type` names the member (the structure's contract).
        (Field::Protocol, w::FWP_UINT8) => Value::U8(unsafe { v.uint8 }),
        (Field::LocalPort | Field::RemotePort, w::FWP_UINT16) => {
            // SAFETY: `type` names the member.
            Value::U16(unsafe { v.uint16 })
        }
        (Field::LocalAddress | Field::RemoteAddress, w::FWP_UINT32) if !layer.is_v6() => {
            // SAFETY: `type` names the member.
            let addr = unsafe { v.uint32 };
            Value::V4 {
                addr,
                mask: u32::MAX,
            }
        }
        (Field::LocalAddress | Field::RemoteAddress, w::FWP_V4_ADDR_MASK) if !layer.is_v6() => {
            // SAFETY: `type` names the member.
            let p = unsafe { v.v4AddrMask };
            if p.is_null() {
                return Err(f::STATUS_FWP_NULL_POINTER);
            }
            // SAFETY: non-NULL, and valid as its type says (this function's contract).
            let m = unsafe { p.read_unaligned() };
            if m.mask.leading_ones() + m.mask.trailing_zeros() != 32 {
                return Err(f::STATUS_FWP_INVALID_NET_MASK);
            }
            Value::V4 {
                addr: m.addr,
                mask: m.mask,
            }
        }
        (Field::LocalAddress | Field::RemoteAddress, w::FWP_BYTE_ARRAY16_TYPE) if layer.is_v6() => {
            // SAFETY: `type` names the member.
            let p = unsafe { v.byteArray16 };
            if p.is_null() {
                return Err(f::STATUS_FWP_NULL_POINTER);
            }
            // SAFETY: non-NULL, and valid as its type says (this function's contract).
            let bytes = unsafe { p.read_unaligned() };
            Value::V6 {
                addr: bytes.byteArray16,
                prefix: 128,
            }
        }
        (Field::LocalAddress | Field::RemoteAddress, w::FWP_V6_ADDR_MASK) if layer.is_v6() => {
            // SAFETY: `type` names the member.
            let p = unsafe { v.v6AddrMask };
            if p.is_null() {
                return Err(f::STATUS_FWP_NULL_POINTER);
            }
            // SAFETY: non-NULL, and valid as its type says (this function's contract).
            let m = unsafe { p.read_unaligned() };
            if m.prefixLength > 128 {
                return Err(f::STATUS_FWP_INVALID_NET_MASK);
            }
            Value::V6 {
                addr: m.addr,
                prefix: m.prefixLength,
            }
        }
        _ => return Err(f::STATUS_FWP_TYPE_MISMATCH),
    };
    Ok(Condition { field, value })
}

/// The weight as given and the effective weight: the top four bits from an `FWP_UINT8`
/// (`FWP_EMPTY`: 0), the next bits from the number of conditions.
///
/// # Safety
///
/// `weight.Anonymous.uint64` is valid when `weight.type` is `FWP_UINT64`.
unsafe fn read_weight(weight: &w::FWP_VALUE0, conditions: usize) -> Result<(Weight, u64), i32> {
    let specificity = (conditions.min(0xFFF) as u64) << 48;
    match weight.r#type {
        w::FWP_EMPTY => Ok((Weight::Empty, specificity)),
        w::FWP_UINT8 => {
            // SAFETY: the member `type` names.
            let v = unsafe { weight.Anonymous.uint8 };
            if v > 15 {
                return Err(f::STATUS_FWP_INVALID_WEIGHT);
            }
            Ok((Weight::Uint8(v), (u64::from(v) << 60) | specificity))
        }
        w::FWP_UINT64 => {
            // SAFETY: the member `type` names; valid when non-NULL (this function's contract).
            let p = unsafe { weight.Anonymous.uint64 };
            if p.is_null() {
                return Err(f::STATUS_FWP_NULL_POINTER);
            }
            // SAFETY: as above.
            let v = unsafe { p.read_unaligned() };
            Ok((Weight::Uint64(v), v))
        }
        _ => Err(f::STATUS_FWP_INVALID_WEIGHT),
    }
}

/// # Safety
///
/// `filter` is NULL or an `FWPM_FILTER0` whose pointers are NULL or valid as its type
/// documents (name, providerKey, `numFilterConditions` conditions and their values, the
/// weight); `id` is NULL or valid for a write (`FwpmFilterAdd0`'s contract).
#[allow(
    clippy::too_many_lines,
    reason = "one routine's checks, in the order the engine applies them"
)]
pub(crate) unsafe extern "win64" fn fwpm_filter_add0(
    engine_handle: usize,
    filter: *const w::FWPM_FILTER0,
    sd: *mut c_void,
    id: *mut u64,
) -> i32 {
    const CALL: FwpCall = FwpCall::FilterAdd;
    if let Some(status) = enter(CALL) {
        return status;
    }
    if filter.is_null() {
        return leave(CALL, f::STATUS_FWP_NULL_POINTER);
    }
    // SAFETY: an `FWPM_FILTER0` (this function's contract).
    let fl = unsafe { filter.read_unaligned() };
    // SAFETY: NULL or NUL-terminated (this function's contract).
    let Some(name) = (unsafe { read_wide(fl.displayData.name) }) else {
        return leave(CALL, f::STATUS_FWP_NULL_DISPLAY_NAME);
    };
    if !sd.is_null() {
        return leave(CALL, STATUS_INVALID_PARAMETER);
    }
    // Accepted flags: none, or CLEAR_ACTION_RIGHT (a hard action; with one sublayer of the
    // caller's it changes no verdict the model computes). PERSISTENT is refused in a
    // dynamic session below; BOOTTIME, DISABLED, provider contexts, ... are not modelled.
    let known = w::FWPM_FILTER_FLAG_CLEAR_ACTION_RIGHT | w::FWPM_FILTER_FLAG_PERSISTENT;
    if fl.flags & !known != 0 {
        return leave(CALL, f::STATUS_FWP_INVALID_FLAGS);
    }
    let Some(layer) = Layer::from_guid(&fl.layerKey) else {
        return leave(CALL, f::STATUS_FWP_LAYER_NOT_FOUND);
    };
    let action = match fl.action.r#type {
        w::FWP_ACTION_PERMIT => Action::Permit,
        w::FWP_ACTION_BLOCK => Action::Block,
        w::FWP_ACTION_CALLOUT_TERMINATING
        | w::FWP_ACTION_CALLOUT_INSPECTION
        | w::FWP_ACTION_CALLOUT_UNKNOWN => return leave(CALL, f::STATUS_FWP_CALLOUT_NOT_FOUND),
        _ => return leave(CALL, f::STATUS_FWP_INVALID_ACTION_TYPE),
    };
    let count = fl.numFilterConditions as usize;
    if count > 0 && fl.filterCondition.is_null() {
        return leave(CALL, f::STATUS_FWP_NULL_POINTER);
    }
    let mut conditions = Vec::with_capacity(count);
    for i in 0..count {
        // SAFETY: `numFilterConditions` conditions (this function's contract).
        let c = unsafe { fl.filterCondition.add(i).read_unaligned() };
        // SAFETY: their values are valid as their types say (this function's contract).
        match unsafe { read_condition(&c, layer) } {
            Ok(c) => conditions.push(c),
            Err(status) => return leave(CALL, status),
        }
    }
    // SAFETY: the weight's pointer is valid when its type names one (this function's
    // contract).
    let (weight, effective_weight) = match unsafe { read_weight(&fl.weight, count) } {
        Ok(w) => w,
        Err(status) => return leave(CALL, status),
    };
    let provider = if fl.providerKey.is_null() {
        None
    } else {
        // SAFETY: a GUID (this function's contract).
        Some(guid_u128(&unsafe { fl.providerKey.read_unaligned() }))
    };
    let sublayer = match guid_u128(&fl.subLayerKey) {
        0 => guid_u128(&w::FWPM_SUBLAYER_UNIVERSAL),
        key => key,
    };
    let persistent = fl.flags & w::FWPM_FILTER_FLAG_PERSISTENT != 0;
    let mut new_id = 0;
    let status = edit(engine_handle, |objects, fwp| {
        if persistent && fwp.sessions.get(&engine_handle).is_some_and(|s| s.dynamic) {
            return Err(f::STATUS_FWP_DYNAMIC_SESSION_IN_PROGRESS);
        }
        if provider.is_some_and(|p| !objects.providers.contains_key(&p)) {
            return Err(f::STATUS_FWP_PROVIDER_NOT_FOUND);
        }
        if sublayer != guid_u128(&w::FWPM_SUBLAYER_UNIVERSAL)
            && !objects.sublayers.contains_key(&sublayer)
        {
            return Err(f::STATUS_FWP_SUBLAYER_NOT_FOUND);
        }
        let key = new_key(fwp, &fl.filterKey);
        if objects.filters.values().any(|f| f.key == key) {
            return Err(f::STATUS_FWP_ALREADY_EXISTS);
        }
        new_id = fwp.next_filter_id;
        fwp.next_filter_id += 1;
        objects.filters.insert(
            new_id,
            Filter {
                id: new_id,
                key,
                name,
                layer,
                sublayer,
                provider,
                weight,
                effective_weight,
                action,
                conditions,
                session: engine_handle,
            },
        );
        Ok(())
    });
    if status == STATUS_SUCCESS && !id.is_null() {
        // SAFETY: valid for a write (this function's contract).
        unsafe { id.write_unaligned(new_id) };
    }
    leave(CALL, status)
}

pub(crate) extern "win64" fn fwpm_filter_delete_by_id0(engine_handle: usize, id: u64) -> i32 {
    const CALL: FwpCall = FwpCall::FilterDeleteById;
    if let Some(status) = enter(CALL) {
        return status;
    }
    let status = edit(engine_handle, |objects, _| {
        objects
            .filters
            .remove(&id)
            .map(|_| ())
            .ok_or(f::STATUS_FWP_FILTER_NOT_FOUND)
    });
    leave(CALL, status)
}

/// # Safety
///
/// `key` is NULL or a GUID (`FwpmSubLayerDeleteByKey0`'s contract).
pub(crate) unsafe extern "win64" fn fwpm_sub_layer_delete_by_key0(
    engine_handle: usize,
    key: *const GUID,
) -> i32 {
    const CALL: FwpCall = FwpCall::SubLayerDeleteByKey;
    if let Some(status) = enter(CALL) {
        return status;
    }
    if key.is_null() {
        return leave(CALL, f::STATUS_FWP_NULL_POINTER);
    }
    // SAFETY: a GUID (this function's contract).
    let key = guid_u128(&unsafe { key.read_unaligned() });
    let status = edit(engine_handle, |objects, _| {
        if !objects.sublayers.contains_key(&key) {
            return Err(f::STATUS_FWP_SUBLAYER_NOT_FOUND);
        }
        if objects.filters.values().any(|f| f.sublayer == key) {
            return Err(f::STATUS_FWP_IN_USE);
        }
        objects.sublayers.remove(&key);
        Ok(())
    });
    leave(CALL, status)
}

/// # Safety
///
/// `key` is NULL or a GUID (`FwpmProviderDeleteByKey0`'s contract).
pub(crate) unsafe extern "win64" fn fwpm_provider_delete_by_key0(
    engine_handle: usize,
    key: *const GUID,
) -> i32 {
    const CALL: FwpCall = FwpCall::ProviderDeleteByKey;
    if let Some(status) = enter(CALL) {
        return status;
    }
    if key.is_null() {
        return leave(CALL, f::STATUS_FWP_NULL_POINTER);
    }
    // SAFETY: a GUID (this function's contract).
    let key = guid_u128(&unsafe { key.read_unaligned() });
    let status = edit(engine_handle, |objects, _| {
        if !objects.providers.contains_key(&key) {
            return Err(f::STATUS_FWP_PROVIDER_NOT_FOUND);
        }
        let used = objects.sublayers.values().any(|s| s.provider == Some(key))
            || objects.filters.values().any(|f| f.provider == Some(key));
        if used {
            return Err(f::STATUS_FWP_IN_USE);
        }
        objects.providers.remove(&key);
        Ok(())
    });
    leave(CALL, status)
}

/// The host address of `name` in `fwpkclnt.sys`, if modelled.
pub(crate) fn resolve(name: &str) -> Option<usize> {
    Some(match name {
        "FwpmEngineOpen0" => fwpm_engine_open0 as *const () as usize,
        "FwpmEngineClose0" => fwpm_engine_close0 as *const () as usize,
        "FwpmTransactionBegin0" => fwpm_transaction_begin0 as *const () as usize,
        "FwpmTransactionCommit0" => fwpm_transaction_commit0 as *const () as usize,
        "FwpmTransactionAbort0" => fwpm_transaction_abort0 as *const () as usize,
        "FwpmProviderAdd0" => fwpm_provider_add0 as *const () as usize,
        "FwpmSubLayerAdd0" => fwpm_sub_layer_add0 as *const () as usize,
        "FwpmFilterAdd0" => fwpm_filter_add0 as *const () as usize,
        "FwpmFilterDeleteById0" => fwpm_filter_delete_by_id0 as *const () as usize,
        "FwpmSubLayerDeleteByKey0" => fwpm_sub_layer_delete_by_key0 as *const () as usize,
        "FwpmProviderDeleteByKey0" => fwpm_provider_delete_by_key0 as *const () as usize,
        _ => return None,
    })
}

/// Helpers to build packets.
impl Packet {
    /// A UDP/IPv4 packet.
    #[must_use]
    pub const fn udp4(
        inbound: bool,
        local: Ipv4Addr,
        local_port: u16,
        remote: Ipv4Addr,
        remote_port: u16,
    ) -> Packet {
        Packet {
            inbound,
            protocol: 17,
            local_address: IpAddr::V4(local),
            remote_address: IpAddr::V4(remote),
            local_port,
            remote_port,
        }
    }

    /// An ICMPv6 packet of `icmp_type` (code 0).
    #[must_use]
    pub const fn icmpv6(inbound: bool, local: Ipv6Addr, remote: Ipv6Addr, icmp_type: u8) -> Packet {
        Packet {
            inbound,
            protocol: 58,
            local_address: IpAddr::V6(local),
            remote_address: IpAddr::V6(remote),
            local_port: icmp_type as u16,
            remote_port: 0,
        }
    }
}
