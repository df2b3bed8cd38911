//! Helpers shared by the reliability tests (`model`, `faults`, `stress`).
//!
//! # Leak accounting
//!
//! [`CountingAlloc`] wraps the system allocator and counts live blocks and bytes,
//! process-wide. The mock netio allocates too (its registration map, queues and one delivery
//! thread per registration), so a count is only meaningful around a whole scenario: take
//! [`exclusive`] (every leak-checked test of a binary holds it, so no other test allocates
//! meanwhile), read [`live`], build the mock, the table and the watchers, run, drop them all
//! (cancel joins the mock's delivery threads, and dropping the last `MockNetio` frees its
//! state), and read [`live`] again: the library, the mock and the test's own closures must all
//! have given back every block. A difference is a leak of the library (the mock frees all it
//! owns when dropped, and the tests' closures are owned by the library once subscribed).
#![allow(dead_code, reason = "each test binary uses a subset")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The system allocator, counting live blocks and bytes.
pub struct CountingAlloc;

static BLOCKS: AtomicI64 = AtomicI64::new(0);
static BYTES: AtomicI64 = AtomicI64::new(0);

#[allow(
    clippy::cast_possible_wrap,
    reason = "allocation sizes are far below i64::MAX"
)]
fn size(layout: Layout) -> i64 {
    layout.size() as i64
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract holds as it does for `System`; the counters are plain atomics.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout (non-zero size by the caller's contract).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            BLOCKS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(size(layout), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            BLOCKS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(size(layout), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (so by `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        BLOCKS.fetch_sub(1, Ordering::Relaxed);
        BYTES.fetch_sub(size(layout), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged; `ptr`/`layout` come from this allocator.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            #[allow(
                clippy::cast_possible_wrap,
                reason = "allocation sizes are far below i64::MAX"
            )]
            BYTES.fetch_add(new_size as i64 - size(layout), Ordering::Relaxed);
        }
        p
    }
}

/// Live blocks and bytes right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Live {
    /// Blocks allocated and not freed.
    pub blocks: i64,
    /// Bytes allocated and not freed.
    pub bytes: i64,
}

/// Reads the counters.
pub fn live() -> Live {
    Live {
        blocks: BLOCKS.load(Ordering::SeqCst),
        bytes: BYTES.load(Ordering::SeqCst),
    }
}

static EXCLUSIVE: Mutex<()> = Mutex::new(());

/// Serializes the leak-checked tests of one binary (a panicking test does not poison it for
/// the others).
pub fn exclusive() -> MutexGuard<'static, ()> {
    EXCLUSIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether the long modes are on (`TEREDO_LONG=1`).
pub fn long_mode() -> bool {
    std::env::var_os("TEREDO_LONG").is_some_and(|v| v != "0")
}

/// Warms up lazily allocated process state (the std thread handle of the calling thread, the
/// first spawn) so that it is not counted inside a scenario.
pub fn warm_up() {
    let _ = std::thread::current();
    std::thread::spawn(|| ()).join().expect("warm-up thread");
}

/// Waits until the allocation counters stop moving (a test that finished just before may
/// still be freeing its output capture and thread state on other threads), up to a second.
pub fn settle() {
    let mut last = live();
    let mut stable = 0;
    for _ in 0..200 {
        std::thread::sleep(std::time::Duration::from_millis(5));
        let now = live();
        if now == last {
            stable += 1;
            if stable == 3 {
                return;
            }
        } else {
            stable = 0;
            last = now;
        }
    }
}
