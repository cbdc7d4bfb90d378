//! The edge's contract as a booted gateway serves it: `/openapi.json` is an OpenAPI 3.1 document
//! whose operations are exactly the routes the router answers (each documented method answers,
//! every other method on the same path is a 405, an undocumented path a 404), every operation
//! documents its errors in the one JSON error shape, and `/docs` is a self-contained HTML page.

use std::collections::BTreeSet;

use meshgate_tests::{MeshOptions, TestMesh};
use reqwest::Method;
use serde_json::Value;

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch"];

/// A mesh that does not throttle this test's many requests without a key.
async fn mesh() -> TestMesh {
    TestMesh::start_with(MeshOptions {
        stores: false,
        tune: Box::new(|config| config.gateway.max_auth_failures_per_minute = 10_000),
    })
    .await
}

/// `/v1/keys/{id}` → `/v1/keys/probe-id`.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|segment| if segment.starts_with('{') && segment.ends_with('}') { "probe-id" } else { segment })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_is_openapi_3_1_and_matches_the_router() {
    let mesh = mesh().await;
    let response = mesh.http.get(format!("{}/openapi.json", mesh.edge)).send().await.expect("edge answers");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert!(response.headers().contains_key("x-meshgate-request-id"));
    let spec: Value = response.json().await.expect("JSON");
    assert!(spec["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "{}", spec["openapi"]);
    assert!(spec["info"]["title"].is_string() && spec["info"]["version"].is_string());
    assert_eq!(spec["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_eq!(spec, *meshgate_gateway::openapi::spec(), "the served document is the one built from the code");

    let paths = spec["paths"].as_object().expect("paths");
    let tags: BTreeSet<&str> = meshgate_gateway::openapi::TAGS.iter().map(|(name, _)| *name).collect();
    let mut operations = 0;
    for (path, item) in paths {
        let url = format!("{}{}", mesh.edge, concrete(path));
        for method in METHODS {
            let documented = item.get(*method);
            let response = mesh
                .http
                .request(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(), &url)
                .send()
                .await
                .expect("edge answers");
            let status = response.status().as_u16();
            let Some(op) = documented else {
                assert_eq!(status, 405, "{method} {path} is not documented, so it must not be served");
                continue;
            };
            operations += 1;
            let id = op["operationId"].as_str().expect("an operation id");
            let op_tags: Vec<&str> = op["tags"].as_array().expect("tags").iter().filter_map(Value::as_str).collect();
            assert!(op_tags.len() == 1 && tags.contains(op_tags[0]), "{id}: tags {op_tags:?}");
            let public = op["security"].as_array().is_some_and(Vec::is_empty);
            if public {
                assert_eq!(status, 200, "{method} {path} needs no key");
                continue;
            }
            // Served (not the router's 404 or 405) and refused for want of a key, as documented.
            assert_eq!(status, 401, "{method} {path} without a key");
            let request_id = response.headers()["x-meshgate-request-id"].to_str().unwrap().to_owned();
            let body: Value = response.json().await.expect("the JSON error shape");
            // The Anthropic endpoints answer in Anthropic's error shape, as its SDKs expect.
            let anthropic = op_tags[0] == "anthropic";
            if anthropic {
                assert_eq!(
                    (body["type"].as_str(), body["error"]["type"].as_str()),
                    (Some("error"), Some("authentication_error")),
                    "{id}"
                );
            } else {
                assert_eq!(body["error"]["code"], "invalid_api_key", "{id}");
                assert_eq!(body["error"]["request_id"], request_id.as_str(), "{id}");
            }
            let responses = op["responses"].as_object().expect("responses");
            for status in ["400", "401", "403", "429", "503"] {
                let error = &responses[status];
                assert!(error.is_object(), "{id} documents {status}");
                let schema = &error["content"]["application/json"]["schema"];
                if anthropic {
                    assert_eq!(schema["$ref"], "#/components/schemas/AnthropicError", "{id} {status}");
                } else {
                    assert_eq!(schema["allOf"][0]["$ref"], "#/components/schemas/Error", "{id} {status}");
                }
                assert_eq!(error["headers"]["x-meshgate-request-id"]["required"], true, "{id} {status}");
            }
            assert!(responses.keys().any(|s| s.starts_with('2')), "{id} documents its success");
        }
    }
    assert!(operations >= 26, "{operations} operations");
    for (path, method) in [("/v1/chat/completions", "post"), ("/v1/keys/{id}/rotate", "post"), ("/docs", "get")] {
        assert!(paths[path][method].is_object(), "{method} {path} is documented");
    }
    let response = mesh.http.get(format!("{}/v1/not-a-route", mesh.edge)).send().await.expect("edge answers");
    assert_eq!(response.status(), 404, "an undocumented path is not served");
    mesh.shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_page_is_self_contained_html_for_every_operation() {
    let mesh = mesh().await;
    let response = mesh.http.get(format!("{}/docs", mesh.edge)).send().await.expect("edge answers");
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = response.text().await.expect("text");
    assert!(html.starts_with("<!doctype html>"));
    assert!(!html.contains("<script") && !html.contains("src=\"http") && !html.contains("href=\"http"), "no CDN");
    let spec = meshgate_gateway::openapi::spec();
    for (path, method, op) in meshgate_gateway::openapi::operations(spec) {
        let id = op["operationId"].as_str().unwrap();
        assert!(html.contains(&format!("id=\"op-{id}\"")), "{method} {path} is on the page");
    }
    for code in ["invalid_api_key", "policy_violation", "quota_exceeded"] {
        assert!(html.contains(&format!("<code>{code}</code>")), "{code} is in the error table");
    }
    assert!(html.contains("x-meshgate-risk-score"));
    mesh.shutdown.trigger();
}

/// What the fuzzer found: a NUL character (which Postgres text and JSONB cannot hold) in an id, a
/// body field or a stored document is the client's error (4xx), never a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_anywhere_is_a_client_error() {
    let mesh = TestMesh::start().await;
    let call = |method: Method, path: &str, body: Option<Value>| {
        let mut request =
            mesh.http.request(method, format!("{}{path}", mesh.edge)).bearer_auth(meshgate_tests::ADMIN_KEY);
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move { request.send().await.expect("edge answers").status().as_u16() }
    };
    let nul = "x\u{0}y";
    let message = serde_json::json!([{"role": "user", "content": nul}]);
    let cases = [
        (Method::POST, "/v1/users".to_owned(), Some(serde_json::json!({"email": "a@b.c", "org_id": nul})), 400),
        (Method::POST, "/v1/projects".to_owned(), Some(serde_json::json!({"name": nul})), 400),
        (Method::GET, "/v1/projects/x%00y/policy".to_owned(), None, 400),
        (Method::GET, "/v1/keys/x%00y".to_owned(), None, 400),
        (Method::GET, "/v1/keys?project_id=x%00y".to_owned(), None, 400),
        (
            Method::PUT,
            "/v1/projects/default/policy".to_owned(),
            Some(serde_json::json!({"blocked_keywords": [nul]})),
            400,
        ),
        (
            Method::PUT,
            "/v1/projects/default/limits".to_owned(),
            Some(serde_json::json!({"allowed_models": [nul]})),
            400,
        ),
        (Method::GET, "/v1/jobs/x%00y".to_owned(), None, 404),
        (Method::POST, "/v1/jobs/x%00y/retry".to_owned(), None, 404),
    ];
    for (method, path, body, expected) in cases {
        assert_eq!(call(method.clone(), &path, body).await, expected, "{method} {path}");
    }
    // Prompts may carry any character: they are served or refused, never a server error.
    let chat = serde_json::json!({"model": meshgate_tests::CLOUD_MODEL, "messages": message});
    for path in ["/v1/chat/completions", "/v1/jobs"] {
        let status = call(Method::POST, path, Some(chat.clone())).await;
        assert!(status < 500, "POST {path}: {status}");
    }
    mesh.shutdown.trigger();
}

/// The codes an operation documents under `status` in the served document.
fn documented_codes<'a>(spec: &'a Value, operation_id: &str, status: u16) -> Vec<&'a str> {
    let (_, _, op) = meshgate_gateway::openapi::operations(spec)
        .find(|(_, _, op)| op["operationId"] == operation_id)
        .unwrap_or_else(|| panic!("{operation_id} is documented"));
    let schema = &op["responses"][status.to_string()]["content"]["application/json"]["schema"];
    schema["properties"]["error"]["properties"]["code"]["enum"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// Every code some operation of the document lists.
fn every_documented_code(spec: &Value) -> BTreeSet<String> {
    let mut codes = BTreeSet::new();
    for (_, _, op) in meshgate_gateway::openapi::operations(spec) {
        for response in op["responses"].as_object().into_iter().flatten().map(|(_, r)| r) {
            let schema = &response["content"]["application/json"]["schema"];
            let listed = schema["properties"]["error"]["properties"]["code"]["enum"].as_array();
            codes.extend(listed.into_iter().flatten().filter_map(Value::as_str).map(str::to_owned));
        }
    }
    codes
}

/// Records what the edge answered `operation_id` when provoked for `code`: the status the code's
/// table entry fixes, the code in the JSON error shape, and the operation's document listing that
/// code under that status.
async fn provoked(seen: &mut BTreeSet<String>, operation_id: &str, code: &str, response: reqwest::Response) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(body["error"]["code"], code, "{operation_id}: {status} {body}");
    let expected = meshgate_runtime::ErrorCode::parse(code).expect("a code of the table").http_status().as_u16();
    assert_eq!(status, expected, "{operation_id} answered {code}: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{operation_id}: {body}");
    let documented = documented_codes(meshgate_gateway::openapi::spec(), operation_id, status);
    assert!(documented.contains(&code), "{operation_id} answered {status} {code} but documents {documented:?}");
    seen.insert(code.to_owned());
}

/// Replaces the test that re-derived the document's status of each code from the table it was
/// built from: here every code the document lists is provoked on a real mesh (Postgres, Redis,
/// the mock providers), and each answer must carry the status, shape and code the document gives
/// for that operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_error_code_is_answered_as_documented() {
    use meshgate_tests::{ADMIN_KEY, CLOUD_MODEL, chat_body};
    use serde_json::json;

    let gateway = std::sync::Arc::new(parking_lot::Mutex::new(None));
    let captured = gateway.clone();
    let mesh = TestMesh::start_with(MeshOptions {
        stores: true,
        tune: Box::new(move |config| {
            config.gateway.max_auth_failures_per_minute = 3;
            config.gateway.max_concurrent_requests = 2;
            config.gateway.max_body_bytes = 64 * 1024;
            config.gateway.idle_timeout_ms = 400;
            config.quota.defaults.key.tokens_per_day = 5_000;
            *captured.lock() = Some(config.gateway.clone());
        }),
    })
    .await;
    let gateway: meshgate_gateway::Config = gateway.lock().take().expect("the mesh's gateway configuration");
    let database = gateway.database_url.clone().expect("the mesh's database");
    let spec = meshgate_gateway::openapi::spec();
    let edge = mesh.edge.clone();
    let http = mesh.http.clone();
    let admin = |method: Method, path: &str| http.request(method, format!("{edge}{path}")).bearer_auth(ADMIN_KEY);
    let chat =
        |key: &str, body: Value| http.post(format!("{edge}/v1/chat/completions")).bearer_auth(key).json(&body).send();
    let mut seen = BTreeSet::new();

    let bad = chat(ADMIN_KEY, json!({"model": CLOUD_MODEL, "messages": "not a list"})).await.unwrap();
    provoked(&mut seen, "createChatCompletion", "invalid_request", bad).await;
    let anonymous = http.get(format!("{edge}/v1/models")).send().await.unwrap();
    provoked(&mut seen, "listModels", "invalid_api_key", anonymous).await;
    let unknown = chat(ADMIN_KEY, chat_body("no-such-model", "hello")).await.unwrap();
    provoked(&mut seen, "createChatCompletion", "model_not_found", unknown).await;
    let missing = admin(Method::GET, "/v1/responses/resp_missing").send().await.unwrap();
    provoked(&mut seen, "getResponse", "not_found", missing).await;
    let org = json!({"id": "provoked-org", "name": "Provoked"});
    assert_eq!(admin(Method::POST, "/v1/orgs").json(&org).send().await.unwrap().status(), 201);
    let again = admin(Method::POST, "/v1/orgs").json(&org).send().await.unwrap();
    provoked(&mut seen, "createOrganization", "conflict", again).await;
    // Refused before its body is read, so the server closes the connection after answering: the
    // client must not pool it for the next request (a reused one would be cut, IncompleteMessage).
    let huge = http.post(format!("{edge}/v1/chat/completions")).bearer_auth(ADMIN_KEY).header("connection", "close");
    let huge = huge.json(&chat_body(CLOUD_MODEL, &"x".repeat(100 * 1024))).send().await.unwrap();
    provoked(&mut seen, "createChatCompletion", "payload_too_large", huge).await;
    let batch = admin(Method::POST, "/v1/sync/batches")
        .header("idempotency-key", "edge-1")
        .header("content-type", "text/plain");
    let batch = batch.body("x").send().await;
    provoked(&mut seen, "uploadEdgeBatch", "unsupported_media_type", batch.unwrap()).await;
    let policy = json!({"blocked_keywords": ["provokedword"]});
    assert_eq!(admin(Method::PUT, "/v1/projects/default/policy").json(&policy).send().await.unwrap().status(), 200);
    let blocked = chat(ADMIN_KEY, chat_body(CLOUD_MODEL, "say provokedword")).await.unwrap();
    provoked(&mut seen, "createChatCompletion", "policy_violation", blocked).await;

    // A key held to the chat endpoint may not list models.
    let scoped = json!({"service": true, "role": "developer", "scopes": {"endpoints": ["chat"]}});
    let scoped: Value = admin(Method::POST, "/v1/keys").json(&scoped).send().await.unwrap().json().await.unwrap();
    let scoped = scoped["secret"].as_str().expect("a key").to_owned();
    let denied = http.get(format!("{edge}/v1/models")).bearer_auth(&scoped).send().await.unwrap();
    provoked(&mut seen, "listModels", "permission_denied", denied).await;
    // Its day of tokens spent (limits are per key): the next request is refused.
    let mut refused = None;
    for _ in 0..50 {
        let response = chat(&scoped, chat_body(CLOUD_MODEL, &"tokens ".repeat(400))).await.unwrap();
        if response.status() == 429 {
            refused = Some(response);
            break;
        }
        assert_eq!(response.status(), 200);
    }
    provoked(&mut seen, "createChatCompletion", "quota_exceeded", refused.expect("the budget runs out")).await;

    // Both providers too small for the prompt; then both failing; then both stalling mid-reply.
    for provider in [&mesh.alpha, &mesh.beta] {
        provider.update(|b| b.context_window = Some(50));
    }
    let long = chat(ADMIN_KEY, chat_body(CLOUD_MODEL, &"word ".repeat(200))).await.unwrap();
    provoked(&mut seen, "createChatCompletion", "context_length_exceeded", long).await;
    for provider in [&mesh.alpha, &mesh.beta] {
        provider.update(|b| b.context_window = None);
        provider.set_failures(1.0, 500);
    }
    let failing = chat(ADMIN_KEY, chat_body(CLOUD_MODEL, "hello")).await.unwrap();
    provoked(&mut seen, "createChatCompletion", "upstream_error", failing).await;
    for provider in [&mesh.alpha, &mesh.beta] {
        provider.set_failures(0.0, 500);
        provider.update(|b| {
            b.stream_chunks = 4;
            b.chunk_delay = std::time::Duration::from_millis(1_500);
        });
    }
    let stalled = chat(ADMIN_KEY, chat_body(CLOUD_MODEL, "hello")).await.unwrap();
    provoked(&mut seen, "createChatCompletion", "timeout", stalled).await;

    // Two streams in flight fill the edge (a place each); the third request is shed.
    for provider in [&mesh.alpha, &mesh.beta] {
        provider.update(|b| {
            b.stream_chunks = 10;
            b.chunk_delay = std::time::Duration::from_millis(200);
        });
    }
    let mut streaming = chat_body(CLOUD_MODEL, "a long story");
    streaming["stream"] = json!(true);
    let open = [chat(ADMIN_KEY, streaming.clone()).await.unwrap(), chat(ADMIN_KEY, streaming).await.unwrap()];
    assert!(open.iter().all(|r| r.status() == 200));
    let shed = admin(Method::GET, "/v1/models").send().await.unwrap();
    provoked(&mut seen, "listModels", "overloaded", shed).await;
    for response in open {
        assert!(response.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    }

    // A project whose stored policy no longer parses fails its requests rather than run unguarded.
    let project: Value = admin(Method::POST, "/v1/projects")
        .json(&json!({"name": "broken"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let project = project["id"].as_str().expect("a project id").to_owned();
    let pool = meshgate_storage::postgres_pool(&database, &meshgate_storage::PostgresConfig::default()).unwrap();
    let client = meshgate_storage::postgres_client(&pool).await.unwrap();
    client
        .execute("UPDATE projects SET security_policy = '{\"rules\": 5}'::jsonb WHERE id = $1", &[&project])
        .await
        .unwrap();
    let broken = admin(Method::GET, &format!("/v1/projects/{project}/policy")).send().await.unwrap();
    provoked(&mut seen, "getSecurityPolicy", "internal_error", broken).await;

    // The failed-login throttle, then the gateway cut off from quota.
    let mut throttled = None;
    for _ in 0..10 {
        let response = http.get(format!("{edge}/v1/models")).bearer_auth("mgk_wrong").send().await.unwrap();
        if response.status() == 429 {
            throttled = Some(response);
            break;
        }
    }
    provoked(&mut seen, "listModels", "rate_limited", throttled.expect("failed logins are throttled")).await;
    let mut cut_off = mesh.wire_replica(gateway.clone());
    cut_off.quota_endpoint =
        format!("http://{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap());
    let cut_off = mesh.start_replica(cut_off).await;
    let mut unavailable = None;
    for _ in 0..100 {
        let sent = http
            .post(format!("{}/v1/chat/completions", cut_off.edge))
            .bearer_auth(ADMIN_KEY)
            .json(&chat_body(CLOUD_MODEL, "hello"))
            .send()
            .await;
        match sent {
            Ok(response) => {
                unavailable = Some(response);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    provoked(&mut seen, "createChatCompletion", "service_unavailable", unavailable.expect("the replica answers")).await;
    cut_off.stop().await;
    assert_eq!(seen, every_documented_code(spec), "every documented code was provoked");
    mesh.stop().await;
}
