//! The mock netio Teredo API and the Teredo client it reports on.

use core::ffi::c_void;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle, ThreadId};
use std::vec::Vec;

use super::kernel::{MockKernel, raise_irql};
use crate::error::{Error, NetioCall};
use crate::irql::{Irql, IrqlBound};
use crate::kernel::Kernel;
use crate::source::{PortSource, RawHandle};
use crate::sys::{self, TeredoPortChangeCallback};

/// `STATUS_POSSIBLE_DEADLOCK`: what the mock's cancel returns when called from inside the
/// callback of the same registration (the real API deadlocks there).
pub const STATUS_POSSIBLE_DEADLOCK: i32 = 0xC000_0194_u32.cast_signed();

/// The callback context, moved to the delivery thread.
#[derive(Clone, Copy)]
struct Context(*mut c_void);
// SAFETY: the context is only handed back to the callback, whose `PortSource::notify`
// contract makes it sound to call from any thread.
unsafe impl Send for Context {}

struct Registration {
    callback: TeredoPortChangeCallback,
    context: Context,
    queue: VecDeque<(u16, i32)>,
    /// The worker does not deliver while this is set (an initial notification held back
    /// until `notify` returns or until the next `GetTeredoPort`).
    held: bool,
    /// The thread running the callback now, if one is.
    in_flight: Option<ThreadId>,
    cancelled: bool,
    delivered: u64,
    worker: Option<JoinHandle<()>>,
}

/// When the mock delivers the initial notification (`InitialNotification = TRUE`). The
/// documentation only says it comes "immediately after registration"; Windows may deliver it
/// before `NotifyTeredoPortChange` returns or after, from another thread. Each order can be
/// chosen, so tests can run each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InitialDelivery {
    /// On the registration's delivery thread, while `NotifyTeredoPortChange` waits for it:
    /// before the handle is written back.
    #[default]
    BeforeReturn,
    /// On the calling thread, inside `NotifyTeredoPortChange`, before the handle is written
    /// back.
    CallerThread,
    /// On the delivery thread, released just as `NotifyTeredoPortChange` returns: it runs
    /// concurrently with whatever the caller does next.
    AfterReturn,
    /// Held until the next `GetTeredoPort` call, which delivers it on the delivery thread and
    /// waits for it (and any notification queued meanwhile) before answering: the initial
    /// notification arrives while the seed runs.
    /// A notification queued meanwhile releases it first (it is never delivered after a
    /// later notification).
    DuringQuery,
}

#[derive(Default)]
struct Faults {
    notify: VecDeque<i32>,
    notify_null_handle: usize,
    query: VecDeque<i32>,
    query_port: VecDeque<u16>,
    cancel: VecDeque<i32>,
    cancel_after_wait: VecDeque<i32>,
}

struct State {
    running: Option<u16>,
    next_port: u16,
    ipv6: bool,
    callback_irql: Irql,
    initial_delivery: InitialDelivery,
    overlapping_invocations: usize,
    next_handle: usize,
    registrations: BTreeMap<usize, Registration>,
    faults: Faults,
    self_cancels: usize,
    dropped_after_cancel: usize,
    calls: [usize; 3],
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Facts about one live mock registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegistrationInfo {
    /// Its handle.
    pub handle: RawHandle,
    /// Notifications delivered to its callback so far.
    pub delivered: u64,
    /// Notifications queued, not yet delivered.
    pub queued: usize,
}

/// The host mock of netio's Teredo API (cheap to clone; clones share one state).
///
/// # Examples
///
/// A Teredo client that starts and restarts, a failure injected on the next cancel, and the
/// initial notification delivered after `NotifyTeredoPortChange` returned:
///
/// ```
/// use teredo_watcher::mock::{InitialDelivery, MockNetio};
/// use teredo_watcher::{HandleTable, NetioCall, TeredoPortWatcher, WatcherOptions, sys};
///
/// let netio = MockNetio::new();
/// netio.set_initial_delivery(InitialDelivery::AfterReturn);
/// let table = HandleTable::new(netio.clone());
/// let watcher = TeredoPortWatcher::new(&table, WatcherOptions::default())?;
/// let port = netio.client().start();
/// netio.wait_idle();
/// assert_eq!(watcher.current_port().map(|p| p.get()), Some(port));
///
/// netio.fail_next(NetioCall::CancelMibChangeNotify2, sys::STATUS_INVALID_PARAMETER);
/// assert!(watcher.unregister().is_err(), "the cancel failed: left to the teardown");
/// assert_eq!(netio.live_registrations(), 1);
/// assert!(table.teardown()?.is_clean());
/// assert_eq!(netio.live_registrations(), 0);
/// # Ok::<(), teredo_watcher::Error>(())
/// ```
#[derive(Clone)]
pub struct MockNetio {
    shared: Arc<Shared>,
}

impl Default for MockNetio {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for MockNetio {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let s = self.shared.lock();
        f.debug_struct("MockNetio")
            .field("running", &s.running)
            .field("registrations", &s.registrations.len())
            .finish_non_exhaustive()
    }
}

/// Controls the mock Teredo client (see [`MockNetio::client`]).
pub struct TeredoClient<'a> {
    netio: &'a MockNetio,
}

#[allow(
    clippy::must_use_candidate,
    reason = "the returned port is informative; scenarios often ignore it"
)]
impl TeredoClient<'_> {
    /// Starts the client on a new dynamic port and notifies `MibAddInstance` with it.
    /// Returns the port. Starting a running client restarts it.
    pub fn start(&self) -> u16 {
        let mut s = self.netio.shared.lock();
        if s.running.is_some() {
            drop(s);
            return self.restart();
        }
        let port = MockNetio::next_port(&mut s);
        s.running = Some(port);
        MockNetio::enqueue(&self.netio.shared, &mut s, port, sys::MIB_ADD_INSTANCE);
        port
    }

    /// Restarts the client: a new dynamic port, notified as `MibParameterNotification`.
    /// A stopped client is started instead.
    pub fn restart(&self) -> u16 {
        let mut s = self.netio.shared.lock();
        if s.running.is_none() {
            drop(s);
            return self.start();
        }
        let port = MockNetio::next_port(&mut s);
        s.running = Some(port);
        MockNetio::enqueue(
            &self.netio.shared,
            &mut s,
            port,
            sys::MIB_PARAMETER_NOTIFICATION,
        );
        port
    }

    /// Stops the client: `MibDeleteInstance` with the port it had. No-op when stopped.
    pub fn stop(&self) {
        let mut s = self.netio.shared.lock();
        if let Some(port) = s.running.take() {
            MockNetio::enqueue(&self.netio.shared, &mut s, port, sys::MIB_DELETE_INSTANCE);
        }
    }

    /// Sets the port the client runs on (`None`: stopped) without notifying anyone, as if it
    /// had changed before any registration existed.
    pub fn set_port_quietly(&self, port: Option<u16>) {
        self.netio.shared.lock().running = port;
    }

    /// The port the client runs on, if it runs.
    #[must_use]
    pub fn port(&self) -> Option<u16> {
        self.netio.shared.lock().running
    }
}

impl MockNetio {
    /// A mock with the client stopped, IPv6 present, callbacks at `PASSIVE_LEVEL`.
    #[must_use]
    pub fn new() -> Self {
        MockNetio {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    running: None,
                    next_port: 49_152,
                    ipv6: true,
                    callback_irql: Irql::PASSIVE_LEVEL,
                    initial_delivery: InitialDelivery::BeforeReturn,
                    overlapping_invocations: 0,
                    next_handle: 0x1000,
                    registrations: BTreeMap::new(),
                    faults: Faults::default(),
                    self_cancels: 0,
                    dropped_after_cancel: 0,
                    calls: [0; 3],
                }),
                changed: Condvar::new(),
            }),
        }
    }

    /// The Teredo client this mock reports on.
    #[must_use]
    pub fn client(&self) -> TeredoClient<'_> {
        TeredoClient { netio: self }
    }

    fn next_port(s: &mut State) -> u16 {
        let port = s.next_port;
        s.next_port = if s.next_port >= 65_000 {
            49_152
        } else {
            s.next_port + 7
        };
        port
    }

    fn enqueue(shared: &Shared, s: &mut State, port: u16, kind: i32) {
        for reg in s.registrations.values_mut() {
            if !reg.cancelled {
                // A held initial notification goes first, now: it is never later than the
                // notifications that follow it.
                reg.held = false;
                reg.queue.push_back((port, kind));
            }
        }
        shared.changed.notify_all();
    }

    /// Queues a raw notification (any port, any `MIB_NOTIFICATION_TYPE` value) to every live
    /// registration, without changing the client.
    pub fn notify_raw(&self, port: u16, notification_type: i32) {
        let mut s = self.shared.lock();
        Self::enqueue(&self.shared, &mut s, port, notification_type);
    }

    /// Queues a raw notification to one registration only. Returns `false` if it is not live.
    #[allow(clippy::must_use_candidate, reason = "tests may not care")]
    pub fn notify_raw_to(&self, handle: RawHandle, port: u16, notification_type: i32) -> bool {
        let mut s = self.shared.lock();
        let live = match s.registrations.get_mut(&handle.get()) {
            Some(reg) if !reg.cancelled => {
                reg.held = false;
                reg.queue.push_back((port, notification_type));
                true
            }
            _ => false,
        };
        self.shared.changed.notify_all();
        live
    }

    /// Makes the next call of `call` fail with `status` (queued: several may be set).
    pub fn fail_next(&self, call: NetioCall, status: i32) {
        let mut s = self.shared.lock();
        match call {
            NetioCall::NotifyTeredoPortChange => s.faults.notify.push_back(status),
            NetioCall::GetTeredoPort => s.faults.query.push_back(status),
            NetioCall::CancelMibChangeNotify2 => s.faults.cancel.push_back(status),
        }
    }

    /// Makes the next `NotifyTeredoPortChange` register the callback (it stays registered
    /// and is notified like any other) but return success with a NULL handle, which cannot be
    /// cancelled. `nt::NetioPortSource` (Windows targets) turns that into
    /// [`Error::InvalidHandle`] with status 0, and so does the mock.
    pub fn notify_null_handle_next(&self) {
        self.shared.lock().faults.notify_null_handle += 1;
    }

    /// Makes the next `GetTeredoPort` succeed with `port`, whatever the client does (0 is
    /// allowed: a success that reports no port). Queued.
    pub fn query_returns_next(&self, port: u16) {
        self.shared.lock().faults.query_port.push_back(port);
    }

    /// Makes the next `CancelMibChangeNotify2` wait for a callback of that registration in
    /// flight, as it does when it succeeds, and then fail with `status`, leaving the
    /// registration live. Queued.
    pub fn fail_next_cancel_after_wait(&self, status: i32) {
        self.shared
            .lock()
            .faults
            .cancel_after_wait
            .push_back(status);
    }

    /// Chooses when the initial notification is delivered (see [`InitialDelivery`]).
    pub fn set_initial_delivery(&self, order: InitialDelivery) {
        self.shared.lock().initial_delivery = order;
    }

    /// Breaks the API's contract on purpose: invokes the callback of `handle` now, on the
    /// calling thread, even while another invocation of it is in flight (an overlapping
    /// invocation). Returns `false` (and calls nothing) if the registration is not live.
    #[allow(clippy::must_use_candidate, reason = "tests may not care")]
    pub fn invoke_overlapping(&self, handle: RawHandle, port: u16, notification_type: i32) -> bool {
        let s = self.shared.lock();
        let Some(reg) = s.registrations.get(&handle.get()) else {
            return false;
        };
        if reg.cancelled {
            return false;
        }
        let (callback, context, irql) = (reg.callback, reg.context, s.callback_irql);
        drop(s);
        {
            let _irql = raise_irql(irql);
            // SAFETY: `notify`'s caller guaranteed `callback(context, ..)` is sound to call
            // from any thread until a cancel succeeds, and the registration is not cancelled.
            // The call may overlap another one: that is what this function is for (the
            // library must survive it).
            unsafe { callback(context.0, port, notification_type) };
        }
        let mut s = self.shared.lock();
        s.overlapping_invocations += 1;
        true
    }

    /// How many overlapping invocations [`invoke_overlapping`](Self::invoke_overlapping) made.
    #[must_use]
    pub fn overlapping_invocations(&self) -> usize {
        self.shared.lock().overlapping_invocations
    }

    /// Sets whether an IPv6 stack is present (without it, `GetTeredoPort` fails with
    /// `STATUS_NOT_SUPPORTED`).
    pub fn set_ipv6(&self, present: bool) {
        self.shared.lock().ipv6 = present;
    }

    /// Sets the IRQL the delivery threads run callbacks at.
    ///
    /// # Panics
    ///
    /// Above `DISPATCH_LEVEL`: the documented callback IRQL is at most that.
    pub fn set_callback_irql(&self, irql: Irql) {
        assert!(
            irql <= Irql::DISPATCH_LEVEL,
            "callbacks run at <= DISPATCH_LEVEL"
        );
        self.shared.lock().callback_irql = irql;
    }

    /// Waits until every queued notification has been delivered and no callback runs.
    pub fn wait_idle(&self) {
        let mut s = self.shared.lock();
        while s
            .registrations
            .values()
            .any(|r| !r.cancelled && (r.in_flight.is_some() || (!r.held && !r.queue.is_empty())))
        {
            s = self.shared.wait(s);
        }
    }

    /// The live registrations.
    #[must_use]
    pub fn registrations(&self) -> Vec<RegistrationInfo> {
        self.shared
            .lock()
            .registrations
            .iter()
            .filter(|(_, r)| !r.cancelled)
            .filter_map(|(h, r)| {
                Some(RegistrationInfo {
                    handle: RawHandle::new(*h)?,
                    delivered: r.delivered,
                    queued: r.queue.len(),
                })
            })
            .collect()
    }

    /// How many registrations are live.
    #[must_use]
    pub fn live_registrations(&self) -> usize {
        self.shared
            .lock()
            .registrations
            .values()
            .filter(|r| !r.cancelled)
            .count()
    }

    /// How many times `CancelMibChangeNotify2` was called from inside the callback of the
    /// registration it cancels (a deadlock on a real kernel).
    #[must_use]
    pub fn self_cancel_reports(&self) -> usize {
        self.shared.lock().self_cancels
    }

    /// Notifications discarded because their registration was cancelled first.
    #[must_use]
    pub fn dropped_after_cancel(&self) -> usize {
        self.shared.lock().dropped_after_cancel
    }

    /// Calls made so far: `[NotifyTeredoPortChange, GetTeredoPort, CancelMibChangeNotify2]`.
    #[must_use]
    pub fn calls(&self) -> [usize; 3] {
        self.shared.lock().calls
    }

    fn check_irql(call: &str, bound: IrqlBound) {
        let irql = MockKernel::current_irql();
        assert!(
            bound.allows(irql),
            "mock netio: {call} called at {irql}; the documentation requires IRQL {bound}"
        );
    }

    fn worker(shared: &Arc<Shared>, handle: usize) {
        let mut s = shared.lock();
        loop {
            let irql = s.callback_irql;
            let Some(reg) = s.registrations.get_mut(&handle) else {
                return;
            };
            if reg.cancelled {
                return;
            }
            if reg.held || reg.in_flight.is_some() {
                s = shared.wait(s);
                continue;
            }
            let Some((port, kind)) = reg.queue.pop_front() else {
                s = shared.wait(s);
                continue;
            };
            reg.in_flight = Some(thread::current().id());
            let (callback, context) = (reg.callback, reg.context);
            drop(s);
            {
                let _irql = raise_irql(irql);
                // SAFETY: `notify`'s caller guaranteed `callback(context, ..)` is sound until
                // a cancel of this registration succeeds; cancel waits for `in_flight` to
                // clear, and invocations of this registration only happen on this thread.
                unsafe { callback(context.0, port, kind) };
            }
            s = shared.lock();
            if let Some(reg) = s.registrations.get_mut(&handle) {
                reg.in_flight = None;
                reg.delivered += 1;
            }
            shared.changed.notify_all();
        }
    }
}

// SAFETY: the mock keeps the documented contract: one delivery thread per registration, and
// an initial notification on the calling thread only before that thread starts (serialized:
// `in_flight` admits one invocation at a time, except `invoke_overlapping`, which exists to
// break the contract on purpose), at the configured IRQL (<= DISPATCH_LEVEL) or the caller's
// (< DISPATCH_LEVEL), context passed unchanged; cancel marks the registration cancelled
// (nothing new starts), waits for the invocation in flight, then joins the thread; a failed
// `notify` registers nothing, except the documented "success with a NULL handle".
unsafe impl PortSource for MockNetio {
    type Kernel = MockKernel;

    unsafe fn notify(
        &self,
        callback: TeredoPortChangeCallback,
        context: *mut c_void,
        initial_notification: bool,
    ) -> Result<RawHandle, Error> {
        Self::check_irql("NotifyTeredoPortChange", IrqlBound::BelowDispatch);
        let mut s = self.shared.lock();
        s.calls[0] += 1;
        if let Some(status) = s.faults.notify.pop_front() {
            Error::check(NetioCall::NotifyTeredoPortChange, status)?;
        }
        let null_handle = s.faults.notify_null_handle > 0;
        if null_handle {
            s.faults.notify_null_handle -= 1;
        }
        let order = s.initial_delivery;
        let handle = s.next_handle;
        s.next_handle += 4;
        let mut queue = VecDeque::new();
        let inline = initial_notification && order == InitialDelivery::CallerThread;
        if initial_notification && !inline {
            queue.push_back((0, sys::MIB_INITIAL_NOTIFICATION));
        }
        let held = initial_notification
            && matches!(
                order,
                InitialDelivery::AfterReturn | InitialDelivery::DuringQuery
            );
        s.registrations.insert(
            handle,
            Registration {
                callback,
                context: Context(context),
                queue,
                held,
                in_flight: inline.then(|| thread::current().id()),
                cancelled: false,
                delivered: 0,
                worker: None,
            },
        );
        drop(s);
        if inline {
            // SAFETY: `notify`'s contract makes `callback(context, ..)` sound from now on;
            // the delivery thread does not exist yet, so this invocation is the only one.
            unsafe { callback(context, 0, sys::MIB_INITIAL_NOTIFICATION) };
            let mut s = self.shared.lock();
            if let Some(reg) = s.registrations.get_mut(&handle) {
                reg.in_flight = None;
                reg.delivered += 1;
            }
            self.shared.changed.notify_all();
        }
        let shared = Arc::clone(&self.shared);
        let worker = thread::Builder::new()
            .name(std::format!("mock-netio-{handle:#x}"))
            .spawn(move || Self::worker(&shared, handle));
        let mut s = self.shared.lock();
        let Ok(worker) = worker else {
            s.registrations.remove(&handle);
            return Err(Error::from_status(
                NetioCall::NotifyTeredoPortChange,
                sys::STATUS_INSUFFICIENT_RESOURCES,
            ));
        };
        let reg = s
            .registrations
            .get_mut(&handle)
            .ok_or(Error::InvalidHandle {
                call: NetioCall::NotifyTeredoPortChange,
                status: crate::NetioStatus(sys::ERROR_INVALID_HANDLE),
            })?;
        reg.worker = Some(worker);
        if initial_notification && order == InitialDelivery::BeforeReturn {
            // Before the handle is written back, as the real API allows: the caller's
            // context must already be complete.
            while s
                .registrations
                .get(&handle)
                .is_some_and(|r| r.delivered == 0 && !r.cancelled)
            {
                s = self.shared.wait(s);
            }
        }
        if let Some(reg) = s
            .registrations
            .get_mut(&handle)
            .filter(|_| order == InitialDelivery::AfterReturn)
        {
            reg.held = false;
        }
        self.shared.changed.notify_all();
        drop(s);
        if null_handle {
            return Err(Error::InvalidHandle {
                call: NetioCall::NotifyTeredoPortChange,
                status: crate::NetioStatus(sys::STATUS_SUCCESS),
            });
        }
        RawHandle::new(handle).ok_or(Error::InvalidHandle {
            call: NetioCall::NotifyTeredoPortChange,
            status: crate::NetioStatus(0),
        })
    }

    fn teredo_port(&self) -> Result<u16, Error> {
        Self::check_irql("GetTeredoPort", IrqlBound::BelowDispatch);
        let mut s = self.shared.lock();
        s.calls[1] += 1;
        // Initial notifications held for this call are delivered now, and the answer waits
        // for them (`InitialDelivery::DuringQuery`).
        let mut released = Vec::new();
        for (handle, reg) in &mut s.registrations {
            if reg.held && !reg.cancelled {
                reg.held = false;
                released.push(*handle);
            }
        }
        self.shared.changed.notify_all();
        // Until they and whatever they queued are delivered: all of it runs while the
        // query does.
        while s.registrations.iter().any(|(h, r)| {
            released.contains(h)
                && !r.cancelled
                && r.in_flight != Some(thread::current().id())
                && (r.in_flight.is_some() || r.delivered == 0 || !r.queue.is_empty())
        }) {
            s = self.shared.wait(s);
        }
        if let Some(status) = s.faults.query.pop_front() {
            Error::check(NetioCall::GetTeredoPort, status)?;
        }
        if let Some(port) = s.faults.query_port.pop_front() {
            return Ok(port);
        }
        if !s.ipv6 {
            return Err(Error::from_status(
                NetioCall::GetTeredoPort,
                sys::STATUS_NOT_SUPPORTED,
            ));
        }
        s.running.ok_or(Error::from_status(
            NetioCall::GetTeredoPort,
            sys::ERROR_NOT_READY,
        ))
    }

    unsafe fn cancel(&self, handle: RawHandle) -> Result<(), Error> {
        Self::check_irql("CancelMibChangeNotify2", IrqlBound::Passive);
        let mut s = self.shared.lock();
        s.calls[2] += 1;
        if let Some(status) = s.faults.cancel.pop_front() {
            Error::check(NetioCall::CancelMibChangeNotify2, status)?;
        }
        let me = thread::current().id();
        let Some(reg) = s.registrations.get_mut(&handle.get()) else {
            return Err(Error::from_status(
                NetioCall::CancelMibChangeNotify2,
                sys::ERROR_INVALID_HANDLE,
            ));
        };
        if reg.cancelled {
            return Err(Error::from_status(
                NetioCall::CancelMibChangeNotify2,
                sys::ERROR_INVALID_HANDLE,
            ));
        }
        if reg.in_flight == Some(me) {
            s.self_cancels += 1;
            return Err(Error::from_status(
                NetioCall::CancelMibChangeNotify2,
                STATUS_POSSIBLE_DEADLOCK,
            ));
        }
        if let Some(status) = s.faults.cancel_after_wait.pop_front() {
            // Wait for the invocation in flight, as a cancel does, then fail: still live.
            while s
                .registrations
                .get(&handle.get())
                .is_some_and(|r| r.in_flight.is_some())
            {
                s = self.shared.wait(s);
            }
            return Err(Error::from_status(
                NetioCall::CancelMibChangeNotify2,
                status,
            ));
        }
        let Some(reg) = s.registrations.get_mut(&handle.get()) else {
            return Err(Error::from_status(
                NetioCall::CancelMibChangeNotify2,
                sys::ERROR_INVALID_HANDLE,
            ));
        };
        reg.cancelled = true;
        let dropped = reg.queue.len();
        reg.queue.clear();
        s.dropped_after_cancel += dropped;
        self.shared.changed.notify_all();
        while s
            .registrations
            .get(&handle.get())
            .is_some_and(|r| r.in_flight.is_some())
        {
            s = self.shared.wait(s);
        }
        let worker = s
            .registrations
            .remove(&handle.get())
            .and_then(|mut r| r.worker.take());
        drop(s);
        if let Some(worker) = worker {
            let _ = worker.join();
        }
        Ok(())
    }
}
