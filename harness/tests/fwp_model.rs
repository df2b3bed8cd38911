//! The filter engine model (`kernel/fwp.rs`), called as a driver calls it: the model's
//! `extern "win64"` functions resolved from `fwpkclnt.sys`, with windows-sys structures.
#![cfg(all(target_arch = "x86_64", unix))]

use core::ffi::c_void;
use core::mem::{offset_of, size_of};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use teredo_harness::Exclusive;
use teredo_harness::kernel::{self, Action, FwpCall, Layer, Packet, Verdict, Weight, fwp};
use windows_sys::Win32::Foundation as f;
use windows_sys::Win32::NetworkManagement::WindowsFilteringPlatform as w;
use windows_sys::core::GUID;

type Open = unsafe extern "win64" fn(
    *const u16,
    u32,
    *const c_void,
    *const w::FWPM_SESSION0,
    *mut usize,
) -> i32;
type Handle1 = extern "win64" fn(usize) -> i32;
type Begin = extern "win64" fn(usize, u32) -> i32;
type ProviderAdd = unsafe extern "win64" fn(usize, *const w::FWPM_PROVIDER0, *mut c_void) -> i32;
type SubLayerAdd = unsafe extern "win64" fn(usize, *const w::FWPM_SUBLAYER0, *mut c_void) -> i32;
type FilterAdd =
    unsafe extern "win64" fn(usize, *const w::FWPM_FILTER0, *mut c_void, *mut u64) -> i32;
type DeleteById = extern "win64" fn(usize, u64) -> i32;
type DeleteByKey = unsafe extern "win64" fn(usize, *const GUID) -> i32;

fn host<T>(name: &str) -> T {
    let address = kernel::resolve("fwpkclnt.sys", name).unwrap_or_else(|| panic!("{name}"));
    assert_eq!(size_of::<T>(), size_of::<usize>());
    // SAFETY: every use names `T` as the function pointer type of the documented signature
    // of `name` (fwpmk.h), which is the signature of the model's function.
    unsafe { std::mem::transmute_copy::<usize, T>(&address) }
}

const PROVIDER: GUID = GUID::from_u128(0x5465_7265_646f_0001_0000_0000_0000_0001);
const SUBLAYER: GUID = GUID::from_u128(0x5465_7265_646f_0002_0000_0000_0000_0002);
const OTHER_SUBLAYER: GUID = GUID::from_u128(0x5465_7265_646f_0002_0000_0000_0000_0003);

fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain([0]).collect()
}

/// A client of the model, as a driver uses the engine.
struct Client {
    name: Vec<u16>,
}

impl Client {
    fn new() -> Client {
        Client {
            name: wide("teredo test"),
        }
    }

    #[allow(
        clippy::unused_self,
        reason = "one client type for every call of the test"
    )]
    fn open(&self, dynamic: bool, wait_ms: u32) -> Result<usize, i32> {
        let open: Open = host("FwpmEngineOpen0");
        let session = w::FWPM_SESSION0 {
            flags: if dynamic {
                w::FWPM_SESSION_FLAG_DYNAMIC
            } else {
                0
            },
            txnWaitTimeoutInMSec: wait_ms,
            ..Default::default()
        };
        let mut handle = 0usize;
        // SAFETY: NULL server, a session, a handle to write (FwpmEngineOpen0's contract).
        let status = unsafe {
            open(
                core::ptr::null(),
                fwp::RPC_C_AUTHN_DEFAULT,
                core::ptr::null(),
                &raw const session,
                &raw mut handle,
            )
        };
        if status == 0 { Ok(handle) } else { Err(status) }
    }

    fn provider(&self, engine: usize) -> i32 {
        let add: ProviderAdd = host("FwpmProviderAdd0");
        let provider = w::FWPM_PROVIDER0 {
            providerKey: PROVIDER,
            displayData: w::FWPM_DISPLAY_DATA0 {
                name: self.name.as_ptr().cast_mut(),
                description: core::ptr::null_mut(),
            },
            ..Default::default()
        };
        // SAFETY: a provider with a NUL-terminated name, no security descriptor.
        unsafe { add(engine, &raw const provider, core::ptr::null_mut()) }
    }

    fn sublayer(&self, engine: usize, key: GUID, weight: u16) -> i32 {
        let add: SubLayerAdd = host("FwpmSubLayerAdd0");
        let mut provider = PROVIDER;
        let sublayer = w::FWPM_SUBLAYER0 {
            subLayerKey: key,
            displayData: w::FWPM_DISPLAY_DATA0 {
                name: self.name.as_ptr().cast_mut(),
                description: core::ptr::null_mut(),
            },
            providerKey: &raw mut provider,
            weight,
            ..Default::default()
        };
        // SAFETY: a sublayer with a name and a provider key, no security descriptor.
        unsafe { add(engine, &raw const sublayer, core::ptr::null_mut()) }
    }

    /// Adds a filter; `conditions` as built by [`cond_u8`] and friends.
    fn filter(
        &self,
        engine: usize,
        spec: &FilterSpec,
        conditions: &mut [w::FWPM_FILTER_CONDITION0],
    ) -> Result<u64, i32> {
        let add: FilterAdd = host("FwpmFilterAdd0");
        let mut provider = PROVIDER;
        let mut filter = w::FWPM_FILTER0 {
            displayData: w::FWPM_DISPLAY_DATA0 {
                name: self.name.as_ptr().cast_mut(),
                description: core::ptr::null_mut(),
            },
            providerKey: &raw mut provider,
            layerKey: spec.layer,
            subLayerKey: spec.sublayer,
            numFilterConditions: u32::try_from(conditions.len()).expect("few"),
            filterCondition: conditions.as_mut_ptr(),
            ..Default::default()
        };
        filter.weight.r#type = w::FWP_UINT8;
        filter.weight.Anonymous.uint8 = spec.weight;
        filter.action.r#type = spec.action;
        let mut id = 0u64;
        // SAFETY: a filter whose pointers (name, provider key, conditions) are valid for
        // the call; an id to write.
        let status = unsafe {
            add(
                engine,
                &raw const filter,
                core::ptr::null_mut(),
                &raw mut id,
            )
        };
        if status == 0 { Ok(id) } else { Err(status) }
    }
}

struct FilterSpec {
    layer: GUID,
    sublayer: GUID,
    weight: u8,
    action: u32,
}

fn spec(layer: GUID, weight: u8, action: u32) -> FilterSpec {
    FilterSpec {
        layer,
        sublayer: SUBLAYER,
        weight,
        action,
    }
}

fn cond(
    field: GUID,
    kind: i32,
    set: impl FnOnce(&mut w::FWP_CONDITION_VALUE0_0),
) -> w::FWPM_FILTER_CONDITION0 {
    let mut c = w::FWPM_FILTER_CONDITION0 {
        fieldKey: field,
        matchType: w::FWP_MATCH_EQUAL,
        ..Default::default()
    };
    c.conditionValue.r#type = kind;
    set(&mut c.conditionValue.Anonymous);
    c
}

fn protocol(p: u8) -> w::FWPM_FILTER_CONDITION0 {
    cond(w::FWPM_CONDITION_IP_PROTOCOL, w::FWP_UINT8, |v| v.uint8 = p)
}

fn local_port(p: u16) -> w::FWPM_FILTER_CONDITION0 {
    cond(w::FWPM_CONDITION_IP_LOCAL_PORT, w::FWP_UINT16, |v| {
        v.uint16 = p;
    })
}

fn remote_port(p: u16) -> w::FWPM_FILTER_CONDITION0 {
    cond(w::FWPM_CONDITION_IP_REMOTE_PORT, w::FWP_UINT16, |v| {
        v.uint16 = p;
    })
}

fn local_address(a: Ipv4Addr) -> w::FWPM_FILTER_CONDITION0 {
    cond(w::FWPM_CONDITION_IP_LOCAL_ADDRESS, w::FWP_UINT32, |v| {
        v.uint32 = a.to_bits();
    })
}

const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 20);
const PEER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

fn udp_in(port: u16) -> Packet {
    Packet::udp4(true, HOST, port, PEER, 61_000)
}

fn begin(engine: usize) -> i32 {
    let begin: Begin = host("FwpmTransactionBegin0");
    begin(engine, 0)
}

fn commit(engine: usize) -> i32 {
    let commit: Handle1 = host("FwpmTransactionCommit0");
    commit(engine)
}

fn abort(engine: usize) -> i32 {
    let abort: Handle1 = host("FwpmTransactionAbort0");
    abort(engine)
}

fn close(engine: usize) -> i32 {
    let close: Handle1 = host("FwpmEngineClose0");
    close(engine)
}

/// Our provider and sublayer, committed in a dynamic session.
fn session_with_sublayer(client: &Client) -> usize {
    let engine = client.open(true, 0).expect("open");
    assert_eq!(begin(engine), 0);
    assert_eq!(client.provider(engine), 0);
    assert_eq!(client.sublayer(engine, SUBLAYER, 0x100), 0);
    assert_eq!(commit(engine), 0);
    engine
}

#[test]
fn the_windows_sys_structures_have_the_x64_layouts() {
    // Sizes and offsets of the x64 SDK headers (fwpmtypes.h, fwptypes.h): 8-byte pointers,
    // unions padded to their largest member.
    assert_eq!(size_of::<GUID>(), 16);
    assert_eq!(size_of::<w::FWP_VALUE0>(), 16);
    assert_eq!(size_of::<w::FWP_CONDITION_VALUE0>(), 16);
    assert_eq!(size_of::<w::FWPM_DISPLAY_DATA0>(), 16);
    assert_eq!(size_of::<w::FWPM_ACTION0>(), 20);
    assert_eq!(size_of::<w::FWPM_FILTER_CONDITION0>(), 40);
    assert_eq!(offset_of!(w::FWPM_FILTER_CONDITION0, conditionValue), 24);
    assert_eq!(size_of::<w::FWPM_FILTER0>(), 200);
    assert_eq!(offset_of!(w::FWPM_FILTER0, flags), 32);
    assert_eq!(offset_of!(w::FWPM_FILTER0, providerKey), 40);
    assert_eq!(offset_of!(w::FWPM_FILTER0, layerKey), 64);
    assert_eq!(offset_of!(w::FWPM_FILTER0, subLayerKey), 80);
    assert_eq!(offset_of!(w::FWPM_FILTER0, weight), 96);
    assert_eq!(offset_of!(w::FWPM_FILTER0, numFilterConditions), 112);
    assert_eq!(offset_of!(w::FWPM_FILTER0, filterCondition), 120);
    assert_eq!(offset_of!(w::FWPM_FILTER0, action), 128);
    assert_eq!(offset_of!(w::FWPM_FILTER0, filterId), 176);
    assert_eq!(offset_of!(w::FWPM_FILTER0, effectiveWeight), 184);
    assert_eq!(size_of::<w::FWPM_SESSION0>(), 72);
    assert_eq!(offset_of!(w::FWPM_SESSION0, flags), 32);
    assert_eq!(offset_of!(w::FWPM_SESSION0, txnWaitTimeoutInMSec), 36);
    assert_eq!(size_of::<w::FWPM_PROVIDER0>(), 64);
    assert_eq!(size_of::<w::FWPM_SUBLAYER0>(), 72);
    assert_eq!(offset_of!(w::FWPM_SUBLAYER0, weight), 64);
    // The kernel-mode NTSTATUS forms share the low word with the documented FWP_E_ codes.
    assert_eq!(
        f::FWP_E_TXN_IN_PROGRESS & 0xFFFF,
        f::STATUS_FWP_TXN_IN_PROGRESS & 0xFFFF
    );
    const { assert!(f::FWP_E_TXN_IN_PROGRESS < 0 && f::STATUS_FWP_TXN_IN_PROGRESS < 0) };
}

#[test]
fn fwpkclnt_resolves_without_case_and_only_the_modelled_routines() {
    let names = [
        "FwpmEngineOpen0",
        "FwpmEngineClose0",
        "FwpmTransactionBegin0",
        "FwpmTransactionCommit0",
        "FwpmTransactionAbort0",
        "FwpmProviderAdd0",
        "FwpmSubLayerAdd0",
        "FwpmFilterAdd0",
        "FwpmFilterDeleteById0",
        "FwpmSubLayerDeleteByKey0",
        "FwpmProviderDeleteByKey0",
    ];
    for name in names {
        assert!(kernel::resolve("FWPKCLNT.SYS", name).is_some(), "{name}");
        assert!(kernel::resolve("fwpkclnt.sys", name).is_some(), "{name}");
        assert!(kernel::resolve("fwpuclnt.dll", name).is_none(), "{name}");
    }
    assert_eq!(names.len(), kernel::fwp::FWP_CALLS.len());
    assert!(kernel::resolve("fwpkclnt.sys", "FwpsCalloutRegister1").is_none());
}

#[test]
fn a_transaction_is_invisible_until_commit_and_a_dynamic_session_takes_its_objects_along() {
    let _one = Exclusive::bare_kernel();
    let client = Client::new();
    let engine = session_with_sublayer(&client);
    let after_setup = kernel::committed().generation;
    assert_eq!(kernel::fwp_stats().committed, (1, 1, 0));

    assert_eq!(begin(engine), 0);
    let mut block = [protocol(17)];
    let block_id = client
        .filter(
            engine,
            &spec(
                w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4,
                1,
                w::FWP_ACTION_BLOCK,
            ),
            &mut block,
        )
        .expect("block");
    let mut permit = [protocol(17), local_port(50_000)];
    let permit_id = client
        .filter(
            engine,
            &spec(
                w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4,
                10,
                w::FWP_ACTION_PERMIT,
            ),
            &mut permit,
        )
        .expect("permit");
    assert!(block_id >= fwp::FIRST_FILTER_ID && permit_id > block_id);
    assert!(block_id > u64::from(u32::MAX), "ids are 64-bit");
    // Not committed: classification sees the state before the transaction.
    let (verdict, filter, generation) = kernel::classify(&udp_in(50_001));
    assert_eq!(
        (verdict, filter, generation),
        (Verdict::Permit, None, after_setup)
    );
    assert_eq!(kernel::fwp_stats().open_transactions, 1);
    assert_eq!(commit(engine), 0);

    let snapshot = kernel::committed();
    assert_eq!(snapshot.generation, after_setup + 1);
    assert_eq!(
        snapshot.objects.classify(&udp_in(50_000)),
        (Verdict::Permit, Some(permit_id))
    );
    assert_eq!(
        snapshot.objects.classify(&udp_in(50_001)),
        (Verdict::Block, Some(block_id))
    );
    // Other layers and protocols: no filter, permitted.
    assert_eq!(
        snapshot
            .objects
            .classify(&Packet::udp4(false, HOST, 50_001, PEER, 1))
            .0,
        Verdict::Permit
    );
    let mut tcp = udp_in(50_001);
    tcp.protocol = 6;
    assert_eq!(snapshot.objects.classify(&tcp), (Verdict::Permit, None));
    let f = &snapshot.objects.filters[&permit_id];
    assert_eq!(
        (f.layer, f.weight, f.action),
        (Layer::RecvAcceptV4, Weight::Uint8(10), Action::Permit)
    );

    let stats = kernel::fwp_stats();
    assert_eq!(stats.committed, (1, 1, 2));
    assert_eq!(stats.live_sessions, [engine]);
    assert_eq!(stats.open_transactions, 0);

    assert_eq!(close(engine), 0);
    let stats = kernel::fwp_stats();
    assert_eq!(
        stats.committed,
        (0, 0, 0),
        "a dynamic session's objects go with it"
    );
    assert!(stats.live_sessions.is_empty());
    assert_eq!(close(engine), fwp::STATUS_INVALID_HANDLE);
    let history = kernel::commit_history();
    assert_eq!(
        history.last().map(|s| s.cause),
        Some(kernel::CommitCause::DynamicClose(engine))
    );
}

#[test]
fn transaction_misuse_returns_the_documented_statuses_and_abort_discards() {
    let _one = Exclusive::bare_kernel();
    let client = Client::new();
    let engine = session_with_sublayer(&client);
    assert_eq!(commit(engine), f::STATUS_FWP_NO_TXN_IN_PROGRESS);
    assert_eq!(abort(engine), f::STATUS_FWP_NO_TXN_IN_PROGRESS);
    assert_eq!(begin(engine), 0);
    assert_eq!(
        begin(engine),
        f::STATUS_FWP_TXN_IN_PROGRESS,
        "one transaction per session"
    );
    let mut permit = [local_port(1)];
    client
        .filter(
            engine,
            &spec(w::FWPM_LAYER_ALE_AUTH_CONNECT_V4, 3, w::FWP_ACTION_BLOCK),
            &mut permit,
        )
        .expect("added to the transaction");
    let generation = kernel::committed().generation;
    assert_eq!(abort(engine), 0);
    assert_eq!(
        kernel::committed().generation,
        generation,
        "abort publishes nothing"
    );
    assert_eq!(kernel::fwp_stats().committed.2, 0);
    assert_eq!(kernel::fwp_stats().aborts, 1);
    // Invalid handles.
    assert_eq!(begin(0), fwp::STATUS_INVALID_HANDLE);
    assert_eq!(commit(0x1234), fwp::STATUS_INVALID_HANDLE);
    let begin_ro: Begin = host("FwpmTransactionBegin0");
    assert_eq!(begin_ro(engine, 0x8), f::STATUS_FWP_INVALID_FLAGS);
    assert_eq!(begin_ro(engine, w::FWPM_TXN_READ_ONLY), 0);
    assert_eq!(
        client.filter(
            engine,
            &spec(w::FWPM_LAYER_ALE_AUTH_CONNECT_V4, 3, w::FWP_ACTION_BLOCK),
            &mut permit
        ),
        Err(f::STATUS_FWP_INCOMPATIBLE_TXN)
    );
    assert_eq!(commit(engine), 0);
    assert_eq!(close(engine), 0);
}

#[test]
fn a_failed_commit_publishes_nothing_and_ends_the_transaction() {
    let _one = Exclusive::bare_kernel();
    let client = Client::new();
    let engine = session_with_sublayer(&client);
    assert_eq!(begin(engine), 0);
    let mut c = [local_port(7)];
    client
        .filter(
            engine,
            &spec(
                w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4,
                3,
                w::FWP_ACTION_BLOCK,
            ),
            &mut c,
        )
        .expect("added");
    let generation = kernel::committed().generation;
    fwp::fail_next(FwpCall::TransactionCommit, f::STATUS_FWP_TXN_ABORTED);
    assert_eq!(commit(engine), f::STATUS_FWP_TXN_ABORTED);
    assert_eq!(kernel::committed().generation, generation);
    assert_eq!(kernel::fwp_stats().open_transactions, 0);
    assert_eq!(
        abort(engine),
        f::STATUS_FWP_NO_TXN_IN_PROGRESS,
        "already rolled back"
    );
    assert_eq!(begin(engine), 0, "a new transaction can begin");
    assert_eq!(commit(engine), 0);
    // The trace has every call with its result, the injected one included.
    let trace = kernel::fwp_trace();
    assert!(trace.contains(&(FwpCall::TransactionCommit, f::STATUS_FWP_TXN_ABORTED)));
    assert_eq!(
        trace
            .iter()
            .filter(|(c, _)| *c == FwpCall::TransactionCommit)
            .count(),
        3
    );
    assert_eq!(close(engine), 0);
}

#[test]
fn fault_injection_by_ordinal_fails_exactly_that_call_without_doing_its_work() {
    let _one = Exclusive::bare_kernel();
    let client = Client::new();
    let engine = session_with_sublayer(&client);
    // The second FilterAdd since the reset fails.
    kernel::fail_call(FwpCall::FilterAdd, 1, f::STATUS_INSUFFICIENT_RESOURCES);
    let s = spec(
        w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4,
        3,
        w::FWP_ACTION_BLOCK,
    );
    assert!(client.filter(engine, &s, &mut [local_port(1)]).is_ok());
    assert_eq!(
        client.filter(engine, &s, &mut [local_port(2)]),
        Err(f::STATUS_INSUFFICIENT_RESOURCES)
    );
    assert!(client.filter(engine, &s, &mut [local_port(3)]).is_ok());
    // Outside a transaction each add is committed at once (its own implicit transaction).
    assert_eq!(kernel::fwp_stats().committed.2, 2);
    assert_eq!(kernel::fwp_stats().calls[FwpCall::FilterAdd as usize], 3);
    fwp::fail_next(FwpCall::EngineOpen, f::RPC_NT_SERVER_UNAVAILABLE);
    assert_eq!(client.open(true, 0), Err(f::RPC_NT_SERVER_UNAVAILABLE));
    assert_eq!(kernel::fwp_stats().live_sessions, [engine]);
    assert_eq!(close(engine), 0);
}

#[test]
fn arbitration_weights_or_within_a_field_and_across_fields_and_sublayers() {
    let _one = Exclusive::bare_kernel();
    let client = Client::new();
    let engine = session_with_sublayer(&client);
    let v4in = w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4;
    assert_eq!(begin(engine), 0);
    // Block all UDP at weight 1; permit local port 3544 only on the multicast group
    // (two fields: AND); permit remote port 3544 or 3545 (one field twice: OR).
    client
        .filter(
            engine,
            &spec(v4in, 1, w::FWP_ACTION_BLOCK),
            &mut [protocol(17)],
        )
        .expect("b");
    let group = Ipv4Addr::new(224, 0, 0, 253);
    client
        .filter(
            engine,
            &spec(v4in, 10, w::FWP_ACTION_PERMIT),
            &mut [protocol(17), local_port(3544), local_address(group)],
        )
        .expect("discovery");
    client
        .filter(
            engine,
            &spec(v4in, 10, w::FWP_ACTION_PERMIT),
            &mut [protocol(17), remote_port(3544), remote_port(3545)],
        )
        .expect("server");
    // ICMPv6 type 135 via the local-port field (FWPM_CONDITION_ICMP_TYPE's GUID).
    let v6in = w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6;
    client
        .filter(
            engine,
            &spec(v6in, 1, w::FWP_ACTION_BLOCK),
            &mut [protocol(58)],
        )
        .expect("b6");
    client
        .filter(
            engine,
            &spec(v6in, 10, w::FWP_ACTION_PERMIT),
            &mut [protocol(58), local_port(135)],
        )
        .expect("ns");
    assert_eq!(commit(engine), 0);
    let s = kernel::committed();
    let c = |p: Packet| s.objects.classify(&p).0;
    assert_eq!(c(Packet::udp4(true, group, 3544, PEER, 9)), Verdict::Permit);
    assert_eq!(
        c(Packet::udp4(true, HOST, 3544, PEER, 9)),
        Verdict::Block,
        "unicast 3544"
    );
    assert_eq!(c(Packet::udp4(true, HOST, 9, PEER, 3544)), Verdict::Permit);
    assert_eq!(c(Packet::udp4(true, HOST, 9, PEER, 3545)), Verdict::Permit);
    assert_eq!(c(Packet::udp4(true, HOST, 9, PEER, 3546)), Verdict::Block);
    let (l6, r6) = (Ipv6Addr::LOCALHOST, Ipv6Addr::UNSPECIFIED);
    assert_eq!(c(Packet::icmpv6(true, l6, r6, 135)), Verdict::Permit);
    assert_eq!(c(Packet::icmpv6(true, l6, r6, 137)), Verdict::Block);
    assert_eq!(
        c(Packet::icmpv6(false, l6, r6, 137)),
        Verdict::Permit,
        "outbound: no filter"
    );

    // A block at the same effective weight as a permit (weight 10, three conditions): block
    // wins. A block in another sublayer wins over our permit.
    assert_eq!(begin(engine), 0);
    assert_eq!(client.sublayer(engine, OTHER_SUBLAYER, 0x200), 0);
    client
        .filter(
            engine,
            &spec(v4in, 10, w::FWP_ACTION_BLOCK),
            &mut [protocol(17), remote_port(3545), remote_port(3545)],
        )
        .expect("tie");
    let mut other = spec(v4in, 0, w::FWP_ACTION_BLOCK);
    other.sublayer = OTHER_SUBLAYER;
    client
        .filter(engine, &other, &mut [protocol(17), local_port(3544)])
        .expect("veto");
    assert_eq!(commit(engine), 0);
    let s = kernel::committed();
    let c = |p: Packet| s.objects.classify(&p).0;
    assert_eq!(c(Packet::udp4(true, HOST, 9, PEER, 3545)), Verdict::Block);
    assert_eq!(c(Packet::udp4(true, HOST, 9, PEER, 3544)), Verdict::Permit);
    assert_eq!(
        c(Packet::udp4(true, group, 3544, PEER, 9)),
        Verdict::Block,
        "the other sublayer's block"
    );
    assert_eq!(close(engine), 0);
    assert_eq!(kernel::fwp_stats().committed, (0, 0, 0));
}

#[test]
fn what_the_model_does_not_model_is_refused_with_a_documented_status() {
    let _one = Exclusive::bare_kernel();
    let client = Client::new();
    let engine = session_with_sublayer(&client);
    let v4in = w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4;
    let permit = spec(v4in, 10, w::FWP_ACTION_PERMIT);
    let add = |s: &FilterSpec, c: &mut [w::FWPM_FILTER_CONDITION0]| client.filter(engine, s, c);
    assert_eq!(
        add(&spec(v4in, 16, w::FWP_ACTION_PERMIT), &mut []),
        Err(f::STATUS_FWP_INVALID_WEIGHT)
    );
    let mut unknown = local_port(1);
    unknown.fieldKey = w::FWPM_CONDITION_ALE_APP_ID;
    assert_eq!(
        add(&permit, &mut [unknown]),
        Err(f::STATUS_FWP_CONDITION_NOT_FOUND)
    );
    let mut range = local_port(1);
    range.matchType = w::FWP_MATCH_RANGE;
    assert_eq!(
        add(&permit, &mut [range]),
        Err(f::STATUS_FWP_MATCH_TYPE_MISMATCH)
    );
    let mut wrong_type = local_port(1);
    wrong_type.conditionValue.r#type = w::FWP_UINT32;
    assert_eq!(
        add(&permit, &mut [wrong_type]),
        Err(f::STATUS_FWP_TYPE_MISMATCH)
    );
    assert_eq!(
        add(
            &spec(w::FWPM_LAYER_INBOUND_TRANSPORT_V4, 10, w::FWP_ACTION_PERMIT),
            &mut []
        ),
        Err(f::STATUS_FWP_LAYER_NOT_FOUND)
    );
    assert_eq!(
        add(&spec(v4in, 10, w::FWP_ACTION_CALLOUT_TERMINATING), &mut []),
        Err(f::STATUS_FWP_CALLOUT_NOT_FOUND)
    );
    assert_eq!(
        add(&spec(v4in, 10, 0x7), &mut []),
        Err(f::STATUS_FWP_INVALID_ACTION_TYPE)
    );
    let mut lost = spec(v4in, 10, w::FWP_ACTION_PERMIT);
    lost.sublayer = OTHER_SUBLAYER;
    assert_eq!(add(&lost, &mut []), Err(f::STATUS_FWP_SUBLAYER_NOT_FOUND));
    let mut bad_mask = cond(
        w::FWPM_CONDITION_IP_LOCAL_ADDRESS,
        w::FWP_V4_ADDR_MASK,
        |_| {},
    );
    let mut mask = w::FWP_V4_ADDR_AND_MASK {
        addr: 0x0A00_0000,
        mask: 0xFF00_FF00,
    };
    bad_mask.conditionValue.Anonymous.v4AddrMask = &raw mut mask;
    assert_eq!(
        add(&permit, &mut [bad_mask]),
        Err(f::STATUS_FWP_INVALID_NET_MASK)
    );
    mask = w::FWP_V4_ADDR_AND_MASK {
        addr: 0x0A00_0000,
        mask: 0xFF00_0000,
    };
    bad_mask.conditionValue.Anonymous.v4AddrMask = &raw mut mask;
    assert!(add(&permit, &mut [bad_mask]).is_ok(), "a /8 mask");
    // Deletes.
    let delete: DeleteById = host("FwpmFilterDeleteById0");
    assert_eq!(delete(engine, 42), f::STATUS_FWP_FILTER_NOT_FOUND);
    let delete_sublayer: DeleteByKey = host("FwpmSubLayerDeleteByKey0");
    let delete_provider: DeleteByKey = host("FwpmProviderDeleteByKey0");
    // SAFETY: GUIDs valid for the calls.
    unsafe {
        assert_eq!(delete_sublayer(engine, &SUBLAYER), f::STATUS_FWP_IN_USE);
        assert_eq!(delete_provider(engine, &PROVIDER), f::STATUS_FWP_IN_USE);
        assert_eq!(
            delete_sublayer(engine, &OTHER_SUBLAYER),
            f::STATUS_FWP_SUBLAYER_NOT_FOUND
        );
    }
    let ids: Vec<u64> = kernel::committed()
        .objects
        .filters
        .keys()
        .copied()
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(delete(engine, ids[0]), 0);
    // SAFETY: as above.
    unsafe {
        assert_eq!(delete_sublayer(engine, &SUBLAYER), 0);
        assert_eq!(delete_provider(engine, &PROVIDER), 0);
    }
    assert_eq!(client.provider(engine), 0);
    assert_eq!(client.provider(engine), f::STATUS_FWP_ALREADY_EXISTS);
    // A NULL display name.
    let add_provider: ProviderAdd = host("FwpmProviderAdd0");
    let nameless = w::FWPM_PROVIDER0::default();
    // SAFETY: a provider with NULL strings, no security descriptor.
    let nameless = unsafe { add_provider(engine, &raw const nameless, core::ptr::null_mut()) };
    assert_eq!(nameless, f::STATUS_FWP_NULL_DISPLAY_NAME);
    assert_eq!(close(engine), 0);
}

#[test]
fn a_second_session_waits_for_the_engines_write_transaction_or_times_out() {
    let _one = Exclusive::bare_kernel();
    let client = Client::new();
    let first = session_with_sublayer(&client);
    let second = client.open(false, 50).expect("open");
    assert_eq!(begin(first), 0);
    let started = std::time::Instant::now();
    assert_eq!(begin(second), f::STATUS_FWP_TIMEOUT);
    assert!(started.elapsed() >= Duration::from_millis(50));
    // txnWaitTimeoutInMSec 0: the system default, no limit in the model.
    let third = client.open(false, 0).expect("open");
    let waiter = std::thread::spawn(move || begin(third));
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        !waiter.is_finished(),
        "waits for the first session's transaction"
    );
    assert_eq!(commit(first), 0);
    assert_eq!(waiter.join().expect("joined"), 0);
    assert_eq!(kernel::fwp_stats().open_transactions, 1);
    assert_eq!(commit(third), 0);
    assert_eq!(close(third), 0);
    assert_eq!(close(second), 0);
    assert_eq!(close(first), 0);
}

#[test]
fn a_call_above_passive_level_stops_the_machine() {
    let _one = Exclusive::bare_kernel();
    std::thread::spawn(|| {
        kernel::set_irql(kernel::DISPATCH_LEVEL);
        let begin: Begin = host("FwpmTransactionBegin0");
        begin(0x10, 0)
    });
    let started = std::time::Instant::now();
    let stop = loop {
        if let Some(stop) = kernel::stopped() {
            break stop;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "no stop");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(stop.code, kernel::IRQL_NOT_LESS_OR_EQUAL);
    assert!(
        stop.reason.contains("FwpmTransactionBegin0"),
        "{}",
        stop.reason
    );
    assert_eq!(
        kernel::fwp_stats().calls[FwpCall::TransactionBegin as usize],
        0
    );
}
