//! `Sync.Complete` to an Anthropic Messages API provider (the mock's `/v1/messages`) over real
//! gRPC and HTTP: the same conversation answers the same as through the OpenAI format.

mod common;

use common::RunningSync;
use meshgate_catalog::UnknownParams;
use meshgate_mock_provider::reply::{prompt_tokens, reply_text};
use meshgate_mock_provider::{Behavior, MockProvider, MockToolCall, PromptCache, StreamFault};
use meshgate_proto::common::v1::{
    ChatMessage, ChatOptions, ContentPart, ImageUrl, ResponseFormat, SamplingParams, Target, ToolCall, ToolDefinition,
    Usage, content_part, response_format,
};
use meshgate_proto::sync::v1::{CompleteChunk, CompleteRequest};
use meshgate_runtime::error::{ERROR_CODE_METADATA, RETRY_AFTER_METADATA};
use meshgate_sync::{ProviderKind, ProviderSpec};
use tonic::Code;

const KEY: &str = "sk-ant-test";

fn providers(mock: &MockProvider) -> Vec<ProviderSpec> {
    let spec = |name: &str, kind| ProviderSpec {
        name: name.into(),
        kind,
        base_url: mock.base_url(),
        api_key: Some(KEY.into()),
        models: vec!["claude-test".into()],
        ..ProviderSpec::default()
    };
    vec![spec("claude", ProviderKind::Anthropic), spec("openai", ProviderKind::Openai)]
}

async fn mock(behavior: Behavior) -> MockProvider {
    MockProvider::start_with(Behavior { api_key: Some(KEY.into()), ..behavior }).await.unwrap()
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage { role: role.into(), content: content.into(), ..ChatMessage::default() }
}

fn request(provider: &str) -> CompleteRequest {
    CompleteRequest {
        request_id: "req-ant".into(),
        provider: provider.into(),
        model: "claude-test".into(),
        messages: vec![message("system", "you are terse"), message("user", "tell me about the mesh gateway")],
        ..CompleteRequest::default()
    }
}

fn text(chunks: &[CompleteChunk]) -> String {
    chunks.iter().map(|c| c.delta.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_conversation_answers_the_same_in_both_formats() {
    let mock = mock(Behavior::default()).await;
    let sync = RunningSync::start(providers(&mock)).await;

    let (anthropic, error) = sync.complete(request("claude")).await;
    assert!(error.is_none(), "{error:?}");
    let sent = mock.last_request().unwrap();
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.request_id.as_deref(), Some("req-ant"));
    assert_eq!(
        sent.json().unwrap(),
        serde_json::json!({
            "model": "claude-test",
            "max_tokens": 4096,
            "stream": true,
            "system": "you are terse",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "tell me about the mesh gateway"}]}]
        })
    );
    let (openai, error) = sync.complete(request("openai")).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(mock.last_request().unwrap().path, "/v1/chat/completions");

    assert_eq!(text(&anthropic), "echo: tell me about the mesh gateway");
    assert_eq!(text(&anthropic), text(&openai));
    let deltas = |chunks: &[CompleteChunk]| chunks.iter().map(|c| c.delta.clone()).collect::<Vec<_>>();
    assert_eq!(deltas(&anthropic), deltas(&openai), "one chunk per streamed piece in both formats");
    let (last, openai_last) = (anthropic.last().unwrap(), openai.last().unwrap());
    assert_eq!(last.finish_reason, "stop");
    assert_eq!(last.finish_reason, openai_last.finish_reason);
    let prompt = prompt_tokens(["you are terse", "tell me about the mesh gateway"]) as i64;
    assert_eq!(
        last.usage,
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: 7,
            total_tokens: prompt + 7,
            cost_micros: 0,
            ..Usage::default()
        })
    );
    assert_eq!(last.usage, openai_last.usage);
    assert_eq!(anthropic[0].model, "claude-test");
    assert!(anthropic[1..].iter().all(|c| c.model.is_empty()));
    assert_eq!(mock.stats().messages_requests, 1);

    // max_tokens caps the answer: Anthropic's max_tokens stop reason is OpenAI's length.
    let sampling =
        SamplingParams { max_tokens: Some(3), top_k: Some(4), stop: vec!["END".into()], ..SamplingParams::default() };
    let (chunks, error) = sync.complete(CompleteRequest { sampling: Some(sampling), ..request("claude") }).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(text(&chunks), reply_text("tell me about the mesh gateway", 0, Some(3)));
    assert_eq!(chunks.last().unwrap().finish_reason, "length");
    let body = mock.last_request().unwrap().json().unwrap();
    assert_eq!((body["max_tokens"].as_i64(), body["top_k"].as_i64()), (Some(3), Some(4)));
    assert_eq!(body["stop_sequences"], serde_json::json!(["END"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_round_trip_through_the_anthropic_format() {
    let call = MockToolCall { name: "get_weather".into(), arguments: r#"{"city":"Paris","unit":"celsius"}"#.into() };
    let mock = mock(Behavior { tool_call: Some(call), ..Behavior::default() }).await;
    let sync = RunningSync::start(providers(&mock)).await;
    let (chunks, error) = sync.complete(request("claude")).await;
    assert!(error.is_none(), "{error:?}");
    let (last, pieces) = chunks.split_last().unwrap();
    // tool_use, then its input_json_delta pieces, as Anthropic streams them.
    assert!(pieces.len() >= 2, "{pieces:?}");
    assert_eq!(pieces[0].tool_call_deltas[0].function_name, "get_weather");
    let arguments: String =
        pieces.iter().flat_map(|c| &c.tool_call_deltas).map(|d| d.arguments_delta.as_str()).collect();
    assert_eq!(arguments, r#"{"city":"Paris","unit":"celsius"}"#);
    assert_eq!(last.finish_reason, "tool_calls");
    assert_eq!(last.tool_calls.len(), 1);
    let tool = &last.tool_calls[0];
    assert!(tool.id.starts_with("toolu_"), "{}", tool.id);
    assert_eq!((tool.r#type.as_str(), tool.function_name.as_str()), ("function", "get_weather"));
    assert_eq!(tool.arguments_json, r#"{"city":"Paris","unit":"celsius"}"#);

    // The call and its result go back as tool_use and tool_result blocks.
    let follow_up = CompleteRequest {
        messages: vec![
            message("user", "weather in Paris?"),
            ChatMessage { role: "assistant".into(), tool_calls: vec![tool.clone()], ..ChatMessage::default() },
            ChatMessage {
                role: "tool".into(),
                content: "21C".into(),
                tool_call_id: tool.id.clone(),
                ..ChatMessage::default()
            },
        ],
        ..request("claude")
    };
    mock.update(|b| b.tool_call = None);
    let (chunks, error) = sync.complete(follow_up).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(text(&chunks), "echo: 21C", "the mock echoes the last user turn: the tool result");
    let body = mock.last_request().unwrap().json().unwrap();
    assert_eq!(body["messages"][1]["content"][0]["type"], "tool_use");
    assert_eq!(body["messages"][1]["content"][0]["input"], serde_json::json!({"city": "Paris", "unit": "celsius"}));
    assert_eq!(
        body["messages"][2]["content"][0],
        serde_json::json!({"type": "tool_result", "tool_use_id": tool.id, "content": "21C"})
    );

    let bad = CompleteRequest {
        messages: vec![ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![ToolCall { arguments_json: "not json".into(), ..ToolCall::default() }],
            ..ChatMessage::default()
        }],
        ..request("claude")
    };
    let mut client = sync.client.clone();
    let status = client.complete(bad).await.expect_err("refused before any call");
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_errors_map_like_openai_ones_and_overload_is_retried() {
    let mock = mock(Behavior { retry_after_secs: Some(30), ..Behavior::default() }).await;
    let mut specs = providers(&mock);
    specs.push(ProviderSpec { name: "wrong-key".into(), api_key: Some("sk-wrong".into()), ..specs[0].clone() });
    let sync = RunningSync::start(specs).await;

    mock.set_failures(0.0, 529);
    mock.fail_next(1);
    let (chunks, error) = sync.complete(request("claude")).await;
    assert!(error.is_none(), "{error:?}");
    assert!(!chunks.is_empty());
    assert_eq!(mock.stats().messages_requests, 2, "529 overloaded, then the retry");

    mock.set_failures(1.0, 429);
    let (_, status) = sync.complete(request("claude")).await;
    let status = status.unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.metadata().get(RETRY_AFTER_METADATA).unwrap(), "30");
    assert!(status.message().contains("Injected failure"), "{}", status.message());
    mock.set_failures(0.0, 500);

    let (_, status) = sync.complete(request("wrong-key")).await;
    let status = status.unwrap();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("invalid x-api-key"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_broken_anthropic_streams_end_with_clear_errors() {
    let mock = mock(Behavior { garbage: true, ..Behavior::default() }).await;
    let sync = RunningSync::start(providers(&mock)).await;
    let (chunks, status) = sync.complete(request("claude")).await;
    let status = status.unwrap();
    assert!(chunks.is_empty());
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.metadata().get(ERROR_CODE_METADATA).unwrap(), "upstream_error");
    assert!(status.message().contains("malformed event"), "{}", status.message());

    let cases = [
        (StreamFault::Abort, "mid-stream", "service_unavailable"),
        (StreamFault::ErrorEvent, "Overloaded", "upstream_error"),
        (StreamFault::Close, "before message_stop", "upstream_error"),
    ];
    for (fault, message, code) in cases {
        mock.update(|b| {
            b.garbage = false;
            b.fail_after_chunks = Some(3);
            b.stream_fault = fault;
        });
        mock.reset_counters();
        let (chunks, status) = sync.complete(request("claude")).await;
        let status = status.unwrap_or_else(|| panic!("{fault:?} must end with an error"));
        assert_eq!(text(&chunks), "echo: tell me", "{fault:?}");
        assert!(chunks.iter().all(|c| c.finish_reason.is_empty() && c.usage.is_none()));
        assert_eq!(status.code(), Code::Unavailable, "{fault:?}");
        assert_eq!(status.metadata().get(ERROR_CODE_METADATA).unwrap(), code, "{fault:?}");
        assert!(status.message().contains(message), "{fault:?}: {}", status.message());
        assert_eq!(mock.stats().messages_requests, 1, "{fault:?}: content reached the caller, no retry");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canonical_request_reaches_anthropic_as_blocks_thinking_and_schemas() {
    let mock =
        mock(Behavior { prompt_cache: Some(PromptCache { read_tokens: 5, write_tokens: 3 }), ..Behavior::default() })
            .await;
    let sync = RunningSync::start(providers(&mock)).await;
    let weather = ToolDefinition {
        name: "get_weather".into(),
        description: "The weather of a city".into(),
        parameters_json: r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#.into(),
        strict: None,
    };
    let target = |capabilities: &[&str]| Target {
        provider: "claude".into(),
        model: "claude-test".into(),
        max_output_tokens: 20_000,
        capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
        ..Target::default()
    };

    // Tools offered: the mock calls the tool; cache reads and writes count in the prompt.
    let ask = CompleteRequest {
        options: Some(ChatOptions { tools: vec![weather.clone()], ..ChatOptions::default() }),
        target: Some(target(&["tools"])),
        ..request("claude")
    };
    let (chunks, error) = sync.complete(ask.clone()).await;
    assert!(error.is_none(), "{error:?}");
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, "tool_calls");
    let call = last.tool_calls[0].clone();
    assert!(call.id.starts_with("toolu_"), "{}", call.id);
    let usage = last.usage.unwrap();
    assert_eq!((usage.cached_prompt_tokens, usage.cache_write_tokens), (5, 3));
    let prompt = prompt_tokens(["you are terse", "tell me about the mesh gateway"]) as i64;
    assert_eq!(usage.prompt_tokens, prompt, "reads and writes are part of the prompt");
    let body = mock.last_request().unwrap().json().unwrap();
    assert_eq!(body["tools"][0]["input_schema"]["required"], serde_json::json!(["city"]));
    assert_eq!(body["max_tokens"], 20_000, "the model's catalog limit, not a fixed 4096");

    // The result goes back as a tool_result; thinking for a reasoning effort.
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
    follow_up.options.as_mut().unwrap().reasoning_effort = "low".into();
    let (chunks, error) = sync.complete(follow_up.clone()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(text(&chunks), "echo: 21 degrees");
    // Mid-loop, Anthropic wants the turn's signed thinking block, which the canonical request
    // does not keep: the loop goes on without thinking, and says so.
    assert!(chunks[0].dropped_params.contains(&"reasoning_effort".to_owned()), "{:?}", chunks[0].dropped_params);
    let body = mock.last_request().unwrap().json().unwrap();
    assert!(body.get("thinking").is_none(), "{body}");
    assert_eq!(body["messages"][2]["content"][0]["type"], "tool_result");

    // Once the loop is finished, a new question thinks.
    let mut next = follow_up;
    next.messages.push(ChatMessage {
        role: "assistant".into(),
        content: "echo: 21 degrees".into(),
        ..ChatMessage::default()
    });
    next.messages.push(message("user", "and tomorrow?"));
    let (chunks, error) = sync.complete(next).await;
    assert!(error.is_none(), "{error:?}");
    let reasoning: String = chunks.iter().map(|c| c.reasoning_delta.as_str()).collect();
    assert!(!reasoning.is_empty(), "thinking_delta streams as reasoning_delta");
    let body = mock.last_request().unwrap().json().unwrap();
    assert_eq!(body["thinking"], serde_json::json!({"type": "enabled", "budget_tokens": 2048}));

    // JSON-schema output: natively where the catalog says the model has it, else a forced tool;
    // an image as a base64 source.
    let image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAHnOcQAAAAABJRU5ErkJggg==";
    let schema = r#"{"type":"object","properties":{"answer":{"type":"string"}},"required":["answer"]}"#;
    let structured = |capabilities: &[&str]| CompleteRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            parts: vec![
                ContentPart { part: Some(content_part::Part::Text("describe it".into())) },
                ContentPart {
                    part: Some(content_part::Part::ImageUrl(ImageUrl { url: image.into(), detail: String::new() })),
                },
            ],
            ..ChatMessage::default()
        }],
        options: Some(ChatOptions {
            response_format: Some(ResponseFormat {
                kind: response_format::Kind::JsonSchema as i32,
                name: "answer".into(),
                schema_json: schema.into(),
                ..ResponseFormat::default()
            }),
            ..ChatOptions::default()
        }),
        target: Some(target(capabilities)),
        ..request("claude")
    };
    for capabilities in [&["vision", "json_schema"][..], &["vision"][..]] {
        let (chunks, error) = sync.complete(structured(capabilities)).await;
        assert!(error.is_none(), "{capabilities:?}: {error:?}");
        let answer: serde_json::Value = serde_json::from_str(&text(&chunks)).expect("the content is JSON");
        assert!(answer["answer"].is_string(), "{capabilities:?}: {answer}");
        let last = chunks.last().unwrap();
        assert_eq!(last.finish_reason, "stop", "{capabilities:?}: the answer is no tool call");
        assert!(last.tool_calls.is_empty());
        let recorded = mock.last_request().unwrap();
        assert_eq!(recorded.images(), [image]);
        let body = recorded.json().unwrap();
        if capabilities.contains(&"json_schema") {
            assert_eq!(body["output_config"]["format"]["type"], "json_schema");
            assert!(body.get("tools").is_none());
        } else {
            assert_eq!(body["tool_choice"], serde_json::json!({"type": "tool", "name": "json_response"}));
            assert_eq!(body["tools"][0]["input_schema"]["required"], serde_json::json!(["answer"]));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_leaves_out_what_it_cannot_take_and_says_so() {
    let mock = mock(Behavior { context_window: Some(12), ..Behavior::default() }).await;
    let mut specs = providers(&mock);
    specs.push(ProviderSpec {
        name: "strict-claude".into(),
        unknown_params: Some(UnknownParams::Refuse),
        ..specs[0].clone()
    });
    let sync = RunningSync::start(specs).await;
    let short = |provider: &str| CompleteRequest {
        messages: vec![message("user", "hi")],
        sampling: Some(SamplingParams { seed: Some(7), ..SamplingParams::default() }),
        options: Some(ChatOptions { extra_json: r#"{"repetition_penalty": 1.1}"#.into(), ..ChatOptions::default() }),
        ..request(provider)
    };
    let (chunks, error) = sync.complete(short("claude")).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(chunks[0].dropped_params, ["seed", "repetition_penalty"]);
    let recorded = mock.last_request().unwrap();
    assert!(recorded.unknown_parameters().is_empty(), "{:?}", recorded.unknown_parameters());
    assert!(recorded.json().unwrap().get("seed").is_none());

    let mut client = sync.client.clone();
    let status = client.complete(short("strict-claude")).await.expect_err("refused before any call");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("`seed`"), "{}", status.message());

    // "prompt is too long" is a context overflow, with OpenAI's code.
    let (_, status) = sync.complete(request("claude")).await;
    let status = status.unwrap();
    assert_eq!(status.metadata().get(ERROR_CODE_METADATA).unwrap(), "context_length_exceeded");
    assert!(status.message().starts_with("`messages` does not fit"), "{}", status.message());
}
