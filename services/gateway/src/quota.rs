//! `GET /v1/quota/status` and `PUT /v1/quota/limits` over the quota service (the budget headers
//! and the 429 of a refused reservation are in `budget`).

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use meshgate_proto::common::v1::Role;
use meshgate_proto::quota::v1 as pb;
use meshgate_runtime::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::{AppState, authenticate, client_of, read_body, request_id_of};
use crate::auth::Caller;
use crate::budget::{datetime, rfc3339, scope_kind};
use crate::peers::peer_call;
use crate::response::error_response;
use crate::tenancy::{EndpointScope, TenancyStore};

fn parse_scope_kind(kind: &str) -> Option<pb::ScopeKind> {
    match kind {
        "org" => Some(pb::ScopeKind::Org),
        "project" => Some(pb::ScopeKind::Project),
        "user" => Some(pb::ScopeKind::User),
        "key" => Some(pb::ScopeKind::Key),
        _ => None,
    }
}

/// A scope on the wire: `{"kind": "user", "id": "u_1"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = QuotaScope)]
pub struct ScopeJson {
    /// `org`, `project`, `user` or `key`.
    #[schema(value_type = QuotaScopeKind)]
    pub kind: String,
    pub id: String,
}

/// The kinds of quota scope.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // a schema only: kinds travel as strings so that a bad one gets a clear 400
pub(crate) enum QuotaScopeKind {
    Org,
    Project,
    User,
    Key,
}

/// The limits of a scope on the wire; an absent field is 0 (unlimited).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields, default)]
#[schema(as = QuotaLimits)]
pub struct LimitsJson {
    pub tokens_per_day: i64,
    pub cost_micros_per_day: i64,
    pub requests_per_minute: i64,
    pub tokens_per_minute: i64,
    /// IANA zone of an org's daily window; org scopes only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

impl From<pb::Limits> for LimitsJson {
    fn from(l: pb::Limits) -> Self {
        Self {
            tokens_per_day: l.tokens_per_day,
            cost_micros_per_day: l.cost_micros_per_day,
            requests_per_minute: l.requests_per_minute,
            tokens_per_minute: l.tokens_per_minute,
            time_zone: (!l.time_zone.is_empty()).then_some(l.time_zone),
        }
    }
}

/// Body of `PUT /v1/quota/limits`: the scope's limits are replaced as a whole.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = SetQuotaLimits, example = json!({"scope": {"kind": "project", "id": "default"}, "limits": {"tokens_per_day": 5000000, "requests_per_minute": 600}}))]
pub struct SetLimitsJson {
    pub scope: ScopeJson,
    pub limits: LimitsJson,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = QuotaAmounts)]
pub(crate) struct Amounts {
    tokens: i64,
    cost_micros: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    requests: Option<i64>,
}

/// Remaining amounts; `null` where no limit applies.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = QuotaRemaining)]
pub(crate) struct Remaining {
    tokens: Option<i64>,
    cost_micros: Option<i64>,
    requests_this_minute: Option<i64>,
    tokens_this_minute: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = QuotaScopeStatus)]
pub(crate) struct ScopeStatusJson {
    scope: ScopeJson,
    limits: LimitsJson,
    used: Amounts,
    reserved: Amounts,
    remaining: Remaining,
    time_zone: String,
    #[schema(format = DateTime)]
    reset_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = QuotaStatus)]
pub(crate) struct StatusJson {
    object: &'static str,
    scopes: Vec<ScopeStatusJson>,
}

fn limited(value: i64) -> Option<i64> {
    (value >= 0).then_some(value)
}

fn status_json(status: pb::StatusResponse) -> StatusJson {
    let scopes = status
        .scopes
        .into_iter()
        .map(|s| ScopeStatusJson {
            scope: s
                .scope
                .map(|scope| ScopeJson { kind: scope_kind(scope.kind).into(), id: scope.id })
                .unwrap_or_else(|| ScopeJson { kind: "unknown".into(), id: String::new() }),
            limits: LimitsJson {
                tokens_per_day: s.tokens_per_day,
                cost_micros_per_day: s.cost_micros_per_day,
                requests_per_minute: s.requests_per_minute,
                tokens_per_minute: s.tokens_per_minute,
                time_zone: None,
            },
            used: Amounts { tokens: s.used_tokens, cost_micros: s.used_cost_micros, requests: Some(s.requests_today) },
            reserved: Amounts { tokens: s.reserved_tokens, cost_micros: s.reserved_cost_micros, requests: None },
            remaining: Remaining {
                tokens: limited(s.remaining_tokens),
                cost_micros: limited(s.remaining_cost_micros),
                requests_this_minute: limited(s.remaining_requests_this_minute),
                tokens_this_minute: limited(s.remaining_tokens_this_minute),
            },
            time_zone: s.time_zone,
            reset_at: s.reset_at.as_ref().and_then(datetime).map(rfc3339),
        })
        .collect();
    StatusJson { object: "quota.status", scopes }
}

/// What `getQuotaStatus` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const STATUS_ERRORS: &[ErrorCode] = &[ErrorCode::Timeout];

/// `GET /v1/quota/status`: limits, usage and what remains of every scope the caller is charged to.
#[utoipa::path(
    get,
    path = "/v1/quota/status",
    operation_id = "getQuotaStatus",
    tag = "quota",
    summary = "The caller's budgets",
    description = "Limits, usage and what remains today and this minute for each scope the caller is charged to \
(organization, project, user, key).",
    responses((status = 200, description = "Every scope of the caller", body = StatusJson))
)]
pub async fn status(State(app): State<AppState>, request: Request) -> Response {
    let id = request_id_of(&request);
    let caller = authenticate(&app, request.headers(), client_of(&request)).await;
    let result = async {
        let caller = caller?;
        caller.require(EndpointScope::Quota)?;
        let principal = caller.principal;
        let mut quota = app.orchestrator.peers().quota.clone();
        let timeout = app.orchestrator.peers().timeout;
        peer_call("quota", timeout, quota.status(pb::StatusRequest { principal: Some(principal) })).await
    }
    .await;
    match result {
        Ok(status) => axum::Json(status_json(status)).into_response(),
        Err(err) => error_response(&err, &id),
    }
}

/// What `setQuotaLimits` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const SET_LIMITS_ERRORS: &[ErrorCode] =
    &[ErrorCode::NotFound, ErrorCode::PayloadTooLarge, ErrorCode::Timeout];

/// `PUT /v1/quota/limits`: sets a scope's limits; admins and owners only.
#[utoipa::path(
    put,
    path = "/v1/quota/limits",
    operation_id = "setQuotaLimits",
    tag = "quota",
    summary = "Replace a scope's limits",
    description = "Admins and owners, inside their organization (an organization's limits: its owners). 0 or an \
absent field is unlimited. Applies on the next request on every replica.",
    request_body = SetLimitsJson,
    responses((status = 200, description = "The scope's limits as stored", body = SetLimitsJson))
)]
pub async fn set_limits(State(app): State<AppState>, request: Request) -> Response {
    let id = request_id_of(&request);
    let caller = authenticate(&app, request.headers(), client_of(&request)).await;
    let (parts, body) = request.into_parts();
    let result = async {
        let caller = caller?;
        caller.require(EndpointScope::Quota)?;
        let body = read_body(body, &parts.headers, app.max_body_bytes).await?;
        let wanted: SetLimitsJson = serde_json::from_slice(&body).map_err(crate::openai::json_error)?;
        let scope = authorize_limits(&caller, app.auth.store().as_ref(), &wanted.scope).await?;
        let limits = pb::Limits {
            tokens_per_day: wanted.limits.tokens_per_day,
            cost_micros_per_day: wanted.limits.cost_micros_per_day,
            requests_per_minute: wanted.limits.requests_per_minute,
            tokens_per_minute: wanted.limits.tokens_per_minute,
            time_zone: wanted.limits.time_zone.clone().unwrap_or_default(),
        };
        let mut quota = app.orchestrator.peers().quota.clone();
        let timeout = app.orchestrator.peers().timeout;
        let set = peer_call(
            "quota",
            timeout,
            quota.set_limits(pb::SetLimitsRequest { scope: Some(scope), limits: Some(limits) }),
        )
        .await?;
        app.orchestrator.quota().limits_changed();
        Ok::<_, ApiError>(SetLimitsJson { scope: wanted.scope, limits: set.limits.unwrap_or_default().into() })
    }
    .await;
    match result {
        Ok(set) => axum::Json(set).into_response(),
        Err(err) => error_response(&err, &id),
    }
}

/// Who may set which limits: the bootstrap key any; otherwise admins and owners, inside their
/// organization only, and a limit binds only whom it is set on — nobody lifts a limit that binds
/// themselves or someone above them:
/// - an organization's and a project's limits: the organization's owners;
/// - a user's (which binds the user in every project): owners, or an admin of the caller's project
///   when the user is a member of that project only, with a role no higher than admin, and is not
///   the caller;
/// - a key's: owners, or an admin of the key's project for a key no higher than admin that is not
///   the caller's own.
///
/// Anything outside the caller's reach answers 404.
async fn authorize_limits(caller: &Caller, store: &dyn TenancyStore, scope: &ScopeJson) -> Result<pb::Scope, ApiError> {
    let kind = parse_scope_kind(&scope.kind).ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("scope.kind {:?} is not one of org, project, user, key", scope.kind),
        )
    })?;
    if scope.id.is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "scope.id is empty"));
    }
    let wanted = pb::Scope { kind: kind as i32, id: scope.id.clone() };
    let missing = || ApiError::new(ErrorCode::NotFound, format!("{} {:?} not found", scope.kind, scope.id));
    if caller.platform_admin {
        // Any scope that exists, and the bootstrap key's own user and key (which have no rows).
        let own = match kind {
            pb::ScopeKind::User => scope.id == caller.principal.user_id,
            pb::ScopeKind::Key => scope.id == caller.principal.key_id,
            _ => false,
        };
        let exists = own
            || match kind {
                pb::ScopeKind::Org => store.get_org(&scope.id).await?.is_some(),
                pb::ScopeKind::Project => store.get_project(&scope.id).await?.is_some(),
                pb::ScopeKind::User => store.get_user(&scope.id).await?.is_some(),
                pb::ScopeKind::Key => store.get_key(&scope.id).await?.is_some(),
                pb::ScopeKind::Unspecified => false,
            };
        return if exists { Ok(wanted) } else { Err(missing()) };
    }
    // Reachability first: what the caller cannot see is a 404 whatever its role.
    let role = caller.role();
    let (org, project) = (&caller.principal.org_id, &caller.principal.project_id);
    let owner = role == Role::Owner;
    let reachable = match kind {
        pb::ScopeKind::Org => &scope.id == org,
        pb::ScopeKind::Project => {
            store.get_project(&scope.id).await?.is_some_and(|p| &p.org_id == org && (owner || &p.id == project))
        }
        pb::ScopeKind::User => store.get_user(&scope.id).await?.is_some_and(|u| &u.org_id == org),
        pb::ScopeKind::Key => {
            store.get_key(&scope.id).await?.is_some_and(|k| &k.org_id == org && (owner || &k.project_id == project))
        }
        pb::ScopeKind::Unspecified => false,
    };
    if !reachable {
        return Err(missing());
    }
    if !matches!(role, Role::Admin | Role::Owner) {
        return Err(ApiError::new(ErrorCode::PermissionDenied, "setting quota limits needs the admin or owner role"));
    }
    if owner {
        return Ok(wanted);
    }
    let denied = |why: &str| Err(ApiError::new(ErrorCode::PermissionDenied, why.to_owned()));
    match kind {
        pb::ScopeKind::Org | pb::ScopeKind::Project | pb::ScopeKind::Unspecified => {
            denied("an organization's and a project's limits are set by the organization's owners")
        }
        pb::ScopeKind::User => {
            let memberships = store.user_roles(&scope.id).await?;
            let within = !memberships.is_empty()
                && memberships.iter().all(|(p, r)| p == project && *r <= Role::Admin)
                && scope.id != caller.principal.user_id;
            if within { Ok(wanted) } else { denied("this user's limits bind beyond your reach: an owner sets them") }
        }
        pb::ScopeKind::Key => {
            let key = store.get_key(&scope.id).await?.ok_or_else(missing)?;
            if key.role <= Role::Admin && key.id != caller.principal.key_id {
                Ok(wanted)
            } else {
                denied("this key's limits are set by an owner")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use meshgate_proto::common::v1::Principal;

    use super::*;

    fn caller(role: Role, project: &str) -> Caller {
        Caller {
            principal: Principal {
                org_id: "acme".into(),
                project_id: project.into(),
                user_id: "u".into(),
                key_id: "k".into(),
                role: role as i32,
            },
            scopes: crate::tenancy::KeyScopes::default(),
            platform_admin: false,
            expires_at: None,
        }
    }

    fn scope(kind: &str, id: &str) -> ScopeJson {
        ScopeJson { kind: kind.into(), id: id.into() }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_admins_and_owners_set_limits_within_their_reach() {
        for (backend, store) in crate::tenancy::test_backends().await {
            let store = store.as_ref();
            store.create_org("acme", "Acme").await.unwrap();
            store.create_org("globex", "Globex").await.unwrap();
            let mine = store.create_project("p1", "acme", "one").await.unwrap();
            let sibling = store.create_project("p2", "acme", "two").await.unwrap();
            let theirs = store.create_project("p3", "globex", "three").await.unwrap();
            let code = |r: Result<pb::Scope, ApiError>| r.err().map(|e| e.code);
            for role in [Role::Viewer, Role::Developer, Role::Unspecified] {
                let result = authorize_limits(&caller(role, &mine.id), store, &scope("project", &mine.id)).await;
                assert_eq!(code(result), Some(ErrorCode::PermissionDenied), "{backend}: {role:?}");
            }
            let admin = caller(Role::Admin, &mine.id);
            let owner = caller(Role::Owner, &mine.id);
            let denied = Some(ErrorCode::PermissionDenied);
            let missing = Some(ErrorCode::NotFound);
            // A project's limits bind its admins: an admin cannot lift what an owner set.
            assert_eq!(code(authorize_limits(&admin, store, &scope("project", &mine.id)).await), denied);
            assert_eq!(code(authorize_limits(&owner, store, &scope("project", &mine.id)).await), None);
            assert_eq!(code(authorize_limits(&admin, store, &scope("project", &sibling.id)).await), missing);
            assert_eq!(code(authorize_limits(&owner, store, &scope("project", &sibling.id)).await), None);
            assert_eq!(code(authorize_limits(&owner, store, &scope("project", &theirs.id)).await), missing);
            assert_eq!(code(authorize_limits(&owner, store, &scope("org", "acme")).await), None);
            assert_eq!(code(authorize_limits(&admin, store, &scope("org", "acme")).await), denied);
            assert_eq!(code(authorize_limits(&owner, store, &scope("org", "globex")).await), missing);
            assert_eq!(code(authorize_limits(&owner, store, &scope("user", "nobody")).await), missing);
            let invalid = Some(ErrorCode::InvalidRequest);
            assert_eq!(code(authorize_limits(&owner, store, &scope("team", "x")).await), invalid);
            assert_eq!(code(authorize_limits(&owner, store, &scope("key", "")).await), invalid);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_admin_limits_only_members_and_keys_of_its_own_project_below_it() {
        for (backend, store) in crate::tenancy::test_backends().await {
            let store = store.as_ref();
            store.create_org("acme", "Acme").await.unwrap();
            let mine = store.create_project("p1", "acme", "one").await.unwrap();
            let sibling = store.create_project("p2", "acme", "two").await.unwrap();
            for (user, memberships) in [
                ("dev", vec![(&mine.id, Role::Developer)]),
                ("both", vec![(&mine.id, Role::Developer), (&sibling.id, Role::Viewer)]),
                ("elsewhere", vec![(&sibling.id, Role::Developer)]),
                ("boss", vec![(&mine.id, Role::Owner)]),
            ] {
                store.create_user(user, "acme", &format!("{user}@acme.test"), user).await.unwrap();
                for (project, role) in memberships {
                    store.set_role(user, project, Some(role)).await.unwrap();
                }
            }
            let admin = caller(Role::Admin, &mine.id);
            let code = |r: Result<pb::Scope, ApiError>| r.err().map(|e| e.code);
            let denied = Some(ErrorCode::PermissionDenied);
            assert_eq!(code(authorize_limits(&admin, store, &scope("user", "dev")).await), None);
            assert_eq!(
                code(authorize_limits(&admin, store, &scope("user", "both")).await),
                denied,
                "{backend}: binds beyond p1"
            );
            assert_eq!(code(authorize_limits(&admin, store, &scope("user", "elsewhere")).await), denied);
            assert_eq!(code(authorize_limits(&admin, store, &scope("user", "boss")).await), denied, "above the admin");
            assert_eq!(code(authorize_limits(&admin, store, &scope("user", "u")).await), Some(ErrorCode::NotFound));
            let key = |id: &str, role: Role| crate::tenancy::ApiKey {
                id: id.into(),
                prefix: "mgk_x".into(),
                org_id: "acme".into(),
                project_id: mine.id.clone(),
                user_id: None,
                name: String::new(),
                role,
                scopes: crate::tenancy::KeyScopes::default(),
                expires_at: None,
                revoked_at: None,
                created_at: chrono::Utc::now(),
            };
            for (id, role) in [("k_dev", Role::Developer), ("k_owner", Role::Owner), ("k", Role::Admin)] {
                store.insert_key(&key(id, role), &crate::auth::digest(id)).await.unwrap();
            }
            assert_eq!(code(authorize_limits(&admin, store, &scope("key", "k_dev")).await), None);
            assert_eq!(code(authorize_limits(&admin, store, &scope("key", "k_owner")).await), denied);
            assert_eq!(code(authorize_limits(&admin, store, &scope("key", "k")).await), denied, "its own key");
        }
    }
}
