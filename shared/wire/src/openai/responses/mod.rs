//! OpenAI's Responses API (`POST /v1/responses`), both as the edge speaks it to clients and as
//! meshgate speaks it to providers that take it natively:
//!
//! - [`parse_responses`]: the request → the canonical [`crate::ChatRequest`] and what only this
//!   API has ([`ResponsesRequest`]): `instructions`, `store`, `previous_response_id`, `include`,
//!   reasoning summaries, truncation; every error naming the client's field;
//! - [`ResponseRecord`]: what the gateway keeps of a stored response, what
//!   `GET /v1/responses/{id}` answers from it, and [`ResponsesRequest::continue_from`] to
//!   continue its conversation;
//! - [`response_json`] and [`ResponsesEncoder`]: the `response` object and its event stream;
//! - [`provider`]: the body for a provider that speaks the Responses API, and its events back.
//!
//! Built-in tools (web and file search, computer use, code interpreter, MCP, ...) are refused:
//! meshgate runs none of them, and a provider other than OpenAI could not either.

pub mod provider;
mod record;
mod reply;
mod request;
mod stored;

pub use record::{RECORD_VERSION, ResponseRecord, StoredAnswer};
pub use reply::{
    ResponseError, ResponseMeta, ResponsesEncoder, StoredFormat, deleted_json, failed_response_json, response_json,
};
pub use request::{ResponsesRequest, parse_responses};
pub use stored::{StoredMessage, StoredPart, StoredTool, StoredToolCall, StoredUsage};

#[cfg(test)]
mod tests;
