//! Names the catalog reserves, used by the modules above it and in their errors.

/// Prefix of the provider environment variables.
pub const ENV_PREFIX: &str = "MESHGATE_PROVIDER_";

/// Provider name reserved for local (ONNX) targets.
pub const RESERVED_NAME: &str = "local";
