//! The firewall side: the exception set the driver enforces for Teredo, kept current from
//! the notifications.

use core::sync::atomic::{AtomicU32, Ordering};

use teredo_watcher::{PacketView, TEREDO_STATIC_PORT, TeredoEvent, TeredoExceptions, TeredoPort};

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

/// The exception set the tracker has applied, published for the driver's classify function:
/// one atomic word, `const`-constructible, so a driver keeps it in a `static` and a classify
/// function reads it with one load from a static address and no `unsafe`.
///
/// The word is [`NOT_LOADED`](Self::NOT_LOADED) while no tracker of a loaded driver has
/// published (before the subscription's snapshot, after a failed `DriverEntry`, after
/// `DriverUnload`), `0` while the set has no dynamic port, else the dynamic port. The static
/// port and the multicast group are constants of the set ([`TeredoExceptions::for_port`]).
///
/// # Ordering
///
/// `Relaxed` both ways: the word is the only datum published (nothing else is read on the
/// strength of it), and one word is never torn. Writers are serialized: the tracker runs
/// serialized in OS order (library guarantee), and `clear` runs when no callback of the
/// driver can run any more.
#[derive(Debug)]
pub struct AppliedExceptions(AtomicU32);

impl AppliedExceptions {
    /// The word's value while nothing is published.
    pub const NOT_LOADED: u32 = u32::MAX;

    /// Nothing published.
    #[must_use]
    pub const fn new() -> Self {
        AppliedExceptions(AtomicU32::new(Self::NOT_LOADED))
    }

    /// Publishes `exceptions` (its dynamic port; the rest is constant).
    ///
    /// # IRQL
    ///
    /// Any (one atomic store).
    pub fn publish(&self, exceptions: TeredoExceptions) {
        let word = exceptions.dynamic_port.map_or(0, |p| u32::from(p.get()));
        self.0.store(word, Ordering::Relaxed);
    }

    /// Back to "not loaded".
    ///
    /// # IRQL
    ///
    /// Any (one atomic store).
    pub fn clear(&self) {
        self.0.store(Self::NOT_LOADED, Ordering::Relaxed);
    }

    /// The raw word: [`NOT_LOADED`](Self::NOT_LOADED), `0` (no dynamic port) or the port.
    ///
    /// # IRQL
    ///
    /// Any (one atomic load).
    #[must_use]
    pub fn raw(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// The published set, `None` while nothing is published.
    ///
    /// # IRQL
    ///
    /// Any (one atomic load).
    #[must_use]
    pub fn get(&self) -> Option<TeredoExceptions> {
        match self.raw() {
            Self::NOT_LOADED => None,
            word => Some(TeredoExceptions::for_port(
                u16::try_from(word).ok().and_then(TeredoPort::new),
            )),
        }
    }

    /// The per-packet check of a classify function: whether `packet` is Teredo traffic the
    /// published set allows ([`TeredoExceptions::allows`], exact for Microsoft's rules:
    /// unicast to a local 3544 is not allowed, multicast to 224.0.0.253:3544 is); `false`
    /// while nothing is published.
    ///
    /// # IRQL
    ///
    /// Any (one atomic load).
    #[must_use]
    #[inline]
    pub fn allows(&self, packet: &PacketView) -> bool {
        self.get().is_some_and(|set| set.allows(packet))
    }

    /// Whether `port` is one of the local UDP ports of the published Teredo client: its
    /// dynamic port, or the static port 3544; `false` while nothing is published. A port
    /// match, not a firewall verdict: 3544 is Teredo's only for the multicast group
    /// 224.0.0.253, which [`allows`](Self::allows) checks. The `TeredoClassify` export
    /// answers this, the routine the C reference driver exports with the same signature,
    /// so the harness can time the two side by side.
    ///
    /// # IRQL
    ///
    /// Any (one atomic load).
    #[must_use]
    #[inline]
    pub fn is_teredo_local_port(&self, port: u16) -> bool {
        // On the word itself (the tests compare it with `get()` for every port):
        // `NOT_LOADED` is no `u16`, so it matches no port, and a word of 0 (no dynamic
        // port) must not match port 0.
        let word = self.raw();
        (port == TEREDO_STATIC_PORT && word != Self::NOT_LOADED)
            || (port != 0 && u32::from(port) == word)
    }
}

impl Default for AppliedExceptions {
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
    use core::net::Ipv4Addr;
    use teredo_watcher::{Direction, TEREDO_MULTICAST_GROUP};

    const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 20);

    /// Inbound unicast UDP to local `port` from an ephemeral remote port.
    fn unicast_to(port: u16) -> PacketView {
        PacketView::udp4(Direction::Inbound, HOST, port, 61_000)
    }

    /// Inbound multicast discovery: 224.0.0.253:3544.
    fn discovery() -> PacketView {
        PacketView::udp4(Direction::Inbound, TEREDO_MULTICAST_GROUP, 3544, 61_000)
    }

    #[test]
    fn applied_exceptions_publish_and_clear() {
        let applied = AppliedExceptions::new();
        assert_eq!(applied.get(), None);
        assert_eq!(applied.raw(), AppliedExceptions::NOT_LOADED);
        assert!(
            !applied.allows(&discovery()) && !applied.is_teredo_local_port(3544),
            "nothing is allowed before a publish"
        );
        applied.publish(TeredoExceptions::for_port(None));
        assert_eq!(applied.raw(), 0);
        assert!(applied.allows(&discovery()));
        assert!(
            !applied.allows(&unicast_to(3544)),
            "3544 is for the group only"
        );
        assert!(applied.is_teredo_local_port(3544));
        assert!(!applied.is_teredo_local_port(0) && !applied.allows(&unicast_to(0)));
        assert!(!applied.allows(&unicast_to(49_152)));
        applied.publish(TeredoExceptions::for_port(port(49_152)));
        assert_eq!(applied.raw(), 49_152);
        assert_eq!(
            applied.get(),
            Some(TeredoExceptions::for_port(port(49_152)))
        );
        assert!(applied.allows(&unicast_to(49_152)) && applied.is_teredo_local_port(49_152));
        assert!(applied.allows(&discovery()));
        assert!(!applied.allows(&unicast_to(49_153)));
        applied.clear();
        assert_eq!(applied.get(), None);
        assert!(!applied.allows(&unicast_to(49_152)) && !applied.is_teredo_local_port(49_152));
    }

    #[test]
    fn applied_exceptions_checks_match_the_published_set_for_every_port() {
        let applied = AppliedExceptions::new();
        for published in [
            None,
            Some(None),
            Some(port(3544)),
            Some(port(49_152)),
            Some(port(65_535)),
        ] {
            match published {
                None => applied.clear(),
                Some(dynamic) => applied.publish(TeredoExceptions::for_port(dynamic)),
            }
            for p in 0..=u16::MAX {
                // The word check against the set it encodes: the dynamic port or 3544.
                let local = applied.get().is_some_and(|e| {
                    p == e.static_port || e.dynamic_port.is_some_and(|d| d.get() == p)
                });
                assert_eq!(
                    applied.is_teredo_local_port(p),
                    local,
                    "{published:?} port {p}"
                );
                // The verdict: unicast to a local port is allowed for the dynamic port only.
                let dynamic = published.flatten().is_some_and(|d| d.get() == p);
                assert_eq!(
                    applied.allows(&unicast_to(p)),
                    dynamic,
                    "{published:?} port {p}"
                );
            }
        }
    }

    fn port(p: u16) -> Option<TeredoPort> {
        TeredoPort::new(p)
    }

    #[test]
    fn starts_with_static_port_and_group_only() {
        let t = ExceptionTracker::new();
        assert_eq!(t.applied().dynamic_port, None);
        assert_eq!(t.applied().static_port, TEREDO_STATIC_PORT);
        assert_eq!(t.applied().multicast_group, TEREDO_MULTICAST_GROUP);
        assert!(t.applied().allows(&discovery()));
        assert!(!t.applied().allows(&unicast_to(3544)));
        assert!(!t.applied().allows(&unicast_to(49_152)));
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
        assert!(t.applied().allows(&unicast_to(49_152)));
        assert_eq!(
            t.update(TeredoEvent::PortChanged { port: port(49_159) }),
            ExceptionChange::Updated {
                opened: port(49_159),
                closed: port(49_152)
            }
        );
        assert!(!t.applied().allows(&unicast_to(49_152)));
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
        assert!(t.applied().allows(&discovery()));
        assert!(!t.applied().allows(&unicast_to(49_159)));
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

    #[test]
    fn the_change_counter_saturates_instead_of_overflowing() {
        // The counter is updated on the callback path, where a debug build's overflow panic
        // would be a bugcheck.
        let mut t = ExceptionTracker::new();
        t.changes = u32::MAX - 1;
        t.update(TeredoEvent::Added { port: port(50_000) });
        t.update(TeredoEvent::PortChanged { port: port(50_007) });
        t.update(TeredoEvent::Deleted {
            previous: port(50_007),
        });
        assert_eq!(t.changes(), u32::MAX);
        assert_eq!(t.applied().dynamic_port, None);
    }
}
