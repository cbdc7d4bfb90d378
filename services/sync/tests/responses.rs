//! `Sync.Complete` to a provider of kind `openai-responses` (the mock's `/v1/responses`) over real
//! gRPC and HTTP: the same conversation answers the same as through Chat Completions, tool calls
//! and reasoning come back as chunks, and errors, retries and broken streams read as they do for
//! the other formats.

mod common;

use common::{MODEL, RunningSync};
use meshgate_mock_provider::reply::{prompt_tokens, reply_text};
use meshgate_mock_provider::{Behavior, MockProvider, MockToolCall, PromptCache, StreamFault};
use meshgate_proto::common::v1::{ChatMessage, ChatOptions, SamplingParams, ToolDefinition};
use meshgate_proto::sync::v1::{CompleteChunk, CompleteRequest};
use meshgate_runtime::error::{ERROR_CODE_METADATA, RETRY_AFTER_METADATA};
use meshgate_sync::{ProviderKind, ProviderSpec};
use tonic::Code;

const KEY: &str = "sk-test";

/// The two providers of `MODEL` on `mock`: `responses` (the Responses API) and `chat`.
fn providers(mock: &MockProvider) -> Vec<ProviderSpec> {
    let spec = |name: &str, kind| ProviderSpec {
        name: name.into(),
        kind,
        base_url: mock.base_url(),
        api_key: Some(KEY.into()),
        models: vec![MODEL.into()],
        ..ProviderSpec::default()
    };
    vec![spec("responses", ProviderKind::OpenaiResponses), spec("chat", ProviderKind::Openai)]
}

async fn mock(behavior: Behavior) -> MockProvider {
    MockProvider::start_with(Behavior { api_key: Some(KEY.into()), ..behavior }).await.unwrap()
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage { role: role.into(), content: content.into(), ..ChatMessage::default() }
}

fn request(provider: &str) -> CompleteRequest {
    CompleteRequest {
        request_id: "req-resp".into(),
        provider: provider.into(),
        model: MODEL.into(),
        messages: vec![message("system", "you are terse"), message("user", "tell me about the mesh gateway")],
        ..CompleteRequest::default()
    }
}

fn text(chunks: &[CompleteChunk]) -> String {
    chunks.iter().map(|c| c.delta.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_conversation_answers_the_same_as_through_chat_completions() {
    let mock = mock(Behavior::default()).await;
    let sync = RunningSync::start(providers(&mock)).await;

    let (responses, error) = sync.complete(request("responses")).await;
    assert!(error.is_none(), "{error:?}");
    let sent = mock.last_request().unwrap();
    assert_eq!(sent.path, "/v1/responses");
    assert_eq!(sent.request_id.as_deref(), Some("req-resp"));
    assert_eq!(
        sent.json().unwrap(),
        serde_json::json!({
            "model": MODEL,
            "stream": true,
            "store": false,
            "input": [
                {"type": "message", "role": "system", "content": "you are terse"},
                {"type": "message", "role": "user", "content": "tell me about the mesh gateway"}
            ]
        })
    );
    let (chat, error) = sync.complete(request("chat")).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(mock.last_request().unwrap().path, "/v1/chat/completions");

    assert_eq!(text(&responses), "echo: tell me about the mesh gateway");
    let deltas = |chunks: &[CompleteChunk]| chunks.iter().map(|c| c.delta.clone()).collect::<Vec<_>>();
    assert_eq!(deltas(&responses), deltas(&chat), "one chunk per streamed piece in both formats");
    let (last, chat_last) = (responses.last().unwrap(), chat.last().unwrap());
    assert_eq!((last.finish_reason.as_str(), chat_last.finish_reason.as_str()), ("stop", "stop"));
    let prompt = prompt_tokens(["you are terse", "tell me about the mesh gateway"]) as i64;
    let usage = last.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), (prompt, 7, prompt + 7));
    assert_eq!(last.usage, chat_last.usage);
    assert_eq!(responses[0].model, MODEL);

    // max_output_tokens caps the answer: an incomplete response is Chat Completions' `length`;
    // what the Responses API has no field for is left out and named.
    let long = (1..=30).map(|n| format!("w{n}")).collect::<Vec<_>>().join(" ");
    let capped = |max_tokens| CompleteRequest {
        messages: vec![message("user", &long)],
        sampling: Some(SamplingParams { max_tokens: Some(max_tokens), seed: Some(9), ..SamplingParams::default() }),
        ..request("responses")
    };
    let (chunks, error) = sync.complete(capped(16)).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(text(&chunks), reply_text(&long, 0, Some(16)));
    assert_eq!(chunks.last().unwrap().finish_reason, "length");
    assert_eq!(chunks[0].dropped_params, ["seed"]);
    let body = mock.last_request().unwrap().json().unwrap();
    assert_eq!(body["max_output_tokens"], 16);
    assert!(body.get("seed").is_none() && body.get("max_tokens").is_none(), "{body}");

    // Under OpenAI's smallest limit: refused naming the field, and the provider never called.
    let before = mock.stats().responses_requests;
    let mut client = sync.client.clone();
    let status = client.complete(capped(15)).await.expect_err("refused before any call");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("max_tokens") && status.message().contains("16"), "{}", status.message());
    assert_eq!(mock.stats().responses_requests, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_and_reasoning_round_trip_through_the_responses_format() {
    let call = MockToolCall { name: "get_weather".into(), arguments: r#"{"city":"Paris"}"#.into() };
    let mock = mock(Behavior {
        tool_call: Some(call),
        prompt_cache: Some(PromptCache { read_tokens: 5, write_tokens: 0 }),
        ..Behavior::default()
    })
    .await;
    let sync = RunningSync::start(providers(&mock)).await;
    let weather = ToolDefinition {
        name: "get_weather".into(),
        description: "The weather of a city".into(),
        parameters_json: r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#.into(),
        strict: None,
    };
    let ask = CompleteRequest {
        options: Some(ChatOptions { tools: vec![weather], ..ChatOptions::default() }),
        ..request("responses")
    };
    let (chunks, error) = sync.complete(ask.clone()).await;
    assert!(error.is_none(), "{error:?}");
    let (last, pieces) = chunks.split_last().unwrap();
    assert_eq!(pieces[0].tool_call_deltas[0].function_name, "get_weather");
    let arguments: String =
        pieces.iter().flat_map(|c| &c.tool_call_deltas).map(|d| d.arguments_delta.as_str()).collect();
    assert_eq!(arguments, r#"{"city":"Paris"}"#);
    assert_eq!(last.finish_reason, "tool_calls");
    let tool = last.tool_calls[0].clone();
    assert!(tool.id.starts_with("call_"), "the call's call_id: {}", tool.id);
    assert_eq!(tool.arguments_json, r#"{"city":"Paris"}"#);
    assert_eq!(last.usage.unwrap().cached_prompt_tokens, 5);
    let body = mock.last_request().unwrap().json().unwrap();
    assert_eq!(
        body["tools"][0],
        serde_json::json!({"type": "function", "name": "get_weather", "description": "The weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}})
    );

    // The call and its result go back as function_call and function_call_output items; a
    // reasoning effort streams reasoning before the answer.
    let mut follow_up = ask;
    follow_up.messages.push(ChatMessage {
        role: "assistant".into(),
        tool_calls: vec![tool.clone()],
        ..Default::default()
    });
    follow_up.messages.push(ChatMessage {
        role: "tool".into(),
        content: "21C".into(),
        tool_call_id: tool.id.clone(),
        ..ChatMessage::default()
    });
    follow_up.options.as_mut().unwrap().reasoning_effort = "low".into();
    mock.update(|b| b.tool_call = None);
    let (chunks, error) = sync.complete(follow_up).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(text(&chunks), "echo: 21C");
    let reasoning: String = chunks.iter().map(|c| c.reasoning_delta.as_str()).collect();
    assert!(!reasoning.is_empty(), "reasoning summary deltas stream as reasoning_delta");
    assert!(chunks.last().unwrap().usage.unwrap().reasoning_tokens > 0);
    let body = mock.last_request().unwrap().json().unwrap();
    assert_eq!(body["reasoning"]["effort"], "low");
    assert_eq!(
        body["input"][2],
        serde_json::json!({"type": "function_call", "call_id": tool.id, "name": "get_weather", "arguments": r#"{"city":"Paris"}"#})
    );
    assert_eq!(
        body["input"][3],
        serde_json::json!({"type": "function_call_output", "call_id": tool.id, "output": "21C"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_errors_retries_and_broken_streams_read_like_the_other_formats() {
    let mock = mock(Behavior { retry_after_secs: Some(30), ..Behavior::default() }).await;
    let sync = RunningSync::start(providers(&mock)).await;

    // A 503 before anything arrived is retried; a 429 with Retry-After beyond the retry bound is not.
    mock.set_failures(0.0, 503);
    mock.fail_next(1);
    let (chunks, error) = sync.complete(request("responses")).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(text(&chunks), "echo: tell me about the mesh gateway");
    assert_eq!(mock.stats().responses_requests, 2, "the failure, then the retry");
    mock.set_failures(1.0, 429);
    let (_, status) = sync.complete(request("responses")).await;
    let status = status.unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.metadata().get(RETRY_AFTER_METADATA).unwrap(), "30");
    mock.set_failures(0.0, 500);

    // Broken mid-stream: what arrived stays, the error says why, nothing is retried.
    for (fault, message, code) in [
        (StreamFault::Abort, "mid-stream", "service_unavailable"),
        (StreamFault::Close, "before response.completed", "upstream_error"),
    ] {
        mock.update(|b| {
            b.fail_after_chunks = Some(3);
            b.stream_fault = fault;
        });
        mock.reset_counters();
        let (chunks, status) = sync.complete(request("responses")).await;
        let status = status.unwrap_or_else(|| panic!("{fault:?} must end with an error"));
        assert_eq!(text(&chunks), "echo: tell me", "{fault:?}");
        assert!(chunks.iter().all(|c| c.finish_reason.is_empty() && c.usage.is_none()), "{fault:?}");
        assert_eq!(status.code(), Code::Unavailable, "{fault:?}");
        assert_eq!(status.metadata().get(ERROR_CODE_METADATA).unwrap(), code, "{fault:?}");
        assert!(status.message().contains(message), "{fault:?}: {}", status.message());
        assert_eq!(mock.stats().responses_requests, 1, "{fault:?}: content reached the caller, no retry");
    }
}
