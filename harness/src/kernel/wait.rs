//! Delays, and (for drivers that use them) events and waits.

use std::time::Duration;

use super::bugcheck::{bugcheck, halt_if_stopped};
use super::irql::current_irql;
use super::{APC_LEVEL, IRQL_NOT_LESS_OR_EQUAL, STATUS_SUCCESS, lock};

/// # Safety
///
/// `interval` is valid for reads (`KeDelayExecutionThread`'s contract).
pub(crate) unsafe extern "win64" fn ke_delay_execution_thread(
    _wait_mode: i8,
    _alertable: u8,
    interval: *mut i64,
) -> i32 {
    let irql = current_irql();
    if irql > APC_LEVEL {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [0, usize::from(irql), 0, 0],
            format!("KeDelayExecutionThread (a wait) at IRQL {irql}"),
        );
    }
    // SAFETY: valid for reads (this function's contract).
    let interval = unsafe { interval.read() };
    drop(halt_if_stopped(lock()));
    if interval < 0 {
        // Relative, in 100 ns units; the model never sleeps longer than a millisecond.
        let nanos = interval.unsigned_abs().saturating_mul(100).min(1_000_000);
        if nanos <= 100 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_nanos(nanos));
        }
    } else {
        std::thread::yield_now();
    }
    STATUS_SUCCESS
}
