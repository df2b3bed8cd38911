//! Work items: `IoAllocateWorkItem`, `IoFreeWorkItem`, `IoSizeofWorkItem`,
//! `IoInitializeWorkItem`, `IoUninitializeWorkItem`, `IoQueueWorkItem`, `IoQueueWorkItemEx`.
//!
//! A queued item's routine runs at `PASSIVE_LEVEL` on a worker thread of its own; the item
//! is dequeued before its routine runs (so the routine may free or requeue it), and the I/O
//! manager's reference on the I/O object is held until the routine returns: the machine's
//! unload waits for every queued or running item before it may unmap the image.
//! `IoQueueWorkItem` on an item made for a driver object stops the machine (it requires a
//! device object; `IoQueueWorkItemEx` accepts either), as does queueing an item twice or
//! freeing one that is queued (`WORKER_INVALID`).

use core::ffi::c_void;
use std::collections::HashMap;

use super::bugcheck::{bugcheck, halt_if_stopped};
use super::irql::{current_irql, set_irql};
use super::{
    CHANGED, DISPATCH_LEVEL, IRQL_NOT_LESS_OR_EQUAL, PASSIVE_LEVEL,
    WORKER_THREAD_RETURNED_AT_BAD_IRQL, lock,
};

/// `WORKER_INVALID`: a work item queued while queued, or freed while queued.
pub const WORKER_INVALID: u32 = 0xE4;
/// `IO_TYPE_DRIVER`, the `Type` of a `DRIVER_OBJECT`.
const IO_TYPE_DRIVER: i16 = 4;
/// What `IoSizeofWorkItem` reports: the x64 `IO_WORKITEM` size.
const SIZEOF_WORK_ITEM: u32 = 0x58;

struct WorkItem {
    io_object: usize,
    queued: bool,
    /// Allocated by `IoAllocateWorkItem` (freed by `IoFreeWorkItem`), or storage of the
    /// driver's given to `IoInitializeWorkItem`.
    allocated: Option<Box<[u64; SIZEOF_WORK_ITEM as usize / 8]>>,
}

/// The work items the driver has, by address.
#[derive(Default)]
pub(crate) struct WorkItems {
    items: HashMap<usize, WorkItem>,
    /// Items queued or whose routine is running.
    pub(crate) outstanding: usize,
    stats: WorkItemStats,
}

/// Work item accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkItemStats {
    /// Items queued.
    pub queued: u64,
    /// Routines that ran to completion.
    pub completed: u64,
    /// Items that exist (allocated or initialised, not yet freed or uninitialised).
    pub live: usize,
}

/// Work item accounting now.
#[must_use]
pub fn work_item_stats() -> WorkItemStats {
    let state = lock();
    WorkItemStats {
        live: state.work.items.len(),
        ..state.work.stats
    }
}

/// Items queued or running now.
#[must_use]
pub fn work_items_outstanding() -> usize {
    lock().work.outstanding
}

fn check_irql(routine: &str, address: usize) {
    let irql = current_irql();
    if irql > DISPATCH_LEVEL {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [address, usize::from(irql), 0, 0],
            format!("{routine} at IRQL {irql}; it requires IRQL <= DISPATCH_LEVEL"),
        );
    }
}

pub(crate) extern "win64" fn io_sizeof_work_item() -> u32 {
    SIZEOF_WORK_ITEM
}

pub(crate) extern "win64" fn io_allocate_work_item(io_object: *mut c_void) -> *mut c_void {
    check_irql("IoAllocateWorkItem", io_object.addr());
    let mut storage = Box::new([0u64; SIZEOF_WORK_ITEM as usize / 8]);
    let address = storage.as_mut_ptr().cast::<c_void>();
    halt_if_stopped(lock()).work.items.insert(
        address.addr(),
        WorkItem {
            io_object: io_object.addr(),
            queued: false,
            allocated: Some(storage),
        },
    );
    address
}

pub(crate) extern "win64" fn io_initialize_work_item(io_object: *mut c_void, item: *mut c_void) {
    check_irql("IoInitializeWorkItem", item.addr());
    halt_if_stopped(lock()).work.items.insert(
        item.addr(),
        WorkItem {
            io_object: io_object.addr(),
            queued: false,
            allocated: None,
        },
    );
}

/// Removes `item` (not queued), or stops the machine.
fn retire(routine: &str, item: *mut c_void, allocated: bool) -> Option<WorkItem> {
    check_irql(routine, item.addr());
    let mut state = halt_if_stopped(lock());
    let known = state
        .work
        .items
        .get(&item.addr())
        .map(|w| (w.queued, w.allocated.is_some()));
    match known {
        Some((false, kind)) if kind == allocated => state.work.items.remove(&item.addr()),
        Some((true, _)) => {
            drop(state);
            bugcheck(
                WORKER_INVALID,
                [1, item.addr(), 0, 0],
                format!("{routine}({item:p}) while the item is queued"),
            );
        }
        _ => {
            drop(state);
            bugcheck(
                WORKER_INVALID,
                [2, item.addr(), 0, 0],
                format!(
                    "{routine}({item:p}): not a work item {}",
                    if allocated {
                        "IoAllocateWorkItem returned"
                    } else {
                        "IoInitializeWorkItem initialised"
                    }
                ),
            );
        }
    }
}

pub(crate) extern "win64" fn io_free_work_item(item: *mut c_void) {
    drop(retire("IoFreeWorkItem", item, true));
}

pub(crate) extern "win64" fn io_uninitialize_work_item(item: *mut c_void) {
    drop(retire("IoUninitializeWorkItem", item, false));
}

/// How the routine of a queued item is called.
#[derive(Clone, Copy)]
enum Routine {
    /// `IO_WORKITEM_ROUTINE(DeviceObject, Context)`.
    Plain(usize),
    /// `IO_WORKITEM_ROUTINE_EX(IoObject, Context, IoWorkItem)`.
    Ex(usize),
}

fn queue(routine_name: &str, item: *mut c_void, routine: Routine, context: *mut c_void) {
    check_irql(routine_name, item.addr());
    let mut state = halt_if_stopped(lock());
    let Some(work) = state.work.items.get_mut(&item.addr()) else {
        drop(state);
        bugcheck(
            WORKER_INVALID,
            [3, item.addr(), 0, 0],
            format!("{routine_name}({item:p}): not a work item"),
        );
    };
    if work.queued {
        drop(state);
        bugcheck(
            WORKER_INVALID,
            [4, item.addr(), 0, 0],
            format!("{routine_name}({item:p}) while the item is already queued"),
        );
    }
    let io_object = work.io_object;
    if matches!(routine, Routine::Plain(_)) && io_object_type(io_object) == Some(IO_TYPE_DRIVER) {
        drop(state);
        bugcheck(
            WORKER_INVALID,
            [5, item.addr(), io_object, 0],
            format!(
                "IoQueueWorkItem({item:p}) on an item made for a driver object: that needs \
                 IoQueueWorkItemEx"
            ),
        );
    }
    work.queued = true;
    state.work.outstanding += 1;
    state.work.stats.queued += 1;
    drop(state);
    let (item, context) = (item.addr(), context.addr());
    let spawned = std::thread::Builder::new()
        .name("system worker".into())
        .spawn(move || run(item, io_object, routine, context));
    if spawned.is_err() {
        bugcheck(
            WORKER_INVALID,
            [6, item, 0, 0],
            "the host could not start a worker thread".into(),
        );
    }
}

/// The `Type` of the I/O object at `address`, if it is the machine's driver object or
/// looks like an I/O object (the model only reads objects the driver passed it).
fn io_object_type(address: usize) -> Option<i16> {
    if address == 0 {
        return None;
    }
    // SAFETY: the address is the I/O object the driver passed to `IoAllocateWorkItem` or
    // `IoInitializeWorkItem` (a `DEVICE_OBJECT` or `DRIVER_OBJECT`, both starting with a
    // 16-bit `Type`), alive while its work items exist (the work item contract).
    Some(unsafe { core::ptr::with_exposed_provenance::<i16>(address).read() })
}

fn run(item: usize, io_object: usize, routine: Routine, context: usize) {
    drop(halt_if_stopped(lock()));
    if let Some(work) = lock().work.items.get_mut(&item) {
        work.queued = false;
    }
    set_irql(PASSIVE_LEVEL);
    let object = core::ptr::with_exposed_provenance_mut::<c_void>(io_object);
    let context = core::ptr::with_exposed_provenance_mut::<c_void>(context);
    match routine {
        Routine::Plain(address) => {
            // SAFETY: `address` is the `IO_WORKITEM_ROUTINE` the driver queued, an NTAPI
            // function of the mapped image; the image stays mapped while the item is
            // outstanding (the machine's unload waits for it).
            let f = unsafe {
                std::mem::transmute::<usize, extern "win64" fn(*mut c_void, *mut c_void)>(address)
            };
            f(object, context);
        }
        Routine::Ex(address) => {
            // SAFETY: as above, for the `IO_WORKITEM_ROUTINE_EX` the driver queued.
            let f = unsafe {
                std::mem::transmute::<usize, extern "win64" fn(*mut c_void, *mut c_void, *mut c_void)>(
                    address,
                )
            };
            f(
                object,
                context,
                core::ptr::with_exposed_provenance_mut::<c_void>(item),
            );
        }
    }
    let irql = current_irql();
    if irql != PASSIVE_LEVEL {
        bugcheck(
            WORKER_THREAD_RETURNED_AT_BAD_IRQL,
            [0, usize::from(irql), item, 0],
            format!("a work item routine returned at IRQL {irql}"),
        );
    }
    let mut state = lock();
    state.work.outstanding -= 1;
    state.work.stats.completed += 1;
    CHANGED.notify_all();
}

pub(crate) extern "win64" fn io_queue_work_item(
    item: *mut c_void,
    routine: usize,
    _queue_type: i32,
    context: *mut c_void,
) {
    queue("IoQueueWorkItem", item, Routine::Plain(routine), context);
}

pub(crate) extern "win64" fn io_queue_work_item_ex(
    item: *mut c_void,
    routine: usize,
    _queue_type: i32,
    context: *mut c_void,
) {
    queue("IoQueueWorkItemEx", item, Routine::Ex(routine), context);
}
