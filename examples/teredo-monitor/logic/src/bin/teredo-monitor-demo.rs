//! The main job on the host: runs the example driver's own code (`teredo_monitor_logic::driver`,
//! the module the Windows build packages) through a scripted scenario on the library's
//! host mock of netio, and checks that it leaves nothing behind.
//!
//! Scenario: load with the Teredo client stopped; the client starts; restarts twice (at
//! `DISPATCH_LEVEL`); stops; starts again and, while that callback is still inside the
//! driver, the driver unloads; after unload the client restarts once more.
//!
//! The driver runs as a firewall on the mock filter engine
//! (`teredo_monitor_logic::firewall::mock`): after each change has reached the engine, the
//! demo checks our sublayer's verdicts on the committed filters (the current port
//! permitted, the previous one blocked, unicast to local 3544 blocked) and at the end that
//! no filter, session or work item is left.
//!
//! Run from the repository root with `cargo demo-host` (an alias in `.cargo/config.toml`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use core::net::Ipv4Addr;
use std::time::Instant;
use teredo_monitor_logic::driver::{self, DriverConfig, Firewall, TeredoMonitor};
use teredo_monitor_logic::exceptions::AppliedExceptions;
use teredo_monitor_logic::firewall::mock::{MockFilterEngine, Verdict};
use teredo_monitor_logic::host;
use teredo_monitor_logic::slot::DriverSlot;
use teredo_monitor_logic::status::NtStatus;

use teredo_watcher::mock::{MockNetio, work_items_initialized_on};
use teredo_watcher::{Direction, HandleTable, IoObject, Irql, PacketView, sys};

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

/// The driver object the firewall's work items are made on (never dereferenced on the mock).
static DRIVER_OBJECT: u8 = 0;

/// What the firewall checks saw.
#[derive(Default)]
struct FirewallSeen {
    permitted: usize,
    blocked: usize,
    wrong: usize,
    lag_max: Duration,
}

/// Waits until the engine has committed the filters of `port` (or none), then checks our
/// sublayer's verdicts on the committed filters: traffic to `port` permitted, to
/// `previous` blocked, unicast to local 3544 blocked.
fn check_firewall(
    engine: &MockFilterEngine,
    port: Option<u16>,
    previous: Option<u16>,
    seen: &mut FirewallSeen,
) {
    let host = Ipv4Addr::new(192, 168, 1, 20);
    let to = |p| PacketView::udp4(Direction::Inbound, host, p, 61_000);
    let start = Instant::now();
    let committed = || {
        let ports: Vec<u16> = engine
            .committed_filters()
            .iter()
            .filter(|f| f.name.text.contains("dynamic"))
            .flat_map(|f| f.conditions().to_vec())
            .filter_map(|c| match c {
                teredo_monitor_logic::firewall::filters::Condition::LocalPort(p) => Some(p),
                _ => None,
            })
            .collect();
        ports == port.map(|p| vec![p, p]).unwrap_or_default() && engine.open_transactions() == 0
    };
    while !committed() && start.elapsed() < Duration::from_secs(20) {
        thread::sleep(Duration::from_millis(1));
    }
    seen.lag_max = seen.lag_max.max(start.elapsed());
    let mut expect = |packet: PacketView, want: Verdict| {
        let got = engine.verdict(&packet);
        match got {
            Verdict::Permit => seen.permitted += 1,
            _ => seen.blocked += 1,
        }
        if got != want {
            seen.wrong += 1;
        }
    };
    if let Some(p) = port {
        expect(to(p), Verdict::Permit);
    }
    if let Some(p) = previous.filter(|&p| Some(p) != port) {
        expect(to(p), Verdict::Block);
    }
    expect(to(3544), Verdict::Block);
    println!(
        "[firewall] committed {} filters; dynamic port {}; our sublayer: {}{}unicast to 3544 \
         blocked",
        engine.committed_filters().len(),
        port.map_or_else(|| "none".to_owned(), |p| p.to_string()),
        if port.is_some() {
            "its traffic permitted, "
        } else {
            ""
        },
        if previous.is_some_and(|p| Some(p) != port) {
            "the previous port's blocked, "
        } else {
            ""
        }
    );
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
    firewall: FirewallSeen,
    filters_after_unload: usize,
    sessions_after_unload: usize,
    work_items_after_unload: usize,
}

fn run(netio: &MockNetio) -> Observed {
    let table = HandleTable::new(netio.clone());
    let slot: DriverSlot<TeredoMonitor<'_, MockNetio>> = DriverSlot::new();
    let engine = MockFilterEngine::new();
    // SAFETY: on the mock the object is never dereferenced; a static outlives every watcher.
    let io_object = unsafe { IoObject::from_raw((&raw const DRIVER_OBJECT).cast_mut().cast()) };
    let mut seen = FirewallSeen::default();

    scenario("the Teredo client is stopped; the OS loads the driver (DriverEntry)");
    let entry = driver::driver_entry(
        &table,
        &slot,
        &PUBLISHED,
        DriverConfig::default(),
        io_object.map(|io_object| Firewall {
            engine: engine.clone(),
            io_object,
        }),
    );
    netio.wait_idle();
    check_firewall(&engine, None, None, &mut seen);

    scenario("the Teredo client starts");
    let first = netio.client().start();
    netio.wait_idle();
    check_firewall(&engine, Some(first), None, &mut seen);

    scenario("netio now delivers callbacks at DISPATCH_LEVEL");
    netio.set_callback_irql(Irql::DISPATCH_LEVEL);
    scenario("the Teredo client restarts (1 of 2): new dynamic port");
    let second = netio.client().restart();
    netio.wait_idle();
    check_firewall(&engine, Some(second), Some(first), &mut seen);
    scenario("the Teredo client restarts (2 of 2): new dynamic port");
    let third = netio.client().restart();
    netio.wait_idle();
    check_firewall(&engine, Some(third), Some(second), &mut seen);

    scenario("netio delivers at PASSIVE_LEVEL again; the Teredo client stops");
    netio.set_callback_irql(Irql::PASSIVE_LEVEL);
    netio.client().stop();
    netio.wait_idle();
    check_firewall(&engine, None, Some(third), &mut seen);

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
        firewall: seen,
        filters_after_unload: engine.committed_filters().len(),
        sessions_after_unload: engine.open_sessions(),
        work_items_after_unload: work_items_initialized_on(
            (&raw const DRIVER_OBJECT).cast_mut().cast(),
        ),
    }
}

/// The mock kernel keeps process-lifetime books of the work items it ran, per driver object
/// (`teredo_watcher::mock::work_items_run_on`): one passive subscriber on the demo's driver
/// object before the baseline makes those books, so the count covers the scenario only.
fn warm_up_work_items() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    // SAFETY: on the mock the object is never dereferenced; a static outlives every watcher.
    let io = unsafe { IoObject::from_raw((&raw const DRIVER_OBJECT).cast_mut().cast()) };
    let (Some(io), Ok(watcher)) = (
        io,
        teredo_watcher::TeredoPortWatcher::new(&table, teredo_watcher::WatcherOptions::default()),
    ) else {
        return;
    };
    let called = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&called);
    if watcher
        .subscribe_passive(io, move |_| flag.store(true, Ordering::SeqCst))
        .is_ok()
    {
        let start = Instant::now();
        while !called.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(20) {
            thread::sleep(Duration::from_millis(1));
        }
    }
    let _ = watcher.unregister();
    let _ = table.teardown();
}

fn main() -> ExitCode {
    println!(
        "teredo-monitor demo: the example driver's code (teredo_monitor_logic::driver) on the host \
         mock of netio; lines from the driver start with [driver]"
    );
    // Allocations made once for the process's lifetime (stdout's buffer, this thread's
    // handle) happen before the baseline.
    let _ = thread::current();
    warm_up_work_items();
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
    println!(
        "[check] firewall after unload: {} filters, {} engine sessions, {} work items; \
         longest wait for a change to be committed: {} ms",
        observed.filters_after_unload,
        observed.sessions_after_unload,
        observed.work_items_after_unload,
        observed.firewall.lag_max.as_millis()
    );
    println!(
        "firewall: {} permitted, {} blocked, {} wrong verdicts",
        observed.firewall.permitted, observed.firewall.blocked, observed.firewall.wrong
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
    if observed.late_callback_lines != 0 {
        failures.push("driver code ran after unload");
    }
    if observed.self_cancels != 0 {
        failures.push("a cancel ran inside its own callback");
    }
    if observed.firewall.wrong != 0 {
        failures.push("wrong firewall verdicts");
    }
    if observed.filters_after_unload != 0
        || observed.sessions_after_unload != 0
        || observed.work_items_after_unload != 0
    {
        failures.push("the firewall left filters, sessions or work items");
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
