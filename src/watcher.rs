//! The safe watcher: one OS registration, many subscribers, a lock-free current port.

use alloc::boxed::Box;
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;

use crate::alloc_util::try_box;
use crate::error::Error;
use crate::event::{TeredoEvent, TeredoPort};
use crate::handle_table::{EntryId, GiveUp, HandleTable};
use crate::irql::{self, IrqlBound};
use crate::passive::IoObject;
use crate::registry::{Registry, RegistryStats, SubscriberId};
use crate::source::PortSource;
use crate::teredo::TeredoExceptions;

/// How a watcher registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatcherOptions {
    /// Ask the OS for the initial notification (`InitialNotification = TRUE`): subscribers
    /// installed at creation receive [`TeredoEvent::Initial`] once registration completes.
    pub initial_notification: bool,
    /// Capacity of the subscriber table, allocated once at creation.
    pub max_subscribers: usize,
    /// After registering, read the port with `GetTeredoPort` so that
    /// [`current_port`](TeredoPortWatcher::current_port) is known before the first change.
    /// If it finds a port and no notification set one meanwhile, the subscribers installed so
    /// far receive it as [`TeredoEvent::Snapshot`] on the creating thread. A failure (client
    /// not started, no IPv6) leaves it `None` (see
    /// [`seed_error`](TeredoPortWatcher::seed_error)).
    pub seed_current_port: bool,
}

impl Default for WatcherOptions {
    fn default() -> Self {
        WatcherOptions {
            initial_notification: true,
            max_subscribers: 16,
            seed_current_port: true,
        }
    }
}

/// A registration for Teredo port changes (`NotifyTeredoPortChange`), its subscribers, and
/// the last known port.
///
/// - The context handed to the OS (the registry) is allocated and fully built, first
///   subscriber included, before the registration call: the initial notification may arrive
///   before `NotifyTeredoPortChange` returns.
/// - Dropping the watcher cancels the registration (`CancelMibChangeNotify2`, which waits
///   for a callback in flight), then frees the context. [`unregister`](Self::unregister)
///   does the same and returns the status.
/// - Whenever a cancel cannot be done or fails, the context is never freed while the OS may
///   use it: the handle stays in the [`HandleTable`], whose teardown cancels it and then
///   frees the context. `mem::forget` on a watcher leaks the context (the teardown still
///   cancels the registration). Nothing ever dangles.
///
/// # Cancelling from inside a callback
///
/// `CancelMibChangeNotify2` from the thread running the same registration's callback
/// deadlocks. The watcher detects it: [`unregister`](Self::unregister) returns
/// [`Error::CancelFromCallback`] without cancelling (the registration is leaked to the handle
/// table), and so does `Drop` (silently). Unsubscribing from inside a callback is fine.
///
/// # IRQL
///
/// | method | IRQL |
/// |---|---|
/// | [`new`](Self::new), [`with_subscriber`](Self::with_subscriber) | `PASSIVE_LEVEL` (stricter than netio's `< DISPATCH_LEVEL`: see [`new`](Self::new)) |
/// | [`current_port`](Self::current_port), [`exceptions`](Self::exceptions), [`stats`](Self::stats) | `<= DISPATCH_LEVEL` |
/// | [`query_port`](Self::query_port), [`subscribe`](Self::subscribe), [`subscribe_with_snapshot`](Self::subscribe_with_snapshot), [`subscribe_passive`](Self::subscribe_passive) | `< DISPATCH_LEVEL` |
/// | [`unsubscribe`](Self::unsubscribe) | `< DISPATCH_LEVEL`; `<= DISPATCH_LEVEL` inside a callback |
/// | [`unregister`](Self::unregister), `Drop` | `PASSIVE_LEVEL` |
///
/// Subscribers run at the IRQL of the OS callback (`<= DISPATCH_LEVEL`), or for a
/// snapshot at the subscribing thread's. Write them for `DISPATCH_LEVEL`. Passive
/// subscribers run at `PASSIVE_LEVEL` on a system worker thread.
///
/// Dropping the watcher or [`unregister`](Self::unregister) waits, after the cancel, for the
/// passive subscribers' work items (a call in flight finishes, a queued one runs as a
/// no-op), except for one whose call runs the drop itself. On an error the passive
/// subscribers are closed (no call of theirs starts after it returns; one already running
/// on a worker thread finishes).
///
/// # Invariants
///
/// `registry` is a `Box<Registry<K>>` turned into a raw pointer, registered with the OS as
/// the `entry` of `table`; it is freed only after `table.release(entry)` returned `Ok`.
#[must_use = "dropping the watcher cancels the registration"]
pub struct TeredoPortWatcher<'t, S: PortSource> {
    table: &'t HandleTable<S>,
    entry: EntryId,
    registry: NonNull<Registry<S::Kernel>>,
    seed_error: Option<Error>,
    _owns: PhantomData<Registry<S::Kernel>>,
}

// SAFETY: the watcher shares `&HandleTable<S>` (Sync when `S: Sync`, a supertrait of
// `PortSource`) and owns a `Registry`, which is `Send + Sync`.
unsafe impl<S: PortSource> Send for TeredoPortWatcher<'_, S> {}
// SAFETY: every `&self` method is safe to call concurrently (atomics and the spin lock).
unsafe impl<S: PortSource> Sync for TeredoPortWatcher<'_, S> {}

impl<'t, S: PortSource> TeredoPortWatcher<'t, S> {
    /// Registers for Teredo port changes.
    ///
    /// # IRQL
    ///
    /// `PASSIVE_LEVEL`. `NotifyTeredoPortChange` itself allows `APC_LEVEL`, but cancelling
    /// needs `PASSIVE_LEVEL`: a watcher created at `APC_LEVEL` could not be undone by the
    /// failure path right after it (a driver's rollback), leaving a live registration into
    /// an image about to unload. So creation requires the level its undo requires.
    ///
    /// # Errors
    ///
    /// The status of `NotifyTeredoPortChange`, [`Error::IrqlTooHigh`],
    /// [`Error::AllocationFailed`], [`Error::HandleTableFull`] or
    /// [`Error::HandleTableClosed`]. Nothing is left registered or allocated.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[cfg(feature = "mock")] {
    /// use teredo_watcher::mock::MockNetio;
    /// use teredo_watcher::{HandleTable, TeredoPortWatcher, WatcherOptions};
    ///
    /// let netio = MockNetio::new();
    /// let running = netio.client().start();
    /// let table = HandleTable::new(netio.clone());
    /// let watcher = TeredoPortWatcher::new(&table, WatcherOptions::default())?;
    /// // Seeded with GetTeredoPort: known before the first change.
    /// assert_eq!(watcher.current_port().map(|p| p.get()), Some(running));
    /// assert_eq!(watcher.seed_error(), None);
    /// watcher.unregister()?;
    /// # }
    /// # Ok::<(), teredo_watcher::Error>(())
    /// ```
    pub fn new(table: &'t HandleTable<S>, options: WatcherOptions) -> Result<Self, Error> {
        Self::create(table, options, None::<fn(TeredoEvent)>).map(|(w, _)| w)
    }

    /// Registers with `subscriber` installed before the registration call, so it receives
    /// the initial notification, the seed's [`TeredoEvent::Snapshot`] when the client already
    /// runs (with the default options), and every change: keeping a firewall exception equal
    /// to [`event.port()`](TeredoEvent::port) on each event is correct from the first one.
    ///
    /// # IRQL
    ///
    /// `PASSIVE_LEVEL`, as [`new`](Self::new).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new), plus [`Error::SubscriberTableFull`] for a zero capacity.
    pub fn with_subscriber<F>(
        table: &'t HandleTable<S>,
        options: WatcherOptions,
        subscriber: F,
    ) -> Result<(Self, SubscriberId), Error>
    where
        F: FnMut(TeredoEvent) + Send + 'static,
    {
        match Self::create(table, options, Some(subscriber))? {
            (watcher, Some(id)) => Ok((watcher, id)),
            // `create` always installs a given subscriber; kept total rather than panicking.
            (_, None) => Err(Error::UnknownSubscriber),
        }
    }

    fn create<F>(
        table: &'t HandleTable<S>,
        options: WatcherOptions,
        first: Option<F>,
    ) -> Result<(Self, Option<SubscriberId>), Error>
    where
        F: FnMut(TeredoEvent) + Send + 'static,
    {
        // PASSIVE_LEVEL, not netio's `< DISPATCH_LEVEL`: what is created here must be undoable
        // here (see `new`).
        irql::check::<S::Kernel>("TeredoPortWatcher::new", IrqlBound::Passive)?;
        let registry = Registry::<S::Kernel>::new(options.max_subscribers)?;
        let first_id = match first {
            Some(f) => Some(registry.subscribe(f, false)?),
            None => None,
        };
        let registry = NonNull::from(Box::leak(try_box(registry)?));
        // SAFETY: the registry is freed below only if registration failed without leaving it
        // in use, and otherwise only after `release` returns Ok (type invariant); we are at
        // PASSIVE_LEVEL (checked above).
        match unsafe { table.register(registry, options.initial_notification) } {
            Ok(entry) => {
                // INVARIANT: the registry is registered as `entry` and owned by the watcher.
                let mut watcher = TeredoPortWatcher {
                    table,
                    entry,
                    registry,
                    seed_error: None,
                    _owns: PhantomData,
                };
                if options.seed_current_port {
                    watcher.seed_error = watcher.seed().err();
                }
                Ok((watcher, first_id))
            }
            Err((error, maybe_in_use)) => {
                // SAFETY: the registry came from `Box::leak` above and is alive.
                let registry_ref = unsafe { registry.as_ref() };
                // Whatever the OS still does with it, no subscriber is called any more.
                registry_ref.silence();
                if !maybe_in_use {
                    // SAFETY: the OS refused the registration, so nothing else refers to
                    // the registry; it came from `Box::leak` above.
                    drop(unsafe { Box::from_raw(registry.as_ptr()) });
                }
                Err(error)
            }
        }
    }

    fn registry(&self) -> &Registry<S::Kernel> {
        // SAFETY: by the type invariant the registry lives as long as the watcher.
        unsafe { self.registry.as_ref() }
    }

    fn seed(&self) -> Result<(), Error> {
        // Only a notification that sets the port between these two calls beats the seed
        // (it is newer); the initial notification or an unknown type does not.
        self.registry().begin_seed();
        match self.table.source().teredo_port() {
            Ok(port) => {
                self.registry().finish_seed(TeredoPort::new(port));
                Ok(())
            }
            Err(e) => {
                self.registry().finish_seed(None);
                Err(e)
            }
        }
    }

    /// Why seeding the port with `GetTeredoPort` at creation failed, if it did (with its raw
    /// status): for instance [`Error::TeredoNotStarted`]. Creation does not fail for it;
    /// [`current_port`](Self::current_port) is then `None` until the first notification.
    ///
    /// # IRQL
    ///
    /// Any.
    #[must_use]
    pub fn seed_error(&self) -> Option<Error> {
        self.seed_error
    }

    /// The last known Teredo port: from the last notification, or from `GetTeredoPort` at
    /// creation. One atomic load; no lock, no allocation. `None` when the client is not known
    /// to run.
    ///
    /// # IRQL
    ///
    /// Any (a WFP classify function may call it for every packet): one atomic load of the
    /// registry, which lives in non-paged memory as every allocation of a kernel global
    /// allocator such as `wdk-alloc` does.
    #[inline]
    #[must_use]
    pub fn current_port(&self) -> Option<TeredoPort> {
        self.registry().current_port()
    }

    /// The firewall exceptions for Teredo right now (see [`TeredoExceptions`]): the rules a
    /// filter set is built from ([`TeredoExceptions::rules`]) and the per-packet check of a
    /// classify function ([`TeredoExceptions::allows`]).
    ///
    /// # IRQL
    ///
    /// Any, as [`current_port`](Self::current_port).
    #[inline]
    #[must_use]
    pub fn exceptions(&self) -> TeredoExceptions {
        TeredoExceptions::for_port(self.current_port())
    }

    /// `GetTeredoPort`: asks netio for the port now.
    ///
    /// # IRQL
    ///
    /// `< DISPATCH_LEVEL`.
    ///
    /// # Errors
    ///
    /// See [`HandleTable::query_port`].
    pub fn query_port(&self) -> Result<Option<TeredoPort>, Error> {
        self.table.query_port()
    }

    /// Adds a subscriber, called for every notification from now on, in OS order, never
    /// twice at once.
    ///
    /// # IRQL
    ///
    /// `< DISPATCH_LEVEL`.
    ///
    /// # Errors
    ///
    /// [`Error::SubscriberTableFull`], [`Error::AllocationFailed`], [`Error::IrqlTooHigh`].
    ///
    /// # Examples
    ///
    /// ```
    /// # #[cfg(feature = "mock")] {
    /// use std::sync::{Arc, Mutex};
    /// use teredo_watcher::mock::MockNetio;
    /// use teredo_watcher::{HandleTable, TeredoEvent, TeredoPortWatcher, WatcherOptions};
    ///
    /// let netio = MockNetio::new();
    /// let table = HandleTable::new(netio.clone());
    /// let watcher = TeredoPortWatcher::new(&table, WatcherOptions::default())?;
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let log = Arc::clone(&seen);
    /// let id = watcher.subscribe(move |e: TeredoEvent| log.lock().unwrap().push(e.port()))?;
    /// let port = netio.client().start();
    /// netio.wait_idle();
    /// // Unsubscribed: never called again once this returns.
    /// watcher.unsubscribe(id)?;
    /// netio.client().restart();
    /// netio.wait_idle();
    /// assert_eq!(seen.lock().unwrap().iter().map(|p| p.map(|p| p.get())).collect::<Vec<_>>(),
    ///            [Some(port)]);
    /// # }
    /// # Ok::<(), teredo_watcher::Error>(())
    /// ```
    pub fn subscribe<F>(&self, subscriber: F) -> Result<SubscriberId, Error>
    where
        F: FnMut(TeredoEvent) + Send + 'static,
    {
        irql::check::<S::Kernel>("TeredoPortWatcher::subscribe", IrqlBound::BelowDispatch)?;
        self.registry().subscribe(subscriber, false)
    }

    /// Adds a subscriber and first calls it with [`TeredoEvent::Snapshot`] of the current
    /// state, in order with concurrent notifications: it never sees an older port after a
    /// newer one. If notifications race the subscription, the subscriber gets a second
    /// snapshot with the newer state instead of those notifications.
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
            "TeredoPortWatcher::subscribe_with_snapshot",
            IrqlBound::BelowDispatch,
        )?;
        self.registry().subscribe(subscriber, true)
    }

    /// Adds a subscriber that is called at `PASSIVE_LEVEL`, on a system worker thread, with
    /// the newest port: first the port at subscription, then after each notification the
    /// port after it ([`event.port()`](TeredoEvent::port)). It may call anything that needs
    /// `PASSIVE_LEVEL`, such as the filter engine's management functions.
    ///
    /// - Bursts coalesce: at most one work item per subscriber is queued at a time; a burst
    ///   of changes yields calls whose ports are in notification order, ending on the newest,
    ///   never an older port after a newer one; a call with the same port as the previous
    ///   call is skipped (the subscriber sees the state, not every event).
    /// - Calls are serialized, never two at once.
    /// - None starts after [`unsubscribe`](Self::unsubscribe) of it, the watcher's drop or
    ///   [`unregister`](Self::unregister), or [`HandleTable::teardown`] returned: they wait
    ///   for a call in flight, and a queued work item (which cannot be dequeued) runs to
    ///   completion as a no-op before they return. Where they cannot wait (at
    ///   `DISPATCH_LEVEL`, inside a notification callback of this watcher, or inside this
    ///   subscriber's own call), only new calls are stopped; see
    ///   [`unsubscribe`](Self::unsubscribe).
    /// - The notification path only stores the port and queues the work item (or marks it
    ///   dirty): no allocation, wait or panic there. Everything is allocated here.
    ///
    /// The work item is made on `io_object` with `IoInitializeWorkItem` and queued with
    /// `IoQueueWorkItemEx`: while it is queued or running, the I/O manager keeps the driver
    /// object referenced, so the image stays loaded under a routine still returning. Design
    /// and proof: the `passive` module's documentation in the source.
    ///
    /// Do not wait, inside one passive subscriber's call, for another passive subscriber
    /// that waits for it (unsubscribing each other from each other's calls deadlocks, as
    /// two locks taken in opposite orders would).
    ///
    /// # IRQL
    ///
    /// `< DISPATCH_LEVEL`. The subscriber runs at `PASSIVE_LEVEL`.
    ///
    /// # Errors
    ///
    /// [`Error::SubscriberTableFull`], [`Error::AllocationFailed`], [`Error::IrqlTooHigh`],
    /// [`Error::HandleTableClosed`] once the teardown has cancelled this watcher's
    /// registration. Nothing is left allocated or queued on error.
    ///
    /// # Examples
    ///
    /// On the host mock any non-null address stands for the driver object; a driver passes
    /// its `DRIVER_OBJECT`.
    ///
    /// ```
    /// # #[cfg(feature = "mock")] {
    /// use std::sync::{Arc, Mutex};
    /// use teredo_watcher::mock::MockNetio;
    /// use teredo_watcher::{HandleTable, IoObject, TeredoPortWatcher, WatcherOptions};
    ///
    /// static DRIVER_OBJECT: u8 = 0;
    /// // SAFETY: on the mock the object is never dereferenced, and a static outlives
    /// // every watcher.
    /// let driver = unsafe { IoObject::from_raw((&raw const DRIVER_OBJECT).cast_mut().cast()) }
    ///     .expect("non-null");
    /// let netio = MockNetio::new();
    /// let table = HandleTable::new(netio.clone());
    /// let watcher = TeredoPortWatcher::new(&table, WatcherOptions::default())?;
    /// let filter = Arc::new(Mutex::new(None));
    /// let f = Arc::clone(&filter);
    /// // At PASSIVE_LEVEL, on a worker thread: where WFP filters may be changed.
    /// watcher.subscribe_passive(driver, move |port| *f.lock().unwrap() = port)?;
    /// let port = netio.client().start();
    /// // The call comes soon after, on the worker thread.
    /// let start = std::time::Instant::now();
    /// while filter.lock().unwrap().is_none() && start.elapsed().as_secs() < 20 {
    ///     std::thread::yield_now();
    /// }
    /// assert_eq!(filter.lock().unwrap().map(|p| p.get()), Some(port));
    /// // Waits for a call in flight; a queued one runs as a no-op; none starts afterwards.
    /// drop(watcher);
    /// # }
    /// # Ok::<(), teredo_watcher::Error>(())
    /// ```
    pub fn subscribe_passive<F>(
        &self,
        io_object: IoObject,
        subscriber: F,
    ) -> Result<SubscriberId, Error>
    where
        F: FnMut(Option<TeredoPort>) + Send + 'static,
    {
        irql::check::<S::Kernel>(
            "TeredoPortWatcher::subscribe_passive",
            IrqlBound::BelowDispatch,
        )?;
        self.registry().subscribe_passive(io_object, subscriber)
    }

    /// Removes a subscriber. Once this returns `Ok`, it is not running and is never called
    /// again; it is dropped here (or, when called from inside a callback, by a later call).
    ///
    /// For a passive subscriber ([`subscribe_passive`](Self::subscribe_passive)) this also
    /// waits for its work item: a call in flight finishes and a queued one runs as a no-op
    /// before this returns. Where that wait is impossible (at `DISPATCH_LEVEL`, inside a
    /// notification callback of this watcher, or inside the subscriber's own call), this
    /// only stops new calls: a call in flight on the worker thread may still be running when
    /// it returns, a queued item runs later as a no-op, and the closure is dropped by the
    /// next [`subscribe_passive`](Self::subscribe_passive) once idle, the watcher's drop or
    /// the teardown (which wait for it).
    ///
    /// # IRQL
    ///
    /// `< DISPATCH_LEVEL` (it may wait for a callback in flight on another thread); from
    /// inside a subscriber callback of this watcher, any IRQL `<= DISPATCH_LEVEL`.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSubscriber`], [`Error::IrqlTooHigh`].
    pub fn unsubscribe(&self, id: SubscriberId) -> Result<(), Error> {
        self.registry().unsubscribe(id)
    }

    /// Counters: notifications, subscribers, capacity. Lock-free.
    ///
    /// # IRQL
    ///
    /// Any.
    #[must_use]
    pub fn stats(&self) -> RegistryStats {
        self.registry().stats()
    }

    /// Cancels the registration and frees the watcher, returning the status.
    ///
    /// # IRQL
    ///
    /// `PASSIVE_LEVEL`.
    ///
    /// # Errors
    ///
    /// [`Error::CancelFromCallback`], [`Error::IrqlTooHigh`], or the status of
    /// `CancelMibChangeNotify2`. On any error the subscribers are silenced at once (no call
    /// of them starts after this returns; one already running on another thread finishes),
    /// and the context is not freed here while the OS may use it: the handle stays in the
    /// table, whose teardown cancels it and then frees the context with the subscribers.
    /// If the teardown had already cancelled it, the context is freed here, unless this runs
    /// inside its own callback or at `DISPATCH_LEVEL` (then by the next teardown). Above
    /// `DISPATCH_LEVEL` the table's lock cannot be taken: the context is silenced and
    /// orphaned without it and may be leaked, never freed while in use.
    pub fn unregister(self) -> Result<(), Error> {
        let mut this = ManuallyDrop::new(self);
        this.release()
    }

    fn release(&mut self) -> Result<(), Error> {
        let in_callback = self.registry().delivering_on_current_thread();
        let early = if in_callback {
            Err(Error::CancelFromCallback)
        } else {
            irql::check::<S::Kernel>("TeredoPortWatcher::unregister", IrqlBound::Passive)
        };
        if let Err(e) = early {
            // The callers (`unregister`, `Drop`) never use the watcher again: silence the
            // subscribers now, at any IRQL, then give the registry to the table.
            self.registry().silence();
            // Freed here only where user destructors may run: not inside a callback of it,
            // not at DISPATCH_LEVEL (then the next teardown frees it).
            let may_free = !in_callback
                && <S::Kernel as crate::Kernel>::current_irql() < crate::Irql::DISPATCH_LEVEL;
            match self.table.give_up(self.entry, may_free) {
                GiveUp::Freed(registry) => {
                    // SAFETY: `give_up` freed the entry of a registration the teardown had
                    // cancelled, so the OS no longer uses the registry and no callback of it
                    // runs (cancel waited), and this thread is not inside one (`may_free`);
                    // it came from `Box::leak` (type invariant) and is freed once, here.
                    drop(unsafe { Box::from_raw(registry.as_ptr()) });
                }
                // Orphaned under the lock: from the moment the lock was released, a teardown
                // may free the registry, so this thread never touches it again.
                GiveUp::GivenUp => {}
                GiveUp::LockRefused => {
                    // Above DISPATCH_LEVEL: orphaned without the lock, as this thread's last
                    // access (a teardown that already passed the entry leaves it allocated:
                    // a leak, never a dangling pointer).
                    self.registry().orphan();
                }
            }
            return Err(e);
        }
        // On failure `release` silenced and orphaned the registry under the table's lock.
        self.table.release(self.entry)?;
        // SAFETY: `release` returned Ok, so the OS no longer uses the registry and no
        // callback is running (cancel waits); it came from `Box::leak` (type invariant) and
        // is freed once, here, since `self` is not used again.
        drop(unsafe { Box::from_raw(self.registry.as_ptr()) });
        Ok(())
    }
}

impl<S: PortSource> Drop for TeredoPortWatcher<'_, S> {
    /// Best effort: see [`unregister`](TeredoPortWatcher::unregister) for the status.
    fn drop(&mut self) {
        let _ = self.release();
    }
}

impl<S: PortSource> core::fmt::Debug for TeredoPortWatcher<'_, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TeredoPortWatcher")
            .field("current_port", &self.registry().current_port())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
