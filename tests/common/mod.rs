//! Shared helpers for the host tests.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::sync::{Arc, Mutex, PoisonError};

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
