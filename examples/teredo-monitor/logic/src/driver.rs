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
//!             -> move the state into the DriverSlot          => STATUS_SUCCESS
//!   a failing step undoes the steps before it (cancel the registration) and returns its
//!   status; the platform sets DriverUnload only on success.
//! driver_unload: take the state out of the slot -> cancel the registration (waits for a
//!                callback in flight) -> free it -> tear the handle table down
//!                -> AppliedExceptions back to "not loaded"
//!                -> if a registration could not be cancelled: keep the image loaded
//! ```
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
    Error, HandleTable, Irql, Kernel, PortSource, TeardownReport, TeredoEvent, TeredoExceptions,
    TeredoPortWatcher, WatcherOptions,
};

use crate::exceptions::{AppliedExceptions, ExceptionChange, ExceptionTracker, event_name};
use crate::log::{Line, LogText, Port};
use crate::slot::DriverSlot;
use crate::status::NtStatus;

/// How the driver registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverConfig {
    /// Subscriber capacity of the watcher. The driver installs two (the event logger and
    /// the exception tracker); a smaller value makes step 2 of `DriverEntry` fail, which the
    /// tests use to exercise the rollback.
    pub max_subscribers: usize,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig { max_subscribers: 2 }
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

/// The driver's state while it is loaded: its registration for Teredo port changes.
///
/// Lives in one [`DriverSlot`] from the end of `DriverEntry` to `DriverUnload`. The two
/// subscribers own their own state (the event counter, the [`ExceptionTracker`]), so
/// callbacks never touch the slot.
pub struct TeredoMonitor<'t, S: PortSource> {
    watcher: TeredoPortWatcher<'t, S>,
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
/// nothing it registered is left: if the cancel itself fails, the handle table's teardown
/// cancels what is left (the image is about to be unloaded).
fn roll_back<S: PortSource>(table: &HandleTable<S>, watcher: TeredoPortWatcher<'_, S>) {
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
fn load<'t, S: PortSource>(
    table: &'t HandleTable<S>,
    published: &'static AppliedExceptions,
    config: DriverConfig,
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
        roll_back(table, watcher);
        published.clear();
        return Err(failure);
    }

    Ok(TeredoMonitor { watcher })
}

/// The body of `DriverEntry`: registers, subscribes the exception tracker (which publishes
/// the exception set in `published` from its first event on) and stores the state in
/// `slot`. Returns `STATUS_SUCCESS`, or the status of the step that failed after undoing
/// the steps before it (nothing stays registered, nothing stays allocated, `published`
/// reads "not loaded").
///
/// The caller (the platform's `DriverEntry`) sets `DriverUnload` only on success.
///
/// # IRQL
///
/// `PASSIVE_LEVEL`, as the I/O manager calls `DriverEntry`.
pub fn driver_entry<'t, S: PortSource>(
    table: &'t HandleTable<S>,
    slot: &DriverSlot<TeredoMonitor<'t, S>>,
    published: &'static AppliedExceptions,
    config: DriverConfig,
) -> NtStatus {
    log!(
        "DriverEntry at ",
        irql::<S>(),
        ": registering for Teredo port changes (initial notification on)"
    );
    let monitor = match load(table, published, config) {
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
            roll_back(table, monitor.watcher);
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
        let TeredoMonitor { watcher } = *refused;
        roll_back(table, watcher);
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

/// The teardown's outcome for the log, without `Debug`: `had state H, notifications N,
/// unregister ok|failed: ERR|none, teardown cancelled C, failed F, skipped in a callback K
/// [, first error: ERR]` or `teardown refused: ERR`.
impl LogText for UnloadReport {
    fn write_to(&self, line: &mut Line) {
        line.push_str(if self.had_state {
            "had state, notifications "
        } else {
            "no state, notifications "
        })
        .push_decimal(self.notifications);
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
    let (had_state, notifications, unregister) = if let Some(monitor) = slot.take() {
        let TeredoMonitor { watcher } = *monitor;
        let notifications = watcher.stats().notifications;
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
        (true, notifications, Some(result))
    } else {
        log!("DriverUnload at ", irql::<S>(), ": no driver state");
        (false, 0, None)
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
        unregister,
        teardown,
        keep_image_loaded,
    }
}
