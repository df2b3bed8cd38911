//! The main job: builds the example driver into a real `.sys` (or takes any driver image
//! given with `--image PATH`), shows its headers and import table, loads it into the
//! harness and runs the scenario, printing the driver's own debugger output and the final
//! checks. Exits non-zero when a check fails or the machine stops.
//!
//! ```text
//! kernel-box                 # our teredo-monitor .sys, built now; checks its log too;
//!                            # last, its size against the C reference driver's
//! kernel-box --image PATH    # any WDM driver image; checks the kernel model's records
//! kernel-box --sizes         # the size table: ours, ours without its log, the C driver
//! ```
//!
//! What this proves and what it does not: `docs/harness.md`.

/// The harness runs Windows x64 machine code in this process: only on an x86-64 Unix host.
#[cfg(not(all(target_arch = "x86_64", unix)))]
fn main() -> std::process::ExitCode {
    eprintln!("kernel-box runs on x86-64 Unix only");
    std::process::ExitCode::FAILURE
}

#[cfg(all(target_arch = "x86_64", unix))]
fn main() -> std::process::ExitCode {
    host::main()
}

#[cfg(all(target_arch = "x86_64", unix))]
mod host {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::PathBuf;
    use std::process::ExitCode;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::{Duration, Instant};

    use teredo_harness::firewall::{self, Kind, Verdicts};
    use teredo_harness::kernel::{self, Delivery, Verdict};
    use teredo_harness::{Machine, Stop, pe, sysbuild};

    /// The export a driver may provide for the concurrent reader: `ULONG NTAPI (void)`, callable
    /// at `DISPATCH_LEVEL` while the driver is loaded, returning the port it currently allows.
    const CLASSIFY_EXPORT: &str = "TeredoMonitorClassifyPort";
    /// Client restarts in the concurrent phase, made alternately by two threads.
    const CHANGES: usize = 8;
    /// How long a step of the handshake may wait for the other threads before giving up.
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long the driver may take to commit the filters for a new port.
    const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Threads replaying traffic through the committed filters.
    const REPLAYERS: usize = 2;
    /// Traffic rounds (over all replay threads) after each commit before the next change,
    /// and before the replay stops once quiet: the floor of traffic through every snapshot
    /// of the changes.
    const ROUNDS_PER_WINDOW: usize = 50;

    /// Whose image runs: ours (its log lines are known) or any other (only the kernel model's
    /// records are checked).
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Subject {
        Ours,
        Foreign,
    }

    struct Checks(Vec<(bool, String)>);

    impl Checks {
        fn check(&mut self, holds: bool, what: impl Into<String>) {
            self.0.push((holds, what.into()));
        }
    }

    fn section(title: &str) {
        println!("\n==> {title}");
    }

    fn usage() -> ExitCode {
        eprintln!("usage: kernel-box [--image PATH | --sizes]");
        eprintln!("  without options: builds examples/teredo-monitor into its .sys and runs it");
        eprintln!("  --image PATH:    loads the given x64 WDM driver image instead");
        eprintln!("  --sizes:         builds the images and prints their sizes (PERFORMANCE.md)");
        ExitCode::from(2)
    }

    /// What to do.
    enum Mode {
        /// Build and run our image.
        Ours,
        /// Run the given image.
        Image(PathBuf),
        /// Print the size table.
        Sizes,
    }

    fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Mode, ()> {
        match (args.next().as_deref(), args.next(), args.next()) {
            (None, _, _) => Ok(Mode::Ours),
            (Some("--image"), Some(path), None) => Ok(Mode::Image(PathBuf::from(path))),
            (Some("--sizes"), None, _) => Ok(Mode::Sizes),
            _ => Err(()),
        }
    }

    /// The goal on the size of our image of the C reference driver's job
    /// (`examples/teredo-port-monitor`) against the C driver's.
    const SIZE_GOAL: f64 = 3.0;

    /// `ratio sys_size_vs_c VALUE goal <=3 VERDICT (OURS B / C B)`, the format of the
    /// benchmarks' ratio lines.
    fn size_ratio_line(name: &str, ours: usize, c: usize, goal: Option<f64>) -> String {
        #[allow(clippy::cast_precision_loss, reason = "sizes far below 2^52")]
        let value = ours as f64 / c as f64;
        let (goal, verdict) = match goal {
            Some(goal) => (
                format!("<={goal}"),
                if value <= goal { "met" } else { "MISSED" },
            ),
            None => ("none".to_owned(), "info"),
        };
        format!("ratio {name} {value:.3} goal {goal} {verdict} ({ours} B / {c} B)")
    }

    /// One row of the size table.
    fn size_row(what: &str, image: &[u8]) -> Result<sysbuild::ImageSizes, String> {
        let sizes = sysbuild::image_sizes(image)?;
        println!(
            "    {what:<44} {:>6} bytes   code {:>6}   other sections {:>6}",
            sizes.file, sizes.code, sizes.other_sections
        );
        Ok(sizes)
    }

    /// The C reference driver's image, when mingw-w64 is here.
    fn c_image() -> Result<Vec<u8>, String> {
        if !sysbuild::MINGW_AVAILABLE {
            return Err(format!(
                "{} was not found when kernel-box was built",
                sysbuild::MINGW_GCC
            ));
        }
        let path = sysbuild::build_c_reference()?;
        std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))
    }

    /// The sizes against the C reference driver's (the end of the main job): the image of
    /// the same job (the port monitor, with the goal) and the firewall image that just ran.
    fn print_size_comparison(ours: &[u8]) {
        section("image size against the C reference driver (examples/c-reference, mingw-w64)");
        let c = match c_image() {
            Ok(c) => c,
            Err(error) => {
                println!("    C reference driver not built: {error}");
                return;
            }
        };
        let rows = (|| {
            let same_job = sysbuild::port_monitor_image()?;
            Ok::<_, String>((
                size_row("teredo_port_monitor.sys (the C driver's job)", same_job)?,
                size_row("teredo_monitor.sys (the firewall, this run)", ours)?,
                size_row("teredo_reference.sys (gcc -O2, GNU ld)", &c)?,
            ))
        })();
        match rows {
            Ok((p, o, r)) => {
                println!(
                    "    {}",
                    size_ratio_line("sys_size_vs_c", p.file, r.file, Some(SIZE_GOAL))
                );
                println!(
                    "    {}",
                    size_ratio_line("firewall_sys_size_vs_c", o.file, r.file, None)
                );
            }
            Err(error) => println!("    {error}"),
        }
    }

    /// `--sizes`: builds the port monitor (the C driver's job in Rust), the firewall image
    /// and the same without the driver's log, and the C reference driver; prints their sizes
    /// and the ratios (the goal is on the image of the same job).
    fn sizes() -> ExitCode {
        let built = (|| {
            let ours = sysbuild::sys_image()?.to_vec();
            let path = sysbuild::build_variant(sysbuild::Variant::NoLog)?;
            let quiet = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let same_job = sysbuild::port_monitor_image()?.to_vec();
            Ok::<_, String>((same_job, ours, quiet, c_image()?))
        })();
        let (same_job, ours, quiet, c) = match built {
            Ok(images) => images,
            Err(error) => {
                eprintln!("{error}");
                return ExitCode::FAILURE;
            }
        };
        section(
            "image sizes (file; code = executable sections; other = the rest, by virtual size)",
        );
        let rows = (|| {
            Ok::<_, String>((
                size_row("teredo_port_monitor.sys (the C driver's job)", &same_job)?,
                size_row("teredo_monitor.sys (firewall, release)", &ours)?,
                size_row("teredo_monitor.sys (firewall, no-log)", &quiet)?,
                size_row("teredo_reference.sys (C, gcc -O2)", &c)?,
            ))
        })();
        match rows {
            Ok((same, fw, quiet_fw, cref)) => {
                println!(
                    "    the driver's log: {} bytes of file, {} of code",
                    fw.file.saturating_sub(quiet_fw.file),
                    fw.code.saturating_sub(quiet_fw.code)
                );
                println!(
                    "{}",
                    size_ratio_line("sys_size_vs_c", same.file, cref.file, Some(SIZE_GOAL))
                );
                println!(
                    "{}",
                    size_ratio_line("firewall_sys_size_vs_c", fw.file, cref.file, None)
                );
                println!(
                    "{}",
                    size_ratio_line(
                        "firewall_sys_size_no_log_vs_c",
                        quiet_fw.file,
                        cref.file,
                        None
                    )
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::FAILURE
            }
        }
    }

    fn our_image() -> Result<PathBuf, String> {
        section("building the driver image (rust-lld as lld-link, kernel-shim platform)");
        println!("    cargo {}", sysbuild::cargo_args().join(" "));
        sysbuild::build_sys()
    }

    pub(super) fn main() -> ExitCode {
        let image = match parse_args(std::env::args().skip(1)) {
            Ok(Mode::Ours) => None,
            Ok(Mode::Image(path)) => Some(path),
            Ok(Mode::Sizes) => return sizes(),
            Err(()) => return usage(),
        };
        let subject = if image.is_some() {
            Subject::Foreign
        } else {
            Subject::Ours
        };
        let path = match image.map_or_else(our_image, Ok) {
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
        let facts = match pe::facts(&sys) {
            Ok(facts) => facts,
            Err(error) => {
                eprintln!("{}: {error}", path.display());
                return ExitCode::FAILURE;
            }
        };
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        section("the image");
        println!(
            "    {name}: {} bytes, entry point RVA {:#x} ({})",
            sys.len(),
            facts.entry_rva,
            if facts.entry_names.is_empty() {
                "no export names it".to_owned()
            } else {
                format!("exported as {}", facts.entry_names.join(", "))
            }
        );
        println!("    from {}", path.display());
        print_headers(&facts);

        let mut checks = Checks(Vec::new());
        header_checks(&facts, subject, &mut checks);
        section("loading into the harness");
        match Machine::boot(&sys, true) {
            Ok(machine) => {
                println!(
                    "    mapped at {:#x} (preferred {:#x}), {} relocations applied, {} imports \
                     bound",
                    machine.image().base(),
                    machine.image().preferred_base(),
                    machine.image().relocations_applied(),
                    machine.image().imports_bound()
                );
                section("running the driver (its own DbgPrint output, and [harness] steps)");
                let filters = has_module(&facts.modules(), "fwpkclnt.sys");
                if let Err(stop) = run(&machine, subject, filters, &mut checks) {
                    checks.check(false, format!("the scenario ran to the end: {stop}"));
                }
            }
            Err(error) => {
                println!("    {error}");
                checks.check(false, format!("the image loads into the harness: {error}"));
            }
        }

        if subject == Subject::Ours {
            print_size_comparison(&sys);
        }

        section("final checks");
        let failed = checks.0.iter().filter(|(holds, _)| !holds).count();
        for (holds, what) in &checks.0 {
            println!("    [{}] {what}", if *holds { " ok " } else { "FAIL" });
        }
        println!(
            "\nkernel-box: {} of {} checks hold; {name} is {} bytes",
            checks.0.len() - failed,
            checks.0.len(),
            sys.len()
        );
        // The firewall's verdict line (checked above), last, as the main job's result.
        if let Some((_, line)) = checks
            .0
            .iter()
            .find(|(_, what)| what.starts_with("firewall: "))
        {
            println!("{}", line.split(" (the oracle").next().unwrap_or(line));
        }
        if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }

    fn print_headers(facts: &pe::PeFacts) {
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
            "    checksum stored {:#010x}, computed {:#010x}; base relocations: {}",
            facts.checksum_stored, facts.checksum_computed, facts.has_relocations
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
    }

    /// Whether `modules` names `wanted`, compared without case as the Windows loader does.
    fn has_module(modules: &[&str], wanted: &str) -> bool {
        modules.iter().any(|m| m.eq_ignore_ascii_case(wanted))
    }

    fn header_checks(facts: &pe::PeFacts, subject: Subject, checks: &mut Checks) {
        checks.check(facts.machine == pe::MACHINE_AMD64, "AMD64 image");
        checks.check(facts.subsystem == pe::SUBSYSTEM_NATIVE, "subsystem NATIVE");
        let modules = facts.modules();
        match subject {
            Subject::Ours => {
                checks.check(
                    facts.entry_names == ["DriverEntry"],
                    "entry point is DriverEntry",
                );
                checks.check(
                    facts.checksum_stored != 0 && facts.checksum_stored == facts.checksum_computed,
                    "PE checksum valid",
                );
                let allowed = ["netio.sys", "ntoskrnl.exe", "fwpkclnt.sys"];
                checks.check(
                    modules.iter().all(|m| has_module(&allowed, m))
                        && allowed.iter().all(|m| has_module(&modules, m)),
                    format!(
                        "imports from netio.sys, ntoskrnl.exe and fwpkclnt.sys only (no \
                         iphlpapi.dll, no fwpuclnt.dll, no user-mode DLL; modules: {})",
                        modules.join(", ")
                    ),
                );
            }
            Subject::Foreign => {
                // A stored checksum of 0 means "not set" (GNU ld writes none unless asked); a
                // non-zero one must be right.
                checks.check(
                    facts.checksum_stored == 0 || facts.checksum_stored == facts.checksum_computed,
                    format!(
                        "PE checksum absent or valid (stored {:#010x})",
                        facts.checksum_stored
                    ),
                );
                let kernel_modules = ["ntoskrnl.exe", "hal.dll", "netio.sys", "fwpkclnt.sys"];
                let user_mode: Vec<&str> = modules
                    .iter()
                    .copied()
                    .filter(|m| !has_module(&kernel_modules, m))
                    .collect();
                checks.check(
                    user_mode.is_empty() && has_module(&modules, "netio.sys"),
                    format!(
                        "imports the Teredo API from netio.sys and nothing from user mode \
                         (modules: {})",
                        modules.join(", ")
                    ),
                );
            }
        }
    }

    /// Waits until the model has delivered at least `count` callbacks, at most `timeout` (a
    /// netio ordering may deliver the initial notification after `NotifyTeredoPortChange`
    /// returned, from another thread). Returns the count reached.
    fn delivered_at_least(count: u64, timeout: Duration) -> u64 {
        let start = Instant::now();
        loop {
            let delivered = kernel::netio_stats().delivered;
            if delivered >= count || start.elapsed() > timeout || kernel::stopped().is_some() {
                return delivered;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[allow(clippy::too_many_lines, reason = "the scenario, read top to bottom")]
    fn run(
        machine: &Machine,
        subject: Subject,
        filters: bool,
        checks: &mut Checks,
    ) -> Result<(), Stop> {
        kernel::note("DriverEntry at PASSIVE_LEVEL");
        let status = machine.driver_entry()?;
        checks.check(status == 0, format!("DriverEntry returned {status:#010x}"));
        let fw = if filters {
            entry_filter_checks(checks);
            Some(Firewall::start(machine))
        } else {
            println!("firewall: skipped (the image imports nothing from fwpkclnt.sys)");
            None
        };
        let registered = kernel::netio_stats().handles.len();
        checks.check(
            registered >= 1,
            format!("DriverEntry registered for Teredo port changes ({registered} handles)"),
        );
        let initial = delivered_at_least(registered as u64, Duration::from_secs(5));
        match subject {
            Subject::Ours => checks.check(
                kernel::debugger_output()
                    .iter()
                    .any(|l| l.contains("MibInitialNotification")),
                "the initial notification reached the driver's callback",
            ),
            Subject::Foreign => checks.check(
                initial == registered as u64,
                format!(
                    "the initial notification reached each registration's callback \
                     ({initial} delivered, {registered} registered)"
                ),
            ),
        }

        kernel::note("the Teredo client starts");
        let before = kernel::netio_stats();
        let notified = Instant::now();
        let first = machine.on_cpu("client start", 0, kernel::client::start)?;
        if let Some(fw) = &fw {
            fw.traffic.notified(notified, first);
            let committed =
                fw.traffic.wait_committed(first) && fw.traffic.wait_rounds(ROUNDS_PER_WINDOW);
            checks.check(
                committed,
                format!(
                    "the driver committed the exception for the client's first port {first} \
                     (within {COMMIT_TIMEOUT:?})"
                ),
            );
        }
        let after = kernel::netio_stats();
        checks.check(
            after.delivered - before.delivered == before.live.len() as u64,
            format!(
                "the client's start reached every live registration ({} callbacks, {} live)",
                after.delivered - before.delivered,
                before.live.len()
            ),
        );

        concurrent_changes(machine, subject, first, fw.as_ref(), checks)?;
        if let Some(fw) = fw {
            fw.finish(machine, checks)?;
        }

        kernel::note("the Teredo client stops");
        machine.on_cpu("client stop", 0, kernel::client::stop)?;

        kernel::note("DriverUnload at PASSIVE_LEVEL");
        let unloaded = machine.driver_unload()?;
        checks.check(unloaded, "DriverEntry set DriverUnload, and it returned");
        let netio = kernel::netio_stats();
        checks.check(
            netio.live.is_empty(),
            format!(
                "every handle cancelled ({} registered, {} cancel calls, 0 live)",
                netio.handles.len(),
                netio.calls[2]
            ),
        );
        checks.check(
            netio.self_cancels.is_empty(),
            "no cancel from inside a callback of the same handle",
        );
        let pool = kernel::pool_stats();
        checks.check(
            pool.balanced(),
            format!(
                "pool balanced ({} allocations, {} frees, peak {} bytes)",
                pool.allocations, pool.frees, pool.peak_bytes
            ),
        );

        kernel::note("a late notification on every handle (the image is now inaccessible)");
        let lines = kernel::debugger_output().len();
        let mut dropped = 0;
        for handle in &netio.handles {
            let handle = *handle;
            let late = machine.on_cpu("late notification", 0, move || {
                kernel::deliver(handle, 40_000, kernel::MIB_PARAMETER_NOTIFICATION)
            })?;
            dropped += usize::from(late == Delivery::Dropped);
        }
        let printed = kernel::debugger_output().len() - lines;
        checks.check(
            dropped == netio.handles.len()
                && !netio.handles.is_empty()
                && kernel::netio_stats().delivered == netio.delivered
                && printed == 0,
            format!(
                "no callback after unload ({dropped} of {} late notifications dropped)",
                netio.handles.len()
            ),
        );
        if filters {
            let engine = kernel::fwp_stats();
            let work = kernel::work_item_stats();
            checks.check(
                engine.live_sessions.is_empty()
                    && engine.open_transactions == 0
                    && engine.committed == (0, 0, 0),
                format!(
                    "after unload no filter, sublayer, provider, session or transaction is \
                     left ({} sessions opened, {} commits; left: {} sessions, {} transactions, \
                     {:?} providers/sublayers/filters)",
                    engine.sessions_opened,
                    engine.commits,
                    engine.live_sessions.len(),
                    engine.open_transactions,
                    engine.committed
                ),
            );
            checks.check(
                kernel::work_items_outstanding() == 0 && work.live == 0,
                format!(
                    "after unload no work item is queued, running or allocated ({} queued, {} \
                     completed, {} live)",
                    work.queued, work.completed, work.live
                ),
            );
        }
        checks.check(kernel::stopped().is_none(), "no bugcheck");
        Ok(())
    }

    /// The filters `DriverEntry` committed: a dynamic session, our provider and sublayer,
    /// the demo policy in force, no transaction left open.
    fn entry_filter_checks(checks: &mut Checks) {
        let engine = kernel::fwp_stats();
        let snapshot = kernel::committed();
        let analysis = firewall::analyse(&snapshot.objects, &[]);
        checks.check(
            engine.live_sessions.len() == 1 && engine.open_transactions == 0,
            format!(
                "DriverEntry opened one filter engine session and left no transaction open \
                 ({} live, {} open)",
                engine.live_sessions.len(),
                engine.open_transactions
            ),
        );
        checks.check(
            engine.dynamic_sessions == engine.live_sessions,
            "the session is dynamic (FWPM_SESSION_FLAG_DYNAMIC: its objects go with its handle)",
        );
        let objects = &snapshot.objects;
        let universal = kernel::fwp::guid_u128(
            &windows_sys::Win32::NetworkManagement::WindowsFilteringPlatform::FWPM_SUBLAYER_UNIVERSAL,
        );
        let design = objects.filters.values().all(|f| {
            let weight = match f.action {
                kernel::Action::Permit => kernel::Weight::Uint8(10),
                kernel::Action::Block => kernel::Weight::Uint8(1),
            };
            f.sublayer != universal
                && objects.sublayers.contains_key(&f.sublayer)
                && f.provider.is_some()
                && f.weight == weight
        }) && objects.sublayers.len() == 1
            && objects.providers.len() == 1;
        checks.check(
            design,
            format!(
                "the filter design: one provider, one sublayer of it holding every filter, \
                 permits at weight 10 and blocks at weight 1 (FWP_UINT8); {} filters: {} \
                 permits, {} blocks",
                objects.filters.len(),
                objects
                    .filters
                    .values()
                    .filter(|f| f.action == kernel::Action::Permit)
                    .count(),
                objects
                    .filters
                    .values()
                    .filter(|f| f.action == kernel::Action::Block)
                    .count()
            ),
        );
        let (providers, sublayers, filters) = engine.committed;
        checks.check(
            providers >= 1 && sublayers >= 1 && filters >= 1 && analysis.policy,
            format!(
                "DriverEntry committed its provider, sublayer and filters with the demo policy \
                 in force ({providers} providers, {sublayers} sublayers, {filters} filters, \
                 generation {})",
                snapshot.generation
            ),
        );
    }

    /// What the traffic threads, the changers and the harness share.
    #[derive(Default)]
    struct Traffic {
        /// When netio began delivering each port, oldest first.
        notifications: Mutex<Vec<(Instant, u16)>>,
        /// The client's current and previous port, as the packet source addresses them.
        ports: Mutex<(Option<u16>, Option<u16>)>,
        /// Set to stop the replay threads.
        stop: AtomicBool,
        /// Waits for a commit that timed out.
        commit_timeouts: AtomicUsize,
        /// Traffic rounds completed, over all replay threads.
        rounds: AtomicUsize,
    }

    impl Traffic {
        /// netio began delivering `port` at `at`.
        fn notified(&self, at: Instant, port: u16) {
            self.notifications
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((at, port));
            let mut ports = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
            *ports = (Some(port), ports.0);
        }

        /// Waits until the replay threads completed `more` rounds after now (so the
        /// snapshot committed now carries traffic), at most [`COMMIT_TIMEOUT`].
        fn wait_rounds(&self, more: usize) -> bool {
            let start = Instant::now();
            let target = self.rounds.load(Ordering::SeqCst) + more;
            while self.rounds.load(Ordering::SeqCst) < target {
                if start.elapsed() > COMMIT_TIMEOUT || kernel::stopped().is_some() {
                    return false;
                }
                std::thread::yield_now();
            }
            true
        }

        fn reported(&self) -> Vec<u16> {
            self.notifications
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(_, p)| *p)
                .collect()
        }

        /// Waits until the committed port is `port`, at most [`COMMIT_TIMEOUT`].
        fn wait_committed(&self, port: u16) -> bool {
            let start = Instant::now();
            let reported = self.reported();
            loop {
                let snapshot = kernel::committed();
                if firewall::analyse(&snapshot.objects, &reported).committed == Some(port) {
                    return true;
                }
                if start.elapsed() > COMMIT_TIMEOUT || kernel::stopped().is_some() {
                    self.commit_timeouts.fetch_add(1, Ordering::SeqCst);
                    return false;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// The firewall part of the scenario: replay threads from `DriverEntry` on.
    struct Firewall {
        traffic: Arc<Traffic>,
        replayers: Vec<teredo_harness::machine::Cpu<Verdicts>>,
        from: Instant,
    }

    impl Firewall {
        fn start(machine: &Machine) -> Firewall {
            let traffic = Arc::new(Traffic::default());
            kernel::note(&format!(
                "{REPLAYERS} threads replay traffic through the committed filters"
            ));
            let replayers = (0..REPLAYERS)
                .map(|n| {
                    let traffic = Arc::clone(&traffic);
                    machine.spawn(&format!("traffic {n}"), kernel::PASSIVE_LEVEL, move || {
                        let mut verdicts = Verdicts::default();
                        let mut round = 0;
                        while !traffic.stop.load(Ordering::SeqCst) {
                            let (current, previous) =
                                *traffic.ports.lock().unwrap_or_else(PoisonError::into_inner);
                            firewall::replay_round(current, previous, round, &mut verdicts);
                            round += 1;
                            traffic.rounds.fetch_add(1, Ordering::SeqCst);
                            std::thread::yield_now();
                        }
                        verdicts
                    })
                })
                .collect();
            Firewall {
                traffic,
                replayers,
                from: Instant::now(),
            }
        }

        /// Once quiet: the committed port is the client's, the explicit traffic checks, the
        /// oracle's judgement of every verdict and the commit checks.
        #[allow(
            clippy::too_many_lines,
            reason = "the firewall checks, one after the other"
        )]
        fn finish(self, machine: &Machine, checks: &mut Checks) -> Result<(), Stop> {
            let client = kernel::client::port();
            let quiet = client.is_some_and(|p| self.traffic.wait_committed(p))
                && self.traffic.wait_rounds(ROUNDS_PER_WINDOW);
            let until = Instant::now();
            self.traffic.stop.store(true, Ordering::SeqCst);
            let mut verdicts = Verdicts::default();
            for replayer in self.replayers {
                verdicts.merge(machine.join(replayer)?);
            }
            let reported = self.traffic.reported();
            let snapshot = kernel::committed();
            let analysis = firewall::analyse(&snapshot.objects, &reported);
            checks.check(
                quiet && analysis.committed == client,
                format!(
                    "once quiet the committed port is the client's ({:?}, client {client:?})",
                    analysis.committed
                ),
            );
            // The explicit checks, on the final snapshot.
            let (current, previous) = *self
                .traffic
                .ports
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let explicit: Vec<(Kind, kernel::Packet)> = firewall::traffic(current, previous, 0);
            let verdict_of = |kind: Kind| {
                explicit.iter().find(|(k, _)| *k == kind).map(|(k, p)| {
                    let (verdict, _, generation) = kernel::classify(p);
                    (*k, *p, verdict, generation)
                })
            };
            for (kind, want, what) in [
                (
                    Kind::CurrentPort,
                    Verdict::Permit,
                    "traffic to the current Teredo port permitted",
                ),
                (
                    Kind::PreviousPort,
                    Verdict::Block,
                    "traffic to the previous port blocked once the change committed",
                ),
                (
                    Kind::UnicastStatic,
                    Verdict::Block,
                    "unicast traffic to local 3544 blocked",
                ),
                (
                    Kind::MulticastStatic,
                    Verdict::Permit,
                    "224.0.0.253:3544 (local discovery) permitted",
                ),
                (
                    Kind::Icmpv6Listed,
                    Verdict::Permit,
                    "a listed ICMPv6 type permitted",
                ),
                (
                    Kind::Icmpv6Unlisted,
                    Verdict::Block,
                    "an unlisted ICMPv6 type blocked",
                ),
            ] {
                let got = verdict_of(kind);
                if let Some((k, p, v, g)) = got {
                    verdicts.record(k, p, v, g);
                }
                checks.check(
                    got.is_some_and(|(_, _, v, _)| v == want),
                    format!("{what} ({:?})", got.map(|(_, p, v, _)| (p.local_port, v))),
                );
            }

            let history = kernel::commit_history();
            let judgement = firewall::judge(&verdicts, &history, &reported);
            let notifications = self
                .traffic
                .notifications
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let commits = firewall::commit_checks(&history, &notifications, self.from, until);
            kernel::note(&format!(
                "{} classifications through {} committed snapshots; by kind (permitted, \
                 blocked): {:?}",
                verdicts.total(),
                judgement.generations,
                judgement.by_kind
            ));
            match firewall::lag_summary(&commits.lags) {
                Some((min, median, max)) => println!(
                    "exception lag (netio's notification to the commit that makes its port the \
                     committed one): min {} us, median {} us, max {} us over {} notifications",
                    min.as_micros(),
                    median.as_micros(),
                    max.as_micros(),
                    commits.lags.len()
                ),
                None => println!("exception lag: no notification was committed"),
            }
            println!(
                "firewall: {} permitted, {} blocked, {} wrong verdicts",
                judgement.permitted, judgement.blocked, judgement.wrong
            );
            for example in &judgement.examples {
                println!("    wrong: {example}");
            }
            let windows = notifications.len();
            checks.check(
                judgement.generations > windows
                    && verdicts.total() >= (ROUNDS_PER_WINDOW * windows) as u64,
                format!(
                    "traffic through every committed port: {} classifications through {} \
                     snapshots ({windows} ports committed; floor: {ROUNDS_PER_WINDOW} rounds \
                     after each commit, more than {windows} snapshots)",
                    verdicts.total(),
                    judgement.generations
                ),
            );
            checks.check(
                judgement.wrong == 0 && judgement.permitted > 0 && judgement.blocked > 0,
                format!(
                    "firewall: {} permitted, {} blocked, {} wrong verdicts (the oracle: the \
                     Teredo rules for the port committed at that moment)",
                    judgement.permitted, judgement.blocked, judgement.wrong
                ),
            );
            checks.check(
                commits.examined >= 1
                    && commits.unreported.is_empty()
                    && commits.doubles.is_empty()
                    && commits.without_policy.is_empty(),
                format!(
                    "every committed dynamic port is one netio reported, one at a time, with the \
                     policy in force ({} commits examined; unreported {:?}, doubles {:?}, \
                     without policy {:?})",
                    commits.examined, commits.unreported, commits.doubles, commits.without_policy
                ),
            );
            checks.check(
                commits.gaps.is_empty(),
                format!(
                    "no commit left the live Teredo port without its exception ({} gaps)",
                    commits.gaps.len()
                ),
            );
            let timeouts = self.traffic.commit_timeouts.load(Ordering::SeqCst);
            checks.check(
                commits.never_committed.is_empty() && timeouts == 0 && !commits.lags.is_empty(),
                format!(
                    "every port netio reported was committed ({} notifications, never committed \
                     {:?}, {timeouts} waits timed out)",
                    notifications.len(),
                    commits.never_committed
                ),
            );
            Ok(())
        }
    }

    /// What the changers and the reader share.
    ///
    /// Change `k` (1-based) is started only when `done == k - 1` and `quiet >= k`: the
    /// changes are sequential, and the reader completed a read after change `k - 1` (or,
    /// for the first, after the client's start) and before change `k` began.
    #[derive(Default)]
    struct Handshake {
        /// Changes begun (incremented right before `client::start`).
        started: AtomicUsize,
        /// Changes whose callbacks have all returned (incremented right after).
        done: AtomicUsize,
        /// One more than the highest `k` such that a read ran entirely while
        /// `started == done == k` (0: no such read yet).
        quiet: AtomicUsize,
        /// Set by the harness once every changer has returned.
        stop: AtomicBool,
        /// Set by a thread that gave up waiting, so the others stop waiting too.
        gave_up: AtomicBool,
    }

    impl Handshake {
        /// Spins (yielding) until `ready` holds; `false` after [`HANDSHAKE_TIMEOUT`] or when
        /// another thread gave up.
        fn wait_for(&self, ready: impl Fn(&Self) -> bool) -> bool {
            let start = Instant::now();
            while !ready(self) {
                if self.gave_up.load(Ordering::SeqCst) || start.elapsed() > HANDSHAKE_TIMEOUT {
                    self.gave_up.store(true, Ordering::SeqCst);
                    return false;
                }
                std::thread::yield_now();
            }
            true
        }
    }

    /// What the reader saw (bounded: counts and distinct values, not every read).
    #[derive(Default)]
    struct Reads {
        total: u64,
        /// Reads that ran entirely between change `k` and change `k + 1`, by `k`: how many, and
        /// the distinct values they returned.
        per_window: BTreeMap<usize, (u64, BTreeSet<u32>)>,
        /// Reads during which a change was in flight.
        overlapped: u64,
        /// Every distinct value read.
        values: BTreeSet<u32>,
        /// The last read, made after every change.
        last: u32,
    }

    /// The reader's loop: reads the driver's current port through its classify export at
    /// `DISPATCH_LEVEL` until told to stop, sorting each read by the changes around it.
    fn read_concurrently(classify: extern "win64" fn() -> u32, shake: &Handshake) -> Reads {
        let mut reads = Reads::default();
        loop {
            let stopping = shake.stop.load(Ordering::SeqCst);
            let (s0, d0) = (
                shake.started.load(Ordering::SeqCst),
                shake.done.load(Ordering::SeqCst),
            );
            let value = classify();
            let (s1, d1) = (
                shake.started.load(Ordering::SeqCst),
                shake.done.load(Ordering::SeqCst),
            );
            reads.total += 1;
            reads.last = value;
            reads.values.insert(value);
            if s0 == d0 && s1 == s0 && d1 == d0 {
                // No change began during the read (`started` did not move) and change `d0` had
                // completed before it began: a quiet read in window `d0`.
                let window = reads.per_window.entry(d0).or_default();
                window.0 += 1;
                window.1.insert(value);
                shake.quiet.fetch_max(d0 + 1, Ordering::SeqCst);
            } else {
                reads.overlapped += 1;
            }
            if stopping || shake.gave_up.load(Ordering::SeqCst) {
                return reads;
            }
        }
    }

    /// Two threads restart the client alternately, callbacks at `DISPATCH_LEVEL`, while a third
    /// reads the driver's port through its classify export (when the image has one), with a
    /// handshake that makes the reader complete a read between every two changes.
    fn concurrent_changes(
        machine: &Machine,
        subject: Subject,
        first: u16,
        fw: Option<&Firewall>,
        checks: &mut Checks,
    ) -> Result<(), Stop> {
        kernel::set_callback_irql(kernel::DISPATCH_LEVEL);
        let classify = machine.export(CLASSIFY_EXPORT);
        if subject == Subject::Ours {
            checks.check(
                classify.is_some(),
                format!("the shim exports {CLASSIFY_EXPORT}"),
            );
        }
        kernel::note(&format!(
            "callbacks now at DISPATCH_LEVEL; two threads restart the client {CHANGES} times \
             in turn{}",
            if classify.is_some() {
                ", a third classifies between every two restarts"
            } else {
                " (the image exports no classify routine: no concurrent reader)"
            }
        ));
        let shake = Arc::new(Handshake::default());
        let reader = classify.map(|classify| {
            let shake = Arc::clone(&shake);
            machine.spawn("classify", kernel::DISPATCH_LEVEL, move || {
                // SAFETY: the classify export is `ULONG NTAPI (void)` (the contract of
                // `CLASSIFY_EXPORT`, which our shim and the C reference keep), callable at
                // <= DISPATCH_LEVEL while the driver is loaded; DriverUnload runs only after
                // this thread has been joined.
                let classify =
                    unsafe { std::mem::transmute::<usize, extern "win64" fn() -> u32>(classify) };
                read_concurrently(classify, &shake)
            })
        });
        let reading = reader.is_some();
        // ports[k] is the client's port after change k (ports[0]: before the first).
        let ports = Arc::new(Mutex::new(vec![first]));
        let before = kernel::netio_stats();
        let traffic = fw.map(|fw| Arc::clone(&fw.traffic));
        let changers: Vec<_> = (0..2)
            .map(|n| {
                let (shake, ports) = (Arc::clone(&shake), Arc::clone(&ports));
                let traffic = traffic.clone();
                machine.spawn(&format!("restarts {n}"), 0, move || {
                    for k in (n..CHANGES).step_by(2) {
                        // Change k + 1: after change k, and after a quiet read in window k.
                        if !shake.wait_for(|s| {
                            s.done.load(Ordering::SeqCst) == k
                                && (!reading || s.quiet.load(Ordering::SeqCst) > k)
                        }) {
                            return false;
                        }
                        shake.started.fetch_add(1, Ordering::SeqCst);
                        let notified = Instant::now();
                        let port = kernel::client::start();
                        ports
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(port);
                        if let Some(traffic) = &traffic {
                            // The driver's work item commits the new exception; the next
                            // change waits for it, so each change's lag is measured alone.
                            traffic.notified(notified, port);
                            if traffic.wait_committed(port) {
                                traffic.wait_rounds(ROUNDS_PER_WINDOW);
                            }
                        }
                        shake.done.fetch_add(1, Ordering::SeqCst);
                    }
                    true
                })
            })
            .collect();
        let mut finished = true;
        for changer in changers {
            finished &= machine.join(changer)?;
        }
        shake.stop.store(true, Ordering::SeqCst);
        let reads = reader.map(|reader| machine.join(reader)).transpose()?;
        let ports = ports.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let after = kernel::netio_stats();
        kernel::set_callback_irql(kernel::PASSIVE_LEVEL);

        checks.check(
            finished && ports.len() == CHANGES + 1,
            format!(
                "{} of {CHANGES} restarts made, alternately by two threads",
                ports.len() - 1
            ),
        );
        let expected = (CHANGES * before.live.len()) as u64;
        checks.check(
            after.delivered - before.delivered == expected,
            format!(
                "each restart reached every live registration once ({} callbacks, {expected} \
                 expected)",
                after.delivered - before.delivered
            ),
        );
        if let Some(reads) = reads {
            reader_checks(&reads, &ports, checks);
        }
        Ok(())
    }

    /// The checks on what the concurrent reader saw, against `ports[k]`, the client's port
    /// after change `k`.
    fn reader_checks(reads: &Reads, ports: &[u16], checks: &mut Checks) {
        let client = kernel::client::port().map_or(0, u32::from);
        let fewest = (0..=CHANGES)
            .map(|k| reads.per_window.get(&k).map_or(0, |w| w.0))
            .min()
            .unwrap_or(0);
        let quiet: u64 = reads.per_window.values().map(|w| w.0).sum();
        kernel::note(&format!(
            "classify read the port {} times: {quiet} between restarts (fewest in one window: \
             {fewest}), {} while a restart was in flight; last {}, client on {client}",
            reads.total, reads.overlapped, reads.last
        ));
        checks.check(
            fewest >= 1,
            format!(
                "classify ran between every two restarts: {} windows, fewest reads in one \
                 {fewest} (floor 1)",
                CHANGES + 1
            ),
        );
        let stale: Vec<(usize, &BTreeSet<u32>)> = reads
            .per_window
            .iter()
            .filter(|(k, w)| {
                w.1.iter()
                    .any(|v| ports.get(**k).map(|p| u32::from(*p)) != Some(*v))
            })
            .map(|(k, w)| (*k, &w.1))
            .collect();
        checks.check(
            stale.is_empty() && quiet >= 1,
            format!(
                "every read between two restarts returned the port of the restart before it \
                 ({quiet} reads; stale windows: {stale:?})"
            ),
        );
        let had: BTreeSet<u32> = ports.iter().map(|p| u32::from(*p)).collect();
        checks.check(
            reads.values.is_subset(&had),
            format!(
                "every value read was a port the client had ({} distinct values)",
                reads.values.len()
            ),
        );
        checks.check(
            reads.last == client,
            "classify reads the client's last port",
        );
    }
}
