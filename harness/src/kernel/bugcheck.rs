//! Stops: `KeBugCheckEx`, and the model's own stop for a broken rule. The first stop is
//! recorded, the thread that stopped halts for good, and so does every thread that enters
//! the model afterwards.

use super::{CHANGED, Guard, irql::thread_id, lock};
/// A stop: what `KeBugCheckEx` (or the model, for a violation) was called with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bugcheck {
    /// The stop code.
    pub code: u32,
    /// The four parameters.
    pub parameters: [usize; 4],
    /// Who stopped the machine and why, in words.
    pub reason: String,
    /// The model's id of the thread that stopped it.
    pub thread: usize,
}

impl std::fmt::Display for Bugcheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [p1, p2, p3, p4] = self.parameters;
        write!(
            f,
            "*** STOP: {:#010x} ({p1:#x}, {p2:#x}, {p3:#x}, {p4:#x}) on thread {:#x}: {}",
            self.code, self.thread, self.reason
        )
    }
}

/// Halts the calling thread for good if the machine has stopped.
pub(crate) fn halt_if_stopped(state: Guard) -> Guard {
    if state.bugcheck.is_some() {
        drop(state);
        halt();
    }
    state
}

pub(crate) fn halt() -> ! {
    loop {
        std::thread::park();
    }
}

/// Stops the machine: records the first stop, wakes the harness, halts this thread.
pub fn bugcheck(code: u32, parameters: [usize; 4], reason: String) -> ! {
    let mut state = lock();
    if state.bugcheck.is_none() {
        let stop = Bugcheck {
            code,
            parameters,
            reason,
            thread: thread_id(),
        };
        let line = stop.to_string();
        if state.echo {
            println!("{line}");
        }
        state.debugger.push(line);
        state.bugcheck = Some(stop);
    }
    CHANGED.notify_all();
    drop(state);
    halt()
}

/// The stop, if the machine has stopped.
#[must_use]
pub fn stopped() -> Option<Bugcheck> {
    lock().bugcheck.clone()
}

pub(crate) extern "win64" fn ke_bug_check_ex(
    code: u32,
    p1: usize,
    p2: usize,
    p3: usize,
    p4: usize,
) -> ! {
    let (base, size) = lock().image;
    // The shim's panic passes (line, column, file name address, length); decode it when
    // the name lies inside the image.
    let mut reason = String::from("KeBugCheckEx called by the driver");
    if p3 >= base && p3.saturating_add(p4) <= base + size && p4 < 512 {
        // SAFETY: the range lies inside the mapped image (checked above), which is readable
        // while the driver runs.
        let bytes =
            unsafe { std::slice::from_raw_parts(core::ptr::with_exposed_provenance::<u8>(p3), p4) };
        reason = format!(
            "KeBugCheckEx called by the driver (panic at {}:{p1}:{p2})",
            String::from_utf8_lossy(bytes)
        );
    }
    bugcheck(code, [p1, p2, p3, p4], reason)
}
