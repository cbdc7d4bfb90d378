//! `Sync.Complete` and `Sync.Embed` over real gRPC against the mock provider over real HTTP.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshgate_catalog::UnknownParams;
use meshgate_mock_provider::reply::{prompt_tokens, reply_text};
use meshgate_mock_provider::{Behavior, MockProvider, MockToolCall, PromptCache, StreamFault};
use meshgate_proto::common::v1::{
    ChatMessage, ChatOptions, ContentPart, ImageUrl, ResponseFormat, SamplingParams, Target, ToolChoice,
    ToolDefinition, Usage, content_part, response_format, tool_choice,
};
use meshgate_proto::sync::v1::sync_client::SyncClient;
use meshgate_proto::sync::v1::{
    CompleteChunk, CompleteRequest, EmbedRequest, EnqueueRequest, GetJobRequest, ListJobsRequest, RetryJobRequest,
    TokenIds,
};
use meshgate_runtime::error::{ERROR_CODE_METADATA, RETRY_AFTER_METADATA};
use meshgate_runtime::{Listeners, Shutdown};
use meshgate_sync::error::UPSTREAM_STATUS_METADATA;
use meshgate_sync::{Config, ProviderSpec};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The sync service serving on ephemeral ports, with a client; `stop` shuts it down and checks it
/// ended cleanly.
struct RunningSync {
    client: SyncClient<Channel>,
    admin: SocketAddr,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), meshgate_sync::Error>>,
}

impl RunningSync {
    /// Retries wait 10 ms (then 20 ms) and a `Retry-After` above 2 s is not waited for.
    async fn start(providers: Vec<ProviderSpec>) -> Self {
        let config = Config {
            providers,
            providers_from_env: false,
            retry_base_delay_ms: 10,
            retry_max_delay_ms: 2_000,
            ..Config::default()
        };
        Self::start_with(config).await
    }

    async fn start_with(config: Config) -> Self {
        let listeners = Listeners::ephemeral().await.unwrap();
        let grpc = listeners.grpc_addr();
        let admin = listeners.admin_addr();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(meshgate_sync::serve(config, listeners, shutdown.clone()));
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap().connect().await.unwrap();
        let health = meshgate_runtime::channel(&format!("http://{grpc}"), Duration::from_secs(1)).unwrap();
        meshgate_runtime::client::wait_serving(&health, "meshgate.sync.v1.Sync", Duration::from_secs(10))
            .await
            .unwrap();
        Self { client: SyncClient::new(channel), admin, shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(15), self.task).await.unwrap().unwrap().unwrap();
    }

    /// Runs a completion: the chunks received, then the error that ended the stream (if any).
    async fn complete(&self, request: CompleteRequest) -> (Vec<CompleteChunk>, Option<Status>) {
        let mut client = self.client.clone();
        let mut stream = match client.complete(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return (Vec::new(), Some(status)),
        };
        let mut chunks = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => chunks.push(chunk),
                Ok(None) => return (chunks, None),
                Err(status) => return (chunks, Some(status)),
            }
        }
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin)).await.unwrap().text().await.unwrap()
    }
}

fn provider(name: &str, mock: &MockProvider) -> ProviderSpec {
    ProviderSpec {
        name: name.into(),
        base_url: mock.base_url(),
        models: vec!["gpt-test".into()],
        ..ProviderSpec::default()
    }
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage { role: role.into(), content: content.into(), ..ChatMessage::default() }
}

fn request(provider: &str) -> CompleteRequest {
    CompleteRequest {
        request_id: "req-123".into(),
        provider: provider.into(),
        model: "gpt-test".into(),
        messages: vec![message("system", "you are terse"), message("user", "tell me about the mesh gateway")],
        ..CompleteRequest::default()
    }
}

fn text(chunks: &[CompleteChunk]) -> String {
    chunks.iter().map(|c| c.delta.as_str()).collect()
}

fn metadata<'a>(status: &'a Status, key: &str) -> Option<&'a str> {
    status.metadata().get(key).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_content_and_usage_match_the_providers_json_answer() {
    let mock = MockProvider::start().await.unwrap();
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;

    let (chunks, error) = sync.complete(request("mock")).await;
    assert!(error.is_none(), "{error:?}");

    // The same conversation asked directly, without streaming.
    let json: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/chat/completions", mock.base_url()))
        .json(&serde_json::json!({
            "model": "gpt-test",
            "messages": [
                {"role": "system", "content": "you are terse"},
                {"role": "user", "content": "tell me about the mesh gateway"}
            ]
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(text(&chunks), json["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(text(&chunks), "echo: tell me about the mesh gateway");

    let last = chunks.last().unwrap();
    assert_eq!(last.delta, "");
    assert_eq!(last.finish_reason, json["choices"][0]["finish_reason"].as_str().unwrap());
    let usage = last.usage.unwrap();
    assert_eq!(usage.prompt_tokens, json["usage"]["prompt_tokens"].as_i64().unwrap());
    assert_eq!(usage.completion_tokens, json["usage"]["completion_tokens"].as_i64().unwrap());
    assert_eq!(usage.total_tokens, json["usage"]["total_tokens"].as_i64().unwrap());
    let prompt = prompt_tokens(["you are terse", "tell me about the mesh gateway"]) as i64;
    assert_eq!(
        usage,
        Usage {
            prompt_tokens: prompt,
            completion_tokens: 7,
            total_tokens: prompt + 7,
            cost_micros: 0,
            ..Usage::default()
        }
    );

    // The model comes once, on the first chunk, which already carries text.
    assert_eq!(chunks[0].model, "gpt-test");
    assert!(!chunks[0].delta.is_empty());
    assert!(chunks[1..].iter().all(|c| c.model.is_empty()));
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c.finish_reason.is_empty() && c.usage.is_none()));
    // One gRPC chunk per upstream content chunk, then the final one.
    assert_eq!(chunks.len(), 7 + 1);
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_arrive_in_order_as_the_provider_streams_them() {
    let behavior = Behavior { chunk_delay: Duration::from_millis(80), stream_chunks: 5, ..Behavior::default() };
    let mock = MockProvider::start_with(behavior).await.unwrap();
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;

    let mut client = sync.client.clone();
    let mut stream = client.complete(request("mock")).await.unwrap().into_inner();
    let started = Instant::now();
    let mut arrivals = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        arrivals.push((started.elapsed(), chunk));
    }
    let deltas: Vec<&str> = arrivals.iter().map(|(_, c)| c.delta.as_str()).filter(|d| !d.is_empty()).collect();
    assert_eq!(deltas, ["echo:", " tell", " me", " about", " the"]);
    assert_eq!(deltas.concat(), reply_text("tell me about the mesh gateway", 5, None));
    // Passed through as they came, not buffered until the end.
    let first = arrivals[0].0;
    let last_delta = arrivals[arrivals.len() - 2].0;
    assert!(last_delta - first >= Duration::from_millis(240), "first {first:?}, last {last_delta:?}");
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_500_is_retried_then_unavailable_as_the_first_stream_item() {
    let mock = MockProvider::start().await.unwrap();
    mock.set_failures(1.0, 500);
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;

    // The call itself succeeds; the failure is the stream's first item, so nothing reached the
    // caller and it may fall back.
    let mut client = sync.client.clone();
    let mut stream = client.complete(request("mock")).await.unwrap().into_inner();
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(metadata(&status, ERROR_CODE_METADATA), Some("upstream_error"));
    assert_eq!(metadata(&status, UPSTREAM_STATUS_METADATA), Some("500"));
    assert!(
        status.message().contains("500") && status.message().contains("server had an error"),
        "{}",
        status.message()
    );
    assert_eq!(mock.requests_total(), 3, "the call and its two retries");
    assert_eq!(mock.count_for_request_id("req-123"), 3, "every attempt carries the request id");
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_before_the_first_chunk_is_retried_and_the_caller_sees_only_the_answer() {
    let mock = MockProvider::start_with(Behavior { retry_after_secs: Some(1), ..Behavior::default() }).await.unwrap();
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;
    for status in [503, 429, 500] {
        mock.reset_counters();
        mock.set_failures(0.0, status);
        mock.fail_next(1);
        let (chunks, error) = sync.complete(request("mock")).await;
        assert!(error.is_none(), "{status}: {error:?}");
        assert_eq!(text(&chunks), "echo: tell me about the mesh gateway");
        assert_eq!(mock.requests_total(), 2, "{status}: one failure, one retry");
    }
    // Three failures spend the two retries.
    mock.reset_counters();
    mock.fail_next(3);
    let (chunks, error) = sync.complete(request("mock")).await;
    assert!(chunks.is_empty());
    assert_eq!(error.unwrap().code(), Code::Unavailable);
    assert_eq!(mock.requests_total(), 3);

    // A per-provider retry count.
    let once = ProviderSpec { max_retries: Some(0), ..provider("once", &mock) };
    let sync_once = RunningSync::start(vec![once]).await;
    mock.reset_counters();
    mock.fail_next(1);
    let (_, error) = sync_once.complete(request("once")).await;
    assert_eq!(error.unwrap().code(), Code::Unavailable);
    assert_eq!(mock.requests_total(), 1);
    sync_once.stop().await;
    let text = sync.metrics().await;
    assert!(
        text.contains(r#"meshgate_sync_upstream_retries_total{error="rate_limited",model="gpt-test",provider="mock",service="sync"} 1"#),
        "{text}"
    );
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_retried_once_content_reached_the_caller_nor_a_client_error() {
    let behavior = Behavior { fail_after_chunks: Some(2), ..Behavior::default() };
    let mock = MockProvider::start_with(behavior).await.unwrap();
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;
    let (chunks, error) = sync.complete(request("mock")).await;
    assert_eq!(text(&chunks), "echo: tell");
    assert_eq!(error.unwrap().code(), Code::Unavailable);
    assert_eq!(mock.requests_total(), 1, "the caller holds streamed bytes: no retry");

    mock.update(|b| b.fail_after_chunks = None);
    mock.reset_counters();
    mock.set_failures(0.0, 400);
    mock.fail_next(1);
    let (_, error) = sync.complete(request("mock")).await;
    assert_eq!(error.unwrap().code(), Code::InvalidArgument);
    assert_eq!(mock.requests_total(), 1, "a rejected request fails the same way again");
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_429_is_resource_exhausted_with_retry_after() {
    let mock = MockProvider::start_with(Behavior { retry_after_secs: Some(7), ..Behavior::default() }).await.unwrap();
    mock.set_failures(1.0, 429);
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;
    let (chunks, status) = sync.complete(request("mock")).await;
    let status = status.unwrap();
    assert!(chunks.is_empty());
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(metadata(&status, ERROR_CODE_METADATA), Some("rate_limited"));
    assert_eq!(metadata(&status, RETRY_AFTER_METADATA), Some("7"));
    assert_eq!(metadata(&status, UPSTREAM_STATUS_METADATA), Some("429"));
    assert_eq!(mock.requests_total(), 1, "a Retry-After beyond retry_max_delay_ms is not waited for");
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_provider_is_deadline_exceeded_within_the_timeout() {
    let mock = MockProvider::start().await.unwrap();
    mock.set_hang(true);
    let slow_first_byte = ProviderSpec { first_byte_timeout_ms: Some(300), ..provider("mock", &mock) };
    let sync = RunningSync::start(vec![slow_first_byte]).await;

    // The request's own timeout.
    let started = Instant::now();
    let (_, status) = sync.complete(CompleteRequest { timeout_ms: 200, ..request("mock") }).await;
    let elapsed = started.elapsed();
    let status = status.unwrap();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(metadata(&status, ERROR_CODE_METADATA), Some("timeout"));
    assert!(elapsed >= Duration::from_millis(200) && elapsed < Duration::from_millis(1500), "{elapsed:?}");

    // The provider's first-byte timeout.
    let started = Instant::now();
    let (_, status) = sync.complete(request("mock")).await;
    let elapsed = started.elapsed();
    let status = status.unwrap();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(status.message().contains("first-byte timeout of 300 ms"), "{}", status.message());
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(1500), "{elapsed:?}");
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_timeout_cuts_a_slow_stream_after_some_deltas() {
    let behavior = Behavior { chunk_delay: Duration::from_millis(100), stream_chunks: 20, ..Behavior::default() };
    let mock = MockProvider::start_with(behavior).await.unwrap();
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;
    let started = Instant::now();
    let (chunks, status) = sync.complete(CompleteRequest { timeout_ms: 450, ..request("mock") }).await;
    let status = status.unwrap();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(status.message().contains("total timeout of 450 ms"), "{}", status.message());
    assert!((1..=5).contains(&chunks.len()), "{} chunks", chunks.len());
    assert!(started.elapsed() < Duration::from_millis(1500));
    sync.stop().await;
}

async fn broken_stream(fault: StreamFault) -> (Vec<CompleteChunk>, Status) {
    let behavior = Behavior { fail_after_chunks: Some(3), stream_fault: fault, ..Behavior::default() };
    let mock = MockProvider::start_with(behavior).await.unwrap();
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;
    let (chunks, status) = sync.complete(request("mock")).await;
    sync.stop().await;
    (chunks, status.expect("the stream must end with an error"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_stream_failures_end_the_stream_with_an_error_after_the_deltas() {
    let (chunks, status) = broken_stream(StreamFault::Abort).await;
    assert_eq!(text(&chunks), "echo: tell me");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(metadata(&status, ERROR_CODE_METADATA), Some("service_unavailable"));
    assert!(status.message().contains("mid-stream"), "{}", status.message());

    let (chunks, status) = broken_stream(StreamFault::ErrorEvent).await;
    assert_eq!(text(&chunks), "echo: tell me");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(metadata(&status, ERROR_CODE_METADATA), Some("upstream_error"));
    assert!(status.message().contains("mid-stream failure injected"), "{}", status.message());

    let (chunks, status) = broken_stream(StreamFault::Close).await;
    assert_eq!(text(&chunks), "echo: tell me");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(metadata(&status, ERROR_CODE_METADATA), Some("upstream_error"));
    assert!(status.message().contains("before [DONE]"), "{}", status.message());
    assert!(chunks.iter().all(|c| c.finish_reason.is_empty() && c.usage.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_an_error_and_a_provider_ignoring_stream_is_read_whole() {
    let mock = MockProvider::start_with(Behavior { garbage: true, ..Behavior::default() }).await.unwrap();
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;
    let (chunks, status) = sync.complete(request("mock")).await;
    let status = status.unwrap();
    assert!(chunks.is_empty());
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(metadata(&status, ERROR_CODE_METADATA), Some("upstream_error"));
    assert!(status.message().contains("malformed chunk"), "{}", status.message());

    // One JSON document instead of a stream: the same chunks, all at once.
    let (streamed, _) = {
        mock.update(|b| b.garbage = false);
        sync.complete(request("mock")).await
    };
    mock.update(|b| b.ignore_stream = true);
    let (whole, status) = sync.complete(request("mock")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(text(&whole), "echo: tell me about the mesh gateway");
    assert_eq!(whole[0].model, "gpt-test");
    let (last, streamed_last) = (whole.last().unwrap(), streamed.last().unwrap());
    assert_eq!((last.finish_reason.as_str(), last.usage), (streamed_last.finish_reason.as_str(), streamed_last.usage));
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_and_request_id_are_forwarded_and_a_wrong_key_is_an_upstream_error() {
    let mock =
        MockProvider::start_with(Behavior { api_key: Some("sk-right".into()), ..Behavior::default() }).await.unwrap();
    let good = ProviderSpec { api_key: Some("sk-right".into()), ..provider("good", &mock) };
    let bad = ProviderSpec { api_key: Some("sk-wrong".into()), ..provider("bad", &mock) };
    let sync = RunningSync::start(vec![good, bad]).await;

    let (chunks, status) = sync.complete(request("good")).await;
    assert!(status.is_none(), "{status:?}");
    assert!(chunks.last().unwrap().usage.is_some());
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.authorization.as_deref(), Some("Bearer sk-right"));
    assert_eq!(seen.request_id.as_deref(), Some("req-123"));
    let body = seen.json().unwrap();
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["model"], "gpt-test");
    assert_eq!(body["messages"][1], serde_json::json!({"role": "user", "content": "tell me about the mesh gateway"}));

    let (_, status) = sync.complete(request("bad")).await;
    let status = status.unwrap();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(metadata(&status, ERROR_CODE_METADATA), Some("upstream_error"));
    assert_eq!(metadata(&status, UPSTREAM_STATUS_METADATA), Some("401"));
    assert!(status.message().contains("credentials"), "{}", status.message());
    assert_eq!(mock.count_for_request_id("req-123"), 2);

    // Without request_id, the x-request-id metadata is forwarded.
    let mut grpc_request = tonic::Request::new(CompleteRequest { request_id: String::new(), ..request("good") });
    grpc_request.metadata_mut().insert("x-request-id", "from-metadata".parse().unwrap());
    let mut client = sync.client.clone();
    let mut stream = client.complete(grpc_request).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}
    assert_eq!(mock.count_for_request_id("from-metadata"), 1);
    sync.stop().await;
}

/// Azure OpenAI: the deployment's URL with `api-version` as a query, the key in `api-key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_style_provider_gets_its_query_and_api_key_header() {
    let mock =
        MockProvider::start_with(Behavior { api_key: Some("az-key".into()), ..Behavior::default() }).await.unwrap();
    let plain = provider("azure", &mock);
    let azure = ProviderSpec {
        base_url: format!("{}/?api-version=2024-10-21", plain.base_url),
        api_key: Some("az-key".into()),
        api_key_header: Some("API-Key".into()),
        ..plain
    }
    .validate()
    .unwrap();
    assert!(azure.base_url.ends_with("/v1?api-version=2024-10-21"), "{}", azure.base_url);
    let sync = RunningSync::start(vec![azure]).await;
    let (chunks, status) = sync.complete(request("azure")).await;
    assert!(status.is_none(), "{status:?}");
    assert!(chunks.last().unwrap().usage.is_some());
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!((seen.api_key.as_deref(), seen.authorization.as_deref()), (Some("az-key"), None));
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_is_forwarded_and_max_tokens_ends_with_length() {
    let mock = MockProvider::start().await.unwrap();
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;
    let sampling = SamplingParams {
        max_tokens: Some(3),
        temperature: Some(0.5),
        top_p: Some(0.9),
        seed: Some(42),
        stop: vec!["END".into()],
        ..SamplingParams::default()
    };
    let (chunks, status) = sync.complete(CompleteRequest { sampling: Some(sampling), ..request("mock") }).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(text(&chunks), "echo: tell me");
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, "length");
    assert_eq!(last.usage.unwrap().completion_tokens, 3);
    let body = mock.last_request().unwrap().json().unwrap();
    assert_eq!(body["max_tokens"], 3);
    assert_eq!(body["temperature"], 0.5);
    assert_eq!(body["seed"], 42);
    assert_eq!(body["stop"], serde_json::json!(["END"]));
    assert!((body["top_p"].as_f64().unwrap() - 0.9).abs() < 1e-6);
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_stream_as_pieces_and_are_assembled_at_the_end() {
    let call = MockToolCall { name: "get_weather".into(), arguments: r#"{"city":"Paris","unit":"celsius"}"#.into() };
    let mock = MockProvider::start_with(Behavior { tool_call: Some(call), ..Behavior::default() }).await.unwrap();
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;
    let (chunks, status) = sync.complete(request("mock")).await;
    assert!(status.is_none(), "{status:?}");
    let (last, pieces) = chunks.split_last().unwrap();
    // The pieces come as the provider streams them: id and name first, then the arguments.
    assert!(pieces.len() >= 3, "{pieces:?}");
    assert_eq!(pieces[0].model, "gpt-test");
    let first = &pieces[0].tool_call_deltas[0];
    assert!(first.id.starts_with("call_"));
    assert_eq!((first.index, first.function_name.as_str()), (0, "get_weather"));
    let arguments: String =
        pieces.iter().flat_map(|c| &c.tool_call_deltas).map(|d| d.arguments_delta.as_str()).collect();
    assert_eq!(arguments, r#"{"city":"Paris","unit":"celsius"}"#);
    assert!(pieces.iter().all(|c| c.delta.is_empty() && c.finish_reason.is_empty()));

    assert_eq!(last.finish_reason, "tool_calls");
    assert_eq!(last.tool_calls.len(), 1);
    let tool = &last.tool_calls[0];
    assert_eq!((tool.id.as_str(), tool.r#type.as_str()), (first.id.as_str(), "function"));
    assert_eq!(tool.function_name, "get_weather");
    assert_eq!(tool.arguments_json, arguments);
    assert_eq!(last.usage.unwrap().completion_tokens, 9);
    sync.stop().await;
}

fn weather_tool() -> ToolDefinition {
    ToolDefinition {
        name: "get_weather".into(),
        description: "The weather of a city".into(),
        parameters_json: r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#.into(),
        strict: Some(true),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canonical_request_reaches_the_provider_in_its_openai_place() {
    let mock = MockProvider::start_with(Behavior {
        prompt_cache: Some(PromptCache { read_tokens: 4, write_tokens: 0 }),
        ..Behavior::default()
    })
    .await
    .unwrap();
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;

    // Tools offered: the mock calls the tool; the call goes back with its result; text follows.
    let options = ChatOptions {
        tools: vec![weather_tool()],
        tool_choice: Some(ToolChoice { mode: tool_choice::Mode::Required as i32, function_name: String::new() }),
        parallel_tool_calls: Some(false),
        user: "end-user-7".into(),
        ..ChatOptions::default()
    };
    let target = Target {
        provider: "mock".into(),
        model: "gpt-test".into(),
        max_tokens_param: "max_completion_tokens".into(),
        ..Target::default()
    };
    let sampling = SamplingParams { max_tokens: Some(50), ..SamplingParams::default() };
    let ask = CompleteRequest {
        options: Some(options.clone()),
        target: Some(target),
        sampling: Some(sampling),
        ..request("mock")
    };
    let (chunks, status) = sync.complete(ask.clone()).await;
    assert!(status.is_none(), "{status:?}");
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, "tool_calls");
    let call = last.tool_calls[0].clone();
    assert_eq!(call.function_name, "get_weather");
    let arguments: serde_json::Value = serde_json::from_str(&call.arguments_json).unwrap();
    assert!(arguments["city"].is_string(), "arguments follow the schema: {arguments}");
    let usage = last.usage.unwrap();
    assert_eq!(usage.cached_prompt_tokens, 4, "prompt_tokens_details.cached_tokens kept");
    let body = mock.last_request().unwrap().json().unwrap();
    assert_eq!(body["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(body["tools"][0]["function"]["strict"], true);
    assert_eq!(body["tools"][0]["function"]["parameters"]["required"], serde_json::json!(["city"]));
    assert_eq!((body["tool_choice"].as_str(), body["parallel_tool_calls"].as_bool()), (Some("required"), Some(false)));
    assert_eq!(body["user"], "end-user-7");
    assert_eq!(body["max_completion_tokens"], 50, "the target's model takes max_completion_tokens");
    assert!(body.get("max_tokens").is_none());

    let mut follow_up = ask.clone();
    follow_up.messages.push(ChatMessage {
        role: "assistant".into(),
        tool_calls: vec![call.clone()],
        ..ChatMessage::default()
    });
    follow_up.messages.push(ChatMessage {
        role: "tool".into(),
        content: "21 degrees".into(),
        tool_call_id: call.id.clone(),
        ..ChatMessage::default()
    });
    follow_up.options = Some(ChatOptions { tool_choice: None, ..options });
    let (chunks, status) = sync.complete(follow_up).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(text(&chunks), "echo: 21 degrees");
    let body = mock.last_request().unwrap().json().unwrap();
    assert_eq!(body["messages"][2]["tool_calls"][0]["id"], call.id.as_str());
    assert_eq!(body["messages"][2]["content"], serde_json::Value::Null);
    assert_eq!(body["messages"][3]["tool_call_id"], call.id.as_str());

    // Structured output, an image part and reasoning.
    let image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAHnOcQAAAAABJRU5ErkJggg==";
    let schema = r#"{"type":"object","properties":{"answer":{"type":"string"},"confidence":{"type":"number"}},"required":["answer","confidence"]}"#;
    let structured = CompleteRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            parts: vec![
                ContentPart { part: Some(content_part::Part::Text("what is in the picture".into())) },
                ContentPart {
                    part: Some(content_part::Part::ImageUrl(ImageUrl { url: image.into(), detail: "low".into() })),
                },
            ],
            ..ChatMessage::default()
        }],
        options: Some(ChatOptions {
            response_format: Some(ResponseFormat {
                kind: response_format::Kind::JsonSchema as i32,
                name: "answer".into(),
                schema_json: schema.into(),
                strict: Some(true),
                ..ResponseFormat::default()
            }),
            reasoning_effort: "low".into(),
            ..ChatOptions::default()
        }),
        ..request("mock")
    };
    let (chunks, status) = sync.complete(structured).await;
    assert!(status.is_none(), "{status:?}");
    let answer: serde_json::Value = serde_json::from_str(&text(&chunks)).expect("the content is JSON");
    assert!(answer["answer"].is_string() && answer["confidence"].is_number(), "{answer}");
    let reasoning: String = chunks.iter().map(|c| c.reasoning_delta.as_str()).collect();
    assert!(!reasoning.is_empty(), "the reasoning streams as reasoning_delta");
    assert!(chunks.last().unwrap().usage.unwrap().reasoning_tokens > 0);
    let recorded = mock.last_request().unwrap();
    assert_eq!(recorded.images(), [image]);
    let body = recorded.json().unwrap();
    assert_eq!(body["reasoning_effort"], "low");
    assert_eq!(body["response_format"]["json_schema"]["name"], "answer");
    assert_eq!(body["messages"][0]["content"][1]["image_url"]["detail"], "low");
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_parameters_are_forwarded_dropped_or_refused_by_provider() {
    let mock = MockProvider::start().await.unwrap();
    let forward = provider("forward", &mock);
    let drop = ProviderSpec { unknown_params: Some(UnknownParams::Drop), ..provider("drop", &mock) };
    let refuse = ProviderSpec { unknown_params: Some(UnknownParams::Refuse), ..provider("refuse", &mock) };
    let sync = RunningSync::start(vec![forward, drop, refuse]).await;
    let with_extras = |name: &str| CompleteRequest {
        options: Some(ChatOptions {
            extra_json: r#"{"repetition_penalty": 1.1, "guided_choice": ["a", "b"]}"#.into(),
            ..ChatOptions::default()
        }),
        sampling: Some(SamplingParams { top_k: Some(5), ..SamplingParams::default() }),
        ..request(name)
    };

    let (chunks, status) = sync.complete(with_extras("forward")).await;
    assert!(status.is_none(), "{status:?}");
    assert!(chunks.iter().all(|c| c.dropped_params.is_empty()), "nothing was left out");
    let recorded = mock.last_request().unwrap();
    assert_eq!(recorded.unknown_parameters(), ["guided_choice", "repetition_penalty", "top_k"]);
    assert_eq!(recorded.json().unwrap()["guided_choice"], serde_json::json!(["a", "b"]));

    let (chunks, status) = sync.complete(with_extras("drop")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(chunks[0].dropped_params, ["top_k", "repetition_penalty", "guided_choice"], "on the first chunk");
    assert!(chunks[1..].iter().all(|c| c.dropped_params.is_empty()));
    assert!(mock.last_request().unwrap().unknown_parameters().is_empty());

    mock.reset_counters();
    let mut client = sync.client.clone();
    let status = client.complete(with_extras("refuse")).await.expect_err("refused before any call");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(metadata(&status, ERROR_CODE_METADATA), Some("invalid_request"));
    assert!(status.message().starts_with("`top_k`"), "{}", status.message());
    assert_eq!(mock.requests_total(), 0, "nothing reached the provider");
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_overflow_keeps_its_code_and_is_not_retried() {
    let mock = MockProvider::start_with(Behavior { context_window: Some(12), ..Behavior::default() }).await.unwrap();
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;
    let (chunks, status) = sync.complete(request("mock")).await;
    let status = status.unwrap();
    assert!(chunks.is_empty());
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(metadata(&status, ERROR_CODE_METADATA), Some("context_length_exceeded"));
    assert_eq!(metadata(&status, UPSTREAM_STATUS_METADATA), Some("400"));
    assert!(status.message().starts_with("`messages` does not fit"), "{}", status.message());
    assert!(status.message().contains("maximum context length is 12 tokens"), "{}", status.message());
    assert_eq!(mock.requests_total(), 1, "a larger window is another model's, not another attempt's");

    let (chunks, status) =
        sync.complete(CompleteRequest { messages: vec![message("user", "hi")], ..request("mock") }).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(text(&chunks), "echo: hi");
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_unknown_targets_fail_with_matching_codes() {
    let mock = MockProvider::start_with(Behavior {
        strict_models: true,
        models: vec!["gpt-test".into()],
        ..Behavior::default()
    })
    .await
    .unwrap();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let down = ProviderSpec { base_url: format!("http://{closed}/v1"), ..provider("down", &mock) };
    let sync = RunningSync::start(vec![provider("mock", &mock), down]).await;

    let cases = [
        (CompleteRequest { provider: "nope".into(), ..request("mock") }, Code::NotFound),
        (CompleteRequest { provider: String::new(), ..request("mock") }, Code::InvalidArgument),
        (CompleteRequest { model: String::new(), ..request("mock") }, Code::InvalidArgument),
        (CompleteRequest { messages: Vec::new(), ..request("mock") }, Code::InvalidArgument),
        (CompleteRequest { messages: vec![message("robot", "x")], ..request("mock") }, Code::InvalidArgument),
        (CompleteRequest { request_id: "line\nbreak".into(), ..request("mock") }, Code::InvalidArgument),
        (CompleteRequest { timeout_ms: -1, ..request("mock") }, Code::InvalidArgument),
        (
            CompleteRequest {
                sampling: Some(SamplingParams { temperature: Some(9.0), ..SamplingParams::default() }),
                ..request("mock")
            },
            Code::InvalidArgument,
        ),
    ];
    for (bad, code) in cases {
        let mut client = sync.client.clone();
        let status = client.complete(bad).await.expect_err("rejected before any stream");
        assert_eq!(status.code(), code, "{}", status.message());
    }
    assert_eq!(mock.requests_total(), 0, "nothing invalid reached the provider");

    let (_, status) = sync.complete(CompleteRequest { model: "gpt-unknown".into(), ..request("mock") }).await;
    let status = status.unwrap();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(metadata(&status, ERROR_CODE_METADATA), Some("model_not_found"));

    let (_, status) = sync.complete(request("down")).await;
    let status = status.unwrap();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(metadata(&status, ERROR_CODE_METADATA), Some("service_unavailable"));
    assert!(status.message().contains("unreachable"), "{}", status.message());

    // Provider names are case-insensitive.
    let (_, status) = sync.complete(request("MOCK")).await;
    assert!(status.is_none(), "{status:?}");
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_rpcs_are_unimplemented_without_a_configured_queue() {
    let sync = RunningSync::start(Vec::new()).await;
    let mut client = sync.client.clone();
    let statuses = [
        client.enqueue(EnqueueRequest::default()).await.unwrap_err(),
        client.get_job(GetJobRequest::default()).await.unwrap_err(),
        client.list_jobs(ListJobsRequest::default()).await.unwrap_err(),
        client.retry_job(RetryJobRequest::default()).await.unwrap_err(),
    ];
    for status in statuses {
        assert_eq!(status.code(), Code::Unimplemented);
        assert!(status.message().contains("not configured"), "{}", status.message());
    }
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_calls_are_counted_in_metrics() {
    let behavior = Behavior { chunk_delay: Duration::from_millis(50), ..Behavior::default() };
    let mock = MockProvider::start_with(behavior).await.unwrap();
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;
    let (_, status) = sync.complete(request("mock")).await;
    assert!(status.is_none());
    mock.set_failures(0.0, 400);
    mock.fail_next(1);
    let (_, status) = sync.complete(CompleteRequest { model: "unlisted-model".into(), ..request("mock") }).await;
    assert!(status.is_some());

    // A caller that goes away mid-stream.
    let mut client = sync.client.clone();
    let mut stream = client.complete(request("mock")).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    drop(stream);

    let wanted = [
        r#"meshgate_sync_upstream_requests_total{model="gpt-test",outcome="ok",provider="mock",status="200",service="sync"} 1"#,
        r#"meshgate_sync_upstream_requests_total{model="other",outcome="invalid_request",provider="mock",status="400",service="sync"} 1"#,
        r#"meshgate_sync_upstream_requests_total{model="gpt-test",outcome="cancelled",provider="mock",status="200",service="sync"} 1"#,
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = sync.metrics().await;
        if wanted.iter().all(|line| text.contains(line)) {
            assert!(text.contains("meshgate_sync_upstream_duration_seconds_bucket"));
            assert!(text.contains("meshgate_sync_upstream_first_chunk_seconds_count{model=\"gpt-test\",provider=\"mock\",service=\"sync\"}"));
            break;
        }
        assert!(Instant::now() < deadline, "metrics never showed {wanted:?}:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sync.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_rejects_malformed_providers_and_config() {
    let bad = ProviderSpec { name: "x".into(), base_url: "ftp://nope".into(), ..ProviderSpec::default() };
    let config = Config { providers: vec![bad], providers_from_env: false, ..Config::default() };
    let err = meshgate_sync::serve(config, Listeners::ephemeral().await.unwrap(), Shutdown::new()).await.unwrap_err();
    assert!(err.to_string().contains("invalid base URL"), "{err}");

    let config = Config { timeout_ms: 0, providers_from_env: false, ..Config::default() };
    let err = meshgate_sync::serve(config, Listeners::ephemeral().await.unwrap(), Shutdown::new()).await.unwrap_err();
    assert!(err.to_string().contains("timeout_ms"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_streams_share_the_pool_concurrently() {
    let mock = MockProvider::start_with(Behavior { chunk_delay: Duration::from_millis(5), ..Behavior::default() })
        .await
        .unwrap();
    let sync = RunningSync::start(vec![provider("mock", &mock)]).await;
    let mut calls = Vec::new();
    for i in 0..32 {
        let client = sync.client.clone();
        calls.push(tokio::spawn(async move {
            let mut client = client;
            let user = format!("question number {i}");
            let req = CompleteRequest {
                request_id: format!("r{i}"),
                messages: vec![message("user", &user)],
                ..request("mock")
            };
            let mut stream = client.complete(req).await.unwrap().into_inner();
            let mut out = String::new();
            while let Some(chunk) = stream.message().await.unwrap() {
                out.push_str(&chunk.delta);
            }
            (user, out)
        }));
    }
    for call in calls {
        let (user, out) = call.await.unwrap();
        assert_eq!(out, reply_text(&user, 0, None));
    }
    assert_eq!(mock.requests_total(), 32);
    sync.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Sync.Embed

fn embed_request(provider: &str) -> EmbedRequest {
    EmbedRequest {
        request_id: "req-embed".into(),
        provider: provider.into(),
        model: "emb-test".into(),
        texts: vec!["first".into(), "second text".into()],
        ..EmbedRequest::default()
    }
}

fn embedding_provider(name: &str, mock: &MockProvider) -> ProviderSpec {
    ProviderSpec { embedding_models: vec!["emb-test".into()], ..provider(name, mock) }
}

#[tokio::test]
async fn embed_sends_texts_or_token_ids_and_decodes_the_vectors() {
    let mock = MockProvider::start().await.unwrap();
    let sync = RunningSync::start(vec![embedding_provider("mock", &mock)]).await;
    let mut client = sync.client.clone();
    let answer = client.embed(embed_request("mock")).await.unwrap().into_inner();
    assert_eq!(answer.vectors.len(), 2);
    assert!(answer.vectors.iter().all(|v| v.values.len() == 16));
    let usage = answer.usage.unwrap();
    assert!(usage.prompt_tokens > 0 && usage.total_tokens == usage.prompt_tokens, "{usage:?}");
    let sent = mock.last_request().unwrap();
    assert_eq!((sent.path, sent.request_id.as_deref()), ("/v1/embeddings", Some("req-embed")));
    let body: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"model": "emb-test", "input": ["first", "second text"], "encoding_format": "float"})
    );

    // Token ids, a length for the model, the end user and an unknown parameter all go along.
    let tokens = EmbedRequest {
        texts: Vec::new(),
        tokens: vec![TokenIds { ids: vec![1, 2, 3] }, TokenIds { ids: vec![4] }],
        dimensions: 4,
        user: "u-1".into(),
        extra_json: r#"{"vendor_knob": true}"#.into(),
        ..embed_request("mock")
    };
    let answer = client.embed(tokens).await.unwrap().into_inner();
    assert_eq!(answer.vectors.iter().map(|v| v.values.len()).collect::<Vec<_>>(), [4, 4]);
    let body: serde_json::Value = serde_json::from_slice(&mock.last_request().unwrap().body).unwrap();
    assert_eq!(body["input"], serde_json::json!([[1, 2, 3], [4]]));
    assert_eq!((body["dimensions"].as_u64(), body["user"].as_str()), (Some(4), Some("u-1")));
    assert_eq!(body["vendor_knob"], true);
    sync.stop().await;
}

#[tokio::test]
async fn embed_retries_what_may_pass_and_refuses_what_cannot() {
    let mock = MockProvider::start().await.unwrap();
    let anthropic = ProviderSpec { kind: meshgate_catalog::ProviderKind::Anthropic, ..provider("claude", &mock) };
    let sync = RunningSync::start(vec![embedding_provider("mock", &mock), anthropic]).await;
    let mut client = sync.client.clone();

    // Two 503s, then an answer: retried within the call.
    mock.set_failures(0.0, 503);
    mock.fail_next(2);
    let answer = client.embed(embed_request("mock")).await.unwrap().into_inner();
    assert_eq!(answer.vectors.len(), 2);
    assert_eq!(mock.stats().embedding_requests, 3);

    // A 400 is the caller's, never retried; its status and message come back.
    mock.reset_counters();
    let bad = EmbedRequest { dimensions: 100_000, ..embed_request("mock") };
    let status = client.embed(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("dimensions"), "{status:?}");
    assert_eq!(mock.stats().embedding_requests, 1);

    // An answer that is no embeddings list is the provider's fault.
    mock.update(|b| b.garbage = true);
    let status = client.embed(embed_request("mock")).await.unwrap_err();
    assert_eq!(status.metadata().get(ERROR_CODE_METADATA).unwrap(), "upstream_error", "{status:?}");
    mock.update(|b| b.garbage = false);

    // Refused before any call: no provider, an Anthropic provider, no inputs or both kinds.
    let refused = [
        (embed_request("nobody"), Code::NotFound),
        (embed_request("claude"), Code::InvalidArgument),
        (EmbedRequest { texts: Vec::new(), ..embed_request("mock") }, Code::InvalidArgument),
        (EmbedRequest { tokens: vec![TokenIds { ids: vec![1] }], ..embed_request("mock") }, Code::InvalidArgument),
        (EmbedRequest { texts: vec![String::new()], ..embed_request("mock") }, Code::InvalidArgument),
    ];
    mock.reset_counters();
    for (request, code) in refused {
        let status = client.embed(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
    }
    assert_eq!(mock.stats().embedding_requests, 0);
    let metrics = sync.metrics().await;
    assert!(
        metrics.contains(
            r#"meshgate_sync_upstream_requests_total{model="emb-test",outcome="ok",provider="mock",status="200",service="sync"} 1"#
        ),
        "{metrics}"
    );
    sync.stop().await;
}
