//! The host binding (feature `host-mock`): the target of `log!` on a development machine,
//! for the scripted scenario (`src/bin/teredo-monitor-demo.rs`) and the tests.
//!
//! `log!` renders into the same stack [`Line`] as in the driver, and printing it allocates
//! nothing, so the demo's allocation count covers only the driver, the library and the mock
//! (the tests' capture buffer does allocate, for each captured line).
//!
//! Besides printing, the binding can:
//! - capture lines instead of printing them ([`capture`], for tests);
//! - hold a callback inside the driver's code ([`hold_next_callback`]): the next line
//!   logged by another thread (a mock delivery thread) blocks after printing until
//!   [`release_held_callback`], so the demo can unload while a callback is in flight;
//! - count lines that driver code logs from other threads after [`mark_unloaded`]
//!   ([`late_callback_lines`]): any would be a callback running into an unloaded image.

use std::io::Write as _;
use std::string::{String, ToString};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, ThreadId};
use std::vec::Vec;

#[derive(Default)]
struct HostState {
    capture: Option<Vec<String>>,
    hold_armed_by: Option<ThreadId>,
    lines_by_holder: usize,
    held: bool,
    release: bool,
    unloaded_by: Option<ThreadId>,
    late_lines: usize,
    image_references: usize,
}

struct Shared {
    state: Mutex<HostState>,
    changed: Condvar,
}

static SHARED: Shared = Shared {
    state: Mutex::new(HostState {
        capture: None,
        hold_armed_by: None,
        lines_by_holder: 0,
        held: false,
        release: false,
        unloaded_by: None,
        late_lines: 0,
        image_references: 0,
    }),
    changed: Condvar::new(),
};

fn state() -> MutexGuard<'static, HostState> {
    SHARED.state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait(guard: MutexGuard<'static, HostState>) -> MutexGuard<'static, HostState> {
    SHARED
        .changed
        .wait(guard)
        .unwrap_or_else(PoisonError::into_inner)
}

use crate::log::Line;

/// The target of `log!` on the host.
pub fn log(line: &Line) {
    let me = thread::current().id();

    let mut s = state();
    if s.unloaded_by.is_some_and(|t| t != me) {
        s.late_lines += 1;
    }
    if let Some(lines) = s.capture.as_mut() {
        lines.push(line.as_str().to_string());
    } else {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "[driver] {}", line.as_str());
        let _ = out.flush();
    }
    if s.hold_armed_by == Some(me) {
        s.lines_by_holder += 1;
        SHARED.changed.notify_all();
    }
    if s.hold_armed_by.is_some_and(|t| t != me) && !s.held {
        // A callback is inside driver code: keep it there until released.
        s.held = true;
        SHARED.changed.notify_all();
        while !s.release {
            s = wait(s);
        }
        s.hold_armed_by = None;
        s.held = false;
        s.release = false;
    }
}

/// Starts capturing log lines instead of printing them (drops earlier captured lines).
pub fn capture() {
    state().capture = Some(Vec::new());
}

/// Stops capturing and returns the captured lines.
#[must_use]
pub fn take_captured() -> Vec<String> {
    state().capture.take().unwrap_or_default()
}

/// Arms the hold: the next line logged by a thread other than this one blocks (inside the
/// driver's callback) until [`release_held_callback`].
pub fn hold_next_callback() {
    let mut s = state();
    s.hold_armed_by = Some(thread::current().id());
    s.lines_by_holder = 0;
    s.held = false;
    s.release = false;
}

/// Waits until a callback is being held.
pub fn wait_until_held() {
    let mut s = state();
    while !s.held {
        s = wait(s);
    }
}

/// Waits (on another thread) until the thread that armed the hold has logged `count` lines
/// since arming it: for instance the `DriverUnload` line that precedes the cancel.
pub fn wait_for_lines_by_holder(count: usize) {
    let mut s = state();
    while s.lines_by_holder < count {
        s = wait(s);
    }
}

/// Whether a callback is being held right now.
#[must_use]
pub fn callback_held() -> bool {
    state().held
}

/// Lets the held callback continue.
pub fn release_held_callback() {
    let mut s = state();
    s.release = true;
    SHARED.changed.notify_all();
}

/// Records that the driver was unloaded by this thread: from now on, lines logged by any
/// other thread are counted as late callbacks.
pub fn mark_unloaded() {
    let mut s = state();
    s.unloaded_by = Some(thread::current().id());
    s.late_lines = 0;
}

/// Lines logged by other threads since [`mark_unloaded`].
#[must_use]
pub fn late_callback_lines() -> usize {
    state().late_lines
}

/// Clears the unload mark and the hold (between tests).
pub fn reset() {
    let mut s = state();
    s.unloaded_by = None;
    s.late_lines = 0;
    s.image_references = 0;
    s.hold_armed_by = None;
    s.lines_by_holder = 0;
    s.held = false;
    s.release = false;
}

static EXCLUSIVE: Mutex<()> = Mutex::new(());

/// The host platform's part of the unload policy (`driver`'s module documentation): where
/// the kernel platforms take a reference on the driver object that keeps the image loaded,
/// the host has no image to keep and records the reference instead.
pub fn keep_image_loaded() {
    state().image_references += 1;
}

/// References [`keep_image_loaded`] recorded since the last [`reset`].
#[must_use]
pub fn image_references() -> usize {
    state().image_references
}

/// Serializes users of this process-wide binding (tests run on several threads).
pub fn exclusive() -> MutexGuard<'static, ()> {
    EXCLUSIVE.lock().unwrap_or_else(PoisonError::into_inner)
}
