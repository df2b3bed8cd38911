//! The netio contract suite (`tests/netio_contract/mod.rs`) on the harness's kernel model:
//! the library's `TeredoPortWatcher` runs on the host against the same `extern "win64"`
//! netio functions a loaded `.sys` is bound to, with the host mock kernel (`MockKernel`)
//! for IRQL, spin locks and events.
//!
//! The library is compiled for the host, so its callbacks are `extern "system"` (the host's
//! C convention), while the model calls a registration's callback as a Windows x64
//! function. Each registration therefore goes through a [`Bridge`]: an `extern "win64"`
//! trampoline that the model calls, which calls the library's callback. The two kernels
//! keep their own per-thread IRQL; each crossing copies it: a call into netio runs at the
//! caller's mock IRQL, a callback at the model's callback IRQL.
#![cfg(all(target_arch = "x86_64", unix))]

#[path = "../../tests/netio_contract/mod.rs"]
mod netio_contract;

use core::ffi::c_void;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use netio_contract::{ALL_ORDERS, Netio, Order};
use teredo_harness::Exclusive;
use teredo_harness::kernel::{self, InitialDelivery};
use teredo_watcher::mock::{self, MockKernel};
use teredo_watcher::sys::TeredoPortChangeCallback;
use teredo_watcher::{Error, Irql, Kernel, NetioCall, PortSource, RawHandle};

type Callback = extern "win64" fn(*mut c_void, u16, i32);
type Notify = extern "win64" fn(Callback, *mut c_void, u8, *mut usize) -> i32;
type GetPort = extern "win64" fn(*mut u16) -> i32;
type Cancel = extern "win64" fn(usize) -> i32;

/// The model's export `netio.sys!name`, as the loader binds it into an image.
fn export<T>(name: &str) -> T {
    let address = kernel::resolve("netio.sys", name).expect("the model exports it");
    assert_eq!(size_of::<T>(), size_of::<usize>());
    // SAFETY: every caller names `T` as the function pointer type of the documented
    // signature of `netio.sys!name` (the aliases above), which is the signature of the
    // model's `extern "win64"` function at that address.
    unsafe { std::mem::transmute_copy::<usize, T>(&address) }
}

/// What a registration's trampoline calls: the library's callback and its context.
struct Bridge {
    callback: TeredoPortChangeCallback,
    context: *mut c_void,
}

/// Invocations of [`bridge`] by `DISPATCH`, and those that ran at another IRQL than the
/// model was told to use.
static INVOCATIONS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
static AT_OTHER_IRQL: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// The callback the model holds for every registration made through [`HarnessNetio`].
extern "win64" fn bridge<const DISPATCH: bool>(context: *mut c_void, port: u16, kind: i32) {
    let expected = if DISPATCH {
        kernel::DISPATCH_LEVEL
    } else {
        kernel::PASSIVE_LEVEL
    };
    INVOCATIONS[usize::from(DISPATCH)].fetch_add(1, Ordering::SeqCst);
    if kernel::current_irql() != expected {
        AT_OTHER_IRQL[usize::from(DISPATCH)].fetch_add(1, Ordering::SeqCst);
    }
    // SAFETY: the model passes back the context `notify` registered: a `Bridge` from
    // `Box::into_raw`, freed only after a cancel of that registration returned success
    // (after which the model runs no invocation of it), or never.
    let bridge = unsafe { &*context.cast::<Bridge>() };
    // The library reads the mock kernel's IRQL: make it the IRQL the model runs this
    // callback at.
    let _irql = mock::raise_irql(Irql::from_raw(kernel::current_irql()));
    // SAFETY: `notify`'s caller guaranteed that `callback(context, ..)` is sound from any
    // thread at <= DISPATCH_LEVEL (the model's callback IRQL is at most that) until a cancel
    // of the registration returned `Ok`, which has not happened (see above). Invocations
    // are serialized except in `overlap`, which breaks the contract on purpose: the
    // library's trampoline admits one round at a time through an atomic flag and coalesces
    // the other invocation (`src/registry.rs`), so the overlap is a check of its behaviour,
    // not of memory safety.
    unsafe { (bridge.callback)(bridge.context, port, kind) };
}

/// Runs `f` (a call into the model) with the model's IRQL for this thread set to the mock
/// kernel's, so that the model's IRQL checks see the library's IRQL.
fn at_library_irql<R>(f: impl FnOnce() -> R) -> R {
    let before = kernel::current_irql();
    kernel::set_irql(MockKernel::current_irql().raw());
    let result = f();
    kernel::set_irql(before);
    result
}

/// The harness kernel model's netio, as a port source. `DISPATCH` makes the model run
/// callbacks at `DISPATCH_LEVEL` (else `PASSIVE_LEVEL`).
///
/// # Invariants
///
/// `bridges` maps each handle `notify` returned and no cancel has succeeded on to the
/// `Box::into_raw` address of its [`Bridge`]; nothing else frees a `Bridge`.
struct HarnessNetio<const DISPATCH: bool> {
    bridges: Mutex<BTreeMap<usize, usize>>,
    /// The kernel model is global: this source uses it alone until it drops.
    _alone: Exclusive,
}

impl<const DISPATCH: bool> HarnessNetio<DISPATCH> {
    fn bridges(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, usize>> {
        self.bridges.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<const DISPATCH: bool> Drop for HarnessNetio<DISPATCH> {
    fn drop(&mut self) {
        // A `Bridge` still in the map belongs to a registration netio holds: it is leaked
        // (the model is reset by the next `fresh`, which ends those registrations).
        if !std::thread::panicking() {
            assert_eq!(kernel::stopped(), None, "the model stopped the machine");
        }
    }
}

// SAFETY: the model keeps the documented contract (`harness/src/kernel/netio.rs`):
// invocations of one registration are serialized (`in_flight`) except through
// `invoke_overlapping`, which `overlap` uses to break it on purpose; each passes the
// registered context (the `Bridge`, which passes the library's context unchanged); the
// callback IRQL is PASSIVE_LEVEL or DISPATCH_LEVEL; a successful cancel marks the
// registration cancelled and waits until no invocation runs, and a cancelled registration
// is never invoked again; a failed `NotifyTeredoPortChange` leaves nothing registered, and
// the documented "success with a NULL handle" is reported as an error here as the real
// source does.
unsafe impl<const DISPATCH: bool> PortSource for HarnessNetio<DISPATCH> {
    type Kernel = MockKernel;

    unsafe fn notify(
        &self,
        callback: TeredoPortChangeCallback,
        context: *mut c_void,
        initial_notification: bool,
    ) -> Result<RawHandle, Error> {
        let notify: Notify = export("NotifyTeredoPortChange");
        let target = Box::into_raw(Box::new(Bridge { callback, context }));
        let mut handle = 0usize;
        let status = at_library_irql(|| {
            notify(
                bridge::<DISPATCH>,
                target.cast::<c_void>(),
                u8::from(initial_notification),
                &raw mut handle,
            )
        });
        if let Err(error) = Error::check(NetioCall::NotifyTeredoPortChange, status) {
            // SAFETY: nothing is registered after a failed `NotifyTeredoPortChange`, so the
            // model holds no pointer to the bridge; it came from `Box::into_raw` above.
            drop(unsafe { Box::from_raw(target) });
            return Err(error);
        }
        let Some(raw) = RawHandle::new(handle) else {
            // Registered, and nobody can cancel it: the model may call the bridge until it
            // is reset, so the bridge is leaked.
            return Err(Error::InvalidHandle {
                call: NetioCall::NotifyTeredoPortChange,
                status: teredo_watcher::NetioStatus(status),
            });
        };
        // INVARIANT: a live handle and its bridge.
        self.bridges().insert(handle, target.expose_provenance());
        Ok(raw)
    }

    fn teredo_port(&self) -> Result<u16, Error> {
        let get: GetPort = export("GetTeredoPort");
        let mut port = 0u16;
        let status = at_library_irql(|| get(&raw mut port));
        Error::check(NetioCall::GetTeredoPort, status)?;
        Ok(port)
    }

    unsafe fn cancel(&self, handle: RawHandle) -> Result<(), Error> {
        let cancel: Cancel = export("CancelMibChangeNotify2");
        let status = at_library_irql(|| cancel(handle.get()));
        Error::check(NetioCall::CancelMibChangeNotify2, status)?;
        if let Some(address) = self.bridges().remove(&handle.get()) {
            // SAFETY: `address` is the bridge of `handle` (the invariant); the cancel
            // succeeded, so the model runs no invocation of it now and never will again.
            drop(unsafe {
                Box::from_raw(core::ptr::with_exposed_provenance_mut::<Bridge>(address))
            });
        }
        Ok(())
    }
}

impl<const DISPATCH: bool> Netio for HarnessNetio<DISPATCH> {
    fn fresh() -> Self {
        let alone = Exclusive::bare_kernel();
        if DISPATCH {
            kernel::set_callback_irql(kernel::DISPATCH_LEVEL);
        }
        HarnessNetio {
            bridges: Mutex::new(BTreeMap::new()),
            _alone: alone,
        }
    }
    fn orders(&self) -> Vec<Order> {
        ALL_ORDERS.to_vec()
    }
    fn set_order(&self, order: Order) {
        kernel::set_initial_delivery(match order {
            Order::CallerThread => InitialDelivery::CallerThread,
            Order::OtherThreadBeforeReturn => InitialDelivery::BeforeReturn,
            Order::AfterReturn => InitialDelivery::AfterReturn,
            Order::DuringQuery => InitialDelivery::DuringQuery,
        });
    }
    fn set_running(&self, port: Option<u16>) {
        kernel::client::set_port_quietly(port);
    }
    fn notify_all(&self, port: u16, kind: i32) {
        for (handle, _) in kernel::live_contexts() {
            let _ = kernel::deliver(handle, port, kind);
        }
    }
    fn settle(&self) {
        assert!(
            kernel::wait_for_initial_notifications(Duration::from_secs(5)),
            "an initial notification is still pending"
        );
    }
    fn live(&self) -> usize {
        kernel::netio_stats().live.len()
    }
    fn query_returns_next(&self, port: u16) {
        kernel::query_returns_next(port);
    }
    fn notify_null_handle_next(&self) {
        kernel::notify_null_handle_next();
    }
    fn fail_next_cancel_after_wait(&self) {
        kernel::fail_next_cancel_after_wait(kernel::ERROR_INVALID_PARAMETER);
    }
    fn overlap(&self, a: (u16, i32), b: (u16, i32)) {
        let handles = kernel::live_contexts();
        assert!(!handles.is_empty(), "nothing to invoke");
        for (handle, _) in handles {
            std::thread::scope(|s| {
                let other = s.spawn(move || kernel::invoke_overlapping(handle, a.0, a.1));
                let here = kernel::invoke_overlapping(handle, b.0, b.1);
                let there = other.join().expect("the other invocation returned");
                assert_eq!(
                    (here, there),
                    (kernel::Delivery::Delivered, kernel::Delivery::Delivered)
                );
            });
        }
    }
}

/// Every callback of the suite ran through the model's `extern "win64"` invocation at the
/// IRQL the model was set to.
fn check_bridge(dispatch: bool) {
    let invocations = INVOCATIONS[usize::from(dispatch)].load(Ordering::SeqCst);
    // The suite's callbacks: 4 initial notifications and 2 changes in the first two checks
    // alone.
    assert!(
        invocations >= 6,
        "{invocations} invocations through the model"
    );
    assert_eq!(
        AT_OTHER_IRQL[usize::from(dispatch)].load(Ordering::SeqCst),
        0,
        "callbacks at another IRQL than set"
    );
}

#[test]
fn the_harness_kernel_keeps_the_netio_contract() {
    netio_contract::run_all::<HarnessNetio<false>>();
    check_bridge(false);
}

#[test]
fn the_harness_kernel_keeps_the_netio_contract_with_callbacks_at_dispatch_level() {
    netio_contract::run_all::<HarnessNetio<true>>();
    check_bridge(true);
}
