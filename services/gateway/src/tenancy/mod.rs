//! Tenancy: organizations own projects and users, users hold a role per project, and API keys
//! belong to a project (usually on behalf of a user). Postgres in the mesh; process memory in a
//! standalone gateway without a database (nothing survives a restart there, which `meshgate up`
//! says when it starts).

mod memory;
mod postgres;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use meshgate_proto::common::v1::Role;
use meshgate_runtime::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use self::memory::MemoryTenancy;
pub use self::postgres::PostgresTenancy;

/// Organization and project of the bootstrap owner key; created by the first migration.
pub const DEFAULT_TENANT: &str = "default";

/// Longest id, name or email accepted.
pub const MAX_FIELD_LEN: usize = 256;

/// Errors of the tenancy store.
#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Storage(#[from] meshgate_storage::Error),
}

impl TenancyError {
    pub fn code(&self) -> ErrorCode {
        match self {
            TenancyError::Invalid(_) => ErrorCode::InvalidRequest,
            TenancyError::NotFound(_) => ErrorCode::NotFound,
            TenancyError::Conflict(_) => ErrorCode::Conflict,
            TenancyError::Storage(e) => e.code(),
        }
    }
}

impl From<TenancyError> for ApiError {
    fn from(e: TenancyError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

impl From<tokio_postgres::Error> for TenancyError {
    fn from(e: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            return TenancyError::Conflict("an object with that name already exists".into());
        }
        // Text (22021) and JSONB (22P05) cannot hold a NUL character: the client sent one.
        if e.code() == Some(&SqlState::CHARACTER_NOT_IN_REPERTOIRE)
            || e.code() == Some(&SqlState::UNTRANSLATABLE_CHARACTER)
        {
            return TenancyError::Invalid("text must not contain the NUL character (\\u0000)".into());
        }
        TenancyError::Storage(e.into())
    }
}

/// The name of a role in the database and on the wire.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Viewer => "viewer",
        Role::Developer => "developer",
        Role::Admin => "admin",
        Role::Owner => "owner",
        Role::Unspecified => "unspecified",
    }
}

pub fn parse_role(name: &str) -> Result<Role, TenancyError> {
    match name {
        "viewer" => Ok(Role::Viewer),
        "developer" => Ok(Role::Developer),
        "admin" => Ok(Role::Admin),
        "owner" => Ok(Role::Owner),
        other => Err(TenancyError::Invalid(format!("role {other:?} is not one of viewer, developer, admin, owner"))),
    }
}

/// Endpoint groups a key may be limited to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EndpointScope {
    /// Chat completions (HTTP and gRPC).
    Chat,
    Embeddings,
    Models,
    Jobs,
    /// Uploads of an edge meshgate's traffic (`POST /v1/sync/batches`).
    EdgeSync,
    Quota,
    Analytics,
    /// Tenancy and key management.
    Admin,
}

/// What a key may be used for; an empty list allows everything of its kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct KeyScopes {
    pub endpoints: Vec<EndpointScope>,
    pub models: Vec<String>,
}

impl KeyScopes {
    pub fn allows_endpoint(&self, endpoint: EndpointScope) -> bool {
        self.endpoints.is_empty() || self.endpoints.contains(&endpoint)
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    /// These scopes as a key created by a holder of `creator` may carry: what is left open
    /// (empty) takes the creator's list, and nothing may reach beyond it. The offending entry
    /// otherwise.
    pub fn within(mut self, creator: &KeyScopes) -> Result<KeyScopes, String> {
        if !creator.endpoints.is_empty() {
            if self.endpoints.is_empty() {
                self.endpoints = creator.endpoints.clone();
            } else if let Some(endpoint) = self.endpoints.iter().find(|e| !creator.endpoints.contains(e)) {
                return Err(format!("scopes.endpoints: {endpoint:?} is beyond your own key's scopes"));
            }
        }
        if !creator.models.is_empty() {
            if self.models.is_empty() {
                self.models = creator.models.clone();
            } else if let Some(model) = self.models.iter().find(|m| !creator.models.contains(m)) {
                return Err(format!("scopes.models: {model:?} is beyond your own key's scopes"));
            }
        }
        Ok(self)
    }

    pub fn validate(&self) -> Result<(), TenancyError> {
        if self.models.len() > 256 {
            return Err(TenancyError::Invalid("scopes.models lists more than 256 models".into()));
        }
        for model in &self.models {
            check_field("scopes.models[]", model)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Org {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Project {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct User {
    pub id: String,
    pub org_id: String,
    pub email: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// An API key as stored: everything but its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ApiKey {
    pub id: String,
    /// The first characters of the secret.
    pub prefix: String,
    pub org_id: String,
    pub project_id: String,
    pub user_id: Option<String>,
    pub name: String,
    #[serde(serialize_with = "serialize_role")]
    #[schema(value_type = RoleName)]
    pub role: Role,
    pub scopes: KeyScopes,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// A role in a project, lowest first.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // a schema only: roles travel as strings (see `role_name`, `parse_role`)
pub enum RoleName {
    Viewer,
    Developer,
    Admin,
    Owner,
}

fn serialize_role<S: serde::Serializer>(role: &Role, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(role_name(*role))
}

impl ApiKey {
    /// Whether the key authenticates at `now`.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| at > now)
    }
}

/// A key found by its secret, with the current role of its user in the key's project.
#[derive(Debug, Clone)]
pub struct KeyLookup {
    pub key: ApiKey,
    /// `None` for a service key (no user) or a user who lost every role in the project.
    pub user_role: Option<Role>,
}

/// A project's stored settings documents (JSON objects; `{}` means every default). They are
/// validated by the gateway before they are stored, and again when they are read.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectSettingsDoc {
    /// The security policy (`meshgate_policy::PolicyConfig`).
    pub security_policy: serde_json::Value,
    /// The request limits (the settings module's `RequestLimits`).
    pub request_limits: serde_json::Value,
}

impl ProjectSettingsDoc {
    /// The defaults: two empty objects.
    pub fn empty() -> Self {
        Self { security_policy: serde_json::json!({}), request_limits: serde_json::json!({}) }
    }
}

/// Which settings document to replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingsKind {
    SecurityPolicy,
    RequestLimits,
}

/// Storage of organizations, projects, users, roles and keys.
#[async_trait]
pub trait TenancyStore: Send + Sync {
    async fn create_org(&self, id: &str, name: &str) -> Result<Org, TenancyError>;
    async fn list_orgs(&self) -> Result<Vec<Org>, TenancyError>;
    async fn get_org(&self, id: &str) -> Result<Option<Org>, TenancyError>;
    async fn create_project(&self, id: &str, org_id: &str, name: &str) -> Result<Project, TenancyError>;
    async fn list_projects(&self, org_id: &str) -> Result<Vec<Project>, TenancyError>;
    async fn get_project(&self, id: &str) -> Result<Option<Project>, TenancyError>;
    async fn create_user(&self, id: &str, org_id: &str, email: &str, name: &str) -> Result<User, TenancyError>;
    async fn list_users(&self, org_id: &str) -> Result<Vec<User>, TenancyError>;
    async fn get_user(&self, id: &str) -> Result<Option<User>, TenancyError>;
    /// Grants `role` to the user in the project, or removes the user's role with `None`.
    async fn set_role(&self, user_id: &str, project_id: &str, role: Option<Role>) -> Result<(), TenancyError>;
    /// The user's role in each project it is a member of, by project id.
    async fn user_roles(&self, user_id: &str) -> Result<Vec<(String, Role)>, TenancyError>;
    async fn insert_key(&self, key: &ApiKey, secret_hash: &[u8; 32]) -> Result<(), TenancyError>;
    async fn key_by_hash(&self, secret_hash: &[u8; 32]) -> Result<Option<KeyLookup>, TenancyError>;
    async fn get_key(&self, id: &str) -> Result<Option<ApiKey>, TenancyError>;
    /// Keys of a project, newest first.
    async fn list_keys(&self, project_id: &str) -> Result<Vec<ApiKey>, TenancyError>;
    /// Marks the key revoked at `at` (once; a second revoke keeps the first time).
    async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<Option<ApiKey>, TenancyError>;
    /// A project's security policy and request limits; `None` when the project does not exist.
    async fn project_settings(&self, project_id: &str) -> Result<Option<ProjectSettingsDoc>, TenancyError>;
    /// Replaces one of a project's settings documents (NotFound when the project does not exist).
    async fn set_project_settings(
        &self,
        project_id: &str,
        kind: SettingsKind,
        document: &serde_json::Value,
    ) -> Result<(), TenancyError>;
    /// Whether an edge's batch `batch_id` has been applied to the project
    /// (`POST /v1/sync/batches`).
    async fn edge_batch_applied(&self, project_id: &str, batch_id: &str) -> Result<bool, TenancyError>;
    /// Records an edge's batch as applied (a second record of the same id changes nothing).
    async fn record_edge_batch(
        &self,
        project_id: &str,
        batch_id: &str,
        traces: i64,
        at: DateTime<Utc>,
    ) -> Result<(), TenancyError>;
}

/// Refuses empty, over-long or control-character values, naming the field.
pub fn check_field(name: &str, value: &str) -> Result<(), TenancyError> {
    if value.trim().is_empty() {
        return Err(TenancyError::Invalid(format!("{name} is empty")));
    }
    if value.len() > MAX_FIELD_LEN {
        return Err(TenancyError::Invalid(format!("{name} is longer than {MAX_FIELD_LEN} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(TenancyError::Invalid(format!("{name} contains control characters")));
    }
    Ok(())
}

/// A fresh id with a readable kind prefix, e.g. `prj_0190…`.
pub fn new_id(kind: &str) -> String {
    format!("{kind}_{}", uuid::Uuid::now_v7().simple())
}

/// The stores a unit test runs on: a standalone gateway's memory, and Postgres (a schema of its
/// own, the gateway's migrations applied), so both behave as the test says.
#[cfg(test)]
pub(crate) async fn test_backends() -> [(&'static str, std::sync::Arc<dyn TenancyStore>); 2] {
    let url = meshgate_test_support::isolated_database_url("gatewaytest").await;
    let pool = meshgate_storage::postgres_pool(&url, &meshgate_storage::PostgresConfig::default()).expect("a pool");
    meshgate_storage::migrate(&pool, crate::COMPONENT, crate::migrations()).await.expect("migrated");
    [
        ("memory", std::sync::Arc::new(MemoryTenancy::default())),
        ("postgres", std::sync::Arc::new(PostgresTenancy::new(pool))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_scopes_stay_within_its_creators() {
        let creator =
            KeyScopes { endpoints: vec![EndpointScope::Chat, EndpointScope::Admin], models: vec!["m1".into()] };
        let open = KeyScopes::default().within(&creator).unwrap();
        assert_eq!(open, creator, "what is left open takes the creator's lists");
        let narrower = KeyScopes { endpoints: vec![EndpointScope::Chat], models: vec![] };
        assert_eq!(
            narrower.within(&creator).unwrap(),
            KeyScopes { endpoints: vec![EndpointScope::Chat], models: vec!["m1".into()] }
        );
        let wider = KeyScopes { endpoints: vec![EndpointScope::Quota], models: vec![] };
        assert!(wider.within(&creator).unwrap_err().contains("Quota"));
        let other_model = KeyScopes { endpoints: vec![], models: vec!["m2".into()] };
        assert!(other_model.within(&creator).unwrap_err().contains("m2"));
        let anything = KeyScopes { endpoints: vec![EndpointScope::Quota], models: vec!["m9".into()] };
        assert_eq!(anything.clone().within(&KeyScopes::default()).unwrap(), anything);
    }
}
