//! Spend, errors, latency and traces, read from the analytics service and scoped to the caller's
//! tenancy: an organization's owners (and the bootstrap key) see the whole organization, everyone
//! else their key's project. Anything outside the scope is absent from aggregates and answers 404
//! as a trace, exactly like an id that does not exist.

use std::collections::BTreeMap;
use std::future::Future;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use meshgate_proto::analytics::v1 as pb;
use meshgate_proto::analytics::v1::analytics_client::AnalyticsClient;
use meshgate_proto::common::v1::{Layer, Role};
use meshgate_runtime::{ApiError, ErrorCode, MeshChannel};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::{ApiPath, ApiQuery, AppState, authenticate, client_of, request_id_of};
use crate::auth::Caller;
use crate::peers::peer_call;
use crate::response::{List, error_response};
use crate::tenancy::EndpointScope;

/// Whose traces a caller may read: an organization, and within it every project or these.
struct Scope {
    org_id: String,
    project_ids: Vec<String>,
    all_projects: bool,
}

impl Scope {
    fn of(caller: &Caller) -> Self {
        let org_id = caller.principal.org_id.clone();
        if caller.platform_admin || caller.role() == Role::Owner {
            Self { org_id, project_ids: Vec::new(), all_projects: true }
        } else {
            Self { org_id, project_ids: vec![caller.principal.project_id.clone()], all_projects: false }
        }
    }
}

/// Runs `f` with the analytics client and the caller's scope, and answers its JSON or the error.
async fn with_analytics<T, F, Fut>(app: AppState, request: Request, f: F) -> Response
where
    F: FnOnce(AnalyticsClient<MeshChannel>, Scope, std::time::Duration) -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
    T: Serialize,
{
    let id = request_id_of(&request);
    let caller = authenticate(&app, request.headers(), client_of(&request)).await;
    let result = async {
        let caller = caller?;
        caller.require(EndpointScope::Analytics)?;
        let client = app.orchestrator.peers().analytics.clone();
        f(client, Scope::of(&caller), app.orchestrator.peers().timeout).await
    }
    .await;
    match result {
        Ok(body) => axum::Json(body).into_response(),
        Err(err) => error_response(&err, &id),
    }
}

fn invalid(message: String) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

/// `from`/`to` query values (RFC 3339) as the range the analytics service takes.
fn time_range(from: Option<&str>, to: Option<&str>) -> Result<Option<pb::TimeRange>, ApiError> {
    let parse = |name: &str, value: Option<&str>| {
        value
            .map(|text| {
                chrono::DateTime::parse_from_rfc3339(text)
                    .map(|at| prost_types::Timestamp {
                        seconds: at.timestamp(),
                        nanos: at.timestamp_subsec_nanos() as i32,
                    })
                    .map_err(|err| {
                        invalid(format!("{name} must be an RFC 3339 time such as 2026-12-01T00:00:00Z: {err}"))
                    })
            })
            .transpose()
    };
    let (from, to) = (parse("from", from)?, parse("to", to)?);
    if from.is_none() && to.is_none() {
        return Ok(None);
    }
    Ok(Some(pb::TimeRange { from, to }))
}

/// Filters of `GET /v1/analytics`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AnalyticsFilter {
    /// Only this project (outside the caller's projects: no rows).
    #[param(max_length = 256)]
    project: Option<String>,
    /// Only this user.
    #[param(max_length = 256)]
    user: Option<String>,
    /// Only this model (the model that served, else the one asked for).
    #[param(max_length = 256)]
    model: Option<String>,
    /// Only this cost layer.
    #[param(pattern = "^l[0-3]$")]
    layer: Option<String>,
    /// Start of the range (RFC 3339, inclusive).
    from: Option<String>,
    /// End of the range (RFC 3339, exclusive).
    to: Option<String>,
    /// One row per group instead of one total (days, weeks and months in UTC).
    #[param(pattern = "^(day|week|month|model|layer|user|project)$")]
    group_by: Option<String>,
}

/// One group of an aggregation (or the total).
#[derive(Debug, Serialize, ToSchema)]
pub struct AnalyticsRow {
    /// The group (`2026-12-01`, a week's Monday, `2026-12`, a model, layer, user or project id);
    /// empty for the total.
    key: String,
    requests: i64,
    /// Requests that ended with a status of 400 or more.
    errors: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    /// Of the prompt tokens, those read from and written to the providers' prompt caches; of the
    /// completion tokens, those spent reasoning (each class charged at its own price).
    cached_prompt_tokens: i64,
    cache_write_tokens: i64,
    reasoning_tokens: i64,
    /// Cost charged, micro-dollars.
    cost_micros: i64,
    /// Latency percentiles (histogram estimates) and mean, microseconds.
    p50_latency_us: i64,
    p95_latency_us: i64,
    p99_latency_us: i64,
    avg_latency_us: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AnalyticsReport {
    /// Always `analytics`.
    object: &'static str,
    /// The grouping asked for (empty: one total row).
    group_by: String,
    data: Vec<AnalyticsRow>,
}

/// What `getAnalytics` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const SUMMARY_ERRORS: &[ErrorCode] = &[ErrorCode::Timeout];

/// `GET /v1/analytics`: totals or groups over the caller's traces.
#[utoipa::path(
    get,
    path = "/v1/analytics",
    operation_id = "getAnalytics",
    tag = "analytics",
    summary = "Requests, errors, tokens, cost and latency, in total or grouped",
    description = "Over the caller's traces: an organization's owners see the whole organization, everyone else \
their key's project. Served from hourly and daily rollups.",
    params(AnalyticsFilter),
    responses((status = 200, description = "One row per group, sorted by key", body = AnalyticsReport))
)]
pub async fn summary(
    State(app): State<AppState>,
    ApiQuery(filter): ApiQuery<AnalyticsFilter>,
    request: Request,
) -> Response {
    with_analytics(app, request, |mut client, scope, timeout| async move {
        let group_by = filter.group_by.unwrap_or_default();
        let query = pb::QueryRequest {
            org_id: scope.org_id,
            project_ids: scope.project_ids,
            all_projects: scope.all_projects,
            project_id: filter.project.unwrap_or_default(),
            user_id: filter.user.unwrap_or_default(),
            model: filter.model.unwrap_or_default(),
            layer: filter.layer.unwrap_or_default(),
            range: time_range(filter.from.as_deref(), filter.to.as_deref())?,
            group_by: group_by.clone(),
        };
        let rows = peer_call("analytics", timeout, client.query(query)).await?.rows;
        let data = rows
            .into_iter()
            .map(|row| AnalyticsRow {
                key: row.key,
                requests: row.requests,
                errors: row.errors,
                prompt_tokens: row.prompt_tokens,
                completion_tokens: row.completion_tokens,
                cached_prompt_tokens: row.cached_prompt_tokens,
                cache_write_tokens: row.cache_write_tokens,
                reasoning_tokens: row.reasoning_tokens,
                cost_micros: row.cost_micros,
                p50_latency_us: row.p50_latency_us,
                p95_latency_us: row.p95_latency_us,
                p99_latency_us: row.p99_latency_us,
                avg_latency_us: row.avg_latency_us,
            })
            .collect();
        Ok(AnalyticsReport { object: "analytics", group_by, data })
    })
    .await
}

/// A time range, alone.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RangeFilter {
    /// Start of the range (RFC 3339, inclusive).
    from: Option<String>,
    /// End of the range (RFC 3339, exclusive).
    to: Option<String>,
}

/// Filters of `GET /v1/analytics/top-expensive`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TopFilter {
    /// Start of the range (RFC 3339, inclusive).
    from: Option<String>,
    /// End of the range (RFC 3339, exclusive).
    to: Option<String>,
    /// How many, 1 to 100 (default 10).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i32>,
}

/// What `getTopExpensive` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const TOP_EXPENSIVE_ERRORS: &[ErrorCode] = &[ErrorCode::Timeout];

/// `GET /v1/analytics/top-expensive`: the dearest requests.
#[utoipa::path(
    get,
    path = "/v1/analytics/top-expensive",
    operation_id = "getTopExpensive",
    tag = "analytics",
    summary = "The most expensive requests, dearest first",
    params(TopFilter),
    responses((status = 200, description = "Their traces", body = List<TraceJson>))
)]
pub async fn top_expensive(
    State(app): State<AppState>,
    ApiQuery(filter): ApiQuery<TopFilter>,
    request: Request,
) -> Response {
    with_analytics(app, request, |mut client, scope, timeout| async move {
        let limit = filter.limit.unwrap_or(10);
        if !(1..=100).contains(&limit) {
            return Err(invalid("limit must be between 1 and 100".into()));
        }
        let range = time_range(filter.from.as_deref(), filter.to.as_deref())?;
        let query = pb::TopExpensiveRequest {
            org_id: scope.org_id,
            project_ids: scope.project_ids,
            all_projects: scope.all_projects,
            range,
            limit,
        };
        let traces = peer_call("analytics", timeout, client.top_expensive(query)).await?.traces;
        Ok(List::of(traces.into_iter().map(TraceJson::from).collect()))
    })
    .await
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelErrorRate {
    model: String,
    requests: i64,
    errors: i64,
    /// `errors / requests`.
    rate: f64,
}

/// What `getErrorRates` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const ERROR_RATE_ERRORS: &[ErrorCode] = &[ErrorCode::Timeout];

/// `GET /v1/analytics/error-rate`: errors per model.
#[utoipa::path(
    get,
    path = "/v1/analytics/error-rate",
    operation_id = "getErrorRates",
    tag = "analytics",
    summary = "Error rate by model",
    params(RangeFilter),
    responses((status = 200, description = "One entry per model", body = List<ModelErrorRate>))
)]
pub async fn error_rate(
    State(app): State<AppState>,
    ApiQuery(filter): ApiQuery<RangeFilter>,
    request: Request,
) -> Response {
    with_analytics(app, request, |mut client, scope, timeout| async move {
        let range = time_range(filter.from.as_deref(), filter.to.as_deref())?;
        let query = pb::ErrorRatesRequest {
            org_id: scope.org_id,
            project_ids: scope.project_ids,
            all_projects: scope.all_projects,
            range,
        };
        let models = peer_call("analytics", timeout, client.error_rates(query)).await?.models;
        let data = models
            .into_iter()
            .map(|m| ModelErrorRate { model: m.model, requests: m.requests, errors: m.errors, rate: m.rate })
            .collect();
        Ok(List::of(data))
    })
    .await
}

/// Filters of `GET /v1/analytics/latency`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LatencyFilter {
    /// Only this project (outside the caller's projects: no rows).
    #[param(max_length = 256)]
    project: Option<String>,
    /// Only this user.
    #[param(max_length = 256)]
    user: Option<String>,
    /// Only this model.
    #[param(max_length = 256)]
    model: Option<String>,
    /// Only this cost layer.
    #[param(pattern = "^l[0-3]$")]
    layer: Option<String>,
    /// Start of the range (RFC 3339, inclusive).
    from: Option<String>,
    /// End of the range (RFC 3339, exclusive).
    to: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelLatency {
    model: String,
    requests: i64,
    /// Percentiles (histogram estimates), mean and maximum, microseconds.
    p50_latency_us: i64,
    p95_latency_us: i64,
    p99_latency_us: i64,
    avg_latency_us: i64,
    max_latency_us: i64,
}

/// What `getLatency` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const LATENCY_ERRORS: &[ErrorCode] = &[ErrorCode::Timeout];

/// `GET /v1/analytics/latency`: latency percentiles by model.
#[utoipa::path(
    get,
    path = "/v1/analytics/latency",
    operation_id = "getLatency",
    tag = "analytics",
    summary = "Latency p50, p95 and p99 by model",
    params(LatencyFilter),
    responses((status = 200, description = "One entry per model", body = List<ModelLatency>))
)]
pub async fn latency(
    State(app): State<AppState>,
    ApiQuery(filter): ApiQuery<LatencyFilter>,
    request: Request,
) -> Response {
    with_analytics(app, request, |mut client, scope, timeout| async move {
        let query = pb::LatencyRequest {
            org_id: scope.org_id,
            project_ids: scope.project_ids,
            all_projects: scope.all_projects,
            range: time_range(filter.from.as_deref(), filter.to.as_deref())?,
            project_id: filter.project.unwrap_or_default(),
            user_id: filter.user.unwrap_or_default(),
            model: filter.model.unwrap_or_default(),
            layer: filter.layer.unwrap_or_default(),
        };
        let models = peer_call("analytics", timeout, client.latency(query)).await?.models;
        let data = models
            .into_iter()
            .map(|m| ModelLatency {
                model: m.model,
                requests: m.requests,
                p50_latency_us: m.p50_latency_us,
                p95_latency_us: m.p95_latency_us,
                p99_latency_us: m.p99_latency_us,
                avg_latency_us: m.avg_latency_us,
                max_latency_us: m.max_latency_us,
            })
            .collect();
        Ok(List::of(data))
    })
    .await
}

/// What `getTrace` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const TRACE_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound, ErrorCode::Timeout];

/// `GET /v1/traces/{id}`: one request, explained.
#[utoipa::path(
    get,
    path = "/v1/traces/{id}",
    operation_id = "getTrace",
    tag = "analytics",
    summary = "One request's trace",
    description = "The routing decision and its reasons, every model call, usage, cost, policy findings and \
sanitized headers. Another tenant's trace answers 404.",
    params(("id" = String, Path, description = "The request id (`x-meshgate-request-id`)")),
    responses((status = 200, description = "The trace", body = TraceJson))
)]
pub async fn trace(State(app): State<AppState>, ApiPath(id): ApiPath<String>, request: Request) -> Response {
    with_analytics(app, request, |mut client, scope, timeout| async move {
        let query = pb::GetTraceRequest {
            request_id: id,
            org_id: scope.org_id,
            project_ids: scope.project_ids,
            all_projects: scope.all_projects,
        };
        let trace = peer_call("analytics", timeout, client.get_trace(query)).await?;
        Ok(TraceJson::from(trace))
    })
    .await
}

/// Usage of a request or a call.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct UsageJson {
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
    /// Of the prompt tokens, those read from and written to the provider's prompt cache; of the
    /// completion tokens, those spent reasoning.
    cached_prompt_tokens: i64,
    cache_write_tokens: i64,
    reasoning_tokens: i64,
    cost_micros: i64,
}

impl From<meshgate_proto::common::v1::Usage> for UsageJson {
    fn from(usage: meshgate_proto::common::v1::Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
            cached_prompt_tokens: usage.cached_prompt_tokens,
            cache_write_tokens: usage.cache_write_tokens,
            reasoning_tokens: usage.reasoning_tokens,
            cost_micros: usage.cost_micros,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TraceError {
    code: String,
    message: String,
}

/// One model or provider call made for the request.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCallJson {
    target: String,
    provider: String,
    model: String,
    latency_us: i64,
    usage: Option<UsageJson>,
    /// `ok`, `error` or `cancelled` (a fastest-first loser).
    status: String,
    error: Option<TraceError>,
}

/// A policy finding: where, which rule, what was done; never the matched text.
#[derive(Debug, Serialize, ToSchema)]
pub struct FindingJson {
    /// `prompt` or `output`.
    direction: String,
    rule: String,
    category: String,
    severity: String,
    action: String,
    message: u32,
    start: u32,
    end: u32,
    score: Option<f32>,
}

/// A tool the request offered or the reply called.
#[derive(Debug, Serialize, ToSchema)]
pub struct ToolJson {
    name: String,
    /// `offered` or `called`.
    kind: String,
}

/// Everything meshgate recorded about one request.
#[derive(Debug, Serialize, ToSchema)]
pub struct TraceJson {
    request_id: String,
    /// W3C trace id of the distributed trace.
    trace_id: String,
    org_id: String,
    project_id: String,
    user_id: String,
    key_id: String,
    /// RFC 3339.
    started_at: Option<String>,
    requested_model: String,
    served_model: String,
    served_target: String,
    /// `l0`..`l3`, empty when nothing served.
    layer: String,
    task: String,
    routing_reason: String,
    routing_reasons: Vec<String>,
    calls: Vec<ModelCallJson>,
    usage: UsageJson,
    latency_us: i64,
    status_code: i32,
    error: Option<TraceError>,
    stream: bool,
    risk_score: u32,
    findings: Vec<FindingJson>,
    tool_calls: Vec<ToolJson>,
    /// Request headers without credentials.
    headers: BTreeMap<String, String>,
    /// Request parameters the serving provider's body left out (`seed` at Anthropic, unknown
    /// parameters at a provider that drops them).
    dropped_params: Vec<String>,
}

fn trace_error(error: Option<meshgate_proto::common::v1::ErrorDetail>) -> Option<TraceError> {
    error.map(|e| TraceError { code: e.code, message: e.message })
}

impl From<pb::Trace> for TraceJson {
    fn from(trace: pb::Trace) -> Self {
        let principal = trace.principal.unwrap_or_default();
        let started_at = trace.started_at.and_then(|t| {
            chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
                .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        });
        Self {
            request_id: trace.request_id,
            trace_id: trace.trace_id,
            org_id: principal.org_id,
            project_id: principal.project_id,
            user_id: principal.user_id,
            key_id: principal.key_id,
            started_at,
            requested_model: trace.requested_model,
            served_model: trace.served_model,
            served_target: trace.served_target,
            layer: Layer::short_name_of(trace.layer).to_owned(),
            task: trace.task,
            routing_reason: trace.routing_reason,
            routing_reasons: trace.routing_reasons,
            calls: trace
                .calls
                .into_iter()
                .map(|call| ModelCallJson {
                    target: call.target_id,
                    provider: call.provider,
                    model: call.model,
                    latency_us: call.latency_us,
                    usage: call.usage.map(UsageJson::from),
                    status: call.status,
                    error: trace_error(call.error),
                })
                .collect(),
            usage: trace.usage.map(UsageJson::from).unwrap_or_default(),
            latency_us: trace.latency_us,
            status_code: trace.status_code,
            error: trace_error(trace.error),
            stream: trace.stream,
            risk_score: trace.risk_score,
            findings: trace
                .findings
                .into_iter()
                .map(|f| FindingJson {
                    direction: f.direction,
                    rule: f.rule,
                    category: f.category,
                    severity: f.severity,
                    action: f.action,
                    message: f.message,
                    start: f.start,
                    end: f.end,
                    score: f.score,
                })
                .collect(),
            tool_calls: trace.tool_calls.into_iter().map(|t| ToolJson { name: t.name, kind: t.kind }).collect(),
            headers: trace.headers.into_iter().collect(),
            dropped_params: trace.dropped_params,
        }
    }
}
