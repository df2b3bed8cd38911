//! The ntoskrnl routines a typical WDM driver imports, as the model binds them: each keeps
//! its documented IRQL rule and stops the machine when it is broken.
#![cfg(all(target_arch = "x86_64", unix))]

use core::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use teredo_harness::kernel::{
    self, APC_LEVEL, AnsiString, DISPATCH_LEVEL, PASSIVE_LEVEL, UnicodeString,
};
use teredo_harness::{Machine, Stop, sysbuild};

fn boot() -> Machine {
    let sys = sysbuild::sys_image().unwrap_or_else(|e| panic!("the .sys must build: {e}"));
    Machine::boot(sys, false).unwrap_or_else(|e| panic!("the .sys must load: {e}"))
}

fn host<T>(name: &str) -> T {
    let address = kernel::resolve("ntoskrnl.exe", name).unwrap_or_else(|| panic!("{name}"));
    assert_eq!(size_of::<T>(), size_of::<usize>());
    // SAFETY: every use names `T` as the function pointer type of the documented signature
    // of `name`, which is the signature of the model's function.
    unsafe { std::mem::transmute_copy::<usize, T>(&address) }
}

fn expect_stop<T: std::fmt::Debug>(result: Result<T, Stop>, code: u32) -> kernel::Bugcheck {
    match result {
        Err(Stop::Bugcheck(stop)) if stop.code == code => stop,
        other => panic!("expected stop {code:#x}, got {other:?}"),
    }
}

type AllocWithTag = extern "win64" fn(i32, usize, u32) -> *mut c_void;
type Alloc = extern "win64" fn(i32, usize) -> *mut c_void;
type FreeNoTag = extern "win64" fn(*mut c_void);
type Raise = extern "win64" fn(u8) -> u8;
type Lower = extern "win64" fn(u8);
type SpinLock = extern "win64" fn(*mut usize);

#[test]
fn pool_with_tag_is_not_zeroed_is_checked_against_irql_and_ex_free_pool_frees() {
    let machine = boot();
    let filled = machine
        .on_cpu("pool", PASSIVE_LEVEL, || {
            let alloc: AllocWithTag = host("ExAllocatePoolWithTag");
            let legacy: Alloc = host("ExAllocatePool");
            let free: FreeNoTag = host("ExFreePool");
            let block = alloc(512, 32, u32::from_le_bytes(*b"Test"));
            assert!(!block.is_null());
            // SAFETY: a fresh 32-byte block.
            let bytes = unsafe { std::slice::from_raw_parts(block.cast::<u8>(), 32) }.to_vec();
            let untagged = legacy(0, 8);
            let tags: Vec<u32> = kernel::pool_blocks().iter().map(|b| b.tag).collect();
            free(block);
            free(untagged);
            (bytes, tags)
        })
        .expect("no stop");
    assert!(filled.0.iter().all(|b| *b == 0xCD), "{:?}", filled.0);
    assert!(filled.1.contains(&u32::from_le_bytes(*b"None")));
    assert!(kernel::pool_stats().balanced());
    drop(machine);

    let machine = boot();
    let stop = expect_stop(
        machine.on_cpu("paged at DISPATCH", DISPATCH_LEVEL, || {
            let alloc: AllocWithTag = host("ExAllocatePoolWithTag");
            alloc(1, 16, 0).addr()
        }),
        kernel::DRIVER_VERIFIER_DETECTED_VIOLATION,
    );
    assert_eq!(stop.parameters[0], 0x01, "paged pool above APC_LEVEL");
}

#[test]
fn irql_raise_and_lower_and_spin_locks_at_dpc_level() {
    let machine = boot();
    let levels = machine
        .on_cpu("raise", PASSIVE_LEVEL, || {
            let raise: Raise = host("KfRaiseIrql");
            let lower: Lower = host("KeLowerIrql");
            let get: extern "win64" fn() -> u8 = host("KeGetCurrentIrql");
            let init: SpinLock = host("KeInitializeSpinLock");
            let acquire: SpinLock = host("KeAcquireSpinLockAtDpcLevel");
            let release: SpinLock = host("KeReleaseSpinLockFromDpcLevel");
            let mut lock = usize::MAX;
            init(&raw mut lock);
            let initialised = lock;
            let old = raise(DISPATCH_LEVEL);
            let raised = get();
            acquire(&raw mut lock);
            let held = lock != 0;
            release(&raw mut lock);
            lower(old);
            (initialised, old, raised, held, lock, get())
        })
        .expect("no stop");
    assert_eq!(
        levels,
        (0, PASSIVE_LEVEL, DISPATCH_LEVEL, true, 0, PASSIVE_LEVEL)
    );
    drop(machine);

    let machine = boot();
    expect_stop(
        machine.on_cpu("at passive", PASSIVE_LEVEL, || {
            let acquire: SpinLock = host("KeAcquireSpinLockAtDpcLevel");
            let mut lock = 0usize;
            acquire(&raw mut lock);
        }),
        kernel::IRQL_NOT_GREATER_OR_EQUAL,
    );
    drop(machine);
    let machine = boot();
    expect_stop(
        machine.on_cpu("raise lower", DISPATCH_LEVEL, || {
            let raise: Raise = host("KfRaiseIrql");
            raise(APC_LEVEL)
        }),
        kernel::IRQL_NOT_GREATER_OR_EQUAL,
    );
    drop(machine);
    let machine = boot();
    expect_stop(
        machine.on_cpu("lower higher", PASSIVE_LEVEL, || {
            let lower: Lower = host("KfLowerIrql");
            lower(DISPATCH_LEVEL);
        }),
        kernel::IRQL_NOT_LESS_OR_EQUAL,
    );
}

type InitEvent = extern "win64" fn(*mut c_void, i32, u8);
type SetEvent = extern "win64" fn(*mut c_void, i32, u8) -> i32;
type EventOp = extern "win64" fn(*mut c_void) -> i32;
type Wait = extern "win64" fn(*mut c_void, i32, i8, u8, *const i64) -> i32;

/// A `KEVENT`'s 24 bytes, 8-aligned.
#[repr(C, align(8))]
struct Kevent([u8; 24]);

#[test]
fn events_wake_a_waiter_and_waits_keep_their_irql_rule() {
    let machine = boot();
    let event: &'static mut Kevent = Box::leak(Box::new(Kevent([0xAA; 24])));
    let address = std::ptr::from_mut(event).expose_provenance();
    let at = move || core::ptr::with_exposed_provenance_mut::<c_void>(address);
    machine
        .on_cpu("init", PASSIVE_LEVEL, move || {
            let init: InitEvent = host("KeInitializeEvent");
            init(at(), 1, 0); // SynchronizationEvent, not signalled
        })
        .expect("no stop");
    let woken = Box::leak(Box::new(AtomicUsize::new(0)));
    let woken_at = std::ptr::from_ref(woken).expose_provenance();
    let waiter = machine.spawn("waiter", PASSIVE_LEVEL, move || {
        let wait: Wait = host("KeWaitForSingleObject");
        let status = wait(at(), 0, 0, 0, core::ptr::null());
        // SAFETY: the leaked counter above, alive for the process.
        unsafe { &*core::ptr::with_exposed_provenance::<AtomicUsize>(woken_at) }
            .fetch_add(1, Ordering::SeqCst);
        status
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        woken.load(Ordering::SeqCst),
        0,
        "no wake-up before KeSetEvent"
    );
    let previous = machine
        .on_cpu("set", DISPATCH_LEVEL, move || {
            let set: SetEvent = host("KeSetEvent");
            set(at(), 0, 0)
        })
        .expect("no stop");
    assert_eq!(previous, 0);
    assert_eq!(machine.join(waiter), Ok(kernel::STATUS_SUCCESS));
    let after = machine
        .on_cpu("poll", DISPATCH_LEVEL, move || {
            let read: EventOp = host("KeReadStateEvent");
            let wait: Wait = host("KeWaitForSingleObject");
            let zero = 0i64;
            let state = read(at());
            (state, wait(at(), 0, 0, 0, &raw const zero))
        })
        .expect("no stop");
    assert_eq!(
        after,
        (0, kernel::STATUS_TIMEOUT),
        "the satisfied wait reset the synchronization event; a zero-timeout poll at \
         DISPATCH_LEVEL times out"
    );
    let notification = machine
        .on_cpu("notification", PASSIVE_LEVEL, move || {
            let init: InitEvent = host("KeInitializeEvent");
            let wait: Wait = host("KeWaitForSingleObject");
            let reset: EventOp = host("KeResetEvent");
            let read: EventOp = host("KeReadStateEvent");
            let short = -10_000i64; // 1 ms
            init(at(), 0, 1); // NotificationEvent, signalled
            let first = wait(at(), 0, 0, 0, &raw const short);
            let second = wait(at(), 0, 0, 0, &raw const short);
            let was = reset(at());
            let timed_out = wait(at(), 0, 0, 0, &raw const short);
            (first, second, was, read(at()), timed_out)
        })
        .expect("no stop");
    assert_eq!(notification, (0, 0, 1, 0, kernel::STATUS_TIMEOUT));
    let stop = expect_stop(
        machine.on_cpu("wait at DISPATCH", DISPATCH_LEVEL, move || {
            let wait: Wait = host("KeWaitForSingleObject");
            wait(at(), 0, 0, 0, core::ptr::null())
        }),
        kernel::IRQL_NOT_LESS_OR_EQUAL,
    );
    assert!(stop.reason.contains("KeWaitForSingleObject"), "{stop}");
}

static WORKER: AtomicUsize = AtomicUsize::new(0);
static WORKER_IRQL: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Holds the work routine until the test has seen the item outstanding.
static RELEASE: AtomicBool = AtomicBool::new(false);

extern "win64" fn work_routine(io_object: *mut c_void, context: *mut c_void, item: *mut c_void) {
    WORKER_IRQL.store(usize::from(kernel::current_irql()), Ordering::SeqCst);
    while !RELEASE.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    assert_eq!(context.addr(), 0x5678);
    assert!(!io_object.is_null() && !item.is_null());
    WORKER.store(kernel::thread_id(), Ordering::SeqCst);
}

#[test]
fn a_work_item_runs_at_passive_level_on_a_worker_and_unload_waits_for_it() {
    type AllocItem = extern "win64" fn(*mut c_void) -> *mut c_void;
    type Queue = extern "win64" fn(*mut c_void, usize, i32, *mut c_void);
    let machine = boot();
    assert_eq!(machine.driver_entry(), Ok(0));
    // The driver's own work items (its PASSIVE_LEVEL subscribers) are done before ours.
    let mut idle = 0;
    while kernel::work_items_outstanding() != 0 {
        idle += 1;
        assert!(idle < 5000, "the driver's work items finish");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let before = kernel::work_item_stats();
    let driver_object = machine.driver_object_address();
    let queuer = machine
        .on_cpu("queue", DISPATCH_LEVEL, move || {
            let alloc: AllocItem = host("IoAllocateWorkItem");
            let queue: Queue = host("IoQueueWorkItemEx");
            let item = alloc(core::ptr::with_exposed_provenance_mut(driver_object));
            queue(
                item,
                work_routine as *const () as usize,
                1,
                core::ptr::without_provenance_mut(0x5678),
            );
            (kernel::thread_id(), item.addr())
        })
        .expect("no stop");
    assert_eq!(kernel::work_items_outstanding(), 1, "queued, routine held");
    let release = std::thread::spawn(|| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        RELEASE.store(true, Ordering::SeqCst);
    });
    assert_eq!(machine.driver_unload(), Ok(true));
    assert!(
        RELEASE.load(Ordering::SeqCst),
        "unload returned after the release"
    );
    release.join().expect("the releaser ends");
    assert_eq!(
        kernel::work_items_outstanding(),
        0,
        "unload returned only after the routine"
    );
    assert_ne!(WORKER.load(Ordering::SeqCst), 0, "the routine ran");
    assert_ne!(WORKER.load(Ordering::SeqCst), queuer.0, "on another thread");
    assert_eq!(
        WORKER_IRQL.load(Ordering::SeqCst),
        usize::from(PASSIVE_LEVEL)
    );
    assert!(machine.image().is_retired());
    let stats = kernel::work_item_stats();
    // Ours: queued once, completed, still allocated (never freed); the driver's own items
    // are freed by its unload.
    assert_eq!(
        (
            stats.queued - before.queued,
            stats.completed - before.completed,
            stats.live
        ),
        (1, 1, 1)
    );
    drop(machine);

    // IoQueueWorkItem needs a device object.
    let machine = boot();
    let driver_object = machine.driver_object_address();
    expect_stop(
        machine.on_cpu("queue on driver object", PASSIVE_LEVEL, move || {
            let alloc: AllocItem = host("IoAllocateWorkItem");
            let queue: Queue = host("IoQueueWorkItem");
            let item = alloc(core::ptr::with_exposed_provenance_mut(driver_object));
            queue(
                item,
                work_routine as *const () as usize,
                1,
                core::ptr::null_mut(),
            );
        }),
        kernel::WORKER_INVALID,
    );
}

#[test]
fn a_reference_on_the_driver_object_keeps_the_image_mapped_after_unload() {
    type Ob = extern "win64" fn(*mut c_void) -> isize;
    let machine = boot();
    assert_eq!(machine.driver_entry(), Ok(0));
    let driver_object = machine.driver_object_address();
    let count = machine
        .on_cpu("reference", PASSIVE_LEVEL, move || {
            let reference: Ob = host("ObfReferenceObject");
            reference(core::ptr::with_exposed_provenance_mut(driver_object))
        })
        .expect("no stop");
    assert_eq!(count, 2, "the I/O manager's reference and the driver's");
    assert_eq!(machine.driver_unload(), Ok(true));
    assert!(!machine.image().is_retired(), "kept mapped");
    assert_eq!(kernel::driver_object_references(), 1);
    assert!(
        kernel::debugger_output()
            .iter()
            .any(|l| l.contains("the image stays mapped")),
        "reported"
    );
    assert!(!machine.retire_if_unreferenced(), "still referenced");
    machine
        .on_cpu("dereference", PASSIVE_LEVEL, move || {
            let dereference: Ob = host("ObDereferenceObject");
            dereference(core::ptr::with_exposed_provenance_mut(driver_object))
        })
        .expect("no stop");
    assert!(
        machine.retire_if_unreferenced(),
        "unmapped after the last reference"
    );
    expect_stop(
        machine.on_cpu("one dereference too many", PASSIVE_LEVEL, move || {
            let dereference: Ob = host("ObfDereferenceObject");
            dereference(core::ptr::with_exposed_provenance_mut(driver_object))
        }),
        kernel::REFERENCE_BY_POINTER,
    );
}

#[test]
fn counted_strings_initialise_and_copy_with_truncation() {
    type InitUnicode = extern "win64" fn(*mut UnicodeString, *const u16);
    type InitAnsi = extern "win64" fn(*mut AnsiString, *const u8);
    type Copy = extern "win64" fn(*mut UnicodeString, *const UnicodeString);
    let machine = boot();
    let result = machine
        .on_cpu("strings", DISPATCH_LEVEL, || {
            let init: InitUnicode = host("RtlInitUnicodeString");
            let init_ansi: InitAnsi = host("RtlInitAnsiString");
            let copy: Copy = host("RtlCopyUnicodeString");
            let text: Vec<u16> = "Teredo\0".encode_utf16().collect();
            let mut source = UnicodeString {
                length: 1,
                maximum_length: 1,
                buffer: core::ptr::null_mut(),
            };
            init(&raw mut source, text.as_ptr());
            let mut buffer = [0xFFFFu16; 4];
            let mut destination = UnicodeString {
                length: 0,
                maximum_length: 8,
                buffer: buffer.as_mut_ptr(),
            };
            copy(&raw mut destination, &raw const source);
            let copied = (destination.length, buffer);
            let mut ansi = AnsiString {
                length: 1,
                maximum_length: 1,
                buffer: core::ptr::null_mut(),
            };
            init_ansi(&raw mut ansi, c"abc".as_ptr().cast());
            let ansi_lengths = (ansi.length, ansi.maximum_length);
            init_ansi(&raw mut ansi, core::ptr::null());
            (
                (source.length, source.maximum_length),
                copied,
                ansi_lengths,
                (ansi.length, ansi.maximum_length, ansi.buffer.is_null()),
            )
        })
        .expect("no stop");
    let tere: Vec<u16> = "Tere".encode_utf16().collect();
    assert_eq!(result.0, (12, 14));
    assert_eq!(
        result.1.0, 8,
        "truncated to MaximumLength, no room for a NUL"
    );
    assert_eq!(result.1.1.to_vec(), tere);
    assert_eq!(result.2, (3, 4));
    assert_eq!(result.3, (0, 0, true));
}
