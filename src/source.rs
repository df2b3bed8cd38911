//! Where Teredo port notifications come from: the port-source abstraction.
//!
//! [`PortSource`] is the three netio calls. Two implementations exist: the real one
//! ([`crate::nt::NetioPortSource`], Windows targets) and the host mock of a Teredo client
//! (`mock::MockNetio`, feature `mock`).

use core::ffi::c_void;
use core::num::NonZeroUsize;

use crate::Error;
use crate::kernel::Kernel;
use crate::sys::TeredoPortChangeCallback;

/// An OS notification handle (`HANDLE` returned by `NotifyTeredoPortChange`), never NULL.
///
/// It is only an identity: it is never dereferenced by this crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RawHandle(NonZeroUsize);

impl RawHandle {
    /// Wraps a handle value; `None` for NULL.
    #[must_use]
    pub const fn new(value: usize) -> Option<RawHandle> {
        match NonZeroUsize::new(value) {
            Some(v) => Some(RawHandle(v)),
            None => None,
        }
    }

    /// The handle value.
    #[must_use]
    pub const fn get(self) -> usize {
        self.0.get()
    }
}

/// The Teredo port notification API of netio.
///
/// # Safety
///
/// An implementation behaves as the documented API does, because the registry's soundness
/// rests on it:
/// - invocations of the callback of one registration are serialized (never overlap), and
///   each passes the `context` given to [`notify`](PortSource::notify) unchanged;
/// - the callback runs at `<= DISPATCH_LEVEL`;
/// - once [`cancel`](PortSource::cancel) returns `Ok`, the callback of that registration is
///   not running and will never run again (cancel waits for an invocation in flight);
/// - a failed `notify` leaves nothing registered and does not call the callback afterwards.
pub unsafe trait PortSource: Send + Sync {
    /// The kernel primitives this source runs with (IRQL, spin locks, threads).
    type Kernel: Kernel;

    /// `NotifyTeredoPortChange`. IRQL: `< DISPATCH_LEVEL`.
    ///
    /// With `initial_notification`, the callback runs once with `Port = 0` and type
    /// `MibInitialNotification`, possibly before this function returns.
    ///
    /// # Errors
    ///
    /// The status the OS returned; nothing is registered then.
    ///
    /// # Safety
    ///
    /// `callback(context, ..)` must be sound to call, serialized, from any thread at
    /// `<= DISPATCH_LEVEL` from the moment this is called until a `cancel` of the returned
    /// handle has returned `Ok` (forever if it never does).
    unsafe fn notify(
        &self,
        callback: TeredoPortChangeCallback,
        context: *mut c_void,
        initial_notification: bool,
    ) -> Result<RawHandle, Error>;

    /// `GetTeredoPort`. IRQL: `< DISPATCH_LEVEL`. Returns the raw port.
    ///
    /// # Errors
    ///
    /// The status the OS returned.
    fn teredo_port(&self) -> Result<u16, Error>;

    /// `CancelMibChangeNotify2`. IRQL: `PASSIVE_LEVEL`. Waits for a callback in flight.
    ///
    /// # Errors
    ///
    /// The status the OS returned; the registration is then still live.
    ///
    /// # Safety
    ///
    /// `handle` came from `notify` on this source and has not been cancelled successfully.
    /// The caller is not running inside the callback of that registration (that deadlocks).
    unsafe fn cancel(&self, handle: RawHandle) -> Result<(), Error>;
}
