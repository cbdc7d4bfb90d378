//! Spend and errors answered from the analytics service through the edge: exact aggregates for a
//! known set of requests, the dearest requests, error rates, latency, one trace, bad input, and
//! tenancy (another organization sees none of it).

use std::time::Duration;

use meshgate_router::ModelFacts;
use meshgate_tests::{ADMIN_KEY, CLOUD_MODEL, MeshOptions, TestMesh, chat_body};
use reqwest::Method;
use serde_json::Value;

use crate::tenancy::{Tenant, call};

/// 1 µ$ per prompt token, 2 µ$ per completion token.
const INPUT_PRICE: i64 = 1_000_000;
const OUTPUT_PRICE: i64 = 2_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_add_up_exactly_and_stay_inside_the_callers_tenancy() {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| {
            let facts = ModelFacts {
                input_price_micros_per_mtok: Some(INPUT_PRICE),
                output_price_micros_per_mtok: Some(OUTPUT_PRICE),
                ..Default::default()
            };
            config.router.models.insert(CLOUD_MODEL.into(), facts);
        }),
        ..Default::default()
    })
    .await;
    let (http, edge) = (&mesh.http, mesh.edge.as_str());

    // Three served requests of different sizes and one that no provider serves.
    let (mut prompt, mut completion, mut ids) = (0, 0, Vec::new());
    for text in ["one", "two words", "three words here"] {
        let response = mesh.chat(chat_body(CLOUD_MODEL, text)).await;
        assert_eq!(response.status(), 200);
        ids.push(response.headers()["x-meshgate-request-id"].to_str().unwrap().to_owned());
        let body: Value = response.json().await.unwrap();
        prompt += body["usage"]["prompt_tokens"].as_i64().unwrap();
        completion += body["usage"]["completion_tokens"].as_i64().unwrap();
    }
    mesh.alpha.set_failures(1.0, 500);
    mesh.beta.set_failures(1.0, 500);
    assert_eq!(mesh.chat(chat_body(CLOUD_MODEL, "nobody answers")).await.status(), 502);
    mesh.alpha.set_failures(0.0, 500);
    mesh.beta.set_failures(0.0, 500);

    // Another organization, with one request of its own.
    let other = Tenant::create(http, edge, "analytics-other").await;

    // Traces reach analytics in the background.
    let mut totals = Value::Null;
    for _ in 0..200 {
        totals = mesh.get_json("/v1/analytics", ADMIN_KEY).await;
        if totals["data"][0]["requests"] == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let row = &totals["data"][0];
    assert_eq!(row["requests"], 4, "{totals}");
    assert_eq!(row["errors"], 1);
    assert_eq!(row["prompt_tokens"], prompt);
    assert_eq!(row["completion_tokens"], completion);
    assert_eq!(row["cost_micros"], prompt * INPUT_PRICE / 1_000_000 + completion * OUTPUT_PRICE / 1_000_000);
    assert!(row["p50_latency_us"].as_i64().unwrap() > 0);

    let by_model = mesh.get_json("/v1/analytics?group_by=model", ADMIN_KEY).await;
    assert_eq!(by_model["group_by"], "model");
    assert_eq!(by_model["data"].as_array().unwrap().len(), 1, "{by_model}");
    assert_eq!(by_model["data"][0]["key"], CLOUD_MODEL);
    assert_eq!(by_model["data"][0]["requests"], 4);
    let by_day = mesh.get_json("/v1/analytics?group_by=day&layer=l2", ADMIN_KEY).await;
    assert_eq!(by_day["data"].as_array().unwrap().iter().map(|r| r["requests"].as_i64().unwrap()).sum::<i64>(), 3);

    let top = mesh.get_json("/v1/analytics/top-expensive?limit=2", ADMIN_KEY).await;
    let top = top["data"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    assert!(top[0]["usage"]["cost_micros"].as_i64() >= top[1]["usage"]["cost_micros"].as_i64());
    assert_eq!(top[0]["request_id"], ids[2], "the longest prompt costs most");

    let errors = mesh.get_json("/v1/analytics/error-rate", ADMIN_KEY).await;
    assert_eq!(errors["data"][0]["model"], CLOUD_MODEL, "{errors}");
    assert_eq!(errors["data"][0]["requests"], 4);
    assert_eq!(errors["data"][0]["errors"], 1);
    assert_eq!(errors["data"][0]["rate"], 0.25);

    let latency = mesh.get_json("/v1/analytics/latency", ADMIN_KEY).await;
    let latency = &latency["data"][0];
    assert_eq!(latency["requests"], 4);
    let (p50, p99) = (latency["p50_latency_us"].as_i64().unwrap(), latency["p99_latency_us"].as_i64().unwrap());
    assert!(0 < p50 && p50 <= p99 && p99 <= latency["max_latency_us"].as_i64().unwrap(), "{latency}");

    let trace = mesh.get_json(&format!("/v1/traces/{}", ids[0]), ADMIN_KEY).await;
    assert_eq!(trace["request_id"], ids[0]);
    assert_eq!(trace["served_target"], "alpha/mock-gpt");
    assert_eq!(trace["calls"][0]["status"], "ok");
    assert_eq!(trace["layer"], "l2");
    assert!(!trace["routing_reasons"].as_array().unwrap().is_empty());
    assert!(trace["headers"].get("authorization").is_none(), "credentials never reach a trace");

    // The other organization sees its own request only, and none of ours.
    let mut own = (0, Value::Null);
    for _ in 0..200 {
        own = call(http, edge, other.secret("viewer"), Method::GET, "/v1/analytics", None).await;
        if own.1["data"][0]["requests"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(own.0, 200);
    assert_eq!(own.1["data"][0]["requests"], 1, "{}", own.1);
    let path = format!("/v1/analytics?project={}", "default");
    let foreign = call(http, edge, other.secret("owner"), Method::GET, path, None).await;
    assert_eq!(foreign.1["data"][0]["requests"], 0, "{}", foreign.1);
    let (status, body) =
        call(http, edge, other.secret("owner"), Method::GET, format!("/v1/traces/{}", ids[0]), None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");

    for bad in [
        "/v1/analytics?group_by=hour",
        "/v1/analytics?from=yesterday",
        "/v1/analytics?colour=blue",
        "/v1/analytics?layer=l9",
        "/v1/analytics/top-expensive?limit=0",
        "/v1/analytics/latency?from=2026-12-02T00:00:00Z&to=2026-12-01T00:00:00Z",
    ] {
        let (status, body) = call(http, edge, ADMIN_KEY, Method::GET, bad, None).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{bad}: {body}");
    }
    mesh.stop().await;
}
