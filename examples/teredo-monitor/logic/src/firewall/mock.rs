//! [`MockFilterEngine`] (feature `host-mock`): the filter engine on the host, for the tests
//! and the demo. It keeps the engine's books (sessions, transactions, providers, sublayers,
//! filters), checks each call's documented preconditions, fails any call on demand with the
//! statuses the engine documents for it, and records every committed filter set.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::vec::Vec;

use core::net::IpAddr;

use teredo_watcher::mock::MockKernel;
use teredo_watcher::{Direction, Irql, Kernel as _, PacketView, Transport};

use super::engine::{FilterEngine, FilterId, FwpCall, FwpError, FwpErrorKind};
use super::filters::{
    Action, Condition, FilterSpec, IPPROTO_ICMPV6, IPPROTO_UDP, Layer, ProviderSpec, SessionSpec,
    SublayerSpec,
};

/// `STATUS_INVALID_HANDLE`.
pub const STATUS_INVALID_HANDLE: i32 = 0xC000_0008_u32.cast_signed();
/// `STATUS_INSUFFICIENT_RESOURCES`.
pub const STATUS_INSUFFICIENT_RESOURCES: i32 = 0xC000_009A_u32.cast_signed();
/// `STATUS_FWP_FILTER_NOT_FOUND` (`FWP_E_FILTER_NOT_FOUND`).
pub const STATUS_FWP_FILTER_NOT_FOUND: i32 = 0xC022_0003_u32.cast_signed();
/// `STATUS_FWP_PROVIDER_NOT_FOUND`.
pub const STATUS_FWP_PROVIDER_NOT_FOUND: i32 = 0xC022_0005_u32.cast_signed();
/// `STATUS_FWP_SUBLAYER_NOT_FOUND`.
pub const STATUS_FWP_SUBLAYER_NOT_FOUND: i32 = 0xC022_0007_u32.cast_signed();
/// `STATUS_FWP_ALREADY_EXISTS`.
pub const STATUS_FWP_ALREADY_EXISTS: i32 = 0xC022_0009_u32.cast_signed();
/// `STATUS_FWP_NO_TXN_IN_PROGRESS`.
pub const STATUS_FWP_NO_TXN_IN_PROGRESS: i32 = 0xC022_000D_u32.cast_signed();
/// `STATUS_FWP_TXN_IN_PROGRESS`.
pub const STATUS_FWP_TXN_IN_PROGRESS: i32 = 0xC022_000E_u32.cast_signed();
/// `STATUS_FWP_TXN_ABORTED`.
pub const STATUS_FWP_TXN_ABORTED: i32 = 0xC022_000F_u32.cast_signed();
/// `STATUS_FWP_SESSION_ABORTED`.
pub const STATUS_FWP_SESSION_ABORTED: i32 = 0xC022_0010_u32.cast_signed();
/// `STATUS_FWP_TIMEOUT` (the transaction lock was not granted in time).
pub const STATUS_FWP_TIMEOUT: i32 = 0xC022_0012_u32.cast_signed();
/// `STATUS_FWP_NULL_DISPLAY_NAME`.
pub const STATUS_FWP_NULL_DISPLAY_NAME: i32 = 0xC022_0023_u32.cast_signed();
/// `STATUS_FWP_INVALID_PARAMETER`.
pub const STATUS_FWP_INVALID_PARAMETER: i32 = 0xC022_0035_u32.cast_signed();

/// The failure statuses the mock injects for each call: the `STATUS_FWP_*` forms (kernel
/// mode returns `NTSTATUS`) of the `FWP_E_*` conditions each call can meet, and running out
/// of memory. The driver treats every failure alike; the tests sweep them all.
#[must_use]
pub fn failure_statuses(call: FwpCall) -> &'static [i32] {
    match call {
        FwpCall::EngineOpen => &[STATUS_INSUFFICIENT_RESOURCES, STATUS_FWP_INVALID_PARAMETER],
        FwpCall::EngineClose => &[STATUS_INVALID_HANDLE],
        FwpCall::TransactionBegin => &[
            STATUS_FWP_TXN_IN_PROGRESS,
            STATUS_FWP_TIMEOUT,
            STATUS_FWP_SESSION_ABORTED,
        ],
        FwpCall::TransactionCommit => &[
            STATUS_FWP_TXN_ABORTED,
            STATUS_FWP_SESSION_ABORTED,
            STATUS_FWP_NO_TXN_IN_PROGRESS,
        ],
        FwpCall::TransactionAbort => &[STATUS_FWP_NO_TXN_IN_PROGRESS],
        FwpCall::ProviderAdd | FwpCall::SubLayerAdd => &[
            STATUS_FWP_ALREADY_EXISTS,
            STATUS_FWP_NULL_DISPLAY_NAME,
            STATUS_INSUFFICIENT_RESOURCES,
        ],
        FwpCall::FilterAdd => &[
            STATUS_FWP_SUBLAYER_NOT_FOUND,
            STATUS_FWP_PROVIDER_NOT_FOUND,
            STATUS_FWP_INVALID_PARAMETER,
            STATUS_INSUFFICIENT_RESOURCES,
        ],
        FwpCall::FilterDeleteById => &[STATUS_FWP_FILTER_NOT_FOUND, STATUS_FWP_TXN_ABORTED],
    }
}

/// The engine's objects: what is committed, or a transaction's working copy of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Objects {
    /// Provider keys, with the session that added each.
    pub providers: BTreeMap<u128, u64>,
    /// Sublayers by key, with the session that added each.
    pub sublayers: BTreeMap<u128, (u64, u16)>,
    /// Filters by id, with the session that added each.
    pub filters: BTreeMap<FilterId, (u64, FilterSpec)>,
}

impl Objects {
    fn drop_session(&mut self, session: u64) {
        self.providers.retain(|_, s| *s != session);
        self.sublayers.retain(|_, (s, _)| *s != session);
        self.filters.retain(|_, (s, _)| *s != session);
    }
}

#[derive(Debug, Default)]
struct State {
    next_session: u64,
    next_filter: u64,
    /// Open sessions: whether dynamic, and the open transaction's working copy.
    sessions: BTreeMap<u64, (bool, Option<Objects>)>,
    committed: Objects,
    /// The committed filter set after each change of it (commit, or a call outside a
    /// transaction), in order.
    history: Vec<Vec<FilterSpec>>,
    /// Injected failures: (call, calls of that kind to let through first, status).
    failures: VecDeque<(Option<FwpCall>, usize, i32)>,
    calls: BTreeMap<FwpCall, usize>,
    /// Every call, in order, with its outcome.
    journal: Vec<(FwpCall, Result<(), FwpError>)>,
    irql_violations: usize,
}

/// A call held before it runs ([`MockFilterEngine::pause_next`]).
#[derive(Debug, Default)]
struct Pause {
    /// The call to hold next.
    armed: Option<FwpCall>,
    /// A call is held now.
    held: bool,
    /// The held call may go on.
    resume: bool,
}

/// The host mock of the filter engine. Clones share one engine.
#[derive(Clone, Debug, Default)]
pub struct MockFilterEngine {
    state: Arc<Mutex<State>>,
    pause: Arc<(Mutex<Pause>, Condvar)>,
}

/// An engine handle of the mock: one open session.
#[derive(Debug)]
pub struct MockHandle(u64);

impl MockFilterEngine {
    /// A new engine: nothing open, nothing committed.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds the next call of `call` before it runs, on its thread, until [`resume`](Self::resume).
    pub fn pause_next(&self, call: FwpCall) {
        let (lock, _) = &*self.pause;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = Pause {
            armed: Some(call),
            held: false,
            resume: false,
        };
    }

    /// Waits until a call is held.
    pub fn wait_until_paused(&self) {
        let (lock, changed) = &*self.pause;
        let mut p = lock.lock().unwrap_or_else(PoisonError::into_inner);
        while !p.held {
            p = changed.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Whether a call is held now.
    #[must_use]
    pub fn paused(&self) -> bool {
        let (lock, _) = &*self.pause;
        lock.lock().unwrap_or_else(PoisonError::into_inner).held
    }

    /// Lets the held call go on.
    pub fn resume(&self) {
        let (lock, changed) = &*self.pause;
        lock.lock().unwrap_or_else(PoisonError::into_inner).resume = true;
        changed.notify_all();
    }

    /// Holds this call if it is the armed one (outside the books' lock).
    fn maybe_pause(&self, call: FwpCall) {
        let (lock, changed) = &*self.pause;
        let mut p = lock.lock().unwrap_or_else(PoisonError::into_inner);
        if p.armed != Some(call) {
            return;
        }
        p.armed = None;
        p.held = true;
        changed.notify_all();
        while !p.resume {
            p = changed.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
        p.held = false;
        p.resume = false;
    }

    /// Fails the next call of `call` with `status`.
    pub fn fail_next(&self, call: FwpCall, status: i32) {
        self.state().failures.push_back((Some(call), 0, status));
    }

    /// Fails the call of `call` after `skip` more calls of it succeeded, with `status`.
    pub fn fail_after(&self, call: FwpCall, skip: usize, status: i32) {
        self.state().failures.push_back((Some(call), skip, status));
    }

    /// Fails the engine call after `skip` more calls (of any kind) succeeded, with `status`.
    pub fn fail_call_after(&self, skip: usize, status: i32) {
        self.state().failures.push_back((None, skip, status));
    }

    /// Whether an injected failure has not been used yet.
    #[must_use]
    pub fn failure_pending(&self) -> bool {
        !self.state().failures.is_empty()
    }

    /// The committed filters, by id.
    #[must_use]
    pub fn committed(&self) -> Objects {
        self.state().committed.clone()
    }

    /// The committed filters' specs, in id order.
    #[must_use]
    pub fn committed_filters(&self) -> Vec<FilterSpec> {
        self.state()
            .committed
            .filters
            .values()
            .map(|(_, f)| *f)
            .collect()
    }

    /// The committed filter set after each change of it, in order.
    #[must_use]
    pub fn history(&self) -> Vec<Vec<FilterSpec>> {
        self.state().history.clone()
    }

    /// Open sessions.
    #[must_use]
    pub fn open_sessions(&self) -> usize {
        self.state().sessions.len()
    }

    /// Open transactions.
    #[must_use]
    pub fn open_transactions(&self) -> usize {
        self.state()
            .sessions
            .values()
            .filter(|(_, t)| t.is_some())
            .count()
    }

    /// Calls of `call` so far (failed ones included).
    #[must_use]
    pub fn calls(&self, call: FwpCall) -> usize {
        self.state().calls.get(&call).copied().unwrap_or(0)
    }

    /// Every call so far, in order, with its outcome.
    #[must_use]
    pub fn journal(&self) -> Vec<(FwpCall, Result<(), FwpError>)> {
        self.state().journal.clone()
    }

    /// Calls made above `PASSIVE_LEVEL` (refused).
    #[must_use]
    pub fn irql_violations(&self) -> usize {
        self.state().irql_violations
    }

    /// One call: the IRQL check, the injected failures, then `body` on the books.
    fn call<R>(
        &self,
        call: FwpCall,
        body: impl FnOnce(&mut State) -> Result<R, i32>,
    ) -> Result<R, FwpError> {
        self.maybe_pause(call);
        let mut s = self.state();
        *s.calls.entry(call).or_default() += 1;
        let result = Self::outcome(&mut s, call, body);
        let recorded = result.as_ref().map(|_| ()).map_err(|e| *e);
        s.journal.push((call, recorded));
        result
    }

    fn outcome<R>(
        s: &mut State,
        call: FwpCall,
        body: impl FnOnce(&mut State) -> Result<R, i32>,
    ) -> Result<R, FwpError> {
        let irql = MockKernel::current_irql();
        if irql != Irql::PASSIVE_LEVEL {
            s.irql_violations += 1;
            return Err(FwpError {
                call,
                kind: FwpErrorKind::IrqlTooHigh(irql),
            });
        }
        let mut injected = None;
        for (i, (which, skip, status)) in s.failures.iter_mut().enumerate() {
            if which.is_none_or(|w| w == call) {
                if *skip == 0 {
                    injected = Some((i, *status));
                    break;
                }
                *skip -= 1;
            }
        }
        if let Some((i, status)) = injected {
            s.failures.remove(i);
            return Err(FwpError::status(call, status));
        }
        body(s).map_err(|status| FwpError::status(call, status))
    }
}

impl State {
    /// The objects a call of `session` changes: its transaction's working copy, or the
    /// committed ones (a call outside a transaction commits at once).
    fn change(
        &mut self,
        session: u64,
        f: impl FnOnce(&mut Objects, u64) -> Result<(), i32>,
    ) -> Result<(), i32> {
        let Some((_, txn)) = self.sessions.get_mut(&session) else {
            return Err(STATUS_INVALID_HANDLE);
        };
        if let Some(working) = txn {
            f(working, session)
        } else {
            f(&mut self.committed, session)?;
            self.record();
            Ok(())
        }
    }

    fn record(&mut self) {
        let set = self.committed.filters.values().map(|(_, f)| *f).collect();
        self.history.push(set);
    }
}

impl FilterEngine for MockFilterEngine {
    type Handle = MockHandle;

    fn engine_open(&self, session: &SessionSpec) -> Result<MockHandle, FwpError> {
        self.call(FwpCall::EngineOpen, |s| {
            if session.name.wide.last() != Some(&0) {
                return Err(STATUS_FWP_NULL_DISPLAY_NAME);
            }
            s.next_session += 1;
            let id = s.next_session;
            s.sessions.insert(id, (session.dynamic, None));
            Ok(MockHandle(id))
        })
    }

    fn engine_close(&self, engine: MockHandle) -> Result<(), FwpError> {
        self.call(FwpCall::EngineClose, |s| {
            let (dynamic, _txn) = s.sessions.remove(&engine.0).ok_or(STATUS_INVALID_HANDLE)?;
            // An open transaction is aborted; a dynamic session's objects are deleted.
            if dynamic {
                let filters = s.committed.filters.len();
                s.committed.drop_session(engine.0);
                if s.committed.filters.len() != filters {
                    s.record();
                }
            }
            Ok(())
        })
    }

    fn transaction_begin(&self, engine: &MockHandle) -> Result<(), FwpError> {
        self.call(FwpCall::TransactionBegin, |s| {
            let committed = s.committed.clone();
            let (_, txn) = s.sessions.get_mut(&engine.0).ok_or(STATUS_INVALID_HANDLE)?;
            if txn.is_some() {
                return Err(STATUS_FWP_TXN_IN_PROGRESS);
            }
            *txn = Some(committed);
            Ok(())
        })
    }

    fn transaction_commit(&self, engine: &MockHandle) -> Result<(), FwpError> {
        self.call(FwpCall::TransactionCommit, |s| {
            let (_, txn) = s.sessions.get_mut(&engine.0).ok_or(STATUS_INVALID_HANDLE)?;
            let working = txn.take().ok_or(STATUS_FWP_NO_TXN_IN_PROGRESS)?;
            let changed = working.filters != s.committed.filters;
            s.committed = working;
            if changed {
                s.record();
            }
            Ok(())
        })
    }

    fn transaction_abort(&self, engine: &MockHandle) -> Result<(), FwpError> {
        self.call(FwpCall::TransactionAbort, |s| {
            let (_, txn) = s.sessions.get_mut(&engine.0).ok_or(STATUS_INVALID_HANDLE)?;
            txn.take().map(|_| ()).ok_or(STATUS_FWP_NO_TXN_IN_PROGRESS)
        })
    }

    fn provider_add(&self, engine: &MockHandle, provider: &ProviderSpec) -> Result<(), FwpError> {
        self.call(FwpCall::ProviderAdd, |s| {
            s.change(engine.0, |objects, session| {
                if provider.name.wide.last() != Some(&0) {
                    return Err(STATUS_FWP_NULL_DISPLAY_NAME);
                }
                if objects.providers.insert(provider.key, session).is_some() {
                    return Err(STATUS_FWP_ALREADY_EXISTS);
                }
                Ok(())
            })
        })
    }

    fn sublayer_add(&self, engine: &MockHandle, sublayer: &SublayerSpec) -> Result<(), FwpError> {
        self.call(FwpCall::SubLayerAdd, |s| {
            s.change(engine.0, |objects, session| {
                if !objects.providers.contains_key(&sublayer.provider) {
                    return Err(STATUS_FWP_PROVIDER_NOT_FOUND);
                }
                if objects.sublayers.contains_key(&sublayer.key) {
                    return Err(STATUS_FWP_ALREADY_EXISTS);
                }
                objects
                    .sublayers
                    .insert(sublayer.key, (session, sublayer.weight));
                Ok(())
            })
        })
    }

    fn filter_add(&self, engine: &MockHandle, filter: &FilterSpec) -> Result<FilterId, FwpError> {
        self.call(FwpCall::FilterAdd, |s| {
            s.next_filter += 1;
            let id = FilterId(s.next_filter);
            s.change(engine.0, |objects, session| {
                if !objects.providers.contains_key(&filter.provider()) {
                    return Err(STATUS_FWP_PROVIDER_NOT_FOUND);
                }
                if !objects.sublayers.contains_key(&filter.sublayer()) {
                    return Err(STATUS_FWP_SUBLAYER_NOT_FOUND);
                }
                if filter.conditions().is_empty() || filter.name.wide.last() != Some(&0) {
                    return Err(STATUS_FWP_INVALID_PARAMETER);
                }
                objects.filters.insert(id, (session, *filter));
                Ok(())
            })?;
            Ok(id)
        })
    }

    fn filter_delete_by_id(&self, engine: &MockHandle, id: FilterId) -> Result<(), FwpError> {
        self.call(FwpCall::FilterDeleteById, |s| {
            s.change(engine.0, |objects, _| {
                objects
                    .filters
                    .remove(&id)
                    .map(|_| ())
                    .ok_or(STATUS_FWP_FILTER_NOT_FOUND)
            })
        })
    }
}

/// The verdict of our sublayer for one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The highest-weight matching filter permits.
    Permit,
    /// The highest-weight matching filter blocks.
    Block,
    /// No filter of ours matches: the other sublayers decide (permit, without them).
    NoMatch,
}

/// Whether `condition` holds for `packet` (at the ALE layers the ICMP type is in the
/// local-port field, so `IcmpType` and `LocalPort` read the same value).
fn condition_holds(condition: Condition, packet: &PacketView) -> bool {
    let protocol = match packet.transport {
        Transport::Udp { .. } => IPPROTO_UDP,
        Transport::Icmpv6 { .. } => IPPROTO_ICMPV6,
        Transport::Other { protocol } => protocol,
    };
    let local_port = match packet.transport {
        Transport::Udp { local_port, .. } => Some(local_port),
        Transport::Icmpv6 { icmp_type } => Some(u16::from(icmp_type)),
        Transport::Other { .. } => None,
    };
    match condition {
        Condition::IpProtocol(p) => p == protocol,
        Condition::LocalPort(p) | Condition::IcmpType(p) => local_port == Some(p),
        Condition::RemotePort(p) => {
            matches!(packet.transport, Transport::Udp { remote_port, .. } if remote_port == p)
        }
        Condition::LocalAddressV4(a) => packet.local_address == IpAddr::V4(a),
    }
}

/// Our sublayer's arbitration over `filters` for `packet`: among the filters of the
/// packet's layer whose conditions all hold, the highest weight decides. (A tie is given to
/// the block; the driver's permits and blocks never tie, their weights differ.)
#[must_use]
pub fn verdict(filters: &[FilterSpec], packet: &PacketView) -> Verdict {
    let layer = Layer::of(
        matches!(packet.direction, Direction::Inbound),
        packet.ip_version(),
    );
    filters
        .iter()
        .filter(|f| f.layer == layer && f.conditions().iter().all(|c| condition_holds(*c, packet)))
        .max_by_key(|f| (f.weight, f.action == Action::Block))
        .map_or(Verdict::NoMatch, |f| match f.action {
            Action::Permit => Verdict::Permit,
            Action::Block => Verdict::Block,
        })
}

impl MockFilterEngine {
    /// Our sublayer's verdict for `packet` over the committed filters.
    #[must_use]
    pub fn verdict(&self, packet: &PacketView) -> Verdict {
        verdict(&self.committed_filters(), packet)
    }
}
