//! Per-project settings at the edge: the security policy (compiled once into a
//! [`PolicyEngine`] and shared by every request of the project) and the request limits.
//!
//! Both live in Postgres (`projects.security_policy`, `projects.request_limits`) and are cached per
//! replica. A change is published on Redis (`crate::invalidation`) and every subscribed replica
//! drops the project from its cache at once; a replica that is not subscribed (Redis down) trusts
//! an entry for [`UNSUBSCRIBED_TTL`] only, so a change reaches it within about a second anyway.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshgate_policy::{PolicyConfig, PolicyEngine};
use meshgate_runtime::{ApiError, ErrorCode};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::invalidation::Subscription;
use crate::openai::ChatLimits;
use crate::tenancy::{ProjectSettingsDoc, TenancyStore, check_field};

/// Redis channel carrying the ids of projects whose settings changed.
/// How long a cached entry is trusted while invalidations cannot arrive.
pub const UNSUBSCRIBED_TTL: Duration = Duration::from_secs(1);

/// Most models a project's allow-list may name.
pub const MAX_ALLOWED_MODELS: usize = 256;

/// A project's request limits. Every field is optional: `null` (or absent) means the gateway's
/// configured limit (`[gateway] max_body_bytes`, `max_messages`, `max_tokens_cap`: 1 MiB, 1024,
/// 131072 by default), and an empty `allowed_models` allows every model. A project can tighten the
/// gateway's limits, never loosen them: the effective limit is the smaller of the two.
///
/// A `max_tokens` above the cap is refused (400), not clamped: a silently shortened reply looks
/// like a model that stopped early, while the error tells the client what to change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RequestLimits {
    /// Largest request body in bytes (larger: 413).
    pub max_body_bytes: Option<usize>,
    /// Most messages in one chat request (more: 400).
    pub max_messages: Option<usize>,
    /// Largest `max_tokens` / `max_completion_tokens` a request may ask for (larger: 400).
    pub max_tokens: Option<i64>,
    /// Models the project may use (others: 403); empty allows all.
    pub allowed_models: Vec<String>,
    /// A chat request whose cloud targets are all unreachable is queued (202 and the job), as if
    /// it carried `x-meshgate-allow-queue: true`, when its key may use jobs.
    pub queue_when_unreachable: bool,
}

impl RequestLimits {
    /// Parses a stored or submitted document, refusing unknown fields and out-of-range values.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, ApiError> {
        if !value.is_object() {
            return Err(invalid("the request limits must be a JSON object"));
        }
        let limits: Self =
            serde::Deserialize::deserialize(value).map_err(|e| invalid(format!("invalid request limits: {e}")))?;
        limits.validate()?;
        Ok(limits)
    }

    pub fn validate(&self) -> Result<(), ApiError> {
        if self.max_body_bytes == Some(0) {
            return Err(invalid("max_body_bytes must be at least 1"));
        }
        if self.max_messages == Some(0) {
            return Err(invalid("max_messages must be at least 1"));
        }
        if self.max_tokens.is_some_and(|t| t < 1) {
            return Err(invalid("max_tokens must be at least 1"));
        }
        if self.allowed_models.len() > MAX_ALLOWED_MODELS {
            return Err(invalid(format!("allowed_models names at most {MAX_ALLOWED_MODELS} models")));
        }
        for model in &self.allowed_models {
            check_field("allowed_models[]", model).map_err(ApiError::from)?;
        }
        Ok(())
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

/// A project's compiled settings.
#[derive(Debug, Clone)]
pub struct ProjectSettings {
    pub project_id: String,
    pub policy: PolicyEngine,
    pub limits: RequestLimits,
}

impl ProjectSettings {
    /// The body limit: the project's when it set a smaller one than the gateway's.
    pub fn max_body_bytes(&self, gateway: usize) -> usize {
        self.limits.max_body_bytes.map_or(gateway, |l| l.min(gateway))
    }

    /// The chat limits: the project's where they are tighter than the gateway's.
    pub fn chat_limits(&self, gateway: ChatLimits) -> ChatLimits {
        ChatLimits {
            max_messages: self.limits.max_messages.map_or(gateway.max_messages, |l| l.min(gateway.max_messages)),
            max_tokens_cap: self.limits.max_tokens.map_or(gateway.max_tokens_cap, |l| l.min(gateway.max_tokens_cap)),
        }
    }

    /// Refuses a model outside the project's allow-list (403).
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if self.limits.allowed_models.is_empty() || self.limits.allowed_models.iter().any(|m| m == model) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::PermissionDenied,
                format!("model {model:?} is not allowed in project {}", self.project_id),
            ))
        }
    }
}

struct Entry {
    settings: Arc<ProjectSettings>,
    fetched_at: Instant,
}

struct Inner {
    store: Arc<dyn TenancyStore>,
    subscription: Subscription,
    ttl: Duration,
    entries: Mutex<HashMap<String, Entry>>,
    /// Bumped by every invalidation: a fetch that raced one does not enter the cache.
    generation: AtomicU64,
    /// The default policy, compiled once for every project that keeps it.
    default_policy: PolicyEngine,
}

/// The per-replica cache of project settings.
#[derive(Clone)]
pub struct SettingsCache {
    inner: Arc<Inner>,
}

impl SettingsCache {
    /// `ttl`: how long an entry is trusted while invalidations arrive (`subscription` live).
    pub fn new(store: Arc<dyn TenancyStore>, subscription: Subscription, ttl: Duration) -> Self {
        let default_policy = PolicyEngine::new(PolicyConfig::default()).expect("the default security policy compiles");
        Self {
            inner: Arc::new(Inner {
                store,
                subscription,
                ttl,
                entries: Mutex::new(HashMap::new()),
                generation: AtomicU64::new(0),
                default_policy,
            }),
        }
    }

    /// The settings of `project_id`. When the store fails, a cached entry of any age is used (with
    /// a warning); without one the request fails with the store's error.
    pub async fn get(&self, project_id: &str) -> Result<Arc<ProjectSettings>, ApiError> {
        let ttl = if self.inner.subscription.is_live() { self.inner.ttl } else { UNSUBSCRIBED_TTL };
        let stale = {
            let entries = self.inner.entries.lock();
            match entries.get(project_id) {
                Some(entry) if entry.fetched_at.elapsed() < ttl => return Ok(entry.settings.clone()),
                Some(entry) => Some(entry.settings.clone()),
                None => None,
            }
        };
        let generation = self.inner.generation.load(Ordering::Acquire);
        let doc = match self.inner.store.project_settings(project_id).await {
            Ok(doc) => doc.unwrap_or_else(ProjectSettingsDoc::empty),
            Err(err) => {
                return match stale {
                    Some(settings) => {
                        tracing::warn!(%err, project_id, "project settings unavailable; using the cached ones");
                        Ok(settings)
                    }
                    None => Err(err.into()),
                };
            }
        };
        let settings = Arc::new(self.compile(project_id, &doc)?);
        let mut entries = self.inner.entries.lock();
        if self.inner.generation.load(Ordering::Acquire) == generation {
            entries.insert(project_id.to_owned(), Entry { settings: settings.clone(), fetched_at: Instant::now() });
        }
        Ok(settings)
    }

    /// Compiles stored documents. A stored document that no longer parses fails the request
    /// (500) rather than silently running with a weaker policy.
    fn compile(&self, project_id: &str, doc: &ProjectSettingsDoc) -> Result<ProjectSettings, ApiError> {
        let unreadable = |what: &str, err: String| unreadable(project_id, what, &err);
        let policy = if doc.security_policy.as_object().is_some_and(|o| o.is_empty()) {
            self.inner.default_policy.clone()
        } else {
            PolicyEngine::from_json(&doc.security_policy).map_err(|e| unreadable("security policy", e.to_string()))?
        };
        let limits =
            RequestLimits::from_json(&doc.request_limits).map_err(|e| unreadable("request limits", e.message))?;
        Ok(ProjectSettings { project_id: project_id.to_owned(), policy, limits })
    }

    /// Drops a project from this replica's cache.
    pub fn invalidate(&self, project_id: &str) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.entries.lock().remove(project_id);
    }

    /// Drops every project (invalidations may have been missed).
    pub fn clear(&self) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.entries.lock().clear();
    }
}

/// A stored settings document that no longer parses: the server's fault (500), logged, whoever
/// reads it — never the reader's 400, and never silently replaced by a weaker default.
pub(crate) fn unreadable(project_id: &str, what: &str, err: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(project_id, error = %err, "stored {what} is invalid");
    ApiError::new(ErrorCode::Internal, format!("the stored {what} of project {project_id} is invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenancy::{DEFAULT_TENANT, SettingsKind};

    #[test]
    fn limits_parse_strictly_and_tighten_only() {
        assert_eq!(RequestLimits::from_json(&serde_json::json!({})).unwrap(), RequestLimits::default());
        for bad in [
            serde_json::json!([]),
            serde_json::json!({"max_body_bytes": 0}),
            serde_json::json!({"max_messages": 0}),
            serde_json::json!({"max_tokens": -1}),
            serde_json::json!({"allowed_models": [""]}),
            serde_json::json!({"max_tokens_cap": 5}),
        ] {
            assert_eq!(RequestLimits::from_json(&bad).unwrap_err().code, ErrorCode::InvalidRequest, "{bad}");
        }
        let limits = RequestLimits::from_json(&serde_json::json!({
            "max_body_bytes": 10_000_000, "max_messages": 4, "max_tokens": 100, "allowed_models": ["a"]
        }))
        .unwrap();
        let settings = ProjectSettings {
            project_id: "p".into(),
            policy: PolicyEngine::new(PolicyConfig::default()).unwrap(),
            limits,
        };
        assert_eq!(settings.max_body_bytes(1024), 1024, "the gateway's limit stays the ceiling");
        let chat = settings.chat_limits(ChatLimits { max_messages: 1024, max_tokens_cap: 131_072 });
        assert_eq!((chat.max_messages, chat.max_tokens_cap), (4, 100));
        assert!(settings.check_model("a").is_ok());
        assert_eq!(settings.check_model("b").unwrap_err().code, ErrorCode::PermissionDenied);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_is_seen_after_invalidation() {
        for (backend, store) in crate::tenancy::test_backends().await {
            let cache = SettingsCache::new(store.clone(), Subscription::new(false), Duration::from_secs(3600));
            let before = cache.get(DEFAULT_TENANT).await.unwrap();
            assert!(before.policy.config().enabled, "{backend}");
            let disabled = serde_json::json!({"enabled": false});
            store.set_project_settings(DEFAULT_TENANT, SettingsKind::SecurityPolicy, &disabled).await.unwrap();
            assert!(
                cache.get(DEFAULT_TENANT).await.unwrap().policy.config().enabled,
                "{backend}: cached until invalidated"
            );
            cache.invalidate(DEFAULT_TENANT);
            assert!(!cache.get(DEFAULT_TENANT).await.unwrap().policy.config().enabled, "{backend}");
        }
    }
}
