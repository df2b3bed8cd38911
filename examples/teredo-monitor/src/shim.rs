//! The kernel shim: a minimal ntoskrnl binding that replaces the windows-drivers-rs crates
//! in one build only, the `.sys` that the loader harness (`harness/`) links with `rust-lld`
//! on Linux and runs.
//!
//! `wdk-build` refuses to compile on a non-Windows host, so this file stands in for the
//! things the `wdk` binding takes from those crates, each with the same kernel routine (the
//! log sink is the logic crate's `DbgPrint` in both bindings):
//!
//! | `wdk.rs` | here |
//! |---|---|
//! | `wdk-alloc` global allocator | [`PoolAllocator`]: `ExAllocatePool2(POOL_FLAG_NON_PAGED)` / `ExFreePoolWithTag` |
//! | `wdk-panic` handler | `KeBugCheckEx(`[`PANIC_BUGCHECK`]`, line, column, file, file length)`, after one log line with the location |
//! | `wdk_sys::DRIVER_OBJECT` | [`DriverObject`]: only the `DriverUnload` field (offset `0x68`) |
//!
//! The entry points call the same `teredo_monitor_logic::driver` functions as `wdk.rs`. Every import is
//! `raw-dylib` from `ntoskrnl.exe` (the library adds `netio.sys`; with the feature
//! `firewall` the logic crate adds `fwpkclnt.sys`), so no import library is needed. The linker settings live in the harness's build step, never in this crate.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::{c_char, c_void};

use teredo_watcher::HandleTable;
use teredo_watcher::nt::NetioPortSource;

use teredo_monitor_logic::driver::{self, DriverConfig, TeredoMonitor};
use teredo_monitor_logic::exceptions::AppliedExceptions;
use teredo_monitor_logic::log::{Line, LogText as _};
use teredo_monitor_logic::platform::log;
use teredo_monitor_logic::slot::DriverSlot;

#[cfg(not(target_os = "windows"))]
compile_error!("teredo-monitor: `kernel-shim` builds the driver image for x86_64-pc-windows-msvc");

/// `POOL_FLAG_UNINITIALIZED` (`wdm.h`): skip the zeroing `ExAllocatePool2` does by default.
const POOL_FLAG_UNINITIALIZED: u64 = 0x2;
/// `POOL_FLAG_NON_PAGED` (`wdm.h`): callbacks touch driver memory at `DISPATCH_LEVEL`.
const POOL_FLAG_NON_PAGED: u64 = 0x40;
/// The pool tag of every allocation, `'TMon'` as it reads in a pool dump.
pub const POOL_TAG: u32 = u32::from_le_bytes(*b"TMon");
/// The alignment `ExAllocatePool2` guarantees on x64 (`MEMORY_ALLOCATION_ALIGNMENT`).
const POOL_ALIGNMENT: usize = 16;
/// The bugcheck code of a panic: driver-defined, reads `"TMON"` in a crash dump.
pub const PANIC_BUGCHECK: u32 = u32::from_be_bytes(*b"TMON");

#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "system" {
    /// `ExAllocatePool2` (`<= DISPATCH_LEVEL` for non-paged pool).
    fn ExAllocatePool2(flags: u64, number_of_bytes: usize, tag: u32) -> *mut c_void;
    /// `ExFreePoolWithTag` (`<= DISPATCH_LEVEL`).
    fn ExFreePoolWithTag(p: *mut c_void, tag: u32);
    /// `KeBugCheckEx` (any IRQL; does not return).
    fn KeBugCheckEx(code: u32, p1: usize, p2: usize, p3: usize, p4: usize) -> !;
    /// `ObfReferenceObject` (`<= DISPATCH_LEVEL`; `ObReferenceObject` is a macro over it).
    fn ObfReferenceObject(object: *mut c_void) -> isize;
}

// The C runtime routines that compiled Rust code calls (`core`, `alloc` and the code LLVM
// generates for copies and comparisons). Without a CRT (`/NODEFAULTLIB`) the kernel's own
// exports provide them, as they do for C drivers. Declared only so that the raw-dylib import
// library names them; Rust code here never calls them directly.
#[allow(
    dead_code,
    reason = "imported for the code the compiler generates, not called by name"
)]
#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "C" {
    fn memcpy(dest: *mut c_void, src: *const c_void, count: usize) -> *mut c_void;
    fn memmove(dest: *mut c_void, src: *const c_void, count: usize) -> *mut c_void;
    fn memset(dest: *mut c_void, c: i32, count: usize) -> *mut c_void;
    fn memcmp(a: *const c_void, b: *const c_void, count: usize) -> i32;
    fn strlen(s: *const c_char) -> usize;
}

/// The MSVC floating-point marker the linker looks for when code touches floats (`core`'s
/// formatting does); any definition will do, as in the CRT.
#[unsafe(no_mangle)]
pub static _fltused: i32 = 0;

/// The C++/SEH personality routine that the unwind tables of the prebuilt `alloc` name.
/// This image is built with `panic = "abort"`: nothing unwinds, so it never runs; if it
/// ever did, that is a bug worth a bugcheck rather than a silent return.
#[unsafe(no_mangle)]
pub extern "C" fn __CxxFrameHandler3() -> ! {
    // SAFETY: `KeBugCheckEx` may be called at any IRQL and has no other precondition.
    unsafe { KeBugCheckEx(PANIC_BUGCHECK, 0, 0, 0, 1) }
}

/// The global allocator: non-paged pool, tagged [`POOL_TAG`].
pub struct PoolAllocator;

// SAFETY: `ExAllocatePool2` returns null or a fresh block of at least `size` bytes aligned
// to `POOL_ALIGNMENT`, which stays valid until `ExFreePoolWithTag`; larger alignments are
// refused with null. `dealloc` frees only pointers `alloc` returned, with the same tag.
unsafe impl GlobalAlloc for PoolAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() > POOL_ALIGNMENT {
            return core::ptr::null_mut();
        }
        let flags = POOL_FLAG_NON_PAGED | POOL_FLAG_UNINITIALIZED;
        // SAFETY: valid flags, a non-zero size (`GlobalAlloc` contract) and a non-zero tag;
        // the global allocator runs at <= DISPATCH_LEVEL, the bound for non-paged pool.
        unsafe { ExAllocatePool2(flags, layout.size(), POOL_TAG) }.cast()
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() > POOL_ALIGNMENT {
            return core::ptr::null_mut();
        }
        // SAFETY: as in `alloc`; without `POOL_FLAG_UNINITIALIZED` the block comes zeroed.
        unsafe { ExAllocatePool2(POOL_FLAG_NON_PAGED, layout.size(), POOL_TAG) }.cast()
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`alloc_zeroed` of this allocator (`GlobalAlloc`
        // contract), so from `ExAllocatePool2` with `POOL_TAG`, and is freed once.
        unsafe { ExFreePoolWithTag(ptr.cast(), POOL_TAG) }
    }
}

#[global_allocator]
static GLOBAL_ALLOCATOR: PoolAllocator = PoolAllocator;

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

/// The part of the x64 `DRIVER_OBJECT` this driver touches: `DriverUnload` at `0x68`
/// (`MajorFunction[28]` follows at `0x70`; size `0x150`).
#[repr(C)]
pub struct DriverObject {
    _header: [u8; 0x68],
    /// `DriverUnload`.
    pub driver_unload: Option<unsafe extern "system" fn(*mut DriverObject)>,
    _major_function: [usize; 28],
}

const _: () = assert!(core::mem::offset_of!(DriverObject, driver_unload) == 0x68);
const _: () = assert!(core::mem::size_of::<DriverObject>() == 0x150);

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
