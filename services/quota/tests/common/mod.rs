//! Test harness: real Postgres and Redis from the test environment, isolated per test by unique
//! ids and key prefixes, and the same engine API over both store implementations.

#![allow(dead_code, unused_imports)] // each test binary uses a part of it

use std::sync::Arc;
use std::time::Duration;

use meshgate_proto::common::v1::Principal;
use meshgate_proto::quota::v1 as pb;
use meshgate_quota::{
    EngineSettings, Ledger, LimitsRepo, MemoryLimits, MemoryStore, PostgresLimits, QuotaEngine, QuotaMetrics,
    QuotaStore, RedisStore, RedisStoreSettings, migrations,
};
use meshgate_storage::{PgPool, PostgresConfig, RedisConfig, SharedClock, migrate, postgres_pool, redis_connection};
pub use meshgate_test_support::{database_url, principal, redis_url, unique};

/// A pool on the test database with the quota tables migrated (concurrent callers are safe).
pub async fn pg() -> PgPool {
    let pool = postgres_pool(&database_url(), &PostgresConfig::default()).unwrap();
    migrate(&pool, "quota", migrations()).await.unwrap();
    pool
}

pub fn reserve(p: &Principal, request_id: &str, tokens: i64, cost: i64) -> pb::ReserveRequest {
    pb::ReserveRequest {
        request_id: request_id.into(),
        principal: Some(p.clone()),
        estimated_tokens: tokens,
        estimated_cost_micros: cost,
        ttl_seconds: 0,
    }
}

pub fn commit(reservation_id: &str, tokens: i64, cost: i64) -> pb::CommitRequest {
    pb::CommitRequest {
        reservation_id: reservation_id.into(),
        usage: Some(meshgate_proto::common::v1::Usage {
            prompt_tokens: tokens / 2,
            completion_tokens: tokens - tokens / 2,
            total_tokens: tokens,
            cost_micros: cost,
            ..Default::default()
        }),
        principal: None,
    }
}

/// A Charge of `tokens` (split into prompt and completion, no total) and `cost` for `requests`.
pub fn charge(p: &Principal, charge_id: &str, tokens: i64, cost: i64, requests: i64) -> pb::ChargeRequest {
    pb::ChargeRequest {
        charge_id: charge_id.into(),
        principal: Some(p.clone()),
        usage: Some(meshgate_proto::common::v1::Usage {
            prompt_tokens: tokens / 2,
            completion_tokens: tokens - tokens / 2,
            total_tokens: 0,
            cost_micros: cost,
            ..Default::default()
        }),
        requests,
    }
}

pub fn scope(kind: pb::ScopeKind, id: &str) -> pb::Scope {
    pb::Scope { kind: kind as i32, id: id.into() }
}

pub fn set_limits(scope: pb::Scope, tokens_per_day: i64, cost_micros_per_day: i64) -> pb::SetLimitsRequest {
    pb::SetLimitsRequest {
        scope: Some(scope),
        limits: Some(pb::Limits { tokens_per_day, cost_micros_per_day, ..Default::default() }),
    }
}

/// The status row of one scope kind.
pub async fn status_of(engine: &QuotaEngine, p: &Principal, kind: pb::ScopeKind) -> pb::ScopeStatus {
    let status = engine.status(&pb::StatusRequest { principal: Some(p.clone()) }).await.unwrap();
    status.scopes.into_iter().find(|s| s.scope.as_ref().unwrap().kind == kind as i32).unwrap()
}

/// Which store implementation a behavioural test runs against.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// In-memory counters and limits (standalone mode).
    Memory,
    /// Redis counters (unique key prefix) and Postgres limits.
    Redis,
}

/// One isolated quota backend; `engine` and `replica` give engines sharing its state the way
/// two replicas share Redis and Postgres.
pub struct Harness {
    backend: Backend,
    clock: SharedClock,
    prefix: String,
    memory: Option<(MemoryStore, Arc<MemoryLimits>)>,
    pool: Option<PgPool>,
}

impl Backend {
    pub async fn harness(self, clock: SharedClock) -> Harness {
        let (memory, pool) = match self {
            Backend::Memory => (
                Some((
                    MemoryStore::new(clock.clone(), Duration::from_secs(600), true),
                    Arc::new(MemoryLimits::default()),
                )),
                None,
            ),
            Backend::Redis => (None, Some(pg().await)),
        };
        Harness { backend: self, clock, prefix: format!("{}:", unique("test:quota")), memory, pool }
    }
}

impl Harness {
    fn parts(&self) -> (Arc<dyn QuotaStore>, Arc<dyn LimitsRepo>) {
        match self.backend {
            Backend::Memory => {
                let (store, limits) = self.memory.clone().unwrap();
                (Arc::new(store), limits)
            }
            Backend::Redis => {
                let conn = redis_connection(&redis_url(), &RedisConfig::default()).unwrap();
                let store = RedisStore::new(
                    conn,
                    RedisStoreSettings {
                        key_prefix: self.prefix.clone(),
                        settled_retention: Duration::from_secs(600),
                        track_dirty: true,
                        late_after: Duration::from_secs(2),
                    },
                );
                (Arc::new(store), Arc::new(PostgresLimits::new(self.pool.clone().unwrap())))
            }
        }
    }

    /// An engine over this backend with its own connections and limits cache.
    pub fn engine(&self, settings: EngineSettings) -> Arc<QuotaEngine> {
        Arc::new(self.bare_engine(settings))
    }

    /// An engine that seeds counters from the usage ledger in the test database.
    pub async fn engine_with_ledger(&self, settings: EngineSettings) -> Arc<QuotaEngine> {
        Arc::new(self.bare_engine(settings).with_ledger(Ledger::new(self.pool().await)))
    }

    fn bare_engine(&self, settings: EngineSettings) -> QuotaEngine {
        let (store, limits) = self.parts();
        let metrics = QuotaMetrics::new(&meshgate_runtime::Metrics::new("quota"));
        QuotaEngine::new(store, limits, self.clock.clone(), settings, metrics)
    }

    /// The counter store loses everything, as Redis restarted without persistence (or the
    /// standalone process restarted); limits survive. Engines made before keep the old memory
    /// store: make new ones.
    pub fn lose_counters(&mut self) {
        match self.backend {
            Backend::Memory => {
                let limits = self.memory.as_ref().unwrap().1.clone();
                let store = MemoryStore::new(self.clock.clone(), Duration::from_secs(600), true);
                self.memory = Some((store, limits));
            }
            Backend::Redis => delete_prefix(&self.prefix),
        }
    }

    /// The Postgres pool behind the Redis backend's limits, or a fresh one for the memory backend.
    pub async fn pool(&self) -> PgPool {
        match &self.pool {
            Some(pool) => pool.clone(),
            None => pg().await,
        }
    }
}

/// Removes the test's Redis keys (counters would otherwise linger for their 3-day TTL).
impl Drop for Harness {
    fn drop(&mut self) {
        if matches!(self.backend, Backend::Redis) {
            delete_prefix(&self.prefix);
        }
    }
}

pub fn delete_prefix(prefix: &str) {
    let mut conn = redis::Client::open(redis_url()).unwrap().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query(&mut conn).unwrap();
    if !keys.is_empty() {
        let _: i64 = redis::cmd("DEL").arg(keys).query(&mut conn).unwrap();
    }
}

/// Instantiates each generic test body once per backend.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::common::Backend::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::common::Backend::Redis).await;
                }
            )*
        }
    };
}
