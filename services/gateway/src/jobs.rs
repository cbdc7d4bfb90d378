//! Async jobs at the edge over the sync service's durable queue: `POST /v1/jobs` (a chat
//! completion delivered later, `Idempotency-Key` honoured), `GET /v1/jobs/{id}`, `GET /v1/jobs`
//! and `POST /v1/jobs/{id}/retry`, plus the offline fallback that queues a chat request whose
//! cloud targets were all unreachable when the caller allows it (`x-meshgate-allow-queue: true`).
//! Jobs are scoped to the caller's project: another project's job answers 404.
//!
//! A job is admitted like a request and holds a quota reservation of its estimate for as long as
//! it may wait (see [`enqueue`]); a dead letter put back is admitted again (see [`retry`]).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use meshgate_proto::common::v1::{Target, TargetKind, Usage};
use meshgate_proto::quota::v1::ReleaseRequest;
use meshgate_proto::router::v1::ListTargetsRequest;
use meshgate_proto::sync::v1::sync_client::SyncClient;
use meshgate_proto::sync::v1::{self as pb, CompleteRequest, EnqueueRequest, JobReservation, JobStatus};
use meshgate_runtime::{ApiError, ErrorCode, MeshChannel};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::admission::RequestFacts;
use crate::api::{ApiPath, ApiQuery, AppState, RequestContext, authenticate, client_of, read_body, request_id_of};
use crate::auth::Caller;
use crate::openai;
use crate::peers::{peer_call, peer_response};
use crate::response::{IDEMPOTENT_REPLAYED, List, error_response};
use crate::tenancy::EndpointScope;
use meshgate_wire::ChatRequest;

/// Request header that lets a chat request be queued when no cloud target answers.
pub const ALLOW_QUEUE: &str = "x-meshgate-allow-queue";

/// How long a job's admission holds its estimate, seconds: longer than the queue's whole retry
/// schedule (by default 8 attempts, each cut within its 6-minute lease and at most 30 s apart:
/// under an hour), with room for a backlog. The quota service caps it; a job delivered after its
/// hold ended is still charged, once.
const JOB_RESERVATION_TTL_SECONDS: i64 = 86_400;

/// Whether the request opted into the offline fallback.
pub fn allows_queue(headers: &HeaderMap) -> bool {
    headers.get(ALLOW_QUEUE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Errors after which a queued retry may succeed: the cloud was unreachable, not the request wrong.
pub fn queueable(err: &ApiError) -> bool {
    matches!(err.code, ErrorCode::Unavailable | ErrorCode::UpstreamError | ErrorCode::Timeout)
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobResult {
    content: String,
    /// The model's refusal and reasoning text, when it gave any.
    #[serde(skip_serializing_if = "String::is_empty")]
    refusal: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    reasoning_content: String,
    /// The tool calls the model made (finish reason `tool_calls`), as in a chat completion.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<JobToolCall>,
    finish_reason: String,
    usage: Option<UsageJson>,
    /// Request parameters the provider's body left out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    dropped_params: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobToolCall {
    id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    kind: String,
    function: JobFunctionCall,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct JobFunctionCall {
    name: String,
    /// The arguments as the model wrote them (JSON text).
    arguments: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobUsage)]
pub(crate) struct UsageJson {
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
    /// Of the prompt tokens, those read from and written to the provider's prompt cache; of the
    /// completion tokens, those spent reasoning.
    cached_prompt_tokens: i64,
    cache_write_tokens: i64,
    reasoning_tokens: i64,
    /// Cost charged, micro-dollars.
    cost_micros: i64,
}

impl From<Usage> for UsageJson {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            cached_prompt_tokens: u.cached_prompt_tokens,
            cache_write_tokens: u.cache_write_tokens,
            reasoning_tokens: u.reasoning_tokens,
            cost_micros: u.cost_micros,
        }
    }
}

/// A job on the wire.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Job)]
pub(crate) struct JobJson {
    id: String,
    object: &'static str,
    #[schema(value_type = JobState)]
    status: &'static str,
    attempts: i32,
    max_attempts: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<LastError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<JobResult>,
    model: String,
    provider: String,
    #[schema(format = DateTime)]
    created_at: Option<String>,
    #[schema(format = DateTime)]
    next_attempt_at: Option<String>,
    #[schema(format = DateTime)]
    finished_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobError)]
pub(crate) struct LastError {
    code: String,
    message: String,
}

/// A job's state; `unknown` only if the queue reports a state this gateway does not know.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // a schema only: states travel as strings
pub(crate) enum JobState {
    Queued,
    Running,
    Succeeded,
    Dead,
    Unknown,
}

fn time(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    let ts = ts?;
    let t: DateTime<Utc> = DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)?;
    Some(t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn status_name(status: i32) -> &'static str {
    match JobStatus::try_from(status).unwrap_or(JobStatus::Unspecified) {
        JobStatus::Queued => "queued",
        JobStatus::Running => "running",
        JobStatus::Succeeded => "succeeded",
        JobStatus::Dead => "dead",
        JobStatus::Unspecified => "unknown",
    }
}

fn job_json(job: pb::Job) -> JobJson {
    let succeeded = job.status == JobStatus::Succeeded as i32;
    JobJson {
        status: status_name(job.status),
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        idempotency_key: (!job.idempotency_key.is_empty()).then_some(job.idempotency_key),
        last_error: (!job.last_error.is_empty())
            .then_some(LastError { code: job.last_error_code, message: job.last_error }),
        result: succeeded.then(|| JobResult {
            content: job.result,
            refusal: job.refusal,
            reasoning_content: job.reasoning_content,
            tool_calls: job
                .tool_calls
                .into_iter()
                .map(|call| JobToolCall {
                    id: call.id,
                    kind: if call.r#type.is_empty() { "function".into() } else { call.r#type },
                    function: JobFunctionCall { name: call.function_name, arguments: call.arguments_json },
                })
                .collect(),
            finish_reason: job.finish_reason,
            usage: job.usage.map(UsageJson::from),
            dropped_params: job.dropped_params,
        }),
        model: job.model,
        provider: job.provider,
        created_at: time(job.created_at.as_ref()),
        next_attempt_at: time(job.next_attempt_at.as_ref()),
        finished_at: time(job.finished_at.as_ref()),
        id: job.id,
        object: "job",
    }
}

/// Calls the sync service with the peer deadline.
async fn sync_call<T, F, Fut>(app: &AppState, call: F) -> Result<tonic::Response<T>, ApiError>
where
    F: FnOnce(SyncClient<MeshChannel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let peers = app.orchestrator.peers();
    peer_response("sync", peers.timeout, call(peers.sync.clone())).await
}

/// Holds `estimate` against the caller's budgets for a job, or the 429 that refuses it. Each
/// admission gets an id of its own: a client's reused request id must never answer with the
/// reservation of an earlier job.
async fn admit(
    app: &AppState,
    caller: &Caller,
    request_id: &str,
    estimate: (i64, i64),
) -> Result<JobReservation, ApiError> {
    let admission = format!("{request_id}:job:{}", uuid::Uuid::new_v4().simple());
    let reservation_id =
        app.orchestrator.admit(admission, &caller.principal, estimate, JOB_RESERVATION_TTL_SECONDS).await?;
    Ok(JobReservation { reservation_id, estimated_tokens: estimate.0, estimated_cost_micros: estimate.1 })
}

/// Frees an admission no job holds: the queue refused the job, or answered with an earlier one.
/// A failure leaves the hold to expire. Not called when the queue did not answer in time: the job
/// may hold the reservation, and freeing it would let the budget be spent twice.
async fn release_admission(app: &AppState, reservation: JobReservation) {
    let mut quota = app.orchestrator.peers().quota.clone();
    let release = ReleaseRequest { reservation_id: reservation.reservation_id };
    if let Err(err) = peer_call("quota", app.orchestrator.peers().timeout, quota.release(release)).await {
        tracing::warn!(error = %err, "cannot release a job admission no job holds; it expires on its own");
    }
}

/// Admits `chat` against the caller's budgets and queues it with its reservation; answers 202
/// with the job (200 when the idempotency key was seen before: that job's own reservation stands
/// and this one is freed). The submission endpoint and the offline fallback both come here.
pub async fn enqueue(
    app: &AppState,
    caller: &Caller,
    chat: ChatRequest,
    request_id: &str,
    idempotency_key: String,
) -> Result<Response, ApiError> {
    let prices = cloud_prices(app, &chat.model).await?;
    let reservation = admit(app, caller, request_id, app.orchestrator.job_estimate(&chat, &prices)).await?;
    let request = EnqueueRequest {
        principal: Some(caller.principal.clone()),
        idempotency_key,
        prices,
        request: Some(CompleteRequest {
            request_id: request_id.to_owned(),
            provider: String::new(),
            model: chat.model,
            messages: chat.messages,
            sampling: Some(chat.sampling),
            timeout_ms: 0,
            options: Some(chat.options),
            target: None,
        }),
        reservation: Some(reservation.clone()),
    };
    let response = match sync_call(app, |mut sync| async move { sync.enqueue(request).await }).await {
        Ok(response) => response,
        Err(err) => {
            if err.code != ErrorCode::Timeout {
                release_admission(app, reservation).await;
            }
            return Err(err);
        }
    };
    let replayed = response.metadata().get("x-meshgate-idempotent-replay").is_some_and(|v| v == "true");
    if replayed {
        release_admission(app, reservation).await;
    }
    let job = job_json(response.into_inner());
    let status = if replayed { StatusCode::OK } else { StatusCode::ACCEPTED };
    let mut response = (status, axum::Json(job)).into_response();
    if replayed {
        response.headers_mut().insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// The cloud targets of `model` as the router knows them, with their prices: the sync service
/// charges the delivered job at the price of the provider that serves it.
async fn cloud_prices(app: &AppState, model: &str) -> Result<Vec<Target>, ApiError> {
    let peers = app.orchestrator.peers();
    let targets =
        peer_call("router", peers.timeout, peers.router.clone().list_targets(ListTargetsRequest {})).await?.targets;
    Ok(targets
        .into_iter()
        .filter_map(|state| state.target)
        .filter(|t| t.kind == TargetKind::Cloud as i32 && t.model == model)
        .collect())
}

/// What `submitJob` answers besides `openapi::COMMON_ERRORS`.
/// Admission holds the job's reservation: a spent budget is 429 `quota_exceeded`.
pub(crate) const SUBMIT_ERRORS: &[ErrorCode] = &[
    ErrorCode::ModelNotFound,
    ErrorCode::NotFound,
    ErrorCode::Conflict,
    ErrorCode::PayloadTooLarge,
    ErrorCode::PolicyViolation,
    ErrorCode::QuotaExceeded,
    ErrorCode::Timeout,
];

/// `POST /v1/jobs`: an OpenAI chat completion body, delivered durably.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    operation_id = "submitJob",
    tag = "jobs",
    summary = "Queue a chat completion",
    description = "An OpenAI chat completion body (`stream` must be false), screened by the security policy now and \
delivered durably later. The same `Idempotency-Key` answers the first job (200, `idempotent-replayed: true`).",
    params(("idempotency-key" = Option<String>, Header, description = "Makes the submission idempotent.")),
    request_body = crate::openai::ChatCompletionRequest,
    responses(
        (status = 202, description = "The queued job", body = JobJson),
        (status = 200, description = "The job first submitted with this idempotency key", body = JobJson),
    )
)]
pub async fn submit(State(app): State<AppState>, request: Request) -> Response {
    let id = request_id_of(&request);
    let caller = authenticate(&app, request.headers(), client_of(&request)).await;
    let (parts, body) = request.into_parts();
    let result = async {
        let caller = caller?;
        let context = parts
            .extensions
            .get::<RequestContext>()
            .cloned()
            .ok_or_else(|| ApiError::new(ErrorCode::Internal, "request context missing"))?;
        caller.require(EndpointScope::Jobs)?;
        let key = match parts.headers.get("idempotency-key") {
            None => String::new(),
            Some(value) => value
                .to_str()
                .map_err(|_| ApiError::new(ErrorCode::InvalidRequest, "Idempotency-Key must be visible ASCII"))?
                .to_owned(),
        };
        let settings = app.settings.get(&caller.principal.project_id).await?;
        let body = read_body(body, &parts.headers, settings.max_body_bytes(app.max_body_bytes)).await?;
        let chat = openai::parse_chat(&body)?;
        if chat.stream {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "a job cannot stream: set stream to false"));
        }
        // A job leaves for the provider later: it is screened now, and queued redacted.
        let facts = RequestFacts {
            request_id: id.clone(),
            trace_id: context.trace_id,
            started: context.started,
            headers: meshgate_policy::sanitize_headers(&parts.headers),
            unforwarded: Vec::new(),
        };
        let call = app.admission.chat(&caller, &settings, chat, facts).await?;
        app.admission.guard.observe_risk(call.security.risk);
        enqueue(&app, &caller, call.chat, &id, key).await
    }
    .await;
    result.unwrap_or_else(|err| error_response(&err, &id))
}

/// Runs `f` against the sync service for an authenticated caller allowed to use jobs.
async fn with_sync<T, F, Fut>(app: AppState, request: Request, f: F) -> Response
where
    F: FnOnce(meshgate_proto::sync::v1::sync_client::SyncClient<meshgate_runtime::MeshChannel>, Caller) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    T: Send,
    JobsBody: From<T>,
{
    let id = request_id_of(&request);
    let caller = authenticate(&app, request.headers(), client_of(&request)).await;
    let result = async {
        let caller = caller?;
        caller.require(EndpointScope::Jobs)?;
        let response = sync_call(&app, |sync| f(sync, caller)).await?;
        Ok::<_, ApiError>(JobsBody::from(response.into_inner()))
    }
    .await;
    match result {
        Ok(body) => body.into_response(),
        Err(err) => error_response(&err, &id),
    }
}

/// What a job endpoint answers.
pub enum JobsBody {
    One(Box<pb::Job>),
    Many(Vec<pb::Job>),
}

impl From<pb::Job> for JobsBody {
    fn from(job: pb::Job) -> Self {
        JobsBody::One(Box::new(job))
    }
}

impl From<pb::ListJobsResponse> for JobsBody {
    fn from(list: pb::ListJobsResponse) -> Self {
        JobsBody::Many(list.jobs)
    }
}

impl IntoResponse for JobsBody {
    fn into_response(self) -> Response {
        match self {
            JobsBody::One(job) => axum::Json(job_json(*job)).into_response(),
            JobsBody::Many(jobs) => axum::Json(List::of(jobs.into_iter().map(job_json).collect())).into_response(),
        }
    }
}

/// Job ids are the queue's UUIDs: anything else (say, a NUL its store cannot hold) names no job
/// and never reaches the queue.
fn plausible_job_id(id: &str) -> Result<(), tonic::Status> {
    if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
        return Err(ErrorCode::NotFound.status(format!("job {id:?} not found")));
    }
    Ok(())
}

/// What `getJob` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const GET_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound, ErrorCode::Timeout];

/// `GET /v1/jobs/{id}`.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    operation_id = "getJob",
    tag = "jobs",
    summary = "A job",
    description = "Another project's job answers 404.",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "The job, with its result once it succeeded", body = JobJson))
)]
pub async fn get(State(app): State<AppState>, ApiPath(id): ApiPath<String>, request: Request) -> Response {
    with_sync(app, request, |mut sync, caller| async move {
        plausible_job_id(&id)?;
        sync.get_job(pb::GetJobRequest { id, project_id: caller.principal.project_id }).await
    })
    .await
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobFilter {
    /// Only jobs in this state: `queued`, `running`, `succeeded` or `dead`.
    #[param(pattern = "^(queued|running|succeeded|dead)$")]
    status: Option<String>,
    /// Most jobs returned, 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i32>,
}

/// What `listJobs` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const LIST_ERRORS: &[ErrorCode] = &[ErrorCode::Timeout];

/// `GET /v1/jobs?status=dead`: the caller's project's jobs, newest first.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    operation_id = "listJobs",
    tag = "jobs",
    summary = "The caller's project's jobs, newest first",
    params(JobFilter),
    responses((status = 200, description = "The jobs", body = List<JobJson>))
)]
pub async fn list(State(app): State<AppState>, ApiQuery(filter): ApiQuery<JobFilter>, request: Request) -> Response {
    let status = match filter.status.as_deref() {
        None => Ok(JobStatus::Unspecified),
        Some("queued") => Ok(JobStatus::Queued),
        Some("running") => Ok(JobStatus::Running),
        Some("succeeded") => Ok(JobStatus::Succeeded),
        Some("dead") => Ok(JobStatus::Dead),
        Some(other) => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("status {other:?} is not one of queued, running, succeeded, dead"),
        )),
    };
    let status = match status {
        Ok(status) => status,
        Err(err) => return error_response(&err, &request_id_of(&request)),
    };
    let limit = filter.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        let err = ApiError::new(ErrorCode::InvalidRequest, "limit must be between 1 and 1000");
        return error_response(&err, &request_id_of(&request));
    }
    with_sync(app, request, move |mut sync, caller| async move {
        let project_id = caller.principal.project_id;
        sync.list_jobs(pb::ListJobsRequest { project_id, status: status as i32, limit }).await
    })
    .await
}

/// What `retryJob` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const RETRY_ERRORS: &[ErrorCode] =
    &[ErrorCode::NotFound, ErrorCode::Conflict, ErrorCode::QuotaExceeded, ErrorCode::Timeout];

/// `POST /v1/jobs/{id}/retry`: a dead letter back in the queue (409 when it is not dead),
/// admitted again like a new submission: its estimate is held against the caller's budgets, or the
/// retry is refused with 429.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/retry",
    operation_id = "retryJob",
    tag = "jobs",
    summary = "Put a dead letter back in the queue",
    description = "409 when the job is not dead. The job is admitted again like a submission: 429 when its \
estimate does not fit the caller's budgets.",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "The job, queued again", body = JobJson))
)]
pub async fn retry(State(app): State<AppState>, ApiPath(id): ApiPath<String>, request: Request) -> Response {
    let request_id = request_id_of(&request);
    let caller = authenticate(&app, request.headers(), client_of(&request)).await;
    let result = async {
        let caller = caller?;
        caller.require(EndpointScope::Jobs)?;
        plausible_job_id(&id).map_err(|status| ApiError::from_status(&status))?;
        readmit(&app, &caller, id, &request_id).await
    }
    .await;
    match result {
        Ok(job) => axum::Json(job_json(job)).into_response(),
        Err(err) => error_response(&err, &request_id),
    }
}

/// Puts the dead letter `id` back in the queue under a new admission by `caller`. A job that is
/// not dead is left to the queue to refuse (409), and nothing is held for it.
async fn readmit(app: &AppState, caller: &Caller, id: String, request_id: &str) -> Result<pb::Job, ApiError> {
    let project_id = caller.principal.project_id.clone();
    let lookup = pb::GetJobRequest { id: id.clone(), project_id: project_id.clone() };
    let job = sync_call(app, |mut sync| async move { sync.get_job(lookup).await }).await?.into_inner();
    let retry = pb::RetryJobRequest { id, project_id, principal: Some(caller.principal.clone()), reservation: None };
    if job.status != JobStatus::Dead as i32 {
        return Ok(sync_call(app, |mut sync| async move { sync.retry_job(retry).await }).await?.into_inner());
    }
    // Jobs queued before admissions were kept carry no estimate: they are held for nothing, but a
    // spent budget or a full minute still refuses them.
    let estimate = job.reservation.map_or((0, 0), |r| (r.estimated_tokens, r.estimated_cost_micros));
    let reservation = admit(app, caller, request_id, estimate).await?;
    let retry = pb::RetryJobRequest { reservation: Some(reservation.clone()), ..retry };
    match sync_call(app, |mut sync| async move { sync.retry_job(retry).await }).await {
        Ok(response) => Ok(response.into_inner()),
        Err(err) => {
            if err.code != ErrorCode::Timeout {
                release_admission(app, reservation).await;
            }
            Err(err)
        }
    }
}
