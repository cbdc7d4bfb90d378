//! Traces in Postgres: `request_traces` partitioned by day on `started_at`, plus the `trace_ids`
//! lookup keyed by (org, request id).
//!
//! Why `trace_ids`: on a partitioned table a unique key must include the partition key, so
//! `(started_at, org_id, request_id)` alone would store a retried request twice if its copies
//! carried different start times. Claiming the id in `trace_ids` in the same statement as the
//! insert makes ingestion idempotent across partitions, and gives GetTrace the partition to read.
//! Retention (dropping old partitions) must delete the matching `trace_ids` rows by `started_at`.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Days, NaiveDate, Utc};
use meshgate_proto::analytics::v1 as pb;
use meshgate_storage::{PgPool, ping_postgres, postgres_client};
use parking_lot::Mutex;
use prometheus::IntCounter;
use prost::Message;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tracing::info;

use super::{TraceStore, dedupe, error_rate};
use crate::Error;
use crate::model::{GroupBy, TimeWindow, TraceQuery, TraceRow};

/// Rows per INSERT statement (arrays bound as parameters, so the statement text never changes).
const INSERT_CHUNK: usize = 1_000;
/// Serialises partition creation across replicas. ASCII "mg-parts".
const PARTITION_LOCK_KEY: i64 = 0x6d67_2d70_6172_7473;

const INSERT: &str = "
WITH input AS (
    SELECT * FROM unnest(
        $1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
        $8::text[], $9::text[], $10::text[], $11::text[], $12::int8[], $13::int8[], $14::int8[],
        $15::int8[], $16::int8[], $17::int4[], $18::text[], $19::bool[], $20::bytea[]
    ) AS t(started_at, org_id, request_id, trace_id, project_id, user_id, key_id, requested_model,
           served_model, served_target, layer, prompt_tokens, completion_tokens, total_tokens,
           cost_micros, latency_us, status_code, error_code, stream, trace)
), claimed AS (
    INSERT INTO trace_ids (org_id, request_id, started_at)
    SELECT org_id, request_id, started_at FROM input
    ON CONFLICT DO NOTHING
    RETURNING org_id, request_id
)
INSERT INTO request_traces (started_at, org_id, request_id, trace_id, project_id, user_id, key_id,
    requested_model, served_model, served_target, layer, prompt_tokens, completion_tokens,
    total_tokens, cost_micros, latency_us, status_code, error_code, stream, trace)
SELECT i.started_at, i.org_id, i.request_id, i.trace_id, i.project_id, i.user_id, i.key_id,
    i.requested_model, i.served_model, i.served_target, i.layer, i.prompt_tokens,
    i.completion_tokens, i.total_tokens, i.cost_micros, i.latency_us, i.status_code, i.error_code,
    i.stream, i.trace
FROM input i JOIN claimed c ON c.org_id = i.org_id AND c.request_id = i.request_id
ON CONFLICT DO NOTHING";

/// Name of the partition holding `day`.
pub fn partition_name(day: NaiveDate) -> String {
    format!("request_traces_p{}", day.format("%Y%m%d"))
}

/// The Postgres trace store.
pub struct PostgresTraceStore {
    pool: PgPool,
    /// Days whose partition is known to exist, to skip the catalog on the hot path.
    known: Mutex<HashSet<NaiveDate>>,
    partitions_created: IntCounter,
}

type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// ` AND ...` conditions for an org and time window, numbering parameters after `params`.
fn scope_filter(org_id: &str, window: &TimeWindow, params: &mut Params) -> String {
    params.push(Box::new(org_id.to_owned()));
    let mut sql = format!("org_id = ${}", params.len());
    if let Some(from) = window.from {
        params.push(Box::new(from));
        sql.push_str(&format!(" AND started_at >= ${}", params.len()));
    }
    if let Some(to) = window.to {
        params.push(Box::new(to));
        sql.push_str(&format!(" AND started_at < ${}", params.len()));
    }
    sql
}

fn refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
}

/// The SQL of a group key; `COLLATE "C"` so keys order bytewise, as in the memory store.
fn key_sql(group_by: GroupBy) -> &'static str {
    match group_by {
        GroupBy::Total => "''",
        GroupBy::Day => "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') COLLATE \"C\"",
        GroupBy::Week => "to_char(date_trunc('week', started_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD') COLLATE \"C\"",
        GroupBy::Month => "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM') COLLATE \"C\"",
        GroupBy::Model => "model COLLATE \"C\"",
        GroupBy::Layer => "layer COLLATE \"C\"",
        GroupBy::User => "user_id COLLATE \"C\"",
        GroupBy::Project => "project_id COLLATE \"C\"",
    }
}

fn decode(request_id: &str, bytes: &[u8]) -> Result<pb::Trace, Error> {
    pb::Trace::decode(bytes).map_err(|source| Error::Corrupt { request_id: request_id.to_owned(), source })
}

impl PostgresTraceStore {
    /// `partitions_created` counts partitions this store creates.
    pub fn new(pool: PgPool, partitions_created: IntCounter) -> Self {
        Self { pool, known: Mutex::default(), partitions_created }
    }

    /// Creates the partitions of `days` that do not exist yet; returns how many it created.
    pub async fn ensure_partitions(&self, days: impl IntoIterator<Item = NaiveDate>) -> Result<usize, Error> {
        let missing: Vec<NaiveDate> = {
            let known = self.known.lock();
            let mut days: Vec<NaiveDate> = days.into_iter().filter(|d| !known.contains(d)).collect();
            days.sort_unstable();
            days.dedup();
            days
        };
        if missing.is_empty() {
            return Ok(0);
        }
        let mut client = postgres_client(&self.pool).await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK_KEY]).await?;
        let mut created = 0;
        for day in &missing {
            let name = partition_name(*day);
            let exists: bool = tx.query_one("SELECT to_regclass($1) IS NOT NULL", &[&name]).await?.get(0);
            if exists {
                continue;
            }
            let next = day.checked_add_days(Days::new(1)).ok_or_else(|| {
                Error::InvalidArgument(format!("no partition can hold {day}: the day after is out of range"))
            })?;
            // Names and bounds come from dates, never from input text.
            tx.batch_execute(&format!(
                "CREATE TABLE {name} PARTITION OF request_traces \
                 FOR VALUES FROM ('{day} 00:00:00+00') TO ('{next} 00:00:00+00')"
            ))
            .await?;
            created += 1;
        }
        tx.commit().await?;
        self.known.lock().extend(missing);
        if created > 0 {
            self.partitions_created.inc_by(created as u64);
            info!(created, "created request_traces partitions");
        }
        Ok(created)
    }

    /// Ensures partitions for `today - days ..= today + days`.
    pub async fn ensure_partitions_around(&self, today: NaiveDate, days: u32) -> Result<usize, Error> {
        let span = Days::new(u64::from(days));
        let first = today.checked_sub_days(span).unwrap_or(today);
        let last = today.checked_add_days(span).unwrap_or(today);
        self.ensure_partitions(first.iter_days().take_while(|d| *d <= last)).await
    }

    async fn insert_chunk(&self, rows: &[TraceRow]) -> Result<u64, Error> {
        let started_at: Vec<DateTime<Utc>> = rows.iter().map(|r| r.started_at).collect();
        let text = |f: fn(&TraceRow) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
        let int = |f: fn(&TraceRow) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
        let status: Vec<i32> = rows.iter().map(|r| r.status_code).collect();
        let stream: Vec<bool> = rows.iter().map(|r| r.stream).collect();
        let traces: Vec<Vec<u8>> = rows.iter().map(|r| r.trace.encode_to_vec()).collect();
        let client = postgres_client(&self.pool).await?;
        let inserted = client
            .execute(
                INSERT,
                &[
                    &started_at,
                    &text(|r| &r.org_id),
                    &text(|r| &r.request_id),
                    &text(|r| &r.trace_id),
                    &text(|r| &r.project_id),
                    &text(|r| &r.user_id),
                    &text(|r| &r.key_id),
                    &text(|r| &r.requested_model),
                    &text(|r| &r.served_model),
                    &text(|r| &r.served_target),
                    &text(|r| r.layer),
                    &int(|r| r.prompt_tokens),
                    &int(|r| r.completion_tokens),
                    &int(|r| r.total_tokens),
                    &int(|r| r.cost_micros),
                    &int(|r| r.latency_us),
                    &status,
                    &text(|r| &r.error_code),
                    &stream,
                    &traces,
                ],
            )
            .await?;
        Ok(inserted)
    }
}

/// Whether an insert failed because a row's day has no partition (dropped behind our back).
fn missing_partition(err: &Error) -> bool {
    matches!(err, Error::Storage(meshgate_storage::Error::Postgres(e)) if e.code() == Some(&SqlState::CHECK_VIOLATION))
}

#[async_trait]
impl TraceStore for PostgresTraceStore {
    async fn insert(&self, rows: Vec<TraceRow>) -> Result<u64, Error> {
        let rows = dedupe(rows);
        let mut inserted = 0;
        for chunk in rows.chunks(INSERT_CHUNK) {
            let days: HashSet<NaiveDate> = chunk.iter().map(|r| r.started_at.date_naive()).collect();
            self.ensure_partitions(days.iter().copied()).await?;
            inserted += match self.insert_chunk(chunk).await {
                Err(err) if missing_partition(&err) => {
                    self.known.lock().retain(|d| !days.contains(d));
                    self.ensure_partitions(days.iter().copied()).await?;
                    self.insert_chunk(chunk).await?
                }
                result => result?,
            };
        }
        Ok(inserted)
    }

    async fn get(&self, org_id: &str, request_id: &str) -> Result<Option<pb::Trace>, Error> {
        let client = postgres_client(&self.pool).await?;
        let row = client
            .query_opt(
                "SELECT t.trace FROM trace_ids i \
                 JOIN request_traces t \
                   ON t.started_at = i.started_at AND t.org_id = i.org_id AND t.request_id = i.request_id \
                 WHERE i.org_id = $1 AND i.request_id = $2",
                &[&org_id, &request_id],
            )
            .await?;
        row.map(|r| decode(request_id, r.get(0))).transpose()
    }

    async fn query(&self, query: &TraceQuery) -> Result<Vec<pb::AggregateRow>, Error> {
        let mut params: Params = Vec::new();
        let mut filter = scope_filter(&query.org_id, &query.window, &mut params);
        for (column, value) in [("project_id", &query.project_id), ("user_id", &query.user_id), ("model", &query.model)]
        {
            if let Some(value) = value {
                params.push(Box::new(value.clone()));
                filter.push_str(&format!(" AND {column} = ${}", params.len()));
            }
        }
        let grouping = if query.group_by == GroupBy::Total { "" } else { " GROUP BY 1 ORDER BY 1" };
        let sql = format!(
            "SELECT {key} AS key, count(*), count(*) FILTER (WHERE is_error), \
                    COALESCE(sum(prompt_tokens), 0)::bigint, COALESCE(sum(completion_tokens), 0)::bigint, \
                    COALESCE(sum(cost_micros), 0)::bigint, \
                    COALESCE(percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_us), 0)::bigint, \
                    COALESCE(percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_us), 0)::bigint, \
                    COALESCE(percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_us), 0)::bigint \
             FROM request_traces WHERE {filter}{grouping}",
            key = key_sql(query.group_by),
        );
        let client = postgres_client(&self.pool).await?;
        let rows = client.query(&sql, &refs(&params)).await?;
        Ok(rows
            .iter()
            .map(|r| pb::AggregateRow {
                key: r.get(0),
                requests: r.get(1),
                errors: r.get(2),
                prompt_tokens: r.get(3),
                completion_tokens: r.get(4),
                cost_micros: r.get(5),
                p50_latency_us: r.get(6),
                p95_latency_us: r.get(7),
                p99_latency_us: r.get(8),
            })
            .collect())
    }

    async fn top_expensive(&self, org_id: &str, window: &TimeWindow, limit: usize) -> Result<Vec<pb::Trace>, Error> {
        let mut params: Params = Vec::new();
        let filter = scope_filter(org_id, window, &mut params);
        params.push(Box::new(i64::try_from(limit).unwrap_or(i64::MAX)));
        let sql = format!(
            "SELECT request_id, trace FROM request_traces WHERE {filter} \
             ORDER BY cost_micros DESC, started_at DESC, request_id COLLATE \"C\" LIMIT ${}",
            params.len()
        );
        let client = postgres_client(&self.pool).await?;
        let rows = client.query(&sql, &refs(&params)).await?;
        rows.iter().map(|r| decode(r.get(0), r.get(1))).collect()
    }

    async fn error_rates(&self, org_id: &str, window: &TimeWindow) -> Result<Vec<pb::ModelErrorRate>, Error> {
        let mut params: Params = Vec::new();
        let filter = scope_filter(org_id, window, &mut params);
        let sql = format!(
            "SELECT model COLLATE \"C\", count(*), count(*) FILTER (WHERE is_error) \
             FROM request_traces WHERE {filter} GROUP BY 1 ORDER BY 1"
        );
        let client = postgres_client(&self.pool).await?;
        let rows = client.query(&sql, &refs(&params)).await?;
        Ok(rows.iter().map(|r| error_rate(r.get(0), r.get(1), r.get(2))).collect())
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(ping_postgres(&self.pool, Duration::from_secs(2)).await?)
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}
