//! # teredo-kernel-shim: the ntoskrnl pieces a Rust driver image needs without the WDK
//!
//! The example drivers' images for the loader harness (`harness/`) are linked with
//! `rust-lld` on Linux, where the windows-drivers-rs crates do not build. This crate stands
//! in for what those crates give a driver, each with the same kernel routine:
//!
//! | windows-drivers-rs | here |
//! |---|---|
//! | `wdk-alloc`'s global allocator | [`PoolAllocator`]: `ExAllocatePool2(POOL_FLAG_NON_PAGED)` / `ExFreePoolWithTag`, with the driver's tag |
//! | the CRT symbols the WDK's libraries provide | `_fltused`, `__CxxFrameHandler3`, and `memcpy`/`memmove`/`memset`/`memcmp`/`strlen` imported from ntoskrnl |
//! | `wdk_sys::DRIVER_OBJECT` | [`DriverObject`]: only the `DriverUnload` field (offset `0x68`) |
//! | `KeBugCheckEx`, `ObfReferenceObject`, `DbgPrint` | the same, declared here |
//!
//! A driver declares its own `#[global_allocator]` (a [`PoolAllocator`] with its tag) and its
//! own `#[panic_handler]` (it decides what to log). Every import is `raw-dylib` from
//! `ntoskrnl.exe`, so no import library is needed; the linker settings live in the
//! harness's build step. `x86_64-pc-windows-msvc` only.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::{c_char, c_void};

#[cfg(not(target_os = "windows"))]
compile_error!("teredo-kernel-shim is for x86_64-pc-windows-msvc driver images");

/// `POOL_FLAG_UNINITIALIZED` (`wdm.h`): skip the zeroing `ExAllocatePool2` does by default.
const POOL_FLAG_UNINITIALIZED: u64 = 0x2;
/// `POOL_FLAG_NON_PAGED` (`wdm.h`): callbacks touch driver memory at `DISPATCH_LEVEL`.
const POOL_FLAG_NON_PAGED: u64 = 0x40;
/// The alignment `ExAllocatePool2` guarantees on x64 (`MEMORY_ALLOCATION_ALIGNMENT`).
const POOL_ALIGNMENT: usize = 16;
/// The bugcheck code of `__CxxFrameHandler3` if it ever ran: reads `"UNWD"` in a crash dump.
pub const UNWIND_BUGCHECK: u32 = u32::from_be_bytes(*b"UNWD");

#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "system" {
    /// `ExAllocatePool2` (`<= DISPATCH_LEVEL` for non-paged pool).
    fn ExAllocatePool2(flags: u64, number_of_bytes: usize, tag: u32) -> *mut c_void;
    /// `ExFreePoolWithTag` (`<= DISPATCH_LEVEL`).
    fn ExFreePoolWithTag(p: *mut c_void, tag: u32);
    /// `KeBugCheckEx` (any IRQL; does not return).
    pub fn KeBugCheckEx(code: u32, p1: usize, p2: usize, p3: usize, p4: usize) -> !;
    /// `ObfReferenceObject` (`<= DISPATCH_LEVEL`; `ObReferenceObject` is a macro over it).
    pub fn ObfReferenceObject(object: *mut c_void) -> isize;
}

#[link(name = "ntoskrnl.exe", kind = "raw-dylib", modifiers = "+verbatim")]
unsafe extern "C" {
    /// `DbgPrint` (`__cdecl`, variadic; valid up to `DIRQL`, except the Unicode conversions,
    /// which need `PASSIVE_LEVEL`). The kernel formats: the image carries no formatter.
    pub fn DbgPrint(format: *const c_char, ...) -> u32;
}

// The C runtime routines that compiled Rust code calls (`core`, `alloc` and the code LLVM
// generates for copies and comparisons). Without a CRT (`/NODEFAULTLIB`) the kernel's own
// exports provide them, as they do for C drivers. Declared only so that the raw-dylib import
// library names them; Rust code never calls them by name.
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

/// The MSVC floating-point marker the linker looks for when code touches floats; any
/// definition will do, as in the CRT.
#[unsafe(no_mangle)]
pub static _fltused: i32 = 0;

/// The C++/SEH personality routine that the unwind tables of the prebuilt `alloc` name.
/// The images are built with `panic = "abort"`: nothing unwinds, so it never runs; if it
/// ever did, that is a bug worth a bugcheck rather than a silent return.
#[unsafe(no_mangle)]
pub extern "C" fn __CxxFrameHandler3() -> ! {
    // SAFETY: `KeBugCheckEx` may be called at any IRQL and has no other precondition.
    unsafe { KeBugCheckEx(UNWIND_BUGCHECK, 0, 0, 0, 0) }
}

/// A global allocator over non-paged pool, every block tagged `TAG` (as it reads in a pool
/// dump, the first character in the lowest byte: `u32::from_le_bytes(*b"TMon")`).
pub struct PoolAllocator<const TAG: u32>;

// SAFETY: `ExAllocatePool2` returns null or a fresh block of at least `size` bytes aligned
// to `POOL_ALIGNMENT`, which stays valid until `ExFreePoolWithTag`; larger alignments are
// refused with null. `dealloc` frees only pointers `alloc` returned, with the same tag.
unsafe impl<const TAG: u32> GlobalAlloc for PoolAllocator<TAG> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() > POOL_ALIGNMENT {
            return core::ptr::null_mut();
        }
        let flags = POOL_FLAG_NON_PAGED | POOL_FLAG_UNINITIALIZED;
        // SAFETY: valid flags, a non-zero size (`GlobalAlloc` contract) and the driver's
        // tag; a global allocator runs at <= DISPATCH_LEVEL, the bound for non-paged pool.
        unsafe { ExAllocatePool2(flags, layout.size(), TAG) }.cast()
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() > POOL_ALIGNMENT {
            return core::ptr::null_mut();
        }
        // SAFETY: as in `alloc`; without `POOL_FLAG_UNINITIALIZED` the block comes zeroed.
        unsafe { ExAllocatePool2(POOL_FLAG_NON_PAGED, layout.size(), TAG) }.cast()
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`alloc_zeroed` of this allocator (`GlobalAlloc`
        // contract), so from `ExAllocatePool2` with `TAG`, and is freed once.
        unsafe { ExFreePoolWithTag(ptr.cast(), TAG) }
    }
}

/// The part of the x64 `DRIVER_OBJECT` these drivers touch: `DriverUnload` at `0x68`
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
