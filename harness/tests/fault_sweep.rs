//! Fault sweep and leak check against the real `.sys`: every netio call the example driver
//! reaches, times every status code KERNEL-FACTS.md names (success included) plus two
//! undocumented ones, times the IRQLs that apply. Printed as a table with
//! `cargo test -p teredo-harness --test fault_sweep -- --nocapture`.
//!
//! # Rows (where the driver reaches netio)
//!
//! | row | call | how it is reached |
//! |---|---|---|
//! | `notify` | `NotifyTeredoPortChange` | `DriverEntry` step 1 |
//! | `seed` | `GetTeredoPort` | `DriverEntry` step 1, seeding the port (failure tolerated) |
//! | `cancel@unload` | `CancelMibChangeNotify2` | `DriverUnload`: the watcher's cancel fails once, the handle table's teardown retries it |
//! | `cancel@unload x2` | `CancelMibChangeNotify2` | `DriverUnload`: the watcher's cancel and the teardown's retry both fail |
//! | `cancel@rollback` | `CancelMibChangeNotify2` | `DriverEntry` step 3's allocation refused, the rollback's cancel fails once, its teardown retries |
//! | `cancel@rollback x2` | `CancelMibChangeNotify2` | as above, the retry fails too |
//!
//! `STATUS_SUCCESS` means nothing is injected (the call does its work), as in the host-mock
//! sweep (`tests/faults.rs`); the model's `fail_next(call, 0)` would return success without
//! doing the work, which is another scenario.
//!
//! # Columns (IRQLs)
//!
//! `DriverEntry` at `PASSIVE_LEVEL`, `APC_LEVEL` or `DISPATCH_LEVEL` (the I/O manager's
//! contract is `PASSIVE_LEVEL`; `DISPATCH_LEVEL` must be refused before netio is reached),
//! times callbacks delivered at `PASSIVE_LEVEL` or `DISPATCH_LEVEL` (the initial notification
//! and one port change after a successful load). `DriverUnload` runs at `PASSIVE_LEVEL`, as
//! the machine calls it.
//!
//! # Orderings
//!
//! Cell `n` (counted over the whole table) registers under the kernel model's
//! initial-notification ordering `n mod 4` (caller thread, before return, after return,
//! during `GetTeredoPort`), so each ordering meets every row at `PASSIVE_LEVEL`; the test
//! checks that all four ran and each cell checks the model's record of its ordering.
//!
//! # What each cell asserts
//!
//! - no bugcheck, no hang (the machine's `Stop`);
//! - the documented outcome: `DriverEntry`'s `NTSTATUS` is the one `src/status.rs` of the
//!   driver documents for the library error (`NTSTATUS` codes pass through, the four Win32
//!   codes map to their `NTSTATUS`, anything else is `STATUS_UNSUCCESSFUL`; an IRQL
//!   violation is `STATUS_INVALID_DEVICE_STATE`), the library's error text and the raw code
//!   are in the driver's `DbgPrint` output; a seed failure still loads with the port unknown;
//!   a cancel failure at unload is reported by the driver;
//! - the driver's event log: event #1 is the initial notification (`port=none`); when the
//!   seed reads the running client's port, event #2 is the seed's snapshot of it (delivered
//!   on `DriverEntry`'s thread, before the driver logs the seed), and the first port change
//!   is event #3; a failed seed delivers no snapshot and the change is event #2;
//! - the netio calls made (none at `DISPATCH_LEVEL`);
//! - pool: balanced, or, when the cancel fails for good, exactly the documented residue
//!   (below);
//! - the model's live registrations: none after a successful unload, and the count the
//!   driver's handle table reports equals the model's;
//! - after a clean unload, a late notification on every handle the driver had is dropped and
//!   the driver prints nothing.
//!
//! # What the cells assert besides the outcome
//!
//! - `DriverEntry` above `PASSIVE_LEVEL` (`APC_LEVEL` is outside the I/O manager's contract,
//!   but within netio's `< DISPATCH_LEVEL`): creating a watcher requires `PASSIVE_LEVEL`, the
//!   level its undo (`unregister`, `teardown`) requires, so step 1 is refused before netio is
//!   reached and no registration can outlive a failed `DriverEntry`.
//! - A failed seed: its raw status reaches the driver's output
//!   (`TeredoPortWatcher::seed_error`), and the `seed` cells check the error text and code.
//! - `cancel@unload` (once): the teardown's retry cancels the registration (0 live, pool
//!   balanced), and the driver reports a clean unload (clean means the teardown left nothing
//!   failed or skipped).
//!
//! # The documented residue (`x2` rows)
//!
//! When `CancelMibChangeNotify2` fails for the watcher and again for the teardown, netio may
//! still call the registration: the library must not free the context it handed to netio.
//! Pool is then NOT balanced, by design. The residue is exactly: every block live before
//! `DriverUnload` except the driver state box (`cancel@unload x2`: one block freed), or every
//! block `DriverEntry` allocated (`cancel@rollback x2`: nothing freed); it includes the
//! context netio holds for the one registration the model still shows live, and the
//! driver's table reports it too (`1 failed, 1 live` at unload, `failed 1` in the rollback).
//! At unload the driver then keeps its image loaded (a reference on its driver object,
//! never dropped): the cell delivers a late notification, which runs the mapped trampoline
//! and prints nothing (the library silenced the subscribers), with no stop. A failed
//! `DriverEntry` has no such policy: the image is retired with the registration live, so no
//! late notification is delivered in the `cancel@rollback x2` cells (on Windows it would run
//! code of an unloaded image).
#![cfg(all(target_arch = "x86_64", unix))]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Instant;

use teredo_harness::kernel::{self, Delivery, FwpCall, InitialDelivery, NetioCall, PoolBlock};
use teredo_harness::{Machine, Stop, sysbuild};
use teredo_watcher::sys::DOCUMENTED_STATUS_CODES;

const STATUS_UNSUCCESSFUL: i32 = 0xC000_0001_u32.cast_signed();
const STATUS_INVALID_HANDLE: i32 = 0xC000_0008_u32.cast_signed();
const STATUS_INVALID_PARAMETER: i32 = 0xC000_000D_u32.cast_signed();
const STATUS_NO_MEMORY: i32 = 0xC000_0017_u32.cast_signed();
const STATUS_INSUFFICIENT_RESOURCES: i32 = 0xC000_009A_u32.cast_signed();
const STATUS_DEVICE_NOT_READY: i32 = 0xC000_00A3_u32.cast_signed();
const STATUS_NOT_SUPPORTED: i32 = 0xC000_00BB_u32.cast_signed();
const STATUS_INVALID_DEVICE_STATE: i32 = 0xC000_0184_u32.cast_signed();

/// Not named by the documentation (marked `*` in the table).
const UNDOCUMENTED: [(&str, i32); 2] = [
    ("STATUS_UNSUCCESSFUL*", STATUS_UNSUCCESSFUL),
    ("ERROR_ACCESS_DENIED*", 5),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Row {
    Notify,
    Seed,
    CancelAtUnload,
    CancelAtUnloadTwice,
    CancelInRollback,
    CancelInRollbackTwice,
}

const ROWS: [Row; 6] = [
    Row::Notify,
    Row::Seed,
    Row::CancelAtUnload,
    Row::CancelAtUnloadTwice,
    Row::CancelInRollback,
    Row::CancelInRollbackTwice,
];

impl Row {
    fn title(self) -> &'static str {
        match self {
            Row::Notify => "notify: NotifyTeredoPortChange in DriverEntry",
            Row::Seed => "seed: GetTeredoPort in DriverEntry (seeding the port)",
            Row::CancelAtUnload => {
                "cancel@unload: CancelMibChangeNotify2 in DriverUnload fails once (teardown retries)"
            }
            Row::CancelAtUnloadTwice => {
                "cancel@unload x2: CancelMibChangeNotify2 in DriverUnload fails for the watcher and the teardown"
            }
            Row::CancelInRollback => {
                "cancel@rollback: step 3 allocation refused, the rollback's cancel fails once (teardown retries)"
            }
            Row::CancelInRollbackTwice => {
                "cancel@rollback x2: step 3 allocation refused, the rollback's cancel and its retry fail"
            }
        }
    }

    fn cancel_failures(self) -> usize {
        match self {
            Row::CancelAtUnload | Row::CancelInRollback => 1,
            Row::CancelAtUnloadTwice | Row::CancelInRollbackTwice => 2,
            Row::Notify | Row::Seed => 0,
        }
    }

    fn rollback(self) -> bool {
        matches!(self, Row::CancelInRollback | Row::CancelInRollbackTwice)
    }
}

/// The initial-notification orderings of the kernel model, taken in turn cell by cell.
const ORDERS: [InitialDelivery; 4] = [
    InitialDelivery::CallerThread,
    InitialDelivery::BeforeReturn,
    InitialDelivery::AfterReturn,
    InitialDelivery::DuringQuery,
];

#[derive(Clone, Copy, Debug)]
struct Column {
    entry: u8,
    callback: u8,
}

const COLUMNS: [Column; 6] = [
    Column {
        entry: kernel::PASSIVE_LEVEL,
        callback: kernel::PASSIVE_LEVEL,
    },
    Column {
        entry: kernel::PASSIVE_LEVEL,
        callback: kernel::DISPATCH_LEVEL,
    },
    Column {
        entry: kernel::APC_LEVEL,
        callback: kernel::PASSIVE_LEVEL,
    },
    Column {
        entry: kernel::APC_LEVEL,
        callback: kernel::DISPATCH_LEVEL,
    },
    Column {
        entry: kernel::DISPATCH_LEVEL,
        callback: kernel::PASSIVE_LEVEL,
    },
    Column {
        entry: kernel::DISPATCH_LEVEL,
        callback: kernel::DISPATCH_LEVEL,
    },
];

fn irql_name(irql: u8) -> &'static str {
    match irql {
        kernel::PASSIVE_LEVEL => "PASSIVE_LEVEL",
        kernel::APC_LEVEL => "APC_LEVEL",
        kernel::DISPATCH_LEVEL => "DISPATCH_LEVEL",
        _ => "IRQL ?",
    }
}

fn short_irql(irql: u8) -> &'static str {
    match irql {
        kernel::PASSIVE_LEVEL => "P",
        kernel::APC_LEVEL => "A",
        kernel::DISPATCH_LEVEL => "D",
        _ => "?",
    }
}

fn codes() -> Vec<(&'static str, i32)> {
    DOCUMENTED_STATUS_CODES
        .iter()
        .copied()
        .chain(UNDOCUMENTED)
        .collect()
}

fn hex(code: i32) -> String {
    format!("{:#010x}", code.cast_unsigned())
}

/// The `NTSTATUS` the driver documents (`examples/teredo-monitor/src/status.rs`) for the
/// library error of a failing netio `code`, written out here independently.
fn documented_entry_status(code: i32) -> i32 {
    match code {
        c if c < 0 => c,
        6 => STATUS_INVALID_HANDLE,
        8 => STATUS_INSUFFICIENT_RESOURCES,
        21 => STATUS_DEVICE_NOT_READY,
        87 => STATUS_INVALID_PARAMETER,
        _ => STATUS_UNSUCCESSFUL,
    }
}

/// What the library's error says for a failing `code` (the KERNEL-FACTS.md category).
fn documented_error_text(code: i32) -> &'static str {
    match code {
        STATUS_INVALID_PARAMETER | 87 => "invalid parameter",
        STATUS_INVALID_HANDLE | 6 => "invalid handle",
        STATUS_NO_MEMORY | STATUS_INSUFFICIENT_RESOURCES | 8 => "out of memory",
        STATUS_DEVICE_NOT_READY | 21 => "the Teredo client is not started",
        STATUS_NOT_SUPPORTED => "no IPv6 stack is installed",
        _ => " failed: status ",
    }
}

fn output() -> String {
    kernel::debugger_output().join("\n")
}

/// Fails the cell unless `condition`, with `what` and the debugger output.
fn ensure(condition: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if condition {
        Ok(())
    } else {
        Err(format!("{}\n--- debugger output ---\n{}", what(), output()))
    }
}

fn stop<T>(result: Result<T, Stop>) -> Result<T, String> {
    result.map_err(|stop| format!("{stop}\n--- debugger output ---\n{}", output()))
}

/// The driver's log contains a line with every one of `parts`.
fn logged(parts: &[&str]) -> bool {
    kernel::debugger_output()
        .iter()
        .any(|l| l.starts_with("teredo-monitor: ") && parts.iter().all(|p| l.contains(p)))
}

/// The driver's log lines that contain every one of `parts`.
fn driver_lines(parts: &[&str]) -> Vec<String> {
    kernel::debugger_output()
        .into_iter()
        .filter(|l| l.starts_with("teredo-monitor: ") && parts.iter().all(|p| l.contains(p)))
        .collect()
}

/// The driver's log has, in this order (other lines between them allowed), a line with all
/// parts of `lines[0]`, then one with all parts of `lines[1]`, and so on.
fn ensure_in_order(lines: &[&[&str]]) -> Result<(), String> {
    let output = kernel::debugger_output();
    let mut from = 0;
    for parts in lines {
        let found = output[from..]
            .iter()
            .position(|l| l.starts_with("teredo-monitor: ") && parts.iter().all(|p| l.contains(p)));
        match found {
            Some(at) => from += at + 1,
            None => {
                return ensure(false, || {
                    format!(
                        "no driver line with all of {parts:?} after the lines of {lines:?} before it"
                    )
                });
            }
        }
    }
    Ok(())
}

fn ensure_logged(parts: &[&str]) -> Result<(), String> {
    ensure(logged(parts), || {
        format!("no driver line with all of {parts:?}")
    })
}

fn boot(sys: &[u8]) -> Result<Machine, String> {
    Machine::boot(sys, false).map_err(|e| format!("the .sys must load: {e}"))
}

fn classify(machine: &Machine) -> Result<u32, String> {
    // SAFETY: `TeredoMonitorClassifyPort` is `unsafe extern "system" fn() -> u32` in the
    // shim, callable at <= DISPATCH_LEVEL while the driver is loaded; `DriverUnload` runs
    // only after this call has been joined.
    stop(unsafe { machine.call_export_u32("TeredoMonitorClassifyPort", kernel::DISPATCH_LEVEL) })
}

/// How many pool allocations a successful `DriverEntry` makes (the last one is the driver
/// state box, step 3).
fn entry_allocations(sys: &[u8]) -> Result<u64, String> {
    let machine = boot(sys)?;
    let status = stop(machine.driver_entry())?;
    ensure(status == 0, || {
        format!("baseline DriverEntry returned {status:#x}")
    })?;
    let allocations = kernel::pool_stats().allocations;
    ensure(stop(machine.driver_unload())?, || "no DriverUnload".into())?;
    ensure(kernel::pool_stats().balanced(), || "baseline pool".into())?;
    Ok(allocations)
}

/// Runs one cell on a fresh machine; `Ok` is the short outcome for the table.
#[allow(
    clippy::too_many_lines,
    reason = "one cell's scenario, read top to bottom"
)]
fn run_cell(
    sys: &[u8],
    entry_allocations: u64,
    row: Row,
    code: i32,
    column: Column,
    order: InitialDelivery,
) -> Result<String, String> {
    let machine = boot(sys)?;
    kernel::set_callback_irql(column.callback);
    kernel::set_initial_delivery(order);
    // The client runs before the driver loads: the seed has a port to read.
    let client_port = stop(machine.on_cpu("client start", 0, kernel::client::start))?;
    let fails = code != 0;
    if fails {
        match row {
            Row::Notify => kernel::fail_next(NetioCall::Notify, code),
            Row::Seed => kernel::fail_next(NetioCall::GetPort, code),
            _ => {
                for _ in 0..row.cancel_failures() {
                    kernel::fail_next(NetioCall::Cancel, code);
                }
            }
        }
    }
    if row.rollback() {
        // Refuse the driver state box, DriverEntry's last allocation (step 3).
        kernel::fail_allocation_after(entry_allocations - 1);
    }

    let status = stop(machine.driver_entry_at(column.entry))?;
    let cb = irql_name(column.callback);
    ensure_logged(&["DriverEntry at ", irql_name(column.entry)])?;

    // Above PASSIVE_LEVEL (APC or DISPATCH): refused before netio is reached, whatever was
    // injected: creating a watcher requires the level its undo requires.
    if column.entry >= kernel::APC_LEVEL {
        ensure(status == STATUS_INVALID_DEVICE_STATE, || {
            format!(
                "DriverEntry at {} returned {status:#x}",
                irql_name(column.entry)
            )
        })?;
        ensure_logged(&["step 1/3", "requires IRQL == PASSIVE_LEVEL", &hex(status)])?;
        let netio = kernel::netio_stats();
        ensure(netio.calls == [0, 0, 0], || {
            format!(
                "netio reached at {}: {:?}",
                irql_name(column.entry),
                netio.calls
            )
        })?;
        let engine_calls = kernel::fwp_stats().calls;
        ensure(engine_calls.iter().all(|n| *n == 0), || {
            format!(
                "the filter engine reached at {}: {engine_calls:?}",
                irql_name(column.entry)
            )
        })?;
        ensure(machine.driver_unload_routine().is_none(), || {
            "DriverUnload set on failure".into()
        })?;
        let pool = kernel::pool_stats();
        ensure(pool.balanced() && pool.allocations == 0, || {
            format!("pool {pool:?}")
        })?;
        ensure(!stop(machine.driver_unload())?, || "unloaded".into())?;
        ensure(kernel::stopped().is_none(), || "stopped".into())?;
        return Ok(format!("IRQL {}", hex(status)));
    }

    // NotifyTeredoPortChange fails: DriverEntry fails with the documented status and leaves
    // nothing registered or allocated.
    if row == Row::Notify && fails {
        let expected = documented_entry_status(code);
        ensure(status == expected, || {
            format!(
                "DriverEntry returned {}, documented {}",
                hex(status),
                hex(expected)
            )
        })?;
        ensure_logged(&[
            "step 1/3",
            "NotifyTeredoPortChange",
            documented_error_text(code),
            &hex(code),
            &format!("(status {})", hex(expected)),
        ])?;
        let netio = kernel::netio_stats();
        ensure(netio.calls == [1, 0, 0], || {
            format!("calls {:?}", netio.calls)
        })?;
        ensure(netio.handles.is_empty() && netio.live.is_empty(), || {
            format!("registered: {netio:?}")
        })?;
        ensure_engine_closed()?;
        ensure(machine.driver_unload_routine().is_none(), || {
            "DriverUnload set on failure".into()
        })?;
        let pool = kernel::pool_stats();
        ensure(pool.balanced(), || format!("pool leaked: {pool:?}"))?;
        ensure(!stop(machine.driver_unload())?, || "unloaded".into())?;
        ensure(kernel::stopped().is_none(), || "stopped".into())?;
        return Ok(format!("fail {}", hex(status)));
    }

    // With `AfterReturn` the initial notification may still be on its way.
    ensure(
        kernel::wait_for_initial_notifications(std::time::Duration::from_secs(5)),
        || "the initial notification never ran".into(),
    )?;
    // A rollback may cancel an `AfterReturn` registration before its initial notification
    // ran (netio then drops it), or silence the driver before it runs: at most one then.
    let late_initial = order == InitialDelivery::AfterReturn && row.rollback();
    let records = kernel::netio_stats().initial;
    // An initial notification delivered after the return may arrive while the seed's
    // snapshot round runs on the thread of `DriverEntry`: the library then coalesces it into
    // that pass, which delivers it on that thread, at its IRQL.
    let initials: Vec<String> = driver_lines(&["event #", "MibInitialNotification"])
        .into_iter()
        .filter(|l| {
            l.contains(&format!("at {cb}"))
                || (order == InitialDelivery::AfterReturn
                    && l.contains(&format!("at {}", irql_name(column.entry))))
        })
        .collect();
    if late_initial {
        ensure(
            records.len() <= 1 && records.iter().all(|r| r.order == order) && initials.len() <= 1,
            || format!("initial notification records {records:?}, lines {initials:?}"),
        )?;
    } else {
        ensure(records.len() == 1 && records[0].order == order, || {
            format!("initial notification records {records:?}, ordering {order:?}")
        })?;
        ensure(initials.len() == 1, || {
            format!("one initial notification line expected: {initials:?}")
        })?;
    }
    // The client runs at load, so a successful seed installs its port and the library
    // delivers a snapshot of it to the subscribers installed so far (the event logger), on
    // the thread of `DriverEntry`, before the driver reports the seed; a failed seed installs
    // nothing and delivers no snapshot. The initial notification comes first unless it is
    // delivered after `NotifyTeredoPortChange` returned (`AfterReturn`): then either order.
    let seed_fails = row == Row::Seed && fails;
    let snapshots = driver_lines(&["event #", "snapshot"]);
    let snapshot = [
        "snapshot",
        &format!("port=udp/{client_port}"),
        &format!("at {}", irql_name(column.entry)),
    ];
    if seed_fails {
        ensure(snapshots.is_empty(), || {
            format!("a failed seed delivered a snapshot: {snapshots:?}")
        })?;
        ensure_logged(&["event #1: MibInitialNotification", "port=none"])?;
    } else if order == InitialDelivery::AfterReturn {
        ensure(snapshots.len() == 1, || {
            format!("one seed snapshot expected: {snapshots:?}")
        })?;
        ensure(
            logged(&[&["event #1: "][..], &snapshot].concat())
                || logged(&[&["event #2: "][..], &snapshot].concat()),
            || format!("the seed's snapshot is event #1 or #2: {snapshots:?}"),
        )?;
        ensure_in_order(&[&snapshot, &["GetTeredoPort seeded port="]])?;
    } else {
        ensure_in_order(&[
            &["event #1: MibInitialNotification", "port=none"],
            &[&["event #2: "][..], &snapshot].concat(),
            &["GetTeredoPort seeded port="],
        ])?;
        ensure(snapshots.len() == 1, || {
            format!("one seed snapshot expected: {snapshots:?}")
        })?;
    }
    // The event number of the first port change after the load.
    let first_change = if seed_fails { 2 } else { 3 };

    if row.rollback() {
        return rollback_cell(&machine, entry_allocations, row, code, status);
    }

    // Loaded.
    ensure(status == 0, || {
        format!("DriverEntry returned {}", hex(status))
    })?;
    ensure(machine.driver_unload_routine().is_some(), || {
        "no DriverUnload".into()
    })?;
    let seeded = if row == Row::Seed && fails {
        "none".to_owned()
    } else {
        format!("udp/{client_port}")
    };
    ensure_logged(&[&format!("GetTeredoPort seeded port={seeded}")])?;
    if row == Row::Seed && fails {
        // The raw status reaches the driver's output.
        ensure_logged(&[
            "the seed failed: GetTeredoPort",
            documented_error_text(code),
            &hex(code),
        ])?;
    }
    ensure_logged(&["DriverEntry: loaded (status 0x00000000)"])?;
    let read = classify(&machine)?;
    let expected_read = if row == Row::Seed && fails {
        0
    } else {
        u32::from(client_port)
    };
    ensure(read == expected_read, || {
        format!("classify read {read}, expected {expected_read}")
    })?;
    let netio = kernel::netio_stats();
    ensure(netio.calls == [1, 1, 0], || {
        format!("calls {:?}", netio.calls)
    })?;
    ensure(netio.live.len() == 1, || format!("live {:?}", netio.live))?;
    let contexts = kernel::live_contexts();
    let blocks = kernel::pool_blocks();
    ensure(
        contexts.len() == 1 && blocks.iter().any(|b| b.address == contexts[0].1),
        || format!("netio's context {contexts:x?} is not a live pool block: {blocks:x?}"),
    )?;

    // A port change, delivered at the column's callback IRQL.
    let new_port = stop(machine.on_cpu("client restart", 0, kernel::client::start))?;
    ensure_logged(&[
        &format!("event #{first_change}: MibParameterNotification"),
        &format!("port=udp/{new_port}"),
        &format!("at {cb}"),
    ])?;
    ensure(classify(&machine)? == u32::from(new_port), || {
        "classify misses the new port".into()
    })?;
    let before_unload = kernel::pool_blocks();

    ensure(stop(machine.driver_unload())?, || "no DriverUnload".into())?;
    ensure(kernel::stopped().is_none(), || "stopped".into())?;
    let netio = kernel::netio_stats();
    let pool = kernel::pool_stats();
    // The watcher's cancel, and the teardown's retry when it failed.
    let cancels = if fails && row.cancel_failures() > 0 {
        2
    } else {
        1
    };
    ensure(netio.calls == [1, 1, cancels], || {
        format!("calls {:?}, expected {cancels} cancels", netio.calls)
    })?;

    if row == Row::CancelAtUnloadTwice && fails {
        // The documented residue: the registration stays live and its context is not freed.
        ensure_logged(&[
            "DriverUnload: cancel failed: ",
            "CancelMibChangeNotify2",
            documented_error_text(code),
            &hex(code),
        ])?;
        ensure_logged(&["handle table torn down: 0 left to cancel, 1 failed, 1 live"])?;
        ensure_logged(&["unload left registrations behind"])?;
        ensure(netio.live.len() == 1, || {
            format!("model live {:?}, table says 1", netio.live)
        })?;
        let residue = kernel::pool_blocks();
        let before: BTreeSet<PoolBlock> = before_unload.iter().copied().collect();
        let after: BTreeSet<PoolBlock> = residue.iter().copied().collect();
        ensure(
            after.is_subset(&before) && after.len() < before.len(),
            || {
                format!(
                    "residue must be blocks live before unload, less what the unload freed (the \
                 driver state box, the firewall's):\nbefore {before_unload:x?}\nafter {residue:x?}"
                )
            },
        )?;
        let context = kernel::live_contexts();
        ensure(
            context.len() == 1 && residue.iter().any(|b| b.address == context[0].1),
            || format!("netio's context {context:x?} was freed: {residue:x?}"),
        )?;
        ensure(pool.live_blocks == residue.len(), || {
            format!("pool {pool:?}")
        })?;
        ensure_engine_closed()?;
        // The unload policy: the driver keeps its image loaded with a reference on its
        // driver object, so a late notification runs mapped code; the library silenced the
        // subscribers, so the driver prints nothing.
        ensure_in_order(&[
            &["1 failed, 1 live"],
            &["keeping the image loaded"],
            &["took a reference on the driver object"],
        ])?;
        ensure(
            kernel::driver_object_references() == 1 && !machine.image().is_retired(),
            || {
                format!(
                    "image kept: {} references, retired {}",
                    kernel::driver_object_references(),
                    machine.image().is_retired()
                )
            },
        )?;
        let (handle, lines, delivered) = (
            context[0].0,
            kernel::debugger_output().len(),
            kernel::netio_stats().delivered,
        );
        let late = stop(machine.on_cpu("late notification", 0, move || {
            kernel::deliver(handle, 40_000, kernel::MIB_PARAMETER_NOTIFICATION)
        }))?;
        ensure(
            late == Delivery::Delivered
                && kernel::netio_stats().delivered == delivered + 1
                && kernel::debugger_output().len() == lines
                && kernel::stopped().is_none(),
            || format!("late notification {late:?} into the kept image"),
        )?;
        return Ok(format!(
            "residue {}b/{}B",
            pool.live_blocks, pool.live_bytes
        ));
    }

    if row == Row::CancelAtUnload && fails {
        ensure_logged(&[
            "DriverUnload: cancel failed: ",
            "CancelMibChangeNotify2",
            documented_error_text(code),
            &hex(code),
        ])?;
        ensure_logged(&["handle table torn down: 1 left to cancel, 0 failed, 0 live"])?;
        // The teardown's retry cancelled it: the unload is clean.
        ensure(!logged(&["unload left registrations behind"]), || {
            "the shim reports registrations left behind after a successful retry".into()
        })?;
    } else {
        ensure_logged(&["registration cancelled after 2 notifications"])?;
        ensure_logged(&["handle table torn down: 0 left to cancel, 0 failed, 0 live"])?;
    }
    ensure(netio.live.is_empty(), || {
        format!("registrations left after unload: {:?}", netio.live)
    })?;
    ensure(pool.balanced(), || format!("pool after unload: {pool:?}"))?;
    late_notifications_dropped(&machine)?;
    Ok(match (row, fails) {
        (Row::Seed, true) => "ok, port none".to_owned(),
        (Row::CancelAtUnload, true) => "ok, retried".to_owned(),
        _ => "ok".to_owned(),
    })
}

/// `DriverEntry`'s step 3 allocation was refused: the rollback cancels (or its teardown
/// does), the status is `STATUS_INSUFFICIENT_RESOURCES`.
fn rollback_cell(
    machine: &Machine,
    entry_allocations: u64,
    row: Row,
    code: i32,
    status: i32,
) -> Result<String, String> {
    let fails = code != 0;
    ensure(status == STATUS_INSUFFICIENT_RESOURCES, || {
        format!("DriverEntry returned {}", hex(status))
    })?;
    ensure_logged(&["step 3/3 (store the driver state) failed: out of memory"])?;
    ensure(machine.driver_unload_routine().is_none(), || {
        "DriverUnload set on failure".into()
    })?;
    let cancels = if fails { 2 } else { 1 };
    let netio = kernel::netio_stats();
    ensure(netio.calls == [1, 1, cancels], || {
        format!("calls {:?}, expected {cancels} cancels", netio.calls)
    })?;
    if fails {
        ensure_logged(&[
            "rollback: cancel failed (",
            "CancelMibChangeNotify2",
            documented_error_text(code),
            &hex(code),
        ])?;
    } else {
        ensure_logged(&["rolled back: registration cancelled"])?;
    }
    ensure(!stop(machine.driver_unload())?, || "unloaded".into())?;
    ensure(kernel::stopped().is_none(), || "stopped".into())?;
    let pool = kernel::pool_stats();
    if row == Row::CancelInRollbackTwice && fails {
        ensure_logged(&["rollback: teardown cancelled 0, failed 1"])?;
        let pool = entry_residue(entry_allocations)?;
        return Ok(format!(
            "residue {}b/{}B",
            pool.live_blocks, pool.live_bytes
        ));
    }
    if fails {
        ensure_logged(&["rollback: teardown cancelled 1, failed 0"])?;
    }
    ensure(netio.live.is_empty(), || {
        format!("registrations left: {:?}", netio.live)
    })?;
    ensure(pool.balanced() && pool.refused == 1, || {
        format!("pool after the rollback: {pool:?}")
    })?;
    late_notifications_dropped(machine)?;
    Ok(format!(
        "fail {}{}",
        hex(status),
        if fails { ", retried" } else { "" }
    ))
}

/// The residue of a `DriverEntry` that failed at step 3 with its registration left live:
/// the one registration the model shows live, its context a live pool block, and exactly
/// the blocks `DriverEntry` allocated (all but the refused one), none freed.
fn entry_residue(entry_allocations: u64) -> Result<kernel::PoolStats, String> {
    let pool = kernel::pool_stats();
    let live = kernel::live_contexts();
    let residue = kernel::pool_blocks();
    ensure(
        live.len() == 1 && residue.iter().any(|b| b.address == live[0].1),
        || format!("netio's context {live:x?} is not a live pool block: {residue:x?}"),
    )?;
    ensure(
        pool.refused == 1
            && pool.allocations == entry_allocations - 1
            && u64::try_from(residue.len()) == Ok(pool.allocations - pool.frees)
            && pool.live_blocks == residue.len(),
        || format!("residue {residue:x?}, pool {pool:?}"),
    )?;
    ensure_engine_closed()?;
    Ok(pool)
}

/// The filter engine keeps nothing of the driver's: no session, no transaction, no object.
fn ensure_engine_closed() -> Result<(), String> {
    let engine = kernel::fwp_stats();
    ensure(
        engine.live_sessions.is_empty()
            && engine.open_transactions == 0
            && engine.committed == (0, 0, 0),
        || format!("the filter engine keeps {engine:?}"),
    )
}

/// After a clean unload (the image is retired): a notification on every handle the driver
/// ever had is dropped by netio, the driver prints nothing, and the filter engine keeps
/// nothing of the driver's.
fn late_notifications_dropped(machine: &Machine) -> Result<(), String> {
    late_notifications_dropped_by_netio(machine)?;
    ensure_engine_closed()
}

/// After an unload that cancelled every registration (the image is retired): a
/// notification on every handle the driver ever had is dropped by netio, and the driver
/// prints nothing.
fn late_notifications_dropped_by_netio(machine: &Machine) -> Result<(), String> {
    let netio = kernel::netio_stats();
    let lines = kernel::debugger_output().len();
    for handle in netio.handles {
        let late = stop(machine.on_cpu("late notification", 0, move || {
            kernel::deliver(handle, 40_000, kernel::MIB_PARAMETER_NOTIFICATION)
        }))?;
        ensure(late == Delivery::Dropped, || {
            format!("late notification on {handle:#x} delivered")
        })?;
    }
    ensure(kernel::debugger_output().len() == lines, || {
        "the retired driver printed".into()
    })?;
    ensure(kernel::netio_stats().delivered == netio.delivered, || {
        "a callback ran after unload".into()
    })
}

#[test]
#[allow(
    clippy::too_many_lines,
    reason = "the sweep and its table, read top to bottom"
)]
fn fault_sweep_on_the_sys() {
    let started = Instant::now();
    let sys = sysbuild::sys_image().unwrap_or_else(|e| panic!("the .sys must build: {e}"));
    let built = started.elapsed();
    let sweep_started = Instant::now();
    let entry_allocations =
        entry_allocations(sys).unwrap_or_else(|e| panic!("baseline DriverEntry: {e}"));
    assert!(
        entry_allocations >= 2,
        "DriverEntry allocates at several steps"
    );

    let codes = codes();
    let mut table = String::new();
    let mut failures = Vec::new();
    let mut cells = 0usize;
    let mut orders_run = BTreeSet::new();
    let mut header = String::new();
    for c in COLUMNS {
        let title = format!(
            "entry {} / cb {}",
            short_irql(c.entry),
            short_irql(c.callback)
        );
        let _ = write!(header, "{title:<25}");
    }
    for row in ROWS {
        let _ = writeln!(table, "\n{}", row.title());
        let _ = writeln!(table, "  {:<41}{}", "status", header.trim_end());
        for &(name, code) in &codes {
            let mut line = format!("  {:<41}", format!("{name} {}", hex(code)));
            for column in COLUMNS {
                cells += 1;
                // The initial-notification orderings in turn: every one meets each row
                // with DriverEntry at PASSIVE_LEVEL (columns 0 and 1 of every six cells).
                let order = ORDERS[cells % ORDERS.len()];
                orders_run.insert(format!("{order:?}"));
                let outcome = run_cell(sys, entry_allocations, row, code, column, order);
                let text = match outcome {
                    Ok(text) => text,
                    Err(why) => {
                        failures.push(format!(
                            "{row:?} x {name} x entry {} / callbacks {}: {why}",
                            irql_name(column.entry),
                            irql_name(column.callback)
                        ));
                        "FAIL".to_owned()
                    }
                };
                let _ = write!(line, "{text:<25}");
            }
            let _ = writeln!(table, "{}", line.trim_end());
        }
    }
    // The filter-engine rows, when the image imports fwpkclnt.sys.
    let imports_engine = teredo_harness::pe::facts(sys).is_ok_and(|f| {
        f.modules()
            .iter()
            .any(|m| m.eq_ignore_ascii_case("fwpkclnt.sys"))
    });
    let mut engine = None;
    if imports_engine {
        match engine_rows::sweep(sys) {
            Ok(mut sweep) => {
                table.push_str(&sweep.table);
                cells += sweep.cells();
                failures.append(&mut sweep.failures);
                engine = Some(sweep);
            }
            Err(why) => failures.push(format!("filter engine baseline: {why}")),
        }
    } else {
        table.push_str(
            "\nfilter engine rows skipped: the image imports nothing from fwpkclnt.sys\n",
        );
    }
    let swept = sweep_started.elapsed();
    println!("{table}");
    println!(
        "legend: entry/cb = IRQL of DriverEntry / of the callbacks (P PASSIVE, A APC, D DISPATCH); \
         * = undocumented code; IRQL = refused before netio with this status; fail = \
         DriverEntry's status; residue Nb/MB = N pool blocks, M bytes left by design (the \
         registration stays live); residue: session+prov+subl = a failed FwpmEngineClose0 \
         left the driver's session open with its provider and sublayer, no filter"
    );
    let engine_cells = engine.as_ref().map_or(0, engine_rows::Sweep::cells);
    let engine_summary = engine.as_ref().map_or_else(
        || "0 cells".to_owned(),
        |e| {
            format!(
                "{engine_cells} cells: DriverEntry {} rows / {} cells, port change {} / {}, \
                 DriverUnload {} / {}, a failed change whose abort fails {}",
                e.rows[0],
                e.entry_cells,
                e.rows[1],
                e.change_cells,
                e.rows[2],
                e.unload_cells,
                e.abort_cells
            )
        },
    );
    println!(
        "fault sweep on the .sys: {} of {cells} cells hold (netio: {} rows x {} codes x {} \
         IRQL columns; filter engine: {engine_summary}; sweep {:.2} s, image build {:.2} s)",
        cells - failures.len(),
        ROWS.len(),
        codes.len(),
        COLUMNS.len(),
        swept.as_secs_f64(),
        built.as_secs_f64()
    );
    assert_eq!(
        cells,
        ROWS.len() * codes.len() * COLUMNS.len() + engine_cells
    );
    if imports_engine {
        let e = engine
            .as_ref()
            .unwrap_or_else(|| panic!("the filter-engine baseline failed: {failures:?}"));
        // Floors from what the baseline checks: `DriverUnload` makes a begin, at least one
        // delete, a commit and a close; a change adds at least one filter; every call fails
        // with each of its documented statuses, with callbacks at two IRQLs.
        let statuses = |calls: &[FwpCall]| -> usize {
            calls.iter().map(|c| c.documented_failures().len()).sum()
        };
        let unload_floor = 2 * statuses(&[
            FwpCall::TransactionBegin,
            FwpCall::FilterDeleteById,
            FwpCall::TransactionCommit,
            FwpCall::EngineClose,
        ]);
        let abort_floor = 2
            * FwpCall::TransactionAbort.documented_failures().len()
            * FwpCall::FilterAdd.documented_failures().len();
        assert!(
            e.entry_cells >= 2
                && e.change_cells >= 2
                && e.unload_cells >= unload_floor
                && e.abort_cells >= abort_floor,
            "the filter-engine rows ran: {engine_summary} (floors: 2, 2, {unload_floor}, \
             {abort_floor})"
        );
    }
    assert_eq!(
        orders_run.len(),
        ORDERS.len(),
        "every ordering ran: {orders_run:?}"
    );
    assert!(
        failures.is_empty(),
        "{} cells fail:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The two accessors this sweep added to the kernel model (`pool_blocks`, `live_contexts`)
/// report what the image's calls did.
#[test]
fn the_model_lists_live_pool_blocks_and_netio_contexts() {
    use core::ffi::c_void;
    type Alloc = extern "win64" fn(u64, usize, u32) -> *mut c_void;
    type Free = extern "win64" fn(*mut c_void, u32);
    type Callback = extern "win64" fn(*mut c_void, u16, i32);
    type Notify = extern "win64" fn(Callback, *mut c_void, u8, *mut usize) -> i32;
    type Cancel = extern "win64" fn(usize) -> i32;
    extern "win64" fn ignore(_: *mut c_void, _: u16, _: i32) {}
    fn host<T>(module: &str, name: &str) -> T {
        let address = kernel::resolve(module, name).expect("modelled");
        assert_eq!(size_of::<T>(), size_of::<usize>());
        // SAFETY: every use below names `T` as the function pointer type of the documented
        // signature of `module!name`, which is the signature of the model's function.
        unsafe { std::mem::transmute_copy::<usize, T>(&address) }
    }

    let sys = sysbuild::sys_image().unwrap_or_else(|e| panic!("the .sys must build: {e}"));
    let _machine = Machine::boot(sys, false).unwrap_or_else(|e| panic!("loads: {e}"));
    assert!(kernel::pool_blocks().is_empty());
    assert!(kernel::live_contexts().is_empty());
    let tag = u32::from_le_bytes(*b"Test");
    let alloc: Alloc = host("ntoskrnl.exe", "ExAllocatePool2");
    let free: Free = host("ntoskrnl.exe", "ExFreePoolWithTag");
    let block = alloc(kernel::POOL_FLAG_NON_PAGED, 24, tag);
    assert!(!block.is_null());
    assert_eq!(
        kernel::pool_blocks(),
        [PoolBlock {
            address: block.addr(),
            size: 24,
            tag
        }]
    );

    let notify: Notify = host("netio.sys", "NotifyTeredoPortChange");
    let cancel: Cancel = host("netio.sys", "CancelMibChangeNotify2");
    let mut handle = 0usize;
    assert_eq!(notify(ignore, block, 0, &raw mut handle), 0);
    assert_eq!(kernel::live_contexts(), [(handle, block.addr())]);
    assert_eq!(cancel(handle), 0);
    assert!(
        kernel::live_contexts().is_empty(),
        "a cancelled registration is not listed"
    );
    free(block, tag);
    assert!(kernel::pool_blocks().is_empty());
}

/// The filter-engine rows: every call the driver makes to `fwpkclnt.sys` fails in turn with
/// each of its documented statuses (`FwpCall::documented_failures`), at `DriverEntry`, at a
/// port change and at `DriverUnload`, with callbacks at `PASSIVE_LEVEL` and at
/// `DISPATCH_LEVEL`; then each call of a port change that leaves a transaction to abort
/// fails with each of its statuses while the following `FwpmTransactionAbort0` fails with
/// each of its own.
///
/// # A failed abort
///
/// Only `STATUS_SUCCESS` says "the transaction was aborted" (`FwpmTransactionAbort0`'s
/// page), and a session has one transaction at a time ("Object Management"): after an abort
/// that fails with another status than `STATUS_FWP_NO_TXN_IN_PROGRESS`, the transaction is
/// still open, and the next change's `FwpmTransactionBegin0` is refused with
/// `STATUS_FWP_TXN_IN_PROGRESS`. The driver's transaction then aborts the stale one and
/// begins again, so the next change commits the newest port: what every abort cell checks.
mod engine_rows {
    use std::fmt::Write as _;
    use std::time::{Duration, Instant};

    use teredo_harness::firewall;
    use teredo_harness::kernel::{self, FwpCall};

    use super::{
        STATUS_INVALID_HANDLE, boot, ensure, hex, late_notifications_dropped_by_netio, logged,
        short_irql, stop,
    };

    /// `STATUS_FWP_TXN_IN_PROGRESS`: a second `FwpmTransactionBegin0` in one session.
    const STATUS_FWP_TXN_IN_PROGRESS: i32 = 0xC022_000E_u32.cast_signed();

    /// Why an abort cell does not hold.
    pub enum AbortFailure {
        /// The failed abort's transaction stayed open and blocked the next change (the old
        /// port's exception stayed committed while the client ran on the new port). The
        /// text is what unload left.
        TransactionLeftOpen(String),
        /// Anything else.
        Other(String),
    }

    impl From<String> for AbortFailure {
        fn from(why: String) -> Self {
            AbortFailure::Other(why)
        }
    }

    /// How long the driver's work item may take to commit or give up.
    const SETTLE: Duration = Duration::from_secs(5);

    /// Where a failing call is reached.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Phase {
        /// Inside `DriverEntry` (before it returns).
        Entry,
        /// In the driver's handling of a port change (its `PASSIVE_LEVEL` work item).
        Change,
        /// Inside `DriverUnload` (the removal transaction, then the close).
        Unload,
    }

    /// One row: the `index`-th call of its phase, the `nth` call of that routine within
    /// the phase.
    #[derive(Clone, Copy, Debug)]
    pub struct EngineRow {
        pub phase: Phase,
        pub call: FwpCall,
        pub nth: u64,
    }

    fn count(call: FwpCall) -> u64 {
        kernel::fwp_stats().calls[call as usize]
    }

    /// Waits until `cond` holds, at most [`SETTLE`].
    fn settle(cond: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        while !cond() {
            if start.elapsed() > SETTLE || kernel::stopped().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    fn committed_port(reported: &[u16]) -> (bool, Option<u16>) {
        let a = firewall::analyse(&kernel::committed().objects, reported);
        (a.policy, a.committed)
    }

    /// Nothing of the engine left, no registration, no work item, pool balanced.
    fn ensure_clean(what: &str) -> Result<(), String> {
        let engine = kernel::fwp_stats();
        ensure(
            engine.live_sessions.is_empty()
                && engine.open_transactions == 0
                && engine.committed == (0, 0, 0),
            || format!("{what}: the engine keeps {engine:?}"),
        )?;
        ensure_clean_outside_engine(what)
    }

    /// No registration, no work item, pool balanced.
    fn ensure_clean_outside_engine(what: &str) -> Result<(), String> {
        ensure(kernel::netio_stats().live.is_empty(), || {
            format!("{what}: registrations left")
        })?;
        ensure(settle(|| kernel::work_items_outstanding() == 0), || {
            format!("{what}: a work item is outstanding")
        })?;
        ensure(kernel::work_item_stats().live == 0, || {
            format!("{what}: a work item is still allocated")
        })?;
        let pool = kernel::pool_stats();
        ensure(pool.balanced(), || format!("{what}: pool {pool:?}"))
    }

    /// The baseline: the calls `DriverEntry` makes (the client running at load), the calls
    /// one port change makes, and the calls `DriverUnload` makes after it, in order.
    pub fn baseline(sys: &[u8]) -> Result<Vec<EngineRow>, String> {
        let machine = boot(sys)?;
        let p0 = stop(machine.on_cpu("client start", 0, kernel::client::start))?;
        let status = stop(machine.driver_entry())?;
        ensure(status == 0, || {
            format!("baseline DriverEntry {}", hex(status))
        })?;
        let entry = kernel::fwp_trace();
        ensure(settle(|| committed_port(&[p0]) == (true, Some(p0))), || {
            format!("baseline: port {p0} never committed")
        })?;
        let before_change = kernel::fwp_trace().len();
        let p1 = stop(machine.on_cpu("client restart", 0, kernel::client::start))?;
        ensure(
            settle(|| committed_port(&[p0, p1]) == (true, Some(p1))),
            || format!("baseline: port {p1} never committed"),
        )?;
        ensure(settle(|| kernel::work_items_outstanding() == 0), || {
            "baseline: work item outstanding".into()
        })?;
        let before_unload = kernel::fwp_trace().len();
        let change = kernel::fwp_trace()[before_change..before_unload].to_vec();
        ensure(stop(machine.driver_unload())?, || "no DriverUnload".into())?;
        ensure_clean("baseline unload")?;
        let unload = kernel::fwp_trace()[before_unload..].to_vec();
        let rows = |phase, trace: &[(FwpCall, i32)]| {
            let mut seen = std::collections::BTreeMap::<FwpCall, u64>::new();
            trace
                .iter()
                .map(|(call, _)| {
                    let n = seen.entry(*call).or_default();
                    let row = EngineRow {
                        phase,
                        call: *call,
                        nth: *n,
                    };
                    *n += 1;
                    row
                })
                .collect::<Vec<_>>()
        };
        let mut all = rows(Phase::Entry, &entry);
        all.extend(rows(Phase::Change, &change));
        all.extend(rows(Phase::Unload, &unload));
        let unload_calls: Vec<FwpCall> = unload.iter().map(|(call, _)| *call).collect();
        // The removal the driver documents: one transaction of filter deletes, then the close.
        ensure(
            all.iter().any(|r| r.phase == Phase::Entry)
                && all.iter().any(|r| r.phase == Phase::Change)
                && unload_calls.len() >= 4
                && unload_calls[0] == FwpCall::TransactionBegin
                && unload_calls[1..unload_calls.len() - 2]
                    .iter()
                    .all(|c| *c == FwpCall::FilterDeleteById)
                && unload_calls[unload_calls.len() - 2..]
                    == [FwpCall::TransactionCommit, FwpCall::EngineClose],
            || {
                format!(
                    "the driver calls the engine at DriverEntry, at a change and at unload \
                     (begin, deletes, commit, close): {all:?}"
                )
            },
        )?;
        Ok(all)
    }

    /// `DriverEntry` with the row's call failing: it returns the failure and leaves nothing
    /// (or, if it loaded anyway, the exception is in place and unload is clean).
    fn entry_cell(sys: &[u8], row: EngineRow, code: i32, callback: u8) -> Result<String, String> {
        let machine = boot(sys)?;
        kernel::set_callback_irql(callback);
        let p0 = stop(machine.on_cpu("client start", 0, kernel::client::start))?;
        kernel::fail_call(row.call, row.nth, code);
        let status = stop(machine.driver_entry())?;
        ensure(kernel::fwp_trace().contains(&(row.call, code)), || {
            format!("the injected {} was not reached", row.call.name())
        })?;
        if status != 0 {
            ensure(status == code, || {
                format!(
                    "DriverEntry returned {}, not the failure {}",
                    hex(status),
                    hex(code)
                )
            })?;
            ensure(machine.driver_unload_routine().is_none(), || {
                "DriverUnload set on failure".into()
            })?;
            ensure(logged(&[&hex(code)]), || {
                format!("the failure {} is not in the driver's log", hex(code))
            })?;
            ensure(!stop(machine.driver_unload())?, || "unloaded".into())?;
            ensure_clean("failed DriverEntry")?;
            return Ok(format!("fail {}", hex(status)));
        }
        // Loaded: the driver retried, so the exception must be in place.
        ensure(settle(|| committed_port(&[p0]) == (true, Some(p0))), || {
            format!(
                "loaded after a failed {} without the exception for {p0}",
                row.call.name()
            )
        })?;
        ensure(stop(machine.driver_unload())?, || "no DriverUnload".into())?;
        ensure_clean("unload")?;
        Ok("ok, retried".into())
    }

    /// A port change with the row's call failing: the old exception stays committed, the
    /// failure is logged, the next change commits the newest port, nothing leaks.
    fn change_cell(sys: &[u8], row: EngineRow, code: i32, callback: u8) -> Result<String, String> {
        let machine = boot(sys)?;
        kernel::set_callback_irql(callback);
        let t0 = Instant::now();
        let p0 = stop(machine.on_cpu("client start", 0, kernel::client::start))?;
        ensure(stop(machine.driver_entry())? == 0, || {
            "DriverEntry failed".into()
        })?;
        ensure(settle(|| committed_port(&[p0]) == (true, Some(p0))), || {
            format!("port {p0} never committed")
        })?;
        ensure(settle(|| kernel::work_items_outstanding() == 0), || {
            "work item outstanding before the change".into()
        })?;
        let from = Instant::now();
        kernel::fail_call(row.call, count(row.call) + row.nth, code);
        let t1 = Instant::now();
        let p1 = stop(machine.on_cpu("client restart", 0, kernel::client::start))?;
        ensure(
            settle(|| kernel::fwp_trace().contains(&(row.call, code))),
            || format!("the injected {} was not reached", row.call.name()),
        )?;
        ensure(
            settle(|| {
                kernel::work_items_outstanding() == 0 && kernel::fwp_stats().open_transactions == 0
            }),
            || "the failed change left a work item or a transaction".into(),
        )?;
        let (policy, after) = committed_port(&[p0, p1]);
        ensure(policy && (after == Some(p0) || after == Some(p1)), || {
            format!("after the failed change the committed port is {after:?} (policy {policy})")
        })?;
        ensure(logged(&[&hex(code)]), || {
            format!("the failure {} is not in the driver's log", hex(code))
        })?;
        let t2 = Instant::now();
        let p2 = stop(machine.on_cpu("client restart", 0, kernel::client::start))?;
        ensure(
            settle(|| committed_port(&[p0, p1, p2]) == (true, Some(p2))),
            || format!("the next change never committed {p2}"),
        )?;
        let checks = firewall::commit_checks(
            &kernel::commit_history(),
            &[(t0, p0), (t1, p1), (t2, p2)],
            from,
            Instant::now(),
        );
        ensure(
            checks.gaps.is_empty() && checks.doubles.is_empty() && checks.unreported.is_empty(),
            || format!("commits: {checks:?}"),
        )?;
        ensure(stop(machine.driver_unload())?, || "no DriverUnload".into())?;
        ensure_clean("unload")?;
        Ok(if after == Some(p0) {
            "kept old, next ok".to_owned()
        } else {
            "retried at once".to_owned()
        })
    }

    /// The driver's engine session after the baseline's load and change.
    struct Loaded {
        session: Vec<usize>,
    }

    /// Boots, loads the driver with the client running, and makes one port change; returns
    /// once the second port is committed and no work item is left.
    fn load_and_change(machine: &teredo_harness::Machine) -> Result<Loaded, String> {
        let p0 = stop(machine.on_cpu("client start", 0, kernel::client::start))?;
        ensure(stop(machine.driver_entry())? == 0, || {
            "DriverEntry failed".into()
        })?;
        ensure(settle(|| committed_port(&[p0]) == (true, Some(p0))), || {
            format!("port {p0} never committed")
        })?;
        let p1 = stop(machine.on_cpu("client restart", 0, kernel::client::start))?;
        ensure(
            settle(|| {
                committed_port(&[p0, p1]) == (true, Some(p1))
                    && kernel::work_items_outstanding() == 0
            }),
            || format!("port {p1} never committed, or a work item is outstanding"),
        )?;
        let session = kernel::fwp_stats().live_sessions;
        ensure(session.len() == 1, || {
            format!("one session of the driver's: {session:x?}")
        })?;
        Ok(Loaded { session })
    }

    /// `DriverUnload` with the row's call failing (after a load and one change, as in the
    /// baseline): no stop, the failure logged, the registration cancelled, no work item,
    /// pool balanced, and the engine:
    ///
    /// - a failed begin, delete or commit: the removal transaction is aborted (nothing of
    ///   it committed), then the close of the dynamic session deletes every object of the
    ///   driver's: nothing is left;
    /// - a failed close: only `STATUS_SUCCESS` says the session was closed (`fwpmk.h`'s
    ///   page), and a dynamic session's objects go only when it ends (WFP's "Object
    ///   Management"), so the model keeps the session open with what the removal did not
    ///   delete. The driver cannot close it again (its handle was consumed by the call), so
    ///   the residue is exactly: that session, no transaction, no filter (the removal
    ///   committed their deletion, so no filter of the driver classifies any more), and the
    ///   provider and sublayer (the removal deletes filters only). Except for
    ///   `STATUS_INVALID_HANDLE`, which says no such session exists: the model ends it as a
    ///   close does, and nothing is left.
    fn unload_cell(
        sys: &[u8],
        row: EngineRow,
        code: i32,
        callback: u8,
        deletes: usize,
    ) -> Result<String, String> {
        let machine = boot(sys)?;
        kernel::set_callback_irql(callback);
        let loaded = load_and_change(&machine)?;
        kernel::fail_call(row.call, count(row.call) + row.nth, code);
        ensure(stop(machine.driver_unload())?, || "no DriverUnload".into())?;
        ensure(kernel::stopped().is_none(), || "stopped".into())?;
        ensure(kernel::fwp_trace().contains(&(row.call, code)), || {
            format!("the injected {} was not reached", row.call.name())
        })?;
        ensure(
            logged(&["DriverUnload: registration cancelled after "])
                && logged(&["handle table torn down: 0 left to cancel, 0 failed, 0 live"]),
            || "the registration was not cancelled by DriverUnload".into(),
        )?;
        late_notifications_dropped_by_netio(&machine)?;
        if row.call == FwpCall::EngineClose && code != STATUS_INVALID_HANDLE {
            ensure(
                logged(&[
                    "firewall: closing the engine failed (FwpmEngineClose0 failed: ",
                    &hex(code),
                    &format!("); {deletes} filters were deleted"),
                ]),
                || format!("the failed close {} is not in the driver's log", hex(code)),
            )?;
            let engine = kernel::fwp_stats();
            ensure(
                engine.live_sessions == loaded.session
                    && engine.open_transactions == 0
                    && engine.committed == (1, 1, 0),
                || {
                    format!(
                        "after a failed close the engine keeps exactly the session {:x?}, its \
                         provider and sublayer, no filter: {engine:?}",
                        loaded.session
                    )
                },
            )?;
            ensure_clean_outside_engine("unload")?;
            return Ok("residue: session+prov+subl".into());
        }
        if row.call == FwpCall::EngineClose {
            ensure(
                logged(&[
                    "firewall: closing the engine failed (FwpmEngineClose0 failed: ",
                    &hex(code),
                ]),
                || format!("the failed close {} is not in the driver's log", hex(code)),
            )?;
            ensure_clean("unload")?;
            return Ok("closed, nothing left".into());
        }
        ensure(
            logged(&[
                "firewall: deleting the filters failed (",
                row.call.name(),
                &hex(code),
                "); engine closed",
            ]),
            || format!("the failure {} is not in the driver's log", hex(code)),
        )?;
        ensure_clean("unload")?;
        Ok("closed, nothing left".into())
    }

    /// A port change whose `row` call fails with `code`, and whose abort then fails with
    /// `abort_code`: no snapshot is published by it (the old exception stays committed),
    /// both failures are logged, the next change commits the newest port with no gap or
    /// double, and after it no transaction is open; unload leaves nothing.
    #[allow(
        clippy::too_many_lines,
        reason = "one cell's scenario, read top to bottom"
    )]
    fn abort_cell(
        sys: &[u8],
        row: EngineRow,
        code: i32,
        abort_code: i32,
        callback: u8,
    ) -> Result<String, AbortFailure> {
        let machine = boot(sys)?;
        kernel::set_callback_irql(callback);
        let t0 = Instant::now();
        let p0 = stop(machine.on_cpu("client start", 0, kernel::client::start))?;
        ensure(stop(machine.driver_entry())? == 0, || {
            "DriverEntry failed".into()
        })?;
        ensure(
            settle(|| {
                committed_port(&[p0]) == (true, Some(p0)) && kernel::work_items_outstanding() == 0
            }),
            || format!("port {p0} never committed"),
        )?;
        let from = Instant::now();
        let published = kernel::commit_history().len();
        kernel::fail_call(row.call, count(row.call) + row.nth, code);
        kernel::fail_call(
            FwpCall::TransactionAbort,
            count(FwpCall::TransactionAbort),
            abort_code,
        );
        let t1 = Instant::now();
        let p1 = stop(machine.on_cpu("client restart", 0, kernel::client::start))?;
        ensure(
            settle(|| {
                let trace = kernel::fwp_trace();
                trace.contains(&(row.call, code))
                    && trace.contains(&(FwpCall::TransactionAbort, abort_code))
                    && kernel::work_items_outstanding() == 0
            }),
            || {
                format!(
                    "the injected {} then {} were not both reached",
                    row.call.name(),
                    FwpCall::TransactionAbort.name()
                )
            },
        )?;
        let history = kernel::commit_history();
        ensure(history.len() == published, || {
            format!(
                "the failed change published {} snapshots",
                history.len() - published
            )
        })?;
        ensure(committed_port(&[p0, p1]) == (true, Some(p0)), || {
            "the old exception is no longer the committed one".into()
        })?;
        ensure(
            logged(&["changing the dynamic port", &hex(code)])
                && logged(&[
                    "firewall: abort: FwpmTransactionAbort0 failed: ",
                    &hex(abort_code),
                ]),
            || {
                format!(
                    "the failures {} and {} are not both in the driver's log",
                    hex(code),
                    hex(abort_code)
                )
            },
        )?;
        let t2 = Instant::now();
        let before_next = kernel::fwp_trace().len();
        let p2 = stop(machine.on_cpu("client restart", 0, kernel::client::start))?;
        // The stale transaction makes the next begin fail with STATUS_FWP_TXN_IN_PROGRESS;
        // the driver must abort it and begin again, so the change commits the newest port.
        let committed_newest = settle(|| {
            committed_port(&[p0, p1, p2]) == (true, Some(p2))
                && kernel::work_items_outstanding() == 0
        });
        if !committed_newest {
            let refused = kernel::fwp_trace()[before_next..]
                .contains(&(FwpCall::TransactionBegin, STATUS_FWP_TXN_IN_PROGRESS));
            let engine = kernel::fwp_stats();
            if refused && engine.open_transactions == 1 {
                return Err(AbortFailure::TransactionLeftOpen(format!(
                    "the next change was refused and never committed {p2}; engine {engine:?}"
                )));
            }
            return Err(AbortFailure::Other(format!(
                "the next change never committed {p2} (engine {engine:?})"
            )));
        }
        ensure(kernel::fwp_stats().open_transactions == 0, || {
            format!("a transaction is still open: {:?}", kernel::fwp_stats())
        })?;
        let checks = firewall::commit_checks(
            &kernel::commit_history(),
            &[(t0, p0), (t1, p1), (t2, p2)],
            from,
            Instant::now(),
        );
        ensure(
            checks.gaps.is_empty() && checks.doubles.is_empty() && checks.unreported.is_empty(),
            || format!("commits: {checks:?}"),
        )?;
        let open = kernel::fwp_stats().open_transactions;
        ensure(open == 0, || format!("{open} transactions left open"))?;
        ensure(stop(machine.driver_unload())?, || "no DriverUnload".into())?;
        ensure_clean("unload")?;
        Ok("kept old, next ok".into())
    }

    /// What [`sweep`] ran.
    pub struct Sweep {
        pub table: String,
        pub failures: Vec<String>,
        /// Cells per phase: `DriverEntry`, a port change, `DriverUnload`.
        pub entry_cells: usize,
        pub change_cells: usize,
        pub unload_cells: usize,
        /// Rows per phase, in the same order.
        pub rows: [usize; 3],
        /// Cells of a failed change whose abort fails too.
        pub abort_cells: usize,
    }

    impl Sweep {
        pub fn cells(&self) -> usize {
            self.entry_cells + self.change_cells + self.unload_cells + self.abort_cells
        }
    }

    /// Runs every row x status x callback IRQL, then the failed changes whose abort fails
    /// too.
    #[allow(
        clippy::too_many_lines,
        reason = "the engine rows and their table, read top to bottom"
    )]
    pub fn sweep(sys: &[u8]) -> Result<Sweep, String> {
        let rows = baseline(sys)?;
        let deletes = rows
            .iter()
            .filter(|r| r.phase == Phase::Unload && r.call == FwpCall::FilterDeleteById)
            .count();
        let mut table = String::new();
        let mut cells = [0usize; 3];
        let mut failures = Vec::new();
        let columns = [kernel::PASSIVE_LEVEL, kernel::DISPATCH_LEVEL];
        let _ = writeln!(
            table,
            "\nfilter engine (fwpkclnt.sys): each call the driver makes fails in turn; columns: \
             callbacks at {}",
            columns.map(short_irql).join(" / ")
        );
        for (index, row) in rows.iter().enumerate() {
            let phase = match row.phase {
                Phase::Entry => "DriverEntry",
                Phase::Change => "port change",
                Phase::Unload => "DriverUnload",
            };
            let _ = writeln!(
                table,
                "  #{index:<2} {phase:<11} {} (its call {} there)",
                row.call.name(),
                row.nth + 1
            );
            for (name, code) in row.call.documented_failures() {
                let mut line = format!("      {:<44}", format!("{name} {}", hex(code)));
                for callback in columns {
                    cells[row.phase as usize] += 1;
                    let outcome = match row.phase {
                        Phase::Entry => entry_cell(sys, *row, code, callback),
                        Phase::Change => change_cell(sys, *row, code, callback),
                        Phase::Unload => unload_cell(sys, *row, code, callback, deletes),
                    };
                    let text = outcome.unwrap_or_else(|why| {
                        failures.push(format!(
                            "{phase} #{index} {} x {name} x callbacks {}: {why}",
                            row.call.name(),
                            short_irql(callback)
                        ));
                        "FAIL".to_owned()
                    });
                    let _ = write!(line, "{text:<28}");
                }
                let _ = writeln!(table, "{}", line.trim_end());
            }
        }

        let aborts = FwpCall::TransactionAbort.documented_failures();
        let mut header = String::new();
        for (_, code) in &aborts {
            for callback in columns {
                let _ = write!(
                    header,
                    "{:<28}",
                    format!("abort {} / {}", hex(*code), short_irql(callback))
                );
            }
        }
        let _ = writeln!(
            table,
            "\nport change failing, then its {} failing too ({}); columns: the abort's status \
             / callbacks at {}\n      {:<44}{}",
            FwpCall::TransactionAbort.name(),
            aborts
                .iter()
                .map(|(name, code)| format!("{name} {}", hex(*code)))
                .collect::<Vec<_>>()
                .join(", "),
            columns.map(short_irql).join(" or "),
            "the change's failing call and status",
            header.trim_end()
        );
        let mut abort_cells = 0;
        // A failed begin opens no transaction, so no abort follows it.
        for (index, row) in rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.phase == Phase::Change && r.call != FwpCall::TransactionBegin)
        {
            let _ = writeln!(
                table,
                "  #{index:<2} port change {} (its call {} there)",
                row.call.name(),
                row.nth + 1
            );
            for (name, code) in row.call.documented_failures() {
                let mut line = format!("      {:<44}", format!("{name} {}", hex(code)));
                for &(abort_name, abort_code) in &aborts {
                    for callback in columns {
                        abort_cells += 1;
                        let cell = format!(
                            "port change #{index} {} x {name}, then abort x {abort_name} x \
                             callbacks {}",
                            row.call.name(),
                            short_irql(callback)
                        );
                        let text = match abort_cell(sys, *row, code, abort_code, callback) {
                            Ok(text) => text,
                            Err(AbortFailure::TransactionLeftOpen(left)) => {
                                failures
                                    .push(format!("{cell}: the transaction was left open: {left}"));
                                "FAIL".to_owned()
                            }
                            Err(AbortFailure::Other(why)) => {
                                failures.push(format!("{cell}: {why}"));
                                "FAIL".to_owned()
                            }
                        };
                        let _ = write!(line, "{text:<28}");
                    }
                }
                let _ = writeln!(table, "{}", line.trim_end());
            }
        }
        let count_rows = |phase| rows.iter().filter(|r| r.phase == phase).count();
        Ok(Sweep {
            table,
            failures,
            entry_cells: cells[Phase::Entry as usize],
            change_cells: cells[Phase::Change as usize],
            unload_cells: cells[Phase::Unload as usize],
            rows: [
                count_rows(Phase::Entry),
                count_rows(Phase::Change),
                count_rows(Phase::Unload),
            ],
            abort_cells,
        })
    }
}
