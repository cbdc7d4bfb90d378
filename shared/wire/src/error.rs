//! What goes wrong in translation: a request that is invalid or that a provider cannot take
//! ([`WireError`], naming the field), and an error a provider answered with ([`ProviderError`],
//! classified so callers can map it to their own codes and the router can fall back).

use std::fmt;

/// Error messages and previews of garbage are cut to this many characters.
pub const MAX_MESSAGE_CHARS: usize = 512;

/// A translation failure. `field` is a path into the request as the client wrote it
/// (`messages[2].content[1].image_url.url`), empty when the whole body is at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    /// The client's request is malformed or out of range: a 400 naming the field.
    #[error("{}", describe(field, problem))]
    Invalid { field: String, problem: String },
    /// The request is valid but this provider cannot take it as asked (a parameter refused by
    /// the provider's `unknown_params = refuse`, audio to a provider without audio input, ...):
    /// a 400 naming the field, or a reason to try another target.
    #[error("{}", describe(field, problem))]
    Unsupported { field: String, problem: String },
    /// The provider's answer does not follow its own format.
    #[error("invalid answer from the provider: {0}")]
    Protocol(String),
    /// The provider reported an error inside its answer (an `error` event or object).
    #[error(transparent)]
    Provider(ProviderError),
}

fn describe(field: &str, problem: &str) -> String {
    if field.is_empty() { problem.to_owned() } else { format!("`{field}` {problem}") }
}

impl WireError {
    pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Invalid { field: field.into(), problem: problem.into() }
    }

    pub(crate) fn unsupported(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Unsupported { field: field.into(), problem: problem.into() }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Self::Protocol(message.into())
    }

    /// The offending field's path, for `Invalid` and `Unsupported`.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. } | Self::Unsupported { field, .. } => Some(field),
            Self::Protocol(_) | Self::Provider(_) => None,
        }
    }
}

/// What kind of failure a provider reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderErrorKind {
    /// The prompt (with the requested completion) does not fit the model's context window: a
    /// larger-context target may succeed.
    ContextLengthExceeded,
    /// Too many requests or tokens for now (429).
    RateLimited,
    /// The provider refused the request as invalid (400, 422).
    InvalidRequest,
    /// The provider refused meshgate's credentials (401, 403): not the caller's fault.
    Auth,
    /// The provider does not know the model (404).
    ModelNotFound,
    /// The request body is too large for the provider (413).
    PayloadTooLarge,
    /// The provider timed the request out (408).
    Timeout,
    /// The provider is overloaded (Anthropic's 529, `overloaded_error`).
    Overloaded,
    /// The provider failed (5xx and anything else).
    Server,
}

impl ProviderErrorKind {
    /// Whether the same call may succeed later: rate limits, overload and server errors.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::RateLimited | Self::Overloaded | Self::Server)
    }
}

/// An error answer of a provider, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError {
    pub kind: ProviderErrorKind,
    /// The HTTP status (0 for an error reported inside a stream).
    pub status: u16,
    /// The provider's message, at most [`MAX_MESSAGE_CHARS`] characters.
    pub message: String,
    /// The provider's error code (OpenAI `error.code`, Anthropic `error.type`); for a context
    /// overflow always `context_length_exceeded`, whatever the provider called it, so the edge
    /// answers as OpenAI does.
    pub code: String,
    /// The request parameter the provider blamed (OpenAI `error.param`; `messages` for a
    /// context overflow).
    pub param: String,
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.status, self.code.is_empty()) {
            (0, true) => write!(f, "{}", self.message),
            (0, false) => write!(f, "{} ({})", self.message, self.code),
            (status, true) => write!(f, "{} (HTTP {status})", self.message),
            (status, false) => write!(f, "{} (HTTP {status}, {})", self.message, self.code),
        }
    }
}

impl std::error::Error for ProviderError {}

/// The code a context overflow carries, as OpenAI names it.
pub const CONTEXT_LENGTH_EXCEEDED: &str = "context_length_exceeded";

/// The kind of an HTTP status, before the body is looked at.
pub(crate) fn kind_of_status(status: u16) -> ProviderErrorKind {
    match status {
        400 | 422 => ProviderErrorKind::InvalidRequest,
        401 | 403 => ProviderErrorKind::Auth,
        404 => ProviderErrorKind::ModelNotFound,
        408 => ProviderErrorKind::Timeout,
        413 => ProviderErrorKind::PayloadTooLarge,
        429 => ProviderErrorKind::RateLimited,
        529 => ProviderErrorKind::Overloaded,
        _ => ProviderErrorKind::Server,
    }
}

/// `text` cut to [`MAX_MESSAGE_CHARS`] characters (an ellipsis marks the cut).
pub(crate) fn truncate(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The message of an error body in a shape other than the provider's own: `{"error": "..."}`,
/// `{"message": ...}`, `{"detail": ...}` (FastAPI servers), or the text itself.
pub(crate) fn loose_message(body: &[u8]) -> String {
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        let found = [&json["error"]["message"], &json["error"], &json["message"], &json["detail"]]
            .into_iter()
            .find_map(|v| v.as_str());
        if let Some(message) = found {
            return truncate(message);
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() { "no message".to_owned() } else { truncate(text) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_their_field() {
        let err = WireError::invalid("messages[2].content[1].image_url.url", "must be an http(s) or data: URL");
        assert_eq!(err.to_string(), "`messages[2].content[1].image_url.url` must be an http(s) or data: URL");
        assert_eq!(err.field(), Some("messages[2].content[1].image_url.url"));
        assert_eq!(WireError::invalid("", "malformed JSON").to_string(), "malformed JSON");
        assert_eq!(WireError::protocol("x").field(), None);
    }

    #[test]
    fn loose_messages_and_truncation() {
        assert_eq!(loose_message(br#"{"error":"plain"}"#), "plain");
        assert_eq!(loose_message(br#"{"detail":"fastapi style"}"#), "fastapi style");
        assert_eq!(loose_message(b"  upstream exploded \n"), "upstream exploded");
        assert_eq!(loose_message(b""), "no message");
        assert_eq!(loose_message("x".repeat(2000).as_bytes()).chars().count(), MAX_MESSAGE_CHARS + 1);
    }
}
