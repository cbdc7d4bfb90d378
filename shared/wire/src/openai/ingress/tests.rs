use serde_json::{Value, json};

use super::*;

fn parse(body: &Value) -> Result<ChatRequest, WireError> {
    parse_chat(body.to_string().as_bytes())
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

#[test]
fn the_whole_request_is_carried() {
    let body = json!({
        "model": " gpt-4o ",
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
            {"role": "user", "name": "ana", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"cat\"}"}}
            ], "reasoning_content": "let me look"},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "a cat"}]},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}
        ],
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "find", "strict": true,
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}],
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        "parallel_tool_calls": false,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "description": "d", "strict": true,
            "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
        "max_tokens": 50, "max_completion_tokens": 100, "reasoning_effort": "low", "n": 1,
        "logprobs": true, "top_logprobs": 3, "frequency_penalty": 0.5, "presence_penalty": -0.5,
        "logit_bias": {"50256": -100}, "user": "u-1", "metadata": {"team": "a"}, "seed": 7,
        "stop": "END", "service_tier": "flex", "temperature": 0.2, "top_p": 0.9,
        "stream": true, "stream_options": {"include_usage": true},
        "modalities": ["text"], "prediction": null, "store": false
    });
    let chat = parse(&body).unwrap();
    assert_eq!(chat.model, "gpt-4o");
    assert!(chat.stream && chat.include_usage);
    let m = &chat.messages;
    assert_eq!((m[0].role.as_str(), m[0].content.as_str()), ("system", "be brief"));
    assert_eq!(m[1].name, "ana");
    assert!(m[1].content.is_empty());
    assert_eq!(m[1].parts.len(), 4);
    assert_eq!(
        m[1].parts[1].part,
        Some(Part::ImageUrl(pb::ImageUrl { url: "https://example.com/cat.png".into(), detail: "low".into() }))
    );
    assert_eq!(m[2].tool_calls[0].arguments_json, "{\"q\":\"cat\"}");
    assert_eq!(m[2].reasoning_content, "let me look");
    assert_eq!((m[3].tool_call_id.as_str(), m[3].content.as_str()), ("call_1", "a cat"));
    assert_eq!((m[4].content.as_str(), m[4].refusal.as_str()), ("", "no"));
    assert_eq!(chat.sampling.max_tokens, Some(100), "max_completion_tokens wins");
    assert_eq!(chat.sampling.stop, ["END"]);
    assert_eq!(chat.sampling.seed, Some(7));
    let o = &chat.options;
    // Kept byte for byte (json! sorts keys, so the text is the body's own).
    assert_eq!(o.tools[0].parameters_json, body["tools"][0]["function"]["parameters"].to_string());
    assert_eq!(o.tools[0].strict, Some(true));
    assert_eq!(o.tool_choice.as_ref().unwrap().function_name, "lookup");
    assert_eq!(o.parallel_tool_calls, Some(false));
    let format = o.response_format.as_ref().unwrap();
    assert_eq!((format.name.as_str(), format.strict), ("answer", Some(true)));
    assert_eq!(format.schema_json, body["response_format"]["json_schema"]["schema"].to_string());
    assert_eq!((o.reasoning_effort.as_str(), o.n, o.logprobs, o.top_logprobs), ("low", Some(1), Some(true), Some(3)));
    assert_eq!(o.logit_bias["50256"], -100.0);
    assert_eq!(o.metadata["team"], "a");
    assert_eq!((o.user.as_str(), o.service_tier.as_str()), ("u-1", "flex"));
    assert_eq!(o.extra_json, r#"{"modalities":["text"],"store":false}"#, "unknown parameters in order, nulls left out");
    assert_eq!(chat.capabilities(), ["audio", "json_schema", "reasoning", "tools", "vision"]);
}

#[test]
fn tool_choice_and_response_format_spellings() {
    for (choice, mode) in [("none", 2), ("auto", 1), ("required", 3)] {
        let body = json!({"model": "m", "messages": [user("x")], "tool_choice": choice,
            "tools": [{"type": "function", "function": {"name": "f"}}]});
        assert_eq!(parse(&body).unwrap().options.tool_choice.unwrap().mode, mode, "{choice}");
    }
    for (format, kind) in [("text", 1), ("json_object", 2)] {
        let body = json!({"model": "m", "messages": [user("x")], "response_format": {"type": format}});
        assert_eq!(parse(&body).unwrap().options.response_format.unwrap().kind, kind);
    }
    let body = json!({"model": "m", "messages": [user("x")], "stop": ["a", "b"], "max_tokens": 9});
    let chat = parse(&body).unwrap();
    assert_eq!((chat.sampling.stop.len(), chat.sampling.max_tokens), (2, Some(9)));
}

/// Each check, with the field its error must name.
#[test]
fn bad_input_names_the_field() {
    let base = || json!({"model": "m", "messages": [user("x")]});
    let with = |key: &str, value: Value| {
        let mut body = base();
        body[key] = value;
        body
    };
    let messages = |list: Value| with("messages", list);
    let call = json!({"role": "assistant", "content": null,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]});
    let image = |url: &str| {
        messages(json!([{"role": "user", "content": [{"type": "text", "text": "x"},
        {"type": "image_url", "image_url": {"url": url}}]}]))
    };
    let tools = |function: Value| with("tools", json!([{"type": "function", "function": function}]));
    let cases: Vec<(Value, &str)> = vec![
        (json!({"messages": [user("x")]}), "model"),
        (with("model", json!("")), "model"),
        (with("model", json!("m\u{7}")), "model"),
        (json!({"model": "m"}), "messages"),
        (messages(json!([])), "messages"),
        (messages(json!("hi")), "messages"),
        (messages(json!([{"role": "robot", "content": "x"}])), "messages[0].role"),
        (messages(json!([{"content": "x"}])), "messages[0].role"),
        (messages(json!([{"role": "user"}])), "messages[0].content"),
        (messages(json!([{"role": "user", "content": 5}])), "messages[0].content"),
        (messages(json!([{"role": "user", "content": "a\u{0}b"}])), "messages[0].content"),
        (messages(json!([{"role": "user", "name": "a\u{1b}b", "content": "x"}])), "messages[0].name"),
        (messages(json!([{"role": "user", "content": [{"type": "video"}]}])), "messages[0].content[0].type"),
        (messages(json!([{"role": "user", "content": [{"type": "text"}]}])), "messages[0].content[0].text"),
        (messages(json!([{"role": "user", "content": [{"type": "text", "text": 3}]}])), "messages[0].content[0].text"),
        (
            messages(json!([{"role": "user", "content": [{"type": "text", "text": "\u{0}"}]}])),
            "messages[0].content[0].text",
        ),
        (
            messages(
                json!([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x/y"}}]}]),
            ),
            "messages[0].content[0].type",
        ),
        (image("ftp://example.com/a.png"), "messages[0].content[1].image_url.url"),
        (image("file:///etc/passwd"), "messages[0].content[1].image_url.url"),
        (image("data:image/png"), "messages[0].content[1].image_url.url"),
        (
            messages(
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y", "detail": "max"}}]}]),
            ),
            "messages[0].content[0].image_url.detail",
        ),
        (
            messages(
                json!([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]),
            ),
            "messages[0].content[0].input_audio.data",
        ),
        (messages(json!([{"role": "user", "content": [{"type": "file", "file": {}}]}])), "messages[0].content[0].file"),
        (
            messages(json!([user("x"), {"role": "tool", "tool_call_id": "call_9", "content": "r"}])),
            "messages[1].tool_call_id",
        ),
        (messages(json!([user("x"), call.clone(), {"role": "tool", "content": "r"}])), "messages[2].tool_call_id"),
        (
            messages(json!([user("x"), {"role": "tool", "tool_call_id": "call_1", "content": "r"}, call.clone()])),
            "messages[1].tool_call_id",
        ),
        (
            messages(
                json!([{"role": "user", "content": "x", "tool_calls": []}, {"role": "user", "content": "x", "refusal": "no"}]),
            ),
            "messages[1].refusal",
        ),
        (
            messages(
                json!([{"role": "assistant", "tool_calls": [{"id": "c\u{0}", "function": {"name": "f", "arguments": "{}"}}]}]),
            ),
            "messages[0].tool_calls[0].id",
        ),
        (
            messages(
                json!([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "", "arguments": "{}"}}]}]),
            ),
            "messages[0].tool_calls[0].function.name",
        ),
        (
            messages(
                json!([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "\u{0}"}}]}]),
            ),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            messages(
                json!([{"role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "function": {"name": "f", "arguments": "{}"}}]}]),
            ),
            "messages[0].tool_calls[0].type",
        ),
        (tools(json!({"name": "f", "parameters": [1]})), "tools[0].function.parameters"),
        (tools(json!({"name": "f", "parameters": "{}"})), "tools[0].function.parameters"),
        (tools(json!({"name": "get\u{0}weather"})), "tools[0].function.name"),
        (tools(json!({"name": ""})), "tools[0].function.name"),
        (tools(json!({"description": "no name"})), "tools[0].function.name"),
        (
            with(
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
            ),
            "tools[1].function.name",
        ),
        (with("tools", json!([{"type": "custom", "custom": {"name": "f"}}])), "tools[0].type"),
        (with("tool_choice", json!("sometimes")), "tool_choice"),
        (with("tool_choice", json!("required")), "tool_choice"),
        (with("tool_choice", json!({"type": "function", "function": {"name": "nope"}})), "tool_choice.function.name"),
        (with("response_format", json!({"type": "yaml"})), "response_format.type"),
        (with("response_format", json!({"type": "json_schema"})), "response_format.json_schema"),
        (
            with("response_format", json!({"type": "json_schema", "json_schema": {"name": "a", "schema": true}})),
            "response_format.json_schema.schema",
        ),
        (
            with("response_format", json!({"type": "json_schema", "json_schema": {"name": "", "schema": {}}})),
            "response_format.json_schema.name",
        ),
        (with("max_tokens", json!(0)), "max_tokens"),
        (with("max_tokens", json!("many")), "max_tokens"),
        (with("max_completion_tokens", json!(-1)), "max_completion_tokens"),
        (with("temperature", json!(2.5)), "temperature"),
        (with("temperature", json!(-0.1)), "temperature"),
        (with("top_p", json!(0)), "top_p"),
        (with("top_p", json!(1.5)), "top_p"),
        (with("frequency_penalty", json!(2.1)), "frequency_penalty"),
        (with("presence_penalty", json!(-3)), "presence_penalty"),
        (with("logit_bias", json!({"50256": 101})), "logit_bias.50256"),
        (with("logit_bias", json!({"word": 1})), "logit_bias.word"),
        (with("top_logprobs", json!(21)), "top_logprobs"),
        (with("top_logprobs", json!(2)), "top_logprobs"),
        (with("n", json!(0)), "n"),
        (with("n", json!(1_000_000_000_000i64)), "n"),
        (with("seed", json!(-1)), "seed"),
        (with("stop", json!(["a", "b", "c", "d", "e"])), "stop"),
        (with("stop", json!(["a", ""])), "stop[1]"),
        (with("stop", json!(7)), "stop"),
        (with("reasoning_effort", json!("extreme")), "reasoning_effort"),
        (with("metadata", json!({"k": 1})), "metadata.k"),
        (with("metadata", json!({"k": "v".repeat(513)})), "metadata.k"),
        (with("user", json!("u\u{0}")), "user"),
        (with("stream", json!("yes")), "stream"),
    ];
    for (body, field) in cases {
        let err = parse(&body).unwrap_err();
        assert!(matches!(err, WireError::Invalid { .. }), "{body}: {err:?}");
        assert_eq!(err.field(), Some(field), "{body}: {err}");
        assert!(err.to_string().starts_with(&format!("`{field}`")), "{body}: {err}");
    }
}

#[test]
fn malformed_and_repeated_bodies_are_refused() {
    for (body, needle) in [
        ("{", "malformed JSON body"),
        ("", "malformed JSON body"),
        ("[1, 2]", "invalid request body"),
        (r#"{"model":"m","model":"n","messages":[]}"#, "duplicate field `model`"),
        (r#"{"model":"m","x":1,"x":2,"messages":[{"role":"user","content":"x"}]}"#, "duplicate field `x`"),
    ] {
        let err = parse_chat(body.as_bytes()).unwrap_err();
        assert!(err.to_string().contains(needle), "{body}: {err}");
    }
}

#[test]
fn grpc_requests_get_the_same_checks() {
    let mut chat = parse(&json!({"model": "m", "messages": [user("x")]})).unwrap();
    chat.messages[0].role = "developer".into();
    chat.check().unwrap();
    assert_eq!(chat.messages[0].role, "system");
    chat.options.tools.push(pb::ToolDefinition {
        name: "f".into(),
        parameters_json: "{not json".into(),
        ..Default::default()
    });
    assert_eq!(chat.check().unwrap_err().field(), Some("tools[0].function.parameters"));
    chat.options.tools[0].parameters_json = "{}".into();
    chat.options.extra_json = "[]".into();
    assert_eq!(chat.check().unwrap_err().field(), Some("extra_json"));
    chat.options.extra_json.clear();
    chat.messages[0].role = "user".into();
    chat.messages[0].parts.push(pb::ContentPart {
        part: Some(Part::ImageUrl(pb::ImageUrl { url: "https://x/y.png".into(), detail: String::new() })),
    });
    chat.check().unwrap();
    assert_eq!(chat.messages[0].content, "", "text beside parts leads them");
    assert_eq!(chat.messages[0].parts[0].part, Some(Part::Text("x".into())));
    chat.messages[0].parts.push(pb::ContentPart { part: None });
    assert_eq!(chat.check().unwrap_err().field(), Some("messages[0].content[2]"));
}

fn meta() -> ReplyMeta {
    ReplyMeta { id: "chatcmpl-1".into(), created: 1_700_000_000, model: "requested".into() }
}

#[test]
fn a_whole_answer_is_one_completion_object() {
    let mut answer = Answer::default();
    answer.push(&CompleteChunk { model: "served".into(), reasoning_delta: "hmm".into(), ..Default::default() });
    answer.push(&CompleteChunk {
        finish_reason: "tool_calls".into(),
        tool_calls: vec![pb::ToolCall {
            id: "call_1".into(),
            r#type: "function".into(),
            function_name: "f".into(),
            arguments_json: "{}".into(),
        }],
        usage: Some(pb::Usage {
            prompt_tokens: 10,
            completion_tokens: 5,
            cached_prompt_tokens: 4,
            reasoning_tokens: 2,
            ..Default::default()
        }),
        ..Default::default()
    });
    let json: Value = serde_json::from_slice(&completion_json(&meta(), &answer)).unwrap();
    assert_eq!(
        json,
        json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000, "model": "served",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": null,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                "reasoning_content": "hmm"}, "logprobs": null, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}}
        })
    );
    let plain =
        completion_json(&meta(), &[CompleteChunk { delta: "hi".into(), ..Default::default() }].into_iter().collect());
    let plain: Value = serde_json::from_slice(&plain).unwrap();
    assert_eq!(plain["model"], "requested");
    assert_eq!(plain["choices"][0]["message"]["content"], "hi");
    assert_eq!(plain["choices"][0]["finish_reason"], "stop");
}

#[test]
fn chunks_are_framed_as_the_sdks_read_them() {
    let mut encoder = ChunkEncoder::new(meta(), true);
    let mut wire = Vec::new();
    wire.extend_from_slice(&encoder.encode(&CompleteChunk {
        delta: "Hi".into(),
        model: "served".into(),
        ..Default::default()
    }));
    wire.extend_from_slice(&encoder.encode(&CompleteChunk {
        tool_call_deltas: vec![pb::ToolCallDelta {
            index: 0,
            id: "call_1".into(),
            function_name: "f".into(),
            arguments_delta: "{\"a\"".into(),
        }],
        ..Default::default()
    }));
    wire.extend_from_slice(&encoder.encode(&CompleteChunk {
        tool_call_deltas: vec![pb::ToolCallDelta { index: 0, arguments_delta: ":1}".into(), ..Default::default() }],
        ..Default::default()
    }));
    wire.extend_from_slice(&encoder.encode(&CompleteChunk {
        finish_reason: "tool_calls".into(),
        usage: Some(pb::Usage { prompt_tokens: 1, completion_tokens: 2, ..Default::default() }),
        ..Default::default()
    }));
    wire.extend_from_slice(&encoder.done());
    let head = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"served","#;
    let expected = [
        format!(
            r#"data: {head}"choices":[{{"index":0,"delta":{{"role":"assistant","content":"Hi"}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
        ),
        format!(
            r#"data: {head}"choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":0,"id":"call_1","type":"function","function":{{"name":"f","arguments":"{{\"a\""}}}}]}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
        ),
        format!(
            r#"data: {head}"choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":0,"function":{{"arguments":":1}}"}}}}]}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
        ),
        format!(
            r#"data: {head}"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"tool_calls"}}],"usage":null}}"#
        ),
        format!(
            r#"data: {head}"choices":[],"usage":{{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3,"prompt_tokens_details":{{"cached_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0}}}}}}"#
        ),
        "data: [DONE]".to_owned(),
    ];
    assert_eq!(String::from_utf8(wire).unwrap(), expected.map(|line| line + "\n\n").concat());
}

#[test]
fn calls_that_arrive_whole_are_streamed_whole() {
    let mut encoder = ChunkEncoder::new(meta(), false);
    let out = encoder.encode(&CompleteChunk {
        finish_reason: "tool_calls".into(),
        tool_calls: vec![pb::ToolCall {
            id: "c".into(),
            r#type: "function".into(),
            function_name: "f".into(),
            arguments_json: "{}".into(),
        }],
        ..Default::default()
    });
    let text = String::from_utf8(out.to_vec()).unwrap();
    let events: Vec<Value> =
        text.split("\n\n").filter(|e| !e.is_empty()).map(|e| serde_json::from_str(&e[6..]).unwrap()).collect();
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": "", "tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
    );
    assert!(events[0].get("usage").is_none(), "no usage field unless asked");
    assert_eq!(events[1]["choices"][0]["finish_reason"], "tool_calls");
}

#[test]
fn pieces_of_one_call_in_one_chunk_go_out_as_one_entry() {
    let mut encoder = ChunkEncoder::new(meta(), false);
    let piece = |id: &str, name: &str, arguments: &str| pb::ToolCallDelta {
        index: 0,
        id: id.into(),
        function_name: name.into(),
        arguments_delta: arguments.into(),
    };
    let out = encoder.encode(&CompleteChunk {
        tool_call_deltas: vec![piece("c", "f", ""), piece("", "", "{\"a\""), piece("", "", ":1}")],
        ..Default::default()
    });
    let event: Value = serde_json::from_slice(&out[6..out.len() - 2]).unwrap();
    assert_eq!(
        event["choices"][0]["delta"]["tool_calls"],
        json!([{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}])
    );
}
