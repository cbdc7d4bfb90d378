//! The mock's behaviour knobs, its counters and what it recorded: the state shared by the handle
//! ([`crate::MockProvider`]) and the request handlers.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::watch;

/// How many recent requests [`crate::MockProvider::recorded`] keeps.
pub const RECENT_CAPACITY: usize = 256;

/// How a stream breaks when [`Behavior::fail_after_chunks`] is set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamFault {
    /// Abort the connection: the HTTP body ends with a transport error.
    #[default]
    Abort,
    /// Send the format's error event (Chat Completions `data: {"error": {...}}`, Anthropic
    /// `event: error`, Responses `event: error`), then end the body without `[DONE]` or the final
    /// event.
    ErrorEvent,
    /// End the body cleanly but without the finish chunk and `[DONE]` (Anthropic `message_stop`,
    /// Responses `response.completed`).
    Close,
}

/// A tool call the mock makes instead of answering with text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockToolCall {
    /// Function name.
    pub name: String,
    /// Arguments JSON, streamed in fragments of 4 characters (one completion token each).
    pub arguments: String,
}

/// Prompt-cache usage the mock reports, as a provider with a warm prompt cache does.
///
/// Both are clamped to the request's prompt tokens (reads first). OpenAI reports the reads as
/// `usage.prompt_tokens_details.cached_tokens` (included in `prompt_tokens`) and has no cache
/// writes; Anthropic reports `cache_read_input_tokens` and `cache_creation_input_tokens`, and its
/// `input_tokens` are the prompt tokens less both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromptCache {
    /// Prompt tokens read from the cache.
    pub read_tokens: u64,
    /// Prompt tokens written to the cache (Anthropic only).
    pub write_tokens: u64,
}

impl PromptCache {
    /// `(read, written)` for a prompt of `prompt_tokens`.
    pub fn split(&self, prompt_tokens: u64) -> (u64, u64) {
        let read = self.read_tokens.min(prompt_tokens);
        (read, self.write_tokens.min(prompt_tokens - read))
    }
}

/// Everything that shapes the mock's answers; replace it at runtime with
/// [`crate::MockProvider::set_behavior`] or [`crate::MockProvider::update`]. Requests already
/// being answered keep the behaviour they started with.
#[derive(Clone, Debug)]
pub struct Behavior {
    /// Delay before answering (time to first byte), applied to every API request.
    pub latency: Duration,
    /// Delay before each streamed completion piece.
    pub chunk_delay: Duration,
    /// Completion pieces (tokens) per text reply; `0` means the natural echo length.
    pub stream_chunks: u32,
    /// Probability in `[0, 1]` that an API request fails with [`Self::failure_status`].
    pub failure_rate: f64,
    /// Seed of the failure decisions: the n-th request's fate depends only on `seed` and `n`.
    pub seed: u64,
    /// HTTP status of injected failures (500 when not a valid status).
    pub failure_status: u16,
    /// `Retry-After` seconds sent with injected 429 and 503 answers.
    pub retry_after_secs: Option<u64>,
    /// Never answer API requests (they are released with a 503 when the mock shuts down).
    pub hang: bool,
    /// Answer 200 with a body that is not valid JSON (in SSE framing when streaming).
    pub garbage: bool,
    /// Answer with a JSON completion even when the request asks for a stream, as providers
    /// without streaming support do.
    pub ignore_stream: bool,
    /// Answer chat requests with no content and finish reason `"length"`, as a model that spends
    /// its whole budget on hidden reasoning does.
    pub empty_replies: bool,
    /// Break streams after this many completion pieces (reasoning, text, JSON or tool-call
    /// argument fragments, in the order they stream), or before the finish chunk when the reply
    /// is shorter. Non-streaming requests are not affected.
    pub fail_after_chunks: Option<u32>,
    /// How streams break.
    pub stream_fault: StreamFault,
    /// Required `Authorization: Bearer` key; `None` accepts any request.
    pub api_key: Option<String>,
    /// Models listed by `GET /v1/models`.
    pub models: Vec<String>,
    /// Answer 404 `model_not_found` for models not in [`Self::models`].
    pub strict_models: bool,
    /// Embedding dimensions when the request does not ask for a number.
    pub embedding_dim: usize,
    /// Answer every chat request with this tool call, whatever it offers. Without it the mock
    /// plays the agent game (see the crate documentation).
    pub tool_call: Option<MockToolCall>,
    /// Report prompt-cache usage.
    pub prompt_cache: Option<PromptCache>,
    /// Largest prompt (in the mock's prompt tokens, see [`crate::reply::prompt_tokens`]) the
    /// models take; a larger one is answered 400 `context_length_exceeded`.
    pub context_window: Option<u64>,
    /// Context windows of particular models, overriding [`Self::context_window`] for them.
    pub model_context_windows: HashMap<String, u64>,
    /// Count requests per idempotency key / request id and keep the last [`RECENT_CAPACITY`]
    /// requests. Costs a lock and an allocation per request; benchmarks turn it off.
    pub track_requests: bool,
    /// Answer a request whose `Idempotency-Key` already completed as a replay instead of doing
    /// the work again (needs [`Self::track_requests`]).
    pub honour_idempotency_keys: bool,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            stream_chunks: 0,
            failure_rate: 0.0,
            seed: 0,
            failure_status: 500,
            retry_after_secs: Some(1),
            hang: false,
            garbage: false,
            ignore_stream: false,
            empty_replies: false,
            fail_after_chunks: None,
            stream_fault: StreamFault::Abort,
            api_key: None,
            models: vec!["mock-model".to_owned()],
            strict_models: false,
            embedding_dim: 16,
            tool_call: None,
            prompt_cache: None,
            context_window: None,
            model_context_windows: HashMap::new(),
            track_requests: true,
            honour_idempotency_keys: false,
        }
    }
}

impl Behavior {
    /// The context window of `model`, if it has one.
    pub fn context_window_of(&self, model: &str) -> Option<u64> {
        self.model_context_windows.get(model).copied().or(self.context_window)
    }
}

/// Counters of what the mock received and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// API requests (chat completions, messages, responses and embeddings), whatever their outcome.
    pub requests_total: u64,
    /// Chat completion requests.
    pub chat_requests: u64,
    /// Anthropic Messages API requests.
    pub messages_requests: u64,
    /// Responses API requests.
    pub responses_requests: u64,
    /// Embedding requests.
    pub embedding_requests: u64,
    /// Requests answered with an injected failure (rate, [`crate::MockProvider::fail_next`]).
    pub injected_failures: u64,
    /// Requests rejected with 401.
    pub unauthorized: u64,
    /// Requests answered successfully (a stream counts when its head is sent).
    pub succeeded: u64,
    /// Chat, messages and responses replies produced in full (a stream counts once its last event is made),
    /// replays excluded.
    pub completions: u64,
    /// Requests answered as replays of a completed idempotency key.
    pub idempotent_replays: u64,
    /// Requests whose client went away while the mock delayed or held the answer (latency,
    /// hang): the caller cancelled the call.
    pub abandoned: u64,
}

/// Top-level parameters of `POST /v1/chat/completions` in OpenAI's API reference.
const OPENAI_CHAT_PARAMETERS: &[&str] = &[
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "messages",
    "metadata",
    "modalities",
    "model",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "prompt_cache_retention",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "stop",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "user",
    "verbosity",
    "web_search_options",
];

/// Top-level parameters of `POST /v1/messages` in Anthropic's API reference.
const ANTHROPIC_MESSAGES_PARAMETERS: &[&str] = &[
    "container",
    "context_management",
    "max_tokens",
    "mcp_servers",
    "messages",
    "metadata",
    "model",
    "output_config",
    "output_format",
    "service_tier",
    "stop_sequences",
    "stream",
    "system",
    "temperature",
    "thinking",
    "tool_choice",
    "tools",
    "top_k",
    "top_p",
];

/// Top-level parameters of `POST /v1/responses` in OpenAI's API reference.
const OPENAI_RESPONSES_PARAMETERS: &[&str] = &[
    "background",
    "conversation",
    "include",
    "input",
    "instructions",
    "max_output_tokens",
    "max_tool_calls",
    "metadata",
    "model",
    "parallel_tool_calls",
    "previous_response_id",
    "prompt",
    "prompt_cache_key",
    "prompt_cache_retention",
    "reasoning",
    "safety_identifier",
    "service_tier",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "truncation",
    "user",
];

/// How the mock ended an API request ([`RecordedRequest::outcome`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still being answered: waiting (latency, hang) or streaming.
    Pending,
    /// The reply was produced in full: a JSON document, or a stream to its last event (a replay
    /// too, see [`RecordedRequest::replay`]).
    Completed,
    /// Answered without a reply: an error status (an injected failure, a refused request, a hang
    /// released at shutdown) or garbage.
    Failed,
    /// A stream broken on purpose by [`Behavior::fail_after_chunks`].
    Cut,
    /// The client went away before the answer ended, while the mock waited or mid-stream.
    Abandoned,
}

impl Outcome {
    /// The name `GET /_mock/requests` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cut => "cut",
            Self::Abandoned => "abandoned",
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::Completed,
            2 => Self::Failed,
            3 => Self::Cut,
            4 => Self::Abandoned,
            _ => Self::Pending,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Pending => 0,
            Self::Completed => 1,
            Self::Failed => 2,
            Self::Cut => 3,
            Self::Abandoned => 4,
        }
    }
}

/// How far the answer of a recorded request got; written by its handler (and its stream) with
/// relaxed atomics, read by [`RecordedRequest`].
#[derive(Default)]
pub(crate) struct Progress {
    outcome: AtomicU8,
    /// HTTP status of the answer's head; 0 until it is sent.
    status: AtomicU16,
    streaming: AtomicBool,
    /// Completion pieces streamed so far.
    pieces: AtomicU32,
    replay: AtomicBool,
}

impl Progress {
    /// Ends the request with `outcome` unless it has ended already.
    pub(crate) fn finish(&self, outcome: Outcome) {
        let _ = self.outcome.compare_exchange(0, outcome.as_u8(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Records the status of the answer's head. An answer that is not a stream has ended with
    /// it: failed, unless its reply was marked completed before it left.
    pub(crate) fn answered(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
        if !self.streaming.load(Ordering::Relaxed) {
            self.finish(Outcome::Failed);
        }
    }

    pub(crate) fn set_streaming(&self) {
        self.streaming.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_pieces(&self, pieces: usize) {
        self.pieces.store(u32::try_from(pieces).unwrap_or(u32::MAX), Ordering::Relaxed);
    }

    pub(crate) fn set_replay(&self) {
        self.replay.store(true, Ordering::Relaxed);
    }
}

/// One request as the mock received it (kept when [`Behavior::track_requests`] is on).
#[derive(Clone)]
pub struct RecordedRequest {
    /// Arrival number (from 1, never reset): tells a reader of `GET /_mock/requests` which
    /// requests it has seen.
    pub seq: u64,
    /// Route path, e.g. `/v1/chat/completions`.
    pub path: &'static str,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `api-key` header (Azure OpenAI's way of sending the key).
    pub api_key: Option<String>,
    /// The URL's query string (Azure OpenAI's `api-version=…`).
    pub query: Option<String>,
    /// The `x-request-id` header.
    pub request_id: Option<String>,
    /// The `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// The raw body.
    pub body: Bytes,
    pub(crate) progress: Arc<Progress>,
}

impl fmt::Debug for RecordedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordedRequest")
            .field("seq", &self.seq)
            .field("path", &self.path)
            .field("authorization", &self.authorization)
            .field("api_key", &self.api_key)
            .field("query", &self.query)
            .field("request_id", &self.request_id)
            .field("idempotency_key", &self.idempotency_key)
            .field("outcome", &self.outcome())
            .field("status", &self.status())
            .field("pieces", &self.pieces())
            .field("replay", &self.replay())
            .field("body", &self.body)
            .finish()
    }
}

impl RecordedRequest {
    /// How the answer ended so far (the request's progress, live: a clone sees it move on).
    pub fn outcome(&self) -> Outcome {
        Outcome::from_u8(self.progress.outcome.load(Ordering::Relaxed))
    }

    /// HTTP status of the answer's head, once sent.
    pub fn status(&self) -> Option<u16> {
        Some(self.progress.status.load(Ordering::Relaxed)).filter(|s| *s != 0)
    }

    /// Completion pieces (tokens) streamed so far; `None` when the answer is not a stream.
    pub fn pieces(&self) -> Option<u32> {
        self.progress.streaming.load(Ordering::Relaxed).then(|| self.progress.pieces.load(Ordering::Relaxed))
    }

    /// Answered as a replay of a completed idempotency key ([`Behavior::honour_idempotency_keys`]).
    pub fn replay(&self) -> bool {
        self.progress.replay.load(Ordering::Relaxed)
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
    }

    /// Top-level body parameters the provider's API reference does not name, sorted (what a
    /// gateway forwarded on its own; always empty for embeddings).
    pub fn unknown_parameters(&self) -> Vec<String> {
        let known = match self.path {
            "/v1/chat/completions" => OPENAI_CHAT_PARAMETERS,
            "/v1/messages" => ANTHROPIC_MESSAGES_PARAMETERS,
            "/v1/responses" => OPENAI_RESPONSES_PARAMETERS,
            _ => return Vec::new(),
        };
        let Ok(Value::Object(body)) = self.json() else { return Vec::new() };
        let mut unknown: Vec<String> = body.keys().filter(|k| !known.contains(&k.as_str())).cloned().collect();
        unknown.sort();
        unknown
    }

    /// The images of the conversation, in order: OpenAI `image_url` URLs as sent, Responses
    /// `input_image` URLs as sent (in messages and function call outputs), Anthropic `image` blocks
    /// as their URL or as the `data:<media type>;base64,<data>` URI of their data.
    pub fn images(&self) -> Vec<String> {
        let Ok(body) = self.json() else { return Vec::new() };
        let mut images = Vec::new();
        let turns = body["messages"].as_array().into_iter().chain(body["input"].as_array()).flatten();
        let parts = turns.flat_map(|turn| turn["content"].as_array().into_iter().chain(turn["output"].as_array()));
        for part in parts.flatten() {
            match part["type"].as_str() {
                Some("image_url") => images.extend(part["image_url"]["url"].as_str().map(str::to_owned)),
                Some("input_image") => images.extend(part["image_url"].as_str().map(str::to_owned)),
                Some("image") => {
                    let source = &part["source"];
                    match source["type"].as_str() {
                        Some("url") => images.extend(source["url"].as_str().map(str::to_owned)),
                        Some("base64") => images.push(format!(
                            "data:{};base64,{}",
                            source["media_type"].as_str().unwrap_or_default(),
                            source["data"].as_str().unwrap_or_default()
                        )),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        images
    }
}

/// State shared by the handle and the request handlers.
pub(crate) struct Shared {
    pub(crate) behavior: ArcSwap<Behavior>,
    pub(crate) requests_total: AtomicU64,
    pub(crate) chat_requests: AtomicU64,
    pub(crate) messages_requests: AtomicU64,
    pub(crate) responses_requests: AtomicU64,
    pub(crate) embedding_requests: AtomicU64,
    pub(crate) injected_failures: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) succeeded: AtomicU64,
    pub(crate) completions: AtomicU64,
    pub(crate) idempotent_replays: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    /// Index of the next seeded failure decision.
    pub(crate) decisions: AtomicU64,
    /// Requests still to fail regardless of the rate.
    pub(crate) fail_next: AtomicU64,
    /// Source of response ids.
    pub(crate) ids: AtomicU64,
    /// Arrival numbers of recorded requests.
    pub(crate) seq: AtomicU64,
    pub(crate) by_idempotency_key: Mutex<HashMap<String, u64>>,
    pub(crate) by_request_id: Mutex<HashMap<String, u64>>,
    /// Completions per idempotency key.
    pub(crate) completed_keys: Mutex<HashMap<String, u64>>,
    pub(crate) recent: Mutex<VecDeque<RecordedRequest>>,
    /// Turns true when the mock shuts down; releases hanging requests.
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl Shared {
    pub(crate) fn new(behavior: Behavior, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            behavior: ArcSwap::from_pointee(behavior),
            requests_total: AtomicU64::new(0),
            chat_requests: AtomicU64::new(0),
            messages_requests: AtomicU64::new(0),
            responses_requests: AtomicU64::new(0),
            embedding_requests: AtomicU64::new(0),
            injected_failures: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            completions: AtomicU64::new(0),
            idempotent_replays: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            decisions: AtomicU64::new(0),
            fail_next: AtomicU64::new(0),
            ids: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            by_idempotency_key: Mutex::new(HashMap::new()),
            by_request_id: Mutex::new(HashMap::new()),
            completed_keys: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_CAPACITY)),
            shutdown,
        }
    }
}
