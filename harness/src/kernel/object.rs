//! Object references: `ObfReferenceObject`/`ObReferenceObject` and
//! `ObfDereferenceObject`/`ObDereferenceObject`.
//!
//! The model tracks the references a driver takes on its own driver object (the I/O
//! manager's own reference is the base, not counted): while any is held after
//! `DriverUnload`, the image stays mapped, as Windows keeps a driver image loaded until its
//! driver object's last reference goes. References on other objects are counted per
//! address; a dereference of the driver object below its base bugchecks
//! `REFERENCE_BY_POINTER`.

use core::ffi::c_void;
use std::collections::HashMap;

use super::bugcheck::{bugcheck, halt_if_stopped};
use super::irql::current_irql;
use super::{CHANGED, DISPATCH_LEVEL, IRQL_NOT_LESS_OR_EQUAL, REFERENCE_BY_POINTER, lock, note};

/// The object manager's part of the model.
#[derive(Default)]
pub(crate) struct Objects {
    /// The machine's `DRIVER_OBJECT`.
    pub(crate) driver_object: usize,
    /// References the driver took on its driver object and still holds.
    pub(crate) driver_references: u64,
    /// `DriverUnload` has returned.
    pub(crate) unloaded: bool,
    /// References taken on other objects, by address, net of dereferences.
    others: HashMap<usize, i64>,
}

/// Tells the model which address is the driver object (the machine does, at boot).
pub fn set_driver_object(address: usize) {
    lock().objects.driver_object = address;
}

/// References the driver holds on its own driver object now (beyond the I/O manager's).
#[must_use]
pub fn driver_object_references() -> u64 {
    lock().objects.driver_references
}

fn check_irql(routine: &str, object: *mut c_void) {
    let irql = current_irql();
    if irql > DISPATCH_LEVEL {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [object.addr(), usize::from(irql), 0, 0],
            format!("{routine} at IRQL {irql}; it requires IRQL <= DISPATCH_LEVEL"),
        );
    }
}

/// `ObfReferenceObject(Object)`: returns the new count as the model knows it (the driver
/// object counts the I/O manager's reference as 1).
pub(crate) extern "win64" fn obf_reference_object(object: *mut c_void) -> isize {
    check_irql("ObfReferenceObject", object);
    let mut state = halt_if_stopped(lock());
    let objects = &mut state.objects;
    if object.addr() == objects.driver_object {
        objects.driver_references += 1;
        isize::try_from(objects.driver_references + 1).unwrap_or(isize::MAX)
    } else {
        let count = objects.others.entry(object.addr()).or_default();
        *count += 1;
        isize::try_from(*count).unwrap_or(isize::MAX)
    }
}

/// `ObfDereferenceObject(Object)`: returns the new count as the model knows it.
pub(crate) extern "win64" fn obf_dereference_object(object: *mut c_void) -> isize {
    check_irql("ObfDereferenceObject", object);
    let mut state = halt_if_stopped(lock());
    let objects = &mut state.objects;
    if object.addr() == objects.driver_object {
        if objects.driver_references == 0 {
            drop(state);
            bugcheck(
                REFERENCE_BY_POINTER,
                [0, object.addr(), 0, 0],
                "ObDereferenceObject of the driver object without a reference the driver \
                 took: its count would drop below the I/O manager's own"
                    .into(),
            );
        }
        objects.driver_references -= 1;
        let left = objects.driver_references;
        let unloaded = objects.unloaded;
        CHANGED.notify_all();
        drop(state);
        if left == 0 && unloaded {
            note("the last reference to the unloaded driver object is gone: the image may unmap");
        }
        isize::try_from(left + 1).unwrap_or(isize::MAX)
    } else {
        let count = objects.others.entry(object.addr()).or_default();
        *count -= 1;
        let count = *count;
        drop(state);
        if count < 0 {
            note(&format!(
                "ObDereferenceObject({object:p}): more dereferences than the driver's \
                 references (an object the model did not create: not checked)"
            ));
        }
        isize::try_from(count).unwrap_or(isize::MAX)
    }
}

/// What the machine may do with the image once `DriverUnload` has returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterUnload {
    /// No work item outstanding, no reference held: unmap it.
    Unmap,
    /// The driver still holds this many references to its driver object: the image stays
    /// mapped (a late call into it runs mapped code).
    KeptMapped(u64),
    /// Work items were still queued or running when the wait ended.
    WorkItemsOutstanding(usize),
    /// The machine stopped meanwhile.
    Stopped,
}

/// Marks the driver unloaded, waits up to `timeout` for every outstanding work item (each
/// keeps the image loaded until its routine returns), then says whether the image may be
/// unmapped. Runs on a harness thread: it never halts.
#[must_use]
pub fn after_driver_unload(timeout: std::time::Duration) -> AfterUnload {
    let start = std::time::Instant::now();
    let mut state = lock();
    state.objects.unloaded = true;
    loop {
        if state.bugcheck.is_some() {
            return AfterUnload::Stopped;
        }
        let outstanding = state.work.outstanding;
        if outstanding == 0 {
            break;
        }
        if start.elapsed() > timeout {
            return AfterUnload::WorkItemsOutstanding(outstanding);
        }
        state = super::wait(state);
    }
    match state.objects.driver_references {
        0 => AfterUnload::Unmap,
        references => {
            drop(state);
            note(&format!(
                "DriverUnload returned with {references} reference(s) to the driver object \
                 held: the image stays mapped until the last one is dropped"
            ));
            AfterUnload::KeptMapped(references)
        }
    }
}
