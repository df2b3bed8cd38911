//! The main job on the host: runs the example driver's own code (`teredo_monitor_logic::driver`,
//! the module the Windows build packages) through a scripted scenario on the library's
//! host mock of netio, and checks that it leaves nothing behind.
//!
//! Scenario: load with the Teredo client stopped; the client starts; restarts twice (at
//! `DISPATCH_LEVEL`); stops; starts again and, while that callback is still inside the
//! driver, the driver unloads; after unload the client restarts once more.
//!
//! Run from the repository root with `cargo demo-host` (an alias in `.cargo/config.toml`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use teredo_monitor_logic::driver::{self, DriverConfig, TeredoMonitor};
use teredo_monitor_logic::exceptions::AppliedExceptions;
use teredo_monitor_logic::host;
use teredo_monitor_logic::slot::DriverSlot;
use teredo_monitor_logic::status::NtStatus;
use teredo_watcher::mock::MockNetio;
use teredo_watcher::{HandleTable, Irql, sys};

/// Counts allocations and live bytes; delegates to the system allocator.
struct CountingAllocator;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static DEALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s implementation of the `GlobalAlloc` contract is this one's; the counters are
// atomics and never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout, which meets `alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout, which meets `alloc_zeroed`'s contract.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a block this allocator (so `System`) returned, with its
        // layout.
        unsafe { System.dealloc(ptr, layout) };
        DEALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller meets `realloc`'s contract for a block
        // this allocator (so `System`) returned.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // The old block is returned and a new one handed out (possibly the same).
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            DEALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// The exception set the driver publishes for classify, a `static` as in the driver image.
static PUBLISHED: AppliedExceptions = AppliedExceptions::new();

#[derive(Clone, Copy)]
struct Counts {
    allocations: usize,
    deallocations: usize,
    live_bytes: usize,
}

fn counts() -> Counts {
    Counts {
        allocations: ALLOCATIONS.load(Ordering::SeqCst),
        deallocations: DEALLOCATIONS.load(Ordering::SeqCst),
        live_bytes: LIVE_BYTES.load(Ordering::SeqCst),
    }
}

fn scenario(text: &str) {
    println!("[scenario] {text}");
}

/// What the scenario observed, checked at the end.
struct Observed {
    entry: NtStatus,
    unload_clean: bool,
    registrations_made: usize,
    cancels: usize,
    live_after_unload: usize,
    discarded_by_cancel: usize,
    late_callback_lines: usize,
    self_cancels: usize,
}

fn run(netio: &MockNetio) -> Observed {
    let table = HandleTable::new(netio.clone());
    let slot: DriverSlot<TeredoMonitor<'_, MockNetio>> = DriverSlot::new();

    scenario("the Teredo client is stopped; the OS loads the driver (DriverEntry)");
    let entry = driver::driver_entry(&table, &slot, &PUBLISHED, DriverConfig::default());
    netio.wait_idle();

    scenario("the Teredo client starts");
    let _ = netio.client().start();
    netio.wait_idle();

    scenario("netio now delivers callbacks at DISPATCH_LEVEL");
    netio.set_callback_irql(Irql::DISPATCH_LEVEL);
    scenario("the Teredo client restarts (1 of 2): new dynamic port");
    let _ = netio.client().restart();
    netio.wait_idle();
    scenario("the Teredo client restarts (2 of 2): new dynamic port");
    let _ = netio.client().restart();
    netio.wait_idle();

    scenario("netio delivers at PASSIVE_LEVEL again; the Teredo client stops");
    netio.set_callback_irql(Irql::PASSIVE_LEVEL);
    netio.client().stop();
    netio.wait_idle();

    scenario(
        "the Teredo client starts again (callback at DISPATCH_LEVEL, held inside the driver \
         to simulate a slow callback), and one more notification is queued behind it",
    );
    netio.set_callback_irql(Irql::DISPATCH_LEVEL);
    host::hold_next_callback();
    let port = netio.client().start();
    netio.notify_raw(port, sys::MIB_PARAMETER_NOTIFICATION);
    host::wait_until_held();
    scenario("the OS unloads the driver (DriverUnload) while that callback is in flight");
    let releaser = thread::spawn(|| {
        // Once DriverUnload has logged that it is cancelling, give it time to block in
        // CancelMibChangeNotify2, then let the callback go on.
        host::wait_for_lines_by_holder(1);
        thread::sleep(Duration::from_millis(200));
        scenario("(200 ms later) the held callback finishes its work");
        host::release_held_callback();
    });
    let report = driver::driver_unload(&table, &slot, &PUBLISHED);
    if report.keep_image_loaded {
        host::keep_image_loaded();
    }
    host::mark_unloaded();
    let _ = releaser.join();

    scenario("after unload: the Teredo client restarts once more (nothing may reach the driver)");
    let _ = netio.client().restart();
    netio.notify_raw(4242, sys::MIB_PARAMETER_NOTIFICATION);
    netio.wait_idle();
    thread::sleep(Duration::from_millis(50));

    let calls = netio.calls();
    Observed {
        entry,
        unload_clean: report.is_clean() && report.had_state,
        registrations_made: calls[0],
        cancels: calls[2],
        live_after_unload: netio.live_registrations() + table.live_registrations(),
        discarded_by_cancel: netio.dropped_after_cancel(),
        late_callback_lines: host::late_callback_lines(),
        self_cancels: netio.self_cancel_reports(),
    }
}

fn main() -> ExitCode {
    println!(
        "teredo-monitor demo: the example driver's code (teredo_monitor_logic::driver) on the host \
         mock of netio; lines from the driver start with [driver]"
    );
    // Allocations made once for the process's lifetime (stdout's buffer, this thread's
    // handle) happen before the baseline.
    let _ = thread::current();
    let before = counts();

    let netio = MockNetio::new();
    let observed = run(&netio);
    drop(netio);
    let after = counts();

    let allocations = after.allocations - before.allocations;
    let returned = after.deallocations - before.deallocations;
    let outstanding = after
        .live_bytes
        .wrapping_sub(before.live_bytes)
        .cast_signed();

    println!(
        "[check] DriverEntry returned {}; DriverUnload clean: {}",
        observed.entry, observed.unload_clean
    );
    println!(
        "[check] registrations: {} made, {} cancelled, {} live after unload",
        observed.registrations_made, observed.cancels, observed.live_after_unload
    );
    println!(
        "[check] notifications discarded by the cancel (never reached the driver): {}; \
         driver lines logged by callbacks after unload: {}; cancels from inside a callback: {}",
        observed.discarded_by_cancel, observed.late_callback_lines, observed.self_cancels
    );
    println!(
        "[check] allocations: {allocations} made, {returned} returned, {outstanding} bytes \
         outstanding"
    );

    let mut failures = Vec::new();
    if !observed.entry.is_success() {
        failures.push("DriverEntry failed");
    }
    if !observed.unload_clean {
        failures.push("DriverUnload was not clean");
    }
    if observed.registrations_made == 0 || observed.cancels != observed.registrations_made {
        failures.push("not every registration was cancelled");
    }
    if observed.live_after_unload != 0 {
        failures.push("registrations live after unload");
    }
    if observed.discarded_by_cancel == 0 {
        failures.push("no notification was in the queue at unload (scenario did not overlap)");
    }
    if observed.late_callback_lines != 0 {
        failures.push("driver code ran after unload");
    }
    if observed.self_cancels != 0 {
        failures.push("a cancel ran inside its own callback");
    }
    if allocations != returned || outstanding != 0 {
        failures.push("allocations not returned");
    }

    if failures.is_empty() {
        println!(
            "OK: every registration cancelled ({} of {}), no callback after unload, every \
             allocation returned ({returned} of {allocations}, 0 bytes outstanding)",
            observed.cancels, observed.registrations_made
        );
        ExitCode::SUCCESS
    } else {
        println!("FAILED: {}", failures.join("; "));
        ExitCode::FAILURE
    }
}
