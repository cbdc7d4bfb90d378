//! Calls to providers: one pooled HTTP client per provider (so each has its own connect
//! timeout), always streaming upstream, the SSE answer parsed incrementally into
//! [`CompleteChunk`]s — in the OpenAI chat completions format or the Anthropic Messages format
//! (see [`crate::anthropic`] for that mapping).
//!
//! A call's stream yields, in order: zero or more chunks with a non-empty `delta` (the first one
//! also carries `model`), then one final chunk with an empty `delta`, `finish_reason`, `usage` and
//! the `tool_calls` assembled from their fragments (plus `model` if no chunk carried it yet) — or
//! an error, after which it ends. The provider's role-only opening chunk is not forwarded, so the
//! first item is either real content, the final chunk, or an error: until a content chunk has
//! arrived, nothing reached the caller and it may fall back to another target.
//!
//! **Retries.** A call that fails *before its first item* with a retryable error (429, 5xx, a
//! refused or reset connection, a stream broken before any content) is retried up to the
//! provider's `max_retries`, after a jittered exponential backoff (`retry_base_delay_ms · 2ⁿ`,
//! capped at `retry_max_delay_ms`, half fixed and half random so that many callers do not retry
//! in step) or the provider's `Retry-After` when that is longer. A wait that would pass the call's
//! total timeout, or a `Retry-After` longer than `retry_max_delay_ms`, ends the retries: the caller
//! gets the error at once and can fall back elsewhere. Once an item has been yielded, nothing is
//! retried — the caller may already hold streamed bytes.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use meshgate_catalog::{ProviderKind, ProviderSpec};
use meshgate_proto::common::v1::{ChatMessage, ToolCall, Usage};
use meshgate_proto::sync::v1::{CompleteChunk, CompleteRequest};
use rand::Rng;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::Config;
use crate::anthropic;
use crate::error::Error;
use crate::metrics::UpstreamMetrics;
use crate::sse::{SseDecoder, SseEvent};

/// The chunks of one upstream call.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<CompleteChunk, Error>> + Send>>;

/// Roles a message may have.
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];
/// Longest request id forwarded as `x-request-id`.
const MAX_REQUEST_ID_LEN: usize = 256;
/// At most this much of an error body is read.
const MAX_ERROR_BODY: usize = 16 * 1024;
/// Error messages and garbage previews are cut to this many characters.
const MAX_MESSAGE_CHARS: usize = 512;

/// Options of one call beyond the request itself.
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    /// Sent as the `Idempotency-Key` header, so a provider (or a proxy) that honours it answers a
    /// repeated delivery of the same job without doing the work twice.
    pub idempotency_key: Option<String>,
    /// Overrides the provider's `max_retries` (the durable queue passes 0: its own schedule
    /// retries).
    pub max_retries: Option<u32>,
}

/// The client side of every provider: cheap to clone, shared by all calls.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    providers: HashMap<String, Arc<Provider>>,
    metrics: UpstreamMetrics,
    max_event_bytes: usize,
    retry_base_delay: Duration,
    retry_max_delay: Duration,
    anthropic_max_tokens: i64,
}

struct Provider {
    spec: ProviderSpec,
    client: reqwest::Client,
    url: String,
    /// `Authorization: Bearer …` (OpenAI) or `x-api-key: …` (Anthropic).
    auth: Option<(HeaderName, HeaderValue)>,
    first_byte_timeout: Duration,
    timeout: Duration,
    max_retries: u32,
}

impl Upstream {
    /// Builds one pooled HTTP client per provider of `providers` (already validated, see
    /// [`meshgate_catalog::resolve_providers`]).
    pub fn new(config: &Config, providers: &[ProviderSpec], metrics: UpstreamMetrics) -> Result<Self, Error> {
        config.validate()?;
        let mut map = HashMap::with_capacity(providers.len());
        for spec in providers {
            let connect_timeout = Duration::from_millis(spec.connect_timeout_ms.unwrap_or(config.connect_timeout_ms));
            let client = reqwest::Client::builder()
                .connect_timeout(connect_timeout)
                .pool_idle_timeout(Duration::from_millis(config.pool_idle_timeout_ms))
                .pool_max_idle_per_host(config.pool_max_idle_per_host)
                .tcp_nodelay(true)
                .tcp_keepalive(Duration::from_secs(60))
                .user_agent(concat!("meshgate-sync/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|err| Error::HttpClient(error_chain(&err)))?;
            let auth = match &spec.api_key {
                Some(key) => {
                    let (name, value) = match spec.kind {
                        ProviderKind::Openai => (AUTHORIZATION, format!("Bearer {key}")),
                        ProviderKind::Anthropic => (HeaderName::from_static("x-api-key"), key.clone()),
                    };
                    let mut value = HeaderValue::try_from(value).map_err(|_| {
                        Error::Config(format!(
                            "provider '{}': the API key contains invalid header characters",
                            spec.name
                        ))
                    })?;
                    value.set_sensitive(true);
                    Some((name, value))
                }
                None => None,
            };
            let timeout = Duration::from_millis(spec.timeout_ms.unwrap_or(config.timeout_ms));
            let first_byte_timeout =
                Duration::from_millis(spec.first_byte_timeout_ms.unwrap_or(config.first_byte_timeout_ms));
            let provider = Provider {
                url: spec.chat_url(),
                client,
                auth,
                first_byte_timeout,
                timeout,
                max_retries: spec.max_retries.unwrap_or(config.max_retries),
                spec: spec.clone(),
            };
            map.insert(spec.name.clone(), Arc::new(provider));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                providers: map,
                metrics,
                max_event_bytes: config.max_event_bytes,
                retry_base_delay: Duration::from_millis(config.retry_base_delay_ms),
                retry_max_delay: Duration::from_millis(config.retry_max_delay_ms),
                anthropic_max_tokens: config.anthropic_max_tokens,
            }),
        })
    }

    /// The configured providers (in no particular order).
    pub fn providers(&self) -> impl Iterator<Item = &ProviderSpec> {
        self.inner.providers.values().map(|p| &p.spec)
    }

    /// The configured providers serving `model`, in fallback order.
    pub fn serving(&self, model: &str) -> Vec<String> {
        let mut specs: Vec<&ProviderSpec> = self.providers().filter(|p| p.serves(model)).collect();
        specs.sort_by(|a, b| a.rank().cmp(&b.rank()));
        specs.into_iter().map(|p| p.name.clone()).collect()
    }

    /// Starts a completion. Request errors (unknown provider, invalid fields) are returned at
    /// once; everything the provider does wrong arrives as an error item of the stream.
    pub fn complete(&self, request: CompleteRequest) -> Result<ChunkStream, Error> {
        self.complete_with(request, CallOptions::default())
    }

    /// [`Upstream::complete`] with [`CallOptions`].
    pub fn complete_with(&self, request: CompleteRequest, options: CallOptions) -> Result<ChunkStream, Error> {
        let name = request.provider.trim().to_ascii_lowercase();
        if name.is_empty() {
            return Err(Error::InvalidRequest("provider is required".into()));
        }
        let provider =
            self.inner.providers.get(&name).cloned().ok_or_else(|| Error::UnknownProvider(request.provider.clone()))?;
        validate(&request)?;
        let idempotency_key = match options.idempotency_key {
            Some(key) => Some(
                HeaderValue::try_from(key)
                    .map_err(|_| Error::InvalidRequest("the idempotency key is not a valid header value".into()))?,
            ),
            None => None,
        };
        let timeout = match request.timeout_ms {
            0 => provider.timeout,
            ms => Duration::from_millis(ms.unsigned_abs()),
        };
        let first_byte_timeout = provider.first_byte_timeout.min(timeout);
        let request_id =
            if request.request_id.is_empty() { uuid::Uuid::new_v4().to_string() } else { request.request_id.clone() };
        let body = match provider.spec.kind {
            ProviderKind::Openai => serde_json::to_vec(&WireRequest::new(&request)),
            ProviderKind::Anthropic => {
                serde_json::to_vec(&anthropic::request_body(&request, self.inner.anthropic_max_tokens)?)
            }
        }
        .map_err(|err| Error::InvalidRequest(format!("cannot encode the request: {err}")))?;
        let model_label = if provider.spec.serves(&request.model) { request.model.clone() } else { "other".to_owned() };
        let status = Arc::new(AtomicU16::new(0));
        let call = Call {
            inner: self.inner.clone(),
            max_retries: options.max_retries.unwrap_or(provider.max_retries),
            provider: provider.clone(),
            request_id,
            idempotency_key,
            model: request.model,
            model_label: model_label.clone(),
            timeout,
            first_byte_timeout,
            status: status.clone(),
        };
        let observed = Observed {
            stream: Box::pin(call.run(Bytes::from(body))),
            metrics: self.inner.metrics.clone(),
            provider: provider.spec.name.clone(),
            model: model_label,
            started: Instant::now(),
            status,
            first_seen: false,
            finished: false,
        };
        Ok(Box::pin(observed))
    }
}

/// Checks the fields of a completion request (the provider aside).
pub(crate) fn validate(request: &CompleteRequest) -> Result<(), Error> {
    let invalid = |message: String| Err(Error::InvalidRequest(message));
    if request.model.trim().is_empty() {
        return invalid("model is required".into());
    }
    if request.messages.is_empty() {
        return invalid("messages must contain at least one message".into());
    }
    if let Some((i, message)) = request.messages.iter().enumerate().find(|(_, m)| !ROLES.contains(&m.role.as_str())) {
        return invalid(format!(
            "messages[{i}].role {:?} is not one of system, developer, user, assistant, tool",
            message.role
        ));
    }
    if request.request_id.len() > MAX_REQUEST_ID_LEN || HeaderValue::from_str(&request.request_id).is_err() {
        return invalid(format!("request_id must be at most {MAX_REQUEST_ID_LEN} visible ASCII characters"));
    }
    if request.timeout_ms < 0 {
        return invalid(format!("timeout_ms must not be negative (got {})", request.timeout_ms));
    }
    if let Some(sampling) = &request.sampling {
        if let Some(max) = sampling.max_tokens
            && max < 1
        {
            return invalid(format!("sampling.max_tokens must be at least 1 (got {max})"));
        }
        if let Some(t) = sampling.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return invalid(format!("sampling.temperature must be within 0..=2 (got {t})"));
        }
        if let Some(p) = sampling.top_p
            && !(0.0..=1.0).contains(&p)
        {
            return invalid(format!("sampling.top_p must be within 0..=1 (got {p})"));
        }
    }
    Ok(())
}

/// The OpenAI chat completions request sent upstream. `top_k` is not part of the OpenAI API and
/// is not forwarded.
#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'a str,
    /// `null` for an assistant message that only calls tools.
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCall<'a>>,
}

#[derive(Serialize)]
struct WireToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    function: WireFunction<'a>,
}

#[derive(Serialize)]
struct WireFunction<'a> {
    name: &'a str,
    arguments: &'a str,
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

impl<'a> WireRequest<'a> {
    fn new(request: &'a CompleteRequest) -> Self {
        let sampling = request.sampling.as_ref();
        Self {
            model: &request.model,
            messages: request.messages.iter().map(WireMessage::new).collect(),
            stream: true,
            stream_options: StreamOptions { include_usage: true },
            max_tokens: sampling.and_then(|s| s.max_tokens),
            temperature: sampling.and_then(|s| s.temperature),
            top_p: sampling.and_then(|s| s.top_p),
            seed: sampling.and_then(|s| s.seed),
            stop: sampling.map_or(&[], |s| s.stop.as_slice()),
        }
    }
}

impl<'a> WireMessage<'a> {
    fn new(message: &'a ChatMessage) -> Self {
        let tool_only = message.role == "assistant" && message.content.is_empty() && !message.tool_calls.is_empty();
        Self {
            role: &message.role,
            content: if tool_only { None } else { Some(&message.content) },
            name: non_empty(&message.name),
            tool_call_id: non_empty(&message.tool_call_id),
            tool_calls: message
                .tool_calls
                .iter()
                .map(|call| WireToolCall {
                    id: &call.id,
                    kind: if call.r#type.is_empty() { "function" } else { &call.r#type },
                    function: WireFunction { name: &call.function_name, arguments: &call.arguments_json },
                })
                .collect(),
        }
    }
}

/// The answer's events decoded in the provider's format.
enum Decoder {
    Openai(Assembler),
    Anthropic(anthropic::Assembler),
}

impl Decoder {
    fn new(kind: ProviderKind, provider: &str, model: &str) -> Self {
        match kind {
            ProviderKind::Openai => Self::Openai(Assembler::new(provider, model)),
            ProviderKind::Anthropic => Self::Anthropic(anthropic::Assembler::new(provider, model)),
        }
    }

    fn on_event(&mut self, event: SseEvent) -> Result<Option<CompleteChunk>, Error> {
        match self {
            Self::Openai(a) => a.on_event(event),
            Self::Anthropic(a) => a.on_event(event),
        }
    }

    fn done(&self) -> bool {
        match self {
            Self::Openai(a) => a.done,
            Self::Anthropic(a) => a.done,
        }
    }

    /// The event that ends a complete answer, for error messages.
    fn end_marker(&self) -> &'static str {
        match self {
            Self::Openai(_) => "[DONE]",
            Self::Anthropic(_) => "message_stop",
        }
    }
}

/// One call in flight (all its attempts).
struct Call {
    inner: Arc<Inner>,
    provider: Arc<Provider>,
    request_id: String,
    idempotency_key: Option<HeaderValue>,
    model: String,
    model_label: String,
    timeout: Duration,
    first_byte_timeout: Duration,
    max_retries: u32,
    /// The provider's HTTP status once it answered, for the metrics.
    status: Arc<AtomicU16>,
}

impl Call {
    fn name(&self) -> &str {
        &self.provider.spec.name
    }

    fn timeout_error(&self, first_byte: bool) -> Error {
        let message = if first_byte {
            format!("no answer within the first-byte timeout of {} ms", self.first_byte_timeout.as_millis())
        } else {
            format!("the call exceeded its total timeout of {} ms", self.timeout.as_millis())
        };
        Error::Timeout { provider: self.name().to_owned(), message, upstream_status: None }
    }

    fn protocol(&self, message: impl Into<String>) -> Error {
        Error::Protocol { provider: self.name().to_owned(), message: message.into() }
    }

    fn send_error(&self, err: &reqwest::Error) -> Error {
        let provider = self.name().to_owned();
        if err.is_timeout() {
            return Error::Timeout {
                provider,
                message: format!("connect timeout: {}", error_chain(err)),
                upstream_status: None,
            };
        }
        Error::Connect { provider, message: error_chain(err) }
    }

    /// Sends the request and checks the answer's head: a success status and an event stream.
    async fn open(
        &self,
        body: Bytes,
        first_byte_deadline: tokio::time::Instant,
        deadline: tokio::time::Instant,
    ) -> Result<reqwest::Response, Error> {
        let mut builder = self
            .provider
            .client
            .post(&self.provider.url)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream")
            .header("x-request-id", &self.request_id)
            .body(body);
        if self.provider.spec.kind == ProviderKind::Anthropic {
            builder = builder.header("anthropic-version", anthropic::API_VERSION);
        }
        if let Some((name, value)) = &self.provider.auth {
            builder = builder.header(name, value.clone());
        }
        if let Some(key) = &self.idempotency_key {
            builder = builder.header("idempotency-key", key.clone());
        }
        let response = tokio::time::timeout_at(first_byte_deadline, builder.send())
            .await
            .map_err(|_| self.timeout_error(true))?
            .map_err(|err| self.send_error(&err))?;
        let status = response.status();
        self.status.store(status.as_u16(), Ordering::Relaxed);
        if !status.is_success() {
            let retry_after = retry_after(response.headers());
            let message = read_error_message(response, deadline).await;
            return Err(Error::from_upstream_status(self.name(), status.as_u16(), message, retry_after));
        }
        let content_type = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !content_type.trim_start().to_ascii_lowercase().starts_with("text/event-stream") {
            return Err(
                self.protocol(format!("expected a text/event-stream answer, got content type {content_type:?}"))
            );
        }
        Ok(response)
    }

    /// Every attempt of the call; see the module docs for when it retries.
    fn run(self, body: Bytes) -> impl Stream<Item = Result<CompleteChunk, Error>> + Send {
        async_stream::stream! {
            let deadline = tokio::time::Instant::now() + self.timeout;
            let mut retries = 0;
            loop {
                let attempt = self.attempt(body.clone(), deadline);
                futures::pin_mut!(attempt);
                match attempt.next().await {
                    Some(Ok(chunk)) => {
                        yield Ok(chunk);
                        while let Some(item) = attempt.next().await {
                            yield item;
                        }
                        break;
                    }
                    Some(Err(err)) => match self.retry_delay(&err, retries, deadline) {
                        Some(wait) => {
                            tracing::debug!(provider = %self.name(), error = %err, ?wait, retry = retries + 1, "retrying upstream call");
                            self.inner
                                .metrics
                                .retries
                                .with_label_values(&[self.name(), &self.model_label, err.code().as_str()])
                                .inc();
                            tokio::time::sleep(wait).await;
                            retries += 1;
                        }
                        None => {
                            yield Err(err);
                            break;
                        }
                    },
                    None => break,
                }
            }
        }
    }

    /// How long to wait before retrying after `err`, or `None` to give up.
    fn retry_delay(&self, err: &Error, retries: u32, deadline: tokio::time::Instant) -> Option<Duration> {
        if retries >= self.max_retries || !err.is_retryable() {
            return None;
        }
        let max = self.inner.retry_max_delay;
        let backoff = self.inner.retry_base_delay.saturating_mul(1 << retries.min(20)).min(max);
        let half = backoff / 2;
        let jittered = half + rand::rng().random_range(Duration::ZERO..=half);
        let wait = match err.retry_after() {
            Some(seconds) => {
                let asked = Duration::from_secs(seconds);
                if asked > max {
                    return None;
                }
                asked.max(jittered)
            }
            None => jittered,
        };
        (tokio::time::Instant::now() + wait < deadline).then_some(wait)
    }

    /// One attempt: a fresh request, its answer decoded.
    fn attempt(
        &self,
        body: Bytes,
        deadline: tokio::time::Instant,
    ) -> impl Stream<Item = Result<CompleteChunk, Error>> + Send + '_ {
        async_stream::try_stream! {
            let first_byte_deadline = (tokio::time::Instant::now() + self.first_byte_timeout).min(deadline);
            let response = self.open(body, first_byte_deadline, deadline).await?;

            let mut body = response.bytes_stream();
            let mut decoder = SseDecoder::new(self.inner.max_event_bytes);
            let mut assembler = Decoder::new(self.provider.spec.kind, self.name(), &self.model);
            let mut got_bytes = false;
            loop {
                let limit = if got_bytes { deadline } else { first_byte_deadline };
                let next = tokio::time::timeout_at(limit, body.next()).await.map_err(|_| self.timeout_error(!got_bytes))?;
                let bytes = match next {
                    Some(bytes) => bytes.map_err(|err| Error::StreamBroken {
                        provider: self.name().to_owned(),
                        message: error_chain(&err),
                    })?,
                    None => {
                        let last = decoder.finish().map_err(|err| self.protocol(err.to_string()))?;
                        let chunk = match last {
                            Some(event) => assembler.on_event(event)?,
                            None => None,
                        };
                        if let Some(chunk) = chunk {
                            yield chunk;
                        }
                        if !assembler.done() {
                            Err::<(), _>(self.protocol(format!("the stream ended before {}", assembler.end_marker())))?;
                        }
                        break;
                    }
                };
                got_bytes = true;
                decoder.push(&bytes).map_err(|err| self.protocol(err.to_string()))?;
                while let Some(event) = decoder.next_event().map_err(|err| self.protocol(err.to_string()))? {
                    if let Some(chunk) = assembler.on_event(event)? {
                        yield chunk;
                    }
                    if assembler.done() {
                        break;
                    }
                }
                if assembler.done() {
                    break;
                }
            }
        }
    }
}

/// `Retry-After` (seconds or an HTTP date) or `retry-after-ms`, in whole seconds rounded up.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<u64> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(value) = header("retry-after") {
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(seconds);
        }
        if let Ok(when) = httpdate::parse_http_date(value) {
            let wait = when.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
            return Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
        }
    }
    let millis = header("retry-after-ms")?.parse::<f64>().ok().filter(|ms| ms.is_finite() && *ms >= 0.0)?;
    Some((millis / 1000.0).ceil() as u64)
}

/// The message of an error answer: OpenAI's `error.message`, other common shapes, or the text.
async fn read_error_message(mut response: reqwest::Response, deadline: tokio::time::Instant) -> String {
    let status = response.status();
    let mut body = Vec::new();
    let read = async {
        while let Ok(Some(chunk)) = response.chunk().await {
            body.extend_from_slice(&chunk);
            if body.len() >= MAX_ERROR_BODY {
                break;
            }
        }
    };
    // A slow or broken error body still leaves the status to report.
    let _ = tokio::time::timeout_at(deadline, read).await;
    extract_message(&body).unwrap_or_else(|| status.canonical_reason().unwrap_or("no message").to_owned())
}

fn extract_message(body: &[u8]) -> Option<String> {
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        let found = [&json["error"]["message"], &json["error"], &json["message"], &json["detail"]]
            .into_iter()
            .find_map(|v| v.as_str())
            .map(str::to_owned);
        if found.is_some() {
            return found;
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    (!text.is_empty()).then(|| truncate(text))
}

pub(crate) fn truncate(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// An error with its sources, for messages (reqwest's own Display hides the cause).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Option<Vec<WireChoice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCallDelta>>,
}

#[derive(Deserialize)]
struct WireToolCallDelta {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    id: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    function: Option<WireFunctionDelta>,
}

#[derive(Deserialize)]
struct WireFunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: i64,
    #[serde(default)]
    completion_tokens: i64,
    #[serde(default)]
    total_tokens: Option<i64>,
}

/// Turns upstream events into [`CompleteChunk`]s (see the module docs for the sequence).
struct Assembler {
    provider: String,
    requested_model: String,
    reported_model: Option<String>,
    model_sent: bool,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    tool_calls: BTreeMap<u32, ToolCall>,
    done: bool,
}

impl Assembler {
    fn new(provider: &str, requested_model: &str) -> Self {
        Self {
            provider: provider.to_owned(),
            requested_model: requested_model.to_owned(),
            reported_model: None,
            model_sent: false,
            finish_reason: None,
            usage: None,
            tool_calls: BTreeMap::new(),
            done: false,
        }
    }

    fn protocol(&self, message: String) -> Error {
        Error::Protocol { provider: self.provider.clone(), message }
    }

    /// The model for the first chunk sent, empty afterwards.
    fn model_once(&mut self) -> String {
        if self.model_sent {
            return String::new();
        }
        self.model_sent = true;
        self.reported_model.clone().unwrap_or_else(|| self.requested_model.clone())
    }

    fn on_event(&mut self, event: SseEvent) -> Result<Option<CompleteChunk>, Error> {
        let data = event.data.trim();
        if event.event.as_deref() == Some("error") {
            let message = extract_message(data.as_bytes()).unwrap_or_else(|| "no message".into());
            return Err(self.protocol(format!("error event: {message}")));
        }
        if data == "[DONE]" {
            self.done = true;
            let mut tool_calls: Vec<ToolCall> = std::mem::take(&mut self.tool_calls).into_values().collect();
            for call in &mut tool_calls {
                if call.r#type.is_empty() {
                    call.r#type = "function".into();
                }
            }
            return Ok(Some(CompleteChunk {
                delta: String::new(),
                finish_reason: self.finish_reason.take().unwrap_or_default(),
                usage: self.usage.take(),
                tool_calls,
                model: self.model_once(),
                ..CompleteChunk::default()
            }));
        }
        let chunk: WireChunk = serde_json::from_str(data)
            .map_err(|err| self.protocol(format!("malformed chunk ({err}): {}", truncate(data))))?;
        if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
            let message = match error["message"].as_str().or(error.as_str()) {
                Some(message) => message.to_owned(),
                None => truncate(&error.to_string()),
            };
            return Err(self.protocol(format!("error event: {message}")));
        }
        if self.reported_model.is_none()
            && let Some(model) = chunk.model.filter(|m| !m.is_empty())
        {
            self.reported_model = Some(model);
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(Usage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                total_tokens: usage.total_tokens.unwrap_or(usage.prompt_tokens + usage.completion_tokens),
                ..Usage::default()
            });
        }
        let mut delta = String::new();
        // meshgate never asks for n > 1, so only the first choice matters.
        for choice in chunk.choices.unwrap_or_default().into_iter().filter(|c| c.index.unwrap_or(0) == 0) {
            if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty()) {
                self.finish_reason = Some(reason);
            }
            let Some(d) = choice.delta else { continue };
            if let Some(content) = d.content {
                delta.push_str(&content);
            }
            for (position, fragment) in d.tool_calls.unwrap_or_default().into_iter().enumerate() {
                let index = fragment.index.unwrap_or(position as u32);
                let call = self.tool_calls.entry(index).or_default();
                if let Some(id) = fragment.id.filter(|s| !s.is_empty()) {
                    call.id = id;
                }
                if let Some(kind) = fragment.kind.filter(|s| !s.is_empty()) {
                    call.r#type = kind;
                }
                if let Some(function) = fragment.function {
                    if let Some(name) = function.name {
                        call.function_name.push_str(&name);
                    }
                    if let Some(arguments) = function.arguments {
                        call.arguments_json.push_str(&arguments);
                    }
                }
            }
        }
        if delta.is_empty() {
            return Ok(None);
        }
        Ok(Some(CompleteChunk { delta, model: self.model_once(), ..CompleteChunk::default() }))
    }
}

/// Records the metrics of one call as its stream is consumed (or dropped).
struct Observed {
    stream: Pin<Box<dyn Stream<Item = Result<CompleteChunk, Error>> + Send>>,
    metrics: UpstreamMetrics,
    provider: String,
    model: String,
    started: Instant,
    status: Arc<AtomicU16>,
    first_seen: bool,
    finished: bool,
}

impl Observed {
    fn record(&mut self, outcome: &str) {
        self.finished = true;
        let status = match self.status.load(Ordering::Relaxed) {
            0 => "none".to_owned(),
            code => code.to_string(),
        };
        self.metrics.requests.with_label_values(&[&self.provider, &self.model, &status, outcome]).inc();
        self.metrics
            .duration
            .with_label_values(&[&self.provider, &self.model, outcome])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Stream for Observed {
    type Item = Result<CompleteChunk, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        let poll = this.stream.as_mut().poll_next(cx);
        match &poll {
            Poll::Ready(Some(Ok(_))) if !this.first_seen => {
                this.first_seen = true;
                this.metrics
                    .first_chunk
                    .with_label_values(&[&this.provider, &this.model])
                    .observe(this.started.elapsed().as_secs_f64());
            }
            Poll::Ready(Some(Err(err))) => {
                tracing::warn!(provider = %this.provider, model = %this.model, code = %err.code(), error = %err, "upstream call failed");
                this.record(err.code().as_str());
            }
            Poll::Ready(None) => this.record("ok"),
            _ => {}
        }
        poll
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if !self.finished {
            self.record("cancelled");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> SseEvent {
        SseEvent { event: None, data: data.to_owned() }
    }

    #[test]
    fn assembler_holds_the_role_chunk_and_finishes_with_usage_and_tools() {
        let mut a = Assembler::new("p", "requested");
        let role = r#"{"model":"reported","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(a.on_event(event(role)).unwrap(), None);
        let text = r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#;
        let chunk = a.on_event(event(text)).unwrap().unwrap();
        assert_eq!((chunk.delta.as_str(), chunk.model.as_str()), ("Hel", "reported"));
        let tool_start = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get","arguments":""}}]}}]}"#;
        assert_eq!(a.on_event(event(tool_start)).unwrap(), None);
        let tool_args =
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":"}}]}}]}"#;
        a.on_event(event(tool_args)).unwrap();
        let tool_args =
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}"#;
        a.on_event(event(tool_args)).unwrap();
        let finish = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}],"usage":null}"#;
        assert_eq!(a.on_event(event(finish)).unwrap(), None);
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#;
        assert_eq!(a.on_event(event(usage)).unwrap(), None);
        let last = a.on_event(event("[DONE]")).unwrap().unwrap();
        assert!(a.done);
        assert_eq!(last.delta, "");
        assert_eq!(last.model, "");
        assert_eq!(last.finish_reason, "tool_calls");
        assert_eq!(
            last.usage,
            Some(Usage { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8, cost_micros: 0, ..Usage::default() })
        );
        assert_eq!(
            last.tool_calls,
            vec![ToolCall {
                id: "call_1".into(),
                r#type: "function".into(),
                function_name: "get".into(),
                arguments_json: "{\"a\":1}".into()
            }]
        );
    }

    #[test]
    fn assembler_reports_the_requested_model_when_the_provider_does_not() {
        let mut a = Assembler::new("p", "requested");
        let last = a.on_event(event("[DONE]")).unwrap().unwrap();
        assert_eq!(last.model, "requested");
        assert_eq!(last.usage, None);
    }

    #[test]
    fn assembler_rejects_garbage_and_error_events() {
        let mut a = Assembler::new("p", "m");
        let err = a.on_event(event("{not json")).unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err}");
        let err = a.on_event(event(r#"{"error":{"message":"overloaded","type":"server_error"}}"#)).unwrap_err();
        assert!(err.to_string().contains("overloaded"), "{err}");
        let err =
            a.on_event(SseEvent { event: Some("error".into()), data: r#"{"message":"boom"}"#.into() }).unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
    }

    #[test]
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&headers), Some(2));
        headers.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(7));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        headers.insert("retry-after", HeaderValue::try_from(later).unwrap());
        assert!((29..=31).contains(&retry_after(&headers).unwrap()));
    }

    #[test]
    fn error_messages_are_extracted_or_truncated() {
        assert_eq!(extract_message(br#"{"error":{"message":"bad model"}}"#).as_deref(), Some("bad model"));
        assert_eq!(extract_message(br#"{"error":"plain"}"#).as_deref(), Some("plain"));
        assert_eq!(extract_message(br#"{"detail":"fastapi style"}"#).as_deref(), Some("fastapi style"));
        assert_eq!(extract_message(b"  upstream exploded \n").as_deref(), Some("upstream exploded"));
        assert_eq!(extract_message(b""), None);
        let long = "x".repeat(2000);
        assert_eq!(extract_message(long.as_bytes()).unwrap().chars().count(), MAX_MESSAGE_CHARS + 1);
    }

    #[test]
    fn wire_request_is_openai_shaped() {
        use meshgate_proto::common::v1::SamplingParams;
        let request = CompleteRequest {
            model: "gpt".into(),
            messages: vec![
                ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() },
                ChatMessage {
                    role: "assistant".into(),
                    tool_calls: vec![ToolCall {
                        id: "c1".into(),
                        r#type: String::new(),
                        function_name: "f".into(),
                        arguments_json: "{}".into(),
                    }],
                    ..Default::default()
                },
                ChatMessage {
                    role: "tool".into(),
                    content: "42".into(),
                    tool_call_id: "c1".into(),
                    ..Default::default()
                },
            ],
            sampling: Some(SamplingParams {
                max_tokens: Some(5),
                top_k: Some(3),
                stop: vec!["\n".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = serde_json::to_value(WireRequest::new(&request)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "model": "gpt",
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                    {"role": "tool", "content": "42", "tool_call_id": "c1"}
                ],
                "stream": true,
                "stream_options": {"include_usage": true},
                "max_tokens": 5,
                "stop": ["\n"]
            })
        );
    }
}
