//! Upstream providers: which endpoints exist, which wire format each speaks (the OpenAI chat
//! completions API or the Anthropic Messages API) and which models each serves.
//!
//! Shared by the sync service (which calls them), the router (which plans over them) and the
//! gateway (which lists their models), so all three agree. Providers come from a config file list,
//! from the environment, or both:
//!
//! | variable | meaning |
//! |---|---|
//! | `MESHGATE_PROVIDER_<NAME>_BASE_URL` | base URL **including the version path**, SDK style: `https://api.openai.com/v1`, `https://api.anthropic.com/v1`, `http://127.0.0.1:18000/v1`; meshgate appends `/chat/completions` (OpenAI) or `/messages` (Anthropic) |
//! | `MESHGATE_PROVIDER_<NAME>_KIND` | optional wire format: `openai` (default) or `anthropic` |
//! | `MESHGATE_PROVIDER_<NAME>_API_KEY` | optional key: `Authorization: Bearer` (OpenAI) or `x-api-key` (Anthropic) |
//! | `MESHGATE_PROVIDER_<NAME>_MODELS` | comma-separated model ids the provider serves |
//! | `MESHGATE_PROVIDER_<NAME>_PRIORITY` | optional integer, lower is tried first (default [`DEFAULT_PRIORITY`]) |
//! | `MESHGATE_PROVIDER_<NAME>_TIMEOUT_MS` | optional total timeout of one call |
//! | `MESHGATE_PROVIDER_<NAME>_FIRST_BYTE_TIMEOUT_MS` | optional timeout until the first byte of the answer |
//! | `MESHGATE_PROVIDER_<NAME>_CONNECT_TIMEOUT_MS` | optional TCP + TLS connect timeout |
//! | `MESHGATE_PROVIDER_<NAME>_MAX_RETRIES` | optional retries of a call that failed before its first byte reached the caller (429, 5xx, connection errors) |
//!
//! `<NAME>` is the provider's name in upper case (`[A-Z0-9_]`); meshgate uses it in lower case.
//! Suffixes are matched longest first, so `X_FIRST_BYTE_TIMEOUT_MS` belongs to provider `x`.
//! Variables for a name that the config file also declares override that entry field by field (the
//! usual way to inject an API key from a secret). The name `local` is reserved for local models.
//!
//! **Fallback order.** Several providers may serve the same model id; they are then fallbacks for
//! each other, ordered by `(priority, name)`: by name unless a priority is configured.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Prefix of the provider environment variables.
pub const ENV_PREFIX: &str = "MESHGATE_PROVIDER_";

/// Priority of a provider that sets none; lower priorities are tried first.
pub const DEFAULT_PRIORITY: i32 = 100;

/// Provider name reserved for local (ONNX) targets.
pub const RESERVED_NAME: &str = "local";

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
}

impl ProviderKind {
    fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "openai" => Some(Self::Openai),
            "anthropic" => Some(Self::Anthropic),
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
    /// once validated.
    pub base_url: String,
    /// Bearer key sent as `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Model ids the provider serves.
    pub models: Vec<String>,
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
}

impl fmt::Debug for ProviderSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderSpec")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("models", &self.models)
            .field("priority", &self.priority)
            .field("timeout_ms", &self.timeout_ms)
            .field("first_byte_timeout_ms", &self.first_byte_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("max_retries", &self.max_retries)
            .finish()
    }
}

impl ProviderSpec {
    /// The effective fallback rank.
    pub fn rank(&self) -> (i32, &str) {
        (self.priority.unwrap_or(DEFAULT_PRIORITY), &self.name)
    }

    /// Whether the provider lists `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    /// The chat completions endpoint: `<base_url>/chat/completions`.
    pub fn chat_completions_url(&self) -> String {
        format!("{}/chat/completions", self.base_url)
    }

    /// The endpoint a chat is sent to in this provider's wire format.
    pub fn chat_url(&self) -> String {
        match self.kind {
            ProviderKind::Openai => self.chat_completions_url(),
            ProviderKind::Anthropic => format!("{}/messages", self.base_url),
        }
    }

    /// Checks and normalises the entry: lower-case name, base URL without trailing slash, models
    /// trimmed and deduplicated, an empty key treated as none.
    pub fn validate(mut self) -> Result<Self, ProviderConfigError> {
        self.name = validate_name(&self.name)?;
        let name = self.name.clone();
        let raw_url = self.base_url.trim();
        if raw_url.is_empty() {
            return Err(ProviderConfigError::MissingBaseUrl { provider: name });
        }
        let invalid = |reason: &str| ProviderConfigError::InvalidBaseUrl {
            provider: name.clone(),
            url: raw_url.to_owned(),
            reason: reason.to_owned(),
        };
        let url = reqwest::Url::parse(raw_url).map_err(|err| invalid(&err.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("a host is required"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("a query or fragment is not allowed"));
        }
        self.base_url = url.as_str().trim_end_matches('/').to_owned();
        self.api_key = self.api_key.filter(|key| !key.trim().is_empty()).map(|key| key.trim().to_owned());
        let mut models: Vec<String> = Vec::with_capacity(self.models.len());
        for model in self.models.iter().map(|m| m.trim()).filter(|m| !m.is_empty()) {
            if !models.iter().any(|m| m == model) {
                models.push(model.to_owned());
            }
        }
        self.models = models;
        for (field, value) in [
            ("timeout_ms", self.timeout_ms),
            ("first_byte_timeout_ms", self.first_byte_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
        ] {
            if value == Some(0) {
                return Err(ProviderConfigError::InvalidValue {
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

/// A provider definition that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderConfigError {
    #[error("provider '{provider}': base URL is required (MESHGATE_PROVIDER_{upper}_BASE_URL or base_url in the config file)", upper = provider.to_ascii_uppercase())]
    MissingBaseUrl { provider: String },
    #[error("provider '{provider}': invalid base URL {url:?}: {reason}")]
    InvalidBaseUrl { provider: String, url: String, reason: String },
    #[error(
        "invalid provider name {name:?}: use letters, digits, '_' and '-', starting with a letter or digit; '{RESERVED_NAME}' is reserved"
    )]
    InvalidName { name: String },
    #[error("provider '{provider}': invalid {field} {value:?}: {reason}")]
    InvalidValue { provider: String, field: &'static str, value: String, reason: String },
    #[error(
        "unknown provider variable {variable}: expected {ENV_PREFIX}<NAME>_ followed by BASE_URL, KIND, API_KEY, MODELS, PRIORITY, TIMEOUT_MS, FIRST_BYTE_TIMEOUT_MS, CONNECT_TIMEOUT_MS or MAX_RETRIES"
    )]
    UnknownVariable { variable: String },
    #[error("provider '{name}' is defined twice in the config file")]
    Duplicate { name: String },
}

fn validate_name(raw: &str) -> Result<String, ProviderConfigError> {
    let name = raw.trim().to_ascii_lowercase();
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name != RESERVED_NAME;
    if valid { Ok(name) } else { Err(ProviderConfigError::InvalidName { name: raw.to_owned() }) }
}

/// Environment suffixes, longest first so that `_FIRST_BYTE_TIMEOUT_MS` and `_CONNECT_TIMEOUT_MS`
/// win over `_TIMEOUT_MS`.
const SUFFIXES: [(&str, Field); 9] = [
    ("_FIRST_BYTE_TIMEOUT_MS", Field::FirstByteTimeout),
    ("_CONNECT_TIMEOUT_MS", Field::ConnectTimeout),
    ("_MAX_RETRIES", Field::MaxRetries),
    ("_TIMEOUT_MS", Field::Timeout),
    ("_BASE_URL", Field::BaseUrl),
    ("_PRIORITY", Field::Priority),
    ("_API_KEY", Field::ApiKey),
    ("_MODELS", Field::Models),
    ("_KIND", Field::Kind),
];

#[derive(Clone, Copy)]
enum Field {
    BaseUrl,
    Kind,
    ApiKey,
    Models,
    Priority,
    Timeout,
    FirstByteTimeout,
    ConnectTimeout,
    MaxRetries,
}

/// Provider fields found in the environment for one name.
#[derive(Default)]
struct Partial {
    base_url: Option<String>,
    kind: Option<ProviderKind>,
    api_key: Option<String>,
    models: Option<Vec<String>>,
    priority: Option<i32>,
    timeout_ms: Option<u64>,
    first_byte_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    max_retries: Option<u32>,
}

impl Partial {
    fn apply(self, spec: &mut ProviderSpec) {
        if let Some(v) = self.base_url {
            spec.base_url = v;
        }
        if let Some(v) = self.api_key {
            spec.api_key = Some(v);
        }
        if let Some(v) = self.models {
            spec.models = v;
        }
        if let Some(v) = self.priority {
            spec.priority = Some(v);
        }
        if let Some(v) = self.timeout_ms {
            spec.timeout_ms = Some(v);
        }
        if let Some(v) = self.first_byte_timeout_ms {
            spec.first_byte_timeout_ms = Some(v);
        }
        if let Some(v) = self.connect_timeout_ms {
            spec.connect_timeout_ms = Some(v);
        }
        if let Some(v) = self.max_retries {
            spec.max_retries = Some(v);
        }
        if let Some(v) = self.kind {
            spec.kind = v;
        }
    }
}

fn parse_env<I, K, V>(vars: I) -> Result<BTreeMap<String, Partial>, ProviderConfigError>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut partials: BTreeMap<String, Partial> = BTreeMap::new();
    for (key, value) in vars {
        let (key, value) = (key.as_ref(), value.as_ref());
        let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let unknown = || ProviderConfigError::UnknownVariable { variable: key.to_owned() };
        let (upper, field) = SUFFIXES
            .iter()
            .find_map(|(suffix, field)| rest.strip_suffix(suffix).map(|name| (name, *field)))
            .ok_or_else(unknown)?;
        if upper.is_empty() {
            return Err(unknown());
        }
        let name = validate_name(upper)?;
        let number_error = |field: &'static str, reason: String| ProviderConfigError::InvalidValue {
            provider: name.clone(),
            field,
            value: value.to_owned(),
            reason,
        };
        let partial = partials.entry(name.clone()).or_default();
        match field {
            Field::BaseUrl => partial.base_url = Some(value.to_owned()),
            Field::Kind => {
                partial.kind = Some(
                    ProviderKind::parse(value)
                        .ok_or_else(|| number_error("kind", "expected openai or anthropic".into()))?,
                )
            }
            Field::ApiKey => partial.api_key = Some(value.to_owned()),
            Field::Models => partial.models = Some(value.split(',').map(str::to_owned).collect()),
            Field::Priority => {
                partial.priority = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|e: std::num::ParseIntError| number_error("priority", e.to_string()))?,
                )
            }
            Field::Timeout => {
                partial.timeout_ms = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|e: std::num::ParseIntError| number_error("timeout_ms", e.to_string()))?,
                )
            }
            Field::FirstByteTimeout => {
                partial.first_byte_timeout_ms = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|e: std::num::ParseIntError| number_error("first_byte_timeout_ms", e.to_string()))?,
                )
            }
            Field::ConnectTimeout => {
                partial.connect_timeout_ms = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|e: std::num::ParseIntError| number_error("connect_timeout_ms", e.to_string()))?,
                )
            }
            Field::MaxRetries => {
                partial.max_retries = Some(
                    value
                        .trim()
                        .parse()
                        .map_err(|e: std::num::ParseIntError| number_error("max_retries", e.to_string()))?,
                )
            }
        }
    }
    Ok(partials)
}

/// The process environment as `(key, value)` strings for [`resolve_providers`]; entries that are
/// not valid UTF-8 are converted lossily (a mangled base URL then fails validation clearly).
pub fn process_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
}

/// Providers defined by the environment alone, validated, in fallback order. Takes the
/// environment as an iterator (pass `std::env::vars()`) so it can be tested; variables without
/// the [`ENV_PREFIX`] are ignored, malformed ones are errors.
pub fn providers_from_env<I, K, V>(vars: I) -> Result<Vec<ProviderSpec>, ProviderConfigError>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    resolve_providers(&[], vars)
}

/// The config file's providers merged with the environment's, validated, in fallback order.
/// Environment fields override the file entry of the same name; names only in the environment
/// must set `_BASE_URL`.
pub fn resolve_providers<I, K, V>(file: &[ProviderSpec], vars: I) -> Result<Vec<ProviderSpec>, ProviderConfigError>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut merged: BTreeMap<String, ProviderSpec> = BTreeMap::new();
    for spec in file {
        let name = validate_name(&spec.name)?;
        if merged.insert(name.clone(), ProviderSpec { name: name.clone(), ..spec.clone() }).is_some() {
            return Err(ProviderConfigError::Duplicate { name });
        }
    }
    for (name, partial) in parse_env(vars)? {
        let spec = merged.entry(name.clone()).or_insert_with(|| ProviderSpec { name, ..ProviderSpec::default() });
        partial.apply(spec);
    }
    let mut specs = merged.into_values().map(ProviderSpec::validate).collect::<Result<Vec<_>, _>>()?;
    specs.sort_by(|a, b| a.rank().cmp(&b.rank()));
    Ok(specs)
}

/// Validated providers in fallback order, with lookups by name and by model.
#[derive(Clone, Debug, Default)]
pub struct ProviderCatalog {
    providers: Vec<ProviderSpec>,
}

impl ProviderCatalog {
    /// Builds a catalog from the config file's list and the environment (see [`resolve_providers`]).
    pub fn resolve<I, K, V>(file: &[ProviderSpec], vars: I) -> Result<Self, ProviderConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        Ok(Self { providers: resolve_providers(file, vars)? })
    }

    /// Builds a catalog from a list (no environment).
    pub fn new(providers: &[ProviderSpec]) -> Result<Self, ProviderConfigError> {
        Self::resolve(providers, std::iter::empty::<(String, String)>())
    }

    /// The provider called `name` (lower case).
    pub fn get(&self, name: &str) -> Option<&ProviderSpec> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// Every provider in fallback order.
    pub fn all(&self) -> &[ProviderSpec] {
        &self.providers
    }

    /// The providers serving `model`, in fallback order.
    pub fn serving<'a>(&'a self, model: &'a str) -> impl Iterator<Item = &'a ProviderSpec> + 'a {
        self.providers.iter().filter(move |p| p.serves(model))
    }

    /// Every model id some provider serves, sorted and deduplicated.
    pub fn models(&self) -> Vec<&str> {
        let mut models: Vec<&str> = self.providers.iter().flat_map(|p| p.models.iter().map(String::as_str)).collect();
        models.sort_unstable();
        models.dedup();
        models
    }

    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    pub fn len(&self) -> usize {
        self.providers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn env_alone_defines_providers_in_name_order() {
        let specs = providers_from_env(env(&[
            ("PATH", "/usr/bin"),
            ("MESHGATE_PROVIDER_ZETA_BASE_URL", "http://127.0.0.1:9/v1/"),
            ("MESHGATE_PROVIDER_ZETA_MODELS", "gpt-4o, gpt-4o-mini,,gpt-4o"),
            ("MESHGATE_PROVIDER_ALPHA_BASE_URL", "https://api.example.com/v1"),
            ("MESHGATE_PROVIDER_ALPHA_API_KEY", "sk-secret"),
            ("MESHGATE_PROVIDER_ALPHA_MODELS", "gpt-4o"),
            ("MESHGATE_SYNC__TIMEOUT_MS", "5"),
        ]))
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].name, "alpha");
        assert_eq!(specs[0].api_key.as_deref(), Some("sk-secret"));
        assert_eq!(specs[0].chat_completions_url(), "https://api.example.com/v1/chat/completions");
        assert_eq!(specs[1].name, "zeta");
        assert_eq!(specs[1].base_url, "http://127.0.0.1:9/v1");
        assert_eq!(specs[1].models, ["gpt-4o", "gpt-4o-mini"]);
        assert_eq!(specs[1].api_key, None);

        let catalog = ProviderCatalog { providers: specs };
        let names: Vec<&str> = catalog.serving("gpt-4o").map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["alpha", "zeta"]);
        let names: Vec<&str> = catalog.serving("gpt-4o-mini").map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["zeta"]);
        assert_eq!(catalog.serving("nope").count(), 0);
        assert_eq!(catalog.models(), ["gpt-4o", "gpt-4o-mini"]);
    }

    #[test]
    fn priority_overrides_name_order() {
        let specs = providers_from_env(env(&[
            ("MESHGATE_PROVIDER_A_BASE_URL", "http://a/v1"),
            ("MESHGATE_PROVIDER_A_MODELS", "m"),
            ("MESHGATE_PROVIDER_B_BASE_URL", "http://b/v1"),
            ("MESHGATE_PROVIDER_B_MODELS", "m"),
            ("MESHGATE_PROVIDER_B_PRIORITY", "1"),
            ("MESHGATE_PROVIDER_C_BASE_URL", "http://c/v1"),
            ("MESHGATE_PROVIDER_C_MODELS", "m"),
            ("MESHGATE_PROVIDER_C_PRIORITY", "500"),
        ]))
        .unwrap();
        let names: Vec<&str> = specs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["b", "a", "c"]);
    }

    #[test]
    fn kind_connect_timeout_and_retries_come_from_the_environment() {
        let specs = providers_from_env(env(&[
            ("MESHGATE_PROVIDER_CLAUDE_BASE_URL", "https://api.anthropic.com/v1"),
            ("MESHGATE_PROVIDER_CLAUDE_KIND", "Anthropic"),
            ("MESHGATE_PROVIDER_CLAUDE_CONNECT_TIMEOUT_MS", "1500"),
            ("MESHGATE_PROVIDER_CLAUDE_MAX_RETRIES", "4"),
            ("MESHGATE_PROVIDER_CLAUDE_TIMEOUT_MS", "9000"),
        ]))
        .unwrap();
        assert_eq!(specs[0].name, "claude");
        assert_eq!(specs[0].kind, ProviderKind::Anthropic);
        assert_eq!(specs[0].chat_url(), "https://api.anthropic.com/v1/messages");
        assert_eq!(
            (specs[0].connect_timeout_ms, specs[0].max_retries, specs[0].timeout_ms),
            (Some(1500), Some(4), Some(9000))
        );
        let err = providers_from_env(env(&[
            ("MESHGATE_PROVIDER_X_BASE_URL", "http://h/v1"),
            ("MESHGATE_PROVIDER_X_KIND", "gemini"),
        ]))
        .unwrap_err();
        assert!(matches!(err, ProviderConfigError::InvalidValue { field: "kind", .. }), "{err}");
        let spec: ProviderSpec =
            serde_json::from_str(r#"{"name": "c", "base_url": "http://c/v1", "kind": "anthropic"}"#).unwrap();
        assert_eq!(spec.kind, ProviderKind::Anthropic);
    }

    #[test]
    fn multi_word_names_and_timeouts() {
        let specs = providers_from_env(env(&[
            ("MESHGATE_PROVIDER_MY_CLOUD_BASE_URL", "http://h/v1"),
            ("MESHGATE_PROVIDER_MY_CLOUD_TIMEOUT_MS", "2500"),
            ("MESHGATE_PROVIDER_MY_CLOUD_FIRST_BYTE_TIMEOUT_MS", "700"),
        ]))
        .unwrap();
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].name, "my_cloud");
        assert_eq!(specs[0].timeout_ms, Some(2500));
        assert_eq!(specs[0].first_byte_timeout_ms, Some(700));
    }

    #[test]
    fn malformed_entries_are_rejected_clearly() {
        let err = providers_from_env(env(&[("MESHGATE_PROVIDER_X_MODELS", "m")])).unwrap_err();
        assert_eq!(err, ProviderConfigError::MissingBaseUrl { provider: "x".into() });
        assert!(err.to_string().contains("MESHGATE_PROVIDER_X_BASE_URL"), "{err}");

        for url in ["not a url", "ftp://h/v1", "http://h/v1?x=1", "http://", "/v1"] {
            let err = providers_from_env(env(&[("MESHGATE_PROVIDER_X_BASE_URL", url)])).unwrap_err();
            assert!(matches!(err, ProviderConfigError::InvalidBaseUrl { .. }), "{url}: {err}");
        }
        let err = providers_from_env(env(&[("MESHGATE_PROVIDER_X_BASE_URL", "  ")])).unwrap_err();
        assert!(matches!(err, ProviderConfigError::MissingBaseUrl { .. }));

        let err = providers_from_env(env(&[
            ("MESHGATE_PROVIDER_X_BASE_URL", "http://h/v1"),
            ("MESHGATE_PROVIDER_X_PRIORITY", "first"),
        ]))
        .unwrap_err();
        assert!(matches!(err, ProviderConfigError::InvalidValue { field: "priority", .. }), "{err}");

        let err = providers_from_env(env(&[
            ("MESHGATE_PROVIDER_X_BASE_URL", "http://h/v1"),
            ("MESHGATE_PROVIDER_X_TIMEOUT_MS", "0"),
        ]))
        .unwrap_err();
        assert!(matches!(err, ProviderConfigError::InvalidValue { field: "timeout_ms", .. }), "{err}");

        let err = providers_from_env(env(&[("MESHGATE_PROVIDER_X_BASEURL", "http://h/v1")])).unwrap_err();
        assert!(matches!(err, ProviderConfigError::UnknownVariable { .. }), "{err}");
        let err = providers_from_env(env(&[("MESHGATE_PROVIDER__BASE_URL", "http://h/v1")])).unwrap_err();
        assert!(matches!(err, ProviderConfigError::UnknownVariable { .. }), "{err}");
        let err = providers_from_env(env(&[("MESHGATE_PROVIDER_LOCAL_BASE_URL", "http://h/v1")])).unwrap_err();
        assert!(matches!(err, ProviderConfigError::InvalidName { .. }), "{err}");
        let err = providers_from_env(env(&[("MESHGATE_PROVIDER_A.B_BASE_URL", "http://h/v1")])).unwrap_err();
        assert!(matches!(err, ProviderConfigError::InvalidName { .. }), "{err}");
    }

    #[test]
    fn env_overrides_file_entries_field_by_field() {
        let file = [
            ProviderSpec {
                name: "OpenAI".into(),
                base_url: "https://api.openai.com/v1".into(),
                models: vec!["gpt-4o".into()],
                ..ProviderSpec::default()
            },
            ProviderSpec { name: "backup".into(), base_url: "http://b/v1".into(), ..ProviderSpec::default() },
        ];
        let specs = resolve_providers(
            &file,
            env(&[("MESHGATE_PROVIDER_OPENAI_API_KEY", "sk-from-secret"), ("MESHGATE_PROVIDER_BACKUP_PRIORITY", "0")]),
        )
        .unwrap();
        assert_eq!(specs[0].name, "backup");
        assert_eq!(specs[1].name, "openai");
        assert_eq!(specs[1].api_key.as_deref(), Some("sk-from-secret"));
        assert_eq!(specs[1].models, ["gpt-4o"]);

        let dup = [file[1].clone(), file[1].clone()];
        assert!(matches!(ProviderCatalog::new(&dup).unwrap_err(), ProviderConfigError::Duplicate { .. }));
        let no_url = [ProviderSpec { name: "x".into(), ..ProviderSpec::default() }];
        assert!(matches!(ProviderCatalog::new(&no_url).unwrap_err(), ProviderConfigError::MissingBaseUrl { .. }));
    }

    #[test]
    fn file_entries_reject_unknown_keys() {
        let err = serde_json::from_str::<ProviderSpec>(r#"{"name": "a", "base_url": "http://a/v1", "modles": []}"#)
            .unwrap_err();
        assert!(err.to_string().contains("modles"), "{err}");
    }

    #[test]
    fn debug_redacts_the_key() {
        let spec = ProviderSpec { name: "a".into(), api_key: Some("sk-very-secret".into()), ..ProviderSpec::default() };
        let shown = format!("{spec:?}");
        assert!(!shown.contains("sk-very-secret") && shown.contains("redacted"), "{shown}");
    }
}
