//! netio.sys: `NotifyTeredoPortChange`, `GetTeredoPort`, `CancelMibChangeNotify2`, and the
//! modelled Teredo client whose changes they report.
//!
//! # Orderings and faults
//!
//! The documentation allows more than one order for the initial notification and names
//! failures a driver must survive; each can be chosen per machine (everything here is reset
//! by [`crate::kernel::reset`]):
//!
//! | knob | what netio does |
//! |---|---|
//! | [`set_initial_delivery`] | when the initial notification runs ([`InitialDelivery`]); each run is recorded ([`InitialRecord`]) |
//! | [`fail_next`] | the next call of one routine returns a status without doing its work |
//! | [`notify_null_handle_next`] | `NotifyTeredoPortChange` registers (and keeps notifying) but writes back a NULL handle and returns `STATUS_SUCCESS` |
//! | [`query_returns_next`] | `GetTeredoPort` succeeds with a given port (0 allowed) |
//! | [`fail_next_cancel_after_wait`] | `CancelMibChangeNotify2` waits for a callback in flight, then fails: still registered |
//! | [`invoke_overlapping`], [`overlap_inside_next_callback`] | a second invocation of a registration's callback while one runs (a contract break) |
//!
//! Whatever the order, the initial notification is the first invocation of its
//! registration: a client change that reaches a registration whose initial notification is
//! still pending waits for it (and releases one held for `GetTeredoPort`).

use core::ffi::c_void;
use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use super::bugcheck::{bugcheck, halt_if_stopped};
use super::irql::{current_irql, set_irql, thread_id};
use super::{
    APC_LEVEL, CHANGED, DISPATCH_LEVEL, ERROR_INVALID_HANDLE, ERROR_INVALID_PARAMETER,
    ERROR_NOT_READY, IRQL_NOT_LESS_OR_EQUAL, IRQL_UNEXPECTED_VALUE, MIB_INITIAL_NOTIFICATION,
    PASSIVE_LEVEL, STATUS_NOT_SUPPORTED, STATUS_POSSIBLE_DEADLOCK, STATUS_SUCCESS, lock, wait,
};

thread_local! {
    /// Whether this thread is running a notification callback.
    pub(crate) static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
    /// The handle whose callback this thread runs (0: none).
    static CALLBACK_HANDLE: Cell<usize> = const { Cell::new(0) };
}

/// When `NotifyTeredoPortChange` delivers the initial notification
/// (`InitialNotification = TRUE`). The documentation says only that it comes right after
/// registration, possibly before the handle is written back; Windows may choose any of
/// these, so a driver must work under each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InitialDelivery {
    /// On another thread while `NotifyTeredoPortChange` waits for it: before the handle is
    /// written back.
    #[default]
    BeforeReturn,
    /// On the calling thread, inside `NotifyTeredoPortChange`, before the handle is written
    /// back.
    CallerThread,
    /// On another thread, released once `NotifyTeredoPortChange` has written the handle back
    /// and finished its work: it runs concurrently with the caller's next steps.
    AfterReturn,
    /// On another thread, held until the next `GetTeredoPort` call, which releases it and
    /// waits for it to return before answering (the initial notification arrives while the
    /// driver's seed runs). A client change reaching the registration first releases it too.
    DuringQuery,
}

/// How one initial notification ran, recorded when its callback started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitialRecord {
    /// The registration's handle (the value netio made, even when it wrote back NULL).
    pub handle: usize,
    /// The ordering in force when it registered.
    pub order: InitialDelivery,
    /// `PsGetCurrentThreadId` of the thread that called `NotifyTeredoPortChange`.
    pub caller_thread: usize,
    /// `PsGetCurrentThreadId` of the thread that ran the callback.
    pub callback_thread: usize,
    /// Whether `NotifyTeredoPortChange` had written the handle back when the callback
    /// started.
    pub handle_written: bool,
    /// Whether `NotifyTeredoPortChange` was still working (had not finished) then.
    pub notify_running: bool,
    /// Whether a `GetTeredoPort` call was waiting for this callback then.
    pub during_query: bool,
}

/// Netio call counts and outcomes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetioStats {
    /// Calls: `[NotifyTeredoPortChange, GetTeredoPort, CancelMibChangeNotify2]`.
    pub calls: [u64; 3],
    /// Every handle ever returned by a successful `NotifyTeredoPortChange`.
    pub handles: Vec<usize>,
    /// Handles still registered (not cancelled).
    pub live: Vec<usize>,
    /// Callbacks that ran, over all registrations.
    pub delivered: u64,
    /// Notifications dropped because their handle was cancelled (never reached the image).
    pub dropped_after_cancel: u64,
    /// Cancels called from inside the callback of the same handle, by handle.
    pub self_cancels: Vec<usize>,
    /// Overlapping invocations made ([`invoke_overlapping`]); each is counted in
    /// `delivered` too.
    pub overlapping: u64,
    /// Every initial notification whose callback started, in that order.
    pub initial: Vec<InitialRecord>,
    /// Cancels that waited for the callback in flight and then failed
    /// ([`fail_next_cancel_after_wait`]), by handle.
    pub failed_after_wait: Vec<usize>,
}

#[allow(
    clippy::struct_excessive_bools,
    reason = "independent facts about one registration, each read on its own"
)]
pub(crate) struct Registration {
    callback: usize,
    context: usize,
    cancelled: bool,
    in_flight: Option<usize>,
    /// Overlapping invocations running now (outside the serialization of `in_flight`).
    overlapping: usize,
    /// The initial notification has not run (nor been dropped) yet.
    initial_pending: bool,
    /// The initial notification's thread waits for a release ([`InitialDelivery`]).
    initial_held: bool,
    order: InitialDelivery,
    caller_thread: usize,
    handle_written: bool,
    notify_running: bool,
}

impl Registration {
    /// No invocation of this registration runs now.
    fn idle(&self) -> bool {
        self.in_flight.is_none() && self.overlapping == 0
    }
}

/// The netio calls whose next result can be forced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetioCall {
    /// `NotifyTeredoPortChange`.
    Notify = 0,
    /// `GetTeredoPort`.
    GetPort = 1,
    /// `CancelMibChangeNotify2`.
    Cancel = 2,
}

pub(crate) struct Netio {
    registrations: BTreeMap<usize, Registration>,
    next_handle: usize,
    running: Option<u16>,
    next_port: u16,
    ipv6: bool,
    callback_irql: u8,
    faults: [VecDeque<i32>; 3],
    initial_delivery: InitialDelivery,
    null_handles: usize,
    query_ports: VecDeque<u16>,
    cancel_after_wait: VecDeque<i32>,
    /// `GetTeredoPort` calls waiting for initial notifications they released.
    queries_waiting: usize,
    /// [`overlap_inside_next_callback`]'s `(port, kind)`, armed.
    overlap_hook: Option<(u16, i32)>,
    stats: NetioStats,
    /// Client changes are numbered when they happen and delivered in that order.
    next_change: u64,
    delivering_change: u64,
}

impl Default for Netio {
    fn default() -> Self {
        Netio {
            registrations: BTreeMap::new(),
            next_handle: 0xFFFF_A000_0000_1000,
            running: None,
            next_port: 49_152,
            ipv6: true,
            callback_irql: PASSIVE_LEVEL,
            faults: Default::default(),
            initial_delivery: InitialDelivery::BeforeReturn,
            null_handles: 0,
            query_ports: VecDeque::new(),
            cancel_after_wait: VecDeque::new(),
            queries_waiting: 0,
            overlap_hook: None,
            stats: NetioStats::default(),
            next_change: 0,
            delivering_change: 0,
        }
    }
}

/// The caller context netio keeps for each registration not cancelled, as
/// `(handle, context)` by handle: what a notification would be delivered with.
#[must_use]
pub fn live_contexts() -> Vec<(usize, usize)> {
    lock()
        .netio
        .registrations
        .iter()
        .filter(|(_, r)| !r.cancelled)
        .map(|(h, r)| (*h, r.context))
        .collect()
}

/// Netio accounting now.
#[must_use]
pub fn netio_stats() -> NetioStats {
    let state = lock();
    let mut netio = state.netio.stats.clone();
    netio.live = state
        .netio
        .registrations
        .iter()
        .filter(|(_, r)| !r.cancelled)
        .map(|(h, _)| *h)
        .collect();
    netio
}

/// Makes the next call of `call` return `status` (queued; several may be set).
pub fn fail_next(call: NetioCall, status: i32) {
    lock().netio.faults[call as usize].push_back(status);
}

/// Chooses when the initial notification of the next registrations is delivered (see
/// [`InitialDelivery`]; [`InitialDelivery::BeforeReturn`] after a reset).
pub fn set_initial_delivery(order: InitialDelivery) {
    lock().netio.initial_delivery = order;
}

/// Makes the next `NotifyTeredoPortChange` register the callback (it stays registered and
/// is notified like any other, initial notification included) but write back a NULL handle
/// and return `STATUS_SUCCESS`: a registration nobody can cancel. Queued.
pub fn notify_null_handle_next() {
    lock().netio.null_handles += 1;
}

/// Makes the next `GetTeredoPort` succeed with `port` whatever the client does (0 allowed:
/// a success that reports no port). Queued; an injected [`fail_next`] status comes first.
pub fn query_returns_next(port: u16) {
    lock().netio.query_ports.push_back(port);
}

/// Makes the next `CancelMibChangeNotify2` of a live handle wait for a callback of it in
/// flight, as a successful cancel does, and then fail with `status`, leaving the
/// registration live (it keeps being notified). Queued.
pub fn fail_next_cancel_after_wait(status: i32) {
    lock().netio.cancel_after_wait.push_back(status);
}

/// Fault injection for an overlapping invocation: the next time the driver prints from
/// inside one of its notification callbacks, the model invokes the callback of that same
/// registration with `(port, kind)` on another thread ([`invoke_overlapping`]) and waits for
/// it to return before `DbgPrint` returns, so the two invocations run at once.
pub fn overlap_inside_next_callback(port: u16, kind: i32) {
    lock().netio.overlap_hook = Some((port, kind));
}

/// Breaks the API's contract on purpose: invokes the callback of `handle` now on the
/// calling thread, at the configured callback IRQL, even while another invocation of it is
/// in flight. A cancel waits for it as for any invocation. Returns
/// [`Delivery::Dropped`] (and calls nothing) when the handle is not live.
pub fn invoke_overlapping(handle: usize, port: u16, kind: i32) -> Delivery {
    let (callback, context, irql) = {
        let mut state = halt_if_stopped(lock());
        let irql = state.netio.callback_irql;
        let Some(reg) = state
            .netio
            .registrations
            .get_mut(&handle)
            .filter(|r| !r.cancelled)
        else {
            return Delivery::Dropped;
        };
        reg.overlapping += 1;
        let taken = (reg.callback, reg.context, irql);
        state.netio.stats.overlapping += 1;
        taken
    };
    // SAFETY: as in `deliver`: the image's registered callback and context, the
    // registration is live (a cancel waits for `overlapping` to drop to 0, so the image
    // stays mapped meanwhile); the overlap with another invocation is what this function
    // exists for (the driver must survive it), not a memory-safety question for the host.
    unsafe { run_callback(handle, callback, context, irql, port, kind) };
    let mut state = lock();
    if let Some(reg) = state.netio.registrations.get_mut(&handle) {
        reg.overlapping -= 1;
    }
    state.netio.stats.delivered += 1;
    CHANGED.notify_all();
    Delivery::Delivered
}

/// Runs the overlap armed by [`overlap_inside_next_callback`], if any, from `DbgPrint`
/// inside a callback of this thread.
pub(crate) fn run_overlap_hook() {
    let handle = CALLBACK_HANDLE.with(Cell::get);
    if handle == 0 {
        return;
    }
    let Some((port, kind)) = lock().netio.overlap_hook.take() else {
        return;
    };
    super::note(&format!(
        "fault injection: an overlapping invocation of handle {handle:#x} (port {port}, type \
         {kind}) on another thread, while this callback runs"
    ));
    let irql = current_irql();
    let other = std::thread::Builder::new()
        .name("netio-overlap".into())
        .spawn(move || {
            set_irql(irql);
            invoke_overlapping(handle, port, kind)
        });
    if let Ok(other) = other {
        while !other.is_finished() {
            drop(halt_if_stopped(lock()));
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = other.join();
    }
}

/// Waits until no initial notification is pending on a live registration, at most
/// `timeout` (with [`InitialDelivery::AfterReturn`] it may still run after
/// `NotifyTeredoPortChange` returned; one held for `GetTeredoPort` waits for that call).
/// Returns whether none is pending.
#[must_use = "false: an initial notification is still pending"]
pub fn wait_for_initial_notifications(timeout: Duration) -> bool {
    let start = std::time::Instant::now();
    let mut state = lock();
    loop {
        let pending = state
            .netio
            .registrations
            .values()
            .any(|r| !r.cancelled && r.initial_pending);
        if !pending {
            return true;
        }
        if state.bugcheck.is_some() || start.elapsed() > timeout {
            return false;
        }
        state = wait(state);
    }
}

/// Sets whether an IPv6 stack is present.
pub fn set_ipv6(present: bool) {
    lock().netio.ipv6 = present;
}

/// Sets the IRQL callbacks run at (`<= DISPATCH_LEVEL`, as documented).
///
/// # Panics
///
/// Above `DISPATCH_LEVEL`.
pub fn set_callback_irql(irql: u8) {
    assert!(irql <= DISPATCH_LEVEL, "callbacks run at <= DISPATCH_LEVEL");
    lock().netio.callback_irql = irql;
}

/// What happened to one notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The callback ran.
    Delivered,
    /// The handle was cancelled (or never existed): the callback did not run.
    Dropped,
}

/// Delivers one notification to `handle` on the calling thread, serialized with every
/// other delivery to the same handle (and after its initial notification), at the
/// configured callback IRQL.
///
/// # Panics
///
/// If called from inside a callback of the same handle (the model never does that).
#[allow(
    clippy::must_use_candidate,
    reason = "a notification whose outcome the caller does not need is common"
)]
pub fn deliver(handle: usize, port: u16, kind: i32) -> Delivery {
    deliver_as(handle, port, kind, false)
}

/// [`deliver`]; `initial` marks the registration's initial notification, which is recorded
/// ([`InitialRecord`]) and may run before the handle is written back.
fn deliver_as(handle: usize, port: u16, kind: i32, initial: bool) -> Delivery {
    let me = thread_id();
    let mut state = lock();
    let (callback, context, irql) = loop {
        state = halt_if_stopped(state);
        let callback_irql = state.netio.callback_irql;
        let during_query = state.netio.queries_waiting > 0;
        let Some(reg) = state.netio.registrations.get_mut(&handle) else {
            state.netio.stats.dropped_after_cancel += 1;
            return Delivery::Dropped;
        };
        if reg.cancelled {
            if initial {
                reg.initial_pending = false;
                CHANGED.notify_all();
            }
            state.netio.stats.dropped_after_cancel += 1;
            return Delivery::Dropped;
        }
        if !initial && reg.initial_pending {
            // The initial notification comes first; one held for `GetTeredoPort` is
            // released by this notification instead.
            if reg.order == InitialDelivery::DuringQuery && reg.handle_written {
                reg.initial_held = false;
                CHANGED.notify_all();
            }
            state = wait(state);
            continue;
        }
        match reg.in_flight {
            None => {
                reg.in_flight = Some(me);
                let taken = (reg.callback, reg.context, callback_irql);
                if initial {
                    let record = InitialRecord {
                        handle,
                        order: reg.order,
                        caller_thread: reg.caller_thread,
                        callback_thread: me,
                        handle_written: reg.handle_written,
                        notify_running: reg.notify_running,
                        during_query,
                    };
                    state.netio.stats.initial.push(record);
                }
                break taken;
            }
            Some(owner) => {
                assert_ne!(owner, me, "the model never nests deliveries on one thread");
                state = wait(state);
            }
        }
    };
    drop(state);

    // SAFETY: `callback` is the function pointer the image registered with
    // `NotifyTeredoPortChange` (PTEREDO_PORT_CHANGE_CALLBACK, an NTAPI function of the
    // mapped image) and `context` its caller context; the registration is live and this
    // thread is its only serialized delivery in flight (`in_flight`, taken above); a cancel
    // waits for `in_flight` to clear, so the image stays mapped until the call returns.
    unsafe { run_callback(handle, callback, context, irql, port, kind) };

    let mut state = lock();
    if let Some(reg) = state.netio.registrations.get_mut(&handle) {
        reg.in_flight = None;
        if initial {
            reg.initial_pending = false;
        }
    }
    state.netio.stats.delivered += 1;
    CHANGED.notify_all();
    Delivery::Delivered
}

/// Calls `callback(context, port, kind)` at `irql` on this thread, marked as inside a
/// callback of `handle`, and stops the machine if it returns at another IRQL.
///
/// # Safety
///
/// `callback` is a `PTEREDO_PORT_CHANGE_CALLBACK` of the mapped image that may be called
/// with `context` now, and stays mapped until it returns.
unsafe fn run_callback(
    handle: usize,
    callback: usize,
    context: usize,
    irql: u8,
    port: u16,
    kind: i32,
) {
    let before = current_irql();
    let outer = (IN_CALLBACK.with(Cell::get), CALLBACK_HANDLE.with(Cell::get));
    set_irql(irql);
    IN_CALLBACK.with(|c| c.set(true));
    CALLBACK_HANDLE.with(|c| c.set(handle));
    // SAFETY: a `PTEREDO_PORT_CHANGE_CALLBACK` is `VOID NTAPI (PVOID, USHORT,
    // MIB_NOTIFICATION_TYPE)`, the Windows x64 convention of `extern "win64"`; callable now
    // (this function's contract).
    let callback: extern "win64" fn(*mut c_void, u16, i32) =
        unsafe { std::mem::transmute::<usize, extern "win64" fn(*mut c_void, u16, i32)>(callback) };
    callback(core::ptr::with_exposed_provenance_mut(context), port, kind);
    IN_CALLBACK.with(|c| c.set(outer.0));
    CALLBACK_HANDLE.with(|c| c.set(outer.1));
    let after = current_irql();
    if after != irql {
        bugcheck(
            IRQL_UNEXPECTED_VALUE,
            [usize::from(after), usize::from(irql), 0, handle],
            format!(
                "the callback of handle {handle:#x} returned at IRQL {after}, called at {irql}"
            ),
        );
    }
    set_irql(before);
}

/// Controls the modelled Teredo client. Each change notifies every live registration, on
/// the calling thread.
pub mod client {
    use super::{Delivery, deliver, lock};
    use crate::kernel::{MIB_ADD_INSTANCE, MIB_DELETE_INSTANCE, MIB_PARAMETER_NOTIFICATION};

    fn next_port(state: &mut super::super::State) -> u16 {
        let port = state.netio.next_port;
        state.netio.next_port = if port >= 65_000 { 49_152 } else { port + 7 };
        port
    }

    /// Delivers change number `change` to every live registration, after every earlier
    /// change was delivered (changes made on several threads reach a callback in the order
    /// they happened, one at a time).
    fn broadcast(change: u64, port: u16, kind: i32) -> usize {
        let mut state = lock();
        while state.netio.delivering_change != change {
            state = super::halt_if_stopped(super::wait(state));
        }
        let handles: Vec<usize> = state
            .netio
            .registrations
            .iter()
            .filter(|(_, r)| !r.cancelled)
            .map(|(h, _)| *h)
            .collect();
        drop(state);
        let delivered = handles
            .into_iter()
            .filter(|h| deliver(*h, port, kind) == Delivery::Delivered)
            .count();
        lock().netio.delivering_change += 1;
        super::CHANGED.notify_all();
        delivered
    }

    fn take_change(state: &mut super::super::State) -> u64 {
        let change = state.netio.next_change;
        state.netio.next_change += 1;
        change
    }

    /// Starts (or restarts) the client on a new port; returns it.
    #[must_use = "the new port"]
    pub fn start() -> u16 {
        let (change, port, kind) = {
            let mut state = lock();
            let kind = if state.netio.running.is_some() {
                MIB_PARAMETER_NOTIFICATION
            } else {
                MIB_ADD_INSTANCE
            };
            let port = next_port(&mut state);
            state.netio.running = Some(port);
            (take_change(&mut state), port, kind)
        };
        broadcast(change, port, kind);
        port
    }

    /// Stops the client (`MibDeleteInstance` with the port it had).
    pub fn stop() {
        let stopped = {
            let mut state = lock();
            state
                .netio
                .running
                .take()
                .map(|port| (take_change(&mut state), port))
        };
        if let Some((change, port)) = stopped {
            broadcast(change, port, MIB_DELETE_INSTANCE);
        }
    }

    /// Sets what `GetTeredoPort` answers (the client running on `port`, or stopped) without
    /// notifying anyone: a client already running when a driver registers.
    pub fn set_port_quietly(port: Option<u16>) {
        lock().netio.running = port;
    }

    /// The port the client runs on.
    #[must_use]
    pub fn port() -> Option<u16> {
        lock().netio.running
    }
}

// ---------------------------------------------------------------------------------------
// ntoskrnl.exe
// ---------------------------------------------------------------------------------------

pub(crate) fn check_netio_irql(call: &str, max: u8) {
    let irql = current_irql();
    if irql > max {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [0, usize::from(irql), 0, 0],
            format!("{call} at IRQL {irql}; the documentation requires IRQL <= {max}"),
        );
    }
}

pub(crate) fn injected(call: NetioCall) -> Option<i32> {
    let mut state = halt_if_stopped(lock());
    state.netio.stats.calls[call as usize] += 1;
    state.netio.faults[call as usize].pop_front()
}

/// # Safety
///
/// `handle` is valid for a write (`NotifyTeredoPortChange`'s contract); `callback` stays
/// callable with `context` until a cancel of the handle succeeds.
pub(crate) unsafe extern "win64" fn notify_teredo_port_change(
    callback: usize,
    context: *mut c_void,
    initial_notification: u8,
    handle: *mut usize,
) -> i32 {
    check_netio_irql("NotifyTeredoPortChange", APC_LEVEL);
    if let Some(status) = injected(NetioCall::Notify) {
        return status;
    }
    if callback == 0 || handle.is_null() {
        return ERROR_INVALID_PARAMETER;
    }
    let initial = initial_notification != 0;
    let me = thread_id();
    let (id, order, null_handle) = {
        let mut state = lock();
        let id = state.netio.next_handle;
        state.netio.next_handle += 0x40;
        let order = state.netio.initial_delivery;
        let null_handle = state.netio.null_handles > 0;
        if null_handle {
            state.netio.null_handles -= 1;
        }
        state.netio.registrations.insert(
            id,
            Registration {
                callback,
                context: context.expose_provenance(),
                cancelled: false,
                in_flight: None,
                overlapping: 0,
                initial_pending: initial,
                initial_held: initial
                    && matches!(
                        order,
                        InitialDelivery::AfterReturn | InitialDelivery::DuringQuery
                    ),
                order,
                caller_thread: me,
                handle_written: false,
                notify_running: true,
            },
        );
        state.netio.stats.handles.push(id);
        (id, order, null_handle)
    };
    if initial {
        if order == InitialDelivery::CallerThread {
            deliver_as(id, 0, MIB_INITIAL_NOTIFICATION, true);
        } else {
            let worker = std::thread::Builder::new()
                .name("netio-initial".into())
                .spawn(move || initial_worker(id));
            if worker.is_err() {
                lock().netio.registrations.remove(&id);
                return 0xC000_009A_u32.cast_signed();
            }
            if order == InitialDelivery::BeforeReturn {
                // Before the handle is written back, as the documentation allows: the
                // caller's context must be complete before it registers.
                let mut state = lock();
                loop {
                    state = halt_if_stopped(state);
                    if state
                        .netio
                        .registrations
                        .get(&id)
                        .is_none_or(|r| !r.initial_pending)
                    {
                        break;
                    }
                    state = wait(state);
                }
            }
        }
    }
    let written = if null_handle { 0 } else { id };
    // SAFETY: valid for a write (this function's contract).
    unsafe { handle.write(written) };
    let mut state = lock();
    if let Some(reg) = state.netio.registrations.get_mut(&id) {
        reg.handle_written = true;
        reg.notify_running = false;
        if order == InitialDelivery::AfterReturn {
            reg.initial_held = false;
        }
    }
    CHANGED.notify_all();
    STATUS_SUCCESS
}

/// The thread of an initial notification not delivered on the caller's thread: waits for
/// its release ([`InitialDelivery`]), then delivers it (dropped if cancelled meanwhile).
fn initial_worker(handle: usize) -> Delivery {
    let mut state = lock();
    loop {
        state = halt_if_stopped(state);
        match state.netio.registrations.get(&handle) {
            Some(reg) if reg.initial_held && !reg.cancelled => state = wait(state),
            _ => break,
        }
    }
    drop(state);
    deliver_as(handle, 0, MIB_INITIAL_NOTIFICATION, true)
}

/// # Safety
///
/// `port` is valid for a write (`GetTeredoPort`'s contract).
pub(crate) unsafe extern "win64" fn get_teredo_port(port: *mut u16) -> i32 {
    check_netio_irql("GetTeredoPort", APC_LEVEL);
    release_initials_for_query();
    if let Some(status) = injected(NetioCall::GetPort) {
        return status;
    }
    if port.is_null() {
        return ERROR_INVALID_PARAMETER;
    }
    let mut state = lock();
    if let Some(forced) = state.netio.query_ports.pop_front() {
        // SAFETY: valid for a write (this function's contract).
        unsafe { port.write(forced) };
        return STATUS_SUCCESS;
    }
    if !state.netio.ipv6 {
        return STATUS_NOT_SUPPORTED;
    }
    let Some(running) = state.netio.running else {
        return ERROR_NOT_READY;
    };
    drop(state);
    // SAFETY: valid for a write (this function's contract).
    unsafe { port.write(running) };
    STATUS_SUCCESS
}

/// [`InitialDelivery::DuringQuery`]: releases every initial notification held for a
/// `GetTeredoPort` call and waits for each to return (not for one this thread runs: a
/// `GetTeredoPort` from inside that callback answers at once).
fn release_initials_for_query() {
    let me = thread_id();
    let mut state = lock();
    let released: Vec<usize> = state
        .netio
        .registrations
        .iter_mut()
        .filter(|(_, r)| r.initial_held && r.order == InitialDelivery::DuringQuery && !r.cancelled)
        .map(|(h, r)| {
            r.initial_held = false;
            *h
        })
        .collect();
    if released.is_empty() {
        return;
    }
    state.netio.queries_waiting += 1;
    CHANGED.notify_all();
    loop {
        state = halt_if_stopped(state);
        let waiting = released.iter().any(|h| {
            state
                .netio
                .registrations
                .get(h)
                .is_some_and(|r| !r.cancelled && r.initial_pending && r.in_flight != Some(me))
        });
        if !waiting {
            break;
        }
        state = wait(state);
    }
    state.netio.queries_waiting -= 1;
}

pub(crate) extern "win64" fn cancel_mib_change_notify2(handle: usize) -> i32 {
    check_netio_irql("CancelMibChangeNotify2", PASSIVE_LEVEL);
    if let Some(status) = injected(NetioCall::Cancel) {
        return status;
    }
    if handle == 0 {
        return ERROR_INVALID_PARAMETER;
    }
    let me = thread_id();
    let mut state = lock();
    let Some(reg) = state.netio.registrations.get_mut(&handle) else {
        return ERROR_INVALID_HANDLE;
    };
    if reg.cancelled {
        return ERROR_INVALID_HANDLE;
    }
    if reg.in_flight == Some(me) || CALLBACK_HANDLE.with(Cell::get) == handle {
        state.netio.stats.self_cancels.push(handle);
        let line = format!(
            "[netio] CancelMibChangeNotify2({handle:#x}) from inside its own callback: a \
             deadlock on Windows; refused with STATUS_POSSIBLE_DEADLOCK"
        );
        if state.echo {
            println!("{line}");
        }
        state.debugger.push(line);
        return STATUS_POSSIBLE_DEADLOCK;
    }
    let fail_after_wait = state.netio.cancel_after_wait.pop_front();
    if fail_after_wait.is_none()
        && let Some(reg) = state.netio.registrations.get_mut(&handle)
    {
        reg.cancelled = true;
    }
    CHANGED.notify_all();
    // Wait for the invocations in flight: after a successful cancel returns, none runs
    // again.
    loop {
        state = halt_if_stopped(state);
        if state
            .netio
            .registrations
            .get(&handle)
            .is_none_or(Registration::idle)
        {
            break;
        }
        state = wait(state);
    }
    match fail_after_wait {
        Some(status) => {
            state.netio.stats.failed_after_wait.push(handle);
            status
        }
        None => STATUS_SUCCESS,
    }
}
