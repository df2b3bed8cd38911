//! The kernel shim: a minimal ntoskrnl binding that replaces the windows-drivers-rs crates
//! in one build only, the `.sys` that the loader harness (`harness/`) links with `rust-lld`
//! on Linux and runs.
//!
//! `wdk-build` refuses to compile on a non-Windows host, so this file and the shared
//! `teredo-kernel-shim` crate (`examples/kernel-shim`, also used by the port-monitor example)
//! stand in for the things the `wdk` binding takes from those crates, each with the same
//! kernel routine (the log sink is the logic crate's `DbgPrint` in both bindings):
//!
//! | `wdk.rs` | here |
//! |---|---|
//! | `wdk-alloc` global allocator | `teredo_kernel_shim::PoolAllocator`: `ExAllocatePool2(POOL_FLAG_NON_PAGED)` / `ExFreePoolWithTag`, tagged [`POOL_TAG`] |
//! | `wdk-panic` handler | `KeBugCheckEx(`[`PANIC_BUGCHECK`]`, line, column, file, file length)`, after one log line with the location |
//! | `wdk_sys::DRIVER_OBJECT` | `teredo_kernel_shim::DriverObject`: only the `DriverUnload` field (offset `0x68`) |
//!
//! The entry points call the same `teredo_monitor_logic::driver` functions as `wdk.rs`.
//! Every import is `raw-dylib` from `ntoskrnl.exe` (the library adds `netio.sys`; with the
//! feature `firewall` the logic crate adds `fwpkclnt.sys`), so no import library is needed.
//! The linker settings live in the harness's build step, never in this crate.

use core::ffi::c_void;

use teredo_kernel_shim::{DriverObject, KeBugCheckEx, ObfReferenceObject, PoolAllocator};
use teredo_watcher::HandleTable;
use teredo_watcher::nt::NetioPortSource;

use teredo_monitor_logic::driver::{self, DriverConfig, TeredoMonitor};
use teredo_monitor_logic::exceptions::AppliedExceptions;
use teredo_monitor_logic::log::{Line, LogText as _};
use teredo_monitor_logic::platform::log;
use teredo_monitor_logic::slot::DriverSlot;

#[cfg(not(target_os = "windows"))]
compile_error!("teredo-monitor: `kernel-shim` builds the driver image for x86_64-pc-windows-msvc");

/// The pool tag of every allocation, `'TMon'` as it reads in a pool dump.
pub const POOL_TAG: u32 = u32::from_le_bytes(*b"TMon");
/// The bugcheck code of a panic: driver-defined, reads `"TMON"` in a crash dump.
pub const PANIC_BUGCHECK: u32 = u32::from_be_bytes(*b"TMON");

/// The global allocator: non-paged pool, tagged [`POOL_TAG`].
#[global_allocator]
static GLOBAL_ALLOCATOR: PoolAllocator<POOL_TAG> = PoolAllocator;

/// A panic is a bugcheck: [`PANIC_BUGCHECK`] with the location (line, column, the file
/// name's address and length) as parameters, after logging the location.
///
/// The release image logs no message: formatting it would link `core::fmt` into the image
/// (the message is `fmt::Arguments`), and the location identifies the panic. With debug
/// assertions (the harness's diagnostic image) the message follows the location.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let (line, column, file) = info
        .location()
        .map_or((0, 0, ""), |l| (l.line(), l.column(), l.file()));
    let mut text = Line::new();
    text.push_str("panic: at ")
        .push_str(file)
        .push_str(":")
        .push_decimal(u64::from(line))
        .push_str(":")
        .push_decimal(u64::from(column));
    #[cfg(debug_assertions)]
    {
        use core::fmt::Write as _;
        let _ = write!(text, ": {}", info.message());
    }
    log(&text);
    let (line, column) = (line as usize, column as usize);
    // SAFETY: `KeBugCheckEx` may be called at any IRQL and has no other precondition; its
    // parameters are only recorded in the crash dump.
    unsafe {
        KeBugCheckEx(
            PANIC_BUGCHECK,
            line,
            column,
            file.as_ptr().addr(),
            file.len(),
        )
    }
}

/// Every notification registration of this driver; torn down in `DriverUnload`.
static TABLE: HandleTable<NetioPortSource> = HandleTable::new(NetioPortSource::new());

/// The driver's state between `DriverEntry` and `DriverUnload`.
static DRIVER: DriverSlot<TeredoMonitor<'static, NetioPortSource>> = DriverSlot::new();

/// The exception set the driver's tracker has applied, for the classify exports: one word
/// in the image, read with one load and no `unsafe`.
static PUBLISHED: AppliedExceptions = AppliedExceptions::new();

/// `DriverEntry`: runs [`driver::driver_entry`] and sets `DriverUnload` when it succeeds,
/// exactly as `wdk.rs` does.
///
/// # Safety
///
/// Called by the loader only, once per load, at `PASSIVE_LEVEL`, with `driver` a valid
/// driver object of at least `0x150` bytes that is ours for the duration of the call.
#[unsafe(export_name = "DriverEntry")]
pub unsafe extern "system" fn driver_entry(
    driver: *mut DriverObject,
    _registry_path: *const c_void,
) -> i32 {
    // SAFETY: `driver` is the driver object `DriverEntry` was called with (this function's
    // contract), which the I/O manager keeps until after `DriverUnload`.
    let firewall = unsafe { crate::firewall(driver.cast()) };
    let status = driver::driver_entry(
        &TABLE,
        &DRIVER,
        &PUBLISHED,
        DriverConfig::default(),
        firewall,
    );
    if status.is_success() {
        // SAFETY: `driver` is valid for writes and exclusively ours during this call (this
        // function's contract).
        unsafe { (*driver).driver_unload = Some(driver_unload) };
    }
    status.0
}

/// What a WFP classify function of this driver reads for every packet: the exception set
/// the tracker published (one atomic load from a static, valid at any IRQL). This example
/// registers no callout, so the shim exports this stand-in for the harness to call while
/// notifications arrive. Returns the dynamic port, `0` when none is known, `u32::MAX` when
/// no driver state is loaded ([`AppliedExceptions::raw`]).
#[unsafe(export_name = "TeredoMonitorClassifyPort")]
pub extern "system" fn classify_port() -> u32 {
    PUBLISHED.raw()
}

/// The per-packet port match the C reference driver exports with the same signature, so the
/// harness times the two side by side (`harness/benches/classify.rs`): `1` when
/// `local_port` is a local port of the published Teredo client (the static port 3544, or
/// the dynamic port when known), `0` otherwise and while no driver state is loaded
/// ([`AppliedExceptions::is_teredo_local_port`]). Not a firewall verdict: a firewall's
/// classify function calls [`AppliedExceptions::allows`] with the packet, which allows
/// 3544 only for the multicast group 224.0.0.253.
#[unsafe(export_name = "TeredoClassify")]
pub extern "system" fn classify(local_port: u16) -> u8 {
    u8::from(PUBLISHED.is_teredo_local_port(local_port))
}

/// `DriverUnload`: runs [`driver::driver_unload`]; when a registration could not be
/// cancelled, takes a reference on the driver object that is never dropped, so the image
/// stays loaded for the notifications netio may still deliver into it (the policy of
/// `teredo_monitor_logic::driver`'s documentation).
///
/// # Safety
///
/// Called by the loader only, once, at `PASSIVE_LEVEL`, after a successful `DriverEntry`,
/// with `driver` this driver's object.
unsafe extern "system" fn driver_unload(driver: *mut DriverObject) {
    let report = driver::driver_unload(&TABLE, &DRIVER, &PUBLISHED);
    if !report.is_clean() {
        let mut text = Line::new();
        text.push_str("unload left registrations behind: ");
        report.write_to(&mut text);
        log(&text);
    }
    if report.keep_image_loaded {
        // SAFETY: `driver` is this driver's object, valid during `DriverUnload` (this
        // function's contract); `ObfReferenceObject` runs at <= DISPATCH_LEVEL and this runs
        // at PASSIVE_LEVEL. The reference is leaked on purpose: while it is held the I/O
        // manager keeps the object, and so the image, loaded.
        unsafe { ObfReferenceObject(driver.cast()) };
        let mut text = Line::new();
        text.push_str(
            "DriverUnload: took a reference on the driver object; the image stays loaded",
        );
        log(&text);
    }
}
