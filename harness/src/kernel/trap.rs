//! Privileged instructions in driver code: `mov r64, cr8` and `mov cr8, r64` (what the WDK
//! headers inline for `KeGetCurrentIrql`, `KeRaiseIrql` and `KeLowerIrql` on x64) fault in
//! user mode with a general protection fault, delivered as `SIGSEGV`. The handler emulates
//! them against the faulting thread's modelled IRQL and resumes after the instruction; any
//! other fault whose instruction pointer lies in driver code stops the machine with the
//! address and the instruction bytes instead of killing the process silently. Faults
//! outside driver code go to the default action (the process dies as it would without the
//! handler).
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

extern "C" fn handler(signal: i32, _info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes the interrupted thread's `ucontext_t` to an SA_SIGINFO
    // handler; this thread is the only one using it while the handler runs.
    let context = unsafe { &mut *context.cast::<libc::ucontext_t>() };
    let gregs = &mut context.uc_mcontext.gregs;
    #[allow(clippy::cast_possible_truncation, reason = "x86-64: usize is 64 bits")]
    let rip = gregs[libc::REG_RIP.unsigned_abs() as usize].cast_unsigned() as usize;
    if !in_driver_code(rip) {
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
