//! [`DriverSlot`]: the one owned place where the driver keeps its state between
//! `DriverEntry` and `DriverUnload`, without `static mut`.

use alloc::boxed::Box;
use core::marker::PhantomData;
use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};

/// Owns at most one heap-allocated `T`; `const`-constructible, so a driver can keep it in a
/// `static`.
///
/// [`put`](Self::put) moves a box in, [`take`](Self::take) moves it out: the slot never
/// hands out references, so there is nothing to invalidate when the state is taken at
/// unload. Dropping a slot drops what it holds.
///
/// # Invariants
///
/// `ptr` is null or comes from `Box::<T>::into_raw`, and that box is owned by the slot: it
/// is turned back into a `Box` exactly once, by whoever swaps the pointer out.
pub struct DriverSlot<T> {
    ptr: AtomicPtr<T>,
    // Owns a `Box<T>`: drop check and auto traits as for `Option<Box<T>>`
    // (`Send`/`Sync` only when `T` is).
    _owns: PhantomData<Box<T>>,
}

impl<T> DriverSlot<T> {
    /// An empty slot.
    #[must_use]
    pub const fn new() -> Self {
        // INVARIANT: null.
        DriverSlot {
            ptr: AtomicPtr::new(ptr::null_mut()),
            _owns: PhantomData,
        }
    }

    /// Moves `value` in. If the slot is occupied, nothing changes and `value` is returned.
    ///
    /// # IRQL
    ///
    /// Any (one atomic compare-exchange).
    ///
    /// # Errors
    ///
    /// `value` itself, when the slot already holds a state.
    pub fn put(&self, value: Box<T>) -> Result<(), Box<T>> {
        let raw = Box::into_raw(value);
        // INVARIANT: on success the slot owns `raw`, which comes from `Box::into_raw`.
        match self
            .ptr
            .compare_exchange(ptr::null_mut(), raw, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(()),
            // SAFETY: the exchange failed, so the slot did not take `raw`: we still own the
            // box we just turned into `raw`, and nobody else has seen the pointer.
            Err(_) => Err(unsafe { Box::from_raw(raw) }),
        }
    }

    /// Moves the state out, leaving the slot empty.
    ///
    /// # IRQL
    ///
    /// Any (one atomic swap); dropping the returned state has its own requirements.
    #[must_use = "dropping the state here runs its teardown"]
    pub fn take(&self) -> Option<Box<T>> {
        let raw = self.ptr.swap(ptr::null_mut(), Ordering::AcqRel);
        if raw.is_null() {
            None
        } else {
            // SAFETY: by the type invariant a non-null pointer comes from `Box::into_raw`
            // and is owned by the slot; the swap made this call the only one to get it.
            Some(unsafe { Box::from_raw(raw) })
        }
    }

    /// Whether the slot holds a state.
    #[must_use]
    pub fn is_occupied(&self) -> bool {
        !self.ptr.load(Ordering::Acquire).is_null()
    }
}

impl<T> Default for DriverSlot<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Drop for DriverSlot<T> {
    fn drop(&mut self) {
        drop(self.take());
    }
}

impl<T> core::fmt::Debug for DriverSlot<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DriverSlot")
            .field("occupied", &self.is_occupied())
            .finish()
    }
}

#[cfg(all(test, feature = "host-mock"))]
mod tests {
    use super::DriverSlot;
    use alloc::boxed::Box;

    #[test]
    fn put_take_round_trip_and_refuses_a_second_state() {
        let slot = DriverSlot::new();
        assert!(slot.put(Box::new(7_u32)).is_ok());
        assert!(slot.is_occupied());
        let refused = slot.put(Box::new(8_u32)).expect_err("occupied slot");
        assert_eq!(*refused, 8);
        assert_eq!(slot.take().as_deref(), Some(&7));
        assert!(slot.take().is_none());
        assert!(!slot.is_occupied());
    }

    #[test]
    fn dropping_the_slot_drops_its_state() {
        let marker = std::sync::Arc::new(());
        let slot = DriverSlot::new();
        assert!(slot.put(Box::new(std::sync::Arc::clone(&marker))).is_ok());
        assert_eq!(std::sync::Arc::strong_count(&marker), 2);
        drop(slot);
        assert_eq!(std::sync::Arc::strong_count(&marker), 1);
    }
}
