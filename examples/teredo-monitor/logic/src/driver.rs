//! The driver itself, shared by every platform: its state, the bodies of `DriverEntry` and
//! `DriverUnload`, and the notification handling.
//!
//! Generic over the library's [`PortSource`]: the Windows build instantiates it with the
//! real netio (`teredo_watcher::nt::NetioPortSource`), the host demo and the tests with
//! `teredo_watcher::mock::MockNetio`. Nothing here names a platform crate; output goes
//! through `log!`.
//!
//! # Lifecycle
//!
//! ```text
//! driver_entry:  register (with the event logger, initial notification)
//!             -> subscribe the exception tracker (snapshot first; from then on it
//!                publishes every applied set in the AppliedExceptions word classify reads)
//!             -> with a firewall: open the filter engine (dynamic session) and commit the
//!                filters in one transaction (crate::firewall), then subscribe the
//!                FirewallManager at PASSIVE_LEVEL (a work item on the driver object)
//!             -> move the state into the DriverSlot          => STATUS_SUCCESS
//!   a failing step undoes the steps before it (the filters and the engine, then the
//!   registration) and returns its status; the platform sets DriverUnload only on success.
//! driver_unload: take the state out of the slot
//!                -> unsubscribe the firewall's PASSIVE_LEVEL subscriber (waits for a
//!                   running call, a queued one runs as a no-op): its manager is dropped,
//!                   which deletes the filters in one transaction and closes the engine
//!                -> cancel the registration (waits for a callback in flight) -> free it
//!                -> tear the handle table down
//!                -> AppliedExceptions back to "not loaded"
//!                -> if a registration could not be cancelled: keep the image loaded
//! ```
//!
//! # Why this order at unload
//!
//! - **The work item first.** The filter manager is owned by the passive subscriber's
//!   closure, and only its calls touch the engine handle. Unsubscribing waits for a call in
//!   flight and lets a queued item run as a no-op, so after it no transaction of a port
//!   change can start, run or race the removal, and no work item of ours is left queued.
//! - **Then the filters and the engine.** Dropping the closure drops the manager, the
//!   handle's only owner: its last use is the removal transaction, then the close. Removing
//!   the firewall before cancelling the Teredo registration means that the block policy is
//!   never committed while the exceptions no longer follow the port: cancelling first would
//!   leave a window in which a port change is not followed and the new port's traffic is
//!   blocked.
//! - **Then the registration, then the table.** As without a firewall: no callback runs
//!   after the cancel, and the teardown cancels whatever is left.
//!
//! If the subscriber cannot be waited for (`DriverUnload` inside a notification callback of
//! its own registration), only new calls are stopped and the library drops the closure, so
//! removes the filters, at the table's teardown.
//!
//! # A registration that cannot be cancelled
//!
//! `DriverUnload` cannot refuse the unload, and netio may still call a registration whose
//! cancel failed: into this image, with a context the library therefore never frees. The
//! I/O manager does not unload an image while its driver object is referenced ("A driver
//! will not unload if there is a leaked reference to `DeviceObject` or `DriverObject`",
//! Microsoft's "Debugging a Failed Driver Unload"), so when the teardown is not clean
//! [`driver_unload`] says so ([`UnloadReport::keep_image_loaded`]) and the platform takes a
//! reference on its driver object (`ObReferenceObject`, `<= DISPATCH_LEVEL`) that it never
//! drops: a late notification then runs mapped code, and the library's silenced
//! subscribers do nothing. The price is an image that stays in memory until reboot.

use alloc::boxed::Box;
use core::fmt;

use teredo_watcher::{
    Error, HandleTable, IoObject, Irql, Kernel, PortSource, SubscriberId, TeardownReport,
    TeredoEvent, TeredoExceptions, TeredoPort, TeredoPortWatcher, WatcherOptions,
};

use crate::exceptions::{AppliedExceptions, ExceptionChange, ExceptionTracker, event_name};
use crate::firewall::{FilterEngine, FirewallManager};
use crate::log::{Line, LogText, Port};
use crate::slot::DriverSlot;
use crate::status::NtStatus;

/// How the driver registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverConfig {
    /// Subscriber capacity of the watcher. The driver installs three (the event logger, the
    /// exception tracker and, with a firewall, the filter manager at `PASSIVE_LEVEL`); a
    /// smaller value makes a later step of `DriverEntry` fail, which the tests use to
    /// exercise the rollback.
    pub max_subscribers: usize,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig { max_subscribers: 3 }
    }
}

impl DriverConfig {
    fn watcher_options(self) -> WatcherOptions {
        WatcherOptions {
            initial_notification: true,
            max_subscribers: self.max_subscribers,
            seed_current_port: true,
        }
    }
}

/// The firewall part of the driver: the filter engine to program, and the object its
/// `PASSIVE_LEVEL` work items are made on (the driver object).
#[derive(Debug)]
pub struct Firewall<E: FilterEngine> {
    /// The filter engine (`WfpEngine` in the driver, `MockFilterEngine` on the host).
    pub engine: E,
    /// The driver object (a work item made on it keeps the image loaded while queued).
    pub io_object: IoObject,
}

/// The driver's state while it is loaded: its registration for Teredo port changes, and the
/// firewall's subscriber.
///
/// Lives in one [`DriverSlot`] from the end of `DriverEntry` to `DriverUnload`. The
/// subscribers own their own state (the event counter, the [`ExceptionTracker`], the
/// [`FirewallManager`]), so callbacks and work items never touch the slot.
pub struct TeredoMonitor<'t, S: PortSource> {
    watcher: TeredoPortWatcher<'t, S>,
    /// The `PASSIVE_LEVEL` subscriber that owns the [`FirewallManager`], with a firewall.
    firewall: Option<SubscriberId>,
}

impl<S: PortSource> TeredoMonitor<'_, S> {
    /// The exceptions a classify function should allow now: one atomic load, no lock.
    ///
    /// # IRQL
    ///
    /// `<= DISPATCH_LEVEL`.
    #[must_use]
    pub fn exceptions(&self) -> TeredoExceptions {
        self.watcher.exceptions()
    }
}

impl<S: PortSource> fmt::Debug for TeredoMonitor<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TeredoMonitor")
            .field("watcher", &self.watcher)
            .field("firewall", &self.firewall)
            .finish()
    }
}

/// The steps of `DriverEntry`, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryStep {
    /// `NotifyTeredoPortChange` with the event logger installed first.
    Register,
    /// The exception tracker subscribes (and gets a snapshot of the current port).
    SubscribeExceptions,
    /// With a firewall: the filter engine is opened and the filters committed in one
    /// transaction.
    InstallFilters,
    /// With a firewall: the filter manager subscribes at `PASSIVE_LEVEL`.
    SubscribeFirewall,
    /// The state moves into the driver's slot.
    StoreState,
}

impl EntryStep {
    /// The step as the log names it.
    #[must_use]
    pub const fn describe(self) -> &'static str {
        match self {
            EntryStep::Register => "step 1/3 (register: NotifyTeredoPortChange)",
            EntryStep::SubscribeExceptions => "step 2/3 (subscribe the exception tracker)",
            EntryStep::InstallFilters => {
                "firewall 1/2 (open the filter engine, commit the filters in one transaction)"
            }
            EntryStep::SubscribeFirewall => {
                "firewall 2/2 (subscribe the filter manager at PASSIVE_LEVEL)"
            }
            EntryStep::StoreState => "step 3/3 (store the driver state)",
        }
    }
}

impl LogText for EntryStep {
    fn write_to(&self, line: &mut Line) {
        line.push_str(self.describe());
    }
}

impl fmt::Display for EntryStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// The IRQL of the calling thread, from the port source's kernel (`NtKernel` in the driver,
/// `MockKernel` on the host).
fn irql<S: PortSource>() -> Irql {
    <S::Kernel as Kernel>::current_irql()
}

/// The event logger, installed before registration so it sees the initial notification.
/// Runs at the IRQL of the OS callback (`<= DISPATCH_LEVEL`): no allocation, no wait.
fn event_logger<K: Kernel>() -> impl FnMut(TeredoEvent) + Send + 'static {
    let mut seen: u32 = 0;
    move |event| {
        seen = seen.saturating_add(1);
        log!(
            "event #",
            seen,
            ": ",
            event_name(&event),
            " port=",
            Port(event.port()),
            " at ",
            K::current_irql()
        );
    }
}

/// The exception tracker: applies each event to the exception set, publishes the set for
/// classify ([`AppliedExceptions::publish`]) and logs it. Same IRQL rules as
/// [`event_logger`].
fn exception_subscriber(
    published: &'static AppliedExceptions,
) -> impl FnMut(TeredoEvent) + Send + 'static {
    let mut tracker = ExceptionTracker::new();
    move |event| {
        let change = tracker.update(event);
        published.publish(tracker.applied());
        if let TeredoEvent::Snapshot { port } = event {
            log!(
                "  exception tracker subscribed (snapshot port=",
                Port(port),
                "): {",
                tracker.applied(),
                "}"
            );
            return;
        }
        match change {
            ExceptionChange::Updated { opened, closed } => log!(
                "  exceptions updated (open ",
                Port(opened),
                ", close ",
                Port(closed),
                "): {",
                tracker.applied(),
                "}"
            ),
            ExceptionChange::Unchanged => {
                log!("  exceptions unchanged: {", tracker.applied(), "}");
            }
        }
    }
}

/// The firewall's `PASSIVE_LEVEL` subscriber: owns the [`FirewallManager`] and makes its
/// dynamic-port filters follow each port it is called with (the newest, coalesced). Runs on
/// a system worker thread at `PASSIVE_LEVEL`, serialized. Dropping it (unsubscribe, the
/// watcher's release, the table's teardown) drops the manager, which removes the filters and
/// closes the engine.
fn firewall_subscriber<K: Kernel, E: FilterEngine>(
    mut manager: FirewallManager<E>,
) -> impl FnMut(Option<TeredoPort>) + Send + 'static {
    move |port| {
        log!(
            "  firewall subscriber at ",
            K::current_irql(),
            ": port ",
            Port(port),
            " (committed ",
            Port(manager.committed_port()),
            ")"
        );
        // `set_port` logs its outcome; a failure is retried by the next call.
        let _ = manager.set_port(port);
    }
}

/// Moves `value` to the heap, or gives it back when the allocation fails (a driver must
/// return a status, not abort).
fn try_box<T>(value: T) -> Result<Box<T>, T> {
    let layout = core::alloc::Layout::new::<T>();
    if layout.size() == 0 {
        // A zero-sized box does not allocate.
        return Ok(Box::new(value));
    }
    // SAFETY: the layout has a non-zero size (checked above).
    let raw = unsafe { alloc::alloc::alloc(layout) }.cast::<T>();
    if raw.is_null() {
        return Err(value);
    }
    // SAFETY: `raw` is a fresh, non-null allocation of `Layout::new::<T>()`, so it is valid
    // and aligned for a write of one `T`.
    unsafe { raw.write(value) };
    // SAFETY: `raw` was allocated by the global allocator with the layout of `T` and holds an
    // initialized `T`: what `Box::from_raw` requires; nothing else refers to it.
    Ok(unsafe { Box::from_raw(raw) })
}

/// Cancels the registration made by a `DriverEntry` that fails later, and makes sure
/// nothing it registered is left: the firewall's subscriber first (dropping it removes the
/// filters and closes the engine), then the registration; if the cancel itself fails, the
/// handle table's teardown cancels what is left (the image is about to be unloaded).
fn roll_back<S: PortSource>(
    table: &HandleTable<S>,
    watcher: TeredoPortWatcher<'_, S>,
    firewall: Option<SubscriberId>,
) {
    if let Some(id) = firewall
        && let Err(error) = watcher.unsubscribe(id)
    {
        log!(
            "  rollback: unsubscribing the filter manager failed (",
            error,
            "); the cancel below drops it"
        );
    }
    match watcher.unregister() {
        Ok(()) => log!("  rolled back: registration cancelled"),
        Err(error) => {
            log!(
                "  rollback: cancel failed (",
                error,
                "); tearing the handle table down"
            );
            match table.teardown() {
                Ok(report) => log!(
                    "  rollback: teardown cancelled ",
                    report.cancelled,
                    ", failed ",
                    report.failed
                ),
                Err(error) => log!("  rollback: teardown refused: ", error),
            }
        }
    }
}

/// The steps of `DriverEntry` up to a complete state (see the module documentation).
fn load<'t, S: PortSource, E: FilterEngine>(
    table: &'t HandleTable<S>,
    published: &'static AppliedExceptions,
    config: DriverConfig,
    firewall: Option<Firewall<E>>,
) -> Result<TeredoMonitor<'t, S>, (EntryStep, NtStatus)> {
    let failed = |step: EntryStep, error: &Error| {
        let status = NtStatus::from_error(error);
        log!(
            "DriverEntry: ",
            step,
            " failed: ",
            *error,
            " (status ",
            status,
            ")"
        );
        (step, status)
    };

    // Step 1. A failed registration leaves nothing registered or allocated (library
    // guarantee), so there is nothing to undo.
    let (watcher, _logger) = TeredoPortWatcher::with_subscriber(
        table,
        config.watcher_options(),
        event_logger::<S::Kernel>(),
    )
    .map_err(|e| failed(EntryStep::Register, &e))?;
    log!(
        "DriverEntry: registered; GetTeredoPort seeded port=",
        Port(watcher.current_port())
    );
    if let Some(error) = watcher.seed_error() {
        // Not a failure of DriverEntry: the port is learnt from the next notification.
        log!("DriverEntry: the seed failed: ", error);
    }

    // Step 2. Undo: cancel the registration.
    if let Err(error) = watcher.subscribe_with_snapshot(exception_subscriber(published)) {
        let failure = failed(EntryStep::SubscribeExceptions, &error);
        roll_back(table, watcher, None);
        published.clear();
        return Err(failure);
    }

    let Some(Firewall { engine, io_object }) = firewall else {
        return Ok(TeredoMonitor {
            watcher,
            firewall: None,
        });
    };

    // Firewall 1/2. A failed install leaves nothing in the engine (it aborts and closes);
    // undo: cancel the registration.
    let port = watcher.current_port();
    log!(
        "DriverEntry: ",
        EntryStep::InstallFilters,
        " for the dynamic port ",
        Port(port)
    );
    let manager = match FirewallManager::install(engine, port) {
        Ok(manager) => manager,
        Err(error) => {
            let status = error.nt_status();
            log!(
                "DriverEntry: ",
                EntryStep::InstallFilters,
                " failed: ",
                error,
                " (status ",
                status,
                "); transaction aborted, engine closed"
            );
            roll_back(table, watcher, None);
            published.clear();
            return Err((EntryStep::InstallFilters, status));
        }
    };

    // Firewall 2/2. On failure the library drops the closure, so the manager: the filters
    // are deleted and the engine closed. Undo: cancel the registration.
    match watcher.subscribe_passive(io_object, firewall_subscriber::<S::Kernel, E>(manager)) {
        Ok(id) => Ok(TeredoMonitor {
            watcher,
            firewall: Some(id),
        }),
        Err(error) => {
            let failure = failed(EntryStep::SubscribeFirewall, &error);
            roll_back(table, watcher, None);
            published.clear();
            Err(failure)
        }
    }
}

/// The body of `DriverEntry`: registers, subscribes the exception tracker (which publishes
/// the exception set in `published` from its first event on), with `firewall` installs the
/// filters and subscribes their manager at `PASSIVE_LEVEL`, and stores the state in `slot`.
/// Returns `STATUS_SUCCESS`, or the status of the step that failed after undoing the steps
/// before it (nothing stays registered, in the filter engine or allocated, `published`
/// reads "not loaded").
///
/// The caller (the platform's `DriverEntry`) sets `DriverUnload` only on success.
///
/// # IRQL
///
/// `PASSIVE_LEVEL`, as the I/O manager calls `DriverEntry`.
pub fn driver_entry<'t, S: PortSource, E: FilterEngine>(
    table: &'t HandleTable<S>,
    slot: &DriverSlot<TeredoMonitor<'t, S>>,
    published: &'static AppliedExceptions,
    config: DriverConfig,
    firewall: Option<Firewall<E>>,
) -> NtStatus {
    log!(
        "DriverEntry at ",
        irql::<S>(),
        ": registering for Teredo port changes (initial notification on)"
    );
    let monitor = match load(table, published, config, firewall) {
        Ok(monitor) => monitor,
        Err((_, status)) => return status,
    };

    // Step 3. Undo: cancel the registration (steps 1 and 2 together).
    let boxed = match try_box(monitor) {
        Ok(boxed) => boxed,
        Err(monitor) => {
            log!(
                "DriverEntry: ",
                EntryStep::StoreState,
                " failed: out of memory (status ",
                NtStatus::INSUFFICIENT_RESOURCES,
                ")"
            );
            roll_back(table, monitor.watcher, monitor.firewall);
            published.clear();
            return NtStatus::INSUFFICIENT_RESOURCES;
        }
    };
    if let Err(refused) = slot.put(boxed) {
        log!(
            "DriverEntry: ",
            EntryStep::StoreState,
            " failed: a driver state is already loaded (status ",
            NtStatus::OBJECT_NAME_COLLISION,
            ")"
        );
        let TeredoMonitor { watcher, firewall } = *refused;
        roll_back(table, watcher, firewall);
        // `published` is not cleared: it belongs to the state already in the slot, whose
        // tracker follows the same port and publishes every later change.
        return NtStatus::OBJECT_NAME_COLLISION;
    }
    log!("DriverEntry: loaded (status ", NtStatus::SUCCESS, ")");
    NtStatus::SUCCESS
}

/// What `DriverUnload` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct UnloadReport {
    /// Whether a driver state was in the slot.
    pub had_state: bool,
    /// Notifications the registration delivered over its life.
    pub notifications: u64,
    /// Unsubscribing the firewall's `PASSIVE_LEVEL` subscriber (which drops its manager:
    /// filters deleted, engine closed): `None` without a firewall or a state.
    pub firewall: Option<Result<(), Error>>,
    /// The watcher's cancel: `None` without a state.
    pub unregister: Option<Result<(), Error>>,
    /// The handle table's teardown.
    pub teardown: Result<TeardownReport, Error>,
    /// The teardown was not clean (a cancel failed, or the teardown was refused): netio may
    /// still call into the image, so the platform must keep it loaded (see the module
    /// documentation). Always `!is_clean()`.
    pub keep_image_loaded: bool,
}

impl UnloadReport {
    /// Whether every registration ended up cancelled: the driver's own, and anything the
    /// teardown found. A failed `unregister` leaves its handle in the table, so a clean
    /// teardown (no failed or skipped cancel) means the retry cancelled it.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.teardown.as_ref().is_ok_and(TeardownReport::is_clean)
    }
}

/// The teardown's outcome for the log, without `Debug`: `had state H, notifications N[,
/// filter manager stopped|unsubscribe failed: ERR], unregister ok|failed: ERR|none, teardown cancelled C, failed F, skipped in a callback K
/// [, first error: ERR]` or `teardown refused: ERR`.
impl LogText for UnloadReport {
    fn write_to(&self, line: &mut Line) {
        line.push_str(if self.had_state {
            "had state, notifications "
        } else {
            "no state, notifications "
        })
        .push_decimal(self.notifications);
        match &self.firewall {
            Some(Ok(())) => {
                line.push_str(", filter manager stopped");
            }
            Some(Err(error)) => {
                line.push_str(", filter manager unsubscribe failed: ");
                error.write_to(line);
            }
            None => {}
        }
        match &self.unregister {
            Some(Ok(())) => {
                line.push_str(", unregister ok");
            }
            Some(Err(error)) => {
                line.push_str(", unregister failed: ");
                error.write_to(line);
            }
            None => {
                line.push_str(", unregister none");
            }
        }
        match &self.teardown {
            Ok(report) => {
                line.push_str(", teardown cancelled ");
                report.cancelled.write_to(line);
                line.push_str(", failed ");
                report.failed.write_to(line);
                line.push_str(", skipped in a callback ");
                report.skipped_in_callback.write_to(line);
                if let Some(error) = &report.first_error {
                    line.push_str(", first error: ");
                    error.write_to(line);
                }
            }
            Err(error) => {
                line.push_str(", teardown refused: ");
                error.write_to(line);
            }
        }
    }
}

/// The body of `DriverUnload`: takes the state out of `slot`, cancels the registration
/// (`CancelMibChangeNotify2` waits for a callback in flight, and none runs afterwards),
/// frees it, then tears the handle table down so that nothing registered through it can
/// call into the image once it is unloaded; last, `published` reads "not loaded" (after the
/// teardown, so no callback of this driver publishes again).
///
/// # IRQL
///
/// `PASSIVE_LEVEL`, as the I/O manager calls `DriverUnload`.
pub fn driver_unload<'t, S: PortSource>(
    table: &'t HandleTable<S>,
    slot: &DriverSlot<TeredoMonitor<'t, S>>,
    published: &AppliedExceptions,
) -> UnloadReport {
    let (had_state, notifications, firewall, unregister) = if let Some(monitor) = slot.take() {
        let TeredoMonitor { watcher, firewall } = *monitor;
        let notifications = watcher.stats().notifications;
        let firewall = firewall.map(|id| {
            log!(
                "DriverUnload at ",
                irql::<S>(),
                ": stopping the filter manager's work item (waits for a running one); \
                 it deletes the filters and closes the engine"
            );
            let result = watcher.unsubscribe(id);
            match &result {
                Ok(()) => log!("DriverUnload: filter manager stopped; no work item left"),
                Err(error) => log!(
                    "DriverUnload: unsubscribing the filter manager failed: ",
                    error,
                    "; the cancel below stops it"
                ),
            }
            result
        });
        log!(
            "DriverUnload at ",
            irql::<S>(),
            ": cancelling the registration (waits for a callback in flight)"
        );
        let result = watcher.unregister();
        match &result {
            Ok(()) => log!(
                "DriverUnload: registration cancelled after ",
                notifications,
                " notifications; no callback runs any more"
            ),
            Err(error) => {
                log!(
                    "DriverUnload: cancel failed: ",
                    error,
                    "; the handle table teardown retries it"
                );
            }
        }
        (true, notifications, firewall, Some(result))
    } else {
        log!("DriverUnload at ", irql::<S>(), ": no driver state");
        (false, 0, None, None)
    };
    let teardown = table.teardown();
    match &teardown {
        Ok(report) => log!(
            "DriverUnload: handle table torn down: ",
            report.cancelled,
            " left to cancel, ",
            report.failed,
            " failed, ",
            table.live_registrations(),
            " live"
        ),
        Err(error) => log!("DriverUnload: teardown refused: ", error),
    }
    published.clear();
    let keep_image_loaded = !teardown.as_ref().is_ok_and(TeardownReport::is_clean);
    if keep_image_loaded {
        log!(
            "DriverUnload: a registration could not be cancelled and netio may still call \
             into this image: keeping the image loaded (a reference on the driver object, \
             never dropped)"
        );
    }
    UnloadReport {
        had_state,
        notifications,
        firewall,
        unregister,
        teardown,
        keep_image_loaded,
    }
}
