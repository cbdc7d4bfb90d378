//! Calls to providers: transport and retries. One pooled HTTP client per provider (so each has
//! its own connect timeout), always streaming upstream. What is sent and how the answer reads is
//! the wire crate's: [`meshgate_wire::openai::provider`] for OpenAI-compatible providers,
//! [`meshgate_wire::anthropic::provider`] for the Anthropic Messages API,
//! [`meshgate_wire::openai::responses::provider`] for OpenAI's Responses API. This module picks the
//! format by the provider's kind, tells the translator how the model takes a request
//! ([`provider_model`]: from the plan's target, which carries the catalog's facts about it), and
//! turns what goes wrong into this service's [`Error`]s.
//!
//! A call's stream yields, in order: zero or more chunks with content (text, tool-call pieces,
//! refusal, reasoning or logprobs; the first one also carries `model` and `dropped_params`, the
//! parameters the provider's body left out), then one final chunk with `finish_reason`, `usage`
//! and the `tool_calls` assembled from their pieces (plus `model` and `dropped_params` if no chunk
//! carried them yet) — or an error, after which it ends. The provider's role-only opening chunk
//! is not forwarded, so the first item is either real content, the final chunk, or an error:
//! until a content chunk has arrived, nothing reached the caller and it may fall back to another
//! target. A provider that ignores `stream` and answers with one JSON document gives the same
//! chunks, all at once.
//!
//! **Retries.** A call that fails *before its first item* with a retryable error (429, 5xx, an
//! error event, a refused or reset connection, a stream broken before any content) is retried up
//! to the provider's `max_retries`, after a jittered exponential backoff (`retry_base_delay_ms ·
//! 2ⁿ`, capped at `retry_max_delay_ms`, half fixed and half random so that many callers do not
//! retry in step) or the provider's `Retry-After` when that is longer. A wait that would pass the
//! call's total timeout, or a `Retry-After` longer than `retry_max_delay_ms`, ends the retries:
//! the caller gets the error at once and can fall back elsewhere. Once an item has been yielded,
//! nothing is retried — the caller may already hold streamed bytes.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use meshgate_catalog::{Capability, Catalog, MaxTokensParam, ProviderKind, ProviderSpec};
use meshgate_proto::sync::v1::{CompleteChunk, CompleteRequest};
use meshgate_wire::anthropic::provider as anthropic;
use meshgate_wire::openai::provider as openai;
use meshgate_wire::openai::responses::provider as responses;
use meshgate_wire::sse::{SseDecoder, SseEvent};
use meshgate_wire::{ChatRequest, ProviderModel, UnknownParams, WireError};
use rand::Rng;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderName, HeaderValue};

use crate::Config;
use crate::error::Error;
use crate::metrics::UpstreamMetrics;
use crate::retry::retry_after;

mod embed;

/// The chunks of one upstream call.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<CompleteChunk, Error>> + Send>>;

/// Longest request id forwarded as `x-request-id`.
const MAX_REQUEST_ID_LEN: usize = 256;
/// At most this much of an error body is read.
const MAX_ERROR_BODY: usize = 16 * 1024;

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

impl Inner {
    /// How long to wait before retry number `retries + 1` of a call allowed `max_retries` after
    /// `err`, or `None` to give up (see the module docs).
    fn retry_delay(
        &self,
        max_retries: u32,
        err: &Error,
        retries: u32,
        deadline: tokio::time::Instant,
    ) -> Option<Duration> {
        if retries >= max_retries || !err.is_retryable() {
            return None;
        }
        let max = self.retry_max_delay;
        let backoff = self.retry_base_delay.saturating_mul(1 << retries.min(20)).min(max);
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
}

/// A call that ran out of time: before the first byte of the answer, or in total.
fn timeout_error(provider: &str, first_byte: bool, first_byte_timeout: Duration, timeout: Duration) -> Error {
    let message = if first_byte {
        format!("no answer within the first-byte timeout of {} ms", first_byte_timeout.as_millis())
    } else {
        format!("the call exceeded its total timeout of {} ms", timeout.as_millis())
    };
    Error::Timeout { provider: provider.to_owned(), message, upstream_status: None }
}

/// A provider's error answer (its status is not a success), classified in its wire format.
async fn failed_answer(spec: &ProviderSpec, response: reqwest::Response, deadline: tokio::time::Instant) -> Error {
    let status = response.status();
    let retry_after = retry_after(response.headers());
    let mut body = read_error_body(response, deadline).await;
    if body.iter().all(u8::is_ascii_whitespace) {
        // Nothing to classify but the status itself.
        body = status.canonical_reason().unwrap_or("no message").as_bytes().to_vec();
    }
    let err = match spec.kind {
        ProviderKind::Openai | ProviderKind::OpenaiResponses => openai::provider_error(status.as_u16(), &body),
        ProviderKind::Anthropic => anthropic::provider_error(status.as_u16(), &body),
    };
    Error::from_provider(&spec.name, err, retry_after)
}

/// A request that could not be sent (or got no answer head) as this service's error.
fn send_error(provider: &str, err: &reqwest::Error) -> Error {
    let provider = provider.to_owned();
    if err.is_timeout() {
        return Error::Timeout {
            provider,
            message: format!("connect timeout: {}", error_chain(err)),
            upstream_status: None,
        };
    }
    Error::Connect { provider, message: error_chain(err) }
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
    max_embeddings_bytes: usize,
    retry_base_delay: Duration,
    retry_max_delay: Duration,
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
            let auth = match spec.key_header() {
                Some((name, value)) => {
                    let invalid = |what: &str| {
                        Error::Config(format!(
                            "provider '{}': the {what} contains invalid header characters",
                            spec.name
                        ))
                    };
                    let name = HeaderName::try_from(name).map_err(|_| invalid("API key header"))?;
                    let mut value = HeaderValue::try_from(value).map_err(|_| invalid("API key"))?;
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
                max_embeddings_bytes: config.max_embeddings_bytes,
                retry_base_delay: Duration::from_millis(config.retry_base_delay_ms),
                retry_max_delay: Duration::from_millis(config.retry_max_delay_ms),
            }),
        })
    }

    /// The configured providers (in no particular order).
    pub fn providers(&self) -> impl Iterator<Item = &ProviderSpec> {
        self.inner.providers.values().map(|p| &p.spec)
    }

    /// Whether `provider` is configured and answers a repeated `Idempotency-Key` with its first
    /// answer.
    pub fn honours_idempotency_keys(&self, provider: &str) -> bool {
        self.inner.providers.get(provider).is_some_and(|p| p.spec.honours_idempotency_keys)
    }

    /// The configured providers serving `model`, in fallback order.
    pub fn serving(&self, model: &str) -> Vec<String> {
        let mut specs: Vec<&ProviderSpec> = self.providers().filter(|p| p.serves(model)).collect();
        specs.sort_by(|a, b| a.rank().cmp(&b.rank()));
        specs.into_iter().map(|p| p.name.clone()).collect()
    }

    /// Starts a completion. Request errors (unknown provider, invalid fields, a field the
    /// provider cannot take) are returned at once; everything the provider does wrong arrives as
    /// an error item of the stream.
    pub fn complete(&self, request: CompleteRequest) -> Result<ChunkStream, Error> {
        self.complete_with(request, CallOptions::default())
    }

    /// [`Upstream::complete`] with [`CallOptions`].
    pub fn complete_with(&self, mut request: CompleteRequest, options: CallOptions) -> Result<ChunkStream, Error> {
        let name = request.provider.trim().to_ascii_lowercase();
        if name.is_empty() {
            return Err(Error::InvalidRequest("provider is required".into()));
        }
        let provider =
            self.inner.providers.get(&name).cloned().ok_or_else(|| Error::UnknownProvider(request.provider.clone()))?;
        validate(&mut request)?;
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
        let model = provider_model(&provider.spec, &request);
        let body = match provider.spec.kind {
            ProviderKind::Openai => openai::request_body(&request, &model),
            ProviderKind::Anthropic => anthropic::request_body(&request, &model),
            ProviderKind::OpenaiResponses => responses::provider_body(&request, &model),
        }
        .map_err(|err| Error::from_wire(&provider.spec.name, err))?;
        // The decoders read the model and the shape the answer was asked in, not the conversation:
        // a long stream need not hold it.
        drop(std::mem::take(&mut request.messages));
        let model_label = if provider.spec.serves(&request.model) { request.model.clone() } else { "other".to_owned() };
        let status = Arc::new(AtomicU16::new(0));
        let call = Call {
            inner: self.inner.clone(),
            max_retries: options.max_retries.unwrap_or(provider.max_retries),
            provider: provider.clone(),
            request_id,
            idempotency_key,
            request,
            model,
            dropped: body.dropped,
            model_label: model_label.clone(),
            timeout,
            first_byte_timeout,
            status: status.clone(),
        };
        let observed = Observed {
            stream: Box::pin(call.run(Bytes::from(body.body))),
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

/// Checks a completion request (the provider aside): the canonical checks every entry point
/// shares, naming the field as the OpenAI format spells it (and normalising what has two
/// spellings: `developer` is `system`), then the call's own fields.
pub(crate) fn validate(request: &mut CompleteRequest) -> Result<(), Error> {
    if request.request_id.len() > MAX_REQUEST_ID_LEN || HeaderValue::from_str(&request.request_id).is_err() {
        return Err(Error::InvalidRequest(format!(
            "request_id must be at most {MAX_REQUEST_ID_LEN} visible ASCII characters"
        )));
    }
    if request.timeout_ms < 0 {
        return Err(Error::InvalidRequest(format!("timeout_ms must not be negative (got {})", request.timeout_ms)));
    }
    // The request's parts are moved into the canonical shape and back, not copied.
    let mut chat = ChatRequest {
        model: std::mem::take(&mut request.model),
        messages: std::mem::take(&mut request.messages),
        sampling: request.sampling.take().unwrap_or_default(),
        options: request.options.take().unwrap_or_default(),
        ..ChatRequest::default()
    };
    let checked = chat.check();
    request.model = chat.model;
    request.messages = chat.messages;
    request.sampling = Some(chat.sampling);
    request.options = Some(chat.options);
    checked.map_err(|err| Error::InvalidRequest(err.to_string()))
}

/// How `spec`'s model of `request` takes a request: the plan's target says (the catalog's facts
/// about the model: how it takes its completion limit, its largest completion, whether it has
/// native JSON-schema output); without one, the catalog's defaults for the provider. Parameters
/// meshgate does not model follow the provider's `unknown_params` setting.
pub(crate) fn provider_model(spec: &ProviderSpec, request: &CompleteRequest) -> ProviderModel {
    let unknown_params = unknown_params(spec);
    match &request.target {
        Some(target) => ProviderModel {
            max_completion_tokens: target.max_tokens_param == MaxTokensParam::MaxCompletionTokens.as_str(),
            unknown_params,
            max_output_tokens: target.max_output_tokens.max(0),
            native_structured_output: target.capabilities.iter().any(|c| c == Capability::JsonSchema.as_str()),
        },
        None => {
            let profile = Catalog::default().cloud_profile(spec, &request.model);
            ProviderModel {
                max_completion_tokens: profile.max_tokens_param == MaxTokensParam::MaxCompletionTokens,
                unknown_params,
                max_output_tokens: profile.max_output_tokens,
                native_structured_output: profile.has(Capability::JsonSchema),
            }
        }
    }
}

/// What the translators do with parameters meshgate does not model, by `spec`'s setting.
fn unknown_params(spec: &ProviderSpec) -> UnknownParams {
    match spec.on_unknown_params() {
        meshgate_catalog::UnknownParams::Forward => UnknownParams::Forward,
        meshgate_catalog::UnknownParams::Drop => UnknownParams::Drop,
        meshgate_catalog::UnknownParams::Refuse => UnknownParams::Refuse,
    }
}

/// The answer's events decoded in the provider's format.
enum Decoder {
    Openai(openai::StreamDecoder),
    Anthropic(anthropic::StreamDecoder),
    Responses(responses::StreamDecoder),
}

impl Decoder {
    fn new(kind: ProviderKind, request: &CompleteRequest, model: &ProviderModel) -> Self {
        match kind {
            ProviderKind::Openai => Self::Openai(openai::StreamDecoder::new(request)),
            ProviderKind::Anthropic => Self::Anthropic(anthropic::StreamDecoder::new(request, model)),
            ProviderKind::OpenaiResponses => Self::Responses(responses::StreamDecoder::new(request)),
        }
    }

    fn on_event(&mut self, event: &SseEvent) -> Result<Option<CompleteChunk>, WireError> {
        match self {
            Self::Openai(decoder) => decoder.on_event(event),
            Self::Anthropic(decoder) => decoder.on_event(event),
            Self::Responses(decoder) => decoder.on_event(event),
        }
    }

    fn is_done(&self) -> bool {
        match self {
            Self::Openai(decoder) => decoder.is_done(),
            Self::Anthropic(decoder) => decoder.is_done(),
            Self::Responses(decoder) => decoder.is_done(),
        }
    }

    /// The event that ends a complete answer, for error messages.
    fn end_marker(&self) -> &'static str {
        match self {
            Self::Openai(_) => openai::END_MARKER,
            Self::Anthropic(_) => anthropic::END_MARKER,
            Self::Responses(_) => responses::END_EVENTS[0],
        }
    }
}

/// What the provider answered with.
enum AnswerFormat {
    EventStream,
    /// One JSON document: a provider that ignores `stream`.
    Json,
}

/// One call in flight (all its attempts).
struct Call {
    inner: Arc<Inner>,
    provider: Arc<Provider>,
    request_id: String,
    idempotency_key: Option<HeaderValue>,
    /// The request without its conversation, for the decoders (its model, and at Anthropic the
    /// shape the answer was asked in).
    request: CompleteRequest,
    model: ProviderModel,
    /// What the body left out, for the first chunk.
    dropped: Vec<String>,
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
        timeout_error(self.name(), first_byte, self.first_byte_timeout, self.timeout)
    }

    fn protocol(&self, message: impl Into<String>) -> Error {
        Error::Protocol { provider: self.name().to_owned(), message: message.into() }
    }

    fn broken(&self, err: &reqwest::Error) -> Error {
        Error::StreamBroken { provider: self.name().to_owned(), message: error_chain(err) }
    }

    fn send_error(&self, err: &reqwest::Error) -> Error {
        send_error(self.name(), err)
    }

    /// Sends the request and checks the answer's head: a success status and an event stream
    /// (or a JSON document); an error answer is read and classified.
    async fn open(
        &self,
        body: Bytes,
        first_byte_deadline: tokio::time::Instant,
        deadline: tokio::time::Instant,
    ) -> Result<(reqwest::Response, AnswerFormat), Error> {
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
            return Err(failed_answer(&self.provider.spec, response, deadline).await);
        }
        let content_type = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let essence = content_type.trim_start().to_ascii_lowercase();
        let format = if essence.starts_with("text/event-stream") {
            AnswerFormat::EventStream
        } else if essence.starts_with("application/json") {
            AnswerFormat::Json
        } else {
            return Err(self.protocol(format!(
                "expected a text/event-stream (or application/json) answer, got content type {content_type:?}"
            )));
        };
        Ok((response, format))
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
                    Some(Ok(mut chunk)) => {
                        chunk.dropped_params.clone_from(&self.dropped);
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

    fn retry_delay(&self, err: &Error, retries: u32, deadline: tokio::time::Instant) -> Option<Duration> {
        self.inner.retry_delay(self.max_retries, err, retries, deadline)
    }

    /// One attempt: a fresh request, its answer decoded.
    fn attempt(
        &self,
        body: Bytes,
        deadline: tokio::time::Instant,
    ) -> impl Stream<Item = Result<CompleteChunk, Error>> + Send + '_ {
        async_stream::try_stream! {
            let first_byte_deadline = (tokio::time::Instant::now() + self.first_byte_timeout).min(deadline);
            let (response, format) = self.open(body, first_byte_deadline, deadline).await?;
            if let AnswerFormat::Json = format {
                let max = self.inner.max_event_bytes;
                let body = read_body(response, max, deadline).await.map_err(|failure| match failure {
                    BodyFailure::TooLarge => self.protocol(format!("the JSON answer exceeds {max} bytes")),
                    BodyFailure::Timeout => self.timeout_error(false),
                    BodyFailure::Broken(err) => self.broken(&err),
                })?;
                let chunks = match self.provider.spec.kind {
                    ProviderKind::Openai => openai::decode_completion(&self.request, &body),
                    ProviderKind::Anthropic => anthropic::decode_message(&self.request, &self.model, &body),
                    ProviderKind::OpenaiResponses => responses::decode_response(&self.request, &body),
                }
                .map_err(|err| Error::from_wire(self.name(), err))?;
                for chunk in chunks {
                    yield chunk;
                }
                return;
            }

            let mut body = response.bytes_stream();
            let mut events = SseDecoder::new(self.inner.max_event_bytes);
            let mut decoder = Decoder::new(self.provider.spec.kind, &self.request, &self.model);
            let mut got_bytes = false;
            loop {
                let limit = if got_bytes { deadline } else { first_byte_deadline };
                let next = tokio::time::timeout_at(limit, body.next()).await.map_err(|_| self.timeout_error(!got_bytes))?;
                let bytes = match next {
                    Some(bytes) => bytes.map_err(|err| self.broken(&err))?,
                    None => {
                        let last = events.finish().map_err(|err| self.protocol(err.to_string()))?;
                        let chunk = match last {
                            Some(event) => decoder.on_event(&event).map_err(|err| Error::from_wire(self.name(), err))?,
                            None => None,
                        };
                        if let Some(chunk) = chunk {
                            yield chunk;
                        }
                        if !decoder.is_done() {
                            Err::<(), _>(self.protocol(format!("the stream ended before {}", decoder.end_marker())))?;
                        }
                        break;
                    }
                };
                got_bytes = true;
                events.push(&bytes).map_err(|err| self.protocol(err.to_string()))?;
                while let Some(event) = events.next_event().map_err(|err| self.protocol(err.to_string()))? {
                    if let Some(chunk) = decoder.on_event(&event).map_err(|err| Error::from_wire(self.name(), err))? {
                        yield chunk;
                    }
                    if decoder.is_done() {
                        break;
                    }
                }
                if decoder.is_done() {
                    break;
                }
            }
        }
    }
}

/// The start of an error answer's body (what arrives of its first [`MAX_ERROR_BODY`] bytes
/// before `deadline`): a slow or broken error body still leaves the status to report.
async fn read_error_body(mut response: reqwest::Response, deadline: tokio::time::Instant) -> Vec<u8> {
    let mut body = Vec::new();
    let read = async {
        while let Ok(Some(chunk)) = response.chunk().await {
            body.extend_from_slice(&chunk);
            if body.len() >= MAX_ERROR_BODY {
                break;
            }
        }
    };
    let _ = tokio::time::timeout_at(deadline, read).await;
    body
}

/// Why a body could not be read whole.
enum BodyFailure {
    TooLarge,
    Timeout,
    Broken(reqwest::Error),
}

/// The body of `response`, at most `limit` bytes, read before `deadline`.
async fn read_body(
    mut response: reqwest::Response,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Result<Vec<u8>, BodyFailure> {
    let mut body = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, response.chunk()).await {
            Err(_) => return Err(BodyFailure::Timeout),
            Ok(Err(err)) => return Err(BodyFailure::Broken(err)),
            Ok(Ok(None)) => return Ok(body),
            Ok(Ok(Some(chunk))) => {
                if body.len() + chunk.len() > limit {
                    return Err(BodyFailure::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
        }
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
        let status = self.status.load(Ordering::Relaxed);
        self.metrics.record_call(&self.provider, &self.model, status, outcome, self.started.elapsed());
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
    use meshgate_proto::common::v1::Target;

    use super::*;

    fn spec(kind: ProviderKind, base_url: &str) -> ProviderSpec {
        ProviderSpec {
            name: "p".into(),
            kind,
            base_url: base_url.into(),
            models: vec!["m".into()],
            ..Default::default()
        }
    }

    #[test]
    fn the_target_says_how_the_model_takes_a_request() {
        let target = Target {
            max_tokens_param: "max_completion_tokens".into(),
            max_output_tokens: 32_000,
            capabilities: vec!["tools".into(), "json_schema".into()],
            ..Target::default()
        };
        let request = CompleteRequest { model: "m".into(), target: Some(target), ..CompleteRequest::default() };
        let openai = spec(ProviderKind::Openai, "http://vllm:8000/v1");
        assert_eq!(
            provider_model(&openai, &request),
            ProviderModel {
                max_completion_tokens: true,
                unknown_params: UnknownParams::Forward,
                max_output_tokens: 32_000,
                native_structured_output: true,
            }
        );
        let plain = CompleteRequest {
            target: Some(Target { max_tokens_param: "max_tokens".into(), ..Target::default() }),
            ..request.clone()
        };
        let refusing = ProviderSpec { unknown_params: Some(meshgate_catalog::UnknownParams::Refuse), ..openai.clone() };
        assert_eq!(
            provider_model(&refusing, &plain),
            ProviderModel { unknown_params: UnknownParams::Refuse, ..ProviderModel::default() }
        );
        // Anthropic drops what meshgate does not model unless told otherwise.
        let anthropic = spec(ProviderKind::Anthropic, "https://api.anthropic.com/v1");
        assert_eq!(provider_model(&anthropic, &plain).unknown_params, UnknownParams::Drop);
    }

    #[test]
    fn without_a_target_the_catalog_defaults_apply() {
        let request = CompleteRequest { model: "m".into(), ..CompleteRequest::default() };
        let official = provider_model(&spec(ProviderKind::Openai, "https://api.openai.com/v1"), &request);
        assert!(official.max_completion_tokens, "OpenAI's own API takes max_completion_tokens");
        let vllm = provider_model(&spec(ProviderKind::Openai, "http://vllm:8000/v1"), &request);
        assert!(!vllm.max_completion_tokens);
        assert_eq!(vllm.max_output_tokens, 0, "unknown: the translator's default");
    }

    #[test]
    fn validation_names_the_field_and_normalises_roles() {
        use meshgate_proto::common::v1::{ChatMessage, SamplingParams};
        let message = |role: &str| ChatMessage { role: role.into(), content: "hi".into(), ..ChatMessage::default() };
        let mut request = CompleteRequest {
            model: " m ".into(),
            messages: vec![message("developer"), message("user")],
            ..CompleteRequest::default()
        };
        validate(&mut request).unwrap();
        assert_eq!((request.model.as_str(), request.messages[0].role.as_str()), ("m", "system"));
        assert_eq!(request.messages.len(), 2, "the messages are moved back");

        let orphan = ChatMessage { role: "tool".into(), tool_call_id: "call_9".into(), ..message("tool") };
        let mut request = CompleteRequest { messages: vec![message("user"), orphan], ..request };
        let err = validate(&mut request).unwrap_err();
        assert!(err.to_string().starts_with("`messages[1].tool_call_id`"), "{err}");
        let mut hot = CompleteRequest {
            sampling: Some(SamplingParams { temperature: Some(9.0), ..SamplingParams::default() }),
            messages: vec![message("user")],
            ..request
        };
        assert!(validate(&mut hot).unwrap_err().to_string().starts_with("`temperature`"));
        let mut bad_id = CompleteRequest { request_id: "line\nbreak".into(), sampling: None, ..hot };
        assert!(validate(&mut bad_id).unwrap_err().to_string().contains("request_id"));
    }
}
