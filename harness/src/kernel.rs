//! The host model of the kernel the driver imports from: ntoskrnl's IRQL, spin locks,
//! threads, waits, pool, bugcheck and debugger print, and netio's Teredo API.
//!
//! Every function the image imports is an `extern "win64"` function here (the Windows x64
//! calling convention, which the driver's `extern "system"` calls use). The model keeps the
//! documented rules and stops the machine, as the kernel or Driver Verifier would, when they
//! are broken:
//!
//! - IRQL is per thread. `KeAcquireSpinLockRaiseToDpc` raises to `DISPATCH_LEVEL` and
//!   returns the old IRQL, `KeReleaseSpinLock` restores it; a recursive acquire or a
//!   release by a non-owner bugchecks (`SPIN_LOCK_ALREADY_OWNED`, `SPIN_LOCK_NOT_OWNED`).
//! - The netio functions check their documented IRQL (`< DISPATCH_LEVEL` for
//!   `NotifyTeredoPortChange`/`GetTeredoPort`, `PASSIVE_LEVEL` for `CancelMibChangeNotify2`);
//!   a call above it bugchecks `IRQL_NOT_LESS_OR_EQUAL`. So does a wait above `APC_LEVEL`.
//! - Callbacks of one registration never overlap; a cancel waits for a callback in flight;
//!   a cancel from inside that callback (a deadlock on Windows) is reported and refused with
//!   `STATUS_POSSIBLE_DEADLOCK`; a notification for a cancelled handle is dropped.
//! - Pool blocks are tracked by address and tag; a free of an unknown block, a double free
//!   or a wrong tag bugchecks as Driver Verifier does (`0xC4`); blocks allocated with
//!   `POOL_FLAG_UNINITIALIZED` are filled with `0xCD` so that nothing can rely on zeroes.
//! - `KeBugCheckEx` (and every violation above) records the stop code and halts the thread
//!   for good; every other thread that enters the model afterwards halts too.
//!
//! One machine runs at a time (see [`crate::machine::Machine`]), so the state is global.

use core::ffi::{CStr, c_char, c_void};
use core::fmt::Write as _;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// `PASSIVE_LEVEL`.
pub const PASSIVE_LEVEL: u8 = 0;
/// `APC_LEVEL`.
pub const APC_LEVEL: u8 = 1;
/// `DISPATCH_LEVEL`.
pub const DISPATCH_LEVEL: u8 = 2;

/// `STATUS_SUCCESS`.
pub const STATUS_SUCCESS: i32 = 0;
/// `STATUS_NOT_SUPPORTED`.
pub const STATUS_NOT_SUPPORTED: i32 = 0xC000_00BB_u32.cast_signed();
/// `STATUS_POSSIBLE_DEADLOCK`: the model's answer to a cancel from inside the callback.
pub const STATUS_POSSIBLE_DEADLOCK: i32 = 0xC000_0194_u32.cast_signed();
/// `ERROR_INVALID_HANDLE`.
pub const ERROR_INVALID_HANDLE: i32 = 6;
/// `ERROR_NOT_READY`.
pub const ERROR_NOT_READY: i32 = 21;
/// `ERROR_INVALID_PARAMETER`.
pub const ERROR_INVALID_PARAMETER: i32 = 87;

/// `MibParameterNotification`.
pub const MIB_PARAMETER_NOTIFICATION: i32 = 0;
/// `MibAddInstance`.
pub const MIB_ADD_INSTANCE: i32 = 1;
/// `MibDeleteInstance`.
pub const MIB_DELETE_INSTANCE: i32 = 2;
/// `MibInitialNotification`.
pub const MIB_INITIAL_NOTIFICATION: i32 = 3;

/// `IRQL_NOT_DISPATCH_LEVEL`.
pub const IRQL_NOT_DISPATCH_LEVEL: u32 = 0x08;
/// `IRQL_NOT_LESS_OR_EQUAL`.
pub const IRQL_NOT_LESS_OR_EQUAL: u32 = 0x0A;
/// `SPIN_LOCK_ALREADY_OWNED`.
pub const SPIN_LOCK_ALREADY_OWNED: u32 = 0x0F;
/// `SPIN_LOCK_NOT_OWNED`.
pub const SPIN_LOCK_NOT_OWNED: u32 = 0x10;
/// `DRIVER_VERIFIER_DETECTED_VIOLATION`.
pub const DRIVER_VERIFIER_DETECTED_VIOLATION: u32 = 0xC4;
/// `IRQL_UNEXPECTED_VALUE`: a callback returned at another IRQL than it was called at.
pub const IRQL_UNEXPECTED_VALUE: u32 = 0xC8;

/// `POOL_FLAG_UNINITIALIZED`.
pub const POOL_FLAG_UNINITIALIZED: u64 = 0x2;
/// `POOL_FLAG_RAISE_ON_FAILURE`.
pub const POOL_FLAG_RAISE_ON_FAILURE: u64 = 0x20;
/// `POOL_FLAG_NON_PAGED`.
pub const POOL_FLAG_NON_PAGED: u64 = 0x40;
/// `POOL_FLAG_NON_PAGED_EXECUTE`.
pub const POOL_FLAG_NON_PAGED_EXECUTE: u64 = 0x80;
/// `POOL_FLAG_PAGED`.
pub const POOL_FLAG_PAGED: u64 = 0x100;

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

/// Pool accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Successful allocations.
    pub allocations: u64,
    /// Frees.
    pub frees: u64,
    /// Allocations refused (injected failures).
    pub refused: u64,
    /// Blocks allocated and not freed.
    pub live_blocks: usize,
    /// Bytes allocated and not freed.
    pub live_bytes: usize,
    /// The most bytes live at once.
    pub peak_bytes: usize,
}

impl PoolStats {
    /// Every allocated block was freed.
    #[must_use]
    pub fn balanced(&self) -> bool {
        self.live_blocks == 0 && self.allocations == self.frees
    }
}

/// Netio call counts and outcomes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetioStats {
    /// Calls: `[NotifyTeredoPortChange, GetTeredoPort, CancelMibChangeNotify2]`.
    pub calls: [u64; 3],
    /// Every handle ever returned by a successful `NotifyTeredoPortChange`.
    pub handles: Vec<usize>,
    /// Handles still registered (not cancelled).
    pub live: Vec<usize>,
    /// Callbacks that ran, over all registrations.
    pub delivered: u64,
    /// Notifications dropped because their handle was cancelled (never reached the image).
    pub dropped_after_cancel: u64,
    /// Cancels called from inside the callback of the same handle, by handle.
    pub self_cancels: Vec<usize>,
}

struct Block {
    layout: std::alloc::Layout,
    tag: u32,
}

#[derive(Default)]
struct Pool {
    blocks: HashMap<usize, Block>,
    stats: PoolStats,
    /// Allocations to let through before refusing one (then back to `None`).
    fail_after: Option<u64>,
}

struct Registration {
    callback: usize,
    context: usize,
    cancelled: bool,
    in_flight: Option<usize>,
}

/// The netio calls whose next result can be forced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetioCall {
    /// `NotifyTeredoPortChange`.
    Notify = 0,
    /// `GetTeredoPort`.
    GetPort = 1,
    /// `CancelMibChangeNotify2`.
    Cancel = 2,
}

struct Netio {
    registrations: BTreeMap<usize, Registration>,
    next_handle: usize,
    running: Option<u16>,
    next_port: u16,
    ipv6: bool,
    callback_irql: u8,
    faults: [VecDeque<i32>; 3],
    stats: NetioStats,
    /// Client changes are numbered when they happen and delivered in that order.
    next_change: u64,
    delivering_change: u64,
}

impl Default for Netio {
    fn default() -> Self {
        Netio {
            registrations: BTreeMap::new(),
            next_handle: 0xFFFF_A000_0000_1000,
            running: None,
            next_port: 49_152,
            ipv6: true,
            callback_irql: PASSIVE_LEVEL,
            faults: Default::default(),
            stats: NetioStats::default(),
            next_change: 0,
            delivering_change: 0,
        }
    }
}

#[derive(Default)]
struct State {
    debugger: Vec<String>,
    echo: bool,
    pool: Pool,
    netio: Netio,
    bugcheck: Option<Bugcheck>,
    /// Image range, for decoding a panic's file name.
    image: (usize, usize),
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
static CHANGED: Condvar = Condvar::new();

struct Guard(MutexGuard<'static, Option<State>>);

impl std::ops::Deref for Guard {
    type Target = State;
    fn deref(&self) -> &State {
        self.0.as_ref().expect("kernel model used before reset")
    }
}

impl std::ops::DerefMut for Guard {
    fn deref_mut(&mut self) -> &mut State {
        self.0.as_mut().expect("kernel model used before reset")
    }
}

fn lock() -> Guard {
    Guard(STATE.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Waits for a change of the model's state, at most a short while (callers re-check).
fn wait(guard: Guard) -> Guard {
    let (inner, _) = CHANGED
        .wait_timeout(guard.0, Duration::from_millis(20))
        .unwrap_or_else(PoisonError::into_inner);
    Guard(inner)
}

thread_local! {
    static IRQL: Cell<u8> = const { Cell::new(PASSIVE_LEVEL) };
    static THREAD_ID: Cell<usize> = const { Cell::new(0) };
    /// Whether this thread is running a notification callback.
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// `(DriverUnload, DriverObject)` to run from inside the next callback (see
/// [`run_in_next_callback`]).
static IN_CALLBACK_HOOK: Mutex<Option<(usize, usize)>> = Mutex::new(None);

/// Fault injection for the self-cancel scenario: the next time the driver prints from
/// inside one of its notification callbacks, the model calls `unload(driver_object)` (the
/// driver's own `DriverUnload`) on that thread, before returning from `DbgPrint`: the
/// driver then cancels its registration from inside its callback, as a driver bug would.
pub fn run_in_next_callback(unload: usize, driver_object: usize) {
    *IN_CALLBACK_HOOK
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some((unload, driver_object));
}

static NEXT_THREAD_ID: AtomicUsize = AtomicUsize::new(0x104);

/// The calling thread's IRQL.
#[must_use]
pub fn current_irql() -> u8 {
    IRQL.with(Cell::get)
}

/// Sets the calling thread's IRQL (the harness's threads start at `PASSIVE_LEVEL`).
pub fn set_irql(irql: u8) {
    IRQL.with(|c| c.set(irql));
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

/// Resets the model for a new machine: empty pool, no registrations, client stopped.
pub fn reset(image: (usize, usize), echo: bool) {
    *IN_CALLBACK_HOOK
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = None;
    let mut guard = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    *guard = Some(State {
        echo,
        image,
        ..State::default()
    });
}

/// Halts the calling thread for good if the machine has stopped.
fn halt_if_stopped(state: Guard) -> Guard {
    if state.bugcheck.is_some() {
        drop(state);
        halt();
    }
    state
}

fn halt() -> ! {
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

/// The debugger output so far, one entry a line.
#[must_use]
pub fn debugger_output() -> Vec<String> {
    lock().debugger.clone()
}

/// Appends a line of the harness's own to the debugger output (marked as such).
pub fn note(line: &str) {
    let mut state = lock();
    let line = format!("[harness] {line}");
    if state.echo {
        println!("{line}");
    }
    state.debugger.push(line);
}

/// Pool accounting now.
#[must_use]
pub fn pool_stats() -> PoolStats {
    lock().pool.stats
}

/// One pool block allocated and not freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PoolBlock {
    /// Its address, as `ExAllocatePool2` returned it.
    pub address: usize,
    /// Bytes requested.
    pub size: usize,
    /// Pool tag.
    pub tag: u32,
}

/// Every pool block allocated and not freed, by address (for residue checks: which blocks
/// are left, not only how many).
#[must_use]
pub fn pool_blocks() -> Vec<PoolBlock> {
    let state = lock();
    let mut blocks: Vec<PoolBlock> = state
        .pool
        .blocks
        .iter()
        .map(|(address, block)| PoolBlock {
            address: *address,
            size: block.layout.size(),
            tag: block.tag,
        })
        .collect();
    blocks.sort_unstable();
    blocks
}

/// The caller context netio keeps for each registration not cancelled, as
/// `(handle, context)` by handle: what a notification would be delivered with.
#[must_use]
pub fn live_contexts() -> Vec<(usize, usize)> {
    lock()
        .netio
        .registrations
        .iter()
        .filter(|(_, r)| !r.cancelled)
        .map(|(h, r)| (*h, r.context))
        .collect()
}

/// Lets `count` more allocations succeed, then refuses one (`ExAllocatePool2` returns
/// NULL), then succeeds again.
pub fn fail_allocation_after(count: u64) {
    lock().pool.fail_after = Some(count);
}

/// Netio accounting now.
#[must_use]
pub fn netio_stats() -> NetioStats {
    let state = lock();
    let mut netio = state.netio.stats.clone();
    netio.live = state
        .netio
        .registrations
        .iter()
        .filter(|(_, r)| !r.cancelled)
        .map(|(h, _)| *h)
        .collect();
    netio
}

/// Makes the next call of `call` return `status` (queued; several may be set).
pub fn fail_next(call: NetioCall, status: i32) {
    lock().netio.faults[call as usize].push_back(status);
}

/// Sets whether an IPv6 stack is present.
pub fn set_ipv6(present: bool) {
    lock().netio.ipv6 = present;
}

/// Sets the IRQL callbacks run at (`<= DISPATCH_LEVEL`, as documented).
///
/// # Panics
///
/// Above `DISPATCH_LEVEL`.
pub fn set_callback_irql(irql: u8) {
    assert!(irql <= DISPATCH_LEVEL, "callbacks run at <= DISPATCH_LEVEL");
    lock().netio.callback_irql = irql;
}

/// What happened to one notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The callback ran.
    Delivered,
    /// The handle was cancelled (or never existed): the callback did not run.
    Dropped,
}

/// Delivers one notification to `handle` on the calling thread, serialized with every
/// other delivery to the same handle, at the configured callback IRQL.
///
/// # Panics
///
/// If called from inside a callback of the same handle (the model never does that).
pub fn deliver(handle: usize, port: u16, kind: i32) -> Delivery {
    let me = thread_id();
    let mut state = lock();
    let (callback, context, irql) = loop {
        state = halt_if_stopped(state);
        let callback_irql = state.netio.callback_irql;
        let Some(reg) = state.netio.registrations.get_mut(&handle) else {
            state.netio.stats.dropped_after_cancel += 1;
            return Delivery::Dropped;
        };
        if reg.cancelled {
            state.netio.stats.dropped_after_cancel += 1;
            return Delivery::Dropped;
        }
        match reg.in_flight {
            None => {
                reg.in_flight = Some(me);
                break (reg.callback, reg.context, callback_irql);
            }
            Some(owner) => {
                assert_ne!(owner, me, "the model never nests deliveries on one thread");
                state = wait(state);
            }
        }
    };
    drop(state);

    let before = current_irql();
    set_irql(irql);
    IN_CALLBACK.with(|c| c.set(true));
    // SAFETY: `callback` is the function pointer the image registered with
    // `NotifyTeredoPortChange` (PTEREDO_PORT_CHANGE_CALLBACK, an NTAPI function of the
    // mapped image) and `context` its caller context; the registration is live and this
    // thread is its only delivery in flight (serialized above); the image stays mapped
    // while a registration is live (the machine retires it only after unload).
    let callback: extern "win64" fn(*mut c_void, u16, i32) =
        unsafe { std::mem::transmute::<usize, extern "win64" fn(*mut c_void, u16, i32)>(callback) };
    callback(core::ptr::with_exposed_provenance_mut(context), port, kind);
    IN_CALLBACK.with(|c| c.set(false));
    let after = current_irql();
    if after != irql {
        bugcheck(
            IRQL_UNEXPECTED_VALUE,
            [usize::from(after), usize::from(irql), 0, handle],
            format!(
                "the callback of handle {handle:#x} returned at IRQL {after}, called at {irql}"
            ),
        );
    }
    set_irql(before);

    let mut state = lock();
    if let Some(reg) = state.netio.registrations.get_mut(&handle) {
        reg.in_flight = None;
    }
    state.netio.stats.delivered += 1;
    CHANGED.notify_all();
    Delivery::Delivered
}

/// Controls the modelled Teredo client. Each change notifies every live registration, on
/// the calling thread.
pub mod client {
    use super::{
        Delivery, MIB_ADD_INSTANCE, MIB_DELETE_INSTANCE, MIB_PARAMETER_NOTIFICATION, deliver, lock,
    };

    fn next_port(state: &mut super::State) -> u16 {
        let port = state.netio.next_port;
        state.netio.next_port = if port >= 65_000 { 49_152 } else { port + 7 };
        port
    }

    /// Delivers change number `change` to every live registration, after every earlier
    /// change was delivered (changes made on several threads reach a callback in the order
    /// they happened, one at a time).
    fn broadcast(change: u64, port: u16, kind: i32) -> usize {
        let mut state = lock();
        while state.netio.delivering_change != change {
            state = super::halt_if_stopped(super::wait(state));
        }
        let handles: Vec<usize> = state
            .netio
            .registrations
            .iter()
            .filter(|(_, r)| !r.cancelled)
            .map(|(h, _)| *h)
            .collect();
        drop(state);
        let delivered = handles
            .into_iter()
            .filter(|h| deliver(*h, port, kind) == Delivery::Delivered)
            .count();
        lock().netio.delivering_change += 1;
        super::CHANGED.notify_all();
        delivered
    }

    fn take_change(state: &mut super::State) -> u64 {
        let change = state.netio.next_change;
        state.netio.next_change += 1;
        change
    }

    /// Starts (or restarts) the client on a new port; returns it.
    #[must_use = "the new port"]
    pub fn start() -> u16 {
        let (change, port, kind) = {
            let mut state = lock();
            let kind = if state.netio.running.is_some() {
                MIB_PARAMETER_NOTIFICATION
            } else {
                MIB_ADD_INSTANCE
            };
            let port = next_port(&mut state);
            state.netio.running = Some(port);
            (take_change(&mut state), port, kind)
        };
        broadcast(change, port, kind);
        port
    }

    /// Stops the client (`MibDeleteInstance` with the port it had).
    pub fn stop() {
        let stopped = {
            let mut state = lock();
            state
                .netio
                .running
                .take()
                .map(|port| (take_change(&mut state), port))
        };
        if let Some((change, port)) = stopped {
            broadcast(change, port, MIB_DELETE_INSTANCE);
        }
    }

    /// The port the client runs on.
    #[must_use]
    pub fn port() -> Option<u16> {
        lock().netio.running
    }
}

// ---------------------------------------------------------------------------------------
// ntoskrnl.exe
// ---------------------------------------------------------------------------------------

extern "win64" fn ke_get_current_irql() -> u8 {
    current_irql()
}

extern "win64" fn ps_get_current_thread_id() -> usize {
    thread_id()
}

/// The lock word as an atomic.
///
/// # Safety
///
/// `lock` is a valid, aligned `KSPIN_LOCK` that is only accessed atomically while in use.
unsafe fn lock_word<'a>(lock: *mut usize) -> &'a AtomicUsize {
    // SAFETY: valid and aligned (this function's contract); the driver's `KSPIN_LOCK` is an
    // `AtomicUsize` itself, so every access to it is atomic.
    unsafe { AtomicUsize::from_ptr(lock) }
}

/// # Safety
///
/// `lock` points to the driver's `KSPIN_LOCK` (`KeAcquireSpinLockRaiseToDpc`'s contract).
unsafe extern "win64" fn ke_acquire_spin_lock_raise_to_dpc(lock: *mut usize) -> u8 {
    let irql = current_irql();
    if irql > DISPATCH_LEVEL {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [lock.addr(), usize::from(irql), 0, 0],
            format!("KeAcquireSpinLockRaiseToDpc at IRQL {irql}"),
        );
    }
    let me = thread_id();
    // SAFETY: the driver passes its own spin lock (this function's contract).
    let word = unsafe { lock_word(lock) };
    if word.load(Ordering::Relaxed) == me {
        bugcheck(
            SPIN_LOCK_ALREADY_OWNED,
            [lock.addr(), 0, 0, 0],
            "KeAcquireSpinLockRaiseToDpc on a spin lock this thread holds".into(),
        );
    }
    set_irql(DISPATCH_LEVEL);
    let mut spins = 0u32;
    while word
        .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(1024) {
            drop(halt_if_stopped(self::lock()));
            std::thread::yield_now();
        }
        std::hint::spin_loop();
    }
    irql
}

/// # Safety
///
/// `lock` points to the driver's `KSPIN_LOCK` (`KeReleaseSpinLock`'s contract).
unsafe extern "win64" fn ke_release_spin_lock(lock: *mut usize, new_irql: u8) {
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
    if word.load(Ordering::Relaxed) != thread_id() {
        bugcheck(
            SPIN_LOCK_NOT_OWNED,
            [lock.addr(), 0, 0, 0],
            "KeReleaseSpinLock of a spin lock this thread does not hold".into(),
        );
    }
    if new_irql > DISPATCH_LEVEL {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [lock.addr(), usize::from(new_irql), 0, 0],
            format!("KeReleaseSpinLock to IRQL {new_irql}"),
        );
    }
    word.store(0, Ordering::Release);
    set_irql(new_irql);
}

/// # Safety
///
/// `interval` is valid for reads (`KeDelayExecutionThread`'s contract).
unsafe extern "win64" fn ke_delay_execution_thread(
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

extern "win64" fn ke_bug_check_ex(code: u32, p1: usize, p2: usize, p3: usize, p4: usize) -> ! {
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

/// `DbgPrint(Format, ...)`: the Windows x64 convention passes variadic arguments like fixed
/// ones, so the first three after the format arrive in `a1..a3`. Supported conversions:
/// `%s`, `%d`, `%u`, `%x`, `%p`, `%%` (what this driver uses, and a little more).
///
/// # Safety
///
/// `format` is a NUL-terminated string and each `%s` argument too (`DbgPrint`'s contract).
unsafe extern "win64" fn dbg_print(format: *const c_char, a1: usize, a2: usize, a3: usize) -> i32 {
    // SAFETY: NUL-terminated (this function's contract).
    let format = unsafe { CStr::from_ptr(format) }.to_bytes();
    let args = [a1, a2, a3];
    let mut next = args.iter().copied();
    let mut out = String::new();
    let mut bytes = format.iter().copied();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(char::from(b));
            continue;
        }
        match bytes.next() {
            Some(b'%') => out.push('%'),
            Some(conversion @ (b's' | b'd' | b'u' | b'x' | b'p')) => {
                let Some(arg) = next.next() else {
                    out.push_str("<more than 3 arguments: not modelled>");
                    break;
                };
                match conversion {
                    b's' => {
                        // SAFETY: a `%s` argument is a NUL-terminated string (contract).
                        let s = unsafe {
                            CStr::from_ptr(core::ptr::with_exposed_provenance::<c_char>(arg))
                        };
                        out.push_str(&s.to_string_lossy());
                    }
                    #[allow(clippy::cast_possible_truncation, reason = "%d is a 32-bit int")]
                    b'd' => out.push_str(&(arg as u32).cast_signed().to_string()),
                    #[allow(clippy::cast_possible_truncation, reason = "%u is a 32-bit int")]
                    b'u' => out.push_str(&(arg as u32).to_string()),
                    #[allow(clippy::cast_possible_truncation, reason = "%x is a 32-bit int")]
                    b'x' => {
                        let _ = write!(out, "{:x}", arg as u32);
                    }
                    _ => {
                        let _ = write!(out, "{arg:#x}");
                    }
                }
            }
            other => {
                out.push_str("<unsupported conversion %");
                if let Some(c) = other {
                    out.push(char::from(c));
                }
                out.push('>');
            }
        }
    }
    let mut state = lock();
    for line in out.trim_end_matches('\n').split('\n') {
        if state.echo {
            println!("{line}");
        }
        state.debugger.push(line.to_owned());
    }
    drop(state);
    if IN_CALLBACK.with(Cell::get) {
        let hook = IN_CALLBACK_HOOK
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((unload, driver_object)) = hook {
            note("fault injection: running the driver's DriverUnload inside its callback");
            // SAFETY: `unload` is the image's `DRIVER_UNLOAD` routine and `driver_object`
            // the machine's driver object, both given by the machine, which keeps them
            // alive while the image runs; the routine is an NTAPI function.
            let unload =
                unsafe { std::mem::transmute::<usize, extern "win64" fn(*mut u8)>(unload) };
            unload(core::ptr::with_exposed_provenance_mut(driver_object));
        }
    }
    STATUS_SUCCESS
}

fn pool_type(flags: u64) -> Option<&'static str> {
    let types = flags & (POOL_FLAG_NON_PAGED | POOL_FLAG_NON_PAGED_EXECUTE | POOL_FLAG_PAGED);
    match types {
        POOL_FLAG_NON_PAGED => Some("NonPagedPoolNx"),
        POOL_FLAG_NON_PAGED_EXECUTE => Some("NonPagedPoolExecute"),
        POOL_FLAG_PAGED => Some("PagedPool"),
        _ => None,
    }
}

extern "win64" fn ex_allocate_pool2(flags: u64, size: usize, tag: u32) -> *mut c_void {
    let irql = current_irql();
    let Some(kind) = pool_type(flags) else {
        note(&format!(
            "ExAllocatePool2: no single pool type in flags {flags:#x}: NULL"
        ));
        return core::ptr::null_mut();
    };
    let max = if kind == "PagedPool" {
        APC_LEVEL
    } else {
        DISPATCH_LEVEL
    };
    if irql > max {
        let code = if kind == "PagedPool" { 0x01 } else { 0x02 };
        bugcheck(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [code, usize::from(irql), 0, size],
            format!("ExAllocatePool2({kind}) at IRQL {irql}"),
        );
    }
    if size == 0 {
        bugcheck(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [0x00, usize::from(irql), 0, 0],
            "ExAllocatePool2 of zero bytes".into(),
        );
    }
    if flags & POOL_FLAG_RAISE_ON_FAILURE != 0 {
        note("ExAllocatePool2: POOL_FLAG_RAISE_ON_FAILURE is not modelled (no SEH here)");
    }
    let mut state = halt_if_stopped(lock());
    match state.pool.fail_after {
        Some(0) => {
            state.pool.fail_after = None;
            state.pool.stats.refused += 1;
            return core::ptr::null_mut();
        }
        Some(n) => state.pool.fail_after = Some(n - 1),
        None => {}
    }
    let Ok(layout) = std::alloc::Layout::from_size_align(size, 16) else {
        return core::ptr::null_mut();
    };
    // SAFETY: `layout` has a non-zero size (checked above).
    let block = unsafe { std::alloc::alloc(layout) };
    if block.is_null() {
        return core::ptr::null_mut();
    }
    let fill = if flags & POOL_FLAG_UNINITIALIZED != 0 {
        0xCD
    } else {
        0
    };
    // SAFETY: `block` is a fresh allocation of `size` bytes.
    unsafe { block.write_bytes(fill, size) };
    state
        .pool
        .blocks
        .insert(block.expose_provenance(), Block { layout, tag });
    let counters = &mut state.pool.stats;
    counters.allocations += 1;
    counters.live_blocks += 1;
    counters.live_bytes += size;
    counters.peak_bytes = counters.peak_bytes.max(counters.live_bytes);
    block.cast()
}

extern "win64" fn ex_free_pool_with_tag(p: *mut c_void, tag: u32) {
    let irql = current_irql();
    if irql > DISPATCH_LEVEL {
        bugcheck(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [0x12, usize::from(irql), 0, p.addr()],
            format!("ExFreePoolWithTag at IRQL {irql}"),
        );
    }
    let mut state = halt_if_stopped(lock());
    let Some(block) = state.pool.blocks.remove(&p.addr()) else {
        drop(state);
        bugcheck(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [0x10, p.addr(), 0, 0],
            format!("ExFreePoolWithTag({p:p}): not a live pool block (double free or bad address)"),
        );
    };
    if block.tag != tag {
        drop(state);
        bugcheck(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [0x16, 0, p.addr(), tag as usize],
            format!(
                "ExFreePoolWithTag({p:p}, {tag:#x}): allocated with tag {:#x}",
                block.tag
            ),
        );
    }
    let counters = &mut state.pool.stats;
    counters.frees += 1;
    counters.live_blocks -= 1;
    counters.live_bytes -= block.layout.size();
    drop(state);
    // SAFETY: `p` was allocated above with `block.layout` and is freed once (it was in the
    // live map, and is removed from it).
    unsafe { std::alloc::dealloc(p.cast(), block.layout) };
}

/// # Safety
///
/// `memcpy`'s contract: both ranges valid for `count` bytes.
unsafe extern "win64" fn memcpy(
    dest: *mut c_void,
    src: *const c_void,
    count: usize,
) -> *mut c_void {
    // SAFETY: valid ranges (contract); `copy` also tolerates an overlap.
    unsafe { core::ptr::copy(src.cast::<u8>(), dest.cast::<u8>(), count) };
    dest
}

/// # Safety
///
/// `memmove`'s contract: both ranges valid for `count` bytes.
unsafe extern "win64" fn memmove(
    dest: *mut c_void,
    src: *const c_void,
    count: usize,
) -> *mut c_void {
    // SAFETY: valid ranges (contract); `copy` handles the overlap.
    unsafe { core::ptr::copy(src.cast::<u8>(), dest.cast::<u8>(), count) };
    dest
}

/// # Safety
///
/// `memset`'s contract: `dest` valid for `count` bytes.
unsafe extern "win64" fn memset(dest: *mut c_void, c: i32, count: usize) -> *mut c_void {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "memset stores (unsigned char)c"
    )]
    let byte = c as u8;
    // SAFETY: valid range (contract).
    unsafe { dest.cast::<u8>().write_bytes(byte, count) };
    dest
}

/// # Safety
///
/// `memcmp`'s contract: both ranges valid for `count` bytes.
unsafe extern "win64" fn memcmp(a: *const c_void, b: *const c_void, count: usize) -> i32 {
    // SAFETY: valid ranges (contract).
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(a.cast::<u8>(), count),
            std::slice::from_raw_parts(b.cast::<u8>(), count),
        )
    };
    a.iter()
        .zip(b)
        .find(|(x, y)| x != y)
        .map_or(0, |(x, y)| i32::from(*x) - i32::from(*y))
}

/// # Safety
///
/// `strlen`'s contract: `s` is NUL-terminated.
unsafe extern "win64" fn strlen(s: *const c_char) -> usize {
    // SAFETY: NUL-terminated (contract).
    unsafe { CStr::from_ptr(s) }.count_bytes()
}

// ---------------------------------------------------------------------------------------
// netio.sys
// ---------------------------------------------------------------------------------------

fn check_netio_irql(call: &str, max: u8) {
    let irql = current_irql();
    if irql > max {
        bugcheck(
            IRQL_NOT_LESS_OR_EQUAL,
            [0, usize::from(irql), 0, 0],
            format!("{call} at IRQL {irql}; the documentation requires IRQL <= {max}"),
        );
    }
}

fn injected(call: NetioCall) -> Option<i32> {
    let mut state = halt_if_stopped(lock());
    state.netio.stats.calls[call as usize] += 1;
    state.netio.faults[call as usize].pop_front()
}

/// # Safety
///
/// `handle` is valid for a write (`NotifyTeredoPortChange`'s contract); `callback` stays
/// callable with `context` until a cancel of the handle succeeds.
unsafe extern "win64" fn notify_teredo_port_change(
    callback: usize,
    context: *mut c_void,
    initial_notification: u8,
    handle: *mut usize,
) -> i32 {
    check_netio_irql("NotifyTeredoPortChange", APC_LEVEL);
    if let Some(status) = injected(NetioCall::Notify) {
        return status;
    }
    if callback == 0 || handle.is_null() {
        return ERROR_INVALID_PARAMETER;
    }
    let id = {
        let mut state = lock();
        let id = state.netio.next_handle;
        state.netio.next_handle += 0x40;
        state.netio.registrations.insert(
            id,
            Registration {
                callback,
                context: context.expose_provenance(),
                cancelled: false,
                in_flight: None,
            },
        );
        state.netio.stats.handles.push(id);
        id
    };
    if initial_notification != 0 {
        // On a worker thread, and before the handle is written back, as the documentation
        // allows: the caller's context must be complete before it registers.
        let worker = std::thread::Builder::new()
            .name("netio-initial".into())
            .spawn(move || deliver(id, 0, MIB_INITIAL_NOTIFICATION));
        let Ok(worker) = worker else {
            lock().netio.registrations.remove(&id);
            return 0xC000_009A_u32.cast_signed();
        };
        while !worker.is_finished() {
            drop(halt_if_stopped(lock()));
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = worker.join();
    }
    // SAFETY: valid for a write (this function's contract).
    unsafe { handle.write(id) };
    STATUS_SUCCESS
}

/// # Safety
///
/// `port` is valid for a write (`GetTeredoPort`'s contract).
unsafe extern "win64" fn get_teredo_port(port: *mut u16) -> i32 {
    check_netio_irql("GetTeredoPort", APC_LEVEL);
    if let Some(status) = injected(NetioCall::GetPort) {
        return status;
    }
    if port.is_null() {
        return ERROR_INVALID_PARAMETER;
    }
    let state = lock();
    if !state.netio.ipv6 {
        return STATUS_NOT_SUPPORTED;
    }
    let Some(running) = state.netio.running else {
        return ERROR_NOT_READY;
    };
    // SAFETY: valid for a write (this function's contract).
    unsafe { port.write(running) };
    STATUS_SUCCESS
}

extern "win64" fn cancel_mib_change_notify2(handle: usize) -> i32 {
    check_netio_irql("CancelMibChangeNotify2", PASSIVE_LEVEL);
    if let Some(status) = injected(NetioCall::Cancel) {
        return status;
    }
    if handle == 0 {
        return ERROR_INVALID_PARAMETER;
    }
    let me = thread_id();
    let mut state = lock();
    let Some(reg) = state.netio.registrations.get_mut(&handle) else {
        return ERROR_INVALID_HANDLE;
    };
    if reg.cancelled {
        return ERROR_INVALID_HANDLE;
    }
    if reg.in_flight == Some(me) {
        state.netio.stats.self_cancels.push(handle);
        let line = format!(
            "[netio] CancelMibChangeNotify2({handle:#x}) from inside its own callback: a \
             deadlock on Windows; refused with STATUS_POSSIBLE_DEADLOCK"
        );
        if state.echo {
            println!("{line}");
        }
        state.debugger.push(line);
        return STATUS_POSSIBLE_DEADLOCK;
    }
    reg.cancelled = true;
    CHANGED.notify_all();
    // Wait for a callback in flight: after this returns, it never runs again.
    loop {
        state = halt_if_stopped(state);
        if state
            .netio
            .registrations
            .get(&handle)
            .is_none_or(|r| r.in_flight.is_none())
        {
            return STATUS_SUCCESS;
        }
        state = wait(state);
    }
}

/// The host function for `module!name`, as an address, or `None`.
#[must_use]
pub fn resolve(module: &str, name: &str) -> Option<usize> {
    let address = match (module.to_ascii_lowercase().as_str(), name) {
        ("ntoskrnl.exe", "KeGetCurrentIrql") => ke_get_current_irql as *const () as usize,
        ("ntoskrnl.exe", "KeAcquireSpinLockRaiseToDpc") => {
            ke_acquire_spin_lock_raise_to_dpc as *const () as usize
        }
        ("ntoskrnl.exe", "KeReleaseSpinLock") => ke_release_spin_lock as *const () as usize,
        ("ntoskrnl.exe", "PsGetCurrentThreadId") => ps_get_current_thread_id as *const () as usize,
        ("ntoskrnl.exe", "KeDelayExecutionThread") => {
            ke_delay_execution_thread as *const () as usize
        }
        ("ntoskrnl.exe", "KeBugCheckEx") => ke_bug_check_ex as *const () as usize,
        ("ntoskrnl.exe", "DbgPrint") => dbg_print as *const () as usize,
        ("ntoskrnl.exe", "ExAllocatePool2") => ex_allocate_pool2 as *const () as usize,
        ("ntoskrnl.exe", "ExFreePoolWithTag") => ex_free_pool_with_tag as *const () as usize,
        ("ntoskrnl.exe", "memcpy") => memcpy as *const () as usize,
        ("ntoskrnl.exe", "memmove") => memmove as *const () as usize,
        ("ntoskrnl.exe", "memset") => memset as *const () as usize,
        ("ntoskrnl.exe", "memcmp") => memcmp as *const () as usize,
        ("ntoskrnl.exe", "strlen") => strlen as *const () as usize,
        ("netio.sys", "NotifyTeredoPortChange") => notify_teredo_port_change as *const () as usize,
        ("netio.sys", "GetTeredoPort") => get_teredo_port as *const () as usize,
        ("netio.sys", "CancelMibChangeNotify2") => cancel_mib_change_notify2 as *const () as usize,
        _ => return None,
    };
    Some(address)
}
