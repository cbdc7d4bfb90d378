//! The model catalog: which upstream providers exist, which wire format each speaks and which
//! models each serves, and what every model is (layer, prices, context window, output limit,
//! capabilities, how it takes its length limit). The router plans over it, the sync service
//! calls through it and the gateway lists it, so all agree.
//!
//! Providers come from a config file list, from the environment, or both:
//!
//! | variable | meaning |
//! |---|---|
//! | `MESHGATE_PROVIDER_<NAME>_BASE_URL` | base URL **including the version path**, SDK style: `https://api.openai.com/v1`, `https://api.anthropic.com/v1`, `http://127.0.0.1:18000/v1`; meshgate appends `/chat/completions` (OpenAI) or `/messages` (Anthropic). Query parameters are sent on every call, after the path (Azure OpenAI: `https://<resource>.openai.azure.com/openai/deployments/<deployment>?api-version=2024-10-21`) |
//! | `MESHGATE_PROVIDER_<NAME>_KIND` | optional wire format: `openai` (default) or `anthropic` |
//! | `MESHGATE_PROVIDER_<NAME>_API_KEY` | optional key: `Authorization: Bearer` (OpenAI) or `x-api-key` (Anthropic) |
//! | `MESHGATE_PROVIDER_<NAME>_API_KEY_HEADER` | optional header that carries the key as it is, instead of the kind's default (`api-key` for Azure OpenAI) |
//! | `MESHGATE_PROVIDER_<NAME>_MODELS` | comma-separated model ids the provider serves |
//! | `MESHGATE_PROVIDER_<NAME>_PRIORITY` | optional integer, lower is tried first (default [`DEFAULT_PRIORITY`]) |
//! | `MESHGATE_PROVIDER_<NAME>_TIMEOUT_MS` | optional total timeout of one call |
//! | `MESHGATE_PROVIDER_<NAME>_FIRST_BYTE_TIMEOUT_MS` | optional timeout until the first byte of the answer |
//! | `MESHGATE_PROVIDER_<NAME>_CONNECT_TIMEOUT_MS` | optional TCP + TLS connect timeout |
//! | `MESHGATE_PROVIDER_<NAME>_MAX_RETRIES` | optional retries of a call that failed before its first byte reached the caller (429, 5xx, connection errors) |
//! | `MESHGATE_PROVIDER_<NAME>_UNKNOWN_PARAMS` | optional `forward`, `drop` or `refuse`: request parameters meshgate does not model (default [`ProviderSpec::on_unknown_params`]) |
//!
//! `<NAME>` is the provider's name in upper case (`[A-Z0-9_]`); meshgate uses it in lower case.
//! Suffixes are matched longest first, so `X_FIRST_BYTE_TIMEOUT_MS` belongs to provider `x`.
//! Variables for a name that the config file also declares override that entry field by field (the
//! usual way to inject an API key from a secret). The name `local` is reserved for local models.
//!
//! **Fallback order.** Several providers may serve the same model id; they are then fallbacks for
//! each other, ordered by `(priority, name)`: by name unless a priority is configured.
//!
//! **Model facts** are declared per model id ([`ModelFacts`]); [`Catalog::cloud_profile`] and
//! [`Catalog::local_profile`] say what an undeclared fact defaults to.

mod catalog;
mod env;
mod error;
mod model;
mod names;
mod provider;
pub mod task;

pub use catalog::{Catalog, ModelProfile, Unpriced};
pub use env::{process_env, providers_from_env, resolve_providers};
pub use error::CatalogError;
pub use model::{Capability, MaxTokensParam, ModelFacts, Prices, parse_layer};
pub use names::{ENV_PREFIX, RESERVED_NAME};
pub use provider::{DEFAULT_PRIORITY, ProviderKind, ProviderSpec, UnknownParams};
