//! gRPC clients between services: lazy channels whose requests carry the caller's trace context.

use std::time::Duration;

use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A channel to another meshgate service; every request carries W3C `traceparent`.
pub type MeshChannel = InterceptedService<Channel, PropagateContext>;

/// Copies the current tracing span's context into outgoing gRPC metadata.
#[derive(Clone, Copy, Debug, Default)]
pub struct PropagateContext;

impl Interceptor for PropagateContext {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut headers = std::mem::take(request.metadata_mut()).into_headers();
        crate::telemetry::inject_span_context(&tracing::Span::current(), &mut headers);
        *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
        Ok(request)
    }
}

/// An endpoint URL that is not a valid URI.
#[derive(Debug, thiserror::Error)]
#[error("invalid service endpoint {endpoint:?}: {message}")]
pub struct EndpointError {
    pub endpoint: String,
    pub message: String,
}

/// A lazily connecting channel to `endpoint` (e.g. `http://127.0.0.1:50054`): creating it never
/// fails on a peer that is down; calls fail with UNAVAILABLE until it is back, then recover.
pub fn channel(endpoint: &str, connect_timeout: Duration) -> Result<MeshChannel, EndpointError> {
    let channel = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|err| EndpointError { endpoint: endpoint.to_owned(), message: err.to_string() })?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(InterceptedService::new(channel, PropagateContext))
}

/// The gRPC health of `service` (`""` for the whole server) behind `channel`, or why there is
/// none within `timeout`.
pub async fn health_status(channel: MeshChannel, service: &str, timeout: Duration) -> Result<ServingStatus, String> {
    let mut health = HealthClient::new(channel);
    let request = HealthCheckRequest { service: service.to_owned() };
    let response = tokio::time::timeout(timeout, health.check(request))
        .await
        .map_err(|_| format!("no health answer within {} ms", timeout.as_millis()))?
        .map_err(|status| status.message().to_owned())?;
    Ok(ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown))
}

/// Waits until `service` behind `channel` reports SERVING, polling every 20 ms for at most `limit`.
pub async fn wait_serving(channel: &MeshChannel, service: &str, limit: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let status = health_status(channel.clone(), service, Duration::from_secs(1)).await;
        if status == Ok(ServingStatus::Serving) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{service:?} not SERVING within {limit:?}: {status:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
