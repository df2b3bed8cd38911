//! Fallible allocation within what kernel pool allocators guarantee.
//!
//! Kernel global allocators hand out pool blocks aligned to `MEMORY_ALLOCATION_ALIGNMENT`
//! (16 bytes on x64) whatever `Layout::align()` asks for: `wdk-alloc` 0.4.2 passes only the
//! size to `ExAllocatePool2`. So this crate never asks the global allocator for more than
//! [`POOL_ALIGNMENT`]: its own types fit (checked at compile time in [`try_box`]), and a
//! subscriber closure with a larger alignment is placed inside a larger block by
//! [`OverAligned`].

use alloc::alloc::{Layout, alloc, dealloc};
use alloc::boxed::Box;
use core::ptr::NonNull;

use crate::error::Error;

/// The alignment every pool block has on x64 (`MEMORY_ALLOCATION_ALIGNMENT`), and the most
/// this crate relies on from the global allocator.
pub(crate) const POOL_ALIGNMENT: usize = 16;

/// Allocates `value` on the heap, returning an error instead of aborting.
pub(crate) fn try_box<T>(value: T) -> Result<Box<T>, Error> {
    const {
        assert!(
            core::mem::align_of::<T>() <= POOL_ALIGNMENT,
            "a boxed type of this crate needs more alignment than pool blocks have"
        );
    };
    let layout = Layout::new::<T>();
    if layout.size() == 0 {
        return Ok(Box::new(value));
    }
    // SAFETY: the layout has a non-zero size.
    let raw = unsafe { alloc(layout) }.cast::<T>();
    if raw.is_null() {
        return Err(Error::AllocationFailed {
            bytes: layout.size(),
        });
    }
    // SAFETY: `raw` is a fresh allocation of `Layout::new::<T>()`, valid for writes, and
    // aligned: the alignment asked for is at most `POOL_ALIGNMENT` (checked above), which
    // every pool block has.
    unsafe { raw.write(value) };
    // SAFETY: allocated with the global allocator and the layout of `T`, and initialized:
    // exactly what `Box::from_raw` requires.
    Ok(unsafe { Box::from_raw(raw) })
}

/// A block that holds a value of `layout` at an address aligned to `layout.align()`, asking
/// the allocator for at most [`POOL_ALIGNMENT`].
///
/// # Invariants
///
/// `base` was returned by the global allocator for `block` (or is dangling when
/// `block.size() == 0`); `value` is `base` rounded up to the value's alignment, and the
/// value's size fits between `value` and the end of the block.
pub(crate) struct OverAligned {
    base: NonNull<u8>,
    value: NonNull<u8>,
    block: Layout,
}

impl OverAligned {
    /// Allocates room for a value of `layout`.
    pub(crate) fn new(layout: Layout) -> Result<OverAligned, Error> {
        if layout.size() == 0 {
            // A zero-sized value needs no memory, only an aligned non-null address.
            let value = NonNull::new(core::ptr::without_provenance_mut::<u8>(layout.align()))
                .unwrap_or(NonNull::dangling());
            // INVARIANT: nothing is allocated; `value` is aligned and non-null.
            return Ok(OverAligned {
                base: value,
                value,
                block: layout,
            });
        }
        let align = layout.align();
        let (size, block_align) = if align <= POOL_ALIGNMENT {
            (layout.size(), align)
        } else {
            // Room to move the value up to the next multiple of `align` from an address
            // that is only `POOL_ALIGNMENT`-aligned.
            (layout.size() + (align - POOL_ALIGNMENT), POOL_ALIGNMENT)
        };
        let failed = Error::AllocationFailed { bytes: size };
        let block = Layout::from_size_align(size, block_align).map_err(|_| failed)?;
        // SAFETY: the block has a non-zero size (`layout.size() != 0`).
        let base = NonNull::new(unsafe { alloc(block) }).ok_or(failed)?;
        let offset = base.as_ptr().align_offset(align);
        if offset > size - layout.size() {
            // Only an allocator that breaks even `POOL_ALIGNMENT` gets here.
            // SAFETY: `base` was allocated just above with `block`.
            unsafe { dealloc(base.as_ptr(), block) };
            return Err(failed);
        }
        // SAFETY: `offset <= size - layout.size()`, so the result stays inside the block.
        let value = unsafe { base.add(offset) };
        // INVARIANT: `base` is the allocator's block; `value` is aligned and the value fits.
        Ok(OverAligned { base, value, block })
    }

    /// Where the value goes: aligned for the layout given to [`new`](Self::new).
    pub(crate) fn value(&self) -> NonNull<u8> {
        self.value
    }

    /// Frees the block. The caller has dropped (or moved out) the value in it.
    pub(crate) fn free(self) {
        if self.block.size() != 0 {
            // SAFETY: `base` came from the global allocator with `block` (type invariant),
            // and `self` is consumed, so it is freed once.
            unsafe { dealloc(self.base.as_ptr(), self.block) };
        }
    }
}
