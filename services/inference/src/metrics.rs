//! Prometheus metrics of the inference service.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::batcher::BatchMetrics;

/// Buckets of batch sizes (texts or requests per session call).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The inference service's own metrics (the runtime adds the gRPC ones).
#[derive(Clone)]
pub struct InferenceMetrics {
    /// Requests executing now.
    pub in_flight: IntGauge,
    /// Finished requests by model, task and outcome (`ok`, `error`, `cancelled`).
    pub requests: IntCounterVec,
    /// Tokens read (`prompt`) and produced (`completion`) by model.
    pub tokens: IntCounterVec,
    /// Seconds from a generation request to its first decoded text.
    pub time_to_first_token: HistogramVec,
    /// Seconds one `Embed` call spends in the model.
    pub embed_duration: HistogramVec,
    /// 1 while a model is loaded and serving.
    pub model_loaded: IntGaugeVec,
    /// Requests waiting in a model's batching queue.
    pub queue_depth: IntGaugeVec,
    /// Texts per session call of an encoder model (dynamic batching).
    pub batch_size: HistogramVec,
    /// Requests merged into one session call of an encoder model.
    pub batch_requests: HistogramVec,
    /// Texts classified, by classifier and the stage that settled them (`first_stage`, `encoder`).
    pub classify_stage: IntCounterVec,
    /// Embeddings a shared encoder's classifiers needed, by `outcome`: `hit` (from the cache) or
    /// `miss` (computed).
    pub embedding_cache: IntCounterVec,
}

impl InferenceMetrics {
    pub fn new() -> Self {
        let buckets = meshgate_runtime::metrics::LATENCY_BUCKETS.to_vec();
        Self {
            in_flight: IntGauge::new("meshgate_inference_in_flight", "Inference requests executing now")
                .expect("static metric options are valid"),
            requests: IntCounterVec::new(
                Opts::new(
                    "meshgate_inference_requests_total",
                    "Finished inference requests by model, task and outcome",
                ),
                &["model", "task", "outcome"],
            )
            .expect("static metric options are valid"),
            tokens: IntCounterVec::new(
                Opts::new("meshgate_inference_tokens_total", "Tokens read (prompt) and produced (completion) by model"),
                &["model", "kind"],
            )
            .expect("static metric options are valid"),
            time_to_first_token: HistogramVec::new(
                HistogramOpts::new(
                    "meshgate_inference_time_to_first_token_seconds",
                    "Time from a generation request to its first decoded text",
                )
                .buckets(buckets.clone()),
                &["model"],
            )
            .expect("static metric options are valid"),
            embed_duration: HistogramVec::new(
                HistogramOpts::new(
                    "meshgate_inference_embed_duration_seconds",
                    "Time one Embed call spends in the model",
                )
                .buckets(buckets),
                &["model"],
            )
            .expect("static metric options are valid"),
            model_loaded: IntGaugeVec::new(
                Opts::new("meshgate_inference_model_loaded", "1 while a model is loaded and serving"),
                &["model"],
            )
            .expect("static metric options are valid"),
            queue_depth: IntGaugeVec::new(
                Opts::new("meshgate_inference_queue_depth", "Requests waiting in a model's batching queue"),
                &["model"],
            )
            .expect("static metric options are valid"),
            batch_size: HistogramVec::new(
                HistogramOpts::new("meshgate_inference_batch_size", "Texts per session call of an encoder model")
                    .buckets(BATCH_BUCKETS.to_vec()),
                &["model"],
            )
            .expect("static metric options are valid"),
            batch_requests: HistogramVec::new(
                HistogramOpts::new(
                    "meshgate_inference_batch_requests",
                    "Requests merged into one session call of an encoder model",
                )
                .buckets(BATCH_BUCKETS.to_vec()),
                &["model"],
            )
            .expect("static metric options are valid"),
            classify_stage: IntCounterVec::new(
                Opts::new(
                    "meshgate_inference_classify_stage_total",
                    "Texts classified, by classifier and the stage that settled them",
                ),
                &["model", "stage"],
            )
            .expect("static metric options are valid"),
            embedding_cache: IntCounterVec::new(
                Opts::new(
                    "meshgate_inference_embedding_cache_total",
                    "Embeddings a shared encoder's classifiers needed, by cache outcome",
                ),
                &["model", "outcome"],
            )
            .expect("static metric options are valid"),
        }
    }

    /// The batching metrics of model `name`.
    pub fn batch(&self, name: &str) -> BatchMetrics {
        BatchMetrics {
            queue_depth: self.queue_depth.with_label_values(&[name]),
            batch_size: self.batch_size.with_label_values(&[name]),
            batch_requests: self.batch_requests.with_label_values(&[name]),
        }
    }

    /// Adds every metric to a service registry.
    pub fn register(&self, metrics: &meshgate_runtime::Metrics) {
        metrics.register(Box::new(self.in_flight.clone()));
        metrics.register(Box::new(self.requests.clone()));
        metrics.register(Box::new(self.tokens.clone()));
        metrics.register(Box::new(self.time_to_first_token.clone()));
        metrics.register(Box::new(self.embed_duration.clone()));
        metrics.register(Box::new(self.model_loaded.clone()));
        metrics.register(Box::new(self.queue_depth.clone()));
        metrics.register(Box::new(self.batch_size.clone()));
        metrics.register(Box::new(self.batch_requests.clone()));
        metrics.register(Box::new(self.classify_stage.clone()));
        metrics.register(Box::new(self.embedding_cache.clone()));
    }
}

impl Default for InferenceMetrics {
    fn default() -> Self {
        Self::new()
    }
}
