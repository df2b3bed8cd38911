//! A `PortSource` that hands the registered callback back to the caller, so a benchmark (or
//! the allocation test) can run a notification pass directly on its own thread: no mock
//! delivery thread, no queue, no handoff. What is measured is exactly the library's fan-out
//! behind the `extern "system"` trampoline the watcher registers.
//!
//! Shared by `benches/teredo.rs` and `tests/alloc_free.rs` (included with `#[path]`).

use core::ffi::c_void;
use std::sync::{Mutex, PoisonError};

use teredo_watcher::mock::MockKernel;
use teredo_watcher::sys::{MIB_INITIAL_NOTIFICATION, TeredoPortChangeCallback};
use teredo_watcher::{Error, PortSource, RawHandle};

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
    /// serializes them; here the caller does).
    #[inline]
    pub unsafe fn fire(self, port: u16, notification_type: i32) {
        // SAFETY: the callback is the watcher's trampoline and the context its registry,
        // valid until the cancel returns (caller's contract); calls are serialized (idem).
        unsafe { (self.callback)(self.context, port, notification_type) }
    }
}

/// The handle `notify` returns (the source holds one registration at a time).
const HANDLE: RawHandle = match RawHandle::new(1) {
    Some(handle) => handle,
    None => panic!("1 is not NULL"),
};

/// One registration at a time; `cancel` forgets it.
pub struct DirectSource {
    registered: Mutex<Option<Registered>>,
    port: u16,
}

impl DirectSource {
    /// A source whose `GetTeredoPort` answers `port`.
    #[must_use]
    pub fn new(port: u16) -> Self {
        DirectSource {
            registered: Mutex::new(None),
            port,
        }
    }

    /// The live registration.
    ///
    /// # Panics
    ///
    /// If nothing is registered.
    #[must_use]
    pub fn registered(&self) -> Registered {
        self.registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .expect("no live registration")
    }
}

// SAFETY: the source never calls the callback by itself except once, synchronously inside
// `notify` for the initial notification (at the caller's IRQL, < DISPATCH_LEVEL), and the
// `Registered::fire` contract puts serialization and liveness on its caller. `cancel` only
// forgets the pair, so once it returns no call can start through this source.
unsafe impl PortSource for DirectSource {
    type Kernel = MockKernel;

    unsafe fn notify(
        &self,
        callback: TeredoPortChangeCallback,
        context: *mut c_void,
        initial_notification: bool,
    ) -> Result<RawHandle, Error> {
        let registered = Registered { callback, context };
        *self
            .registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(registered);
        if initial_notification {
            // SAFETY: the registration was just made (the watcher keeps the context alive
            // until cancel) and nothing else can call it yet.
            unsafe { registered.fire(0, MIB_INITIAL_NOTIFICATION) };
        }
        Ok(HANDLE)
    }

    fn teredo_port(&self) -> Result<u16, Error> {
        Ok(self.port)
    }

    unsafe fn cancel(&self, _handle: RawHandle) -> Result<(), Error> {
        *self
            .registered
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        Ok(())
    }
}
