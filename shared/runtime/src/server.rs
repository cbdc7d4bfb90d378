//! Serving a service: listeners, readiness, the gRPC server with health and reflection, the
//! admin HTTP listener, and draining on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::IntoResponse;
use futures::future::BoxFuture;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tower::ServiceExt as _;
use tracing::Instrument;

use crate::client::{EndpointError, MeshChannel};
use crate::mesh::{GuardLayer, SecurityError, ServiceIdentity, TlsIncoming};
use crate::metrics::Metrics;
use crate::rpc_methods::known_methods;
use crate::shutdown::Shutdown;

/// Sockets a service serves on, and who it is in the mesh. Tests bind `127.0.0.1:0` and pass
/// the listeners in.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
    /// The edge's HTTP listener (gateway only).
    pub http: Option<TcpListener>,
    /// The service's identity: its gRPC listener and its channels use it. `None` (library use
    /// without a mesh configuration): plaintext, and callers are not checked.
    pub identity: Option<ServiceIdentity>,
}

impl Listeners {
    pub async fn bind(addrs: &ListenConfig) -> std::io::Result<Self> {
        Ok(Self {
            grpc: bind(addrs.grpc).await?,
            admin: bind(addrs.admin).await?,
            http: match addrs.http {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
            identity: None,
        })
    }

    /// These listeners, serving as `identity`.
    pub fn with_identity(mut self, identity: ServiceIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// A channel from this service to `endpoint`, presenting its identity (plaintext and
    /// anonymous without one).
    pub fn channel(&self, endpoint: &str, connect_timeout: Duration) -> Result<MeshChannel, EndpointError> {
        match &self.identity {
            Some(identity) => identity.channel(endpoint, connect_timeout),
            None => crate::client::channel(endpoint, connect_timeout),
        }
    }

    /// gRPC, admin and HTTP listeners on ephemeral loopback ports.
    pub async fn ephemeral() -> std::io::Result<Self> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::bind(&ListenConfig { grpc: any, admin: any, http: Some(any) }).await
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        local_addr(&self.grpc)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        local_addr(&self.admin)
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(local_addr)
    }
}

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|err| std::io::Error::new(err.kind(), format!("cannot listen on {addr}: {err}")))
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Where a service listens; `MESHGATE_LISTEN__GRPC`, `__ADMIN`, `__HTTP` override the defaults.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    #[serde(default)]
    pub http: Option<SocketAddr>,
}

/// Whether a service's dependencies answer; drives `/readyz` and gRPC health.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, ready: bool) -> bool {
        self.0.swap(ready, Ordering::Relaxed) != ready
    }
}

/// Errors of the serving machinery itself.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("admin listener failed: {0}")]
    Admin(std::io::Error),
    #[error(transparent)]
    Security(#[from] SecurityError),
}

/// Hosts one gRPC service with everything the README's architecture section asks of every service
/// around it.
#[derive(Clone)]
pub struct ServiceHost {
    name: &'static str,
    metrics: Metrics,
    readiness: Readiness,
    drain_deadline: Duration,
}

impl ServiceHost {
    /// `name` is the short service name (`"quota"`), used in metrics and logs.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            metrics: Metrics::new(name),
            readiness: Readiness::default(),
            drain_deadline: Duration::from_secs(10),
        }
    }

    /// How long in-flight requests may run after shutdown starts.
    pub fn with_drain_deadline(mut self, deadline: Duration) -> Self {
        self.drain_deadline = deadline;
        self
    }

    pub fn drain_deadline(&self) -> Duration {
        self.drain_deadline
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Serves `service` on `listeners.grpc` and the admin endpoints on `listeners.admin` until
    /// `shutdown`. Health is NOT_SERVING until `probe` first succeeds, and follows it afterwards.
    pub async fn run<S, P, Fut>(
        self,
        service: S,
        listeners: Listeners,
        probe: P,
        shutdown: Shutdown,
    ) -> Result<(), ServeError>
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
        P: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let identity = listeners.identity.clone();
        let grpc_addr = local_addr(&listeners.grpc);
        if let Some(identity) = &identity {
            identity.check_listener(grpc_addr)?;
        }
        let (reporter, health_service) = tonic_health::server::health_reporter();
        reporter.set_service_status("", ServingStatus::NotServing).await;
        reporter.set_not_serving::<S>().await;
        let reflection = match identity.as_ref().is_some_and(ServiceIdentity::reflection) {
            true => Some(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(meshgate_proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .build_v1()?,
            ),
            false => None,
        };
        let refusals = self.metrics.grpc_refused.clone();
        let guard = GuardLayer(Arc::new(match &identity {
            Some(identity) => identity.guard(refusals),
            None => crate::mesh::unchecked_guard(refusals),
        }));
        let layers =
            tower::ServiceBuilder::new().layer(ObserveLayer { metrics: self.metrics.clone() }).layer(guard.clone());

        let watcher = tokio::spawn(watch_readiness(
            self.name,
            self.readiness.clone(),
            reporter,
            S::NAME,
            probe,
            shutdown.clone(),
        ));
        let admin =
            tokio::spawn(serve_admin(listeners.admin, self.metrics.clone(), self.readiness.clone(), shutdown.clone()));

        let registration = crate::in_process::enabled().then(|| {
            let mut routes = tonic::service::Routes::new(health_service.clone()).add_service(service.clone());
            if let Some(reflection) = &reflection {
                routes = routes.add_service(reflection.clone());
            }
            let guarded = layers.clone().service(routes);
            let call: crate::in_process::LocalService = Arc::new(move |request| {
                let guarded = guarded.clone();
                Box::pin(async move {
                    let response = guarded.oneshot(request).await.map_err(|never| match never {})?;
                    Ok(response.map(tonic::body::Body::new))
                })
            });
            crate::in_process::register(grpc_addr, call)
        });
        // Callers in this process meet the closing listener from the start of the shutdown on.
        let unregister = shutdown.clone();
        tokio::spawn(async move {
            unregister.cancelled().await;
            drop(registration);
        });
        let tls = identity.as_ref().and_then(|identity| identity.tls().cloned());
        tracing::info!(
            service = self.name,
            grpc = %grpc_addr,
            identity = identity.as_ref().map(ServiceIdentity::name),
            mtls = tls.is_some(),
            "serving"
        );
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .layer(layers)
            .add_service(health_service)
            .add_optional_service(reflection)
            .add_service(service);
        let stopped = shutdown.cancelled_owned();
        let server: BoxFuture<'static, Result<(), tonic::transport::Error>> = match tls {
            Some(tls) => Box::pin(router.serve_with_incoming_shutdown(TlsIncoming::new(listeners.grpc, tls), stopped)),
            // The builder's tcp_nodelay only applies to listeners tonic binds itself; without
            // it, streamed replies wait on Nagle + delayed ACK (~40 ms per request).
            None => Box::pin(router.serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
                stopped,
            )),
        };
        let deadline = self.drain_deadline;
        let drained = tokio::select! {
            result = server => { result?; true }
            _ = async { shutdown.cancelled().await; tokio::time::sleep(deadline).await } => false,
        };
        if !drained {
            tracing::warn!(service = self.name, ?deadline, "drain deadline passed; dropping remaining requests");
        }
        watcher.abort();
        match admin.await {
            Ok(result) => result.map_err(ServeError::Admin)?,
            Err(err) => tracing::warn!(service = self.name, %err, "admin listener task ended abnormally"),
        }
        tracing::info!(service = self.name, "stopped");
        Ok(())
    }
}

/// Polls `probe` (fast until the first success, then every two seconds) and mirrors it into
/// gRPC health and `/readyz`. Shutdown turns both NOT_SERVING at once so balancers stop sending.
async fn watch_readiness<P, Fut>(
    name: &'static str,
    readiness: Readiness,
    reporter: tonic_health::server::HealthReporter,
    grpc_service: &'static str,
    probe: P,
    shutdown: Shutdown,
) where
    P: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let mut interval = Duration::from_millis(100);
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            result = probe() => result,
        };
        let ready = result.is_ok();
        if readiness.set(ready) {
            let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
            reporter.set_service_status("", status).await;
            reporter.set_service_status(grpc_service, status).await;
            match result {
                Ok(()) => tracing::info!(service = name, "ready"),
                Err(reason) => tracing::warn!(service = name, %reason, "not ready"),
            }
        }
        if ready {
            interval = Duration::from_secs(2);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    readiness.set(false);
    reporter.set_service_status("", ServingStatus::NotServing).await;
    reporter.set_service_status(grpc_service, ServingStatus::NotServing).await;
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    readiness: Readiness,
}

/// The admin router: `/livez`, `/readyz`, `/metrics`.
pub fn admin_router(metrics: Metrics, readiness: Readiness) -> axum::Router {
    axum::Router::new()
        .route("/livez", axum::routing::get(|| async { "ok" }))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(render_metrics))
        .with_state(AdminState { metrics, readiness })
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.readiness.is_ready() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
}

async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

async fn serve_admin(
    listener: TcpListener,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    axum::serve(nodelay(listener), admin_router(metrics, readiness))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// An HTTP listener whose accepted connections have Nagle's algorithm off: replies written in
/// several pieces (headers, body, SSE events) must not wait for the peer's delayed ACK.
pub fn nodelay(listener: TcpListener) -> axum::serve::TapIo<TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt;
    fn set_nodelay(tcp: &mut tokio::net::TcpStream) {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "cannot set TCP_NODELAY");
        }
    }
    listener.tap_io(set_nodelay as fn(&mut tokio::net::TcpStream))
}

/// Tower layer around every gRPC request: joins the caller's trace, records metrics.
#[derive(Clone)]
struct ObserveLayer {
    metrics: Metrics,
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
struct Observe<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, B, R> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: http_body::Body + Unpin,
{
    type Response = http::Response<ObservedBody<R>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Only methods the contracts declare become label values: a client sending made-up
        // paths must not grow the metric's cardinality.
        let method = known_methods().get(request.uri().path()).copied().unwrap_or("other");
        let span = tracing::info_span!("grpc.server", otel.name = method, otel.kind = "server", rpc.system = "grpc");
        crate::telemetry::set_parent_from_headers(&span, request.headers());
        let start = Instant::now();
        let future = self.inner.call(request);
        let metrics = self.metrics.clone();
        Box::pin(
            async move {
                let response = future.await?;
                // A trailers-only answer (every unary error) carries its status in the headers;
                // otherwise the status comes in the trailers at the end of the body.
                let header_code =
                    response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned);
                let finish = Finish { metrics, method, start, header_code };
                Ok(response.map(|inner| ObservedBody { inner, finish: Some(finish) }))
            }
            .instrument(span),
        )
    }
}

/// Records a gRPC call's metrics once its response ends, with its final status.
struct Finish {
    metrics: Metrics,
    method: &'static str,
    start: Instant,
    header_code: Option<String>,
}

impl Finish {
    fn record(self, trailer_code: Option<&str>) {
        let code = trailer_code.or(self.header_code.as_deref()).unwrap_or("0");
        self.metrics.observe_grpc(self.method, code, self.start.elapsed().as_secs_f64());
    }
}

/// A response body that reports the call's status and duration when it ends (streams included).
pub struct ObservedBody<B> {
    inner: B,
    finish: Option<Finish>,
}

impl<B: http_body::Body + Unpin> http_body::Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(finish) = this.finish.take()
                {
                    finish.record(trailers.get("grpc-status").and_then(|v| v.to_str().ok()));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(finish) = this.finish.take() {
                    finish.record(Some("transport"));
                }
            }
            Poll::Ready(None) => {
                if let Some(finish) = this.finish.take() {
                    finish.record(None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        // The body went away before it ended: the client cancelled the call.
        if let Some(finish) = self.finish.take() {
            let cancelled = if finish.header_code.is_some() { None } else { Some("1") };
            finish.record(cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Frames = Vec<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>>;
    type FrameBody = http_body_util::StreamBody<futures::stream::Iter<<Frames as IntoIterator>::IntoIter>>;

    fn frames(frames: Vec<http_body::Frame<bytes::Bytes>>) -> FrameBody {
        http_body_util::StreamBody::new(futures::stream::iter(frames.into_iter().map(Ok).collect::<Frames>()))
    }

    fn observed<B>(inner: B, metrics: &Metrics, header_code: Option<&str>) -> ObservedBody<B> {
        let finish = Finish {
            metrics: metrics.clone(),
            method: "/meshgate.sync.v1.Sync/Complete",
            start: Instant::now(),
            header_code: header_code.map(str::to_owned),
        };
        ObservedBody { inner, finish: Some(finish) }
    }

    fn count(metrics: &Metrics, code: &str) -> u64 {
        metrics.grpc_requests.with_label_values(&["/meshgate.sync.v1.Sync/Complete", code]).get()
    }

    #[tokio::test]
    async fn a_stream_is_counted_once_with_the_status_of_its_trailers() {
        use http_body_util::BodyExt;
        let metrics = Metrics::new("test");
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
        let body =
            frames(vec![http_body::Frame::data(bytes::Bytes::from_static(b"x")), http_body::Frame::trailers(trailers)]);
        observed(body, &metrics, None).collect().await.unwrap();
        assert_eq!((count(&metrics, "14"), count(&metrics, "0")), (1, 0));

        observed(frames(vec![]), &metrics, Some("5")).collect().await.unwrap();
        assert_eq!(count(&metrics, "5"), 1, "a trailers-only answer keeps its header status");

        drop(observed(frames(vec![]), &metrics, None));
        assert_eq!(count(&metrics, "1"), 1, "a body dropped before its end is a cancelled call");
    }
}
