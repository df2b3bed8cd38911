//! The firewall oracle and commit checks (`harness/src/firewall.rs`) on the filter engine
//! model, driven by a reference client written here from the filter design (one dynamic
//! session, one provider and sublayer, permit filters at weight 10 for the Teredo rules,
//! the demo policy's blocks at weight 1, a port change as one transaction that adds the new
//! dynamic-port filter before deleting the old): the correct client passes with no wrong
//! verdict and no gap; two broken ones are caught.
#![cfg(all(target_arch = "x86_64", unix))]

use core::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use teredo_harness::Exclusive;
use teredo_harness::firewall::{self, Kind, Verdicts};
use teredo_harness::kernel::{self, Verdict};
use teredo_watcher::{IpVersion, Protocol, RuleDirection, RuleKind, TeredoExceptions, TeredoPort};
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

fn host<T>(name: &str) -> T {
    let address = kernel::resolve("fwpkclnt.sys", name).unwrap_or_else(|| panic!("{name}"));
    assert_eq!(size_of::<T>(), size_of::<usize>());
    // SAFETY: every use names `T` as the function pointer type of the documented signature
    // of `name` (fwpmk.h), which is the signature of the model's function.
    unsafe { std::mem::transmute_copy::<usize, T>(&address) }
}

/// Traffic rounds (over both replay threads) after each commit.
const ROUNDS_PER_STATE: u64 = 20;

const PROVIDER: GUID = GUID::from_u128(0x5465_7265_646f_0001_0000_0000_0000_0011);
const SUBLAYER: GUID = GUID::from_u128(0x5465_7265_646f_0002_0000_0000_0000_0012);

/// How the reference client changes the port.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    /// One transaction: add the new filters, delete the old ones, commit.
    AddThenDelete,
    /// Broken: delete the old filters and commit, then add the new ones and commit.
    DeleteFirst,
    /// Broken: add the new filters and never delete the old ones.
    KeepOld,
}

/// One condition of a filter being built.
enum Cond {
    U8(GUID, u8),
    U16(GUID, u16),
    U32(GUID, u32),
}

struct Client {
    engine: usize,
    name: Vec<u16>,
    dynamic_ids: Vec<u64>,
}

impl Client {
    fn open() -> Client {
        let open: Open = host("FwpmEngineOpen0");
        let name: Vec<u16> = "reference client".encode_utf16().chain([0]).collect();
        let session = w::FWPM_SESSION0 {
            flags: w::FWPM_SESSION_FLAG_DYNAMIC,
            ..Default::default()
        };
        let mut engine = 0;
        // SAFETY: NULL server, a session, a handle to write.
        let status = unsafe {
            open(
                core::ptr::null(),
                kernel::fwp::RPC_C_AUTHN_WINNT,
                core::ptr::null(),
                &raw const session,
                &raw mut engine,
            )
        };
        assert_eq!(status, 0);
        Client {
            engine,
            name,
            dynamic_ids: Vec::new(),
        }
    }

    fn display(&self) -> w::FWPM_DISPLAY_DATA0 {
        w::FWPM_DISPLAY_DATA0 {
            name: self.name.as_ptr().cast_mut(),
            description: core::ptr::null_mut(),
        }
    }

    fn add(&self, layer: GUID, weight: u8, action: u32, conds: &[Cond]) -> u64 {
        let add: FilterAdd = host("FwpmFilterAdd0");
        let mut conditions: Vec<w::FWPM_FILTER_CONDITION0> = conds
            .iter()
            .map(|c| {
                let mut out = w::FWPM_FILTER_CONDITION0 {
                    matchType: w::FWP_MATCH_EQUAL,
                    ..Default::default()
                };
                match *c {
                    Cond::U8(field, v) => {
                        out.fieldKey = field;
                        out.conditionValue.r#type = w::FWP_UINT8;
                        out.conditionValue.Anonymous.uint8 = v;
                    }
                    Cond::U16(field, v) => {
                        out.fieldKey = field;
                        out.conditionValue.r#type = w::FWP_UINT16;
                        out.conditionValue.Anonymous.uint16 = v;
                    }
                    Cond::U32(field, v) => {
                        out.fieldKey = field;
                        out.conditionValue.r#type = w::FWP_UINT32;
                        out.conditionValue.Anonymous.uint32 = v;
                    }
                }
                out
            })
            .collect();
        let mut provider = PROVIDER;
        let mut filter = w::FWPM_FILTER0 {
            displayData: self.display(),
            providerKey: &raw mut provider,
            layerKey: layer,
            subLayerKey: SUBLAYER,
            numFilterConditions: u32::try_from(conditions.len()).expect("few"),
            filterCondition: conditions.as_mut_ptr(),
            ..Default::default()
        };
        filter.weight.r#type = w::FWP_UINT8;
        filter.weight.Anonymous.uint8 = weight;
        filter.action.r#type = action;
        let mut id = 0;
        // SAFETY: the filter's pointers are valid for the call; an id to write.
        let status = unsafe {
            add(
                self.engine,
                &raw const filter,
                core::ptr::null_mut(),
                &raw mut id,
            )
        };
        assert_eq!(status, 0, "FwpmFilterAdd0");
        id
    }

    /// The permit filters of one rule (a filter per direction); returns their ids.
    fn rule(&self, rule: &teredo_watcher::ExceptionRule) -> Vec<u64> {
        let layers: &[(bool, GUID)] = match (rule.ip_version, rule.direction) {
            (IpVersion::V4, RuleDirection::Inbound) => {
                &[(true, w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4)]
            }
            (IpVersion::V4, RuleDirection::Outbound) => {
                &[(false, w::FWPM_LAYER_ALE_AUTH_CONNECT_V4)]
            }
            (IpVersion::V4, RuleDirection::Both) => &[
                (true, w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4),
                (false, w::FWPM_LAYER_ALE_AUTH_CONNECT_V4),
            ],
            (IpVersion::V6, RuleDirection::Inbound) => {
                &[(true, w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6)]
            }
            (IpVersion::V6, RuleDirection::Outbound) => {
                &[(false, w::FWPM_LAYER_ALE_AUTH_CONNECT_V6)]
            }
            (IpVersion::V6, RuleDirection::Both) => &[
                (true, w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6),
                (false, w::FWPM_LAYER_ALE_AUTH_CONNECT_V6),
            ],
        };
        let protocol = match rule.protocol {
            Protocol::Udp => 17,
            Protocol::Icmpv6 => 58,
        };
        let mut conds = vec![Cond::U8(w::FWPM_CONDITION_IP_PROTOCOL, protocol)];
        if let Some(p) = rule.local_port {
            conds.push(Cond::U16(w::FWPM_CONDITION_IP_LOCAL_PORT, p));
        }
        if let Some(p) = rule.remote_port {
            conds.push(Cond::U16(w::FWPM_CONDITION_IP_REMOTE_PORT, p));
        }
        if let Some(a) = rule.local_address {
            conds.push(Cond::U32(w::FWPM_CONDITION_IP_LOCAL_ADDRESS, a.to_bits()));
        }
        if let Some(t) = rule.icmpv6_type {
            // FWPM_CONDITION_ICMP_TYPE is FWPM_CONDITION_IP_LOCAL_PORT at the ALE layers.
            conds.push(Cond::U16(w::FWPM_CONDITION_IP_LOCAL_PORT, u16::from(t)));
        }
        layers
            .iter()
            .map(|(_, layer)| self.add(*layer, 10, w::FWP_ACTION_PERMIT, &conds))
            .collect()
    }

    fn dynamic(&self, port: u16) -> Vec<u64> {
        self.rule(&teredo_watcher::ExceptionRule::dynamic_port(
            TeredoPort::new(port).expect("non-zero"),
        ))
    }

    fn begin(&self) {
        let begin: Begin = host("FwpmTransactionBegin0");
        assert_eq!(begin(self.engine, 0), 0);
    }

    fn commit(&self) {
        let commit: Handle1 = host("FwpmTransactionCommit0");
        assert_eq!(commit(self.engine), 0);
    }

    /// `DriverEntry`'s transaction: provider, sublayer, the rules for `port`, the policy.
    fn install(&mut self, port: u16) {
        self.begin();
        let provider_add: ProviderAdd = host("FwpmProviderAdd0");
        let sublayer_add: SubLayerAdd = host("FwpmSubLayerAdd0");
        let provider = w::FWPM_PROVIDER0 {
            providerKey: PROVIDER,
            displayData: self.display(),
            ..Default::default()
        };
        let mut key = PROVIDER;
        let sublayer = w::FWPM_SUBLAYER0 {
            subLayerKey: SUBLAYER,
            displayData: self.display(),
            providerKey: &raw mut key,
            weight: 0x8000,
            ..Default::default()
        };
        // SAFETY: structures valid for the calls, no security descriptors.
        unsafe {
            assert_eq!(
                provider_add(self.engine, &raw const provider, core::ptr::null_mut()),
                0
            );
            assert_eq!(
                sublayer_add(self.engine, &raw const sublayer, core::ptr::null_mut()),
                0
            );
        }
        let rules = TeredoExceptions::for_port(TeredoPort::new(port));
        for rule in rules.rules() {
            let ids = self.rule(&rule);
            if rule.kind == RuleKind::DynamicPort {
                self.dynamic_ids = ids;
            }
        }
        let udp = [Cond::U8(w::FWPM_CONDITION_IP_PROTOCOL, 17)];
        let icmp = [Cond::U8(w::FWPM_CONDITION_IP_PROTOCOL, 58)];
        self.add(
            w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4,
            1,
            w::FWP_ACTION_BLOCK,
            &udp,
        );
        self.add(
            w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6,
            1,
            w::FWP_ACTION_BLOCK,
            &udp,
        );
        self.add(
            w::FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6,
            1,
            w::FWP_ACTION_BLOCK,
            &icmp,
        );
        self.commit();
    }

    fn change(&mut self, port: u16, how: Change) {
        let delete: DeleteById = host("FwpmFilterDeleteById0");
        let old = std::mem::take(&mut self.dynamic_ids);
        match how {
            Change::AddThenDelete => {
                self.begin();
                self.dynamic_ids = self.dynamic(port);
                for id in old {
                    assert_eq!(delete(self.engine, id), 0);
                }
                self.commit();
            }
            Change::DeleteFirst => {
                self.begin();
                for id in old {
                    assert_eq!(delete(self.engine, id), 0);
                }
                self.commit();
                self.begin();
                self.dynamic_ids = self.dynamic(port);
                self.commit();
            }
            Change::KeepOld => {
                self.begin();
                self.dynamic_ids = self.dynamic(port);
                self.commit();
            }
        }
    }

    fn close(self) {
        let close: Handle1 = host("FwpmEngineClose0");
        assert_eq!(close(self.engine), 0);
    }
}

struct Outcome {
    judgement: firewall::Judgement,
    checks: firewall::CommitChecks,
    replayed: u64,
}

/// The reference client installs for port 50,000 and changes the port 6 times `how`,
/// while two threads replay traffic; then the oracle and the commit checks judge.
fn run(how: Change) -> Outcome {
    let _one = Exclusive::bare_kernel();
    let ports: Vec<u16> = (0..7).map(|k| 50_000 + 7 * k).collect();
    let state = Arc::new(Mutex::new((Some(ports[0]), None::<u16>)));
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let from = Instant::now();
    let mut client = Client::open();
    let mut notifications = vec![(Instant::now(), ports[0])];
    client.install(ports[0]);
    let replayers: Vec<_> = (0..2)
        .map(|_| {
            let (state, stop, rounds) =
                (Arc::clone(&state), Arc::clone(&stop), Arc::clone(&rounds));
            std::thread::spawn(move || {
                let mut verdicts = Verdicts::default();
                let mut round = 0;
                while !stop.load(Ordering::SeqCst) {
                    let (current, previous) = *state.lock().unwrap_or_else(PoisonError::into_inner);
                    firewall::replay_round(current, previous, round, &mut verdicts);
                    round += 1;
                    rounds.fetch_add(1, Ordering::SeqCst);
                }
                verdicts
            })
        })
        .collect();
    // Each committed state carries traffic: a floor of rounds after each commit.
    let after_commit = || {
        let target = rounds.load(Ordering::SeqCst) + ROUNDS_PER_STATE;
        let start = Instant::now();
        while rounds.load(Ordering::SeqCst) < target {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the replayers run"
            );
            std::thread::yield_now();
        }
    };
    for pair in ports.windows(2) {
        after_commit();
        *state.lock().unwrap_or_else(PoisonError::into_inner) = (Some(pair[1]), Some(pair[0]));
        notifications.push((Instant::now(), pair[1]));
        client.change(pair[1], how);
    }
    after_commit();
    stop.store(true, Ordering::SeqCst);
    let mut verdicts = Verdicts::default();
    for r in replayers {
        verdicts.merge(r.join().expect("replayer"));
    }
    let until = Instant::now();
    client.close();
    assert_eq!(kernel::fwp_stats().committed, (0, 0, 0));
    let history = kernel::commit_history();
    let reported: Vec<u16> = notifications.iter().map(|(_, p)| *p).collect();
    Outcome {
        judgement: firewall::judge(&verdicts, &history, &reported),
        checks: firewall::commit_checks(&history, &notifications, from, until),
        replayed: verdicts.total(),
    }
}

#[test]
fn the_reference_client_has_no_wrong_verdict_no_gap_and_a_lag_per_change() {
    let outcome = run(Change::AddThenDelete);
    let j = &outcome.judgement;
    // Each round has 13 packets with a previous port, 12 without.
    assert!(
        outcome.replayed >= 12 * ROUNDS_PER_STATE * 7,
        "a floor of rounds per committed state: {}",
        outcome.replayed
    );
    assert!(j.generations >= 7, "traffic through every committed state");
    assert_eq!(j.wrong, 0, "{:?}", j.examples);
    assert_eq!(j.permitted + j.blocked, outcome.replayed);
    // Each kind was seen, and the ones the rules decide alone went one way only.
    for kind in [
        Kind::UnicastStatic,
        Kind::Icmpv6Unlisted,
        Kind::OtherUdp,
        Kind::Udp6,
    ] {
        let (p, b) = j.by_kind[&kind];
        assert!(
            p == 0 && b > 0,
            "{kind:?} blocked: {p} permitted, {b} blocked"
        );
    }
    for kind in [
        Kind::MulticastStatic,
        Kind::FromServer,
        Kind::ToServer,
        Kind::Icmpv6Listed,
        Kind::OutboundIcmpv6,
        Kind::OutboundCurrent,
        Kind::Tcp,
    ] {
        let (p, b) = j.by_kind[&kind];
        assert!(
            p > 0 && b == 0,
            "{kind:?} permitted: {p} permitted, {b} blocked"
        );
    }
    let c = &outcome.checks;
    assert!(c.examined >= 7, "install and 6 changes: {}", c.examined);
    assert!(
        c.gaps.is_empty() && c.doubles.is_empty() && c.unreported.is_empty(),
        "{c:?}"
    );
    assert!(c.without_policy.is_empty(), "{c:?}");
    assert_eq!(c.lags.len(), 7, "every port committed: {c:?}");
    assert!(c.never_committed.is_empty());
    assert!(firewall::lag_summary(&c.lags).is_some());
}

#[test]
fn deleting_before_adding_leaves_a_gap_the_checks_count() {
    let outcome = run(Change::DeleteFirst);
    let c = &outcome.checks;
    assert_eq!(c.gaps.len(), 6, "one gap per change: {c:?}");
    // Classification stays consistent with each snapshot: the oracle has nothing to say.
    assert_eq!(
        outcome.judgement.wrong, 0,
        "{:?}",
        outcome.judgement.examples
    );
}

#[test]
fn keeping_the_old_filter_is_a_double_and_wrong_verdicts_for_the_previous_port() {
    let outcome = run(Change::KeepOld);
    let c = &outcome.checks;
    assert_eq!(c.doubles.len(), 6, "{c:?}");
    let j = &outcome.judgement;
    assert!(j.wrong > 0, "the previous port stays open");
    let (permitted, _) = j.by_kind[&Kind::PreviousPort];
    assert!(permitted > 0);
    // Every wrong verdict permits UDP to a port left open: the previous one, or the
    // "current" one of a round that began before the change committed.
    assert!(
        j.examples
            .iter()
            .all(|e| e.contains("PreviousPort") || e.contains("CurrentPort")),
        "{:?}",
        j.examples
    );
}

#[test]
fn the_oracle_follows_the_rules() {
    use firewall::{HOST_V4, PEER_V4, expected};
    use kernel::Packet;
    let to = |port| Packet::udp4(true, HOST_V4, port, PEER_V4, 61_000);
    assert_eq!(expected(Some(50_000), &to(50_000)), Verdict::Permit);
    assert_eq!(expected(Some(50_000), &to(50_007)), Verdict::Block);
    assert_eq!(expected(None, &to(50_000)), Verdict::Block);
    assert_eq!(expected(Some(50_000), &to(3544)), Verdict::Block);
    let out = Packet::udp4(false, HOST_V4, 9, PEER_V4, 9);
    assert_eq!(expected(None, &out), Verdict::Permit);
    let mut tcp = to(50_007);
    tcp.protocol = 6;
    assert_eq!(expected(Some(50_000), &tcp), Verdict::Permit);
}
