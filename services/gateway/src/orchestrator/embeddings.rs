//! The embeddings path: the router's plan for the model (local embedding models first, then the
//! providers listing it among their embedding models), the budget held for the inputs' tokens at
//! the dearest target's price, the plan's targets tried in order until one answers (an embedding
//! call has no partial answer, so any failure that is not the request's own moves on), then the
//! tokens charged at the serving model's price, the outcome to the router and a trace.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use meshgate_proto::analytics::v1::Trace;
use meshgate_proto::common::v1::{Principal, Target, TargetKind, Usage};
use meshgate_proto::inference::v1::EmbedRequest as LocalEmbedRequest;
use meshgate_proto::router::v1::{DecideRequest, Outcome, RouteRequest};
use meshgate_proto::sync::v1::{EmbedRequest as CloudEmbedRequest, TokenIds};
use meshgate_quota_lease::Estimate;
use meshgate_runtime::{ApiError, ErrorCode};
use meshgate_wire::openai::embeddings::{EmbeddingInput, EmbeddingsRequest};
use tracing::Instrument;

use super::{AllowedModels, Orchestrator, error_detail, model_call, model_call_span};
use crate::budget::QuotaSnapshot;
use crate::peers::peer_call;

/// An admitted embeddings request: what to embed (texts as the policy left them), and whose.
pub struct EmbedCall {
    pub request_id: String,
    pub trace_id: String,
    pub principal: Principal,
    pub request: EmbeddingsRequest,
    pub started: Instant,
    pub allowed: AllowedModels,
    /// The request's risk score, 0–100, for the trace.
    pub risk: u8,
}

/// The vectors of an answered request, in input order, and what served them.
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens charged.
    pub prompt_tokens: i64,
    pub target: Target,
    pub budget: QuotaSnapshot,
}

/// Estimated tokens of the inputs: about four characters a token for texts (plus the two special
/// tokens an encoder adds), the ids themselves for token lists.
fn estimate_tokens(input: &EmbeddingInput) -> i64 {
    match input {
        EmbeddingInput::Texts(texts) => texts.iter().map(|t| (t.chars().count() as u64).div_ceil(4) as i64 + 2).sum(),
        EmbeddingInput::Tokens(lists) => lists.iter().map(|l| l.len() as i64).sum(),
    }
}

impl Orchestrator {
    /// Runs an embeddings request; see the module docs.
    pub async fn embed(self: &Arc<Self>, call: EmbedCall) -> Result<Embedded, ApiError> {
        let estimate = estimate_tokens(&call.request.input);
        let mut trace = Trace {
            request_id: call.request_id.clone(),
            trace_id: call.trace_id.clone(),
            principal: Some(call.principal.clone()),
            started_at: Some(prost_types::Timestamp::from(SystemTime::now() - call.started.elapsed())),
            requested_model: call.request.model.clone(),
            task: "embeddings".into(),
            risk_score: u32::from(call.risk),
            ..Default::default()
        };
        let result = self.embed_planned(&call, estimate, &mut trace).await;
        trace.latency_us = call.started.elapsed().as_micros() as i64;
        match &result {
            Ok(embedded) => {
                trace.status_code = 200;
                trace.served_model = embedded.target.model.clone();
                trace.served_target = embedded.target.id.clone();
                trace.layer = embedded.target.layer;
            }
            Err(err) => {
                trace.status_code = i32::from(err.code.http_status().as_u16());
                trace.error = Some(error_detail(err, &trace.request_id));
            }
        }
        self.traces.record(trace);
        result
    }

    async fn embed_planned(&self, call: &EmbedCall, estimate: i64, trace: &mut Trace) -> Result<Embedded, ApiError> {
        let route = RouteRequest {
            request_id: call.request_id.clone(),
            principal: Some(call.principal.clone()),
            model: call.request.model.clone(),
            prompt_tokens: estimate,
            task: "embeddings".into(),
            ..Default::default()
        };
        let decide = DecideRequest { request: Some(route), ..Default::default() };
        let mut router = self.peers.router.clone();
        let plan = peer_call("router", self.peers.timeout, router.decide(decide)).await?;
        trace.routing_reason = plan.explanation.clone();
        trace.routing_reasons = plan.reasons.clone();
        let planned = plan.targets.len();
        let targets: Vec<Target> = plan.targets.into_iter().filter_map(|s| s.target).collect();
        // The router counted the plan's first step in flight; its outcome ends that count
        // whether or not the key may use it.
        let primary = targets.first().map(|t| t.id.clone());
        let (allowed, refused): (Vec<Target>, Vec<Target>) = targets.into_iter().partition(|t| call.allowed.allows(t));
        // Local models tokenize text themselves: token ids can only go to a provider.
        let tokens = matches!(call.request.input, EmbeddingInput::Tokens(_));
        let (allowed, textual): (Vec<Target>, Vec<Target>) =
            allowed.into_iter().partition(|t| !tokens || t.kind != TargetKind::Local as i32);
        let report = |target: &Target, ok: bool, latency: std::time::Duration, code: &str| {
            self.outcomes.report(Outcome {
                target_id: target.id.clone(),
                ok,
                latency_us: latency.as_micros() as i64,
                error_code: code.to_owned(),
                primary: primary.as_deref() == Some(target.id.as_str()),
                ..Default::default()
            });
        };
        for (unused, code) in [(&refused, ErrorCode::PermissionDenied), (&textual, ErrorCode::InvalidRequest)] {
            for target in unused.iter().filter(|t| primary.as_deref() == Some(t.id.as_str())) {
                report(target, false, std::time::Duration::ZERO, code.as_str());
            }
        }
        if allowed.is_empty() {
            return Err(if !textual.is_empty() {
                ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "input holds token ids, but {:?} is served here only by local models, which tokenize text \
                         themselves: send the text",
                        call.request.model
                    ),
                )
            } else if planned > 0 {
                ApiError::new(
                    ErrorCode::PermissionDenied,
                    format!("no target for {:?} serves a model this key or project may use", call.request.model),
                )
            } else {
                ApiError::new(ErrorCode::ModelNotFound, "the routing plan was empty")
            });
        }
        let cost_micros = allowed.iter().map(|t| t.cost_micros(estimate, 0)).max().unwrap_or(0);
        let hold =
            self.quota.hold(&call.request_id, &call.principal, Estimate { tokens: estimate, cost_micros }).await?;
        let budget = hold.budget();
        let mut last = None;
        let attempts = allowed.len();
        for target in allowed {
            let since = Instant::now();
            let span = model_call_span("embeddings", &call.request.model, &target.provider, &target.model, &target.id);
            let answer = self.embed_at(&target, call).instrument(span.clone()).await;
            let latency = since.elapsed();
            match answer {
                Ok((vectors, reported)) => {
                    let prompt_tokens = reported.filter(|t| *t >= 0).unwrap_or(estimate);
                    let mut usage = Usage { prompt_tokens, total_tokens: prompt_tokens, ..Usage::default() };
                    usage.cost_micros = target.cost_of(&usage);
                    span.record("gen_ai.usage.input_tokens", prompt_tokens);
                    report(&target, true, latency, "");
                    self.metrics.record_model_call(&target, "ok", latency);
                    self.metrics.record_usage(&target.model, &call.principal.project_id, &usage);
                    trace.calls.push(model_call(&target, latency, Some(usage), "ok", None, &call.request_id));
                    trace.usage = Some(usage);
                    tokio::spawn(hold.settle(Some(usage)));
                    return Ok(Embedded { vectors, prompt_tokens, target, budget });
                }
                Err(err) => {
                    span.record("error.type", err.code.as_str());
                    report(&target, false, latency, err.code.as_str());
                    self.metrics.record_model_call(&target, "error", latency);
                    trace.calls.push(model_call(&target, latency, None, "error", Some(&err), &call.request_id));
                    let own_fault = err.code.is_client_caused();
                    last = Some(err);
                    if own_fault {
                        break;
                    }
                    self.metrics.fallbacks.with_label_values(&[&target.id]).inc();
                }
            }
        }
        tokio::spawn(hold.settle(None));
        let last = last.unwrap_or_else(|| ApiError::new(ErrorCode::ModelNotFound, "the routing plan was empty"));
        Err(if attempts > 1 && !last.code.is_client_caused() {
            ApiError { message: format!("all {attempts} targets failed; last: {}", last.message), ..last }
        } else {
            last
        })
    }

    /// One target's vectors and the tokens it counted (`None`: it said nothing).
    async fn embed_at(&self, target: &Target, call: &EmbedCall) -> Result<(Vec<Vec<f32>>, Option<i64>), ApiError> {
        let request = &call.request;
        if target.kind == TargetKind::Local as i32 {
            let EmbeddingInput::Texts(texts) = &request.input else {
                return Err(ApiError::new(ErrorCode::Internal, "token ids were planned for a local model"));
            };
            let mut inference = self.peers.inference.clone();
            let local = LocalEmbedRequest { model: target.model.clone(), inputs: texts.clone() };
            let answer = peer_call("inference", self.config.first_piece_timeout, inference.embed(local)).await?;
            if let Some(dimensions) = request.dimensions
                && i64::from(dimensions) != i64::from(answer.dims)
            {
                // Refused before anything is charged: the hold is released.
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "dimensions must be {} for {} (a local model that cannot shorten its vectors), not {dimensions}",
                        answer.dims, target.model
                    ),
                ));
            }
            let tokens = answer.usage.map(|u| u.prompt_tokens);
            return Ok((answer.embeddings.into_iter().map(|e| e.values).collect(), tokens));
        }
        let (texts, tokens) = match &request.input {
            EmbeddingInput::Texts(texts) => (texts.clone(), Vec::new()),
            EmbeddingInput::Tokens(lists) => {
                (Vec::new(), lists.iter().map(|ids| TokenIds { ids: ids.clone() }).collect())
            }
        };
        let cloud = CloudEmbedRequest {
            request_id: call.request_id.clone(),
            provider: target.provider.clone(),
            model: target.model.clone(),
            texts,
            tokens,
            dimensions: request.dimensions.unwrap_or(0),
            user: request.user.clone(),
            extra_json: request.extra_json.clone(),
            timeout_ms: self.config.first_piece_timeout.as_millis() as i64,
        };
        let mut sync = self.peers.sync.clone();
        let answer = peer_call("sync", self.config.first_piece_timeout, sync.embed(cloud)).await?;
        let expected = request.input.len();
        if answer.vectors.len() != expected {
            return Err(ApiError::new(
                ErrorCode::UpstreamError,
                format!("{} answered {} vectors for {expected} inputs", target.id, answer.vectors.len()),
            ));
        }
        let tokens = answer.usage.map(|u| u.prompt_tokens).filter(|t| *t > 0);
        Ok((answer.vectors.into_iter().map(|v| v.values).collect(), tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lists_are_counted_as_they_are_and_texts_estimated() {
        assert_eq!(estimate_tokens(&EmbeddingInput::Tokens(vec![vec![1, 2, 3], vec![4]])), 4);
        assert_eq!(estimate_tokens(&EmbeddingInput::Texts(vec!["abcdefgh".into(), "a".into()])), (2 + 2) + (1 + 2));
    }
}
