//! A `PortSource` that hands the registered callback back to the caller, so a benchmark (or
//! the allocation test) can run a notification pass directly on its own thread: no mock
//! delivery thread, no queue, no handoff. What is measured is exactly the library's fan-out
//! behind the `extern "system"` trampoline the watcher registers.
//!
//! It also produces the orderings and faults the documentation allows (for the conformance
//! suite, `tests/netio_contract/`): the initial notification on the caller's thread or on another
//! thread before `notify` returns, after it returned, or while `GetTeredoPort` runs; a success
//! with a NULL handle; `GetTeredoPort` answering any port (0 included); a cancel that fails
//! after waiting; overlapping invocations.
//!
//! Shared by `benches/teredo.rs`, `tests/alloc_free.rs` and `tests/conformance.rs` (included
//! with `#[path]`).

use core::ffi::c_void;
use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

use teredo_watcher::mock::MockKernel;
use teredo_watcher::sys::{self, MIB_INITIAL_NOTIFICATION, TeredoPortChangeCallback};
use teredo_watcher::{Error, NetioCall, NetioStatus, PortSource, RawHandle};

/// The callback and context of the one live registration.
#[derive(Clone, Copy)]
pub struct Registered {
    callback: TeredoPortChangeCallback,
    context: *mut c_void,
}

// SAFETY: the context is only ever handed back to the callback, which `PortSource::notify`'s
// contract makes sound to call from any thread (serialized); moving the pair moves no data.
unsafe impl Send for Registered {}

impl Registered {
    /// Runs one notification pass on the calling thread, as the OS would.
    ///
    /// # Safety
    ///
    /// The registration is live (not cancelled; its watcher not dropped) for the whole call,
    /// and no other call of this registration's callback runs at the same time (the OS
    /// serializes them; here the caller does), unless the caller means to break that contract
    /// (an overlapping invocation, which the library must survive).
    #[inline]
    pub unsafe fn fire(self, port: u16, notification_type: i32) {
        // SAFETY: the callback is the watcher's trampoline and the context its registry,
        // valid until the cancel returns (caller's contract).
        unsafe { (self.callback)(self.context, port, notification_type) }
    }
}

/// When the initial notification is delivered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirectInitial {
    /// On the calling thread, inside `notify`.
    #[default]
    CallerThread,
    /// On another thread, which `notify` waits for before it returns.
    OtherThreadBeforeReturn,
    /// Held until [`DirectSource::deliver_pending`], which runs it on another thread.
    AfterReturn,
    /// Held until the next `GetTeredoPort`, which runs it on another thread first.
    DuringQuery,
}

#[derive(Default)]
struct State {
    registered: Option<Registered>,
    initial: DirectInitial,
    initial_pending: bool,
    running: Option<u16>,
    query_ports: VecDeque<u16>,
    null_handles: usize,
    failing_cancels: usize,
}

/// The handle `notify` returns (the source holds one registration at a time).
const HANDLE: RawHandle = match RawHandle::new(1) {
    Some(handle) => handle,
    None => panic!("1 is not NULL"),
};

/// One registration at a time; `cancel` forgets it.
pub struct DirectSource {
    state: Mutex<State>,
    /// Held while a serialized delivery runs (overlapping invocations bypass it).
    delivering: Mutex<()>,
}

impl DirectSource {
    /// A source whose `GetTeredoPort` answers `port`.
    /// A client running on `port`, no registration; a `const fn`, so a
    /// `StaticTeredoWatcher` over it can be a real `static`.
    #[must_use]
    pub const fn new(port: u16) -> Self {
        DirectSource {
            state: Mutex::new(State {
                registered: None,
                initial: DirectInitial::CallerThread,
                initial_pending: false,
                running: Some(port),
                query_ports: VecDeque::new(),
                null_handles: 0,
                failing_cancels: 0,
            }),
            delivering: Mutex::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live registration.
    ///
    /// # Panics
    ///
    /// If nothing is registered.
    #[must_use]
    pub fn registered(&self) -> Registered {
        self.state().registered.expect("no live registration")
    }

    /// Whether a registration is live.
    #[must_use]
    pub fn is_registered(&self) -> bool {
        self.state().registered.is_some()
    }

    /// Chooses when the initial notification is delivered.
    pub fn set_initial(&self, initial: DirectInitial) {
        self.state().initial = initial;
    }

    /// Sets what `GetTeredoPort` answers: the port, or `ERROR_NOT_READY` for `None`.
    pub fn set_running(&self, port: Option<u16>) {
        self.state().running = port;
    }

    /// The next `GetTeredoPort` answers `port` (0 included). Queued.
    pub fn query_returns_next(&self, port: u16) {
        self.state().query_ports.push_back(port);
    }

    /// The next `notify` registers but returns success with a NULL handle.
    pub fn notify_null_handle_next(&self) {
        self.state().null_handles += 1;
    }

    /// The next `cancel` fails (there is never a callback in flight to wait for here unless
    /// the caller runs one, and then the caller is the one waiting).
    pub fn fail_next_cancel_after_wait(&self) {
        self.state().failing_cancels += 1;
    }

    /// Delivers one notification to the live registration, serialized with every other
    /// serialized delivery, on the calling thread. Returns whether one was live.
    pub fn deliver(&self, port: u16, notification_type: i32) -> bool {
        let _serialized = self
            .delivering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(registered) = self.state().registered else {
            return false;
        };
        // SAFETY: the registration is live (cancel forgets it under `state`, and a watcher
        // cancels before freeing; a cancel racing this call would have to wait for it, which
        // callers of this test source arrange by not cancelling concurrently), and
        // `delivering` serializes it with every other `deliver`.
        unsafe { registered.fire(port, notification_type) };
        true
    }

    /// Runs a held initial notification (`AfterReturn`) on another thread, and waits for it.
    pub fn deliver_pending(&self) {
        let pending = core::mem::take(&mut self.state().initial_pending);
        if pending {
            std::thread::scope(|s| {
                s.spawn(|| self.deliver(0, MIB_INITIAL_NOTIFICATION));
            });
        }
    }

    /// Breaks the contract on purpose: two invocations at once, `a` on another thread and `b`
    /// on this one, both bypassing the serialization. Returns whether a registration was live.
    pub fn overlap(&self, a: (u16, i32), b: (u16, i32)) -> bool {
        let Some(registered) = self.state().registered else {
            return false;
        };
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: live for the whole scope (nothing cancels concurrently); the
                // overlap with the call below is the point.
                unsafe { registered.fire(a.0, a.1) };
            });
            // SAFETY: as above.
            unsafe { registered.fire(b.0, b.1) };
        });
        true
    }
}

// SAFETY: the source calls the callback by itself only for the initial notification: inside
// `notify` (on the caller's thread or on a thread `notify` joins), from `deliver_pending`,
// or from `GetTeredoPort`, all through `deliver`, which serializes deliveries; `Registered::
// fire` and `overlap` put serialization (or its deliberate absence) on their caller. `cancel`
// only forgets the pair, so once it returns Ok no call can start through this source.
unsafe impl PortSource for DirectSource {
    type Kernel = MockKernel;

    unsafe fn notify(
        &self,
        callback: TeredoPortChangeCallback,
        context: *mut c_void,
        initial_notification: bool,
    ) -> Result<RawHandle, Error> {
        let registered = Registered { callback, context };
        let (initial, null_handle) = {
            let mut s = self.state();
            s.registered = Some(registered);
            let null_handle = s.null_handles > 0;
            if null_handle {
                s.null_handles -= 1;
            }
            s.initial_pending = initial_notification
                && matches!(
                    s.initial,
                    DirectInitial::AfterReturn | DirectInitial::DuringQuery
                );
            (s.initial, null_handle)
        };
        if initial_notification {
            match initial {
                DirectInitial::CallerThread => {
                    self.deliver(0, MIB_INITIAL_NOTIFICATION);
                }
                DirectInitial::OtherThreadBeforeReturn => std::thread::scope(|s| {
                    s.spawn(|| self.deliver(0, MIB_INITIAL_NOTIFICATION));
                }),
                DirectInitial::AfterReturn | DirectInitial::DuringQuery => {}
            }
        }
        if null_handle {
            return Err(Error::InvalidHandle {
                call: NetioCall::NotifyTeredoPortChange,
                status: NetioStatus(sys::STATUS_SUCCESS),
            });
        }
        Ok(HANDLE)
    }

    fn teredo_port(&self) -> Result<u16, Error> {
        let during_query = {
            let mut s = self.state();
            let held = s.initial_pending && s.initial == DirectInitial::DuringQuery;
            if held {
                s.initial_pending = false;
            }
            held
        };
        if during_query {
            std::thread::scope(|s| {
                s.spawn(|| self.deliver(0, MIB_INITIAL_NOTIFICATION));
            });
        }
        let mut s = self.state();
        if let Some(port) = s.query_ports.pop_front() {
            return Ok(port);
        }
        s.running.ok_or(Error::from_status(
            NetioCall::GetTeredoPort,
            sys::ERROR_NOT_READY,
        ))
    }

    unsafe fn cancel(&self, _handle: RawHandle) -> Result<(), Error> {
        // Waits for a serialized delivery in flight, as the real cancel does.
        let _serialized = self
            .delivering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut s = self.state();
        if s.failing_cancels > 0 {
            s.failing_cancels -= 1;
            return Err(Error::from_status(
                NetioCall::CancelMibChangeNotify2,
                sys::STATUS_INVALID_PARAMETER,
            ));
        }
        s.registered = None;
        s.initial_pending = false;
        Ok(())
    }
}
