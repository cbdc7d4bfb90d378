//! The whole mesh, end to end: six services on ephemeral ports against real Postgres, Redis,
//! ONNX Runtime and the mock providers.

use std::time::Duration;

use futures::StreamExt;
use meshgate_mock_provider::StreamFault;
use meshgate_mock_provider::reply;
use meshgate_proto::common::v1::ChatMessage;
use meshgate_proto::gateway::v1::ChatRequest;
use meshgate_proto::gateway::v1::gateway_client::GatewayClient;
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_proto::quota::v1::{ScopeKind, ScopeStatus, StatusRequest};
use meshgate_proto::router::v1::router_client::RouterClient;
use meshgate_proto::router::v1::{ListTargetsRequest, TargetState};
use meshgate_tests::{ADMIN_KEY, CLOUD_MODEL, MeshOptions, TestMesh, chat_body, sse_events};
use serde_json::{Value, json};

fn assert_error_shape(body: &Value, code: &str) {
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    assert!(error["type"].is_string() && error["message"].is_string() && error["request_id"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_json_crosses_the_whole_mesh_in_process_and_leaves_a_trace() {
    chat_json_crosses_the_whole_mesh(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_json_crosses_the_whole_mesh_over_loopback_and_leaves_a_trace() {
    chat_json_crosses_the_whole_mesh(false).await;
}

async fn chat_json_crosses_the_whole_mesh(in_process: bool) {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(move |config| config.standalone.in_process_calls = in_process),
        ..MeshOptions::default()
    })
    .await;
    for (service, grpc, _) in mesh.addresses {
        assert_eq!(meshgate_runtime::in_process::registered(grpc), in_process, "{service}");
    }
    let response = mesh
        .http
        .post(format!("{}/v1/chat/completions", mesh.edge))
        .bearer_auth(ADMIN_KEY)
        .header("x-request-id", "req-json-1")
        .json(&chat_body(CLOUD_MODEL, "hello mesh world"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-json-1");
    let request_id = response.headers()["x-meshgate-request-id"].to_str().unwrap().to_owned();
    assert_ne!(request_id, "req-json-1", "the gateway keys the request by its own id");
    assert_eq!(response.headers()["x-meshgate-target"], "alpha/mock-gpt");
    let trace_id = response.headers()["x-meshgate-trace-id"].to_str().unwrap().to_owned();
    assert_eq!(trace_id.len(), 32);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], reply::reply_text("hello mesh world", 0, Some(64)));
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let prompt = reply::prompt_tokens(["hello mesh world"]) as i64;
    assert_eq!(body["usage"]["prompt_tokens"], prompt);
    assert_eq!(mesh.alpha.count_for_request_id(&request_id), 1);
    assert_eq!(mesh.beta.stats().requests_total, 0);

    let trace = mesh.trace(&request_id).await;
    assert_eq!(trace.served_target, "alpha/mock-gpt");
    assert_eq!(trace.requested_model, CLOUD_MODEL);
    assert_eq!(trace.status_code, 200);
    assert_eq!(trace.trace_id, trace_id);
    assert_eq!(trace.usage.unwrap().prompt_tokens, prompt);
    assert_eq!(trace.calls.len(), 1);
    let addresses = mesh.addresses;
    mesh.stop().await;
    for (service, grpc, _) in addresses {
        assert!(!meshgate_runtime::in_process::registered(grpc), "{service} left the registry when it stopped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_openai_chunks_with_usage() {
    let mesh = TestMesh::start().await;
    let mut body = chat_body(CLOUD_MODEL, "stream these words please");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = mesh.chat(body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).and_then(|choice| choice["delta"]["content"].as_str()))
        .collect();
    assert_eq!(content, reply::reply_text("stream these words please", 0, Some(64)));
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()), "usage is null until the last chunk");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], reply::prompt_tokens(["stream these words please"]));
    assert!(usage["usage"]["completion_tokens"].as_i64().unwrap() > 0);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_the_second_provider_on_500_and_on_timeout() {
    let mesh = TestMesh::start().await;
    mesh.alpha.set_failures(1.0, 500);
    let response = mesh.chat(chat_body(CLOUD_MODEL, "first fails")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-meshgate-target"], "beta/mock-gpt");
    assert!(mesh.alpha.stats().requests_total >= 1);
    // Outcomes reach the router in the background: alpha's failure and beta's success.
    let mut router = RouterClient::new(mesh.channel("router"));
    let mut seen = (0, 0);
    for _ in 0..100 {
        let targets = router.list_targets(ListTargetsRequest {}).await.unwrap().into_inner().targets;
        let count = |id: &str, pick: fn(&TargetState) -> i64| {
            targets.iter().find(|t| t.target.as_ref().is_some_and(|t| t.id == id)).map_or(0, pick)
        };
        seen = (count("alpha/mock-gpt", |t| t.failures), count("beta/mock-gpt", |t| t.successes));
        if seen.0 >= 1 && seen.1 >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen.0 >= 1 && seen.1 >= 1, "the router learned both outcomes: {seen:?}");

    mesh.alpha.set_failures(0.0, 500);
    mesh.alpha.set_hang(true);
    let started = std::time::Instant::now();
    let mut body = chat_body(CLOUD_MODEL, "first hangs");
    body["stream"] = json!(true);
    let response = mesh.chat(body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-meshgate-target"], "beta/mock-gpt");
    let text = response.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5), "the hung target is abandoned after the 1 s target timeout");

    mesh.beta.set_failures(1.0, 503);
    let response = mesh.chat(chat_body(CLOUD_MODEL, "both fail")).await;
    assert!(response.status().is_server_error());
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("all 2 targets failed"), "{body}");
    mesh.alpha.set_hang(false);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_key_is_401_with_the_error_shape() {
    let mesh = TestMesh::start().await;
    let url = format!("{}/v1/chat/completions", mesh.edge);
    let body = chat_body(CLOUD_MODEL, "hi");
    let anonymous = mesh.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_error_shape(&anonymous.json().await.unwrap(), "invalid_api_key");
    let wrong = mesh.http.post(&url).bearer_auth("sk-wrong").json(&body).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let wrong_body: Value = wrong.json().await.unwrap();
    assert_error_shape(&wrong_body, "invalid_api_key");
    let models = mesh.http.get(format!("{}/v1/models", mesh.edge)).send().await.unwrap();
    assert_eq!(models.status(), 401);
    assert_eq!(mesh.alpha.stats().requests_total + mesh.beta.stats().requests_total, 0);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_daily_tokens_answer_429_with_retry_after() {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| config.quota.defaults.key.tokens_per_day = 200),
        ..MeshOptions::default()
    })
    .await;
    let mut statuses = Vec::new();
    let mut charged = 0;
    for i in 0..40 {
        let response = mesh.chat(chat_body(CLOUD_MODEL, &format!("spend budget {i}"))).await;
        let status = response.status().as_u16();
        statuses.push(status);
        if status == 429 {
            let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=86_400).contains(&retry_after));
            assert_error_shape(&response.json().await.unwrap(), "quota_exceeded");
            break;
        }
        assert_eq!(status, 200);
        let body: Value = response.json().await.unwrap();
        charged += body["usage"]["total_tokens"].as_i64().unwrap();
        // Commits settle asynchronously after the reply: the next request starts once this one's
        // hold is gone.
        eventually_key_scope(&mesh, |s| s.reserved_tokens == 0).await;
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    assert!(statuses.len() > 1, "the first requests fit the budget: {statuses:?}");
    assert!(charged <= 200, "admitted requests never exceed the daily limit: {charged}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_six_services_report_serving_and_expose_admin_endpoints() {
    let mesh = TestMesh::start().await;
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    for (name, _, _) in mesh.addresses {
        assert_eq!(mesh.health(name).await, Some(serving), "{name}");
        let admin = mesh.admin_url(name);
        assert_eq!(mesh.http.get(format!("{admin}/livez")).send().await.unwrap().status(), 200);
        assert_eq!(mesh.http.get(format!("{admin}/readyz")).send().await.unwrap().status(), 200, "{name}");
        let metrics = mesh.http.get(format!("{admin}/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(metrics.contains("meshgate_grpc_server_requests_total"), "{name}: {metrics}");
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_with_the_error_shape() {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| config.gateway.max_body_bytes = 4096),
        ..MeshOptions::default()
    })
    .await;
    let url = format!("{}/v1/chat/completions", mesh.edge);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (mesh.http.post(&url).body("{not json"), 400, "invalid_request"),
        (mesh.http.post(&url).json(&json!({"messages": []})), 400, "invalid_request"),
        (mesh.http.post(&url).json(&json!({"model": 5, "messages": []})), 400, "invalid_request"),
        (mesh.http.post(&url).json(&chat_body("no-such-model", "hi")), 404, "model_not_found"),
        (mesh.http.post(&url).json(&chat_body(CLOUD_MODEL, &"x".repeat(5000))), 413, "payload_too_large"),
        (mesh.http.get(&url), 405, "invalid_request"),
        (mesh.http.get(format!("{}/v1/nothing", mesh.edge)), 404, "not_found"),
    ];
    for (request, status, code) in cases {
        let response = request.bearer_auth(ADMIN_KEY).send().await.unwrap();
        assert_eq!(response.status().as_u16(), status);
        assert!(response.headers().contains_key("x-request-id"));
        assert_error_shape(&response.json().await.unwrap(), code);
    }
    assert_eq!(mesh.alpha.stats().requests_total, 0);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_gateway_chat_streams_and_lists_models() {
    let mesh = TestMesh::start().await;
    let mut client = GatewayClient::new(mesh.channel("gateway"));
    let mut request = tonic::Request::new(ChatRequest {
        model: CLOUD_MODEL.into(),
        messages: vec![ChatMessage { role: "user".into(), content: "grpc says hi".into(), ..Default::default() }],
        sampling: None,
        options: None,
    });
    request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_KEY}").parse().unwrap());
    let mut stream = client.chat(request).await.unwrap().into_inner();
    let mut text = String::new();
    let mut last = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        text.push_str(&chunk.delta);
        last = Some(chunk);
    }
    let last = last.unwrap();
    assert_eq!(text, reply::reply_text("grpc says hi", 0, None));
    assert_eq!(last.finish_reason, "stop");
    assert_eq!(last.usage.unwrap().prompt_tokens, reply::prompt_tokens(["grpc says hi"]) as i64);

    let unauthenticated =
        client.chat(ChatRequest { model: CLOUD_MODEL.into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);

    let models = mesh.http.get(format!("{}/v1/models", mesh.edge)).bearer_auth(ADMIN_KEY).send().await.unwrap();
    let models: Value = models.json().await.unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert!(ids.contains(&CLOUD_MODEL), "{models}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_stores_serve_the_same_path_without_postgres_or_redis() {
    let mesh = TestMesh::start_with(MeshOptions { stores: false, ..MeshOptions::default() }).await;
    let response = mesh.chat(chat_body(CLOUD_MODEL, "no stores here")).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], reply::reply_text("no stores here", 0, Some(64)));
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_models_are_served_by_the_inference_service() {
    let mesh = TestMesh::start().await;
    // The router learns local models from the inference service in the background.
    let mut listed = false;
    for _ in 0..100 {
        let models = mesh.http.get(format!("{}/v1/models", mesh.edge)).bearer_auth(ADMIN_KEY).send().await.unwrap();
        let models: Value = models.json().await.unwrap();
        if models["data"].as_array().unwrap().iter().any(|m| m["id"] == "tiny-chat" && m["owned_by"] == "local") {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(listed, "tiny-chat is listed as a local model");

    let mut body = chat_body("tiny-chat", "hello local model");
    body["max_tokens"] = json!(8);
    let response = mesh.chat(body.clone()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-meshgate-target"], "local/tiny-chat");
    let json: Value = response.json().await.unwrap();
    let usage = &json["usage"];
    assert!(usage["prompt_tokens"].as_i64().unwrap() > 0, "{json}");
    assert!((1..=8).contains(&usage["completion_tokens"].as_i64().unwrap()), "{json}");

    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let streamed = mesh.chat(body).await.text().await.unwrap();
    let events = sse_events(&streamed);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).and_then(|choice| choice["delta"]["content"].as_str()))
        .collect();
    // Greedy decoding is deterministic: the stream says what the JSON reply said.
    assert_eq!(text, json["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["usage"], *usage);
    assert_eq!(mesh.alpha.stats().requests_total + mesh.beta.stats().requests_total, 0);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_quota_service_is_a_503_and_recovery_needs_no_restart() {
    use meshgate::MeshListeners;
    use meshgate_runtime::{ListenConfig, Listeners, Shutdown};

    meshgate_runtime::telemetry::init("meshgate-tests");
    let provider = meshgate_mock_provider::MockProvider::start().await.unwrap();
    let mut config = meshgate_tests::base_config(&[("alpha", &provider)], true);
    let listeners = MeshListeners::ephemeral().await.unwrap();
    config.wire(&listeners);
    let mesh = config.security().unwrap();
    let MeshListeners { gateway, inference: _, router, quota, analytics, sync } = listeners.identify(&mesh).unwrap();
    let quota_addr = quota.grpc_addr();
    // Free the port: the gateway's connections are refused until quota starts there.
    drop(quota);
    let shutdown = Shutdown::new();
    let edge = format!("http://{}", gateway.http_addr().unwrap());
    tokio::spawn(meshgate_gateway::serve(config.gateway.clone(), gateway, shutdown.clone()));
    tokio::spawn(meshgate_router::serve(config.router.clone(), router, shutdown.clone()));
    tokio::spawn(meshgate_analytics::serve(config.analytics.clone(), analytics, shutdown.clone()));
    tokio::spawn(meshgate_sync::serve(config.sync.clone(), sync, shutdown.clone()));

    let http = reqwest::Client::new();
    let chat = || {
        http.post(format!("{edge}/v1/chat/completions"))
            .bearer_auth(ADMIN_KEY)
            .json(&chat_body(CLOUD_MODEL, "is quota up"))
            .timeout(Duration::from_secs(5))
            .send()
    };
    let mut down = None;
    for _ in 0..100 {
        match chat().await {
            Ok(response) => {
                down = Some(response);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let down = down.expect("the edge answers while quota is down");
    assert_eq!(down.status(), 503);
    let body: Value = down.json().await.unwrap();
    assert_error_shape(&body, "service_unavailable");
    assert!(body["error"]["message"].as_str().unwrap().contains("quota"), "{body}");
    assert_eq!(provider.stats().requests_total, 0, "nothing reaches a provider without a reservation");

    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let quota = Listeners::bind(&ListenConfig { grpc: quota_addr, admin: any, http: None }).await.unwrap();
    let quota = quota.with_identity(mesh.identity("quota").unwrap());
    tokio::spawn(meshgate_quota::serve(config.quota.clone(), quota, shutdown.clone()));
    let mut recovered = false;
    for _ in 0..100 {
        if chat().await.map(|r| r.status() == 200).unwrap_or(false) {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the gateway uses quota once it is back, without a restart");
    shutdown.trigger();
}

/// The admin key's quota scope as the quota service reports it.
async fn key_scope(mesh: &TestMesh) -> ScopeStatus {
    let mut quota = QuotaClient::new(mesh.channel("quota"));
    let principal = meshgate_proto::common::v1::Principal {
        org_id: "default".into(),
        project_id: "default".into(),
        user_id: "admin".into(),
        key_id: "admin".into(),
        role: meshgate_proto::common::v1::Role::Owner as i32,
    };
    let status = quota.status(StatusRequest { principal: Some(principal) }).await.unwrap().into_inner();
    status
        .scopes
        .into_iter()
        .find(|s| s.scope.as_ref().is_some_and(|scope| scope.kind == ScopeKind::Key as i32))
        .unwrap()
}

/// Polls until `check` holds for the key scope (settlement runs after the reply).
async fn eventually_key_scope(mesh: &TestMesh, check: impl Fn(&ScopeStatus) -> bool) -> ScopeStatus {
    for _ in 0..100 {
        let scope = key_scope(mesh).await;
        if check(&scope) {
            return scope;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    key_scope(mesh).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_client_request_id_is_charged_and_traced_every_time() {
    let mesh = TestMesh::start().await;
    let mut charged = 0;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let response = mesh
            .http
            .post(format!("{}/v1/chat/completions", mesh.edge))
            .bearer_auth(ADMIN_KEY)
            .header("x-request-id", "same-id")
            .json(&chat_body(CLOUD_MODEL, "charge me twice"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-request-id"], "same-id");
        ids.push(response.headers()["x-meshgate-request-id"].to_str().unwrap().to_owned());
        let body: Value = response.json().await.unwrap();
        charged += body["usage"]["total_tokens"].as_i64().unwrap();
    }
    assert_ne!(ids[0], ids[1]);
    // The replica's lease is given back once it is idle.
    let scope = eventually_key_scope(&mesh, |s| s.used_tokens == charged && s.reserved_tokens == 0).await;
    assert_eq!(scope.used_tokens, charged, "both requests are charged");
    assert_eq!(scope.reserved_tokens, 0);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_failing_after_its_first_bytes_ends_with_an_error_event_and_no_fallback() {
    let mesh = TestMesh::start().await;
    mesh.alpha.update(|b| {
        b.fail_after_chunks = Some(2);
        b.stream_fault = StreamFault::ErrorEvent;
    });
    let mut body = chat_body(CLOUD_MODEL, "one two three four five six");
    body["stream"] = json!(true);
    let response = mesh.chat(body).await;
    assert_eq!(response.status(), 200, "the status was sent with the first bytes");
    let text = response.text().await.unwrap();
    let events = sse_events(&text);
    assert!(!events.contains(&"[DONE]".to_owned()), "{text}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_error_shape(&last, "upstream_error");
    let content: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert!(!content.is_empty(), "the first pieces reached the client");
    assert_eq!(mesh.beta.stats().requests_total, 0, "no fallback once bytes reached the client");
    let scope = eventually_key_scope(&mesh, |s| s.reserved_tokens == 0 && s.used_tokens > 0).await;
    assert!(scope.used_tokens > 0, "what was produced is charged");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_no_target_serves_releases_its_reservation() {
    let mesh = TestMesh::start().await;
    mesh.alpha.set_failures(1.0, 500);
    mesh.beta.set_failures(1.0, 500);
    let response = mesh.chat(chat_body(CLOUD_MODEL, "nobody answers")).await;
    assert_eq!(response.status(), 502);
    assert_error_shape(&response.json().await.unwrap(), "upstream_error");
    let scope = eventually_key_scope(&mesh, |s| s.reserved_tokens == 0).await;
    assert_eq!((scope.reserved_tokens, scope.used_tokens), (0, 0));
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_is_charged_for_what_was_produced_and_no_target_is_blamed() {
    let mesh = TestMesh::start().await;
    mesh.alpha.update(|b| {
        b.stream_chunks = 50;
        b.chunk_delay = Duration::from_millis(50);
    });
    let mut body = chat_body(CLOUD_MODEL, "a long answer please");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(100);
    let response = mesh.chat(body).await;
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let first = bytes.next().await.expect("first bytes").unwrap();
    assert!(first.starts_with(b"data: "));
    drop(bytes);

    let scope = eventually_key_scope(&mesh, |s| s.reserved_tokens == 0 && s.used_tokens > 0).await;
    assert_eq!(scope.reserved_tokens, 0, "the reservation is settled, not left to its TTL");
    assert!(scope.used_tokens > 0, "the tokens produced before the client left are charged");
    // The whole answer would be 50 completion tokens plus the prompt: the charge is only the
    // part produced before the client left (the provider's work stops with it).
    assert!(scope.used_tokens < 40, "charged {} tokens", scope.used_tokens);

    // Once the call's outcome is back at the router (nothing in flight), it blamed no one.
    let mut router = RouterClient::new(mesh.channel("router"));
    let mut alpha = None;
    for _ in 0..200 {
        let targets = router.list_targets(ListTargetsRequest {}).await.unwrap().into_inner().targets;
        let state = targets.into_iter().find(|t| t.target.as_ref().is_some_and(|t| t.id == "alpha/mock-gpt")).unwrap();
        if state.in_flight == 0 {
            alpha = Some(state);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let alpha = alpha.expect("the call's outcome reaches the router");
    assert_eq!(alpha.failures, 0, "a client that leaves says nothing about the provider");
    mesh.stop().await;
}
