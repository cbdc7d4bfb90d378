//! One upstream provider: where it is, which wire format it speaks, which models it serves and
//! how calls to it behave.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::CatalogError;
use crate::names::RESERVED_NAME;

/// Priority of a provider that sets none; lower priorities are tried first.
pub const DEFAULT_PRIORITY: i32 = 100;

/// The wire format a provider speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// The OpenAI chat completions API (`POST <base>/chat/completions`), also spoken by vLLM,
    /// Ollama, Together, Groq and most gateways.
    #[default]
    Openai,
    /// The Anthropic Messages API (`POST <base>/messages`, `x-api-key`, `anthropic-version`).
    Anthropic,
    /// OpenAI's Responses API (`POST <base>/responses`, Bearer key): what OpenAI's newest models
    /// take natively (reasoning summaries, `max_output_tokens`). Every request routed to such a
    /// provider is sent in this format, whichever API the client spoke.
    #[serde(rename = "openai-responses")]
    OpenaiResponses,
}

impl ProviderKind {
    pub(crate) fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "openai" => Some(Self::Openai),
            "anthropic" => Some(Self::Anthropic),
            "openai-responses" => Some(Self::OpenaiResponses),
            _ => None,
        }
    }
}

/// What the sync service does with request parameters meshgate does not model (the canonical
/// request's `extra_json`), like LiteLLM's `drop_params`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownParams {
    /// Merged into the provider's body unchanged (vLLM, Ollama and provider-specific knobs).
    Forward,
    /// Left out, and named in the request's trace.
    Drop,
    /// The request is refused with a 400 naming the parameter.
    Refuse,
}

impl UnknownParams {
    pub(crate) fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "forward" => Some(Self::Forward),
            "drop" => Some(Self::Drop),
            "refuse" => Some(Self::Refuse),
            _ => None,
        }
    }
}

/// One upstream provider.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderSpec {
    /// Lower-case name (`[a-z0-9_-]`, starting with a letter or digit).
    pub name: String,
    /// The wire format (OpenAI unless said otherwise).
    pub kind: ProviderKind,
    /// Base URL including the version path (`http://host:port/v1`), without a trailing slash
    /// once validated. It may carry query parameters every call sends, as Azure OpenAI wants
    /// (`https://res.openai.azure.com/openai/deployments/gpt-4o?api-version=2024-10-21`).
    pub base_url: String,
    /// The key: `Authorization: Bearer <key>` (OpenAI), `x-api-key` (Anthropic), or the header
    /// [`ProviderSpec::api_key_header`] names.
    pub api_key: Option<String>,
    /// The header carrying the key as it is, instead of the kind's default (`api-key` for Azure).
    pub api_key_header: Option<String>,
    /// Model ids the provider serves for chat.
    pub models: Vec<String>,
    /// Embedding model ids the provider serves at `<base_url>/embeddings` (OpenAI-compatible
    /// providers: the Anthropic API has no embeddings).
    pub embedding_models: Vec<String>,
    /// Fallback rank among providers of the same model; lower first. `None` = [`DEFAULT_PRIORITY`].
    pub priority: Option<i32>,
    /// Total timeout of one call in milliseconds (`None` = the service default).
    pub timeout_ms: Option<u64>,
    /// Timeout until the first byte of the answer in milliseconds (`None` = the service default).
    pub first_byte_timeout_ms: Option<u64>,
    /// TCP + TLS connect timeout in milliseconds (`None` = the service default).
    pub connect_timeout_ms: Option<u64>,
    /// Retries of a call that failed before anything reached the caller (`None` = the service
    /// default).
    pub max_retries: Option<u32>,
    /// Request parameters meshgate does not model: `None` = [`ProviderSpec::on_unknown_params`]'s
    /// default for the kind.
    pub unknown_params: Option<UnknownParams>,
    /// The provider answers a request repeating an earlier one's `Idempotency-Key` with the
    /// earlier answer, serving it once. Queued jobs send their id as the key; an attempt a
    /// stopped worker left unrecorded is charged at the job's estimate unless every provider
    /// that may serve the job says this (default false: most inference APIs serve it again).
    pub honours_idempotency_keys: bool,
}

impl fmt::Debug for ProviderSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderSpec")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("api_key_header", &self.api_key_header)
            .field("models", &self.models)
            .field("embedding_models", &self.embedding_models)
            .field("priority", &self.priority)
            .field("timeout_ms", &self.timeout_ms)
            .field("first_byte_timeout_ms", &self.first_byte_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("max_retries", &self.max_retries)
            .field("unknown_params", &self.unknown_params)
            .field("honours_idempotency_keys", &self.honours_idempotency_keys)
            .finish()
    }
}

impl ProviderSpec {
    /// The effective fallback rank.
    pub fn rank(&self) -> (i32, &str) {
        (self.priority.unwrap_or(DEFAULT_PRIORITY), &self.name)
    }

    /// Whether the provider lists `model` for chat.
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    /// Whether the provider lists `model` for embeddings.
    pub fn serves_embeddings(&self, model: &str) -> bool {
        self.embedding_models.iter().any(|m| m == model)
    }

    /// What to do with parameters meshgate does not model: as configured, else `forward` for
    /// OpenAI-compatible providers (the servers that speak it take their own extensions that
    /// way) and `drop` for Anthropic (the Messages API refuses fields it does not know, and
    /// OpenAI's extras mean nothing to it).
    pub fn on_unknown_params(&self) -> UnknownParams {
        self.unknown_params.unwrap_or(match self.kind {
            ProviderKind::Openai | ProviderKind::OpenaiResponses => UnknownParams::Forward,
            ProviderKind::Anthropic => UnknownParams::Drop,
        })
    }

    /// The host of the base URL, lower case (`None` when it is no URL).
    pub fn host(&self) -> Option<String> {
        url::Url::parse(&self.base_url).ok()?.host_str().map(str::to_ascii_lowercase)
    }

    /// `<base_url>/<path>`, with the base URL's query parameters after the path.
    pub fn endpoint(&self, path: &str) -> String {
        match self.base_url.split_once('?') {
            Some((base, query)) => format!("{}/{path}?{query}", base.trim_end_matches('/')),
            None => format!("{}/{path}", self.base_url),
        }
    }

    /// The chat completions endpoint: `<base_url>/chat/completions`.
    pub fn chat_completions_url(&self) -> String {
        self.endpoint("chat/completions")
    }

    /// The endpoint a chat is sent to in this provider's wire format.
    pub fn chat_url(&self) -> String {
        match self.kind {
            ProviderKind::Openai => self.chat_completions_url(),
            ProviderKind::Anthropic => self.endpoint("messages"),
            ProviderKind::OpenaiResponses => self.endpoint("responses"),
        }
    }

    /// The embeddings endpoint: `<base_url>/embeddings`.
    pub fn embeddings_url(&self) -> String {
        self.endpoint("embeddings")
    }

    /// The header and value that carry the key, when there is one.
    pub fn key_header(&self) -> Option<(String, String)> {
        let key = self.api_key.as_ref()?;
        Some(match (&self.api_key_header, self.kind) {
            (Some(header), _) => (header.clone(), key.clone()),
            (None, ProviderKind::Openai | ProviderKind::OpenaiResponses) => {
                ("authorization".to_owned(), format!("Bearer {key}"))
            }
            (None, ProviderKind::Anthropic) => ("x-api-key".to_owned(), key.clone()),
        })
    }

    /// Checks and normalises the entry: lower-case name, base URL without trailing slash, models
    /// trimmed and deduplicated, an empty key treated as none.
    pub fn validate(mut self) -> Result<Self, CatalogError> {
        self.name = validate_name(&self.name)?;
        let name = self.name.clone();
        let raw_url = self.base_url.trim();
        if raw_url.is_empty() {
            return Err(CatalogError::MissingBaseUrl { provider: name });
        }
        let invalid = |reason: &str| CatalogError::InvalidBaseUrl {
            provider: name.clone(),
            url: raw_url.to_owned(),
            reason: reason.to_owned(),
        };
        let url = url::Url::parse(raw_url).map_err(|err| invalid(&err.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("a host is required"));
        }
        if url.fragment().is_some() {
            return Err(invalid("a fragment is not allowed"));
        }
        if url.query().is_some_and(str::is_empty) {
            return Err(invalid("an empty query is not allowed"));
        }
        self.base_url = match url.as_str().split_once('?') {
            Some((base, query)) => format!("{}?{query}", base.trim_end_matches('/')),
            None => url.as_str().trim_end_matches('/').to_owned(),
        };
        if let Some(header) = self.api_key_header.take() {
            let header = header.trim().to_ascii_lowercase();
            if http::HeaderName::from_bytes(header.as_bytes()).is_err() || header.is_empty() {
                return Err(CatalogError::InvalidValue {
                    provider: name.clone(),
                    field: "api_key_header",
                    value: header,
                    reason: "not an HTTP header name".into(),
                });
            }
            self.api_key_header = Some(header);
        }
        self.api_key = self.api_key.filter(|key| !key.trim().is_empty()).map(|key| key.trim().to_owned());
        self.models = model_ids(&self.models);
        self.embedding_models = model_ids(&self.embedding_models);
        if let Some(both) = self.embedding_models.iter().find(|m| self.models.contains(m)) {
            return Err(CatalogError::InvalidValue {
                provider: name,
                field: "embedding_models",
                value: both.clone(),
                reason: "a model is listed for chat (models) or for embeddings, not both".into(),
            });
        }
        if self.kind == ProviderKind::Anthropic && !self.embedding_models.is_empty() {
            return Err(CatalogError::InvalidValue {
                provider: name,
                field: "embedding_models",
                value: self.embedding_models.join(","),
                reason: "the Anthropic Messages API has no embeddings: list them under an OpenAI-compatible provider"
                    .into(),
            });
        }
        for (field, value) in [
            ("timeout_ms", self.timeout_ms),
            ("first_byte_timeout_ms", self.first_byte_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
        ] {
            if value == Some(0) {
                return Err(CatalogError::InvalidValue {
                    provider: name.clone(),
                    field,
                    value: "0".into(),
                    reason: "must be at least 1".into(),
                });
            }
        }
        Ok(self)
    }
}

/// `ids` trimmed, without empty entries and repeats, in their order.
fn model_ids(ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(ids.len());
    for id in ids.iter().map(|m| m.trim()).filter(|m| !m.is_empty()) {
        if !out.iter().any(|m| m == id) {
            out.push(id.to_owned());
        }
    }
    out
}

/// The lower-case provider name of `raw`, or why it cannot be one.
pub(crate) fn validate_name(raw: &str) -> Result<String, CatalogError> {
    let name = raw.trim().to_ascii_lowercase();
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name != RESERVED_NAME;
    if valid { Ok(name) } else { Err(CatalogError::InvalidName { name: raw.to_owned() }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_entries_reject_unknown_keys_and_take_kind_and_unknown_params() {
        let err = serde_json::from_str::<ProviderSpec>(r#"{"name": "a", "base_url": "http://a/v1", "modles": []}"#)
            .unwrap_err();
        assert!(err.to_string().contains("modles"), "{err}");
        let spec: ProviderSpec = serde_json::from_str(
            r#"{"name": "c", "base_url": "http://c/v1", "kind": "anthropic", "unknown_params": "refuse"}"#,
        )
        .unwrap();
        assert_eq!((spec.kind, spec.unknown_params), (ProviderKind::Anthropic, Some(UnknownParams::Refuse)));
        let err = serde_json::from_str::<ProviderSpec>(r#"{"name": "c", "unknown_params": "ignore"}"#).unwrap_err();
        assert!(err.to_string().contains("ignore"), "{err}");
    }

    #[test]
    fn unknown_params_default_by_kind() {
        let openai = ProviderSpec::default();
        let anthropic = ProviderSpec { kind: ProviderKind::Anthropic, ..ProviderSpec::default() };
        assert_eq!(openai.on_unknown_params(), UnknownParams::Forward);
        assert_eq!(anthropic.on_unknown_params(), UnknownParams::Drop);
        let refusing = ProviderSpec { unknown_params: Some(UnknownParams::Refuse), ..openai };
        assert_eq!(refusing.on_unknown_params(), UnknownParams::Refuse);
    }

    #[test]
    fn a_responses_provider_takes_the_responses_endpoint_and_a_bearer_key() {
        let spec: ProviderSpec = serde_json::from_str(
            r#"{"name": "oai", "base_url": "https://api.openai.com/v1", "kind": "openai-responses", "api_key": "sk"}"#,
        )
        .unwrap();
        assert_eq!(spec.kind, ProviderKind::OpenaiResponses);
        assert_eq!(ProviderKind::parse(" OpenAI-Responses "), Some(ProviderKind::OpenaiResponses));
        assert_eq!(spec.chat_url(), "https://api.openai.com/v1/responses");
        assert_eq!(spec.key_header(), Some(("authorization".into(), "Bearer sk".into())));
        assert_eq!(spec.on_unknown_params(), UnknownParams::Forward);
        let azure =
            ProviderSpec { base_url: "https://r.openai.azure.com/openai/v1?api-version=preview".into(), ..spec };
        assert_eq!(azure.chat_url(), "https://r.openai.azure.com/openai/v1/responses?api-version=preview");
        assert_eq!(serde_json::to_value(ProviderKind::OpenaiResponses).unwrap(), "openai-responses");
    }

    #[test]
    fn host_of_the_base_url() {
        for (url, host) in [
            ("https://API.openai.com/v1", Some("api.openai.com")),
            ("http://127.0.0.1:18000/v1", Some("127.0.0.1")),
            ("http://user:pw@h:1/v1", Some("h")),
            ("http://[::1]:8000/v1", Some("[::1]")),
            ("not a url", None),
        ] {
            let spec = ProviderSpec { base_url: url.into(), ..ProviderSpec::default() };
            assert_eq!(spec.host().as_deref(), host, "{url}");
        }
    }

    #[test]
    fn validation_normalises_the_entry() {
        let spec = ProviderSpec {
            name: " Alpha ".into(),
            base_url: "https://api.example.com/v1/".into(),
            api_key: Some("  ".into()),
            models: vec![" m ".into(), "".into(), "m".into(), "n".into()],
            embedding_models: vec!["e ".into(), "e".into()],
            ..ProviderSpec::default()
        }
        .validate()
        .unwrap();
        assert_eq!(spec.name, "alpha");
        assert_eq!(spec.base_url, "https://api.example.com/v1");
        assert_eq!(spec.api_key, None);
        assert_eq!(spec.models, ["m", "n"]);
        assert_eq!(spec.embedding_models, ["e"]);
        assert_eq!(spec.embeddings_url(), "https://api.example.com/v1/embeddings");
    }

    #[test]
    fn anthropic_providers_serve_no_embeddings() {
        let spec = ProviderSpec {
            name: "claude".into(),
            kind: ProviderKind::Anthropic,
            base_url: "https://api.anthropic.com/v1".into(),
            embedding_models: vec!["text-embedding-3-small".into()],
            ..ProviderSpec::default()
        };
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("embedding_models") && err.contains("no embeddings"), "{err}");
    }

    #[test]
    fn debug_redacts_the_key() {
        let spec = ProviderSpec { name: "a".into(), api_key: Some("sk-very-secret".into()), ..ProviderSpec::default() };
        let shown = format!("{spec:?}");
        assert!(!shown.contains("sk-very-secret") && shown.contains("redacted"), "{shown}");
    }
}
