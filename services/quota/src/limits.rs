//! Where limit overrides live (Postgres `quota_limits`, or memory in standalone mode) and the
//! per-replica cache in front of them.
//!
//! Propagation: every change replaces the store's limits generation (a random token in Redis).
//! Each reservation carries the generation its limits were read under and the reserve script
//! refuses a stale one, so the engine re-reads and retries: a change takes effect on the very next
//! reservation on every replica, at no extra round trip in the steady state. Entries also expire
//! after `limits_cache_ttl` as a safety net (for instance if the generation bump itself failed).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use meshgate_storage::{PgPool, postgres_client};
use parking_lot::Mutex;

use crate::Error;
use crate::model::{Limits, Scope, ScopeKind, parse_time_zone};

/// Storage of per-scope limit overrides.
#[async_trait]
pub trait LimitsRepo: Send + Sync {
    /// The overrides of those `scopes` that have one.
    async fn get(&self, scopes: &[Scope]) -> Result<HashMap<Scope, Limits>, Error>;
    async fn set(&self, scope: &Scope, limits: &Limits) -> Result<(), Error>;
}

/// Overrides in process memory (standalone mode without Postgres).
#[derive(Default)]
pub struct MemoryLimits(Mutex<HashMap<Scope, Limits>>);

#[async_trait]
impl LimitsRepo for MemoryLimits {
    async fn get(&self, scopes: &[Scope]) -> Result<HashMap<Scope, Limits>, Error> {
        let map = self.0.lock();
        Ok(scopes.iter().filter_map(|s| map.get(s).map(|l| (s.clone(), *l))).collect())
    }

    async fn set(&self, scope: &Scope, limits: &Limits) -> Result<(), Error> {
        self.0.lock().insert(scope.clone(), *limits);
        Ok(())
    }
}

/// Overrides in the `quota_limits` table.
pub struct PostgresLimits {
    pool: PgPool,
}

impl PostgresLimits {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl LimitsRepo for PostgresLimits {
    async fn get(&self, scopes: &[Scope]) -> Result<HashMap<Scope, Limits>, Error> {
        if scopes.is_empty() {
            return Ok(HashMap::new());
        }
        let kinds: Vec<&str> = scopes.iter().map(|s| s.kind.as_str()).collect();
        let ids: Vec<&str> = scopes.iter().map(|s| s.id.as_str()).collect();
        let client = postgres_client(&self.pool).await?;
        let rows = client
            .query(
                "SELECT l.scope_kind, l.scope_id, l.tokens_per_day, l.cost_micros_per_day, \
                        l.requests_per_minute, l.tokens_per_minute, l.time_zone \
                 FROM quota_limits l \
                 JOIN unnest($1::text[], $2::text[]) AS w(kind, id) \
                   ON l.scope_kind = w.kind AND l.scope_id = w.id",
                &[&kinds, &ids],
            )
            .await?;
        let mut out = HashMap::with_capacity(rows.len());
        for row in rows {
            let kind: String = row.get(0);
            let kind = ScopeKind::parse(&kind)
                .ok_or_else(|| Error::StoreReply(format!("quota_limits has unknown scope kind {kind:?}")))?;
            let zone: Option<String> = row.get(6);
            let time_zone = parse_time_zone(zone.as_deref().unwrap_or(""))
                .map_err(|e| Error::StoreReply(format!("quota_limits row of {kind:?}: {e}")))?;
            out.insert(
                Scope { kind, id: row.get(1) },
                Limits {
                    tokens_per_day: row.get(2),
                    cost_micros_per_day: row.get(3),
                    requests_per_minute: row.get(4),
                    tokens_per_minute: row.get(5),
                    time_zone,
                },
            );
        }
        Ok(out)
    }

    async fn set(&self, scope: &Scope, limits: &Limits) -> Result<(), Error> {
        let client = postgres_client(&self.pool).await?;
        client
            .execute(
                "INSERT INTO quota_limits (scope_kind, scope_id, tokens_per_day, cost_micros_per_day, \
                                           requests_per_minute, tokens_per_minute, time_zone, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, now()) \
                 ON CONFLICT (scope_kind, scope_id) DO UPDATE SET \
                   tokens_per_day = EXCLUDED.tokens_per_day, \
                   cost_micros_per_day = EXCLUDED.cost_micros_per_day, \
                   requests_per_minute = EXCLUDED.requests_per_minute, \
                   tokens_per_minute = EXCLUDED.tokens_per_minute, \
                   time_zone = EXCLUDED.time_zone, \
                   updated_at = now()",
                &[
                    &scope.kind.as_str(),
                    &scope.id,
                    &limits.tokens_per_day,
                    &limits.cost_micros_per_day,
                    &limits.requests_per_minute,
                    &limits.tokens_per_minute,
                    &limits.time_zone.map(|tz| tz.name()),
                ],
            )
            .await?;
        Ok(())
    }
}

/// Default limits per scope kind, used when a scope has no override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultLimits {
    pub org: Limits,
    pub project: Limits,
    pub user: Limits,
    pub key: Limits,
}

impl Default for DefaultLimits {
    /// A user gets 1,000,000 tokens and $10.00 a day and 100 requests a minute; other scopes are
    /// unlimited unless configured.
    fn default() -> Self {
        Self {
            org: Limits::default(),
            project: Limits::default(),
            user: Limits {
                tokens_per_day: 1_000_000,
                cost_micros_per_day: 10_000_000,
                requests_per_minute: 100,
                ..Limits::default()
            },
            key: Limits::default(),
        }
    }
}

impl DefaultLimits {
    pub fn for_kind(&self, kind: ScopeKind) -> Limits {
        match kind {
            ScopeKind::Org => self.org,
            ScopeKind::Project => self.project,
            ScopeKind::User => self.user,
            ScopeKind::Key => self.key,
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        for kind in ScopeKind::ALL {
            self.for_kind(kind)
                .validate_for(kind)
                .map_err(|e| Error::Config(format!("defaults.{}: {e}", kind.as_str())))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// `None`: the scope has no override (the default applies).
    limits: Option<Limits>,
    fetched_at: Instant,
}

/// The effective limits of scopes as last read, all under one generation.
#[derive(Debug, Default)]
pub(crate) struct LimitsCache {
    generation: Option<String>,
    entries: HashMap<Scope, Entry>,
}

impl LimitsCache {
    pub(crate) fn generation(&self) -> Option<String> {
        self.generation.clone()
    }

    /// Cached overrides of `scopes` younger than `ttl`, or the scopes that must be read.
    pub(crate) fn lookup(&self, scopes: &[Scope], ttl: Duration) -> Result<Vec<Option<Limits>>, Vec<Scope>> {
        let now = Instant::now();
        let mut found = Vec::with_capacity(scopes.len());
        let mut missing = Vec::new();
        for scope in scopes {
            match self.entries.get(scope) {
                Some(e) if now.duration_since(e.fetched_at) < ttl => found.push(e.limits),
                _ => missing.push(scope.clone()),
            }
        }
        if missing.is_empty() { Ok(found) } else { Err(missing) }
    }

    /// Stores overrides read under `generation`; a new generation drops everything older.
    pub(crate) fn fill(&mut self, generation: Option<String>, scopes: &[Scope], read: &HashMap<Scope, Limits>) {
        if generation != self.generation {
            self.entries.clear();
            self.generation = generation;
        }
        let fetched_at = Instant::now();
        for scope in scopes {
            self.entries.insert(scope.clone(), Entry { limits: read.get(scope).copied(), fetched_at });
        }
    }

    /// Any cached value for `scopes`, however old (used only when the limits store is down).
    pub(crate) fn stale(&self, scopes: &[Scope]) -> Option<Vec<Option<Limits>>> {
        scopes.iter().map(|s| self.entries.get(s).map(|e| e.limits)).collect()
    }

    pub(crate) fn invalidate(&mut self) {
        self.entries.clear();
        self.generation = None;
    }
}
