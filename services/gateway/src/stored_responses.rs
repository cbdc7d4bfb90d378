//! Responses kept for the Responses API (`store: true`): the record of each (the conversation as
//! the model saw it and its answer, as the wire crate serializes it) by project and response id,
//! in Postgres (shared by every replica) or in memory (a standalone gateway). A project never
//! reads another's: every access names the project. Records older than the retention are neither
//! answered nor kept.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use meshgate_storage::{PgPool, postgres_client};
use parking_lot::Mutex;

use crate::tenancy::TenancyError;

/// Storage of responses by project.
#[async_trait]
pub trait ResponseStore: Send + Sync {
    /// Stores (or replaces) the record of response `id` of `project_id`.
    async fn put(&self, project_id: &str, id: &str, record: &serde_json::Value) -> Result<(), TenancyError>;
    /// The record, unless it does not exist, belongs to another project or has expired.
    async fn get(&self, project_id: &str, id: &str) -> Result<Option<serde_json::Value>, TenancyError>;
    /// Deletes the record; whether there was one.
    async fn delete(&self, project_id: &str, id: &str) -> Result<bool, TenancyError>;
}

/// Responses in Postgres (`stored_responses`, gateway migration 0004).
pub struct PostgresResponses {
    pool: PgPool,
    retention: Duration,
}

impl PostgresResponses {
    pub fn new(pool: PgPool, retention: Duration) -> Self {
        Self { pool, retention }
    }

    fn oldest_kept(&self) -> DateTime<Utc> {
        Utc::now() - chrono::Duration::from_std(self.retention).unwrap_or(chrono::Duration::MAX)
    }
}

#[async_trait]
impl ResponseStore for PostgresResponses {
    async fn put(&self, project_id: &str, id: &str, record: &serde_json::Value) -> Result<(), TenancyError> {
        let client = postgres_client(&self.pool).await?;
        client
            .execute(
                "INSERT INTO stored_responses (project_id, id, record, created_at) VALUES ($1, $2, $3, now()) \
                 ON CONFLICT (project_id, id) DO UPDATE SET record = EXCLUDED.record",
                &[&project_id, &id, record],
            )
            .await
            .map_err(|err| match err.code() {
                Some(code) if *code == tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION => {
                    TenancyError::NotFound(format!("project {project_id}"))
                }
                _ => err.into(),
            })?;
        // Expired records go as new ones come, a bounded batch at a time.
        client
            .execute(
                "DELETE FROM stored_responses WHERE ctid IN \
                 (SELECT ctid FROM stored_responses WHERE created_at < $1 LIMIT 100)",
                &[&self.oldest_kept()],
            )
            .await?;
        Ok(())
    }

    async fn get(&self, project_id: &str, id: &str) -> Result<Option<serde_json::Value>, TenancyError> {
        let row = postgres_client(&self.pool)
            .await?
            .query_opt(
                "SELECT record FROM stored_responses WHERE project_id = $1 AND id = $2 AND created_at >= $3",
                &[&project_id, &id, &self.oldest_kept()],
            )
            .await?;
        Ok(row.map(|row| row.get(0)))
    }

    async fn delete(&self, project_id: &str, id: &str) -> Result<bool, TenancyError> {
        let deleted = postgres_client(&self.pool)
            .await?
            .execute("DELETE FROM stored_responses WHERE project_id = $1 AND id = $2", &[&project_id, &id])
            .await?;
        Ok(deleted > 0)
    }
}

/// Responses in this process's memory, the oldest forgotten past `capacity`.
pub struct MemoryResponses {
    capacity: usize,
    retention: Duration,
    state: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    records: HashMap<(String, String), (serde_json::Value, std::time::Instant)>,
    order: VecDeque<(String, String)>,
}

impl MemoryResponses {
    pub fn new(capacity: usize, retention: Duration) -> Self {
        Self { capacity: capacity.max(1), retention, state: Mutex::default() }
    }
}

#[async_trait]
impl ResponseStore for MemoryResponses {
    async fn put(&self, project_id: &str, id: &str, record: &serde_json::Value) -> Result<(), TenancyError> {
        let key = (project_id.to_owned(), id.to_owned());
        let mut state = self.state.lock();
        if state.records.insert(key.clone(), (record.clone(), std::time::Instant::now())).is_none() {
            state.order.push_back(key);
        }
        while state.records.len() > self.capacity {
            let Some(oldest) = state.order.pop_front() else { break };
            state.records.remove(&oldest);
        }
        Ok(())
    }

    async fn get(&self, project_id: &str, id: &str) -> Result<Option<serde_json::Value>, TenancyError> {
        let state = self.state.lock();
        let found = state.records.get(&(project_id.to_owned(), id.to_owned()));
        Ok(found.filter(|(_, at)| at.elapsed() < self.retention).map(|(record, _)| record.clone()))
    }

    async fn delete(&self, project_id: &str, id: &str) -> Result<bool, TenancyError> {
        let key = (project_id.to_owned(), id.to_owned());
        let mut state = self.state.lock();
        let existed = state.records.remove(&key).is_some();
        if existed {
            state.order.retain(|k| k != &key);
        }
        Ok(existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_are_kept_per_project_bounded_and_deletable() {
        let store = MemoryResponses::new(2, Duration::from_secs(60));
        let record = serde_json::json!({"output": "hi"});
        store.put("p1", "resp_1", &record).await.unwrap();
        assert_eq!(store.get("p1", "resp_1").await.unwrap(), Some(record.clone()));
        assert_eq!(store.get("p2", "resp_1").await.unwrap(), None, "another project never sees it");
        store.put("p1", "resp_2", &record).await.unwrap();
        store.put("p1", "resp_3", &record).await.unwrap();
        assert_eq!(store.get("p1", "resp_1").await.unwrap(), None, "the oldest goes past the capacity");
        assert!(store.delete("p1", "resp_2").await.unwrap());
        assert!(!store.delete("p1", "resp_2").await.unwrap());
        let expired = MemoryResponses::new(2, Duration::ZERO);
        expired.put("p1", "resp_1", &record).await.unwrap();
        assert_eq!(expired.get("p1", "resp_1").await.unwrap(), None);
    }
}
