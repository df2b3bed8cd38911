//! # teredo-watcher
//!
//! Safe, `no_std` access to the Windows kernel's Teredo port notification API
//! (`NotifyTeredoPortChange`, `GetTeredoPort`, `CancelMibChangeNotify2` from `netio.sys`)
//! for kernel-mode drivers, firewall drivers first.
//!
//! - [`TeredoPortWatcher`]: one OS registration, RAII, many subscribers, a lock-free
//!   [`current_port`](TeredoPortWatcher::current_port) for classify functions, and
//!   `PASSIVE_LEVEL` subscribers on I/O work items
//!   ([`subscribe_passive`](TeredoPortWatcher::subscribe_passive), [`IoObject`]) for
//!   filter-engine calls.
//! - [`HandleTable`]: every live notification handle; its teardown cancels what is left at
//!   driver unload.
//! - [`PortSource`]: the netio calls behind a trait, implemented by the real netio layer
//!   (`NetioPortSource`, Windows targets) and by a host mock (`mock`, feature `mock`).
//! - [`Kernel`]: IRQL, spin lock and thread identity, implemented by ntoskrnl (`NtKernel`) and
//!   by a host mock with a per-thread IRQL.
//!
//! ```
//! # #[cfg(feature = "mock")] {
//! use teredo_watcher::{HandleTable, TeredoPortWatcher, WatcherOptions, TeredoEvent};
//! use teredo_watcher::mock::MockNetio;
//!
//! let netio = MockNetio::new();
//! netio.client().start();
//! let table = HandleTable::new(netio.clone());
//! let watcher = TeredoPortWatcher::new(&table, WatcherOptions::default())?;
//! watcher.subscribe(|event: TeredoEvent| { let _ = event.port(); })?;
//! let before = watcher.current_port();
//! netio.client().restart();
//! netio.wait_idle();
//! assert_ne!(watcher.current_port(), before);
//! watcher.unregister()?;
//! assert!(table.teardown()?.is_clean());
//! # }
//! # Ok::<(), teredo_watcher::Error>(())
//! ```
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;
#[cfg(any(test, feature = "mock"))]
extern crate std;

mod alloc_util;
mod error;
mod event;
mod handle_table;
mod irql;
mod kernel;
mod passive;
mod registry;
mod source;
#[cfg(not(teredo_watcher_loom))]
mod static_watcher;
mod sync;
pub mod sys;
mod teredo;
mod watcher;

#[cfg(windows)]
pub mod nt;

#[cfg(any(test, feature = "mock"))]
pub mod mock;

pub use error::{Error, NetioCall, NetioStatus};
pub use event::{MibNotificationType, TeredoEvent, TeredoPort};
pub use handle_table::{HandleTable, MAX_REGISTRATIONS, TeardownReport};
pub use irql::{Irql, IrqlBound};
pub use kernel::{Kernel, ThreadToken};
pub use passive::IoObject;
pub use registry::{RegistryStats, SubscriberId};
pub use source::{PortSource, RawHandle};
#[cfg(not(teredo_watcher_loom))]
pub use static_watcher::{StartReport, StaticTeredoWatcher};
pub use teredo::{
    Direction, ExceptionRule, IpVersion, MAX_EXCEPTION_RULES, PacketView, Protocol, RemoteScope,
    Requirement, RuleDirection, RuleKind, Rules, TEREDO_ICMPV6_TYPES, TEREDO_MULTICAST_GROUP,
    TEREDO_SERVER_NAME, TEREDO_STATIC_PORT, TeredoExceptions, Transport, UPNP_PORT,
};
pub use watcher::{TeredoPortWatcher, WatcherOptions};

/// The README's code blocks, compiled and run as doctests (they use the host mock).
#[cfg(all(doctest, feature = "mock"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The watcher over the real netio layer.
#[cfg(windows)]
pub type NetioWatcher<'t> = TeredoPortWatcher<'t, nt::NetioPortSource>;

/// The watcher in a `static` over the real netio layer, for `N` subscribers:
///
/// ```ignore
/// static WATCHER: StaticNetioWatcher<4> = StaticNetioWatcher::new(NetioPortSource::new());
/// // DriverEntry: WATCHER.start()?; classify: WATCHER.exceptions().allows(&packet);
/// // DriverUnload: WATCHER.stop()
/// ```
#[cfg(all(windows, not(teredo_watcher_loom)))]
pub type StaticNetioWatcher<const N: usize> = StaticTeredoWatcher<nt::NetioPortSource, N>;
