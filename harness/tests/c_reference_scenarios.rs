//! The C reference driver (`examples/c-reference/`, built with mingw-w64) in the harness: a
//! driver written as Microsoft's documentation shows, not fitted to the harness.
//!
//! Where its outcome differs from the Rust driver's by design, the test says so: the C
//! driver calls `CancelMibChangeNotify2` from inside its own callback when made to (the
//! library refuses that before netio sees it), and netio must report the deadlock it would
//! be on Windows instead of hanging; it has no subscribers, so a running client's port
//! reaches it only through its seed; and it takes no reference on its driver object, so a
//! cancel that fails at unload leaves a registration into an unloaded image.
//!
//! It runs under each of the model's four initial-notification orderings, and through a
//! fault sweep of its own (seed and cancel failures under the orderings in turn).
//!
//! Without `x86_64-w64-mingw32-gcc` these tests are ignored, with the reason (see
//! `harness/build.rs`); CI installs it and requires it.
#![cfg(all(target_arch = "x86_64", unix))]

mod foreign;

use foreign::{ORDERS, STATUS_SUCCESS, STATUS_UNSUCCESSFUL, classify, ok, output, unload_clean};
use teredo_harness::kernel::{self, InitialDelivery, NetioCall};
use teredo_harness::{Machine, Stop, pe, sysbuild};
use teredo_watcher::sys::DOCUMENTED_STATUS_CODES;

const STATUS_INSUFFICIENT_RESOURCES: i32 = 0xC000_009A_u32.cast_signed();
/// The driver's pool tag, `'TRef'` in a pool dump.
const TAG: u32 = u32::from_le_bytes(*b"TRef");
/// `mov rax, cr8`: what `KeGetCurrentIrql()` from the DDK headers compiles to.
const MOV_RAX_CR8: [u8; 4] = [0x44, 0x0F, 0x20, 0xC0];

fn image() -> &'static [u8] {
    sysbuild::c_reference_image()
        .unwrap_or_else(|e| panic!("the C reference driver must build: {e}"))
}

fn boot() -> Machine {
    Machine::boot(image(), false)
        .unwrap_or_else(|e| panic!("the C reference driver must load: {e}"))
}

#[test]
#[cfg_attr(
    not(teredo_harness_mingw),
    ignore = "needs x86_64-w64-mingw32-gcc (apt-get install gcc-mingw-w64-x86-64)"
)]
fn the_image_has_the_shape_gnu_ld_gives_a_c_driver() {
    let facts = pe::facts(image()).expect("parses");
    assert_eq!(facts.machine, pe::MACHINE_AMD64);
    assert_eq!(facts.subsystem, pe::SUBSYSTEM_NATIVE);
    assert!(
        !facts.has_relocations,
        "no .reloc: nothing in it to relocate"
    );
    assert!(
        facts.entry_names.is_empty(),
        "DriverEntry is the PE entry point, not an export: {:?}",
        facts.entry_names
    );
    assert_eq!(
        facts.modules(),
        ["NETIO.SYS", "ntoskrnl.exe"],
        "module names as mingw writes them"
    );
    let ntoskrnl = facts.imports_of("ntoskrnl.exe");
    for name in ["ExAllocatePoolWithTag", "DbgPrintEx", "DbgPrint"] {
        assert!(ntoskrnl.contains(&name), "imports {name}: {ntoskrnl:?}");
    }
    assert!(
        !ntoskrnl.contains(&"KeGetCurrentIrql"),
        "KeGetCurrentIrql is inlined, not imported"
    );
    assert!(
        image().windows(4).any(|w| w == MOV_RAX_CR8),
        "the inline KeGetCurrentIrql reads CR8 itself"
    );
}

#[test]
#[cfg_attr(
    not(teredo_harness_mingw),
    ignore = "needs x86_64-w64-mingw32-gcc (apt-get install gcc-mingw-w64-x86-64)"
)]
fn driver_entry_registers_with_the_initial_notification_and_unload_frees_everything() {
    let machine = boot();
    assert_eq!(ok(machine.driver_entry()), STATUS_SUCCESS, "{}", output());
    let netio = kernel::netio_stats();
    assert_eq!(netio.calls, [1, 1, 0], "notify, seed, no cancel");
    assert_eq!(netio.live.len(), 1);
    let blocks = kernel::pool_blocks();
    assert_eq!(blocks.len(), 1, "the context: {blocks:?}");
    assert_eq!(blocks[0].tag, TAG);
    let text = output();
    assert!(text.contains("MibInitialNotification"), "{text}");
    assert!(
        text.contains("DriverEntry at IRQL 0"),
        "the inline KeGetCurrentIrql read PASSIVE_LEVEL: {text}"
    );
    assert_eq!(classify(&machine), 0, "the client is stopped: no port");

    let port = ok(machine.on_cpu("client start", 0, kernel::client::start));
    assert_eq!(classify(&machine), u32::from(port));
    ok(machine.on_cpu("client stop", 0, kernel::client::stop));
    assert_eq!(classify(&machine), 0, "MibDeleteInstance clears the port");
    unload_clean(&machine);
    assert!(
        output().contains("cancelled after 3 notifications"),
        "{}",
        output()
    );
}

#[test]
#[cfg_attr(
    not(teredo_harness_mingw),
    ignore = "needs x86_64-w64-mingw32-gcc (apt-get install gcc-mingw-w64-x86-64)"
)]
fn the_seed_comes_from_get_teredo_port_when_the_client_already_runs() {
    let machine = boot();
    let port = ok(machine.on_cpu("client start", 0, kernel::client::start));
    assert_eq!(ok(machine.driver_entry()), STATUS_SUCCESS, "{}", output());
    assert_eq!(
        classify(&machine),
        u32::from(port),
        "seeded with the running client's port, not the initial notification's 0"
    );
    unload_clean(&machine);
}

#[test]
#[cfg_attr(
    not(teredo_harness_mingw),
    ignore = "needs x86_64-w64-mingw32-gcc (apt-get install gcc-mingw-w64-x86-64)"
)]
fn driver_entry_fails_on_each_documented_status_and_leaves_nothing() {
    foreign::driver_entry_fails_on_each_documented_status(boot);
}

#[test]
#[cfg_attr(
    not(teredo_harness_mingw),
    ignore = "needs x86_64-w64-mingw32-gcc (apt-get install gcc-mingw-w64-x86-64)"
)]
fn driver_entry_fails_cleanly_when_the_context_cannot_be_allocated() {
    let machine = boot();
    kernel::fail_allocation_after(0);
    assert_eq!(ok(machine.driver_entry()), STATUS_INSUFFICIENT_RESOURCES);
    assert_eq!(kernel::pool_stats().refused, 1);
    assert_eq!(kernel::netio_stats().calls, [0, 0, 0], "never registered");
    assert_eq!(machine.driver_unload_routine(), None);
}

#[test]
#[cfg_attr(
    not(teredo_harness_mingw),
    ignore = "needs x86_64-w64-mingw32-gcc (apt-get install gcc-mingw-w64-x86-64)"
)]
fn a_cancel_from_inside_its_own_callback_is_reported_as_the_deadlock_it_is_on_windows() {
    let machine = boot();
    assert_eq!(ok(machine.driver_entry()), STATUS_SUCCESS);
    let handle = kernel::netio_stats().live[0];
    assert!(machine.unload_inside_next_callback());
    // The callback prints; the model then runs the driver's DriverUnload on that thread,
    // from inside the callback. Unlike the Rust driver (whose library refuses first), the
    // C driver calls CancelMibChangeNotify2 there: on Windows this never returns.
    ok(machine.on_cpu("client start", 0, kernel::client::start));
    let netio = kernel::netio_stats();
    assert_eq!(
        netio.self_cancels,
        [handle],
        "netio saw the self-cancel and refused it (STATUS_POSSIBLE_DEADLOCK) instead of hanging"
    );
    assert_eq!(netio.live, [handle], "still registered");
    let text = output();
    assert!(
        text.contains("CancelMibChangeNotify2 failed with 0xc0000194"),
        "the driver saw STATUS_POSSIBLE_DEADLOCK: {text}"
    );
    let blocks = kernel::pool_blocks();
    assert_eq!(
        (blocks.len(), blocks.first().map(|b| b.tag)),
        (1, Some(TAG)),
        "the context stays allocated while the registration may still call back"
    );
    assert_eq!(kernel::stopped(), None);

    // The I/O manager's DriverUnload, at PASSIVE_LEVEL on its own thread: now the cancel
    // succeeds and the context is freed.
    unload_clean(&machine);
}

/// The driver's lines that report a callback (`notification #N: ...`).
fn notification_lines() -> Vec<String> {
    kernel::debugger_output()
        .into_iter()
        .filter(|l| l.starts_with("teredo-reference: notification #"))
        .collect()
}

/// The index of the first debugger line containing `part`.
fn line_index(part: &str) -> usize {
    kernel::debugger_output()
        .iter()
        .position(|l| l.contains(part))
        .unwrap_or_else(|| panic!("no line contains {part:?}:\n{}", output()))
}

/// `%#lx` as C prints it: no prefix for zero.
fn c_alt_hex(value: i32) -> String {
    if value == 0 {
        "0".to_owned()
    } else {
        format!("{:#x}", value.cast_unsigned())
    }
}

/// The model's record of the one initial notification shows `order` happened.
fn assert_the_ordering_happened(order: InitialDelivery) {
    let records = kernel::netio_stats().initial;
    assert_eq!(records.len(), 1, "{order:?}: {records:?}");
    let record = records[0];
    assert_eq!(record.order, order);
    match order {
        InitialDelivery::CallerThread => {
            assert_eq!(record.callback_thread, record.caller_thread);
            assert!(
                !record.handle_written && record.notify_running,
                "{record:?}"
            );
        }
        InitialDelivery::BeforeReturn => {
            assert_ne!(record.callback_thread, record.caller_thread);
            assert!(
                !record.handle_written && record.notify_running,
                "{record:?}"
            );
        }
        InitialDelivery::AfterReturn => {
            assert_ne!(record.callback_thread, record.caller_thread);
            assert!(
                record.handle_written && !record.notify_running,
                "{record:?}"
            );
        }
        InitialDelivery::DuringQuery => {
            assert_ne!(record.callback_thread, record.caller_thread);
            assert!(record.handle_written && record.during_query, "{record:?}");
        }
    }
}

/// Each ordering, with the client running at load (callbacks at `DISPATCH_LEVEL`) and
/// stopped at load (callbacks at `PASSIVE_LEVEL`).
///
/// What the C driver must do in every one: register, seed with `GetTeredoPort`, log the
/// initial notification once (port 0, which it does not store), know the running port after
/// `DriverEntry` (or none), follow the next change, and unload clean. Where it differs from
/// the Rust driver by design, asserted below: it has no subscribers, so the running port
/// reaches it only through the seed, and no callback reports that port before the first
/// change (the Rust driver's subscriber gets a snapshot event with it:
/// `sys_orderings.rs`); and its initial notification counts as notification #1, so the
/// first change is #2 whatever the seed read.
#[test]
#[cfg_attr(
    not(teredo_harness_mingw),
    ignore = "needs x86_64-w64-mingw32-gcc (apt-get install gcc-mingw-w64-x86-64)"
)]
fn every_initial_notification_ordering_with_the_client_running_or_stopped_at_load() {
    let mut ran = 0;
    for order in ORDERS {
        for running in [true, false] {
            let machine = boot();
            let irql = if running {
                kernel::DISPATCH_LEVEL
            } else {
                kernel::PASSIVE_LEVEL
            };
            kernel::set_callback_irql(irql);
            kernel::set_initial_delivery(order);
            let port =
                running.then(|| ok(machine.on_cpu("client start", 0, kernel::client::start)));
            let case = format!("{order:?}, client running at load: {running}");
            assert_eq!(
                ok(machine.driver_entry()),
                STATUS_SUCCESS,
                "{case}\n{}",
                output()
            );
            assert!(
                kernel::wait_for_initial_notifications(std::time::Duration::from_secs(5)),
                "{case}"
            );
            assert_the_ordering_happened(order);
            assert_eq!(
                kernel::netio_stats().calls,
                [1, 1, 0],
                "{case}: notify, seed"
            );

            // The initial notification: once, port 0, at the callback IRQL (read through
            // the emulated CR8).
            let lines = notification_lines();
            // By design (no subscribers): no callback but the initial notification before
            // the first change, so none carried the running port.
            assert_eq!(
                lines.len(),
                1,
                "{case}: only the initial notification: {lines:#?}"
            );
            assert!(
                lines[0].contains("notification #1: MibInitialNotification")
                    && lines[0].contains("port     0")
                    && lines[0].ends_with(&format!("at IRQL {irql}")),
                "{case}: {lines:#?}"
            );
            // The seed: the running port, or ERROR_NOT_READY and no port.
            let seed_line = match port {
                Some(port) => format!("loaded; seed {port} (GetTeredoPort status 0)"),
                None => format!(
                    "loaded; seed 0 (GetTeredoPort status {})",
                    c_alt_hex(kernel::ERROR_NOT_READY)
                ),
            };
            let loaded = line_index(&seed_line);
            // Inside NotifyTeredoPortChange, or inside the seed's GetTeredoPort: before
            // DriverEntry logs its result. After the return it races the seed; no order is
            // asserted then.
            if order != InitialDelivery::AfterReturn {
                assert!(
                    line_index("notification #1: MibInitialNotification") < loaded,
                    "{case}: the initial notification ran inside DriverEntry\n{}",
                    output()
                );
            }
            assert_eq!(
                classify(&machine),
                port.map_or(0, u32::from),
                "{case}: the seed survived the initial notification's port 0"
            );
            // The next change is notification #2, with its port.
            let next = ok(machine.on_cpu("client start", 0, kernel::client::start));
            let kind = if running {
                "MibParameterNotification"
            } else {
                "MibAddInstance"
            };
            let lines = notification_lines();
            assert_eq!(lines.len(), 2, "{case}: {lines:#?}");
            assert!(
                lines[1].contains(&format!("notification #2: {kind}"))
                    && lines[1].contains(&format!("port {next:5} at IRQL {irql}")),
                "{case}: {lines:#?}"
            );
            assert_eq!(classify(&machine), u32::from(next), "{case}");
            unload_clean(&machine);
            assert!(
                output().contains(&format!(
                    "cancelled after 2 notifications; last port {next}"
                )),
                "{case}\n{}",
                output()
            );
            ran += 1;
        }
    }
    assert_eq!(ran, ORDERS.len() * 2);
}

/// Differs from the Rust driver by design: when `CancelMibChangeNotify2` fails at unload,
/// the C driver keeps its context (a callback may still use it) but takes no reference on
/// its driver object, so the image unloads with the registration live, and the next
/// notification runs into unmapped code: the machine stops with
/// `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS`, naming the callback's RVA. (The
/// Rust driver keeps its image mapped then: `sys_orderings.rs`.)
#[test]
#[cfg_attr(
    not(teredo_harness_mingw),
    ignore = "needs x86_64-w64-mingw32-gcc (apt-get install gcc-mingw-w64-x86-64)"
)]
fn a_cancel_that_fails_at_unload_keeps_the_context_but_not_the_image() {
    let machine = boot();
    assert_eq!(ok(machine.driver_entry()), STATUS_SUCCESS);
    let handle = kernel::netio_stats().live[0];
    kernel::fail_next_cancel_after_wait(kernel::ERROR_INVALID_HANDLE);
    assert!(ok(machine.driver_unload()), "DriverUnload set and returned");
    assert_eq!(kernel::netio_stats().failed_after_wait, [handle]);
    assert_eq!(kernel::netio_stats().live, [handle], "netio still holds it");
    assert!(
        output().contains("CancelMibChangeNotify2 failed with 0x00000006; the context stays"),
        "{}",
        output()
    );
    let blocks = kernel::pool_blocks();
    assert_eq!(
        (blocks.len(), blocks.first().map(|b| b.tag)),
        (1, Some(TAG)),
        "the context is kept"
    );
    assert_eq!(kernel::driver_object_references(), 0, "no reference taken");
    assert!(machine.image().is_retired(), "so the image is unloaded");
    match machine.on_cpu("client start", 0, kernel::client::start) {
        Err(Stop::Bugcheck(stop)) => {
            assert_eq!(
                stop.code,
                kernel::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
                "{stop}"
            );
            assert!(stop.reason.contains("unloaded image at RVA"), "{stop}");
            let rva = stop.parameters[0] - machine.image().base();
            assert!(rva < machine.image().size(), "{stop}");
        }
        other => panic!("expected the stop, got {other:?}\n{}", output()),
    }
}

/// The documented status codes plus two the documentation does not name.
fn sweep_codes() -> Vec<(&'static str, i32)> {
    DOCUMENTED_STATUS_CODES
        .iter()
        .copied()
        .filter(|(_, code)| *code != STATUS_SUCCESS)
        .chain([
            ("STATUS_UNSUCCESSFUL*", STATUS_UNSUCCESSFUL),
            ("ERROR_ACCESS_DENIED*", 5),
        ])
        .collect()
}

/// The C driver's fault sweep: `GetTeredoPort` (the seed) and `CancelMibChangeNotify2` (at
/// unload) fail with every code of [`sweep_codes`], under each ordering in turn, with the
/// client running at load. (`NotifyTeredoPortChange` failing is
/// `driver_entry_fails_on_each_documented_status_and_leaves_nothing`.) The `.sys` fault
/// sweep (`fault_sweep.rs`) is the Rust driver's: its rows (the library's cancel retry in
/// the teardown, the rollback after step 3's allocation) and its checks (the library's error
/// text, the event log, the documented residue of the library's blocks) do not exist in this
/// driver.
///
/// - seed fails: `DriverEntry` still succeeds, logs the status, knows no port (the initial
///   notification carries none) until the next change, and unloads clean;
/// - cancel fails: the driver logs the status and keeps its context; netio keeps the
///   registration; nothing stops the machine while no notification comes.
#[test]
#[cfg_attr(
    not(teredo_harness_mingw),
    ignore = "needs x86_64-w64-mingw32-gcc (apt-get install gcc-mingw-w64-x86-64)"
)]
fn seed_and_cancel_fail_with_each_status_under_each_ordering() {
    let codes = sweep_codes();
    let mut cells = 0;
    let mut orders_run = Vec::new();
    for (n, &(name, code)) in codes.iter().enumerate() {
        for cancel in [false, true] {
            let order = ORDERS[(2 * n + usize::from(cancel)) % ORDERS.len()];
            if !orders_run.contains(&order) {
                orders_run.push(order);
            }
            let case = format!(
                "{name} in {}, {order:?}",
                if cancel { "cancel" } else { "seed" }
            );
            let machine = boot();
            kernel::set_initial_delivery(order);
            let port = ok(machine.on_cpu("client start", 0, kernel::client::start));
            if !cancel {
                kernel::fail_next(NetioCall::GetPort, code);
            }
            assert_eq!(
                ok(machine.driver_entry()),
                STATUS_SUCCESS,
                "{case}\n{}",
                output()
            );
            assert!(kernel::wait_for_initial_notifications(
                std::time::Duration::from_secs(5)
            ));
            assert_the_ordering_happened(order);
            if cancel {
                assert_eq!(classify(&machine), u32::from(port), "{case}");
                let handle = kernel::netio_stats().live[0];
                kernel::fail_next(NetioCall::Cancel, code);
                assert!(ok(machine.driver_unload()), "{case}");
                let text = output();
                assert!(
                    text.contains(&format!(
                        "CancelMibChangeNotify2 failed with {:#010x}; the context stays allocated",
                        code.cast_unsigned()
                    )),
                    "{case}\n{text}"
                );
                assert_eq!(kernel::netio_stats().live, [handle], "{case}");
                let blocks = kernel::pool_blocks();
                assert_eq!(
                    (blocks.len(), blocks.first().map(|b| b.tag)),
                    (1, Some(TAG)),
                    "{case}: the context is kept"
                );
                assert_eq!(kernel::stopped(), None, "{case}");
            } else {
                assert!(
                    output().contains(&format!(
                        "loaded; seed 0 (GetTeredoPort status {})",
                        c_alt_hex(code)
                    )),
                    "{case}\n{}",
                    output()
                );
                assert_eq!(classify(&machine), 0, "{case}: no port known");
                let next = ok(machine.on_cpu("client restart", 0, kernel::client::start));
                assert_eq!(classify(&machine), u32::from(next), "{case}");
                unload_clean(&machine);
            }
            cells += 1;
        }
    }
    assert_eq!(cells, 2 * codes.len());
    assert!(
        codes.len() >= 12,
        "10 documented failures and 2 undocumented"
    );
}
