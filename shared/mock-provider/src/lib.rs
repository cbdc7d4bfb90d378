//! A mock of the OpenAI and Anthropic HTTP APIs: the only upstream provider meshgate's tests and
//! benchmarks talk to.
//!
//! Start one in-process with [`MockProvider::start`] (it binds `127.0.0.1:0`) and point a client at
//! [`MockProvider::base_url`] (`http://127.0.0.1:<port>/v1`, the OpenAI SDK convention: the base
//! URL includes the version path). Its [`Behavior`] can be changed at any time through the handle,
//! so a test can make the provider slow, failing, hanging or broken mid-test, and its request
//! counters and [`MockProvider::recorded`] bodies tell the test what the provider actually received.
//!
//! Endpoints: `POST /v1/chat/completions` (JSON, or SSE with `stream: true`, honouring
//! `stream_options.include_usage`), `POST /v1/embeddings` (float or base64), `GET /v1/models`,
//! `GET /v1/models/{id}`, `GET /health`. Errors use OpenAI's `{"error": {...}}` shape.
//! `GET /_mock/requests` lists what [`MockProvider::recorded`] holds, for tests in another process,
//! each request with its arrival number and how its answer ended ([`RecordedRequest::outcome`]:
//! completed, failed, cut, abandoned, or still pending). Started with [`ServeOptions::control`],
//! the mock also serves `GET`/`PUT /_mock/behavior`: the fault knobs of its [`Behavior`] read and
//! replaced at runtime by a test in another process (see the `control` module).
//!
//! `POST /v1/messages` speaks the Anthropic Messages API instead (`x-api-key`, a required
//! `anthropic-version` header, `system` beside the messages, content blocks, `tool_use` /
//! `tool_result`, the named SSE events `message_start` … `message_stop`, and Anthropic's
//! `{"type": "error", "error": {...}}` shape), with the same behaviour knobs and the same replies.
//!
//! `POST /v1/responses` speaks OpenAI's Responses API (`instructions` and `input` items:
//! messages, `function_call` / `function_call_output`, replayed `reasoning` items; flat function
//! tools; `text.format`; `reasoning`; `max_output_tokens`), answering with a `response` object
//! (`reasoning`, `message` and `function_call` output items; `status: incomplete` when cut by
//! `max_output_tokens`) or its named, numbered events `response.created` … `response.completed`
//! (no `[DONE]`), with OpenAI's keys and errors and the same behaviour knobs and replies. It keeps
//! nothing: `store` is accepted either way, a `previous_response_id` is never found, and built-in
//! tools (web search, file search, …) are refused.
//!
//! **The agent game.** Every format answers the way a model driving an agent does, deterministically:
//! - tools offered and the conversation ending in a user turn (OpenAI `tool_choice` absent,
//!   `auto` or `required`; Anthropic `auto` or `any`) → one call per tool, or one call when
//!   `parallel_tool_calls` is false (Anthropic `disable_parallel_tool_use`); a named tool choice
//!   (or `required`/`any` whatever the conversation ends with) calls as demanded. Arguments are
//!   [`schema::instance`]s of each tool's parameter schema. `tool_choice: none` never calls.
//! - a conversation ending in tool results (Responses: `function_call_output` items) is answered
//!   with text that echoes them.
//! - `response_format` `json_schema` (Responses `text.format`; Anthropic `output_config.format` /
//!   `output_format`) → the content is the schema's [`schema::instance`]; `json_object` →
//!   [`reply::json_object_text`].
//! - `reasoning_effort` (Responses `reasoning.effort`; Anthropic `thinking`) → reasoning text
//!   before the answer ([`reply::reasoning_text`]): `message.reasoning_content` and
//!   `delta.reasoning_content`, with `usage.completion_tokens_details.reasoning_tokens`; a
//!   Responses `reasoning` item whose `summary_text` it is (whatever `reasoning.summary` asks),
//!   with `usage.output_tokens_details.reasoning_tokens`; Anthropic `thinking` blocks and
//!   `thinking_delta` events.
//! - image parts (`http(s)` URLs and base64 `data:` URIs) are checked and accepted;
//!   [`RecordedRequest::images`] lists them.
//! - conversations are checked as the providers check them: every `tool` result answers a call of
//!   the assistant turn before it and every call is answered (Responses: every
//!   `function_call_output` answers an earlier `function_call`, and every call is answered); tool
//!   names and schemas, tool choices and response formats are validated (400 naming the offending
//!   parameter otherwise).
//! - parameters neither API names are accepted and recorded ([`RecordedRequest::unknown_parameters`]).
//! - [`Behavior::prompt_cache`] reports cached prompt tokens; [`Behavior::context_window`] answers
//!   a larger prompt 400 `context_length_exceeded`.
//! - a reply cut at the request's budget (`max_tokens`, `max_completion_tokens`, Anthropic
//!   `max_tokens`, Responses `max_output_tokens`) ends with finish reason `length` (Anthropic
//!   `max_tokens`, Responses `status: incomplete`).
//!
//! **Idempotency.** Requests carrying an `Idempotency-Key` header are counted per key. A reply
//! fully produced for a key is a *completion* ([`MockProvider::completions_for_idempotency_key`]);
//! with [`Behavior::honour_idempotency_keys`], a later request with a completed key is answered as a
//! replay (same content, `idempotent-replayed: true`) and is not a new completion, the way an
//! idempotent API treats a client's retry.
//!
//! Text replies are deterministic (see [`reply`]): `"echo:"` followed by the first words of the
//! last user message (or of the tool results the conversation ends with), one completion token per
//! piece, and prompt tokens are counted from the input words, the same conversation costing the
//! same in every format (a system prompt — Anthropic `system`, Responses `instructions` — is one
//! more message); [`reply::reply_text`] and [`reply::prompt_tokens`] compute what to expect.

mod agent;
mod anthropic;
mod checks;
mod control;
mod openai;
pub mod reply;
mod responses;
pub mod schema;
mod server;
mod state;
mod wire;

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::state::Shared;
pub use crate::state::{
    Behavior, MockToolCall, Outcome, PromptCache, RECENT_CAPACITY, RecordedRequest, Stats, StreamFault,
};

/// Largest request body accepted.
const BODY_LIMIT: usize = 32 * 1024 * 1024;

/// How a mock is served, beside its [`Behavior`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeOptions {
    /// Serve `GET` and `PUT /_mock/behavior`, through which another process changes the fault
    /// knobs at runtime (the binary's `--control`). Off, the path is an unknown route (404).
    pub control: bool,
}

fn router(shared: Arc<Shared>, options: ServeOptions) -> Router {
    let mut router = Router::new();
    if options.control {
        router = router.route("/_mock/behavior", get(control::get_behavior).put(control::put_behavior));
    }
    router
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/embeddings", post(server::embeddings))
        .route("/v1/models", get(server::models))
        .route("/v1/models/{id}", get(server::model))
        .route("/health", get(server::health))
        .route("/_mock/requests", get(server::recorded))
        .fallback(server::not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(shared)
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

    /// Starts a mock with `behavior` and `options` on `127.0.0.1:0`.
    pub async fn start_with_options(behavior: Behavior, options: ServeOptions) -> io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        Self::serve_with_options(listener, behavior, options)
    }

    /// Serves on an already bound listener. Must be called inside a Tokio runtime; requests are
    /// handled on that runtime's worker threads.
    pub fn serve(listener: TcpListener, behavior: Behavior) -> io::Result<Self> {
        Self::serve_with_options(listener, behavior, ServeOptions::default())
    }

    /// [`MockProvider::serve`] with [`ServeOptions`].
    pub fn serve_with_options(listener: TcpListener, behavior: Behavior, options: ServeOptions) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared::new(behavior, shutdown_rx.clone()));
        let app = router(shared.clone(), options);
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
    /// below it, Chat Completions and Responses, and the Anthropic `POST /v1/messages`).
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
            responses_requests: s.responses_requests.load(Ordering::Relaxed),
            embedding_requests: s.embedding_requests.load(Ordering::Relaxed),
            injected_failures: s.injected_failures.load(Ordering::Relaxed),
            unauthorized: s.unauthorized.load(Ordering::Relaxed),
            succeeded: s.succeeded.load(Ordering::Relaxed),
            completions: s.completions.load(Ordering::Relaxed),
            idempotent_replays: s.idempotent_replays.load(Ordering::Relaxed),
            abandoned: s.abandoned.load(Ordering::Relaxed),
        }
    }

    /// API requests received so far (chat completions, messages, responses and embeddings).
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
            &s.responses_requests,
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
