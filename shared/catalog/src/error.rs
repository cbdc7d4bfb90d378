//! What can be wrong with a catalog. Every error names the setting to fix; services report them
//! as configuration errors.

use crate::names::{ENV_PREFIX, RESERVED_NAME};

/// A provider or model definition that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
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
        "unknown provider variable {variable}: expected {ENV_PREFIX}<NAME>_ followed by BASE_URL, KIND, API_KEY, API_KEY_HEADER, MODELS, EMBEDDING_MODELS, PRIORITY, TIMEOUT_MS, FIRST_BYTE_TIMEOUT_MS, CONNECT_TIMEOUT_MS, MAX_RETRIES, UNKNOWN_PARAMS or HONOURS_IDEMPOTENCY_KEYS"
    )]
    UnknownVariable { variable: String },
    #[error("provider '{name}' is defined twice in the config file")]
    Duplicate { name: String },
    #[error("models.{model}.{field}: {reason}")]
    InvalidModel { model: String, field: &'static str, reason: String },
    #[error("default_price.{field}: {reason}")]
    InvalidDefaultPrice { field: &'static str, reason: String },
}
