//! Pool: `ExAllocatePool2`, `ExAllocatePoolWithTag`, `ExAllocatePool`, `ExFreePoolWithTag` and
//! `ExFreePool`, checked as Driver Verifier checks them.

use core::ffi::c_void;
use std::collections::HashMap;

use super::bugcheck::{bugcheck, halt_if_stopped};
use super::irql::current_irql;
use super::{
    APC_LEVEL, DISPATCH_LEVEL, DRIVER_VERIFIER_DETECTED_VIOLATION, POOL_FLAG_NON_PAGED,
    POOL_FLAG_NON_PAGED_EXECUTE, POOL_FLAG_PAGED, POOL_FLAG_RAISE_ON_FAILURE,
    POOL_FLAG_UNINITIALIZED, lock, note,
};

/// Pool accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Successful allocations.
    pub allocations: u64,
    /// Frees.
    pub frees: u64,
    /// Allocations refused (injected failures).
    pub refused: u64,
    /// Blocks allocated and not freed.
    pub live_blocks: usize,
    /// Bytes allocated and not freed.
    pub live_bytes: usize,
    /// The most bytes live at once.
    pub peak_bytes: usize,
}

impl PoolStats {
    /// Every allocated block was freed.
    #[must_use]
    pub fn balanced(&self) -> bool {
        self.live_blocks == 0 && self.allocations == self.frees
    }
}

pub(crate) struct Block {
    layout: std::alloc::Layout,
    tag: u32,
}

#[derive(Default)]
pub(crate) struct Pool {
    blocks: HashMap<usize, Block>,
    stats: PoolStats,
    /// Allocations to let through before refusing one (then back to `None`).
    fail_after: Option<u64>,
}

/// Pool accounting now.
#[must_use]
pub fn pool_stats() -> PoolStats {
    lock().pool.stats
}

/// One pool block allocated and not freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PoolBlock {
    /// Its address, as `ExAllocatePool2` returned it.
    pub address: usize,
    /// Bytes requested.
    pub size: usize,
    /// Pool tag.
    pub tag: u32,
}

/// Every pool block allocated and not freed, by address (for residue checks: which blocks
/// are left, not only how many).
#[must_use]
pub fn pool_blocks() -> Vec<PoolBlock> {
    let state = lock();
    let mut blocks: Vec<PoolBlock> = state
        .pool
        .blocks
        .iter()
        .map(|(address, block)| PoolBlock {
            address: *address,
            size: block.layout.size(),
            tag: block.tag,
        })
        .collect();
    blocks.sort_unstable();
    blocks
}

/// Lets `count` more allocations succeed, then refuses one (`ExAllocatePool2` returns
/// NULL), then succeeds again.
pub fn fail_allocation_after(count: u64) {
    lock().pool.fail_after = Some(count);
}

pub(crate) fn pool_type(flags: u64) -> Option<&'static str> {
    let types = flags & (POOL_FLAG_NON_PAGED | POOL_FLAG_NON_PAGED_EXECUTE | POOL_FLAG_PAGED);
    match types {
        POOL_FLAG_NON_PAGED => Some("NonPagedPoolNx"),
        POOL_FLAG_NON_PAGED_EXECUTE => Some("NonPagedPoolExecute"),
        POOL_FLAG_PAGED => Some("PagedPool"),
        _ => None,
    }
}

pub(crate) extern "win64" fn ex_allocate_pool2(flags: u64, size: usize, tag: u32) -> *mut c_void {
    let Some(kind) = pool_type(flags) else {
        note(&format!(
            "ExAllocatePool2: no single pool type in flags {flags:#x}: NULL"
        ));
        return core::ptr::null_mut();
    };
    if flags & POOL_FLAG_RAISE_ON_FAILURE != 0 {
        note("ExAllocatePool2: POOL_FLAG_RAISE_ON_FAILURE is not modelled (no SEH here)");
    }
    let fill = if flags & POOL_FLAG_UNINITIALIZED != 0 {
        UNINITIALIZED
    } else {
        0
    };
    allocate("ExAllocatePool2", kind, size, tag, fill)
}

/// `POOL_TYPE` values are even for non-paged pool and odd for paged pool (`PagedPool` 1,
/// `PagedPoolCacheAligned` 5, `PagedPoolSession` 33, ...; `NonPagedPoolNx` 512).
fn legacy_pool_type(pool_type: i32) -> &'static str {
    match pool_type {
        0 => "NonPagedPool",
        512 => "NonPagedPoolNx",
        t if t & 1 == 1 => "PagedPool",
        _ => "NonPagedPool (other POOL_TYPE)",
    }
}

/// `ExAllocatePoolWithTag(PoolType, NumberOfBytes, Tag)`: the memory is not zeroed.
pub(crate) extern "win64" fn ex_allocate_pool_with_tag(
    pool_type: i32,
    size: usize,
    tag: u32,
) -> *mut c_void {
    let kind = legacy_pool_type(pool_type);
    allocate("ExAllocatePoolWithTag", kind, size, tag, UNINITIALIZED)
}

/// `ExAllocatePool(PoolType, NumberOfBytes)`: tag `None`, as the kernel tags it.
pub(crate) extern "win64" fn ex_allocate_pool(pool_type: i32, size: usize) -> *mut c_void {
    let kind = legacy_pool_type(pool_type);
    allocate(
        "ExAllocatePool",
        kind,
        size,
        u32::from_le_bytes(*b"None"),
        UNINITIALIZED,
    )
}

/// The fill of memory the caller did not ask to be zeroed: nothing may rely on zeroes.
const UNINITIALIZED: u8 = 0xCD;

/// One allocation of `kind` (a name ending in `PagedPool` is paged) for `routine`, with
/// the IRQL and size checks Driver Verifier makes, and the injected failures.
fn allocate(routine: &str, kind: &str, size: usize, tag: u32, fill: u8) -> *mut c_void {
    let irql = current_irql();
    let paged = kind == "PagedPool";
    let max = if paged { APC_LEVEL } else { DISPATCH_LEVEL };
    if irql > max {
        let code = if paged { 0x01 } else { 0x02 };
        bugcheck(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [code, usize::from(irql), 0, size],
            format!("{routine}({kind}) at IRQL {irql}"),
        );
    }
    if size == 0 {
        bugcheck(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [0x00, usize::from(irql), 0, 0],
            format!("{routine} of zero bytes"),
        );
    }
    let mut state = halt_if_stopped(lock());
    match state.pool.fail_after {
        Some(0) => {
            state.pool.fail_after = None;
            state.pool.stats.refused += 1;
            return core::ptr::null_mut();
        }
        Some(n) => state.pool.fail_after = Some(n - 1),
        None => {}
    }
    let Ok(layout) = std::alloc::Layout::from_size_align(size, 16) else {
        return core::ptr::null_mut();
    };
    // SAFETY: `layout` has a non-zero size (checked above).
    let block = unsafe { std::alloc::alloc(layout) };
    if block.is_null() {
        return core::ptr::null_mut();
    }
    // SAFETY: `block` is a fresh allocation of `size` bytes.
    unsafe { block.write_bytes(fill, size) };
    state
        .pool
        .blocks
        .insert(block.expose_provenance(), Block { layout, tag });
    let counters = &mut state.pool.stats;
    counters.allocations += 1;
    counters.live_blocks += 1;
    counters.live_bytes += size;
    counters.peak_bytes = counters.peak_bytes.max(counters.live_bytes);
    block.cast()
}

pub(crate) extern "win64" fn ex_free_pool_with_tag(p: *mut c_void, tag: u32) {
    free("ExFreePoolWithTag", p, Some(tag));
}

/// `ExFreePool(P)`: no tag to check.
pub(crate) extern "win64" fn ex_free_pool(p: *mut c_void) {
    free("ExFreePool", p, None);
}

fn free(routine: &str, p: *mut c_void, tag: Option<u32>) {
    let irql = current_irql();
    if irql > DISPATCH_LEVEL {
        bugcheck(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [0x12, usize::from(irql), 0, p.addr()],
            format!("{routine} at IRQL {irql}"),
        );
    }
    let mut state = halt_if_stopped(lock());
    let Some(block) = state.pool.blocks.remove(&p.addr()) else {
        drop(state);
        bugcheck(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [0x10, p.addr(), 0, 0],
            format!("{routine}({p:p}): not a live pool block (double free or bad address)"),
        );
    };
    if let Some(tag) = tag.filter(|tag| *tag != block.tag) {
        drop(state);
        bugcheck(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [0x16, 0, p.addr(), tag as usize],
            format!(
                "{routine}({p:p}, {tag:#x}): allocated with tag {:#x}",
                block.tag
            ),
        );
    }
    let counters = &mut state.pool.stats;
    counters.frees += 1;
    counters.live_blocks -= 1;
    counters.live_bytes -= block.layout.size();
    drop(state);
    // SAFETY: `p` was allocated above with `block.layout` and is freed once (it was in the
    // live map, and is removed from it).
    unsafe { std::alloc::dealloc(p.cast(), block.layout) };
}
