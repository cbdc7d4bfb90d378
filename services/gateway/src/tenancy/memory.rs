//! Tenancy in process memory, with the same rules as the Postgres store (unique names per org,
//! references that must exist), for a standalone gateway without a database.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use meshgate_proto::common::v1::Role;
use parking_lot::Mutex;

use super::{
    ApiKey, DEFAULT_TENANT, KeyLookup, Org, Project, ProjectSettingsDoc, SettingsKind, TenancyError, TenancyStore, User,
};

#[derive(Default)]
struct State {
    orgs: HashMap<String, Org>,
    projects: HashMap<String, Project>,
    users: HashMap<String, User>,
    roles: HashMap<(String, String), Role>,
    keys: HashMap<String, ApiKey>,
    key_ids_by_hash: HashMap<[u8; 32], String>,
    /// Settings of projects that changed theirs; the others have the defaults.
    settings: HashMap<String, ProjectSettingsDoc>,
    /// (project, batch id) of the edge batches applied.
    edge_batches: std::collections::HashSet<(String, String)>,
}

/// The in-memory tenancy store, holding the default tenant from the start.
pub struct MemoryTenancy(Mutex<State>);

impl Default for MemoryTenancy {
    fn default() -> Self {
        let now = Utc::now();
        let mut state = State::default();
        state.orgs.insert(
            DEFAULT_TENANT.into(),
            Org { id: DEFAULT_TENANT.into(), name: DEFAULT_TENANT.into(), created_at: now },
        );
        state.projects.insert(
            DEFAULT_TENANT.into(),
            Project {
                id: DEFAULT_TENANT.into(),
                org_id: DEFAULT_TENANT.into(),
                name: DEFAULT_TENANT.into(),
                created_at: now,
            },
        );
        Self(Mutex::new(state))
    }
}

fn sorted<T: Clone>(items: impl Iterator<Item = T>, key: impl Fn(&T) -> DateTime<Utc>) -> Vec<T> {
    let mut out: Vec<T> = items.collect();
    out.sort_by_key(|item| std::cmp::Reverse(key(item)));
    out
}

#[async_trait]
impl TenancyStore for MemoryTenancy {
    async fn create_org(&self, id: &str, name: &str) -> Result<Org, TenancyError> {
        let mut state = self.0.lock();
        if state.orgs.contains_key(id) {
            return Err(TenancyError::Conflict(format!("organization {id} already exists")));
        }
        let org = Org { id: id.into(), name: name.into(), created_at: Utc::now() };
        state.orgs.insert(id.into(), org.clone());
        Ok(org)
    }

    async fn list_orgs(&self) -> Result<Vec<Org>, TenancyError> {
        Ok(sorted(self.0.lock().orgs.values().cloned(), |o| o.created_at))
    }

    async fn get_org(&self, id: &str) -> Result<Option<Org>, TenancyError> {
        Ok(self.0.lock().orgs.get(id).cloned())
    }

    async fn create_project(&self, id: &str, org_id: &str, name: &str) -> Result<Project, TenancyError> {
        let mut state = self.0.lock();
        if !state.orgs.contains_key(org_id) {
            return Err(TenancyError::NotFound(format!("organization {org_id}")));
        }
        if state.projects.values().any(|p| p.org_id == org_id && p.name == name) {
            return Err(TenancyError::Conflict(format!("project {name:?} already exists")));
        }
        let project = Project { id: id.into(), org_id: org_id.into(), name: name.into(), created_at: Utc::now() };
        state.projects.insert(id.into(), project.clone());
        Ok(project)
    }

    async fn list_projects(&self, org_id: &str) -> Result<Vec<Project>, TenancyError> {
        let state = self.0.lock();
        Ok(sorted(state.projects.values().filter(|p| p.org_id == org_id).cloned(), |p| p.created_at))
    }

    async fn get_project(&self, id: &str) -> Result<Option<Project>, TenancyError> {
        Ok(self.0.lock().projects.get(id).cloned())
    }

    async fn create_user(&self, id: &str, org_id: &str, email: &str, name: &str) -> Result<User, TenancyError> {
        let mut state = self.0.lock();
        if !state.orgs.contains_key(org_id) {
            return Err(TenancyError::NotFound(format!("organization {org_id}")));
        }
        if state.users.values().any(|u| u.org_id == org_id && u.email == email) {
            return Err(TenancyError::Conflict(format!("user {email:?} already exists")));
        }
        let user = User {
            id: id.into(),
            org_id: org_id.into(),
            email: email.into(),
            name: name.into(),
            created_at: Utc::now(),
        };
        state.users.insert(id.into(), user.clone());
        Ok(user)
    }

    async fn list_users(&self, org_id: &str) -> Result<Vec<User>, TenancyError> {
        let state = self.0.lock();
        Ok(sorted(state.users.values().filter(|u| u.org_id == org_id).cloned(), |u| u.created_at))
    }

    async fn get_user(&self, id: &str) -> Result<Option<User>, TenancyError> {
        Ok(self.0.lock().users.get(id).cloned())
    }

    async fn set_role(&self, user_id: &str, project_id: &str, role: Option<Role>) -> Result<(), TenancyError> {
        let mut state = self.0.lock();
        let key = (user_id.to_owned(), project_id.to_owned());
        match role {
            Some(role) => {
                if !state.users.contains_key(user_id) {
                    return Err(TenancyError::NotFound(format!("user {user_id}")));
                }
                if !state.projects.contains_key(project_id) {
                    return Err(TenancyError::NotFound(format!("project {project_id}")));
                }
                state.roles.insert(key, role);
            }
            None => {
                state.roles.remove(&key);
            }
        }
        Ok(())
    }

    async fn user_roles(&self, user_id: &str) -> Result<Vec<(String, Role)>, TenancyError> {
        let state = self.0.lock();
        let mut roles: Vec<(String, Role)> = state
            .roles
            .iter()
            .filter(|((user, _), _)| user == user_id)
            .map(|((_, project), role)| (project.clone(), *role))
            .collect();
        roles.sort();
        Ok(roles)
    }

    async fn insert_key(&self, key: &ApiKey, secret_hash: &[u8; 32]) -> Result<(), TenancyError> {
        let mut state = self.0.lock();
        if state.projects.get(&key.project_id).is_none_or(|p| p.org_id != key.org_id) {
            return Err(TenancyError::NotFound(format!("project {}", key.project_id)));
        }
        if key.user_id.as_ref().is_some_and(|u| !state.users.contains_key(u)) {
            return Err(TenancyError::NotFound(format!("user {}", key.user_id.as_deref().unwrap_or_default())));
        }
        if state.key_ids_by_hash.contains_key(secret_hash) || state.keys.contains_key(&key.id) {
            return Err(TenancyError::Conflict("the key already exists".into()));
        }
        state.key_ids_by_hash.insert(*secret_hash, key.id.clone());
        state.keys.insert(key.id.clone(), key.clone());
        Ok(())
    }

    async fn key_by_hash(&self, secret_hash: &[u8; 32]) -> Result<Option<KeyLookup>, TenancyError> {
        let state = self.0.lock();
        let Some(key) = state.key_ids_by_hash.get(secret_hash).and_then(|id| state.keys.get(id)) else {
            return Ok(None);
        };
        let user_role =
            key.user_id.as_ref().and_then(|u| state.roles.get(&(u.clone(), key.project_id.clone())).copied());
        Ok(Some(KeyLookup { key: key.clone(), user_role }))
    }

    async fn get_key(&self, id: &str) -> Result<Option<ApiKey>, TenancyError> {
        Ok(self.0.lock().keys.get(id).cloned())
    }

    async fn list_keys(&self, project_id: &str) -> Result<Vec<ApiKey>, TenancyError> {
        let state = self.0.lock();
        Ok(sorted(state.keys.values().filter(|k| k.project_id == project_id).cloned(), |k| k.created_at))
    }

    async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<Option<ApiKey>, TenancyError> {
        let mut state = self.0.lock();
        Ok(state.keys.get_mut(id).map(|key| {
            key.revoked_at.get_or_insert(at);
            key.clone()
        }))
    }

    async fn project_settings(&self, project_id: &str) -> Result<Option<ProjectSettingsDoc>, TenancyError> {
        let state = self.0.lock();
        if !state.projects.contains_key(project_id) {
            return Ok(None);
        }
        Ok(Some(state.settings.get(project_id).cloned().unwrap_or_else(ProjectSettingsDoc::empty)))
    }

    async fn set_project_settings(
        &self,
        project_id: &str,
        kind: SettingsKind,
        document: &serde_json::Value,
    ) -> Result<(), TenancyError> {
        let mut state = self.0.lock();
        if !state.projects.contains_key(project_id) {
            return Err(TenancyError::NotFound(format!("project {project_id}")));
        }
        let settings = state.settings.entry(project_id.to_owned()).or_insert_with(ProjectSettingsDoc::empty);
        match kind {
            SettingsKind::SecurityPolicy => settings.security_policy = document.clone(),
            SettingsKind::RequestLimits => settings.request_limits = document.clone(),
        }
        Ok(())
    }

    async fn edge_batch_applied(&self, project_id: &str, batch_id: &str) -> Result<bool, TenancyError> {
        Ok(self.0.lock().edge_batches.contains(&(project_id.to_owned(), batch_id.to_owned())))
    }

    async fn record_edge_batch(
        &self,
        project_id: &str,
        batch_id: &str,
        _traces: i64,
        _at: DateTime<Utc>,
    ) -> Result<(), TenancyError> {
        self.0.lock().edge_batches.insert((project_id.to_owned(), batch_id.to_owned()));
        Ok(())
    }
}
