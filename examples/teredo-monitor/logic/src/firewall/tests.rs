//! The firewall alone on the mock engine: the ABI structures, the filter design against the
//! library's per-packet check, the manager's transactions and their failures.

use core::net::{Ipv4Addr, Ipv6Addr};
use std::vec::Vec;

use teredo_watcher::mock::with_irql;
use teredo_watcher::{
    Direction, Irql, PacketView, TEREDO_ICMPV6_TYPES, TEREDO_MULTICAST_GROUP, TeredoExceptions,
    TeredoPort, Transport, UPNP_PORT,
};
use windows_sys::Win32::NetworkManagement::WindowsFilteringPlatform::{
    FWP_ACTION_BLOCK, FWP_ACTION_PERMIT, FWP_MATCH_EQUAL, FWP_UINT8, FWP_UINT16, FWP_UINT32,
    FWPM_CONDITION_IP_LOCAL_ADDRESS, FWPM_CONDITION_IP_LOCAL_PORT, FWPM_CONDITION_IP_PROTOCOL,
    FWPM_CONDITION_IP_REMOTE_PORT, FWPM_LAYER_ALE_AUTH_CONNECT_V4,
    FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4, FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6,
    FWPM_SESSION_FLAG_DYNAMIC,
};
use windows_sys::core::GUID;

use super::abi;
use super::filters::{
    self, Action, Condition, FilterKind, FilterSpec, Layer, PROVIDER, PROVIDER_KEY, SESSION,
    STATIC_PERMIT_FILTERS, SUBLAYER, SUBLAYER_KEY, demo_block_filters, dynamic_port_filters,
    permit_filters,
};
use super::mock::{self, MockFilterEngine, Verdict, failure_statuses};
use super::{FilterEngine, FirewallManager, FwpCall, FwpErrorKind, PortChange, Transaction};
use teredo_watcher::{ExceptionRule, RuleKind};

const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 20);
const V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0, 0x4136, 0xe378, 0x8000, 0x63bf, 0x3fff, 0xfdd2);

/// The host binding is process-wide (the driver tests capture its lines and count lines
/// logged from other threads): these tests log through it too, so they hold it as those do.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    let guard = crate::host::exclusive();
    crate::host::reset();
    guard
}

fn port(p: u16) -> Option<TeredoPort> {
    TeredoPort::new(p)
}

fn guid_eq(a: GUID, b: GUID) -> bool {
    (a.data1, a.data2, a.data3, a.data4) == (b.data1, b.data2, b.data3, b.data4)
}

/// The filters the driver commits for `port`: static permits, blocks, the port's, in the
/// order it adds them.
pub(crate) fn design(port: Option<TeredoPort>) -> Vec<FilterSpec> {
    let mut all: Vec<FilterSpec> = filters::static_rules()
        .flat_map(|r| {
            permit_filters(&r)
                .expect("every static rule has filters")
                .iter()
                .copied()
                .collect::<Vec<_>>()
        })
        .collect();
    all.extend(demo_block_filters());
    if let Some(p) = port {
        all.extend(dynamic_port_filters(p).iter().copied());
    }
    all
}

#[test]
fn the_static_set_is_23_permits_and_3_blocks_in_our_sublayer() {
    let _serial = serial();
    let all = design(None);
    assert_eq!(all.len(), STATIC_PERMIT_FILTERS + 3);
    assert_eq!(STATIC_PERMIT_FILTERS, 23);
    let permits = all.iter().filter(|f| f.action == Action::Permit);
    assert!(permits.clone().all(|f| f.weight == filters::PERMIT_WEIGHT));
    assert_eq!(permits.count(), 23);
    let blocks: Vec<&FilterSpec> = all.iter().filter(|f| f.action == Action::Block).collect();
    assert_eq!(blocks.len(), 3);
    assert!(blocks.iter().all(|f| f.weight == filters::BLOCK_WEIGHT));
    assert_eq!(
        blocks
            .iter()
            .map(|f| (f.layer, f.conditions().to_vec()))
            .collect::<Vec<_>>(),
        [
            (Layer::InboundV4, [Condition::IpProtocol(17)].to_vec()),
            (Layer::InboundV6, [Condition::IpProtocol(17)].to_vec()),
            (Layer::InboundV6, [Condition::IpProtocol(58)].to_vec()),
        ]
    );
    assert!(
        all.iter()
            .all(|f| f.sublayer() == SUBLAYER_KEY && f.provider() == PROVIDER_KEY)
    );
    // The server both ways, discovery inbound only with its group address.
    let server = permit_filters(&ExceptionRule::TEREDO_SERVER).expect("expressible");
    assert_eq!(
        server.iter().map(|f| f.layer).collect::<Vec<_>>(),
        [Layer::InboundV4, Layer::OutboundV4]
    );
    assert_eq!(
        server.iter().next().map(FilterSpec::conditions),
        Some(&[Condition::IpProtocol(17), Condition::RemotePort(3544)][..])
    );
    let discovery = permit_filters(&ExceptionRule::LOCAL_DISCOVERY).expect("expressible");
    assert_eq!(
        discovery
            .iter()
            .map(|f| (f.layer, f.conditions()))
            .collect::<Vec<_>>(),
        [(
            Layer::InboundV4,
            &[
                Condition::IpProtocol(17),
                Condition::LocalPort(3544),
                Condition::LocalAddressV4(TEREDO_MULTICAST_GROUP)
            ][..]
        )]
    );
    // The dynamic port: inbound and outbound V4, UDP, local port.
    let dynamic = dynamic_port_filters(TeredoPort::new(50_000).expect("non-zero"));
    assert_eq!(
        dynamic
            .iter()
            .map(|f| (f.kind, f.layer, f.conditions()))
            .collect::<Vec<_>>(),
        [Layer::InboundV4, Layer::OutboundV4].map(|l| (
            FilterKind::Exception(RuleKind::DynamicPort),
            l,
            &[Condition::IpProtocol(17), Condition::LocalPort(50_000)][..]
        ))
    );
    // UPnP: not expressible statically (local subnet), and not in the static set.
    assert_eq!(
        permit_filters(&ExceptionRule::UPNP),
        Err(filters::Unexpressible::LocalSubnetScope)
    );
    assert!(filters::static_rules().all(|r| r.kind != RuleKind::Upnp));
}

/// Packets of every kind the rules look at, for one set of ports.
fn packets(ports: &[u16]) -> Vec<PacketView> {
    let mut all = Vec::new();
    for d in [Direction::Inbound, Direction::Outbound] {
        for local in [HOST, TEREDO_MULTICAST_GROUP] {
            for &p in ports {
                for subnet in [false, true] {
                    all.push(PacketView::udp4(d, local, p, 61_001).on_local_subnet(subnet));
                    all.push(PacketView::udp4(d, local, 61_001, p).on_local_subnet(subnet));
                }
                let mut v6 = PacketView::udp4(d, local, p, 61_001);
                v6.local_address = V6.into();
                all.push(v6);
                all.push(PacketView {
                    transport: Transport::Other { protocol: 6 },
                    ..PacketView::udp4(d, local, p, 61_001)
                });
            }
        }
        for t in 0..=u8::MAX {
            all.push(PacketView::icmpv6(d, V6, t));
        }
    }
    all
}

#[test]
fn inbound_verdicts_are_the_librarys_check_for_the_committed_port() {
    let _serial = serial();
    let mut edges = Vec::from([
        0, 1, 3543, 3544, 3545, UPNP_PORT, 50_000, 50_001, 61_001, 65_535,
    ]);
    edges.extend((0..=u16::MAX).step_by(997));
    for committed in [None, port(50_000), port(3544), port(65_535)] {
        let set = TeredoExceptions::for_port(committed);
        let filters = design(committed);
        for packet in packets(&edges) {
            let inbound_filtered = packet.direction == Direction::Inbound
                && matches!(
                    packet.transport,
                    Transport::Udp { .. } | Transport::Icmpv6 { .. }
                );
            let got = mock::verdict(&filters, &packet);
            if inbound_filtered {
                let want = if set.allows(&packet) {
                    Verdict::Permit
                } else {
                    Verdict::Block
                };
                assert_eq!(got, want, "{committed:?} {packet:?}");
            } else {
                // Outbound and TCP: no block of ours; the permits only say what the rules say.
                assert_ne!(got, Verdict::Block, "{committed:?} {packet:?}");
                assert_eq!(
                    got == Verdict::Permit,
                    set.allows(&packet),
                    "{committed:?} {packet:?}"
                );
            }
        }
    }
}

#[test]
fn filter0_carries_the_spec_in_the_engines_layout() {
    let _serial = serial();
    let spec = &permit_filters(&ExceptionRule::LOCAL_DISCOVERY)
        .expect("expressible")
        .iter()
        .copied()
        .collect::<Vec<_>>()[0];
    abi::with_filter0(spec, |f| {
        assert!(guid_eq(f.layerKey, FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4));
        assert!(guid_eq(f.subLayerKey, GUID::from_u128(SUBLAYER_KEY)));
        // SAFETY: `with_filter0` points `providerKey` at a GUID on its frame, live now.
        let provider = unsafe { *f.providerKey };
        assert!(guid_eq(provider, GUID::from_u128(PROVIDER_KEY)));
        assert!(
            guid_eq(f.filterKey, GUID::from_u128(0)),
            "the engine makes the key"
        );
        assert_eq!(f.flags, 0);
        assert_eq!(f.weight.r#type, FWP_UINT8);
        // SAFETY: the weight's type is FWP_UINT8 (checked above), so `uint8` is the field.
        assert_eq!(unsafe { f.weight.Anonymous.uint8 }, 10);
        assert_eq!(f.action.r#type, FWP_ACTION_PERMIT);
        assert_eq!(f.numFilterConditions, 3);
        // SAFETY: `filterCondition` points at `numFilterConditions` conditions on the frame
        // of `with_filter0`, live now.
        let conditions = unsafe { core::slice::from_raw_parts(f.filterCondition, 3) };
        let expected = [
            (FWPM_CONDITION_IP_PROTOCOL, FWP_UINT8, 17_u32),
            (FWPM_CONDITION_IP_LOCAL_PORT, FWP_UINT16, 3544),
            (FWPM_CONDITION_IP_LOCAL_ADDRESS, FWP_UINT32, 0xE000_00FD),
        ];
        for (c, (key, r#type, value)) in conditions.iter().zip(expected) {
            assert!(guid_eq(c.fieldKey, key));
            assert_eq!(c.matchType, FWP_MATCH_EQUAL);
            assert_eq!(c.conditionValue.r#type, r#type);
            // SAFETY: each union field is read for the type just checked.
            let got = unsafe {
                match r#type {
                    FWP_UINT8 => u32::from(c.conditionValue.Anonymous.uint8),
                    FWP_UINT16 => u32::from(c.conditionValue.Anonymous.uint16),
                    _ => c.conditionValue.Anonymous.uint32,
                }
            };
            assert_eq!(got, value);
        }
        // SAFETY: the name points at the spec's static UTF-16 string, NUL-terminated.
        let name = unsafe { core::slice::from_raw_parts(f.displayData.name, spec.name.wide.len()) };
        assert_eq!(name.last(), Some(&0));
        assert_eq!(
            std::string::String::from_utf16_lossy(&name[..name.len() - 1]),
            spec.name.text
        );
    });
    // ICMPv6 type: FWPM_CONDITION_ICMP_TYPE is the local-port key, FWP_UINT16.
    let icmp = permit_filters(&ExceptionRule::icmpv6(135)).expect("expressible");
    let outbound = icmp.iter().nth(1).expect("both directions");
    abi::with_filter0(outbound, |f| {
        assert!(guid_eq(f.layerKey, windows_sys::Win32::NetworkManagement::WindowsFilteringPlatform::FWPM_LAYER_ALE_AUTH_CONNECT_V6));
        // SAFETY: two conditions on the frame of `with_filter0`, live now.
        let c = unsafe { core::slice::from_raw_parts(f.filterCondition, 2) };
        assert!(guid_eq(c[1].fieldKey, abi::FWPM_CONDITION_ICMP_TYPE));
        assert!(guid_eq(c[1].fieldKey, FWPM_CONDITION_IP_LOCAL_PORT));
        assert_eq!(c[1].conditionValue.r#type, FWP_UINT16);
        // SAFETY: FWP_UINT16, checked above.
        assert_eq!(unsafe { c[1].conditionValue.Anonymous.uint16 }, 135);
    });
    let server = permit_filters(&ExceptionRule::TEREDO_SERVER).expect("expressible");
    abi::with_filter0(server.iter().nth(1).expect("outbound"), |f| {
        assert!(guid_eq(f.layerKey, FWPM_LAYER_ALE_AUTH_CONNECT_V4));
        // SAFETY: two conditions on the frame of `with_filter0`, live now.
        let c = unsafe { core::slice::from_raw_parts(f.filterCondition, 2) };
        assert!(guid_eq(c[1].fieldKey, FWPM_CONDITION_IP_REMOTE_PORT));
    });
    abi::with_filter0(&demo_block_filters()[2], |f| {
        assert!(guid_eq(f.layerKey, FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6));
        assert_eq!(f.action.r#type, FWP_ACTION_BLOCK);
        // SAFETY: the weight is FWP_UINT8.
        assert_eq!(unsafe { f.weight.Anonymous.uint8 }, 1);
    });
}

#[test]
fn session_provider_and_sublayer_in_the_engines_layout() {
    let _serial = serial();
    abi::with_session0(&SESSION, |s| {
        assert_eq!(s.flags, FWPM_SESSION_FLAG_DYNAMIC);
        assert_eq!(s.txnWaitTimeoutInMSec, 0, "the engine's default");
        assert!(!s.displayData.name.is_null());
    });
    abi::with_provider0(&PROVIDER, |p| {
        assert!(guid_eq(p.providerKey, GUID::from_u128(PROVIDER_KEY)));
        assert_eq!(p.flags, 0, "not persistent");
    });
    abi::with_sublayer0(&SUBLAYER, |s| {
        assert!(guid_eq(s.subLayerKey, GUID::from_u128(SUBLAYER_KEY)));
        assert_eq!(s.weight, 0x8000);
        // SAFETY: `providerKey` points at a GUID on the frame of `with_sublayer0`.
        let provider = unsafe { *s.providerKey };
        assert!(guid_eq(provider, GUID::from_u128(PROVIDER_KEY)));
    });
}

#[test]
fn a_transaction_dropped_uncommitted_aborts() {
    let _serial = serial();
    let engine = MockFilterEngine::new();
    let handle = engine.engine_open(&SESSION).expect("opens");
    {
        let txn = Transaction::begin(&engine, &handle).expect("begins");
        txn.provider_add(&PROVIDER).expect("adds");
        assert_eq!(engine.open_transactions(), 1);
    }
    assert_eq!(engine.open_transactions(), 0);
    assert_eq!(engine.calls(FwpCall::TransactionAbort), 1);
    assert!(engine.committed().providers.is_empty(), "nothing committed");
    // A failed commit is aborted too.
    let txn = Transaction::begin(&engine, &handle).expect("begins");
    txn.provider_add(&PROVIDER).expect("adds");
    engine.fail_next(FwpCall::TransactionCommit, mock::STATUS_FWP_TXN_ABORTED);
    assert!(txn.commit().is_err());
    assert_eq!(engine.open_transactions(), 0);
    assert!(engine.committed().providers.is_empty());
    engine.engine_close(handle).expect("closes");
}

#[test]
fn every_call_is_refused_above_passive_level() {
    let _serial = serial();
    let engine = MockFilterEngine::new();
    let refused = with_irql(Irql::DISPATCH_LEVEL, || {
        FirewallManager::install(engine.clone(), port(50_000))
    });
    assert_eq!(
        refused.map(|_| ()).map_err(|e| (e.call, e.kind)),
        Err((
            FwpCall::EngineOpen,
            FwpErrorKind::IrqlTooHigh(Irql::DISPATCH_LEVEL)
        ))
    );
    assert_eq!(engine.open_sessions(), 0);
    assert_eq!(engine.irql_violations(), 1);
    let mut manager = FirewallManager::install(engine.clone(), port(50_000)).expect("installs");
    let change = with_irql(Irql::APC_LEVEL, || manager.set_port(port(50_001)));
    assert!(matches!(
        change,
        Err(e) if e.kind == FwpErrorKind::IrqlTooHigh(Irql::APC_LEVEL)
    ));
    assert_eq!(manager.committed_port(), port(50_000));
    assert_eq!(
        manager.set_port(port(50_001)),
        Ok(PortChange::Replaced {
            from: port(50_000),
            to: port(50_001)
        })
    );
    drop(manager);
    assert_eq!(engine.open_sessions(), 0);
    assert!(engine.committed_filters().is_empty());
}

#[test]
fn install_commits_everything_in_one_transaction() {
    let _serial = serial();
    let engine = MockFilterEngine::new();
    let manager = FirewallManager::install(engine.clone(), port(50_000)).expect("installs");
    assert_eq!(engine.committed_filters(), design(port(50_000)));
    assert_eq!(engine.history().len(), 1, "one commit");
    assert_eq!(engine.calls(FwpCall::TransactionBegin), 1);
    assert_eq!(
        engine.calls(FwpCall::FilterAdd),
        STATIC_PERMIT_FILTERS + 3 + 2
    );
    let committed = engine.committed();
    assert_eq!(
        committed.providers.keys().copied().collect::<Vec<_>>(),
        [PROVIDER_KEY]
    );
    assert_eq!(
        committed
            .sublayers
            .values()
            .map(|(_, w)| *w)
            .collect::<Vec<_>>(),
        [0x8000]
    );
    assert_eq!(manager.filter_ids().count(), STATIC_PERMIT_FILTERS + 3 + 2);
    let report = manager.remove();
    assert_eq!(
        (report.deleted, report.removal, report.close),
        (28, None, Ok(()))
    );
    assert!(engine.committed_filters().is_empty());
    assert!(
        engine.committed().providers.is_empty(),
        "the dynamic session took them"
    );
    assert_eq!(engine.open_sessions(), 0);
}

#[test]
fn install_fails_on_each_call_in_turn_and_leaves_nothing() {
    let _serial = serial();
    let mut swept = 0;
    for n in 0.. {
        let engine = MockFilterEngine::new();
        engine.fail_call_after(n, mock::STATUS_INSUFFICIENT_RESOURCES);
        let result = FirewallManager::install(engine.clone(), port(50_000));
        if engine.failure_pending() {
            // Fewer than n + 1 calls: every one was failed once.
            assert!(result.is_ok());
            break;
        }
        let error = result.map(|_| ()).expect_err("the injected failure");
        assert_eq!(error.nt_status().0, mock::STATUS_INSUFFICIENT_RESOURCES);
        assert!(engine.committed_filters().is_empty(), "call {n}: {error:?}");
        assert_eq!(engine.committed(), mock::Objects::default(), "call {n}");
        assert_eq!(engine.open_sessions(), 0, "call {n}");
        assert_eq!(engine.open_transactions(), 0, "call {n}");
        swept += 1;
    }
    // open, begin, provider, sublayer, 28 filters, commit.
    assert_eq!(swept, 4 + 28 + 1);
}

/// The dynamic ports in a committed set.
fn dynamic_ports(set: &[FilterSpec]) -> Vec<u16> {
    set.iter()
        .filter(|f| f.kind == FilterKind::Exception(RuleKind::DynamicPort))
        .filter_map(|f| {
            f.conditions().iter().find_map(|c| match c {
                Condition::LocalPort(p) => Some(*p),
                _ => None,
            })
        })
        .collect()
}

#[test]
fn a_port_change_adds_before_it_deletes_in_one_transaction() {
    let _serial = serial();
    let engine = MockFilterEngine::new();
    let mut manager = FirewallManager::install(engine.clone(), port(50_000)).expect("installs");
    let calls_before = engine.journal().len();
    assert_eq!(
        manager.set_port(port(50_007)),
        Ok(PortChange::Replaced {
            from: port(50_000),
            to: port(50_007)
        })
    );
    let calls: Vec<FwpCall> = engine.journal()[calls_before..]
        .iter()
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(
        calls,
        [
            FwpCall::TransactionBegin,
            FwpCall::FilterAdd,
            FwpCall::FilterAdd,
            FwpCall::FilterDeleteById,
            FwpCall::FilterDeleteById,
            FwpCall::TransactionCommit
        ]
    );
    assert_eq!(manager.set_port(port(50_007)), Ok(PortChange::Unchanged));
    assert_eq!(
        manager.set_port(None),
        Ok(PortChange::Replaced {
            from: port(50_007),
            to: None
        })
    );
    let history = engine.history();
    assert_eq!(
        history.iter().map(|s| dynamic_ports(s)).collect::<Vec<_>>(),
        [
            [50_000, 50_000].to_vec(),
            [50_007, 50_007].to_vec(),
            Vec::new()
        ]
    );
    assert!(history.iter().all(|s| s.len() >= STATIC_PERMIT_FILTERS + 3));
}

#[test]
fn a_failed_port_change_keeps_the_old_exception_and_the_next_call_retries() {
    let _serial = serial();
    // Every call of the change transaction, failing with each of its statuses.
    let plan: Vec<(FwpCall, usize)> = [
        (FwpCall::TransactionBegin, 0),
        (FwpCall::FilterAdd, 0),
        (FwpCall::FilterAdd, 1),
        (FwpCall::FilterDeleteById, 0),
        (FwpCall::FilterDeleteById, 1),
        (FwpCall::TransactionCommit, 0),
    ]
    .to_vec();
    for (call, skip) in plan {
        for &status in failure_statuses(call) {
            let engine = MockFilterEngine::new();
            let mut manager =
                FirewallManager::install(engine.clone(), port(50_000)).expect("installs");
            let commits = engine.history().len();
            engine.fail_after(call, skip, status);
            let error = manager.set_port(port(50_007)).expect_err("injected");
            assert_eq!((error.call, error.nt_status().0), (call, status));
            assert_eq!(
                engine.history().len(),
                commits,
                "{call:?}: nothing committed"
            );
            assert_eq!(dynamic_ports(&engine.committed_filters()), [50_000, 50_000]);
            assert_eq!(manager.committed_port(), port(50_000));
            assert_eq!(manager.intended_port(), port(50_007));
            assert_eq!(manager.failed_changes(), 1);
            assert_eq!(engine.open_transactions(), 0, "{call:?}: aborted");
            // The next call (the next port change) retries with its port.
            assert!(matches!(
                manager.set_port(port(50_011)),
                Ok(PortChange::Replaced { to, .. }) if to == port(50_011)
            ));
            assert_eq!(dynamic_ports(&engine.committed_filters()), [50_011, 50_011]);
            assert!(
                engine
                    .history()
                    .iter()
                    .all(|s| !dynamic_ports(s).is_empty()),
                "{call:?}: no committed state without a dynamic-port exception"
            );
            drop(manager);
            assert!(engine.committed_filters().is_empty() && engine.open_sessions() == 0);
        }
    }
}

#[test]
fn a_transaction_whose_abort_failed_is_aborted_by_the_next_begin() {
    const STATUS_INSUFFICIENT_RESOURCES: i32 = 0xC000_009A_u32.cast_signed();
    let _serial = serial();
    let engine = MockFilterEngine::new();
    let mut manager = FirewallManager::install(engine.clone(), port(50_000)).expect("installs");
    // The change fails, and so does its abort: the session's transaction stays open (only
    // a success ends it), holding every later begin.
    engine.fail_next(FwpCall::FilterAdd, failure_statuses(FwpCall::FilterAdd)[0]);
    engine.fail_next(FwpCall::TransactionAbort, STATUS_INSUFFICIENT_RESOURCES);
    manager.set_port(port(50_007)).expect_err("injected");
    assert_eq!(
        engine.open_transactions(),
        1,
        "the failed abort left it open"
    );
    assert_eq!(dynamic_ports(&engine.committed_filters()), [50_000, 50_000]);
    // The next begin is refused with STATUS_FWP_TXN_IN_PROGRESS; the manager's transaction
    // aborts the stale one and begins again, once. Here that abort fails too: the change
    // fails and the old exception stays.
    engine.fail_next(FwpCall::TransactionAbort, STATUS_INSUFFICIENT_RESOURCES);
    manager
        .set_port(port(50_011))
        .expect_err("the stale abort failed again");
    assert_eq!(engine.open_transactions(), 1);
    assert_eq!(dynamic_ports(&engine.committed_filters()), [50_000, 50_000]);
    // Then the engine recovers: the next change aborts the stale transaction and commits.
    assert!(matches!(
        manager.set_port(port(50_013)),
        Ok(PortChange::Replaced { to, .. }) if to == port(50_013)
    ));
    assert_eq!(engine.open_transactions(), 0);
    assert_eq!(dynamic_ports(&engine.committed_filters()), [50_013, 50_013]);
    assert!(
        engine
            .history()
            .iter()
            .all(|s| !dynamic_ports(s).is_empty()),
        "no committed state without a dynamic-port exception"
    );
    drop(manager);
    assert!(engine.committed_filters().is_empty() && engine.open_sessions() == 0);
}

#[test]
fn a_failed_removal_still_closes_the_engine_which_drops_the_filters() {
    let _serial = serial();
    for (call, skip) in [
        (FwpCall::TransactionBegin, 0),
        (FwpCall::FilterDeleteById, 5),
        (FwpCall::TransactionCommit, 0),
    ] {
        let engine = MockFilterEngine::new();
        let manager = FirewallManager::install(engine.clone(), port(50_000)).expect("installs");
        engine.fail_after(call, skip, failure_statuses(call)[0]);
        let report = manager.remove();
        assert_eq!(report.removal.map(|e| e.call), Some(call));
        assert_eq!(report.close, Ok(()));
        assert!(engine.committed_filters().is_empty(), "{call:?}");
        assert_eq!(engine.open_sessions(), 0);
    }
    // A failing close is reported (the engine keeps the session; the filters were deleted).
    let engine = MockFilterEngine::new();
    let manager = FirewallManager::install(engine.clone(), None).expect("installs");
    engine.fail_next(FwpCall::EngineClose, mock::STATUS_INVALID_HANDLE);
    let report = manager.remove();
    assert_eq!(report.deleted, STATIC_PERMIT_FILTERS + 3);
    assert!(report.close.is_err());
    assert!(engine.committed_filters().is_empty());
}

#[test]
fn the_ports_without_exception_traffic_are_blocked_inbound() {
    let _serial = serial();
    // The three facts the harness's firewall line counts, on the design itself.
    let filters = design(port(50_000));
    let unicast = |p| PacketView::udp4(Direction::Inbound, HOST, p, 61_000);
    assert_eq!(mock::verdict(&filters, &unicast(50_000)), Verdict::Permit);
    assert_eq!(mock::verdict(&filters, &unicast(50_001)), Verdict::Block);
    assert_eq!(
        mock::verdict(&filters, &unicast(3544)),
        Verdict::Block,
        "unicast to 3544"
    );
    let group = PacketView::udp4(Direction::Inbound, TEREDO_MULTICAST_GROUP, 3544, 61_000);
    assert_eq!(mock::verdict(&filters, &group), Verdict::Permit);
    for t in TEREDO_ICMPV6_TYPES {
        let icmp = PacketView::icmpv6(Direction::Inbound, V6, t);
        assert_eq!(mock::verdict(&filters, &icmp), Verdict::Permit);
    }
    assert_eq!(
        mock::verdict(&filters, &PacketView::icmpv6(Direction::Inbound, V6, 137)),
        Verdict::Block
    );
}
