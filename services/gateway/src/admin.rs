//! Tenancy management at the edge: organizations, projects, users, roles, API keys, and each
//! project's security policy and request limits (members read them; admins and owners change them).
//!
//! Who may do what: the bootstrap key administers every organization. Otherwise a key acts inside
//! its organization with the role it carries in its project: an owner manages the whole
//! organization (projects, users, roles, keys of every project); an admin manages its project's
//! members and keys; a developer sees and manages its own user's keys; a viewer none. Anything in
//! another organization, or a project the caller cannot see, answers 404 — never its data.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration as TimeDelta, Utc};
use meshgate_policy::{PolicyConfig, PolicyEngine};
use meshgate_proto::common::v1::Role;
use meshgate_runtime::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::{ApiPath, ApiQuery, AppState, RequestContext, read_body};
use crate::auth::{Authenticator, Caller, digest};
use crate::response::{List, error_response};
use crate::settings::{RequestLimits, unreadable};
use crate::tenancy::{
    ApiKey, EndpointScope, KeyScopes, Org, Project, ProjectSettingsDoc, SettingsKind, TenancyError, TenancyStore, User,
    check_field, new_id, parse_role, role_name,
};

/// Longest key lifetime accepted at creation, days.
const MAX_KEY_DAYS: i64 = 3_650;

/// Generates a key secret: `mgk_` and 64 hex digits from the OS random source.
pub fn new_secret() -> String {
    format!("mgk_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// The part of a secret shown in listings.
pub fn secret_prefix(secret: &str) -> String {
    secret.chars().take(12).collect()
}

fn not_found(what: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("{what} not found"))
}

fn forbidden(why: &str) -> ApiError {
    ApiError::new(ErrorCode::PermissionDenied, why.to_owned())
}

/// What the caller may do with a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Everything: the bootstrap key, the org's owners, the project's admins.
    Manage,
    /// Its own user's keys only (a developer in the project).
    OwnKeys,
    /// Visible but nothing may be changed (a viewer in the project).
    Read,
}

/// The caller's access to `project`, or 404 when the caller may not know it exists.
fn project_access(caller: &Caller, project: &Project) -> Result<Access, ApiError> {
    if caller.platform_admin {
        return Ok(Access::Manage);
    }
    if project.org_id != caller.principal.org_id {
        return Err(not_found(&format!("project {}", project.id)));
    }
    let own = project.id == caller.principal.project_id;
    match caller.role() {
        Role::Owner => Ok(Access::Manage),
        Role::Admin if own => Ok(Access::Manage),
        Role::Developer if own => Ok(Access::OwnKeys),
        Role::Viewer if own => Ok(Access::Read),
        _ => Err(not_found(&format!("project {}", project.id))),
    }
}

/// Nobody acts on a key or a member whose role is above their own: an admin can neither rotate
/// an owner's key (and receive an owner's secret), nor revoke it, nor demote an owner.
fn require_rank(caller: &Caller, role: Role, what: &str) -> Result<(), ApiError> {
    if caller.platform_admin || role <= caller.role() {
        Ok(())
    } else {
        Err(forbidden(&format!("{what} has a role above your own")))
    }
}

/// The expiry of a key created (or rotated) by `caller`: never later than the caller's own key.
/// `wanted` is the expiry asked for; an explicit one past the caller's is refused.
fn expiry_within(
    caller: &Caller,
    wanted: Option<DateTime<Utc>>,
    explicit: bool,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    match (caller.expires_at, wanted) {
        (None, wanted) => Ok(wanted),
        (Some(limit), Some(at)) if at <= limit => Ok(Some(at)),
        (Some(limit), Some(_)) if explicit => Err(forbidden(&format!(
            "a key created with yours cannot outlive it (yours expires at {})",
            limit.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ))),
        (Some(limit), _) => Ok(Some(limit)),
    }
}

/// The scopes of a key created (or rotated) by `caller`, within the caller's own.
fn scopes_within(caller: &Caller, scopes: KeyScopes) -> Result<KeyScopes, ApiError> {
    if caller.platform_admin {
        return Ok(scopes);
    }
    scopes.within(&caller.scopes).map_err(|why| forbidden(&why))
}

/// Owners (and the bootstrap key) manage their organization as a whole.
fn require_org_owner(caller: &Caller, org_id: &str) -> Result<(), ApiError> {
    if caller.platform_admin {
        return Ok(());
    }
    if org_id != caller.principal.org_id {
        return Err(not_found(&format!("organization {org_id}")));
    }
    if caller.role() == Role::Owner { Ok(()) } else { Err(forbidden("managing the organization needs the owner role")) }
}

/// The organization a listing is about: the caller's own unless the bootstrap key names another;
/// any other answers 404.
fn visible_org(caller: &Caller, wanted: Option<String>) -> Result<String, ApiError> {
    let org_id = wanted.unwrap_or_else(|| caller.principal.org_id.clone());
    if !caller.platform_admin && org_id != caller.principal.org_id {
        return Err(not_found(&format!("organization {org_id}")));
    }
    Ok(org_id)
}

async fn load_project(store: &dyn TenancyStore, caller: &Caller, id: &str) -> Result<(Project, Access), ApiError> {
    let project = store.get_project(id).await?.ok_or_else(|| not_found(&format!("project {id}")))?;
    let access = project_access(caller, &project)?;
    Ok((project, access))
}

/// A key the caller may see (and how), or 404.
async fn load_key(store: &dyn TenancyStore, caller: &Caller, id: &str) -> Result<(ApiKey, Access), ApiError> {
    let key = store.get_key(id).await?.ok_or_else(|| not_found(&format!("API key {id}")))?;
    let (_, access) =
        load_project(store, caller, &key.project_id).await.map_err(|_| not_found(&format!("API key {id}")))?;
    let visible = match access {
        Access::Manage => true,
        Access::OwnKeys => key.user_id.as_deref() == Some(caller.principal.user_id.as_str()),
        Access::Read => false,
    };
    if !visible {
        return Err(not_found(&format!("API key {id}")));
    }
    Ok((key, access))
}

/// Runs a management handler: authenticates (the `admin` endpoint scope), then `f`.
async fn managed<F, Fut, T>(app: AppState, request: Request, f: F) -> Response
where
    F: FnOnce(Arc<dyn TenancyStore>, Authenticator, Caller, Request) -> Fut,
    Fut: std::future::Future<Output = Result<(StatusCode, T), ApiError>>,
    T: Serialize,
{
    let context = request.extensions().get::<RequestContext>().cloned();
    let id = context.as_ref().map(|c| c.request_id.clone()).unwrap_or_default();
    let auth = app.auth.clone();
    let caller = crate::api::authenticate(&app, request.headers(), context.and_then(|c| c.client)).await;
    let result = async {
        let caller = caller?;
        caller.require(EndpointScope::Admin)?;
        f(auth.store().clone(), auth.clone(), caller, request).await
    }
    .await;
    match result {
        Ok((status, body)) => (status, axum::Json(body)).into_response(),
        Err(err) => error_response(&err, &id),
    }
}

async fn json_body<T: serde::de::DeserializeOwned>(request: Request, limit: usize) -> Result<T, ApiError> {
    let (parts, body) = request.into_parts();
    let bytes = read_body(body, &parts.headers, limit).await?;
    serde_json::from_slice(&bytes).map_err(crate::openai::json_error)
}

fn list<T>(data: Vec<T>) -> (StatusCode, List<T>) {
    (StatusCode::OK, List::of(data))
}

// --- organizations ------------------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateOrg {
    #[schema(min_length = 1, max_length = 256)]
    name: String,
    /// Generated when absent.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 256)]
    id: Option<String>,
}

/// What `createOrganization` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const CREATE_ORG_ERRORS: &[ErrorCode] = &[ErrorCode::Conflict, ErrorCode::PayloadTooLarge];

/// `POST /v1/orgs` (bootstrap key only).
#[utoipa::path(
    post,
    path = "/v1/orgs",
    operation_id = "createOrganization",
    tag = "tenancy",
    summary = "Create an organization",
    description = "The bootstrap key only.",
    request_body = CreateOrg,
    responses((status = 201, description = "The organization", body = Org))
)]
pub async fn create_org(State(app): State<AppState>, request: Request) -> Response {
    let limit = app.max_body_bytes;
    managed(app, request, |store, _, caller, request| async move {
        if !caller.platform_admin {
            return Err(forbidden("creating organizations needs the bootstrap administrator key"));
        }
        let body: CreateOrg = json_body(request, limit).await?;
        check_field("name", &body.name)?;
        let id = body.id.unwrap_or_else(|| new_id("org"));
        check_field("id", &id)?;
        Ok((StatusCode::CREATED, store.create_org(&id, body.name.trim()).await?))
    })
    .await
}

/// What `listOrganizations` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const LIST_ORGS_ERRORS: &[ErrorCode] = &[];

/// `GET /v1/orgs`: every organization for the bootstrap key, else the caller's own.
#[utoipa::path(
    get,
    path = "/v1/orgs",
    operation_id = "listOrganizations",
    tag = "tenancy",
    summary = "List organizations",
    description = "Every organization for the bootstrap key, else the caller's own.",
    responses((status = 200, description = "The organizations", body = List<Org>))
)]
pub async fn list_orgs(State(app): State<AppState>, request: Request) -> Response {
    managed(app, request, |store, _, caller, _| async move {
        let orgs: Vec<Org> = if caller.platform_admin {
            store.list_orgs().await?
        } else {
            store.get_org(&caller.principal.org_id).await?.into_iter().collect()
        };
        Ok(list(orgs))
    })
    .await
}

// --- projects -----------------------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateProject {
    #[schema(min_length = 1, max_length = 256)]
    name: String,
    /// Defaults to the caller's organization.
    #[serde(default)]
    org_id: Option<String>,
}

/// What `createProject` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const CREATE_PROJECT_ERRORS: &[ErrorCode] =
    &[ErrorCode::NotFound, ErrorCode::Conflict, ErrorCode::PayloadTooLarge];

/// `POST /v1/projects` (owners).
#[utoipa::path(
    post,
    path = "/v1/projects",
    operation_id = "createProject",
    tag = "tenancy",
    summary = "Create a project",
    description = "Owners of the organization (default: the caller's).",
    request_body = CreateProject,
    responses((status = 201, description = "The project", body = Project))
)]
pub async fn create_project(State(app): State<AppState>, request: Request) -> Response {
    let limit = app.max_body_bytes;
    managed(app, request, |store, _, caller, request| async move {
        let body: CreateProject = json_body(request, limit).await?;
        let org_id = body.org_id.unwrap_or_else(|| caller.principal.org_id.clone());
        check_field("name", &body.name)?;
        require_org_owner(&caller, &org_id)?;
        Ok((StatusCode::CREATED, store.create_project(&new_id("prj"), &org_id, body.name.trim()).await?))
    })
    .await
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OrgFilter {
    /// The organization (default: the caller's; others only for the bootstrap key).
    org_id: Option<String>,
}

/// What `listProjects` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const LIST_PROJECTS_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound];

/// `GET /v1/projects`: the projects of the caller's organization it may see.
#[utoipa::path(
    get,
    path = "/v1/projects",
    operation_id = "listProjects",
    tag = "tenancy",
    summary = "List projects",
    description = "The projects of the organization the caller may see.",
    params(OrgFilter),
    responses((status = 200, description = "The projects", body = List<Project>))
)]
pub async fn list_projects(State(app): State<AppState>, query: ApiQuery<OrgFilter>, request: Request) -> Response {
    managed(app, request, |store, _, caller, _| async move {
        let org_id = visible_org(&caller, query.0.org_id)?;
        let projects = store.list_projects(&org_id).await?;
        Ok(list(projects.into_iter().filter(|p| project_access(&caller, p).is_ok()).collect()))
    })
    .await
}

// --- users and roles ----------------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateUser {
    /// Must contain `@`.
    #[schema(min_length = 3, max_length = 256, pattern = "@", example = "ada@example.com")]
    email: String,
    #[serde(default)]
    #[schema(max_length = 256)]
    name: String,
    #[serde(default)]
    org_id: Option<String>,
}

/// What `createUser` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const CREATE_USER_ERRORS: &[ErrorCode] =
    &[ErrorCode::NotFound, ErrorCode::Conflict, ErrorCode::PayloadTooLarge];

/// `POST /v1/users` (owners).
#[utoipa::path(
    post,
    path = "/v1/users",
    operation_id = "createUser",
    tag = "tenancy",
    summary = "Create a user",
    description = "Owners of the organization (default: the caller's).",
    request_body = CreateUser,
    responses((status = 201, description = "The user", body = User))
)]
pub async fn create_user(State(app): State<AppState>, request: Request) -> Response {
    let limit = app.max_body_bytes;
    managed(app, request, |store, _, caller, request| async move {
        let body: CreateUser = json_body(request, limit).await?;
        let org_id = body.org_id.unwrap_or_else(|| caller.principal.org_id.clone());
        check_field("email", &body.email)?;
        if !body.email.contains('@') {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "email must contain '@'"));
        }
        check_optional("name", &body.name)?;
        require_org_owner(&caller, &org_id)?;
        let user = store.create_user(&new_id("usr"), &org_id, body.email.trim(), body.name.trim()).await?;
        Ok((StatusCode::CREATED, user))
    })
    .await
}

/// What `listUsers` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const LIST_USERS_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound];

/// `GET /v1/users`: the users of the caller's organization (owners and admins).
#[utoipa::path(
    get,
    path = "/v1/users",
    operation_id = "listUsers",
    tag = "tenancy",
    summary = "List users",
    description = "Admins and owners.",
    params(OrgFilter),
    responses((status = 200, description = "The users", body = List<User>))
)]
pub async fn list_users(State(app): State<AppState>, query: ApiQuery<OrgFilter>, request: Request) -> Response {
    managed(app, request, |store, _, caller, _| async move {
        let org_id = visible_org(&caller, query.0.org_id)?;
        if !caller.platform_admin && caller.role() < Role::Admin {
            return Err(forbidden("listing users needs the admin or owner role"));
        }
        let users: Vec<User> = store.list_users(&org_id).await?;
        Ok(list(users))
    })
    .await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetRole {
    /// `viewer`, `developer`, `admin`, `owner`, or null to remove the user from the project.
    #[schema(value_type = Option<crate::tenancy::RoleName>)]
    role: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Membership {
    user_id: String,
    project_id: String,
    #[schema(value_type = Option<crate::tenancy::RoleName>)]
    role: Option<&'static str>,
}

/// What `setProjectMember` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const SET_MEMBER_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound, ErrorCode::PayloadTooLarge];

/// `PUT /v1/projects/{project}/members/{user}`: grants a role (admins up to admin, owners any).
#[utoipa::path(
    put,
    path = "/v1/projects/{project}/members/{user}",
    operation_id = "setProjectMember",
    tag = "tenancy",
    summary = "Grant or remove a user's role in a project",
    description = "Admins (up to admin) and owners (any role); `role: null` removes the user from the project.",
    params(("project" = String, Path, description = "Project id", example = "default"), ("user" = String, Path, description = "User id")),
    request_body = SetRole,
    responses((status = 200, description = "The membership", body = Membership))
)]
pub async fn set_member(
    State(app): State<AppState>,
    ApiPath((project_id, user_id)): ApiPath<(String, String)>,
    request: Request,
) -> Response {
    let limit = app.max_body_bytes;
    let invalidator = app.invalidator.clone();
    managed(app, request, |store, auth, caller, request| async move {
        let body: SetRole = json_body(request, limit).await?;
        let role = body.role.as_deref().map(parse_role).transpose()?;
        let (project, access) = load_project(store.as_ref(), &caller, &project_id).await?;
        if access != Access::Manage {
            return Err(forbidden("managing members needs the admin or owner role"));
        }
        if !caller.platform_admin && role.is_some_and(|r| r > caller.role()) {
            return Err(forbidden("a role above your own cannot be granted"));
        }
        let user = store.get_user(&user_id).await?.filter(|u| u.org_id == project.org_id);
        let user = user.ok_or_else(|| not_found(&format!("user {user_id}")))?;
        let current = store.user_roles(&user.id).await?.into_iter().find(|(p, _)| *p == project.id).map(|(_, r)| r);
        if let Some(current) = current {
            require_rank(&caller, current, "this member")?;
        }
        store.set_role(&user.id, &project.id, role).await?;
        // The user's keys act with the new role (or none) from their next request, everywhere.
        auth.invalidate_user(&user.id);
        invalidator.publish_user(&user.id).await;
        let role = role.map(role_name);
        Ok((StatusCode::OK, Membership { user_id: user.id, project_id: project.id, role }))
    })
    .await
}

// --- project security policy and request limits -------------------------------------------------

/// A project's stored settings; members of the project may read them.
async fn project_settings(
    store: &dyn TenancyStore,
    caller: &Caller,
    project_id: &str,
) -> Result<(Project, Access, ProjectSettingsDoc), ApiError> {
    let (project, access) = load_project(store, caller, project_id).await?;
    let doc = store.project_settings(&project.id).await?.ok_or_else(|| not_found(&format!("project {project_id}")))?;
    Ok((project, access, doc))
}

/// Replaces one settings document of a project the caller manages, then makes every replica
/// drop its cached copy.
async fn store_settings(
    app: &AppState,
    store: &dyn TenancyStore,
    project: &Project,
    kind: SettingsKind,
    document: &serde_json::Value,
) -> Result<(), ApiError> {
    store.set_project_settings(&project.id, kind, document).await?;
    app.settings.invalidate(&project.id);
    app.invalidator.publish_project(&project.id).await;
    Ok(())
}

fn require_manage(access: Access, what: &str) -> Result<(), ApiError> {
    if access == Access::Manage {
        Ok(())
    } else {
        Err(forbidden(&format!("changing {what} needs the admin or owner role")))
    }
}

/// What `getSecurityPolicy` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const GET_POLICY_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound];

/// `GET /v1/projects/{project}/policy`: the project's security policy with every default filled in.
#[utoipa::path(
    get,
    path = "/v1/projects/{project}/policy",
    operation_id = "getSecurityPolicy",
    tag = "projects",
    summary = "A project's security policy",
    description = "Members of the project; every default filled in.",
    params(("project" = String, Path, description = "Project id", example = "default")),
    responses((status = 200, description = "The policy", body = inline(Object), content_type = "application/json"))
)]
pub async fn get_policy(
    State(app): State<AppState>,
    ApiPath(project_id): ApiPath<String>,
    request: Request,
) -> Response {
    managed(app, request, |store, _, caller, _| async move {
        let (_, _, doc) = project_settings(store.as_ref(), &caller, &project_id).await?;
        let policy = PolicyConfig::from_json(&doc.security_policy)
            .map_err(|err| unreadable(&project_id, "security policy", &err))?;
        Ok((StatusCode::OK, policy))
    })
    .await
}

/// What `setSecurityPolicy` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const SET_POLICY_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound, ErrorCode::PayloadTooLarge];

/// `PUT /v1/projects/{project}/policy` (admins and owners): replaces the security policy. It is
/// validated and compiled before it is stored; every replica applies it to its next request.
#[utoipa::path(
    put,
    path = "/v1/projects/{project}/policy",
    operation_id = "setSecurityPolicy",
    tag = "projects",
    summary = "Replace a project's security policy",
    description = "Admins and owners. Validated and compiled before it is stored; every replica applies it to its next request.",
    params(("project" = String, Path, description = "Project id", example = "default")),
    request_body = inline(Object),
    responses((status = 200, description = "The policy as stored, defaults filled in", body = inline(Object)))
)]
pub async fn set_policy(
    State(app): State<AppState>,
    ApiPath(project_id): ApiPath<String>,
    request: Request,
) -> Response {
    let limit = app.max_body_bytes;
    let shared = app.clone();
    managed(app, request, |store, _, caller, request| async move {
        let (project, access) = load_project(store.as_ref(), &caller, &project_id).await?;
        require_manage(access, "the security policy")?;
        let body: serde_json::Value = json_body(request, limit).await?;
        let engine = PolicyEngine::from_json(&body)?;
        let stored = serde_json::to_value(engine.config())
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("the policy cannot be stored: {e}")))?;
        store_settings(&shared, store.as_ref(), &project, SettingsKind::SecurityPolicy, &stored).await?;
        Ok((StatusCode::OK, engine.config().clone()))
    })
    .await
}

/// What `getRequestLimits` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const GET_LIMITS_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound];

/// `GET /v1/projects/{project}/limits`: the project's request limits (`null`: the gateway's).
#[utoipa::path(
    get,
    path = "/v1/projects/{project}/limits",
    operation_id = "getRequestLimits",
    tag = "projects",
    summary = "A project's request limits",
    description = "Members of the project. `null`: the gateway's limit.",
    params(("project" = String, Path, description = "Project id", example = "default")),
    responses((status = 200, description = "The limits", body = RequestLimits))
)]
pub async fn get_limits(
    State(app): State<AppState>,
    ApiPath(project_id): ApiPath<String>,
    request: Request,
) -> Response {
    managed(app, request, |store, _, caller, _| async move {
        let (_, _, doc) = project_settings(store.as_ref(), &caller, &project_id).await?;
        let limits = RequestLimits::from_json(&doc.request_limits)
            .map_err(|err| unreadable(&project_id, "request limits", &err.message))?;
        Ok((StatusCode::OK, limits))
    })
    .await
}

/// What `setRequestLimits` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const SET_LIMITS_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound, ErrorCode::PayloadTooLarge];

/// `PUT /v1/projects/{project}/limits` (admins and owners): replaces the request limits.
#[utoipa::path(
    put,
    path = "/v1/projects/{project}/limits",
    operation_id = "setRequestLimits",
    tag = "projects",
    summary = "Replace a project's request limits",
    description = "Admins and owners. A project can tighten the gateway's limits, never loosen them.",
    params(("project" = String, Path, description = "Project id", example = "default")),
    request_body = RequestLimits,
    responses((status = 200, description = "The limits as stored", body = RequestLimits))
)]
pub async fn set_limits(
    State(app): State<AppState>,
    ApiPath(project_id): ApiPath<String>,
    request: Request,
) -> Response {
    let limit = app.max_body_bytes;
    let shared = app.clone();
    managed(app, request, |store, _, caller, request| async move {
        let (project, access) = load_project(store.as_ref(), &caller, &project_id).await?;
        require_manage(access, "the request limits")?;
        let body: serde_json::Value = json_body(request, limit).await?;
        let limits = RequestLimits::from_json(&body)?;
        let stored = serde_json::to_value(&limits)
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("the limits cannot be stored: {e}")))?;
        store_settings(&shared, store.as_ref(), &project, SettingsKind::RequestLimits, &stored).await?;
        Ok((StatusCode::OK, limits))
    })
    .await
}

// --- API keys -----------------------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateKey {
    #[serde(default)]
    name: String,
    /// Defaults to the caller's project.
    #[serde(default)]
    project_id: Option<String>,
    /// The user the key acts for (defaults to the caller's user; `null` with `service: true`).
    #[serde(default)]
    user_id: Option<String>,
    /// A service key belongs to no user.
    #[serde(default)]
    service: bool,
    /// Defaults to the caller's role; never above it.
    #[serde(default)]
    #[schema(value_type = Option<crate::tenancy::RoleName>)]
    role: Option<String>,
    #[serde(default)]
    scopes: KeyScopes,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3650)]
    expires_in_days: Option<i64>,
}

/// A new key: shown once.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CreatedKey {
    #[serde(flatten)]
    key: ApiKey,
    /// The secret. It is not stored and cannot be shown again.
    secret: String,
}

/// What `createKey` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const CREATE_KEY_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound, ErrorCode::PayloadTooLarge];

/// `POST /v1/keys`.
#[utoipa::path(
    post,
    path = "/v1/keys",
    operation_id = "createKey",
    tag = "keys",
    summary = "Create an API key",
    description = "The secret is in this answer only. Admins for any member of the project, developers for themselves; never a role above the caller's.",
    request_body = CreateKey,
    responses((status = 201, description = "The key and its secret", body = CreatedKey))
)]
pub async fn create_key(State(app): State<AppState>, request: Request) -> Response {
    let limit = app.max_body_bytes;
    managed(app, request, |store, _, caller, request| async move {
        let body: CreateKey = json_body(request, limit).await?;
        let project_id = body.project_id.clone().unwrap_or_else(|| caller.principal.project_id.clone());
        let (project, access) = load_project(store.as_ref(), &caller, &project_id).await?;
        let role = match &body.role {
            Some(role) => parse_role(role)?,
            None => caller.role(),
        };
        if !caller.platform_admin && role > caller.role() {
            return Err(forbidden("a key cannot carry a role above your own"));
        }
        let user_id = match (body.service, body.user_id.clone()) {
            (true, Some(_)) => {
                return Err(ApiError::new(ErrorCode::InvalidRequest, "a service key has no user_id"));
            }
            (true, None) => None,
            (false, Some(user)) => Some(user),
            // The bootstrap key has no user row: its keys are service keys unless a user is named.
            (false, None) if caller.platform_admin => None,
            (false, None) => Some(caller.principal.user_id.clone()).filter(|u| !u.is_empty()),
        };
        let own_user = user_id.as_deref() == Some(caller.principal.user_id.as_str());
        match access {
            Access::Manage => {}
            Access::OwnKeys if own_user => {}
            _ => return Err(forbidden("creating this key needs the admin role in the project")),
        }
        if let Some(user) = &user_id
            && !own_user
        {
            let found = store.get_user(user).await?.filter(|u| u.org_id == project.org_id);
            found.ok_or_else(|| not_found(&format!("user {user}")))?;
        }
        check_optional("name", &body.name)?;
        body.scopes.validate()?;
        let scopes = scopes_within(&caller, body.scopes)?;
        let expires_at = match body.expires_in_days {
            Some(days) if !(1..=MAX_KEY_DAYS).contains(&days) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("expires_in_days must be between 1 and {MAX_KEY_DAYS}"),
                ));
            }
            Some(days) => Some(Utc::now() + TimeDelta::days(days)),
            None => None,
        };
        let expires_at = expiry_within(&caller, expires_at, body.expires_in_days.is_some())?;
        let (key, secret) = issue_key(
            store.as_ref(),
            NewKey {
                org_id: project.org_id,
                project_id: project.id,
                user_id,
                name: body.name.trim().to_owned(),
                role,
                scopes,
                expires_at,
            },
        )
        .await?;
        Ok((StatusCode::CREATED, CreatedKey { key, secret }))
    })
    .await
}

fn check_optional(name: &str, value: &str) -> Result<(), TenancyError> {
    if value.is_empty() { Ok(()) } else { check_field(name, value) }
}

/// Everything a key is created with but its id and secret.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub org_id: String,
    pub project_id: String,
    pub user_id: Option<String>,
    pub name: String,
    pub role: Role,
    pub scopes: KeyScopes,
    pub expires_at: Option<DateTime<Utc>>,
}

impl NewKey {
    /// The attributes of `key`, for its replacement when it is rotated.
    pub fn like(key: &ApiKey) -> Self {
        Self {
            org_id: key.org_id.clone(),
            project_id: key.project_id.clone(),
            user_id: key.user_id.clone(),
            name: key.name.clone(),
            role: key.role,
            scopes: key.scopes.clone(),
            expires_at: key.expires_at,
        }
    }
}

/// Stores a new key and returns it with its secret (the only time the secret exists).
pub async fn issue_key(store: &dyn TenancyStore, new: NewKey) -> Result<(ApiKey, String), TenancyError> {
    let secret = new_secret();
    let key = ApiKey {
        id: new_id("key"),
        prefix: secret_prefix(&secret),
        org_id: new.org_id,
        project_id: new.project_id,
        user_id: new.user_id,
        name: new.name,
        role: new.role,
        scopes: new.scopes,
        expires_at: new.expires_at,
        revoked_at: None,
        created_at: Utc::now(),
    };
    store.insert_key(&key, &digest(&secret)).await?;
    Ok((key, secret))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct KeyFilter {
    /// The project (default: the caller's).
    project_id: Option<String>,
}

/// What `listKeys` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const LIST_KEYS_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound];

/// `GET /v1/keys`: the keys of a project the caller may see (prefixes only, never secrets).
#[utoipa::path(
    get,
    path = "/v1/keys",
    operation_id = "listKeys",
    tag = "keys",
    summary = "List a project's API keys",
    description = "Prefixes only, never secrets. Developers see their own keys.",
    params(KeyFilter),
    responses((status = 200, description = "The keys", body = List<ApiKey>))
)]
pub async fn list_keys(State(app): State<AppState>, query: ApiQuery<KeyFilter>, request: Request) -> Response {
    managed(app, request, |store, _, caller, _| async move {
        let project_id = query.0.project_id.unwrap_or_else(|| caller.principal.project_id.clone());
        let (_, access) = load_project(store.as_ref(), &caller, &project_id).await?;
        let keys = store.list_keys(&project_id).await?;
        let keys = match access {
            Access::Manage => keys,
            Access::OwnKeys => {
                keys.into_iter().filter(|k| k.user_id.as_deref() == Some(caller.principal.user_id.as_str())).collect()
            }
            Access::Read => return Err(forbidden("listing keys needs the developer role or above")),
        };
        Ok(list(keys))
    })
    .await
}

/// What `getKey` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const GET_KEY_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound];

/// `GET /v1/keys/{id}`.
#[utoipa::path(
    get,
    path = "/v1/keys/{id}",
    operation_id = "getKey",
    tag = "keys",
    summary = "An API key",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 200, description = "The key (without its secret)", body = ApiKey))
)]
pub async fn get_key(State(app): State<AppState>, ApiPath(id): ApiPath<String>, request: Request) -> Response {
    managed(app, request, |store, _, caller, _| async move {
        let (key, _) = load_key(store.as_ref(), &caller, &id).await?;
        Ok((StatusCode::OK, key))
    })
    .await
}

/// What `revokeKey` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const REVOKE_KEY_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound];

/// `DELETE /v1/keys/{id}`: revokes the key on every replica.
#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    operation_id = "revokeKey",
    tag = "keys",
    summary = "Revoke an API key",
    description = "Takes effect on every replica within a second.",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 200, description = "The revoked key", body = ApiKey))
)]
pub async fn revoke_key(State(app): State<AppState>, ApiPath(id): ApiPath<String>, request: Request) -> Response {
    let invalidator = app.invalidator.clone();
    managed(app, request, |store, auth, caller, _| async move {
        let (key, _) = load_key(store.as_ref(), &caller, &id).await?;
        require_rank(&caller, key.role, "this key")?;
        let revoked =
            store.revoke_key(&key.id, Utc::now()).await?.ok_or_else(|| not_found(&format!("API key {id}")))?;
        auth.invalidate(&key.id);
        invalidator.publish_key(&key.id).await;
        Ok((StatusCode::OK, revoked))
    })
    .await
}

/// What `rotateKey` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const ROTATE_KEY_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound, ErrorCode::Conflict];

/// `POST /v1/keys/{id}/rotate`: a new secret with the same attributes; the old key is revoked.
#[utoipa::path(
    post,
    path = "/v1/keys/{id}/rotate",
    operation_id = "rotateKey",
    tag = "keys",
    summary = "Rotate an API key",
    description = "A new secret with the same attributes; the old key is revoked (409 when it already is, or expired).",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 201, description = "The new key and its secret", body = CreatedKey))
)]
pub async fn rotate_key(State(app): State<AppState>, ApiPath(id): ApiPath<String>, request: Request) -> Response {
    let invalidator = app.invalidator.clone();
    managed(app, request, |store, auth, caller, _| async move {
        let (old, _) = load_key(store.as_ref(), &caller, &id).await?;
        require_rank(&caller, old.role, "this key")?;
        if !old.is_active(Utc::now()) {
            return Err(ApiError::new(ErrorCode::Conflict, format!("API key {id} is revoked or expired")));
        }
        let mut new = NewKey::like(&old);
        new.scopes = scopes_within(&caller, new.scopes)?;
        new.expires_at = expiry_within(&caller, new.expires_at, false)?;
        let (key, secret) = issue_key(store.as_ref(), new).await?;
        store.revoke_key(&old.id, Utc::now()).await?;
        auth.invalidate(&old.id);
        invalidator.publish_key(&old.id).await;
        Ok((StatusCode::CREATED, CreatedKey { key, secret }))
    })
    .await
}
