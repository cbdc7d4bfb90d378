//! The attack suite: every hole the zero-trust review found at the edge, tried the way an attacker
//! would, through the edge of a whole mesh on real Postgres and Redis. Each test failed on the code
//! the review read and must keep failing should the hole come back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use meshgate_proto::common::v1::{ChatMessage, ToolCall};
use meshgate_proto::gateway::v1::ChatRequest;
use meshgate_proto::gateway::v1::gateway_client::GatewayClient;
use meshgate_router::ModelFacts;
use meshgate_tests::{ADMIN_KEY, CLOUD_MODEL, MeshOptions, TestMesh, chat_body};
use parking_lot::Mutex;
use reqwest::Method;
use serde_json::{Value, json};

use crate::tenancy::{Tenant, call};

const PREMIUM_MODEL: &str = "mock-premium";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_acts_on_a_key_or_member_above_their_own_role() {
    let mesh = TestMesh::start().await;
    let (http, edge) = (&mesh.http, mesh.edge.as_str());
    let tenant = Tenant::create(http, edge, "climbers").await;
    let admin = tenant.secret("admin");

    // Rotating an owner's key would hand the admin an owner's secret.
    let rotate = format!("/v1/keys/{}/rotate", tenant.key_id("owner"));
    let (status, body) = call(http, edge, admin, Method::POST, &rotate, None).await;
    assert_eq!(status, 403, "an admin rotated an owner's key: {body}");
    assert!(body.get("secret").is_none());
    let revoke = format!("/v1/keys/{}", tenant.key_id("owner"));
    assert_eq!(call(http, edge, admin, Method::DELETE, &revoke, None).await.0, 403);
    assert_eq!(call(http, edge, tenant.secret("owner"), Method::GET, "/v1/quota/status", None).await.0, 200);

    // Demoting or removing an owner.
    let member = format!("/v1/projects/{}/members/{}", tenant.project, tenant.user("owner"));
    for role in [json!("viewer"), Value::Null] {
        let (status, body) = call(http, edge, admin, Method::PUT, &member, Some(json!({"role": role}))).await;
        assert_eq!(status, 403, "an admin set an owner's role to {role}: {body}");
    }
    assert_eq!(call(http, edge, tenant.secret("owner"), Method::GET, "/v1/users", None).await.0, 200);

    // Below the admin, and for the owner, all of it still works.
    let developer = format!("/v1/projects/{}/members/{}", tenant.project, tenant.user("developer"));
    assert_eq!(call(http, edge, admin, Method::PUT, &developer, Some(json!({"role": "viewer"}))).await.0, 200);
    let rotate_admin = format!("/v1/keys/{}/rotate", tenant.key_id("admin"));
    assert_eq!(call(http, edge, tenant.secret("owner"), Method::POST, &rotate_admin, None).await.0, 201);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_cannot_mint_a_wider_or_longer_lived_key() {
    let mesh = TestMesh::start().await;
    let (http, edge) = (&mesh.http, mesh.edge.as_str());
    let tenant = Tenant::create(http, edge, "minters").await;
    let narrow = json!({"project_id": tenant.project, "user_id": tenant.user("developer"), "role": "developer",
                        "scopes": {"endpoints": ["chat", "admin"], "models": [CLOUD_MODEL]}, "expires_in_days": 1});
    let (status, narrow) = call(http, edge, ADMIN_KEY, Method::POST, "/v1/keys", Some(narrow)).await;
    assert_eq!(status, 201, "{narrow}");
    let (secret, expires) = (narrow["secret"].as_str().unwrap().to_owned(), narrow["expires_at"].clone());
    let expires_at = |key: &Value| chrono::DateTime::parse_from_rfc3339(key["expires_at"].as_str().unwrap()).unwrap();

    // Left open, a new key takes the creator's scopes and expiry.
    let (status, minted) = call(http, edge, &secret, Method::POST, "/v1/keys", Some(json!({}))).await;
    assert_eq!(status, 201, "{minted}");
    assert_eq!(minted["scopes"], narrow["scopes"], "{minted}");
    assert!(!minted["expires_at"].is_null(), "a key minted by an expiring key never expires: {minted}");
    assert!(expires_at(&minted) <= expires_at(&narrow), "{minted} outlives {expires}");

    // Asked for more, it is refused.
    for wider in [
        json!({"scopes": {"endpoints": ["quota"]}}),
        json!({"scopes": {"endpoints": ["chat", "jobs"]}}),
        json!({"scopes": {"models": ["some-other-model"]}}),
        json!({"expires_in_days": 30}),
    ] {
        let (status, body) = call(http, edge, &secret, Method::POST, "/v1/keys", Some(wider.clone())).await;
        assert_eq!(status, 403, "{wider} was granted: {body}");
        assert!(body.get("secret").is_none());
    }

    // Rotating keeps the key within its rotator's reach too.
    let (status, rotated) =
        call(http, edge, &secret, Method::POST, &format!("/v1/keys/{}/rotate", narrow["id"].as_str().unwrap()), None)
            .await;
    assert_eq!(status, 201, "{rotated}");
    assert_eq!(rotated["scopes"], narrow["scopes"]);
    assert!(expires_at(&rotated) <= expires_at(&narrow));
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_bind_whom_they_are_set_on() {
    let mesh = TestMesh::start().await;
    let (http, edge) = (&mesh.http, mesh.edge.as_str());
    let tenant = Tenant::create(http, edge, "budgets").await;
    let limit = |kind: &str, id: &str, tokens: i64| json!({"scope": {"kind": kind, "id": id}, "limits": {"tokens_per_day": tokens}});
    let owner = tenant.secret("owner");
    let admin = tenant.secret("admin");
    let put = |key: &'static str, body| {
        let key = if key == "owner" { owner } else { admin };
        call(http, edge, key, Method::PUT, "/v1/quota/limits", Some(body))
    };

    // The owner's budget on the project binds its admin, who cannot lift it.
    assert_eq!(put("owner", limit("project", &tenant.project, 1_000)).await.0, 200);
    let (status, body) = put("admin", limit("project", &tenant.project, 1_000_000_000)).await;
    assert_eq!(status, 403, "an admin lifted the owner's project budget: {body}");
    let (_, status_body) = call(http, edge, owner, Method::GET, "/v1/quota/status", None).await;
    let project = status_body["scopes"].as_array().unwrap().iter().find(|s| s["scope"]["kind"] == "project").unwrap();
    assert_eq!(project["limits"]["tokens_per_day"], 1_000, "{status_body}");

    // A user who also works in another project is out of the admin's reach; one of its own is not.
    let (status, outsider) = call(
        http,
        edge,
        ADMIN_KEY,
        Method::POST,
        "/v1/users",
        Some(json!({"email": "elsewhere@budgets.test", "org_id": tenant.org})),
    )
    .await;
    assert_eq!(status, 201, "{outsider}");
    let outsider = outsider["id"].as_str().unwrap();
    let (_, projects) = call(http, edge, owner, Method::GET, "/v1/projects", None).await;
    let side = projects["data"].as_array().unwrap().iter().find(|p| p["name"] == "side").unwrap()["id"].clone();
    let side = side.as_str().unwrap();
    let membership = format!("/v1/projects/{side}/members/{outsider}");
    assert_eq!(call(http, edge, owner, Method::PUT, &membership, Some(json!({"role": "developer"}))).await.0, 200);
    assert_eq!(put("admin", limit("user", outsider, 1)).await.0, 403, "an admin throttled another project's user");
    assert_eq!(put("admin", limit("user", tenant.user("developer"), 5_000)).await.0, 200);
    assert_eq!(put("admin", limit("user", tenant.user("owner"), 1)).await.0, 403, "an admin throttled an owner");
    assert_eq!(put("owner", limit("user", outsider, 5_000)).await.0, 200);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_never_lock_out_a_valid_key_and_only_trusted_proxies_name_the_client() {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| {
            config.gateway.max_auth_failures_per_minute = 3;
            config.gateway.trusted_proxies = vec!["127.0.0.1".into()];
        }),
        ..Default::default()
    })
    .await;
    let attempt = |key: &'static str, client: &'static str| {
        mesh.http.get(format!("{}/v1/models", mesh.edge)).bearer_auth(key).header("x-forwarded-for", client).send()
    };
    let attacker = "198.51.100.7";
    for _ in 0..3 {
        assert_eq!(attempt("wrong-key", attacker).await.unwrap().status(), 401);
    }
    let throttled = attempt("wrong-key", attacker).await.unwrap();
    assert_eq!(throttled.status(), 429);
    assert!(throttled.headers().contains_key("retry-after"));
    // Behind the same proxy, every tenant shares the peer address: a valid key always works.
    assert_eq!(attempt(ADMIN_KEY, attacker).await.unwrap().status(), 200);
    assert_eq!(attempt("wrong-key", "198.51.100.8").await.unwrap().status(), 401, "another client is not throttled");
    mesh.stop().await;

    // Without trusted proxies the header names nobody: the peer is the client.
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| config.gateway.max_auth_failures_per_minute = 3),
        ..Default::default()
    })
    .await;
    for client in ["203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"] {
        let response =
            mesh.http.get(format!("{}/v1/models", mesh.edge)).bearer_auth("wrong").header("x-forwarded-for", client);
        let status = response.send().await.unwrap().status();
        if client.ends_with(".4") {
            assert_eq!(status, 429, "made-up forwarded addresses spread the failures");
        }
    }
    mesh.stop().await;
}

/// alpha serves the requested model at l1, beta a premium model at l2 (the escalation target).
fn escalation_mesh() -> MeshOptions {
    MeshOptions {
        tune: Box::new(|config| {
            config.sync.providers[1].models = vec![PREMIUM_MODEL.into()];
            let facts = |layer: &str| ModelFacts { layer: Some(layer.into()), ..Default::default() };
            config.router.models.insert(CLOUD_MODEL.into(), facts("l1"));
            config.router.models.insert(PREMIUM_MODEL.into(), facts("l2"));
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_and_escalation_never_leave_the_allow_lists() {
    let mesh = TestMesh::start_with(escalation_mesh()).await;
    let (http, edge) = (&mesh.http, mesh.edge.as_str());
    mesh.alpha.set_failures(1.0, 500);
    let served_by = |response: &reqwest::Response| {
        response.headers().get("x-meshgate-target").map(|v| v.to_str().unwrap().to_owned())
    };

    // The way up exists: with the requested model's provider failing, an unrestricted key is
    // served one layer up.
    let response = mesh.chat(chat_body(CLOUD_MODEL, "think hard")).await;
    assert_eq!(served_by(&response).as_deref(), Some("beta/mock-premium"));

    // A key limited to the requested model is never served by another one.
    let scoped = json!({"service": true, "role": "developer", "scopes": {"models": [CLOUD_MODEL]}});
    let (status, scoped) = call(http, edge, ADMIN_KEY, Method::POST, "/v1/keys", Some(scoped)).await;
    assert_eq!(status, 201, "{scoped}");
    let before = mesh.beta.requests_total();
    let (status, body) = call(
        http,
        edge,
        scoped["secret"].as_str().unwrap(),
        Method::POST,
        "/v1/chat/completions",
        Some(chat_body(CLOUD_MODEL, "think hard")),
    )
    .await;
    assert_ne!(status, 200, "served outside the key's models: {body}");
    assert_eq!(mesh.beta.requests_total(), before, "the premium provider was called");

    // The same for a project's allowed_models.
    let limits = json!({"allowed_models": [CLOUD_MODEL]});
    assert_eq!(call(http, edge, ADMIN_KEY, Method::PUT, "/v1/projects/default/limits", Some(limits)).await.0, 200);
    let response = mesh.chat(chat_body(CLOUD_MODEL, "think hard")).await;
    assert_ne!(response.status(), 200);
    assert_eq!(served_by(&response), None);
    assert_eq!(mesh.beta.requests_total(), before);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_holds_its_place_until_it_ends_and_streams_are_capped_per_key() {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| {
            config.gateway.max_concurrent_requests = 3;
            config.gateway.max_streams_per_key = 2;
        }),
        ..Default::default()
    })
    .await;
    mesh.alpha.update(|behavior| {
        behavior.stream_chunks = 20;
        behavior.chunk_delay = Duration::from_millis(100);
    });
    let stream_body = || {
        let mut body = chat_body(CLOUD_MODEL, "a long story");
        body["stream"] = json!(true);
        body
    };
    // Two streams whose headers arrived: their bodies are still flowing.
    let mut open = Vec::new();
    for _ in 0..2 {
        let response = mesh.chat(stream_body()).await;
        assert_eq!(response.status(), 200);
        open.push(response);
    }
    let third = mesh.chat(stream_body()).await;
    assert_eq!(third.status(), 429, "a third stream of the same key");
    let body: Value = third.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("streams"), "{body}");

    // Another tenant's stream takes the edge's last place; then the edge is full.
    let other = json!({"service": true, "role": "developer"});
    let (status, other) = call(&mesh.http, &mesh.edge, ADMIN_KEY, Method::POST, "/v1/keys", Some(other)).await;
    assert_eq!(status, 201);
    let other = other["secret"].as_str().unwrap().to_owned();
    let send = |key: String| {
        mesh.http.post(format!("{}/v1/chat/completions", mesh.edge)).bearer_auth(key).json(&stream_body()).send()
    };
    let third_stream = send(other.clone()).await.unwrap();
    assert_eq!(third_stream.status(), 200);
    let shed = send(other.clone()).await.unwrap();
    assert_eq!(shed.status(), 503, "the edge counted streams whose headers had left as finished");

    // Once the streams end, their places come back.
    for response in open.into_iter().chain([third_stream]) {
        let text = response.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    assert_eq!(mesh.chat(stream_body()).await.status(), 200);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_change_reaches_every_replica_at_once() {
    let configs = Arc::new(Mutex::new(None));
    let captured = configs.clone();
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(move |config| *captured.lock() = Some(config.gateway.clone())),
        ..MeshOptions::default()
    })
    .await;
    let config = configs.lock().take().unwrap();
    let replica = mesh.gateway_replica(config).await;
    let (http, edge) = (&mesh.http, mesh.edge.as_str());
    let tenant = Tenant::create(http, edge, "leavers").await;
    let secret = tenant.secret("developer");
    let mut cached = false;
    for _ in 0..100 {
        if call(http, &replica.edge, secret, Method::GET, "/v1/quota/status", None).await.0 == 200 {
            cached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cached, "the replica never accepted the key");

    let member = format!("/v1/projects/{}/members/{}", tenant.project, tenant.user("developer"));
    assert_eq!(call(http, edge, ADMIN_KEY, Method::PUT, &member, Some(json!({"role": null}))).await.0, 200);
    let removed = Instant::now();
    let mut refused = None;
    while removed.elapsed() < Duration::from_secs(1) {
        if call(http, &replica.edge, secret, Method::GET, "/v1/quota/status", None).await.0 == 403 {
            refused = Some(removed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused.is_some(), "the replica kept serving a removed member's key from its cache");
    replica.stop().await;
    mesh.stop().await;
}

fn authorized<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

fn user_message(text: String) -> ChatMessage {
    ChatMessage { role: "user".into(), content: text, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_chat_is_authenticated_before_its_message_is_read_and_scans_tool_calls() {
    let mesh = TestMesh::start().await;
    let mut client = GatewayClient::new(mesh.channel("gateway")).max_encoding_message_size(usize::MAX);
    let chat = |text: String| ChatRequest {
        model: CLOUD_MODEL.into(),
        messages: vec![user_message(text)],
        ..Default::default()
    };

    // A message past the edge's decoding limit (20 MiB), without a valid key: refused from the
    // metadata, before the message is read.
    let huge = "x".repeat(25 * 1024 * 1024);
    let status = client.chat(authorized(chat(huge.clone()), "wrong-key")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let status = client.chat(tonic::Request::new(chat(huge.clone()))).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    // With a valid key, the decoding limit is the edge's body limit.
    let status = client.chat(authorized(chat(huge), ADMIN_KEY)).await.unwrap_err();
    assert!(
        matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted),
        "a message over the body limit was decoded: {status:?}"
    );

    // Tool calls replayed in the conversation are scanned like content.
    let mut request = chat("run the query".into());
    request.messages.push(ChatMessage {
        role: "assistant".into(),
        tool_calls: vec![ToolCall {
            id: "call_1".into(),
            r#type: "function".into(),
            function_name: "sql".into(),
            arguments_json: r#"{"query": "DROP TABLE users;"}"#.into(),
        }],
        ..Default::default()
    });
    let status = client.chat(authorized(request, ADMIN_KEY)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("blocked_keyword"), "{status:?}");

    let ok = client.chat(authorized(chat("hello".into()), ADMIN_KEY)).await.unwrap();
    let chunks: Vec<_> = ok.into_inner().collect().await;
    assert!(chunks.iter().all(Result::is_ok));
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_names_are_refused_at_the_edge() {
    let mesh = TestMesh::start().await;
    let mut body = chat_body(CLOUD_MODEL, "hi");
    body["tools"] = json!([{"type": "function", "function": {"name": "get\u{0}weather"}}]);
    let response = mesh.chat(body).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("tools[0].function.name"), "{error}");
    assert_eq!(mesh.alpha.requests_total(), 0, "nothing left the gateway");
    mesh.stop().await;
}
