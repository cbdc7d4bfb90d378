//! Test harness: the real Postgres of the test environment (each pool on a fresh schema of its
//! own) and the in-memory store behind the same trait.

#![allow(dead_code)]

use std::sync::Arc;

use chrono::{DateTime, Utc};
use meshgate_analytics::model::{TraceRow, to_timestamp};
use meshgate_analytics::{MemoryTraceStore, PostgresTraceStore, TraceStore, migrations};
use meshgate_proto::analytics::v1 as pb;
use meshgate_proto::common::v1::{ErrorDetail, Layer, Principal, Usage};
use meshgate_storage::{PgPool, PostgresConfig, migrate, postgres_pool};
pub use meshgate_test_support::unique;
use prometheus::IntCounter;

pub fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

/// A URL of the test database whose connections use a fresh schema of their own.
pub async fn isolated_database_url() -> String {
    meshgate_test_support::isolated_database_url("analyticstest").await
}

/// A pool on a fresh schema of the test database with the analytics tables migrated.
pub async fn pg() -> PgPool {
    let pool = postgres_pool(&isolated_database_url().await, &PostgresConfig::default()).unwrap();
    migrate(&pool, "analytics", migrations()).await.unwrap();
    pool
}

/// The fields of a test trace that matter to queries.
#[derive(Debug, Clone)]
pub struct T {
    pub rid: &'static str,
    pub at: &'static str,
    pub project: &'static str,
    pub user: &'static str,
    pub served: &'static str,
    pub requested: &'static str,
    pub layer: Layer,
    pub prompt: i64,
    pub completion: i64,
    pub cost: i64,
    /// Of the prompt, read from and written to the provider's cache; of the completion, reasoning.
    pub cached: i64,
    pub cache_write: i64,
    pub reasoning: i64,
    pub latency: i64,
    pub status: i32,
    pub error: &'static str,
}

impl Default for T {
    fn default() -> Self {
        Self {
            rid: "r",
            at: "2031-03-10T10:00:00Z",
            project: "p1",
            user: "u1",
            served: "m",
            requested: "m",
            layer: Layer::L2Standard,
            prompt: 1,
            completion: 1,
            cost: 0,
            cached: 0,
            cache_write: 0,
            reasoning: 0,
            latency: 100,
            status: 200,
            error: "",
        }
    }
}

pub fn trace(org: &str, t: &T) -> pb::Trace {
    pb::Trace {
        request_id: t.rid.into(),
        trace_id: format!("{:032x}", t.rid.len() as u128 * 7919),
        principal: Some(Principal {
            org_id: org.into(),
            project_id: t.project.into(),
            user_id: t.user.into(),
            key_id: "k".into(),
            role: 2,
        }),
        started_at: Some(to_timestamp(at(t.at))),
        requested_model: t.requested.into(),
        served_model: t.served.into(),
        served_target: if t.served.is_empty() { String::new() } else { format!("prov/{}", t.served) },
        routing_reason: "cheapest healthy target".into(),
        calls: vec![pb::ModelCall {
            target_id: format!("prov/{}", t.served),
            provider: "prov".into(),
            model: t.served.into(),
            latency_us: t.latency,
            usage: Some(Usage {
                prompt_tokens: t.prompt,
                completion_tokens: t.completion,
                total_tokens: t.prompt + t.completion,
                cost_micros: t.cost,
                cached_prompt_tokens: t.cached,
                cache_write_tokens: t.cache_write,
                reasoning_tokens: t.reasoning,
            }),
            status: if t.error.is_empty() { "ok".into() } else { "error".into() },
            error: None,
        }],
        usage: Some(Usage {
            prompt_tokens: t.prompt,
            completion_tokens: t.completion,
            total_tokens: t.prompt + t.completion,
            cost_micros: t.cost,
            cached_prompt_tokens: t.cached,
            cache_write_tokens: t.cache_write,
            reasoning_tokens: t.reasoning,
        }),
        latency_us: t.latency,
        status_code: t.status,
        error: (!t.error.is_empty()).then(|| ErrorDetail {
            code: t.error.into(),
            message: "failed".into(),
            request_id: t.rid.into(),
        }),
        stream: t.latency % 2 == 0,
        layer: t.layer as i32,
        task: "chat".into(),
        routing_reasons: vec!["task=chat".into(), "cheapest healthy target".into()],
        findings: vec![pb::PolicyFinding {
            direction: "prompt".into(),
            rule: "pii.email".into(),
            category: "pii".into(),
            severity: "medium".into(),
            action: "redact".into(),
            message: 0,
            start: 3,
            end: 20,
            score: Some(0.5),
        }],
        risk_score: 40,
        tool_calls: vec![pb::ToolCall { name: "search".into(), kind: "offered".into() }],
        headers: [("user-agent".to_owned(), "test/1".to_owned())].into(),
        dropped_params: vec!["seed".into()],
    }
}

pub fn rows(org: &str, ts: &[T]) -> Vec<TraceRow> {
    ts.iter().map(|t| TraceRow::from_trace(trace(org, t)).unwrap()).collect()
}

/// Which trace store a behavioural test runs against.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Memory,
    Postgres,
}

impl Backend {
    pub async fn store(self) -> Arc<dyn TraceStore> {
        match self {
            Backend::Memory => Arc::new(MemoryTraceStore::new(10_000, counter())),
            Backend::Postgres => Arc::new(PostgresTraceStore::new(pg().await, counter())),
        }
    }
}

pub fn counter() -> IntCounter {
    IntCounter::new("test_counter", "test").unwrap()
}

/// Instantiates each generic test body once per backend.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::Backend::Memory).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::Backend::Postgres).await;
                }
            )*
        }
    };
}
