//! Prometheus metrics: one registry per service (six registries in the standalone process, each
//! served on its service's admin port), labelled `service="<name>"`.

use std::collections::HashMap;

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Latency buckets in seconds, dense below a millisecond where the mesh's own hops live.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A service's registry and the metrics every gRPC server records.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub(crate) grpc_requests: IntCounterVec,
    grpc_duration: HistogramVec,
    pub(crate) grpc_refused: IntCounterVec,
    /// Tokio tasks alive in the process, read at each scrape: a count that keeps growing under
    /// steady load is a leak (the soak watches it).
    alive_tasks: IntGauge,
}

impl Metrics {
    pub fn new(service: &str) -> Self {
        let labels = HashMap::from([("service".to_owned(), service.to_owned())]);
        let registry = Registry::new_custom(None, Some(labels)).expect("static registry options are valid");
        let grpc_requests = IntCounterVec::new(
            Opts::new("meshgate_grpc_server_requests_total", "gRPC requests handled, by method and status code"),
            &["method", "code"],
        )
        .expect("static metric options are valid");
        let grpc_duration = HistogramVec::new(
            HistogramOpts::new(
                "meshgate_grpc_server_request_duration_seconds",
                "Time until a gRPC call's response ended (streams included), by method",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["method"],
        )
        .expect("static metric options are valid");
        let grpc_refused = IntCounterVec::new(
            Opts::new(
                "meshgate_grpc_server_refused_total",
                "gRPC calls refused before the service saw them, by method, calling identity and reason \
                 (unauthenticated, permission_denied, message_too_large)",
            ),
            &["method", "caller", "reason"],
        )
        .expect("static metric options are valid");
        let alive_tasks = IntGauge::new("meshgate_runtime_alive_tasks", "Tokio tasks alive in the process")
            .expect("static metric options are valid");
        let metrics = Self { registry, grpc_requests, grpc_duration, grpc_refused, alive_tasks };
        metrics.register(Box::new(metrics.alive_tasks.clone()));
        metrics.register(Box::new(metrics.grpc_requests.clone()));
        metrics.register(Box::new(metrics.grpc_duration.clone()));
        metrics.register(Box::new(metrics.grpc_refused.clone()));
        metrics
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Registers a collector; a duplicate name is a programming error caught by tests.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        if let Err(err) = self.registry.register(collector) {
            tracing::error!(%err, "metric registered twice");
        }
    }

    pub(crate) fn observe_grpc(&self, method: &str, code: &str, seconds: f64) {
        self.grpc_requests.with_label_values(&[method, code]).inc();
        self.grpc_duration.with_label_values(&[method]).observe(seconds);
    }

    /// The Prometheus text exposition of every metric in the registry.
    pub fn render(&self) -> String {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.alive_tasks.set(i64::try_from(runtime.metrics().num_alive_tasks()).unwrap_or(i64::MAX));
        }
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%err, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_scrape_reports_the_tasks_alive_in_the_process() {
        let metrics = Metrics::new("probe");
        let (release, wait) = tokio::sync::watch::channel(false);
        let parked: Vec<_> = (0..5)
            .map(|_| {
                let mut wait = wait.clone();
                tokio::spawn(async move { while wait.changed().await.is_ok() && !*wait.borrow() {} })
            })
            .collect();
        let alive = |text: &str| -> i64 {
            let line = text.lines().find(|l| l.starts_with("meshgate_runtime_alive_tasks{")).expect("the gauge");
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(alive(&metrics.render()) >= 5);
        release.send(true).unwrap();
        for task in parked {
            task.await.unwrap();
        }
        assert_eq!(alive(&metrics.render()), 0, "the parked tasks ended");
    }
}
