//! The netio contract suite (`tests/netio_contract/mod.rs`) on the host mock and on the
//! benchmarks' direct source.

mod netio_contract;

#[path = "../benches/support/direct_source.rs"]
#[allow(
    dead_code,
    reason = "shared with the benchmarks, which use other parts"
)]
mod direct_source;

use direct_source::{DirectInitial, DirectSource};
use netio_contract::{ALL_ORDERS, Netio, Order};
use teredo_watcher::mock::{InitialDelivery, MockNetio};
use teredo_watcher::sys::STATUS_INVALID_PARAMETER;

impl Netio for MockNetio {
    fn fresh() -> Self {
        MockNetio::new()
    }
    fn orders(&self) -> Vec<Order> {
        ALL_ORDERS.to_vec()
    }
    fn set_order(&self, order: Order) {
        self.set_initial_delivery(match order {
            Order::CallerThread => InitialDelivery::CallerThread,
            Order::OtherThreadBeforeReturn => InitialDelivery::BeforeReturn,
            Order::AfterReturn => InitialDelivery::AfterReturn,
            Order::DuringQuery => InitialDelivery::DuringQuery,
        });
    }
    fn set_running(&self, port: Option<u16>) {
        self.client().set_port_quietly(port);
    }
    fn notify_all(&self, port: u16, kind: i32) {
        self.notify_raw(port, kind);
        self.wait_idle();
    }
    fn settle(&self) {
        self.wait_idle();
    }
    fn live(&self) -> usize {
        self.live_registrations()
    }
    fn query_returns_next(&self, port: u16) {
        MockNetio::query_returns_next(self, port);
    }
    fn notify_null_handle_next(&self) {
        MockNetio::notify_null_handle_next(self);
    }
    fn fail_next_cancel_after_wait(&self) {
        MockNetio::fail_next_cancel_after_wait(self, STATUS_INVALID_PARAMETER);
    }
    fn overlap(&self, a: (u16, i32), b: (u16, i32)) {
        for info in self.registrations() {
            std::thread::scope(|s| {
                s.spawn(|| self.invoke_overlapping(info.handle, a.0, a.1));
                self.invoke_overlapping(info.handle, b.0, b.1);
            });
        }
    }
}

impl Netio for DirectSource {
    fn fresh() -> Self {
        let source = DirectSource::new(1);
        source.set_running(None);
        source
    }
    fn orders(&self) -> Vec<Order> {
        ALL_ORDERS.to_vec()
    }
    fn set_order(&self, order: Order) {
        self.set_initial(match order {
            Order::CallerThread => DirectInitial::CallerThread,
            Order::OtherThreadBeforeReturn => DirectInitial::OtherThreadBeforeReturn,
            Order::AfterReturn => DirectInitial::AfterReturn,
            Order::DuringQuery => DirectInitial::DuringQuery,
        });
    }
    fn set_running(&self, port: Option<u16>) {
        DirectSource::set_running(self, port);
    }
    fn notify_all(&self, port: u16, kind: i32) {
        self.deliver(port, kind);
    }
    fn settle(&self) {
        self.deliver_pending();
    }
    fn live(&self) -> usize {
        usize::from(self.is_registered())
    }
    fn query_returns_next(&self, port: u16) {
        DirectSource::query_returns_next(self, port);
    }
    fn notify_null_handle_next(&self) {
        DirectSource::notify_null_handle_next(self);
    }
    fn fail_next_cancel_after_wait(&self) {
        DirectSource::fail_next_cancel_after_wait(self);
    }
    fn overlap(&self, a: (u16, i32), b: (u16, i32)) {
        DirectSource::overlap(self, a, b);
    }
}

#[test]
fn the_host_mock_keeps_the_netio_contract() {
    netio_contract::run_all::<MockNetio>();
}

#[test]
fn the_direct_source_keeps_the_netio_contract() {
    netio_contract::run_all::<DirectSource>();
}
