//! Subscribers whose alignment is larger than what kernel pool blocks have.
//!
//! `wdk-alloc` 0.4.2 ignores `Layout::align()`: pool blocks are 16-byte aligned on x64. This
//! binary's global allocator behaves the same way on purpose (a block asked for with a larger
//! alignment is 16-aligned but never 32-aligned), so a library that trusted the layout's
//! alignment would place an over-aligned closure at a misaligned address.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use teredo_watcher::mock::MockNetio;
use teredo_watcher::{HandleTable, TeredoPortWatcher, WatcherOptions};

/// While armed, honours alignments up to 16 only, as a kernel pool allocator does, and counts
/// the requests for more. Unarmed it is `System` (the test harness and std allocate with
/// larger alignments too, and must get them).
struct PoolLikeAllocator;

static OVER_ALIGNED_REQUESTS: AtomicUsize = AtomicUsize::new(0);

std::thread_local! {
    static ARMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's allocations served as a pool allocator would.
fn pool_like<R>(f: impl FnOnce() -> R) -> R {
    ARMED.with(|a| a.set(true));
    let result = f();
    ARMED.with(|a| a.set(false));
    result
}

/// Whether this thread's allocations are served pool-like now.
fn armed() -> bool {
    ARMED.try_with(std::cell::Cell::get).unwrap_or(false)
}

/// Where a 16-aligned, never-32-aligned block starts inside a 64-aligned system block.
const SKEW: usize = 16;

// SAFETY: every block is a `System` block: of the caller's layout, or (armed, alignment above
// 16) of a layout derived from it with a fixed rule and returned `SKEW` bytes in, which
// `dealloc` recognises by its address and undoes; either way large enough for the caller.
unsafe impl GlobalAlloc for PoolLikeAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= 16 || !armed() {
            // SAFETY: forwarded unchanged.
            return unsafe { System.alloc(layout) };
        }
        OVER_ALIGNED_REQUESTS.fetch_add(1, Ordering::SeqCst);
        let Ok(block) = Layout::from_size_align(layout.size() + SKEW, 64) else {
            return std::ptr::null_mut();
        };
        // SAFETY: a non-zero size (`SKEW > 0`).
        let base = unsafe { System.alloc(block) };
        if base.is_null() {
            return base;
        }
        // SAFETY: `SKEW` bytes into a block of `size + SKEW` bytes.
        unsafe { base.add(SKEW) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.align() <= 16 || !skewed(ptr) {
            // SAFETY: allocated by `System` with this layout.
            return unsafe { System.dealloc(ptr, layout) };
        }
        let block = Layout::from_size_align(layout.size() + SKEW, 64).expect("as in alloc");
        // SAFETY: `ptr` is `SKEW` bytes into the `System` block of `block` made by `alloc`.
        unsafe { System.dealloc(ptr.sub(SKEW), block) };
    }
}

/// Whether `ptr` came from the skewed path of `alloc`: those blocks are `SKEW` bytes past a
/// 64-aligned address, which `System` never returns for a layout of alignment above 16.
fn skewed(ptr: *mut u8) -> bool {
    (ptr as usize) % 64 == SKEW
}

#[global_allocator]
static ALLOCATOR: PoolLikeAllocator = PoolLikeAllocator;

#[repr(align(64))]
struct CacheLine([u8; 64]);

#[test]
fn the_allocator_really_misaligns_over_aligned_requests() {
    // The test below means something only if an allocation of the capture's layout is
    // misaligned (asked directly, so no misaligned reference is ever made).
    let layout = Layout::new::<CacheLine>();
    // SAFETY: a non-zero size.
    let block = pool_like(|| unsafe { ALLOCATOR.alloc(layout) });
    assert!(!block.is_null());
    let address = block as usize;
    // SAFETY: allocated just above with this layout.
    unsafe { ALLOCATOR.dealloc(block, layout) };
    assert_eq!(address % 16, 0, "pool blocks are 16-aligned");
    assert_ne!(
        address % 64,
        0,
        "the test allocator aligned a 64-byte request"
    );
}

#[test]
fn a_subscriber_aligned_to_64_is_stored_aligned() {
    let netio = MockNetio::new();
    let table = HandleTable::new(netio.clone());
    let watcher = TeredoPortWatcher::new(
        &table,
        WatcherOptions {
            initial_notification: false,
            max_subscribers: 2,
            seed_current_port: false,
        },
    )
    .expect("register");
    let aligned = Arc::new(AtomicBool::new(false));
    let called = Arc::new(AtomicUsize::new(0));
    let (a, c) = (Arc::clone(&aligned), Arc::clone(&called));
    let line = CacheLine([1; 64]);
    let requests_before = OVER_ALIGNED_REQUESTS.load(Ordering::SeqCst);
    pool_like(|| {
        watcher.subscribe(move |_event| {
            let address = std::ptr::from_ref(&line) as usize;
            a.store(
                address.is_multiple_of(64) && line.0[0] == 1,
                Ordering::SeqCst,
            );
            c.fetch_add(1, Ordering::SeqCst);
        })
    })
    .expect("subscribe");
    assert_eq!(
        OVER_ALIGNED_REQUESTS.load(Ordering::SeqCst),
        requests_before,
        "the library asked the allocator for more than pool blocks guarantee"
    );
    netio.client().start();
    netio.wait_idle();
    assert_eq!(called.load(Ordering::SeqCst), 1);
    assert!(aligned.load(Ordering::SeqCst), "the capture was misaligned");
    watcher.unregister().expect("cancel");
}
