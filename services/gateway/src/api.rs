//! The shared request plumbing of the HTTP handlers, below every one of them: the state they
//! share, the per-request context the middleware records, extractors whose rejections are the
//! JSON error shape, authentication and bounded body reading.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, header};
use axum::response::Response;
use meshgate_runtime::{ApiError, ErrorCode};

use crate::admission::Admission;
use crate::auth::{Authenticator, Caller};
use crate::client_addr::TrustedProxies;
use crate::concurrency::TenantCaps;
use crate::invalidation::Invalidator;
use crate::metrics::GatewayMetrics;
use crate::orchestrator::Orchestrator;
use crate::response::error_response;
use crate::settings::SettingsCache;
use crate::stored_responses::ResponseStore;

/// What the HTTP handlers share (axum state).
#[derive(Clone)]
pub struct AppState {
    pub orchestrator: Arc<Orchestrator>,
    /// Limits, allowed models and screening of every request.
    pub admission: Admission,
    pub auth: Authenticator,
    pub max_body_bytes: usize,
    pub metrics: GatewayMetrics,
    pub invalidator: Invalidator,
    /// Per-project security policy and request limits.
    pub settings: SettingsCache,
    /// Open streams per key and project.
    pub streams: TenantCaps,
    /// Edge batch uploads in progress per key.
    pub uploads: TenantCaps,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub proxies: TrustedProxies,
    /// Responses stored by the Responses API.
    pub responses: Arc<dyn ResponseStore>,
}

/// Per-request facts the middleware hands to handlers.
#[derive(Clone)]
pub(crate) struct RequestContext {
    pub(crate) request_id: String,
    pub(crate) trace_id: String,
    pub(crate) started: Instant,
    /// The client's address (the peer, or what a trusted proxy says), for throttling failed
    /// authentications.
    pub(crate) client: Option<IpAddr>,
}

/// A path parameter extractor whose rejection (say, a percent-encoding that is not UTF-8) is the
/// JSON error shape, not axum's plain text.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S> for ApiPath<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Self, Response> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|path| ApiPath(path.0))
            .map_err(|rejection| rejected(parts, format!("invalid path: {}", rejection.body_text())))
    }
}

/// A query string extractor whose rejection (an unknown or mistyped parameter) is the JSON error
/// shape.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Self, Response> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|query| ApiQuery(query.0))
            .map_err(|rejection| rejected(parts, format!("invalid query string: {}", rejection.body_text())))
    }
}

fn rejected(parts: &http::request::Parts, message: String) -> Response {
    let id = parts.extensions.get::<RequestContext>().map(|c| c.request_id.clone()).unwrap_or_default();
    error_response(&ApiError::new(ErrorCode::InvalidRequest, message), &id)
}

/// Authenticates the request's key, throttling failures per client address. Takes the parts it
/// needs, not the request, so handler futures stay `Send`.
pub(crate) async fn authenticate(
    app: &AppState,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Result<Caller, ApiError> {
    app.auth.authenticate(authorization(headers).as_deref(), client).await
}

/// The client address the middleware recorded.
pub(crate) fn client_of(request: &Request) -> Option<IpAddr> {
    request.extensions().get::<RequestContext>().and_then(|c| c.client)
}

pub(crate) fn request_id_of(request: &Request) -> String {
    request.extensions().get::<RequestContext>().map(|c| c.request_id.clone()).unwrap_or_default()
}

/// Reads the body up to the limit; a larger body is a 413 without reading the rest.
pub(crate) async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::new(ErrorCode::PayloadTooLarge, format!("request body exceeds {limit} bytes"));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|_| too_large())
}

/// The credential a request carries, as an `Authorization` value: the header itself, or a
/// meshgate key sent the way the Anthropic SDKs (`x-api-key`) or Azure's (`api-key`) send theirs.
pub(crate) fn authorization(headers: &HeaderMap) -> Option<Cow<'_, str>> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        return value.to_str().ok().map(Cow::Borrowed);
    }
    ["x-api-key", "api-key"]
        .into_iter()
        .find_map(|name| headers.get(name))
        .and_then(|value| value.to_str().ok())
        .map(|key| Cow::Owned(format!("Bearer {}", key.trim())))
}
