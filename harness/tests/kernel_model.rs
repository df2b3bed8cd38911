//! The kernel model itself keeps the documented rules, failures included: these call the
//! host functions the image is bound to, the way the image calls them.
#![cfg(all(target_arch = "x86_64", unix))]

use core::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::time::Duration;

use teredo_harness::kernel::{self, DISPATCH_LEVEL, PASSIVE_LEVEL};
use teredo_harness::{Machine, Stop, sysbuild};

fn boot() -> Machine {
    let sys = sysbuild::sys_image().unwrap_or_else(|e| panic!("the .sys must build: {e}"));
    Machine::boot(sys, false).unwrap_or_else(|e| panic!("the .sys must load: {e}"))
}

type Callback = extern "win64" fn(*mut c_void, u16, i32);
type Notify = extern "win64" fn(Callback, *mut c_void, u8, *mut usize) -> i32;
type Cancel = extern "win64" fn(usize) -> i32;

fn host<T>(module: &str, name: &str) -> T {
    let address = kernel::resolve(module, name).expect("modelled");
    assert_eq!(size_of::<T>(), size_of::<usize>());
    // SAFETY: every use below names `T` as the function pointer type of the documented
    // signature of `module!name`, which is the signature of the model's function.
    unsafe { std::mem::transmute_copy::<usize, T>(&address) }
}

fn notify(callback: Callback, context: *mut c_void) -> usize {
    let notify: Notify = host("netio.sys", "NotifyTeredoPortChange");
    let mut handle = 0usize;
    assert_eq!(notify(callback, context, 0, &raw mut handle), 0);
    handle
}

/// The context of `cancel_own_handle`: its handle, and what the cancel returned.
struct SelfCancel {
    handle: AtomicUsize,
    status: AtomicI32,
}

extern "win64" fn cancel_own_handle(context: *mut c_void, _port: u16, _kind: i32) {
    // SAFETY: the context is the test's `SelfCancel`, alive until the registration is
    // cancelled at the end of the test.
    let this = unsafe { &*context.cast::<SelfCancel>() };
    let cancel: Cancel = host("netio.sys", "CancelMibChangeNotify2");
    this.status
        .store(cancel(this.handle.load(Ordering::SeqCst)), Ordering::SeqCst);
}

#[test]
fn a_cancel_from_inside_its_own_callback_is_reported_not_a_deadlock() {
    let machine = boot();
    let context: &'static SelfCancel = Box::leak(Box::new(SelfCancel {
        handle: AtomicUsize::new(0),
        status: AtomicI32::new(0),
    }));
    let address = std::ptr::from_ref(context).expose_provenance();
    let handle = notify(
        cancel_own_handle,
        core::ptr::with_exposed_provenance_mut(address),
    );
    context.handle.store(handle, Ordering::SeqCst);
    let port = machine
        .on_cpu("client start", PASSIVE_LEVEL, kernel::client::start)
        .expect("no hang, no stop");
    assert_ne!(port, 0);
    assert_eq!(
        context.status.load(Ordering::SeqCst),
        kernel::STATUS_POSSIBLE_DEADLOCK
    );
    let netio = kernel::netio_stats();
    assert_eq!(netio.self_cancels, [handle]);
    assert_eq!(
        netio.live,
        [handle],
        "the refused cancel left it registered"
    );
    let cancel: Cancel = host("netio.sys", "CancelMibChangeNotify2");
    assert_eq!(cancel(handle), 0, "from another thread it cancels");
    assert_eq!(cancel(handle), kernel::ERROR_INVALID_HANDLE, "only once");
}

static IN_CALLBACK: AtomicBool = AtomicBool::new(false);
static CALLBACK_DONE: AtomicBool = AtomicBool::new(false);

extern "win64" fn slow_callback(_context: *mut c_void, _port: u16, _kind: i32) {
    IN_CALLBACK.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    CALLBACK_DONE.store(true, Ordering::SeqCst);
}

#[test]
fn cancel_waits_for_a_callback_in_flight_and_later_notifications_are_dropped() {
    let machine = boot();
    let handle = notify(slow_callback, core::ptr::null_mut());
    let delivery = machine.spawn("client start", PASSIVE_LEVEL, kernel::client::start);
    while !IN_CALLBACK.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let cancelled = machine
        .on_cpu("cancel", PASSIVE_LEVEL, move || {
            let cancel: Cancel = host("netio.sys", "CancelMibChangeNotify2");
            let status = cancel(handle);
            (status, CALLBACK_DONE.load(Ordering::SeqCst))
        })
        .expect("no stop");
    assert_eq!(
        cancelled,
        (0, true),
        "cancel returned after the callback ended"
    );
    machine.join(delivery).expect("no stop");
    let late = machine
        .on_cpu("late", PASSIVE_LEVEL, move || {
            kernel::deliver(handle, 1, kernel::MIB_PARAMETER_NOTIFICATION)
        })
        .expect("no stop");
    assert_eq!(late, kernel::Delivery::Dropped);
    assert_eq!(kernel::netio_stats().delivered, 1);
}

#[test]
fn spin_lock_raises_to_dispatch_and_a_recursive_acquire_bugchecks() {
    let machine = boot();
    let result = machine.on_cpu("spin lock", PASSIVE_LEVEL, || {
        let acquire: extern "win64" fn(*mut usize) -> u8 =
            host("ntoskrnl.exe", "KeAcquireSpinLockRaiseToDpc");
        let release: extern "win64" fn(*mut usize, u8) = host("ntoskrnl.exe", "KeReleaseSpinLock");
        let irql: extern "win64" fn() -> u8 = host("ntoskrnl.exe", "KeGetCurrentIrql");
        // Leaked: the thread that holds it halts for good.
        let lock = Box::leak(Box::new(0usize));
        let old = acquire(lock);
        release(lock, old);
        let _ = acquire(lock);
        let _ = acquire(lock); // never returns: SPIN_LOCK_ALREADY_OWNED
        irql()
    });
    match result {
        Err(Stop::Bugcheck(stop)) => assert_eq!(stop.code, kernel::SPIN_LOCK_ALREADY_OWNED),
        other => panic!("expected SPIN_LOCK_ALREADY_OWNED, got {other:?}"),
    }
    // Acquire and release: the IRQL goes up to DISPATCH_LEVEL and back, the word is free.
    drop(machine);
    let machine = boot();
    let levels = machine
        .on_cpu("spin lock", PASSIVE_LEVEL, || {
            let acquire: extern "win64" fn(*mut usize) -> u8 =
                host("ntoskrnl.exe", "KeAcquireSpinLockRaiseToDpc");
            let release: extern "win64" fn(*mut usize, u8) =
                host("ntoskrnl.exe", "KeReleaseSpinLock");
            let mut lock = 0usize;
            let old = acquire(&raw mut lock);
            let raised = kernel::current_irql();
            release(&raw mut lock, old);
            (old, raised, kernel::current_irql(), lock)
        })
        .expect("no stop");
    assert_eq!(levels, (PASSIVE_LEVEL, DISPATCH_LEVEL, PASSIVE_LEVEL, 0));
}

#[test]
fn pool_frees_are_checked_like_driver_verifier() {
    type Alloc = extern "win64" fn(u64, usize, u32) -> *mut c_void;
    type Free = extern "win64" fn(*mut c_void, u32);
    let tag = u32::from_le_bytes(*b"Test");
    for (case, wrong_tag) in [("double free", false), ("wrong tag", true)] {
        let machine = boot();
        let result = machine.on_cpu(case, PASSIVE_LEVEL, move || {
            let alloc: Alloc = host("ntoskrnl.exe", "ExAllocatePool2");
            let free: Free = host("ntoskrnl.exe", "ExFreePoolWithTag");
            let block = alloc(kernel::POOL_FLAG_NON_PAGED, 64, tag);
            assert!(!block.is_null());
            assert_eq!(kernel::pool_stats().live_bytes, 64);
            if wrong_tag {
                free(block, tag + 1);
            } else {
                free(block, tag);
                free(block, tag);
            }
        });
        match result {
            Err(Stop::Bugcheck(stop)) => {
                assert_eq!(
                    stop.code,
                    kernel::DRIVER_VERIFIER_DETECTED_VIOLATION,
                    "{case}"
                );
                assert_eq!(
                    stop.parameters[0],
                    if wrong_tag { 0x16 } else { 0x10 },
                    "{case}"
                );
            }
            other => panic!("{case}: expected a bugcheck, got {other:?}"),
        }
    }
    let machine = boot();
    let result = machine.on_cpu("paged pool at DISPATCH_LEVEL", DISPATCH_LEVEL, move || {
        let alloc: Alloc = host("ntoskrnl.exe", "ExAllocatePool2");
        alloc(kernel::POOL_FLAG_PAGED, 64, tag).addr()
    });
    match result {
        Err(Stop::Bugcheck(stop)) => {
            assert_eq!(stop.code, kernel::DRIVER_VERIFIER_DETECTED_VIOLATION);
            assert_eq!(stop.parameters[0], 0x01);
        }
        other => panic!("expected a bugcheck, got {other:?}"),
    }
}
