//! Where traces live: Postgres (day-partitioned) or memory (standalone, bounded). Both give the
//! same answers for the same rows.

mod memory;
mod postgres;

use async_trait::async_trait;
use meshgate_proto::analytics::v1 as pb;

pub use self::memory::MemoryTraceStore;
pub use self::postgres::{PostgresTraceStore, partition_name};
use crate::Error;
use crate::model::{TimeWindow, TraceQuery, TraceRow};

#[async_trait]
pub trait TraceStore: Send + Sync {
    /// Stores validated rows, ignoring any whose (org, request id) is already stored or repeated
    /// earlier in `rows`; returns how many were new.
    async fn insert(&self, rows: Vec<TraceRow>) -> Result<u64, Error>;

    /// One trace of `org_id`; `None` for unknown ids and other organizations' traces.
    async fn get(&self, org_id: &str, request_id: &str) -> Result<Option<pb::Trace>, Error>;

    /// Totals, grouped per the query, ordered by key.
    async fn query(&self, query: &TraceQuery) -> Result<Vec<pb::AggregateRow>, Error>;

    /// The `limit` most expensive traces, most expensive first (then newest, then by id).
    async fn top_expensive(&self, org_id: &str, window: &TimeWindow, limit: usize) -> Result<Vec<pb::Trace>, Error>;

    /// Requests and errors per model, ordered by model.
    async fn error_rates(&self, org_id: &str, window: &TimeWindow) -> Result<Vec<pb::ModelErrorRate>, Error>;

    /// Readiness: the store answers.
    async fn ping(&self) -> Result<(), Error>;

    /// "postgres" or "memory", for logs.
    fn kind(&self) -> &'static str;
}

/// Keeps the first of rows sharing an (org, request id).
pub(crate) fn dedupe(rows: Vec<TraceRow>) -> Vec<TraceRow> {
    let mut seen = std::collections::HashSet::new();
    rows.into_iter().filter(|r| seen.insert((r.org_id.clone(), r.request_id.clone()))).collect()
}

pub(crate) fn error_rate(model: String, requests: i64, errors: i64) -> pb::ModelErrorRate {
    let rate = if requests > 0 { errors as f64 / requests as f64 } else { 0.0 };
    pb::ModelErrorRate { model, requests, errors, rate }
}
