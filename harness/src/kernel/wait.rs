//! Delays, events and waits: `KeDelayExecutionThread`, `KeInitializeEvent`, `KeSetEvent`,
//! `KeResetEvent`, `KeClearEvent`, `KeReadStateEvent`, `KeWaitForSingleObject`.
//!
//! An event's state lives where the driver put the `KEVENT` (its `SignalState` field),
//! changed atomically and under the model's lock; waiters sleep on the model's condition
//! variable and re-check, so a wait never misses a `KeSetEvent`.

use core::ffi::c_void;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use super::bugcheck::{bugcheck, halt_if_stopped};
use super::irql::current_irql;
use super::{
    APC_LEVEL, CHANGED, DISPATCH_LEVEL, DRIVER_VERIFIER_DETECTED_VIOLATION, IRQL_NOT_LESS_OR_EQUAL,
    STATUS_SUCCESS, STATUS_TIMEOUT, lock, note, wait,
};

/// # Safety
///
/// `interval` is valid for reads (`KeDelayExecutionThread`'s contract).
pub(crate) unsafe extern "win64" fn ke_delay_execution_thread(
    _wait_mode: i8,
    _alertable: u8,
    interval: *mut i64,
) -> i32 {
    let irql = current_irql();
    if irql > APC_LEVEL {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [0, usize::from(irql), 0, 0],
            format!("KeDelayExecutionThread (a wait) at IRQL {irql}"),
        );
    }
    // SAFETY: valid for reads (this function's contract).
    let interval = unsafe { interval.read() };
    drop(halt_if_stopped(lock()));
    if interval < 0 {
        // Relative, in 100 ns units; the model never sleeps longer than a millisecond.
        let nanos = interval.unsigned_abs().saturating_mul(100).min(1_000_000);
        if nanos <= 100 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_nanos(nanos));
        }
    } else {
        std::thread::yield_now();
    }
    STATUS_SUCCESS
}

/// `KEVENT`: its dispatcher header, as far as the model uses it.
#[repr(C)]
struct Kevent {
    kind: u8,
    signalling: u8,
    /// In 32-bit words.
    size: u8,
    reserved: u8,
    signal_state: i32,
    wait_list_head: [usize; 2],
}
/// `NotificationEvent`: stays signalled until reset; wakes every waiter.
const NOTIFICATION_EVENT: u8 = 0;
/// `SynchronizationEvent`: a satisfied wait resets it; wakes one waiter.
const SYNCHRONIZATION_EVENT: u8 = 1;

/// `SignalState` of the `KEVENT` at `event`, as an atomic.
///
/// # Safety
///
/// `event` points to a `KEVENT` initialised with `KeInitializeEvent`, alive while the
/// reference is used, whose `SignalState` is only accessed through the model.
unsafe fn signal_state<'a>(event: *mut c_void) -> &'a AtomicI32 {
    let event = event.cast::<Kevent>();
    // SAFETY: a valid, aligned `KEVENT` (this function's contract), so its `SignalState` is
    // an aligned `i32`; only the model touches it, atomically.
    unsafe { AtomicI32::from_ptr(&raw mut (*event).signal_state) }
}

fn check_event_irql(routine: &str, event: *mut c_void) {
    let irql = current_irql();
    if irql > DISPATCH_LEVEL {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [event.addr(), usize::from(irql), 0, 0],
            format!("{routine} at IRQL {irql}; it requires IRQL <= DISPATCH_LEVEL"),
        );
    }
}

/// # Safety
///
/// `event` is valid for writes of a `KEVENT` (`KeInitializeEvent`'s contract).
pub(crate) unsafe extern "win64" fn ke_initialize_event(event: *mut c_void, kind: i32, state: u8) {
    let Ok(kind @ (NOTIFICATION_EVENT | SYNCHRONIZATION_EVENT)) = u8::try_from(kind) else {
        bugcheck(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [0, event.addr(), 0, 0],
            format!(
                "KeInitializeEvent with event type {kind}: neither NotificationEvent nor SynchronizationEvent"
            ),
        );
    };
    let event = event.cast::<Kevent>();
    // SAFETY: valid for writes of a `KEVENT` (this function's contract); the driver does
    // not use the event while initialising it. The empty wait list points to itself.
    unsafe {
        let list = (&raw mut (*event).wait_list_head).addr();
        event.write(Kevent {
            kind,
            signalling: 0,
            size: 6,
            reserved: 0,
            signal_state: i32::from(state != 0),
            wait_list_head: [list, list],
        });
    }
}

/// # Safety
///
/// `event` is an initialised `KEVENT` (`KeSetEvent`'s contract).
pub(crate) unsafe extern "win64" fn ke_set_event(
    event: *mut c_void,
    _increment: i32,
    _wait: u8,
) -> i32 {
    check_event_irql("KeSetEvent", event);
    let state = halt_if_stopped(lock());
    // SAFETY: an initialised `KEVENT` (this function's contract).
    let previous = unsafe { signal_state(event) }.swap(1, Ordering::AcqRel);
    // Under the model's lock: a waiter checks the state under it and then waits on the
    // condition variable, so this wake-up cannot fall between its check and its wait.
    CHANGED.notify_all();
    drop(state);
    previous
}

/// # Safety
///
/// `event` is an initialised `KEVENT` (`KeResetEvent`'s contract).
pub(crate) unsafe extern "win64" fn ke_reset_event(event: *mut c_void) -> i32 {
    check_event_irql("KeResetEvent", event);
    // SAFETY: an initialised `KEVENT` (this function's contract).
    unsafe { signal_state(event) }.swap(0, Ordering::AcqRel)
}

/// # Safety
///
/// `event` is an initialised `KEVENT` (`KeClearEvent`'s contract).
pub(crate) unsafe extern "win64" fn ke_clear_event(event: *mut c_void) {
    check_event_irql("KeClearEvent", event);
    // SAFETY: an initialised `KEVENT` (this function's contract).
    unsafe { signal_state(event) }.store(0, Ordering::Release);
}

/// # Safety
///
/// `event` is an initialised `KEVENT` (`KeReadStateEvent`'s contract).
pub(crate) unsafe extern "win64" fn ke_read_state_event(event: *mut c_void) -> i32 {
    check_event_irql("KeReadStateEvent", event);
    // SAFETY: an initialised `KEVENT` (this function's contract).
    unsafe { signal_state(event) }.load(Ordering::Acquire)
}

/// `KeWaitForSingleObject(Object, WaitReason, WaitMode, Alertable, Timeout)` on an event:
/// at `<= APC_LEVEL`, or at `DISPATCH_LEVEL` with a zero timeout (a poll); anything else
/// bugchecks `IRQL_NOT_LESS_OR_EQUAL`. Other dispatcher objects (mutexes, semaphores,
/// timers, threads) are not modelled and stop the machine with a reason saying so. An
/// absolute timeout is treated as already expired (the model has no system clock).
///
/// # Safety
///
/// `object` is an initialised `KEVENT`; `timeout` is NULL or valid for reads
/// (`KeWaitForSingleObject`'s contract).
pub(crate) unsafe extern "win64" fn ke_wait_for_single_object(
    object: *mut c_void,
    _wait_reason: i32,
    _wait_mode: i8,
    _alertable: u8,
    timeout: *const i64,
) -> i32 {
    let irql = current_irql();
    // SAFETY: NULL or valid for reads (this function's contract).
    let timeout = (!timeout.is_null()).then(|| unsafe { timeout.read() });
    if irql > DISPATCH_LEVEL || (irql == DISPATCH_LEVEL && timeout != Some(0)) {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [object.addr(), usize::from(irql), 0, 0],
            format!(
                "KeWaitForSingleObject at IRQL {irql} with timeout {timeout:?}; it requires \
                 IRQL <= APC_LEVEL, or DISPATCH_LEVEL with a zero timeout"
            ),
        );
    }
    // SAFETY: an initialised dispatcher object (this function's contract): its first byte
    // is its type.
    let kind = unsafe { object.cast::<u8>().read() };
    if kind != NOTIFICATION_EVENT && kind != SYNCHRONIZATION_EVENT {
        bugcheck(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [0, object.addr(), usize::from(kind), 0],
            format!(
                "KeWaitForSingleObject on a dispatcher object of type {kind}: only events are \
                 modelled"
            ),
        );
    }
    let now = Instant::now();
    let deadline = match timeout {
        None => None,
        Some(relative @ ..0) => {
            Some(now + Duration::from_nanos(relative.unsigned_abs().saturating_mul(100)))
        }
        Some(0) => Some(now),
        Some(_) => {
            note("KeWaitForSingleObject: an absolute timeout is treated as expired");
            Some(now)
        }
    };
    // SAFETY: an initialised `KEVENT` (this function's contract).
    let signal = unsafe { signal_state(object) };
    let mut state = lock();
    loop {
        state = halt_if_stopped(state);
        let satisfied = if kind == SYNCHRONIZATION_EVENT {
            signal
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                    (v > 0).then_some(0)
                })
                .is_ok()
        } else {
            signal.load(Ordering::Acquire) > 0
        };
        if satisfied {
            return STATUS_SUCCESS;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return STATUS_TIMEOUT;
        }
        state = wait(state);
    }
}
