//! The C reference driver (`examples/c-reference/`, built with mingw-w64) in the harness: a
//! driver written as Microsoft's documentation shows, not fitted to the harness.
//!
//! Where its outcome differs from the Rust driver's by design, the test says so: the C
//! driver calls `CancelMibChangeNotify2` from inside its own callback when made to (the
//! library refuses that before netio sees it), and netio must report the deadlock it would
//! be on Windows instead of hanging.
//!
//! Without `x86_64-w64-mingw32-gcc` these tests are ignored, with the reason (see
//! `harness/build.rs`); CI installs it and requires it.
#![cfg(all(target_arch = "x86_64", unix))]

use teredo_harness::kernel::{self, NetioCall};
use teredo_harness::{Machine, Stop, pe, sysbuild};
use teredo_watcher::sys::DOCUMENTED_STATUS_CODES;

const STATUS_SUCCESS: i32 = 0;
const STATUS_UNSUCCESSFUL: i32 = 0xC000_0001_u32.cast_signed();
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

fn output() -> String {
    kernel::debugger_output().join("\n")
}

/// Fails the test with the stop and the debugger output so far.
fn ok<T>(result: Result<T, Stop>) -> T {
    result.unwrap_or_else(|stop| panic!("{stop}\n--- debugger output ---\n{}", output()))
}

/// The driver's classify export, called at `DISPATCH_LEVEL`.
fn classify(machine: &Machine) -> u32 {
    // SAFETY: `TeredoMonitorClassifyPort` is `ULONG NTAPI (VOID)` in teredo_reference.c,
    // callable at <= DISPATCH_LEVEL while the driver is loaded (it is: unload comes later).
    ok(unsafe { machine.call_export_u32("TeredoMonitorClassifyPort", kernel::DISPATCH_LEVEL) })
}

/// Unloads and checks what a clean unload leaves: nothing registered, pool balanced, no
/// stop.
fn unload_clean(machine: &Machine) {
    assert!(ok(machine.driver_unload()), "DriverEntry set DriverUnload");
    let netio = kernel::netio_stats();
    assert!(netio.live.is_empty(), "registrations left: {netio:?}");
    let pool = kernel::pool_stats();
    assert!(pool.balanced(), "pool after unload: {pool:?}\n{}", output());
    assert_eq!(kernel::stopped(), None);
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

/// What the C driver returns for a failed `NotifyTeredoPortChange`: an `NTSTATUS` error as
/// it is, `STATUS_UNSUCCESSFUL` for the Win32 codes the documentation mixes in.
fn expected_entry_status(netio_status: i32) -> i32 {
    if netio_status < 0 {
        netio_status
    } else {
        STATUS_UNSUCCESSFUL
    }
}

#[test]
#[cfg_attr(
    not(teredo_harness_mingw),
    ignore = "needs x86_64-w64-mingw32-gcc (apt-get install gcc-mingw-w64-x86-64)"
)]
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
        assert_eq!(machine.driver_unload_routine(), None, "{name}");
        let netio = kernel::netio_stats();
        assert!(netio.live.is_empty(), "{name}: {netio:?}");
        assert!(kernel::pool_stats().balanced(), "{name}: pool leaked");
        assert!(output().contains("NotifyTeredoPortChange failed"), "{name}");
        failures += 1;
    }
    assert_eq!(failures, DOCUMENTED_STATUS_CODES.len() - 1);
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
