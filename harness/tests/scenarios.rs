//! The example driver's real `.sys`, loaded and run against the host kernel model.
//!
//! Each test boots a fresh machine (a fresh mapping of the image: fresh statics), so the
//! tests are independent; the machines run one at a time (the model is global).
#![cfg(all(target_arch = "x86_64", unix))]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use teredo_harness::kernel::{self, Delivery, NetioCall};
use teredo_harness::{Machine, Stop, sysbuild};
use teredo_watcher::sys::DOCUMENTED_STATUS_CODES;

const STATUS_SUCCESS: i32 = 0;
const STATUS_INVALID_HANDLE: i32 = 0xC000_0008_u32.cast_signed();
const STATUS_INVALID_PARAMETER: i32 = 0xC000_000D_u32.cast_signed();
const STATUS_INSUFFICIENT_RESOURCES: i32 = 0xC000_009A_u32.cast_signed();
const STATUS_DEVICE_NOT_READY: i32 = 0xC000_00A3_u32.cast_signed();
const STATUS_INVALID_DEVICE_STATE: i32 = 0xC000_0184_u32.cast_signed();

fn boot() -> Machine {
    let sys = sysbuild::sys_image().unwrap_or_else(|e| panic!("the .sys must build: {e}"));
    Machine::boot(sys, false).unwrap_or_else(|e| panic!("the .sys must load: {e}"))
}

fn output() -> String {
    kernel::debugger_output().join("\n")
}

/// Fails the test with the stop and the debugger output so far.
fn ok<T>(result: Result<T, Stop>) -> T {
    result.unwrap_or_else(|stop| panic!("{stop}\n--- debugger output ---\n{}", output()))
}

fn driver_lines(prefix: &str) -> usize {
    kernel::debugger_output()
        .iter()
        .filter(|l| l.starts_with("teredo-monitor: ") && l.contains(prefix))
        .count()
}

/// Unloads and checks what every clean unload must leave: nothing registered, pool
/// balanced, no stop.
fn unload_clean(machine: &Machine) {
    assert!(ok(machine.driver_unload()), "DriverEntry set DriverUnload");
    let netio = kernel::netio_stats();
    assert!(
        netio.live.is_empty(),
        "registrations left: {:?}",
        netio.live
    );
    let pool = kernel::pool_stats();
    assert!(pool.balanced(), "pool after unload: {pool:?}\n{}", output());
    assert_eq!(kernel::stopped(), None);
}

#[test]
fn loads_at_a_non_preferred_base_and_gets_the_initial_notification() {
    let machine = boot();
    let image = machine.image();
    assert_ne!(image.base() as u64, image.preferred_base());
    assert!(image.relocations_applied() > 0, "relocations applied");
    assert!(image.imports_bound() >= 8, "imports bound");

    assert_eq!(ok(machine.driver_entry()), STATUS_SUCCESS, "{}", output());
    let text = output();
    assert!(text.contains("DriverEntry at PASSIVE_LEVEL"), "{text}");
    assert!(
        text.contains("event #1: MibInitialNotification"),
        "the initial notification reached the driver's callback: {text}"
    );
    assert!(
        text.contains("DriverEntry: loaded (status 0x00000000)"),
        "{text}"
    );
    let netio = kernel::netio_stats();
    assert_eq!(
        netio.calls,
        [1, 1, 0],
        "notify, seed with GetTeredoPort, no cancel"
    );
    assert_eq!(netio.live.len(), 1);
    assert_eq!(netio.delivered, 1);
    let unload = machine.driver_unload_routine().expect("DriverUnload set");
    assert!(machine.image().contains(unload));
    unload_clean(&machine);
}

#[test]
fn port_changes_from_two_threads_while_a_third_classifies() {
    const CHANGES_PER_THREAD: usize = 25;
    let machine = boot();
    assert_eq!(ok(machine.driver_entry()), STATUS_SUCCESS);
    // Callbacks at DISPATCH_LEVEL: the driver's callback path must not wait or page.
    kernel::set_callback_irql(kernel::DISPATCH_LEVEL);
    let first = ok(machine.on_cpu("client start", 0, kernel::client::start));

    let classify = machine
        .export("TeredoMonitorClassifyPort")
        .expect("the shim exports the classify stand-in");
    let stop = Arc::new(AtomicBool::new(false));
    // Reads so far: each change waits for the reader to read again, so that reads and
    // changes interleave however the host schedules the threads.
    let reads = Arc::new(AtomicUsize::new(0));
    let (reader_stop, reader_reads) = (Arc::clone(&stop), Arc::clone(&reads));
    let reader = machine.spawn("classify", kernel::DISPATCH_LEVEL, move || {
        // SAFETY: `TeredoMonitorClassifyPort` is `unsafe extern "system" fn() -> u32` in
        // the shim, callable at <= DISPATCH_LEVEL while the driver is loaded; DriverUnload
        // runs only after this thread has been joined.
        let classify =
            unsafe { std::mem::transmute::<usize, extern "win64" fn() -> u32>(classify) };
        let mut seen = Vec::new();
        while !reader_stop.load(Ordering::SeqCst) {
            seen.push(classify());
            reader_reads.fetch_add(1, Ordering::SeqCst);
        }
        seen.push(classify());
        seen
    });
    let changers: Vec<_> = (0..2)
        .map(|n| {
            let reads = Arc::clone(&reads);
            machine.spawn(&format!("client restarts {n}"), 0, move || {
                (0..CHANGES_PER_THREAD)
                    .map(|_| {
                        let before = reads.load(Ordering::SeqCst);
                        while reads.load(Ordering::SeqCst) == before {
                            std::thread::yield_now();
                        }
                        kernel::client::start()
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let mut ports: BTreeSet<u16> = BTreeSet::from([first]);
    for changer in changers {
        ports.extend(ok(machine.join(changer)));
    }
    stop.store(true, Ordering::Relaxed);
    let seen = ok(machine.join(reader));

    let last = kernel::client::port().expect("client running");
    assert_eq!(
        seen.last().copied(),
        Some(u32::from(last)),
        "classify ends on the last port"
    );
    for value in &seen {
        let port = u16::try_from(*value).expect("a port, never 'not loaded'");
        assert!(
            ports.contains(&port),
            "classify read {port}, never a client port"
        );
    }
    let deliveries = 2 + 2 * CHANGES_PER_THREAD;
    assert_eq!(kernel::netio_stats().delivered, deliveries as u64);
    assert_eq!(
        driver_lines("event #"),
        deliveries,
        "one log line per callback"
    );
    assert!(
        output().contains("at DISPATCH_LEVEL"),
        "callbacks ran at DISPATCH_LEVEL"
    );
    assert!(
        seen.len() > CHANGES_PER_THREAD,
        "a read before every change of each thread"
    );
    unload_clean(&machine);
}

#[test]
fn unload_cancels_every_handle_and_late_notifications_never_reach_the_image() {
    let machine = boot();
    assert_eq!(ok(machine.driver_entry()), STATUS_SUCCESS);
    ok(machine.on_cpu("client start", 0, kernel::client::start));
    ok(machine.on_cpu("client stop", 0, kernel::client::stop));
    unload_clean(&machine);

    let netio = kernel::netio_stats();
    assert!(!netio.handles.is_empty());
    assert!(
        netio.calls[2] >= netio.handles.len() as u64,
        "a cancel per handle: {netio:?}"
    );
    assert!(output().contains("registration cancelled after 3 notifications"));

    // The image is retired now (any call into it would fault): late notifications on every
    // handle it ever had must be dropped by netio.
    let lines = kernel::debugger_output().len();
    let delivered = netio.delivered;
    for handle in netio.handles {
        let late = ok(machine.on_cpu("late notification", 0, move || {
            kernel::deliver(handle, 40_000, kernel::MIB_PARAMETER_NOTIFICATION)
        }));
        assert_eq!(late, Delivery::Dropped);
    }
    let after = kernel::netio_stats();
    assert_eq!(after.delivered, delivered, "no callback ran");
    assert!(after.dropped_after_cancel >= 1);
    assert_eq!(
        kernel::debugger_output().len(),
        lines,
        "the driver printed nothing"
    );
}

/// The `NTSTATUS` a driver returns for a netio status (negative values pass through; the
/// Win32 codes the documentation mixes in map to their `NTSTATUS` equivalents).
fn expected_entry_status(netio_status: i32) -> i32 {
    match netio_status {
        s if s < 0 => s,
        6 => STATUS_INVALID_HANDLE,
        8 => STATUS_INSUFFICIENT_RESOURCES,
        21 => STATUS_DEVICE_NOT_READY,
        87 => STATUS_INVALID_PARAMETER,
        other => panic!("undocumented status {other}"),
    }
}

#[test]
fn driver_entry_fails_on_each_documented_status_and_leaves_nothing() {
    let mut failures = 0;
    for (name, status) in DOCUMENTED_STATUS_CODES {
        if status == STATUS_SUCCESS {
            continue;
        }
        let machine = boot();
        kernel::fail_next(NetioCall::Notify, status);
        let returned = ok(machine.driver_entry());
        assert_eq!(
            returned,
            expected_entry_status(status),
            "{name}: DriverEntry returned {returned:#x}\n{}",
            output()
        );
        assert_eq!(
            machine.driver_unload_routine(),
            None,
            "{name}: no DriverUnload"
        );
        assert!(
            output().contains("step 1/3"),
            "{name}: the failing step is logged"
        );
        let netio = kernel::netio_stats();
        assert!(
            netio.live.is_empty() && netio.handles.is_empty(),
            "{name}: {netio:?}"
        );
        let pool = kernel::pool_stats();
        assert!(pool.balanced(), "{name}: pool leaked {pool:?}");
        assert!(
            !ok(machine.driver_unload()),
            "the I/O manager unloads the image"
        );
        failures += 1;
    }
    assert_eq!(failures, DOCUMENTED_STATUS_CODES.len() - 1);
}

#[test]
fn driver_entry_fails_cleanly_on_each_allocation() {
    let mut refused_steps = 0;
    for n in 0.. {
        let machine = boot();
        kernel::fail_allocation_after(n);
        let status = ok(machine.driver_entry());
        let pool = kernel::pool_stats();
        if pool.refused == 0 {
            // DriverEntry made fewer than n+1 allocations: every one was refused once.
            assert_eq!(status, STATUS_SUCCESS);
            unload_clean(&machine);
            break;
        }
        assert_eq!(
            status,
            STATUS_INSUFFICIENT_RESOURCES,
            "allocation {n} refused\n{}",
            output()
        );
        assert_eq!(machine.driver_unload_routine(), None);
        assert!(
            kernel::netio_stats().live.is_empty(),
            "allocation {n}: registered"
        );
        assert!(
            pool.balanced(),
            "allocation {n} refused: pool {pool:?}\n{}",
            output()
        );
        refused_steps += 1;
    }
    assert!(refused_steps >= 2, "DriverEntry allocates at several steps");
}

#[test]
fn driver_entry_above_passive_level_is_an_irql_violation_reported() {
    let machine = boot();
    let status = ok(machine.driver_entry_at(kernel::DISPATCH_LEVEL));
    assert_eq!(status, STATUS_INVALID_DEVICE_STATE, "{}", output());
    let text = output();
    assert!(text.contains("DriverEntry at DISPATCH_LEVEL"), "{text}");
    assert!(text.contains("step 1/3"), "{text}");
    assert!(text.contains("IRQL") || text.contains("_LEVEL"), "{text}");
    assert_eq!(
        kernel::netio_stats().calls,
        [0, 0, 0],
        "the library refused before calling netio at the wrong IRQL"
    );
    assert!(kernel::pool_stats().balanced());
    assert_eq!(machine.driver_unload_routine(), None);
}

#[test]
fn netio_called_at_dispatch_level_stops_the_machine() {
    let machine = boot();
    let notify = kernel::resolve("netio.sys", "GetTeredoPort").expect("modelled");
    let result = machine.on_cpu(
        "GetTeredoPort at DISPATCH_LEVEL",
        kernel::DISPATCH_LEVEL,
        move || {
            // SAFETY: the model's `GetTeredoPort`, called as the image would call it, with a
            // valid out pointer.
            let get =
                unsafe { std::mem::transmute::<usize, extern "win64" fn(*mut u16) -> i32>(notify) };
            let mut port = 0u16;
            get(&raw mut port)
        },
    );
    match result {
        Err(Stop::Bugcheck(stop)) => {
            assert_eq!(stop.code, kernel::IRQL_NOT_LESS_OR_EQUAL);
            assert_eq!(stop.parameters[1], usize::from(kernel::DISPATCH_LEVEL));
            assert!(stop.reason.contains("GetTeredoPort"), "{stop}");
        }
        other => panic!("expected a bugcheck, got {other:?}"),
    }
}

#[test]
fn a_self_cancel_is_reported_without_a_hang() {
    let machine = boot();
    assert_eq!(ok(machine.driver_entry()), STATUS_SUCCESS);
    assert!(machine.unload_inside_next_callback());
    // The notification's callback prints, and the driver's DriverUnload runs right there:
    // its cancel comes from inside the callback of its own registration.
    let port = ok(machine.on_cpu("client start", 0, kernel::client::start));
    assert_ne!(port, 0);
    let text = output();
    assert!(
        text.contains("cannot cancel a Teredo notification from inside its own callback"),
        "the library reports the self-cancel: {text}"
    );
    assert!(
        text.contains("unload left registrations behind"),
        "the driver reports what it could not cancel: {text}"
    );
    let netio = kernel::netio_stats();
    assert!(
        netio.self_cancels.is_empty(),
        "the library refused before netio could deadlock"
    );
    assert_eq!(
        netio.live.len(),
        1,
        "still registered: the cancel was refused"
    );

    // The real DriverUnload, at PASSIVE_LEVEL: the teardown cancels the orphaned
    // registration and frees its context.
    unload_clean(&machine);
    assert!(output().contains("DriverUnload at PASSIVE_LEVEL: no driver state"));
}

#[test]
fn with_debug_assertions_an_irql_violation_panics_and_the_panic_bugchecks() {
    let sys = sysbuild::debug_assertions_image()
        .unwrap_or_else(|e| panic!("the debug-assertions .sys must build: {e}"));
    let machine = Machine::boot(sys, false).unwrap_or_else(|e| panic!("loads: {e}"));
    match machine.driver_entry_at(kernel::DISPATCH_LEVEL) {
        Err(Stop::Bugcheck(stop)) => {
            assert_eq!(
                stop.code,
                u32::from_be_bytes(*b"TMON"),
                "the shim's panic code"
            );
            assert!(stop.reason.contains("panic at"), "{stop}");
            assert!(
                stop.reason.contains("nt.rs"),
                "the library's IRQL check: {stop}"
            );
            let text = output();
            assert!(text.contains("teredo-monitor: panic:"), "{text}");
            assert!(text.contains("requires"), "the panic message: {text}");
        }
        other => panic!("expected the panic's bugcheck, got {other:?}\n{}", output()),
    }
    assert_eq!(kernel::netio_stats().calls, [0, 0, 0]);
}
