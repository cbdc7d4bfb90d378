//! The `meshgate.sync.v1.Sync` gRPC service.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use meshgate_proto::sync::v1::sync_server::Sync as SyncApi;
use meshgate_proto::sync::v1::{
    CompleteChunk, CompleteRequest, EmbedRequest, EmbedResponse, EnqueueRequest, GetJobRequest, Job, JobReservation,
    JobStatus, ListJobsRequest, ListJobsResponse, RetryJobRequest, UplinkRequest, UplinkResponse,
};
use meshgate_storage::SharedClock;
use tonic::{Request, Response, Status};

use crate::cloud::Uplink;
use crate::error::Error;
use crate::queue::{
    Dispatcher, JobRecord, JobStore, QueueMetrics, Readmission, micros, request_hash, validate_idempotency_key,
};
use crate::upstream::Upstream;

/// Metadata set on an `Enqueue` answer that returns the job an earlier submission with the same
/// idempotency key created.
pub const IDEMPOTENT_REPLAY_METADATA: &str = "x-meshgate-idempotent-replay";

/// `ListJobs` returns this many jobs unless asked otherwise.
const DEFAULT_LIST_LIMIT: usize = 50;
/// The most jobs one `ListJobs` returns.
const MAX_LIST_LIMIT: usize = 1000;

/// Message of the queue RPCs when no store is configured.
const NO_QUEUE: &str = "the durable sync queue is not configured: set [sync.queue] database_url or path";

/// The durable queue behind the queue RPCs: its store, its workers, the clock they read.
#[derive(Clone)]
pub struct Queue {
    store: Arc<dyn JobStore>,
    dispatcher: Dispatcher,
    clock: SharedClock,
    max_attempts: i32,
    metrics: QueueMetrics,
}

impl Queue {
    pub fn new(
        store: Arc<dyn JobStore>,
        dispatcher: Dispatcher,
        clock: SharedClock,
        max_attempts: i32,
        metrics: QueueMetrics,
    ) -> Self {
        Self { store, dispatcher, clock, max_attempts, metrics }
    }

    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.store
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Validates and stores a submission; `true` when it created the job (false: the job an
    /// earlier submission with the same key created).
    pub async fn enqueue(&self, upstream: &Upstream, request: EnqueueRequest) -> Result<(JobRecord, bool), Error> {
        let principal = request.principal.unwrap_or_default();
        if principal.org_id.trim().is_empty() || principal.project_id.trim().is_empty() {
            return Err(Error::InvalidRequest("principal.org_id and principal.project_id are required".into()));
        }
        if !request.idempotency_key.is_empty() {
            validate_idempotency_key(&request.idempotency_key).map_err(Error::InvalidRequest)?;
        }
        let mut completion = request.request.ok_or_else(|| Error::InvalidRequest("request is required".into()))?;
        check_deliverable(upstream, &mut completion)?;
        check_prices(&request.prices)?;
        let reservation = request.reservation.map(check_reservation).transpose()?.unwrap_or_default();
        let now = micros(self.clock.now());
        let job = JobRecord {
            id: uuid::Uuid::now_v7().to_string(),
            org_id: principal.org_id,
            project_id: principal.project_id,
            user_id: principal.user_id,
            key_id: principal.key_id,
            idempotency_key: request.idempotency_key,
            request_hash: request_hash(&completion),
            request: Some(completion),
            status: JobStatus::Queued as i32,
            attempts: 0,
            max_attempts: self.max_attempts,
            created_at_us: now,
            updated_at_us: now,
            next_attempt_at_us: now,
            prices: request.prices,
            reservation_open: !reservation.reservation_id.is_empty(),
            reservation_id: reservation.reservation_id,
            reserved_tokens: reservation.estimated_tokens,
            reserved_cost_micros: reservation.estimated_cost_micros,
            ..JobRecord::default()
        };
        // The caller (the gateway, which holds the reservation for the job) may give up waiting
        // while the store is slow (Postgres stalled): this future is then dropped and no job may
        // ever carry the reservation, so it is freed rather than held until its TTL.
        let abandoned = AbandonedSubmission { dispatcher: &self.dispatcher, job: Some(job.clone()) };
        let stored = self.store.enqueue(job).await;
        abandoned.disarm();
        let (job, created) = stored?;
        if created {
            self.metrics.event("enqueued");
            self.dispatcher.wake();
        } else {
            self.metrics.event("deduplicated");
        }
        Ok((job, created))
    }

    pub async fn get(&self, id: &str, project_id: &str) -> Result<JobRecord, Error> {
        require_project(project_id)?;
        self.store.get(id, project_id).await?.ok_or_else(|| Error::JobNotFound(id.to_owned()))
    }

    pub async fn list(&self, request: ListJobsRequest) -> Result<Vec<JobRecord>, Error> {
        require_project(&request.project_id)?;
        let limit = match request.limit {
            0 => DEFAULT_LIST_LIMIT,
            n if n < 0 => return Err(Error::InvalidRequest(format!("limit must not be negative (got {n})"))),
            n => (n as usize).min(MAX_LIST_LIMIT),
        };
        let status = JobStatus::try_from(request.status)
            .map_err(|_| Error::InvalidRequest(format!("unknown job status {}", request.status)))?;
        Ok(self.store.list(&request.project_id, status, limit).await?)
    }

    /// Puts a dead letter back in the queue under the new admission the request carries (if any),
    /// after releasing what its last reservation still holds.
    pub async fn retry(&self, request: RetryJobRequest) -> Result<JobRecord, Error> {
        let (id, project_id) = (request.id.as_str(), request.project_id.as_str());
        let current = self.get(id, project_id).await?;
        let readmission = match request.reservation {
            None => None,
            Some(reservation) => {
                let principal = request.principal.unwrap_or_default();
                if principal.org_id != current.org_id || principal.project_id != current.project_id {
                    return Err(Error::InvalidRequest(
                        "principal must be of the job's organization and project".into(),
                    ));
                }
                let reservation = check_reservation(reservation)?;
                Some(Readmission { user_id: principal.user_id, key_id: principal.key_id, reservation })
            }
        };
        if current.job_status() == JobStatus::Dead {
            self.dispatcher.release_before_retry(&current).await?;
        }
        let job = self
            .store
            .retry_dead(id, project_id, self.clock.now(), readmission)
            .await?
            .ok_or_else(|| Error::JobNotFound(id.to_owned()))?;
        self.metrics.event("revived");
        self.dispatcher.wake();
        Ok(job)
    }
}

/// Most prices one job may carry.
const MAX_PRICES: usize = 64;
/// Longest quota reservation id accepted (the quota service's own bound).
const MAX_RESERVATION_ID_LEN: usize = 256;

/// Refuses a tenancy filter that would match every project.
fn require_project(project_id: &str) -> Result<(), Error> {
    if project_id.trim().is_empty() {
        return Err(Error::InvalidRequest("project_id is required: jobs are read one project at a time".into()));
    }
    Ok(())
}

/// Checks a job's admission: a reservation id the quota service could have made, and amounts it
/// could hold.
fn check_reservation(reservation: JobReservation) -> Result<JobReservation, Error> {
    let id = &reservation.reservation_id;
    if id.is_empty() || id.len() > MAX_RESERVATION_ID_LEN || id.chars().any(char::is_control) {
        return Err(Error::InvalidRequest(format!(
            "reservation.reservation_id must be 1 to {MAX_RESERVATION_ID_LEN} bytes without control characters"
        )));
    }
    if reservation.estimated_tokens < 0 || reservation.estimated_cost_micros < 0 {
        return Err(Error::InvalidRequest("the reservation's estimates must not be negative".into()));
    }
    Ok(reservation)
}

/// Refuses a price list no charge could use: too long, or with negative prices.
fn check_prices(prices: &[meshgate_proto::common::v1::Target]) -> Result<(), Error> {
    if prices.len() > MAX_PRICES {
        return Err(Error::InvalidRequest(format!("at most {MAX_PRICES} prices per job (got {})", prices.len())));
    }
    if let Some(target) = prices.iter().find(|t| {
        [
            t.input_price_micros_per_mtok,
            t.output_price_micros_per_mtok,
            t.cached_input_price_micros_per_mtok,
            t.cache_write_price_micros_per_mtok,
        ]
        .iter()
        .any(|price| *price < 0)
    }) {
        return Err(Error::InvalidRequest(format!("the price of target '{}' is negative", target.id)));
    }
    Ok(())
}

/// Refuses at once what no attempt could deliver: an invalid request (normalised as
/// [`crate::upstream::validate`] does), an unknown provider, a model no provider serves.
fn check_deliverable(upstream: &Upstream, request: &mut CompleteRequest) -> Result<(), Error> {
    crate::upstream::validate(request)?;
    let provider = request.provider.trim().to_ascii_lowercase();
    if provider.is_empty() {
        if upstream.serving(&request.model).is_empty() {
            return Err(Error::UnknownProvider(format!("(no provider serves model '{}')", request.model)));
        }
    } else if !upstream.providers().any(|p| p.name == provider) {
        return Err(Error::UnknownProvider(request.provider.clone()));
    }
    Ok(())
}

/// Message of `Uplink` when no cloud is configured.
const NO_CLOUD: &str =
    "no cloud meshgate is configured: set [sync.cloud] url and key (MESHGATE_CLOUD_URL, MESHGATE_CLOUD_KEY)";

/// Serves `Complete` over an [`Upstream`], the queue RPCs over an optional [`Queue`] and
/// `Uplink` over an optional cloud [`Uplink`].
#[derive(Clone)]
pub struct SyncService {
    upstream: Upstream,
    queue: Option<Queue>,
    uplink: Option<Uplink>,
}

impl SyncService {
    pub fn new(upstream: Upstream, queue: Option<Queue>, uplink: Option<Uplink>) -> Self {
        Self { upstream, queue, uplink }
    }

    fn queue(&self) -> Result<&Queue, Error> {
        self.queue.as_ref().ok_or(Error::NotImplemented(NO_QUEUE))
    }
}

#[tonic::async_trait]
impl SyncApi for SyncService {
    type CompleteStream = Pin<Box<dyn Stream<Item = Result<CompleteChunk, Status>> + Send>>;

    async fn complete(&self, request: Request<CompleteRequest>) -> Result<Response<Self::CompleteStream>, Status> {
        // A caller that only set the x-request-id header still gets it forwarded upstream.
        let header_id = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut request = request.into_inner();
        if request.request_id.is_empty()
            && let Some(id) = header_id
        {
            request.request_id = id;
        }
        let stream = self.upstream.complete(request)?;
        Ok(Response::new(Box::pin(stream.map(|item| item.map_err(Status::from)))))
    }

    async fn embed(&self, request: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        let header_id = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut request = request.into_inner();
        if request.request_id.is_empty()
            && let Some(id) = header_id
        {
            request.request_id = id;
        }
        Ok(Response::new(self.upstream.embed(request).await?))
    }

    async fn enqueue(&self, request: Request<EnqueueRequest>) -> Result<Response<Job>, Status> {
        let (job, created) = self.queue()?.enqueue(&self.upstream, request.into_inner()).await?;
        let mut response = Response::new(job.to_proto());
        if !created {
            response
                .metadata_mut()
                .insert(IDEMPOTENT_REPLAY_METADATA, tonic::metadata::MetadataValue::from_static("true"));
        }
        Ok(response)
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let request = request.into_inner();
        let job = self.queue()?.get(&request.id, &request.project_id).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn list_jobs(&self, request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let jobs = self.queue()?.list(request.into_inner()).await?;
        Ok(Response::new(ListJobsResponse { jobs: jobs.iter().map(JobRecord::to_proto).collect() }))
    }

    async fn retry_job(&self, request: Request<RetryJobRequest>) -> Result<Response<Job>, Status> {
        let job = self.queue()?.retry(request.into_inner()).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn uplink(&self, request: Request<UplinkRequest>) -> Result<Response<UplinkResponse>, Status> {
        let uplink = self.uplink.as_ref().ok_or(Error::NotImplemented(NO_CLOUD))?;
        let batch_id = uplink.stage(request.into_inner().traces).await.map_err(Error::from)?;
        Ok(Response::new(UplinkResponse { batch_id }))
    }
}

/// Frees a submission's reservation when the submission is dropped before the store answered.
struct AbandonedSubmission<'a> {
    dispatcher: &'a Dispatcher,
    job: Option<JobRecord>,
}

impl AbandonedSubmission<'_> {
    fn disarm(mut self) {
        self.job = None;
    }
}

impl Drop for AbandonedSubmission<'_> {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            self.dispatcher.release_abandoned(job);
        }
    }
}
