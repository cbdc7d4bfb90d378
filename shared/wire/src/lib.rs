//! meshgate's LLM wire formats, one module per format, each translating to and from the
//! canonical request of the contracts (`meshgate.common.v1.ChatMessage`, `ChatOptions`, ...):
//!
//! - [`openai::ingress`]: what clients send the edge (OpenAI Chat Completions) and the JSON or
//!   SSE answer they get back;
//! - [`openai::responses`]: OpenAI's Responses API, as clients send it (with the stored
//!   conversations of `previous_response_id`) and as a provider that speaks it takes it;
//! - [`openai::completions`]: the legacy text completions, served by chat models;
//! - [`openai::embeddings`]: embeddings requests, provider bodies and answers;
//! - [`openai::provider`]: what meshgate sends an OpenAI-compatible provider, and its answer;
//! - [`anthropic::ingress`]: what clients of Anthropic's Messages API send the edge, and the
//!   answer, events and errors they get back;
//! - [`anthropic::provider`]: what meshgate sends Anthropic, and its answer;
//! - [`sse`]: the event-stream decoder and framing both directions use;
//! - [`canonical`]: the request every format parses into, its checks, and the [`Answer`] a
//!   stream folds into.
//!
//! Modules depend only downward (error → text → sse → canonical → provider → the formats; a
//! client format may use its provider sibling's constants and error classification). The crate
//! does no I/O: transport, retries and the mapping of errors to codes are the callers'.

pub mod anthropic;
pub mod canonical;
pub mod error;
mod json_body;
mod json_path;
pub mod openai;
mod origin;
pub mod provider;
pub mod sse;
mod text;

pub use canonical::{Answer, ChatRequest};
pub use error::{ProviderError, ProviderErrorKind, WireError};
pub use provider::{ProviderBody, ProviderModel, UnknownParams};
pub use text::MAX_IDENTIFIER_BYTES;
