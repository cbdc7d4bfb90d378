//! meshgate's sync service: everything that crosses to the cloud.
//!
//! - `Sync.Complete`: a streaming chat completion forwarded to a provider speaking the OpenAI or
//!   the Anthropic format, with timeouts and retries before the first byte (see [`upstream`] for
//!   the stream contract, [`meshgate_wire`] for the formats and [`error`] for the gRPC statuses).
//! - `Enqueue`, `GetJob`, `ListJobs`, `RetryJob`: the durable queue of asynchronous completions
//!   (see [`queue`]), in Postgres (`[sync.queue] database_url`, or `DATABASE_URL` for the
//!   `meshgate-sync` binary) or in an on-disk log (`[sync.queue] path`). Without either, the queue
//!   RPCs answer UNIMPLEMENTED.
//! - `Uplink`: edge → cloud. With `[sync.cloud] url` and `key` (`MESHGATE_CLOUD_URL`,
//!   `MESHGATE_CLOUD_KEY`) the traces the gateway hands over are staged in an fsync'd outbox and
//!   uploaded to the cloud meshgate in idempotent batches (see [`cloud`]).
//!
//! Providers are configured in the `[sync]` section (`[[sync.providers]]`) and/or by
//! `MESHGATE_PROVIDER_<NAME>_*` variables; [`meshgate_catalog`] documents both and is shared with
//! the router and the gateway.

pub mod cloud;
pub mod error;
pub mod metrics;
pub mod queue;
pub mod retry;
pub mod service;
pub mod upstream;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_proto::sync::v1::sync_server::SyncServer;
use meshgate_runtime::{ListenConfig, Listeners, ServiceHost, Shutdown};
use meshgate_storage::{Migration, PgPool, PostgresConfig, SharedClock, migrate, postgres_pool, system_clock};
use serde::{Deserialize, Serialize};

pub use error::Error;
pub use meshgate_catalog::{ProviderKind, ProviderSpec};
pub use metrics::UpstreamMetrics;
pub use queue::{Charger, Dispatcher, DispatcherConfig, FileJobStore, JobStore, PgJobStore, QueueMetrics};
pub use retry::RetryPolicy;
pub use service::{Queue, SyncService};
pub use upstream::{CallOptions, ChunkStream, Upstream};

/// Component name of this service's migrations in `schema_migrations`.
pub const COMPONENT: &str = "sync";

static MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "sync_jobs", sql: include_str!("../migrations/0001_sync_jobs.sql") },
    Migration { version: 2, name: "job_prices", sql: include_str!("../migrations/0002_job_prices.sql") },
    Migration { version: 3, name: "job_reservations", sql: include_str!("../migrations/0003_job_reservations.sql") },
];

/// The schema migrations of the sync tables (`sync_jobs`).
pub fn migrations() -> &'static [Migration] {
    MIGRATIONS
}

/// Default gRPC port of the sync service.
pub const DEFAULT_GRPC_PORT: u16 = 50056;
/// Default admin port of the sync service.
pub const DEFAULT_ADMIN_PORT: u16 = 9106;

/// Where the `meshgate-sync` binary listens unless `MESHGATE_LISTEN__*` says otherwise.
pub fn default_listen() -> ListenConfig {
    meshgate_runtime::service_main::default_listen(DEFAULT_GRPC_PORT, DEFAULT_ADMIN_PORT, None)
}

/// Configuration of the sync service (section `[sync]`, env `MESHGATE_SYNC__*`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Providers declared in the file; merged with `MESHGATE_PROVIDER_<NAME>_*` variables.
    pub providers: Vec<ProviderSpec>,
    /// Read `MESHGATE_PROVIDER_<NAME>_*` from the process environment.
    pub providers_from_env: bool,
    /// Default TCP + TLS connect timeout (per provider: `connect_timeout_ms`).
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
    /// Largest embeddings answer accepted from a provider (2,048 vectors of 3,072 floats take
    /// about 75 MB as JSON).
    pub max_embeddings_bytes: usize,
    /// Default retries of a call failing before its first chunk (per provider: `max_retries`).
    pub max_retries: u32,
    /// First retry backoff; doubles per retry, half of it random.
    pub retry_base_delay_ms: u64,
    /// Longest retry wait, backoff or `Retry-After`: a provider asking for longer is not retried.
    pub retry_max_delay_ms: u64,
    /// The durable queue (`[sync.queue]`).
    pub queue: QueueConfig,
    /// Upload of traces to a cloud meshgate (`[sync.cloud]`).
    pub cloud: cloud::CloudConfig,
    /// The quota service charged for delivered jobs (`http://host:port`); without it delivered
    /// jobs are not charged (the gateway still admits them against the budgets).
    pub quota_endpoint: Option<String>,
}

/// The durable queue's store and workers (`[sync.queue]`, `MESHGATE_SYNC__QUEUE__*`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Postgres holding `sync_jobs` (the mesh). Wins over `path`.
    pub database_url: Option<String>,
    pub postgres: PostgresConfig,
    /// Directory of the on-disk queue (standalone), used when no database is configured.
    pub path: Option<PathBuf>,
    /// Delivery attempts before a job becomes a dead letter.
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubles per attempt (1 s·2ⁿ).
    pub backoff_base_ms: u64,
    /// Longest wait between attempts.
    pub backoff_cap_ms: u64,
    /// How long a claimed job belongs to its worker without news: a delivery in progress renews
    /// it every third of it, so a worker that dies mid-delivery delays its jobs by at most this
    /// much in Postgres (the on-disk queue, one process's alone, takes them back as soon as that
    /// process starts again).
    pub lease_ms: u64,
    /// Longest delivery attempt (a job's own `timeout_ms` may be shorter).
    pub attempt_timeout_ms: u64,
    /// Jobs claimed per round at most.
    pub batch_size: usize,
    /// Deliveries in flight at most, per process.
    pub concurrency: usize,
    /// How often idle workers look for due jobs (an enqueue wakes them at once).
    pub poll_interval_ms: u64,
    /// Succeeded jobs are deleted this long after they finished (dead letters are kept).
    pub retention_hours: u64,
    /// Run delivery workers in this process (off: the RPCs only, another process delivers).
    pub workers: bool,
    /// Apply this service's migrations once Postgres answers (safe with many replicas).
    pub migrate_on_start: bool,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            database_url: None,
            postgres: PostgresConfig::default(),
            path: None,
            max_attempts: 8,
            backoff_base_ms: 1_000,
            backoff_cap_ms: 30_000,
            lease_ms: 30_000,
            attempt_timeout_ms: 300_000,
            batch_size: 32,
            concurrency: 32,
            poll_interval_ms: 500,
            retention_hours: 24 * 7,
            workers: true,
            migrate_on_start: true,
        }
    }
}

impl QueueConfig {
    fn validate(&self) -> Result<(), Error> {
        for (field, value) in [
            ("queue.max_attempts", u64::from(self.max_attempts)),
            ("queue.backoff_base_ms", self.backoff_base_ms),
            ("queue.backoff_cap_ms", self.backoff_cap_ms),
            ("queue.lease_ms", self.lease_ms),
            ("queue.attempt_timeout_ms", self.attempt_timeout_ms),
            ("queue.batch_size", self.batch_size as u64),
            ("queue.concurrency", self.concurrency as u64),
            ("queue.poll_interval_ms", self.poll_interval_ms),
        ] {
            if value == 0 {
                return Err(Error::Config(format!("{field} must be at least 1")));
            }
        }
        if self.max_attempts > 1_000_000 {
            return Err(Error::Config("queue.max_attempts must be at most 1000000".into()));
        }
        Ok(())
    }

    /// The dispatcher settings.
    pub fn dispatcher(&self) -> DispatcherConfig {
        DispatcherConfig {
            policy: RetryPolicy {
                max_attempts: self.max_attempts as i32,
                base: Duration::from_millis(self.backoff_base_ms),
                cap: Duration::from_millis(self.backoff_cap_ms),
            },
            lease: Duration::from_millis(self.lease_ms),
            attempt_timeout: Duration::from_millis(self.attempt_timeout_ms),
            batch_size: self.batch_size,
            concurrency: self.concurrency,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
        }
    }
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
            max_embeddings_bytes: 96 * 1024 * 1024,
            max_retries: 2,
            retry_base_delay_ms: 200,
            retry_max_delay_ms: 10_000,
            queue: QueueConfig::default(),
            cloud: cloud::CloudConfig::default(),
            quota_endpoint: None,
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
            ("max_embeddings_bytes", self.max_embeddings_bytes as u64),
            ("retry_base_delay_ms", self.retry_base_delay_ms),
            ("retry_max_delay_ms", self.retry_max_delay_ms),
        ] {
            if value == 0 {
                return Err(Error::Config(format!("{field} must be at least 1")));
            }
        }
        self.queue.validate()?;
        self.cloud.validate().map_err(Error::from)
    }

    /// Fills `queue.database_url` from `DATABASE_URL` when neither a database nor a queue
    /// directory is configured, and the cloud's URL and key from `MESHGATE_CLOUD_URL` and
    /// `MESHGATE_CLOUD_KEY` when unset (what the `meshgate-sync` binary does).
    pub fn with_env_urls(mut self) -> Self {
        if self.queue.database_url.is_none() && self.queue.path.is_none() {
            self.queue.database_url = std::env::var("DATABASE_URL").ok().filter(|v| !v.trim().is_empty());
        }
        self.cloud = self.cloud.with_env();
        self
    }

    /// The providers of this configuration: the file's list merged with the process
    /// environment (when [`Config::providers_from_env`]), validated, in fallback order.
    pub fn resolve_providers(&self) -> Result<Vec<ProviderSpec>, Error> {
        let env: Vec<(String, String)> =
            if self.providers_from_env { meshgate_catalog::process_env().collect() } else { Vec::new() };
        Ok(meshgate_catalog::resolve_providers(&self.providers, env)?)
    }
}

/// Runs the sync service on `listeners` until `shutdown`, with the system clock.
pub async fn serve(config: Config, listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    serve_with_clock(config, listeners, shutdown, system_clock()).await
}

/// [`serve`] with the clock the queue reads (tests move time by hand). Ready once the queue's
/// store answers (and its migrations are applied); a provider that is down fails its own calls,
/// not the service's health.
pub async fn serve_with_clock(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
    clock: SharedClock,
) -> Result<(), Error> {
    let providers = config.resolve_providers()?;
    let host = ServiceHost::new("sync");
    let metrics = UpstreamMetrics::new();
    metrics.register(host.metrics());
    let upstream = Upstream::new(&config, &providers, metrics)?;
    let names: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
    tracing::info!(providers = ?names, "sync: upstream providers");

    let queue_config = &config.queue;
    let pool =
        queue_config.database_url.as_deref().map(|url| postgres_pool(url, &queue_config.postgres)).transpose()?;
    let store: Option<Arc<dyn JobStore>> = match (&pool, &queue_config.path) {
        (Some(pool), _) => Some(Arc::new(PgJobStore::new(pool.clone()))),
        (None, Some(path)) => Some(Arc::new(FileJobStore::open(path)?)),
        (None, None) => None,
    };
    let queue_metrics = QueueMetrics::new();
    queue_metrics.register(host.metrics());
    let charger = match &config.quota_endpoint {
        Some(endpoint) => {
            let channel = listeners
                .channel(endpoint, Duration::from_secs(2))
                .map_err(|err| Error::Config(format!("quota_endpoint: {err}")))?;
            Some(Charger::new(QuotaClient::new(channel), Duration::from_secs(5)))
        }
        None => {
            tracing::info!("sync: no quota_endpoint: delivered jobs are not charged");
            None
        }
    };
    let queue = store.clone().map(|store| {
        tracing::info!(store = store.kind(), "sync: durable queue");
        let dispatcher = Dispatcher::new(
            store.clone(),
            upstream.clone(),
            clock.clone(),
            queue_config.dispatcher(),
            queue_metrics.clone(),
        );
        let dispatcher = match &charger {
            Some(charger) => dispatcher.charging(charger.clone()),
            None => dispatcher,
        };
        Queue::new(store, dispatcher, clock.clone(), queue_config.max_attempts as i32, queue_metrics)
    });
    if queue.is_none() {
        tracing::info!("sync: no durable queue configured (queue.database_url or queue.path)");
    }

    let ready = Arc::new(AtomicBool::new(false));
    if let Some(queue) = &queue {
        tokio::spawn(run_queue(queue.clone(), ready.clone(), queue_config.clone(), clock, shutdown.clone()));
    }
    let cloud_metrics = cloud::CloudMetrics::new();
    cloud_metrics.register(host.metrics());
    let uplink = cloud::start(&config.cloud, cloud_metrics, shutdown.clone())?;
    let service = SyncServer::new(SyncService::new(upstream, queue.clone(), uplink))
        .max_decoding_message_size(meshgate_runtime::mesh::MAX_MESSAGE_BYTES);
    let probe = readiness_probe(store, pool, queue_config.migrate_on_start, ready);
    host.run(service, listeners, probe, shutdown).await?;
    Ok(())
}

/// Starts the workers once the store is ready, and purges old succeeded jobs hourly.
async fn run_queue(queue: Queue, ready: Arc<AtomicBool>, config: QueueConfig, clock: SharedClock, shutdown: Shutdown) {
    while !ready.load(Ordering::Acquire) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let workers = config.workers.then(|| tokio::spawn(queue.dispatcher().clone().run(shutdown.clone())));
    let retention = chrono::TimeDelta::hours(config.retention_hours.min(i64::MAX as u64 / 3600) as i64);
    loop {
        if let Some(before) = clock.now().checked_sub_signed(retention) {
            match queue.store().purge(before).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "sync queue: purged succeeded jobs past their retention"),
                Err(err) => tracing::warn!(error = %err, "sync queue: purging old jobs failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
    if let Some(workers) = workers
        && let Err(err) = workers.await
    {
        tracing::warn!(%err, "sync queue: the workers ended abnormally");
    }
}

type ProbeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// Ready when the queue's store answers and, with Postgres, migrations are applied.
fn readiness_probe(
    store: Option<Arc<dyn JobStore>>,
    pool: Option<PgPool>,
    migrate_on_start: bool,
    ready: Arc<AtomicBool>,
) -> impl Fn() -> ProbeFuture + Send + Sync + 'static {
    let migrated = Arc::new(AtomicBool::new(!migrate_on_start));
    move || {
        let (store, pool, migrated, ready) = (store.clone(), pool.clone(), migrated.clone(), ready.clone());
        Box::pin(async move {
            if let Some(pool) = pool
                && !migrated.load(Ordering::Acquire)
            {
                migrate(&pool, COMPONENT, migrations()).await.map_err(|e| e.to_string())?;
                migrated.store(true, Ordering::Release);
            }
            if let Some(store) = store {
                store.ping().await.map_err(|e| e.to_string())?;
            }
            ready.store(true, Ordering::Release);
            Ok(())
        })
    }
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
