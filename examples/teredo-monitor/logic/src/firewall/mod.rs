//! The firewall: the driver's WFP filters, kept on the Teredo client's current port.
//!
//! One module per filter-engine concept, as safing/portmaster's `windows_kext` arranges
//! its own:
//!
//! | module | what |
//! |---|---|
//! | [`engine`] | [`FilterEngine`]: the management calls the driver makes, as a trait; [`FwpError`] |
//! | [`transaction`] | [`Transaction`]: aborts on drop unless committed |
//! | [`filters`] | the filter design as data: session, provider, sublayer, layers, conditions, [`FilterSpec`]s from the library's rules |
//! | `abi` | those specs as `FWPM_SESSION0`, `FWPM_PROVIDER0`, `FWPM_SUBLAYER0`, `FWPM_FILTER0` (`windows-sys`) |
//! | `fwpkclnt` | the kernel functions, declared against `fwpkclnt.sys` (Windows targets) |
//! | `wfp` | `WfpEngine`: the trait over those functions (Windows targets) |
//! | [`manager`] | [`FirewallManager`]: install, follow the port, remove |
//! | `mock` | `MockFilterEngine` (feature `host-mock`) |
//!
//! # The filters
//!
//! All in one sublayer of ours ([`filters::SUBLAYER_KEY`], weight `0x8000`) of one provider
//! of ours ([`filters::PROVIDER_KEY`]), added over a dynamic session
//! (`FWPM_SESSION_FLAG_DYNAMIC`): the engine deletes every object of the session when the
//! driver closes its handle, or dies.
//!
//! - Layers: inbound at `FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4`/`_V6`, outbound at
//!   `FWPM_LAYER_ALE_AUTH_CONNECT_V4`/`_V6`; IPv4 for the UDP rules, IPv6 for ICMPv6. A rule
//!   for both directions is one filter per direction.
//! - Conditions, all `FWP_MATCH_EQUAL`: `FWPM_CONDITION_IP_PROTOCOL` (`FWP_UINT8`: 17 UDP,
//!   58 ICMPv6), `FWPM_CONDITION_IP_LOCAL_PORT` / `_IP_REMOTE_PORT` (`FWP_UINT16`),
//!   `FWPM_CONDITION_IP_LOCAL_ADDRESS` (`FWP_UINT32`, host byte order: 224.0.0.253), the
//!   ICMPv6 type as `FWPM_CONDITION_ICMP_TYPE` (`FWP_UINT16`; the same key as
//!   `IP_LOCAL_PORT`). Conditions on different fields AND; no filter has two on one field.
//! - **Exceptions**: each rule of `TeredoExceptions::for_port(None).rules()` (Microsoft's
//!   required ones: the server, local discovery, ten ICMPv6 types) is a PERMIT filter of
//!   weight 10 (`FWP_UINT8`) per direction: 23 filters. The dynamic port's rule (both
//!   directions) is two more, inbound V4 and outbound V4 (UDP, local port = the port).
//! - **UPnP is not installed**: the library's rule is a policy choice, off by default, and
//!   its remote scope (the local subnet) depends on the interfaces' prefixes at run time, so
//!   no static filter expresses it ([`filters::Unexpressible::LocalSubnetScope`]). Under the
//!   demo policy, SSDP from the subnet is therefore blocked.
//! - **Demo policy (for a test VM)**: BLOCK filters of weight 1 in our sublayer: inbound UDP
//!   at `ALE_AUTH_RECV_ACCEPT_V4` and `_V6`, inbound ICMPv6 at `ALE_AUTH_RECV_ACCEPT_V6`. In
//!   our sublayer an inbound UDP or ICMPv6 packet is then permitted exactly when
//!   `TeredoExceptions::for_port(committed).allows(packet)`; everything else (outbound, TCP)
//!   matches no block of ours and is left to the other sublayers.
//!
//! # When the driver calls the engine
//!
//! - `DriverEntry` (`PASSIVE_LEVEL`): after the Teredo registration, open the engine, then
//!   one transaction: provider, sublayer, the static permits, the demo blocks, the dynamic
//!   port's permits for the port known then (if any); commit. On any failure the
//!   transaction is aborted, the engine closed, the registration cancelled, and the status
//!   returned: nothing is left behind.
//! - Each port change, from the driver's `PASSIVE_LEVEL` subscriber (a work item on the
//!   driver object, coalesced to the newest port): one transaction that adds the new
//!   port's filters before deleting the old ones, then commits, so no committed state lacks
//!   the current port's exception. On failure the transaction is aborted (the old filters
//!   stay committed, never dropped), the change is logged, and the port is kept as the
//!   intended one: the next call, made on the next port change, retries with the newest
//!   port. There is no retry without a notification (that would need a timer and another
//!   work item; the old port's exception stays committed meanwhile). Port → none (the
//!   client stopped): the dynamic filters are deleted.
//! - `DriverUnload`: see `crate::driver` for the order and why.

pub mod engine;
pub mod filters;
pub mod manager;
pub mod transaction;

pub mod abi;

#[cfg(windows)]
pub mod fwpkclnt;
#[cfg(windows)]
pub mod wfp;

#[cfg(feature = "host-mock")]
pub mod mock;

#[cfg(all(test, feature = "host-mock"))]
pub(crate) mod tests;

pub use engine::{FilterEngine, FilterId, FwpCall, FwpError, FwpErrorKind, NoFilterEngine};
pub use filters::FilterSpec;
pub use manager::{FirewallManager, PortChange, RemoveReport};
pub use transaction::Transaction;
