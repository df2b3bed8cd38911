//! Raw netio and ntoskrnl declarations, and the numeric constants of the C API.
#![allow(
    non_camel_case_types,
    non_snake_case,
    reason = "names as in the Windows headers"
)]
//!
//! `wdk-sys` does not bind `Netioapi.h`, so the declarations are ours. They follow the
//! kernel flavour of the header: `NETIO_STATUS` is `NTSTATUS` (`i32`) and the calling
//! convention is `NTAPI` (`extern "system"`). The notification type crosses the boundary as
//! a raw `i32`: reading an out-of-range value as a Rust enum would be undefined behaviour.
//!
//! The functions are imported with `raw-dylib` + `+verbatim`, so no import library (no WDK)
//! is needed to link: the import table names `netio.sys` and `ntoskrnl.exe` directly.

use core::ffi::c_void;

/// `HANDLE`.
pub type HANDLE = *mut c_void;
/// `NTSTATUS` / `NETIO_STATUS` in kernel mode.
pub type NTSTATUS = i32;
/// `KIRQL`.
pub type KIRQL = u8;
/// `KSPIN_LOCK` (`ULONG_PTR`).
pub type KSPIN_LOCK = usize;
/// `BOOLEAN`.
pub type BOOLEAN = u8;

/// `KEVENT` (x64: a 24-byte `DISPATCHER_HEADER`, 8-byte aligned), opaque: only the kernel
/// reads or writes it, through the `Ke*Event` routines.
#[repr(C, align(8))]
pub struct KEVENT {
    _opaque: [u8; 24],
}

/// `EVENT_TYPE::NotificationEvent`: stays signalled until cleared, releases every waiter.
pub const NOTIFICATION_EVENT: i32 = 0;
/// `KWAIT_REASON::Executive`.
pub const EXECUTIVE: i32 = 0;
/// `KPROCESSOR_MODE::KernelMode`.
pub const KERNEL_MODE: i8 = 0;

/// `PTEREDO_PORT_CHANGE_CALLBACK`: `VOID (NTAPI *)(PVOID CallerContext, USHORT Port,
/// MIB_NOTIFICATION_TYPE NotificationType)`, with the enum passed as a raw `i32`.
pub type TeredoPortChangeCallback =
    unsafe extern "system" fn(caller_context: *mut c_void, port: u16, notification_type: i32);

/// `PIO_WORKITEM_ROUTINE_EX`: `VOID (*)(PVOID IoObject, PVOID Context, PIO_WORKITEM
/// IoWorkItem)`, called at `PASSIVE_LEVEL` on a system worker thread.
pub type IoWorkItemRoutineEx = unsafe extern "system" fn(
    io_object: *mut c_void,
    context: *mut c_void,
    io_work_item: *mut c_void,
);

/// `WORK_QUEUE_TYPE::DelayedWorkQueue`.
pub const DELAYED_WORK_QUEUE: i32 = 1;

/// `MibParameterNotification`.
pub const MIB_PARAMETER_NOTIFICATION: i32 = 0;
/// `MibAddInstance`.
pub const MIB_ADD_INSTANCE: i32 = 1;
/// `MibDeleteInstance`.
pub const MIB_DELETE_INSTANCE: i32 = 2;
/// `MibInitialNotification`.
pub const MIB_INITIAL_NOTIFICATION: i32 = 3;

// Status codes named by the documentation (NTSTATUS and Win32 codes are mixed there).
// Hex literals of NTSTATUS values are written as their `u32` bit patterns.
/// `STATUS_SUCCESS`.
pub const STATUS_SUCCESS: NTSTATUS = 0;
/// `STATUS_INVALID_PARAMETER`.
pub const STATUS_INVALID_PARAMETER: NTSTATUS = 0xC000_000D_u32.cast_signed();
/// `STATUS_INVALID_HANDLE`.
pub const STATUS_INVALID_HANDLE: NTSTATUS = 0xC000_0008_u32.cast_signed();
/// `STATUS_NO_MEMORY`.
pub const STATUS_NO_MEMORY: NTSTATUS = 0xC000_0017_u32.cast_signed();
/// `STATUS_INSUFFICIENT_RESOURCES`.
pub const STATUS_INSUFFICIENT_RESOURCES: NTSTATUS = 0xC000_009A_u32.cast_signed();
/// `STATUS_NOT_SUPPORTED`.
pub const STATUS_NOT_SUPPORTED: NTSTATUS = 0xC000_00BB_u32.cast_signed();
/// `STATUS_DEVICE_NOT_READY`.
pub const STATUS_DEVICE_NOT_READY: NTSTATUS = 0xC000_00A3_u32.cast_signed();
/// `ERROR_INVALID_HANDLE` (Win32).
pub const ERROR_INVALID_HANDLE: NTSTATUS = 6;
/// `ERROR_NOT_ENOUGH_MEMORY` (Win32).
pub const ERROR_NOT_ENOUGH_MEMORY: NTSTATUS = 8;
/// `ERROR_NOT_READY` (Win32).
pub const ERROR_NOT_READY: NTSTATUS = 21;
/// `ERROR_INVALID_PARAMETER` (Win32).
pub const ERROR_INVALID_PARAMETER: NTSTATUS = 87;

/// Every status code the documentation names, with its name (for sweeps and reports).
pub const DOCUMENTED_STATUS_CODES: [(&str, NTSTATUS); 11] = [
    ("STATUS_SUCCESS", STATUS_SUCCESS),
    ("STATUS_INVALID_PARAMETER", STATUS_INVALID_PARAMETER),
    ("STATUS_INVALID_HANDLE", STATUS_INVALID_HANDLE),
    ("STATUS_NO_MEMORY", STATUS_NO_MEMORY),
    (
        "STATUS_INSUFFICIENT_RESOURCES",
        STATUS_INSUFFICIENT_RESOURCES,
    ),
    ("STATUS_NOT_SUPPORTED", STATUS_NOT_SUPPORTED),
    ("STATUS_DEVICE_NOT_READY", STATUS_DEVICE_NOT_READY),
    ("ERROR_INVALID_HANDLE", ERROR_INVALID_HANDLE),
    ("ERROR_NOT_ENOUGH_MEMORY", ERROR_NOT_ENOUGH_MEMORY),
    ("ERROR_NOT_READY", ERROR_NOT_READY),
    ("ERROR_INVALID_PARAMETER", ERROR_INVALID_PARAMETER),
];

#[cfg(windows)]
#[cfg_attr(
    windows,
    link(name = "netio.sys", kind = "raw-dylib", modifiers = "+verbatim")
)]
unsafe extern "system" {
    /// `NotifyTeredoPortChange` (`< DISPATCH_LEVEL`).
    pub fn NotifyTeredoPortChange(
        callback: TeredoPortChangeCallback,
        caller_context: *mut c_void,
        initial_notification: BOOLEAN,
        notification_handle: *mut HANDLE,
    ) -> NTSTATUS;

    /// `GetTeredoPort` (`< DISPATCH_LEVEL`).
    pub fn GetTeredoPort(port: *mut u16) -> NTSTATUS;

    /// `CancelMibChangeNotify2` (`PASSIVE_LEVEL`).
    pub fn CancelMibChangeNotify2(notification_handle: HANDLE) -> NTSTATUS;
}

#[cfg(windows)]
#[cfg_attr(
    windows,
    link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")
)]
unsafe extern "system" {
    /// `KeGetCurrentIrql` (any IRQL; an ntoskrnl export on x64 Windows 10 and later).
    pub fn KeGetCurrentIrql() -> KIRQL;
    /// `KeAcquireSpinLockRaiseToDpc` (`<= DISPATCH_LEVEL`).
    pub fn KeAcquireSpinLockRaiseToDpc(spin_lock: *mut KSPIN_LOCK) -> KIRQL;
    /// `KeReleaseSpinLock` (`DISPATCH_LEVEL`).
    pub fn KeReleaseSpinLock(spin_lock: *mut KSPIN_LOCK, new_irql: KIRQL);
    /// `PsGetCurrentThreadId` (any IRQL).
    pub fn PsGetCurrentThreadId() -> HANDLE;
    /// `KeInitializeEvent` (any IRQL; the event must be non-paged and not move afterwards).
    pub fn KeInitializeEvent(event: *mut KEVENT, event_type: i32, state: BOOLEAN);
    /// `KeSetEvent` (`<= DISPATCH_LEVEL` with `wait = FALSE`).
    pub fn KeSetEvent(event: *mut KEVENT, increment: i32, wait: BOOLEAN) -> i32;
    /// `KeClearEvent` (`<= DISPATCH_LEVEL`).
    pub fn KeClearEvent(event: *mut KEVENT);
    /// `IoSizeofWorkItem` (any IRQL): the size of an `IO_WORKITEM`.
    pub fn IoSizeofWorkItem() -> u32;
    /// `IoInitializeWorkItem` (`<= DISPATCH_LEVEL`): `io_object` is a driver or device object.
    pub fn IoInitializeWorkItem(io_object: *mut c_void, io_work_item: *mut c_void);
    /// `IoUninitializeWorkItem` (`<= DISPATCH_LEVEL`).
    pub fn IoUninitializeWorkItem(io_work_item: *mut c_void);
    /// `IoQueueWorkItemEx` (`<= DISPATCH_LEVEL`): the form a driver-object work item needs.
    pub fn IoQueueWorkItemEx(
        io_work_item: *mut c_void,
        worker_routine: IoWorkItemRoutineEx,
        queue_type: i32,
        context: *mut c_void,
    );
    /// `KeWaitForSingleObject` (`<= APC_LEVEL` for a non-zero timeout).
    pub fn KeWaitForSingleObject(
        object: *mut c_void,
        wait_reason: i32,
        wait_mode: i8,
        alertable: BOOLEAN,
        timeout: *mut i64,
    ) -> NTSTATUS;
}
