//! The netio model produces every ordering and fault the documentation allows (and the
//! overlapping invocation it forbids), proven from both sides: the model's own record of
//! each initial notification ([`kernel::InitialRecord`]) and what a test callback saw when
//! it ran (its thread, the handle out-parameter's value, gates the test opened).
#![cfg(all(target_arch = "x86_64", unix))]

use core::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use teredo_harness::kernel::{self, Delivery, InitialDelivery, PASSIVE_LEVEL};
use teredo_harness::{Machine, sysbuild};

fn boot() -> Machine {
    let sys = sysbuild::sys_image().unwrap_or_else(|e| panic!("the .sys must build: {e}"));
    Machine::boot(sys, false).unwrap_or_else(|e| panic!("the .sys must load: {e}"))
}

type Callback = extern "win64" fn(*mut c_void, u16, i32);
type Notify = extern "win64" fn(Callback, *mut c_void, u8, *mut usize) -> i32;
type GetPort = extern "win64" fn(*mut u16) -> i32;
type Cancel = extern "win64" fn(usize) -> i32;

fn host<T>(module: &str, name: &str) -> T {
    let address = kernel::resolve(module, name).expect("modelled");
    assert_eq!(size_of::<T>(), size_of::<usize>());
    // SAFETY: every use below names `T` as the function pointer type of the documented
    // signature of `module!name`, which is the signature of the model's function.
    unsafe { std::mem::transmute_copy::<usize, T>(&address) }
}

/// What the test callback saw. Leaked: netio may call it until the end of the process.
#[derive(Default)]
struct Probe {
    /// `NotifyTeredoPortChange`'s handle out-parameter.
    slot: AtomicUsize,
    /// Invocations that returned.
    calls: AtomicUsize,
    /// Invocations running now, and the most at once.
    running: AtomicUsize,
    max_running: AtomicUsize,
    /// The initial notification's thread (`PsGetCurrentThreadId`) and the slot's value then.
    initial_thread: AtomicUsize,
    slot_at_initial: AtomicUsize,
    /// Set by the test while it is inside a `GetTeredoPort` call.
    in_query: AtomicBool,
    query_seen_by_initial: AtomicBool,
    /// While `blocking`, each invocation waits (at most 5 s) for `gate`, and records
    /// whether it opened.
    blocking: AtomicBool,
    gate: AtomicBool,
    gate_was_open: AtomicBool,
    /// The test is blocked on the gate in an invocation now.
    waiting_at_gate: AtomicBool,
}

extern "win64" fn probe(context: *mut c_void, _port: u16, kind: i32) {
    // SAFETY: every registration of this file passes a leaked `Probe` as its context.
    let probe = unsafe { &*context.cast::<Probe>() };
    let now = probe.running.fetch_add(1, Ordering::SeqCst) + 1;
    probe.max_running.fetch_max(now, Ordering::SeqCst);
    if kind == kernel::MIB_INITIAL_NOTIFICATION {
        probe
            .initial_thread
            .store(kernel::thread_id(), Ordering::SeqCst);
        probe
            .slot_at_initial
            .store(probe.slot.load(Ordering::SeqCst), Ordering::SeqCst);
        probe
            .query_seen_by_initial
            .store(probe.in_query.load(Ordering::SeqCst), Ordering::SeqCst);
    }
    if probe.blocking.load(Ordering::SeqCst) {
        probe.waiting_at_gate.store(true, Ordering::SeqCst);
        let start = Instant::now();
        while !probe.gate.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        probe
            .gate_was_open
            .store(probe.gate.load(Ordering::SeqCst), Ordering::SeqCst);
        probe.waiting_at_gate.store(false, Ordering::SeqCst);
    }
    probe.running.fetch_sub(1, Ordering::SeqCst);
    probe.calls.fetch_add(1, Ordering::SeqCst);
}

fn new_probe() -> &'static Probe {
    Box::leak(Box::default())
}

fn context(probe: &'static Probe) -> *mut c_void {
    core::ptr::with_exposed_provenance_mut(std::ptr::from_ref(probe).expose_provenance())
}

/// `NotifyTeredoPortChange(probe, probe, initial, &probe.slot)` on this thread.
fn register(target: &'static Probe, initial: bool) -> i32 {
    let notify: Notify = host("netio.sys", "NotifyTeredoPortChange");
    notify(
        probe as Callback,
        context(target),
        u8::from(initial),
        target.slot.as_ptr(),
    )
}

fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn only_record() -> kernel::InitialRecord {
    let records = kernel::netio_stats().initial;
    assert_eq!(records.len(), 1, "one initial notification: {records:?}");
    records[0]
}

#[test]
fn caller_thread_runs_the_initial_notification_inside_notify_before_the_handle_is_written() {
    let _machine = boot();
    kernel::set_initial_delivery(InitialDelivery::CallerThread);
    let probe = new_probe();
    assert_eq!(register(probe, true), kernel::STATUS_SUCCESS);
    let handle = probe.slot.load(Ordering::SeqCst);
    assert_ne!(handle, 0);
    assert_eq!(
        probe.calls.load(Ordering::SeqCst),
        1,
        "ran before notify returned"
    );
    assert_eq!(
        probe.initial_thread.load(Ordering::SeqCst),
        kernel::thread_id()
    );
    assert_eq!(
        probe.slot_at_initial.load(Ordering::SeqCst),
        0,
        "handle not written yet"
    );
    let record = only_record();
    assert_eq!(record.order, InitialDelivery::CallerThread);
    assert_eq!(record.handle, handle);
    assert_eq!(record.callback_thread, record.caller_thread);
    assert_eq!(record.caller_thread, kernel::thread_id());
    assert!(!record.handle_written && record.notify_running && !record.during_query);
}

#[test]
fn before_return_runs_it_on_another_thread_while_notify_waits() {
    let _machine = boot();
    kernel::set_initial_delivery(InitialDelivery::BeforeReturn);
    let probe = new_probe();
    assert_eq!(register(probe, true), kernel::STATUS_SUCCESS);
    assert_eq!(
        probe.calls.load(Ordering::SeqCst),
        1,
        "notify waited for it"
    );
    let me = kernel::thread_id();
    assert_ne!(probe.initial_thread.load(Ordering::SeqCst), me);
    assert_eq!(probe.slot_at_initial.load(Ordering::SeqCst), 0);
    let record = only_record();
    assert_eq!(record.order, InitialDelivery::BeforeReturn);
    assert_eq!(record.caller_thread, me);
    assert_ne!(record.callback_thread, me);
    assert!(!record.handle_written && record.notify_running && !record.during_query);
}

#[test]
fn after_return_runs_it_on_another_thread_concurrently_with_the_callers_next_steps() {
    let _machine = boot();
    kernel::set_initial_delivery(InitialDelivery::AfterReturn);
    let probe = new_probe();
    // The callback blocks until the test opens the gate, which it does only after notify
    // returned: had notify waited for the callback, the gate would have been shut for 5 s.
    probe.blocking.store(true, Ordering::SeqCst);
    assert_eq!(register(probe, true), kernel::STATUS_SUCCESS);
    let handle = probe.slot.load(Ordering::SeqCst);
    assert_eq!(
        probe.calls.load(Ordering::SeqCst),
        0,
        "not finished when notify returned"
    );
    // The caller's next step runs while the callback is in flight.
    wait_until("the initial callback to start", || {
        probe.waiting_at_gate.load(Ordering::SeqCst)
    });
    probe.gate.store(true, Ordering::SeqCst);
    assert!(kernel::wait_for_initial_notifications(Duration::from_secs(
        5
    )));
    assert!(probe.gate_was_open.load(Ordering::SeqCst));
    assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
    assert_ne!(
        probe.initial_thread.load(Ordering::SeqCst),
        kernel::thread_id()
    );
    assert_eq!(
        probe.slot_at_initial.load(Ordering::SeqCst),
        handle,
        "handle written first"
    );
    let record = only_record();
    assert_eq!(record.order, InitialDelivery::AfterReturn);
    assert_ne!(record.callback_thread, record.caller_thread);
    assert!(record.handle_written && !record.notify_running && !record.during_query);
}

#[test]
fn during_query_holds_it_until_get_teredo_port_which_waits_for_it() {
    let machine = boot();
    ok_start(&machine);
    kernel::set_initial_delivery(InitialDelivery::DuringQuery);
    let probe = new_probe();
    assert_eq!(register(probe, true), kernel::STATUS_SUCCESS);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        probe.calls.load(Ordering::SeqCst),
        0,
        "held until GetTeredoPort"
    );
    assert!(!kernel::wait_for_initial_notifications(
        Duration::from_millis(20)
    ));
    let get: GetPort = host("netio.sys", "GetTeredoPort");
    let mut port = 0u16;
    probe.in_query.store(true, Ordering::SeqCst);
    let status = get(&raw mut port);
    probe.in_query.store(false, Ordering::SeqCst);
    assert_eq!(status, kernel::STATUS_SUCCESS);
    assert_eq!(Some(port), kernel::client::port());
    assert_eq!(
        probe.calls.load(Ordering::SeqCst),
        1,
        "GetTeredoPort waited for it"
    );
    assert!(probe.query_seen_by_initial.load(Ordering::SeqCst));
    let record = only_record();
    assert_eq!(record.order, InitialDelivery::DuringQuery);
    assert_ne!(record.callback_thread, record.caller_thread);
    assert!(record.handle_written && !record.notify_running && record.during_query);
}

fn ok_start(machine: &Machine) -> u16 {
    machine
        .on_cpu("client start", PASSIVE_LEVEL, kernel::client::start)
        .expect("no stop")
}

#[test]
fn a_client_change_waits_for_a_pending_initial_notification_and_comes_after_it() {
    let machine = boot();
    kernel::set_initial_delivery(InitialDelivery::DuringQuery);
    let probe = new_probe();
    assert_eq!(register(probe, true), kernel::STATUS_SUCCESS);
    ok_start(&machine);
    assert_eq!(
        probe.calls.load(Ordering::SeqCst),
        2,
        "initial, then the change"
    );
    let record = only_record();
    assert!(
        !record.during_query,
        "released by the change, not by a query"
    );
    assert_eq!(kernel::netio_stats().delivered, 2);
}

#[test]
fn a_null_handle_success_leaves_a_live_registration_that_keeps_being_notified() {
    let machine = boot();
    kernel::notify_null_handle_next();
    let probe = new_probe();
    probe.slot.store(usize::MAX, Ordering::SeqCst);
    assert_eq!(register(probe, true), kernel::STATUS_SUCCESS);
    assert_eq!(probe.slot.load(Ordering::SeqCst), 0, "NULL written back");
    let netio = kernel::netio_stats();
    assert_eq!(netio.live.len(), 1);
    assert_eq!(kernel::live_contexts()[0].1, context(probe).addr());
    ok_start(&machine);
    assert_eq!(
        probe.calls.load(Ordering::SeqCst),
        2,
        "initial and the change"
    );
    let cancel: Cancel = host("netio.sys", "CancelMibChangeNotify2");
    assert_eq!(
        cancel(0),
        kernel::ERROR_INVALID_PARAMETER,
        "NULL cannot be cancelled"
    );
    assert_eq!(kernel::netio_stats().live.len(), 1);
    // Only the next registration: the one after gets its handle.
    let second = new_probe();
    assert_eq!(register(second, false), kernel::STATUS_SUCCESS);
    assert_ne!(second.slot.load(Ordering::SeqCst), 0);
}

#[test]
fn get_teredo_port_can_succeed_with_port_zero() {
    let machine = boot();
    ok_start(&machine);
    kernel::query_returns_next(0);
    let get: GetPort = host("netio.sys", "GetTeredoPort");
    let mut port = 1u16;
    assert_eq!(get(&raw mut port), kernel::STATUS_SUCCESS);
    assert_eq!(port, 0);
    assert_eq!(get(&raw mut port), kernel::STATUS_SUCCESS);
    assert_eq!(Some(port), kernel::client::port(), "only the next call");
}

#[test]
fn an_overlapping_invocation_runs_while_another_is_in_flight() {
    let machine = boot();
    let probe = new_probe();
    assert_eq!(register(probe, false), kernel::STATUS_SUCCESS);
    let handle = probe.slot.load(Ordering::SeqCst);
    probe.blocking.store(true, Ordering::SeqCst);
    let first = machine.spawn("client start", PASSIVE_LEVEL, kernel::client::start);
    wait_until("the first callback", || {
        probe.waiting_at_gate.load(Ordering::SeqCst)
    });
    probe.blocking.store(false, Ordering::SeqCst);
    let overlapped = machine
        .on_cpu("overlap", PASSIVE_LEVEL, move || {
            kernel::invoke_overlapping(handle, 50_000, kernel::MIB_PARAMETER_NOTIFICATION)
        })
        .expect("no stop");
    assert_eq!(overlapped, Delivery::Delivered);
    assert_eq!(
        probe.max_running.load(Ordering::SeqCst),
        2,
        "two invocations at once"
    );
    probe.gate.store(true, Ordering::SeqCst);
    machine.join(first).expect("no stop");
    let netio = kernel::netio_stats();
    assert_eq!((netio.overlapping, netio.delivered), (1, 2));
    let cancel: Cancel = host("netio.sys", "CancelMibChangeNotify2");
    assert_eq!(cancel(handle), 0);
    assert_eq!(
        kernel::invoke_overlapping(handle, 1, kernel::MIB_PARAMETER_NOTIFICATION),
        Delivery::Dropped,
        "not after a cancel"
    );
}

#[test]
fn a_cancel_can_wait_for_the_callback_in_flight_and_then_fail() {
    const STATUS: i32 = 0xC000_0001_u32.cast_signed();
    let machine = boot();
    let probe = new_probe();
    assert_eq!(register(probe, false), kernel::STATUS_SUCCESS);
    let handle = probe.slot.load(Ordering::SeqCst);
    probe.blocking.store(true, Ordering::SeqCst);
    let delivery = machine.spawn("client start", PASSIVE_LEVEL, kernel::client::start);
    wait_until("the callback", || {
        probe.waiting_at_gate.load(Ordering::SeqCst)
    });
    kernel::fail_next_cancel_after_wait(STATUS);
    let returned = AtomicBool::new(false);
    let returned: &'static AtomicBool = Box::leak(Box::new(returned));
    let cancel = machine.spawn("cancel", PASSIVE_LEVEL, move || {
        let cancel: Cancel = host("netio.sys", "CancelMibChangeNotify2");
        let status = cancel(handle);
        returned.store(true, Ordering::SeqCst);
        status
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !returned.load(Ordering::SeqCst),
        "the cancel waits for the callback"
    );
    probe.blocking.store(false, Ordering::SeqCst);
    probe.gate.store(true, Ordering::SeqCst);
    assert_eq!(machine.join(cancel).expect("no stop"), STATUS);
    machine.join(delivery).expect("no stop");
    assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
    let netio = kernel::netio_stats();
    assert_eq!(netio.live, [handle], "still registered");
    assert_eq!(netio.failed_after_wait, [handle]);
    ok_start(&machine);
    assert_eq!(probe.calls.load(Ordering::SeqCst), 2, "and still notified");
    let cancel: Cancel = host("netio.sys", "CancelMibChangeNotify2");
    assert_eq!(cancel(handle), 0, "only the next cancel");
}

#[test]
fn every_knob_is_reset_with_the_machine() {
    {
        let _machine = boot();
        kernel::set_initial_delivery(InitialDelivery::AfterReturn);
        kernel::notify_null_handle_next();
        kernel::query_returns_next(0);
        kernel::fail_next_cancel_after_wait(1);
        kernel::overlap_inside_next_callback(1, 0);
    }
    let machine = boot();
    ok_start(&machine);
    let probe = new_probe();
    assert_eq!(register(probe, true), kernel::STATUS_SUCCESS);
    let handle = probe.slot.load(Ordering::SeqCst);
    assert_ne!(handle, 0, "no NULL handle");
    assert_eq!(only_record().order, InitialDelivery::BeforeReturn);
    let get: GetPort = host("netio.sys", "GetTeredoPort");
    let mut port = 0u16;
    assert_eq!(get(&raw mut port), kernel::STATUS_SUCCESS);
    assert_eq!(Some(port), kernel::client::port());
    let cancel: Cancel = host("netio.sys", "CancelMibChangeNotify2");
    assert_eq!(cancel(handle), 0);
    assert!(kernel::netio_stats().failed_after_wait.is_empty());
}
