//! Quota through the edge, against real Redis and Postgres: concurrency, replicas, per-minute
//! limits, the status and limits endpoints, and reservations a dead gateway leaves behind.

use std::sync::Arc;
use std::time::Duration;

use meshgate_proto::common::v1::{Principal, Role};
use meshgate_proto::quota::v1::ReserveRequest;
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_runtime::Shutdown;
use meshgate_tests::{ADMIN_KEY, CLOUD_MODEL, MeshOptions, TestMesh, chat_body};
use parking_lot::Mutex;
use serde_json::{Value, json};

/// The admin key's principal, as the gateway builds it.
fn admin_principal() -> Principal {
    Principal {
        org_id: "default".into(),
        project_id: "default".into(),
        user_id: "admin".into(),
        key_id: "admin".into(),
        role: Role::Owner as i32,
    }
}

async fn put_limits(mesh_edge: &str, http: &reqwest::Client, body: Value) -> reqwest::Response {
    http.put(format!("{mesh_edge}/v1/quota/limits")).bearer_auth(ADMIN_KEY).json(&body).send().await.unwrap()
}

async fn quota_status(mesh: &TestMesh) -> Value {
    let response = mesh.http.get(format!("{}/v1/quota/status", mesh.edge)).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn scope_of<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["scopes"].as_array().unwrap().iter().find(|s| s["scope"]["kind"] == kind).unwrap()
}

/// Polls the status until `check` holds for the key scope (commits settle after the reply).
async fn eventually_key(mesh: &TestMesh, check: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..200 {
        let status = quota_status(mesh).await;
        if check(scope_of(&status, "key")) {
            return scope_of(&status, "key").clone();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    scope_of(&quota_status(mesh).await, "key").clone()
}

/// Lifts the default per-user limits (100 requests a minute would refuse load tests) and sets
/// the key's daily tokens.
async fn limit_key_tokens(edge: &str, http: &reqwest::Client, tokens_per_day: i64) {
    let user = put_limits(edge, http, json!({"scope": {"kind": "user", "id": "admin"}, "limits": {}})).await;
    assert_eq!(user.status(), 200);
    let key = json!({"scope": {"kind": "key", "id": "admin"}, "limits": {"tokens_per_day": tokens_per_day}});
    let set = put_limits(edge, http, key).await;
    assert_eq!(set.status(), 200);
    let body: Value = set.json().await.unwrap();
    assert_eq!(body["limits"]["tokens_per_day"], tokens_per_day);
}

/// Sends `n` chat requests at once to the given edges (round robin); returns each status and the
/// tokens charged to the 200s.
async fn burst(http: &reqwest::Client, edges: &[String], n: usize) -> (Vec<u16>, i64) {
    let requests = (0..n).map(|i| {
        let url = format!("{}/v1/chat/completions", edges[i % edges.len()]);
        let http = http.clone();
        async move {
            let body = json!({"model": CLOUD_MODEL, "max_tokens": 40,
                              "messages": [{"role": "user", "content": format!("concurrent request {i}")}]});
            let response = http.post(url).bearer_auth(ADMIN_KEY).json(&body).send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            let tokens = if status == 200 { body["usage"]["total_tokens"].as_i64().unwrap() } else { 0 };
            if status == 429 {
                assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
            }
            assert!(status == 200 || status == 429, "{status}: {body}");
            (status, tokens)
        }
    });
    let results = futures::future::join_all(requests).await;
    let charged = results.iter().map(|(_, t)| t).sum();
    (results.into_iter().map(|(s, _)| s).collect(), charged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_requests_never_spend_past_a_10000_token_daily_limit() {
    // Correctness under a burst, not latency: on a loaded 2-core CI machine a thousand scripts
    // queued on one Redis can take longer than the production deadlines.
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| {
            config.quota.redis.response_timeout_ms = 10_000;
            config.gateway.peer_timeout_ms = 20_000;
            // The mock's first piece too: a thousand at once can take over the 1 s test default.
            config.gateway.target_timeout_ms = 20_000;
            // The lease calls, and the reservations made once the budget is nearly spent, likewise
            // (a lease lives at least two call deadlines).
            config.gateway.leases.call_timeout_ms = 20_000;
            config.gateway.leases.ttl_ms = 40_000;
        }),
        ..MeshOptions::default()
    })
    .await;
    limit_key_tokens(&mesh.edge, &mesh.http, 10_000).await;

    let (statuses, charged) = burst(&mesh.http, std::slice::from_ref(&mesh.edge), 1_000).await;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(admitted + refused, 1_000, "only 200 or 429: {statuses:?}");
    assert!(admitted > 0 && refused > 0, "{admitted} admitted, {refused} refused");
    assert!(charged <= 10_000, "committed {charged} tokens over a 10000 limit");

    // Every admitted reply was committed exactly, and the holds are all gone.
    let key = eventually_key(&mesh, |k| k["reserved"]["tokens"] == 0 && k["used"]["tokens"] == charged).await;
    assert_eq!(key["used"]["tokens"], charged, "{key}");
    assert_eq!(key["used"]["requests"], admitted as i64);
    assert_eq!(key["remaining"]["tokens"], 10_000 - charged);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_two_quota_replicas_enforce_one_limit() {
    let configs = Arc::new(Mutex::new(None));
    let captured = configs.clone();
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(move |config| *captured.lock() = Some((config.gateway.clone(), config.quota.clone()))),
        ..MeshOptions::default()
    })
    .await;
    let (mut gateway_config, quota_config) = configs.lock().take().unwrap();

    // A second quota replica on the same Redis key space and database, and a second gateway
    // that reserves through it and shares the rest of the mesh.
    let shutdown = Shutdown::new();
    let quota_listeners = mesh.listeners("quota").await;
    let quota_url = format!("http://{}", quota_listeners.grpc_addr());
    let quota = tokio::spawn(meshgate_quota::serve(quota_config, quota_listeners, shutdown.clone()));
    gateway_config.quota_endpoint = quota_url;
    gateway_config.router_endpoint = mesh.grpc_url("router");
    gateway_config.sync_endpoint = mesh.grpc_url("sync");
    gateway_config.inference_endpoint = mesh.grpc_url("inference");
    gateway_config.analytics_endpoint = mesh.grpc_url("analytics");
    let gateway_listeners = mesh.listeners("gateway").await;
    let second_edge = format!("http://{}", gateway_listeners.http_addr().unwrap());
    let second_grpc = format!("http://{}", gateway_listeners.grpc_addr());
    let gateway = tokio::spawn(meshgate_gateway::serve(gateway_config, gateway_listeners, shutdown.clone()));
    let channel = mesh.identity("gateway").channel(&second_grpc, Duration::from_secs(1)).unwrap();
    meshgate_runtime::client::wait_serving(&channel, "", Duration::from_secs(30)).await.unwrap();

    // Limits set through the first gateway bind the second one on its next request.
    // About half of what the burst's replies use: both gateways see it spent (a lease recycles the
    // unused part of each estimate as replies settle, so the budget goes as far as the usage).
    limit_key_tokens(&mesh.edge, &mesh.http, 1_500).await;
    let edges = [mesh.edge.clone(), second_edge.clone()];
    let (statuses, charged) = burst(&mesh.http, &edges, 200).await;
    let refused_at = |edge: usize| statuses.iter().enumerate().filter(|(i, s)| i % 2 == edge && **s == 429).count();
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    assert!(refused_at(0) > 0 && refused_at(1) > 0, "both gateways refuse once the shared budget is spent");
    assert!(charged <= 1_500, "two gateways together committed {charged} tokens over a 1500 limit");
    let key = eventually_key(&mesh, |k| k["reserved"]["tokens"] == 0 && k["used"]["tokens"] == charged).await;
    assert_eq!(key["used"]["tokens"], charged);

    shutdown.trigger();
    gateway.await.unwrap().unwrap();
    quota.await.unwrap().unwrap();
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_minute_limit_answers_429_with_the_scope_limit_and_exact_retry_after() {
    let mesh = TestMesh::start().await;
    // Six a minute: the bucket drains one request every 10 s, far longer than this burst takes.
    let set = put_limits(
        &mesh.edge,
        &mesh.http,
        json!({"scope": {"kind": "user", "id": "admin"}, "limits": {"requests_per_minute": 6}}),
    )
    .await;
    assert_eq!(set.status(), 200);

    let mut remaining = Vec::new();
    for i in 0..6 {
        let response = mesh.chat(chat_body(CLOUD_MODEL, &format!("minute {i}"))).await;
        assert_eq!(response.status(), 200);
        let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
        remaining.push(header("x-meshgate-quota-remaining-requests").parse::<i64>().unwrap());
        assert!(header("x-meshgate-quota-reset").ends_with('Z'));
    }
    // Each admitted request took one from the bucket (draining adds at most one back).
    assert!(remaining.windows(2).all(|w| w[1] <= w[0]), "{remaining:?}");
    assert_eq!(remaining.last(), Some(&0), "{remaining:?}");

    let refused = mesh.chat(chat_body(CLOUD_MODEL, "one too many")).await;
    assert_eq!(refused.status(), 429);
    let header = |name: &str| refused.headers()[name].to_str().unwrap().to_owned();
    assert_eq!(header("x-meshgate-quota-limit"), "requests_per_minute");
    assert_eq!(header("x-meshgate-quota-scope"), "user:admin");
    let wait_ms: i64 = header("retry-after-ms").parse().unwrap();
    assert!((1..=10_000).contains(&wait_ms), "{wait_ms}");
    let retry_after: i64 = header("retry-after").parse().unwrap();
    assert_eq!(retry_after, (wait_ms + 999) / 1000, "Retry-After is the exact wait rounded up");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded");
    assert!(body["error"]["message"].as_str().unwrap().contains("requests_per_minute of user:admin"), "{body}");
    assert_eq!(mesh.alpha.stats().chat_requests, 6, "the refused request never reached a provider");

    let status = quota_status(&mesh).await;
    let user = scope_of(&status, "user");
    assert_eq!(user["limits"]["requests_per_minute"], 6);
    assert!(user["remaining"]["requests_this_minute"].as_i64().unwrap() <= 1, "{user}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_report_the_remaining_budget_in_headers() {
    let mesh = TestMesh::start().await;
    limit_key_tokens(&mesh.edge, &mesh.http, 5_000).await;
    let json_reply = mesh.chat(chat_body(CLOUD_MODEL, "how much is left?")).await;
    assert_eq!(json_reply.status(), 200);
    let left: i64 = json_reply.headers()["x-meshgate-quota-remaining-tokens"].to_str().unwrap().parse().unwrap();
    assert!(left < 5_000 && left > 4_000, "{left}");
    // No scope limits cost here: the header is left out rather than reporting a fake figure.
    assert!(!json_reply.headers().contains_key("x-meshgate-quota-remaining-cost-micros"));
    let cost_cap = json!({"scope": {"kind": "project", "id": "default"}, "limits": {"cost_micros_per_day": 2_000_000}});
    assert_eq!(put_limits(&mesh.edge, &mesh.http, cost_cap).await.status(), 200);
    let capped = mesh.chat(chat_body(CLOUD_MODEL, "and the cost?")).await;
    let cost: i64 = capped.headers()["x-meshgate-quota-remaining-cost-micros"].to_str().unwrap().parse().unwrap();
    assert!(cost <= 2_000_000, "{cost}");

    let mut stream_body = chat_body(CLOUD_MODEL, "and streamed?");
    stream_body["stream"] = json!(true);
    let streamed = mesh.chat(stream_body).await;
    assert_eq!(streamed.status(), 200);
    assert!(streamed.headers().contains_key("x-meshgate-quota-remaining-tokens"));
    assert!(streamed.headers().contains_key("x-meshgate-quota-reset"));
    streamed.text().await.unwrap();
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limits_endpoint_refuses_bad_input_and_writes_nothing() {
    let mesh = TestMesh::start().await;
    let good = json!({"scope": {"kind": "project", "id": "default"},
                      "limits": {"tokens_per_day": 777, "cost_micros_per_day": 5_000_000}});
    assert_eq!(put_limits(&mesh.edge, &mesh.http, good).await.status(), 200);

    let cases = [
        (json!({"scope": {"kind": "project", "id": "default"}, "limits": {"tokens_per_day": -1}}), 400),
        (json!({"scope": {"kind": "project", "id": "default"}, "limits": {"tokens_per_day": i64::MAX}}), 400),
        (json!({"scope": {"kind": "project", "id": "default"}, "limits": {"tokens_per_dya": 5}}), 400),
        (json!({"scope": {"kind": "team", "id": "default"}, "limits": {"tokens_per_day": 5}}), 400),
        (json!({"scope": {"kind": "project", "id": ""}, "limits": {"tokens_per_day": 5}}), 400),
        (json!({"scope": {"kind": "project", "id": "default"}, "limits": {"time_zone": "Europe/Paris"}}), 400),
        (json!({"scope": {"kind": "org", "id": "default"}, "limits": {"time_zone": "Mars/Olympus"}}), 400),
        (json!({"scope": {"kind": "org", "id": "another-tenant"}, "limits": {"tokens_per_day": 5}}), 404),
        (json!({"limits": {"tokens_per_day": 5}}), 400),
        (json!("not an object"), 400),
    ];
    for (body, status) in cases {
        let response = put_limits(&mesh.edge, &mesh.http, body.clone()).await;
        assert_eq!(response.status().as_u16(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert!(error["error"]["message"].is_string() && error["error"]["request_id"].is_string(), "{error}");
    }
    let unauthenticated = mesh
        .http
        .put(format!("{}/v1/quota/limits", mesh.edge))
        .json(&json!({"scope": {"kind": "key", "id": "admin"}, "limits": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);

    let status = quota_status(&mesh).await;
    let project = scope_of(&status, "project");
    assert_eq!(project["limits"]["tokens_per_day"], 777, "a refused request changed the limits");
    assert_eq!(project["limits"]["cost_micros_per_day"], 5_000_000);
    assert_eq!(status["object"], "quota.status");
    assert_eq!(status["scopes"].as_array().unwrap().len(), 4);
    assert_eq!(scope_of(&status, "org")["time_zone"], "UTC");

    // An org time zone set through the edge governs the window of every scope.
    let zoned = json!({"scope": {"kind": "org", "id": "default"}, "limits": {"time_zone": "Asia/Kolkata"}});
    let response = put_limits(&mesh.edge, &mesh.http, zoned).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["limits"]["time_zone"], "Asia/Kolkata");
    let status = quota_status(&mesh).await;
    let reset = scope_of(&status, "key")["reset_at"].as_str().unwrap().to_owned();
    // Midnight in India is 18:30 UTC.
    assert!(reset.ends_with("T18:30:00.000Z"), "{reset}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateways_reservation_is_reclaimed_after_its_ttl() {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| config.quota.reservation_ttl_secs = 1),
        ..MeshOptions::default()
    })
    .await;
    limit_key_tokens(&mesh.edge, &mesh.http, 1_000).await;
    // What a gateway killed between Reserve and Commit leaves behind: a hold nobody settles.
    let mut quota = QuotaClient::new(mesh.channel("quota"));
    let orphan = ReserveRequest {
        request_id: "killed-gateway-request".into(),
        principal: Some(admin_principal()),
        estimated_tokens: 990,
        estimated_cost_micros: 0,
        ttl_seconds: 0,
    };
    assert!(quota.reserve(orphan).await.unwrap().into_inner().admitted);
    let held = scope_of(&quota_status(&mesh).await, "key").clone();
    assert_eq!(held["reserved"]["tokens"], 990);
    let refused = mesh.chat(chat_body(CLOUD_MODEL, "blocked by the orphan")).await;
    assert_eq!(refused.status(), 429);

    let key = eventually_key(&mesh, |k| k["reserved"]["tokens"] == 0).await;
    assert_eq!((key["reserved"]["tokens"].as_i64(), key["used"]["tokens"].as_i64()), (Some(0), Some(0)));
    let served = mesh.chat(chat_body(CLOUD_MODEL, "the hold expired")).await;
    assert_eq!(served.status(), 200);
    mesh.stop().await;
}
