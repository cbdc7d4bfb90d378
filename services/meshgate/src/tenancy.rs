//! `meshgate orgs|projects|users|keys`: tenancy administration straight against the database
//! (`DATABASE_URL`), for bootstrapping and for operators without an admin key at hand. Output is
//! JSON; a revocation is also published to the gateways when `REDIS_URL` is set.

use std::sync::Arc;

use chrono::{Duration as TimeDelta, Utc};
use clap::Subcommand;
use meshgate_gateway::admin::{NewKey, issue_key};
use meshgate_gateway::invalidation::Invalidator;
use meshgate_gateway::tenancy::{KeyScopes, PostgresTenancy, TenancyStore, check_field, new_id, parse_role};
use serde::Serialize;

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an organization.
    Create {
        name: String,
        #[arg(long)]
        id: Option<String>,
    },
    /// List organizations.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Create a project in an organization.
    Create {
        name: String,
        #[arg(long)]
        org: String,
    },
    /// List an organization's projects.
    List {
        #[arg(long)]
        org: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user in an organization.
    Create {
        email: String,
        #[arg(long)]
        org: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List an organization's users.
    List {
        #[arg(long)]
        org: String,
    },
    /// Give a user a role in a project (viewer, developer, admin, owner).
    Grant { user: String, project: String, role: String },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key; the secret is printed once.
    Create {
        #[arg(long)]
        project: String,
        /// The user the key acts for (none: a service key).
        #[arg(long)]
        user: Option<String>,
        #[arg(long, default_value = "developer")]
        role: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        expires_in_days: Option<i64>,
    },
    /// List a project's keys (prefixes only).
    List {
        #[arg(long)]
        project: String,
    },
    /// Revoke a key on every gateway.
    Revoke { id: String },
    /// Replace a key's secret; the old one is revoked.
    Rotate { id: String },
}

struct Store {
    tenancy: Arc<dyn TenancyStore>,
    invalidator: Invalidator,
}

async fn store() -> Result<Store, String> {
    let url = meshgate_storage::url_from_env("DATABASE_URL").ok_or("DATABASE_URL is not set")?;
    crate::commands::migrate_all(&url).await?;
    let pool = meshgate_storage::postgres_pool(&url, &meshgate_storage::PostgresConfig::default())
        .map_err(|e| e.to_string())?;
    let redis = meshgate_storage::url_from_env("REDIS_URL")
        .map(|url| meshgate_storage::redis_connection(&url, &meshgate_storage::RedisConfig::default()))
        .transpose()
        .map_err(|e| e.to_string())?;
    Ok(Store { tenancy: Arc::new(PostgresTenancy::new(pool)), invalidator: Invalidator::new(redis) })
}

fn print<T: Serialize>(value: &T) -> Result<(), String> {
    println!("{}", serde_json::to_string_pretty(value).map_err(|e| e.to_string())?);
    Ok(())
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

pub async fn orgs(command: OrgCommand) -> Result<(), String> {
    let store = store().await?;
    match command {
        OrgCommand::Create { name, id } => {
            check_field("name", &name).map_err(text)?;
            let id = id.unwrap_or_else(|| new_id("org"));
            check_field("id", &id).map_err(text)?;
            print(&store.tenancy.create_org(&id, &name).await.map_err(text)?)
        }
        OrgCommand::List => print(&store.tenancy.list_orgs().await.map_err(text)?),
    }
}

pub async fn projects(command: ProjectCommand) -> Result<(), String> {
    let store = store().await?;
    match command {
        ProjectCommand::Create { name, org } => {
            check_field("name", &name).map_err(text)?;
            print(&store.tenancy.create_project(&new_id("prj"), &org, &name).await.map_err(text)?)
        }
        ProjectCommand::List { org } => print(&store.tenancy.list_projects(&org).await.map_err(text)?),
    }
}

pub async fn users(command: UserCommand) -> Result<(), String> {
    let store = store().await?;
    match command {
        UserCommand::Create { email, org, name } => {
            check_field("email", &email).map_err(text)?;
            if !email.contains('@') {
                return Err("email must contain '@'".into());
            }
            print(&store.tenancy.create_user(&new_id("usr"), &org, &email, &name).await.map_err(text)?)
        }
        UserCommand::List { org } => print(&store.tenancy.list_users(&org).await.map_err(text)?),
        UserCommand::Grant { user, project, role } => {
            let role = parse_role(&role).map_err(text)?;
            store.tenancy.set_role(&user, &project, Some(role)).await.map_err(text)?;
            print(
                &serde_json::json!({"user_id": user, "project_id": project, "role": meshgate_gateway::tenancy::role_name(role)}),
            )
        }
    }
}

pub async fn keys(command: KeyCommand) -> Result<(), String> {
    let store = store().await?;
    match command {
        KeyCommand::Create { project, user, role, name, expires_in_days } => {
            let role = parse_role(&role).map_err(text)?;
            let project = store
                .tenancy
                .get_project(&project)
                .await
                .map_err(text)?
                .ok_or_else(|| format!("project {project} not found"))?;
            if let Some(days) = expires_in_days
                && !(1..=3650).contains(&days)
            {
                return Err("--expires-in-days must be between 1 and 3650".into());
            }
            let new = NewKey {
                org_id: project.org_id,
                project_id: project.id,
                user_id: user,
                name,
                role,
                scopes: KeyScopes::default(),
                expires_at: expires_in_days.map(|days| Utc::now() + TimeDelta::days(days)),
            };
            let (key, secret) = issue_key(store.tenancy.as_ref(), new).await.map_err(text)?;
            print(&serde_json::json!({"key": key, "secret": secret}))
        }
        KeyCommand::List { project } => print(&store.tenancy.list_keys(&project).await.map_err(text)?),
        KeyCommand::Revoke { id } => {
            let key = store.tenancy.revoke_key(&id, Utc::now()).await.map_err(text)?;
            let key = key.ok_or_else(|| format!("API key {id} not found"))?;
            store.invalidator.publish_key(&id).await;
            print(&key)
        }
        KeyCommand::Rotate { id } => {
            let old =
                store.tenancy.get_key(&id).await.map_err(text)?.ok_or_else(|| format!("API key {id} not found"))?;
            if !old.is_active(Utc::now()) {
                return Err(format!("API key {id} is revoked or expired"));
            }
            let (key, secret) = issue_key(store.tenancy.as_ref(), NewKey::like(&old)).await.map_err(text)?;
            store.tenancy.revoke_key(&id, Utc::now()).await.map_err(text)?;
            store.invalidator.publish_key(&id).await;
            print(&serde_json::json!({"key": key, "secret": secret}))
        }
    }
}
