//! Fault sweep: every library entry point that reaches netio, times every status code that
//! docs/kernel-facts.md names (success included) plus undocumented ones, times every IRQL.
//!
//! For each cell a fresh mock (client started) and table are built, the status is injected on
//! the netio call the entry point makes, and the entry point runs at the IRQL of the column
//! (IRQL violations are recorded, not panicked on, so the error value itself is checked).
//! The cell passes when:
//! - the outcome is the documented one: `IrqlTooHigh` (with operation, IRQL and bound) and no
//!   netio call above the documented IRQL; otherwise the error named for the status in
//!   docs/kernel-facts.md with the call and the raw code kept, or success for zero;
//! - the handle table and the mock agree on the live registrations right after the call;
//! - after dropping everything and tearing down (at `PASSIVE_LEVEL`, retrying while a failure
//!   injected for a call that never came is still queued), no registration is left and the
//!   counting allocator is back at its baseline.
//!
//! The sweep is printed as a table (`cargo test --test faults -- --nocapture`).

mod reliability_common;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

use teredo_watcher::mock::{MockNetio, ViolationPolicy, set_violation_policy, with_irql};
use teredo_watcher::{
    Error, HandleTable, Irql, IrqlBound, NetioCall, NetioStatus, TeredoEvent, TeredoPort,
    TeredoPortWatcher, WatcherOptions, sys,
};

use reliability_common::{CountingAlloc, exclusive, live, warm_up};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// `STATUS_UNSUCCESSFUL` and `ERROR_ACCESS_DENIED`: not named by the documentation.
const UNDOCUMENTED: [(&str, i32); 2] = [
    ("STATUS_UNSUCCESSFUL*", 0xC000_0001_u32.cast_signed()),
    ("ERROR_ACCESS_DENIED*", 5),
];

const IRQLS: [Irql; 4] = [
    Irql::PASSIVE_LEVEL,
    Irql::APC_LEVEL,
    Irql::DISPATCH_LEVEL,
    Irql::HIGH_LEVEL,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    /// `TeredoPortWatcher::new` (`NotifyTeredoPortChange`).
    Create,
    /// `TeredoPortWatcher::new` seeding the port (`GetTeredoPort`, failure tolerated).
    CreateSeed,
    /// `HandleTable::query_port` (`GetTeredoPort`).
    Query,
    /// `TeredoPortWatcher::unregister` (`CancelMibChangeNotify2`).
    Unregister,
    /// Dropping a watcher (`CancelMibChangeNotify2`, status not reported).
    Drop,
    /// `HandleTable::teardown` (`CancelMibChangeNotify2`).
    Teardown,
}

const ENTRIES: [Entry; 6] = [
    Entry::Create,
    Entry::CreateSeed,
    Entry::Query,
    Entry::Unregister,
    Entry::Drop,
    Entry::Teardown,
];

impl Entry {
    fn name(self) -> &'static str {
        match self {
            Entry::Create => "TeredoPortWatcher::new",
            Entry::CreateSeed => "TeredoPortWatcher::new (seed)",
            Entry::Query => "HandleTable::query_port",
            Entry::Unregister => "TeredoPortWatcher::unregister",
            Entry::Drop => "drop(TeredoPortWatcher)",
            Entry::Teardown => "HandleTable::teardown",
        }
    }

    fn call(self) -> NetioCall {
        match self {
            Entry::Create => NetioCall::NotifyTeredoPortChange,
            Entry::CreateSeed | Entry::Query => NetioCall::GetTeredoPort,
            Entry::Unregister | Entry::Drop | Entry::Teardown => NetioCall::CancelMibChangeNotify2,
        }
    }

    fn call_index(self) -> usize {
        match self.call() {
            NetioCall::NotifyTeredoPortChange => 0,
            NetioCall::GetTeredoPort => 1,
            NetioCall::CancelMibChangeNotify2 => 2,
        }
    }

    /// The operation name and bound of its IRQL check.
    fn irql_check(self) -> (&'static str, IrqlBound) {
        match self {
            Entry::Create | Entry::CreateSeed => ("TeredoPortWatcher::new", IrqlBound::Passive),
            Entry::Query => ("GetTeredoPort", IrqlBound::BelowDispatch),
            Entry::Unregister | Entry::Drop => {
                ("TeredoPortWatcher::unregister", IrqlBound::Passive)
            }
            Entry::Teardown => ("HandleTable::teardown", IrqlBound::Passive),
        }
    }
}

/// The error docs/kernel-facts.md names for a failing status (written out here, independently of
/// the library's own mapping).
fn documented_error(call: NetioCall, code: i32) -> Error {
    let status = NetioStatus(code);
    #[allow(
        clippy::unreadable_literal,
        reason = "as written in docs/kernel-facts.md"
    )]
    match code.cast_unsigned() {
        0xC000000D | 87 => Error::InvalidParameter { call, status },
        0xC0000008 | 6 => Error::InvalidHandle { call, status },
        0xC0000017 | 0xC000009A | 8 => Error::OutOfMemory { call, status },
        0xC00000A3 | 21 => Error::TeredoNotStarted { call, status },
        0xC00000BB => Error::NoIpv6Stack { call, status },
        _ => Error::Netio { call, status },
    }
}

/// Short name of an outcome for the table.
fn short(result: &Result<(), Error>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(e) => {
            let s = format!("{e:?}");
            s.split([' ', '{']).next().unwrap_or_default().to_string()
        }
    }
}

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

/// Runs one cell; returns its short outcome, or what went wrong.
#[allow(clippy::too_many_lines, reason = "one arm per entry point")]
fn cell(entry: Entry, code: i32, irql: Irql) -> Result<String, String> {
    let before = live();
    let netio = MockNetio::new();
    let running = netio.client().start();
    let table = HandleTable::new(netio.clone());
    let log: Arc<Mutex<Vec<TeredoEvent>>> = Arc::default();
    let recorder = {
        let log = Arc::clone(&log);
        move |e| log.lock().unwrap_or_else(PoisonError::into_inner).push(e)
    };
    let options = WatcherOptions::default();

    // Set-up at PASSIVE_LEVEL: the entry points that cancel need a live watcher.
    let mut watcher = match entry {
        Entry::Unregister | Entry::Drop | Entry::Teardown => Some(
            TeredoPortWatcher::with_subscriber(&table, options, recorder.clone())
                .map_err(|e| format!("set-up: {e}"))?
                .0,
        ),
        _ => None,
    };
    netio.wait_idle();
    let calls_before = netio.calls();
    netio.fail_next(entry.call(), code);

    let (operation, bound) = entry.irql_check();
    let allowed = bound.allows(irql);
    let irql_error = Err(Error::IrqlTooHigh {
        operation,
        current: irql,
        required: bound,
    });
    let fails = code != sys::STATUS_SUCCESS;
    let netio_error = Err(documented_error(entry.call(), code));
    // Notes for the printed table (no allocation inside the measured scenario).
    let mut note = "";
    let mut report_error = None;

    let (result, expected): (Result<(), Error>, Result<(), Error>) = match entry {
        Entry::Create | Entry::CreateSeed => {
            let created = with_irql(irql, || {
                TeredoPortWatcher::with_subscriber(&table, options, recorder.clone())
            });
            let result = created.as_ref().map(|_| ()).map_err(|e| *e);
            if let Ok((w, _)) = &created {
                // Seeding: a failing GetTeredoPort leaves the port unknown.
                let seeded = if entry == Entry::CreateSeed && fails {
                    None
                } else {
                    TeredoPort::new(running)
                };
                ensure(w.current_port() == seeded, || {
                    format!("port {:?}, expected {seeded:?}", w.current_port())
                })?;
                if entry == Entry::CreateSeed {
                    note = if seeded.is_some() {
                        ", port seeded"
                    } else {
                        ", port unknown"
                    };
                }
            }
            watcher = created.ok().map(|(w, _)| w);
            let expected = if !allowed {
                irql_error
            } else if entry == Entry::Create && fails {
                netio_error
            } else {
                Ok(())
            };
            (result, expected)
        }
        Entry::Query => {
            let result = with_irql(irql, || table.query_port());
            if allowed && !fails {
                ensure(result == Ok(TeredoPort::new(running)), || {
                    format!("query {result:?}")
                })?;
            }
            let expected = if !allowed {
                irql_error
            } else if fails {
                netio_error
            } else {
                Ok(())
            };
            (result.map(|_| ()), expected)
        }
        Entry::Unregister | Entry::Drop => {
            let w = watcher.take().ok_or("no watcher")?;
            let result = with_irql(irql, || {
                if entry == Entry::Unregister {
                    w.unregister()
                } else {
                    drop(w);
                    Ok(())
                }
            });
            let expected = if entry == Entry::Drop {
                Ok(())
            } else if !allowed {
                irql_error
            } else if fails {
                netio_error
            } else {
                Ok(())
            };
            // A registration that could not be cancelled stays live (left to the teardown).
            let still_live = !allowed || fails;
            if entry == Entry::Drop {
                note = if still_live {
                    " (left to teardown)"
                } else {
                    " (cancelled)"
                };
            }
            ensure(
                netio.live_registrations() == usize::from(still_live),
                || {
                    format!(
                        "{} live registrations after the call",
                        netio.live_registrations()
                    )
                },
            )?;
            (result, expected)
        }
        Entry::Teardown => {
            let result = with_irql(irql, || table.teardown());
            let expected = if allowed { Ok(()) } else { irql_error };
            if let Ok(report) = &result {
                let want_failed = usize::from(fails);
                ensure(
                    report.failed == want_failed
                        && report.cancelled == 1 - want_failed
                        && report.first_error == netio_error.err().filter(|_| fails),
                    || format!("teardown report {report:?}"),
                )?;
                report_error = report.first_error;
            }
            ensure(table.is_closed() == allowed, || "closed flag".into())?;
            (result.map(|_| ()), expected)
        }
    };

    ensure(result == expected, || {
        format!("got {result:?}, expected {expected:?}")
    })?;
    if let Err(e) = result {
        if e.call().is_some() {
            ensure(
                e.status() == Some(NetioStatus(code)) && e.call() == Some(entry.call()),
                || format!("raw status lost: {e:?}"),
            )?;
        }
    }
    // No netio call above the documented IRQL; exactly one call of the faulted kind otherwise.
    let calls = netio.calls();
    let made = calls[entry.call_index()] - calls_before[entry.call_index()];
    let wanted = usize::from(allowed);
    ensure(made == wanted, || {
        format!("{made} netio calls, expected {wanted}")
    })?;
    ensure(
        table.live_registrations() == netio.live_registrations(),
        || {
            format!(
                "table says {} live, mock {}",
                table.live_registrations(),
                netio.live_registrations()
            )
        },
    )?;

    // Clean-up at PASSIVE_LEVEL.
    netio.wait_idle();
    drop(watcher);
    let mut attempts = 0;
    while netio.live_registrations() > 0 || table.live_registrations() > 0 || !table.is_closed() {
        let _ = table.teardown();
        attempts += 1;
        ensure(attempts < 4, || "teardown never completes".into())?;
    }
    drop(table);
    drop(netio);
    drop(recorder);
    drop(log);
    let after = live();
    ensure(after == before, || {
        format!("leak: {before:?} before, {after:?} after")
    })?;
    let report = report_error.map_or(String::new(), |e| {
        format!(", report: failed {}", short(&Err(e)))
    });
    Ok(format!("{}{note}{report}", short(&result)))
}

#[test]
fn fault_sweep() {
    let _serial = exclusive();
    warm_up();
    set_violation_policy(ViolationPolicy::Record);
    let codes: Vec<(&str, i32)> = sys::DOCUMENTED_STATUS_CODES
        .iter()
        .copied()
        .chain(UNDOCUMENTED)
        .collect();
    let started = std::time::Instant::now();
    let mut table = String::new();
    let mut failures = Vec::new();
    let mut cells = 0;
    let _ = writeln!(
        table,
        "| entry point (netio call) | status | PASSIVE | APC | DISPATCH | HIGH |\n|---|---|---|---|---|---|"
    );
    for entry in ENTRIES {
        for &(name, code) in &codes {
            let mut row = format!("| {} ({}) | {name} |", entry.name(), entry.call());
            for irql in IRQLS {
                cells += 1;
                match cell(entry, code, irql) {
                    Ok(outcome) => {
                        let _ = write!(row, " {outcome} |");
                    }
                    Err(why) => {
                        let _ = write!(row, " FAIL |");
                        failures.push(format!("{} / {name} / {irql}: {why}", entry.name()));
                    }
                }
            }
            let _ = writeln!(table, "{row}");
        }
    }
    println!("{table}");
    println!(
        "fault sweep: {} entry points x {} codes ({} undocumented) x {} IRQLs = {cells} cells, \
         {} failed, in {:.1?}",
        ENTRIES.len(),
        codes.len(),
        UNDOCUMENTED.len(),
        IRQLS.len(),
        failures.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "fault sweep failures:\n{}",
        failures.join("\n")
    );
}
