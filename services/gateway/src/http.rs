//! The HTTP/JSON edge (OpenAI-compatible). Layers, outermost first: request id + trace context +
//! metrics, then the concurrency limit (503 when full; a place is held until the response body
//! ends), then routing.
//! Authentication and body limits run in the handlers so that every failure gets the JSON
//! error shape and the request id.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use meshgate_runtime::{ApiError, ErrorCode};
use tracing::Instrument;

use crate::admin::Invalidator;
use crate::auth::{Authenticator, Caller};
use crate::client_addr::TrustedProxies;
use crate::concurrency::{InFlight, TenantCaps, TenantSlot};
use crate::guard::{Guard, RISK_SCORE, Security};
use crate::jobs;
use crate::metrics::GatewayMetrics;
use crate::openai::{self, ChatLimits};
use crate::orchestrator::{AllowedModels, ChatCall, ChatReply, Orchestrator, Piece};
use crate::quota::QuotaSnapshot;
use crate::settings::SettingsCache;
use crate::tenancy::EndpointScope;

/// Header carrying the client's request id, echoed back (or the gateway's id when the client
/// sent none). It is for the client's logs only: quota, traces and upstream calls use the
/// gateway's own id, so a reused id can neither skip a budget check nor hide a trace.
pub const REQUEST_ID: &str = "x-request-id";
/// Header carrying the gateway's own request id, the key of the request's trace.
pub const MESHGATE_REQUEST_ID: &str = "x-meshgate-request-id";
/// Header carrying the W3C trace id of the request.
pub const TRACE_ID: &str = "x-meshgate-trace-id";

/// Shared state of the edge's handlers.
#[derive(Clone)]
pub struct Edge {
    pub orchestrator: Arc<Orchestrator>,
    pub auth: Authenticator,
    pub limits: ChatLimits,
    pub max_body_bytes: usize,
    pub metrics: GatewayMetrics,
    pub invalidator: Invalidator,
    /// Per-project security policy and request limits.
    pub settings: SettingsCache,
    pub guard: Guard,
    /// Open streams per key and project.
    pub streams: TenantCaps,
    /// Edge batch uploads in progress per key.
    pub uploads: TenantCaps,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub proxies: TrustedProxies,
}

/// Per-request facts the middleware hands to handlers.
#[derive(Clone)]
pub(crate) struct RequestContext {
    pub(crate) request_id: String,
    pub(crate) trace_id: String,
    pub(crate) started: Instant,
    /// The client's address (the peer, or what a trusted proxy says), for throttling failed
    /// authentications.
    pub(crate) client: Option<IpAddr>,
}

/// Builds the edge's router.
pub fn router(edge: Edge, max_concurrency: usize) -> axum::Router {
    // One semaphore for the whole edge: Router::layer clones layers per route.
    let in_flight = InFlight::new(max_concurrency);
    // Every route comes from the OpenAPI document's operations, so none is served undocumented.
    let (routes, _) = crate::openapi::api_routes().split_for_parts();
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(in_flight, crate::concurrency::hold_place))
        .layer(axum::middleware::from_fn_with_state(edge.clone(), observe))
        .with_state(edge)
}

/// Assigns the request id, joins the caller's trace, and records metrics.
async fn observe(State(edge): State<Edge>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = uuid::Uuid::now_v7().to_string();
    let client_request_id =
        request.headers().get(REQUEST_ID).filter(|v| v.to_str().is_ok_and(valid_request_id)).cloned();
    let route =
        request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let span = tracing::info_span!("http.request", otel.name = %format!("{} {route}", request.method()), otel.kind = "server", request_id = %request_id);
    meshgate_runtime::telemetry::set_parent_from_headers(&span, request.headers());
    let trace_id = meshgate_runtime::telemetry::trace_id(&span);
    let forwarded_for = request.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let client =
        request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| edge.proxies.client(c.0.ip(), forwarded_for));
    request.extensions_mut().insert(RequestContext {
        request_id: request_id.clone(),
        trace_id: trace_id.clone(),
        started,
        client,
    });
    let mut response = next.run(request).instrument(span.clone()).await;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert(REQUEST_ID, client_request_id.unwrap_or_else(|| value.clone()));
        headers.insert(MESHGATE_REQUEST_ID, value);
    }
    if let Ok(value) = HeaderValue::from_str(&trace_id) {
        headers.insert(TRACE_ID, value);
    }
    if let Some(parent) = meshgate_runtime::telemetry::traceparent(&span)
        && let Ok(value) = HeaderValue::from_str(&parent)
    {
        headers.insert("traceparent", value);
    }
    edge.metrics.http_requests.with_label_values(&[&route, response.status().as_str()]).inc();
    edge.metrics.http_duration.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
    response
}

/// Client-chosen request ids are echoed when they are short and plain.
pub fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// The JSON error shape, with `Retry-After` and the error's own headers.
/// `{"object": "list", "data": [...]}`: the OpenAI list shape every listing answers with.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct List<T> {
    /// Always `list`.
    object: &'static str,
    data: Vec<T>,
}

impl<T> List<T> {
    pub fn of(data: Vec<T>) -> Self {
        Self { object: "list", data }
    }
}

pub fn error_response(err: &ApiError, request_id: &str) -> Response {
    let mut response = (err.code.http_status(), axum::Json(err.body(request_id))).into_response();
    if let Some(seconds) = err.retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    for (name, value) in &err.headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            response.headers_mut().insert(*name, value);
        }
    }
    response
}

async fn not_found(request: Request) -> Response {
    let id = request_id_of(&request);
    error_response(
        &ApiError::new(ErrorCode::NotFound, format!("no route for {} {}", request.method(), request.uri().path())),
        &id,
    )
}

async fn method_not_allowed(request: Request) -> Response {
    let id = request_id_of(&request);
    let err = ApiError::new(
        ErrorCode::InvalidRequest,
        format!("method {} is not allowed on {}", request.method(), request.uri().path()),
    );
    let mut response = error_response(&err, &id);
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}

/// A path parameter extractor whose rejection (say, a percent-encoding that is not UTF-8) is the
/// JSON error shape, not axum's plain text.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S> for ApiPath<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Self, Response> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|path| ApiPath(path.0))
            .map_err(|rejection| rejected(parts, format!("invalid path: {}", rejection.body_text())))
    }
}

/// A query string extractor whose rejection (an unknown or mistyped parameter) is the JSON error
/// shape.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Self, Response> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|query| ApiQuery(query.0))
            .map_err(|rejection| rejected(parts, format!("invalid query string: {}", rejection.body_text())))
    }
}

fn rejected(parts: &http::request::Parts, message: String) -> Response {
    let id = parts.extensions.get::<RequestContext>().map(|c| c.request_id.clone()).unwrap_or_default();
    error_response(&ApiError::new(ErrorCode::InvalidRequest, message), &id)
}

/// Authenticates the request's key, throttling failures per client address. Takes the parts it
/// needs, not the request, so handler futures stay `Send`.
pub(crate) async fn authenticate(edge: &Edge, headers: &HeaderMap, client: Option<IpAddr>) -> Result<Caller, ApiError> {
    edge.auth.authenticate(authorization(headers), client).await
}

/// The client address the middleware recorded.
pub(crate) fn client_of(request: &Request) -> Option<IpAddr> {
    request.extensions().get::<RequestContext>().and_then(|c| c.client)
}

pub(crate) fn request_id_of(request: &Request) -> String {
    request.extensions().get::<RequestContext>().map(|c| c.request_id.clone()).unwrap_or_default()
}

/// Reads the body up to the limit; a larger body is a 413 without reading the rest.
pub(crate) async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::new(ErrorCode::PayloadTooLarge, format!("request body exceeds {limit} bytes"));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|_| too_large())
}

pub(crate) fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// `POST /v1/chat/completions`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    operation_id = "createChatCompletion",
    tag = "openai",
    summary = "Create a chat completion",
    description = "OpenAI-compatible. The prompt is scanned by the project's security policy (a blocking rule \
answers 422 naming the rule; redaction masks the text before it leaves), quota is reserved (429 with `Retry-After` when \
out), and the routing plan's targets are tried in order. With `stream: true` the reply is server-sent events in the \
OpenAI chunk format (`ChatChunk`), ending with `data: [DONE]`; an error after the first byte ends the stream with an \
`Error` event instead. With `x-meshgate-allow-queue: true`, a request no cloud target could serve is queued: 202 and \
the job.",
    params(
        ("x-meshgate-allow-queue" = Option<bool>, Header, description = "`true`: queue the request (202) when no cloud target answers."),
        ("idempotency-key" = Option<String>, Header, description = "With `x-meshgate-allow-queue`: the key of the queued job."),
        ("x-request-id" = Option<String>, Header, description = "A client request id echoed in `x-request-id` (1–128 of `A-Za-z0-9-_.:`)."),
    ),
    request_body = crate::openai::ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion; server-sent events of `ChatChunk` when `stream` is true; \
the existing `Job` when a queued request's idempotency key was seen before", content(
            (crate::openai::ChatCompletion<'static> = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 202, description = "No cloud target answered and the request allowed queueing: the job", body = crate::jobs::JobJson),
    )
)]
pub(crate) async fn chat_completions(State(edge): State<Edge>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Some(context) = parts.extensions.get::<RequestContext>().cloned() else {
        return error_response(&ApiError::new(ErrorCode::Internal, "request context missing"), "");
    };
    match run_chat(&edge, &parts.headers, body, &context).await {
        Ok(response) => response,
        Err(err) => error_response(&err, &context.request_id),
    }
}

async fn run_chat(
    edge: &Edge,
    headers: &HeaderMap,
    body: Body,
    context: &RequestContext,
) -> Result<Response, ApiError> {
    let caller = edge.auth.authenticate(authorization(headers), context.client).await?;
    caller.require(EndpointScope::Chat)?;
    let settings = edge.settings.get(&caller.principal.project_id).await?;
    let body = read_body(body, headers, settings.max_body_bytes(edge.max_body_bytes)).await?;
    let mut chat = openai::parse_chat(&body, settings.chat_limits(edge.limits))?;
    caller.require_model(&chat.model)?;
    settings.check_model(&chat.model)?;
    // From here on `chat` holds what may leave the gateway: redacted where the policy says so.
    let screened = edge.guard.screen_chat(&settings.policy, &mut chat.messages).await;
    let security = Security {
        engine: Some(settings.policy.clone()),
        prompt: screened.outcome.findings,
        risk: screened.outcome.risk,
        headers: meshgate_policy::sanitize_headers(headers),
        tools_offered: chat.tools.clone(),
    };
    let risk = security.risk;
    let shape = ReplyShape { model: chat.model.clone(), include_usage: chat.include_usage };
    let stream = chat.stream;
    // Kept only when the caller or the project allows the offline fallback.
    let queueable_copy = (jobs::allows_queue(headers) || settings.limits.queue_when_unreachable).then(|| chat.clone());
    let call = ChatCall {
        request_id: context.request_id.clone(),
        trace_id: context.trace_id.clone(),
        principal: caller.principal.clone(),
        chat,
        started: context.started,
        security,
        allowed: AllowedModels::new([caller.scopes.models.as_slice(), settings.limits.allowed_models.as_slice()]),
    };
    if let Some(err) = screened.blocked {
        edge.orchestrator.refuse(&call, err.clone());
        return Err(err);
    }
    // Held by the stream's body: the place is given back when the stream ends.
    let slot = stream.then(|| edge.streams.open(&caller.principal)).transpose()?;
    let reply = match (edge.orchestrator.chat(call).await, queueable_copy) {
        (Ok(reply), _) => reply,
        (Err(err), Some(chat)) if jobs::queueable(&err) && caller.require(EndpointScope::Jobs).is_ok() => {
            tracing::info!(request_id = %context.request_id, error = %err, "no cloud target answered; queueing the request");
            let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            return jobs::enqueue(edge, &caller, chat, &context.request_id, key).await;
        }
        (Err(err), _) => return Err(err),
    };
    let completion_id = format!("chatcmpl-{}", context.request_id);
    if let Some(slot) = slot {
        Ok(stream_response(reply, shape, completion_id, context.request_id.clone(), risk, slot))
    } else {
        json_response(reply, &shape, &completion_id, risk).await
    }
}

/// The headers every chat reply carries: the target that served it, the caller's budget and the
/// request's risk score.
fn reply_headers(response: &mut Response, routing: [(&'static str, &str); 3], quota: &QuotaSnapshot, risk: u8) {
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

/// What the reply's wire format needs from the request.
struct ReplyShape {
    model: String,
    include_usage: bool,
}

/// `risk` is the prompt's; the reply's findings raise it once the whole reply was scanned.
async fn json_response(
    mut reply: ChatReply,
    chat: &ReplyShape,
    completion_id: &str,
    risk: u8,
) -> Result<Response, ApiError> {
    let mut content = String::new();
    let mut last = Piece::default();
    while let Some(piece) = reply.pieces.next().await {
        let piece = piece?;
        content.push_str(&piece.delta);
        last = piece;
    }
    let usage = last.usage.unwrap_or_default();
    let body = openai::ChatCompletion {
        id: completion_id,
        object: "chat.completion",
        created: unix_now(),
        model: &chat.model,
        choices: [openai::Choice {
            index: 0,
            message: openai::AssistantMessage { role: "assistant", content: &content },
            finish_reason: if last.finish_reason.is_empty() { "stop" } else { &last.finish_reason },
            logprobs: None,
        }],
        usage: openai::WireUsage::from(&usage),
    };
    let mut response = axum::Json(body).into_response();
    reply_headers(&mut response, reply.routing_headers(), &reply.quota, last.risk.unwrap_or(risk));
    Ok(response)
}

/// Server-sent events in the OpenAI chunk format: the first chunk carries the role, each piece
/// its text, the last its finish reason, then (when asked) a usage chunk, then `[DONE]`. An
/// error after the first byte ends the stream with an `error` event instead of `[DONE]`. The risk
/// header is the prompt's: headers leave before the reply is scanned (the trace has both).
fn stream_response(
    reply: ChatReply,
    chat: ReplyShape,
    completion_id: String,
    request_id: String,
    risk: u8,
    slot: TenantSlot,
) -> Response {
    let model = chat.model;
    let include_usage = chat.include_usage;
    let created = unix_now();
    let mut response = Response::new(Body::empty());
    reply_headers(&mut response, reply.routing_headers(), &reply.quota, risk);
    let ChatReply { mut pieces, .. } = reply;
    let events = async_stream::stream! {
        let _slot = slot;
        let usage_field = include_usage.then_some(None);
        let mut first = true;
        while let Some(piece) = pieces.next().await {
            let piece = match piece {
                Ok(piece) => piece,
                Err(err) => {
                    yield Ok::<Bytes, std::convert::Infallible>(sse(&err.body(&request_id)));
                    return;
                }
            };
            let finish = (!piece.finish_reason.is_empty()).then_some(piece.finish_reason.as_str());
            if first || !piece.delta.is_empty() || finish.is_none() {
                let chunk = openai::ChatChunk {
                    id: &completion_id,
                    object: "chat.completion.chunk",
                    created,
                    model: &model,
                    choices: vec![openai::ChunkChoice {
                        index: 0,
                        delta: openai::Delta { role: first.then_some("assistant"), content: Some(&piece.delta) },
                        finish_reason: None,
                        logprobs: None,
                    }],
                    usage: usage_field,
                };
                yield Ok(sse(&chunk));
                first = false;
            }
            if let Some(reason) = finish {
                let chunk = openai::ChatChunk {
                    id: &completion_id,
                    object: "chat.completion.chunk",
                    created,
                    model: &model,
                    choices: vec![openai::ChunkChoice { index: 0, delta: openai::Delta::default(), finish_reason: Some(reason), logprobs: None }],
                    usage: usage_field,
                };
                yield Ok(sse(&chunk));
                if include_usage {
                    let usage = piece.usage.unwrap_or_default();
                    let chunk = openai::ChatChunk {
                        id: &completion_id,
                        object: "chat.completion.chunk",
                        created,
                        model: &model,
                        choices: Vec::new(),
                        usage: Some(Some(openai::WireUsage::from(&usage))),
                    };
                    yield Ok(sse(&chunk));
                }
            }
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    *response.body_mut() = Body::from_stream(events);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn sse<T: serde::Serialize>(value: &T) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    if serde_json::to_writer(&mut out, value).is_err() {
        out.truncate(6);
        out.extend_from_slice(br#"{"error":{"type":"api_error","code":"internal_error","message":"encoding failed"}}"#);
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// `GET /v1/models`.
#[utoipa::path(
    get,
    path = "/v1/models",
    operation_id = "listModels",
    tag = "openai",
    summary = "List the models the mesh can serve",
    description = "OpenAI-compatible, with `tasks` (`chat`, `embeddings`, `classification`) as a meshgate extension.",
    responses((status = 200, description = "The models", body = crate::openai::ModelList))
)]
pub(crate) async fn list_models(State(edge): State<Edge>, request: Request) -> Response {
    let id = request_id_of(&request);
    let caller = authenticate(&edge, request.headers(), client_of(&request)).await.and_then(|caller| {
        caller.require(EndpointScope::Models)?;
        Ok(caller)
    });
    if let Err(err) = caller {
        return error_response(&err, &id);
    }
    let data = match edge.orchestrator.models().await {
        Ok(targets) => targets
            .into_iter()
            .map(|(t, tasks)| openai::ModelEntry {
                id: t.model,
                object: "model",
                created: 0,
                owned_by: t.provider,
                tasks,
            })
            .collect(),
        Err(err) => return error_response(&err, &id),
    };
    axum::Json(openai::ModelList { object: "list", data }).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_from_clients_must_be_plain() {
        assert!(valid_request_id("abc-123_x.y:z"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("has space"));
        assert!(!valid_request_id(&"x".repeat(129)));
    }
}
