//! The per-packet exception check in the real images: `TeredoClassify(local_port) -> u8`
//! of our `.sys` (`examples/teredo-monitor`, one load of the driver's published word)
//! against the C reference driver's (`examples/c-reference`, an interlocked read of the
//! context's state through its global pointer), both loaded into the harness, both called
//! the way the filter engine calls a classify function: through a function pointer, on a
//! thread at `DISPATCH_LEVEL`, once per packet, while the driver is loaded and its client
//! runs.
//!
//! ```text
//! cargo bench -p teredo-harness --bench classify            # ~15 s once both images are built
//! ```
//!
//! Printed: per-round nanoseconds per call, then
//! `ratio classify_sys_vs_c VALUE goal <=1.1 VERDICT (OURS ns / C ns)` (the median over
//! rounds of the per-round ratio; each round times both images back to back, the order
//! alternating) and `ratio classify_sys_vs_c_instructions VALUE goal <=1.1 VERDICT`:
//! instructions executed inside each image per call over the same packet mix, counted by
//! single-stepping (the trap flag; a `SIGTRAP` handler counts the steps whose next
//! instruction lies in the image). The count is deterministic, so it is the figure to trust
//! on a shared machine; the time says what the instructions cost (the C reference's
//! interlocked read is a locked instruction).
//!
//! Nothing fails on a missed goal; the bench fails if an image does not build, load or
//! answer the packet mix correctly.

/// The harness runs Windows x64 machine code in this process: only on an x86-64 Unix host.
#[cfg(not(all(target_arch = "x86_64", unix)))]
fn main() {
    eprintln!("classify bench: x86-64 Unix only");
}

#[cfg(all(target_arch = "x86_64", unix))]
fn main() {
    if let Err(error) = host::main() {
        eprintln!("classify bench: {error}");
        std::process::exit(1);
    }
}

#[cfg(all(target_arch = "x86_64", unix))]
mod host {
    use std::hint::black_box;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use teredo_harness::{Machine, kernel, sysbuild};

    /// The export both images provide: `UCHAR NTAPI TeredoClassify(USHORT LocalPort)`,
    /// callable at `<= DISPATCH_LEVEL` while the driver is loaded.
    const EXPORT: &str = "TeredoClassify";
    /// The goal on both ratios.
    const GOAL: f64 = 1.1;
    /// Rounds; each boots each image once.
    const ROUNDS: usize = 11;
    /// Timed batches per image per round; the fastest counts (a lost time slice spoils one
    /// batch, not the round).
    const BATCHES: usize = 15;
    /// Passes over the packet mix per batch.
    const PASSES: usize = 2_000;
    /// The Teredo static port.
    const STATIC_PORT: u16 = 3544;

    type Classify = extern "win64" fn(u16) -> u8;

    /// What one image did in one round.
    struct Run {
        ns_per_call: f64,
        allowed: Vec<u8>,
        instructions: u64,
    }

    /// The packet mix: one local port per packet, a quarter of them the client's dynamic
    /// port, an eighth the static port, the rest other ports (most packets a firewall
    /// classifies are not Teredo). `dynamic` is the port the client runs on.
    fn packets(dynamic: u16) -> Vec<u16> {
        (0..64_u16)
            .map(|i| match i % 8 {
                0 | 4 => dynamic,
                2 => STATIC_PORT,
                _ => 40_000 + i * 13,
            })
            .collect()
    }

    /// The answers an exception check must give for `packets`.
    fn expected(packets: &[u16], dynamic: u16) -> Vec<u8> {
        packets
            .iter()
            .map(|&p| u8::from(p == STATIC_PORT || p == dynamic))
            .collect()
    }

    pub(super) fn main() -> Result<(), String> {
        let ours = sysbuild::sys_image()?;
        let c = sysbuild::c_reference_image()?;
        counter::install()?;
        let mut rounds = Vec::with_capacity(ROUNDS);
        for round in 0..ROUNDS {
            // Alternate which image runs first, so that neither always gets the warmer
            // caches or the quieter moment.
            let (a, b) = if round % 2 == 0 {
                (run(ours, "ours")?, run(c, "c")?)
            } else {
                let c_run = run(c, "c")?;
                (run(ours, "ours")?, c_run)
            };
            println!(
                "round {round:2}: ours {:.3} ns/call, C {:.3} ns/call, ratio {:.3}",
                a.ns_per_call,
                b.ns_per_call,
                a.ns_per_call / b.ns_per_call
            );
            if a.allowed != b.allowed {
                return Err(format!(
                    "the two images disagree on the packet mix: ours {:?}, C {:?}",
                    a.allowed, b.allowed
                ));
            }
            rounds.push((a, b));
        }
        let mut ratios: Vec<f64> = rounds
            .iter()
            .map(|(a, b)| a.ns_per_call / b.ns_per_call)
            .collect();
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        let median_of = |pick: fn(&(Run, Run)) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(pick).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let ours_ns = median_of(|r| r.0.ns_per_call);
        let c_ns = median_of(|r| r.1.ns_per_call);
        let (ours_instructions, c_instructions) =
            (rounds[0].0.instructions, rounds[0].1.instructions);
        if rounds
            .iter()
            .any(|(a, b)| a.instructions != ours_instructions || b.instructions != c_instructions)
        {
            return Err("instruction counts differ between rounds".to_owned());
        }
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let (packets_per_pass, ours_instructions, c_instructions) = (
            packets(1).len() as f64,
            ours_instructions as f64,
            c_instructions as f64,
        );
        let (ours_per_call, c_per_call) = (
            ours_instructions / packets_per_pass,
            c_instructions / packets_per_pass,
        );
        let verdict = |v: f64| if v <= GOAL { "met" } else { "MISSED" };
        let instruction_ratio = ours_per_call / c_per_call;
        println!(
            "\n== classify in the real images: {ROUNDS} rounds, {BATCHES} batches of {PASSES} \
             passes over {packets_per_pass} packets, fastest batch per round =="
        );
        println!(
            "ratio classify_sys_vs_c {median:.3} goal <={GOAL} {} ({ours_ns:.3} ns / {c_ns:.3} ns)",
            verdict(median)
        );
        println!(
            "ratio classify_sys_vs_c_instructions {instruction_ratio:.3} goal <={GOAL} {} \
             ({ours_per_call:.3} / {c_per_call:.3} instructions per call)",
            verdict(instruction_ratio)
        );
        Ok(())
    }

    /// Boots `image`, loads the driver, starts the client, then times and counts the
    /// classify export over the packet mix on a thread at `DISPATCH_LEVEL`; unloads.
    fn run(image: &'static [u8], who: &str) -> Result<Run, String> {
        let machine = Machine::boot(image, false).map_err(|e| format!("{who}: load: {e}"))?;
        let status = machine
            .driver_entry()
            .map_err(|e| format!("{who}: DriverEntry: {e}"))?;
        if status != 0 {
            return Err(format!("{who}: DriverEntry returned {status:#010x}"));
        }
        let dynamic = machine
            .on_cpu("client start", 0, kernel::client::start)
            .map_err(|e| format!("{who}: client start: {e}"))?;
        let address = machine
            .export(EXPORT)
            .ok_or_else(|| format!("{who}: the image exports no {EXPORT}"))?;
        let range = (machine.image().base(), machine.image().size());
        let packets = packets(dynamic);
        let want = expected(&packets, dynamic);
        let mix = packets.clone();
        let run = machine
            .on_cpu("classify", kernel::DISPATCH_LEVEL, move || {
                // SAFETY: the export is `UCHAR NTAPI (USHORT)` in both images (their
                // sources), callable at <= DISPATCH_LEVEL while the driver is loaded; the
                // driver is unloaded only after this thread has returned.
                let classify = unsafe { std::mem::transmute::<usize, Classify>(address) };
                measure(classify, &mix, range)
            })
            .map_err(|e| format!("{who}: classify: {e}"))?;
        machine
            .driver_unload()
            .map_err(|e| format!("{who}: DriverUnload: {e}"))?;
        if run.allowed != want {
            return Err(format!(
                "{who}: wrong answers for ports {packets:?} (client on {dynamic}): got {:?}, \
                 want {want:?}",
                run.allowed
            ));
        }
        Ok(run)
    }

    fn measure(classify: Classify, packets: &[u16], image: (usize, usize)) -> Run {
        let allowed: Vec<u8> = packets.iter().map(|&p| classify(p)).collect();
        let mut fastest = Duration::MAX;
        for _ in 0..BATCHES {
            let start = Instant::now();
            let mut sum = 0_u32;
            for _ in 0..PASSES {
                for &port in packets {
                    sum += u32::from(black_box(classify)(black_box(port)));
                }
            }
            fastest = fastest.min(start.elapsed());
            black_box(sum);
        }
        #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let calls = (PASSES * packets.len()) as f64;
        let instructions = packets
            .iter()
            .map(|&port| counter::instructions_in(image, || black_box(classify(black_box(port)))))
            .sum();
        Run {
            ns_per_call: fastest.as_secs_f64() * 1e9 / calls,
            allowed,
            instructions,
        }
    }

    /// Counts the instructions a call executes inside an image by single-stepping it.
    mod counter {
        use super::{AtomicU64, AtomicUsize, Ordering};

        /// The image range being counted: `[START, END)`.
        static START: AtomicUsize = AtomicUsize::new(0);
        static END: AtomicUsize = AtomicUsize::new(0);
        /// Steps whose next instruction was in the range.
        static STEPS: AtomicU64 = AtomicU64::new(0);

        /// `EFLAGS.TF`: the CPU traps after every instruction while it is set.
        const TRAP_FLAG: i32 = 0x100;

        extern "C" fn on_trap(_: libc::c_int, _: *mut libc::siginfo_t, context: *mut libc::c_void) {
            // SAFETY: the kernel passes a valid `ucontext_t` to an `SA_SIGINFO` handler.
            let rip = unsafe {
                (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RIP as usize]
            };
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a user-space address: positive and 64 bits"
            )]
            let rip = rip as usize;
            if (START.load(Ordering::Relaxed)..END.load(Ordering::Relaxed)).contains(&rip) {
                STEPS.fetch_add(1, Ordering::Relaxed);
            }
        }

        /// Installs the `SIGTRAP` handler.
        pub fn install() -> Result<(), String> {
            // SAFETY: a zeroed `sigaction` is a valid starting point; the handler only
            // reads its context and touches atomics (async-signal-safe).
            let installed = unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_trap as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO;
                libc::sigemptyset(&raw mut action.sa_mask);
                libc::sigaction(libc::SIGTRAP, &raw const action, std::ptr::null_mut())
            };
            if installed == 0 {
                Ok(())
            } else {
                Err("sigaction(SIGTRAP) failed".to_owned())
            }
        }

        /// Runs `f` with the trap flag set and returns how many of the instructions it
        /// executed lie in `image` (base, size). Each trap reports the address of the next
        /// instruction, so an image instruction is counted by the trap before it: the one
        /// after the `call` into the image, then one per instruction up to its `ret`.
        pub fn instructions_in<R>(image: (usize, usize), f: impl FnOnce() -> R) -> u64 {
            START.store(image.0, Ordering::Relaxed);
            END.store(image.0 + image.1, Ordering::Relaxed);
            STEPS.store(0, Ordering::Relaxed);
            // SAFETY: sets TF in RFLAGS and nothing else; the SIGTRAP handler installed by
            // `install` handles the traps. The push/pop pair leaves the stack as it was.
            unsafe {
                core::arch::asm!(
                    "pushfq",
                    "or qword ptr [rsp], {tf}",
                    "popfq",
                    tf = const TRAP_FLAG,
                );
            }
            let result = f();
            // SAFETY: clears TF; as above.
            unsafe {
                core::arch::asm!(
                    "pushfq",
                    "and qword ptr [rsp], {mask}",
                    "popfq",
                    mask = const !TRAP_FLAG,
                );
            }
            std::hint::black_box(result);
            STEPS.load(Ordering::Relaxed)
        }
    }
}
