//! The HTTP/JSON edge's router. Layers, outermost first: request id + trace context + metrics,
//! then the concurrency limit (503 when full; a place is held until the response body ends), then
//! routing. Authentication and body limits run in the handlers so that every failure gets the
//! JSON error shape and the request id.

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use meshgate_runtime::{ApiError, ErrorCode};
use tracing::Instrument;

use crate::api::{AppState, RequestContext, request_id_of};
use crate::concurrency::InFlight;
use crate::response::{MESHGATE_REQUEST_ID, REQUEST_ID, TRACE_ID, error_response, valid_request_id};

/// Builds the edge's router.
pub fn router(app: AppState, max_concurrency: usize) -> axum::Router {
    // One semaphore for the whole edge: Router::layer clones layers per route.
    let in_flight = InFlight::new(max_concurrency);
    // Every route comes from the OpenAPI document's operations, so none is served undocumented.
    let (routes, _) = crate::openapi::api_routes().split_for_parts();
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(in_flight, crate::concurrency::hold_place))
        .layer(axum::middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// Assigns the request id, joins the caller's trace, and records metrics.
async fn observe(State(app): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = uuid::Uuid::now_v7().to_string();
    let client_request_id =
        request.headers().get(REQUEST_ID).filter(|v| v.to_str().is_ok_and(valid_request_id)).cloned();
    let route =
        request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let span = tracing::info_span!("http.request", otel.name = %format!("{} {route}", request.method()), otel.kind = "server", request_id = %request_id);
    meshgate_runtime::telemetry::set_parent_from_headers(&span, request.headers());
    let trace_id = meshgate_runtime::telemetry::trace_id(&span);
    let forwarded_for = request.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let client =
        request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| app.proxies.client(c.0.ip(), forwarded_for));
    request.extensions_mut().insert(RequestContext {
        request_id: request_id.clone(),
        trace_id: trace_id.clone(),
        started,
        client,
    });
    let mut response = next.run(request).instrument(span.clone()).await;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert(REQUEST_ID, client_request_id.unwrap_or_else(|| value.clone()));
        headers.insert(MESHGATE_REQUEST_ID, value);
    }
    if let Ok(value) = HeaderValue::from_str(&trace_id) {
        headers.insert(TRACE_ID, value);
    }
    if let Some(parent) = meshgate_runtime::telemetry::traceparent(&span)
        && let Ok(value) = HeaderValue::from_str(&parent)
    {
        headers.insert("traceparent", value);
    }
    app.metrics.http_requests.with_label_values(&[&route, response.status().as_str()]).inc();
    app.metrics.http_duration.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
    response
}

async fn not_found(request: Request) -> Response {
    let id = request_id_of(&request);
    error_response(
        &ApiError::new(ErrorCode::NotFound, format!("no route for {} {}", request.method(), request.uri().path())),
        &id,
    )
}

async fn method_not_allowed(request: Request) -> Response {
    let id = request_id_of(&request);
    let err = ApiError::new(
        ErrorCode::InvalidRequest,
        format!("method {} is not allowed on {}", request.method(), request.uri().path()),
    );
    let mut response = error_response(&err, &id);
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}
