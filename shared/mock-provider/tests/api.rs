//! The mock provider over real HTTP.

use std::time::{Duration, Instant};

use base64::Engine as _;
use meshgate_mock_provider::reply::{prompt_tokens, reply_text};
use meshgate_mock_provider::{Behavior, MockProvider, MockToolCall, StreamFault};
use serde_json::{Value, json};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn chat_body(stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "you are terse"},
            {"role": "user", "content": "hello there big world"}
        ]
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": include_usage});
    }
    body
}

/// Splits an SSE body into its `data:` payloads.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| event.strip_prefix("data: ").expect("every event is a data line").to_owned())
        .collect()
}

async fn post(mock: &MockProvider, path: &str, body: &Value) -> reqwest::Response {
    client().post(format!("{}{path}", mock.base_url())).json(body).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_json_has_openai_shape_and_deterministic_content() {
    let mock = MockProvider::start().await.unwrap();
    let response = post(&mock, "/chat/completions", &chat_body(false, false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(body["model"], "gpt-test");
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: hello there big world");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let prompt = prompt_tokens(["you are terse", "hello there big world"]);
    assert_eq!(body["usage"], json!({"prompt_tokens": prompt, "completion_tokens": 5, "total_tokens": prompt + 5}));
    assert_eq!(mock.stats().succeeded, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_matches_json_and_ends_with_usage_and_done() {
    let mock = MockProvider::start().await.unwrap();
    let json: Value = post(&mock, "/chat/completions", &chat_body(false, false)).await.json().await.unwrap();
    let response = post(&mock, "/chat/completions", &chat_body(true, true)).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse_data(&response.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();

    let first = &chunks[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["model"], "gpt-test");
    assert_eq!(first["choices"][0]["delta"], json!({"role": "assistant", "content": "", "refusal": null}));
    assert!(first["usage"].is_null() && first.as_object().unwrap().contains_key("usage"));
    let id = first["id"].clone();
    assert!(chunks.iter().all(|c| c["id"] == id));

    let text: String =
        chunks.iter().filter_map(|c| c["choices"].get(0).and_then(|ch| ch["delta"]["content"].as_str())).collect();
    assert_eq!(text, json["choices"][0]["message"]["content"].as_str().unwrap());

    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], json["usage"]);
    // role chunk + 5 content chunks + finish + usage
    assert_eq!(chunks.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_without_include_usage_has_no_usage_field() {
    let mock = MockProvider::start().await.unwrap();
    let text = post(&mock, "/chat/completions", &chat_body(true, false)).await.text().await.unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert!(!chunk.as_object().unwrap().contains_key("usage"), "{event}");
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_chunks_and_max_tokens_shape_the_reply() {
    let mock = MockProvider::start_with(Behavior { stream_chunks: 7, ..Behavior::default() }).await.unwrap();
    let body: Value = post(&mock, "/chat/completions", &chat_body(false, false)).await.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], reply_text("hello there big world", 7, None));
    assert_eq!(body["usage"]["completion_tokens"], 7);

    let mut capped = chat_body(false, false);
    capped["max_tokens"] = json!(3);
    let body: Value = post(&mock, "/chat/completions", &capped).await.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "echo: hello there");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_enforced_with_openai_errors() {
    let mock =
        MockProvider::start_with(Behavior { api_key: Some("sk-mock".into()), ..Behavior::default() }).await.unwrap();
    let url = format!("{}/chat/completions", mock.base_url());
    let missing = client().post(&url).json(&chat_body(false, false)).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let wrong = client().post(&url).bearer_auth("sk-other").json(&chat_body(false, false)).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(wrong.json::<Value>().await.unwrap()["error"]["code"], "invalid_api_key");
    let right = client().post(&url).bearer_auth("sk-mock").json(&chat_body(false, false)).send().await.unwrap();
    assert_eq!(right.status(), 200);
    let models = client().get(format!("{}/models", mock.base_url())).send().await.unwrap();
    assert_eq!(models.status(), 401);
    assert_eq!(mock.stats().unauthorized, 3);
    assert_eq!(mock.stats().requests_total, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_429_carries_retry_after_and_behaviour_changes_mid_test() {
    let mock = MockProvider::start().await.unwrap();
    mock.set_failures(1.0, 429);
    let response = post(&mock, "/chat/completions", &chat_body(false, false)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "rate_limit_exceeded");

    mock.set_failures(1.0, 500);
    let response = post(&mock, "/chat/completions", &chat_body(false, false)).await;
    assert_eq!(response.status(), 500);
    assert!(response.headers().get("retry-after").is_none());
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["type"], "server_error");

    mock.set_failures(0.0, 500);
    assert_eq!(post(&mock, "/chat/completions", &chat_body(false, false)).await.status(), 200);
    mock.fail_next(2);
    assert_eq!(post(&mock, "/chat/completions", &chat_body(false, false)).await.status(), 500);
    assert_eq!(post(&mock, "/embeddings", &json!({"model": "e", "input": "x"})).await.status(), 500);
    assert_eq!(post(&mock, "/chat/completions", &chat_body(false, false)).await.status(), 200);
    assert_eq!(mock.stats().injected_failures, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_failure_rate_is_reproducible() {
    async fn outcomes(seed: u64) -> Vec<u16> {
        let behavior = Behavior { failure_rate: 0.5, seed, ..Behavior::default() };
        let mock = MockProvider::start_with(behavior).await.unwrap();
        let mut out = Vec::new();
        for _ in 0..40 {
            out.push(post(&mock, "/chat/completions", &chat_body(false, false)).await.status().as_u16());
        }
        out
    }
    let a = outcomes(7).await;
    assert_eq!(a, outcomes(7).await);
    let failures = a.iter().filter(|s| **s == 500).count();
    assert!((8..=32).contains(&failures), "{failures} failures out of 40 at rate 0.5");
    assert_ne!(a, outcomes(8).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_delays_the_answer() {
    let mock = MockProvider::start_with(Behavior { latency: Duration::from_millis(150), ..Behavior::default() })
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(post(&mock, "/chat/completions", &chat_body(false, false)).await.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_never_answers_until_shutdown() {
    let mock = MockProvider::start().await.unwrap();
    mock.set_hang(true);
    let url = format!("{}/chat/completions", mock.base_url());
    let result = client().post(&url).timeout(Duration::from_millis(300)).json(&chat_body(false, false)).send().await;
    assert!(result.unwrap_err().is_timeout());

    let pending = tokio::spawn(async move { client().post(&url).json(&chat_body(false, false)).send().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::timeout(Duration::from_secs(5), mock.shutdown()).await.unwrap().unwrap();
    let released = pending.await.unwrap().unwrap();
    assert_eq!(released.status(), 503);
}

async fn broken_stream(fault: StreamFault) -> (Vec<String>, bool) {
    let behavior = Behavior { fail_after_chunks: Some(2), stream_fault: fault, ..Behavior::default() };
    let mock = MockProvider::start_with(behavior).await.unwrap();
    let mut response = post(&mock, "/chat/completions", &chat_body(true, true)).await;
    assert_eq!(response.status(), 200);
    let mut raw = Vec::new();
    let mut transport_error = false;
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => raw.extend_from_slice(&bytes),
            Ok(None) => break,
            Err(_) => {
                transport_error = true;
                break;
            }
        }
    }
    (sse_data(&String::from_utf8(raw).unwrap()), transport_error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_stream_faults() {
    let (events, transport_error) = broken_stream(StreamFault::Abort).await;
    assert!(transport_error);
    assert_eq!(events.len(), 3, "role chunk and two content chunks: {events:?}");

    let (events, transport_error) = broken_stream(StreamFault::ErrorEvent).await;
    assert!(!transport_error);
    assert_eq!(events.len(), 4);
    let error: Value = serde_json::from_str(&events[3]).unwrap();
    assert_eq!(error["error"]["type"], "server_error");

    let (events, transport_error) = broken_stream(StreamFault::Close).await;
    assert!(!transport_error);
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e != "[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bodies_are_not_json() {
    let mock = MockProvider::start_with(Behavior { garbage: true, ..Behavior::default() }).await.unwrap();
    let response = post(&mock, "/chat/completions", &chat_body(false, false)).await;
    assert_eq!(response.status(), 200);
    assert!(serde_json::from_str::<Value>(&response.text().await.unwrap()).is_err());
    let text = post(&mock, "/chat/completions", &chat_body(true, true)).await.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&sse_data(&text)[0]).is_err());

    mock.update(|b| {
        b.garbage = false;
        b.ignore_stream = true;
    });
    let response = post(&mock, "/chat/completions", &chat_body(true, true)).await;
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_per_key_and_recorded() {
    let mock = MockProvider::start().await.unwrap();
    let url = format!("{}/chat/completions", mock.base_url());
    for _ in 0..3 {
        client()
            .post(&url)
            .header("idempotency-key", "job-1")
            .header("x-request-id", "req-a")
            .bearer_auth("sk-any")
            .json(&chat_body(false, false))
            .send()
            .await
            .unwrap();
    }
    client().post(&url).header("x-request-id", "req-b").json(&chat_body(true, true)).send().await.unwrap();
    assert_eq!(mock.count_for_idempotency_key("job-1"), 3);
    assert_eq!(mock.count_for_request_id("req-a"), 3);
    assert_eq!(mock.count_for_request_id("req-b"), 1);
    assert_eq!(mock.count_for_request_id("req-c"), 0);
    assert_eq!(mock.requests_total(), 4);
    let recorded = mock.recorded();
    assert_eq!(recorded.len(), 4);
    assert_eq!(recorded[0].authorization.as_deref(), Some("Bearer sk-any"));
    assert_eq!(recorded[0].idempotency_key.as_deref(), Some("job-1"));
    let last = mock.last_request().unwrap();
    assert_eq!(last.path, "/v1/chat/completions");
    assert_eq!(last.json().unwrap()["stream"], true);
    // The same, for a test in another process.
    let listed: Value =
        client().get(format!("http://{}/_mock/requests", mock.addr())).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 4);
    assert_eq!(listed[0]["idempotency_key"], "job-1");
    assert_eq!(listed[3]["request_id"], "req-b");
    assert_eq!(listed[3]["body"], last.json().unwrap());
    assert_eq!(listed[3]["unknown_parameters"], json!([]));
    mock.reset_counters();
    assert_eq!(mock.requests_total(), 0);
    assert_eq!(mock.count_for_idempotency_key("job-1"), 0);
    assert!(mock.recorded().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_stream_as_fragments() {
    let mock = MockProvider::start().await.unwrap();
    let mut body = chat_body(false, false);
    body["tools"] = json!([{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]
    }}}]);
    body["tool_choice"] = json!("required");
    let reply: Value = post(&mock, "/chat/completions", &body).await.json().await.unwrap();
    let message = &reply["choices"][0]["message"];
    assert!(message["content"].is_null());
    assert_eq!(message["tool_calls"][0]["function"]["name"], "lookup");
    let arguments = message["tool_calls"][0]["function"]["arguments"].as_str().unwrap().to_owned();
    assert_eq!(serde_json::from_str::<Value>(&arguments).unwrap(), json!({"query": "query"}));
    assert_eq!(reply["choices"][0]["finish_reason"], "tool_calls");

    mock.update(|b| {
        b.tool_call = Some(MockToolCall { name: "get_weather".into(), arguments: "{\"city\":\"Paris\"}".into() })
    });
    let text = post(&mock, "/chat/completions", &chat_body(true, true)).await.text().await.unwrap();
    let events = sse_data(&text);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let start = &chunks[0]["choices"][0]["delta"];
    assert!(start["content"].is_null());
    assert_eq!(start["tool_calls"][0]["function"]["name"], "get_weather");
    let args: String = chunks[1..]
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(args, "{\"city\":\"Paris\"}");
    let fragments = (args.chars().count() as u64).div_ceil(4);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], fragments);
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_float_and_base64_agree() {
    let mock = MockProvider::start().await.unwrap();
    let float: Value =
        post(&mock, "/embeddings", &json!({"model": "emb", "input": ["a b c", "d"]})).await.json().await.unwrap();
    assert_eq!(float["object"], "list");
    assert_eq!(float["data"].as_array().unwrap().len(), 2);
    assert_eq!(float["data"][1]["index"], 1);
    assert_eq!(float["usage"], json!({"prompt_tokens": 4, "total_tokens": 4}));
    let vector: Vec<f32> =
        float["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(vector.len(), 16);

    let b64: Value =
        post(&mock, "/embeddings", &json!({"model": "emb", "input": "a b c", "encoding_format": "base64"}))
            .await
            .json()
            .await
            .unwrap();
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(b64["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let decoded: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(decoded, vector);

    let dims: Value = post(&mock, "/embeddings", &json!({"model": "emb", "input": [1, 2, 3], "dimensions": 4}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(dims["data"][0]["embedding"].as_array().unwrap().len(), 4);
    assert_eq!(post(&mock, "/embeddings", &json!({"model": "emb", "input": ""})).await.status(), 400);
    assert_eq!(post(&mock, "/embeddings", &json!({"model": "emb", "input": "x", "dimensions": 0})).await.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_bad_requests() {
    let behavior = Behavior { models: vec!["m1".into(), "m2".into()], strict_models: true, ..Behavior::default() };
    let mock = MockProvider::start_with(behavior).await.unwrap();
    let models: Value = client().get(format!("{}/models", mock.base_url())).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["m1", "m2"]);
    assert_eq!(client().get(format!("{}/models/m2", mock.base_url())).send().await.unwrap().status(), 200);
    assert_eq!(client().get(format!("{}/models/m3", mock.base_url())).send().await.unwrap().status(), 404);
    let health = client().get(format!("http://{}/health", mock.addr())).send().await.unwrap();
    assert_eq!(health.status(), 200);

    let unknown = post(&mock, "/chat/completions", &chat_body(false, false)).await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.json::<Value>().await.unwrap()["error"]["code"], "model_not_found");

    let url = format!("{}/chat/completions", mock.base_url());
    let malformed = client().post(&url).header("content-type", "application/json").body("{nope").send().await.unwrap();
    assert_eq!(malformed.status(), 400);
    assert_eq!(malformed.json::<Value>().await.unwrap()["error"]["type"], "invalid_request_error");
    let empty = post(&mock, "/chat/completions", &json!({"model": "m1", "messages": []})).await;
    assert_eq!(empty.status(), 400);
    let bad_role =
        post(&mock, "/chat/completions", &json!({"model": "m1", "messages": [{"role": "robot", "content": "x"}]}))
            .await;
    assert_eq!(bad_role.status(), 400);
    let parts = post(
        &mock,
        "/chat/completions",
        &json!({"model": "m1", "messages": [{"role": "user", "content": [{"type": "text", "text": "multi part"}]}]}),
    )
    .await;
    assert_eq!(parts.json::<Value>().await.unwrap()["choices"][0]["message"]["content"], "echo: multi part");
    assert_eq!(client().get(format!("{}/nope", mock.base_url())).send().await.unwrap().status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_can_come_back_on_the_same_address() {
    let mock = MockProvider::start().await.unwrap();
    let addr = mock.addr();
    mock.shutdown().await.unwrap();
    assert!(client().get(format!("http://{addr}/health")).send().await.is_err());
    let again = MockProvider::bind(addr, Behavior::default()).await.unwrap();
    assert_eq!(client().get(format!("http://{addr}/health")).send().await.unwrap().status(), 200);
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_delay_spreads_the_stream() {
    let behavior = Behavior { chunk_delay: Duration::from_millis(40), ..Behavior::default() };
    let mock = MockProvider::start_with(behavior).await.unwrap();
    let started = Instant::now();
    let mut response = post(&mock, "/chat/completions", &chat_body(true, false)).await;
    let head_after = started.elapsed();
    let mut arrivals = Vec::new();
    while let Some(bytes) = response.chunk().await.unwrap() {
        arrivals.push((started.elapsed(), bytes.len()));
    }
    assert!(head_after < Duration::from_millis(40));
    // 5 content pieces, each 40 ms apart.
    assert!(arrivals.last().unwrap().0 >= Duration::from_millis(200));
    assert!(arrivals.len() >= 5, "{arrivals:?}");
}

fn anthropic(mock: &MockProvider, body: &Value) -> reqwest::RequestBuilder {
    client()
        .post(format!("{}/messages", mock.base_url()))
        .header("anthropic-version", "2023-06-01")
        .header("x-api-key", "sk-ant")
        .json(body)
}

fn messages_body(stream: bool) -> Value {
    json!({
        "model": "claude-test",
        "max_tokens": 64,
        "system": "you are terse",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there big world"}]}],
        "stream": stream
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_json_and_stream_have_anthropic_shapes() {
    let mock =
        MockProvider::start_with(Behavior { api_key: Some("sk-ant".into()), ..Behavior::default() }).await.unwrap();
    let response = anthropic(&mock, &messages_body(false)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "message");
    assert!(body["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(body["content"], json!([{"type": "text", "text": "echo: hello there big world"}]));
    assert_eq!(body["stop_reason"], "end_turn");
    let prompt = prompt_tokens(["you are terse", "hello there big world"]);
    assert_eq!(body["usage"], json!({"input_tokens": prompt, "output_tokens": 5}));

    let text = anthropic(&mock, &messages_body(true)).send().await.unwrap().text().await.unwrap();
    let events: Vec<(&str, Value)> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').unwrap();
            (name.strip_prefix("event: ").unwrap(), serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap())
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
    assert_eq!(names[..3], ["message_start", "content_block_start", "ping"]);
    assert_eq!(names[names.len() - 3..], ["content_block_stop", "message_delta", "message_stop"]);
    assert!(events.iter().all(|(name, data)| data["type"] == *name), "the type field repeats the event name");
    let streamed: String = events.iter().filter_map(|(_, d)| d["delta"]["text"].as_str().map(str::to_owned)).collect();
    assert_eq!(streamed, "echo: hello there big world");
    assert_eq!(events[0].1["message"]["usage"]["input_tokens"], prompt);
    assert_eq!(events[events.len() - 2].1["usage"]["output_tokens"], 5);
    assert_eq!(mock.stats().messages_requests, 2);
    assert_eq!(mock.stats().completions, 2);

    let no_key = client()
        .post(format!("{}/messages", mock.base_url()))
        .header("anthropic-version", "2023-06-01")
        .json(&messages_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let body: Value = no_key.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");

    let no_version = client()
        .post(format!("{}/messages", mock.base_url()))
        .header("x-api-key", "sk-ant")
        .json(&messages_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(no_version.status(), 400);
    let mut no_max = messages_body(false);
    no_max.as_object_mut().unwrap().remove("max_tokens");
    let response = anthropic(&mock, &no_max).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("max_tokens"), "{body}");
    let mut system_role = messages_body(false);
    system_role["messages"] = json!([{"role": "system", "content": "x"}]);
    assert_eq!(anthropic(&mock, &system_role).send().await.unwrap().status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_idempotency_keys_are_replayed_when_honoured() {
    let mock =
        MockProvider::start_with(Behavior { honour_idempotency_keys: true, ..Behavior::default() }).await.unwrap();
    let send = |key: &'static str| {
        client()
            .post(format!("{}/chat/completions", mock.base_url()))
            .header("idempotency-key", key)
            .json(&chat_body(true, true))
            .send()
    };
    let first = send("job-1").await.unwrap();
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = first.text().await.unwrap();
    let again = send("job-1").await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(sse_data(&again.text().await.unwrap()).len(), sse_data(&first).len());
    send("job-2").await.unwrap().text().await.unwrap();
    assert_eq!(mock.count_for_idempotency_key("job-1"), 2, "both requests arrived");
    assert_eq!(mock.completions_for_idempotency_key("job-1"), 1, "the work was done once");
    assert_eq!(mock.completions_for_idempotency_key("job-2"), 1);
    let stats = mock.stats();
    assert_eq!((stats.completions, stats.idempotent_replays), (2, 1));

    // A stream cut before its end is not a completion: the retry does the work.
    mock.update(|b| b.fail_after_chunks = Some(2));
    let _ = send("job-3").await.unwrap().text().await;
    assert_eq!(mock.completions_for_idempotency_key("job-3"), 0);
    mock.update(|b| b.fail_after_chunks = None);
    send("job-3").await.unwrap().text().await.unwrap();
    assert_eq!(mock.completions_for_idempotency_key("job-3"), 1);

    // Without the behaviour every request is new work.
    mock.update(|b| b.honour_idempotency_keys = false);
    send("job-1").await.unwrap().text().await.unwrap();
    assert_eq!(mock.completions_for_idempotency_key("job-1"), 2);
}
