//! Prometheus metrics of the quota service.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};

/// The quota service's own metrics, registered in the service's registry.
#[derive(Clone)]
pub struct QuotaMetrics {
    /// By `result` (admitted, rejected, fail_open) and `limit` (the limit that refused, or "none").
    pub reservations: IntCounterVec,
    pub reserve_duration: Histogram,
    /// By `result` (committed, replay, lost_reservation, fail_open).
    pub commits: IntCounterVec,
    pub committed_tokens: IntCounter,
    /// Charge calls, by `outcome` (charged, replay).
    pub charges: IntCounterVec,
    pub releases: IntCounter,
    /// Lease calls, by `outcome` (held, low, window_ended, replay, fail_open).
    pub leases: IntCounterVec,
    /// By `op` (reserve, commit, charge, release, lease, status, set_limits, limits, ledger).
    pub store_errors: IntCounterVec,
    pub ledger_rows: IntCounter,
    pub ledger_flush_errors: IntCounter,
    /// Charges answered before the ledger recorded them (Postgres failed or was slow).
    pub ledger_write_through_errors: IntCounter,
    /// Time a charge waited for the ledger to record it.
    pub ledger_write_duration: Histogram,
    /// Counters created from the usage ledger (first use in a window, or after the store lost them).
    pub counters_seeded: IntCounter,
}

impl QuotaMetrics {
    pub fn new(metrics: &meshgate_runtime::Metrics) -> Self {
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric options are valid");
            metrics.register(Box::new(c.clone()));
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("static metric options are valid");
            metrics.register(Box::new(c.clone()));
            c
        };
        let reserve_duration = Histogram::with_opts(
            HistogramOpts::new("meshgate_quota_reserve_duration_seconds", "Time to decide a reservation")
                .buckets(meshgate_runtime::metrics::LATENCY_BUCKETS.to_vec()),
        )
        .expect("static metric options are valid");
        metrics.register(Box::new(reserve_duration.clone()));
        let ledger_write_duration = Histogram::with_opts(
            HistogramOpts::new(
                "meshgate_quota_ledger_write_duration_seconds",
                "Time a charge waited for the usage ledger to record it",
            )
            .buckets(meshgate_runtime::metrics::LATENCY_BUCKETS.to_vec()),
        )
        .expect("static metric options are valid");
        metrics.register(Box::new(ledger_write_duration.clone()));
        Self {
            reservations: counter_vec(
                "meshgate_quota_reservations_total",
                "Reservations decided, by result and the limit that refused them",
                &["result", "limit"],
            ),
            reserve_duration,
            commits: counter_vec("meshgate_quota_commits_total", "Reservations committed", &["result"]),
            committed_tokens: counter("meshgate_quota_committed_tokens_total", "Tokens charged by commits"),
            charges: counter_vec(
                "meshgate_quota_charges_total",
                "Usage charged without a reservation (Charge), by outcome",
                &["outcome"],
            ),
            releases: counter("meshgate_quota_releases_total", "Reservations released without charge"),
            leases: counter_vec(
                "meshgate_quota_leases_total",
                "Lease calls (carve, renew, settle, return), by outcome",
                &["outcome"],
            ),
            store_errors: counter_vec(
                "meshgate_quota_store_errors_total",
                "Failed calls to the quota or limits store, by operation",
                &["op"],
            ),
            ledger_rows: counter("meshgate_quota_ledger_rows_written_total", "Usage ledger rows written to Postgres"),
            ledger_flush_errors: counter(
                "meshgate_quota_ledger_flush_errors_total",
                "Usage ledger flushes that failed (retried on the next tick)",
            ),
            ledger_write_through_errors: counter(
                "meshgate_quota_ledger_write_through_errors_total",
                "Charges answered before the usage ledger recorded them (left to the flusher)",
            ),
            ledger_write_duration,
            counters_seeded: counter(
                "meshgate_quota_counters_seeded_total",
                "Counters seeded from the usage ledger (first use in a window, or after the store lost them)",
            ),
        }
    }
}
