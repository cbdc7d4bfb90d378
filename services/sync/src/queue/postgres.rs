//! The queue in Postgres (`sync_jobs`): workers of any number of replicas claim due jobs with
//! `FOR UPDATE SKIP LOCKED`, so no two claim the same job and none waits on another's lock.

use chrono::{DateTime, Utc};
use meshgate_proto::sync::v1::{CompleteRequest, JobStatus};
use meshgate_storage::{PgPool, postgres_client};
use prost::Message as _;
use tokio_postgres::Row;
use uuid::Uuid;

use super::{
    Finish, JobOutcome, JobRecord, JobStore, PriceList, QueueError, Readmission, from_micros, micros, status_name,
};

const COLUMNS: &str = "id, org_id, project_id, user_id, key_id, idempotency_key, request_hash, request, status, \
    attempts, max_attempts, last_error, last_error_code, outcome, created_at, updated_at, next_attempt_at, \
    lease_until, lease_token, finished_at, prices, reservation_id, reserved_tokens, reserved_cost_micros, \
    reservation_open";

/// [`JobStore`] over a Postgres pool (migrated with [`crate::migrations`]).
#[derive(Clone)]
pub struct PgJobStore {
    pool: PgPool,
}

impl PgJobStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> QueueError {
    QueueError::Corrupt(format!("{what}: {err}"))
}

fn record(row: &Row) -> Result<JobRecord, QueueError> {
    let request: Vec<u8> = row.get("request");
    let outcome: Option<Vec<u8>> = row.get("outcome");
    let id: Uuid = row.get("id");
    let at = |name: &str| row.get::<_, Option<DateTime<Utc>>>(name).map_or(0, micros);
    Ok(JobRecord {
        id: id.to_string(),
        org_id: row.get("org_id"),
        project_id: row.get("project_id"),
        user_id: row.get("user_id"),
        key_id: row.get("key_id"),
        idempotency_key: row.get("idempotency_key"),
        request_hash: row.get("request_hash"),
        request: Some(
            CompleteRequest::decode(request.as_slice()).map_err(|e| corrupt(&format!("request of job {id}"), e))?,
        ),
        status: i32::from(row.get::<_, i16>("status")),
        attempts: row.get("attempts"),
        max_attempts: row.get("max_attempts"),
        last_error: row.get("last_error"),
        last_error_code: row.get("last_error_code"),
        outcome: outcome
            .map(|bytes| JobOutcome::decode(bytes.as_slice()))
            .transpose()
            .map_err(|e| corrupt(&format!("outcome of job {id}"), e))?,
        created_at_us: at("created_at"),
        updated_at_us: at("updated_at"),
        next_attempt_at_us: at("next_attempt_at"),
        lease_until_us: at("lease_until"),
        lease_token: row.get::<_, Option<Uuid>>("lease_token").map(|t| t.to_string()).unwrap_or_default(),
        finished_at_us: at("finished_at"),
        prices: PriceList::decode(row.get::<_, &[u8]>("prices"))
            .map_err(|e| corrupt(&format!("prices of job {id}"), e))?
            .targets,
        reservation_id: row.get("reservation_id"),
        reserved_tokens: row.get("reserved_tokens"),
        reserved_cost_micros: row.get("reserved_cost_micros"),
        reservation_open: row.get("reservation_open"),
        interrupted: false,
    })
}

/// A job id as the table's uuid; malformed ids cannot name a job.
fn parse_id(id: &str) -> Option<Uuid> {
    Uuid::parse_str(id).ok()
}

#[async_trait::async_trait]
impl JobStore for PgJobStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<(), QueueError> {
        postgres_client(&self.pool).await?.simple_query("SELECT 1 FROM sync_jobs LIMIT 0").await?;
        Ok(())
    }

    async fn enqueue(&self, job: JobRecord) -> Result<(JobRecord, bool), QueueError> {
        let client = postgres_client(&self.pool).await?;
        let id = parse_id(&job.id).ok_or_else(|| corrupt("new job id", &job.id))?;
        let request = job.request.as_ref().map(prost::Message::encode_to_vec).unwrap_or_default();
        let created = from_micros(job.created_at_us);
        let status = job.status as i16;
        let inserted = client
            .query_opt(
                &format!(
                    "INSERT INTO sync_jobs (id, org_id, project_id, user_id, key_id, idempotency_key, request_hash, \
                     request, status, attempts, max_attempts, created_at, updated_at, next_attempt_at, prices, \
                     reservation_id, reserved_tokens, reserved_cost_micros, reservation_open) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $11, $11, $12, $13, $14, $15, $16, $17) \
                     ON CONFLICT (project_id, idempotency_key) WHERE idempotency_key <> '' DO NOTHING \
                     RETURNING {COLUMNS}"
                ),
                &[
                    &id,
                    &job.org_id,
                    &job.project_id,
                    &job.user_id,
                    &job.key_id,
                    &job.idempotency_key,
                    &job.request_hash,
                    &request,
                    &status,
                    &job.max_attempts,
                    &created,
                    &from_micros(job.next_attempt_at_us),
                    &PriceList { targets: job.prices.clone() }.encode_to_vec(),
                    &job.reservation_id,
                    &job.reserved_tokens,
                    &job.reserved_cost_micros,
                    &job.reservation_open,
                ],
            )
            .await?;
        if let Some(row) = inserted {
            return Ok((record(&row)?, true));
        }
        let existing = client
            .query_opt(
                &format!("SELECT {COLUMNS} FROM sync_jobs WHERE project_id = $1 AND idempotency_key = $2"),
                &[&job.project_id, &job.idempotency_key],
            )
            .await?
            .ok_or_else(|| QueueError::Unavailable("the job holding the idempotency key vanished".into()))?;
        let existing = record(&existing)?;
        if existing.request_hash != job.request_hash {
            return Err(QueueError::IdempotencyConflict { key: job.idempotency_key, job_id: existing.id });
        }
        Ok((existing, false))
    }

    async fn get(&self, id: &str, project_id: &str) -> Result<Option<JobRecord>, QueueError> {
        let Some(id) = parse_id(id) else { return Ok(None) };
        let client = postgres_client(&self.pool).await?;
        let row = client
            .query_opt(
                &format!("SELECT {COLUMNS} FROM sync_jobs WHERE id = $1 AND project_id = $2"),
                &[&id, &project_id],
            )
            .await?;
        row.as_ref().map(record).transpose()
    }

    async fn list(&self, project_id: &str, status: JobStatus, limit: usize) -> Result<Vec<JobRecord>, QueueError> {
        let client = postgres_client(&self.pool).await?;
        let status = status as i16;
        let limit = limit as i64;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM sync_jobs WHERE project_id = $1 AND ($2::smallint = 0 OR status = $2::smallint) \
                     ORDER BY created_at DESC, id DESC LIMIT $3"
                ),
                &[&project_id, &status, &limit],
            )
            .await?;
        rows.iter().map(record).collect()
    }

    async fn claim(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, QueueError> {
        let client = postgres_client(&self.pool).await?;
        // A worker died during the last attempt: nothing is left to try. (One that died charging a
        // delivered job spent no attempt: its charge is claimed again below.)
        client
            .execute(
                "UPDATE sync_jobs SET status = 4, lease_until = NULL, lease_token = NULL, updated_at = $1, \
                 finished_at = $1, last_error = 'the last attempt was interrupted (its worker stopped before \
                 finishing)', last_error_code = 'service_unavailable' \
                 WHERE status = 2 AND lease_until <= $1 AND attempts >= max_attempts AND outcome IS NULL",
                &[&now],
            )
            .await?;
        // One token per claim round; a job's token changes whenever it is claimed, so a stale
        // worker cannot record an outcome over a newer attempt.
        let token = Uuid::new_v4();
        let limit = limit as i64;
        let rows = client
            .query(
                &format!(
                    "WITH due AS ( \
                       SELECT id, status = 2 AND outcome IS NULL AS interrupted FROM sync_jobs \
                       WHERE (status = 1 AND next_attempt_at <= $1) OR (status = 2 AND lease_until <= $1) \
                       ORDER BY next_attempt_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
                     UPDATE sync_jobs j SET status = 2, lease_until = $3, \
                       attempts = j.attempts + CASE WHEN j.outcome IS NULL THEN 1 ELSE 0 END, \
                       lease_token = $4, updated_at = $1 \
                     FROM due WHERE j.id = due.id RETURNING {}, due.interrupted",
                    COLUMNS.split(", ").map(|c| format!("j.{c}")).collect::<Vec<_>>().join(", ")
                ),
                &[&now, &limit, &lease_until, &token],
            )
            .await?;
        rows.iter().map(|row| Ok(JobRecord { interrupted: row.get("interrupted"), ..record(row)? })).collect()
    }

    async fn renew(&self, id: &str, lease_token: &str, lease_until: DateTime<Utc>) -> Result<bool, QueueError> {
        let (Some(id), Some(token)) = (parse_id(id), parse_id(lease_token)) else { return Ok(false) };
        let client = postgres_client(&self.pool).await?;
        let updated = client
            .execute(
                "UPDATE sync_jobs SET lease_until = GREATEST(lease_until, $3) \
                 WHERE id = $1 AND lease_token = $2 AND status = 2",
                &[&id, &token, &lease_until],
            )
            .await?;
        Ok(updated == 1)
    }

    async fn finish(
        &self,
        id: &str,
        lease_token: &str,
        finish: Finish,
        now: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let (Some(id), Some(token)) = (parse_id(id), parse_id(lease_token)) else { return Ok(false) };
        let client = postgres_client(&self.pool).await?;
        let updated = match finish {
            Finish::Succeeded(outcome) => {
                client
                    .execute(
                        "UPDATE sync_jobs SET status = 3, outcome = $3, last_error = '', last_error_code = '', \
                         lease_until = NULL, lease_token = NULL, updated_at = $4, finished_at = $4, \
                         reservation_open = false \
                         WHERE id = $1 AND lease_token = $2 AND status = 2",
                        &[&id, &token, &outcome.encode_to_vec(), &now],
                    )
                    .await?
            }
            Finish::ChargePending { outcome, error, code, next_attempt_at_us } => {
                client
                    .execute(
                        "UPDATE sync_jobs SET status = 1, outcome = $3, last_error = $4, last_error_code = $5, \
                         next_attempt_at = $6, lease_until = NULL, lease_token = NULL, updated_at = $7 \
                         WHERE id = $1 AND lease_token = $2 AND status = 2",
                        &[&id, &token, &outcome.encode_to_vec(), &error, &code, &from_micros(next_attempt_at_us), &now],
                    )
                    .await?
            }
            Finish::Retry { error, code, next_attempt_at_us } => {
                client
                    .execute(
                        "UPDATE sync_jobs SET status = 1, last_error = $3, last_error_code = $4, next_attempt_at = $5, \
                         lease_until = NULL, lease_token = NULL, updated_at = $6 \
                         WHERE id = $1 AND lease_token = $2 AND status = 2",
                        &[&id, &token, &error, &code, &from_micros(next_attempt_at_us), &now],
                    )
                    .await?
            }
            Finish::Dead { error, code } => {
                client
                    .execute(
                        "UPDATE sync_jobs SET status = 4, last_error = $3, last_error_code = $4, \
                         lease_until = NULL, lease_token = NULL, updated_at = $5, finished_at = $5 \
                         WHERE id = $1 AND lease_token = $2 AND status = 2",
                        &[&id, &token, &error, &code, &now],
                    )
                    .await?
            }
        };
        Ok(updated == 1)
    }

    async fn retry_dead(
        &self,
        id: &str,
        project_id: &str,
        now: DateTime<Utc>,
        readmission: Option<Readmission>,
    ) -> Result<Option<JobRecord>, QueueError> {
        let Some(job) = self.get(id, project_id).await? else { return Ok(None) };
        let status = job.job_status();
        if status != JobStatus::Dead {
            return Err(QueueError::NotDead { id: job.id, status: status_name(status) });
        }
        let client = postgres_client(&self.pool).await?;
        let (user_id, key_id, reservation) = match readmission {
            Some(r) => (r.user_id, r.key_id, r.reservation),
            None => (job.user_id, job.key_id, Default::default()),
        };
        let row = client
            .query_opt(
                &format!(
                    "UPDATE sync_jobs SET status = 1, attempts = 0, next_attempt_at = $2, updated_at = $2, \
                     finished_at = NULL, user_id = $3, key_id = $4, reservation_id = $5, reserved_tokens = $6, \
                     reserved_cost_micros = $7, reservation_open = $5 <> '' \
                     WHERE id = $1 AND status = 4 RETURNING {COLUMNS}"
                ),
                &[
                    &parse_id(&job.id),
                    &now,
                    &user_id,
                    &key_id,
                    &reservation.reservation_id,
                    &reservation.estimated_tokens,
                    &reservation.estimated_cost_micros,
                ],
            )
            .await?;
        match row {
            Some(row) => Ok(Some(record(&row)?)),
            // Retried concurrently by another caller: report what it is now.
            None => {
                let current = self.get(id, project_id).await?;
                let status = current.as_ref().map_or(JobStatus::Unspecified, JobRecord::job_status);
                Err(QueueError::NotDead { id: id.to_owned(), status: status_name(status) })
            }
        }
    }

    async fn open_dead_reservations(&self, limit: usize) -> Result<Vec<JobRecord>, QueueError> {
        let client = postgres_client(&self.pool).await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM sync_jobs WHERE status = 4 AND reservation_open \
                     ORDER BY updated_at LIMIT $1"
                ),
                &[&(limit as i64)],
            )
            .await?;
        rows.iter().map(record).collect()
    }

    async fn close_reservation(&self, id: &str, reservation_id: &str) -> Result<(), QueueError> {
        let Some(id) = parse_id(id) else { return Ok(()) };
        let client = postgres_client(&self.pool).await?;
        client
            .execute(
                "UPDATE sync_jobs SET reservation_open = false WHERE id = $1 AND reservation_id = $2",
                &[&id, &reservation_id],
            )
            .await?;
        Ok(())
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, QueueError> {
        let client = postgres_client(&self.pool).await?;
        Ok(client.execute("DELETE FROM sync_jobs WHERE status = 3 AND finished_at < $1", &[&before]).await?)
    }
}
