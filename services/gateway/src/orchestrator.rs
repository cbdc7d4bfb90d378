//! The request path (README, Architecture): route, hold the budget (against the replica's quota leases, or
//! with a reservation), try the plan's targets in order until one produces its first chunk, stream
//! the rest, then settle: charge the usage served to the hold (or release it), report the outcome
//! to the router and record the trace — all off the reply's critical path. Replies pass through
//! the project's output scanner on their way out (flagged or masked), and the trace carries the
//! request's policy findings, risk score, tools and sanitized headers.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use futures::future::{self, Either};
use futures::stream::BoxStream;
use meshgate_catalog::task::{ClassifierMiss, TaskGuess};
use meshgate_policy::Finding;
use meshgate_proto::analytics::v1::{ModelCall, ToolCall as TracedTool, Trace};
use meshgate_proto::common::v1::content_part::Part;
use meshgate_proto::common::v1::{ChatMessage, ErrorDetail, Layer, Principal, Target, TargetKind, Usage};
use meshgate_proto::inference::v1::{
    ClassifyRequest, GenerateChunk, GenerateRequest, ListModelsRequest as InferenceListModels,
};
use meshgate_proto::router::v1::{DecideRequest, ListTargetsRequest, Outcome, RoutePlan, RouteRequest, StepRole};
use meshgate_proto::sync::v1::{CompleteChunk, CompleteRequest};
use meshgate_quota_lease::Estimate;
use meshgate_runtime::{ApiError, ErrorCode};
use meshgate_wire::ChatRequest;
use tracing::Instrument;

use crate::budget::QuotaSnapshot;
use crate::guard::{Security, count_findings, trace_finding};
use crate::metrics::GatewayMetrics;
use crate::outcomes::OutcomeReporter;
use crate::peers::{Peers, peer_call};
use crate::plan_cache::PlanCache;
use crate::quota_gate::{Hold, QuotaGate};
use crate::reply_scan::ReplyScanner;
use crate::traces::TraceSink;

mod embeddings;

pub use embeddings::{EmbedCall, Embedded};

/// Timeouts and defaults of the request path.
#[derive(Debug, Clone, Copy)]
pub struct PathConfig {
    /// Completion tokens reserved when the request sets no `max_tokens`.
    pub default_max_tokens: i64,
    /// How long a target may take to produce its first chunk before the next one is tried.
    pub first_piece_timeout: Duration,
    /// How long a started stream may stay silent before it is ended with an error.
    pub idle_timeout: Duration,
}

/// One chunk of a model's reply: text, reasoning, refusal and tool-call chunks as they stream,
/// and on the last chunk the finish reason, the usage charged and the assembled tool calls.
#[derive(Debug, Clone, Default)]
pub struct ReplyChunk {
    pub completion: CompleteChunk,
    /// The request's risk score over prompt and reply, 0–100 (last chunk).
    pub risk: Option<u8>,
}

impl ReplyChunk {
    fn is_last(&self) -> bool {
        !self.completion.finish_reason.is_empty()
    }
}

/// A chat request ready to run.
pub struct ChatCall {
    pub request_id: String,
    pub trace_id: String,
    pub principal: Principal,
    pub chat: ChatRequest,
    pub started: Instant,
    /// The prompt's policy findings, and the engine that scans the reply.
    pub security: Security,
    /// The models the caller may be served by: every target of the plan must be one.
    pub allowed: AllowedModels,
    /// What the client sent that no provider receives (fields of its wire format meshgate does
    /// not carry), by the client's names, for the trace.
    pub unforwarded: Vec<String>,
}

/// The models a request may be served by: the key's `scopes.models` and the project's
/// `allowed_models`, each allowing everything when empty. Fallback and escalation targets are
/// held to them as much as the requested model.
#[derive(Debug, Clone, Default)]
pub struct AllowedModels {
    lists: Vec<Vec<String>>,
}

impl AllowedModels {
    pub fn new<'a>(lists: impl IntoIterator<Item = &'a [String]>) -> Self {
        Self { lists: lists.into_iter().filter(|l| !l.is_empty()).map(<[String]>::to_vec).collect() }
    }

    /// Whether `target` serves an allowed model (named by its model or its target id).
    pub fn allows(&self, target: &Target) -> bool {
        self.lists.iter().all(|list| list.iter().any(|m| *m == target.model || *m == target.id))
    }
}

/// A reply that has started: the target that serves it and its chunks, the first included.
pub struct ChatReply {
    pub target: Target,
    /// Task the router decided the request is ("code", "math", "creative", "reasoning", "chat").
    pub task: String,
    pub chunks: BoxStream<'static, Result<ReplyChunk, ApiError>>,
    /// The caller's budget with this request's estimate held.
    pub quota: QuotaSnapshot,
}

impl ChatReply {
    /// `x-meshgate-target`, `x-meshgate-layer` and `x-meshgate-task`: what served the request,
    /// at which cost layer, for which task.
    pub fn routing_headers(&self) -> [(&'static str, &str); 3] {
        let layer = Layer::short_name_of(self.target.layer);
        [(TARGET_HEADER, self.target.id.as_str()), (LAYER_HEADER, layer), (TASK_HEADER, self.task.as_str())]
    }
}

pub const TARGET_HEADER: &str = "x-meshgate-target";
pub const LAYER_HEADER: &str = "x-meshgate-layer";
pub const TASK_HEADER: &str = "x-meshgate-task";

type ReplyChunks = BoxStream<'static, Result<ReplyChunk, ApiError>>;

/// A target that answered: it, when it was called, its first chunk, the rest, and the span of
/// the model call (open until the request settles).
struct AnsweringTarget {
    target: Target,
    called_at: Instant,
    first: ReplyChunk,
    rest: ReplyChunks,
    span: tracing::Span,
}

/// A model call's span with the OpenTelemetry GenAI semantic conventions; usage and the error
/// type are recorded when the call ends.
fn model_call_span(operation: &str, requested: &str, provider: &str, model: &str, target: &str) -> tracing::Span {
    tracing::info_span!(
        "gen_ai.client",
        otel.name = %format!("{operation} {model}"),
        otel.kind = "client",
        gen_ai.operation.name = operation,
        gen_ai.provider.name = provider,
        gen_ai.request.model = requested,
        gen_ai.response.model = model,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        meshgate.target = target,
        error.type = tracing::field::Empty,
    )
}

fn chat_span(target: &Target, call: &ChatCall) -> tracing::Span {
    model_call_span("chat", &call.chat.model, &target.provider, &target.model, &target.id)
}

/// Runs the request path.
pub struct Orchestrator {
    peers: Peers,
    /// Plans the router marked reusable, held while its epoch stands.
    plans: Arc<PlanCache>,
    quota: QuotaGate,
    config: PathConfig,
    traces: TraceSink,
    outcomes: OutcomeReporter,
    metrics: GatewayMetrics,
}

impl Orchestrator {
    pub fn new(
        peers: Peers,
        plans: Arc<PlanCache>,
        quota: QuotaGate,
        config: PathConfig,
        traces: TraceSink,
        outcomes: OutcomeReporter,
        metrics: GatewayMetrics,
    ) -> Arc<Self> {
        Arc::new(Self { peers, plans, quota, config, traces, outcomes, metrics })
    }

    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// How requests are admitted against their budgets.
    pub fn quota(&self) -> &QuotaGate {
        &self.quota
    }

    /// Records the trace of a request refused before it reached quota or a target (a policy
    /// block): its findings and risk are security events analytics must see.
    pub fn refuse(self: &Arc<Self>, call: &ChatCall, err: ApiError) {
        Settlement::new(self.clone(), call, 0).fail(err);
    }

    /// Every model the mesh can serve with what it does: the router's chat and embeddings
    /// targets (the preferred one per model id) and the inference service's other local models. When
    /// inference does not answer, its embedding and classification models are left out.
    pub async fn models(&self) -> Result<Vec<(Target, Vec<String>)>, ApiError> {
        let mut router = self.peers.router.clone();
        let states = peer_call("router", self.peers.timeout, router.list_targets(ListTargetsRequest {})).await?;
        let mut models: Vec<(Target, Vec<String>)> = Vec::new();
        for state in states.targets {
            let Some(target) = state.target else { continue };
            if !models.iter().any(|(m, _)| m.model == target.model) {
                let kind = if state.kind.is_empty() { "chat".to_owned() } else { state.kind };
                models.push((target, vec![kind]));
            }
        }
        let mut inference = self.peers.inference.clone();
        let local = peer_call("inference", self.peers.timeout, inference.list_models(InferenceListModels {})).await;
        match local {
            Ok(local) => {
                for model in local.models.into_iter().filter(|m| m.task != "chat") {
                    let tasks = vec![model.task.clone()];
                    // What inference says a model does wins over a router entry for it.
                    models.retain(|(t, _)| t.model != model.name);
                    let target = Target {
                        id: format!("local/{}", model.name),
                        model: model.name,
                        provider: "local".into(),
                        kind: TargetKind::Local as i32,
                        ..Default::default()
                    };
                    models.push((target, tasks));
                }
            }
            Err(err) => tracing::debug!(%err, "inference did not list its models"),
        }
        Ok(models)
    }

    /// Whether any target may serve `model` for `principal` under its project's routing
    /// policy, as the router plans a chat request (without classifying it): a model nothing
    /// serves is the 404 `model_not_found` a chat request would meet. Other refusals (context,
    /// capabilities) and an unreachable router are not this question's answer.
    pub async fn check_served(&self, request_id: &str, principal: &Principal, model: &str) -> Result<(), ApiError> {
        let route = RouteRequest {
            request_id: request_id.to_owned(),
            principal: Some(principal.clone()),
            model: model.to_owned(),
            task: "chat".into(),
            ..Default::default()
        };
        let decide = DecideRequest { request: Some(route), messages: Vec::new(), task_hint: "chat".into() };
        let mut router = self.peers.router.clone();
        match peer_call("router", self.peers.timeout, router.decide(decide)).await {
            Err(err) if err.code == ErrorCode::ModelNotFound => Err(err),
            _ => Ok(()),
        }
    }

    /// What a job for `chat` is admitted for: its prompt plus its max tokens, and their cost at the
    /// dearest of the cloud `targets` that may deliver it (none: tokens only).
    pub fn job_estimate(&self, chat: &ChatRequest, targets: &[Target]) -> (i64, i64) {
        let prompt = crate::tokens::prompt_tokens(chat);
        let max_tokens = chat.sampling.max_tokens.unwrap_or(self.config.default_max_tokens);
        let cost = targets.iter().map(|t| t.cost_micros(prompt, max_tokens)).max().unwrap_or(0);
        (prompt.saturating_add(max_tokens), cost)
    }

    /// Admits a job like a request (a spent budget or a full minute refuses it with the same 429)
    /// and holds its estimate for `ttl_seconds`, the whole time it may wait in the queue: the
    /// reservation (its id is returned) travels with the job, delivery commits it and a dead
    /// letter releases it, so queued jobs can never spend more than the budget. A job is always
    /// reserved on its own: the sync service settles it, long after any lease of this replica.
    pub async fn admit(
        &self,
        request_id: String,
        principal: &Principal,
        (tokens, cost_micros): (i64, i64),
        ttl_seconds: i64,
    ) -> Result<String, ApiError> {
        let estimate = Estimate { tokens, cost_micros };
        Ok(self.quota.reserve(request_id, principal, estimate, ttl_seconds).await?.reservation_id)
    }

    /// Runs a chat request: plans it, holds its budget, and starts the first target that gives a
    /// usable answer. Whatever happens is settled (trace, quota, router outcomes).
    pub async fn chat(self: &Arc<Self>, call: ChatCall) -> Result<ChatReply, ApiError> {
        let prompt_estimate = crate::tokens::prompt_tokens(&call.chat);
        let max_tokens = call.chat.sampling.max_tokens.unwrap_or(self.config.default_max_tokens);
        let mut settlement = Settlement::new(self.clone(), &call, prompt_estimate);
        let started = async {
            // Route before admitting: the hold must cover the cost of the priciest target the
            // plan may fall back to, or concurrent requests could overspend a cost budget.
            let plan = self.plan(&call, prompt_estimate, max_tokens, &mut settlement).await?;
            let cost_micros = plan_cost(&plan, prompt_estimate, max_tokens);
            let tokens = prompt_estimate.saturating_add(max_tokens);
            let hold = self.quota.hold(&call.request_id, &call.principal, Estimate { tokens, cost_micros }).await?;
            let quota = hold.budget();
            settlement.hold = Some(hold);
            let answering = self.first_answer(plan, &call, &mut settlement).await?;
            Ok::<_, ApiError>((answering, quota))
        }
        .await;
        settlement.classified_task().await;
        match started {
            Ok((AnsweringTarget { target, called_at, first, rest, span }, quota)) => {
                let task = settlement.trace.task.clone();
                settlement.serving(target.clone(), called_at, span);
                let chunks = self.stream_reply(first, rest, settlement);
                Ok(ChatReply { target, task, chunks, quota })
            }
            Err(err) => {
                settlement.fail(err.clone());
                Err(err)
            }
        }
    }

    /// The router's plan for `call`, held to the models the key and the project allow; its
    /// explanation goes into the trace.
    async fn plan(
        &self,
        call: &ChatCall,
        prompt_tokens: i64,
        max_tokens: i64,
        settlement: &mut Settlement,
    ) -> Result<RoutePlan, ApiError> {
        let route = RouteRequest {
            request_id: call.request_id.clone(),
            principal: Some(call.principal.clone()),
            model: call.chat.model.clone(),
            prompt_tokens,
            max_tokens,
            stream: call.chat.stream,
            task: "chat".into(),
            capabilities: call.chat.capabilities().into_iter().map(str::to_owned).collect(),
        };
        // The router classifies the text as the provider will see it (redacted); the token count
        // travels in the route, so only what is classified goes with it.
        let messages = classified_messages(&call.chat.messages);
        let mut plan = match self.plans.get(&route) {
            Some(held) => {
                let text = meshgate_catalog::task::classified_text(&messages);
                settlement.reused_plan = Some(ReusedPlan::label(&held, &self.peers, text));
                reused_plan(&held, prompt_tokens, max_tokens)
            }
            None => {
                let decide = DecideRequest { request: Some(route.clone()), messages, task_hint: String::new() };
                let mut router = self.peers.router.clone();
                let plan = peer_call("router", self.peers.timeout, router.decide(decide)).await?;
                self.plans.put(&route, &plan);
                plan
            }
        };
        let planned = plan.targets.len();
        plan.targets.retain(|step| step.target.as_ref().is_some_and(|t| call.allowed.allows(t)));
        if plan.targets.len() < planned {
            plan.reasons.push(format!(
                "{} of {planned} targets left out: they serve models this key or project may not use",
                planned - plan.targets.len()
            ));
        }
        settlement.routing_reason = plan.explanation.clone();
        settlement.trace.task = plan.task.clone();
        settlement.trace.routing_reasons = plan.reasons.clone();
        // A held plan carries another request's task: this one's by the heuristic until (unless)
        // the classifier asked in `ReusedPlan::label` answers.
        if let Some(reused) = &settlement.reused_plan {
            let guess = meshgate_catalog::task::heuristic(&reused.text);
            settlement.label_task(&guess);
        }
        if plan.targets.is_empty() && planned > 0 {
            return Err(ApiError::new(
                ErrorCode::PermissionDenied,
                format!("no target for {:?} serves a model this key or project may use", call.chat.model),
            ));
        }
        Ok(plan)
    }

    /// The first step of `plan` that answers usably, in order: the first two raced when the plan
    /// says so, each failure recorded, an unusable non-streamed answer taken one layer up.
    async fn first_answer(
        &self,
        plan: RoutePlan,
        call: &ChatCall,
        settlement: &mut Settlement,
    ) -> Result<AnsweringTarget, ApiError> {
        let race = plan.race && plan.targets.len() >= 2;
        let mut steps: VecDeque<(Target, StepRole)> = plan
            .targets
            .into_iter()
            .filter_map(|step| {
                let role = step.role();
                step.target.map(|target| (target, role))
            })
            .collect();
        let mut racers = if race { steps.pop_front().zip(steps.pop_front()) } else { None };
        let mut attempts = 0;
        let mut last_error = None;
        loop {
            let (answering, role) = if let Some(((first, _), (second, _))) = racers.take() {
                attempts += 2;
                // Both racers count in flight at the router until their outcomes come back.
                settlement.primary = true;
                (self.race(first, second, call, settlement).await, StepRole::Primary)
            } else {
                let Some((target, role)) = steps.pop_front() else { break };
                attempts += 1;
                settlement.primary = attempts == 1;
                (self.attempt(target, call, settlement).await, role)
            };
            let answer = match answering {
                Ok(answering) => self.usable(answering, role, &mut steps, call, settlement).await,
                Err(err) => Err(err),
            };
            match answer {
                Ok(answering) => return Ok(answering),
                // The request itself is wrong: another target would refuse it too.
                Err(err) if err.code.is_client_caused() => return Err(err),
                Err(err) => last_error = Some(err),
            }
        }
        let last = last_error.unwrap_or_else(|| ApiError::new(ErrorCode::ModelNotFound, "the routing plan was empty"));
        Err(if attempts > 1 {
            ApiError { message: format!("all {attempts} targets failed; last: {}", last.message), ..last }
        } else {
            last
        })
    }

    /// A streamed answer is the client's from its first chunk. A non-streamed one is the client's
    /// only once it is whole, so while an escalation step is left an unusable (empty) one goes
    /// one layer up instead: the steps before that escalation are skipped.
    async fn usable(
        &self,
        answering: AnsweringTarget,
        role: StepRole,
        steps: &mut VecDeque<(Target, StepRole)>,
        call: &ChatCall,
        settlement: &mut Settlement,
    ) -> Result<AnsweringTarget, ApiError> {
        let escalation_left =
            role != StepRole::Escalation && steps.iter().any(|(_, role)| *role == StepRole::Escalation);
        if call.chat.stream || !escalation_left {
            return Ok(answering);
        }
        let AnsweringTarget { target, called_at, first, rest, span } = answering;
        match self.collect(&target, first, rest).await.and_then(|chunks| usable(&target, chunks)) {
            Ok((first, rest)) => Ok(AnsweringTarget { target, called_at, first, rest, span }),
            Err(err) => {
                span.record("error.type", err.code.as_str());
                settlement.failed_call(&target, called_at, &err);
                if err.code == ErrorCode::UpstreamError {
                    while steps.front().is_some_and(|(_, role)| *role != StepRole::Escalation) {
                        steps.pop_front();
                    }
                }
                Err(err)
            }
        }
    }

    /// Calls one step of the plan; a failure is recorded before it is returned.
    async fn attempt(
        &self,
        target: Target,
        call: &ChatCall,
        settlement: &mut Settlement,
    ) -> Result<AnsweringTarget, ApiError> {
        let called_at = Instant::now();
        let span = chat_span(&target, call);
        match self.open(&target, call).instrument(span.clone()).await {
            Ok((first, rest)) => Ok(AnsweringTarget { target, called_at, first, rest, span }),
            Err(err) => {
                span.record("error.type", err.code.as_str());
                tracing::warn!(request_id = %call.request_id, target = %target.id, error = %err, "target failed before its first chunk");
                self.metrics.fallbacks.with_label_values(&[&target.id]).inc();
                settlement.failed_call(&target, called_at, &err);
                Err(err)
            }
        }
    }

    /// Fastest-first: calls both targets at once and keeps the first whose first chunk arrives.
    /// The other call is dropped, which cancels it upstream; only the winner is ever charged.
    async fn race(
        &self,
        first: Target,
        second: Target,
        call: &ChatCall,
        settlement: &mut Settlement,
    ) -> Result<AnsweringTarget, ApiError> {
        let since = Instant::now();
        let (first_span, second_span) = (chat_span(&first, call), chat_span(&second, call));
        let racing = future::select(
            Box::pin(self.open(&first, call).instrument(first_span.clone())),
            Box::pin(self.open(&second, call).instrument(second_span.clone())),
        );
        let (winner, loser, outcome, rest) = match racing.await {
            Either::Left((outcome, rest)) => ((&first, first_span), (&second, second_span), outcome, rest),
            Either::Right((outcome, rest)) => ((&second, second_span), (&first, first_span), outcome, rest),
        };
        match outcome {
            Ok((first, chunks)) => {
                drop(rest);
                loser.1.record("error.type", "cancelled");
                settlement.cancelled_call(loser.0, since);
                Ok(AnsweringTarget { target: winner.0.clone(), called_at: since, first, rest: chunks, span: winner.1 })
            }
            Err(err) => {
                winner.1.record("error.type", err.code.as_str());
                self.metrics.fallbacks.with_label_values(&[&winner.0.id]).inc();
                settlement.failed_call(winner.0, since, &err);
                let (loser, loser_span) = loser;
                match rest.await {
                    Ok((first, rest)) => {
                        Ok(AnsweringTarget { target: loser.clone(), called_at: since, first, rest, span: loser_span })
                    }
                    Err(err) => {
                        loser_span.record("error.type", err.code.as_str());
                        self.metrics.fallbacks.with_label_values(&[&loser.id]).inc();
                        settlement.failed_call(loser, since, &err);
                        Err(err)
                    }
                }
            }
        }
    }

    /// The whole reply of a target (a non-streamed request), under the same idle timeout as a
    /// stream's chunks.
    async fn collect(
        &self,
        target: &Target,
        first: ReplyChunk,
        mut rest: ReplyChunks,
    ) -> Result<Vec<ReplyChunk>, ApiError> {
        let idle = self.config.idle_timeout;
        let mut chunks = vec![first];
        while chunks.last().is_some_and(|chunk| !chunk.is_last()) {
            match tokio::time::timeout(idle, rest.next()).await {
                Err(_) => {
                    let message = format!("{} stalled for more than {} ms", target.id, idle.as_millis());
                    return Err(ApiError::new(ErrorCode::Timeout, message));
                }
                Ok(None) => break,
                Ok(Some(chunk)) => chunks.push(chunk?),
            }
        }
        Ok(chunks)
    }

    /// Calls one target and waits for its first chunk.
    async fn open(&self, target: &Target, call: &ChatCall) -> Result<(ReplyChunk, ReplyChunks), ApiError> {
        // One deadline covers the call and its first chunk.
        let deadline = tokio::time::Instant::now() + self.config.first_piece_timeout;
        let timed_out = || first_piece_timeout(target, self.config.first_piece_timeout);
        let mut chunks = if target.kind == TargetKind::Local as i32 {
            // Local models read text: the plan sends them no request that needs more.
            let request = GenerateRequest {
                model: target.model.clone(),
                messages: text_only(&call.chat.messages),
                sampling: Some(call.chat.sampling.clone()),
                request_id: call.request_id.clone(),
            };
            let mut client = self.peers.inference.clone();
            let response =
                tokio::time::timeout_at(deadline, client.generate(request)).await.map_err(|_| timed_out())?;
            into_pieces(response)?
        } else {
            let request = CompleteRequest {
                request_id: call.request_id.clone(),
                provider: target.provider.clone(),
                model: target.model.clone(),
                messages: call.chat.messages.clone(),
                sampling: Some(call.chat.sampling.clone()),
                timeout_ms: 0,
                options: Some(call.chat.options.clone()),
                target: Some(target.clone()),
            };
            let mut client = self.peers.sync.clone();
            let response =
                tokio::time::timeout_at(deadline, client.complete(request)).await.map_err(|_| timed_out())?;
            into_pieces(response)?
        };
        match tokio::time::timeout_at(deadline, chunks.next()).await {
            Err(_) => Err(timed_out()),
            Ok(None) => {
                Err(ApiError::new(ErrorCode::UpstreamError, format!("{} ended its reply without any data", target.id)))
            }
            Ok(Some(Err(err))) => Err(err),
            Ok(Some(Ok(first))) => Ok((first, chunks)),
        }
    }

    fn stream_reply(&self, first: ReplyChunk, mut rest: ReplyChunks, mut settlement: Settlement) -> ReplyChunks {
        let idle = self.config.idle_timeout;
        async_stream::stream! {
            let mut next: Option<Result<ReplyChunk, ApiError>> = Some(Ok(first));
            loop {
                let item = match next.take() {
                    Some(item) => Some(item),
                    None => match tokio::time::timeout(idle, rest.next()).await {
                        Ok(item) => item,
                        Err(_) => {
                            let err = ApiError::new(ErrorCode::Timeout, format!("the reply stalled for more than {} ms", idle.as_millis()));
                            settlement.finish(Some(err.clone()));
                            yield Err(err);
                            return;
                        }
                    },
                };
                match item {
                    Some(Ok(mut chunk)) => {
                        settlement.observe(&chunk.completion);
                        if !chunk.is_last() {
                            let had_content = has_content(&chunk.completion);
                            settlement.scan_output(&mut chunk.completion);
                            // A chunk whose text the scanner holds back has nothing to send yet.
                            if !had_content || has_content(&chunk.completion) {
                                yield Ok(chunk);
                            }
                            continue;
                        }
                        settlement.finish_output(&mut chunk.completion);
                        // The last chunk always carries the usage that is charged, cost included.
                        chunk.completion.usage = Some(settlement.charged_usage());
                        chunk.risk = Some(settlement.risk());
                        settlement.finish(None);
                        yield Ok(chunk);
                        return;
                    }
                    Some(Err(err)) => {
                        settlement.finish(Some(err.clone()));
                        yield Err(err);
                        return;
                    }
                    None => {
                        // A target that ends without a finish reason still produced a reply.
                        let mut chunk = CompleteChunk { finish_reason: "stop".into(), ..CompleteChunk::default() };
                        settlement.finish_output(&mut chunk);
                        chunk.usage = Some(settlement.charged_usage());
                        let chunk = ReplyChunk { completion: chunk, risk: Some(settlement.risk()) };
                        settlement.finish(None);
                        yield Ok(chunk);
                        return;
                    }
                }
            }
        }
        .boxed()
    }
}

impl From<GenerateChunk> for ReplyChunk {
    fn from(chunk: GenerateChunk) -> Self {
        let chunk = CompleteChunk {
            delta: chunk.delta,
            finish_reason: chunk.finish_reason,
            usage: chunk.usage,
            ..CompleteChunk::default()
        };
        ReplyChunk { completion: chunk, risk: None }
    }
}

impl From<CompleteChunk> for ReplyChunk {
    fn from(chunk: CompleteChunk) -> Self {
        ReplyChunk { completion: chunk, risk: None }
    }
}

/// Whether a chunk carries anything for the client beyond its end: text, reasoning, a refusal,
/// tool calls or logprobs.
fn has_content(chunk: &CompleteChunk) -> bool {
    !chunk.delta.is_empty()
        || !chunk.reasoning_delta.is_empty()
        || !chunk.refusal_delta.is_empty()
        || !chunk.tool_call_deltas.is_empty()
        || !chunk.tool_calls.is_empty()
        || !chunk.logprobs_json.is_empty()
}

/// `messages` as text alone — the text parts joined into the content, images, audio and files
/// left out — for local models, which read text.
fn text_only(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    messages.iter().map(text_message).collect()
}

/// The messages the router classifies the task from (its `DecideRequest.messages`), as text:
/// the last user message, or the system messages when there is none. The rest — in an agent's
/// request most of it: tool definitions' results, earlier turns — is not copied to the router.
fn classified_messages(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    match messages.iter().rev().find(|m| m.role == "user") {
        Some(user) => vec![text_message(user)],
        None => messages.iter().filter(|m| m.role == "system").map(text_message).collect(),
    }
}

/// A plan the router decided for another request like this one, made this request's: its sizes
/// and estimated costs (its task is labelled by [`Settlement::label_task`]).
fn reused_plan(held: &RoutePlan, prompt_tokens: i64, max_tokens: i64) -> RoutePlan {
    let mut plan = held.clone();
    plan.reuse = None;
    plan.required_context = prompt_tokens.saturating_add(max_tokens);
    for step in &mut plan.targets {
        if let Some(target) = &step.target {
            step.estimated_cost_micros = target.cost_micros(prompt_tokens, max_tokens);
        }
    }
    plan
}

/// A held plan serving this request, and its task being labelled as the router would label it:
/// by the router's task classifier, asked while the target is called, else by the heuristic.
struct ReusedPlan {
    epoch: u64,
    text: String,
    classified: Option<tokio::task::JoinHandle<TaskGuess>>,
}

impl ReusedPlan {
    fn label(held: &RoutePlan, peers: &Peers, text: String) -> Self {
        let reuse = held.reuse.clone().unwrap_or_default();
        let classified = (!reuse.task_classifier.is_empty()).then(|| {
            let mut inference = peers.inference.clone();
            let timeout = Duration::from_millis(u64::from(reuse.classifier_timeout_ms));
            let (model, text) = (reuse.task_classifier.clone(), text.clone());
            tokio::spawn(async move {
                let request =
                    ClassifyRequest { model: model.clone(), inputs: vec![text.clone()], ..Default::default() };
                let answer = match tokio::time::timeout(timeout, inference.classify(request)).await {
                    Err(_) => Err(ClassifierMiss::Late(timeout)),
                    Ok(Err(status)) => Err(ClassifierMiss::Failed(status.message().to_owned())),
                    Ok(Ok(response)) => Ok(response.into_inner().results.into_iter().next()),
                };
                meshgate_catalog::task::task_from_classifier(&text, &model, answer)
            })
        });
        Self { epoch: reuse.epoch, text, classified }
    }
}

/// A message with its text parts folded into `content`, one per line, and its other parts left
/// out.
fn text_message(message: &ChatMessage) -> ChatMessage {
    let mut message = message.clone();
    for part in std::mem::take(&mut message.parts) {
        if let Some(Part::Text(text)) = part.part {
            if !message.content.is_empty() {
                message.content.push('\n');
            }
            message.content.push_str(&text);
        }
    }
    message
}

/// A collected answer as a reply again, or an upstream error when it has no content (empty, or
/// cut by the length limit before any text): the answer a layer up may give.
fn usable(target: &Target, chunks: Vec<ReplyChunk>) -> Result<(ReplyChunk, ReplyChunks), ApiError> {
    let usable = |c: &CompleteChunk| {
        !c.delta.trim().is_empty()
            || !c.tool_calls.is_empty()
            || !c.tool_call_deltas.is_empty()
            || !c.refusal_delta.is_empty()
    };
    if !chunks.iter().any(|chunk| usable(&chunk.completion)) {
        return Err(ApiError::new(ErrorCode::UpstreamError, format!("{} answered without any content", target.id)));
    }
    let mut chunks = chunks.into_iter();
    let first = chunks.next().unwrap_or_default();
    Ok((first, futures::stream::iter(chunks.map(Ok)).boxed()))
}

/// The chunks of a target's streamed reply, or the error that refused the call.
fn into_pieces<T: Into<ReplyChunk> + Send + 'static>(
    response: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
) -> Result<ReplyChunks, ApiError> {
    let stream = response.map_err(|status| ApiError::from_status(&status))?.into_inner();
    Ok(stream.map(|item| item.map(Into::into).map_err(|status| ApiError::from_status(&status))).boxed())
}

fn first_piece_timeout(target: &Target, after: Duration) -> ApiError {
    ApiError::new(ErrorCode::Timeout, format!("{} sent nothing within {} ms", target.id, after.as_millis()))
}

/// The cost held for a request: the dearest target of the plan, which any fallback may come to.
fn plan_cost(plan: &RoutePlan, prompt_tokens: i64, max_tokens: i64) -> i64 {
    plan.targets
        .iter()
        .filter_map(|step| step.target.as_ref())
        .map(|target| target.cost_micros(prompt_tokens, max_tokens))
        .max()
        .unwrap_or(0)
}

/// Everything that must happen once a request ends, however it ends. Dropping an unsettled
/// settlement (the client went away mid-stream) still charges what was produced so far.
struct Settlement {
    orchestrator: Arc<Orchestrator>,
    trace: Trace,
    started: Instant,
    prompt_estimate: i64,
    /// The request's admitted budget, settled with the usage served (or released) exactly once.
    hold: Option<Hold>,
    routing_reason: String,
    serving: Option<(Target, Instant)>,
    completion_bytes: usize,
    usage: Option<Usage>,
    settled: bool,
    /// Whether the call being made is the plan's first step.
    primary: bool,
    /// The held plan serving the request, if one is: the router counted no call of it in flight.
    reused_plan: Option<ReusedPlan>,
    security: Security,
    /// Scans the reply when the project's policy scans output.
    scanner: Option<ReplyScanner>,
    /// Findings of a scanner that finished.
    output: Vec<Finding>,
    /// Names of the tools the reply calls, by call index.
    tools_called: std::collections::BTreeMap<i32, String>,
    /// The request's span: settling joins the request's distributed trace.
    span: tracing::Span,
    /// The serving model call's span, ended with its usage when the request settles.
    call_span: Option<tracing::Span>,
}

impl Settlement {
    fn new(orchestrator: Arc<Orchestrator>, call: &ChatCall, prompt_estimate: i64) -> Self {
        let started_at = SystemTime::now() - call.started.elapsed();
        let trace = Trace {
            request_id: call.request_id.clone(),
            trace_id: call.trace_id.clone(),
            principal: Some(call.principal.clone()),
            started_at: Some(prost_types::Timestamp::from(started_at)),
            requested_model: call.chat.model.clone(),
            stream: call.chat.stream,
            dropped_params: call.unforwarded.clone(),
            ..Default::default()
        };
        Self {
            orchestrator,
            trace,
            started: call.started,
            prompt_estimate,
            hold: None,
            routing_reason: String::new(),
            serving: None,
            completion_bytes: 0,
            usage: None,
            settled: false,
            primary: true,
            reused_plan: None,
            scanner: call.security.engine.as_ref().map(ReplyScanner::new),
            security: call.security.clone(),
            output: Vec::new(),
            tools_called: std::collections::BTreeMap::new(),
            span: tracing::Span::current(),
            call_span: None,
        }
    }

    /// Passes a chunk through the output scanner: its texts become what may be forwarded now
    /// (masked when the policy redacts output).
    fn scan_output(&mut self, chunk: &mut CompleteChunk) {
        if let Some(scanner) = &mut self.scanner {
            scanner.push(chunk);
        }
    }

    /// Ends output scanning on the last chunk: the held tails and the scanned tool calls go into
    /// it, the findings into the trace.
    fn finish_output(&mut self, chunk: &mut CompleteChunk) {
        if let Some(mut scanner) = self.scanner.take() {
            scanner.push(chunk);
            self.output = scanner.finish(chunk);
        }
        for (index, call) in chunk.tool_calls.iter().enumerate() {
            self.tools_called.insert(index as i32, call.function_name.clone());
        }
    }

    /// The request's risk over the prompt's and the reply's findings.
    fn risk(&self) -> u8 {
        if self.output.is_empty() {
            return self.security.risk;
        }
        let all: Vec<Finding> = self.security.prompt.iter().chain(&self.output).cloned().collect();
        meshgate_policy::risk_score(&all)
    }

    fn serving(&mut self, target: Target, since: Instant, span: tracing::Span) {
        self.serving = Some((target, since));
        self.call_span = Some(span);
    }

    fn failed_call(&mut self, target: &Target, since: Instant, err: &ApiError) {
        self.unserved_call(target, since, Some(err));
    }

    /// A racer that lost: not a failure of its target, and never charged.
    fn cancelled_call(&mut self, target: &Target, since: Instant) {
        self.unserved_call(target, since, None);
    }

    /// A call that will not serve the reply: failed (`err`) or cancelled.
    fn unserved_call(&mut self, target: &Target, since: Instant, err: Option<&ApiError>) {
        let latency = since.elapsed();
        let status = if err.is_some() { "error" } else { "cancelled" };
        self.trace.calls.push(model_call(target, latency, None, status, err, &self.trace.request_id));
        self.orchestrator.metrics.record_model_call(target, status, latency);
        let code = err.map_or(ErrorCode::ClientClosed, |err| err.code);
        self.report_outcome(&target.id, false, latency, 0, code.as_str());
    }

    fn observe(&mut self, chunk: &CompleteChunk) {
        for param in &chunk.dropped_params {
            if !self.trace.dropped_params.contains(param) {
                self.trace.dropped_params.push(param.clone());
            }
        }
        self.completion_bytes += chunk.delta.len() + chunk.reasoning_delta.len() + chunk.refusal_delta.len();
        for delta in &chunk.tool_call_deltas {
            self.completion_bytes += delta.arguments_delta.len();
            if !delta.function_name.is_empty() {
                self.tools_called.entry(delta.index).or_default().push_str(&delta.function_name);
            }
        }
        if let Some(usage) = chunk.usage {
            // Provider-reported numbers are untrusted input: never negative, never overflowing,
            // the details never more than what they detail.
            let prompt_tokens = usage.prompt_tokens.max(0);
            let completion_tokens = usage.completion_tokens.max(0);
            self.usage = Some(Usage {
                prompt_tokens,
                completion_tokens,
                cached_prompt_tokens: usage.cached_prompt_tokens.clamp(0, prompt_tokens),
                cache_write_tokens: usage.cache_write_tokens.clamp(0, prompt_tokens),
                reasoning_tokens: usage.reasoning_tokens.clamp(0, completion_tokens),
                ..Usage::default()
            });
        }
    }

    /// The usage to charge: exact when the target reported it; otherwise (a cut stream, a target
    /// without usage) what was produced so far, estimated from its length.
    fn charged_usage(&self) -> Usage {
        let mut usage = self.usage.unwrap_or(Usage {
            prompt_tokens: self.prompt_estimate,
            completion_tokens: (self.completion_bytes as u64).div_ceil(4) as i64,
            ..Default::default()
        });
        usage.total_tokens = usage.prompt_tokens.saturating_add(usage.completion_tokens);
        usage.cost_micros = self.serving.as_ref().map_or(0, |(target, _)| target.cost_of(&usage));
        usage
    }

    /// Ends a request that never reached a target.
    fn fail(&mut self, err: ApiError) {
        self.settle(Some(err));
    }

    fn finish(&mut self, err: Option<ApiError>) {
        self.settle(err);
    }

    fn settle(&mut self, err: Option<ApiError>) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let orchestrator = self.orchestrator.clone();
        let mut trace = std::mem::take(&mut self.trace);
        trace.routing_reason = std::mem::take(&mut self.routing_reason);
        let mut charged = Usage::default();
        let usage = self.charged_usage();
        if let Some((target, since)) = self.serving.take() {
            let latency = since.elapsed();
            charged = usage;
            let ok = err.is_none();
            let status = if ok { "ok" } else { "error" };
            trace.calls.push(model_call(&target, latency, Some(usage), status, err.as_ref(), &trace.request_id));
            trace.served_model = target.model.clone();
            trace.served_target = target.id.clone();
            trace.layer = target.layer;
            let code = err.as_ref().map(|e| e.code.as_str()).unwrap_or("");
            if let Some(span) = self.call_span.take() {
                span.record("gen_ai.usage.input_tokens", usage.prompt_tokens);
                span.record("gen_ai.usage.output_tokens", usage.completion_tokens);
                if !ok {
                    span.record("error.type", code);
                }
            }
            self.report_outcome(&target.id, ok, latency, usage.completion_tokens, code);
            let project = trace.principal.as_ref().map_or("", |p| p.project_id.as_str());
            orchestrator.metrics.record_usage(&target.model, project, &usage);
            orchestrator.metrics.record_model_call(&target, if ok { "ok" } else { "error" }, latency);
        }
        trace.usage = Some(charged);
        trace.latency_us = self.started.elapsed().as_micros() as i64;
        trace.status_code = err.as_ref().map(|e| i32::from(e.code.http_status().as_u16())).unwrap_or(200);
        trace.error = err.as_ref().map(|e| error_detail(e, &trace.request_id));
        self.record_security(&mut trace);
        let hold = self.hold.take();
        let served = !trace.served_target.is_empty();
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let span = self.span.clone();
        handle.spawn(
            async move {
                if let Some(hold) = hold {
                    hold.settle(served.then_some(charged)).await;
                }
                orchestrator.traces.record(trace);
            }
            .instrument(span),
        );
    }

    /// Findings, risk, tools and sanitized headers into the trace; findings and risk into metrics.
    /// A reply cut before its end was never fully scanned: what the scanner saw so far counts.
    fn record_security(&mut self, trace: &mut Trace) {
        if let Some(scanner) = self.scanner.take() {
            self.output = scanner.findings();
        }
        let metrics = &self.orchestrator.metrics;
        count_findings(metrics, &self.output);
        let risk = self.risk();
        if self.security.engine.is_some() {
            metrics.risk_score.observe(f64::from(risk));
        }
        trace.risk_score = u32::from(risk);
        // Analytics refuses a trace with longer lists; past the bound the most severe findings stay.
        let mut findings: Vec<(&str, &Finding)> = self
            .security
            .prompt
            .iter()
            .map(|f| ("prompt", f))
            .chain(self.output.iter().map(|f| ("output", f)))
            .collect();
        if findings.len() > MAX_TRACE_LIST {
            findings.sort_by_key(|(_, f)| std::cmp::Reverse(f.severity));
            findings.truncate(MAX_TRACE_LIST);
        }
        trace.findings = findings.into_iter().map(|(direction, f)| trace_finding(direction, f)).collect();
        let offered = self.security.tools_offered.iter().map(|name| (name, "offered"));
        let called = self.tools_called.values().map(|name| (name, "called"));
        trace.tool_calls = offered
            .chain(called)
            .take(MAX_TRACE_LIST)
            .map(|(name, kind)| TracedTool { name: truncated(name, MAX_TRACE_NAME), kind: kind.into() })
            .collect();
        trace.headers = std::mem::take(&mut self.security.headers)
            .0
            .into_iter()
            .filter(|(name, _)| name.len() <= MAX_TRACE_NAME)
            .take(MAX_TRACE_LIST)
            .collect();
    }

    /// Labels a request served by a held plan with its own task: the trace's task, the first
    /// reason (the task's) and the explanation's leading "task <name>".
    fn label_task(&mut self, guess: &TaskGuess) {
        let epoch = self.reused_plan.as_ref().map_or(0, |reused| reused.epoch);
        let task = guess.task.as_str();
        let mut reason = format!("task {task} from {} (confidence {:.2})", guess.source, guess.confidence);
        if let Some(note) = &guess.note {
            reason.push_str(&format!("; {note}"));
        }
        reason.push_str(&format!("; plan reused from the router's decision in epoch {epoch}"));
        match self.trace.routing_reasons.first_mut() {
            Some(first) => *first = reason,
            None => self.trace.routing_reasons.push(reason),
        }
        let rest = self.routing_reason.split_once("; ").map_or("", |(_, rest)| rest).to_owned();
        self.routing_reason = format!("task {task}; {rest}");
        self.trace.task = task.to_owned();
    }

    /// Waits for the task classifier's label of a request served by a held plan, if one was
    /// asked for (it bounds its own wait), and labels the request with it.
    async fn classified_task(&mut self) {
        let Some(handle) = self.reused_plan.as_mut().and_then(|reused| reused.classified.take()) else { return };
        if let Ok(guess) = handle.await {
            self.label_task(&guess);
        }
    }

    fn report_outcome(&self, target_id: &str, ok: bool, latency: Duration, completion_tokens: i64, error_code: &str) {
        // A target failing here may be about to open its breaker: until the router's epoch
        // says so, this replica asks the router again instead of reusing plans that lead to it.
        if !ok && !ErrorCode::parse(error_code).is_some_and(ErrorCode::spares_the_target) {
            self.orchestrator.plans.forget_all();
        }
        self.orchestrator.outcomes.report(Outcome {
            target_id: target_id.to_owned(),
            ok,
            latency_us: latency.as_micros() as i64,
            completion_tokens,
            error_code: error_code.to_owned(),
            primary: self.primary && self.reused_plan.is_none(),
        });
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        if !self.settled {
            self.settle(Some(ApiError::new(
                ErrorCode::ClientClosed,
                "client closed the connection before the reply ended",
            )));
        }
    }
}

/// Most findings, tool calls and headers one trace carries (the analytics service's bound).
const MAX_TRACE_LIST: usize = 256;
/// Longest header or tool name recorded, bytes.
const MAX_TRACE_NAME: usize = 256;

/// `text` cut to at most `max` bytes on a character boundary.
fn truncated(text: &str, max: usize) -> String {
    let mut cut = text.len().min(max);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].to_owned()
}

/// A model call of a request's trace: `status` is "ok", "error" or "cancelled".
fn model_call(
    target: &Target,
    latency: Duration,
    usage: Option<Usage>,
    status: &str,
    err: Option<&ApiError>,
    request_id: &str,
) -> ModelCall {
    ModelCall {
        target_id: target.id.clone(),
        provider: target.provider.clone(),
        model: target.model.clone(),
        latency_us: latency.as_micros() as i64,
        usage,
        status: status.into(),
        error: err.map(|e| error_detail(e, request_id)),
    }
}

fn error_detail(err: &ApiError, request_id: &str) -> ErrorDetail {
    ErrorDetail { code: err.code.as_str().into(), message: err.message.clone(), request_id: request_id.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_is_sent_only_the_text_it_classifies() {
        let message = |role: &str, content: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
            ..ChatMessage::default()
        };
        let mut question = message("user", "");
        question.parts = vec![
            meshgate_proto::common::v1::ContentPart { part: Some(Part::Text("what does this print?".into())) },
            meshgate_proto::common::v1::ContentPart { part: Some(Part::Text("print(1)".into())) },
        ];
        let agent = [
            message("system", "You are an agent."),
            message("user", "an earlier turn"),
            message("assistant", "calling a tool"),
            message("tool", &"a long result ".repeat(100)),
            question,
        ];
        let sent = classified_messages(&agent);
        assert_eq!(sent.len(), 1);
        assert_eq!((sent[0].role.as_str(), sent[0].content.as_str()), ("user", "what does this print?\nprint(1)"));
        assert!(sent[0].parts.is_empty());
        let no_user = [message("system", "a"), message("assistant", "b"), message("system", "c")];
        let contents: Vec<String> = classified_messages(&no_user).into_iter().map(|m| m.content).collect();
        assert_eq!(contents, ["a", "c"]);
    }

    #[test]
    fn recorded_names_are_cut_on_character_boundaries() {
        assert_eq!(truncated("héllo", 2), "h");
        assert_eq!(truncated("héllo", 3), "hé");
        assert_eq!(truncated("abc", 10), "abc");
    }

    #[test]
    fn every_list_must_allow_a_target_by_model_or_id() {
        let target = |id: &str, model: &str| Target { id: id.into(), model: model.into(), ..Default::default() };
        let (cheap, dear) = (target("alpha/small", "small"), target("beta/large", "large"));
        let open = AllowedModels::new([&[][..], &[][..]]);
        assert!(open.allows(&cheap) && open.allows(&dear));
        let key = vec!["small".to_owned(), "beta/large".to_owned()];
        let project = vec!["small".to_owned()];
        let both = AllowedModels::new([key.as_slice(), project.as_slice()]);
        assert!(both.allows(&cheap));
        assert!(!both.allows(&dear), "the project's list binds although the key's allows it");
        assert!(AllowedModels::new([key.as_slice()]).allows(&dear), "by target id");
    }

    #[test]
    fn a_reused_plan_carries_this_request_s_sizes_and_costs() {
        let target = Target {
            id: "a/m".into(),
            input_price_micros_per_mtok: 1_000_000,
            output_price_micros_per_mtok: 2_000_000,
            ..Target::default()
        };
        let held = RoutePlan {
            targets: vec![meshgate_proto::router::v1::PlannedTarget {
                target: Some(target),
                estimated_cost_micros: 7,
                ..Default::default()
            }],
            required_context: 50,
            reuse: Some(meshgate_proto::router::v1::PlanReuse { epoch: 3, ttl_ms: 1_000, ..Default::default() }),
            ..RoutePlan::default()
        };
        let plan = reused_plan(&held, 1_000, 500);
        assert_eq!(plan.required_context, 1_500);
        assert_eq!(plan.targets[0].estimated_cost_micros, 2_000, "1,000 × $1/M + 500 × $2/M");
        assert!(plan.reuse.is_none(), "a reused plan is not held again");
    }
}
