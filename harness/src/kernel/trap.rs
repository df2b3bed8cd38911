//! Privileged instructions in driver code: `mov r64, cr8` and `mov cr8, r64` (what the WDK
//! headers inline for `KeGetCurrentIrql`, `KeRaiseIrql` and `KeLowerIrql` on x64) fault in
//! user mode with a general protection fault, delivered as `SIGSEGV`. The handler emulates
//! them against the faulting thread's modelled IRQL and resumes after the instruction; any
//! other fault whose instruction pointer lies in driver code stops the machine with the
//! address and the instruction bytes instead of killing the process silently. Faults
//! outside driver code go to the default action (the process dies as it would without the
//! handler).
//!
//! # Guarded ranges: an unloaded image, discarded `INIT`, pageable `PAGE`
//!
//! Parts of the image are kept inaccessible (`PROT_NONE`) and registered here ([`guard`]),
//! so that an access to them is a page fault the handler can judge by the faulting address
//! (`si_addr`) and the thread's modelled IRQL:
//!
//! | kind | when | an access |
//! |---|---|---|
//! | [`GuardKind::Unloaded`] | the whole image after the machine retired it | stops the machine: `DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS` (`0xCE`), with the RVA |
//! | [`GuardKind::DiscardedInit`] | `INIT*` sections once `DriverEntry` returned | stops the machine: `PAGE_FAULT_IN_NONPAGED_AREA` (`0x50`), with the RVA |
//! | [`GuardKind::Pageable`] | `PAGE*` sections: from load, and again whenever a thread raises its IRQL to `DISPATCH_LEVEL` or above (Driver Verifier's "force IRQL checking" pages pageable memory out the same way) | below `DISPATCH_LEVEL`: the page is made accessible again (paged in) and the instruction resumes; at or above it: `IRQL_NOT_LESS_OR_EQUAL` (`0x0A`) with the RVA |
//!
//! Stops are reported only for faults of driver code (the instruction pointer in the
//! image, or the fault being the fetch of an instruction in it): the model's own code may
//! hold the model's lock, which a stop takes. A host routine touching a guarded range at
//! `< DISPATCH_LEVEL` in pageable memory pages it in like driver code; anything else a host
//! routine does there keeps the default action (the process ends).
//!
//! What the pageable model cannot see: a page a `PASSIVE_LEVEL` thread paged in stays
//! accessible until the next raise to `DISPATCH_LEVEL` anywhere, so a thread already at
//! `DISPATCH_LEVEL` may run it meanwhile unnoticed (as on Windows, where a resident page
//! does not fault either).
//!
//! Linux only (the handler reads the `ucontext_t` register layout of Linux x86-64).

use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::irql::{current_irql, set_irql};

/// Code ranges the handler treats as driver code: `[start, end)` pairs, 0 when unused.
/// Slot 0 is the machine's image, slot 1 is free for tests of hand-assembled code.
static RANGES: [[AtomicUsize; 2]; 2] = [
    [AtomicUsize::new(0), AtomicUsize::new(0)],
    [AtomicUsize::new(0), AtomicUsize::new(0)],
];

/// What a guarded range is (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardKind {
    /// The image after the machine retired it.
    Unloaded = 1,
    /// An `INIT*` section discarded after `DriverEntry`.
    DiscardedInit = 2,
    /// A `PAGE*` section (pageable).
    Pageable = 3,
}

/// Guarded ranges: `[start, end, kind, protection when paged in]`, `start` 0 when unused.
const GUARDS: usize = 16;
static GUARD_TABLE: [[AtomicUsize; 4]; GUARDS] = [const {
    [
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]
}; GUARDS];

/// How many page-ins and page-outs of pageable ranges happened (since the process
/// started): `[in, out]`.
static PAGING: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// Page-ins of pageable driver memory below `DISPATCH_LEVEL` so far (process-wide).
#[must_use]
pub fn page_ins() -> usize {
    PAGING[0].load(Ordering::Relaxed)
}

/// Registers `[start, start + len)` (page-aligned, already `PROT_NONE` for `Unloaded` and
/// `DiscardedInit`) as guarded; `protection` is what a page-in restores (`Pageable` only).
///
/// # Panics
///
/// If all slots are in use.
pub fn guard(start: usize, len: usize, kind: GuardKind, protection: i32) {
    install();
    let slot = GUARD_TABLE
        .iter()
        .find(|g| {
            g[0].compare_exchange(0, usize::MAX, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
        .expect("a free guard slot");
    slot[1].store(start + len, Ordering::SeqCst);
    slot[2].store(kind as usize, Ordering::SeqCst);
    slot[3].store(protection.cast_unsigned() as usize, Ordering::SeqCst);
    slot[0].store(start, Ordering::SeqCst);
}

/// Forgets the guarded ranges inside `[start, start + len)` (the loader, before it
/// unmaps an image).
pub fn unguard(start: usize, len: usize) {
    for g in &GUARD_TABLE {
        let from = g[0].load(Ordering::SeqCst);
        if from != usize::MAX && (start..start + len).contains(&from) {
            g[0].store(0, Ordering::SeqCst);
        }
    }
}

/// The guarded range containing `address`: `(start, end, kind, protection)`; the most
/// recent registration wins when ranges overlap (a retired image covers its sections).
fn guard_at(address: usize) -> Option<(usize, usize, GuardKind, i32)> {
    let mut found = None;
    for g in &GUARD_TABLE {
        let start = g[0].load(Ordering::SeqCst);
        let end = g[1].load(Ordering::SeqCst);
        if start == 0 || start == usize::MAX || !(start..end).contains(&address) {
            continue;
        }
        let kind = match g[2].load(Ordering::SeqCst) {
            1 => GuardKind::Unloaded,
            2 => GuardKind::DiscardedInit,
            _ => GuardKind::Pageable,
        };
        #[allow(clippy::cast_possible_truncation, reason = "stored from an i32")]
        let protection = (g[3].load(Ordering::SeqCst) as u32).cast_signed();
        // Unloaded outranks the ranges inside it.
        if found.is_none() || kind == GuardKind::Unloaded {
            found = Some((start, end, kind, protection));
        }
    }
    found
}

/// Pages every pageable range out (`PROT_NONE`), as Driver Verifier does when a thread
/// raises its IRQL to `DISPATCH_LEVEL` or above. Async-signal-safe (atomics and
/// `mprotect`), since the CR8 emulation raises IRQL inside the handler.
pub(crate) fn page_out_pageable() {
    for g in &GUARD_TABLE {
        let start = g[0].load(Ordering::SeqCst);
        if start == 0
            || start == usize::MAX
            || g[2].load(Ordering::SeqCst) != GuardKind::Pageable as usize
        {
            continue;
        }
        let end = g[1].load(Ordering::SeqCst);
        if guard_at(start).is_some_and(|(_, _, kind, _)| kind == GuardKind::Unloaded) {
            continue;
        }
        // SAFETY: `start..end` is a page-aligned range of the machine's image mapping
        // (registered by the loader, which owns that mapping until the guards are cleared
        // at the next boot); no Rust reference points into driver sections.
        unsafe {
            libc::mprotect(
                core::ptr::with_exposed_provenance_mut(start),
                end - start,
                libc::PROT_NONE,
            )
        };
        PAGING[1].fetch_add(1, Ordering::Relaxed);
    }
}

/// The image's base (slot 0), for RVAs.
fn image_base() -> usize {
    RANGES[0][0].load(Ordering::SeqCst)
}

/// How many CR8 accesses were emulated.
static EMULATED: AtomicUsize = AtomicUsize::new(0);

/// CR8 reads and writes emulated so far (since the process started).
#[must_use]
pub fn cr8_accesses_emulated() -> usize {
    EMULATED.load(Ordering::Relaxed)
}

/// Treats `[start, start + len)` as driver code in slot `slot` (0: the image, set by the
/// machine; 1: for tests), and installs the handler once.
///
/// # Panics
///
/// If `slot` is not 0 or 1.
pub fn watch_code(slot: usize, start: usize, len: usize) {
    install();
    RANGES[slot][0].store(0, Ordering::SeqCst);
    RANGES[slot][1].store(start + len, Ordering::SeqCst);
    RANGES[slot][0].store(start, Ordering::SeqCst);
}

fn in_driver_code(rip: usize) -> bool {
    RANGES.iter().any(|[start, end]| {
        let (start, end) = (start.load(Ordering::SeqCst), end.load(Ordering::SeqCst));
        start != 0 && (start..end).contains(&rip)
    })
}

fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: a zeroed `sigaction` is a valid starting value; the handler has the
        // SA_SIGINFO signature; installing a process-wide handler affects only SIGSEGV,
        // whose default action the handler restores for faults that are not ours.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(libc::SIGSEGV, &raw const action, core::ptr::null_mut());
        }
    });
}

/// The `gregs` index of general-purpose register `n` (0 = rax ... 15 = r15).
fn greg(n: u8) -> usize {
    const ORDER: [i32; 16] = [
        libc::REG_RAX,
        libc::REG_RCX,
        libc::REG_RDX,
        libc::REG_RBX,
        libc::REG_RSP,
        libc::REG_RBP,
        libc::REG_RSI,
        libc::REG_RDI,
        libc::REG_R8,
        libc::REG_R9,
        libc::REG_R10,
        libc::REG_R11,
        libc::REG_R12,
        libc::REG_R13,
        libc::REG_R14,
        libc::REG_R15,
    ];
    ORDER[usize::from(n & 15)].unsigned_abs() as usize
}

/// A decoded CR8 access: `(write, register, length)`.
fn decode(bytes: [u8; 4]) -> Option<(bool, u8, usize)> {
    let [rex, escape, opcode, modrm] = bytes;
    // REX with R set (cr8 = reg 0 + 8); W and B are allowed, X is meaningless here.
    if rex & 0xF0 != 0x40 || rex & 0x04 == 0 || escape != 0x0F || modrm >> 6 != 0b11 {
        return None;
    }
    if (modrm >> 3) & 7 != 0 {
        return None;
    }
    let register = (modrm & 7) | if rex & 0x01 != 0 { 8 } else { 0 };
    match opcode {
        0x20 => Some((false, register, 4)),
        0x22 => Some((true, register, 4)),
        _ => None,
    }
}

/// A fault on a guarded range at `address`: resumes (`true`) after a page-in, or stops
/// the machine; `false` when the fault is not one this handler may judge.
fn guarded_fault(address: usize, rip: usize) -> bool {
    let Some((_, _, kind, protection)) = guard_at(address) else {
        return false;
    };
    let irql = current_irql();
    if kind == GuardKind::Pageable && irql < super::DISPATCH_LEVEL {
        let page = address & !0xFFF;
        // SAFETY: `page` lies in a registered range of the image mapping
        // (see `page_out_pageable`); restoring the section's own protection is what the
        // loader set at load.
        let rc = unsafe {
            libc::mprotect(
                core::ptr::with_exposed_provenance_mut(page),
                0x1000,
                protection,
            )
        };
        PAGING[0].fetch_add(1, Ordering::Relaxed);
        return rc == 0;
    }
    if !in_driver_code(rip) {
        return false;
    }
    let rva = address.wrapping_sub(image_base());
    let access = if address == rip {
        "execution"
    } else {
        "access"
    };
    let (code, reason) = match kind {
        GuardKind::Unloaded => (
            super::DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS,
            format!(
                "{access} of the unloaded image at RVA {rva:#x} (rip {rip:#x}): code ran after the image went away"
            ),
        ),
        GuardKind::DiscardedInit => (
            super::PAGE_FAULT_IN_NONPAGED_AREA,
            format!(
                "{access} of a discarded INIT section at RVA {rva:#x} (rip {rip:#x}) after DriverEntry returned"
            ),
        ),
        GuardKind::Pageable => (
            super::IRQL_NOT_LESS_OR_EQUAL,
            format!(
                "{access} of pageable (PAGE) memory at RVA {rva:#x} (rip {rip:#x}) at IRQL {irql}"
            ),
        ),
    };
    super::bugcheck(
        code,
        [
            address,
            usize::from(irql),
            usize::from(address == rip) * 8,
            rip,
        ],
        reason,
    );
}

extern "C" fn handler(signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes the interrupted thread's `ucontext_t` to an SA_SIGINFO
    // handler; this thread is the only one using it while the handler runs.
    let context = unsafe { &mut *context.cast::<libc::ucontext_t>() };
    let gregs = &mut context.uc_mcontext.gregs;
    #[allow(clippy::cast_possible_truncation, reason = "x86-64: usize is 64 bits")]
    let rip = gregs[libc::REG_RIP.unsigned_abs() as usize].cast_unsigned() as usize;
    // SAFETY: `info` is the `siginfo_t` the kernel passed for this SIGSEGV; `si_addr` is
    // valid for SIGSEGV (the faulting address; 0 for a general protection fault).
    let address = unsafe { (*info).si_addr() }.addr();
    if address != 0 && guarded_fault(address, rip) {
        return;
    }
    // An instruction in a page that is never accessible cannot be read (nor have run).
    if !in_driver_code(rip) || guard_at(rip).is_some_and(|g| g.2 != GuardKind::Pageable) {
        // Not ours: restore the default action and return; the instruction faults again and
        // the process ends as it would have without this handler.
        // SAFETY: resetting SIGSEGV to SIG_DFL is async-signal-safe.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
        return;
    }
    // SAFETY: `rip` lies in driver code, which is mapped and readable (executable sections
    // are mapped R-X); four bytes may cross into the next page of the same image, which the
    // loader maps too (an image ends on a page boundary with its last section).
    let bytes = unsafe { core::ptr::with_exposed_provenance::<[u8; 4]>(rip).read_unaligned() };
    if let Some((write, register, length)) = decode(bytes) {
        let slot = greg(register);
        if write {
            set_irql(u8::try_from(gregs[slot] & 0xF).unwrap_or(0));
        } else {
            gregs[slot] = i64::from(current_irql());
        }
        gregs[libc::REG_RIP.unsigned_abs() as usize] += i64::try_from(length).unwrap_or(0);
        EMULATED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Any other fault in driver code: a stop. `bugcheck` takes the model's lock and parks
    // this thread for good; driver code never runs while its thread holds that lock (the
    // model releases it before every call into the image), so it cannot self-deadlock.
    super::bugcheck(
        super::KMODE_EXCEPTION_NOT_HANDLED,
        [0xC000_0005, rip, 0, 0],
        format!(
            "fault in driver code at {rip:#x} (bytes {:02x} {:02x} {:02x} {:02x}): not a CR8 \
             access the harness emulates",
            bytes[0], bytes[1], bytes[2], bytes[3]
        ),
    );
}
