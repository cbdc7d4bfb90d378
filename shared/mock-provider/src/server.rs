//! What every route shares (counting, recording, latency, failures, authentication, OpenAI
//! errors, idempotent deliveries) and the small OpenAI routes: embeddings, models, health.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;

use crate::reply::{self, splitmix64};
use crate::state::{Behavior, Outcome, Progress, RECENT_CAPACITY, RecordedRequest, Shared};
use crate::wire::{self, EmbeddingInput, EmbeddingRequest};

/// Largest embedding dimension a request may ask for.
const MAX_EMBEDDING_DIM: usize = 8192;
/// Pause before an injected transport abort.
pub(crate) const ABORT_FLUSH_PAUSE: Duration = Duration::from_millis(20);
const OWNER: &str = "meshgate-mock";

#[derive(Clone, Copy)]
pub(crate) enum Endpoint {
    Chat,
    Messages,
    Responses,
    Embeddings,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Messages => "/v1/messages",
            Self::Responses => "/v1/responses",
            Self::Embeddings => "/v1/embeddings",
        }
    }
}

/// An API request being answered: its recorded entry ends when the answer leaves
/// ([`Answering::answered`]) or, when the handler is dropped before (the client went away while
/// the mock waited), as abandoned. Nothing to do when requests are not tracked.
pub(crate) struct Answering(Option<Arc<Progress>>);

impl Answering {
    /// Records the answer's status; an answer that is not a stream has ended with it.
    pub(crate) fn answered(mut self, response: Response) -> Response {
        if let Some(progress) = self.0.take() {
            progress.answered(response.status().as_u16());
        }
        response
    }

    /// Records that the reply was produced in full (the routes without a [`Delivery`]).
    pub(crate) fn completed(&self) {
        if let Some(progress) = &self.0 {
            progress.finish(Outcome::Completed);
        }
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        if let Some(progress) = &self.0 {
            progress.finish(Outcome::Abandoned);
        }
    }
}

/// A streamed answer in progress: dropped before the stream ended (the client went away), it
/// records the request as abandoned.
pub(crate) struct Streaming(Option<Arc<Progress>>);

impl Drop for Streaming {
    fn drop(&mut self) {
        if let Some(progress) = &self.0 {
            progress.finish(Outcome::Abandoned);
        }
    }
}

/// One answer being produced, for completion accounting per idempotency key and the request's
/// recorded outcome.
#[derive(Clone)]
pub(crate) struct Delivery {
    shared: Arc<Shared>,
    key: Option<String>,
    /// The key completed before and the behaviour honours keys: answer without new work.
    pub(crate) replay: bool,
    progress: Option<Arc<Progress>>,
}

impl Delivery {
    /// Marks the answer a stream; hold the guard in the stream until it ends.
    pub(crate) fn streaming(&self) -> Streaming {
        if let Some(progress) = &self.progress {
            progress.set_streaming();
        }
        Streaming(self.progress.clone())
    }

    /// Records how many completion pieces the stream has sent.
    pub(crate) fn streamed(&self, pieces: usize) {
        if let Some(progress) = &self.progress {
            progress.set_pieces(pieces);
        }
    }

    /// Records that the stream was broken on purpose ([`Behavior::fail_after_chunks`]).
    pub(crate) fn cut(&self) {
        if let Some(progress) = &self.progress {
            progress.finish(Outcome::Cut);
        }
    }

    /// Records that the reply was produced in full (a completion unless it is a replay).
    pub(crate) fn completed(&self) {
        if let Some(progress) = &self.progress {
            progress.finish(Outcome::Completed);
        }
        if self.replay {
            return;
        }
        self.shared.completions.fetch_add(1, Ordering::Relaxed);
        if let Some(key) = &self.key {
            *self.shared.completed_keys.lock().entry(key.clone()).or_insert(0) += 1;
        }
    }

    /// Marks a replayed answer's response.
    pub(crate) fn mark(&self, mut response: Response) -> Response {
        if self.replay {
            response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        response
    }
}

pub(crate) fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The key a client sent: `Authorization: Bearer` as OpenAI takes it, or `api-key` as Azure
/// OpenAI does.
fn given_key(headers: &HeaderMap) -> Option<&str> {
    header_str(headers, "authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| header_str(headers, "api-key"))
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Shared {
    /// Starts the accounting of an answer: is it a replay of a completed idempotency key?
    pub(crate) fn delivery(
        self: &Arc<Self>,
        headers: &HeaderMap,
        behavior: &Behavior,
        answering: &Answering,
    ) -> Delivery {
        let key = header_str(headers, "idempotency-key").filter(|_| behavior.track_requests).map(str::to_owned);
        let replay = behavior.honour_idempotency_keys
            && key.as_ref().is_some_and(|key| self.completed_keys.lock().get(key).is_some_and(|n| *n > 0));
        let progress = answering.0.clone();
        if replay {
            self.idempotent_replays.fetch_add(1, Ordering::Relaxed);
            if let Some(progress) = &progress {
                progress.set_replay();
            }
        }
        Delivery { shared: self.clone(), key, replay, progress }
    }

    /// Counts an API request and, when requests are tracked, records it.
    pub(crate) fn count(
        &self,
        endpoint: Endpoint,
        headers: &HeaderMap,
        query: Option<&str>,
        body: &Bytes,
        behavior: &Behavior,
    ) -> Answering {
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        match endpoint {
            Endpoint::Chat => self.chat_requests.fetch_add(1, Ordering::Relaxed),
            Endpoint::Messages => self.messages_requests.fetch_add(1, Ordering::Relaxed),
            Endpoint::Responses => self.responses_requests.fetch_add(1, Ordering::Relaxed),
            Endpoint::Embeddings => self.embedding_requests.fetch_add(1, Ordering::Relaxed),
        };
        if !behavior.track_requests {
            return Answering(None);
        }
        let idempotency_key = header_str(headers, "idempotency-key");
        let request_id = header_str(headers, "x-request-id");
        for (map, key) in [(&self.by_idempotency_key, idempotency_key), (&self.by_request_id, request_id)] {
            if let Some(key) = key {
                let mut map = map.lock();
                match map.get_mut(key) {
                    Some(n) => *n += 1,
                    None => {
                        map.insert(key.to_owned(), 1);
                    }
                }
            }
        }
        let progress = Arc::new(Progress::default());
        let record = RecordedRequest {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            path: endpoint.path(),
            authorization: header_str(headers, "authorization").map(str::to_owned),
            api_key: header_str(headers, "api-key").map(str::to_owned),
            query: query.map(str::to_owned),
            request_id: request_id.map(str::to_owned),
            idempotency_key: idempotency_key.map(str::to_owned),
            body: body.clone(),
            progress: progress.clone(),
        };
        let mut recent = self.recent.lock();
        if recent.len() == RECENT_CAPACITY {
            recent.pop_front();
        }
        recent.push_back(record);
        Answering(Some(progress))
    }

    /// Latency and hang, common to every API request: `true` when a hanging request was
    /// released by the shutdown (answer 503).
    pub(crate) async fn delay_or_hang(&self, behavior: &Behavior) -> bool {
        // The server drops this future when the client's connection closes: counted then.
        let waiting = Abandonment { abandoned: &self.abandoned, armed: true };
        if !behavior.latency.is_zero() {
            tokio::time::sleep(behavior.latency).await;
        }
        if behavior.hang {
            // An error means the mock is being dropped: answer as for a shutdown.
            let _ = self.shutdown.clone().wait_for(|stop| *stop).await;
            waiting.disarm();
            return true;
        }
        waiting.disarm();
        false
    }

    /// Latency, hang and authentication of the OpenAI routes. `Some` is the answer.
    pub(crate) async fn preamble(&self, behavior: &Behavior, headers: &HeaderMap) -> Option<Response> {
        if self.delay_or_hang(behavior).await {
            return Some(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "The mock provider is shutting down.",
                "server_error",
                None,
            ));
        }
        if let Some(expected) = &behavior.api_key {
            let given = given_key(headers);
            let answer = match given {
                Some(key) if key == expected => return None,
                Some(_) => error(
                    StatusCode::UNAUTHORIZED,
                    "Incorrect API key provided.",
                    "invalid_request_error",
                    Some("invalid_api_key"),
                ),
                None => error(
                    StatusCode::UNAUTHORIZED,
                    "You didn't provide an API key. Provide it in an Authorization header (Bearer auth).",
                    "invalid_request_error",
                    None,
                ),
            };
            self.unauthorized.fetch_add(1, Ordering::Relaxed);
            return Some(answer);
        }
        None
    }

    /// The status of the injected failure for this request, if it draws one.
    pub(crate) fn injected_status(&self, behavior: &Behavior) -> Option<StatusCode> {
        let forced = self.fail_next.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
        if !forced && !self.draw_failure(behavior) {
            return None;
        }
        self.injected_failures.fetch_add(1, Ordering::Relaxed);
        Some(StatusCode::from_u16(behavior.failure_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
    }

    /// The injected failure for this request in OpenAI's shape, if it draws one.
    pub(crate) fn injected_failure(&self, behavior: &Behavior) -> Option<Response> {
        let status = self.injected_status(behavior)?;
        let (message, kind, code) = match status.as_u16() {
            429 => (
                "Rate limit reached for requests (injected by the mock provider).",
                "requests",
                Some("rate_limit_exceeded"),
            ),
            503 => (
                "The engine is currently overloaded, please try again later (injected by the mock provider).",
                "server_error",
                None,
            ),
            s if s >= 500 => (
                "The server had an error while processing your request (injected by the mock provider).",
                "server_error",
                None,
            ),
            _ => ("Injected failure of the mock provider.", "invalid_request_error", None),
        };
        let mut response = error(status, message, kind, code);
        if matches!(status.as_u16(), 429 | 503)
            && let Some(secs) = behavior.retry_after_secs
        {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        Some(response)
    }

    fn draw_failure(&self, behavior: &Behavior) -> bool {
        if behavior.failure_rate <= 0.0 {
            return false;
        }
        if behavior.failure_rate >= 1.0 {
            return true;
        }
        let n = self.decisions.fetch_add(1, Ordering::Relaxed);
        // 53 uniform bits -> [0, 1).
        let draw = (splitmix64(behavior.seed ^ splitmix64(n)) >> 11) as f64 / (1u64 << 53) as f64;
        draw < behavior.failure_rate
    }

    pub(crate) fn next_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}{:016x}", splitmix64(n))
    }
}

/// An error in OpenAI's shape.
pub(crate) fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    error_with_param(status, message, kind, None, code)
}

/// An error in OpenAI's shape naming the offending parameter.
pub(crate) fn error_with_param(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let body = wire::ErrorBody { error: wire::ErrorObject { message, kind, param, code } };
    json_response(status, &body)
}

pub(crate) fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response()
        }
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

pub(crate) fn invalid(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, message, "invalid_request_error", None)
}

pub(crate) fn model_not_found(model: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!("The model `{model}` does not exist or you do not have access to it."),
        "invalid_request_error",
        Some("model_not_found"),
    )
}

pub(crate) fn garbage(stream: bool) -> Response {
    if stream {
        let body = "data: {\"id\": this is not json\n\ndata: [DONE]\n\n";
        (StatusCode::OK, [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")], body).into_response()
    } else {
        (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{\"id\": this is not json").into_response()
    }
}

/// A `200 text/event-stream` response streaming `events`; an error aborts the HTTP body (the
/// stream's error type is pinned to `io::Error` for that).
pub(crate) fn sse_response(events: impl futures::Stream<Item = io::Result<Bytes>> + Send + 'static) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

/// Waits `delay` (the pause before a streamed piece), if any.
pub(crate) async fn pause(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// Whether `text` is standard base64 (padding optional), the encoding of data URIs.
pub(crate) fn is_base64(text: &str) -> bool {
    !text.is_empty()
        && (base64::engine::general_purpose::STANDARD.decode(text).is_ok()
            || base64::engine::general_purpose::STANDARD_NO_PAD.decode(text).is_ok())
}

pub(crate) async fn embeddings(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let behavior = shared.behavior.load_full();
    let answering = shared.count(Endpoint::Embeddings, &headers, query.as_deref(), &body, &behavior);
    let response = embed(&shared, &behavior, &headers, &body, &answering).await;
    answering.answered(response)
}

async fn embed(
    shared: &Shared,
    behavior: &Behavior,
    headers: &HeaderMap,
    body: &[u8],
    answering: &Answering,
) -> Response {
    if let Some(answer) = shared.preamble(behavior, headers).await {
        return answer;
    }
    let request: EmbeddingRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(err) => return invalid(&format!("Invalid embeddings request: {err}")),
    };
    let dims = request.dimensions.unwrap_or(behavior.embedding_dim);
    if dims == 0 || dims > MAX_EMBEDDING_DIM {
        return invalid(&format!("'dimensions' must be between 1 and {MAX_EMBEDDING_DIM}."));
    }
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return invalid(&format!("Invalid 'encoding_format' '{other}': expected 'float' or 'base64'."));
        }
    };
    let empty = match &request.input {
        EmbeddingInput::Text(text) => text.is_empty(),
        EmbeddingInput::Texts(texts) => texts.is_empty() || texts.iter().any(String::is_empty),
        EmbeddingInput::Tokens(tokens) => tokens.is_empty(),
        EmbeddingInput::TokenLists(lists) => lists.is_empty() || lists.iter().any(Vec::is_empty),
    };
    if empty {
        return invalid("'input' must not be empty.");
    }
    if behavior.strict_models && !behavior.models.contains(&request.model) {
        return model_not_found(&request.model);
    }
    if let Some(answer) = shared.injected_failure(behavior) {
        return answer;
    }
    if behavior.garbage {
        return garbage(false);
    }
    let (vectors, tokens) = match &request.input {
        EmbeddingInput::Text(text) => (vec![reply::embed_text(text, dims)], reply::count_tokens(text)),
        EmbeddingInput::Texts(texts) => (
            texts.iter().map(|t| reply::embed_text(t, dims)).collect(),
            texts.iter().map(|t| reply::count_tokens(t)).sum(),
        ),
        EmbeddingInput::Tokens(tokens) => (vec![reply::embed_tokens(tokens, dims)], tokens.len() as u64),
        EmbeddingInput::TokenLists(lists) => {
            (lists.iter().map(|t| reply::embed_tokens(t, dims)).collect(), lists.iter().map(|t| t.len() as u64).sum())
        }
    };
    shared.succeeded.fetch_add(1, Ordering::Relaxed);
    answering.completed();
    let usage = wire::EmbeddingUsage { prompt_tokens: tokens, total_tokens: tokens };
    if base64 {
        let data = vectors
            .iter()
            .enumerate()
            .map(|(index, v)| {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                wire::EmbeddingItem {
                    object: "embedding",
                    index,
                    embedding: base64::engine::general_purpose::STANDARD.encode(bytes),
                }
            })
            .collect();
        json_response(StatusCode::OK, &wire::EmbeddingList { object: "list", data, model: &request.model, usage })
    } else {
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(index, embedding)| wire::EmbeddingItem { object: "embedding", index, embedding })
            .collect();
        json_response(StatusCode::OK, &wire::EmbeddingList { object: "list", data, model: &request.model, usage })
    }
}

pub(crate) async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let behavior = shared.behavior.load_full();
    if let Some(answer) = authenticate_only(&shared, &behavior, &headers) {
        return answer;
    }
    let data = behavior
        .models
        .iter()
        .map(|id| wire::ModelObject { id, object: "model", created: 0, owned_by: OWNER })
        .collect();
    json_response(StatusCode::OK, &wire::ModelList { object: "list", data })
}

pub(crate) async fn model(State(shared): State<Arc<Shared>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let behavior = shared.behavior.load_full();
    if let Some(answer) = authenticate_only(&shared, &behavior, &headers) {
        return answer;
    }
    if !behavior.models.contains(&id) {
        return model_not_found(&id);
    }
    json_response(StatusCode::OK, &wire::ModelObject { id: &id, object: "model", created: 0, owned_by: OWNER })
}

/// Model listing checks the key but ignores latency, failures and hang.
fn authenticate_only(shared: &Shared, behavior: &Behavior, headers: &HeaderMap) -> Option<Response> {
    let expected = behavior.api_key.as_deref()?;
    let given = given_key(headers);
    if given == Some(expected) {
        return None;
    }
    shared.unauthorized.fetch_add(1, Ordering::Relaxed);
    Some(error(
        StatusCode::UNAUTHORIZED,
        "Incorrect API key provided.",
        "invalid_request_error",
        Some("invalid_api_key"),
    ))
}

/// `GET /_mock/requests`: the recorded requests, oldest first, for tests in another process (the
/// real-client tests, the chaos runner): arrival number, path, request id, idempotency key, how
/// the answer ended so far (outcome, status, streamed pieces, replay), the body (as JSON when it
/// is JSON), its unknown parameters and its images. Empty unless [`Behavior::track_requests`] is
/// on.
pub(crate) async fn recorded(State(shared): State<Arc<Shared>>) -> Response {
    let recorded: Vec<serde_json::Value> = shared
        .recent
        .lock()
        .iter()
        .map(|request| {
            let body = request
                .json()
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&request.body).into_owned()));
            serde_json::json!({
                "seq": request.seq,
                "path": request.path,
                "query": request.query,
                "request_id": request.request_id,
                "idempotency_key": request.idempotency_key,
                "outcome": request.outcome().as_str(),
                "status": request.status(),
                "pieces": request.pieces(),
                "replay": request.replay(),
                "body": body,
                "unknown_parameters": request.unknown_parameters(),
                "images": request.images(),
            })
        })
        .collect();
    json_response(StatusCode::OK, &recorded)
}

pub(crate) async fn health() -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{\"status\":\"ok\"}").into_response()
}

pub(crate) async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "Unknown route of the mock provider.", "invalid_request_error", None)
}

/// Counts a request as abandoned unless disarmed before it is dropped.
struct Abandonment<'a> {
    abandoned: &'a AtomicU64,
    armed: bool,
}

impl Abandonment<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Abandonment<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.abandoned.fetch_add(1, Ordering::Relaxed);
        }
    }
}
