//! Traces in Postgres. `request_traces`, `model_calls`, `policy_findings` and
//! `trace_rollups_hourly` are partitioned by UTC day (partitions made ahead of time by the
//! service and on demand for any day a batch brings); `trace_rollups_daily` is one small table.
//!
//! A batch is one transaction: the traces are inserted with `ON CONFLICT DO NOTHING RETURNING`,
//! and only the rows that came back (new ones) get their model calls, findings and rollup sums
//! written, so a re-sent trace is counted exactly once. A batch Postgres refuses for its data (a
//! value no column can hold) is split in halves until the refusing rows stand alone: they are
//! refused, every other trace is stored. Retention drops whole partitions.
//!
//! Aggregations read the daily rollup for whole days, the hourly rollup for whole hours at the
//! edges of a range, and raw `request_traces` only for the sub-hour slivers of a range whose
//! bounds are not on the hour. TopExpensive and GetTrace read raw rows (by index).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Days, NaiveDate, TimeDelta, Utc};
use meshgate_proto::analytics::v1 as pb;
use meshgate_storage::{PgPool, ping_postgres, postgres_client};
use parking_lot::Mutex;
use prometheus::IntCounter;
use prost::Message;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tracing::{info, warn};

use super::{Inserted, TraceStore, dedupe};
use crate::Error;
use crate::hist::{Acc, BUCKETS};
use crate::model::{GroupBy, Scope, TimeWindow, TraceQuery, TraceRow};

/// The day-partitioned tables; each day has one partition of each.
pub const PARTITIONED_TABLES: [&str; 4] = ["request_traces", "model_calls", "policy_findings", "trace_rollups_hourly"];
/// Serialises partition creation and retention across replicas. ASCII "mg-parts".
const PARTITION_LOCK_KEY: i64 = 0x6d67_2d70_6172_7473;
/// Attempts at one batch when it deadlocks with a concurrent one or finds a partition gone.
const INSERT_ATTEMPTS: usize = 3;

const INSERT_TRACES: &str = "
INSERT INTO request_traces (started_at, org_id, request_id, trace_id, project_id, user_id, key_id,
    requested_model, served_model, served_target, layer, prompt_tokens, completion_tokens,
    total_tokens, cost_micros, latency_us, status_code, error_code, stream, trace, task, risk_score,
    routing_reason, routing_reasons, tool_calls, headers, cached_prompt_tokens, cache_write_tokens,
    reasoning_tokens)
SELECT t.started_at, t.org_id, t.request_id, t.trace_id, t.project_id, t.user_id, t.key_id,
    t.requested_model, t.served_model, t.served_target, t.layer, t.prompt_tokens,
    t.completion_tokens, t.total_tokens, t.cost_micros, t.latency_us, t.status_code, t.error_code,
    t.stream, t.trace, t.task, t.risk_score, t.routing_reason, t.routing_reasons::jsonb,
    t.tool_calls::jsonb, t.headers::jsonb, t.cached_prompt_tokens, t.cache_write_tokens,
    t.reasoning_tokens
FROM unnest(
    $1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
    $8::text[], $9::text[], $10::text[], $11::text[], $12::int8[], $13::int8[], $14::int8[],
    $15::int8[], $16::int8[], $17::int4[], $18::text[], $19::bool[], $20::bytea[], $21::text[],
    $22::int4[], $23::text[], $24::text[], $25::text[], $26::text[], $27::int8[], $28::int8[],
    $29::int8[]
) AS t(started_at, org_id, request_id, trace_id, project_id, user_id, key_id, requested_model,
       served_model, served_target, layer, prompt_tokens, completion_tokens, total_tokens,
       cost_micros, latency_us, status_code, error_code, stream, trace, task, risk_score,
       routing_reason, routing_reasons, tool_calls, headers, cached_prompt_tokens,
       cache_write_tokens, reasoning_tokens)
ON CONFLICT DO NOTHING
RETURNING org_id, request_id";

const INSERT_CALLS: &str = "
INSERT INTO model_calls (started_at, org_id, request_id, seq, project_id, target_id, provider, model,
    latency_us, prompt_tokens, completion_tokens, cost_micros, status, error_code)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::text[],
    $7::text[], $8::text[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::text[], $14::text[])";

const INSERT_FINDINGS: &str = "
INSERT INTO policy_findings (started_at, org_id, request_id, seq, project_id, direction, rule, category,
    severity, action, score)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::text[],
    $7::text[], $8::text[], $9::text[], $10::text[], $11::float4[])";

/// Upsert of rollup deltas into `table`.
fn upsert_rollups(table: &str) -> String {
    format!(
        "INSERT INTO {table} AS r (org_id, bucket_start, project_id, user_id, model, layer, requests, errors,
             prompt_tokens, completion_tokens, cost_micros, latency_sum_us, latency_min_us, latency_max_us,
             latency_hist, cached_prompt_tokens, cache_write_tokens, reasoning_tokens)
         SELECT t.org_id, t.bucket_start, t.project_id, t.user_id, t.model, t.layer, t.requests, t.errors,
             t.prompt_tokens, t.completion_tokens, t.cost_micros, t.latency_sum_us, t.latency_min_us,
             t.latency_max_us, t.latency_hist::int8[], t.cached_prompt_tokens, t.cache_write_tokens,
             t.reasoning_tokens
         FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[],
             $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::int8[],
             $14::int8[], $15::text[], $16::int8[], $17::int8[], $18::int8[])
             AS t(org_id, bucket_start, project_id, user_id, model, layer, requests, errors, prompt_tokens,
                  completion_tokens, cost_micros, latency_sum_us, latency_min_us, latency_max_us, latency_hist,
                  cached_prompt_tokens, cache_write_tokens, reasoning_tokens)
         ON CONFLICT (org_id, bucket_start, project_id, user_id, model, layer) DO UPDATE SET
             requests = r.requests + excluded.requests,
             errors = r.errors + excluded.errors,
             prompt_tokens = r.prompt_tokens + excluded.prompt_tokens,
             completion_tokens = r.completion_tokens + excluded.completion_tokens,
             cached_prompt_tokens = r.cached_prompt_tokens + excluded.cached_prompt_tokens,
             cache_write_tokens = r.cache_write_tokens + excluded.cache_write_tokens,
             reasoning_tokens = r.reasoning_tokens + excluded.reasoning_tokens,
             cost_micros = r.cost_micros + excluded.cost_micros,
             latency_sum_us = r.latency_sum_us + excluded.latency_sum_us,
             latency_min_us = least(r.latency_min_us, excluded.latency_min_us),
             latency_max_us = greatest(r.latency_max_us, excluded.latency_max_us),
             latency_hist = analytics_hist_add(r.latency_hist, excluded.latency_hist)"
    )
}

/// Name of `table`'s partition holding `day`.
pub fn partition_name(table: &str, day: NaiveDate) -> String {
    format!("{table}_p{}", day.format("%Y%m%d"))
}

/// The day of a partition of `table`, from its name.
fn partition_day(table: &str, name: &str) -> Option<NaiveDate> {
    let suffix = name.strip_prefix(table)?.strip_prefix("_p")?;
    NaiveDate::parse_from_str(suffix, "%Y%m%d").ok().filter(|_| suffix.len() == 8)
}

/// Where one segment of an aggregation's time range is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Daily,
    Hourly,
    Raw,
}

fn floor_to(t: DateTime<Utc>, unit: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp().div_euclid(unit) * unit, 0).unwrap_or(t)
}

fn ceil_to(t: DateTime<Utc>, unit: i64) -> DateTime<Utc> {
    let floor = floor_to(t, unit);
    if floor == t { t } else { floor + TimeDelta::seconds(unit) }
}

const HOUR: i64 = 3_600;
const DAY: i64 = 86_400;

/// Splits a range into whole days (daily rollup), whole hours at its edges (hourly rollup) and
/// sub-hour slivers (raw rows).
pub fn plan(window: &TimeWindow) -> Vec<(Source, TimeWindow)> {
    let seg = |source, from, to| (source, TimeWindow { from, to });
    let edge = |a: DateTime<Utc>, b: DateTime<Utc>, out: &mut Vec<(Source, TimeWindow)>| {
        let (h1, h2) = (ceil_to(a, HOUR), floor_to(b, HOUR));
        if h1 < h2 {
            if a < h1 {
                out.push(seg(Source::Raw, Some(a), Some(h1)));
            }
            out.push(seg(Source::Hourly, Some(h1), Some(h2)));
            if h2 < b {
                out.push(seg(Source::Raw, Some(h2), Some(b)));
            }
        } else {
            out.push(seg(Source::Raw, Some(a), Some(b)));
        }
    };
    let mut out = Vec::new();
    let (d1, d2) = (window.from.map(|f| ceil_to(f, DAY)), window.to.map(|t| floor_to(t, DAY)));
    let days_exist = match (d1, d2) {
        (Some(d1), Some(d2)) => d1 < d2,
        _ => true,
    };
    if days_exist {
        if let (Some(from), Some(d1)) = (window.from, d1)
            && from < d1
        {
            edge(from, d1, &mut out);
        }
        out.push(seg(Source::Daily, d1, d2));
        if let (Some(to), Some(d2)) = (window.to, d2)
            && d2 < to
        {
            edge(d2, to, &mut out);
        }
    } else if let (Some(from), Some(to)) = (window.from, window.to) {
        edge(from, to, &mut out);
    }
    out
}

type Params = Vec<Box<dyn ToSql + Sync + Send>>;

fn refs(params: &Params) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
}

/// `WHERE` conditions for a scope, filters and window on `time` (a column).
fn conditions(
    scope: &Scope,
    query: Option<&TraceQuery>,
    time: &str,
    window: &TimeWindow,
    params: &mut Params,
) -> String {
    params.push(Box::new(scope.org_id.clone()));
    let mut sql = format!("org_id = ${}", params.len());
    if !scope.project_ids.is_empty() {
        params.push(Box::new(scope.project_ids.clone()));
        sql.push_str(&format!(" AND project_id = ANY(${}::text[])", params.len()));
    }
    if let Some(query) = query {
        let f = &query.filters;
        for (column, value) in
            [("project_id", &f.project_id), ("user_id", &f.user_id), ("model", &f.model), ("layer", &f.layer)]
        {
            if let Some(value) = value {
                params.push(Box::new(value.clone()));
                sql.push_str(&format!(" AND {column} = ${}", params.len()));
            }
        }
    }
    if let Some(from) = window.from {
        params.push(Box::new(from));
        sql.push_str(&format!(" AND {time} >= ${}", params.len()));
    }
    if let Some(to) = window.to {
        params.push(Box::new(to));
        sql.push_str(&format!(" AND {time} < ${}", params.len()));
    }
    sql
}

/// The SQL of a group key over a time column `time`; keys are compared bytewise in Rust.
fn key_sql(group_by: GroupBy, time: &str) -> String {
    match group_by {
        GroupBy::Total => "''".into(),
        GroupBy::Day => format!("to_char({time} AT TIME ZONE 'UTC', 'YYYY-MM-DD')"),
        GroupBy::Week => format!("to_char(date_trunc('week', {time} AT TIME ZONE 'UTC'), 'YYYY-MM-DD')"),
        GroupBy::Month => format!("to_char({time} AT TIME ZONE 'UTC', 'YYYY-MM')"),
        GroupBy::Model => "model".into(),
        GroupBy::Layer => "layer".into(),
        GroupBy::User => "user_id".into(),
        GroupBy::Project => "project_id".into(),
    }
}

fn decode(request_id: &str, bytes: &[u8]) -> Result<pb::Trace, Error> {
    pb::Trace::decode(bytes).map_err(|source| Error::Corrupt { request_id: request_id.to_owned(), source })
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// Rollup deltas of rows, per (org, bucket start, project, user, model, layer), in key order so
/// concurrent batches lock shared rollup rows in the same order.
type RollupKey = (String, DateTime<Utc>, String, String, String, &'static str);

fn rollup_deltas(rows: &[&TraceRow], unit: i64) -> BTreeMap<RollupKey, Acc> {
    let mut deltas: BTreeMap<RollupKey, Acc> = BTreeMap::new();
    for r in rows {
        let key = (
            r.org_id.clone(),
            floor_to(r.started_at, unit),
            r.project_id.clone(),
            r.user_id.clone(),
            r.model().to_owned(),
            r.layer,
        );
        deltas.entry(key).or_default().add(r.is_error(), &r.spend(), r.latency_us);
    }
    deltas
}

/// Whether a batch failed in a way a fresh attempt can fix: a deadlock with a concurrent batch, or
/// a row whose day has no partition (dropped behind our back).
fn retryable(err: &Error) -> Option<&'static str> {
    let Error::Storage(meshgate_storage::Error::Postgres(e)) = err else { return None };
    match e.code() {
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE => {
            Some("deadlock")
        }
        Some(c) if *c == SqlState::CHECK_VIOLATION => Some("missing_partition"),
        _ => None,
    }
}

/// Whether a batch was refused for what its rows hold (a data exception, a constraint, a value
/// beyond a limit, a day no partition can hold), so the rows without the culprit would be stored.
fn refused_for_data(err: &Error) -> bool {
    match err {
        Error::InvalidArgument(_) => true,
        Error::Storage(meshgate_storage::Error::Postgres(e)) => {
            e.code().is_some_and(|c| ["22", "23", "54"].iter().any(|class| c.code().starts_with(class)))
        }
        _ => false,
    }
}

/// The Postgres trace store.
pub struct PostgresTraceStore {
    pool: PgPool,
    /// Days whose partitions are known to exist, to skip the catalog on the hot path.
    known: Mutex<HashSet<NaiveDate>>,
    partitions_created: IntCounter,
}

impl PostgresTraceStore {
    /// `partitions_created` counts partitions this store creates.
    pub fn new(pool: PgPool, partitions_created: IntCounter) -> Self {
        Self { pool, known: Mutex::default(), partitions_created }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the partitions (of every partitioned table) of `days` that do not exist yet;
    /// returns how many it created.
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
        let mut wanted = Vec::new();
        for day in &missing {
            for table in PARTITIONED_TABLES {
                wanted.push(partition_name(table, *day));
            }
        }
        let absent: HashSet<String> = tx
            .query("SELECT n FROM unnest($1::text[]) AS n WHERE to_regclass(n) IS NULL", &[&wanted])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut created = 0;
        for day in &missing {
            let next = day.checked_add_days(Days::new(1)).ok_or_else(|| {
                Error::InvalidArgument(format!("no partition can hold {day}: the day after is out of range"))
            })?;
            for table in PARTITIONED_TABLES {
                let name = partition_name(table, *day);
                if !absent.contains(&name) {
                    continue;
                }
                // Names and bounds come from dates, never from input text.
                tx.batch_execute(&format!(
                    "CREATE TABLE {name} PARTITION OF {table} \
                     FOR VALUES FROM ('{day} 00:00:00+00') TO ('{next} 00:00:00+00')"
                ))
                .await?;
                created += 1;
            }
        }
        tx.commit().await?;
        self.known.lock().extend(missing);
        if created > 0 {
            self.partitions_created.inc_by(created as u64);
            info!(created, "created day partitions");
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

    /// The days that have partitions, per partitioned table.
    pub async fn partitions(&self) -> Result<BTreeMap<&'static str, Vec<NaiveDate>>, Error> {
        let client = postgres_client(&self.pool).await?;
        let mut out = BTreeMap::new();
        for table in PARTITIONED_TABLES {
            let rows = client
                .query(
                    "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                     WHERE i.inhparent = to_regclass($1)",
                    &[&table],
                )
                .await?;
            let mut days: Vec<NaiveDate> = rows.iter().filter_map(|r| partition_day(table, r.get(0))).collect();
            days.sort_unstable();
            out.insert(table, days);
        }
        Ok(out)
    }

    /// Retention: drops every partition of a day before `cutoff` (whole tables, no DELETE);
    /// returns the names dropped. The daily rollup is kept.
    pub async fn drop_partitions_before(&self, cutoff: NaiveDate) -> Result<Vec<String>, Error> {
        let old: Vec<(&str, NaiveDate)> = self
            .partitions()
            .await?
            .into_iter()
            .flat_map(|(table, days)| days.into_iter().filter(|d| *d < cutoff).map(move |d| (table, d)))
            .collect();
        if old.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = postgres_client(&self.pool).await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK_KEY]).await?;
        let mut dropped = Vec::new();
        for (table, day) in &old {
            let name = partition_name(table, *day);
            // The name was rebuilt from a parsed date, so it is safe to splice.
            tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}")).await?;
            dropped.push(name);
        }
        tx.commit().await?;
        self.known.lock().retain(|d| *d >= cutoff);
        info!(dropped = dropped.len(), %cutoff, "retention dropped day partitions");
        Ok(dropped)
    }

    /// Stores sorted, deduplicated `rows` in one transaction (retried when it deadlocks or finds
    /// a partition gone); returns how many traces were new.
    async fn insert_batch(&self, rows: &[TraceRow]) -> Result<u64, Error> {
        let days: HashSet<NaiveDate> = rows.iter().map(|r| r.started_at.date_naive()).collect();
        let mut attempt = 1;
        loop {
            self.ensure_partitions(days.iter().copied()).await?;
            match self.insert_once(rows).await {
                Err(err) if attempt < INSERT_ATTEMPTS && retryable(&err).is_some() => {
                    warn!(attempt, reason = retryable(&err), error = %err, "retrying a trace batch");
                    if retryable(&err) == Some("missing_partition") {
                        self.known.lock().retain(|d| !days.contains(d));
                    }
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// One attempt at storing a batch, in one transaction; returns how many traces were new.
    async fn insert_once(&self, rows: &[TraceRow]) -> Result<u64, Error> {
        let started_at: Vec<DateTime<Utc>> = rows.iter().map(|r| r.started_at).collect();
        let text = |f: fn(&TraceRow) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
        let int = |f: fn(&TraceRow) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
        let status: Vec<i32> = rows.iter().map(|r| r.status_code).collect();
        let risk: Vec<i32> = rows.iter().map(|r| r.risk_score).collect();
        let stream: Vec<bool> = rows.iter().map(|r| r.stream).collect();
        let traces: Vec<Vec<u8>> = rows.iter().map(|r| r.trace.encode_to_vec()).collect();
        let reasons: Vec<String> = rows.iter().map(|r| json(&r.trace.routing_reasons)).collect();
        let tools: Vec<String> = rows
            .iter()
            .map(|r| {
                let tools: Vec<serde_json::Value> =
                    r.trace.tool_calls.iter().map(|t| serde_json::json!({"name": t.name, "kind": t.kind})).collect();
                json(&tools)
            })
            .collect();
        let headers: Vec<String> = rows.iter().map(|r| json(&r.trace.headers)).collect();

        let mut client = postgres_client(&self.pool).await?;
        let tx = client.transaction().await?;
        let new: HashSet<(String, String)> = tx
            .query(
                INSERT_TRACES,
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
                    &text(|r| &r.task),
                    &risk,
                    &text(|r| &r.trace.routing_reason),
                    &reasons,
                    &tools,
                    &headers,
                    &int(|r| r.cached_prompt_tokens),
                    &int(|r| r.cache_write_tokens),
                    &int(|r| r.reasoning_tokens),
                ],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let fresh: Vec<&TraceRow> =
            rows.iter().filter(|r| new.contains(&(r.org_id.clone(), r.request_id.clone()))).collect();
        if fresh.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }

        let calls = CallColumns::of(&fresh);
        let findings = FindingColumns::of(&fresh);
        let hourly = RollupColumns::of(rollup_deltas(&fresh, HOUR));
        let daily = RollupColumns::of(rollup_deltas(&fresh, DAY));
        // Statements on one connection are pipelined; hourly before daily everywhere, so
        // concurrent batches take rollup row locks in one order.
        let (hourly_sql, daily_sql) = (upsert_rollups("trace_rollups_hourly"), upsert_rollups("trace_rollups_daily"));
        let (hourly_params, daily_params) = (hourly.params(), daily.params());
        tokio::try_join!(
            async {
                if calls.seq.is_empty() {
                    return Ok(0);
                }
                tx.execute(INSERT_CALLS, &calls.params()).await
            },
            async {
                if findings.seq.is_empty() {
                    return Ok(0);
                }
                tx.execute(INSERT_FINDINGS, &findings.params()).await
            },
            tx.execute(hourly_sql.as_str(), &hourly_params),
            tx.execute(daily_sql.as_str(), &daily_params),
        )?;
        tx.commit().await?;
        Ok(fresh.len() as u64)
    }
}

/// Column arrays of the model calls of new traces.
#[derive(Default)]
struct CallColumns<'a> {
    started_at: Vec<DateTime<Utc>>,
    org_id: Vec<&'a str>,
    request_id: Vec<&'a str>,
    seq: Vec<i32>,
    project_id: Vec<&'a str>,
    target_id: Vec<&'a str>,
    provider: Vec<&'a str>,
    model: Vec<&'a str>,
    latency_us: Vec<i64>,
    prompt_tokens: Vec<i64>,
    completion_tokens: Vec<i64>,
    cost_micros: Vec<i64>,
    status: Vec<&'a str>,
    error_code: Vec<&'a str>,
}

impl<'a> CallColumns<'a> {
    fn of(rows: &[&'a TraceRow]) -> Self {
        let mut c = Self::default();
        for r in rows {
            for (seq, call) in r.trace.calls.iter().enumerate() {
                let usage = call.usage.unwrap_or_default();
                c.started_at.push(r.started_at);
                c.org_id.push(&r.org_id);
                c.request_id.push(&r.request_id);
                c.seq.push(i32::try_from(seq).unwrap_or(i32::MAX));
                c.project_id.push(&r.project_id);
                c.target_id.push(&call.target_id);
                c.provider.push(&call.provider);
                c.model.push(&call.model);
                c.latency_us.push(call.latency_us);
                c.prompt_tokens.push(usage.prompt_tokens);
                c.completion_tokens.push(usage.completion_tokens);
                c.cost_micros.push(usage.cost_micros);
                c.status.push(&call.status);
                c.error_code.push(call.error.as_ref().map_or("", |e| e.code.as_str()));
            }
        }
        c
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.started_at,
            &self.org_id,
            &self.request_id,
            &self.seq,
            &self.project_id,
            &self.target_id,
            &self.provider,
            &self.model,
            &self.latency_us,
            &self.prompt_tokens,
            &self.completion_tokens,
            &self.cost_micros,
            &self.status,
            &self.error_code,
        ]
    }
}

/// Column arrays of the policy findings of new traces.
#[derive(Default)]
struct FindingColumns<'a> {
    started_at: Vec<DateTime<Utc>>,
    org_id: Vec<&'a str>,
    request_id: Vec<&'a str>,
    seq: Vec<i32>,
    project_id: Vec<&'a str>,
    direction: Vec<&'a str>,
    rule: Vec<&'a str>,
    category: Vec<&'a str>,
    severity: Vec<&'a str>,
    action: Vec<&'a str>,
    score: Vec<Option<f32>>,
}

impl<'a> FindingColumns<'a> {
    fn of(rows: &[&'a TraceRow]) -> Self {
        let mut c = Self::default();
        for r in rows {
            for (seq, f) in r.trace.findings.iter().enumerate() {
                c.started_at.push(r.started_at);
                c.org_id.push(&r.org_id);
                c.request_id.push(&r.request_id);
                c.seq.push(i32::try_from(seq).unwrap_or(i32::MAX));
                c.project_id.push(&r.project_id);
                c.direction.push(&f.direction);
                c.rule.push(&f.rule);
                c.category.push(&f.category);
                c.severity.push(&f.severity);
                c.action.push(&f.action);
                c.score.push(f.score);
            }
        }
        c
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.started_at,
            &self.org_id,
            &self.request_id,
            &self.seq,
            &self.project_id,
            &self.direction,
            &self.rule,
            &self.category,
            &self.severity,
            &self.action,
            &self.score,
        ]
    }
}

/// Column arrays of rollup deltas.
#[derive(Default)]
struct RollupColumns {
    org_id: Vec<String>,
    bucket_start: Vec<DateTime<Utc>>,
    project_id: Vec<String>,
    user_id: Vec<String>,
    model: Vec<String>,
    layer: Vec<&'static str>,
    requests: Vec<i64>,
    errors: Vec<i64>,
    prompt_tokens: Vec<i64>,
    completion_tokens: Vec<i64>,
    cost_micros: Vec<i64>,
    latency_sum_us: Vec<i64>,
    latency_min_us: Vec<i64>,
    latency_max_us: Vec<i64>,
    cached_prompt_tokens: Vec<i64>,
    cache_write_tokens: Vec<i64>,
    reasoning_tokens: Vec<i64>,
    /// Array literals (`{1,0,…}`): one array per row, which unnest cannot carry as int8[][].
    hist: Vec<String>,
}

impl RollupColumns {
    fn of(deltas: BTreeMap<RollupKey, Acc>) -> Self {
        let mut c = Self::default();
        for ((org, start, project, user, model, layer), acc) in deltas {
            c.org_id.push(org);
            c.bucket_start.push(start);
            c.project_id.push(project);
            c.user_id.push(user);
            c.model.push(model);
            c.layer.push(layer);
            c.requests.push(acc.requests);
            c.errors.push(acc.errors);
            c.prompt_tokens.push(acc.prompt_tokens);
            c.completion_tokens.push(acc.completion_tokens);
            c.cost_micros.push(acc.cost_micros);
            c.latency_sum_us.push(acc.latency_sum_us);
            c.latency_min_us.push(acc.latency_min_us);
            c.latency_max_us.push(acc.latency_max_us);
            c.cached_prompt_tokens.push(acc.cached_prompt_tokens);
            c.cache_write_tokens.push(acc.cache_write_tokens);
            c.reasoning_tokens.push(acc.reasoning_tokens);
            let mut literal = String::with_capacity(BUCKETS * 2 + 2);
            literal.push('{');
            for (i, count) in acc.hist.iter().enumerate() {
                if i > 0 {
                    literal.push(',');
                }
                literal.push_str(&count.to_string());
            }
            literal.push('}');
            c.hist.push(literal);
        }
        c
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.org_id,
            &self.bucket_start,
            &self.project_id,
            &self.user_id,
            &self.model,
            &self.layer,
            &self.requests,
            &self.errors,
            &self.prompt_tokens,
            &self.completion_tokens,
            &self.cost_micros,
            &self.latency_sum_us,
            &self.latency_min_us,
            &self.latency_max_us,
            &self.hist,
            &self.cached_prompt_tokens,
            &self.cache_write_tokens,
            &self.reasoning_tokens,
        ]
    }
}

#[async_trait]
impl TraceStore for PostgresTraceStore {
    async fn insert(&self, rows: Vec<TraceRow>) -> Result<Inserted, Error> {
        let mut rows = dedupe(rows);
        // One order for every batch, so concurrent batches lock conflicting keys alike.
        rows.sort_by(|a, b| (&a.org_id, &a.request_id).cmp(&(&b.org_id, &b.request_id)));
        let mut inserted = Inserted::default();
        let mut parts: Vec<&[TraceRow]> = vec![&rows];
        while let Some(part) = parts.pop() {
            if part.is_empty() {
                continue;
            }
            match self.insert_batch(part).await {
                Ok(stored) => inserted.stored += stored,
                Err(err) if refused_for_data(&err) => {
                    if let [row] = part {
                        warn!(request_id = row.request_id, error = %err, "a trace refused by the store; its batch is stored without it");
                        inserted.refused.push((row.request_id.clone(), err.to_string()));
                    } else {
                        let (first, second) = part.split_at(part.len() / 2);
                        parts.extend([second, first]);
                    }
                }
                Err(err) => return Err(err),
            }
        }
        Ok(inserted)
    }

    async fn get(&self, scope: &Scope, request_id: &str) -> Result<Option<pb::Trace>, Error> {
        let mut params: Params = vec![Box::new(request_id.to_owned())];
        let filter = conditions(scope, None, "started_at", &TimeWindow::default(), &mut params);
        let sql =
            format!("SELECT trace FROM request_traces WHERE request_id = $1 AND {filter} ORDER BY started_at LIMIT 1");
        let client = postgres_client(&self.pool).await?;
        let row = client.query_opt(&sql, &refs(&params)).await?;
        row.map(|r| decode(request_id, r.get(0))).transpose()
    }

    async fn aggregate(&self, query: &TraceQuery) -> Result<BTreeMap<String, Acc>, Error> {
        let client = postgres_client(&self.pool).await?;
        let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
        for (source, window) in plan(&query.window) {
            let mut params: Params = Vec::new();
            if source == Source::Raw {
                let filter = conditions(&query.scope, Some(query), "started_at", &window, &mut params);
                let sql = format!(
                    "SELECT {key}, analytics_latency_bucket(latency_us), count(*), count(*) FILTER (WHERE is_error), \
                            sum(prompt_tokens)::int8, sum(completion_tokens)::int8, sum(cost_micros)::int8, \
                            sum(latency_us)::int8, min(latency_us), max(latency_us), \
                            sum(cached_prompt_tokens)::int8, sum(cache_write_tokens)::int8, \
                            sum(reasoning_tokens)::int8 \
                     FROM request_traces WHERE {filter} GROUP BY 1, 2",
                    key = key_sql(query.group_by, "started_at"),
                );
                for r in client.query(&sql, &refs(&params)).await? {
                    let mut acc = Acc {
                        requests: r.get(2),
                        errors: r.get(3),
                        prompt_tokens: r.get(4),
                        completion_tokens: r.get(5),
                        cost_micros: r.get(6),
                        latency_sum_us: r.get(7),
                        latency_min_us: r.get(8),
                        latency_max_us: r.get(9),
                        cached_prompt_tokens: r.get(10),
                        cache_write_tokens: r.get(11),
                        reasoning_tokens: r.get(12),
                        ..Acc::default()
                    };
                    let bucket = usize::try_from(r.get::<_, i32>(1)).unwrap_or(0).min(BUCKETS - 1);
                    acc.hist[bucket] = acc.requests;
                    groups.entry(r.get(0)).or_default().merge(&acc);
                }
                continue;
            }
            let table = if source == Source::Daily { "trace_rollups_daily" } else { "trace_rollups_hourly" };
            let filter = conditions(&query.scope, Some(query), "bucket_start", &window, &mut params);
            let sql = format!(
                "SELECT {key}, requests, errors, prompt_tokens, completion_tokens, cost_micros, latency_sum_us, \
                        latency_min_us, latency_max_us, latency_hist, cached_prompt_tokens, cache_write_tokens, \
                        reasoning_tokens \
                 FROM {table} WHERE {filter}",
                key = key_sql(query.group_by, "bucket_start"),
            );
            for r in client.query(&sql, &refs(&params)).await? {
                let stored: Vec<i64> = r.get(9);
                let mut acc = Acc {
                    requests: r.get(1),
                    errors: r.get(2),
                    prompt_tokens: r.get(3),
                    completion_tokens: r.get(4),
                    cost_micros: r.get(5),
                    latency_sum_us: r.get(6),
                    latency_min_us: r.get(7),
                    latency_max_us: r.get(8),
                    cached_prompt_tokens: r.get(10),
                    cache_write_tokens: r.get(11),
                    reasoning_tokens: r.get(12),
                    ..Acc::default()
                };
                for (slot, count) in acc.hist.iter_mut().zip(stored) {
                    *slot = count;
                }
                groups.entry(r.get(0)).or_default().merge(&acc);
            }
        }
        Ok(groups)
    }

    async fn top_expensive(&self, scope: &Scope, window: &TimeWindow, limit: usize) -> Result<Vec<pb::Trace>, Error> {
        let mut params: Params = Vec::new();
        let filter = conditions(scope, None, "started_at", window, &mut params);
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

    async fn ping(&self) -> Result<(), Error> {
        Ok(ping_postgres(&self.pool, Duration::from_secs(2)).await?)
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn w(from: Option<&str>, to: Option<&str>) -> TimeWindow {
        TimeWindow { from: from.map(at), to: to.map(at) }
    }

    #[test]
    fn plans_read_days_from_daily_hours_from_hourly_and_slivers_raw() {
        assert_eq!(plan(&TimeWindow::default()), vec![(Source::Daily, TimeWindow::default())]);
        assert_eq!(
            plan(&w(Some("2031-03-10T00:00:00Z"), Some("2031-03-12T00:00:00Z"))),
            vec![(Source::Daily, w(Some("2031-03-10T00:00:00Z"), Some("2031-03-12T00:00:00Z")))]
        );
        assert_eq!(
            plan(&w(Some("2031-03-10T10:30:00Z"), Some("2031-03-12T05:00:00Z"))),
            vec![
                (Source::Raw, w(Some("2031-03-10T10:30:00Z"), Some("2031-03-10T11:00:00Z"))),
                (Source::Hourly, w(Some("2031-03-10T11:00:00Z"), Some("2031-03-11T00:00:00Z"))),
                (Source::Daily, w(Some("2031-03-11T00:00:00Z"), Some("2031-03-12T00:00:00Z"))),
                (Source::Hourly, w(Some("2031-03-12T00:00:00Z"), Some("2031-03-12T05:00:00Z"))),
            ]
        );
        assert_eq!(
            plan(&w(Some("2031-03-10T10:30:00Z"), Some("2031-03-10T10:45:00Z"))),
            vec![(Source::Raw, w(Some("2031-03-10T10:30:00Z"), Some("2031-03-10T10:45:00Z")))]
        );
        assert_eq!(
            plan(&w(None, Some("2031-03-10T10:45:00Z"))),
            vec![
                (Source::Daily, w(None, Some("2031-03-10T00:00:00Z"))),
                (Source::Hourly, w(Some("2031-03-10T00:00:00Z"), Some("2031-03-10T10:00:00Z"))),
                (Source::Raw, w(Some("2031-03-10T10:00:00Z"), Some("2031-03-10T10:45:00Z"))),
            ]
        );
    }

    #[test]
    fn partition_names_round_trip() {
        let day = NaiveDate::from_ymd_opt(2031, 3, 10).unwrap();
        assert_eq!(partition_name("model_calls", day), "model_calls_p20310310");
        assert_eq!(partition_day("model_calls", "model_calls_p20310310"), Some(day));
        assert_eq!(partition_day("request_traces", "model_calls_p20310310"), None);
        assert_eq!(partition_day("model_calls", "model_calls_p2031031"), None);
    }
}
