//! The gateway's stores on both backends: every scenario runs against the in-memory store of a
//! standalone gateway and against Postgres (a schema of its own, the gateway's migrations
//! applied), so the two behave alike.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use meshgate_gateway::stored_responses::{MemoryResponses, PostgresResponses, ResponseStore};
use meshgate_gateway::tenancy::{
    ApiKey, KeyScopes, MemoryTenancy, PostgresTenancy, SettingsKind, TenancyError, TenancyStore,
};
use meshgate_proto::common::v1::Role;

async fn postgres_pool() -> meshgate_storage::PgPool {
    let url = meshgate_tests::isolated_database_url().await;
    let pool = meshgate_storage::postgres_pool(&url, &meshgate_storage::PostgresConfig::default()).unwrap();
    meshgate_storage::migrate(&pool, meshgate_gateway::COMPONENT, meshgate_gateway::migrations()).await.unwrap();
    pool
}

async fn backends() -> [(&'static str, Arc<dyn TenancyStore>); 2] {
    [
        ("memory", Arc::new(MemoryTenancy::default())),
        ("postgres", Arc::new(PostgresTenancy::new(postgres_pool().await))),
    ]
}

fn key(id: &str, project: &str, user: Option<&str>, role: Role) -> ApiKey {
    ApiKey {
        id: id.into(),
        prefix: "mgk_prefix00".into(),
        org_id: "acme".into(),
        project_id: project.into(),
        user_id: user.map(str::to_owned),
        name: id.into(),
        role,
        scopes: KeyScopes::default(),
        expires_at: None,
        revoked_at: None,
        created_at: Utc::now(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenancy_behaves_alike_in_memory_and_on_postgres() {
    for (backend, store) in backends().await {
        store.create_org("acme", "Acme").await.unwrap();
        assert!(matches!(store.create_org("acme", "Again").await, Err(TenancyError::Conflict(_))), "{backend}");
        store.create_project("p1", "acme", "one").await.unwrap();
        store.create_project("p2", "acme", "two").await.unwrap();
        assert!(matches!(store.create_project("px", "nobody", "x").await, Err(TenancyError::NotFound(_))), "{backend}");
        store.create_user("u1", "acme", "ada@acme.test", "Ada").await.unwrap();
        store.set_role("u1", "p1", Some(Role::Admin)).await.unwrap();
        store.set_role("u1", "p2", Some(Role::Viewer)).await.unwrap();
        assert_eq!(
            store.user_roles("u1").await.unwrap(),
            [("p1".to_owned(), Role::Admin), ("p2".to_owned(), Role::Viewer)],
            "{backend}"
        );
        store.set_role("u1", "p2", None).await.unwrap();
        assert_eq!(store.user_roles("u1").await.unwrap().len(), 1, "{backend}");

        let hash = [7u8; 32];
        store.insert_key(&key("k1", "p1", Some("u1"), Role::Owner), &hash).await.unwrap();
        let lookup = store.key_by_hash(&hash).await.unwrap().expect("found by its hash");
        assert_eq!((lookup.key.id.as_str(), lookup.user_role), ("k1", Some(Role::Admin)), "{backend}");
        assert!(store.key_by_hash(&[8u8; 32]).await.unwrap().is_none(), "{backend}");
        assert!(matches!(
            store.insert_key(&key("k1", "p1", None, Role::Viewer), &hash).await,
            Err(TenancyError::Conflict(_))
        ));
        let first = store.revoke_key("k1", Utc::now()).await.unwrap().unwrap().revoked_at;
        let again = store.revoke_key("k1", Utc::now() + chrono::Duration::hours(1)).await.unwrap().unwrap().revoked_at;
        assert_eq!(
            first.map(|t| t.timestamp_millis()),
            again.map(|t| t.timestamp_millis()),
            "{backend}: first revocation kept"
        );
        assert_eq!(store.list_keys("p1").await.unwrap().len(), 1, "{backend}");
        assert!(store.list_keys("p2").await.unwrap().is_empty(), "{backend}");

        let policy = serde_json::json!({"enabled": false});
        store.set_project_settings("p1", SettingsKind::SecurityPolicy, &policy).await.unwrap();
        let doc = store.project_settings("p1").await.unwrap().unwrap();
        assert_eq!((doc.security_policy, doc.request_limits), (policy, serde_json::json!({})), "{backend}");
        assert!(store.project_settings("nope").await.unwrap().is_none(), "{backend}");

        assert!(!store.edge_batch_applied("p1", "b1").await.unwrap());
        store.record_edge_batch("p1", "b1", 3, Utc::now()).await.unwrap();
        store.record_edge_batch("p1", "b1", 3, Utc::now()).await.unwrap();
        assert!(store.edge_batch_applied("p1", "b1").await.unwrap(), "{backend}");
        assert!(!store.edge_batch_applied("p2", "b1").await.unwrap(), "{backend}: batch ids are per project");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_responses_stay_in_their_project_and_their_retention() {
    let pool = postgres_pool().await;
    let tenancy = PostgresTenancy::new(pool.clone());
    tenancy.create_org("acme", "Acme").await.unwrap();
    for project in ["p1", "p2"] {
        tenancy.create_project(project, "acme", project).await.unwrap();
    }
    let stores: [(&str, Box<dyn ResponseStore>); 2] = [
        ("memory", Box::new(MemoryResponses::new(100, Duration::from_secs(3600)))),
        ("postgres", Box::new(PostgresResponses::new(pool.clone(), Duration::from_secs(3600)))),
    ];
    let record = serde_json::json!({"model": "m", "output": [{"type": "message"}]});
    for (backend, store) in stores {
        store.put("p1", "resp_1", &record).await.unwrap();
        assert_eq!(store.get("p1", "resp_1").await.unwrap(), Some(record.clone()), "{backend}");
        assert_eq!(store.get("p2", "resp_1").await.unwrap(), None, "{backend}: another project's");
        assert!(!store.delete("p2", "resp_1").await.unwrap(), "{backend}: not deletable by another project");
        assert!(store.delete("p1", "resp_1").await.unwrap(), "{backend}");
        assert_eq!(store.get("p1", "resp_1").await.unwrap(), None, "{backend}");
    }
    let expired = PostgresResponses::new(pool, Duration::ZERO);
    expired.put("p1", "resp_old", &record).await.unwrap();
    assert_eq!(expired.get("p1", "resp_old").await.unwrap(), None, "past the retention");
    assert!(matches!(expired.put("nope", "resp_x", &record).await, Err(TenancyError::NotFound(_))));
}
