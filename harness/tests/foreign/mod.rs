//! What the scenarios of the drivers that export the C reference driver's classify pair
//! share (`c_reference_scenarios.rs`, `port_monitor.rs`): the stop and output helpers, the
//! `TeredoMonitorClassifyPort` call, the clean-unload check, the orderings, and the
//! `DriverEntry` sweep over the documented `NotifyTeredoPortChange` failures.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use teredo_harness::kernel::{self, InitialDelivery, NetioCall};
use teredo_harness::{Machine, Stop};
use teredo_watcher::sys::DOCUMENTED_STATUS_CODES;

pub const STATUS_SUCCESS: i32 = 0;
pub const STATUS_UNSUCCESSFUL: i32 = 0xC000_0001_u32.cast_signed();

/// The four initial-notification orderings of the kernel model.
pub const ORDERS: [InitialDelivery; 4] = [
    InitialDelivery::CallerThread,
    InitialDelivery::BeforeReturn,
    InitialDelivery::AfterReturn,
    InitialDelivery::DuringQuery,
];

/// The debugger output so far, one string.
pub fn output() -> String {
    kernel::debugger_output().join("\n")
}

/// Fails the test with the stop and the debugger output so far.
pub fn ok<T>(result: Result<T, Stop>) -> T {
    result.unwrap_or_else(|stop| panic!("{stop}\n--- debugger output ---\n{}", output()))
}

/// The driver's classify export, called at `DISPATCH_LEVEL`.
pub fn classify(machine: &Machine) -> u32 {
    // SAFETY: both drivers export `TeredoMonitorClassifyPort` as `ULONG NTAPI (VOID)`,
    // callable at <= DISPATCH_LEVEL while the driver is loaded (the callers unload later).
    ok(unsafe { machine.call_export_u32("TeredoMonitorClassifyPort", kernel::DISPATCH_LEVEL) })
}

/// Unloads and checks what a clean unload leaves: nothing registered, pool balanced, no
/// stop.
pub fn unload_clean(machine: &Machine) {
    assert!(ok(machine.driver_unload()), "DriverEntry set DriverUnload");
    let netio = kernel::netio_stats();
    assert!(netio.live.is_empty(), "registrations left: {netio:?}");
    let pool = kernel::pool_stats();
    assert!(pool.balanced(), "pool after unload: {pool:?}\n{}", output());
    assert_eq!(kernel::stopped(), None);
}

/// What both drivers return for a failed `NotifyTeredoPortChange`: an `NTSTATUS` error as
/// it is, `STATUS_UNSUCCESSFUL` for the Win32 codes the documentation mixes in.
pub fn expected_entry_status(netio_status: i32) -> i32 {
    if netio_status < 0 {
        netio_status
    } else {
        STATUS_UNSUCCESSFUL
    }
}

/// `DriverEntry` of a fresh `boot()` fails with each documented status of
/// `NotifyTeredoPortChange` in turn, sets no `DriverUnload` and leaves nothing registered or
/// allocated; its log names the failed call.
pub fn driver_entry_fails_on_each_documented_status(boot: fn() -> Machine) {
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
