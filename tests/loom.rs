//! loom models of the races the library's design rests on.
//!
//! Run with `.ci/loom` (`RUSTFLAGS="--cfg teredo_watcher_loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release
//! --test loom`). Under `--cfg teredo_watcher_loom` the library's atomics, cells and spin lock (through
//! `MockKernel`) are loom's, so loom explores the interleavings of the real registry, handle
//! table and watcher code. The host `MockNetio` uses std threads and locks, which loom cannot
//! control, so the models use [`LoomNetio`]: a small port source built on loom's `Mutex` and
//! `Condvar` that keeps the documented contract (serialized callbacks through the real
//! trampoline handed to `notify`; cancel waits for a callback in flight and never delivers
//! afterwards; cancel from inside the same registration's callback fails instead of hanging).
//!
//! Subscribers record what they receive in a loom `UnsafeCell`, so two calls of one
//! subscriber at once, or a call not ordered after the subscription, is reported by loom
//! as a data race; a drop flag in each subscriber catches any call after it was freed.
#![cfg(teredo_watcher_loom)]

use std::ffi::c_void;
use std::sync::atomic::AtomicUsize as StdAtomicUsize;
use std::time::Instant;

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

use teredo_watcher::mock::MockKernel;
use teredo_watcher::sys::{self, TeredoPortChangeCallback};
use teredo_watcher::{
    Error, HandleTable, Kernel, NetioCall, PortSource, RawHandle, TeredoEvent, TeredoPort,
    TeredoPortWatcher, ThreadToken, WatcherOptions,
};

/// `STATUS_POSSIBLE_DEADLOCK`, as the host mock reports a self-cancel.
const STATUS_POSSIBLE_DEADLOCK: i32 = 0xC000_0194_u32.cast_signed();

/// The context pointer handed to `notify`, moved to the delivering thread.
#[derive(Clone, Copy)]
struct Context(*mut c_void);
// SAFETY: the context is only handed back to the callback, which `PortSource::notify`'s
// contract makes sound to call from any thread.
unsafe impl Send for Context {}
// SAFETY: as above; the pointer is only copied, never dereferenced here.
unsafe impl Sync for Context {}

struct Registration {
    callback: TeredoPortChangeCallback,
    context: Context,
    cancelled: bool,
    /// The thread running the callback now.
    in_flight: Option<ThreadToken>,
}

/// When the loom source delivers the initial notification (`InitialNotification = TRUE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Initial {
    /// On the calling thread inside `notify`, before the handle is written back.
    #[default]
    CallerThread,
    /// On another loom thread that `notify` joins before it returns.
    OtherThreadBeforeReturn,
    /// Later, from another thread: the model calls [`LoomNetio::deliver`] with
    /// `MIB_INITIAL_NOTIFICATION` itself, concurrently with whatever the driver does after
    /// `notify` returned.
    Later,
    /// Held until [`LoomNetio::settle`], which delivers it from another loom thread.
    AfterReturn,
    /// Held until the next `GetTeredoPort`, which delivers it from another loom thread first.
    DuringQuery,
}

#[derive(Default)]
struct SourceState {
    registrations: Vec<Registration>,
    cancels: usize,
    self_cancels: usize,
    initial: Initial,
    /// What `GetTeredoPort` answers (`None`: `ERROR_NOT_READY`).
    port: Option<u16>,
    /// The next this many cancels wait for the callback in flight, then fail.
    failing_cancels: usize,
    /// Registrations whose initial notification is held (`AfterReturn`, `DuringQuery`).
    held: Vec<usize>,
    /// What the next `GetTeredoPort` calls answer, before `port`.
    query_ports: Vec<u16>,
    null_handles: usize,
}

/// A loom-friendly port source (see the module docs).
#[derive(Clone)]
struct LoomNetio {
    shared: Arc<(Mutex<SourceState>, Condvar)>,
}

impl LoomNetio {
    fn new() -> Self {
        LoomNetio {
            shared: Arc::new((Mutex::new(SourceState::default()), Condvar::new())),
        }
    }

    fn handle(index: usize) -> RawHandle {
        RawHandle::new(index + 1).expect("non-zero")
    }

    /// The OS side: one notification to registration `handle`, if it is still live.
    /// Returns whether the callback ran.
    fn deliver(&self, handle: RawHandle, port: u16, kind: i32) -> bool {
        let (lock, changed) = &*self.shared;
        let index = handle.get() - 1;
        let (callback, context) = {
            let mut s = lock.lock().unwrap();
            let reg = &mut s.registrations[index];
            if reg.cancelled || reg.in_flight.is_some() {
                return false;
            }
            reg.in_flight = Some(MockKernel::current_thread());
            (reg.callback, reg.context)
        };
        // SAFETY: `notify`'s caller guaranteed the callback is sound to call until a cancel of
        // this registration returns Ok; cancel waits for `in_flight` to clear, and this
        // thread is the only one delivering to this registration (serialized).
        unsafe { callback(context.0, port, kind) };
        let mut s = lock.lock().unwrap();
        s.registrations[index].in_flight = None;
        changed.notify_all();
        true
    }

    /// Breaks the contract on purpose: runs the callback even if another invocation of the
    /// same registration is in flight (an overlapping invocation). Returns whether it ran.
    fn deliver_overlapping(&self, handle: RawHandle, port: u16, kind: i32) -> bool {
        let (callback, context) = {
            let s = self.shared.0.lock().unwrap();
            let reg = &s.registrations[handle.get() - 1];
            if reg.cancelled {
                return false;
            }
            (reg.callback, reg.context)
        };
        // SAFETY: as in `deliver`, except that the call may overlap another: the library's
        // `PortSource` contract says it must not, and this exists to check that it survives
        // it (the registry coalesces instead of calling subscribers concurrently).
        unsafe { callback(context.0, port, kind) };
        true
    }

    /// Delivers the held initial notifications from another loom thread, and joins it.
    fn release_held(&self) {
        let held = std::mem::take(&mut self.shared.0.lock().unwrap().held);
        if held.is_empty() {
            return;
        }
        let netio = self.clone();
        thread::spawn(move || {
            for index in held {
                netio.deliver(Self::handle(index), 0, sys::MIB_INITIAL_NOTIFICATION);
            }
        })
        .join()
        .unwrap();
    }

    fn set_initial(&self, initial: Initial) {
        self.shared.0.lock().unwrap().initial = initial;
    }

    fn set_port(&self, port: Option<u16>) {
        self.shared.0.lock().unwrap().port = port;
    }

    fn fail_next_cancel_after_wait(&self) {
        self.shared.0.lock().unwrap().failing_cancels += 1;
    }

    fn live(&self) -> usize {
        let s = self.shared.0.lock().unwrap();
        s.registrations.iter().filter(|r| !r.cancelled).count()
    }

    fn cancels(&self) -> (usize, usize) {
        let s = self.shared.0.lock().unwrap();
        (s.cancels, s.self_cancels)
    }
}

// SAFETY: callbacks of one registration are serialized (`in_flight`), except through
// `deliver_overlapping`, which breaks the contract on purpose; they get the context given to
// `notify` and run at the delivering thread's IRQL (PASSIVE_LEVEL under loom); cancel marks
// the registration cancelled under the lock (no new delivery starts) and waits for the one
// in flight; a failed cancel or notify leaves the registration as it was.
unsafe impl PortSource for LoomNetio {
    type Kernel = MockKernel;

    unsafe fn notify(
        &self,
        callback: TeredoPortChangeCallback,
        context: *mut c_void,
        initial_notification: bool,
    ) -> Result<RawHandle, Error> {
        let mut s = self.shared.0.lock().unwrap();
        let inline = initial_notification && s.initial == Initial::CallerThread;
        s.registrations.push(Registration {
            callback,
            context: Context(context),
            cancelled: false,
            in_flight: inline.then(MockKernel::current_thread),
        });
        let index = s.registrations.len() - 1;
        let order = s.initial;
        if initial_notification && matches!(order, Initial::AfterReturn | Initial::DuringQuery) {
            s.held.push(index);
        }
        let null_handle = s.null_handles > 0;
        if null_handle {
            s.null_handles -= 1;
        }
        drop(s);
        if inline {
            // SAFETY: `notify`'s contract makes the callback sound from now on; `in_flight`
            // keeps other deliveries out until it returns.
            unsafe { callback(context, 0, sys::MIB_INITIAL_NOTIFICATION) };
            let (lock, changed) = &*self.shared;
            lock.lock().unwrap().registrations[index].in_flight = None;
            changed.notify_all();
        }
        if initial_notification && order == Initial::OtherThreadBeforeReturn {
            let netio = self.clone();
            thread::spawn(move || {
                netio.deliver(Self::handle(index), 0, sys::MIB_INITIAL_NOTIFICATION)
            })
            .join()
            .unwrap();
        }
        if null_handle {
            return Err(Error::InvalidHandle {
                call: NetioCall::NotifyTeredoPortChange,
                status: teredo_watcher::NetioStatus(sys::STATUS_SUCCESS),
            });
        }
        Ok(Self::handle(index))
    }

    fn teredo_port(&self) -> Result<u16, Error> {
        if self.shared.0.lock().unwrap().initial == Initial::DuringQuery {
            self.release_held();
        }
        let mut s = self.shared.0.lock().unwrap();
        if !s.query_ports.is_empty() {
            return Ok(s.query_ports.remove(0));
        }
        s.port.ok_or(Error::from_status(
            NetioCall::GetTeredoPort,
            sys::ERROR_NOT_READY,
        ))
    }

    unsafe fn cancel(&self, handle: RawHandle) -> Result<(), Error> {
        let (lock, changed) = &*self.shared;
        let mut s = lock.lock().unwrap();
        let index = handle.get() - 1;
        let me = MockKernel::current_thread();
        let reg = &s.registrations[index];
        if reg.cancelled {
            return Err(Error::from_status(
                NetioCall::CancelMibChangeNotify2,
                sys::ERROR_INVALID_HANDLE,
            ));
        }
        if reg.in_flight == Some(me) {
            s.self_cancels += 1;
            return Err(Error::from_status(
                NetioCall::CancelMibChangeNotify2,
                STATUS_POSSIBLE_DEADLOCK,
            ));
        }
        let fails = s.failing_cancels > 0;
        if fails {
            s.failing_cancels -= 1;
        } else {
            s.registrations[index].cancelled = true;
            s.cancels += 1;
        }
        while s.registrations[index].in_flight.is_some() {
            s = changed.wait(s).unwrap();
        }
        if fails {
            // Waited for the callback in flight, as a cancel does, then failed: still live.
            return Err(Error::from_status(
                NetioCall::CancelMibChangeNotify2,
                sys::STATUS_INVALID_PARAMETER,
            ));
        }
        Ok(())
    }
}

const OPTIONS: WatcherOptions = WatcherOptions {
    initial_notification: false,
    max_subscribers: 2,
    seed_current_port: false,
};

const PORT: u16 = 40_000;

/// What a subscriber received, in a loom cell (see the module docs).
struct Log(UnsafeCell<Vec<TeredoEvent>>);

// SAFETY: the library never calls one subscriber from two threads at once, and orders its
// calls (happens-before) with the subscription and the reclaim; loom checks every access
// to the cell, so a violation fails the model instead of being undefined behaviour.
unsafe impl Sync for Log {}

impl Log {
    fn new() -> Arc<Log> {
        Arc::new(Log(UnsafeCell::new(Vec::new())))
    }

    fn push(&self, event: TeredoEvent) {
        // SAFETY: see `impl Sync for Log`; loom tracks the access.
        self.0.with_mut(|v| unsafe { (*v).push(event) });
    }

    fn read(&self) -> Vec<TeredoEvent> {
        // SAFETY: called after every thread that could call the subscriber has been joined
        // or has cancelled; loom tracks the access.
        self.0.with(|v| unsafe { (*v).clone() })
    }
}

/// Sets a flag when the subscriber owning it is freed.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A subscriber that records its events and fails the model if it runs after `stop` was set
/// (by the test, once unsubscribe/drop returned) or after it was freed.
fn subscriber(
    log: &Arc<Log>,
    stop: &Arc<AtomicBool>,
    freed: &Arc<AtomicBool>,
) -> impl FnMut(TeredoEvent) + Send + 'static {
    let log = Arc::clone(log);
    let stop = Arc::clone(stop);
    let flag = DropFlag(Arc::clone(freed));
    move |event| {
        assert!(
            !flag.0.load(Ordering::SeqCst),
            "subscriber called after it was freed"
        );
        assert!(
            !stop.load(Ordering::SeqCst),
            "subscriber called after unsubscribe/drop returned"
        );
        log.push(event);
    }
}

static ITERATIONS: StdAtomicUsize = StdAtomicUsize::new(0);

/// Runs one model with the environment's bounds (`LOOM_MAX_PREEMPTIONS`, ...), counting and
/// printing the interleavings loom explored.
fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    model_with(name, None, f);
}

/// As [`model`], with a preemption bound that overrides the environment's.
fn model_with(name: &str, preemptions: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    ITERATIONS.store(0, std::sync::atomic::Ordering::SeqCst);
    let started = Instant::now();
    let mut builder = loom::model::Builder::new();
    if preemptions.is_some() {
        builder.preemption_bound = preemptions;
    }
    let bound = builder.preemption_bound;
    builder.check(move || {
        ITERATIONS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        f();
    });
    let n = ITERATIONS.load(std::sync::atomic::Ordering::SeqCst);
    assert!(n > 1, "{name}: loom explored a single interleaving");
    println!(
        "loom model {name}: {n} interleavings (preemption bound {bound:?}) in {:.1?}",
        started.elapsed()
    );
}

/// Leaks `value` for one iteration, so that watchers borrowing it can move to loom threads.
fn leak<T>(value: T) -> &'static T {
    Box::leak(Box::new(value))
}

/// Frees what [`leak`] returned.
///
/// # Safety
///
/// Nothing borrows `value` any more.
unsafe fn unleak<T>(value: &'static T) {
    // SAFETY: `value` came from `Box::leak` and is no longer borrowed (caller's contract).
    drop(unsafe { Box::from_raw(std::ptr::from_ref(value).cast_mut()) });
}

/// A notification races `subscribe_with_snapshot`: the subscriber sees the state once, in
/// order, never an older port after a newer one, and ends with the newest port.
#[test]
fn notification_races_subscribe_with_snapshot() {
    model(
        "notification_races_subscribe_with_snapshot",
        snapshot_subscription_races_notification,
    );
}

// With three preemptions a pass can mark the slot MISSED after the subscriber was already
// shown that pass's state: the retry must not show the same `Snapshot` again.
#[test]
fn regression_snapshot_not_repeated_for_one_state() {
    model_with(
        "regression_snapshot_not_repeated_for_one_state",
        Some(3),
        snapshot_subscription_races_notification,
    );
}

fn snapshot_subscription_races_notification() {
    {
        let netio = LoomNetio::new();
        let table = HandleTable::new(netio.clone());
        let watcher = TeredoPortWatcher::new(&table, OPTIONS).unwrap();
        let os = {
            let netio = netio.clone();
            thread::spawn(move || {
                netio.deliver(LoomNetio::handle(0), PORT, sys::MIB_PARAMETER_NOTIFICATION)
            })
        };
        let (log, stop, freed) = (Log::new(), Arc::default(), Arc::default());
        let id = watcher
            .subscribe_with_snapshot(subscriber(&log, &stop, &freed))
            .unwrap();
        assert!(os.join().unwrap(), "the registration was live");

        let new = TeredoPort::new(PORT);
        let events = log.read();
        let allowed = [
            // Subscribed before the notification.
            vec![
                TeredoEvent::Snapshot { port: None },
                TeredoEvent::PortChanged { port: new },
            ],
            // After it.
            vec![TeredoEvent::Snapshot { port: new }],
            // During it: a second snapshot replaces the missed notification.
            vec![
                TeredoEvent::Snapshot { port: None },
                TeredoEvent::Snapshot { port: new },
            ],
        ];
        assert!(allowed.contains(&events), "events {events:?}");
        assert_eq!(watcher.current_port(), new);

        watcher.unsubscribe(id).unwrap();
        assert!(freed.load(Ordering::SeqCst), "unsubscribe freed it");
        watcher.unregister().unwrap();
        assert_eq!(netio.live(), 0);
    }
}

/// Two notifications in a row race `subscribe_with_snapshot`: whatever the interleaving, the
/// subscriber's stream starts with snapshots, then continues with the notifications that
/// follow the last snapshot, each state exactly once, never going back, ending on the
/// newest port.
#[test]
fn two_notifications_race_subscribe_with_snapshot() {
    model("two_notifications_race_subscribe_with_snapshot", || {
        let netio = LoomNetio::new();
        let table = HandleTable::new(netio.clone());
        let watcher = TeredoPortWatcher::new(&table, OPTIONS).unwrap();
        let os = {
            let netio = netio.clone();
            thread::spawn(move || {
                let handle = LoomNetio::handle(0);
                netio.deliver(handle, PORT, sys::MIB_ADD_INSTANCE)
                    && netio.deliver(handle, PORT + 1, sys::MIB_PARAMETER_NOTIFICATION)
            })
        };
        let (log, stop, freed) = (Log::new(), Arc::default(), Arc::default());
        let id = watcher
            .subscribe_with_snapshot(subscriber(&log, &stop, &freed))
            .unwrap();
        assert!(os.join().unwrap(), "the registration was live");

        // The state each event shows: 0 before the notifications, 1 after the first, 2 after
        // the second.
        let state_of = |e: &TeredoEvent| match *e {
            TeredoEvent::Snapshot { port: None } => Some(0),
            TeredoEvent::Snapshot { port } | TeredoEvent::Added { port }
                if port == TeredoPort::new(PORT) =>
            {
                Some(1)
            }
            TeredoEvent::Snapshot { port } | TeredoEvent::PortChanged { port }
                if port == TeredoPort::new(PORT + 1) =>
            {
                Some(2)
            }
            _ => None,
        };
        let events = log.read();
        let states: Vec<Option<u8>> = events.iter().map(state_of).collect();
        assert!(
            matches!(events.first(), Some(TeredoEvent::Snapshot { .. })),
            "{events:?}"
        );
        assert!(states.iter().all(Option::is_some), "{events:?}");
        assert!(
            states.windows(2).all(|w| w[0] < w[1]),
            "states strictly increase: {events:?}"
        );
        assert_eq!(states.last(), Some(&Some(2)), "{events:?}");
        // Once a notification was delivered, no snapshot follows it.
        let first_change = events
            .iter()
            .position(|e| !matches!(e, TeredoEvent::Snapshot { .. }));
        if let Some(i) = first_change {
            assert!(
                events[i..]
                    .iter()
                    .all(|e| !matches!(e, TeredoEvent::Snapshot { .. })),
                "{events:?}"
            );
        }
        assert_eq!(watcher.current_port(), TeredoPort::new(PORT + 1));
        watcher.unsubscribe(id).unwrap();
        drop(watcher);
        assert_eq!(netio.live(), 0);
    });
}

/// A notification races `unsubscribe`: no call once unsubscribe returned, no call of a
/// freed subscriber, and it is freed by the time unsubscribe returns.
#[test]
fn notification_races_unsubscribe() {
    model("notification_races_unsubscribe", || {
        let netio = LoomNetio::new();
        let table = HandleTable::new(netio.clone());
        let (log, stop, freed) = (Log::new(), Arc::new(AtomicBool::new(false)), Arc::default());
        let (watcher, id) =
            TeredoPortWatcher::with_subscriber(&table, OPTIONS, subscriber(&log, &stop, &freed))
                .unwrap();
        let os = {
            let netio = netio.clone();
            thread::spawn(move || netio.deliver(LoomNetio::handle(0), PORT, sys::MIB_ADD_INSTANCE))
        };
        watcher.unsubscribe(id).unwrap();
        stop.store(true, Ordering::SeqCst);
        assert!(freed.load(Ordering::SeqCst), "unsubscribe freed it");
        assert!(os.join().unwrap(), "the registration was live");
        // The pass ran either before the unsubscription took effect or skipped it.
        let events = log.read();
        assert!(
            events.is_empty()
                || events
                    == [TeredoEvent::Added {
                        port: TeredoPort::new(PORT)
                    }],
            "events {events:?}"
        );
        assert_eq!(watcher.current_port(), TeredoPort::new(PORT));
        assert_eq!(watcher.unsubscribe(id), Err(Error::UnknownSubscriber));
        drop(watcher);
        assert_eq!(netio.live(), 0);
    });
}

/// Dropping the watcher races a notification in flight: the drop waits for the callback,
/// frees the context after it, and no callback runs afterwards.
#[test]
fn watcher_drop_races_notification() {
    model("watcher_drop_races_notification", || {
        let netio = LoomNetio::new();
        let table = HandleTable::new(netio.clone());
        let (log, stop, freed) = (Log::new(), Arc::new(AtomicBool::new(false)), Arc::default());
        let (watcher, _id) =
            TeredoPortWatcher::with_subscriber(&table, OPTIONS, subscriber(&log, &stop, &freed))
                .unwrap();
        let os = {
            let netio = netio.clone();
            thread::spawn(move || {
                netio.deliver(LoomNetio::handle(0), PORT, sys::MIB_PARAMETER_NOTIFICATION)
            })
        };
        drop(watcher);
        stop.store(true, Ordering::SeqCst);
        assert!(freed.load(Ordering::SeqCst), "the drop freed the context");
        assert_eq!(netio.live(), 0);
        let delivered = os.join().unwrap();
        let events = log.read();
        assert_eq!(events.len(), usize::from(delivered), "events {events:?}");
        assert_eq!(netio.cancels(), (1, 0));
        assert_eq!(table.live_registrations(), 0);
    });
}

type SharedWatcher = Arc<Mutex<Option<TeredoPortWatcher<'static, LoomNetio>>>>;

/// A callback unregisters its own watcher (a self-cancel would deadlock in the OS) while the
/// driver tears the table down: the watcher refuses without calling netio, the teardown
/// cancels the registration once the callback is over and frees the context.
#[test]
fn self_cancel_from_callback_races_teardown() {
    model("self_cancel_from_callback_races_teardown", || {
        let netio = LoomNetio::new();
        let table = leak(HandleTable::new(netio.clone()));
        let shared: SharedWatcher = Arc::new(Mutex::new(None));
        let outcome: Arc<Mutex<Option<Result<(), Error>>>> = Arc::new(Mutex::new(None));
        let freed = Arc::new(AtomicBool::new(false));
        let callback = {
            let shared = Arc::clone(&shared);
            let outcome = Arc::clone(&outcome);
            let flag = DropFlag(Arc::clone(&freed));
            move |_event: TeredoEvent| {
                assert!(!flag.0.load(Ordering::SeqCst), "called after it was freed");
                let taken = shared.lock().unwrap().take();
                if let Some(watcher) = taken {
                    *outcome.lock().unwrap() = Some(watcher.unregister());
                }
            }
        };
        let (watcher, _id) = TeredoPortWatcher::with_subscriber(table, OPTIONS, callback).unwrap();
        *shared.lock().unwrap() = Some(watcher);
        let os = {
            let netio = netio.clone();
            thread::spawn(move || {
                netio.deliver(LoomNetio::handle(0), PORT, sys::MIB_DELETE_INSTANCE)
            })
        };
        let report = table.teardown().unwrap();
        let delivered = os.join().unwrap();

        assert_eq!(report.cancelled, 1, "{report:?}");
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(netio.live(), 0);
        assert_eq!(
            netio.cancels(),
            (1, 0),
            "no cancel from inside the callback"
        );
        let outcome = outcome.lock().unwrap().take();
        if delivered {
            assert_eq!(outcome, Some(Err(Error::CancelFromCallback)));
            assert!(
                freed.load(Ordering::SeqCst),
                "the teardown freed the context"
            );
        } else {
            assert_eq!(outcome, None);
            // Still owned by the test: dropping it frees it without a second cancel.
            let watcher = shared.lock().unwrap().take();
            assert!(watcher.is_some());
            drop(watcher);
            assert!(freed.load(Ordering::SeqCst));
            assert_eq!(netio.cancels(), (1, 0));
        }
        assert_eq!(table.live_registrations(), 0);
        // SAFETY: the watcher is gone (dropped, or freed by the teardown), so nothing
        // borrows the table.
        unsafe { unleak(table) };
    });
}

/// The handle table's teardown races a registration: either the registration is refused
/// (`HandleTableClosed`) or the teardown waits for it and cancels it; none survives.
#[test]
fn teardown_races_registration() {
    model("teardown_races_registration", || {
        let netio = LoomNetio::new();
        let table = leak(HandleTable::new(netio.clone()));
        let freed = Arc::new(AtomicBool::new(false));
        let registering = {
            let freed = Arc::clone(&freed);
            thread::spawn(move || {
                let flag = DropFlag(freed);
                TeredoPortWatcher::with_subscriber(table, OPTIONS, move |_| {
                    let _ = &flag;
                })
                .map(|(w, _)| w)
            })
        };
        let report = table.teardown().unwrap();
        let created = registering.join().unwrap();
        assert!(report.is_clean(), "{report:?}");
        // Nothing registered survives the teardown.
        assert_eq!(netio.live(), 0);
        match created {
            Ok(watcher) => {
                assert_eq!(report.cancelled, 1);
                assert!(!freed.load(Ordering::SeqCst));
                drop(watcher);
                assert!(freed.load(Ordering::SeqCst));
            }
            Err(e) => {
                assert_eq!(e, Error::HandleTableClosed);
                assert_eq!(report.cancelled, 0);
                assert!(
                    freed.load(Ordering::SeqCst),
                    "a refused registration frees all"
                );
            }
        }
        // One cancel at most: the drop after the teardown does not cancel again.
        assert_eq!(netio.cancels().0, report.cancelled);
        assert_eq!(table.live_registrations(), 0);
        // SAFETY: the watcher (if any) is dropped and the thread joined: no borrower left.
        unsafe { unleak(table) };
    });
}

/// A subscriber unsubscribes another one from inside the callback (deferred reclaim) while a
/// third thread subscribes (which reclaims deferred slots): the removed subscriber is never
/// called after its removal and is freed exactly once, not while the pass may call it.
#[test]
fn unsubscribe_inside_callback_races_subscribe() {
    model("unsubscribe_inside_callback_races_subscribe", || {
        let netio = LoomNetio::new();
        let table = leak(HandleTable::new(netio.clone()));
        let options = WatcherOptions {
            max_subscribers: 3,
            ..OPTIONS
        };
        let watcher: &'static TeredoPortWatcher<'static, LoomNetio> =
            leak(TeredoPortWatcher::new(table, options).unwrap());
        // Subscriber B, to be removed by A.
        let (log_b, stop_b, freed_b) =
            (Log::new(), Arc::new(AtomicBool::new(false)), Arc::default());
        // A runs first (lower slot) and removes B: B must then be skipped by the same pass.
        let victim = Arc::new(AtomicUsize::new(0));
        let removed: Arc<Mutex<Option<Result<(), Error>>>> = Arc::new(Mutex::new(None));
        let id_b_slot: Arc<Mutex<Option<teredo_watcher::SubscriberId>>> =
            Arc::new(Mutex::new(None));
        let _a = {
            let id_b_slot = Arc::clone(&id_b_slot);
            let removed = Arc::clone(&removed);
            let stop_b = Arc::clone(&stop_b);
            let victim = Arc::clone(&victim);
            watcher
                .subscribe(move |_| {
                    if let Some(id) = id_b_slot.lock().unwrap().take() {
                        let r = watcher.unsubscribe(id);
                        if r.is_ok() {
                            stop_b.store(true, Ordering::SeqCst);
                            victim.fetch_add(1, Ordering::SeqCst);
                        }
                        *removed.lock().unwrap() = Some(r);
                    }
                })
                .unwrap()
        };
        let id_b = watcher
            .subscribe(subscriber(&log_b, &stop_b, &freed_b))
            .unwrap();
        *id_b_slot.lock().unwrap() = Some(id_b);
        let os = {
            let netio = netio.clone();
            thread::spawn(move || netio.deliver(LoomNetio::handle(0), PORT, sys::MIB_ADD_INSTANCE))
        };
        // Meanwhile a new subscription reclaims deferred slots (waiting for the pass).
        let (log_c, stop_c, freed_c) =
            (Log::new(), Arc::new(AtomicBool::new(false)), Arc::default());
        let id_c = watcher
            .subscribe(subscriber(&log_c, &stop_c, &freed_c))
            .unwrap();
        assert!(os.join().unwrap());
        assert_eq!(*removed.lock().unwrap(), Some(Ok(())));
        assert_eq!(victim.load(Ordering::SeqCst), 1);
        // B was removed inside the pass, before its own turn: never called.
        assert!(log_b.read().is_empty(), "B called after its removal");
        // C either caught the notification or subscribed after it.
        assert!(log_c.read().len() <= 1);
        // B's reclaim is deferred until a later call outside the pass; a subscription does it.
        watcher.unsubscribe(id_c).unwrap();
        stop_c.store(true, Ordering::SeqCst);
        let (log_d, stop_d, freed_d) =
            (Log::new(), Arc::new(AtomicBool::new(false)), Arc::default());
        let _d = watcher
            .subscribe(subscriber(&log_d, &stop_d, &freed_d))
            .unwrap();
        assert!(freed_b.load(Ordering::SeqCst), "B reclaimed");
        assert!(freed_c.load(Ordering::SeqCst), "C freed by its unsubscribe");
        // SAFETY: nothing else uses the watcher (the OS thread is joined); it was leaked by
        // `leak` above.
        unsafe { unleak(watcher) };
        assert!(freed_d.load(Ordering::SeqCst));
        assert_eq!(netio.live(), 0);
        // SAFETY: the watcher is dropped: nothing borrows the table.
        unsafe { unleak(table) };
    });
}

/// A watcher's cancel fails (after waiting for a callback in flight, as cancels do) while the
/// table's teardown runs: whichever cancel fails, the registration ends cancelled, the
/// context is freed (never leaked), and a clean report means netio holds nothing.
#[test]
fn failed_watcher_cancel_races_teardown() {
    model("failed_watcher_cancel_races_teardown", || {
        let netio = LoomNetio::new();
        let table = leak(HandleTable::new(netio.clone()));
        let freed = Arc::new(AtomicBool::new(false));
        let flag = DropFlag(Arc::clone(&freed));
        let (watcher, _) = TeredoPortWatcher::with_subscriber(table, OPTIONS, move |_| {
            assert!(!flag.0.load(Ordering::SeqCst), "called after it was freed");
        })
        .unwrap();
        netio.fail_next_cancel_after_wait();
        let dropper = thread::spawn(move || drop(watcher));
        let report = table.teardown().unwrap();
        if report.is_clean() {
            assert_eq!(
                netio.live(),
                0,
                "a clean report while netio holds it: {report:?}"
            );
        }
        dropper.join().unwrap();
        assert_eq!(netio.live(), 0, "{report:?}");
        assert!(
            freed.load(Ordering::SeqCst),
            "the context was leaked: {report:?}"
        );
        assert_eq!(table.live_registrations(), 0);
        // SAFETY: the watcher is gone, so nothing borrows the table.
        unsafe { unleak(table) };
    });
}

/// The initial notification comes after `notify` returned, from another thread, while the
/// seed's `GetTeredoPort` runs: the seed is kept (an initial notification sets no port),
/// and the first subscriber ends on the running port.
#[test]
fn late_initial_notification_races_the_seed() {
    model("late_initial_notification_races_the_seed", || {
        let netio = LoomNetio::new();
        netio.set_initial(Initial::Later);
        netio.set_port(Some(PORT));
        let table = HandleTable::new(netio.clone());
        let (log, stop, freed) = (Log::new(), Arc::default(), Arc::default());
        let os = {
            let netio = netio.clone();
            thread::spawn(move || {
                // The registration exists once `notify` pushed it; spin (yielding) until then.
                loop {
                    if netio.shared.0.lock().unwrap().registrations.len() == 1 {
                        break;
                    }
                    thread::yield_now();
                }
                netio.deliver(LoomNetio::handle(0), 0, sys::MIB_INITIAL_NOTIFICATION)
            })
        };
        let options = WatcherOptions {
            initial_notification: true,
            seed_current_port: true,
            ..OPTIONS
        };
        let (watcher, _) =
            TeredoPortWatcher::with_subscriber(&table, options, subscriber(&log, &stop, &freed))
                .unwrap();
        assert!(os.join().unwrap());
        assert_eq!(watcher.current_port(), TeredoPort::new(PORT));
        let events = log.read();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(
            events.last().and_then(TeredoEvent::port),
            TeredoPort::new(PORT),
            "{events:?}"
        );
        drop(watcher);
        assert_eq!(netio.live(), 0);
    });
}

/// Two invocations of one registration overlap (a broken contract): subscribers are never
/// called twice at once (the log cell would report a data race), and the newest port the
/// state word holds is the last one they see.
#[test]
fn overlapping_invocations_coalesce_to_the_newest_port() {
    model(
        "overlapping_invocations_coalesce_to_the_newest_port",
        || {
            let netio = LoomNetio::new();
            let table = HandleTable::new(netio.clone());
            let (log, stop, freed) = (Log::new(), Arc::default(), Arc::default());
            let (watcher, _) = TeredoPortWatcher::with_subscriber(
                &table,
                OPTIONS,
                subscriber(&log, &stop, &freed),
            )
            .unwrap();
            let other = {
                let netio = netio.clone();
                thread::spawn(move || {
                    netio.deliver_overlapping(
                        LoomNetio::handle(0),
                        PORT,
                        sys::MIB_PARAMETER_NOTIFICATION,
                    )
                })
            };
            assert!(netio.deliver_overlapping(
                LoomNetio::handle(0),
                PORT + 1,
                sys::MIB_PARAMETER_NOTIFICATION
            ));
            assert!(other.join().unwrap());
            let events = log.read();
            assert!(!events.is_empty());
            assert_eq!(
                events.last().and_then(TeredoEvent::port),
                watcher.current_port(),
                "{events:?}"
            );
            let stats = watcher.stats();
            assert_eq!(stats.notifications, 2);
            assert!(stats.overlapping <= 1);
            assert_eq!(
                events.len(),
                2,
                "each invocation delivered or coalesced: {events:?}"
            );
            drop(watcher);
        },
    );
}

/// What a passive subscriber received, in a loom cell: two calls at once, or a call not
/// ordered before the teardown's return, is a data race loom reports.
struct PortLog(UnsafeCell<Vec<Option<u16>>>);

// SAFETY: as for `Log`: the library serializes the calls of one passive subscriber and
// orders them before the waits that end; loom checks every access.
unsafe impl Sync for PortLog {}

/// A notification hands the newest port to a `PASSIVE_LEVEL` subscriber (its work item runs
/// on a loom thread of its own) while the table's teardown runs on another thread, racing
/// the work items of the subscription's first call and of the notification: the ports
/// arrive in notification order, no call runs after the teardown returned, the closure is
/// dropped by then, a queued item runs as a no-op, and the core is freed once (the mock
/// panics on a second `IoUninitializeWorkItem`, and none is left initialized).
#[test]
fn passive_coalescing_races_teardown() {
    model("passive_coalescing_races_teardown", || {
        let netio = LoomNetio::new();
        let table = leak(HandleTable::new(netio.clone()));
        let watcher = TeredoPortWatcher::new(table, OPTIONS).unwrap();
        let driver = Box::new(0u64);
        let raw = std::ptr::from_ref::<u64>(&driver)
            .cast_mut()
            .cast::<c_void>();
        // SAFETY: on the mock any non-null address works; `driver` outlives the watcher.
        let io = unsafe { teredo_watcher::IoObject::from_raw(raw) }.unwrap();
        let log = Arc::new(PortLog(UnsafeCell::new(Vec::new())));
        let (stop, freed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let subscriber = {
            let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
            let flag = DropFlag(Arc::clone(&freed));
            move |port: Option<TeredoPort>| {
                assert!(!flag.0.load(Ordering::SeqCst), "called after it was freed");
                assert!(
                    !stop.load(Ordering::SeqCst),
                    "called after the teardown returned"
                );
                log.0.with_mut(|v| {
                    // SAFETY: see `impl Sync for PortLog`; loom tracks the access.
                    unsafe { (*v).push(port.map(TeredoPort::get)) }
                });
            }
        };
        watcher.subscribe_passive(io, subscriber).unwrap();
        let os = {
            let netio = netio.clone();
            thread::spawn(move || {
                netio.deliver(LoomNetio::handle(0), PORT, sys::MIB_PARAMETER_NOTIFICATION)
            })
        };
        let report = table.teardown().unwrap();
        stop.store(true, Ordering::SeqCst);
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.cancelled, 1);
        assert!(
            freed.load(Ordering::SeqCst),
            "the teardown dropped the closure"
        );
        // SAFETY: every call was ordered before the teardown's return (its wait), and none
        // runs after it; loom tracks the access.
        let calls = log.0.with(|v| unsafe { (*v).clone() });
        let delivered = os.join().unwrap();
        // The port at subscription (none), then the notification's, each at most once, in
        // that order; the first call may already read the newer one.
        assert!(
            matches!(
                calls.as_slice(),
                [] | [None | Some(PORT)] | [None, Some(PORT)]
            ),
            "{calls:?}"
        );
        if !delivered {
            assert!(matches!(calls.as_slice(), [] | [None]), "{calls:?}");
        }
        drop(watcher);
        teredo_watcher::mock::join_work_items();
        assert_eq!(
            teredo_watcher::mock::work_items_initialized_on(raw),
            0,
            "the core is freed once the last item returned"
        );
        // SAFETY: the watcher is dropped: nothing borrows the table.
        unsafe { unleak(table) };
        drop(driver);
    });
}

/// The netio contract suite on the loom source, each check in a loom model of its own.
#[path = "netio_contract/mod.rs"]
mod netio_contract;

impl netio_contract::Netio for LoomNetio {
    fn fresh() -> Self {
        LoomNetio::new()
    }
    fn orders(&self) -> Vec<netio_contract::Order> {
        netio_contract::ALL_ORDERS.to_vec()
    }
    fn set_order(&self, order: netio_contract::Order) {
        use netio_contract::Order;
        self.set_initial(match order {
            Order::CallerThread => Initial::CallerThread,
            Order::OtherThreadBeforeReturn => Initial::OtherThreadBeforeReturn,
            Order::AfterReturn => Initial::AfterReturn,
            Order::DuringQuery => Initial::DuringQuery,
        });
    }
    fn set_running(&self, port: Option<u16>) {
        self.set_port(port);
    }
    fn notify_all(&self, port: u16, kind: i32) {
        let count = self.shared.0.lock().unwrap().registrations.len();
        for index in 0..count {
            self.deliver(Self::handle(index), port, kind);
        }
    }
    fn settle(&self) {
        self.release_held();
    }
    fn live(&self) -> usize {
        LoomNetio::live(self)
    }
    fn query_returns_next(&self, port: u16) {
        self.shared.0.lock().unwrap().query_ports.push(port);
    }
    fn notify_null_handle_next(&self) {
        self.shared.0.lock().unwrap().null_handles += 1;
    }
    fn fail_next_cancel_after_wait(&self) {
        LoomNetio::fail_next_cancel_after_wait(self);
    }
    fn overlap(&self, a: (u16, i32), b: (u16, i32)) {
        let count = self.shared.0.lock().unwrap().registrations.len();
        for index in 0..count {
            let netio = self.clone();
            let other =
                thread::spawn(move || netio.deliver_overlapping(Self::handle(index), a.0, a.1));
            self.deliver_overlapping(Self::handle(index), b.0, b.1);
            other.join().unwrap();
        }
    }
}

#[test]
fn contract_orders_are_complete() {
    model_sequential(
        "contract_orders_are_complete",
        netio_contract::orders_are_complete::<LoomNetio>,
    );
}

#[test]
fn contract_initial_notification_once_in_each_order() {
    // The orders' threads are joined where the order says (inside `notify`, in `settle`, in
    // `GetTeredoPort`), so there is one interleaving; the races of a late initial
    // notification are `late_initial_notification_races_the_seed`'s.
    model_sequential(
        "contract_initial_notification_once_in_each_order",
        netio_contract::initial_notification_once_in_each_order::<LoomNetio>,
    );
}

#[test]
fn contract_the_watcher_learns_a_running_client_in_each_order() {
    model_sequential(
        "contract_the_watcher_learns_a_running_client_in_each_order",
        netio_contract::the_watcher_learns_a_running_client_in_each_order::<LoomNetio>,
    );
}

#[test]
fn contract_cancel_stops_delivery() {
    model_sequential(
        "contract_cancel_stops_delivery",
        netio_contract::cancel_stops_delivery::<LoomNetio>,
    );
}

#[test]
fn contract_query_port_zero_null_handle_failed_cancel() {
    model_sequential("contract_query_port_zero_null_handle_failed_cancel", || {
        netio_contract::query_reports_the_client::<LoomNetio>();
        netio_contract::a_query_with_port_zero_means_no_port::<LoomNetio>();
        netio_contract::a_null_handle_silences_the_failed_watcher::<LoomNetio>();
        netio_contract::a_cancel_that_fails_after_waiting_is_retried_by_teardown::<LoomNetio>();
    });
}

#[test]
fn contract_overlapping_invocations_end_on_the_newest_port() {
    model(
        "contract_overlapping_invocations_end_on_the_newest_port",
        netio_contract::overlapping_invocations_end_on_the_newest_port::<LoomNetio>,
    );
}

/// As [`model`], for checks whose threads are joined at once (nothing to interleave): loom
/// runs them once, which `model`'s "more than one interleaving" floor would reject.
fn model_sequential(name: &str, f: impl Fn() + Sync + Send + 'static) {
    ITERATIONS.store(0, std::sync::atomic::Ordering::SeqCst);
    loom::model(move || {
        ITERATIONS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        f();
    });
    let n = ITERATIONS.load(std::sync::atomic::Ordering::SeqCst);
    assert!(n >= 1, "{name}: loom ran nothing");
    println!("loom model {name}: {n} interleavings (sequential)");
}
