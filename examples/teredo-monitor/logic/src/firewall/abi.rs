//! The specs of `filters.rs` as the engine's own structures (`windows-sys`: Microsoft's
//! metadata, whose `Win32::NetworkManagement::WindowsFilteringPlatform` layouts are the
//! kernel's too). Built on every target, so the host tests check what the kernel engine
//! passes to `fwpkclnt.sys`.
//!
//! Each `with_*` function builds the structure and everything it points to on its own stack
//! frame, and lends it to `f` for the duration of one call: the pointers inside are valid
//! exactly while `f` runs, which is the duration of the engine call made in `f`. The engine
//! copies what it keeps (`fwpmk.h` calls take their inputs by pointer, for the call only);
//! no pointer is written through.

use windows_sys::Win32::NetworkManagement::WindowsFilteringPlatform::{
    FWP_ACTION_BLOCK, FWP_ACTION_PERMIT, FWP_ACTION_TYPE, FWP_CONDITION_VALUE0,
    FWP_CONDITION_VALUE0_0, FWP_MATCH_EQUAL, FWP_UINT8, FWP_UINT16, FWP_UINT32, FWP_VALUE0,
    FWP_VALUE0_0, FWPM_ACTION0, FWPM_CONDITION_IP_LOCAL_ADDRESS, FWPM_CONDITION_IP_LOCAL_PORT,
    FWPM_CONDITION_IP_PROTOCOL, FWPM_CONDITION_IP_REMOTE_PORT, FWPM_DISPLAY_DATA0,
    FWPM_FILTER_CONDITION0, FWPM_FILTER0, FWPM_LAYER_ALE_AUTH_CONNECT_V4,
    FWPM_LAYER_ALE_AUTH_CONNECT_V6, FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4,
    FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6, FWPM_PROVIDER0, FWPM_SESSION_FLAG_DYNAMIC, FWPM_SESSION0,
    FWPM_SUBLAYER0,
};
use windows_sys::core::GUID;

use super::filters::{
    Action, Condition, DisplayName, FilterSpec, Layer, MAX_CONDITIONS, ProviderSpec, SessionSpec,
    SublayerSpec,
};

/// `FWPM_CONDITION_ICMP_TYPE`: `fwpmu.h` defines it as `FWPM_CONDITION_IP_LOCAL_PORT` (at the
/// ALE layers the engine reports an ICMP type in the local-port field). `windows-sys` has no
/// constant of that name.
pub const FWPM_CONDITION_ICMP_TYPE: GUID = FWPM_CONDITION_IP_LOCAL_PORT;

/// The layer's key.
#[must_use]
pub const fn layer_key(layer: Layer) -> GUID {
    match layer {
        Layer::InboundV4 => FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4,
        Layer::InboundV6 => FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6,
        Layer::OutboundV4 => FWPM_LAYER_ALE_AUTH_CONNECT_V4,
        Layer::OutboundV6 => FWPM_LAYER_ALE_AUTH_CONNECT_V6,
    }
}

/// The action's `FWP_ACTION_TYPE`.
#[must_use]
pub const fn action_type(action: Action) -> FWP_ACTION_TYPE {
    match action {
        Action::Permit => FWP_ACTION_PERMIT,
        Action::Block => FWP_ACTION_BLOCK,
    }
}

/// One condition as `FWPM_FILTER_CONDITION0` (`FWP_MATCH_EQUAL`; every value is inline in
/// the union, no pointer).
#[must_use]
pub const fn condition0(condition: Condition) -> FWPM_FILTER_CONDITION0 {
    let (field, r#type, value) = match condition {
        Condition::IpProtocol(p) => (
            FWPM_CONDITION_IP_PROTOCOL,
            FWP_UINT8,
            FWP_CONDITION_VALUE0_0 { uint8: p },
        ),
        Condition::LocalPort(p) => (
            FWPM_CONDITION_IP_LOCAL_PORT,
            FWP_UINT16,
            FWP_CONDITION_VALUE0_0 { uint16: p },
        ),
        Condition::RemotePort(p) => (
            FWPM_CONDITION_IP_REMOTE_PORT,
            FWP_UINT16,
            FWP_CONDITION_VALUE0_0 { uint16: p },
        ),
        // The engine's IPv4 address values are `UINT32` in host byte order.
        Condition::LocalAddressV4(a) => (
            FWPM_CONDITION_IP_LOCAL_ADDRESS,
            FWP_UINT32,
            FWP_CONDITION_VALUE0_0 {
                uint32: a.to_bits(),
            },
        ),
        Condition::IcmpType(t) => (
            FWPM_CONDITION_ICMP_TYPE,
            FWP_UINT16,
            FWP_CONDITION_VALUE0_0 { uint16: t },
        ),
    };
    FWPM_FILTER_CONDITION0 {
        fieldKey: field,
        matchType: FWP_MATCH_EQUAL,
        conditionValue: FWP_CONDITION_VALUE0 {
            r#type,
            Anonymous: value,
        },
    }
}

/// `FWPM_DISPLAY_DATA0` naming `name` (no description). The engine reads the string and
/// never writes it; the `*mut` is the C declaration's (`wchar_t*`).
fn display_data(name: &DisplayName) -> FWPM_DISPLAY_DATA0 {
    FWPM_DISPLAY_DATA0 {
        name: name.wide.as_ptr().cast_mut(),
        description: core::ptr::null_mut(),
    }
}

/// Lends `FWPM_SESSION0` for `spec` to `f` (flags: `FWPM_SESSION_FLAG_DYNAMIC` when asked;
/// the key, the transaction wait timeout and the rest zero: the engine's defaults).
pub fn with_session0<R>(spec: &SessionSpec, f: impl FnOnce(&FWPM_SESSION0) -> R) -> R {
    let session = FWPM_SESSION0 {
        displayData: display_data(&spec.name),
        flags: if spec.dynamic {
            FWPM_SESSION_FLAG_DYNAMIC
        } else {
            0
        },
        ..FWPM_SESSION0::default()
    };
    f(&session)
}

/// Lends `FWPM_PROVIDER0` for `spec` to `f` (flags 0: not persistent).
pub fn with_provider0<R>(spec: &ProviderSpec, f: impl FnOnce(&FWPM_PROVIDER0) -> R) -> R {
    let provider = FWPM_PROVIDER0 {
        providerKey: GUID::from_u128(spec.key),
        displayData: display_data(&spec.name),
        ..FWPM_PROVIDER0::default()
    };
    f(&provider)
}

/// Lends `FWPM_SUBLAYER0` for `spec` to `f` (flags 0: not persistent).
pub fn with_sublayer0<R>(spec: &SublayerSpec, f: impl FnOnce(&FWPM_SUBLAYER0) -> R) -> R {
    let mut provider = GUID::from_u128(spec.provider);
    let sublayer = FWPM_SUBLAYER0 {
        subLayerKey: GUID::from_u128(spec.key),
        displayData: display_data(&spec.name),
        providerKey: &raw mut provider,
        weight: spec.weight,
        ..FWPM_SUBLAYER0::default()
    };
    f(&sublayer)
}

/// Lends `FWPM_FILTER0` for `spec` to `f`: a generated key (zero), no flags, our provider
/// and sublayer, a `FWP_UINT8` weight, the conditions, the action; the engine fills
/// `filterId` and `effectiveWeight` of its own copy.
pub fn with_filter0<R>(spec: &FilterSpec, f: impl FnOnce(&FWPM_FILTER0) -> R) -> R {
    let mut provider = GUID::from_u128(spec.provider());
    let mut conditions = [condition0(Condition::IpProtocol(0)); MAX_CONDITIONS];
    for (slot, condition) in conditions.iter_mut().zip(spec.conditions()) {
        *slot = condition0(*condition);
    }
    // At most MAX_CONDITIONS (3), so the fallback is never taken.
    let count = u32::try_from(spec.conditions().len()).unwrap_or(0);
    let filter = FWPM_FILTER0 {
        displayData: display_data(spec.name),
        providerKey: &raw mut provider,
        layerKey: layer_key(spec.layer),
        subLayerKey: GUID::from_u128(spec.sublayer()),
        weight: FWP_VALUE0 {
            r#type: FWP_UINT8,
            Anonymous: FWP_VALUE0_0 { uint8: spec.weight },
        },
        numFilterConditions: count,
        filterCondition: conditions.as_mut_ptr(),
        action: FWPM_ACTION0 {
            r#type: action_type(spec.action),
            ..FWPM_ACTION0::default()
        },
        ..FWPM_FILTER0::default()
    };
    f(&filter)
}
