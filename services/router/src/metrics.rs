//! The router's Prometheus metrics, under the names the dashboards and alert rules query:
//! `meshgate_router_decisions_total{target,layer}`, `meshgate_router_breaker_open{target}` and
//! `meshgate_router_policy_file_reloads_total{outcome}`.

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};

/// Each target's id and whether its circuit is not closed, read at scrape time.
pub type BreakerStates = Box<dyn Fn() -> Vec<(String, bool)> + Send + Sync>;

/// Plans made, by the target and layer of their first step.
pub fn decisions() -> IntCounterVec {
    IntCounterVec::new(
        Opts::new("meshgate_router_decisions_total", "Routing plans made, by the target and layer of their first step"),
        &["target", "layer"],
    )
    .expect("static metric options are valid")
}

/// Changed versions of the policy file read, by outcome ("applied", "invalid", "unreadable").
pub fn policy_file_reloads() -> IntCounterVec {
    IntCounterVec::new(
        Opts::new("meshgate_router_policy_file_reloads_total", "Changed policy file versions read, by outcome"),
        &["outcome"],
    )
    .expect("static metric options are valid")
}

/// `meshgate_router_breaker_open{target}`: 1 while a target's circuit is not closed (open, or
/// half-open and waiting for a good probe), 0 otherwise, for every known target. Read from the
/// live state at scrape time, because a circuit turns half-open by the clock, not by an event.
pub struct BreakerGauge {
    states: BreakerStates,
    gauge: Mutex<IntGaugeVec>,
    desc: Vec<Desc>,
}

impl BreakerGauge {
    pub fn new(states: BreakerStates) -> Self {
        let gauge = IntGaugeVec::new(
            Opts::new("meshgate_router_breaker_open", "1 while the target's circuit breaker is open or half-open"),
            &["target"],
        )
        .expect("static metric options are valid");
        let desc = gauge.desc().into_iter().cloned().collect();
        Self { states, gauge: Mutex::new(gauge), desc }
    }
}

impl Collector for BreakerGauge {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let gauge = self.gauge.lock();
        // Targets that left the catalog (an unloaded local model) leave the exposition too.
        gauge.reset();
        for (target, not_closed) in (self.states)() {
            gauge.with_label_values(&[target.as_str()]).set(i64::from(not_closed));
        }
        gauge.collect()
    }
}
