//! Host mock of the kernel (per-thread IRQL, spin lock) and of netio's Teredo API.
//!
//! Feature `mock` (pulls in `std`). For tests, examples and benchmarks on a development
//! machine; a driver never enables it.
//!
//! The mock models the documented API, failures included, not a convenient subset:
//! - each registration gets its own delivery thread, so callbacks come from other threads,
//!   serialized per registration, at a configurable IRQL (PASSIVE or DISPATCH);
//! - `CancelMibChangeNotify2` waits for a callback of that registration in flight, and
//!   never delivers one afterwards; called from inside that callback it does not hang: it is
//!   counted ([`MockNetio::self_cancel_reports`]) and fails with `STATUS_POSSIBLE_DEADLOCK`;
//! - each call checks its documented IRQL and panics (fails the test) when violated;
//! - any status can be injected on any call ([`MockNetio::fail_next`]);
//! - work items (`IoQueueWorkItemEx`) run at `PASSIVE_LEVEL` on worker threads, one per
//!   `IoObject`, with the I/O manager's rules checked ([`work_items_run`] counts them).

mod kernel;
mod netio;

#[cfg(teredo_watcher_loom)]
pub use kernel::join_work_items;
pub use kernel::{
    IrqlGuard, MockEvent, MockKernel, ViolationPolicy, event_waits, irql_violations, raise_irql,
    set_violation_policy, with_irql, work_items_initialized_on, work_items_run, work_items_run_on,
};
pub use netio::{
    InitialDelivery, MockNetio, RegistrationInfo, STATUS_POSSIBLE_DEADLOCK, TeredoClient,
};
