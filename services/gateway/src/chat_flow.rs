//! What every chat-shaped endpoint does between parsing its wire format and writing its reply —
//! OpenAI chat completions, the Responses API, Anthropic Messages, legacy completions: the
//! caller authenticated, the body read within the project's limit, the canonical request
//! admitted and started on the request path (or queued by the offline fallback when no cloud
//! target answers and the caller or the project allows it), and the reply's common headers and
//! stream framing.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use futures::Stream;
use meshgate_runtime::{ApiError, ErrorCode};
use meshgate_wire::ChatRequest;

use crate::admission::RequestFacts;
use crate::api::{AppState, RequestContext, authorization, read_body};
use crate::auth::Caller;
use crate::budget::QuotaSnapshot;
use crate::concurrency::TenantSlot;
use crate::guard::RISK_SCORE;
use crate::jobs;
use crate::orchestrator::{ChatCall, ChatReply};
use crate::settings::ProjectSettings;
use crate::tenancy::EndpointScope;

/// What every chat-shaped operation answers besides `openapi::COMMON_ERRORS`: the model unknown
/// or not allowed, the body over the project's limit, the policy's refusal, a spent budget, and
/// the targets' failures (an error, a prompt over every context window, a stall).
pub(crate) const MODEL_CALL_ERRORS: &[ErrorCode] = &[
    ErrorCode::ModelNotFound,
    ErrorCode::PayloadTooLarge,
    ErrorCode::PolicyViolation,
    ErrorCode::QuotaExceeded,
    ErrorCode::UpstreamError,
    ErrorCode::ContextLengthExceeded,
    ErrorCode::Timeout,
];

/// An authenticated request and its body.
pub(crate) struct Received {
    pub(crate) caller: Caller,
    pub(crate) settings: Arc<ProjectSettings>,
    pub(crate) body: Bytes,
}

/// Authenticates the caller (allowed to chat) and reads the body within its project's limit.
pub(crate) async fn receive(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
    context: &RequestContext,
) -> Result<Received, ApiError> {
    let caller = app.auth.authenticate(authorization(headers).as_deref(), context.client).await?;
    caller.require(EndpointScope::Chat)?;
    let settings = app.settings.get(&caller.principal.project_id).await?;
    let body = read_body(body, headers, settings.max_body_bytes(app.max_body_bytes)).await?;
    Ok(Received { caller, settings, body })
}

/// Admits `chat` (limits, allowed models, screening); `unforwarded` is what the client's wire
/// format carried that no provider receives, for the trace.
pub(crate) async fn admit(
    app: &AppState,
    received: &Received,
    headers: &HeaderMap,
    context: &RequestContext,
    chat: ChatRequest,
    unforwarded: Vec<String>,
) -> Result<ChatCall, ApiError> {
    let facts = RequestFacts {
        request_id: context.request_id.clone(),
        trace_id: context.trace_id.clone(),
        started: context.started,
        headers: meshgate_policy::sanitize_headers(headers),
        unforwarded,
    };
    app.admission.chat(&received.caller, &received.settings, chat, facts).await
}

/// A request on its way: the reply, the prompt's risk, and for a stream the place it holds.
pub(crate) struct Started {
    pub(crate) reply: ChatReply,
    pub(crate) risk: u8,
    pub(crate) slot: Option<TenantSlot>,
}

/// Runs an admitted call; a stream first takes one of its key's and project's stream places.
pub(crate) async fn start(app: &AppState, caller: &Caller, call: ChatCall) -> Result<Started, ApiError> {
    let risk = call.security.risk;
    let slot = call.chat.stream.then(|| app.streams.open(&caller.principal)).transpose()?;
    let reply = app.orchestrator.chat(call).await?;
    Ok(Started { reply, risk, slot })
}

/// How an admitted call began: started on its targets, or queued by the offline fallback (the
/// 202 answer with the job).
pub(crate) enum Begun {
    Started(Started),
    Queued(Response),
}

/// [`start`], with the offline fallback of every chat-shaped endpoint: when the caller
/// (`x-meshgate-allow-queue: true`) or the project (`queue_when_unreachable`) allows it, the key
/// may use jobs, and no cloud target could answer (unreachable, failing, timed out), the request
/// is queued instead (`Idempotency-Key` honoured) and answered 202 with the job.
pub(crate) async fn start_or_queue(
    app: &AppState,
    received: &Received,
    headers: &HeaderMap,
    context: &RequestContext,
    call: ChatCall,
) -> Result<Begun, ApiError> {
    // Kept only when the caller or the project allows the offline fallback.
    let queueable_copy =
        (jobs::allows_queue(headers) || received.settings.limits.queue_when_unreachable).then(|| call.chat.clone());
    let caller = &received.caller;
    match (start(app, caller, call).await, queueable_copy) {
        (Ok(started), _) => Ok(Begun::Started(started)),
        (Err(err), Some(chat)) if jobs::queueable(&err) && caller.require(EndpointScope::Jobs).is_ok() => {
            tracing::info!(request_id = %context.request_id, error = %err, "no cloud target answered; queueing the request");
            let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            jobs::enqueue(app, caller, chat, &context.request_id, key).await.map(Begun::Queued)
        }
        (Err(err), _) => Err(err),
    }
}

/// The headers every chat reply carries: the target that served it, the caller's budget and the
/// request's risk score.
pub(crate) fn reply_headers(response: &mut Response, reply: &ChatReply, risk: u8) {
    headers_of(response, reply.routing_headers(), &reply.quota, risk);
}

fn headers_of(response: &mut Response, routing: [(&'static str, &str); 3], quota: &QuotaSnapshot, risk: u8) {
    let headers = response.headers_mut();
    headers.insert(RISK_SCORE, HeaderValue::from(u16::from(risk)));
    for (name, value) in routing {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    }
    for (name, value) in quota.headers() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
}

/// A JSON reply (`content_type`: the format's media type).
pub(crate) fn json_reply(body: Vec<u8>, content_type: &'static str) -> Response {
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A server-sent event stream of `events`, holding `slot` until it ends.
pub(crate) fn event_stream<S>(events: S, slot: Option<TenantSlot>) -> Response
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    use futures::StreamExt;
    let body = events.map(move |bytes| {
        let _held = &slot;
        Ok::<Bytes, std::convert::Infallible>(bytes)
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
