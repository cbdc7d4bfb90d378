//! gRPC clients between services: lazy channels whose requests carry the caller's trace context
//! and, from a [`crate::mesh::ServiceIdentity`], the caller's identity. The mesh's channel
//! constructors ([`ServiceIdentity::channel`], [`Mesh::anonymous_channel`]) live here, above
//! `mesh`, which only hands them the TLS to connect with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceExt as _;

use crate::mesh::{LocalCaller, Mesh, SecurityError, ServiceIdentity, TlsConnector};

/// A channel to another meshgate service; every request carries W3C `traceparent`. A service
/// running in this process with in-process calls on is called directly (see [`crate::in_process`]).
#[derive(Clone)]
pub struct MeshChannel {
    network: Channel,
    /// The endpoint's address when it names one (`http://127.0.0.1:50054`), to find the service
    /// in this process.
    local: Option<SocketAddr>,
    /// The calling identity, handed to a service in this process with each request.
    caller: Option<Arc<str>>,
}

impl tower::Service<http::Request<tonic::body::Body>> for MeshChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = crate::in_process::BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is awaited per call below, on the path the call takes.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        crate::telemetry::inject_span_context(&tracing::Span::current(), request.headers_mut());
        if let Some(service) = self.local.and_then(crate::in_process::lookup) {
            if let Some(caller) = &self.caller {
                request.extensions_mut().insert(LocalCaller(caller.clone()));
            }
            return service(request);
        }
        let network = self.network.clone();
        Box::pin(async move { network.oneshot(request).await.map_err(Into::into) })
    }
}

/// An endpoint URL that is not a valid URI.
#[derive(Debug, thiserror::Error)]
#[error("invalid service endpoint {endpoint:?}: {message}")]
pub struct EndpointError {
    pub endpoint: String,
    pub message: String,
}

/// A lazily connecting plaintext channel to `endpoint` (e.g. `http://127.0.0.1:50054`) without
/// an identity: for services running without a mesh configuration (library use, tests).
/// Creating it never fails on a peer that is down; calls fail with UNAVAILABLE until it is back,
/// then recover. Services call their peers through
/// [`ServiceIdentity::channel`](crate::mesh::ServiceIdentity::channel) (or
/// [`crate::Listeners::channel`]).
pub fn channel(endpoint: &str, connect_timeout: Duration) -> Result<MeshChannel, EndpointError> {
    build_channel(endpoint, connect_timeout, None, None)
}

/// A channel calling as `caller`, over mTLS when `tls` is given.
pub(crate) fn build_channel(
    endpoint: &str,
    connect_timeout: Duration,
    caller: Option<Arc<str>>,
    tls: Option<TlsConnector>,
) -> Result<MeshChannel, EndpointError> {
    let endpoint_config = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|err| EndpointError { endpoint: endpoint.to_owned(), message: err.to_string() })?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let network = match tls {
        Some(tls) => endpoint_config.connect_with_connector_lazy(tls),
        None => endpoint_config.connect_lazy(),
    };
    let local = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .and_then(|rest| rest.trim_end_matches('/').parse::<SocketAddr>().ok());
    Ok(MeshChannel { network, local, caller })
}

impl Mesh {
    /// A channel without an identity: with mTLS, TLS that checks the server against the mesh CA
    /// and presents no certificate — how a public client reaches the gateway's gRPC edge.
    pub fn anonymous_channel(&self, endpoint: &str, connect_timeout: Duration) -> Result<MeshChannel, SecurityError> {
        let tls = self.anonymous_tls()?;
        build_channel(endpoint, connect_timeout, None, tls).map_err(|err| SecurityError::Config(err.to_string()))
    }
}

impl ServiceIdentity {
    /// A lazily connecting channel to `endpoint` as this identity: mTLS presenting its
    /// certificate (whatever the URL's scheme) and checking the server's under the endpoint's
    /// host; in process, the identity rides along as a request extension.
    pub fn channel(&self, endpoint: &str, connect_timeout: Duration) -> Result<MeshChannel, EndpointError> {
        build_channel(endpoint, connect_timeout, Some(self.caller_name()), self.client_tls())
    }
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
