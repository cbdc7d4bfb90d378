//! `POST /v1/embeddings` and gRPC `Gateway.Embed` through the mesh to a real ONNX Runtime session
//! (the tiny test embedding model) and to providers' embedding models (the mock providers), with
//! quota charged and bad input refused.

use base64::Engine;
use meshgate_mock_provider::MockProvider;
use meshgate_proto::gateway::v1::EmbedRequest;
use meshgate_proto::gateway::v1::gateway_client::GatewayClient;
use meshgate_router::ModelFacts;
use meshgate_tests::{ADMIN_KEY, MeshOptions, TestMesh};
use serde_json::{Value, json};

async fn embed(mesh: &TestMesh, body: Value) -> reqwest::Response {
    mesh.http.post(format!("{}/v1/embeddings", mesh.edge)).bearer_auth(ADMIN_KEY).json(&body).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_come_back_as_floats_or_base64_and_are_charged() {
    let mesh = TestMesh::start().await;
    let response = embed(&mesh, json!({"model": "tiny-embed", "input": ["first text", "second, longer text"]})).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-meshgate-quota-remaining-tokens"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let first: Vec<f32> = data[0]["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    assert_eq!(first.len(), 32);
    let norm: f32 = first.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "vectors are L2-normalised: {norm}");
    let tokens = body["usage"]["prompt_tokens"].as_i64().unwrap();
    assert!(tokens > 0);

    // The same text as base64 decodes to the same vector.
    let encoded =
        embed(&mesh, json!({"model": "tiny-embed", "input": "first text", "encoding_format": "base64"})).await;
    let encoded: Value = encoded.json().await.unwrap();
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(encoded["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let decoded: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert!(decoded.iter().zip(&first).all(|(a, b)| (a - b).abs() < 1e-5));

    // Quota was charged the tokens the model counted.
    let mut charged = 0;
    for _ in 0..100 {
        let status: Value = mesh.get_json("/v1/quota/status", ADMIN_KEY).await;
        let key = status["scopes"].as_array().unwrap().iter().find(|s| s["scope"]["kind"] == "key").unwrap().clone();
        charged = key["used"]["tokens"].as_i64().unwrap();
        if key["used"]["requests"] == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    assert!(charged >= tokens, "{charged} < {tokens}");

    let models: Value = mesh.get_json("/v1/models", ADMIN_KEY).await;
    let tiny = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "tiny-embed").cloned().unwrap();
    assert_eq!(tiny["tasks"], json!(["embeddings"]));

    // gRPC carries the same vectors.
    let channel = mesh.channel("gateway");
    let mut gateway = GatewayClient::new(channel);
    let mut request =
        tonic::Request::new(EmbedRequest { model: "tiny-embed".into(), inputs: vec!["first text".into()] });
    request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_KEY}").parse().unwrap());
    let reply = gateway.embed(request).await.unwrap().into_inner();
    assert!(reply.data[0].values.iter().zip(&first).all(|(a, b)| (a - b).abs() < 1e-5));
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_embedding_requests_are_4xx() {
    let mesh = TestMesh::start().await;
    let cases = [
        (json!({"model": "tiny-embed", "input": []}), 400),
        (json!({"model": "tiny-embed", "input": [[1, 2, 3]]}), 400),
        (json!({"model": "tiny-embed", "input": ["ok", ""]}), 400),
        (json!({"model": "tiny-embed", "input": "x", "encoding_format": "hex"}), 400),
        (json!({"model": "tiny-embed", "input": "x", "dimensions": 7}), 400),
        (json!({"model": "no-such-model", "input": "x"}), 404),
        (json!({"model": "tiny-chat", "input": "x"}), 400),
        (json!({"input": "x"}), 400),
    ];
    for (body, expected) in cases {
        let response = embed(&mesh, body.clone()).await;
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap();
        assert_eq!(status, expected, "{body}: {answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    mesh.stop().await;
}

/// A provider's embedding model, listed by both mock providers.
const CLOUD_EMBEDDING: &str = "text-embedding-3-small";
/// Its price per million input tokens, micro-dollars (high, so every request costs something).
const EMBEDDING_PRICE: i64 = 20_000_000;

async fn cloud_embeddings_mesh() -> TestMesh {
    TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| {
            for provider in &mut config.sync.providers {
                provider.embedding_models = vec![CLOUD_EMBEDDING.into()];
            }
            let facts = ModelFacts { input_price_micros_per_mtok: Some(EMBEDDING_PRICE), ..Default::default() };
            config.router.models.insert(CLOUD_EMBEDDING.into(), facts);
        }),
        ..Default::default()
    })
    .await
}

/// What `tokens` cost at the model's price, rounded up as meshgate charges.
fn cost_of(tokens: i64) -> i64 {
    (tokens * EMBEDDING_PRICE + 999_999) / 1_000_000
}

/// The JSON body of the last embeddings request `mock` received.
fn last_embedding_body(mock: &MockProvider) -> Value {
    let request = mock.recorded().into_iter().rev().find(|r| r.path == "/v1/embeddings").expect("an embeddings call");
    serde_json::from_slice(&request.body).unwrap()
}

fn floats(datum: &Value) -> Vec<f32> {
    datum["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_embeddings_take_every_input_shape_and_are_charged_at_the_model_s_price() {
    let mesh = cloud_embeddings_mesh().await;
    let mut charged_cost = 0;
    let mut charge = |tokens: i64| charged_cost += cost_of(tokens);

    // Texts: what the provider received, what the client got back.
    let response =
        embed(&mesh, json!({"model": CLOUD_EMBEDDING, "input": ["first text", "second text"], "user": "u-7"})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-meshgate-target"], "alpha/text-embedding-3-small");
    assert_eq!(response.headers()["x-meshgate-layer"], "l2");
    let request_id = response.headers()["x-meshgate-request-id"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model"], CLOUD_EMBEDDING);
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let first = floats(&body["data"][0]);
    assert_eq!(first.len(), 16, "the provider's own length");
    let tokens = body["usage"]["prompt_tokens"].as_i64().unwrap();
    assert!(tokens > 0 && body["usage"]["total_tokens"] == tokens, "{body}");
    charge(tokens);
    let sent = last_embedding_body(&mesh.alpha);
    assert_eq!(sent["input"], json!(["first text", "second text"]));
    assert_eq!((sent["model"].as_str(), sent["encoding_format"].as_str()), (Some(CLOUD_EMBEDDING), Some("float")));
    assert_eq!(sent["user"], "u-7");

    // Token ids, one list (sent as a list of one) and several, reach the provider as they are.
    for (input, sent, vectors) in [
        (json!([101, 2023, 102]), json!([[101, 2023, 102]]), 1),
        (json!([[101, 2023], [7592]]), json!([[101, 2023], [7592]]), 2),
    ] {
        let response = embed(&mesh, json!({"model": CLOUD_EMBEDDING, "input": input})).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["data"].as_array().unwrap().len(), vectors, "{body}");
        assert_eq!(last_embedding_body(&mesh.alpha)["input"], sent);
        charge(body["usage"]["prompt_tokens"].as_i64().unwrap());
    }

    // `dimensions` goes to the provider's model; base64 is the same vector re-encoded.
    let response = embed(
        &mesh,
        json!({"model": CLOUD_EMBEDDING, "input": "first text", "dimensions": 8, "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(last_embedding_body(&mesh.alpha)["dimensions"], 8);
    assert_eq!(last_embedding_body(&mesh.alpha)["encoding_format"], "float", "providers are asked for floats");
    let body: Value = response.json().await.unwrap();
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(body["data"][0]["embedding"].as_str().unwrap()).unwrap();
    assert_eq!(bytes.len(), 8 * 4);
    charge(body["usage"]["prompt_tokens"].as_i64().unwrap());
    let full =
        embed(&mesh, json!({"model": CLOUD_EMBEDDING, "input": "first text", "encoding_format": "base64"})).await;
    let full: Value = full.json().await.unwrap();
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(full["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let decoded: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(decoded, first);
    charge(full["usage"]["prompt_tokens"].as_i64().unwrap());

    // A failing provider is left for the next one; its answer is charged alike.
    mesh.alpha.set_failures(1.0, 500);
    let response = embed(&mesh, json!({"model": CLOUD_EMBEDDING, "input": "first text"})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-meshgate-target"], "beta/text-embedding-3-small");
    let body: Value = response.json().await.unwrap();
    assert_eq!(floats(&body["data"][0]), first, "the mocks embed alike");
    charge(body["usage"]["prompt_tokens"].as_i64().unwrap());
    mesh.alpha.set_failures(0.0, 500);

    // Every request was charged its tokens at the model's price, once.
    let mut used = Value::Null;
    for _ in 0..200 {
        let status: Value = mesh.get_json("/v1/quota/status", ADMIN_KEY).await;
        used =
            status["scopes"].as_array().unwrap().iter().find(|s| s["scope"]["kind"] == "key").unwrap()["used"].clone();
        if used["requests"] == 6 && used["cost_micros"] == charged_cost {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!((used["requests"].as_i64(), used["cost_micros"].as_i64()), (Some(6), Some(charged_cost)), "{used}");

    // The model is listed as an embeddings model, and the request has its trace.
    let models: Value = mesh.get_json("/v1/models", ADMIN_KEY).await;
    let listed = models["data"].as_array().unwrap().iter().find(|m| m["id"] == CLOUD_EMBEDDING).cloned().unwrap();
    assert_eq!(listed["tasks"], json!(["embeddings"]));
    let trace = mesh.trace(&request_id).await;
    assert_eq!((trace.served_target.as_str(), trace.task.as_str()), ("alpha/text-embedding-3-small", "embeddings"));
    assert_eq!(trace.usage.unwrap().cost_micros, cost_of(tokens));
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_embedding_refusals_charge_nothing() {
    let mesh = cloud_embeddings_mesh().await;
    // The provider refuses a length its model cannot make: the client's 400, not a fallback.
    let response = embed(&mesh, json!({"model": CLOUD_EMBEDDING, "input": "x", "dimensions": 100_000})).await;
    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"]["message"].as_str().unwrap().contains("dimensions"), "{answer}");
    assert_eq!(mesh.beta.recorded().iter().filter(|r| r.path == "/v1/embeddings").count(), 0);
    // Every provider failing is a 502 after both were tried.
    mesh.alpha.set_failures(1.0, 500);
    mesh.beta.set_failures(1.0, 500);
    let response = embed(&mesh, json!({"model": CLOUD_EMBEDDING, "input": "x"})).await;
    assert_eq!(response.status(), 502);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["error"]["message"].as_str().unwrap().contains("all 2 targets failed"), "{answer}");
    // A local model cannot shorten its vectors: refused, nothing charged.
    let response = embed(&mesh, json!({"model": "tiny-embed", "input": "x", "dimensions": 8})).await;
    assert_eq!(response.status(), 400);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let status: Value = mesh.get_json("/v1/quota/status", ADMIN_KEY).await;
    let key = status["scopes"].as_array().unwrap().iter().find(|s| s["scope"]["kind"] == "key").unwrap().clone();
    assert_eq!((key["used"]["tokens"].as_i64(), key["used"]["cost_micros"].as_i64()), (Some(0), Some(0)), "{key}");
    mesh.stop().await;
}
