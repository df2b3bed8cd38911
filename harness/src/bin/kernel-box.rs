//! The main job: builds the example driver into a real `.sys`, shows its import table,
//! loads it into the harness and runs the scenario, printing the driver's own debugger
//! output and the final checks. Exits non-zero when a check fails or the machine stops.
//!
//! What this proves and what it does not: `docs/harness.md`.

#[cfg(all(target_arch = "x86_64", unix))]
use std::process::ExitCode;
#[cfg(all(target_arch = "x86_64", unix))]
use std::sync::Arc;
#[cfg(all(target_arch = "x86_64", unix))]
use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(all(target_arch = "x86_64", unix))]
use teredo_harness::kernel::{self, Delivery};
#[cfg(all(target_arch = "x86_64", unix))]
use teredo_harness::{Machine, Stop, pe, sysbuild};

#[cfg(all(target_arch = "x86_64", unix))]
struct Checks(Vec<(bool, String)>);

#[cfg(all(target_arch = "x86_64", unix))]
impl Checks {
    fn check(&mut self, holds: bool, what: impl Into<String>) {
        self.0.push((holds, what.into()));
    }
}

/// The harness runs Windows x64 machine code in this process: only on an x86-64 Unix host.
#[cfg(not(all(target_arch = "x86_64", unix)))]
fn main() -> std::process::ExitCode {
    eprintln!("kernel-box runs on x86-64 Unix only");
    std::process::ExitCode::FAILURE
}

#[cfg(all(target_arch = "x86_64", unix))]
fn section(title: &str) {
    println!("\n==> {title}");
}

#[cfg(all(target_arch = "x86_64", unix))]
fn main() -> ExitCode {
    section("building the driver image (rust-lld as lld-link, kernel-shim platform)");
    println!("    cargo {}", sysbuild::cargo_args().join(" "));
    let path = match sysbuild::build_sys() {
        Ok(path) => path,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let sys = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) => {
            eprintln!("reading {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    };
    println!("    {} ({} bytes)", path.display(), sys.len());

    let facts = match pe::facts(&sys) {
        Ok(facts) => facts,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    section("PE headers");
    println!(
        "    machine {:#06x} (AMD64: {}), PE32+: {}, subsystem {} (NATIVE: {})",
        facts.machine,
        facts.machine == pe::MACHINE_AMD64,
        facts.is_64,
        facts.subsystem,
        facts.subsystem == pe::SUBSYSTEM_NATIVE
    );
    println!(
        "    entry point RVA {:#x} = {:?}; checksum stored {:#010x}, computed {:#010x}",
        facts.entry_rva, facts.entry_names, facts.checksum_stored, facts.checksum_computed
    );
    println!(
        "    preferred base {:#x}, SizeOfImage {:#x}, DllCharacteristics {:#06x}",
        facts.image_base, facts.size_of_image, facts.dll_characteristics
    );
    section("import table");
    for module in facts.modules() {
        println!("    {module}");
        for name in facts.imports_of(module) {
            println!("        {name}");
        }
    }

    section("loading into the harness");
    let machine = match Machine::boot(&sys, true) {
        Ok(machine) => machine,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "    mapped at {:#x} (preferred {:#x}), {} relocations applied, {} imports bound",
        machine.image().base(),
        machine.image().preferred_base(),
        machine.image().relocations_applied(),
        machine.image().imports_bound()
    );

    section("running the driver (its own DbgPrint output, and [harness] steps)");
    let mut checks = Checks(Vec::new());
    checks.check(facts.machine == pe::MACHINE_AMD64, "AMD64 image");
    checks.check(facts.subsystem == pe::SUBSYSTEM_NATIVE, "subsystem NATIVE");
    checks.check(
        facts.entry_names == ["DriverEntry"],
        "entry point is DriverEntry",
    );
    checks.check(
        facts.checksum_stored != 0 && facts.checksum_stored == facts.checksum_computed,
        "PE checksum valid",
    );
    let modules = facts.modules();
    checks.check(
        modules.len() == 2 && modules.contains(&"netio.sys") && modules.contains(&"ntoskrnl.exe"),
        "imports only from netio.sys and ntoskrnl.exe (no iphlpapi.dll, no user-mode DLL)",
    );
    if let Err(stop) = run(&machine, &mut checks) {
        checks.check(false, format!("the scenario ran to the end: {stop}"));
    }

    section("final checks");
    let failed = checks.0.iter().filter(|(holds, _)| !holds).count();
    for (holds, what) in &checks.0 {
        println!("    [{}] {what}", if *holds { " ok " } else { "FAIL" });
    }
    println!(
        "\nkernel-box: {} of {} checks hold; the .sys is {} bytes",
        checks.0.len() - failed,
        checks.0.len(),
        sys.len()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(all(target_arch = "x86_64", unix))]
fn run(machine: &Machine, checks: &mut Checks) -> Result<(), Stop> {
    kernel::note("DriverEntry at PASSIVE_LEVEL");
    let status = machine.driver_entry()?;
    checks.check(status == 0, format!("DriverEntry returned {status:#010x}"));
    let initial = kernel::debugger_output()
        .iter()
        .any(|l| l.contains("MibInitialNotification"));
    checks.check(
        initial,
        "the initial notification reached the driver's callback",
    );

    kernel::note("the Teredo client starts");
    machine.on_cpu("client start", 0, kernel::client::start)?;

    kernel::note(
        "callbacks now at DISPATCH_LEVEL; two threads restart the client, a third classifies",
    );
    kernel::set_callback_irql(kernel::DISPATCH_LEVEL);
    let classify = machine
        .export("TeredoMonitorClassifyPort")
        .expect("the shim exports the classify stand-in");
    let stop = Arc::new(AtomicBool::new(false));
    let reader_stop = Arc::clone(&stop);
    let reader = machine.spawn("classify", kernel::DISPATCH_LEVEL, move || {
        // SAFETY: `TeredoMonitorClassifyPort` is `unsafe extern "system" fn() -> u32` in
        // the shim, callable at <= DISPATCH_LEVEL while the driver is loaded; DriverUnload
        // runs only after this thread has been joined.
        let classify =
            unsafe { std::mem::transmute::<usize, extern "win64" fn() -> u32>(classify) };
        let mut reads = 0u64;
        while !reader_stop.load(Ordering::Relaxed) {
            std::hint::black_box(classify());
            reads += 1;
        }
        (reads, classify())
    });
    let changers: Vec<_> = (0..2)
        .map(|n| {
            machine.spawn(&format!("restarts {n}"), 0, || {
                (0..2)
                    .map(|_| kernel::client::start())
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    for changer in changers {
        machine.join(changer)?;
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, last_read) = machine.join(reader)?;
    let client = kernel::client::port().map_or(0, u32::from);
    kernel::note(&format!(
        "classify read the port {reads} times meanwhile; now {last_read}, client on {client}"
    ));
    checks.check(last_read == client, "classify reads the client's last port");

    kernel::set_callback_irql(kernel::PASSIVE_LEVEL);
    kernel::note("the Teredo client stops");
    machine.on_cpu("client stop", 0, kernel::client::stop)?;

    kernel::note("DriverUnload at PASSIVE_LEVEL");
    let unloaded = machine.driver_unload()?;
    checks.check(unloaded, "DriverEntry set DriverUnload, and it returned");
    let netio = kernel::netio_stats();
    checks.check(
        netio.live.is_empty(),
        format!(
            "every handle cancelled ({} registered, 0 live)",
            netio.handles.len()
        ),
    );
    let pool = kernel::pool_stats();
    checks.check(
        pool.balanced(),
        format!(
            "pool balanced ({} allocations, {} frees, peak {} bytes)",
            pool.allocations, pool.frees, pool.peak_bytes
        ),
    );

    kernel::note("a late notification on the cancelled handle (the image is now inaccessible)");
    let mut dropped = true;
    for handle in netio.handles {
        let late = machine.on_cpu("late notification", 0, move || {
            kernel::deliver(handle, 40_000, kernel::MIB_PARAMETER_NOTIFICATION)
        })?;
        dropped &= late == Delivery::Dropped;
    }
    checks.check(
        dropped && kernel::netio_stats().delivered == netio.delivered,
        "the late notification never reached driver code",
    );
    checks.check(kernel::stopped().is_none(), "no bugcheck");
    Ok(())
}
