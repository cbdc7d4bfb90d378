//! Tenancy in Postgres (`organizations`, `projects`, `users`, `user_roles`, `api_keys`).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use meshgate_proto::common::v1::Role;
use meshgate_storage::{PgPool, postgres_client};
use tokio_postgres::Row;

use super::{
    ApiKey, KeyLookup, Org, Project, ProjectSettingsDoc, SettingsKind, TenancyError, TenancyStore, User, parse_role,
    role_name,
};

/// The tenancy tables.
pub struct PostgresTenancy {
    pool: PgPool,
}

impl PostgresTenancy {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    async fn client(&self) -> Result<meshgate_storage::PgClient, TenancyError> {
        Ok(postgres_client(&self.pool).await?)
    }
}

const KEY_COLUMNS: &str = "k.id, k.prefix, k.org_id, k.project_id, k.user_id, k.name, k.role, k.scopes, k.expires_at, \
                           k.revoked_at, k.created_at";

fn org(row: &Row) -> Org {
    Org { id: row.get(0), name: row.get(1), created_at: row.get(2) }
}

fn project(row: &Row) -> Project {
    Project { id: row.get(0), org_id: row.get(1), name: row.get(2), created_at: row.get(3) }
}

fn user(row: &Row) -> User {
    User { id: row.get(0), org_id: row.get(1), email: row.get(2), name: row.get(3), created_at: row.get(4) }
}

fn key(row: &Row) -> Result<ApiKey, TenancyError> {
    let role: String = row.get(6);
    let scopes: serde_json::Value = row.get(7);
    Ok(ApiKey {
        id: row.get(0),
        prefix: row.get(1),
        org_id: row.get(2),
        project_id: row.get(3),
        user_id: row.get(4),
        name: row.get(5),
        role: parse_role(&role)?,
        scopes: serde_json::from_value(scopes)
            .map_err(|e| TenancyError::Invalid(format!("stored scopes of a key are unreadable: {e}")))?,
        expires_at: row.get(8),
        revoked_at: row.get(9),
        created_at: row.get(10),
    })
}

/// A foreign key that points nowhere is the caller naming something that does not exist.
fn missing_reference(e: tokio_postgres::Error, what: &str) -> TenancyError {
    if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) {
        TenancyError::NotFound(what.to_owned())
    } else {
        e.into()
    }
}

#[async_trait]
impl TenancyStore for PostgresTenancy {
    async fn create_org(&self, id: &str, name: &str) -> Result<Org, TenancyError> {
        let row = self
            .client()
            .await?
            .query_one(
                "INSERT INTO organizations (id, name) VALUES ($1, $2) RETURNING id, name, created_at",
                &[&id, &name],
            )
            .await?;
        Ok(org(&row))
    }

    async fn list_orgs(&self) -> Result<Vec<Org>, TenancyError> {
        let rows = self
            .client()
            .await?
            .query("SELECT id, name, created_at FROM organizations ORDER BY created_at DESC", &[])
            .await?;
        Ok(rows.iter().map(org).collect())
    }

    async fn get_org(&self, id: &str) -> Result<Option<Org>, TenancyError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT id, name, created_at FROM organizations WHERE id = $1", &[&id])
            .await?;
        Ok(row.as_ref().map(org))
    }

    async fn create_project(&self, id: &str, org_id: &str, name: &str) -> Result<Project, TenancyError> {
        let row = self
            .client()
            .await?
            .query_one(
                "INSERT INTO projects (id, org_id, name) VALUES ($1, $2, $3) RETURNING id, org_id, name, created_at",
                &[&id, &org_id, &name],
            )
            .await
            .map_err(|e| missing_reference(e, &format!("organization {org_id}")))?;
        Ok(project(&row))
    }

    async fn list_projects(&self, org_id: &str) -> Result<Vec<Project>, TenancyError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, org_id, name, created_at FROM projects WHERE org_id = $1 ORDER BY created_at DESC",
                &[&org_id],
            )
            .await?;
        Ok(rows.iter().map(project).collect())
    }

    async fn get_project(&self, id: &str) -> Result<Option<Project>, TenancyError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT id, org_id, name, created_at FROM projects WHERE id = $1", &[&id])
            .await?;
        Ok(row.as_ref().map(project))
    }

    async fn create_user(&self, id: &str, org_id: &str, email: &str, name: &str) -> Result<User, TenancyError> {
        let row = self
            .client()
            .await?
            .query_one(
                "INSERT INTO users (id, org_id, email, name) VALUES ($1, $2, $3, $4) \
                 RETURNING id, org_id, email, name, created_at",
                &[&id, &org_id, &email, &name],
            )
            .await
            .map_err(|e| missing_reference(e, &format!("organization {org_id}")))?;
        Ok(user(&row))
    }

    async fn list_users(&self, org_id: &str) -> Result<Vec<User>, TenancyError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, org_id, email, name, created_at FROM users WHERE org_id = $1 ORDER BY created_at DESC",
                &[&org_id],
            )
            .await?;
        Ok(rows.iter().map(user).collect())
    }

    async fn get_user(&self, id: &str) -> Result<Option<User>, TenancyError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT id, org_id, email, name, created_at FROM users WHERE id = $1", &[&id])
            .await?;
        Ok(row.as_ref().map(user))
    }

    async fn set_role(&self, user_id: &str, project_id: &str, role: Option<Role>) -> Result<(), TenancyError> {
        let client = self.client().await?;
        match role {
            Some(role) => {
                client
                    .execute(
                        "INSERT INTO user_roles (user_id, project_id, role) VALUES ($1, $2, $3) \
                         ON CONFLICT (user_id, project_id) DO UPDATE SET role = EXCLUDED.role, granted_at = now()",
                        &[&user_id, &project_id, &role_name(role)],
                    )
                    .await
                    .map_err(|e| missing_reference(e, &format!("user {user_id} or project {project_id}")))?;
            }
            None => {
                client
                    .execute("DELETE FROM user_roles WHERE user_id = $1 AND project_id = $2", &[&user_id, &project_id])
                    .await?;
            }
        }
        Ok(())
    }

    async fn user_roles(&self, user_id: &str) -> Result<Vec<(String, Role)>, TenancyError> {
        let rows = self
            .client()
            .await?
            .query("SELECT project_id, role FROM user_roles WHERE user_id = $1 ORDER BY project_id", &[&user_id])
            .await?;
        rows.iter()
            .map(|row| {
                let role: String = row.get(1);
                Ok((row.get(0), parse_role(&role)?))
            })
            .collect()
    }

    async fn insert_key(&self, key: &ApiKey, secret_hash: &[u8; 32]) -> Result<(), TenancyError> {
        let scopes = serde_json::to_value(&key.scopes)
            .map_err(|e| TenancyError::Invalid(format!("scopes cannot be stored: {e}")))?;
        let hash: &[u8] = secret_hash;
        self.client()
            .await?
            .execute(
                "INSERT INTO api_keys (id, secret_hash, prefix, org_id, project_id, user_id, name, role, scopes, \
                                       expires_at, created_at) \
                 SELECT $1, $2, $3, p.org_id, p.id, $6, $7, $8, $9, $10, $11 FROM projects p \
                 WHERE p.id = $5 AND p.org_id = $4",
                &[
                    &key.id,
                    &hash,
                    &key.prefix,
                    &key.org_id,
                    &key.project_id,
                    &key.user_id,
                    &key.name,
                    &role_name(key.role),
                    &scopes,
                    &key.expires_at,
                    &key.created_at,
                ],
            )
            .await
            .map_err(|e| missing_reference(e, "the key's user"))
            .and_then(|inserted| {
                if inserted == 1 { Ok(()) } else { Err(TenancyError::NotFound(format!("project {}", key.project_id))) }
            })
    }

    async fn key_by_hash(&self, secret_hash: &[u8; 32]) -> Result<Option<KeyLookup>, TenancyError> {
        let hash: &[u8] = secret_hash;
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT {KEY_COLUMNS}, r.role FROM api_keys k \
                     LEFT JOIN user_roles r ON r.user_id = k.user_id AND r.project_id = k.project_id \
                     WHERE k.secret_hash = $1"
                ),
                &[&hash],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let user_role: Option<String> = row.get(11);
        Ok(Some(KeyLookup { key: key(&row)?, user_role: user_role.as_deref().map(parse_role).transpose()? }))
    }

    async fn get_key(&self, id: &str) -> Result<Option<ApiKey>, TenancyError> {
        let row = self
            .client()
            .await?
            .query_opt(&format!("SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.id = $1"), &[&id])
            .await?;
        row.as_ref().map(key).transpose()
    }

    async fn list_keys(&self, project_id: &str) -> Result<Vec<ApiKey>, TenancyError> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.project_id = $1 ORDER BY k.created_at DESC"),
                &[&project_id],
            )
            .await?;
        rows.iter().map(key).collect()
    }

    async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<Option<ApiKey>, TenancyError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "UPDATE api_keys k SET revoked_at = COALESCE(k.revoked_at, $2) WHERE k.id = $1 \
                     RETURNING {KEY_COLUMNS}"
                ),
                &[&id, &at],
            )
            .await?;
        row.as_ref().map(key).transpose()
    }

    async fn project_settings(&self, project_id: &str) -> Result<Option<ProjectSettingsDoc>, TenancyError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT security_policy, request_limits FROM projects WHERE id = $1", &[&project_id])
            .await;
        match row {
            Ok(row) => {
                Ok(row.map(|row| ProjectSettingsDoc { security_policy: row.get(0), request_limits: row.get(1) }))
            }
            // Requests can arrive before this replica has applied its migrations (it does so once
            // Postgres answers): until the columns exist no project can have changed its settings,
            // so the defaults are exactly what is stored.
            Err(e)
                if matches!(
                    e.code(),
                    Some(
                        &tokio_postgres::error::SqlState::UNDEFINED_COLUMN
                            | &tokio_postgres::error::SqlState::UNDEFINED_TABLE
                    )
                ) =>
            {
                Ok(Some(ProjectSettingsDoc::empty()))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn set_project_settings(
        &self,
        project_id: &str,
        kind: SettingsKind,
        document: &serde_json::Value,
    ) -> Result<(), TenancyError> {
        // The column name comes from this match, never from input.
        let column = match kind {
            SettingsKind::SecurityPolicy => "security_policy",
            SettingsKind::RequestLimits => "request_limits",
        };
        let updated = self
            .client()
            .await?
            .execute(&format!("UPDATE projects SET {column} = $2 WHERE id = $1"), &[&project_id, document])
            .await?;
        if updated == 1 { Ok(()) } else { Err(TenancyError::NotFound(format!("project {project_id}"))) }
    }

    async fn edge_batch_applied(&self, project_id: &str, batch_id: &str) -> Result<bool, TenancyError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT 1 FROM edge_batches WHERE project_id = $1 AND batch_id = $2", &[&project_id, &batch_id])
            .await?;
        Ok(row.is_some())
    }

    async fn record_edge_batch(
        &self,
        project_id: &str,
        batch_id: &str,
        traces: i64,
        at: DateTime<Utc>,
    ) -> Result<(), TenancyError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO edge_batches (project_id, batch_id, traces, applied_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (project_id, batch_id) DO NOTHING",
                &[&project_id, &batch_id, &traces, &at],
            )
            .await?;
        Ok(())
    }
}
