//! meshgate's sync service: everything that crosses to the cloud.
//!
//! Today that is `Sync.Complete`, a streaming chat completion forwarded to an OpenAI-compatible
//! provider over one pooled HTTP client (see [`upstream`] for the stream contract and [`error`] for
//! how failures map to gRPC statuses). `Enqueue`, `GetJob` and `ListJobs` belong to the durable
//! queue of issue 7 and answer UNIMPLEMENTED until then.
//!
//! Providers are configured in the `[sync]` section (`[[sync.providers]]`) and/or by
//! `MESHGATE_PROVIDER_<NAME>_*` variables; [`providers`] documents both and is shared with the
//! router and the gateway.

pub mod error;
pub mod metrics;
pub mod providers;
pub mod service;
pub mod sse;
pub mod upstream;

use meshgate_proto::sync::v1::sync_server::SyncServer;
use meshgate_runtime::{ListenConfig, Listeners, ServiceHost, Shutdown};
use serde::{Deserialize, Serialize};

pub use error::Error;
pub use metrics::UpstreamMetrics;
pub use providers::{ProviderCatalog, ProviderSpec};
pub use service::SyncService;
pub use upstream::{ChunkStream, Upstream};

/// Default gRPC port of the sync service.
pub const DEFAULT_GRPC_PORT: u16 = 50056;
/// Default admin port of the sync service.
pub const DEFAULT_ADMIN_PORT: u16 = 9106;

/// Where the `meshgate-sync` binary listens unless `MESHGATE_LISTEN__*` says otherwise.
pub fn default_listen() -> ListenConfig {
    meshgate_runtime::process::default_listen(DEFAULT_GRPC_PORT, DEFAULT_ADMIN_PORT, None)
}

/// Configuration of the sync service (section `[sync]`, env `MESHGATE_SYNC__*`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Providers declared in the file; merged with `MESHGATE_PROVIDER_<NAME>_*` variables.
    pub providers: Vec<ProviderSpec>,
    /// Read `MESHGATE_PROVIDER_<NAME>_*` from the process environment.
    pub providers_from_env: bool,
    /// TCP + TLS connect timeout, for every provider (one pooled client serves them all).
    pub connect_timeout_ms: u64,
    /// Default time allowed until the provider's first byte (per provider: `first_byte_timeout_ms`).
    pub first_byte_timeout_ms: u64,
    /// Default total time of one call (per provider: `timeout_ms`; per request: `timeout_ms`).
    pub timeout_ms: u64,
    /// Idle pooled connections are closed after this long.
    pub pool_idle_timeout_ms: u64,
    /// Idle pooled connections kept per provider host.
    pub pool_max_idle_per_host: usize,
    /// Largest SSE line or event accepted from a provider.
    pub max_event_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            providers: Vec::new(),
            providers_from_env: true,
            connect_timeout_ms: 5_000,
            first_byte_timeout_ms: 60_000,
            timeout_ms: 300_000,
            pool_idle_timeout_ms: 90_000,
            pool_max_idle_per_host: 256,
            max_event_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Config {
    /// Checks the values no type can: non-zero timeouts and limits.
    pub fn validate(&self) -> Result<(), Error> {
        for (field, value) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("first_byte_timeout_ms", self.first_byte_timeout_ms),
            ("timeout_ms", self.timeout_ms),
            ("max_event_bytes", self.max_event_bytes as u64),
        ] {
            if value == 0 {
                return Err(Error::Config(format!("{field} must be at least 1")));
            }
        }
        Ok(())
    }

    /// The providers of this configuration: the file's list merged with the process
    /// environment (when [`Config::providers_from_env`]), validated, in fallback order.
    pub fn resolve_providers(&self) -> Result<Vec<ProviderSpec>, Error> {
        let env: Vec<(String, String)> =
            if self.providers_from_env { providers::process_env().collect() } else { Vec::new() };
        Ok(providers::resolve_providers(&self.providers, env)?)
    }
}

/// Runs the sync service on `listeners` until `shutdown`. Ready as soon as the HTTP client is
/// built: a provider that is down fails its own calls, not the service's health.
pub async fn serve(config: Config, listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    let providers = config.resolve_providers()?;
    let host = ServiceHost::new("sync");
    let metrics = UpstreamMetrics::new();
    metrics.register(host.metrics());
    let upstream = Upstream::new(&config, &providers, metrics)?;
    let names: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
    tracing::info!(providers = ?names, "sync: upstream providers");
    let service = SyncServer::new(SyncService::new(upstream));
    host.run(service, listeners, || async { Ok(()) }, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn the_config_file_lists_providers_and_rejects_unknown_keys() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        write!(
            file,
            r#"
[sync]
providers_from_env = false
timeout_ms = 20000

[[sync.providers]]
name = "openai"
base_url = "https://api.openai.com/v1/"
models = ["gpt-4o", "gpt-4o-mini"]
priority = 2

[[sync.providers]]
name = "backup"
base_url = "http://127.0.0.1:18000/v1"
models = ["gpt-4o"]
"#
        )
        .unwrap();
        let config: Config = meshgate_runtime::config::load("sync", Some(file.path())).unwrap();
        assert_eq!(config.timeout_ms, 20_000);
        assert_eq!(config.connect_timeout_ms, Config::default().connect_timeout_ms);
        let providers = config.resolve_providers().unwrap();
        let names: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["openai", "backup"], "priority 2 goes before the default 100");
        assert_eq!(providers[0].base_url, "https://api.openai.com/v1");

        let mut typo = tempfile::NamedTempFile::new().unwrap();
        write!(typo, "[sync]\n[[sync.providers]]\nname = \"a\"\nbase_url = \"http://a/v1\"\nmodel = [\"x\"]\n")
            .unwrap();
        let err = meshgate_runtime::config::load::<Config>("sync", Some(typo.path())).unwrap_err();
        assert!(err.to_string().contains("model"), "{err}");
    }
}
