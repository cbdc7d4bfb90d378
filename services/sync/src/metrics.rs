//! Upstream call metrics, registered in the service's registry.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

/// Buckets of upstream latencies in seconds: model calls range from milliseconds to minutes.
const UPSTREAM_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];

/// Counters and histograms of calls to providers.
///
/// Labels: `provider`; `model` (the requested model when the provider lists it, else `other`, so
/// callers cannot grow the cardinality); `status` (the provider's HTTP status, `none` when it never
/// answered); `outcome` (`ok`, `cancelled` when the caller went away, or the error code). A call
/// counts once, however many attempts it took; retries are counted apart.
#[derive(Clone)]
pub struct UpstreamMetrics {
    pub(crate) requests: IntCounterVec,
    pub(crate) duration: HistogramVec,
    pub(crate) first_chunk: HistogramVec,
    pub(crate) retries: IntCounterVec,
}

impl Default for UpstreamMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl UpstreamMetrics {
    pub fn new() -> Self {
        let requests = IntCounterVec::new(
            Opts::new("meshgate_sync_upstream_requests_total", "Calls to upstream providers"),
            &["provider", "model", "status", "outcome"],
        )
        .expect("static metric options are valid");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "meshgate_sync_upstream_duration_seconds",
                "Duration of upstream calls, until the stream ends",
            )
            .buckets(UPSTREAM_BUCKETS.to_vec()),
            &["provider", "model", "outcome"],
        )
        .expect("static metric options are valid");
        let first_chunk = HistogramVec::new(
            HistogramOpts::new(
                "meshgate_sync_upstream_first_chunk_seconds",
                "Time from sending an upstream call to its first streamed chunk",
            )
            .buckets(UPSTREAM_BUCKETS.to_vec()),
            &["provider", "model"],
        )
        .expect("static metric options are valid");
        let retries = IntCounterVec::new(
            Opts::new(
                "meshgate_sync_upstream_retries_total",
                "Upstream calls retried before their first chunk, by the error that caused the retry",
            ),
            &["provider", "model", "error"],
        )
        .expect("static metric options are valid");
        Self { requests, duration, first_chunk, retries }
    }

    /// Counts one finished call: the provider's HTTP `status` (0: it never answered) and its
    /// `outcome` (`ok`, `cancelled` or an error code).
    pub(crate) fn record_call(&self, provider: &str, model: &str, status: u16, outcome: &str, took: Duration) {
        let status = match status {
            0 => "none".to_owned(),
            code => code.to_string(),
        };
        self.requests.with_label_values(&[provider, model, &status, outcome]).inc();
        self.duration.with_label_values(&[provider, model, outcome]).observe(took.as_secs_f64());
    }

    /// Registers the metrics in a service's registry.
    pub fn register(&self, metrics: &meshgate_runtime::Metrics) {
        metrics.register(Box::new(self.requests.clone()));
        metrics.register(Box::new(self.duration.clone()));
        metrics.register(Box::new(self.first_chunk.clone()));
        metrics.register(Box::new(self.retries.clone()));
    }
}
