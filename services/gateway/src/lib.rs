//! The edge: OpenAI-compatible HTTP/JSON and a gRPC facade in front of the mesh. It
//! authenticates, validates, and orchestrates quota, routing, the targets and tracing.

pub mod admin;
pub mod admission;
pub mod analytics;
pub mod api;
pub mod auth;
pub mod budget;
pub mod chat;
pub mod chat_flow;
pub mod client_addr;
pub mod completions;
pub mod concurrency;
pub mod config;
pub mod edge_sync;
pub mod embeddings;
pub mod grpc;
pub mod guard;
pub mod http;
pub mod invalidation;
pub mod jobs;
pub mod messages;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod openapi;
pub mod orchestrator;
pub mod outcomes;
pub mod peers;
pub mod plan_cache;
pub mod quota;
pub mod quota_gate;
pub mod reply_scan;
pub mod response;
pub mod responses;
pub mod settings;
pub mod stored_responses;
pub mod subscriber;
pub mod tenancy;
pub mod tokens;
pub mod traces;

use std::time::Duration;

use meshgate_proto::analytics::v1::analytics_client::AnalyticsClient;
use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_proto::router::v1::router_client::RouterClient;
use meshgate_proto::sync::v1::sync_client::SyncClient;
use meshgate_runtime::{ErrorCode, Listeners, ServiceHost, Shutdown};

pub use auth::Authenticator;
pub use config::Config;

/// Errors of the gateway service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid gateway configuration: {0}")]
    Config(String),
    #[error("edge HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Serve(#[from] meshgate_runtime::ServeError),
    #[error(transparent)]
    Storage(#[from] meshgate_storage::Error),
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Config(_) => ErrorCode::InvalidRequest,
            Error::Http(_) | Error::Serve(_) => ErrorCode::Internal,
            Error::Storage(e) => e.code(),
        }
    }
}

/// Component name of the gateway's migrations in `schema_migrations`.
pub const COMPONENT: &str = "gateway";

static MIGRATIONS: &[meshgate_storage::Migration] = &[
    meshgate_storage::Migration { version: 1, name: "tenancy", sql: include_str!("../migrations/0001_tenancy.sql") },
    meshgate_storage::Migration {
        version: 2,
        name: "project_settings",
        sql: include_str!("../migrations/0002_project_settings.sql"),
    },
    meshgate_storage::Migration {
        version: 3,
        name: "edge_batches",
        sql: include_str!("../migrations/0003_edge_batches.sql"),
    },
    meshgate_storage::Migration {
        version: 4,
        name: "stored_responses",
        sql: include_str!("../migrations/0004_stored_responses.sql"),
    },
];

/// The gateway's schema migrations (tenancy, API keys, project security policy and limits, the
/// edge batches applied).
pub fn migrations() -> &'static [meshgate_storage::Migration] {
    MIGRATIONS
}

/// A channel to a peer, presenting the gateway's identity.
fn connect(listeners: &Listeners, endpoint: &str) -> Result<meshgate_runtime::MeshChannel, Error> {
    listeners.channel(endpoint, Duration::from_secs(2)).map_err(|err| Error::Config(err.to_string()))
}

/// Runs the edge: HTTP on `listeners.http` (required) and gRPC on `listeners.grpc`.
pub async fn serve(config: Config, mut listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    let admin_key =
        config.admin_key.clone().or_else(|| std::env::var("MESHGATE_ADMIN_KEY").ok()).filter(|k| !k.is_empty());
    if admin_key.is_none() {
        tracing::warn!("no admin key configured (MESHGATE_ADMIN_KEY): every request will be refused with 401");
    }
    config.validate()?;
    let proxies =
        client_addr::TrustedProxies::parse(&config.trusted_proxies).map_err(|e| Error::Config(e.to_string()))?;
    let streams =
        concurrency::TenantCaps::new("streams open", config.max_streams_per_key, config.max_streams_per_project);
    // Off the request path: the first request naming an OpenAI model would otherwise pay for it.
    tokio::task::spawn_blocking(tokens::warm_up);
    let http_listener =
        listeners.http.take().ok_or_else(|| Error::Config("the gateway needs an HTTP listener".into()))?;
    let quota = connect(&listeners, &config.quota_endpoint)?;
    let router = connect(&listeners, &config.router_endpoint)?;
    let analytics = AnalyticsClient::new(connect(&listeners, &config.analytics_endpoint)?);
    let peers = peers::Peers {
        analytics: analytics.clone(),
        quota: QuotaClient::new(quota.clone()),
        router: RouterClient::new(router.clone()),
        // Embeddings answers carry whole batches of vectors.
        sync: SyncClient::new(connect(&listeners, &config.sync_endpoint)?)
            .max_decoding_message_size(meshgate_runtime::mesh::MAX_MESSAGE_BYTES),
        inference: InferenceClient::new(connect(&listeners, &config.inference_endpoint)?),
        timeout: Duration::from_millis(config.peer_timeout_ms),
    };
    let host = ServiceHost::new("gateway");
    let metrics = metrics::GatewayMetrics::register(host.metrics());
    let (traces, uploader) = traces::TraceSink::start(
        analytics,
        config.cloud_uplink.then(|| peers.sync.clone()),
        traces::TraceSinkConfig {
            capacity: config.trace_buffer,
            batch_size: config.trace_batch_size,
            flush_interval: Duration::from_millis(config.trace_flush_ms),
        },
        metrics.traces.clone(),
    );
    let path = orchestrator::PathConfig {
        default_max_tokens: config.default_max_tokens,
        first_piece_timeout: Duration::from_millis(config.target_timeout_ms),
        idle_timeout: Duration::from_millis(config.idle_timeout_ms),
    };
    let pg =
        config.database_url.as_deref().map(|url| meshgate_storage::postgres_pool(url, &config.postgres)).transpose()?;
    let tenancy: std::sync::Arc<dyn tenancy::TenancyStore> = match &pg {
        Some(pool) => std::sync::Arc::new(tenancy::PostgresTenancy::new(pool.clone())),
        None => {
            tracing::warn!("no database_url: organizations, users and API keys live in memory and are lost on restart");
            std::sync::Arc::new(tenancy::MemoryTenancy::default())
        }
    };
    let redis_client = config
        .redis_url
        .as_deref()
        .map(|url| redis::Client::open(url).map_err(|err| Error::Config(format!("invalid redis_url: {err}"))))
        .transpose()?;
    let redis =
        config.redis_url.as_deref().map(|url| meshgate_storage::redis_connection(url, &config.redis)).transpose()?;
    // With Redis, other replicas may change keys and settings: caches wait to be subscribed.
    let subscription = invalidation::Subscription::new(redis_client.is_some());
    let auth = Authenticator::new(
        admin_key.as_deref(),
        tenancy,
        auth::AuthSettings {
            cache_ttl: Duration::from_millis(config.key_cache_ttl_ms),
            max_failures: config.max_auth_failures_per_minute,
            failure_window: Duration::from_secs(60),
        },
        subscription.clone(),
    );
    let settings = settings::SettingsCache::new(
        auth.store().clone(),
        subscription.clone(),
        Duration::from_millis(config.key_cache_ttl_ms),
    );
    let stop_listener = Shutdown::new();
    let listener = redis_client.map(|client| {
        let listening = subscriber::listen(client, auth.clone(), settings.clone(), subscription, stop_listener.clone());
        tokio::spawn(listening)
    });
    let injection = std::sync::Arc::new(guard::InferenceInjection::new(
        peers.inference.clone(),
        config.injection_model.clone(),
        Duration::from_millis(config.injection_timeout_ms),
    ));
    let injection_watch = tokio::spawn(injection.clone().watch(stop_listener.clone()));
    let guard = guard::Guard::new(Some(injection), metrics.clone());
    let limits = openai::ChatLimits { max_messages: config.max_messages, max_tokens_cap: config.max_tokens_cap };
    let (outcomes, outcome_sender) = outcomes::OutcomeReporter::start(RouterClient::new(router.clone()), peers.timeout);
    let quota_gate = quota_gate::QuotaGate::new(
        peers.quota.clone(),
        peers.timeout,
        config.quota_leases.then(|| config.leases.clone()),
        metrics.clone(),
    )
    .map_err(|err| Error::Config(err.to_string()))?;
    let plans = std::sync::Arc::new(plan_cache::PlanCache::default());
    let plans_watch = tokio::spawn(plans.clone().watch(RouterClient::new(router.clone()), stop_listener.clone()));
    let orchestrator =
        orchestrator::Orchestrator::new(peers, plans, quota_gate.clone(), path, traces, outcomes, metrics.clone());
    let admission = admission::Admission { orchestrator: orchestrator.clone(), guard, limits };
    let app = api::AppState {
        orchestrator,
        admission: admission.clone(),
        auth: auth.clone(),
        max_body_bytes: config.max_body_bytes,
        metrics,
        invalidator: invalidation::Invalidator::new(redis),
        settings: settings.clone(),
        streams: streams.clone(),
        uploads: concurrency::TenantCaps::new("edge batches in progress", config.edge_uploads_per_key, 0),
        proxies: proxies.clone(),
        responses: stored_responses(&config, pg.clone()),
    };
    let app = http::router(app, config.max_concurrent_requests);
    tracing::info!(http = ?http_listener.local_addr().ok(), "edge listening");
    let http_shutdown = shutdown.clone();
    let drain = host.drain_deadline();
    let http_server = async move {
        let serving = axum::serve(
            meshgate_runtime::server::nodelay(http_listener),
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(http_shutdown.cancelled_owned());
        tokio::select! {
            result = serving => result.map_err(Error::Http),
            _ = async { http_shutdown.cancelled().await; tokio::time::sleep(drain).await } => {
                tracing::warn!(?drain, "edge drain deadline passed; dropping open streams");
                Ok(())
            }
        }
    };
    let grpc =
        grpc::GatewayService { admission, auth, max_body_bytes: config.max_body_bytes, settings, streams, proxies }
            .into_server();
    let probe = readiness_probe(quota, router, pg, config.migrate_on_start);
    let grpc_server = async move { host.run(grpc, listeners, probe, shutdown).await.map_err(Error::from) };
    let served = tokio::try_join!(http_server, grpc_server);
    stop_listener.trigger();
    if let Some(listener) = listener {
        let _ = listener.await;
    }
    let _ = injection_watch.await;
    let _ = plans_watch.await;
    served?;
    // The servers are down and dropped their handles; the last settlements finish, then the
    // uploader sends the remaining traces and ends.
    let flushed = tokio::time::timeout(drain, async { tokio::join!(uploader, outcome_sender) }).await;
    if flushed.is_err() {
        tracing::warn!("traces or outcomes still buffered at the drain deadline were not delivered");
    }
    // Every request has settled: the usage charged to leases is reported and the unused slices go
    // back to the budget now, not when the leases expire.
    quota_gate.close().await;
    Ok(())
}

/// Where the Responses API keeps stored responses: Postgres when the gateway has it (every replica
/// sees them), else this process's memory.
fn stored_responses(
    config: &Config,
    pg: Option<meshgate_storage::PgPool>,
) -> std::sync::Arc<dyn stored_responses::ResponseStore> {
    let retention = Duration::from_secs(u64::from(config.response_retention_days) * 86_400);
    match pg {
        Some(pool) => std::sync::Arc::new(stored_responses::PostgresResponses::new(pool, retention)),
        None => std::sync::Arc::new(stored_responses::MemoryResponses::new(config.memory_stored_responses, retention)),
    }
}

/// The edge is ready when the services every request needs (quota and router) are SERVING and
/// the tenancy database (when configured) answers with its migrations applied.
fn readiness_probe(
    quota: meshgate_runtime::MeshChannel,
    router: meshgate_runtime::MeshChannel,
    pg: Option<meshgate_storage::PgPool>,
    migrate_on_start: bool,
) -> impl Fn() -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync + 'static {
    let migrated = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(!migrate_on_start));
    move || {
        let peers = [("quota", quota.clone()), ("router", router.clone())];
        let (pg, migrated) = (pg.clone(), migrated.clone());
        Box::pin(async move {
            if let Some(pool) = pg {
                meshgate_storage::ping_postgres(&pool, Duration::from_secs(2)).await.map_err(|e| e.to_string())?;
                if !migrated.load(std::sync::atomic::Ordering::Acquire) {
                    meshgate_storage::migrate(&pool, COMPONENT, migrations()).await.map_err(|e| e.to_string())?;
                    migrated.store(true, std::sync::atomic::Ordering::Release);
                }
            }
            for (name, channel) in peers {
                match meshgate_runtime::client::health_status(channel, "", Duration::from_secs(1)).await {
                    Ok(tonic_health::pb::health_check_response::ServingStatus::Serving) => {}
                    Ok(status) => return Err(format!("{name} is {status:?}")),
                    Err(reason) => return Err(format!("{name}: {reason}")),
                }
            }
            Ok(())
        })
    }
}
