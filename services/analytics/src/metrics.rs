//! Prometheus metrics of the analytics service.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};

/// The analytics service's own metrics, registered in the service's registry.
#[derive(Clone)]
pub struct AnalyticsMetrics {
    pub traces_received: IntCounter,
    pub traces_stored: IntCounter,
    /// Traces ignored because their request id was already stored.
    pub traces_duplicate: IntCounter,
    /// Traces refused as invalid (their whole batch is refused).
    pub traces_rejected: IntCounter,
    /// Traces dropped by the bounded in-memory store.
    pub traces_evicted: IntCounter,
    pub partitions_created: IntCounter,
    pub insert_duration: Histogram,
    /// By `op` (record, query, top_expensive, error_rates, get_trace, partitions).
    pub store_errors: IntCounterVec,
}

impl AnalyticsMetrics {
    pub fn new(metrics: &meshgate_runtime::Metrics) -> Self {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("static metric options are valid");
            metrics.register(Box::new(c.clone()));
            c
        };
        let insert_duration = Histogram::with_opts(
            HistogramOpts::new("meshgate_analytics_insert_duration_seconds", "Time to store one batch of traces")
                .buckets(meshgate_runtime::metrics::LATENCY_BUCKETS.to_vec()),
        )
        .expect("static metric options are valid");
        metrics.register(Box::new(insert_duration.clone()));
        let store_errors = IntCounterVec::new(
            Opts::new("meshgate_analytics_store_errors_total", "Failed trace store operations, by operation"),
            &["op"],
        )
        .expect("static metric options are valid");
        metrics.register(Box::new(store_errors.clone()));
        Self {
            traces_received: counter("meshgate_analytics_traces_received_total", "Traces received by Record"),
            traces_stored: counter("meshgate_analytics_traces_stored_total", "Traces stored"),
            traces_duplicate: counter(
                "meshgate_analytics_traces_duplicate_total",
                "Traces ignored because their request id was already stored",
            ),
            traces_rejected: counter("meshgate_analytics_traces_rejected_total", "Traces refused as invalid"),
            traces_evicted: counter(
                "meshgate_analytics_traces_evicted_total",
                "Traces dropped by the bounded in-memory store",
            ),
            partitions_created: counter(
                "meshgate_analytics_partitions_created_total",
                "Day partitions of request_traces created",
            ),
            insert_duration,
            store_errors,
        }
    }
}
