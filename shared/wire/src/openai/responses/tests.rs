use meshgate_proto::common::v1 as pb;
use meshgate_proto::common::v1::content_part::Part;
use meshgate_proto::sync::v1::{CompleteChunk, CompleteRequest};
use serde_json::{Value, json};

use super::*;
use crate::error::WireError;
use crate::sse::SseDecoder;
use crate::{Answer, ProviderModel, UnknownParams};

fn parse(body: &Value) -> Result<ResponsesRequest, WireError> {
    parse_responses(body.to_string().as_bytes())
}

fn agent_turn() -> Value {
    json!({
        "model": "gpt-4.1",
        "instructions": "You are terse.",
        "input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "What is in this picture, and the weather there?"},
                {"type": "input_image", "image_url": "https://example.com/paris.jpg", "detail": "low"}
            ]},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "The tower is in Paris."}],
             "encrypted_content": "gAAAA"},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "The Eiffel Tower. Checking the weather.", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "id": "fc_2", "call_id": "call_b", "name": "weather", "arguments": "{\"city\":\"Lyon\"}"},
            {"type": "function_call_output", "call_id": "call_a", "output": "18C"},
            {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "21C"}]},
            {"role": "developer", "content": "Answer in one line."}
        ],
        "tools": [{"type": "function", "name": "weather", "description": "Weather by city", "strict": true,
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
        "tool_choice": "auto",
        "parallel_tool_calls": true,
        "text": {"format": {"type": "json_schema", "name": "answer", "strict": true,
                 "schema": {"type": "object", "properties": {"line": {"type": "string"}}}}, "verbosity": "low"},
        "reasoning": {"effort": "low", "summary": "auto"},
        "max_output_tokens": 500, "temperature": 0.3, "top_p": 0.9, "top_logprobs": 2,
        "metadata": {"run": "7"}, "user": "u-1", "store": true, "stream": true,
        "include": ["message.output_text.logprobs", "reasoning.encrypted_content"],
        "truncation": "auto", "service_tier": "flex", "prompt_cache_key": "k1"
    })
}

#[test]
fn the_whole_request_is_carried() {
    let request = parse(&agent_turn()).unwrap();
    let chat = &request.chat;
    let roles: Vec<&str> = chat.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool", "tool", "system"]);
    assert_eq!(chat.messages[0].content, "You are terse.");
    assert_eq!(
        chat.messages[1].parts[1].part,
        Some(Part::ImageUrl(pb::ImageUrl { url: "https://example.com/paris.jpg".into(), detail: "low".into() }))
    );
    let assistant = &chat.messages[2];
    assert_eq!(assistant.content, "The Eiffel Tower. Checking the weather.");
    assert_eq!(assistant.reasoning_content, "The tower is in Paris.");
    let calls: Vec<(&str, &str)> =
        assistant.tool_calls.iter().map(|c| (c.id.as_str(), c.arguments_json.as_str())).collect();
    assert_eq!(
        calls,
        [("call_a", "{\"city\":\"Paris\"}"), ("call_b", "{\"city\":\"Lyon\"}")],
        "parallel calls join the message before them"
    );
    assert_eq!((chat.messages[3].tool_call_id.as_str(), chat.messages[3].content.as_str()), ("call_a", "18C"));
    assert_eq!(chat.messages[4].content, "21C");
    let options = &chat.options;
    assert_eq!(options.tools[0].name, "weather");
    assert_eq!(options.tools[0].strict, Some(true));
    assert_eq!(options.tools[0].parameters_json, agent_turn()["tools"][0]["parameters"].to_string());
    let format = options.response_format.as_ref().unwrap();
    assert_eq!((format.name.as_str(), format.strict), ("answer", Some(true)));
    assert_eq!(options.reasoning_effort, "low");
    assert_eq!((options.logprobs, options.top_logprobs), (Some(true), Some(2)));
    assert_eq!((options.user.as_str(), options.service_tier.as_str()), ("u-1", "flex"));
    assert_eq!(options.metadata["run"], "7");
    assert_eq!(
        options.extra_json, r#"{"prompt_cache_key":"k1","verbosity":"low"}"#,
        "text.verbosity is chat's verbosity"
    );
    assert_eq!(chat.sampling.max_tokens, Some(500));
    assert!(chat.stream && chat.include_usage);
    assert!(request.store);
    assert_eq!(request.instructions.as_deref(), Some("You are terse."));
    assert_eq!(request.reasoning_summary.as_deref(), Some("auto"));
    assert_eq!(request.unforwarded, ["input[1].encrypted_content", "include[1]", "reasoning.summary", "truncation"]);
    assert_eq!(chat.capabilities(), ["json_schema", "reasoning", "tools", "vision"]);
}

#[test]
fn a_string_input_is_one_user_message() {
    let request = parse(&json!({"model": "m", "input": "hello"})).unwrap();
    assert_eq!(request.chat.messages.len(), 1);
    assert_eq!((request.chat.messages[0].role.as_str(), request.chat.messages[0].content.as_str()), ("user", "hello"));
    assert!(request.store, "store defaults to true");
    assert!(!request.chat.stream);
    assert!(request.unforwarded.is_empty());
}

#[test]
fn allowed_tools_narrow_what_is_offered() {
    let body = json!({"model": "m", "input": "x",
        "tools": [{"type": "function", "name": "a"}, {"type": "function", "name": "b"}, {"type": "function", "name": "c"}],
        "tool_choice": {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "c"}, {"type": "function", "name": "a"}]}});
    let request = parse(&body).unwrap();
    let names: Vec<&str> = request.chat.options.tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    assert_eq!(request.chat.options.tool_choice.unwrap().mode, pb::tool_choice::Mode::Required as i32);
}

#[test]
fn bad_input_names_the_clients_field() {
    let base = |extra: Value| {
        let mut body = json!({"model": "m", "input": "x"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let cases = [
        (json!({"input": "x"}), "model"),
        (json!({"model": "m"}), "input"),
        (json!({"model": "m", "input": 5}), "input"),
        (base(json!({"tools": [{"type": "web_search"}]})), "tools[0].type"),
        (base(json!({"tools": [{"type": "file_search", "vector_store_ids": ["vs"]}]})), "tools[0].type"),
        (base(json!({"tools": [{"type": "function"}]})), "tools[0].name"),
        (base(json!({"tools": [{"type": "function", "name": "f", "parameters": [1]}]})), "tools[0].parameters"),
        (
            base(json!({"tools": [{"type": "function", "name": "f"}, {"type": "function", "name": "f"}]})),
            "tools[1].name",
        ),
        (base(json!({"tool_choice": {"type": "function", "name": "nope"}})), "tool_choice.name"),
        (base(json!({"tool_choice": "sometimes"})), "tool_choice"),
        (base(json!({"tool_choice": {"type": "web_search_preview"}})), "tool_choice.type"),
        (base(json!({"tool_choice": "required"})), "tool_choice"),
        (base(json!({"text": {"format": {"type": "json_schema", "schema": {}}}})), "text.format.name"),
        (base(json!({"text": {"format": {"type": "yaml"}}})), "text.format.type"),
        (base(json!({"text": {"format": {"type": "json_schema", "name": "a", "schema": "s"}}})), "text.format.schema"),
        (base(json!({"reasoning": {"effort": "enormous"}})), "reasoning.effort"),
        (base(json!({"max_output_tokens": 0})), "max_output_tokens"),
        (base(json!({"temperature": 3})), "temperature"),
        (base(json!({"top_logprobs": 21})), "top_logprobs"),
        (base(json!({"include": ["everything"]})), "include[0]"),
        (base(json!({"truncation": "middle"})), "truncation"),
        (base(json!({"background": true})), "background"),
        (base(json!({"conversation": "conv_1"})), "conversation"),
        (base(json!({"prompt": {"id": "pmpt_1"}})), "prompt"),
        (base(json!({"previous_response_id": ""})), "previous_response_id"),
        (base(json!({"stream_options": {"include_usage": true}})), "stream_options.include_usage"),
        (json!({"model": "m", "input": [{"role": "robot", "content": "x"}]}), "input[0].role"),
        (json!({"model": "m", "input": [{"role": "user"}]}), "input[0].content"),
        (json!({"model": "m", "input": [{"type": "web_search_call", "id": "ws"}]}), "input[0].type"),
        (json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}), "input[0].type"),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_video"}]}]}),
            "input[0].content[0].type",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]}),
            "input[0].content[0].text",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "a\u{0}"}]}]}),
            "input[0].content[0].text",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "a"},
            {"type": "input_image", "image_url": "ftp://x/y.png"}]}]}),
            "input[0].content[1].image_url",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "a"},
            {"type": "input_image", "image_url": "https://x/y.png", "detail": "max"}]}]}),
            "input[0].content[1].detail",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}),
            "input[0].content[0].file_id",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_url": "https://x/a.pdf"}]}]}),
            "input[0].content[0].file_url",
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file"}]}]}),
            "input[0].content[0]",
        ),
        (
            json!({"model": "m", "input": [{"role": "system", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}),
            "input[0].content[0].type",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]}),
            "input[0].arguments",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"}]}),
            "input[0].call_id",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "d", "name": "", "arguments": "{}"}]}),
            "input[1].name",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}),
            "input[0].call_id",
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": "x\u{0}"}]}),
            "input[0].output",
        ),
        (json!({"model": "m", "instructions": "a\u{0}", "input": "x"}), "instructions"),
        (json!({"model": "m", "input": "x\u{0}"}), "input"),
        (json!({"model": "m", "input": [], "instructions": "x"}), "input"),
        (json!({"model": "m", "input": "x", "metadata": {"k": 1}}), "metadata.k"),
    ];
    for (body, field) in cases {
        let err = parse(&body).unwrap_err();
        assert_eq!(err.field(), Some(field), "{body}: {err}");
    }
}

fn answer_of(chunks: &[CompleteChunk]) -> Answer {
    chunks.iter().cloned().collect()
}

fn tool_answer() -> Vec<CompleteChunk> {
    vec![
        CompleteChunk {
            reasoning_delta: "Need the weather.".into(),
            model: "gpt-4.1-2025".into(),
            ..Default::default()
        },
        CompleteChunk { delta: "Checking.".into(), ..Default::default() },
        CompleteChunk {
            tool_call_deltas: vec![pb::ToolCallDelta {
                index: 0,
                id: "call_9".into(),
                function_name: "weather".into(),
                arguments_delta: "{\"city\":".into(),
            }],
            ..Default::default()
        },
        CompleteChunk {
            tool_call_deltas: vec![pb::ToolCallDelta {
                index: 0,
                arguments_delta: "\"Nice\"}".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
        CompleteChunk {
            finish_reason: "tool_calls".into(),
            usage: Some(pb::Usage {
                prompt_tokens: 50,
                completion_tokens: 20,
                total_tokens: 70,
                cached_prompt_tokens: 32,
                reasoning_tokens: 8,
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}

#[test]
fn stored_responses_read_back_and_continue() {
    let request = parse(&json!({"model": "gpt-4.1", "instructions": "Be brief.", "input": "Weather in Nice?",
        "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]}))
    .unwrap();
    let meta = ResponseMeta::new(&request, "resp_abc", 1_700_000_000);
    let chunks = tool_answer();
    let answer = answer_of(&chunks);
    let record = ResponseRecord::new(&request, meta.clone(), &answer);
    assert_eq!(record.status, "completed");
    assert_eq!(record.conversation.len(), 1, "instructions are not carried over");

    // Through JSON, as the gateway's store keeps it.
    let stored = serde_json::to_value(&record).unwrap();
    let read: ResponseRecord = serde_json::from_value(stored).unwrap();
    assert_eq!(read, record);
    let original: Value = serde_json::from_slice(&response_json(&meta, &answer)).unwrap();
    let again: Value = serde_json::from_slice(&read.response_json()).unwrap();
    assert_eq!(again, original);
    assert_eq!(original["output"][2]["call_id"], "call_9");
    assert_eq!(original["output"][2]["id"], "fc_abc_2");
    assert_eq!(original["usage"]["input_tokens_details"]["cached_tokens"], 32);
    assert_eq!(original["usage"]["output_tokens_details"]["reasoning_tokens"], 8);
    assert_eq!(original["model"], "gpt-4.1-2025");

    // The next turn answers the call of the stored response.
    let next_body = json!({"model": "gpt-4.1", "instructions": "Be brief again.", "previous_response_id": "resp_abc",
        "input": [{"type": "function_call_output", "call_id": "call_9", "output": "25C"}]});
    let mut next = parse(&next_body).unwrap();
    next.continue_from(&read).unwrap();
    let roles: Vec<&str> = next.chat.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool"]);
    assert_eq!(next.chat.messages[0].content, "Be brief again.");
    assert_eq!(next.chat.messages[2].tool_calls[0].id, "call_9");
    assert_eq!(next.chat.messages[2].reasoning_content, "Need the weather.");

    // A call the stored conversation does not have is still refused, naming the item.
    let wrong = json!({"model": "gpt-4.1", "previous_response_id": "resp_abc",
        "input": [{"type": "function_call_output", "call_id": "call_x", "output": "25C"}]});
    let mut wrong = parse(&wrong).unwrap();
    assert_eq!(wrong.continue_from(&read).unwrap_err().field(), Some("input[0].call_id"));

    // A failed response keeps its error and adds no answer to the conversation.
    let failed = ResponseRecord::failed(
        &request,
        meta.clone(),
        &Answer::default(),
        ResponseError { code: "upstream_error".into(), message: "boom".into() },
    );
    let json: Value = serde_json::from_slice(&failed.response_json()).unwrap();
    assert_eq!((json["status"].as_str(), json["error"]["code"].as_str()), (Some("failed"), Some("upstream_error")));
    assert_eq!(json["output"], json!([]));
    assert_eq!(failed.continued_conversation().len(), 1);
    assert_eq!(serde_json::from_slice::<Value>(&deleted_json("resp_abc")).unwrap()["object"], "response.deleted");
}

/// Events as `(type, data)`, checking the framing: an `event:` line naming the data's type and a
/// `sequence_number` counting from 0.
fn events_of(wire: &[u8]) -> Vec<(String, Value)> {
    let mut decoder = SseDecoder::new(1 << 20);
    decoder.push(wire).unwrap();
    let mut out = Vec::new();
    while let Some(event) = decoder.next_event().unwrap() {
        let data: Value = serde_json::from_str(&event.data).unwrap();
        let kind = event.event.expect("an event line");
        assert_eq!(data["type"], kind.as_str());
        assert_eq!(data["sequence_number"], out.len() as u64, "{kind}");
        out.push((kind, data));
    }
    out
}

#[test]
fn the_event_stream_ends_as_the_response_object() {
    let request = parse(&json!({"model": "gpt-4.1", "input": "Weather in Nice?", "stream": true})).unwrap();
    let meta = ResponseMeta::new(&request, "resp_s", 1_700_000_000);
    let chunks = tool_answer();
    let mut encoder = ResponsesEncoder::new(meta.clone());
    let mut wire = Vec::new();
    for chunk in &chunks {
        wire.extend_from_slice(&encoder.encode(chunk));
    }
    wire.extend_from_slice(&encoder.finish());
    assert!(encoder.finish().is_empty() && encoder.is_finished());
    let events = events_of(&wire);
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.reasoning_summary_part.added",
            "response.reasoning_summary_text.delta",
            "response.reasoning_summary_text.done",
            "response.reasoning_summary_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(events[0].1["response"]["model"], "gpt-4.1-2025", "created names the serving model");
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    assert_eq!(events[17].1["arguments"], "{\"city\":\"Nice\"}");
    assert_eq!(events[17].1["name"], "weather");
    let completed = &events[19].1["response"];
    let whole: Value = serde_json::from_slice(&response_json(&meta, &answer_of(&chunks))).unwrap();
    assert_eq!(completed, &whole, "the stream ends with the response object itself");
    assert_eq!(encoder.answer(), &answer_of(&chunks));
}

#[test]
fn truncated_refused_and_failed_streams() {
    let request = parse(&json!({"model": "m", "input": "x"})).unwrap();
    let meta = ResponseMeta::new(&request, "resp_t", 1);
    let mut encoder = ResponsesEncoder::new(meta.clone());
    let mut wire = Vec::new();
    wire.extend_from_slice(&encoder.encode(&CompleteChunk { delta: "Once upon".into(), ..Default::default() }));
    wire.extend_from_slice(&encoder.encode(&CompleteChunk { refusal_delta: "I can't".into(), ..Default::default() }));
    wire.extend_from_slice(&encoder.encode(&CompleteChunk { finish_reason: "length".into(), ..Default::default() }));
    wire.extend_from_slice(&encoder.finish());
    let events = events_of(&wire);
    let last = &events.last().unwrap().1;
    assert_eq!(last["type"], "response.incomplete");
    assert_eq!(last["response"]["incomplete_details"]["reason"], "max_output_tokens");
    let content = &last["response"]["output"][0]["content"];
    assert_eq!(
        content,
        &json!([{"type": "output_text", "text": "Once upon", "annotations": [], "logprobs": []}, {"type": "refusal", "refusal": "I can't"}])
    );
    assert_eq!(last["response"]["output"][0]["status"], "incomplete");
    assert!(events.iter().any(|(k, e)| k == "response.refusal.done" && e["refusal"] == "I can't"));

    let mut failing = ResponsesEncoder::new(meta.clone());
    let mut wire = failing.encode(&CompleteChunk { delta: "Hi".into(), ..Default::default() }).to_vec();
    wire.extend_from_slice(&failing.fail("upstream_error", "the provider went away"));
    assert!(failing.finish().is_empty(), "nothing after a failure");
    let events = events_of(&wire);
    let last = &events.last().unwrap().1;
    assert_eq!((last["type"].as_str(), last["response"]["status"].as_str()), (Some("response.failed"), Some("failed")));
    assert_eq!(last["response"]["error"], json!({"code": "upstream_error", "message": "the provider went away"}));

    let mut early = ResponsesEncoder::new(meta);
    let events = events_of(&early.fail("rate_limited", "slow down"));
    assert_eq!(
        events,
        [(
            "error".to_owned(),
            json!({"type": "error", "sequence_number": 0, "code": "rate_limited", "message": "slow down", "param": null})
        )]
    );
}

#[test]
fn an_empty_answer_is_an_empty_message() {
    let request = parse(&json!({"model": "m", "input": "x"})).unwrap();
    let meta = ResponseMeta::new(&request, "resp_e", 1);
    let mut encoder = ResponsesEncoder::new(meta.clone());
    let mut wire = encoder.encode(&CompleteChunk { finish_reason: "stop".into(), ..Default::default() }).to_vec();
    wire.extend_from_slice(&encoder.finish());
    let events = events_of(&wire);
    let completed = &events.last().unwrap().1["response"];
    let whole: Value = serde_json::from_slice(&response_json(&meta, &Answer::default())).unwrap();
    assert_eq!(completed, &whole);
    assert_eq!(whole["output"][0]["content"][0]["text"], "");
}

fn provider_request(body: &Value) -> CompleteRequest {
    let chat = parse(body).unwrap().chat;
    CompleteRequest {
        model: chat.model,
        messages: chat.messages,
        sampling: Some(chat.sampling),
        options: Some(chat.options),
        ..Default::default()
    }
}

#[test]
fn provider_bodies_leave_out_what_the_api_lacks() {
    let mut request = provider_request(&agent_turn());
    let sampling = request.sampling.as_mut().unwrap();
    sampling.stop = vec!["END".into()];
    sampling.seed = Some(3);
    let body = provider::provider_body(&request, &ProviderModel::default()).unwrap();
    let sent: Value = serde_json::from_slice(&body.body).unwrap();
    assert_eq!(sent["store"], false);
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["text"]["verbosity"], "low");
    assert_eq!(sent["prompt_cache_key"], "k1");
    assert_eq!(sent["include"], json!(["message.output_text.logprobs"]));
    assert_eq!(sent["input"][0], json!({"type": "message", "role": "system", "content": "You are terse."}));
    assert_eq!(sent["input"][4]["type"], "function_call");
    assert_eq!(body.dropped, ["messages[].reasoning_content", "stop", "seed"]);
    let refuse = ProviderModel { unknown_params: UnknownParams::Refuse, ..ProviderModel::default() };
    assert_eq!(provider::provider_body(&request, &refuse).unwrap_err().field(), Some("messages[].reasoning_content"));
    request.options.as_mut().unwrap().n = Some(2);
    assert_eq!(provider::provider_body(&request, &ProviderModel::default()).unwrap_err().field(), Some("n"));
    request.options.as_mut().unwrap().n = None;
    // OpenAI's smallest completion limit: anything under it is refused, not silently raised.
    request.sampling.as_mut().unwrap().max_tokens = Some(provider::MIN_OUTPUT_TOKENS - 1);
    assert_eq!(provider::provider_body(&request, &ProviderModel::default()).unwrap_err().field(), Some("max_tokens"));
    request.sampling.as_mut().unwrap().max_tokens = Some(provider::MIN_OUTPUT_TOKENS);
    assert!(provider::provider_body(&request, &ProviderModel::default()).is_ok());
}

#[test]
fn provider_failures_are_classified() {
    let request = provider_request(&json!({"model": "m", "input": "x"}));
    let mut decoder = provider::StreamDecoder::new(&request);
    let event = |data: Value| crate::sse::SseEvent {
        event: Some(data["type"].as_str().unwrap().to_owned()),
        data: data.to_string(),
    };
    let failed = json!({"type": "response.failed", "sequence_number": 3, "response": {"id": "r", "status": "failed",
        "error": {"code": "context_length_exceeded", "message": "Your input exceeds the context window of this model."}}});
    let err = decoder.on_event(&event(failed)).unwrap_err();
    let WireError::Provider(error) = err else { panic!("{err:?}") };
    assert_eq!(error.kind, crate::ProviderErrorKind::ContextLengthExceeded);
    assert_eq!((error.code.as_str(), error.param.as_str()), ("context_length_exceeded", "messages"));
    let error_event =
        json!({"type": "error", "sequence_number": 1, "code": "rate_limit_exceeded", "message": "slow", "param": null});
    let WireError::Provider(error) = decoder.on_event(&event(error_event)).unwrap_err() else { panic!() };
    assert_eq!(error.kind, crate::ProviderErrorKind::RateLimited);
    assert!(decoder.on_event(&crate::sse::SseEvent { event: None, data: "{".into() }).is_err());
}

#[test]
fn whole_provider_responses_decode_like_streams() {
    let request = provider_request(&json!({"model": "gpt-4.1", "input": "x"}));
    let body = json!({"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4.1-2025-04-14",
        "output": [
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking"}]},
            {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "Calling.", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{\"a\":1}", "status": "completed"}
        ],
        "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 6,
                  "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 16}});
    let chunks = provider::decode_response(&request, body.to_string().as_bytes()).unwrap();
    let answer = answer_of(&chunks);
    assert_eq!(
        (answer.model.as_str(), answer.content.as_str(), answer.reasoning.as_str()),
        ("gpt-4.1-2025-04-14", "Calling.", "thinking")
    );
    assert_eq!(answer.tool_calls[0].arguments_json, "{\"a\":1}");
    assert_eq!(answer.finish_reason, "tool_calls");
    let usage = answer.usage.unwrap();
    assert_eq!(
        (usage.prompt_tokens, usage.cached_prompt_tokens, usage.reasoning_tokens, usage.total_tokens),
        (10, 4, 2, 16)
    );
    let failed = json!({"status": "failed", "error": {"code": "server_error", "message": "oops"}});
    assert!(matches!(provider::decode_response(&request, failed.to_string().as_bytes()), Err(WireError::Provider(_))));
}
