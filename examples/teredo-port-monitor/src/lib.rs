//! # teredo-port-monitor: the C reference driver's job, in Rust
//!
//! `examples/c-reference/teredo_reference.c` written with `teredo-watcher`, line for line
//! the same job, so that the two images can be compared (`kernel-box --sizes`,
//! PERFORMANCE.md): `DriverEntry` registers for Teredo port changes with the initial
//! notification and seeds the port with `GetTeredoPort`; every notification is logged;
//! `TeredoMonitorClassifyPort` and `TeredoClassify` (exported) are what a WFP classify
//! function reads per packet; `DriverUnload` cancels the registration.
//!
//! It uses the library's allocation-free form, [`StaticTeredoWatcher`]: the registration
//! lives in a `static`, built by a `const fn`, and the classify exports read it with one load
//! and no `unsafe`. As the C driver does, it leaves formatting to the kernel: its log lines
//! are `DbgPrint` format strings with integer arguments, so the image carries no formatter.
//! The firewall example (`examples/teredo-monitor`) formats its own lines and does far more
//! (a filter engine client); this one is the size of the job the C driver does.
//!
//! Built only for the loader harness (`kernel-shim`'s ntoskrnl bindings; the harness's
//! build step passes the rust-lld settings), as the C driver is built only with mingw-w64.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

use core::ffi::{c_char, c_void};

use teredo_kernel_shim::{DbgPrint, DriverObject, KeBugCheckEx, ObfReferenceObject, PoolAllocator};
use teredo_watcher::nt::NetioPortSource;
use teredo_watcher::{Kernel, PortSource, StaticNetioWatcher, TeredoEvent, TeredoPort};

/// Every pool block of this driver (the library allocates only for subscribers with
/// captures, and this driver has none): `'TPrt'` in a pool dump.
const POOL_TAG: u32 = u32::from_le_bytes(*b"TPrt");
/// The bugcheck code of a panic: reads `"TPRT"` in a crash dump.
const PANIC_BUGCHECK: u32 = u32::from_be_bytes(*b"TPRT");
/// What `TeredoMonitorClassifyPort` returns while the driver is not registered.
const NOT_LOADED: u32 = u32::MAX;

#[global_allocator]
static GLOBAL_ALLOCATOR: PoolAllocator<POOL_TAG> = PoolAllocator;

/// The registration and its one subscriber (the event logger), for the driver's lifetime.
static WATCHER: StaticNetioWatcher<1> = StaticNetioWatcher::new(NetioPortSource::new());

/// A panic is a bugcheck with the location; no message (formatting it would link
/// `core::fmt` into the image).
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let (line, column) = info
        .location()
        .map_or((0, 0), |l| (l.line() as usize, l.column() as usize));
    // SAFETY: `KeBugCheckEx` may be called at any IRQL and has no other precondition.
    unsafe { KeBugCheckEx(PANIC_BUGCHECK, line, column, 0, 0) }
}

/// The IRQL as `DbgPrint`'s `%u` takes it.
fn irql() -> u32 {
    u32::from(<NetioPortSource as PortSource>::Kernel::current_irql().raw())
}

/// A port as `%hu` takes it (promoted to `int`): 0 for none.
fn raw(port: Option<TeredoPort>) -> u32 {
    port.map_or(0, |p| u32::from(p.get()))
}

/// The notification's name, NUL-terminated, as the C driver prints it.
fn event_name(event: &TeredoEvent) -> &'static core::ffi::CStr {
    match event {
        TeredoEvent::PortChanged { .. } => c"MibParameterNotification",
        TeredoEvent::Added { .. } => c"MibAddInstance",
        TeredoEvent::Deleted { .. } => c"MibDeleteInstance",
        TeredoEvent::Initial { .. } => c"MibInitialNotification",
        TeredoEvent::Snapshot { .. } => c"GetTeredoPort",
        TeredoEvent::Unknown { .. } => c"unknown type",
    }
}

/// The event logger: runs at the IRQL of the OS callback (`<= DISPATCH_LEVEL`), no
/// allocation (it captures nothing), no wait; `DbgPrint` with integer arguments is valid
/// there.
fn log_event(event: TeredoEvent) {
    let count = WATCHER.stats().notifications;
    // SAFETY: the format and the name are NUL-terminated and static; the arguments match
    // the conversions (`%s` a C string, `%llu` a 64-bit and `%u` 32-bit integers).
    unsafe {
        DbgPrint(
            c"teredo-port-monitor: notification #%llu: %-24s port %5u at IRQL %u\n".as_ptr(),
            count,
            event_name(&event).as_ptr(),
            raw(event.port()),
            irql(),
        );
    }
}

/// Logs `text` (static, NUL-terminated) with one 32-bit argument.
fn log1(text: &'static core::ffi::CStr, value: u32) {
    // SAFETY: the format is NUL-terminated and static and has exactly one 32-bit conversion.
    unsafe { DbgPrint(text.as_ptr().cast::<c_char>(), value) };
}

/// `DriverEntry`: subscribes the logger, registers (initial notification, seed), sets
/// `DriverUnload`. A failure leaves nothing registered and returns its status.
///
/// # Safety
///
/// Called by the loader only, once per load, at `PASSIVE_LEVEL`, with `driver` a valid
/// driver object of at least `0x150` bytes that is ours for the duration of the call.
#[unsafe(export_name = "DriverEntry")]
pub unsafe extern "system" fn driver_entry(driver: *mut DriverObject, _path: *const c_void) -> i32 {
    log1(c"teredo-port-monitor: DriverEntry at IRQL %u\n", irql());
    // Installed before the registration, so it sees the initial notification. A zero-sized
    // subscriber: nothing is allocated.
    if WATCHER.subscribe(log_event).is_err() {
        log1(
            c"teredo-port-monitor: DriverEntry: no subscriber slot (%u)\n",
            1,
        );
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    match WATCHER.start() {
        Ok(report) => {
            // SAFETY: the format has two 32-bit conversions for the two arguments.
            unsafe {
                DbgPrint(
                    c"teredo-port-monitor: DriverEntry: loaded; seed %u (GetTeredoPort %s)\n"
                        .as_ptr(),
                    raw(WATCHER.current_port()),
                    if report.seed_error.is_none() {
                        c"succeeded"
                    } else {
                        c"failed"
                    }
                    .as_ptr(),
                );
            }
            // SAFETY: `driver` is valid for writes and ours during this call (contract).
            unsafe { (*driver).driver_unload = Some(driver_unload) };
            0
        }
        Err(error) => {
            let status = error.status().map_or(STATUS_UNSUCCESSFUL, |s| s.0);
            log1(
                c"teredo-port-monitor: DriverEntry: NotifyTeredoPortChange failed with %#010x\n",
                status.cast_unsigned(),
            );
            // Nothing is registered (the library's guarantee for a failed start). The
            // subscriber stays in the `static`: it is zero-sized, so nothing is allocated,
            // and the image is unloaded with it. Only zero is success: a positive Win32 code
            // becomes a failure status.
            if status > 0 {
                STATUS_UNSUCCESSFUL
            } else {
                status
            }
        }
    }
}

/// `STATUS_UNSUCCESSFUL`.
const STATUS_UNSUCCESSFUL: i32 = 0xC000_0001_u32.cast_signed();
/// `STATUS_INSUFFICIENT_RESOURCES`.
const STATUS_INSUFFICIENT_RESOURCES: i32 = 0xC000_009A_u32.cast_signed();

/// The classify stand-in: the port a filter would allow now, 0 for none, `u32::MAX` while
/// not registered. One load from the `static`, any IRQL.
#[unsafe(export_name = "TeredoMonitorClassifyPort")]
pub extern "system" fn classify_port() -> u32 {
    if WATCHER.is_running() {
        raw(WATCHER.current_port())
    } else {
        NOT_LOADED
    }
}

/// The per-packet port match the C driver exports with the same signature: `1` for the
/// static port 3544 or the dynamic port, `0` otherwise and while not registered.
#[unsafe(export_name = "TeredoClassify")]
pub extern "system" fn classify(local_port: u16) -> u8 {
    if !WATCHER.is_running() {
        return 0;
    }
    u8::from(
        local_port == teredo_watcher::TEREDO_STATIC_PORT
            || WATCHER
                .current_port()
                .is_some_and(|p| p.get() == local_port),
    )
}

/// `DriverUnload`: stops the watcher (cancel, which waits for a callback in flight, then the
/// subscriber is dropped). When the cancel fails netio may still call into the `static`: the
/// driver then keeps its image loaded with a reference on its driver object that it never
/// drops, as the firewall example does.
///
/// # Safety
///
/// Called by the loader only, once, at `PASSIVE_LEVEL`, after a successful `DriverEntry`,
/// with `driver` this driver's object.
unsafe extern "system" fn driver_unload(driver: *mut DriverObject) {
    log1(
        c"teredo-port-monitor: DriverUnload at IRQL %u: cancelling the registration\n",
        irql(),
    );
    let notifications = WATCHER.stats().notifications;
    match WATCHER.stop() {
        Ok(()) => log1(
            c"teredo-port-monitor: DriverUnload: cancelled after %u notifications\n",
            u32::try_from(notifications).unwrap_or(u32::MAX),
        ),
        Err(error) => {
            log1(
                c"teredo-port-monitor: DriverUnload: the cancel failed (%#010x); the image stays loaded\n",
                error.status().map_or(0, |s| s.0.cast_unsigned()),
            );
            // SAFETY: `driver` is this driver's object, valid during `DriverUnload`
            // (contract); `ObfReferenceObject` runs at <= DISPATCH_LEVEL and this runs at
            // PASSIVE_LEVEL. Leaked on purpose: it keeps the image loaded.
            unsafe { ObfReferenceObject(driver.cast()) };
        }
    }
}
