//! Providers from the environment (`MESHGATE_PROVIDER_<NAME>_*`), merged with a configuration
//! file's list.

use std::collections::BTreeMap;

use crate::error::CatalogError;
use crate::names::ENV_PREFIX;
use crate::provider::{ProviderKind, ProviderSpec, UnknownParams, validate_name};

/// Environment suffixes, longest first so that `_FIRST_BYTE_TIMEOUT_MS` and `_CONNECT_TIMEOUT_MS`
/// win over `_TIMEOUT_MS`.
/// `_EMBEDDING_MODELS` wins over `_MODELS` the same way.
const SUFFIXES: [(&str, Field); 13] = [
    ("_HONOURS_IDEMPOTENCY_KEYS", Field::HonoursIdempotencyKeys),
    ("_FIRST_BYTE_TIMEOUT_MS", Field::FirstByteTimeout),
    ("_EMBEDDING_MODELS", Field::EmbeddingModels),
    ("_API_KEY_HEADER", Field::ApiKeyHeader),
    ("_CONNECT_TIMEOUT_MS", Field::ConnectTimeout),
    ("_UNKNOWN_PARAMS", Field::UnknownParams),
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
    ApiKeyHeader,
    Models,
    EmbeddingModels,
    Priority,
    Timeout,
    FirstByteTimeout,
    ConnectTimeout,
    MaxRetries,
    UnknownParams,
    HonoursIdempotencyKeys,
}

/// Provider fields found in the environment for one name.
#[derive(Default)]
struct Partial {
    base_url: Option<String>,
    kind: Option<ProviderKind>,
    api_key: Option<String>,
    api_key_header: Option<String>,
    models: Option<Vec<String>>,
    embedding_models: Option<Vec<String>>,
    priority: Option<i32>,
    timeout_ms: Option<u64>,
    first_byte_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    max_retries: Option<u32>,
    unknown_params: Option<UnknownParams>,
    honours_idempotency_keys: Option<bool>,
}

impl Partial {
    fn apply(self, spec: &mut ProviderSpec) {
        if let Some(v) = self.base_url {
            spec.base_url = v;
        }
        if let Some(v) = self.api_key {
            spec.api_key = Some(v);
        }
        if let Some(v) = self.api_key_header {
            spec.api_key_header = Some(v);
        }
        if let Some(v) = self.models {
            spec.models = v;
        }
        if let Some(v) = self.embedding_models {
            spec.embedding_models = v;
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
        if let Some(v) = self.unknown_params {
            spec.unknown_params = Some(v);
        }
        if let Some(v) = self.honours_idempotency_keys {
            spec.honours_idempotency_keys = v;
        }
    }
}

fn parse_env<I, K, V>(vars: I) -> Result<BTreeMap<String, Partial>, CatalogError>
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
        let unknown = || CatalogError::UnknownVariable { variable: key.to_owned() };
        let (upper, field) = SUFFIXES
            .iter()
            .find_map(|(suffix, field)| rest.strip_suffix(suffix).map(|name| (name, *field)))
            .ok_or_else(unknown)?;
        if upper.is_empty() {
            return Err(unknown());
        }
        let name = validate_name(upper)?;
        let invalid = |field: &'static str, reason: String| CatalogError::InvalidValue {
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
                        .ok_or_else(|| invalid("kind", "expected openai, anthropic or openai-responses".into()))?,
                )
            }
            Field::UnknownParams => {
                partial.unknown_params = Some(
                    UnknownParams::parse(value)
                        .ok_or_else(|| invalid("unknown_params", "expected forward, drop or refuse".into()))?,
                )
            }
            Field::ApiKey => partial.api_key = Some(value.to_owned()),
            Field::ApiKeyHeader => partial.api_key_header = Some(value.to_owned()),
            Field::Models => partial.models = Some(value.split(',').map(str::to_owned).collect()),
            Field::EmbeddingModels => partial.embedding_models = Some(value.split(',').map(str::to_owned).collect()),
            Field::Priority => partial.priority = Some(number(&name, "priority", value)?),
            Field::Timeout => partial.timeout_ms = Some(number(&name, "timeout_ms", value)?),
            Field::FirstByteTimeout => {
                partial.first_byte_timeout_ms = Some(number(&name, "first_byte_timeout_ms", value)?)
            }
            Field::ConnectTimeout => partial.connect_timeout_ms = Some(number(&name, "connect_timeout_ms", value)?),
            Field::MaxRetries => partial.max_retries = Some(number(&name, "max_retries", value)?),
            Field::HonoursIdempotencyKeys => {
                partial.honours_idempotency_keys = Some(match value.trim() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(invalid("honours_idempotency_keys", "expected true or false".into())),
                })
            }
        }
    }
    Ok(partials)
}

/// `value` as a number for `field` of `provider`.
fn number<T: std::str::FromStr<Err = std::num::ParseIntError>>(
    provider: &str,
    field: &'static str,
    value: &str,
) -> Result<T, CatalogError> {
    value.trim().parse().map_err(|err: std::num::ParseIntError| CatalogError::InvalidValue {
        provider: provider.to_owned(),
        field,
        value: value.to_owned(),
        reason: err.to_string(),
    })
}

/// The process environment as `(key, value)` strings for [`resolve_providers`]; entries that are
/// not valid UTF-8 are converted lossily (a mangled base URL then fails validation clearly).
pub fn process_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
}

/// Providers defined by the environment alone, validated, in fallback order. Takes the
/// environment as an iterator (pass [`process_env`]) so it can be tested; variables without
/// the [`ENV_PREFIX`] are ignored, malformed ones are errors.
pub fn providers_from_env<I, K, V>(vars: I) -> Result<Vec<ProviderSpec>, CatalogError>
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
pub fn resolve_providers<I, K, V>(file: &[ProviderSpec], vars: I) -> Result<Vec<ProviderSpec>, CatalogError>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut merged: BTreeMap<String, ProviderSpec> = BTreeMap::new();
    for spec in file {
        let name = validate_name(&spec.name)?;
        if merged.insert(name.clone(), ProviderSpec { name: name.clone(), ..spec.clone() }).is_some() {
            return Err(CatalogError::Duplicate { name });
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
            ("MESHGATE_PROVIDER_ALPHA_EMBEDDING_MODELS", "text-embedding-3-small, text-embedding-3-large"),
            ("MESHGATE_SYNC__TIMEOUT_MS", "5"),
        ]))
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].name, "alpha");
        assert_eq!(specs[0].embedding_models, ["text-embedding-3-small", "text-embedding-3-large"]);
        assert!(specs[0].serves_embeddings("text-embedding-3-small") && !specs[0].serves("text-embedding-3-small"));
        assert_eq!(specs[0].api_key.as_deref(), Some("sk-secret"));
        assert_eq!(specs[0].chat_completions_url(), "https://api.example.com/v1/chat/completions");
        assert_eq!(specs[1].name, "zeta");
        assert_eq!(specs[1].base_url, "http://127.0.0.1:9/v1");
        assert_eq!(specs[1].models, ["gpt-4o", "gpt-4o-mini"]);
        assert_eq!(specs[1].api_key, None);
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
    fn kind_unknown_params_connect_timeout_and_retries_come_from_the_environment() {
        let specs = providers_from_env(env(&[
            ("MESHGATE_PROVIDER_CLAUDE_BASE_URL", "https://api.anthropic.com/v1"),
            ("MESHGATE_PROVIDER_CLAUDE_KIND", "Anthropic"),
            ("MESHGATE_PROVIDER_CLAUDE_CONNECT_TIMEOUT_MS", "1500"),
            ("MESHGATE_PROVIDER_CLAUDE_MAX_RETRIES", "4"),
            ("MESHGATE_PROVIDER_CLAUDE_TIMEOUT_MS", "9000"),
            ("MESHGATE_PROVIDER_CLAUDE_UNKNOWN_PARAMS", "Refuse"),
            ("MESHGATE_PROVIDER_CLAUDE_HONOURS_IDEMPOTENCY_KEYS", "true"),
        ]))
        .unwrap();
        assert_eq!(specs[0].name, "claude");
        assert!(specs[0].honours_idempotency_keys);
        assert_eq!(specs[0].kind, ProviderKind::Anthropic);
        assert_eq!(specs[0].chat_url(), "https://api.anthropic.com/v1/messages");
        assert_eq!(specs[0].on_unknown_params(), UnknownParams::Refuse);
        assert_eq!(
            (specs[0].connect_timeout_ms, specs[0].max_retries, specs[0].timeout_ms),
            (Some(1500), Some(4), Some(9000))
        );
        for (variable, value, field) in [
            ("MESHGATE_PROVIDER_X_KIND", "gemini", "kind"),
            ("MESHGATE_PROVIDER_X_UNKNOWN_PARAMS", "ignore", "unknown_params"),
            ("MESHGATE_PROVIDER_X_HONOURS_IDEMPOTENCY_KEYS", "yes", "honours_idempotency_keys"),
        ] {
            let err = providers_from_env(env(&[("MESHGATE_PROVIDER_X_BASE_URL", "http://h/v1"), (variable, value)]))
                .unwrap_err();
            assert!(matches!(err, CatalogError::InvalidValue { field: f, .. } if f == field), "{err}");
        }
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
    fn an_azure_deployment_keeps_its_query_and_names_its_key_header() {
        let specs = providers_from_env(env(&[
            (
                "MESHGATE_PROVIDER_AZURE_BASE_URL",
                "https://res.openai.azure.com/openai/deployments/gpt-4o/?api-version=2024-10-21",
            ),
            ("MESHGATE_PROVIDER_AZURE_API_KEY", "az"),
            ("MESHGATE_PROVIDER_AZURE_API_KEY_HEADER", "api-key"),
        ]))
        .unwrap();
        let azure = &specs[0];
        assert_eq!(
            azure.chat_url(),
            "https://res.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(azure.key_header(), Some(("api-key".to_owned(), "az".to_owned())));
        let openai = ProviderSpec { api_key: Some("sk".into()), ..ProviderSpec::default() };
        assert_eq!(openai.key_header(), Some(("authorization".to_owned(), "Bearer sk".to_owned())));
    }

    #[test]
    fn malformed_entries_are_rejected_clearly() {
        let err = providers_from_env(env(&[("MESHGATE_PROVIDER_X_MODELS", "m")])).unwrap_err();
        assert_eq!(err, CatalogError::MissingBaseUrl { provider: "x".into() });
        assert!(err.to_string().contains("MESHGATE_PROVIDER_X_BASE_URL"), "{err}");

        for url in ["not a url", "ftp://h/v1", "http://h/v1#x", "http://h/v1?", "http://", "/v1"] {
            let err = providers_from_env(env(&[("MESHGATE_PROVIDER_X_BASE_URL", url)])).unwrap_err();
            assert!(matches!(err, CatalogError::InvalidBaseUrl { .. }), "{url}: {err}");
        }
        let err = providers_from_env(env(&[("MESHGATE_PROVIDER_X_BASE_URL", "  ")])).unwrap_err();
        assert!(matches!(err, CatalogError::MissingBaseUrl { .. }));

        let err = providers_from_env(env(&[
            ("MESHGATE_PROVIDER_X_BASE_URL", "http://h/v1"),
            ("MESHGATE_PROVIDER_X_API_KEY_HEADER", "api key"),
        ]))
        .unwrap_err();
        assert!(matches!(err, CatalogError::InvalidValue { field: "api_key_header", .. }), "{err}");

        let err = providers_from_env(env(&[
            ("MESHGATE_PROVIDER_X_BASE_URL", "http://h/v1"),
            ("MESHGATE_PROVIDER_X_PRIORITY", "first"),
        ]))
        .unwrap_err();
        assert!(matches!(err, CatalogError::InvalidValue { field: "priority", .. }), "{err}");

        let err = providers_from_env(env(&[
            ("MESHGATE_PROVIDER_X_BASE_URL", "http://h/v1"),
            ("MESHGATE_PROVIDER_X_TIMEOUT_MS", "0"),
        ]))
        .unwrap_err();
        assert!(matches!(err, CatalogError::InvalidValue { field: "timeout_ms", .. }), "{err}");

        let err = providers_from_env(env(&[("MESHGATE_PROVIDER_X_BASEURL", "http://h/v1")])).unwrap_err();
        assert!(matches!(err, CatalogError::UnknownVariable { .. }), "{err}");
        let err = providers_from_env(env(&[("MESHGATE_PROVIDER__BASE_URL", "http://h/v1")])).unwrap_err();
        assert!(matches!(err, CatalogError::UnknownVariable { .. }), "{err}");
        let err = providers_from_env(env(&[("MESHGATE_PROVIDER_LOCAL_BASE_URL", "http://h/v1")])).unwrap_err();
        assert!(matches!(err, CatalogError::InvalidName { .. }), "{err}");
        let err = providers_from_env(env(&[("MESHGATE_PROVIDER_A.B_BASE_URL", "http://h/v1")])).unwrap_err();
        assert!(matches!(err, CatalogError::InvalidName { .. }), "{err}");
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

        let no_env = std::iter::empty::<(String, String)>;
        let dup = [file[1].clone(), file[1].clone()];
        assert!(matches!(resolve_providers(&dup, no_env()).unwrap_err(), CatalogError::Duplicate { .. }));
        let no_url = [ProviderSpec { name: "x".into(), ..ProviderSpec::default() }];
        assert!(matches!(resolve_providers(&no_url, no_env()).unwrap_err(), CatalogError::MissingBaseUrl { .. }));
    }
}
