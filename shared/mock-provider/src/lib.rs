//! A mock of the OpenAI HTTP API: the only upstream provider meshgate's tests and benchmarks talk to.
//!
//! Start one in-process with [`MockProvider::start`] (it binds `127.0.0.1:0`) and point a client at
//! [`MockProvider::base_url`] (`http://127.0.0.1:<port>/v1`, the OpenAI SDK convention: the base
//! URL includes the version path). Its [`Behavior`] can be changed at any time through the handle,
//! so a test can make the provider slow, failing, hanging or broken mid-test, and its request
//! counters tell the test what the provider actually received.
//!
//! Endpoints: `POST /v1/chat/completions` (JSON, or SSE with `stream: true`, honouring
//! `stream_options.include_usage`), `POST /v1/embeddings` (float or base64), `GET /v1/models`,
//! `GET /v1/models/{id}`, `GET /health`. Errors use OpenAI's `{"error": {...}}` shape.
//!
//! `POST /v1/messages` speaks the Anthropic Messages API instead (`x-api-key`, a required
//! `anthropic-version` header, `system` beside the messages, content blocks, `tool_use` /
//! `tool_result`, the named SSE events `message_start` … `message_stop`, and Anthropic's
//! `{"type": "error", "error": {...}}` shape), with the same behaviour knobs and the same replies.
//!
//! **Idempotency.** Requests carrying an `Idempotency-Key` header are counted per key. A reply
//! fully produced for a key is a *completion* ([`MockProvider::completions_for_idempotency_key`]);
//! with [`Behavior::honour_idempotency_keys`], a later request with a completed key is answered as a
//! replay (same content, `idempotent-replayed: true`) and is not a new completion, the way an
//! idempotent API treats a client's retry.
//!
//! Replies are deterministic (see [`reply`]): the text is `"echo:"` followed by the first words of
//! the last user message, one completion token per piece, and prompt tokens are counted from the
//! input words; [`reply::reply_text`] and [`reply::prompt_tokens`] compute what to expect.

mod anthropic;
pub mod reply;
mod server;
mod wire;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::serve::ListenerExt;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How many recent requests [`MockProvider::recorded`] keeps.
pub const RECENT_CAPACITY: usize = 256;

/// How a stream breaks when [`Behavior::fail_after_chunks`] is set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamFault {
    /// Abort the connection: the HTTP body ends with a transport error.
    #[default]
    Abort,
    /// Send an OpenAI-style `data: {"error": {...}}` event, then end the body without `[DONE]`.
    ErrorEvent,
    /// End the body cleanly but without the finish chunk and `[DONE]`.
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

/// Everything that shapes the mock's answers; replace it at runtime with
/// [`MockProvider::set_behavior`] or [`MockProvider::update`]. Requests already being answered
/// keep the behaviour they started with.
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
    /// Break streams after this many completion pieces (or before the finish chunk when the
    /// reply is shorter). Non-streaming requests are not affected.
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
    /// Answer every chat request with this tool call. Without it, the mock calls a tool only
    /// when the request's `tool_choice` is `"required"` or names a function.
    pub tool_call: Option<MockToolCall>,
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
            track_requests: true,
            honour_idempotency_keys: false,
        }
    }
}

/// Counters of what the mock received and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// API requests (chat completions and embeddings), whatever their outcome.
    pub requests_total: u64,
    /// Chat completion requests.
    pub chat_requests: u64,
    /// Anthropic Messages API requests.
    pub messages_requests: u64,
    /// Embedding requests.
    pub embedding_requests: u64,
    /// Requests answered with an injected failure (rate, [`MockProvider::fail_next`]).
    pub injected_failures: u64,
    /// Requests rejected with 401.
    pub unauthorized: u64,
    /// Requests answered successfully (a stream counts when its head is sent).
    pub succeeded: u64,
    /// Chat and messages replies produced in full (a stream counts once its last event is made),
    /// replays excluded.
    pub completions: u64,
    /// Requests answered as replays of a completed idempotency key.
    pub idempotent_replays: u64,
}

/// One request as the mock received it (kept when [`Behavior::track_requests`] is on).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Route path, e.g. `/v1/chat/completions`.
    pub path: &'static str,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `x-request-id` header.
    pub request_id: Option<String>,
    /// The `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// The raw body.
    pub body: Bytes,
}

impl RecordedRequest {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
    }
}

/// State shared by the handle and the request handlers.
pub(crate) struct Shared {
    pub(crate) behavior: ArcSwap<Behavior>,
    pub(crate) requests_total: AtomicU64,
    pub(crate) chat_requests: AtomicU64,
    pub(crate) messages_requests: AtomicU64,
    pub(crate) embedding_requests: AtomicU64,
    pub(crate) injected_failures: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) succeeded: AtomicU64,
    pub(crate) completions: AtomicU64,
    pub(crate) idempotent_replays: AtomicU64,
    /// Index of the next seeded failure decision.
    pub(crate) decisions: AtomicU64,
    /// Requests still to fail regardless of the rate.
    pub(crate) fail_next: AtomicU64,
    /// Source of response ids.
    pub(crate) ids: AtomicU64,
    pub(crate) by_idempotency_key: Mutex<HashMap<String, u64>>,
    pub(crate) by_request_id: Mutex<HashMap<String, u64>>,
    /// Completions per idempotency key.
    pub(crate) completed_keys: Mutex<HashMap<String, u64>>,
    pub(crate) recent: Mutex<VecDeque<RecordedRequest>>,
    /// Turns true when the mock shuts down; releases hanging requests.
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// A running mock provider. Dropping it starts a graceful shutdown in the background;
/// [`MockProvider::shutdown`] waits for it.
pub struct MockProvider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl MockProvider {
    /// Starts a mock with the default behaviour on `127.0.0.1:0`.
    pub async fn start() -> io::Result<Self> {
        Self::start_with(Behavior::default()).await
    }

    /// Starts a mock with `behavior` on `127.0.0.1:0`.
    pub async fn start_with(behavior: Behavior) -> io::Result<Self> {
        Self::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), behavior).await
    }

    /// Starts a mock on `addr` (e.g. the address of a mock that was shut down, to bring a
    /// provider "back up").
    pub async fn bind(addr: SocketAddr, behavior: Behavior) -> io::Result<Self> {
        Self::serve(TcpListener::bind(addr).await?, behavior)
    }

    /// Serves on an already bound listener. Must be called inside a Tokio runtime; requests are
    /// handled on that runtime's worker threads.
    pub fn serve(listener: TcpListener, behavior: Behavior) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            behavior: ArcSwap::from_pointee(behavior),
            requests_total: AtomicU64::new(0),
            chat_requests: AtomicU64::new(0),
            messages_requests: AtomicU64::new(0),
            embedding_requests: AtomicU64::new(0),
            injected_failures: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            completions: AtomicU64::new(0),
            idempotent_replays: AtomicU64::new(0),
            decisions: AtomicU64::new(0),
            fail_next: AtomicU64::new(0),
            ids: AtomicU64::new(0),
            by_idempotency_key: Mutex::new(HashMap::new()),
            by_request_id: Mutex::new(HashMap::new()),
            completed_keys: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_CAPACITY)),
            shutdown: shutdown_rx.clone(),
        });
        let app = server::router(shared.clone());
        let listener = listener.tap_io(|tcp| {
            // Small SSE frames must not wait for Nagle's algorithm.
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(%err, "mock provider: TCP_NODELAY failed");
            }
        });
        let mut signal = shutdown_rx;
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // An error means the handle is gone, which is a shutdown too.
                    let _ = signal.wait_for(|stop| *stop).await;
                })
                .await
        });
        Ok(Self { addr, shared, shutdown, task: Some(task) })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL including the version path: `http://127.0.0.1:<port>/v1` (the OpenAI routes
    /// below it, and the Anthropic `POST /v1/messages`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The current behaviour.
    pub fn behavior(&self) -> Behavior {
        Behavior::clone(&self.shared.behavior.load())
    }

    /// Replaces the behaviour for requests that arrive from now on.
    pub fn set_behavior(&self, behavior: Behavior) {
        self.shared.behavior.store(Arc::new(behavior));
    }

    /// Edits the behaviour in place.
    pub fn update(&self, edit: impl FnOnce(&mut Behavior)) {
        let mut behavior = self.behavior();
        edit(&mut behavior);
        self.set_behavior(behavior);
    }

    /// Sets the delay before answering.
    pub fn set_latency(&self, latency: Duration) {
        self.update(|b| b.latency = latency);
    }

    /// Sets the failure rate (`0.0`..=`1.0`) and the status failures answer with.
    pub fn set_failures(&self, rate: f64, status: u16) {
        self.update(|b| {
            b.failure_rate = rate;
            b.failure_status = status;
        });
    }

    /// Makes API requests hang (or answer again).
    pub fn set_hang(&self, hang: bool) {
        self.update(|b| b.hang = hang);
    }

    /// Makes the next `n` API requests fail with [`Behavior::failure_status`], whatever the rate.
    pub fn fail_next(&self, n: u64) {
        self.shared.fail_next.store(n, Ordering::Relaxed);
    }

    /// What the mock has received so far.
    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            requests_total: s.requests_total.load(Ordering::Relaxed),
            chat_requests: s.chat_requests.load(Ordering::Relaxed),
            messages_requests: s.messages_requests.load(Ordering::Relaxed),
            embedding_requests: s.embedding_requests.load(Ordering::Relaxed),
            injected_failures: s.injected_failures.load(Ordering::Relaxed),
            unauthorized: s.unauthorized.load(Ordering::Relaxed),
            succeeded: s.succeeded.load(Ordering::Relaxed),
            completions: s.completions.load(Ordering::Relaxed),
            idempotent_replays: s.idempotent_replays.load(Ordering::Relaxed),
        }
    }

    /// API requests received so far (chat completions and embeddings).
    pub fn requests_total(&self) -> u64 {
        self.shared.requests_total.load(Ordering::Relaxed)
    }

    /// API requests received with this `Idempotency-Key` header.
    pub fn count_for_idempotency_key(&self, key: &str) -> u64 {
        self.shared.by_idempotency_key.lock().get(key).copied().unwrap_or(0)
    }

    /// Replies produced in full for this `Idempotency-Key` (replays excluded).
    pub fn completions_for_idempotency_key(&self, key: &str) -> u64 {
        self.shared.completed_keys.lock().get(key).copied().unwrap_or(0)
    }

    /// Every idempotency key with a completed reply and its number of completions.
    pub fn completed_idempotency_keys(&self) -> HashMap<String, u64> {
        self.shared.completed_keys.lock().clone()
    }

    /// API requests received with this `x-request-id` header.
    pub fn count_for_request_id(&self, request_id: &str) -> u64 {
        self.shared.by_request_id.lock().get(request_id).copied().unwrap_or(0)
    }

    /// The last [`RECENT_CAPACITY`] API requests, oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.shared.recent.lock().iter().cloned().collect()
    }

    /// The most recent API request.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.recent.lock().back().cloned()
    }

    /// Zeroes every counter and forgets recorded requests.
    pub fn reset_counters(&self) {
        let s = &self.shared;
        for counter in [
            &s.requests_total,
            &s.chat_requests,
            &s.messages_requests,
            &s.embedding_requests,
            &s.injected_failures,
            &s.unauthorized,
            &s.succeeded,
            &s.completions,
            &s.idempotent_replays,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        s.by_idempotency_key.lock().clear();
        s.by_request_id.lock().clear();
        s.completed_keys.lock().clear();
        s.recent.lock().clear();
    }

    /// Stops accepting connections, releases hanging requests, and waits for open
    /// connections to finish.
    pub async fn shutdown(mut self) -> io::Result<()> {
        self.shutdown.send_replace(true);
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}
