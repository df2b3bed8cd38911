//! netio.sys: `NotifyTeredoPortChange`, `GetTeredoPort`, `CancelMibChangeNotify2`, and the
//! modelled Teredo client whose changes they report.

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
}

pub(crate) struct Registration {
    callback: usize,
    context: usize,
    cancelled: bool,
    in_flight: Option<usize>,
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
/// other delivery to the same handle, at the configured callback IRQL.
///
/// # Panics
///
/// If called from inside a callback of the same handle (the model never does that).
pub fn deliver(handle: usize, port: u16, kind: i32) -> Delivery {
    let me = thread_id();
    let mut state = lock();
    let (callback, context, irql) = loop {
        state = halt_if_stopped(state);
        let callback_irql = state.netio.callback_irql;
        let Some(reg) = state.netio.registrations.get_mut(&handle) else {
            state.netio.stats.dropped_after_cancel += 1;
            return Delivery::Dropped;
        };
        if reg.cancelled {
            state.netio.stats.dropped_after_cancel += 1;
            return Delivery::Dropped;
        }
        match reg.in_flight {
            None => {
                reg.in_flight = Some(me);
                break (reg.callback, reg.context, callback_irql);
            }
            Some(owner) => {
                assert_ne!(owner, me, "the model never nests deliveries on one thread");
                state = wait(state);
            }
        }
    };
    drop(state);

    let before = current_irql();
    set_irql(irql);
    IN_CALLBACK.with(|c| c.set(true));
    // SAFETY: `callback` is the function pointer the image registered with
    // `NotifyTeredoPortChange` (PTEREDO_PORT_CHANGE_CALLBACK, an NTAPI function of the
    // mapped image) and `context` its caller context; the registration is live and this
    // thread is its only delivery in flight (serialized above); the image stays mapped
    // while a registration is live (the machine retires it only after unload).
    let callback: extern "win64" fn(*mut c_void, u16, i32) =
        unsafe { std::mem::transmute::<usize, extern "win64" fn(*mut c_void, u16, i32)>(callback) };
    callback(core::ptr::with_exposed_provenance_mut(context), port, kind);
    IN_CALLBACK.with(|c| c.set(false));
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

    let mut state = lock();
    if let Some(reg) = state.netio.registrations.get_mut(&handle) {
        reg.in_flight = None;
    }
    state.netio.stats.delivered += 1;
    CHANGED.notify_all();
    Delivery::Delivered
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
    let id = {
        let mut state = lock();
        let id = state.netio.next_handle;
        state.netio.next_handle += 0x40;
        state.netio.registrations.insert(
            id,
            Registration {
                callback,
                context: context.expose_provenance(),
                cancelled: false,
                in_flight: None,
            },
        );
        state.netio.stats.handles.push(id);
        id
    };
    if initial_notification != 0 {
        // On a worker thread, and before the handle is written back, as the documentation
        // allows: the caller's context must be complete before it registers.
        let worker = std::thread::Builder::new()
            .name("netio-initial".into())
            .spawn(move || deliver(id, 0, MIB_INITIAL_NOTIFICATION));
        let Ok(worker) = worker else {
            lock().netio.registrations.remove(&id);
            return 0xC000_009A_u32.cast_signed();
        };
        while !worker.is_finished() {
            drop(halt_if_stopped(lock()));
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = worker.join();
    }
    // SAFETY: valid for a write (this function's contract).
    unsafe { handle.write(id) };
    STATUS_SUCCESS
}

/// # Safety
///
/// `port` is valid for a write (`GetTeredoPort`'s contract).
pub(crate) unsafe extern "win64" fn get_teredo_port(port: *mut u16) -> i32 {
    check_netio_irql("GetTeredoPort", APC_LEVEL);
    if let Some(status) = injected(NetioCall::GetPort) {
        return status;
    }
    if port.is_null() {
        return ERROR_INVALID_PARAMETER;
    }
    let state = lock();
    if !state.netio.ipv6 {
        return STATUS_NOT_SUPPORTED;
    }
    let Some(running) = state.netio.running else {
        return ERROR_NOT_READY;
    };
    // SAFETY: valid for a write (this function's contract).
    unsafe { port.write(running) };
    STATUS_SUCCESS
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
    if reg.in_flight == Some(me) {
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
    reg.cancelled = true;
    CHANGED.notify_all();
    // Wait for a callback in flight: after this returns, it never runs again.
    loop {
        state = halt_if_stopped(state);
        if state
            .netio
            .registrations
            .get(&handle)
            .is_none_or(|r| r.in_flight.is_none())
        {
            return STATUS_SUCCESS;
        }
        state = wait(state);
    }
}
