//! Drives a watcher through a Teredo client start, restart and stop on the host mock.
//!
//! `cargo run --example restart`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use teredo_watcher::mock::{MockKernel, MockNetio};
use teredo_watcher::{HandleTable, Irql, Kernel, TeredoEvent, TeredoPortWatcher, WatcherOptions};

fn main() -> Result<(), teredo_watcher::Error> {
    let netio = MockNetio::new();
    netio.set_callback_irql(Irql::DISPATCH_LEVEL);
    let table = HandleTable::new(netio.clone());
    let events = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&events);
    let (watcher, _) =
        TeredoPortWatcher::with_subscriber(&table, WatcherOptions::default(), move |e| {
            counter.fetch_add(1, Ordering::SeqCst);
            println!("  event {e:?} at {}", MockKernel::current_irql());
        })?;
    println!("registered; current port {:?}", watcher.current_port());

    netio.client().start();
    netio.wait_idle();
    println!("started:   {}", watcher.exceptions());
    netio.client().restart();
    netio.wait_idle();
    println!("restarted: {}", watcher.exceptions());
    netio.client().stop();
    netio.wait_idle();
    println!("stopped:   {}", watcher.exceptions());

    let snapshot_seen = watcher.subscribe_with_snapshot(|e: TeredoEvent| {
        println!("  late subscriber: {e:?}");
    })?;
    watcher.unsubscribe(snapshot_seen)?;

    watcher.unregister()?;
    let report = table.teardown()?;
    println!(
        "unregistered; {} events delivered; teardown {:?}; live registrations {}",
        events.load(Ordering::SeqCst),
        report,
        netio.live_registrations()
    );
    Ok(())
}
