//! `POST /v1/embeddings` and gRPC `Gateway.Embed` through the mesh to a real ONNX Runtime session
//! (the tiny test embedding model), with quota charged and bad input refused.

use base64::Engine;
use meshgate_proto::gateway::v1::EmbedRequest;
use meshgate_proto::gateway::v1::gateway_client::GatewayClient;
use meshgate_tests::{ADMIN_KEY, TestMesh};
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
