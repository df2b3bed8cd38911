//! IRQL (a number per host thread), thread ids, and spin locks.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::bugcheck::{bugcheck, halt_if_stopped};
use super::{
    DISPATCH_LEVEL, IRQL_NOT_DISPATCH_LEVEL, IRQL_NOT_GREATER_OR_EQUAL, IRQL_NOT_LESS_OR_EQUAL,
    PASSIVE_LEVEL, SPIN_LOCK_ALREADY_OWNED, SPIN_LOCK_NOT_OWNED,
};

thread_local! {
    static IRQL: Cell<u8> = const { Cell::new(PASSIVE_LEVEL) };
    static THREAD_ID: Cell<usize> = const { Cell::new(0) };
}

pub(crate) static NEXT_THREAD_ID: AtomicUsize = AtomicUsize::new(0x104);

/// The calling thread's IRQL.
#[must_use]
pub fn current_irql() -> u8 {
    IRQL.with(Cell::get)
}

/// Sets the calling thread's IRQL (the harness's threads start at `PASSIVE_LEVEL`). A
/// raise to `DISPATCH_LEVEL` or above pages pageable driver memory out
/// ([`super::trap`]), so that touching it at that IRQL is caught.
pub fn set_irql(irql: u8) {
    let before = IRQL.with(|c| c.replace(irql));
    #[cfg(target_os = "linux")]
    if irql >= DISPATCH_LEVEL && before < DISPATCH_LEVEL {
        super::trap::page_out_pageable();
    }
    #[cfg(not(target_os = "linux"))]
    let _ = before;
}

/// The calling thread's id as `PsGetCurrentThreadId` reports it: non-zero, a multiple of
/// 4, unique among the threads of this process.
#[must_use]
pub fn thread_id() -> usize {
    THREAD_ID.with(|c| {
        if c.get() == 0 {
            c.set(NEXT_THREAD_ID.fetch_add(4, Ordering::Relaxed));
        }
        c.get()
    })
}

pub(crate) extern "win64" fn ke_get_current_irql() -> u8 {
    current_irql()
}

pub(crate) extern "win64" fn ps_get_current_thread_id() -> usize {
    thread_id()
}

/// The lock word as an atomic.
///
/// # Safety
///
/// `lock` is a valid, aligned `KSPIN_LOCK` that is only accessed atomically while in use.
pub(crate) unsafe fn lock_word<'a>(lock: *mut usize) -> &'a AtomicUsize {
    // SAFETY: valid and aligned (this function's contract); the driver's `KSPIN_LOCK` is an
    // `AtomicUsize` itself, so every access to it is atomic.
    unsafe { AtomicUsize::from_ptr(lock) }
}

/// # Safety
///
/// `lock` points to the driver's `KSPIN_LOCK` (`KeAcquireSpinLockRaiseToDpc`'s contract).
pub(crate) unsafe extern "win64" fn ke_acquire_spin_lock_raise_to_dpc(lock: *mut usize) -> u8 {
    let irql = current_irql();
    if irql > DISPATCH_LEVEL {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [lock.addr(), usize::from(irql), 0, 0],
            format!("KeAcquireSpinLockRaiseToDpc at IRQL {irql}"),
        );
    }
    // SAFETY: the driver passes its own spin lock (this function's contract).
    let word = unsafe { lock_word(lock) };
    set_irql(DISPATCH_LEVEL);
    spin("KeAcquireSpinLockRaiseToDpc", lock.addr(), word);
    irql
}

/// Takes `word` for the calling thread (already at `DISPATCH_LEVEL` or above).
fn spin(routine: &str, address: usize, word: &AtomicUsize) {
    let me = thread_id();
    if word.load(Ordering::Relaxed) == me {
        bugcheck(
            SPIN_LOCK_ALREADY_OWNED,
            [address, 0, 0, 0],
            format!("{routine} on a spin lock this thread holds"),
        );
    }
    let mut spins = 0u32;
    while word
        .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(1024) {
            drop(halt_if_stopped(super::lock()));
            std::thread::yield_now();
        }
        std::hint::spin_loop();
    }
}

/// Releases `word`, held by the calling thread.
fn unspin(routine: &str, address: usize, word: &AtomicUsize) {
    if word.load(Ordering::Relaxed) != thread_id() {
        bugcheck(
            SPIN_LOCK_NOT_OWNED,
            [address, 0, 0, 0],
            format!("{routine} of a spin lock this thread does not hold"),
        );
    }
    word.store(0, Ordering::Release);
}

/// # Safety
///
/// `lock` points to the driver's `KSPIN_LOCK` (`KeReleaseSpinLock`'s contract).
pub(crate) unsafe extern "win64" fn ke_release_spin_lock(lock: *mut usize, new_irql: u8) {
    let irql = current_irql();
    if irql != DISPATCH_LEVEL {
        bugcheck(
            IRQL_NOT_DISPATCH_LEVEL,
            [lock.addr(), usize::from(irql), 0, 0],
            format!("KeReleaseSpinLock at IRQL {irql}"),
        );
    }
    // SAFETY: the driver passes its own spin lock (this function's contract).
    let word = unsafe { lock_word(lock) };
    if new_irql > DISPATCH_LEVEL {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [lock.addr(), usize::from(new_irql), 0, 0],
            format!("KeReleaseSpinLock to IRQL {new_irql}"),
        );
    }
    unspin("KeReleaseSpinLock", lock.addr(), word);
    set_irql(new_irql);
}

/// # Safety
///
/// `lock` is valid for a write (`KeInitializeSpinLock`'s contract).
pub(crate) unsafe extern "win64" fn ke_initialize_spin_lock(lock: *mut usize) {
    // SAFETY: valid for a write (this function's contract); the driver does not use the
    // lock while initialising it, so a plain store cannot race an atomic access.
    unsafe { lock.write(0) };
}

/// Bugchecks `IRQL_NOT_GREATER_OR_EQUAL` unless the thread is at `DISPATCH_LEVEL` or above.
fn require_dispatch(routine: &str, address: usize) {
    let irql = current_irql();
    if irql < DISPATCH_LEVEL {
        bugcheck(
            IRQL_NOT_GREATER_OR_EQUAL,
            [address, usize::from(irql), 0, 0],
            format!("{routine} at IRQL {irql}; it requires IRQL >= DISPATCH_LEVEL"),
        );
    }
}

/// # Safety
///
/// `lock` points to the driver's `KSPIN_LOCK` (`KeAcquireSpinLockAtDpcLevel`'s contract).
pub(crate) unsafe extern "win64" fn ke_acquire_spin_lock_at_dpc_level(lock: *mut usize) {
    require_dispatch("KeAcquireSpinLockAtDpcLevel", lock.addr());
    // SAFETY: the driver passes its own spin lock (this function's contract).
    let word = unsafe { lock_word(lock) };
    spin("KeAcquireSpinLockAtDpcLevel", lock.addr(), word);
}

/// # Safety
///
/// `lock` points to the driver's `KSPIN_LOCK` (`KeReleaseSpinLockFromDpcLevel`'s contract).
pub(crate) unsafe extern "win64" fn ke_release_spin_lock_from_dpc_level(lock: *mut usize) {
    require_dispatch("KeReleaseSpinLockFromDpcLevel", lock.addr());
    // SAFETY: the driver passes its own spin lock (this function's contract).
    let word = unsafe { lock_word(lock) };
    unspin("KeReleaseSpinLockFromDpcLevel", lock.addr(), word);
}

/// `KfRaiseIrql(NewIrql)`: returns the old IRQL; a "raise" to a lower IRQL bugchecks
/// `IRQL_NOT_GREATER_OR_EQUAL`.
pub(crate) extern "win64" fn kf_raise_irql(new_irql: u8) -> u8 {
    let old = current_irql();
    if new_irql < old {
        bugcheck(
            IRQL_NOT_GREATER_OR_EQUAL,
            [usize::from(old), usize::from(new_irql), 0, 0],
            format!("KfRaiseIrql({new_irql}) at IRQL {old}: a raise to a lower IRQL"),
        );
    }
    set_irql(new_irql);
    old
}

/// `KeRaiseIrqlToDpcLevel()`.
pub(crate) extern "win64" fn ke_raise_irql_to_dpc_level() -> u8 {
    kf_raise_irql(DISPATCH_LEVEL)
}

/// `KeLowerIrql(NewIrql)` / `KfLowerIrql(NewIrql)`: a "lower" to a higher IRQL bugchecks
/// `IRQL_NOT_LESS_OR_EQUAL`.
pub(crate) extern "win64" fn ke_lower_irql(new_irql: u8) {
    let old = current_irql();
    if new_irql > old {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [usize::from(old), usize::from(new_irql), 0, 0],
            format!("KeLowerIrql({new_irql}) at IRQL {old}: a lower to a higher IRQL"),
        );
    }
    set_irql(new_irql);
}
