//! The firewall side: the exception set the driver enforces for Teredo, kept current from
//! the notifications.

use teredo_watcher::{TeredoEvent, TeredoExceptions, TeredoPort};

/// The Teredo exception set the firewall has applied, and how it got there.
///
/// Owned by the driver's exception subscriber (it runs serialized, in OS order), so it needs
/// no lock. [`update`](Self::update) neither allocates nor waits: it is valid at
/// `DISPATCH_LEVEL`, where notifications may arrive.
///
/// A production firewall would program WFP filters here; filter changes run at
/// `PASSIVE_LEVEL`, so it would queue a work item from the callback. This example keeps the
/// set in memory and logs every change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExceptionTracker {
    applied: TeredoExceptions,
    changes: u32,
}

/// What one event did to the exception set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExceptionChange {
    /// The set is as it was.
    Unchanged,
    /// The dynamic port changed: `opened` is allowed now, `closed` is not any more.
    Updated {
        /// The port newly allowed, if any.
        opened: Option<TeredoPort>,
        /// The port no longer allowed, if any.
        closed: Option<TeredoPort>,
    },
}

impl ExceptionTracker {
    /// The set before any notification: static port and group only.
    #[must_use]
    pub const fn new() -> Self {
        ExceptionTracker {
            applied: TeredoExceptions::for_port(None),
            changes: 0,
        }
    }

    /// The set the firewall applies now.
    #[must_use]
    pub const fn applied(&self) -> TeredoExceptions {
        self.applied
    }

    /// How many times the set changed.
    #[must_use]
    pub const fn changes(&self) -> u32 {
        self.changes
    }

    /// Applies one event: the dynamic port allowed becomes `event.port()`, the port after
    /// the event (a deletion closes it; the initial notification and unknown types carry the
    /// port as it was).
    pub fn update(&mut self, event: TeredoEvent) -> ExceptionChange {
        let before = self.applied.dynamic_port;
        let after = event.port();
        if after == before {
            return ExceptionChange::Unchanged;
        }
        self.applied = TeredoExceptions::for_port(after);
        // Saturating: a counter on the callback path must never panic (debug builds) nor
        // wrap into a smaller count.
        self.changes = self.changes.saturating_add(1);
        ExceptionChange::Updated {
            opened: after,
            closed: before,
        }
    }
}

impl Default for ExceptionTracker {
    fn default() -> Self {
        Self::new()
    }
}

/// A short, stable name for an event in the log.
#[must_use]
pub fn event_name(event: &TeredoEvent) -> &'static str {
    match event {
        TeredoEvent::Initial { .. } => "MibInitialNotification (registration confirmed)",
        TeredoEvent::PortChanged { .. } => "MibParameterNotification (port changed)",
        TeredoEvent::Added { .. } => "MibAddInstance (client started)",
        TeredoEvent::Deleted { .. } => "MibDeleteInstance (client stopped)",
        TeredoEvent::Unknown { .. } => "unknown notification type",
        TeredoEvent::Snapshot { .. } => "snapshot (current state: subscription, seed, coalesced)",
    }
}

#[cfg(all(test, feature = "host-mock"))]
mod tests {
    use super::*;
    use teredo_watcher::{TEREDO_MULTICAST_GROUP, TEREDO_STATIC_PORT};

    fn port(p: u16) -> Option<TeredoPort> {
        TeredoPort::new(p)
    }

    #[test]
    fn starts_with_static_port_and_group_only() {
        let t = ExceptionTracker::new();
        assert_eq!(t.applied().dynamic_port, None);
        assert_eq!(t.applied().static_port, TEREDO_STATIC_PORT);
        assert_eq!(t.applied().multicast_group, TEREDO_MULTICAST_GROUP);
        assert!(t.applied().allows_udp_port(3544));
        assert!(!t.applied().allows_udp_port(49_152));
    }

    #[test]
    fn follows_start_restart_stop() {
        let mut t = ExceptionTracker::new();
        assert_eq!(
            t.update(TeredoEvent::Initial { port: None }),
            ExceptionChange::Unchanged
        );
        assert_eq!(
            t.update(TeredoEvent::Added { port: port(49_152) }),
            ExceptionChange::Updated {
                opened: port(49_152),
                closed: None
            }
        );
        assert!(t.applied().allows_udp_port(49_152));
        assert_eq!(
            t.update(TeredoEvent::PortChanged { port: port(49_159) }),
            ExceptionChange::Updated {
                opened: port(49_159),
                closed: port(49_152)
            }
        );
        assert!(!t.applied().allows_udp_port(49_152));
        assert_eq!(
            t.update(TeredoEvent::Deleted {
                previous: port(49_159)
            }),
            ExceptionChange::Updated {
                opened: None,
                closed: port(49_159)
            }
        );
        assert_eq!(t.applied().dynamic_port, None);
        assert!(t.applied().allows_udp_port(3544));
        assert_eq!(t.changes(), 3);
    }

    #[test]
    fn unknown_types_and_repeats_change_nothing() {
        let mut t = ExceptionTracker::new();
        t.update(TeredoEvent::Snapshot { port: port(50_000) });
        // An unknown type carries the port as it was (what the watcher delivers), whatever
        // raw port the OS passed with it.
        let unknown = TeredoEvent::Unknown {
            raw_type: 42,
            raw_port: 1,
            port: port(50_000),
        };
        assert_eq!(t.update(unknown), ExceptionChange::Unchanged);
        assert_eq!(
            t.update(TeredoEvent::PortChanged { port: port(50_000) }),
            ExceptionChange::Unchanged
        );
        assert_eq!(t.applied().dynamic_port, port(50_000));
        assert_eq!(t.changes(), 1);
    }
}
