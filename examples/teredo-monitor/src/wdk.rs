//! The windows-drivers-rs binding: the real driver.
//!
//! Everything of the image that names `wdk-sys`, `wdk-alloc` or `wdk-panic` is in this file:
//! the global allocator, the panic handler, the exported `DriverEntry`, the `DriverUnload`
//! routine, and the driver's two statics over the real netio. The driver's behaviour is in
//! `teredo_monitor_logic::driver`; its `log!` goes to ntoskrnl's `DbgPrint` (the logic
//! crate's `wdk` feature), rendered without `core::fmt`.

use teredo_watcher::HandleTable;
use teredo_watcher::nt::NetioPortSource;
use wdk_sys::{DRIVER_OBJECT, NTSTATUS, PCUNICODE_STRING};

use teredo_monitor_logic::driver::{self, DriverConfig, TeredoMonitor};
use teredo_monitor_logic::exceptions::AppliedExceptions;
use teredo_monitor_logic::log::{Line, LogText as _};
use teredo_monitor_logic::platform::log;
use teredo_monitor_logic::slot::DriverSlot;

// The panic handler: a panic bugchecks with a recognizable code (wdk-panic's handler).
// Tests build for the host and use std's.
#[cfg(not(test))]
extern crate wdk_panic;

/// Every allocation of the driver (and of the library: the watcher's context, the handle
/// table's entries) comes from the non-paged pool through `wdk-alloc`, so callbacks may
/// touch it at `DISPATCH_LEVEL`.
#[cfg(not(test))]
#[global_allocator]
static GLOBAL_ALLOCATOR: wdk_alloc::WdkAllocator = wdk_alloc::WdkAllocator;

/// Every notification registration of this driver; torn down in `DriverUnload`.
static TABLE: HandleTable<NetioPortSource> = HandleTable::new(NetioPortSource::new());

/// The driver's state between `DriverEntry` and `DriverUnload`: its one owned place.
static DRIVER: DriverSlot<TeredoMonitor<'static, NetioPortSource>> = DriverSlot::new();

/// The exception set the driver's tracker has applied: what a classify function reads, one
/// load from this static and no `unsafe` (`AppliedExceptions::allows`).
static PUBLISHED: AppliedExceptions = AppliedExceptions::new();

/// `DriverEntry`: runs [`driver::driver_entry`] and sets `DriverUnload` when it succeeds
/// (on failure the I/O manager unloads the image without calling `DriverUnload`, and
/// `driver_entry` has already undone its steps).
///
/// # Safety
///
/// Called by the I/O manager only, once per load, at `PASSIVE_LEVEL`, with `driver` the
/// driver object being initialized (valid and exclusively ours for the duration of the
/// call) and `registry_path` its service key (unused here).
// SAFETY: "DriverEntry" is the entry point symbol the WDK linker configuration expects; no
// other item in this image exports that name. Gated off for tests, like upstream samples.
#[cfg_attr(not(test), unsafe(export_name = "DriverEntry"))]
pub unsafe extern "system" fn driver_entry(
    driver: &mut DRIVER_OBJECT,
    _registry_path: PCUNICODE_STRING,
) -> NTSTATUS {
    // SAFETY: `driver` is the driver object `DriverEntry` was called with (this function's
    // contract), which the I/O manager keeps until after `DriverUnload`.
    let firewall = unsafe { crate::firewall(core::ptr::from_mut(driver).cast()) };
    let status = driver::driver_entry(
        &TABLE,
        &DRIVER,
        &PUBLISHED,
        DriverConfig::default(),
        firewall,
    );
    if status.is_success() {
        driver.DriverUnload = Some(driver_unload);
    }
    status.0
}

/// `DriverUnload`: runs [`driver::driver_unload`], which cancels the registration (waiting
/// for a callback in flight) and tears the handle table down before the image goes away.
///
/// # Safety
///
/// Called by the I/O manager only, once, at `PASSIVE_LEVEL`, after a successful
/// `DriverEntry` set it, with `driver` this driver's object.
unsafe extern "C" fn driver_unload(driver: *mut DRIVER_OBJECT) {
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
        // manager keeps the object, and so the image, loaded for the notifications netio may
        // still deliver into it (`teredo_monitor_logic::driver`'s documentation).
        unsafe { wdk_sys::ntddk::ObfReferenceObject(driver.cast()) };
        let mut text = Line::new();
        text.push_str(
            "DriverUnload: took a reference on the driver object; the image stays loaded",
        );
        log(&text);
    }
}
