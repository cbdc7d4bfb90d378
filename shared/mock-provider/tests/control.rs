//! The runtime control of the fault knobs (`GET`/`PUT /_mock/behavior`) and the outcomes
//! `GET /_mock/requests` reports, over real HTTP as a test in another process uses them.

use std::process::Stdio;
use std::time::{Duration, Instant};

use meshgate_mock_provider::{Behavior, MockProvider, Outcome, ServeOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn controlled() -> MockProvider {
    MockProvider::start_with_options(Behavior::default(), ServeOptions { control: true }).await.unwrap()
}

fn control_url(mock: &MockProvider) -> String {
    format!("http://{}/_mock/behavior", mock.addr())
}

async fn put(mock: &MockProvider, knobs: Value) -> (u16, Value) {
    let response = client().put(control_url(mock)).json(&knobs).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn get(mock: &MockProvider) -> Value {
    let response = client().get(control_url(mock)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn chat_body(stream: bool) -> Value {
    let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hello there big world"}]});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

async fn chat(mock: &MockProvider, stream: bool) -> reqwest::Response {
    client().post(format!("{}/chat/completions", mock.base_url())).json(&chat_body(stream)).send().await.unwrap()
}

/// What `GET /_mock/requests` lists.
async fn listed(mock: &MockProvider) -> Vec<Value> {
    let url = format!("http://{}/_mock/requests", mock.addr());
    client().get(url).send().await.unwrap().json().await.unwrap()
}

/// Waits (briefly) until the last recorded request has left `pending`.
async fn last_settled(mock: &MockProvider) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let last = listed(mock).await.pop().expect("a recorded request");
        if last["outcome"] != "pending" || Instant::now() > deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_429_fails_the_next_request_with_retry_after_and_a_put_back_heals() {
    let mock = controlled().await;
    let knobs = get(&mock).await;
    assert_eq!(knobs["failure_rate"], 0.0);
    assert_eq!(knobs["failure_status"], 500);
    assert_eq!(knobs["retry_after_secs"], 1);
    assert_eq!(knobs["hang"], false);
    assert_eq!(knobs["fail_after_chunks"], Value::Null);
    assert_eq!(knobs["stream_fault"], "abort");
    assert_eq!(knobs["honour_idempotency_keys"], false);

    let (status, knobs) = put(&mock, json!({"failure_rate": 1.0, "failure_status": 429, "retry_after_secs": 7})).await;
    assert_eq!(status, 200);
    assert_eq!((knobs["failure_rate"].as_f64(), knobs["failure_status"].as_u64()), (Some(1.0), Some(429)));
    assert_eq!(knobs["retry_after_secs"], 7);
    assert_eq!(knobs["latency_ms"], 0, "knobs the PUT did not name keep their values");
    assert_eq!(mock.behavior().failure_status, 429, "the handle sees the change");

    let response = chat(&mock, false).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let record = last_settled(&mock).await;
    assert_eq!((record["outcome"].as_str(), record["status"].as_u64()), (Some("failed"), Some(429)));

    let (status, _) = put(&mock, json!({"failure_rate": 0.0, "failure_status": 500, "retry_after_secs": null})).await;
    assert_eq!(status, 200);
    assert_eq!(get(&mock).await["retry_after_secs"], Value::Null);
    let response = chat(&mock, false).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap()["choices"][0]["message"]["content"],
        "echo: hello there big world"
    );
    let record = last_settled(&mock).await;
    assert_eq!((record["outcome"].as_str(), record["status"].as_u64()), (Some("completed"), Some(200)));
    assert_eq!(record["pieces"], Value::Null, "not a stream");
    let stats = mock.stats();
    assert_eq!((stats.injected_failures, stats.completions), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_after_chunks_cuts_streams_and_the_records_say_where() {
    let mock = controlled().await;
    let (status, knobs) = put(&mock, json!({"fail_after_chunks": 2, "stream_fault": "error_event"})).await;
    assert_eq!(status, 200);
    assert_eq!((knobs["fail_after_chunks"].as_u64(), knobs["stream_fault"].as_str()), (Some(2), Some("error_event")));
    let body = chat(&mock, true).await.text().await.unwrap();
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 4, "role, two pieces, the error event: {events:?}");
    assert!(events[3].contains("\"error\""), "{}", events[3]);
    assert!(!body.contains("[DONE]"));
    let record = last_settled(&mock).await;
    assert_eq!(record["outcome"], "cut");
    assert_eq!((record["status"].as_u64(), record["pieces"].as_u64()), (Some(200), Some(2)));

    // The transport abort: the body ends with an error after the same two pieces.
    put(&mock, json!({"stream_fault": "abort"})).await;
    let mut response = chat(&mock, true).await;
    let mut broken = false;
    loop {
        match response.chunk().await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    assert!(broken, "the stream was aborted");
    let record = last_settled(&mock).await;
    assert_eq!((record["outcome"].as_str(), record["pieces"].as_u64()), (Some("cut"), Some(2)));

    // Healed: the stream ends with its usage and [DONE], every piece counted.
    put(&mock, json!({"fail_after_chunks": null})).await;
    let body = chat(&mock, true).await.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"));
    let record = last_settled(&mock).await;
    assert_eq!((record["outcome"].as_str(), record["pieces"].as_u64()), (Some("completed"), Some(5)));
    let seqs: Vec<u64> = listed(&mock).await.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(mock.recorded()[0].outcome(), Outcome::Cut);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_set_at_runtime_ends_when_the_client_goes_away() {
    let mock = controlled().await;
    put(&mock, json!({"hang": true})).await;
    let url = format!("{}/chat/completions", mock.base_url());
    let result = client().post(&url).timeout(Duration::from_millis(300)).json(&chat_body(true)).send().await;
    assert!(result.unwrap_err().is_timeout());
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.stats().abandoned == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(mock.stats().abandoned, 1, "the mock let the hanging request go with its client");
    let record = last_settled(&mock).await;
    assert_eq!((record["outcome"].as_str(), record["status"].as_u64()), (Some("abandoned"), None));

    put(&mock, json!({"hang": false, "latency_ms": 50})).await;
    let started = Instant::now();
    assert_eq!(chat(&mock, false).await.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_left_mid_way_is_recorded_abandoned_with_the_pieces_sent() {
    let mock = controlled().await;
    put(&mock, json!({"chunk_delay_ms": 100})).await;
    let mut response = chat(&mock, true).await;
    let mut received = String::new();
    while received.matches("\n\n").count() < 3 {
        received.push_str(&String::from_utf8_lossy(&response.chunk().await.unwrap().unwrap()));
    }
    drop(response);
    let record = last_settled(&mock).await;
    assert_eq!(record["outcome"], "abandoned");
    let pieces = record["pieces"].as_u64().unwrap();
    assert!((2..5).contains(&pieces), "the role chunk and two pieces were read, not all five: {pieces}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_and_bad_values_are_refused_and_change_nothing() {
    let mock = controlled().await;
    let before = get(&mock).await;
    let (status, body) = put(&mock, json!({"hang": true, "no_such_knob": 1})).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "no_such_knob");
    assert_eq!(body["error"]["code"], "unknown_parameter");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"].as_str().unwrap().contains("no_such_knob"));
    for (knobs, param) in [
        (json!({"failure_rate": 1.5}), "failure_rate"),
        (json!({"failure_status": 200}), "failure_status"),
        (json!({"hang": "yes"}), "hang"),
        (json!({"stream_fault": "explode"}), "stream_fault"),
        (json!({"latency_ms": -1}), "latency_ms"),
        (json!({"api_key": "sk-other"}), "api_key"),
    ] {
        let (status, body) = put(&mock, knobs).await;
        assert_eq!((status, body["error"]["param"].as_str()), (400, Some(param)));
    }
    let response = client().put(control_url(&mock)).body("[1, 2]").send().await.unwrap();
    assert_eq!(response.status(), 400);
    let response = client().put(control_url(&mock)).body("{not json").send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(get(&mock).await, before, "nothing changed");
    assert_eq!(chat(&mock, false).await.status(), 200);

    // Honouring keys needs the per-key counts.
    let untracked = MockProvider::start_with_options(
        Behavior { track_requests: false, ..Behavior::default() },
        ServeOptions { control: true },
    )
    .await
    .unwrap();
    let (status, body) = put(&untracked, json!({"honour_idempotency_keys": true})).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("honour_idempotency_keys")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honouring_idempotency_keys_can_be_switched_on_at_runtime() {
    let mock = controlled().await;
    let (status, knobs) = put(&mock, json!({"honour_idempotency_keys": true})).await;
    assert_eq!((status, knobs["honour_idempotency_keys"].as_bool()), (200, Some(true)));
    let send = || {
        client()
            .post(format!("{}/chat/completions", mock.base_url()))
            .header("idempotency-key", "job-1")
            .json(&chat_body(false))
            .send()
    };
    assert!(send().await.unwrap().headers().get("idempotent-replayed").is_none());
    assert_eq!(send().await.unwrap().headers()["idempotent-replayed"], "true");
    let records = listed(&mock).await;
    assert_eq!((records[0]["replay"].as_bool(), records[1]["replay"].as_bool()), (Some(false), Some(true)));
    assert_eq!(records[1]["outcome"], "completed");
    assert_eq!(mock.completions_for_idempotency_key("job-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_is_not_served_without_the_option() {
    let mock = MockProvider::start().await.unwrap();
    let response = client().get(control_url(&mock)).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let response = client().put(control_url(&mock)).json(&json!({"hang": true})).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert!(!mock.behavior().hang);
    assert_eq!(chat(&mock, false).await.status(), 200);
}

/// The binary on port 0; returns it and its base URL.
async fn spawn_binary(args: &[&str]) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshgate-mock-provider"))
        .args(["--port", "0"])
        .args(args)
        .env_remove("MESHGATE_MOCK_CONTROL")
        .env_remove("MESHGATE_MOCK_HONOUR_IDEMPOTENCY_KEYS")
        .env_remove("MESHGATE_MOCK_TRACK_REQUESTS")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap().unwrap();
    let base = line.strip_prefix("listening on ").unwrap().trim_end_matches("/v1").to_owned();
    (child, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_control_only_with_its_flag() {
    let (mut child, base) = spawn_binary(&["--control", "--track-requests", "--honour-idempotency-keys"]).await;
    let knobs: Value = client().get(format!("{base}/_mock/behavior")).send().await.unwrap().json().await.unwrap();
    assert_eq!(knobs["honour_idempotency_keys"], true);
    child.kill().await.unwrap();

    let (mut child, base) = spawn_binary(&[]).await;
    let response = client().get(format!("{base}/_mock/behavior")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    child.kill().await.unwrap();

    // Honouring keys without tracking requests is refused at start.
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshgate-mock-provider"))
        .args(["--port", "0", "--honour-idempotency-keys"])
        .env_remove("MESHGATE_MOCK_TRACK_REQUESTS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(!status.success());
}
