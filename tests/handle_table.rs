//! The handle table: teardown, no double cancel, bounded growth, self-cancel detection.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use common::Recorder;
use teredo_watcher::mock::MockNetio;
use teredo_watcher::{
    Error, HandleTable, MAX_REGISTRATIONS, NetioCall, TeredoPortWatcher, WatcherOptions,
};

fn quiet() -> WatcherOptions {
    WatcherOptions {
        initial_notification: false,
        ..WatcherOptions::default()
    }
}

#[test]
#[cfg_attr(miri, ignore = "mem::forget leaks the context by design")]
fn teardown_cancels_a_forgotten_watcher_and_no_callback_runs_afterwards() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let recorder = Recorder::new();
    let (watcher, _) = TeredoPortWatcher::with_subscriber(&table, quiet(), recorder.subscriber())
        .expect("register");
    std::mem::forget(watcher);
    netio.client().start();
    netio.wait_idle();
    assert_eq!(recorder.len(), 1);

    let report = table.teardown().expect("passive");
    assert_eq!(report.cancelled, 1);
    assert!(report.is_clean());
    assert_eq!(netio.live_registrations(), 0);
    netio.client().restart();
    netio.wait_idle();
    assert_eq!(recorder.len(), 1, "no callback after teardown");
    assert!(table.is_closed());
    assert_eq!(
        TeredoPortWatcher::new(&table, quiet()).err(),
        Some(Error::HandleTableClosed)
    );
}

#[test]
fn a_watcher_dropped_after_teardown_does_not_cancel_twice() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, quiet()).expect("register");
    let port = netio.client().start();
    netio.wait_idle();
    let report = table.teardown().expect("passive");
    assert_eq!(report.cancelled, 1);
    // Still usable: the last port is kept.
    assert_eq!(
        watcher.current_port().map(teredo_watcher::TeredoPort::get),
        Some(port)
    );
    watcher
        .unregister()
        .expect("already cancelled by the teardown");
    assert_eq!(netio.calls()[2], 1, "exactly one CancelMibChangeNotify2");
    assert_eq!(table.live_registrations(), 0);
}

#[test]
fn a_failed_teardown_cancel_is_reported_and_can_be_retried() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(&table, quiet()).expect("register");
    netio.fail_next(NetioCall::CancelMibChangeNotify2, 6);
    let report = table.teardown().expect("passive");
    assert_eq!(report.cancelled, 0);
    assert_eq!(report.failed, 1);
    assert!(!report.is_clean());
    assert!(matches!(
        report.first_error,
        Some(Error::InvalidHandle { .. })
    ));
    assert_eq!(netio.live_registrations(), 1);
    // The watcher's own cancel retries and succeeds.
    watcher.unregister().expect("retry");
    assert_eq!(netio.live_registrations(), 0);
    assert_eq!(netio.calls()[2], 2);
}

#[test]
fn the_table_grows_fallibly_up_to_its_bound() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watchers: Vec<_> = (0..MAX_REGISTRATIONS)
        .map(|_| {
            TeredoPortWatcher::new(
                &table,
                WatcherOptions {
                    max_subscribers: 1,
                    seed_current_port: false,
                    initial_notification: false,
                },
            )
            .expect("room")
        })
        .collect();
    assert_eq!(table.live_registrations(), MAX_REGISTRATIONS);
    assert_eq!(
        TeredoPortWatcher::new(&table, quiet()).err(),
        Some(Error::HandleTableFull {
            capacity: MAX_REGISTRATIONS
        })
    );
    assert_eq!(
        netio.live_registrations(),
        MAX_REGISTRATIONS,
        "no extra registration"
    );
    drop(watchers);
    assert_eq!(table.live_registrations(), 0);
    assert_eq!(netio.live_registrations(), 0);
    // Entries are reused after growth.
    let again = TeredoPortWatcher::new(&table, quiet()).expect("reuse");
    assert_eq!(table.live_registrations(), 1);
    drop(again);
}

static SELF_TABLE: LazyLock<HandleTable<MockNetio>> =
    LazyLock::new(|| HandleTable::new(MockNetio::new()));

#[test]
fn cancelling_from_inside_its_own_callback_is_refused_not_deadlocked() {
    type Watcher = TeredoPortWatcher<'static, MockNetio>;
    let netio = SELF_TABLE.source().clone();
    let holder: Arc<Mutex<Option<Watcher>>> = Arc::default();
    let outcome: Arc<Mutex<Option<Result<(), Error>>>> = Arc::default();
    let (h, o) = (Arc::clone(&holder), Arc::clone(&outcome));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let (watcher, _) = TeredoPortWatcher::with_subscriber(&SELF_TABLE, quiet(), move |_| {
        c.fetch_add(1, Ordering::SeqCst);
        let taken = h.lock().expect("lock").take();
        if let Some(w) = taken {
            *o.lock().expect("lock") = Some(w.unregister());
        }
    })
    .expect("register");
    *holder.lock().expect("lock") = Some(watcher);
    netio.client().start();
    netio.wait_idle();
    assert_eq!(
        *outcome.lock().expect("lock"),
        Some(Err(Error::CancelFromCallback))
    );
    assert_eq!(netio.self_cancel_reports(), 0, "never reached the OS");
    // The registration is still live (given up to the table, not freed): netio still
    // delivers to it, but its subscribers were silenced when the watcher gave it up.
    let delivered_before = netio.registrations()[0].delivered;
    netio.client().restart();
    netio.wait_idle();
    assert_eq!(netio.registrations()[0].delivered, delivered_before + 1);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a given-up watcher's subscriber ran"
    );
    let report = SELF_TABLE.teardown().expect("passive");
    assert_eq!(report.cancelled, 1);
    assert_eq!(netio.live_registrations(), 0);
}

#[test]
fn the_mock_reports_a_raw_self_cancel_instead_of_hanging() {
    use teredo_watcher::{PortSource, RawHandle};
    // Bypass the watcher: call the mock's cancel from its own delivery thread.
    struct Ctx {
        netio: MockNetio,
        handle: Mutex<Option<RawHandle>>,
        result: Arc<Mutex<Option<Result<(), Error>>>>,
    }
    unsafe extern "system" fn cb(ctx: *mut core::ffi::c_void, _port: u16, _kind: i32) {
        // SAFETY: `ctx` is the `Ctx` below, alive until the cancel at the end of the test.
        let ctx = unsafe { &*ctx.cast::<Ctx>() };
        if let Some(h) = *ctx.handle.lock().expect("lock") {
            // SAFETY: `h` is the live registration; calling from inside is what we test.
            let r = unsafe { ctx.netio.cancel(h) };
            *ctx.result.lock().expect("lock") = Some(r);
        }
    }
    let netio = MockNetio::new();
    let result: Arc<Mutex<Option<Result<(), Error>>>> = Arc::default();
    let ctx = Box::new(Ctx {
        netio: netio.clone(),
        handle: Mutex::new(None),
        result: Arc::clone(&result),
    });
    let ptr = std::ptr::from_ref::<Ctx>(&ctx).cast_mut().cast();
    // SAFETY: `ctx` outlives the registration: it is cancelled below before `ctx` drops.
    let handle = unsafe { netio.notify(cb, ptr, false) }.expect("register");
    *ctx.handle.lock().expect("lock") = Some(handle);
    netio.notify_raw(1234, 0);
    netio.wait_idle();
    let r = result.lock().expect("lock").take().expect("callback ran");
    assert_eq!(
        r.err()
            .and_then(|e| e.status())
            .map(|s| s.0.cast_unsigned()),
        Some(0xC000_0194)
    );
    assert_eq!(netio.self_cancel_reports(), 1);
    // SAFETY: not inside the callback; the handle is live.
    unsafe { netio.cancel(handle) }.expect("cancel from outside");
    drop(ctx);
}

#[test]
fn teardown_waits_for_a_callback_in_flight() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let started = Arc::new(std::sync::Barrier::new(2));
    let done = Arc::new(AtomicUsize::new(0));
    let (s, d) = (Arc::clone(&started), Arc::clone(&done));
    let (watcher, _) = TeredoPortWatcher::with_subscriber(&table, quiet(), move |_| {
        s.wait();
        std::thread::sleep(std::time::Duration::from_millis(30));
        d.fetch_add(1, Ordering::SeqCst);
    })
    .expect("register");
    netio.client().start();
    started.wait();
    let report = table.teardown().expect("passive");
    assert_eq!(
        done.load(Ordering::SeqCst),
        1,
        "teardown returned mid-callback"
    );
    assert_eq!(report.cancelled, 1);
    drop(watcher);
    assert_eq!(netio.calls()[2], 1);
}
