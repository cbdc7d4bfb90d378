//! The usage ledger: committed usage per scope per day in Postgres, the system of record behind
//! the hot counters. Commits mark counters dirty in the store; a flusher writes their absolute
//! values in batches every second and once more on shutdown. Rows only grow (`GREATEST`), so
//! rewriting a row, two replicas flushing at once, or a store that lost its counters never lowers
//! recorded usage. A counter the store lacks is seeded from its row, so losing Redis loses at most
//! the commits of the last flush interval, never the day.

use std::sync::Arc;
use std::time::Duration;

use meshgate_runtime::Shutdown;
use meshgate_storage::{PgPool, postgres_client};
use tracing::{debug, warn};

use std::collections::HashMap;

use chrono::NaiveDate;

use crate::Error;
use crate::metrics::QuotaMetrics;
use crate::model::{CounterState, Scope};
use crate::store::{DirtyUsage, QuotaStore};

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

    /// Upserts `rows` in one statement; returns the number of rows written.
    pub async fn write(&self, rows: &[DirtyUsage]) -> Result<u64, Error> {
        if rows.is_empty() {
            return Ok(0);
        }
        let kinds: Vec<&str> = rows.iter().map(|r| r.scope.kind.as_str()).collect();
        let ids: Vec<&str> = rows.iter().map(|r| r.scope.id.as_str()).collect();
        let days: Vec<chrono::NaiveDate> = rows.iter().map(|r| r.day).collect();
        let tokens: Vec<i64> = rows.iter().map(|r| r.usage.used_tokens).collect();
        let costs: Vec<i64> = rows.iter().map(|r| r.usage.used_cost_micros).collect();
        let requests: Vec<i64> = rows.iter().map(|r| r.usage.requests).collect();
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
            let written = self.writer.write(&dirty).await?;
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
