//! The durable outbound queue: chat completions delivered later, retried until they succeed or
//! become dead letters, never lost across crashes.
//!
//! Two stores keep the same semantics behind [`JobStore`]: [`PgJobStore`] (the mesh: a
//! `sync_jobs` table, workers claim with `FOR UPDATE SKIP LOCKED` so any number of sync replicas
//! share it) and [`FileJobStore`] (standalone: an append-only log, fsync'd before any answer).
//!
//! **Life of a job.** `queued` → claimed by a worker (`running`, `attempts + 1`, leased to that
//! worker until `lease_until`) → `succeeded`, or back to `queued` with `next_attempt_at = now +
//! 1 s·2ⁿ` (capped at 30 s; n = attempts − 1), or `dead` once `max_attempts` are spent or when the
//! failure cannot change on retry (the provider rejected the request). A worker that dies
//! mid-delivery leaves its job `running`; once the lease expires, the job is claimed again (or
//! becomes dead when that was its last attempt). The on-disk store, which one process holds
//! alone, voids those leases when it is opened: a restarted standalone takes its interrupted
//! deliveries back at once. Dead letters are listed with
//! `status = dead` and put back with [`JobStore::retry_dead`] (a fresh attempt budget).
//!
//! **Exactly once.** Delivery is at least once: a worker killed after the provider answered but
//! before the outcome was stored delivers again. Every attempt of a job carries the same
//! `Idempotency-Key` (the job id), so a provider that honours it does the work once.
//!
//! **Charging.** The gateway admits a job like a request and hands over the quota reservation
//! that holds its estimate for as long as it may wait ([`JobRecord::reservation_id`]). With a
//! quota service (`[sync] quota_endpoint`), a delivered job commits that reservation with its
//! actual usage (`Quota.Commit` with the principal: a reservation the quota store lost is still
//! charged, once); a job without one is charged through `Quota.Charge` under the id `job:<id>`.
//! Either is idempotent, so a worker killed between the charge and storing the outcome delivers
//! again without charging twice. A charge that cannot be made does not fail the delivery: the
//! outcome is stored with the job back in `queued` ("delivered, charge pending"), and the next
//! claims retry only the charge, without spending attempts, until it lands. A dead letter's
//! reservation is released (by the workers, which also sweep dead letters whose release failed or
//! that died with their lease); a dead letter put back carries a new admission.

mod dispatcher;
mod file;
mod postgres;

use chrono::{DateTime, TimeDelta, Utc};
use meshgate_proto::common::v1::{Target, ToolCall, Usage};
use meshgate_proto::sync::v1::{CompleteRequest, Job, JobReservation, JobStatus};
use meshgate_runtime::error::ErrorCode;
use prost::Message as _;
use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::retry::RetryPolicy;

pub use dispatcher::{Charger, Dispatcher, DispatcherConfig, QueueMetrics};
pub use file::FileJobStore;
pub use postgres::PgJobStore;

/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// One job as stored (protobuf-encoded in the on-disk log). Times are microseconds since the Unix
/// epoch, 0 when unset.
#[derive(Clone, PartialEq, prost::Message)]
pub struct JobRecord {
    /// A UUID (v7, so ids sort by creation).
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub org_id: String,
    #[prost(string, tag = "3")]
    pub project_id: String,
    #[prost(string, tag = "4")]
    pub user_id: String,
    #[prost(string, tag = "5")]
    pub key_id: String,
    /// The caller's key, `""` when none.
    #[prost(string, tag = "6")]
    pub idempotency_key: String,
    /// See [`request_hash`].
    #[prost(string, tag = "7")]
    pub request_hash: String,
    #[prost(message, optional, tag = "8")]
    pub request: Option<CompleteRequest>,
    /// A [`JobStatus`] value.
    #[prost(int32, tag = "9")]
    pub status: i32,
    #[prost(int32, tag = "10")]
    pub attempts: i32,
    #[prost(int32, tag = "11")]
    pub max_attempts: i32,
    #[prost(string, tag = "12")]
    pub last_error: String,
    #[prost(string, tag = "13")]
    pub last_error_code: String,
    #[prost(message, optional, tag = "14")]
    pub outcome: Option<JobOutcome>,
    #[prost(int64, tag = "15")]
    pub created_at_us: i64,
    #[prost(int64, tag = "16")]
    pub updated_at_us: i64,
    #[prost(int64, tag = "17")]
    pub next_attempt_at_us: i64,
    #[prost(int64, tag = "18")]
    pub lease_until_us: i64,
    #[prost(string, tag = "19")]
    pub lease_token: String,
    #[prost(int64, tag = "20")]
    pub finished_at_us: i64,
    /// The cloud targets that may serve the job, with their prices (see `EnqueueRequest.prices`).
    #[prost(message, repeated, tag = "21")]
    pub prices: Vec<Target>,
    /// The quota reservation holding the job's estimate, `""` when it was queued without one
    /// (then the delivered job is charged through `Quota.Charge`).
    #[prost(string, tag = "22")]
    pub reservation_id: String,
    /// What the reservation holds: tokens, and cost in micro-dollars.
    #[prost(int64, tag = "23")]
    pub reserved_tokens: i64,
    #[prost(int64, tag = "24")]
    pub reserved_cost_micros: i64,
    /// The reservation still holds budget: delivery commits it, a dead letter releases it.
    #[prost(bool, tag = "25")]
    pub reservation_open: bool,
    /// Set on a job as claimed (never stored): its last attempt's worker stopped without
    /// recording how it ended (killed, or its lease lost), so that attempt may have been served.
    #[prost(bool, tag = "26")]
    pub interrupted: bool,
}

/// A dead letter's new admission (`RetryJob`): who made it and the reservation it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Readmission {
    pub user_id: String,
    pub key_id: String,
    pub reservation: JobReservation,
}

/// [`JobRecord::prices`] as stored in Postgres (`sync_jobs.prices`, protobuf).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PriceList {
    #[prost(message, repeated, tag = "1")]
    pub targets: Vec<Target>,
}

/// What a successful delivery produced.
#[derive(Clone, PartialEq, prost::Message)]
pub struct JobOutcome {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(string, tag = "2")]
    pub finish_reason: String,
    #[prost(message, optional, tag = "3")]
    pub usage: Option<Usage>,
    #[prost(message, repeated, tag = "4")]
    pub tool_calls: Vec<ToolCall>,
    #[prost(string, tag = "5")]
    pub model: String,
    #[prost(string, tag = "6")]
    pub provider: String,
    #[prost(string, tag = "7")]
    pub refusal: String,
    #[prost(string, tag = "8")]
    pub reasoning: String,
    /// Request parameters the provider's body left out.
    #[prost(string, repeated, tag = "9")]
    pub dropped_params: Vec<String>,
}

/// Microseconds since the epoch.
pub fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

/// The time of `us` microseconds since the epoch (out-of-range values saturate).
pub fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or(if us < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

fn timestamp(us: i64) -> Option<prost_types::Timestamp> {
    (us != 0).then(|| prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
    })
}

impl JobRecord {
    /// The status as the enum (unknown values read as unspecified).
    pub fn job_status(&self) -> JobStatus {
        JobStatus::try_from(self.status).unwrap_or(JobStatus::Unspecified)
    }

    /// Delivered, but not charged yet: only the charge is left to do.
    pub fn charge_pending(&self) -> bool {
        self.outcome.is_some() && matches!(self.job_status(), JobStatus::Queued | JobStatus::Running)
    }

    /// The API view of the job.
    pub fn to_proto(&self) -> Job {
        let status = self.job_status();
        let outcome = self.outcome.clone().unwrap_or_default();
        Job {
            id: self.id.clone(),
            status: status as i32,
            attempts: self.attempts,
            last_error: self.last_error.clone(),
            result: outcome.text,
            usage: outcome.usage,
            created_at: timestamp(self.created_at_us),
            next_attempt_at: if status == JobStatus::Queued { timestamp(self.next_attempt_at_us) } else { None },
            idempotency_key: self.idempotency_key.clone(),
            org_id: self.org_id.clone(),
            project_id: self.project_id.clone(),
            max_attempts: self.max_attempts,
            last_error_code: self.last_error_code.clone(),
            finish_reason: outcome.finish_reason,
            tool_calls: outcome.tool_calls,
            model: outcome.model,
            provider: outcome.provider,
            updated_at: timestamp(self.updated_at_us),
            finished_at: timestamp(self.finished_at_us),
            reservation: (!self.reservation_id.is_empty()).then(|| JobReservation {
                reservation_id: self.reservation_id.clone(),
                estimated_tokens: self.reserved_tokens,
                estimated_cost_micros: self.reserved_cost_micros,
            }),
            charge_pending: self.charge_pending(),
            refusal: outcome.refusal,
            reasoning_content: outcome.reasoning,
            dropped_params: outcome.dropped_params,
        }
    }
}

/// How an attempt ended, as the store records it.
#[derive(Clone, Debug, PartialEq)]
pub enum Finish {
    /// Delivered and charged: its reservation (if any) is settled.
    Succeeded(JobOutcome),
    /// Delivered, but the charge failed: the outcome is kept and the job is `queued` again until
    /// `next_attempt_at_us`, when only the charge is tried again (no attempt is spent).
    ChargePending { outcome: JobOutcome, error: String, code: String, next_attempt_at_us: i64 },
    /// Back to `queued` until `next_attempt_at_us`.
    Retry { error: String, code: String, next_attempt_at_us: i64 },
    /// A dead letter.
    Dead { error: String, code: String },
}

impl Finish {
    /// What a failed attempt leads to under `policy`: a retry after its backoff, or a dead
    /// letter when the budget is spent or the failure is `permanent`.
    pub fn after_failure(
        policy: &RetryPolicy,
        attempts: i32,
        max_attempts: i32,
        permanent: bool,
        now: DateTime<Utc>,
        error: String,
        code: String,
    ) -> Self {
        if permanent || attempts >= max_attempts {
            return Finish::Dead { error, code };
        }
        let wait = TimeDelta::from_std(policy.backoff(attempts)).unwrap_or(TimeDelta::MAX);
        let at = now.checked_add_signed(wait).unwrap_or(DateTime::<Utc>::MAX_UTC);
        Finish::Retry { error, code, next_attempt_at_us: micros(at) }
    }
}

/// Failures of a store.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue store is unavailable: {0}")]
    Unavailable(String),
    #[error("the queue store is corrupt: {0}")]
    Corrupt(String),
    #[error("idempotency key {key:?} was already used in this project with a different request (job {job_id})")]
    IdempotencyConflict { key: String, job_id: String },
    #[error("job {id} is {status}, not a dead letter: only dead letters can be retried")]
    NotDead { id: String, status: &'static str },
}

impl QueueError {
    /// The shared code of this error: a conflict is the caller's to resolve, a corrupt store
    /// needs an operator, an unavailable one may answer again.
    pub fn code(&self) -> ErrorCode {
        match self {
            QueueError::Unavailable(_) => ErrorCode::Unavailable,
            QueueError::Corrupt(_) => ErrorCode::Internal,
            QueueError::IdempotencyConflict { .. } | QueueError::NotDead { .. } => ErrorCode::Conflict,
        }
    }
}

impl From<QueueError> for Error {
    fn from(err: QueueError) -> Self {
        Error::Queue { code: err.code(), message: err.to_string() }
    }
}

impl From<meshgate_storage::Error> for QueueError {
    fn from(err: meshgate_storage::Error) -> Self {
        QueueError::Unavailable(err.to_string())
    }
}

impl From<tokio_postgres::Error> for QueueError {
    fn from(err: tokio_postgres::Error) -> Self {
        QueueError::Unavailable(meshgate_storage::Error::from(err).to_string())
    }
}

/// A status's lower-case name, for messages.
pub fn status_name(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Unspecified => "unspecified",
        JobStatus::Queued => "queued",
        JobStatus::Running => "running",
        JobStatus::Succeeded => "succeeded",
        JobStatus::Dead => "dead",
    }
}

/// Where jobs live. Implementations keep every change durable before returning.
#[async_trait::async_trait]
pub trait JobStore: Send + Sync {
    /// `"postgres"` or `"file"`, for logs.
    fn kind(&self) -> &'static str;

    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), QueueError>;

    /// Stores a new `queued` job, or returns the job already stored under the same project and
    /// idempotency key (`false`); a reused key with another [`JobRecord::request_hash`] is
    /// [`QueueError::IdempotencyConflict`].
    async fn enqueue(&self, job: JobRecord) -> Result<(JobRecord, bool), QueueError>;

    /// The job `id` of `project_id` (`None` for another project's).
    async fn get(&self, id: &str, project_id: &str) -> Result<Option<JobRecord>, QueueError>;

    /// The jobs of `project_id`, newest first, of `status` unless unspecified.
    async fn list(&self, project_id: &str, status: JobStatus, limit: usize) -> Result<Vec<JobRecord>, QueueError>;

    /// Claims up to `limit` jobs that are due at `now` (queued with `next_attempt_at <= now`, or
    /// running with an expired lease): each becomes `running` with `attempts + 1` (a job whose
    /// charge is pending spends no attempt), leased until `lease_until` under a fresh token. A
    /// job whose lease expired on its last attempt becomes a dead letter instead (never one
    /// already delivered).
    async fn claim(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, QueueError>;

    /// Records how the attempt holding `lease_token` ended; `false` when the lease was lost (the
    /// job was claimed again after the lease expired) and nothing was written.
    async fn finish(&self, id: &str, lease_token: &str, finish: Finish, now: DateTime<Utc>)
    -> Result<bool, QueueError>;

    /// Extends the lease `lease_token` holds on the running job `id` to `lease_until` (a delivery
    /// still in progress says it is alive); `false` when that lease was lost.
    async fn renew(&self, id: &str, lease_token: &str, lease_until: DateTime<Utc>) -> Result<bool, QueueError>;

    /// Puts the dead letter `id` back in the queue, due at `now`, with its attempts reset and the
    /// reservation of `readmission` (none: no reservation, charged on delivery). `None` when
    /// `project_id` has no such job.
    async fn retry_dead(
        &self,
        id: &str,
        project_id: &str,
        now: DateTime<Utc>,
        readmission: Option<Readmission>,
    ) -> Result<Option<JobRecord>, QueueError>;

    /// Up to `limit` dead letters whose reservation still holds budget, oldest first.
    async fn open_dead_reservations(&self, limit: usize) -> Result<Vec<JobRecord>, QueueError>;

    /// Records that the reservation `reservation_id` of job `id` no longer holds budget (it was
    /// released); nothing changes when the job holds another one by now.
    async fn close_reservation(&self, id: &str, reservation_id: &str) -> Result<(), QueueError>;

    /// Deletes succeeded jobs finished before `before`; returns how many.
    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, QueueError>;
}

/// Checks a caller's idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY_LEN`] visible ASCII characters
/// (it travels in HTTP headers). `Err` says why not.
pub fn validate_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the idempotency key is empty".into());
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(format!("the idempotency key is longer than {MAX_IDEMPOTENCY_KEY_LEN} characters"));
    }
    if let Some(bad) = key.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("the idempotency key contains {bad:?}: only visible ASCII characters are allowed"));
    }
    Ok(())
}

/// The SHA-256 (hex) of a request without its request id and timeout: what a resubmission with the
/// same idempotency key must match.
pub fn request_hash(request: &CompleteRequest) -> String {
    let normalized = CompleteRequest { request_id: String::new(), timeout_ms: 0, ..request.clone() };
    hex::encode(Sha256::digest(normalized.encode_to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_retry_until_the_budget_then_die() {
        let policy = RetryPolicy { max_attempts: 3, ..RetryPolicy::default() };
        let now = DateTime::parse_from_rfc3339("2031-01-01T00:00:00Z").unwrap().to_utc();
        let retry = Finish::after_failure(&policy, 2, 3, false, now, "e".into(), "c".into());
        assert_eq!(
            retry,
            Finish::Retry { error: "e".into(), code: "c".into(), next_attempt_at_us: micros(now) + 2_000_000 }
        );
        assert!(matches!(
            Finish::after_failure(&policy, 3, 3, false, now, "e".into(), "c".into()),
            Finish::Dead { .. }
        ));
        assert!(matches!(Finish::after_failure(&policy, 1, 3, true, now, "e".into(), "c".into()), Finish::Dead { .. }));
    }

    #[test]
    fn idempotency_keys_are_visible_ascii_of_bounded_length() {
        assert!(validate_idempotency_key("order-42:retry_1").is_ok());
        assert!(validate_idempotency_key(&"k".repeat(255)).is_ok());
        for bad in ["", " lead", "tab\there", "new\nline", "é", &"k".repeat(256)] {
            assert!(validate_idempotency_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_request_hash_ignores_request_id_and_timeout() {
        let a = CompleteRequest { model: "m".into(), request_id: "r1".into(), ..CompleteRequest::default() };
        let b = CompleteRequest { request_id: "r2".into(), timeout_ms: 5, ..a.clone() };
        let c = CompleteRequest { model: "other".into(), ..a.clone() };
        assert_eq!(request_hash(&a), request_hash(&b));
        assert_ne!(request_hash(&a), request_hash(&c));
    }

    #[test]
    fn records_map_to_the_api_view() {
        let record = JobRecord {
            id: "j".into(),
            status: JobStatus::Queued as i32,
            created_at_us: 1_500_000,
            next_attempt_at_us: 2_000_001,
            ..JobRecord::default()
        };
        let job = record.to_proto();
        assert_eq!(job.created_at, Some(prost_types::Timestamp { seconds: 1, nanos: 500_000_000 }));
        assert_eq!(job.next_attempt_at, Some(prost_types::Timestamp { seconds: 2, nanos: 1000 }));
        assert_eq!(job.finished_at, None);
        let done = JobRecord { status: JobStatus::Succeeded as i32, ..record };
        assert_eq!(done.to_proto().next_attempt_at, None);
    }
}
