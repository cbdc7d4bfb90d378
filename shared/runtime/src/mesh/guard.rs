//! The tower layer in front of every gRPC service: who is calling (the connection's verified
//! certificate, or the identity an in-process channel attached), whether the allow-list lets
//! them call this RPC, and how large a message they may send. Listeners and in-process calls
//! pass the same layer.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use prometheus::IntCounterVec;

use super::access::{AccessPolicy, Refusal};
use super::limits::{LimitedBody, RequestLimits};
use super::tls::{MeshConnectInfo, Peer};
use crate::ErrorCode;

/// The identity an in-process channel attaches to its requests. Only code in this process can
/// set a request extension; nothing a network peer sends becomes one.
#[derive(Debug, Clone)]
pub(crate) struct LocalCaller(pub(crate) Arc<str>);

/// How callers that arrive over the network are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Authentication {
    /// By their certificates (mTLS).
    Certificates,
    /// Not at all: an explicitly plaintext mesh on loopback trusts its network callers; callers
    /// in this process are still checked.
    TrustedLoopback,
    /// Library use without a mesh configuration: nobody is checked; only the message limits apply.
    Off,
}

/// Configuration of the guard of one service.
pub(crate) struct Guard {
    pub(crate) authentication: Authentication,
    pub(crate) policy: Arc<AccessPolicy>,
    pub(crate) limits: Arc<RequestLimits>,
    /// `meshgate_grpc_server_refused_total{method, caller, reason}`.
    pub(crate) refusals: IntCounterVec,
}

#[derive(Clone)]
pub(crate) struct GuardLayer(pub(crate) Arc<Guard>);

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guarded { inner, guard: self.0.clone() }
    }
}

#[derive(Clone)]
pub(crate) struct Guarded<S> {
    inner: S,
    guard: Arc<Guard>,
}

impl Guard {
    /// The caller to check, or `None` when this request is not checked.
    fn caller(&self, request: &http::Request<tonic::body::Body>) -> Option<Peer> {
        if self.authentication == Authentication::Off {
            return None;
        }
        if let Some(LocalCaller(name)) = request.extensions().get::<LocalCaller>() {
            return Some(Peer::Verified(name.clone()));
        }
        if let Some(info) = request.extensions().get::<MeshConnectInfo>() {
            return Some(info.peer.clone());
        }
        match self.authentication {
            // An in-process call from a channel without an identity.
            Authentication::Certificates => Some(Peer::Anonymous),
            Authentication::TrustedLoopback | Authentication::Off => None,
        }
    }
}

/// The caller as a metric label: bounded by the identities the mesh CA issued.
fn caller_label(caller: Option<&Peer>) -> &str {
    match caller {
        Some(Peer::Verified(name)) => name,
        Some(Peer::Anonymous) => "none",
        Some(Peer::Untrusted(_)) => "untrusted",
        None => "unchecked",
    }
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for Guarded<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let guard = &self.guard;
        let path = request.uri().path().to_owned();
        let method = crate::rpc_methods::known_methods().get(path.as_str()).copied().unwrap_or("other");
        if let Some(info) = request.extensions().get::<MeshConnectInfo>().cloned() {
            // What code reading the peer's address (rate limits, logs) finds on plain TCP.
            request.extensions_mut().insert(tonic::transport::server::TcpConnectInfo {
                local_addr: info.local_addr,
                remote_addr: info.remote_addr,
            });
        }
        let caller = guard.caller(&request);
        if let Some(peer) = &caller
            && let Err(refusal) = guard.policy.check(&path, peer)
        {
            let (reason, status) = match (refusal, peer) {
                (Refusal::Unauthenticated, Peer::Untrusted(why)) => (
                    "unauthenticated",
                    ErrorCode::Unauthenticated.status(format!("the client certificate is not the mesh's: {why}")),
                ),
                (Refusal::Unauthenticated, _) => (
                    "unauthenticated",
                    ErrorCode::Unauthenticated.status("this RPC needs a client certificate of the mesh CA"),
                ),
                (Refusal::PermissionDenied, _) => (
                    "permission_denied",
                    ErrorCode::PermissionDenied
                        .status(format!("{} may not call {method}", caller_label(caller.as_ref()))),
                ),
            };
            guard.refusals.with_label_values(&[method, caller_label(caller.as_ref()), reason]).inc();
            tracing::warn!(method, caller = caller_label(caller.as_ref()), reason, "gRPC call refused");
            return Either::Left(ready(Ok(status.into_http())));
        }
        let limit = guard.limits.of(&path);
        let refusals = guard.refusals.clone();
        let label = caller_label(caller.as_ref()).to_owned();
        let count: Box<dyn FnOnce() + Send> = Box::new(move || {
            refusals.with_label_values(&[method, label.as_str(), "message_too_large"]).inc();
            tracing::warn!(method, caller = label, "gRPC request message over its limit refused");
        });
        let request = request.map(|body| tonic::body::Body::new(LimitedBody::new(body, limit, count)));
        Either::Right(self.inner.call(request))
    }
}
