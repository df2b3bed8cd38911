//! The host model of the kernel the driver imports from: ntoskrnl's IRQL, spin locks,
//! threads, waits, pool, bugcheck and debugger print, netio's Teredo API, and the filter
//! engine's management calls (fwpkclnt.sys).
//!
//! Every function the image imports is an `extern "win64"` function here (the Windows x64
//! calling convention, which the driver's `extern "system"` calls use). The model keeps the
//! documented rules and stops the machine, as the kernel or Driver Verifier would, when they
//! are broken:
//!
//! - IRQL is per thread. `KeAcquireSpinLockRaiseToDpc` raises to `DISPATCH_LEVEL` and
//!   returns the old IRQL, `KeReleaseSpinLock` restores it; a recursive acquire or a
//!   release by a non-owner bugchecks (`SPIN_LOCK_ALREADY_OWNED`, `SPIN_LOCK_NOT_OWNED`).
//! - The netio functions check their documented IRQL (`< DISPATCH_LEVEL` for
//!   `NotifyTeredoPortChange`/`GetTeredoPort`, `PASSIVE_LEVEL` for `CancelMibChangeNotify2`);
//!   a call above it bugchecks `IRQL_NOT_LESS_OR_EQUAL`. So does a wait above `APC_LEVEL`.
//! - Callbacks of one registration never overlap; a cancel waits for a callback in flight;
//!   a cancel from inside that callback (a deadlock on Windows) is reported and refused with
//!   `STATUS_POSSIBLE_DEADLOCK`; a notification for a cancelled handle is dropped.
//! - Pool blocks are tracked by address and tag; a free of an unknown block, a double free
//!   or a wrong tag bugchecks as Driver Verifier does (`0xC4`); blocks allocated with
//!   `POOL_FLAG_UNINITIALIZED` are filled with `0xCD` so that nothing can rely on zeroes.
//! - `KeBugCheckEx` (and every violation above) records the stop code and halts the thread
//!   for good; every other thread that enters the model afterwards halts too.
//!
//! One machine runs at a time (see [`crate::machine::Machine`]), so the state is global.
//!
//! # What is modelled
//!
//! | routine (ntoskrnl.exe unless named) | IRQL rule checked | on violation |
//! |---|---|---|
//! | `KeGetCurrentIrql`, `PsGetCurrentThreadId` | any | - |
//! | `KfRaiseIrql`, `KeRaiseIrqlToDpcLevel` | new >= current | `IRQL_NOT_GREATER_OR_EQUAL` |
//! | `KeLowerIrql`, `KfLowerIrql` | new <= current | `IRQL_NOT_LESS_OR_EQUAL` |
//! | `KeInitializeSpinLock` | any | - |
//! | `KeAcquireSpinLockRaiseToDpc` / `KeReleaseSpinLock` | `<= DISPATCH_LEVEL` / `== DISPATCH_LEVEL`; owner | `0x0A` / `0x08`; `0x0F`, `0x10` |
//! | `KeAcquireSpinLockAtDpcLevel` / `KeReleaseSpinLockFromDpcLevel` | `>= DISPATCH_LEVEL`; owner | `0x09`; `0x0F`, `0x10` |
//! | `KeInitializeEvent`, `KeSetEvent`, `KeResetEvent`, `KeClearEvent`, `KeReadStateEvent` | `<= DISPATCH_LEVEL` | `0x0A` |
//! | `KeWaitForSingleObject` (events only) | `<= APC_LEVEL`, or `DISPATCH_LEVEL` with a zero timeout | `0x0A` |
//! | `KeDelayExecutionThread` | `<= APC_LEVEL` | `0x0A` |
//! | `ExAllocatePool2`, `ExAllocatePoolWithTag`, `ExAllocatePool` | paged `<= APC_LEVEL`, non-paged `<= DISPATCH_LEVEL`; size > 0 | `0xC4` |
//! | `ExFreePoolWithTag`, `ExFreePool` | `<= DISPATCH_LEVEL`; live block; tag | `0xC4` |
//! | `IoAllocateWorkItem`, `IoFreeWorkItem`, `IoInitializeWorkItem`, `IoUninitializeWorkItem`, `IoQueueWorkItem`, `IoQueueWorkItemEx`, `IoSizeofWorkItem` | `<= DISPATCH_LEVEL`; not queued twice, not freed queued, `IoQueueWorkItem` needs a device object; the routine returns at `PASSIVE_LEVEL` | `0x0A`, `WORKER_INVALID` (`0xE4`), `0xE1` |
//! | `ObfReferenceObject`/`ObReferenceObject`, `ObfDereferenceObject`/`ObDereferenceObject` | `<= DISPATCH_LEVEL`; the driver object's count never below the I/O manager's | `0x0A`, `REFERENCE_BY_POINTER` (`0x18`) |
//! | `RtlInitUnicodeString`, `RtlInitAnsiString`, `RtlCopyUnicodeString` | `<= DISPATCH_LEVEL` | `0x0A` |
//! | `memcpy`, `memmove`, `memset`, `memcmp`, `strlen` | any | - |
//! | `DbgPrint`, `DbgPrintEx`, `vDbgPrintEx` | any; Unicode conversions only at `PASSIVE_LEVEL` | reported ([`dbgprint_problems`]) |
//! | `KeBugCheckEx` | any | the stop itself |
//! | netio.sys `NotifyTeredoPortChange`, `GetTeredoPort` / `CancelMibChangeNotify2` | `<= APC_LEVEL` / `PASSIVE_LEVEL` | `0x0A` |
//! | fwpkclnt.sys `FwpmEngineOpen0`, `FwpmEngineClose0`, `FwpmTransactionBegin0`, `FwpmTransactionCommit0`, `FwpmTransactionAbort0`, `FwpmProviderAdd0`, `FwpmSubLayerAdd0`, `FwpmFilterAdd0`, `FwpmFilterDeleteById0`, `FwpmSubLayerDeleteByKey0`, `FwpmProviderDeleteByKey0` | `PASSIVE_LEVEL` | `0x0A` |
//!
//! A reference the driver holds on its driver object, and a queued or running work item,
//! keep the image mapped after `DriverUnload` ([`object`], [`workitem`]).
//!
//! # Layout
//!
//! This module holds the shared state (one lock, one condition variable), the constants and
//! the import table ([`resolve`]); each subsystem is a submodule: [`irql`] (IRQL, thread
//! ids, spin locks), [`pool`], [`wait`] (delays, events and waits), [`dbgprint`] (debugger
//! output), [`bugcheck`] (stops), [`crt`] (the C runtime routines ntoskrnl exports),
//! [`netio`] (the Teredo API and the modelled client) and [`fwp`] (fwpkclnt.sys: the filter
//! engine's management calls and the classification through its committed filters). Everything public is re-exported
//! here, so `kernel::X` names every item.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub mod bugcheck;
pub mod crt;
pub mod dbgprint;
pub mod fwp;
pub mod irql;
pub mod netio;
pub mod object;
pub mod pool;
pub mod strings;
#[cfg(target_os = "linux")]
pub mod trap;
pub mod wait;
pub mod workitem;

pub use bugcheck::{Bugcheck, bugcheck, stopped};
pub use dbgprint::{ArgSource, Formatted, dbgprint_problems, format, run_in_next_callback};
pub use fwp::{
    Action, CommitCause, Condition, EngineObjects, Field, Filter, FwpCall, FwpStats, Layer, Packet,
    Snapshot, Verdict, Weight, classify, commit_history, committed, fail_call, fwp_stats,
    fwp_trace,
};
pub use irql::{current_irql, set_irql, thread_id};
pub use netio::{
    Delivery, InitialDelivery, InitialRecord, NetioCall, NetioStats, client, deliver, fail_next,
    fail_next_cancel_after_wait, invoke_overlapping, live_contexts, netio_stats,
    notify_null_handle_next, overlap_inside_next_callback, query_returns_next, set_callback_irql,
    set_initial_delivery, set_ipv6, wait_for_initial_notifications,
};
pub use object::{AfterUnload, after_driver_unload, driver_object_references, set_driver_object};
pub use pool::{PoolBlock, PoolStats, fail_allocation_after, pool_blocks, pool_stats};
pub use strings::{AnsiString, UnicodeString};
pub use workitem::{WORKER_INVALID, WorkItemStats, work_item_stats, work_items_outstanding};

use bugcheck::ke_bug_check_ex;
use crt::{memcmp, memcpy, memmove, memset, strlen};
use dbgprint::{IN_CALLBACK_HOOK, dbg_print, dbg_print_ex, v_dbg_print_ex};
use irql::{
    ke_acquire_spin_lock_at_dpc_level, ke_acquire_spin_lock_raise_to_dpc, ke_get_current_irql,
    ke_initialize_spin_lock, ke_lower_irql, ke_raise_irql_to_dpc_level, ke_release_spin_lock,
    ke_release_spin_lock_from_dpc_level, kf_raise_irql, ps_get_current_thread_id,
};
use netio::{Netio, cancel_mib_change_notify2, get_teredo_port, notify_teredo_port_change};
use object::{Objects, obf_dereference_object, obf_reference_object};
use pool::{
    Pool, ex_allocate_pool, ex_allocate_pool_with_tag, ex_allocate_pool2, ex_free_pool,
    ex_free_pool_with_tag,
};
use strings::{rtl_copy_unicode_string, rtl_init_ansi_string, rtl_init_unicode_string};
use wait::{
    ke_clear_event, ke_delay_execution_thread, ke_initialize_event, ke_read_state_event,
    ke_reset_event, ke_set_event, ke_wait_for_single_object,
};
use workitem::{
    WorkItems, io_allocate_work_item, io_free_work_item, io_initialize_work_item,
    io_queue_work_item, io_queue_work_item_ex, io_sizeof_work_item, io_uninitialize_work_item,
};

/// `PASSIVE_LEVEL`.
pub const PASSIVE_LEVEL: u8 = 0;
/// `APC_LEVEL`.
pub const APC_LEVEL: u8 = 1;
/// `DISPATCH_LEVEL`.
pub const DISPATCH_LEVEL: u8 = 2;

/// `STATUS_SUCCESS`.
pub const STATUS_SUCCESS: i32 = 0;
/// `STATUS_TIMEOUT`: a wait ended by its timeout.
pub const STATUS_TIMEOUT: i32 = 0x102;
/// `STATUS_NOT_SUPPORTED`.
pub const STATUS_NOT_SUPPORTED: i32 = 0xC000_00BB_u32.cast_signed();
/// `STATUS_POSSIBLE_DEADLOCK`: the model's answer to a cancel from inside the callback.
pub const STATUS_POSSIBLE_DEADLOCK: i32 = 0xC000_0194_u32.cast_signed();
/// `ERROR_INVALID_HANDLE`.
pub const ERROR_INVALID_HANDLE: i32 = 6;
/// `ERROR_NOT_READY`.
pub const ERROR_NOT_READY: i32 = 21;
/// `ERROR_INVALID_PARAMETER`.
pub const ERROR_INVALID_PARAMETER: i32 = 87;

/// `MibParameterNotification`.
pub const MIB_PARAMETER_NOTIFICATION: i32 = 0;
/// `MibAddInstance`.
pub const MIB_ADD_INSTANCE: i32 = 1;
/// `MibDeleteInstance`.
pub const MIB_DELETE_INSTANCE: i32 = 2;
/// `MibInitialNotification`.
pub const MIB_INITIAL_NOTIFICATION: i32 = 3;

/// `IRQL_NOT_DISPATCH_LEVEL`.
pub const IRQL_NOT_DISPATCH_LEVEL: u32 = 0x08;
/// `IRQL_NOT_GREATER_OR_EQUAL`.
pub const IRQL_NOT_GREATER_OR_EQUAL: u32 = 0x09;
/// `IRQL_NOT_LESS_OR_EQUAL`.
pub const IRQL_NOT_LESS_OR_EQUAL: u32 = 0x0A;
/// `SPIN_LOCK_ALREADY_OWNED`.
pub const SPIN_LOCK_ALREADY_OWNED: u32 = 0x0F;
/// `SPIN_LOCK_NOT_OWNED`.
pub const SPIN_LOCK_NOT_OWNED: u32 = 0x10;
/// `REFERENCE_BY_POINTER`: an object's reference count went below zero.
pub const REFERENCE_BY_POINTER: u32 = 0x18;
/// `KMODE_EXCEPTION_NOT_HANDLED`: a fault in driver code nothing handled.
pub const KMODE_EXCEPTION_NOT_HANDLED: u32 = 0x1E;
/// `DRIVER_VERIFIER_DETECTED_VIOLATION`.
pub const DRIVER_VERIFIER_DETECTED_VIOLATION: u32 = 0xC4;
/// `IRQL_UNEXPECTED_VALUE`: a callback returned at another IRQL than it was called at.
pub const IRQL_UNEXPECTED_VALUE: u32 = 0xC8;
/// `WORKER_THREAD_RETURNED_AT_BAD_IRQL`: a work item routine returned above
/// `PASSIVE_LEVEL`.
pub const WORKER_THREAD_RETURNED_AT_BAD_IRQL: u32 = 0xE1;
/// `PAGE_FAULT_IN_NONPAGED_AREA`: a reference to memory that is not there (here: a
/// discarded `INIT` section).
pub const PAGE_FAULT_IN_NONPAGED_AREA: u32 = 0x50;
/// `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS`.
pub const DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS: u32 = 0xCE;

/// `POOL_FLAG_UNINITIALIZED`.
pub const POOL_FLAG_UNINITIALIZED: u64 = 0x2;
/// `POOL_FLAG_RAISE_ON_FAILURE`.
pub const POOL_FLAG_RAISE_ON_FAILURE: u64 = 0x20;
/// `POOL_FLAG_NON_PAGED`.
pub const POOL_FLAG_NON_PAGED: u64 = 0x40;
/// `POOL_FLAG_NON_PAGED_EXECUTE`.
pub const POOL_FLAG_NON_PAGED_EXECUTE: u64 = 0x80;
/// `POOL_FLAG_PAGED`.
pub const POOL_FLAG_PAGED: u64 = 0x100;

#[derive(Default)]
pub(crate) struct State {
    pub(crate) debugger: Vec<String>,
    pub(crate) echo: bool,
    pub(crate) pool: Pool,
    pub(crate) netio: Netio,
    pub(crate) fwp: fwp::Fwp,
    pub(crate) objects: Objects,
    pub(crate) work: WorkItems,
    pub(crate) bugcheck: Option<Bugcheck>,
    /// Image range, for decoding a panic's file name.
    pub(crate) image: (usize, usize),
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
pub(crate) static CHANGED: Condvar = Condvar::new();

pub(crate) struct Guard(MutexGuard<'static, Option<State>>);

impl std::ops::Deref for Guard {
    type Target = State;
    fn deref(&self) -> &State {
        self.0.as_ref().expect("kernel model used before reset")
    }
}

impl std::ops::DerefMut for Guard {
    fn deref_mut(&mut self) -> &mut State {
        self.0.as_mut().expect("kernel model used before reset")
    }
}

pub(crate) fn lock() -> Guard {
    Guard(STATE.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Waits for a change of the model's state, at most a short while (callers re-check).
pub(crate) fn wait(guard: Guard) -> Guard {
    let (inner, _) = CHANGED
        .wait_timeout(guard.0, Duration::from_millis(20))
        .unwrap_or_else(PoisonError::into_inner);
    Guard(inner)
}

/// Resets the model for a new machine: empty pool, no registrations, client stopped.
pub fn reset(image: (usize, usize), echo: bool) {
    *IN_CALLBACK_HOOK
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = None;
    dbgprint::clear_problems();
    let mut guard = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    *guard = Some(State {
        echo,
        image,
        ..State::default()
    });
}

/// The debugger output so far, one entry a line.
#[must_use]
pub fn debugger_output() -> Vec<String> {
    lock().debugger.clone()
}

/// Appends a line of the harness's own to the debugger output (marked as such).
pub fn note(line: &str) {
    let mut state = lock();
    let line = format!("[harness] {line}");
    if state.echo {
        println!("{line}");
    }
    state.debugger.push(line);
}

/// The host function for `module!name`, as an address, or `None`.
#[must_use]
pub fn resolve(module: &str, name: &str) -> Option<usize> {
    let address = match (module.to_ascii_lowercase().as_str(), name) {
        ("ntoskrnl.exe", "KeGetCurrentIrql") => ke_get_current_irql as *const () as usize,
        ("ntoskrnl.exe", "KeAcquireSpinLockRaiseToDpc") => {
            ke_acquire_spin_lock_raise_to_dpc as *const () as usize
        }
        ("ntoskrnl.exe", "KeReleaseSpinLock") => ke_release_spin_lock as *const () as usize,
        ("ntoskrnl.exe", "PsGetCurrentThreadId") => ps_get_current_thread_id as *const () as usize,
        ("ntoskrnl.exe", "KeDelayExecutionThread") => {
            ke_delay_execution_thread as *const () as usize
        }
        ("ntoskrnl.exe", "KeBugCheckEx") => ke_bug_check_ex as *const () as usize,
        ("ntoskrnl.exe", "DbgPrint") => dbg_print as *const () as usize,
        ("ntoskrnl.exe", "DbgPrintEx") => dbg_print_ex as *const () as usize,
        ("ntoskrnl.exe", "vDbgPrintEx") => v_dbg_print_ex as *const () as usize,
        ("ntoskrnl.exe", "ExAllocatePool2") => ex_allocate_pool2 as *const () as usize,
        ("ntoskrnl.exe", "ExFreePoolWithTag") => ex_free_pool_with_tag as *const () as usize,
        ("ntoskrnl.exe", "memcpy") => memcpy as *const () as usize,
        ("ntoskrnl.exe", "memmove") => memmove as *const () as usize,
        ("ntoskrnl.exe", "memset") => memset as *const () as usize,
        ("ntoskrnl.exe", "memcmp") => memcmp as *const () as usize,
        ("ntoskrnl.exe", "strlen") => strlen as *const () as usize,
        ("ntoskrnl.exe", "KeInitializeSpinLock") => ke_initialize_spin_lock as *const () as usize,
        ("ntoskrnl.exe", "KeAcquireSpinLockAtDpcLevel") => {
            ke_acquire_spin_lock_at_dpc_level as *const () as usize
        }
        ("ntoskrnl.exe", "KeReleaseSpinLockFromDpcLevel") => {
            ke_release_spin_lock_from_dpc_level as *const () as usize
        }
        ("ntoskrnl.exe", "KfRaiseIrql") => kf_raise_irql as *const () as usize,
        ("ntoskrnl.exe", "KeRaiseIrqlToDpcLevel") => {
            ke_raise_irql_to_dpc_level as *const () as usize
        }
        ("ntoskrnl.exe", "KeLowerIrql" | "KfLowerIrql") => ke_lower_irql as *const () as usize,
        ("ntoskrnl.exe", "KeInitializeEvent") => ke_initialize_event as *const () as usize,
        ("ntoskrnl.exe", "KeSetEvent") => ke_set_event as *const () as usize,
        ("ntoskrnl.exe", "KeResetEvent") => ke_reset_event as *const () as usize,
        ("ntoskrnl.exe", "KeClearEvent") => ke_clear_event as *const () as usize,
        ("ntoskrnl.exe", "KeReadStateEvent") => ke_read_state_event as *const () as usize,
        ("ntoskrnl.exe", "KeWaitForSingleObject") => {
            ke_wait_for_single_object as *const () as usize
        }
        ("ntoskrnl.exe", "ExAllocatePoolWithTag") => {
            ex_allocate_pool_with_tag as *const () as usize
        }
        ("ntoskrnl.exe", "ExAllocatePool") => ex_allocate_pool as *const () as usize,
        ("ntoskrnl.exe", "ExFreePool") => ex_free_pool as *const () as usize,
        ("ntoskrnl.exe", "IoAllocateWorkItem") => io_allocate_work_item as *const () as usize,
        ("ntoskrnl.exe", "IoFreeWorkItem") => io_free_work_item as *const () as usize,
        ("ntoskrnl.exe", "IoSizeofWorkItem") => io_sizeof_work_item as *const () as usize,
        ("ntoskrnl.exe", "IoInitializeWorkItem") => io_initialize_work_item as *const () as usize,
        ("ntoskrnl.exe", "IoUninitializeWorkItem") => {
            io_uninitialize_work_item as *const () as usize
        }
        ("ntoskrnl.exe", "IoQueueWorkItem") => io_queue_work_item as *const () as usize,
        ("ntoskrnl.exe", "IoQueueWorkItemEx") => io_queue_work_item_ex as *const () as usize,
        ("ntoskrnl.exe", "ObfReferenceObject" | "ObReferenceObject") => {
            obf_reference_object as *const () as usize
        }
        ("ntoskrnl.exe", "ObfDereferenceObject" | "ObDereferenceObject") => {
            obf_dereference_object as *const () as usize
        }
        ("ntoskrnl.exe", "RtlInitUnicodeString") => rtl_init_unicode_string as *const () as usize,
        ("ntoskrnl.exe", "RtlInitAnsiString") => rtl_init_ansi_string as *const () as usize,
        ("ntoskrnl.exe", "RtlCopyUnicodeString") => rtl_copy_unicode_string as *const () as usize,
        ("netio.sys", "NotifyTeredoPortChange") => notify_teredo_port_change as *const () as usize,
        ("netio.sys", "GetTeredoPort") => get_teredo_port as *const () as usize,
        ("netio.sys", "CancelMibChangeNotify2") => cancel_mib_change_notify2 as *const () as usize,
        ("fwpkclnt.sys", name) => return fwp::resolve(name),
        _ => return None,
    };
    Some(address)
}
