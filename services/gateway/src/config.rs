//! The gateway's configuration (`[gateway]`, `MESHGATE_GATEWAY__*`).

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::client_addr::TrustedProxies;

/// Gateway configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The bootstrap owner key; `MESHGATE_ADMIN_KEY` is used when unset.
    pub admin_key: Option<String>,
    pub quota_endpoint: String,
    pub router_endpoint: String,
    pub sync_endpoint: String,
    pub inference_endpoint: String,
    pub analytics_endpoint: String,
    /// Largest accepted request body (a project's limits may only lower it).
    pub max_body_bytes: usize,
    /// Most messages in one chat request (a project's limits may only lower it).
    pub max_messages: usize,
    /// Largest `max_tokens` a request may ask for (a project's limits may only lower it).
    pub max_tokens_cap: i64,
    /// Completion tokens reserved when a request sets no `max_tokens`.
    pub default_max_tokens: i64,
    /// A target that sends nothing for this long is abandoned for the next one.
    pub target_timeout_ms: u64,
    /// A started reply that stays silent this long is ended with an error.
    pub idle_timeout_ms: u64,
    /// Deadline of quota and router calls.
    pub peer_timeout_ms: u64,
    /// Admit requests against budget slices this replica leases from the quota service
    /// (`Quota.Lease`), with no quota call per request; off: a `Quota.Reserve` before every
    /// request and a `Commit` or `Release` after it.
    pub quota_leases: bool,
    /// How the replica leases (`[gateway.leases]`): slice lifetime, flush interval, sizing, and
    /// the deadline of lease calls and of the reservations made when a scope is nearly spent.
    pub leases: meshgate_quota_lease::LeaseSettings,
    /// Requests handled at once by the HTTP edge; more are shed with 503.
    pub max_concurrent_requests: usize,
    /// Postgres holding organizations, projects, users, roles and API keys; without it they
    /// live in this process's memory (a standalone gateway) and are lost on restart.
    pub database_url: Option<String>,
    /// Redis carrying key revocations between replicas.
    pub redis_url: Option<String>,
    pub postgres: meshgate_storage::PostgresConfig,
    pub redis: meshgate_storage::RedisConfig,
    /// How long a looked-up API key is trusted before the store is asked again.
    pub key_cache_ttl_ms: u64,
    /// Failed authentications from one address per minute before its failures get 429s.
    pub max_auth_failures_per_minute: u32,
    /// Proxies (addresses or CIDR networks) whose `X-Forwarded-For` names the client for the
    /// failed-login throttle; other peers are taken as the client themselves.
    pub trusted_proxies: Vec<String>,
    /// Streams one key may have open at once (HTTP and gRPC; 0 = no cap).
    pub max_streams_per_key: usize,
    /// Streams one project may have open at once (0 = no cap).
    pub max_streams_per_project: usize,
    /// Edge batches (`POST /v1/sync/batches`) one key may have in progress at once.
    pub edge_uploads_per_key: usize,
    /// How long a response stored by the Responses API (`store: true`) is kept.
    pub response_retention_days: u32,
    /// Stored responses a gateway without a database keeps (the oldest go first).
    pub memory_stored_responses: usize,
    /// The inference classifier scoring prompt injection; without it (or while it is not loaded)
    /// the policy's heuristic scores it.
    pub injection_model: String,
    /// Deadline of one injection classification; past it the heuristic decides.
    pub injection_timeout_ms: u64,
    /// Apply the tenancy migrations once Postgres answers.
    pub migrate_on_start: bool,
    /// Trace records buffered for analytics at most.
    pub trace_buffer: usize,
    pub trace_batch_size: usize,
    pub trace_flush_ms: u64,
    /// Hand every trace batch to the sync service for upload to a cloud meshgate (an edge; the
    /// standalone process sets it when `[sync.cloud] url` is set).
    pub cloud_uplink: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            admin_key: None,
            quota_endpoint: "http://127.0.0.1:50054".into(),
            router_endpoint: "http://127.0.0.1:50053".into(),
            sync_endpoint: "http://127.0.0.1:50056".into(),
            inference_endpoint: "http://127.0.0.1:50052".into(),
            analytics_endpoint: "http://127.0.0.1:50055".into(),
            // Agents send long sessions with screenshots as data URIs: 20 MiB holds a few images
            // and hundreds of turns (OpenAI takes images up to 20 MB each).
            max_body_bytes: 20 * 1024 * 1024,
            max_messages: 2048,
            max_tokens_cap: 131_072,
            default_max_tokens: 1024,
            target_timeout_ms: 30_000,
            idle_timeout_ms: 120_000,
            peer_timeout_ms: 2_000,
            quota_leases: true,
            leases: meshgate_quota_lease::LeaseSettings::default(),
            max_concurrent_requests: 4096,
            database_url: None,
            redis_url: None,
            postgres: meshgate_storage::PostgresConfig::default(),
            redis: meshgate_storage::RedisConfig::default(),
            key_cache_ttl_ms: 60_000,
            max_auth_failures_per_minute: 20,
            trusted_proxies: Vec::new(),
            max_streams_per_key: 256,
            max_streams_per_project: 1024,
            edge_uploads_per_key: 2,
            // OpenAI keeps stored responses 30 days.
            response_retention_days: 30,
            memory_stored_responses: 10_000,
            injection_model: "prompt-injection".into(),
            injection_timeout_ms: 250,
            migrate_on_start: true,
            trace_buffer: 16_384,
            trace_batch_size: 1024,
            trace_flush_ms: 20,
            cloud_uplink: false,
        }
    }
}

impl Config {
    /// Fills `database_url` / `redis_url` from `DATABASE_URL` / `REDIS_URL` when not configured.
    pub fn with_env_urls(mut self) -> Self {
        if self.database_url.is_none() {
            self.database_url = meshgate_storage::url_from_env("DATABASE_URL");
        }
        if self.redis_url.is_none() {
            self.redis_url = meshgate_storage::url_from_env("REDIS_URL");
        }
        self
    }

    /// Refuses values the gateway cannot run with, naming the key.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |message: &str| Err(Error::Config(message.into()));
        if self.max_body_bytes == 0 || self.max_messages == 0 || self.max_tokens_cap < 1 || self.default_max_tokens < 1
        {
            return invalid("max_body_bytes, max_messages, max_tokens_cap and default_max_tokens must be positive");
        }
        if self.default_max_tokens > self.max_tokens_cap {
            return invalid("default_max_tokens must not exceed max_tokens_cap");
        }
        if self.target_timeout_ms == 0
            || self.idle_timeout_ms == 0
            || self.peer_timeout_ms == 0
            || self.injection_timeout_ms == 0
        {
            return invalid(
                "target_timeout_ms, idle_timeout_ms, peer_timeout_ms and injection_timeout_ms must be positive",
            );
        }
        if self.max_concurrent_requests == 0 {
            return invalid("max_concurrent_requests must be at least 1");
        }
        if self.edge_uploads_per_key == 0 {
            return invalid("edge_uploads_per_key must be at least 1");
        }
        if self.response_retention_days == 0 || self.memory_stored_responses == 0 {
            return invalid("response_retention_days and memory_stored_responses must be at least 1");
        }
        if self.trace_buffer == 0 || self.trace_batch_size == 0 || self.trace_flush_ms == 0 {
            return invalid("trace_buffer, trace_batch_size and trace_flush_ms must be positive");
        }
        if self.max_auth_failures_per_minute == 0 {
            return invalid("max_auth_failures_per_minute must be at least 1");
        }
        for (key, endpoint) in [
            ("quota_endpoint", &self.quota_endpoint),
            ("router_endpoint", &self.router_endpoint),
            ("sync_endpoint", &self.sync_endpoint),
            ("inference_endpoint", &self.inference_endpoint),
            ("analytics_endpoint", &self.analytics_endpoint),
        ] {
            if endpoint.parse::<http::Uri>().ok().and_then(|uri| uri.host().map(str::to_owned)).is_none() {
                return Err(Error::Config(format!("{key} {endpoint:?} is not a URL with a host")));
            }
        }
        TrustedProxies::parse(&self.trusted_proxies).map_err(|err| Error::Config(err.to_string()))?;
        self.leases.validate().map_err(|err| Error::Config(format!("leases: {err}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        Config::default().validate().unwrap();
        type Spoil = fn(&mut Config);
        let cases: [(&str, Spoil); 7] = [
            ("max_body_bytes", |c| c.max_body_bytes = 0),
            ("default_max_tokens must not exceed", |c| c.default_max_tokens = c.max_tokens_cap + 1),
            ("peer_timeout_ms", |c| c.peer_timeout_ms = 0),
            ("quota_endpoint", |c| c.quota_endpoint = "not a url".into()),
            ("trusted_proxies", |c| c.trusted_proxies = vec!["10.0.0.0/40".into()]),
            ("edge_uploads_per_key", |c| c.edge_uploads_per_key = 0),
            ("leases: invalid lease settings: flush_interval_ms", |c| c.leases.flush_interval_ms = 0),
        ];
        for (needle, spoil) in cases {
            let mut config = Config::default();
            spoil(&mut config);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
