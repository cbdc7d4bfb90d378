//! Tenancy through the edge, against real Postgres and Redis: keys shown once and stored hashed,
//! revocation reaching another replica, and isolation between tenants for every management
//! endpoint and role.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_tests::{ADMIN_KEY, CLOUD_MODEL, MeshOptions, TestMesh, chat_body};
use parking_lot::Mutex;
use reqwest::Method;
use serde_json::{Value, json};

/// One HTTP call with a bearer key; returns the status and the JSON body (Null when empty).
pub(crate) async fn call(
    http: &reqwest::Client,
    edge: &str,
    key: &str,
    method: Method,
    path: impl Into<String>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http.request(method, format!("{edge}{}", path.into())).bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A tenant made through the bootstrap key: an organization, two projects, a user per role in
/// the first project (with a key each), and a service key in the second project.
pub(crate) struct Tenant {
    pub(crate) org: String,
    pub(crate) project: String,
    users: Vec<(String, String)>,
    keys: Vec<(String, String, String)>,
    service_key_id: String,
    /// A chat request the owner made, whose trace the tenant may read.
    request_id: String,
}

const ROLES: [&str; 4] = ["viewer", "developer", "admin", "owner"];

impl Tenant {
    pub(crate) async fn create(http: &reqwest::Client, edge: &str, name: &str) -> Self {
        let admin = |method, path: &str, body| call(http, edge, ADMIN_KEY, method, path.to_owned(), body);
        let (status, org) = admin(Method::POST, "/v1/orgs", Some(json!({"name": name}))).await;
        assert_eq!(status, 201, "{org}");
        let org = org["id"].as_str().unwrap().to_owned();
        let mut projects = Vec::new();
        for project in ["main", "side"] {
            let (status, body) =
                admin(Method::POST, "/v1/projects", Some(json!({"name": project, "org_id": org}))).await;
            assert_eq!(status, 201, "{body}");
            projects.push(body["id"].as_str().unwrap().to_owned());
        }
        let mut users = Vec::new();
        let mut keys = Vec::new();
        for role in ROLES {
            let email = format!("{role}@{name}.test");
            let (status, user) = admin(Method::POST, "/v1/users", Some(json!({"email": email, "org_id": org}))).await;
            assert_eq!(status, 201, "{user}");
            let user_id = user["id"].as_str().unwrap().to_owned();
            let path = format!("/v1/projects/{}/members/{user_id}", projects[0]);
            let (status, body) = admin(Method::PUT, &path, Some(json!({"role": role}))).await;
            assert_eq!(status, 200, "{body}");
            let request = json!({"project_id": projects[0], "user_id": user_id, "role": role, "name": role});
            let (status, key) = admin(Method::POST, "/v1/keys", Some(request)).await;
            assert_eq!(status, 201, "{key}");
            keys.push((
                role.to_owned(),
                key["id"].as_str().unwrap().to_owned(),
                key["secret"].as_str().unwrap().to_owned(),
            ));
            users.push((role.to_owned(), user_id));
        }
        let owner = &keys.iter().find(|(role, _, _)| role == "owner").unwrap().2;
        let response = http
            .post(format!("{edge}/v1/chat/completions"))
            .bearer_auth(owner)
            .json(&chat_body(CLOUD_MODEL, name))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let request_id = response.headers()["x-meshgate-request-id"].to_str().unwrap().to_owned();
        let service = json!({"project_id": projects[1], "service": true, "role": "developer", "name": "ci"});
        let (status, service) = admin(Method::POST, "/v1/keys", Some(service)).await;
        assert_eq!(status, 201, "{service}");
        Self {
            org,
            project: projects[0].clone(),
            users,
            keys,
            service_key_id: service["id"].as_str().unwrap().to_owned(),
            request_id,
        }
    }

    pub(crate) fn secret(&self, role: &str) -> &str {
        &self.keys.iter().find(|(r, _, _)| r == role).unwrap().2
    }

    pub(crate) fn key_id(&self, role: &str) -> &str {
        &self.keys.iter().find(|(r, _, _)| r == role).unwrap().1
    }

    pub(crate) fn user(&self, role: &str) -> &str {
        &self.users.iter().find(|(r, _)| r == role).unwrap().1
    }

    /// A fresh key of the admin user in the main project, to revoke or rotate.
    async fn throwaway_key(&self, http: &reqwest::Client, edge: &str) -> String {
        let request = json!({"project_id": self.project, "user_id": self.user("admin"), "role": "developer"});
        let (status, key) = call(http, edge, ADMIN_KEY, Method::POST, "/v1/keys", Some(request)).await;
        assert_eq!(status, 201, "{key}");
        key["id"].as_str().unwrap().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_shown_once_stored_hashed_and_revocable() {
    let mesh = TestMesh::start().await;
    let tenant = Tenant::create(&mesh.http, &mesh.edge, "acme").await;
    let developer = tenant.secret("developer");
    assert!(developer.starts_with("mgk_") && developer.len() == 68, "{developer}");

    // A developer's key serves chat, charged to its own principal.
    let response = mesh
        .http
        .post(format!("{}/v1/chat/completions", mesh.edge))
        .bearer_auth(developer)
        .json(&chat_body(CLOUD_MODEL, "hello from acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (status, quota) = call(&mesh.http, &mesh.edge, developer, Method::GET, "/v1/quota/status", None).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> =
        quota["scopes"].as_array().unwrap().iter().map(|s| s["scope"]["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [tenant.org.as_str(), &tenant.project, tenant.user("developer"), tenant.key_id("developer")]);

    // Listings show prefixes, never secrets.
    let (status, listed) = call(&mesh.http, &mesh.edge, tenant.secret("admin"), Method::GET, "/v1/keys", None).await;
    assert_eq!(status, 200, "{listed}");
    let text = listed.to_string();
    for (_, _, secret) in &tenant.keys {
        assert!(!text.contains(secret.as_str()), "a listing leaked a secret");
    }
    assert!(listed["data"].as_array().unwrap().iter().all(|k| k["prefix"].as_str().unwrap().len() == 12));

    // Revoked: refused at once on this replica, with the key's state named.
    let (status, _) = call(
        &mesh.http,
        &mesh.edge,
        ADMIN_KEY,
        Method::DELETE,
        &format!("/v1/keys/{}", tenant.key_id("developer")),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = call(&mesh.http, &mesh.edge, developer, Method::GET, "/v1/models", None).await;
    assert_eq!(status, 401);
    assert!(body["error"]["message"].as_str().unwrap().contains("revoked"), "{body}");

    // Rotated: the new secret works, the old one is revoked.
    let old = tenant.secret("viewer");
    let path = format!("/v1/keys/{}/rotate", tenant.key_id("viewer"));
    let (status, rotated) = call(&mesh.http, &mesh.edge, ADMIN_KEY, Method::POST, &path, None).await;
    assert_eq!(status, 201, "{rotated}");
    let new = rotated["secret"].as_str().unwrap();
    assert_eq!(call(&mesh.http, &mesh.edge, new, Method::GET, "/v1/quota/status", None).await.0, 200);
    assert_eq!(call(&mesh.http, &mesh.edge, old, Method::GET, "/v1/quota/status", None).await.0, 401);

    // A key limited to some models and endpoints is held to them.
    let limited = json!({"project_id": tenant.project, "user_id": tenant.user("owner"), "role": "developer",
                         "scopes": {"endpoints": ["chat"], "models": ["some-other-model"]}, "expires_in_days": 1});
    let (status, limited) = call(&mesh.http, &mesh.edge, ADMIN_KEY, Method::POST, "/v1/keys", Some(limited)).await;
    assert_eq!(status, 201, "{limited}");
    assert!(limited["expires_at"].is_string());
    let limited = limited["secret"].as_str().unwrap();
    let (status, body) =
        call(&mesh.http, &mesh.edge, limited, Method::POST, "/v1/chat/completions", Some(chat_body(CLOUD_MODEL, "hi")))
            .await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("permission_denied")));
    assert_eq!(call(&mesh.http, &mesh.edge, limited, Method::GET, "/v1/models", None).await.0, 403);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_management_input_is_a_4xx_and_writes_nothing() {
    let mesh = TestMesh::start().await;
    let tenant = Tenant::create(&mesh.http, &mesh.edge, "initech").await;
    let admin = |method, path: String, body| call(&mesh.http, &mesh.edge, ADMIN_KEY, method, path, body);
    let cases = [
        (Method::POST, "/v1/orgs".to_owned(), json!({"name": ""}), 400),
        (Method::POST, "/v1/orgs".to_owned(), json!({"name": "x", "colour": "red"}), 400),
        (Method::POST, "/v1/projects".to_owned(), json!({"name": "main", "org_id": tenant.org}), 409),
        (Method::POST, "/v1/projects".to_owned(), json!({"name": "p", "org_id": "org_missing"}), 404),
        (Method::POST, "/v1/users".to_owned(), json!({"email": "not-an-email", "org_id": tenant.org}), 400),
        (Method::POST, "/v1/keys".to_owned(), json!({"project_id": tenant.project, "role": "emperor"}), 400),
        (Method::POST, "/v1/keys".to_owned(), json!({"project_id": tenant.project, "expires_in_days": 0}), 400),
        (Method::POST, "/v1/keys".to_owned(), json!({"project_id": "prj_missing"}), 404),
        (
            Method::POST,
            "/v1/keys".to_owned(),
            json!({"project_id": tenant.project, "service": true, "user_id": "u"}),
            400,
        ),
        (
            Method::PUT,
            format!("/v1/projects/{}/members/{}", tenant.project, tenant.user("viewer")),
            json!({"role": "god"}),
            400,
        ),
        (Method::PUT, format!("/v1/projects/{}/members/usr_missing", tenant.project), json!({"role": "viewer"}), 404),
        (Method::GET, "/v1/keys/key_missing".to_owned(), Value::Null, 404),
        (Method::DELETE, "/v1/keys/key_missing".to_owned(), Value::Null, 404),
    ];
    for (method, path, body, expected) in cases {
        let body = (!body.is_null()).then_some(body);
        let (status, answer) = admin(method.clone(), path.clone(), body).await;
        assert_eq!(status, expected, "{method} {path}: {answer}");
        assert!(answer["error"]["message"].is_string() && answer["error"]["request_id"].is_string(), "{answer}");
    }
    let (_, projects) = admin(Method::GET, format!("/v1/projects?org_id={}", tenant.org), None).await;
    assert_eq!(projects["data"].as_array().unwrap().len(), 2, "nothing was partially created");
    let (_, keys) = admin(Method::GET, format!("/v1/keys?project_id={}", tenant.project), None).await;
    assert_eq!(keys["data"].as_array().unwrap().len(), 4);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_another_gateway_replica_within_a_second() {
    let configs = Arc::new(Mutex::new(None));
    let captured = configs.clone();
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(move |config| *captured.lock() = Some(config.gateway.clone())),
        ..MeshOptions::default()
    })
    .await;
    let config = configs.lock().take().unwrap();
    let replica = mesh.gateway_replica(config).await;

    let tenant = Tenant::create(&mesh.http, &mesh.edge, "umbrella").await;
    let secret = tenant.secret("developer");
    // The replica caches the key once it has seen it.
    let mut ready = false;
    for _ in 0..100 {
        if call(&mesh.http, &replica.edge, secret, Method::GET, "/v1/quota/status", None).await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the replica never accepted the key");

    let path = format!("/v1/keys/{}", tenant.key_id("developer"));
    assert_eq!(call(&mesh.http, &mesh.edge, ADMIN_KEY, Method::DELETE, &path, None).await.0, 200);
    let revoked_at = Instant::now();
    let mut refused_after = None;
    while revoked_at.elapsed() < Duration::from_secs(1) {
        if call(&mesh.http, &replica.edge, secret, Method::GET, "/v1/quota/status", None).await.0 == 401 {
            refused_after = Some(revoked_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused_after.is_some(), "the other replica still accepted a revoked key after a second");
    replica.stop().await;
    mesh.stop().await;
}

/// What a key of `role` in tenant A gets from each endpoint on its own tenant's objects.
fn expected_own(endpoint: &str, role: &str) -> u16 {
    let rank = ROLES.iter().position(|r| *r == role).unwrap();
    match (endpoint, rank) {
        ("list_keys", 0) => 403,
        ("list_keys", _) => 200,
        ("get_key" | "revoke_key" | "rotate_key", 0 | 1) => 404,
        ("get_key" | "revoke_key", _) => 200,
        ("rotate_key", _) => 201,
        ("create_key", 0) => 403,
        ("create_key", _) => 201,
        ("list_projects" | "quota_status" | "list_orgs", _) => 200,
        ("create_project" | "create_user", 3) => 201,
        ("create_project" | "create_user", _) => 403,
        ("list_users", 0 | 1) => 403,
        ("list_users", _) => 200,
        ("set_member", 0 | 1) => 403,
        ("set_member", _) => 200,
        // A project's limits bind its admins: only the organization's owners set them.
        ("set_project_limits", 0..=2) => 403,
        ("set_project_limits", _) => 200,
        ("get_security_policy" | "get_request_limits", _) => 200,
        ("set_security_policy" | "set_request_limits", 0 | 1) => 403,
        ("set_security_policy" | "set_request_limits", _) => 200,
        ("get_trace" | "analytics_summary", _) => 200,
        ("other_project_keys", 3) => 200,
        ("other_project_keys", _) => 404,
        ("create_org", _) => 403,
        _ => unreachable!("{endpoint}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_and_role_sees_only_its_own_tenant() {
    let mesh = TestMesh::start().await;
    let (http, edge) = (&mesh.http, mesh.edge.as_str());
    let a = Tenant::create(http, edge, "tenant-a").await;
    let b = Tenant::create(http, edge, "tenant-b").await;
    // Traces reach analytics in the background.
    for tenant in [&a, &b] {
        let path = format!("/v1/traces/{}", tenant.request_id);
        let mut stored = false;
        for _ in 0..200 {
            if call(http, edge, tenant.secret("owner"), Method::GET, &path, None).await.0 == 200 {
                stored = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(stored, "{path} never stored");
    }

    for role in ROLES {
        let key = a.secret(role);
        for (target, tenant) in [("own", &a), ("other", &b)] {
            let own_key_target = tenant.throwaway_key(http, edge).await;
            let cases: Vec<(&str, Method, String, Option<Value>)> = vec![
                ("list_keys", Method::GET, format!("/v1/keys?project_id={}", tenant.project), None),
                ("get_key", Method::GET, format!("/v1/keys/{}", tenant.key_id("admin")), None),
                ("revoke_key", Method::DELETE, format!("/v1/keys/{own_key_target}"), None),
                (
                    "rotate_key",
                    Method::POST,
                    format!("/v1/keys/{}/rotate", tenant.throwaway_key(http, edge).await),
                    None,
                ),
                (
                    "create_key",
                    Method::POST,
                    "/v1/keys".into(),
                    Some(json!({"project_id": tenant.project, "role": "viewer"})),
                ),
                ("list_projects", Method::GET, format!("/v1/projects?org_id={}", tenant.org), None),
                (
                    "create_project",
                    Method::POST,
                    "/v1/projects".into(),
                    Some(json!({"name": format!("{role}-{target}"), "org_id": tenant.org})),
                ),
                ("list_users", Method::GET, format!("/v1/users?org_id={}", tenant.org), None),
                (
                    "create_user",
                    Method::POST,
                    "/v1/users".into(),
                    Some(json!({"email": format!("{role}-{target}@x.test"), "org_id": tenant.org})),
                ),
                (
                    "set_member",
                    Method::PUT,
                    format!("/v1/projects/{}/members/{}", tenant.project, tenant.user("viewer")),
                    Some(json!({"role": "viewer"})),
                ),
                (
                    "set_project_limits",
                    Method::PUT,
                    "/v1/quota/limits".into(),
                    Some(
                        json!({"scope": {"kind": "project", "id": tenant.project}, "limits": {"tokens_per_day": 1_000_000}}),
                    ),
                ),
                ("get_security_policy", Method::GET, format!("/v1/projects/{}/policy", tenant.project), None),
                (
                    "set_security_policy",
                    Method::PUT,
                    format!("/v1/projects/{}/policy", tenant.project),
                    Some(json!({})),
                ),
                ("get_request_limits", Method::GET, format!("/v1/projects/{}/limits", tenant.project), None),
                ("set_request_limits", Method::PUT, format!("/v1/projects/{}/limits", tenant.project), Some(json!({}))),
                ("other_project_keys", Method::GET, format!("/v1/keys/{}", tenant.service_key_id), None),
                ("get_trace", Method::GET, format!("/v1/traces/{}", tenant.request_id), None),
                ("analytics_summary", Method::GET, format!("/v1/analytics?project={}", tenant.project), None),
                ("create_org", Method::POST, "/v1/orgs".into(), Some(json!({"name": format!("{role}-{target}-org")}))),
            ];
            for (endpoint, method, path, body) in cases {
                let sent = body.as_ref().map(Value::to_string).unwrap_or_default();
                let (status, answer) = call(http, edge, key, method.clone(), &path, body).await;
                let expected = match target {
                    "own" => expected_own(endpoint, role),
                    // Another tenant's objects do not exist for this caller (creating an org is
                    // refused before any object is looked at).
                    _ if endpoint == "create_org" => 403,
                    // An aggregate over another tenant's project is empty rather than missing.
                    _ if endpoint == "analytics_summary" => 200,
                    _ => 404,
                };
                assert_eq!(status, expected, "{role} key, {target} tenant, {endpoint} ({method} {path}): {answer}");
                if endpoint == "analytics_summary" {
                    let requests = if target == "own" { 1 } else { 0 };
                    assert_eq!(answer["data"][0]["requests"], requests, "{role} key, {target} tenant: {answer}");
                }
                if target == "other" {
                    // Nothing of the other tenant comes back but what the caller itself named.
                    let text = answer.to_string();
                    for id in [b.project.as_str(), b.org.as_str(), b.key_id("admin"), b.user("viewer")] {
                        let named = path.contains(id) || sent.contains(id);
                        assert!(!text.contains(id) || named, "{endpoint} leaked {id}: {text}");
                    }
                }
            }
        }
        // Listing orgs and quota status only ever show the caller's own.
        let (_, orgs) = call(http, edge, key, Method::GET, "/v1/orgs", None).await;
        let ids: Vec<&str> = orgs["data"].as_array().unwrap().iter().map(|o| o["id"].as_str().unwrap()).collect();
        assert_eq!(ids, [a.org.as_str()], "{role}");
        let (_, quota) = call(http, edge, key, Method::GET, "/v1/quota/status", None).await;
        assert!(!quota.to_string().contains(&b.org), "{role} saw the other tenant's quota");
    }
    mesh.stop().await;
}
