//! API-key authentication. Keys are looked up by the SHA-256 of the secret (compared in constant
//! time for the bootstrap key), so neither storage nor timing reveals a secret. Lookups are cached
//! per replica; a revocation is published on Redis and every replica drops the key from its cache
//! within moments, and a role change drops the user's keys the same way. While a replica is not
//! subscribed (Redis down or not configured with several replicas) it does not trust its cache for
//! longer than the local invalidations it made itself. Repeated failures from one client address
//! (see [`crate::client_addr`]) are throttled: its failures answer 429, a valid key never does.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use meshgate_proto::common::v1::{Principal, Role};
use meshgate_runtime::{ApiError, ErrorCode};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::invalidation::Subscription;
use crate::tenancy::{DEFAULT_TENANT, EndpointScope, KeyScopes, TenancyStore};

/// Identifier (not secret) of the bootstrap owner key, used in quota scopes and traces.
pub const ADMIN_KEY_ID: &str = "admin";

/// Who is calling, as their key says.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    pub principal: Principal,
    pub scopes: KeyScopes,
    /// The bootstrap key (`MESHGATE_ADMIN_KEY`): may manage every organization.
    pub platform_admin: bool,
    /// When the caller's key expires: keys it creates or rotates expire no later.
    pub expires_at: Option<chrono::DateTime<Utc>>,
}

impl Caller {
    pub fn role(&self) -> Role {
        Role::try_from(self.principal.role).unwrap_or(Role::Unspecified)
    }

    /// Refuses a key whose scopes do not include `endpoint` (403).
    pub fn require(&self, endpoint: EndpointScope) -> Result<(), ApiError> {
        if self.scopes.allows_endpoint(endpoint) {
            Ok(())
        } else {
            Err(ApiError::new(ErrorCode::PermissionDenied, format!("this API key is not allowed to use {endpoint:?}")))
        }
    }

    /// Refuses a key that may not use `model` (403).
    pub fn require_model(&self, model: &str) -> Result<(), ApiError> {
        if self.scopes.allows_model(model) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::PermissionDenied,
                format!("this API key is not allowed to use model {model:?}"),
            ))
        }
    }
}

/// Settings of the [`Authenticator`].
#[derive(Debug, Clone, Copy)]
pub struct AuthSettings {
    /// How long a looked-up key is trusted without asking the store (while invalidations arrive).
    pub cache_ttl: Duration,
    /// Failed authentications from one address per `failure_window` before its failures are
    /// answered 429.
    pub max_failures: u32,
    pub failure_window: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self { cache_ttl: Duration::from_secs(60), max_failures: 20, failure_window: Duration::from_secs(60) }
    }
}

struct Cached {
    caller: Result<Caller, ApiError>,
    key_id: String,
    user_id: Option<String>,
    expires_at: Option<chrono::DateTime<Utc>>,
    fetched_at: Instant,
}

struct Failures {
    count: u32,
    since: Instant,
}

struct Inner {
    admin_digest: Option<[u8; 32]>,
    store: Arc<dyn TenancyStore>,
    settings: AuthSettings,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    /// Whether invalidations from other replicas reach this one.
    subscription: Subscription,
}

/// Resolves bearer tokens to callers.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

impl Authenticator {
    /// The cache is trusted only while `subscription` is live.
    pub fn new(
        admin_key: Option<&str>,
        store: Arc<dyn TenancyStore>,
        settings: AuthSettings,
        subscription: Subscription,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                admin_digest: admin_key.filter(|k| !k.is_empty()).map(digest),
                store,
                settings,
                cache: Mutex::new(HashMap::new()),
                failures: Mutex::new(HashMap::new()),
                subscription,
            }),
        }
    }

    pub fn store(&self) -> &Arc<dyn TenancyStore> {
        &self.inner.store
    }

    /// The caller for the `Authorization` header value, or a 401 (403 for a key whose user lost
    /// every role). An address that failed too often gets 429 for its failures; a valid key is
    /// never refused for its address (behind a proxy, other tenants share it).
    pub async fn authenticate(&self, authorization: Option<&str>, client: Option<IpAddr>) -> Result<Caller, ApiError> {
        let result = self.resolve(authorization).await;
        match (result, client) {
            (Err(err), Some(ip)) if err.code == ErrorCode::Unauthenticated => {
                Err(self.record_failure(ip).unwrap_or(err))
            }
            (result, _) => result,
        }
    }

    async fn resolve(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let Some(value) = authorization else {
            return Err(ApiError::new(
                ErrorCode::Unauthenticated,
                "missing API key: send `Authorization: Bearer <key>`",
            ));
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::new(ErrorCode::Unauthenticated, "malformed Authorization header: expected `Bearer <key>`")
            })?;
        let presented = digest(token);
        if let Some(admin) = &self.inner.admin_digest
            && constant_time_eq(admin, &presented)
        {
            return Ok(bootstrap_caller());
        }
        if self.inner.subscription.is_live()
            && let Some(cached) = self.inner.cache.lock().get(&presented)
            && cached.fetched_at.elapsed() < self.inner.settings.cache_ttl
            && cached.expires_at.is_none_or(|at| at > Utc::now())
        {
            return cached.caller.clone();
        }
        let lookup = self.inner.store.key_by_hash(&presented).await.map_err(ApiError::from)?;
        let Some(lookup) = lookup else {
            return Err(ApiError::new(ErrorCode::Unauthenticated, "invalid API key"));
        };
        let key = lookup.key;
        let caller = if !key.is_active(Utc::now()) {
            let why = if key.revoked_at.is_some() { "revoked" } else { "expired" };
            Err(ApiError::new(ErrorCode::Unauthenticated, format!("this API key was {why}")))
        } else {
            // A user's key acts with at most the user's current role in the project.
            let role = match (&key.user_id, lookup.user_role) {
                (None, _) => Some(key.role),
                (Some(_), Some(user_role)) => Some(key.role.min(user_role)),
                (Some(_), None) => None,
            };
            match role {
                None => Err(ApiError::new(
                    ErrorCode::PermissionDenied,
                    "the user of this API key no longer has a role in its project",
                )),
                Some(role) => Ok(Caller {
                    principal: Principal {
                        org_id: key.org_id.clone(),
                        project_id: key.project_id.clone(),
                        user_id: key.user_id.clone().unwrap_or_default(),
                        key_id: key.id.clone(),
                        role: role as i32,
                    },
                    scopes: key.scopes.clone(),
                    platform_admin: false,
                    expires_at: key.expires_at,
                }),
            }
        };
        // A cache hit past the key's expiry asks the store again, which refuses the key.
        let cached = Cached {
            caller: caller.clone(),
            key_id: key.id.clone(),
            user_id: key.user_id.clone(),
            expires_at: key.expires_at,
            fetched_at: Instant::now(),
        };
        self.inner.cache.lock().insert(presented, cached);
        caller
    }

    /// Drops a key from this replica's cache.
    pub fn invalidate(&self, key_id: &str) {
        self.inner.cache.lock().retain(|_, cached| cached.key_id != key_id);
    }

    /// Drops every cached key (invalidations may have been missed).
    pub(crate) fn forget_all(&self) {
        self.inner.cache.lock().clear();
    }

    /// Drops every key of a user from this replica's cache (the user's roles changed).
    pub fn invalidate_user(&self, user_id: &str) {
        self.inner.cache.lock().retain(|_, cached| cached.user_id.as_deref() != Some(user_id));
    }

    /// Counts a failed authentication from `ip`; past the limit, the 429 to answer instead of the
    /// failure.
    fn record_failure(&self, ip: IpAddr) -> Option<ApiError> {
        let settings = self.inner.settings;
        let window = settings.failure_window;
        let mut failures = self.inner.failures.lock();
        // Bounded: addresses whose window passed are forgotten once the map grows.
        if failures.len() > 100_000 {
            failures.retain(|_, f| f.since.elapsed() < window);
        }
        let entry = failures.entry(ip).or_insert(Failures { count: 0, since: Instant::now() });
        if entry.since.elapsed() >= window {
            *entry = Failures { count: 0, since: Instant::now() };
        }
        entry.count = entry.count.saturating_add(1);
        if entry.count <= settings.max_failures {
            return None;
        }
        let wait = window.saturating_sub(entry.since.elapsed()).as_secs().max(1);
        Some(
            ApiError::new(
                ErrorCode::RateLimited,
                format!("too many failed authentications from this address; retry in {wait} s"),
            )
            .with_retry_after(wait),
        )
    }
}

/// The bootstrap owner key's caller: owner of the default tenant and platform administrator.
fn bootstrap_caller() -> Caller {
    Caller {
        principal: Principal {
            org_id: DEFAULT_TENANT.into(),
            project_id: DEFAULT_TENANT.into(),
            user_id: "admin".into(),
            key_id: ADMIN_KEY_ID.into(),
            role: Role::Owner as i32,
        },
        scopes: KeyScopes::default(),
        platform_admin: true,
        expires_at: None,
    }
}

pub(crate) fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenancy::{ApiKey, MemoryTenancy, test_backends};

    fn authenticator(settings: AuthSettings) -> Authenticator {
        Authenticator::new(Some("sk-admin"), Arc::new(MemoryTenancy::default()), settings, Subscription::new(false))
    }

    #[tokio::test]
    async fn admin_key_authenticates_as_platform_owner() {
        let auth = authenticator(AuthSettings::default());
        let caller = auth.authenticate(Some("Bearer sk-admin"), None).await.unwrap();
        assert_eq!(caller.role(), Role::Owner);
        assert!(caller.platform_admin);
        assert_eq!(caller.principal.key_id, ADMIN_KEY_ID);
    }

    #[tokio::test]
    async fn missing_malformed_and_wrong_keys_are_401() {
        let auth = authenticator(AuthSettings::default());
        for header in [None, Some("sk-admin"), Some("Bearer "), Some("Bearer sk-admin2"), Some("Basic x")] {
            assert_eq!(
                auth.authenticate(header, None).await.unwrap_err().code,
                ErrorCode::Unauthenticated,
                "{header:?}"
            );
        }
        let no_key = Authenticator::new(
            None,
            Arc::new(MemoryTenancy::default()),
            AuthSettings::default(),
            Subscription::new(false),
        );
        assert!(no_key.authenticate(Some("Bearer anything"), None).await.is_err());
    }

    #[tokio::test]
    async fn an_address_failing_too_often_is_throttled_and_others_are_not() {
        let settings = AuthSettings { max_failures: 3, ..AuthSettings::default() };
        let auth = authenticator(settings);
        let attacker: IpAddr = "10.0.0.66".parse().unwrap();
        for _ in 0..3 {
            let err = auth.authenticate(Some("Bearer guess"), Some(attacker)).await.unwrap_err();
            assert_eq!(err.code, ErrorCode::Unauthenticated);
        }
        let throttled = auth.authenticate(Some("Bearer guess"), Some(attacker)).await.unwrap_err();
        assert_eq!(throttled.code, ErrorCode::RateLimited);
        assert!(throttled.retry_after.is_some_and(|s| (1..=60).contains(&s)));
        // Behind a proxy every tenant shares the address: a valid key is never refused for it.
        assert!(auth.authenticate(Some("Bearer sk-admin"), Some(attacker)).await.is_ok());
        let neighbour: IpAddr = "10.0.0.67".parse().unwrap();
        let err = auth.authenticate(Some("Bearer guess"), Some(neighbour)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthenticated);
    }

    fn user_key(id: &str, user: &str, expires_at: Option<chrono::DateTime<Utc>>) -> ApiKey {
        ApiKey {
            id: id.into(),
            prefix: "mgk_test".into(),
            org_id: DEFAULT_TENANT.into(),
            project_id: DEFAULT_TENANT.into(),
            user_id: Some(user.into()),
            name: "laptop".into(),
            role: Role::Admin,
            scopes: KeyScopes::default(),
            expires_at,
            revoked_at: None,
            created_at: Utc::now(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_keys_see_role_changes_and_expiry_at_once() {
        for (backend, store) in test_backends().await {
            let settings = AuthSettings { cache_ttl: Duration::from_secs(3600), ..AuthSettings::default() };
            let auth = Authenticator::new(None, store.clone(), settings, Subscription::new(false));
            let user = store.create_user("usr_1", DEFAULT_TENANT, "a@example.com", "A").await.unwrap();
            store.set_role(&user.id, DEFAULT_TENANT, Some(Role::Admin)).await.unwrap();
            store.insert_key(&user_key("key_1", &user.id, None), &digest("mgk_one")).await.unwrap();
            assert_eq!(auth.authenticate(Some("Bearer mgk_one"), None).await.unwrap().role(), Role::Admin);
            store.set_role(&user.id, DEFAULT_TENANT, None).await.unwrap();
            auth.invalidate_user(&user.id);
            let err = auth.authenticate(Some("Bearer mgk_one"), None).await.unwrap_err();
            assert_eq!(
                err.code,
                ErrorCode::PermissionDenied,
                "{backend}: the removed role is seen on the next request"
            );

            store.set_role(&user.id, DEFAULT_TENANT, Some(Role::Developer)).await.unwrap();
            let soon = Utc::now() + chrono::Duration::milliseconds(300);
            store.insert_key(&user_key("key_2", &user.id, Some(soon)), &digest("mgk_two")).await.unwrap();
            assert!(auth.authenticate(Some("Bearer mgk_two"), None).await.is_ok());
            tokio::time::sleep(Duration::from_millis(400)).await;
            let err = auth.authenticate(Some("Bearer mgk_two"), None).await.unwrap_err();
            assert!(
                err.message.contains("expired"),
                "{backend}: a cached key is refused once it expires: {}",
                err.message
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_users_key_acts_with_at_most_the_users_current_role() {
        for (backend, store) in test_backends().await {
            let auth = Authenticator::new(None, store.clone(), AuthSettings::default(), Subscription::new(false));
            let user = store.create_user("usr_1", DEFAULT_TENANT, "a@example.com", "A").await.unwrap();
            store.set_role(&user.id, DEFAULT_TENANT, Some(Role::Developer)).await.unwrap();
            let key = ApiKey {
                id: "key_1".into(),
                prefix: "mgk_test".into(),
                org_id: DEFAULT_TENANT.into(),
                project_id: DEFAULT_TENANT.into(),
                user_id: Some(user.id.clone()),
                name: "laptop".into(),
                role: Role::Admin,
                scopes: KeyScopes::default(),
                expires_at: None,
                revoked_at: None,
                created_at: Utc::now(),
            };
            store.insert_key(&key, &digest("mgk_secret")).await.unwrap();
            let caller = auth.authenticate(Some("Bearer mgk_secret"), None).await.unwrap();
            assert_eq!(caller.role(), Role::Developer, "{backend}: capped by the user's role");
            assert!(!caller.platform_admin);

            // Revoked: the cache is dropped locally, the next request is refused.
            store.revoke_key("key_1", Utc::now()).await.unwrap();
            auth.invalidate("key_1");
            let err = auth.authenticate(Some("Bearer mgk_secret"), None).await.unwrap_err();
            assert_eq!(err.code, ErrorCode::Unauthenticated);
            assert!(err.message.contains("revoked"));
        }
    }
}
