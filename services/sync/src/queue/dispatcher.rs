//! Workers: claim due jobs, deliver each through [`Upstream`], record how it ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::TimeDelta;
use futures::StreamExt;
use meshgate_proto::common::v1::{Principal, Usage};
use meshgate_proto::quota::v1::ChargeRequest;
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_proto::sync::v1::CompleteRequest;
use meshgate_runtime::error::ErrorCode;
use meshgate_runtime::{MeshChannel, Shutdown};
use meshgate_storage::SharedClock;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use tokio::sync::{Notify, Semaphore};

use super::{Finish, JobOutcome, JobRecord, JobStore, QueueError, RetryPolicy};
use crate::error::Error;
use crate::upstream::{CallOptions, Upstream};

/// Counters of the queue: `event` is `enqueued`, `deduplicated`, `succeeded`, `retried`, `dead`,
/// `lost_lease` or `revived` (a dead letter put back).
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
    /// How long a claimed job belongs to its worker; an attempt is cut before it expires.
    pub lease: Duration,
    /// Jobs claimed per round at most.
    pub batch_size: usize,
    /// Deliveries in flight at most.
    pub concurrency: usize,
    /// How often the store is polled when nothing woke the workers.
    pub poll_interval: Duration,
}

/// Charges a delivered job's usage to its principal's budgets through `Quota.Charge`, once per
/// job (`job:<id>`), at the price of the provider that served it.
#[derive(Clone)]
pub struct Charger {
    quota: QuotaClient<MeshChannel>,
    timeout: Duration,
}

impl Charger {
    pub fn new(quota: QuotaClient<MeshChannel>, timeout: Duration) -> Self {
        Self { quota, timeout }
    }

    /// The job's usage with its cost: the served provider's price for the model, else the dearest
    /// listed (never undercharge), else none.
    pub fn priced_usage(job: &JobRecord, outcome: &JobOutcome) -> Usage {
        let usage = outcome.usage.unwrap_or_default();
        let (prompt, completion) = (usage.prompt_tokens, usage.completion_tokens);
        let model = job.request.as_ref().map_or("", |r| r.model.as_str());
        let served = job.prices.iter().find(|t| t.provider == outcome.provider && t.model == model);
        let cost = served
            .map(|t| t.cost_micros(prompt, completion))
            .or_else(|| job.prices.iter().map(|t| t.cost_micros(prompt, completion)).max())
            .unwrap_or(0);
        Usage { total_tokens: usage.tokens(), cost_micros: cost, ..usage }
    }

    /// Charges the job, retrying briefly; the error fails the attempt.
    async fn charge(&self, job: &JobRecord, usage: Usage) -> Result<(), Error> {
        let request = ChargeRequest {
            charge_id: format!("job:{}", job.id),
            principal: Some(Principal {
                org_id: job.org_id.clone(),
                project_id: job.project_id.clone(),
                user_id: job.user_id.clone(),
                key_id: job.key_id.clone(),
                ..Principal::default()
            }),
            usage: Some(usage),
            requests: 1,
        };
        let mut last = String::new();
        for delay in [0u64, 100, 500] {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            match tokio::time::timeout(self.timeout, self.quota.clone().charge(request.clone())).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(status)) => last = format!("{}: {}", status.code(), status.message()),
                Err(_) => last = "no answer in time".into(),
            }
        }
        Err(Error::Charge(last))
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
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn JobStore>,
        upstream: Upstream,
        clock: SharedClock,
        config: DispatcherConfig,
        metrics: QueueMetrics,
    ) -> Self {
        Self { store, upstream, clock, config, metrics, wake: Arc::new(Notify::new()), charger: None }
    }

    /// Charges delivered jobs through `charger` before marking them succeeded.
    pub fn charging(self, charger: Charger) -> Self {
        Self { charger: Some(charger), ..self }
    }

    /// Wakes idle workers (a job was enqueued or put back).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// One round, for tests and tools: claims up to a batch of due jobs, delivers them all
    /// concurrently and records their outcomes. Returns how many were claimed.
    pub async fn run_once(&self) -> Result<usize, QueueError> {
        let jobs = self.claim(self.config.batch_size).await?;
        let claimed = jobs.len();
        futures::future::join_all(jobs.into_iter().map(|job| self.process(job))).await;
        Ok(claimed)
    }

    /// Runs the workers until `shutdown`: claims whenever a delivery slot is free and jobs are due,
    /// sleeps until woken or the poll interval passes otherwise. In-flight deliveries are awaited
    /// on shutdown; one cut short by the process dying is claimed again when its lease expires.
    pub async fn run(self, shutdown: Shutdown) {
        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            while tasks.try_join_next().is_some() {}
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

    /// Delivers one claimed job and records the outcome (retrying the write a few times: the
    /// outcome is lost only if the store stays down, and then the lease brings the job back).
    async fn process(&self, job: JobRecord) {
        let started = Instant::now();
        let finish = match self.deliver_and_charge(&job).await {
            Ok(outcome) => Finish::Succeeded(outcome),
            Err(err) => {
                let permanent = is_permanent(&err);
                self.config.policy.after_failure(
                    job.attempts,
                    job.max_attempts,
                    permanent,
                    self.clock.now(),
                    err.to_string(),
                    err.code().as_str().to_owned(),
                )
            }
        };
        let outcome = match &finish {
            Finish::Succeeded(_) => "succeeded",
            Finish::Retry { .. } => "retried",
            Finish::Dead { .. } => "dead",
        };
        self.metrics.delivery.with_label_values(&[outcome]).observe(started.elapsed().as_secs_f64());
        if let Finish::Retry { error, .. } | Finish::Dead { error, .. } = &finish {
            tracing::info!(job = %job.id, attempts = job.attempts, outcome, %error, "sync queue: delivery failed");
        }
        for delay in [0u64, 100, 500, 2_000] {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            match self.store.finish(&job.id, &job.lease_token, finish.clone(), self.clock.now()).await {
                Ok(true) => {
                    self.metrics.event(outcome);
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

    /// One attempt, and the charge of its usage when it succeeded (the outcome's usage then
    /// carries the cost charged).
    async fn deliver_and_charge(&self, job: &JobRecord) -> Result<JobOutcome, Error> {
        let mut outcome = self.deliver(job).await?;
        let usage = Charger::priced_usage(job, &outcome);
        if let Some(charger) = &self.charger {
            charger.charge(job, usage).await?;
        }
        outcome.usage = Some(usage);
        Ok(outcome)
    }

    /// One attempt: the job's provider, or each provider serving its model in fallback order
    /// until one answers (moving on only while nothing was received).
    async fn deliver(&self, job: &JobRecord) -> Result<JobOutcome, Error> {
        let request = job.request.clone().ok_or_else(|| Error::InvalidRequest("the job has no request".into()))?;
        let providers = if request.provider.trim().is_empty() {
            self.upstream.serving(&request.model)
        } else {
            vec![request.provider.clone()]
        };
        if providers.is_empty() {
            return Err(Error::UnknownProvider(format!("(none serves model '{}')", request.model)));
        }
        // The attempt must end while the lease still holds, or another worker may start a second
        // one beside it.
        let budget = (self.config.lease.as_millis() as i64 * 9 / 10).max(1);
        let timeout_ms = if request.timeout_ms > 0 { request.timeout_ms.min(budget) } else { budget };
        let mut last = None;
        for provider in providers {
            let call = CompleteRequest {
                provider: provider.clone(),
                request_id: if request.request_id.is_empty() { job.id.clone() } else { request.request_id.clone() },
                timeout_ms,
                ..request.clone()
            };
            let options = CallOptions { idempotency_key: Some(job.id.clone()), max_retries: Some(0) };
            match collect(&self.upstream, call, options, &provider).await {
                Ok(outcome) => return Ok(outcome),
                Err((err, received)) => {
                    let next = !received && err.is_retryable();
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

/// Failures that another attempt cannot fix: the request itself is refused.
fn is_permanent(err: &Error) -> bool {
    matches!(err.code(), ErrorCode::InvalidRequest | ErrorCode::PayloadTooLarge | ErrorCode::ModelNotFound)
        || matches!(err, Error::UnknownProvider(_))
}

/// Runs one call to its end. The error says whether any content had been received.
async fn collect(
    upstream: &Upstream,
    request: CompleteRequest,
    options: CallOptions,
    provider: &str,
) -> Result<JobOutcome, (Error, bool)> {
    let mut stream = upstream.complete_with(request, options).map_err(|err| (err, false))?;
    let mut outcome = JobOutcome { provider: provider.to_owned(), ..JobOutcome::default() };
    let mut finished = false;
    while let Some(item) = stream.next().await {
        let chunk = item.map_err(|err| (err, !outcome.text.is_empty()))?;
        if !chunk.model.is_empty() {
            outcome.model = chunk.model;
        }
        outcome.text.push_str(&chunk.delta);
        if chunk.delta.is_empty() {
            outcome.finish_reason = chunk.finish_reason;
            outcome.usage = chunk.usage;
            outcome.tool_calls = chunk.tool_calls;
            finished = true;
        }
    }
    if !finished {
        return Err((
            Error::Protocol {
                provider: provider.to_owned(),
                message: "the answer ended without its final chunk".into(),
            },
            true,
        ));
    }
    Ok(outcome)
}
