//! The edge's own metrics, registered in the gateway's service registry.

use meshgate_proto::common::v1::{Layer, Target, Usage};
use meshgate_runtime::Metrics;
use meshgate_runtime::metrics::LATENCY_BUCKETS;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts};

use crate::traces::TraceSinkMetrics;

#[derive(Clone)]
pub struct GatewayMetrics {
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub tokens: IntCounterVec,
    pub cost_micros: IntCounterVec,
    pub fallbacks: IntCounterVec,
    /// Every model call (fallbacks and race losers included), by model, layer and outcome
    /// (`ok`, `error`, `cancelled`).
    pub model_calls: HistogramVec,
    /// By the limit that refused the request.
    pub quota_rejections: IntCounterVec,
    /// Requests admitted, by how (`via`): `lease` (against this replica's quota leases, without
    /// a quota call) or `reservation` (a `Quota.Reserve` of their own).
    pub quota_admissions: IntCounterVec,
    pub traces: TraceSinkMetrics,
    /// Policy findings, by rule (`policy`) and action.
    pub policy_findings: IntCounterVec,
    /// Risk score (0–100) of every scanned request.
    pub risk_score: Histogram,
    /// Prompts scored for injection, by what scored them (`classifier`, `heuristic`,
    /// `heuristic_fallback` when the classifier failed or timed out).
    pub injection_scans: IntCounterVec,
    /// Edge batches received (`POST /v1/sync/batches`), by outcome (`applied`, `duplicate`).
    pub edge_batches: IntCounterVec,
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static metric options are valid")
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("static metric options are valid")
}

impl GatewayMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let this = Self {
            http_requests: counter_vec(
                "meshgate_http_requests_total",
                "Edge HTTP requests, by route and status code",
                &["route", "status"],
            ),
            http_duration: HistogramVec::new(
                HistogramOpts::new(
                    "meshgate_http_request_duration_seconds",
                    "Edge HTTP time until response headers, by route",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["route"],
            )
            .expect("static metric options are valid"),
            tokens: counter_vec("meshgate_tokens_total", "Tokens charged, by model and kind", &["model", "kind"]),
            cost_micros: counter_vec(
                "meshgate_cost_micros_total",
                "Cost charged in micro-dollars, by model and project",
                &["model", "project"],
            ),
            model_calls: HistogramVec::new(
                HistogramOpts::new(
                    "meshgate_model_call_duration_seconds",
                    "Model and provider calls from start to end, by model, layer and outcome",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["model", "layer", "outcome"],
            )
            .expect("static metric options are valid"),
            fallbacks: counter_vec(
                "meshgate_target_failures_total",
                "Targets that failed before their first chunk (and were fallen back from), by target",
                &["target"],
            ),
            quota_rejections: counter_vec(
                "meshgate_quota_rejections_total",
                "Requests refused by quota, by the limit that refused them",
                &["limit"],
            ),
            quota_admissions: counter_vec(
                "meshgate_quota_admissions_total",
                "Requests admitted by quota, by how: lease (no quota call) or reservation",
                &["via"],
            ),
            policy_findings: counter_vec(
                "meshgate_policy_findings_total",
                "Security policy findings on prompts and replies, by rule and action",
                &["policy", "action"],
            ),
            risk_score: Histogram::with_opts(
                HistogramOpts::new("meshgate_request_risk_score", "Risk score (0-100) of scanned requests")
                    .buckets(vec![0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0]),
            )
            .expect("static metric options are valid"),
            injection_scans: counter_vec(
                "meshgate_policy_injection_scans_total",
                "Prompts scored for prompt injection, by source (classifier, heuristic, heuristic_fallback)",
                &["source"],
            ),
            edge_batches: counter_vec(
                "meshgate_edge_batches_total",
                "Batches of edge traffic received, by outcome: applied, or duplicate (applied before)",
                &["outcome"],
            ),
            traces: TraceSinkMetrics {
                dropped: counter("meshgate_traces_dropped_total", "Trace records dropped because the buffer was full"),
                sent: counter("meshgate_traces_sent_total", "Trace records delivered to analytics"),
                failed: counter(
                    "meshgate_traces_failed_total",
                    "Trace records lost because analytics did not accept them",
                ),
                uplinked: counter(
                    "meshgate_traces_uplinked_total",
                    "Trace records staged by the sync service for upload to the cloud meshgate",
                ),
                uplink_failed: counter(
                    "meshgate_traces_uplink_failed_total",
                    "Trace records the sync service did not stage for the cloud (outbox full or sync down)",
                ),
            },
        };
        metrics.register(Box::new(this.http_requests.clone()));
        metrics.register(Box::new(this.http_duration.clone()));
        metrics.register(Box::new(this.tokens.clone()));
        metrics.register(Box::new(this.cost_micros.clone()));
        metrics.register(Box::new(this.fallbacks.clone()));
        metrics.register(Box::new(this.model_calls.clone()));
        metrics.register(Box::new(this.quota_rejections.clone()));
        metrics.register(Box::new(this.quota_admissions.clone()));
        metrics.register(Box::new(this.policy_findings.clone()));
        metrics.register(Box::new(this.risk_score.clone()));
        metrics.register(Box::new(this.injection_scans.clone()));
        metrics.register(Box::new(this.edge_batches.clone()));
        metrics.register(Box::new(this.traces.dropped.clone()));
        metrics.register(Box::new(this.traces.sent.clone()));
        metrics.register(Box::new(this.traces.failed.clone()));
        metrics.register(Box::new(this.traces.uplinked.clone()));
        metrics.register(Box::new(this.traces.uplink_failed.clone()));
        this
    }

    /// Project ids are bounded by the tenancy (projects are created by owners), so they are a
    /// safe label; request-scoped values never are.
    pub fn record_usage(&self, model: &str, project: &str, usage: &Usage) {
        self.tokens.with_label_values(&[model, "prompt"]).inc_by(usage.prompt_tokens.max(0) as u64);
        self.tokens.with_label_values(&[model, "completion"]).inc_by(usage.completion_tokens.max(0) as u64);
        self.cost_micros.with_label_values(&[model, project]).inc_by(usage.cost_micros.max(0) as u64);
    }

    pub fn record_model_call(&self, target: &Target, outcome: &str, latency: std::time::Duration) {
        let layer = Layer::short_name_of(target.layer);
        self.model_calls.with_label_values(&[&target.model, layer, outcome]).observe(latency.as_secs_f64());
    }
}
