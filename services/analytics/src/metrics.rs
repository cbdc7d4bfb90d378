//! Prometheus metrics of the analytics service.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts};

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
    /// Partitions dropped by retention.
    pub partitions_dropped: IntCounter,
    /// Day partitions that exist, by table.
    pub partitions: IntGaugeVec,
    /// Traces per received batch.
    pub batch_traces: Histogram,
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
        let batch_traces = Histogram::with_opts(
            HistogramOpts::new("meshgate_analytics_batch_traces", "Traces per received batch")
                .buckets(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0]),
        )
        .expect("static metric options are valid");
        metrics.register(Box::new(batch_traces.clone()));
        let partitions = IntGaugeVec::new(
            Opts::new("meshgate_analytics_partitions", "Day partitions that exist, by partitioned table"),
            &["table"],
        )
        .expect("static metric options are valid");
        metrics.register(Box::new(partitions.clone()));
        Self {
            partitions_dropped: counter(
                "meshgate_analytics_partitions_dropped_total",
                "Day partitions dropped by retention",
            ),
            partitions,
            batch_traces,
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
                "Day partitions created (of every partitioned table)",
            ),
            insert_duration,
            store_errors,
        }
    }
}

/// `meshgate_db_pool_connections{state}` (idle, in_use), `meshgate_db_pool_max_connections` and
/// `meshgate_db_pool_waiting`, read from the pool at scrape time.
pub struct PoolCollector {
    pool: meshgate_storage::PgPool,
    connections: IntGaugeVec,
    max: prometheus::IntGauge,
    waiting: prometheus::IntGauge,
}

impl PoolCollector {
    pub fn new(pool: meshgate_storage::PgPool) -> Self {
        let connections = IntGaugeVec::new(
            Opts::new("meshgate_db_pool_connections", "Postgres pool connections, by state (idle, in_use)"),
            &["state"],
        )
        .expect("static metric options are valid");
        let max = prometheus::IntGauge::new("meshgate_db_pool_max_connections", "Postgres pool size limit")
            .expect("static metric options are valid");
        let waiting =
            prometheus::IntGauge::new("meshgate_db_pool_waiting", "Callers waiting for a Postgres pool connection")
                .expect("static metric options are valid");
        Self { pool, connections, max, waiting }
    }
}

impl prometheus::core::Collector for PoolCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut desc = self.connections.desc();
        desc.extend(self.max.desc());
        desc.extend(self.waiting.desc());
        desc
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let status = self.pool.status();
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.connections.with_label_values(&["idle"]).set(as_i64(status.available));
        self.connections.with_label_values(&["in_use"]).set(as_i64(status.size.saturating_sub(status.available)));
        self.max.set(as_i64(status.max_size));
        self.waiting.set(as_i64(status.waiting));
        let mut families = self.connections.collect();
        families.extend(self.max.collect());
        families.extend(self.waiting.collect());
        families
    }
}
