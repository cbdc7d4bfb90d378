//! Where traces live: Postgres (day-partitioned, with rollups) or memory (standalone, bounded).
//! Both give the same answers for the same rows: aggregates are built from the same
//! [`Acc`](crate::hist::Acc) sums and histograms.

mod memory;
mod postgres;

use std::collections::BTreeMap;

use async_trait::async_trait;
use meshgate_proto::analytics::v1 as pb;

pub use self::memory::MemoryTraceStore;
pub use self::postgres::{PARTITIONED_TABLES, PostgresTraceStore, partition_name};
use crate::Error;
use crate::hist::Acc;
use crate::model::{GroupBy, Scope, TimeWindow, TraceQuery, TraceRow};

/// What [`TraceStore::insert`] did with a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inserted {
    /// Traces new to the store, now stored.
    pub stored: u64,
    /// Traces the store could not hold, left out of their batch: request id, and why.
    pub refused: Vec<(String, String)>,
}

#[async_trait]
pub trait TraceStore: Send + Sync {
    /// Stores validated rows, ignoring any already stored (same org, request id and start time)
    /// or repeated earlier in `rows` (same org and request id). A row the store cannot hold is
    /// refused alone: every other row of the batch is stored.
    async fn insert(&self, rows: Vec<TraceRow>) -> Result<Inserted, Error>;

    /// One trace `scope` may see (the earliest, should a request id have been stored with two
    /// start times); `None` for unknown ids and traces outside the scope.
    async fn get(&self, scope: &Scope, request_id: &str) -> Result<Option<pb::Trace>, Error>;

    /// Sums per group key (one group with an empty key for totals), ordered by key.
    async fn aggregate(&self, query: &TraceQuery) -> Result<BTreeMap<String, Acc>, Error>;

    /// The `limit` most expensive traces, most expensive first (then newest, then by id).
    async fn top_expensive(&self, scope: &Scope, window: &TimeWindow, limit: usize) -> Result<Vec<pb::Trace>, Error>;

    /// Readiness: the store answers.
    async fn ping(&self) -> Result<(), Error>;

    /// "postgres" or "memory", for logs.
    fn kind(&self) -> &'static str;
}

/// The rows of Query: totals always have one row, even when nothing matched.
pub async fn query(store: &dyn TraceStore, query: &TraceQuery) -> Result<Vec<pb::AggregateRow>, Error> {
    let groups = store.aggregate(query).await?;
    if query.group_by == GroupBy::Total {
        return Ok(vec![groups.get("").cloned().unwrap_or_default().row(String::new())]);
    }
    Ok(groups.into_iter().map(|(key, acc)| acc.row(key)).collect())
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
