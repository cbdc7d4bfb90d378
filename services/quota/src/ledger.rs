//! The usage ledger: committed usage per scope per day in Postgres, the system of record behind
//! the hot counters. Every operation that charges usage (commit, charge, a lease call reporting
//! usage) writes the absolute values of the counters it changed before it is answered
//! ([`WriteThrough`], concurrent callers sharing one statement), so a store that loses its data
//! (Redis restarted empty, `FLUSHALL`) loses no acknowledged usage. Rows only grow (`GREATEST`),
//! so writes racing each other, two replicas writing at once, or a store that lost its counters
//! never lower recorded usage; each write is the counter after its own charge, so the greatest is
//! the counter after the latest. Charges also mark counters dirty in the store, and a flusher
//! writes those every second and on shutdown: it catches up what a write-through could not write
//! (Postgres down or slow) and what a lease charges to a window that has just ended. A counter the
//! store lacks is seeded from its row.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use meshgate_runtime::Shutdown;
use meshgate_storage::{PgPool, postgres_client};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::Error;
use crate::metrics::QuotaMetrics;
use crate::model::{CounterState, Scope};
use crate::store::QuotaStore;

/// Batches per flush at most, so one tick cannot run forever under a stream of commits.
const MAX_BATCHES_PER_FLUSH: usize = 20;

/// The `usage_ledger` table.
#[derive(Clone)]
pub struct Ledger {
    pool: PgPool,
}

impl Ledger {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Upserts `rows` (counter usage, absolute) in one statement; returns the number of rows
    /// written. Rows are written in key order, so concurrent writers (the write-through, the
    /// flusher, other replicas) lock them in the same order and never deadlock.
    pub async fn write<'a>(&self, rows: impl IntoIterator<Item = LedgerRow<'a>>) -> Result<u64, Error> {
        let mut merged: BTreeMap<(&str, &str, NaiveDate), CounterState> = BTreeMap::new();
        for (scope, day, usage) in rows {
            merged.entry((scope.kind.as_str(), scope.id.as_str(), day)).or_default().raise_used_to(usage);
        }
        if merged.is_empty() {
            return Ok(0);
        }
        let kinds: Vec<&str> = merged.keys().map(|k| k.0).collect();
        let ids: Vec<&str> = merged.keys().map(|k| k.1).collect();
        let days: Vec<NaiveDate> = merged.keys().map(|k| k.2).collect();
        let tokens: Vec<i64> = merged.values().map(|u| u.used_tokens).collect();
        let costs: Vec<i64> = merged.values().map(|u| u.used_cost_micros).collect();
        let requests: Vec<i64> = merged.values().map(|u| u.requests).collect();
        let client = postgres_client(&self.pool).await?;
        let written = client
            .execute(
                "INSERT INTO usage_ledger (scope_kind, scope_id, day, tokens, cost_micros, requests, updated_at) \
                 SELECT kind, id, day, tokens, cost, requests, now() \
                 FROM unnest($1::text[], $2::text[], $3::date[], $4::int8[], $5::int8[], $6::int8[]) \
                      AS u(kind, id, day, tokens, cost, requests) \
                 ON CONFLICT (scope_kind, scope_id, day) DO UPDATE SET \
                   tokens = GREATEST(usage_ledger.tokens, EXCLUDED.tokens), \
                   cost_micros = GREATEST(usage_ledger.cost_micros, EXCLUDED.cost_micros), \
                   requests = GREATEST(usage_ledger.requests, EXCLUDED.requests), \
                   updated_at = now()",
                &[&kinds, &ids, &days, &tokens, &costs, &requests],
            )
            .await?;
        Ok(written)
    }

    /// Recorded usage of `(scope, day)` counters, in order (zero where there is no row).
    pub async fn read(&self, keys: &[(Scope, NaiveDate)]) -> Result<Vec<CounterState>, Error> {
        let kinds: Vec<&str> = keys.iter().map(|(s, _)| s.kind.as_str()).collect();
        let ids: Vec<&str> = keys.iter().map(|(s, _)| s.id.as_str()).collect();
        let days: Vec<NaiveDate> = keys.iter().map(|(_, d)| *d).collect();
        let client = postgres_client(&self.pool).await?;
        let rows = client
            .query(
                "SELECT l.scope_kind, l.scope_id, l.day, l.tokens, l.cost_micros, l.requests \
                 FROM usage_ledger l \
                 JOIN unnest($1::text[], $2::text[], $3::date[]) AS w(kind, id, day) \
                   ON l.scope_kind = w.kind AND l.scope_id = w.id AND l.day = w.day",
                &[&kinds, &ids, &days],
            )
            .await?;
        let found: HashMap<(String, String, NaiveDate), CounterState> = rows
            .into_iter()
            .map(|row| {
                let usage = CounterState {
                    used_tokens: row.get(3),
                    used_cost_micros: row.get(4),
                    requests: row.get(5),
                    ..CounterState::default()
                };
                ((row.get(0), row.get(1), row.get(2)), usage)
            })
            .collect();
        Ok(keys
            .iter()
            .map(|(s, d)| found.get(&(s.kind.as_str().to_owned(), s.id.clone(), *d)).copied().unwrap_or_default())
            .collect())
    }
}

/// One counter's usage to record: scope, window, usage (only the used amounts are written).
pub type LedgerRow<'a> = (&'a Scope, NaiveDate, &'a CounterState);

/// Why a write-through did not record its usage; the counters stay dirty for the flusher.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteThroughError {
    #[error("usage ledger write failed: {0}")]
    Failed(String),
    #[error("usage ledger write took longer than {0:?}")]
    TimedOut(Duration),
}

struct PendingWrite {
    rows: Vec<(Scope, NaiveDate, CounterState)>,
    done: oneshot::Sender<Result<(), WriteThroughError>>,
}

/// Most callers whose rows share one statement.
const MAX_GROUP: usize = 256;

/// Writes charged counters to the ledger before a charge is answered. Callers queue their rows;
/// one task writes whatever is queued in one statement and answers them all (group commit), so
/// a burst of commits costs one round trip, not one each. A caller waits at most `timeout`:
/// Postgres down or stalled must not stall budgets, and its counters stay dirty for the flusher.
#[derive(Clone)]
pub struct WriteThrough {
    queue: mpsc::Sender<PendingWrite>,
    timeout: Duration,
}

impl WriteThrough {
    /// Starts the writing task (it ends when the last clone is dropped).
    pub fn spawn(ledger: Ledger, timeout: Duration) -> Self {
        let (queue, pending) = mpsc::channel(MAX_GROUP * 4);
        tokio::spawn(write_groups(ledger, pending));
        Self { queue, timeout }
    }

    /// Records `rows` (counters after a charge) in the ledger.
    pub async fn record(&self, rows: Vec<(Scope, NaiveDate, CounterState)>) -> Result<(), WriteThroughError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (done, answer) = oneshot::channel();
        let write = async {
            self.queue
                .send(PendingWrite { rows, done })
                .await
                .map_err(|_| WriteThroughError::Failed("the ledger writer stopped".into()))?;
            answer.await.map_err(|_| WriteThroughError::Failed("the ledger writer stopped".into()))?
        };
        tokio::time::timeout(self.timeout, write).await.map_err(|_| WriteThroughError::TimedOut(self.timeout))?
    }
}

fn as_row((scope, day, usage): &(Scope, NaiveDate, CounterState)) -> LedgerRow<'_> {
    (scope, *day, usage)
}

async fn write_groups(ledger: Ledger, mut pending: mpsc::Receiver<PendingWrite>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while pending.recv_many(&mut group, MAX_GROUP).await > 0 {
        // A caller that gave up waiting is still written: its usage was charged all the same.
        let rows: Vec<LedgerRow<'_>> = group.iter().flat_map(|w| w.rows.iter().map(as_row)).collect();
        let result = ledger.write(rows).await.map(|_| ()).map_err(|e| WriteThroughError::Failed(e.to_string()));
        for write in group.drain(..) {
            let _ = write.done.send(result.clone());
        }
    }
}

/// Moves dirty usage from the store to the ledger.
pub struct LedgerFlusher {
    store: Arc<dyn QuotaStore>,
    writer: Ledger,
    batch_size: usize,
    interval: Duration,
    metrics: QuotaMetrics,
}

impl LedgerFlusher {
    pub fn new(
        store: Arc<dyn QuotaStore>,
        writer: Ledger,
        batch_size: usize,
        interval: Duration,
        metrics: QuotaMetrics,
    ) -> Self {
        Self { store, writer, batch_size: batch_size.max(1), interval, metrics }
    }

    /// Writes everything dirty now (bounded per call); returns the rows written.
    pub async fn flush(&self) -> Result<u64, Error> {
        let mut total = 0;
        for _ in 0..MAX_BATCHES_PER_FLUSH {
            let dirty = self.store.dirty_usage(self.batch_size).await?;
            if dirty.is_empty() {
                break;
            }
            let written = self.writer.write(dirty.iter().map(|d| (&d.scope, d.day, &d.usage))).await?;
            self.store.clear_dirty(&dirty).await?;
            self.metrics.ledger_rows.inc_by(written);
            total += written;
            if dirty.len() < self.batch_size {
                break;
            }
        }
        Ok(total)
    }

    /// Flushes every `interval` until `stop`, then once more so a clean shutdown loses nothing.
    pub async fn run(self, stop: Shutdown) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.interval) => {}
            }
            self.flush_logged().await;
        }
        self.flush_logged().await;
    }

    async fn flush_logged(&self) {
        match self.flush().await {
            Ok(0) => {}
            Ok(rows) => debug!(rows, "usage ledger flushed"),
            Err(err) => {
                self.metrics.ledger_flush_errors.inc();
                warn!(error = %err, "usage ledger flush failed; retrying on the next tick");
            }
        }
    }
}
