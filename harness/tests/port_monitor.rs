//! `examples/teredo-port-monitor`, the C reference driver's job on the library's
//! `StaticTeredoWatcher`, in the harness: the same checks as the C driver's scenarios (the
//! four initial-notification orders, the seed, the documented `NotifyTeredoPortChange`
//! failures, a failed cancel at unload, a self-cancel), plus what the static form promises:
//! no pool allocation at all, and the image within 3x the C driver's.
#![cfg(all(target_arch = "x86_64", unix))]

mod foreign;

use foreign::{ORDERS, STATUS_SUCCESS, classify, ok, output, unload_clean};
use teredo_harness::kernel::{self, NetioCall};
use teredo_harness::{Machine, pe, sysbuild};

const STATUS_INVALID_HANDLE: i32 = 0xC000_0008_u32.cast_signed();

fn image() -> &'static [u8] {
    sysbuild::port_monitor_image().unwrap_or_else(|e| panic!("the port monitor must build: {e}"))
}

fn boot() -> Machine {
    Machine::boot(image(), false).unwrap_or_else(|e| panic!("the port monitor must load: {e}"))
}

/// The per-packet port match export, called at `DISPATCH_LEVEL`.
fn teredo_classify(machine: &Machine, local_port: u16) -> u8 {
    let address = machine.export("TeredoClassify").expect("exported");
    ok(
        machine.on_cpu("TeredoClassify", kernel::DISPATCH_LEVEL, move || {
            // SAFETY: `TeredoClassify` is `extern "system" fn(u16) -> u8` in the port monitor,
            // callable at any IRQL while the image is mapped (it is: unload comes later).
            let f = unsafe { std::mem::transmute::<usize, extern "win64" fn(u16) -> u8>(address) };
            f(local_port)
        }),
    )
}

#[test]
fn the_image_imports_only_the_kernel_and_netio_and_exports_the_classify_pair() {
    let facts = pe::facts(image()).expect("parses");
    assert_eq!(facts.machine, pe::MACHINE_AMD64);
    assert_eq!(facts.subsystem, pe::SUBSYSTEM_NATIVE);
    assert_eq!(facts.modules(), ["netio.sys", "ntoskrnl.exe"]);
    let netio = facts.imports_of("netio.sys");
    for name in [
        "NotifyTeredoPortChange",
        "GetTeredoPort",
        "CancelMibChangeNotify2",
    ] {
        assert!(netio.contains(&name), "imports {name}: {netio:?}");
    }
    let ntoskrnl = facts.imports_of("ntoskrnl.exe");
    assert!(ntoskrnl.contains(&"DbgPrint"), "{ntoskrnl:?}");
    let machine = boot();
    for export in ["TeredoMonitorClassifyPort", "TeredoClassify"] {
        assert!(machine.export(export).is_some(), "exports {export}");
    }
}

#[test]
#[cfg_attr(
    not(teredo_harness_mingw),
    ignore = "needs x86_64-w64-mingw32-gcc (apt-get install gcc-mingw-w64-x86-64)"
)]
fn the_image_is_within_three_times_the_c_drivers() {
    let c = sysbuild::c_reference_image().expect("the C reference driver builds");
    let (ours, theirs) = (
        sysbuild::image_sizes(image()).expect("ours").file,
        sysbuild::image_sizes(c).expect("C").file,
    );
    assert!(theirs > 0);
    assert!(
        ours <= 3 * theirs,
        "the port monitor is {ours} bytes, the C driver {theirs} bytes"
    );
}

#[test]
fn in_every_order_it_registers_follows_the_client_allocates_nothing_and_unloads_clean() {
    let mut ran = 0;
    for order in ORDERS {
        kernel::set_initial_delivery(order);
        let machine = boot();
        assert_eq!(
            classify(&machine),
            u32::MAX,
            "{order:?}: not registered yet"
        );
        let running = ok(machine.on_cpu("client start", 0, kernel::client::start));
        assert_eq!(
            ok(machine.driver_entry()),
            STATUS_SUCCESS,
            "{order:?}\n{}",
            output()
        );
        assert!(
            kernel::wait_for_initial_notifications(std::time::Duration::from_secs(10)),
            "{order:?}: the initial notification was delivered"
        );
        let netio = kernel::netio_stats();
        assert_eq!(netio.calls, [1, 1, 0], "{order:?}: notify, seed, no cancel");
        assert_eq!(classify(&machine), u32::from(running), "{order:?}: seeded");
        let moved = ok(machine.on_cpu("client restart", 0, kernel::client::start));
        assert_eq!(classify(&machine), u32::from(moved), "{order:?}: followed");
        assert_eq!(
            teredo_classify(&machine, moved),
            1,
            "{order:?}: the dynamic port"
        );
        assert_eq!(
            teredo_classify(&machine, running),
            0,
            "{order:?}: not the old one"
        );
        ok(machine.on_cpu("client stop", 0, kernel::client::stop));
        assert_eq!(
            classify(&machine),
            0,
            "{order:?}: MibDeleteInstance clears it"
        );
        assert_eq!(
            teredo_classify(&machine, 3544),
            1,
            "{order:?}: 3544 is a Teredo local port"
        );
        assert_eq!(
            teredo_classify(&machine, moved),
            0,
            "{order:?}: stopped: no port"
        );
        let text = output();
        assert_eq!(
            text.matches("MibInitialNotification").count(),
            1,
            "{order:?}: one initial notification logged\n{text}"
        );
        assert!(
            text.contains("DriverEntry: loaded; seed"),
            "{order:?}\n{text}"
        );
        unload_clean(&machine);
        assert_eq!(
            kernel::pool_stats().allocations,
            0,
            "{order:?}: the static form allocates nothing"
        );
        ran += 1;
    }
    kernel::set_initial_delivery(teredo_harness::kernel::InitialDelivery::BeforeReturn);
    assert_eq!(ran, ORDERS.len());
}

#[test]
fn driver_entry_fails_on_each_documented_status_and_leaves_nothing() {
    foreign::driver_entry_fails_on_each_documented_status(boot);
}

#[test]
fn a_failed_cancel_keeps_the_image_loaded_and_silences_the_logger() {
    let machine = boot();
    assert_eq!(ok(machine.driver_entry()), STATUS_SUCCESS);
    kernel::fail_next(NetioCall::Cancel, STATUS_INVALID_HANDLE);
    assert!(ok(machine.driver_unload()));
    let text = output();
    assert!(text.contains("the image stays loaded"), "{text}");
    assert_eq!(kernel::netio_stats().live.len(), 1, "still registered");
    assert!(
        kernel::driver_object_references() > 0,
        "the driver took a reference on its object"
    );
    // A late notification runs mapped code, and the silenced logger prints nothing.
    let lines = kernel::debugger_output().len();
    ok(machine.on_cpu("client start", 0, kernel::client::start));
    assert_eq!(kernel::debugger_output().len(), lines, "silenced");
    assert_eq!(kernel::stopped(), None);
}
