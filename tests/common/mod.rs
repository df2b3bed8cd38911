//! Shared helpers for the host tests.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use teredo_watcher::TeredoEvent;

/// Records the events a subscriber receives.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<TeredoEvent>>>);

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A subscriber closure that appends to this recorder.
    pub fn subscriber(&self) -> impl FnMut(TeredoEvent) + Send + 'static {
        let events = Arc::clone(&self.0);
        move |event| {
            events
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(event);
        }
    }

    pub fn events(&self) -> Vec<TeredoEvent> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// The port numbers carried by a list of events (`None` entries for `Initial`).
pub fn ports(events: &[TeredoEvent]) -> Vec<Option<u16>> {
    events
        .iter()
        .map(|e| e.port().map(teredo_watcher::TeredoPort::get))
        .collect()
}

/// A gate a subscriber blocks on while it is closed; counts the callers that reached it.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<(bool, usize)>, Condvar)>);

impl Gate {
    /// A closed gate.
    pub fn closed() -> Self {
        Gate::default()
    }
    /// Counts the caller, then blocks it until the gate is open.
    pub fn pass(&self) {
        let (lock, cv) = &*self.0;
        let mut s = lock.lock().unwrap_or_else(PoisonError::into_inner);
        s.1 += 1;
        cv.notify_all();
        while !s.0 {
            s = cv.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }
    /// Opens the gate for good.
    pub fn open(&self) {
        let (lock, cv) = &*self.0;
        lock.lock().unwrap_or_else(PoisonError::into_inner).0 = true;
        cv.notify_all();
    }
    /// How many callers reached the gate.
    pub fn reached(&self) -> usize {
        self.0.0.lock().unwrap_or_else(PoisonError::into_inner).1
    }
    /// Opens the gate when dropped, so a failing assertion unwinds instead of leaving a
    /// callback blocked (the unwinding drop of its watcher would wait for it forever).
    pub fn opener(&self) -> GateOpener {
        GateOpener(self.clone())
    }
}

/// See [`Gate::opener`].
pub struct GateOpener(Gate);

impl Drop for GateOpener {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Sets a flag when dropped: tells whether the library freed a subscriber.
pub struct DropFlag(pub Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
