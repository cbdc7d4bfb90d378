use meshgate_proto::common::v1::content_part::Part;
use serde_json::{Value, json};

use super::*;
use crate::UnknownParams;

fn text(role: &str, content: &str) -> pb::ChatMessage {
    pb::ChatMessage { role: role.into(), content: content.into(), ..Default::default() }
}

fn part(part: Part) -> pb::ContentPart {
    pb::ContentPart { part: Some(part) }
}

fn image(url: &str) -> pb::ContentPart {
    part(Part::ImageUrl(pb::ImageUrl { url: url.into(), detail: "high".into() }))
}

fn call(id: &str, name: &str, arguments: &str) -> pb::ToolCall {
    pb::ToolCall {
        id: id.into(),
        r#type: "function".into(),
        function_name: name.into(),
        arguments_json: arguments.into(),
    }
}

fn tool(name: &str) -> pb::ToolDefinition {
    pb::ToolDefinition {
        name: name.into(),
        description: format!("{name} things"),
        parameters_json: r#"{"type":"object","properties":{"city":{"type":"string"}}}"#.into(),
        strict: None,
    }
}

fn body_of(request: &CompleteRequest, model: &ProviderModel) -> (Value, Vec<String>) {
    let out = request_body(request, model).unwrap();
    (serde_json::from_slice(&out.body).unwrap(), out.dropped)
}

fn request(messages: Vec<pb::ChatMessage>, options: pb::ChatOptions) -> CompleteRequest {
    CompleteRequest { model: "claude-test".into(), messages, options: Some(options), ..Default::default() }
}

#[test]
fn conversations_map_to_messages_api_bodies() {
    let mut request = request(
        vec![
            text("system", "be terse"),
            pb::ChatMessage {
                role: "user".into(),
                parts: vec![
                    part(Part::Text("what is in these?".into())),
                    image("https://example.com/a.png"),
                    image("data:image/png;base64,iVBORw0KGgo="),
                    part(Part::File(pb::FileInput {
                        filename: "a.pdf".into(),
                        file_data: "data:application/pdf;base64,JVBERi0=".into(),
                        ..Default::default()
                    })),
                ],
                ..Default::default()
            },
            text("user", "and the weather?"),
            pb::ChatMessage {
                role: "assistant".into(),
                content: "checking".into(),
                reasoning_content: "the user wants weather".into(),
                tool_calls: vec![call("toolu_1", "weather", r#"{"city":"Paris"}"#), call("toolu_2", "weather", "")],
                ..Default::default()
            },
            pb::ChatMessage {
                role: "tool".into(),
                content: "21C".into(),
                tool_call_id: "toolu_1".into(),
                ..Default::default()
            },
            pb::ChatMessage {
                role: "tool".into(),
                tool_call_id: "toolu_2".into(),
                parts: vec![part(Part::Text("a map".into())), image("https://example.com/map.png")],
                ..Default::default()
            },
            text("developer", "use celsius"),
            text("user", ""),
        ],
        pb::ChatOptions {
            tools: vec![tool("weather")],
            tool_choice: Some(pb::ToolChoice {
                mode: pb::tool_choice::Mode::Function as i32,
                function_name: "weather".into(),
            }),
            parallel_tool_calls: Some(false),
            user: "u-1".into(),
            frequency_penalty: Some(0.5),
            ..Default::default()
        },
    );
    request.sampling = Some(pb::SamplingParams {
        temperature: Some(1.5),
        top_k: Some(5),
        seed: Some(7),
        stop: vec!["END".into()],
        ..Default::default()
    });
    let model = ProviderModel { max_output_tokens: 64_000, ..ProviderModel::default() };
    let (body, dropped) = body_of(&request, &model);
    assert_eq!(
        body,
        json!({
            "model": "claude-test",
            "max_tokens": 64_000,
            "stream": true,
            "system": "be terse\n\nuse celsius",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "what is in these?"},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
                    {"type": "text", "text": "and the weather?"}
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "checking"},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21C"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": [
                        {"type": "text", "text": "a map"},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/map.png"}}
                    ]}
                ]}
            ],
            "temperature": 1.0,
            "top_k": 5,
            "stop_sequences": ["END"],
            "tools": [{"name": "weather", "description": "weather things",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "tool", "name": "weather", "disable_parallel_tool_use": true},
            "metadata": {"user_id": "u-1"}
        })
    );
    assert_eq!(dropped, ["messages[].reasoning_content", "seed", "frequency_penalty"]);
}

#[test]
fn tool_results_lead_their_user_turn() {
    let request = request(
        vec![
            text("user", "go"),
            pb::ChatMessage { role: "assistant".into(), tool_calls: vec![call("t1", "f", "{}")], ..Default::default() },
            text("user", "also this"),
            pb::ChatMessage {
                role: "tool".into(),
                content: "done".into(),
                tool_call_id: "t1".into(),
                ..Default::default()
            },
        ],
        pb::ChatOptions::default(),
    );
    let (body, _) = body_of(&request, &ProviderModel::default());
    assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
    assert_eq!(
        body["messages"][2]["content"],
        json!([{"type": "tool_result", "tool_use_id": "t1", "content": "done"}, {"type": "text", "text": "also this"}])
    );
}

#[test]
fn a_failed_tool_result_says_so() {
    let failed = pb::ChatMessage {
        role: "tool".into(),
        content: "permission denied".into(),
        tool_call_id: "t1".into(),
        is_error: true,
        ..Default::default()
    };
    let request = request(
        vec![
            text("user", "go"),
            pb::ChatMessage { role: "assistant".into(), tool_calls: vec![call("t1", "f", "{}")], ..Default::default() },
            failed,
        ],
        pb::ChatOptions::default(),
    );
    let (body, dropped) = body_of(&request, &ProviderModel::default());
    assert_eq!(
        body["messages"][2]["content"],
        json!([{"type": "tool_result", "tool_use_id": "t1", "content": "permission denied", "is_error": true}])
    );
    assert!(dropped.is_empty(), "{dropped:?}");
    let openai = crate::openai::provider::request_body(&request, &ProviderModel::default()).unwrap();
    assert_eq!(openai.dropped, ["messages[].is_error"], "Chat Completions has no place for it");
}

#[test]
fn tool_choice_modes_map() {
    use pb::tool_choice::Mode;
    let with_choice = |mode: Mode, parallel: Option<bool>| {
        let options = pb::ChatOptions {
            tools: vec![tool("f")],
            tool_choice: (mode != Mode::Unspecified)
                .then_some(pb::ToolChoice { mode: mode as i32, function_name: String::new() }),
            parallel_tool_calls: parallel,
            ..Default::default()
        };
        body_of(&request(vec![text("user", "x")], options), &ProviderModel::default()).0
    };
    assert_eq!(with_choice(Mode::Auto, None)["tool_choice"], json!({"type": "auto"}));
    assert_eq!(with_choice(Mode::None, Some(false))["tool_choice"], json!({"type": "none"}));
    assert_eq!(with_choice(Mode::Required, None)["tool_choice"], json!({"type": "any"}));
    assert!(with_choice(Mode::Unspecified, None).get("tool_choice").is_none());
    assert_eq!(
        with_choice(Mode::Unspecified, Some(false))["tool_choice"],
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    let no_tools = pb::ChatOptions {
        tool_choice: Some(pb::ToolChoice { mode: Mode::Auto as i32, function_name: String::new() }),
        ..Default::default()
    };
    let (body, _) = body_of(&request(vec![text("user", "x")], no_tools), &ProviderModel::default());
    assert!(body.get("tool_choice").is_none() && body.get("tools").is_none(), "no choice without tools");
}

fn schema_format() -> pb::ResponseFormat {
    pb::ResponseFormat {
        kind: pb::response_format::Kind::JsonSchema as i32,
        name: "answer".into(),
        description: String::new(),
        schema_json: r#"{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}"#.into(),
        strict: Some(true),
    }
}

#[test]
fn structured_output_is_a_forced_tool_or_native() {
    let options = pb::ChatOptions { response_format: Some(schema_format()), ..Default::default() };
    let (body, _) = body_of(&request(vec![text("user", "x")], options.clone()), &ProviderModel::default());
    assert_eq!(body["tools"][0]["name"], JSON_TOOL);
    assert_eq!(
        body["tools"][0]["input_schema"],
        json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    );
    assert_eq!(body["tool_choice"], json!({"type": "tool", "name": JSON_TOOL}));

    let agent = pb::ChatOptions { tools: vec![tool("f")], ..options.clone() };
    let (body, _) = body_of(&request(vec![text("user", "x")], agent), &ProviderModel::default());
    let names: Vec<&str> = body["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["f", JSON_TOOL]);
    assert_eq!(body["tool_choice"], json!({"type": "any"}), "a real tool or the answer");

    let native = ProviderModel { native_structured_output: true, ..ProviderModel::default() };
    let (body, _) = body_of(&request(vec![text("user", "x")], options), &native);
    assert!(body.get("tools").is_none());
    assert_eq!(body["output_config"]["format"]["type"], "json_schema");
    assert_eq!(body["output_config"]["format"]["schema"]["required"], json!(["a"]));

    let object = pb::ChatOptions {
        response_format: Some(pb::ResponseFormat {
            kind: pb::response_format::Kind::JsonObject as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (body, _) = body_of(&request(vec![text("user", "x")], object), &native);
    assert_eq!(body["tools"][0]["input_schema"], json!({"type": "object"}));

    let clash =
        pb::ChatOptions { tools: vec![tool(JSON_TOOL)], response_format: Some(schema_format()), ..Default::default() };
    let err = request_body(&request(vec![text("user", "x")], clash), &ProviderModel::default()).unwrap_err();
    assert_eq!(err.field(), Some("tools[0].function.name"));
}

#[test]
fn reasoning_effort_becomes_thinking_within_anthropics_rules() {
    let options = pb::ChatOptions { reasoning_effort: "medium".into(), ..Default::default() };
    let mut thinking = request(vec![text("user", "x")], options.clone());
    thinking.sampling = Some(pb::SamplingParams {
        max_tokens: Some(20_000),
        temperature: Some(0.3),
        top_k: Some(3),
        top_p: Some(0.5),
        ..Default::default()
    });
    let (body, dropped) = body_of(&thinking, &ProviderModel::default());
    assert_eq!(body["thinking"], json!({"type": "enabled", "budget_tokens": 8192}));
    assert!(body.get("temperature").is_none() && body.get("top_k").is_none() && body.get("top_p").is_none());
    assert_eq!(dropped, ["temperature", "top_k", "top_p"]);

    let mut small = thinking.clone();
    small.sampling = Some(pb::SamplingParams { max_tokens: Some(1500), ..Default::default() });
    let (body, _) = body_of(&small, &ProviderModel::default());
    assert_eq!(body["thinking"]["budget_tokens"], 1499, "the budget stays below max_tokens");
    small.sampling = Some(pb::SamplingParams { max_tokens: Some(500), ..Default::default() });
    let (body, dropped) = body_of(&small, &ProviderModel::default());
    assert!(body.get("thinking").is_none());
    assert_eq!(dropped, ["reasoning_effort"]);

    let forced = pb::ChatOptions { response_format: Some(schema_format()), ..options.clone() };
    let (body, dropped) = body_of(&request(vec![text("user", "x")], forced.clone()), &ProviderModel::default());
    assert!(body.get("thinking").is_none(), "thinking is refused beside a forced tool");
    assert_eq!(dropped, ["response_format.json_schema.strict", "reasoning_effort"]);
    // Mid tool-use loop the turn's signed thinking cannot be replayed: no thinking.
    let mut asked = text("assistant", "");
    asked.tool_calls.push(call("toolu_1", "f", "{}"));
    asked.reasoning_content = "I should call f.".into();
    let mut answered = text("tool", "42");
    answered.tool_call_id = "toolu_1".into();
    let options_with_tool = pb::ChatOptions { tools: vec![tool("f")], ..options.clone() };
    let looped = request(vec![text("user", "x"), asked.clone(), answered.clone()], options_with_tool.clone());
    let (body, dropped) = body_of(&looped, &ProviderModel::default());
    assert!(body.get("thinking").is_none());
    assert_eq!(dropped, ["messages[].reasoning_content", "reasoning_effort"]);
    let next_turn = request(
        vec![text("user", "x"), asked, answered, text("assistant", "42."), text("user", "Thanks")],
        options_with_tool,
    );
    let (body, _) = body_of(&next_turn, &ProviderModel::default());
    assert_eq!(body["thinking"]["budget_tokens"], 8192, "a finished loop does not hold thinking back");

    let native = ProviderModel { native_structured_output: true, ..ProviderModel::default() };
    let (body, _) = body_of(&request(vec![text("user", "x")], forced), &native);
    assert_eq!(body["thinking"]["budget_tokens"], 8192);
    assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS + 8192, "the default leaves room for the answer");
}

#[test]
fn what_anthropic_cannot_take_is_refused_naming_the_field() {
    let user_parts = |parts: Vec<pb::ContentPart>| {
        request(vec![pb::ChatMessage { role: "user".into(), parts, ..Default::default() }], pb::ChatOptions::default())
    };
    let model = ProviderModel::default();
    let cases = [
        (
            user_parts(vec![part(Part::InputAudio(pb::InputAudio { data: "AA==".into(), format: "wav".into() }))]),
            "messages[0].content[0].input_audio",
        ),
        (
            user_parts(vec![part(Part::File(pb::FileInput { file_id: "file-1".into(), ..Default::default() }))]),
            "messages[0].content[0].file",
        ),
        (user_parts(vec![image("data:image/tiff;base64,AAAA")]), "messages[0].content[0].image_url.url"),
        (
            request(
                vec![
                    text("user", "x"),
                    pb::ChatMessage {
                        role: "assistant".into(),
                        tool_calls: vec![call("t", "f", "[1]")],
                        ..Default::default()
                    },
                ],
                pb::ChatOptions::default(),
            ),
            "messages[1].tool_calls[0].function.arguments",
        ),
        (request(vec![text("user", "x")], pb::ChatOptions { n: Some(2), ..Default::default() }), "n"),
    ];
    for (request, field) in cases {
        let err = request_body(&request, &model).unwrap_err();
        assert!(matches!(err, WireError::Unsupported { .. }), "{field}: {err:?}");
        assert_eq!(err.field(), Some(field));
    }
    let only_system = request(vec![text("system", "x")], pb::ChatOptions::default());
    assert_eq!(request_body(&only_system, &model).unwrap_err().field(), Some("messages"));

    let refuse = ProviderModel { unknown_params: UnknownParams::Refuse, ..ProviderModel::default() };
    let mut seeded = request(vec![text("user", "x")], pb::ChatOptions::default());
    seeded.sampling = Some(pb::SamplingParams { seed: Some(1), ..Default::default() });
    assert_eq!(request_body(&seeded, &refuse).unwrap_err().field(), Some("seed"));
    let extra = request(
        vec![text("user", "x")],
        pb::ChatOptions { extra_json: r#"{"context_management":{}}"#.into(), ..Default::default() },
    );
    let (body, _) = body_of(&extra, &ProviderModel::default());
    assert_eq!(body["context_management"], json!({}), "forwarded as the provider's own parameter");
    let drop = ProviderModel { unknown_params: UnknownParams::Drop, ..ProviderModel::default() };
    assert_eq!(body_of(&extra, &drop).1, ["context_management"]);
}

fn ev(name: &str, data: Value) -> SseEvent {
    SseEvent { event: Some(name.into()), data: data.to_string() }
}

#[test]
fn events_stream_text_thinking_tools_and_usage() {
    let mut decoder = StreamDecoder::new(
        &CompleteRequest { model: "requested".into(), ..Default::default() },
        &ProviderModel::default(),
    );
    let start = json!({"type": "message_start", "message": {"model": "claude-served", "usage":
        {"input_tokens": 10, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200, "output_tokens": 1}}});
    assert_eq!(decoder.on_event(&ev("message_start", start)).unwrap(), None);
    let thinking =
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}});
    assert_eq!(decoder.on_event(&ev("content_block_start", thinking)).unwrap(), None);
    let think =
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}});
    let chunk = decoder.on_event(&ev("content_block_delta", think)).unwrap().unwrap();
    assert_eq!((chunk.reasoning_delta.as_str(), chunk.model.as_str()), ("hmm", "claude-served"));
    let signature =
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "abc"}});
    assert_eq!(decoder.on_event(&ev("content_block_delta", signature)).unwrap(), None);
    assert_eq!(decoder.on_event(&ev("ping", json!({"type": "ping"}))).unwrap(), None);
    let text_start = json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}});
    decoder.on_event(&ev("content_block_start", text_start)).unwrap();
    let hi = json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hi"}});
    assert_eq!(decoder.on_event(&ev("content_block_delta", hi)).unwrap().unwrap().delta, "Hi");
    let tool_start = json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}});
    let chunk = decoder.on_event(&ev("content_block_start", tool_start)).unwrap().unwrap();
    assert_eq!(
        chunk.tool_call_deltas,
        [pb::ToolCallDelta {
            index: 0,
            id: "toolu_1".into(),
            function_name: "f".into(),
            arguments_delta: String::new()
        }]
    );
    for piece in [r#"{"a""#, ":1}"] {
        let delta = json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": piece}});
        let chunk = decoder.on_event(&ev("content_block_delta", delta)).unwrap().unwrap();
        assert_eq!(chunk.tool_call_deltas[0].index, 0, "tool index counts calls, not blocks");
    }
    assert_eq!(
        decoder.on_event(&ev("content_block_stop", json!({"type": "content_block_stop", "index": 2}))).unwrap(),
        None
    );
    let whole = json!({"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use", "id": "toolu_2", "name": "g", "input": {"x": true}}});
    decoder.on_event(&ev("content_block_start", whole)).unwrap();
    let stop = decoder
        .on_event(&ev("content_block_stop", json!({"type": "content_block_stop", "index": 3})))
        .unwrap()
        .unwrap();
    assert_eq!(
        (stop.tool_call_deltas[0].index, stop.tool_call_deltas[0].arguments_delta.as_str()),
        (1, r#"{"x":true}"#)
    );
    let delta = json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 70}});
    decoder.on_event(&ev("message_delta", delta)).unwrap();
    assert!(!decoder.is_done());
    let last = decoder.on_event(&ev("message_stop", json!({"type": "message_stop"}))).unwrap().unwrap();
    assert!(decoder.is_done());
    assert_eq!((last.finish_reason.as_str(), last.model.as_str()), ("tool_calls", ""));
    assert_eq!(
        last.usage,
        Some(pb::Usage {
            prompt_tokens: 1210,
            completion_tokens: 70,
            total_tokens: 1280,
            cost_micros: 0,
            cached_prompt_tokens: 1000,
            cache_write_tokens: 200,
            reasoning_tokens: 0,
        })
    );
    assert_eq!(last.tool_calls, [call("toolu_1", "f", r#"{"a":1}"#), call("toolu_2", "g", r#"{"x":true}"#)]);
}

#[test]
fn the_forced_answer_tool_comes_back_as_content() {
    let request = request(
        vec![text("user", "x")],
        pb::ChatOptions { response_format: Some(schema_format()), ..Default::default() },
    );
    let mut decoder = StreamDecoder::new(&request, &ProviderModel::default());
    let start = json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_9", "name": JSON_TOOL, "input": {}}});
    assert_eq!(decoder.on_event(&ev("content_block_start", start)).unwrap(), None);
    let mut content = String::new();
    for piece in [r#"{"a""#, ": 4}"] {
        let delta = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}});
        let chunk = decoder.on_event(&ev("content_block_delta", delta)).unwrap().unwrap();
        assert!(chunk.tool_call_deltas.is_empty());
        content.push_str(&chunk.delta);
    }
    assert_eq!(content, r#"{"a": 4}"#);
    decoder
        .on_event(&ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}})))
        .unwrap();
    let last = decoder.on_event(&ev("message_stop", json!({"type": "message_stop"}))).unwrap().unwrap();
    assert_eq!(last.finish_reason, "stop");
    assert!(last.tool_calls.is_empty());
}

#[test]
fn garbage_errors_and_stop_reasons() {
    let mut decoder = StreamDecoder::new(&CompleteRequest::default(), &ProviderModel::default());
    let err = decoder.on_event(&SseEvent { event: Some("message_start".into()), data: "{nope".into() }).unwrap_err();
    assert!(matches!(err, WireError::Protocol(_)), "{err:?}");
    let overloaded = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
    let WireError::Provider(error) = decoder.on_event(&ev("error", overloaded)).unwrap_err() else { panic!() };
    assert_eq!((error.kind, error.message.as_str()), (ProviderErrorKind::Overloaded, "Overloaded"));
    let orphan =
        json!({"type": "content_block_delta", "index": 4, "delta": {"type": "input_json_delta", "partial_json": "{"}});
    assert!(matches!(decoder.on_event(&ev("content_block_delta", orphan)), Err(WireError::Protocol(_))));
    for (stop, finish) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ] {
        assert_eq!(finish_reason(stop), finish);
    }
}

#[test]
fn whole_messages_decode_to_the_same_chunks() {
    let body = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-served",
        "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "Hi"},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 6}});
    let chunks =
        decode_message(&CompleteRequest::default(), &ProviderModel::default(), body.to_string().as_bytes()).unwrap();
    let answer: crate::Answer = chunks.into_iter().collect();
    assert_eq!(
        (answer.model.as_str(), answer.reasoning.as_str(), answer.content.as_str()),
        ("claude-served", "hmm", "Hi")
    );
    assert_eq!(answer.tool_calls, [call("toolu_1", "f", r#"{"a":1}"#)]);
    assert_eq!(answer.finish_reason, "tool_calls");
    assert_eq!(answer.usage.unwrap().total_tokens, 11);
    let error = br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 208656 tokens > 200000 maximum"}}"#;
    let Err(WireError::Provider(error)) = decode_message(&CompleteRequest::default(), &ProviderModel::default(), error)
    else {
        panic!()
    };
    assert_eq!(error.kind, ProviderErrorKind::ContextLengthExceeded);
}

#[test]
fn error_answers_are_classified() {
    let cases = [
        (
            400,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 208656 tokens > 200000 maximum"},"request_id":"req_1"}"#,
            ProviderErrorKind::ContextLengthExceeded,
            "context_length_exceeded",
        ),
        (
            400,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"input length and `max_tokens` exceed context limit: 188240 + 21333 > 200000"}}"#,
            ProviderErrorKind::ContextLengthExceeded,
            "context_length_exceeded",
        ),
        (
            400,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#,
            ProviderErrorKind::InvalidRequest,
            "invalid_request_error",
        ),
        (
            401,
            r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
            ProviderErrorKind::Auth,
            "authentication_error",
        ),
        (
            404,
            r#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-x"}}"#,
            ProviderErrorKind::ModelNotFound,
            "not_found_error",
        ),
        (
            413,
            r#"{"type":"error","error":{"type":"request_too_large","message":"Request exceeds the maximum size"}}"#,
            ProviderErrorKind::PayloadTooLarge,
            "request_too_large",
        ),
        (
            429,
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#,
            ProviderErrorKind::RateLimited,
            "rate_limit_error",
        ),
        (
            529,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ProviderErrorKind::Overloaded,
            "overloaded_error",
        ),
        (502, "<html>bad gateway</html>", ProviderErrorKind::Server, ""),
    ];
    for (status, body, kind, code) in cases {
        let error = provider_error(status, body.as_bytes());
        assert_eq!((error.kind, error.code.as_str()), (kind, code), "{body}");
        if kind == ProviderErrorKind::ContextLengthExceeded {
            assert_eq!(error.param, "messages");
        }
    }
}
