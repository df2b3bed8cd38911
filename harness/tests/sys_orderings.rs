//! The example driver's `.sys` under every netio ordering and fault of the kernel model
//! (`kernel::netio`): the four initial-notification orderings, an overlapping invocation,
//! cancels that fail at unload (the driver keeps its image loaded), a NULL handle; and the
//! loader's `INIT`/`PAGE` rules on edited images.
#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use std::time::Duration;

use teredo_harness::kernel::{self, Delivery, InitialDelivery, NetioCall};
use teredo_harness::{Machine, Stop, sysbuild};

const STATUS_UNSUCCESSFUL: i32 = 0xC000_0001_u32.cast_signed();

fn sys() -> &'static [u8] {
    sysbuild::sys_image().unwrap_or_else(|e| panic!("the .sys must build: {e}"))
}

fn boot_image(image: &[u8]) -> Machine {
    Machine::boot(image, false).unwrap_or_else(|e| panic!("the .sys must load: {e}"))
}

fn output() -> String {
    kernel::debugger_output().join("\n")
}

fn ok<T>(result: Result<T, Stop>) -> T {
    result.unwrap_or_else(|stop| panic!("{stop}\n--- debugger output ---\n{}", output()))
}

fn event_lines() -> Vec<String> {
    kernel::debugger_output()
        .into_iter()
        .filter(|l| l.starts_with("teredo-monitor: event #"))
        .collect()
}

fn classify(machine: &Machine) -> u32 {
    // SAFETY: `TeredoMonitorClassifyPort` is `unsafe extern "system" fn() -> u32` in the
    // shim, callable at <= DISPATCH_LEVEL while the driver is loaded; DriverUnload runs only
    // after this call has been joined.
    ok(unsafe { machine.call_export_u32("TeredoMonitorClassifyPort", kernel::DISPATCH_LEVEL) })
}

/// Unload is clean, and a late notification on every handle is dropped without output.
fn unload_clean_and_silent(machine: &Machine) {
    assert!(ok(machine.driver_unload()), "DriverUnload set");
    let netio = kernel::netio_stats();
    assert!(netio.live.is_empty(), "{netio:?}");
    let pool = kernel::pool_stats();
    assert!(pool.balanced(), "{pool:?}\n{}", output());
    assert_eq!(kernel::driver_object_references(), 0);
    assert!(machine.image().is_retired());
    let lines = kernel::debugger_output().len();
    assert!(!netio.handles.is_empty());
    for handle in netio.handles {
        let late = ok(machine.on_cpu("late", 0, move || {
            kernel::deliver(handle, 40_000, kernel::MIB_PARAMETER_NOTIFICATION)
        }));
        assert_eq!(late, Delivery::Dropped);
    }
    assert_eq!(
        kernel::netio_stats().delivered,
        netio.delivered,
        "no callback after unload"
    );
    assert_eq!(kernel::debugger_output().len(), lines);
    assert_eq!(kernel::stopped(), None);
}

#[test]
fn every_initial_notification_ordering_with_the_client_running_at_load() {
    let orders = [
        InitialDelivery::CallerThread,
        InitialDelivery::BeforeReturn,
        InitialDelivery::AfterReturn,
        InitialDelivery::DuringQuery,
    ];
    let mut ran = 0;
    for order in orders {
        let machine = boot_image(sys());
        kernel::set_initial_delivery(order);
        let port = ok(machine.on_cpu("client start", 0, kernel::client::start));
        assert_eq!(ok(machine.driver_entry()), 0, "{order:?}\n{}", output());
        assert!(kernel::wait_for_initial_notifications(Duration::from_secs(
            5
        )));

        // The ordering really happened.
        let records = kernel::netio_stats().initial;
        assert_eq!(records.len(), 1, "{order:?}: {records:?}");
        let record = records[0];
        assert_eq!(record.order, order);
        match order {
            InitialDelivery::CallerThread => {
                assert_eq!(record.callback_thread, record.caller_thread);
                assert!(!record.handle_written && record.notify_running);
            }
            InitialDelivery::BeforeReturn => {
                assert_ne!(record.callback_thread, record.caller_thread);
                assert!(!record.handle_written && record.notify_running);
            }
            InitialDelivery::AfterReturn => {
                assert_ne!(record.callback_thread, record.caller_thread);
                assert!(record.handle_written && !record.notify_running);
            }
            InitialDelivery::DuringQuery => {
                assert_ne!(record.callback_thread, record.caller_thread);
                assert!(record.handle_written && record.during_query, "{record:?}");
            }
        }

        // The port is known after load (from the seed), and the subscribers heard of it.
        assert_eq!(
            classify(&machine),
            u32::from(port),
            "{order:?}\n{}",
            output()
        );
        let events = event_lines();
        for (n, line) in events.iter().enumerate() {
            assert!(
                line.starts_with(&format!("teredo-monitor: event #{}: ", n + 1)),
                "{order:?}: events numbered in order: {events:#?}"
            );
        }
        let initial = events
            .iter()
            .filter(|l| l.contains("MibInitialNotification"))
            .count();
        assert_eq!(initial, 1, "{order:?}: {events:#?}");
        assert!(
            events
                .iter()
                .any(|l| l.contains(&format!("port=udp/{port}"))),
            "{order:?}: a subscriber learnt the running port: {events:#?}"
        );
        assert!(
            output().contains(&format!(
                "exception tracker subscribed (snapshot port=udp/{port})"
            )),
            "{order:?}"
        );

        // A change after load is the next event, with its port.
        let before = events.len();
        let next = ok(machine.on_cpu("client restart", 0, kernel::client::start));
        let events = event_lines();
        assert_eq!(events.len(), before + 1, "{order:?}: {events:#?}");
        assert!(events[before].contains(&format!("port=udp/{next}")));
        assert_eq!(classify(&machine), u32::from(next));
        unload_clean_and_silent(&machine);
        ran += 1;
    }
    assert_eq!(ran, orders.len());
}

#[test]
fn an_overlapping_invocation_keeps_the_newest_port() {
    const OVERLAP_PORT: u16 = 50_001;
    let machine = boot_image(sys());
    assert_eq!(ok(machine.driver_entry()), 0);
    let first = ok(machine.on_cpu("client start", 0, kernel::client::start));
    assert_eq!(classify(&machine), u32::from(first));
    // While the next change's callback prints its first line, a second invocation of the
    // same registration runs on another thread with a newer port.
    kernel::overlap_inside_next_callback(OVERLAP_PORT, kernel::MIB_PARAMETER_NOTIFICATION);
    let second = ok(machine.on_cpu("client restart", 0, kernel::client::start));
    let netio = kernel::netio_stats();
    assert_eq!(netio.overlapping, 1, "the overlap happened");
    assert!(output().contains("fault injection: an overlapping invocation"));
    assert_eq!(
        classify(&machine),
        u32::from(OVERLAP_PORT),
        "the newest notification's port is current\n{}",
        output()
    );
    let events = event_lines();
    let change = events
        .iter()
        .position(|l| l.contains(&format!("port=udp/{second}")))
        .unwrap_or_else(|| panic!("the change is logged: {events:#?}"));
    assert!(
        events[change + 1..]
            .iter()
            .any(|l| l.contains(&format!("port=udp/{OVERLAP_PORT}"))),
        "the running pass delivered the overlapping port after the change: {events:#?}"
    );
    unload_clean_and_silent(&machine);
}

/// The unload policy (issue 9 item 11): both cancels fail, the driver keeps its image
/// loaded with a reference on its driver object, and a late notification runs mapped code.
fn unload_keeps_the_image(machine: &Machine) -> usize {
    assert!(ok(machine.driver_unload()));
    let text = output();
    assert!(text.contains("1 failed, 1 live"), "{text}");
    assert!(text.contains("keeping the image loaded"), "{text}");
    assert!(
        text.contains("took a reference on the driver object"),
        "{text}"
    );
    assert_eq!(kernel::driver_object_references(), 1);
    assert!(!machine.image().is_retired(), "the image stays mapped");
    assert!(
        !machine.retire_if_unreferenced(),
        "the reference is never dropped"
    );
    let netio = kernel::netio_stats();
    assert_eq!(netio.live.len(), 1, "netio still holds the registration");
    let handle = netio.live[0];
    let (lines, delivered) = (kernel::debugger_output().len(), netio.delivered);
    let late = ok(machine.on_cpu("late notification", 0, move || {
        kernel::deliver(handle, 40_000, kernel::MIB_PARAMETER_NOTIFICATION)
    }));
    assert_eq!(
        late,
        Delivery::Delivered,
        "it reached the driver's trampoline"
    );
    assert_eq!(kernel::netio_stats().delivered, delivered + 1);
    assert_eq!(
        kernel::debugger_output().len(),
        lines,
        "the silenced subscribers print nothing"
    );
    assert_eq!(kernel::stopped(), None, "mapped code ran: no stop");
    handle
}

#[test]
fn an_unload_whose_cancels_fail_keeps_the_image_and_a_late_notification_runs_mapped_code() {
    let machine = boot_image(sys());
    assert_eq!(ok(machine.driver_entry()), 0);
    ok(machine.on_cpu("client start", 0, kernel::client::start));
    kernel::fail_next(NetioCall::Cancel, STATUS_UNSUCCESSFUL);
    kernel::fail_next(NetioCall::Cancel, STATUS_UNSUCCESSFUL);
    unload_keeps_the_image(&machine);
    assert_eq!(
        kernel::netio_stats().calls[2],
        2,
        "the watcher's cancel and the retry"
    );
}

#[test]
fn cancels_that_fail_after_waiting_at_unload_keep_the_image_too() {
    let machine = boot_image(sys());
    assert_eq!(ok(machine.driver_entry()), 0);
    ok(machine.on_cpu("client start", 0, kernel::client::start));
    kernel::fail_next_cancel_after_wait(STATUS_UNSUCCESSFUL);
    kernel::fail_next_cancel_after_wait(STATUS_UNSUCCESSFUL);
    let handle = unload_keeps_the_image(&machine);
    assert_eq!(kernel::netio_stats().failed_after_wait, [handle, handle]);
    assert!(
        output().contains("DriverUnload: cancel failed"),
        "{}",
        output()
    );
}

#[test]
fn a_null_handle_fails_driver_entry_and_the_next_notification_runs_into_the_unloaded_image() {
    let machine = boot_image(sys());
    kernel::notify_null_handle_next();
    let status = ok(machine.driver_entry());
    assert_ne!(status, 0, "{}", output());
    assert!(output().contains("step 1/3"), "{}", output());
    assert_eq!(machine.driver_unload_routine(), None);
    // The library cannot cancel without a handle: netio keeps the registration.
    assert_eq!(kernel::netio_stats().live.len(), 1);
    assert!(
        !ok(machine.driver_unload()),
        "no DriverUnload: the image is unloaded"
    );
    assert!(machine.image().is_retired());
    // What Windows would do at the next notification: run code of an unloaded image.
    let result = machine.on_cpu("client start", 0, kernel::client::start);
    match result {
        Err(Stop::Bugcheck(stop)) => {
            assert_eq!(
                stop.code,
                kernel::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
                "{stop}"
            );
            assert!(stop.reason.contains("unloaded image at RVA"), "{stop}");
            let rva = stop.parameters[0] - machine.image().base();
            assert!(rva < machine.image().size(), "{stop}");
        }
        other => panic!("expected the stop, got {other:?}\n{}", output()),
    }
}

/// The image with its `.text` section renamed to `name` (8 bytes, NUL-padded): the code
/// the loader then treats as `INIT` or `PAGE`.
fn with_text_renamed(name: &[u8]) -> Vec<u8> {
    let mut bytes = sys().to_vec();
    let pe_offset = u32::from_le_bytes(bytes[0x3C..0x40].try_into().unwrap()) as usize;
    let sections = u16::from_le_bytes(bytes[pe_offset + 6..pe_offset + 8].try_into().unwrap());
    let optional = u16::from_le_bytes(bytes[pe_offset + 20..pe_offset + 22].try_into().unwrap());
    let table = pe_offset + 24 + usize::from(optional);
    let text = (0..usize::from(sections))
        .map(|i| table + 40 * i)
        .find(|&at| &bytes[at..at + 8] == b".text\0\0\0")
        .expect("a .text section");
    let mut padded = [0u8; 8];
    padded[..name.len()].copy_from_slice(name);
    bytes[text..text + 8].copy_from_slice(&padded);
    // The checksum no longer matches; the harness's loader does not check it.
    bytes
}

#[test]
fn code_in_an_init_section_called_after_driver_entry_stops_the_machine_naming_the_rva() {
    let image = with_text_renamed(b"INIT");
    let machine = boot_image(&image);
    assert_eq!(machine.image().init_sections().len(), 1);
    // DriverEntry runs from INIT (allowed), registering a callback that lives there too.
    assert_eq!(ok(machine.driver_entry()), 0, "{}", output());
    let (rva, len) = machine.image().init_sections()[0];
    match machine.on_cpu("client start", 0, kernel::client::start) {
        Err(Stop::Bugcheck(stop)) => {
            assert_eq!(stop.code, kernel::PAGE_FAULT_IN_NONPAGED_AREA, "{stop}");
            assert!(
                stop.reason.contains("discarded INIT section at RVA"),
                "{stop}"
            );
            let at = stop.parameters[0] - machine.image().base();
            assert!((rva..rva + len).contains(&at), "{stop}");
            assert!(stop.reason.contains(&format!("{at:#x}")), "{stop}");
        }
        other => panic!("expected the stop, got {other:?}\n{}", output()),
    }
}

#[test]
fn page_code_runs_below_dispatch_level_and_stops_the_machine_at_dispatch_level() {
    // All the driver's code in a PAGE section: what runs at PASSIVE_LEVEL pages in and
    // runs; the first instruction after the library's spin lock raised the thread to
    // DISPATCH_LEVEL (code that runs under a spin lock must not be pageable) stops.
    let image = with_text_renamed(b"PAGE");
    let machine = boot_image(&image);
    assert_eq!(machine.image().page_sections().len(), 1);
    let (rva, len) = machine.image().page_sections()[0];
    let paged_in = kernel::trap::page_ins();
    match machine.driver_entry() {
        Err(Stop::Bugcheck(stop)) => {
            assert_eq!(stop.code, kernel::IRQL_NOT_LESS_OR_EQUAL, "{stop}");
            assert!(
                stop.reason.contains("pageable (PAGE) memory at RVA"),
                "{stop}"
            );
            assert_eq!(stop.parameters[1], usize::from(kernel::DISPATCH_LEVEL));
            let at = stop.parameters[0] - machine.image().base();
            assert!((rva..rva + len).contains(&at), "{stop}");
        }
        other => panic!("expected the stop, got {other:?}\n{}", output()),
    }
    assert!(
        kernel::trap::page_ins() > paged_in,
        "the code was paged in below DISPATCH_LEVEL"
    );
    assert!(
        output().contains("teredo-monitor: DriverEntry at PASSIVE_LEVEL"),
        "paged code ran at PASSIVE_LEVEL first: {}",
        output()
    );
}
