//! The edge: OpenAI-compatible HTTP/JSON and a gRPC facade in front of the mesh. It
//! authenticates, validates, and orchestrates quota, routing, the targets and tracing.

pub mod auth;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod orchestrator;
pub mod outcomes;
pub mod quota;
pub mod tokens;
pub mod traces;

use std::time::Duration;

use meshgate_proto::analytics::v1::analytics_client::AnalyticsClient;
use meshgate_proto::gateway::v1::gateway_server::GatewayServer;
use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_proto::router::v1::router_client::RouterClient;
use meshgate_proto::sync::v1::sync_client::SyncClient;
use meshgate_runtime::{ErrorCode, Listeners, ServiceHost, Shutdown};
use serde::{Deserialize, Serialize};

pub use auth::Authenticator;

/// Gateway configuration (`[gateway]`, `MESHGATE_GATEWAY__*`).
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
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Most messages in one chat request.
    pub max_messages: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_cap: i64,
    /// Completion tokens reserved when a request sets no `max_tokens`.
    pub default_max_tokens: i64,
    /// A target that sends nothing for this long is abandoned for the next one.
    pub target_timeout_ms: u64,
    /// A started reply that stays silent this long is ended with an error.
    pub idle_timeout_ms: u64,
    /// Deadline of quota and router calls.
    pub peer_timeout_ms: u64,
    /// Requests handled at once by the HTTP edge; more are shed with 503.
    pub max_concurrent_requests: usize,
    /// Trace records buffered for analytics at most.
    pub trace_buffer: usize,
    pub trace_batch_size: usize,
    pub trace_flush_ms: u64,
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
            max_body_bytes: 1024 * 1024,
            max_messages: 1024,
            max_tokens_cap: 131_072,
            default_max_tokens: 1024,
            target_timeout_ms: 30_000,
            idle_timeout_ms: 120_000,
            peer_timeout_ms: 2_000,
            max_concurrent_requests: 4096,
            trace_buffer: 16_384,
            trace_batch_size: 256,
            trace_flush_ms: 200,
        }
    }
}

/// Errors of the gateway service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid gateway configuration: {0}")]
    Config(String),
    #[error("edge HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Serve(#[from] meshgate_runtime::ServeError),
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Config(_) => ErrorCode::InvalidRequest,
            Error::Http(_) | Error::Serve(_) => ErrorCode::Internal,
        }
    }
}

fn connect(endpoint: &str) -> Result<meshgate_runtime::MeshChannel, Error> {
    meshgate_runtime::channel(endpoint, Duration::from_secs(2)).map_err(|err| Error::Config(err.to_string()))
}

/// Runs the edge: HTTP on `listeners.http` (required) and gRPC on `listeners.grpc`.
pub async fn serve(config: Config, mut listeners: Listeners, shutdown: Shutdown) -> Result<(), Error> {
    let admin_key =
        config.admin_key.clone().or_else(|| std::env::var("MESHGATE_ADMIN_KEY").ok()).filter(|k| !k.is_empty());
    if admin_key.is_none() {
        tracing::warn!("no admin key configured (MESHGATE_ADMIN_KEY): every request will be refused with 401");
    }
    if config.max_body_bytes == 0
        || config.max_messages == 0
        || config.max_tokens_cap < 1
        || config.default_max_tokens < 1
    {
        return Err(Error::Config(
            "max_body_bytes, max_messages, max_tokens_cap and default_max_tokens must be positive".into(),
        ));
    }
    // Off the request path: the first request naming an OpenAI model would otherwise pay for it.
    tokio::task::spawn_blocking(tokens::warm_up);
    let http_listener =
        listeners.http.take().ok_or_else(|| Error::Config("the gateway needs an HTTP listener".into()))?;
    let quota = connect(&config.quota_endpoint)?;
    let router = connect(&config.router_endpoint)?;
    let peers = orchestrator::Peers {
        quota: QuotaClient::new(quota.clone()),
        router: RouterClient::new(router.clone()),
        sync: SyncClient::new(connect(&config.sync_endpoint)?),
        inference: InferenceClient::new(connect(&config.inference_endpoint)?),
    };
    let host = ServiceHost::new("gateway");
    let metrics = metrics::GatewayMetrics::register(host.metrics());
    let (traces, uploader) = traces::TraceSink::start(
        AnalyticsClient::new(connect(&config.analytics_endpoint)?),
        traces::TraceSinkConfig {
            capacity: config.trace_buffer,
            batch_size: config.trace_batch_size.max(1),
            flush_interval: Duration::from_millis(config.trace_flush_ms.max(1)),
        },
        metrics.traces.clone(),
    );
    let path = orchestrator::PathConfig {
        default_max_tokens: config.default_max_tokens,
        first_piece_timeout: Duration::from_millis(config.target_timeout_ms.max(1)),
        idle_timeout: Duration::from_millis(config.idle_timeout_ms.max(1)),
        peer_timeout: Duration::from_millis(config.peer_timeout_ms.max(1)),
    };
    let auth = Authenticator::new(admin_key.as_deref());
    let limits = openai::ChatLimits { max_messages: config.max_messages, max_tokens_cap: config.max_tokens_cap };
    let (outcomes, outcome_sender) =
        outcomes::OutcomeReporter::start(RouterClient::new(router.clone()), path.peer_timeout);
    let orchestrator = orchestrator::Orchestrator::new(peers, path, traces, outcomes, metrics.clone());
    let edge = http::Edge {
        orchestrator: orchestrator.clone(),
        auth: auth.clone(),
        limits,
        max_body_bytes: config.max_body_bytes,
        metrics,
    };
    let app = http::router(edge, config.max_concurrent_requests.max(1));
    tracing::info!(http = ?http_listener.local_addr().ok(), "edge listening");
    let http_shutdown = shutdown.clone();
    let drain = host.drain_deadline();
    let http_server = async move {
        let serving = axum::serve(meshgate_runtime::server::nodelay(http_listener), app)
            .with_graceful_shutdown(http_shutdown.cancelled_owned());
        tokio::select! {
            result = serving => result.map_err(Error::Http),
            _ = async { http_shutdown.cancelled().await; tokio::time::sleep(drain).await } => {
                tracing::warn!(?drain, "edge drain deadline passed; dropping open streams");
                Ok(())
            }
        }
    };
    let grpc = GatewayServer::new(grpc::GatewayService { orchestrator, auth, limits });
    let probe = readiness_probe(quota, router);
    let grpc_server = async move { host.run(grpc, listeners, probe, shutdown).await.map_err(Error::from) };
    tokio::try_join!(http_server, grpc_server)?;
    // The servers are down and dropped their handles; the last settlements finish, then the
    // uploader sends the remaining traces and ends.
    let flushed = tokio::time::timeout(drain, async { tokio::join!(uploader, outcome_sender) }).await;
    if flushed.is_err() {
        tracing::warn!("traces or outcomes still buffered at the drain deadline were not delivered");
    }
    Ok(())
}

/// The edge is ready when the services every request needs (quota and router) are SERVING.
fn readiness_probe(
    quota: meshgate_runtime::MeshChannel,
    router: meshgate_runtime::MeshChannel,
) -> impl Fn() -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync + 'static {
    move || {
        let peers = [("quota", quota.clone()), ("router", router.clone())];
        Box::pin(async move {
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
