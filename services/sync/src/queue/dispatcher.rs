//! Workers: claim due jobs, deliver each through [`Upstream`], charge it, record how it ended;
//! and release the reservations of dead letters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::TimeDelta;
use futures::StreamExt;
use meshgate_proto::common::v1::{Principal, Usage};
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_proto::quota::v1::{ChargeRequest, CommitRequest, ReleaseRequest};
use meshgate_proto::sync::v1::CompleteRequest;
use meshgate_runtime::error::ErrorCode;
use meshgate_runtime::{MeshChannel, Shutdown};
use meshgate_storage::SharedClock;
use meshgate_wire::Answer;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use tokio::sync::{Notify, Semaphore};

use super::{Finish, JobOutcome, JobRecord, JobStore, QueueError};
use crate::error::Error;
use crate::retry::RetryPolicy;
use crate::upstream::{CallOptions, Upstream};

/// Counters of the queue: `event` is `enqueued`, `deduplicated`, `succeeded`, `retried`, `dead`,
/// `lost_lease`, `revived` (a dead letter put back), `charge_pending` (delivered, the charge to be
/// retried), `charge_refused` (the quota service refused the usage as invalid: delivered
/// uncharged), `released` (a dead letter's reservation freed), `interrupted_charged` (an attempt
/// a stopped worker left unrecorded, charged at the job's estimate before the next), `cut_charged`
/// (an attempt cut mid-stream, charged what it served), `attempt_uncharged` (either charge
/// failed) or `abandoned_released` (a submission its caller gave up on before it was stored: its
/// reservation freed).
#[derive(Clone)]
pub struct QueueMetrics {
    pub(crate) jobs: IntCounterVec,
    pub(crate) delivery: HistogramVec,
}

impl Default for QueueMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl QueueMetrics {
    pub fn new() -> Self {
        let jobs =
            IntCounterVec::new(Opts::new("meshgate_sync_jobs_total", "Durable queue events by kind"), &["event"])
                .expect("static metric options are valid");
        let delivery = HistogramVec::new(
            HistogramOpts::new("meshgate_sync_job_delivery_seconds", "Duration of one delivery attempt of a job")
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
            &["outcome"],
        )
        .expect("static metric options are valid");
        Self { jobs, delivery }
    }

    pub fn register(&self, metrics: &meshgate_runtime::Metrics) {
        metrics.register(Box::new(self.jobs.clone()));
        metrics.register(Box::new(self.delivery.clone()));
    }

    pub(crate) fn event(&self, event: &str) {
        self.jobs.with_label_values(&[event]).inc();
    }
}

/// How the workers run.
#[derive(Clone, Debug)]
pub struct DispatcherConfig {
    pub policy: RetryPolicy,
    /// How long a claimed job belongs to its worker without news; renewed every third of it while
    /// the job is being worked on.
    pub lease: Duration,
    /// Longest delivery attempt.
    pub attempt_timeout: Duration,
    /// Jobs claimed per round at most.
    pub batch_size: usize,
    /// Deliveries in flight at most.
    pub concurrency: usize,
    /// How often the store is polled when nothing woke the workers.
    pub poll_interval: Duration,
}

/// Settles jobs with the quota service: a delivered job's usage is charged to its principal's
/// budgets once, at the price of the provider that served it, by committing the reservation it
/// was admitted with (`Quota.Commit`) or, for a job queued without one, through `Quota.Charge`
/// under `job:<id>`; a dead letter's reservation is released.
#[derive(Clone)]
pub struct Charger {
    quota: QuotaClient<MeshChannel>,
    timeout: Duration,
}

/// Why a charge did not land.
enum ChargeFailure {
    /// The quota service could not be reached or failed: try again later.
    Retry(Error),
    /// The quota service refused the usage itself (INVALID_ARGUMENT): no retry can land it.
    Refused(String),
}

impl Charger {
    pub fn new(quota: QuotaClient<MeshChannel>, timeout: Duration) -> Self {
        Self { quota, timeout }
    }

    /// The job's usage with its cost, each class of token (cached, written to the cache,
    /// reasoning) at its price: the served provider's price for the model, else the dearest
    /// listed (never undercharge), else none.
    pub fn priced_usage(job: &JobRecord, outcome: &JobOutcome) -> Usage {
        let usage = outcome.usage.unwrap_or_default();
        let model = job.request.as_ref().map_or("", |r| r.model.as_str());
        let served = job.prices.iter().find(|t| t.provider == outcome.provider && t.model == model);
        let cost = served
            .map(|t| t.cost_of(&usage))
            .or_else(|| job.prices.iter().map(|t| t.cost_of(&usage)).max())
            .unwrap_or(0);
        Usage { total_tokens: usage.tokens(), cost_micros: cost, ..usage }
    }

    fn principal(job: &JobRecord) -> Principal {
        Principal {
            org_id: job.org_id.clone(),
            project_id: job.project_id.clone(),
            user_id: job.user_id.clone(),
            key_id: job.key_id.clone(),
            ..Principal::default()
        }
    }

    /// Calls the quota service, retrying briefly; the last failure's status otherwise.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(QuotaClient<MeshChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = tonic::Status::unavailable("not tried");
        for delay in [0u64, 100, 500] {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            match tokio::time::timeout(self.timeout, call(self.quota.clone())).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                // The quota service judged the request itself: asking again changes nothing.
                Ok(Err(status))
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument | tonic::Code::AlreadyExists | tonic::Code::NotFound
                    ) =>
                {
                    return Err(status);
                }
                Ok(Err(status)) => last = status,
                Err(_) => last = tonic::Status::deadline_exceeded("no answer in time"),
            }
        }
        Err(last)
    }

    /// Charges the delivered job's `usage` once: commits its open reservation (with its principal,
    /// so a reservation the quota store lost is still charged), else charges `job:<id>`.
    async fn charge(&self, job: &JobRecord, usage: Usage) -> Result<(), ChargeFailure> {
        let failed = |status: tonic::Status| {
            let reason = format!("{}: {}", status.code(), status.message());
            if status.code() == tonic::Code::InvalidArgument {
                ChargeFailure::Refused(reason)
            } else {
                ChargeFailure::Retry(Error::Charge(reason))
            }
        };
        if job.reservation_open {
            let commit = CommitRequest {
                reservation_id: job.reservation_id.clone(),
                usage: Some(usage),
                principal: Some(Self::principal(job)),
            };
            match self
                .call(|mut quota| {
                    let commit = commit.clone();
                    async move { quota.commit(commit).await }
                })
                .await
            {
                Ok(_) => return Ok(()),
                // Released behind the job's back (a stale worker's dead letter): charge it directly.
                Err(status) if status.code() == tonic::Code::AlreadyExists => {}
                Err(status) => return Err(failed(status)),
            }
        }
        self.charge_once(job, format!("job:{}", job.id), usage).await.map_err(failed)
    }

    /// Charges `usage` served by a failed attempt `attempt` of `job` (one cut mid-stream, or one
    /// a stopped worker left unrecorded), once per attempt (`job:<id>:attempt:<n>`): the delivery
    /// that succeeds later is charged on its own.
    async fn charge_attempt(&self, job: &JobRecord, attempt: i32, usage: Usage) -> Result<(), Error> {
        self.charge_once(job, format!("job:{}:attempt:{attempt}", job.id), usage)
            .await
            .map_err(|status| Error::Charge(format!("{}: {}", status.code(), status.message())))
    }

    /// `Quota.Charge` of one request's `usage` to `job`'s principal under `charge_id` (a replay
    /// charges nothing).
    async fn charge_once(&self, job: &JobRecord, charge_id: String, usage: Usage) -> Result<(), tonic::Status> {
        let charge =
            ChargeRequest { charge_id, principal: Some(Self::principal(job)), usage: Some(usage), requests: 1 };
        self.call(|mut quota| {
            let charge = charge.clone();
            async move { quota.charge(charge).await }
        })
        .await
        .map(drop)
    }

    /// Frees the reservation of a job that will not be delivered. One the quota service no longer
    /// knows (expired and forgotten) or already settled holds nothing: that counts as done.
    async fn release(&self, job: &JobRecord) -> Result<(), Error> {
        let release = ReleaseRequest { reservation_id: job.reservation_id.clone() };
        match self
            .call(|mut quota| {
                let release = release.clone();
                async move { quota.release(release).await }
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(status) if matches!(status.code(), tonic::Code::NotFound | tonic::Code::AlreadyExists) => Ok(()),
            Err(status) => Err(Error::Release(format!("{}: {}", status.code(), status.message()))),
        }
    }
}

/// Delivers the jobs of a [`JobStore`].
#[derive(Clone)]
pub struct Dispatcher {
    store: Arc<dyn JobStore>,
    upstream: Upstream,
    clock: SharedClock,
    config: DispatcherConfig,
    metrics: QueueMetrics,
    wake: Arc<Notify>,
    charger: Option<Charger>,
    /// A job became a dead letter since the last sweep of dead letters' reservations.
    died: Arc<AtomicBool>,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn JobStore>,
        upstream: Upstream,
        clock: SharedClock,
        config: DispatcherConfig,
        metrics: QueueMetrics,
    ) -> Self {
        Self {
            store,
            upstream,
            clock,
            config,
            metrics,
            wake: Arc::new(Notify::new()),
            charger: None,
            died: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Charges delivered jobs through `charger` before marking them succeeded, and releases the
    /// reservations of dead letters.
    pub fn charging(self, charger: Charger) -> Self {
        Self { charger: Some(charger), ..self }
    }

    /// Wakes idle workers (a job was enqueued or put back).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// One round, for tests and tools: claims up to a batch of due jobs, delivers them all
    /// concurrently, records their outcomes and releases the reservations of dead letters.
    /// Returns how many were claimed.
    pub async fn run_once(&self) -> Result<usize, QueueError> {
        let jobs = self.claim(self.config.batch_size).await?;
        let claimed = jobs.len();
        futures::future::join_all(jobs.into_iter().map(|job| self.process(job))).await;
        self.release_dead_reservations().await;
        Ok(claimed)
    }

    /// Releases the reservations dead letters still hold: those of jobs that just died, of jobs
    /// that died with their lease, and of earlier releases that failed. Returns how many.
    pub async fn release_dead_reservations(&self) -> usize {
        let Some(charger) = &self.charger else { return 0 };
        self.died.store(false, Ordering::Relaxed);
        let dead = match self.store.open_dead_reservations(self.config.batch_size).await {
            Ok(dead) => dead,
            Err(err) => {
                tracing::warn!(error = %err, "sync queue: cannot list dead letters' reservations");
                return 0;
            }
        };
        let mut released = 0;
        for job in dead {
            if let Err(err) = charger.release(&job).await {
                tracing::warn!(job = %job.id, error = %err, "sync queue: a dead letter's reservation stays held for now");
                continue;
            }
            match self.store.close_reservation(&job.id, &job.reservation_id).await {
                Ok(()) => {
                    released += 1;
                    self.metrics.event("released");
                }
                Err(err) => tracing::warn!(job = %job.id, error = %err, "sync queue: cannot record a release"),
            }
        }
        released
    }

    /// Frees `job`'s reservation in the background (the submission that made it was abandoned
    /// before it was stored). Should the store still create the job, its delivery finds the
    /// reservation released and charges the usage directly, once.
    pub fn release_abandoned(&self, job: JobRecord) {
        let Some(charger) = self.charger.clone() else { return };
        if !job.reservation_open {
            return;
        }
        let metrics = self.metrics.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                match charger.release(&job).await {
                    Ok(()) => metrics.event("abandoned_released"),
                    Err(err) => {
                        tracing::warn!(job = %job.id, error = %err, "sync queue: the reservation expires on its own");
                    }
                }
            });
        }
    }

    /// Frees the open reservation of the dead letter `job` before it is put back under a new one.
    pub async fn release_before_retry(&self, job: &JobRecord) -> Result<(), Error> {
        let Some(charger) = &self.charger else { return Ok(()) };
        if !job.reservation_open {
            return Ok(());
        }
        charger.release(job).await?;
        self.store.close_reservation(&job.id, &job.reservation_id).await?;
        self.metrics.event("released");
        Ok(())
    }

    /// Runs the workers until `shutdown`: claims whenever a delivery slot is free and jobs are due,
    /// sleeps until woken or the poll interval passes otherwise. In-flight deliveries are awaited
    /// on shutdown; one cut short by the process dying is claimed again when its lease expires
    /// (deliveries renew their leases while they run).
    pub async fn run(self, shutdown: Shutdown) {
        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        // Dead letters' reservations: swept when a job dies here, and now and then for the jobs
        // that died with their lease or whose release failed.
        let mut next_sweep = Instant::now();
        loop {
            while tasks.try_join_next().is_some() {}
            if self.died.load(Ordering::Relaxed) || Instant::now() >= next_sweep {
                self.release_dead_reservations().await;
                next_sweep = Instant::now() + RELEASE_SWEEP_INTERVAL;
            }
            let free = slots.available_permits().min(self.config.batch_size);
            let claimed = if free == 0 {
                Vec::new()
            } else {
                match self.claim(free).await {
                    Ok(jobs) => jobs,
                    Err(err) => {
                        tracing::warn!(store = self.store.kind(), error = %err, "sync queue: claiming failed");
                        Vec::new()
                    }
                }
            };
            let full = claimed.len() == free && free > 0;
            for job in claimed {
                let Ok(permit) = slots.clone().acquire_owned().await else { break };
                let this = self.clone();
                tasks.spawn(async move {
                    this.process(job).await;
                    drop(permit);
                });
            }
            if full {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.config.poll_interval) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn claim(&self, limit: usize) -> Result<Vec<JobRecord>, QueueError> {
        let now = self.clock.now();
        let lease = TimeDelta::from_std(self.config.lease).unwrap_or(TimeDelta::MAX);
        self.store.claim(now, now.checked_add_signed(lease).unwrap_or(now), limit).await
    }

    /// Delivers one claimed job (or, when it was delivered already, only charges it) and records
    /// the outcome (retrying the write a few times: the outcome is lost only if the store stays
    /// down, and then the lease brings the job back).
    async fn process(&self, job: JobRecord) {
        let started = Instant::now();
        let finish = tokio::select! {
            finish = self.work_on(&job) => finish,
            () = self.keep_leased(&job) => {
                // Another worker owns the job now: this attempt's outcome could not be recorded.
                self.metrics.event("lost_lease");
                tracing::warn!(job = %job.id, "sync queue: the lease was lost mid-delivery; the attempt is abandoned");
                return;
            }
        };
        let outcome = match &finish {
            Finish::Succeeded(_) => "succeeded",
            Finish::ChargePending { .. } => "charge_pending",
            Finish::Retry { .. } => "retried",
            Finish::Dead { .. } => "dead",
        };
        self.metrics.delivery.with_label_values(&[outcome]).observe(started.elapsed().as_secs_f64());
        match &finish {
            Finish::Retry { error, .. } | Finish::Dead { error, .. } => {
                tracing::info!(job = %job.id, attempts = job.attempts, outcome, %error, "sync queue: delivery failed");
            }
            Finish::ChargePending { error, .. } => {
                tracing::warn!(job = %job.id, %error, "sync queue: delivered; the charge is retried later");
            }
            Finish::Succeeded(_) => {}
        }
        for delay in [0u64, 100, 500, 2_000] {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            match self.store.finish(&job.id, &job.lease_token, finish.clone(), self.clock.now()).await {
                Ok(true) => {
                    self.metrics.event(outcome);
                    if outcome == "dead" {
                        self.died.store(true, Ordering::Relaxed);
                    }
                    return;
                }
                Ok(false) => {
                    self.metrics.event("lost_lease");
                    tracing::warn!(job = %job.id, "sync queue: the lease expired before the outcome was stored");
                    return;
                }
                Err(err) => tracing::warn!(job = %job.id, error = %err, "sync queue: storing the outcome failed"),
            }
        }
    }

    /// Renews `job`'s lease every third of its length for as long as it is polled; returns only
    /// when the lease was lost (the job was claimed again). A store that does not answer is tried
    /// again at the next renewal: a lease runs out only after three missed ones.
    async fn keep_leased(&self, job: &JobRecord) {
        let lease = TimeDelta::from_std(self.config.lease).unwrap_or(TimeDelta::MAX);
        loop {
            tokio::time::sleep(self.config.lease / 3).await;
            let now = self.clock.now();
            match self.store.renew(&job.id, &job.lease_token, now.checked_add_signed(lease).unwrap_or(now)).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(err) => tracing::warn!(job = %job.id, error = %err, "sync queue: renewing the lease failed"),
            }
        }
    }

    /// The attempt on a claimed job: delivered (or, when it was delivered already, only charged),
    /// and how it ended.
    async fn work_on(&self, job: &JobRecord) -> Finish {
        match job.outcome.clone() {
            Some(delivered) => self.charge(job, delivered).await,
            None => match self.deliver_again(job).await {
                Ok(delivered) => self.charge(job, delivered).await,
                Err(err) => {
                    let permanent = is_permanent(&err);
                    Finish::after_failure(
                        &self.config.policy,
                        job.attempts,
                        job.max_attempts,
                        permanent,
                        self.clock.now(),
                        err.to_string(),
                        err.code().as_str().to_owned(),
                    )
                }
            },
        }
    }

    /// Delivers `job`, first charging an interrupted last attempt at the job's estimate (what its
    /// reservation holds) when the provider may have served it: a provider that honours the job
    /// id as `Idempotency-Key` answers this attempt with that one's completion instead, charged
    /// once when it is delivered. A job queued without a reservation has no estimate to charge.
    async fn deliver_again(&self, job: &JobRecord) -> Result<JobOutcome, Error> {
        if job.interrupted
            && (job.reserved_tokens > 0 || job.reserved_cost_micros > 0)
            && !self.replayed_by_providers(job)
        {
            let estimate = Usage {
                prompt_tokens: job.reserved_tokens,
                total_tokens: job.reserved_tokens,
                cost_micros: job.reserved_cost_micros,
                ..Usage::default()
            };
            self.charge_failed_attempt(job, job.attempts - 1, estimate, "interrupted").await;
        }
        self.deliver(job).await
    }

    /// Charges what a failed attempt served (`why`: `interrupted`, or `cut` mid-stream), logged
    /// and counted; a charge that fails is logged, and the job goes on.
    async fn charge_failed_attempt(&self, job: &JobRecord, attempt: i32, usage: Usage, why: &'static str) {
        let Some(charger) = &self.charger else { return };
        match charger.charge_attempt(job, attempt, usage).await {
            Ok(()) => {
                self.metrics.event(if why == "cut" { "cut_charged" } else { "interrupted_charged" });
                tracing::warn!(
                    job = %job.id, attempt, why, tokens = usage.total_tokens,
                    "sync queue: a failed attempt may have been served; charged"
                );
            }
            Err(err) => {
                self.metrics.event("attempt_uncharged");
                tracing::warn!(job = %job.id, attempt, why, error = %err, "sync queue: charging a failed attempt failed");
            }
        }
    }

    /// Charges a delivered job: `Succeeded` once the charge landed (the outcome's usage then
    /// carries the cost charged), `ChargePending` (kept, retried after the longest backoff) when
    /// the quota service could not take it. Usage the quota service refuses as invalid is never
    /// charged: the job succeeds uncharged (counted and logged) and its reservation is released.
    async fn charge(&self, job: &JobRecord, mut outcome: JobOutcome) -> Finish {
        // A pending charge was priced when it was delivered: its stored usage is final.
        let usage = if job.outcome.is_some() {
            outcome.usage.unwrap_or_default()
        } else {
            Charger::priced_usage(job, &outcome)
        };
        outcome.usage = Some(usage);
        let Some(charger) = &self.charger else { return Finish::Succeeded(outcome) };
        match charger.charge(job, usage).await {
            Ok(()) => Finish::Succeeded(outcome),
            Err(ChargeFailure::Refused(reason)) => {
                tracing::error!(job = %job.id, reason, "sync queue: the quota service refused a delivered job's usage");
                self.metrics.event("charge_refused");
                if job.reservation_open
                    && let Err(err) = charger.release(job).await
                {
                    tracing::warn!(job = %job.id, error = %err, "sync queue: the reservation expires on its own");
                }
                Finish::Succeeded(outcome)
            }
            Err(ChargeFailure::Retry(err)) => {
                let wait = TimeDelta::from_std(self.config.policy.cap).unwrap_or(TimeDelta::MAX);
                let now = self.clock.now();
                Finish::ChargePending {
                    outcome,
                    error: format!("delivered; {err}"),
                    code: err.code().as_str().to_owned(),
                    next_attempt_at_us: super::micros(now.checked_add_signed(wait).unwrap_or(now)),
                }
            }
        }
    }

    /// The job's provider, else the providers serving its model in fallback order.
    fn providers_for(&self, request: &CompleteRequest) -> Vec<String> {
        if request.provider.trim().is_empty() {
            self.upstream.serving(&request.model)
        } else {
            vec![request.provider.clone()]
        }
    }

    /// Whether every provider that may serve `job` answers a repeated `Idempotency-Key` with
    /// its first answer.
    fn replayed_by_providers(&self, job: &JobRecord) -> bool {
        job.request.as_ref().is_some_and(|request| {
            let providers = self.providers_for(request);
            !providers.is_empty() && providers.iter().all(|name| self.upstream.honours_idempotency_keys(name))
        })
    }

    /// One attempt: the job's provider, or each provider serving its model in fallback order
    /// until one answers (moving on only while nothing was received).
    async fn deliver(&self, job: &JobRecord) -> Result<JobOutcome, Error> {
        let request = job.request.clone().ok_or_else(|| Error::InvalidRequest("the job has no request".into()))?;
        let providers = self.providers_for(&request);
        if providers.is_empty() {
            return Err(Error::UnknownProvider(format!("(none serves model '{}')", request.model)));
        }
        let budget = i64::try_from(self.config.attempt_timeout.as_millis()).unwrap_or(i64::MAX).max(1);
        let timeout_ms = if request.timeout_ms > 0 { request.timeout_ms.min(budget) } else { budget };
        let mut last = None;
        for provider in providers {
            // The listed target of this provider's model carries the catalog's facts about it
            // (how it takes its completion limit, its largest completion, native JSON schemas).
            let target = job.prices.iter().find(|t| t.provider == provider && t.model == request.model).cloned();
            let call = CompleteRequest {
                provider: provider.clone(),
                request_id: if request.request_id.is_empty() { job.id.clone() } else { request.request_id.clone() },
                timeout_ms,
                target: target.or_else(|| request.target.clone()),
                ..request.clone()
            };
            let options = CallOptions { idempotency_key: Some(job.id.clone()), max_retries: Some(0) };
            match collect(&self.upstream, call, options, &provider).await {
                Ok(outcome) => return Ok(outcome),
                Err((err, partial)) => {
                    let next = partial.is_none() && err.is_retryable();
                    if let Some(partial) = partial {
                        // Cut after it began: the provider served the prompt and what it sent, as
                        // a chat stream cut the same way is charged.
                        let usage = Charger::priced_usage(job, &partial);
                        self.charge_failed_attempt(job, job.attempts, usage, "cut").await;
                    }
                    last = Some(err);
                    if !next {
                        break;
                    }
                }
            }
        }
        Err(last.expect("at least one provider was tried"))
    }
}

/// How often the workers look for dead letters whose reservation is still held.
const RELEASE_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Failures that another attempt cannot fix: the request itself is refused, or does not fit the
/// model's context window (a job keeps its model).
fn is_permanent(err: &Error) -> bool {
    matches!(
        err.code(),
        ErrorCode::InvalidRequest
            | ErrorCode::PayloadTooLarge
            | ErrorCode::ModelNotFound
            | ErrorCode::ContextLengthExceeded
    ) || matches!(err, Error::UnknownProvider(_))
}

/// Runs one call to its end and folds its answer: text, refusal, reasoning, tool calls (streamed
/// or assembled), usage. The error says whether any content had been received.
/// Tokens of `bytes` of text, estimated (about four bytes a token) where a provider reported none.
fn estimated_tokens(bytes: usize) -> i64 {
    i64::try_from((bytes as u64).div_ceil(4)).unwrap_or(i64::MAX)
}

/// One delivery, read whole. A failure after the provider began answering comes with what it
/// served: its usage when it reported any, else the prompt and the text so far estimated from
/// their length.
async fn collect(
    upstream: &Upstream,
    request: CompleteRequest,
    options: CallOptions,
    provider: &str,
) -> Result<JobOutcome, (Error, Option<JobOutcome>)> {
    let prompt_bytes: usize = request.messages.iter().map(prost::Message::encoded_len).sum();
    let mut stream = upstream.complete_with(request, options).map_err(|err| (err, None))?;
    let mut answer = Answer::default();
    let mut dropped_params = Vec::new();
    let mut received = false;
    let outcome = |answer: Answer, dropped_params: Vec<String>| JobOutcome {
        finish_reason: answer.finish_reason_or_default().to_owned(),
        text: answer.content,
        usage: answer.usage,
        tool_calls: answer.tool_calls,
        model: answer.model,
        provider: provider.to_owned(),
        refusal: answer.refusal,
        reasoning: answer.reasoning,
        dropped_params,
    };
    while let Some(item) = stream.next().await {
        let chunk = match item {
            Ok(chunk) => chunk,
            Err(err) if received => {
                let produced = answer.content.len() + answer.reasoning.len() + answer.refusal.len();
                let calls: usize = answer.tool_calls.iter().map(prost::Message::encoded_len).sum();
                let usage = answer.usage.unwrap_or(Usage {
                    prompt_tokens: estimated_tokens(prompt_bytes),
                    completion_tokens: estimated_tokens(produced + calls),
                    ..Usage::default()
                });
                return Err((err, Some(JobOutcome { usage: Some(usage), ..outcome(answer, dropped_params) })));
            }
            Err(err) => return Err((err, None)),
        };
        received = true;
        if !chunk.dropped_params.is_empty() {
            dropped_params.clone_from(&chunk.dropped_params);
        }
        answer.push(&chunk);
    }
    // The stream ends without an error only after the provider's last chunk.
    Ok(outcome(answer, dropped_params))
}
