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
