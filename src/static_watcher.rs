//! The watcher that lives in a `static`: built by a `const fn`, fixed capacity, no
//! allocation of its own.
//!
//! The design and the trade-off are documented on [`StaticTeredoWatcher`].

use crate::error::Error;
use crate::event::{TeredoEvent, TeredoPort};
use crate::irql::{self, IrqlBound};
use crate::passive::IoObject;
use crate::registry::{Inline, Registry, RegistryStats, SubscriberId, trampoline};
use crate::source::{PortSource, RawHandle};
use crate::teredo::TeredoExceptions;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

const STOPPED: u8 = 0;
const STARTING: u8 = 1;
const RUNNING: u8 = 2;
const STOPPING: u8 = 3;

/// What [`StaticTeredoWatcher::start`] learnt besides success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartReport {
    /// Why seeding the port with `GetTeredoPort` failed, if it was asked for and did (for
    /// instance [`Error::TeredoNotStarted`]); the port is then learnt from the next
    /// notification.
    pub seed_error: Option<Error>,
}

/// A registration for Teredo port changes that lives in a `static`: up to `N` subscribers,
/// no allocation of its own, [`current_port`](Self::current_port) one load from a fixed
/// address.
///
/// [`TeredoPortWatcher`](crate::TeredoPortWatcher) allocates its context (the registry, its
/// slots and its event) when it registers, and a classify function reaches it through the
/// driver's state. `StaticTeredoWatcher` is the same registry with its slots and event
/// inline, in a `static` the driver declares:
///
/// - `DriverEntry` allocates nothing for it: [`start`](Self::start) registers
///   the `static` itself as netio's context (a `static` never moves and is never freed);
/// - [`current_port`](Self::current_port) is one atomic load from a fixed
///   address, and a classify function calls it on the `static` with no `unsafe`;
/// - it needs no [`HandleTable`](crate::HandleTable): the context can never dangle, so a
///   registration whose cancel failed needs no owner to free it later.
///
/// # Trade-off against the heap form
///
/// | | `StaticTeredoWatcher<S, N>` | [`TeredoPortWatcher`](crate::TeredoPortWatcher) |
/// |---|---|---|
/// | capacity | `N`, fixed at compile time | `max_subscribers`, chosen at run time |
/// | memory | in the image's `.data`/`.bss` for the driver's lifetime | pool, allocated at creation, freed at drop |
/// | registrations | one per `static` | any number, up to [`MAX_REGISTRATIONS`](crate::MAX_REGISTRATIONS) per table |
/// | `current_port()` | one load from a static address | one load through the watcher's pointer to its context |
/// | a cancel that fails | the `static` stays registered and silenced; `stop` may be retried | the table's teardown retries and frees the context |
/// | lifetime | `start`/`stop` pairs, any number of times | one registration per watcher value |
///
/// Subscribers are closures as in the heap form: one that captures nothing is zero-sized
/// and is not allocated; one with captures is moved to the pool by `subscribe`. A passive
/// subscriber allocates its work item and core, as in the heap form.
///
/// # States
///
/// ```text
///   STOPPED --start--> STARTING --ok--> RUNNING --stop--> STOPPING --ok--> STOPPED
///                          \--error--> STOPPED              \--error--> RUNNING (silenced)
/// ```
///
/// A stop whose cancel fails leaves the registration live with its subscribers silenced: no
/// call of theirs starts again, and the `static` stays valid for any late notification, but
/// the image must stay loaded (see the example driver's unload). `stop` can be called again.
///
/// # Examples
///
/// A driver declares it over the real netio source
/// (`static WATCHER: StaticTeredoWatcher<NetioPortSource, 4> =
/// StaticTeredoWatcher::new(NetioPortSource::new());`), starts it in `DriverEntry` and stops
/// it in `DriverUnload`. On the host mock, whose source is built at run time, a leaked or
/// `OnceLock`ed value plays the `static`:
///
/// ```
/// # #[cfg(feature = "mock")] {
/// use std::sync::OnceLock;
/// use teredo_watcher::mock::MockNetio;
/// use teredo_watcher::StaticTeredoWatcher;
///
/// static WATCHER: OnceLock<StaticTeredoWatcher<MockNetio, 2>> = OnceLock::new();
/// let netio = MockNetio::new();
/// let running = netio.client().start();
/// let watcher = WATCHER.get_or_init(|| StaticTeredoWatcher::new(netio.clone()));
/// let report = watcher.start()?;
/// assert_eq!(report.seed_error, None);
/// // What a classify function calls, for every packet: one load.
/// assert_eq!(watcher.current_port().map(|p| p.get()), Some(running));
/// let moved = netio.client().restart();
/// netio.wait_idle();
/// assert_eq!(watcher.current_port().map(|p| p.get()), Some(moved));
/// watcher.stop()?;
/// # }
/// # Ok::<(), teredo_watcher::Error>(())
/// ```
///
/// # IRQL
///
/// | method | IRQL |
/// |---|---|
/// | [`new`](Self::new) | a `const fn` |
/// | [`start`](Self::start), [`stop`](Self::stop) | `PASSIVE_LEVEL` |
/// | [`current_port`](Self::current_port), [`exceptions`](Self::exceptions), [`stats`](Self::stats), [`is_running`](Self::is_running) | any |
/// | [`subscribe`](Self::subscribe), [`subscribe_with_snapshot`](Self::subscribe_with_snapshot), [`subscribe_passive`](Self::subscribe_passive) | `< DISPATCH_LEVEL` |
/// | [`unsubscribe`](Self::unsubscribe) | `< DISPATCH_LEVEL`; `<= DISPATCH_LEVEL` inside a callback |
///
/// Subscribers run as in the heap form: at the IRQL of the OS callback (`<= DISPATCH_LEVEL`),
/// passive subscribers at `PASSIVE_LEVEL` on a system worker thread.
///
/// # Invariants
///
/// - `handle` is non-zero exactly while the phase is `RUNNING` or `STOPPING` (a live
///   registration whose context is `registry`), and is only written by the thread that
///   moved the phase to `STARTING` or `STOPPING`.
/// - `registry` is started (its event initialized, its id taken) before it is registered or
///   seeded.
pub struct StaticTeredoWatcher<S: PortSource, const N: usize> {
    registry: Registry<S::Kernel, Inline<S::Kernel, N>>,
    source: S,
    phase: AtomicU8,
    handle: AtomicUsize,
    started_once: AtomicBool,
    initial_notification: bool,
    seed_current_port: bool,
}

impl<S: PortSource, const N: usize> StaticTeredoWatcher<S, N> {
    /// A stopped watcher with room for `N` subscribers, for a `static`: nothing allocated,
    /// nothing registered. It will ask for the initial notification and seed the port with
    /// `GetTeredoPort` (see [`with_options`](Self::with_options)).
    #[must_use]
    pub const fn new(source: S) -> Self {
        Self::with_options(source, true, true)
    }

    /// As [`new`](Self::new), choosing whether `start` asks for the initial notification
    /// (`InitialNotification = TRUE`) and whether it seeds the port with `GetTeredoPort`
    /// (the same options as [`WatcherOptions`](crate::WatcherOptions)).
    #[must_use]
    pub const fn with_options(
        source: S,
        initial_notification: bool,
        seed_current_port: bool,
    ) -> Self {
        StaticTeredoWatcher {
            registry: Registry::new_inline(),
            source,
            phase: AtomicU8::new(STOPPED),
            handle: AtomicUsize::new(0),
            started_once: AtomicBool::new(false),
            initial_notification,
            seed_current_port,
        }
    }

    /// Registers for Teredo port changes (`NotifyTeredoPortChange`, with this `static` as
    /// the context), then seeds the port with `GetTeredoPort` if asked to. Subscribers added
    /// before this receive the initial notification and the seed's
    /// [`TeredoEvent::Snapshot`].
    ///
    /// # IRQL
    ///
    /// `PASSIVE_LEVEL` (what its undo, [`stop`](Self::stop), requires).
    ///
    /// # Errors
    ///
    /// [`Error::StaticWatcherBusy`] if it is registered or another thread is starting or
    /// stopping it; [`Error::IrqlTooHigh`]; the status of `NotifyTeredoPortChange`. Nothing
    /// is registered then.
    pub fn start(&'static self) -> Result<StartReport, Error> {
        irql::check::<S::Kernel>("StaticTeredoWatcher::start", IrqlBound::Passive)?;
        self.phase
            .compare_exchange(STOPPED, STARTING, Ordering::SeqCst, Ordering::SeqCst)
            .map_err(|_| Error::StaticWatcherBusy)?;
        let first = !self.started_once.swap(true, Ordering::SeqCst);
        // SAFETY: `self` is `'static`, so the registry never moves; this thread alone is in
        // `start` (it moved the phase to STARTING); `first` is true only for the first
        // start (the swap above).
        if let Err(e) = unsafe { self.registry.start(first) } {
            self.phase.store(STOPPED, Ordering::SeqCst);
            return Err(e);
        }
        let context = core::ptr::from_ref(&self.registry).cast_mut().cast();
        // SAFETY: `trampoline` reads the context as this registry, which lives in a
        // `'static` and is therefore valid for every call netio may ever make, cancelled or
        // not; the phase is STARTING, so no other thread registers it.
        let registered = unsafe {
            self.source.notify(
                trampoline::<S::Kernel, Inline<S::Kernel, N>>,
                context,
                self.initial_notification,
            )
        };
        match registered {
            Ok(handle) => {
                // INVARIANT: non-zero while RUNNING; written by the STARTING thread.
                self.handle.store(handle.get(), Ordering::SeqCst);
            }
            Err(e) => {
                self.phase.store(STOPPED, Ordering::SeqCst);
                return Err(e);
            }
        }
        let seed_error = if self.seed_current_port {
            self.seed().err()
        } else {
            None
        };
        self.phase.store(RUNNING, Ordering::SeqCst);
        Ok(StartReport { seed_error })
    }

    fn seed(&self) -> Result<(), Error> {
        // As the heap form: only a notification that sets the port meanwhile beats the seed.
        self.registry.begin_seed();
        match self.source.teredo_port() {
            Ok(port) => {
                self.registry.finish_seed(TeredoPort::new(port));
                Ok(())
            }
            Err(e) => {
                self.registry.finish_seed(None);
                Err(e)
            }
        }
    }

    /// Cancels the registration (`CancelMibChangeNotify2`, which waits for a callback in
    /// flight), then unsubscribes every subscriber and drops it; passive subscribers are
    /// drained first (a call in flight finishes, a queued work item runs as a no-op). Once
    /// this returns `Ok` nothing of the watcher runs or is queued, and it may be started
    /// again. A stopped watcher stops at once.
    ///
    /// # IRQL
    ///
    /// `PASSIVE_LEVEL`.
    ///
    /// # Errors
    ///
    /// - [`Error::CancelFromCallback`] inside a callback of this watcher (cancelling there
    ///   deadlocks), [`Error::IrqlTooHigh`], [`Error::StaticWatcherBusy`] while another
    ///   thread starts or stops it: nothing was done.
    /// - The status of `CancelMibChangeNotify2`: the registration is still live, and its
    ///   subscribers are silenced (no call of theirs starts after this returns). The
    ///   `static` stays valid for a late notification; the image must stay loaded. A later
    ///   `stop` tries the cancel again.
    pub fn stop(&'static self) -> Result<(), Error> {
        const OP: &str = "StaticTeredoWatcher::stop";
        if self.registry.delivering_on_current_thread() {
            return Err(Error::CancelFromCallback);
        }
        irql::check::<S::Kernel>(OP, IrqlBound::Passive)?;
        match self
            .phase
            .compare_exchange(RUNNING, STOPPING, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => {}
            Err(STOPPED) => return Ok(()),
            Err(_) => return Err(Error::StaticWatcherBusy),
        }
        let Some(handle) = RawHandle::new(self.handle.load(Ordering::SeqCst)) else {
            // Not reached: the handle is non-zero while RUNNING (type invariant).
            self.phase.store(RUNNING, Ordering::SeqCst);
            return Err(Error::StaticWatcherBusy);
        };
        // SAFETY: `handle` came from `notify` on this source and was not cancelled
        // successfully (it is cleared below when it is); this thread is not inside its
        // callback (checked above).
        if let Err(e) = unsafe { self.source.cancel(handle) } {
            self.registry.silence();
            self.phase.store(RUNNING, Ordering::SeqCst);
            return Err(e);
        }
        self.handle.store(0, Ordering::SeqCst);
        // No callback runs any more and none will (cancel waited); the subscribers go.
        let cleared = self.registry.clear_subscribers(OP);
        // INVARIANT: the handle is zero; the registry is idle.
        self.phase.store(STOPPED, Ordering::SeqCst);
        cleared
    }

    /// The port source it registers with.
    ///
    /// # IRQL
    ///
    /// Any.
    #[must_use]
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Whether the watcher is registered (between a successful `start` and a successful
    /// `stop`).
    ///
    /// # IRQL
    ///
    /// Any.
    #[must_use]
    pub fn is_running(&self) -> bool {
        matches!(self.phase.load(Ordering::SeqCst), RUNNING | STOPPING)
    }

    /// The last known Teredo port: one atomic load from the `static`; no lock, no
    /// allocation. `None` when the client is not known to run (or before `start`).
    ///
    /// # IRQL
    ///
    /// Any: the `static` is in the image's non-paged data.
    #[inline]
    #[must_use]
    pub fn current_port(&self) -> Option<TeredoPort> {
        self.registry.current_port()
    }

    /// The firewall exceptions for Teredo right now (see [`TeredoExceptions`]).
    ///
    /// # IRQL
    ///
    /// Any, as [`current_port`](Self::current_port).
    #[inline]
    #[must_use]
    pub fn exceptions(&self) -> TeredoExceptions {
        TeredoExceptions::for_port(self.current_port())
    }

    /// Adds a subscriber, as [`TeredoPortWatcher::subscribe`](crate::TeredoPortWatcher::subscribe).
    /// Before [`start`](Self::start) it receives the initial notification; a
    /// [`stop`](Self::stop) removes it.
    ///
    /// # IRQL
    ///
    /// `< DISPATCH_LEVEL`.
    ///
    /// # Errors
    ///
    /// [`Error::SubscriberTableFull`] (capacity `N`), [`Error::AllocationFailed`],
    /// [`Error::IrqlTooHigh`].
    pub fn subscribe<F>(&self, subscriber: F) -> Result<SubscriberId, Error>
    where
        F: FnMut(TeredoEvent) + Send + 'static,
    {
        irql::check::<S::Kernel>("StaticTeredoWatcher::subscribe", IrqlBound::BelowDispatch)?;
        self.registry.subscribe(subscriber, false)
    }

    /// Adds a subscriber called first with a [`TeredoEvent::Snapshot`], as
    /// [`TeredoPortWatcher::subscribe_with_snapshot`](crate::TeredoPortWatcher::subscribe_with_snapshot).
    ///
    /// # IRQL
    ///
    /// `< DISPATCH_LEVEL`; the snapshot call runs on this thread.
    ///
    /// # Errors
    ///
    /// As [`subscribe`](Self::subscribe).
    pub fn subscribe_with_snapshot<F>(&self, subscriber: F) -> Result<SubscriberId, Error>
    where
        F: FnMut(TeredoEvent) + Send + 'static,
    {
        irql::check::<S::Kernel>(
            "StaticTeredoWatcher::subscribe_with_snapshot",
            IrqlBound::BelowDispatch,
        )?;
        self.registry.subscribe(subscriber, true)
    }

    /// Adds a subscriber called at `PASSIVE_LEVEL` with the newest port, as
    /// [`TeredoPortWatcher::subscribe_passive`](crate::TeredoPortWatcher::subscribe_passive);
    /// [`stop`](Self::stop) drains and removes it.
    ///
    /// # IRQL
    ///
    /// `< DISPATCH_LEVEL`. The subscriber runs at `PASSIVE_LEVEL`.
    ///
    /// # Errors
    ///
    /// As [`subscribe`](Self::subscribe); [`Error::HandleTableClosed`] while a `stop` drains
    /// the passive subscribers.
    pub fn subscribe_passive<F>(
        &self,
        io_object: IoObject,
        subscriber: F,
    ) -> Result<SubscriberId, Error>
    where
        F: FnMut(Option<TeredoPort>) + Send + 'static,
    {
        irql::check::<S::Kernel>(
            "StaticTeredoWatcher::subscribe_passive",
            IrqlBound::BelowDispatch,
        )?;
        self.registry.subscribe_passive(io_object, subscriber)
    }

    /// Removes a subscriber, as
    /// [`TeredoPortWatcher::unsubscribe`](crate::TeredoPortWatcher::unsubscribe). Ids from
    /// before a `stop` are unknown afterwards.
    ///
    /// # IRQL
    ///
    /// `< DISPATCH_LEVEL`; from inside a subscriber callback of this watcher, any IRQL
    /// `<= DISPATCH_LEVEL`.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSubscriber`], [`Error::IrqlTooHigh`].
    pub fn unsubscribe(&self, id: SubscriberId) -> Result<(), Error> {
        self.registry.unsubscribe(id)
    }

    /// Counters: notifications, subscribers, capacity (`N`). Lock-free.
    ///
    /// # IRQL
    ///
    /// Any.
    #[must_use]
    pub fn stats(&self) -> RegistryStats {
        self.registry.stats()
    }
}

impl<S: PortSource, const N: usize> core::fmt::Debug for StaticTeredoWatcher<S, N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StaticTeredoWatcher")
            .field("running", &self.is_running())
            .field("current_port", &self.current_port())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
