use serde_json::{Value, json};

use super::*;
use crate::sse::SseDecoder;

fn parse(body: &Value) -> Result<MessagesRequest, WireError> {
    parse_messages(body.to_string().as_bytes())
}

/// A turn as Claude Code sends it: cached system blocks and tools, thinking replayed, two tool
/// uses answered (one failed, one with a screenshot), and the user's next words.
fn claude_code_turn() -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 32000,
        "system": [
            {"type": "text", "text": "You are Claude Code."},
            {"type": "text", "text": "Project notes.", "cache_control": {"type": "ephemeral"}}
        ],
        "messages": [
            {"role": "user", "content": "List the files and show me the page."},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I will list and screenshot.", "signature": "EqQBCkYI"},
                {"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}},
                {"type": "tool_use", "id": "toolu_2", "name": "Screenshot", "input": {}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ls: permission denied", "is_error": true},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [
                    {"type": "text", "text": "the page"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
                ]},
                {"type": "text", "text": "Try sudo.", "cache_control": {"type": "ephemeral"}}
            ]}
        ],
        "tools": [
            {"name": "Bash", "description": "Run a command", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}},
            {"name": "Screenshot", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}
        ],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": true},
        "thinking": {"type": "enabled", "budget_tokens": 10000},
        "metadata": {"user_id": "user_abc"},
        "stop_sequences": ["</done>"],
        "top_k": 40,
        "stream": true,
        "context_management": {"edits": []}
    })
}

#[test]
fn a_claude_code_turn_is_carried() {
    let request = parse(&claude_code_turn()).unwrap();
    let chat = &request.chat;
    let roles: Vec<&str> = chat.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "system", "user", "assistant", "tool", "tool", "user"]);
    let assistant = &chat.messages[3];
    assert_eq!(assistant.reasoning_content, "I will list and screenshot.");
    assert_eq!(assistant.content, "Looking.");
    let calls: Vec<(&str, &str, &str)> = assistant
        .tool_calls
        .iter()
        .map(|c| (c.id.as_str(), c.function_name.as_str(), c.arguments_json.as_str()))
        .collect();
    assert_eq!(calls, [("toolu_1", "Bash", r#"{"command":"ls"}"#), ("toolu_2", "Screenshot", "{}")]);
    assert_eq!(
        (chat.messages[4].tool_call_id.as_str(), chat.messages[4].content.as_str()),
        ("toolu_1", "ls: permission denied")
    );
    assert!(chat.messages[4].is_error && !chat.messages[5].is_error, "a failed tool run says so");
    let screenshot = &chat.messages[5];
    assert_eq!(screenshot.parts.len(), 2);
    assert_eq!(
        screenshot.parts[1].part,
        Some(Part::ImageUrl(pb::ImageUrl { url: "data:image/png;base64,iVBORw0KGgo=".into(), detail: String::new() }))
    );
    assert_eq!(chat.messages[6].content, "Try sudo.");
    let options = &chat.options;
    assert_eq!(options.tools.len(), 2);
    assert_eq!(options.tools[0].parameters_json, claude_code_turn()["tools"][0]["input_schema"].to_string());
    assert_eq!(options.tool_choice.as_ref().unwrap().mode, pb::tool_choice::Mode::Auto as i32);
    assert_eq!(options.parallel_tool_calls, Some(false));
    assert_eq!(options.reasoning_effort, "high", "a 10000-token budget is high effort");
    assert_eq!(options.user, "user_abc");
    assert_eq!(options.extra_json, r#"{"context_management":{"edits":[]}}"#);
    assert_eq!(chat.sampling.max_tokens, Some(32000));
    assert_eq!((chat.sampling.top_k, chat.sampling.stop.as_slice()), (Some(40), &["</done>".to_owned()][..]));
    assert!(chat.stream);
    assert_eq!(
        request.unforwarded,
        [
            "system[].cache_control",
            "messages[].content[].signature",
            "messages[].content[].cache_control",
            "tools[].cache_control"
        ]
    );
    assert_eq!(chat.capabilities(), ["reasoning", "tools", "vision"]);
}

#[test]
fn thinking_maps_to_effort() {
    let with = |thinking: Value, extra: Value| {
        let mut body = json!({"model": "m", "max_tokens": 64000, "messages": [{"role": "user", "content": "x"}], "thinking": thinking});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        parse(&body).map(|r| r.chat.options.reasoning_effort)
    };
    assert_eq!(with(json!({"type": "enabled", "budget_tokens": 1024}), json!({})).unwrap(), "minimal");
    assert_eq!(with(json!({"type": "enabled", "budget_tokens": 2048}), json!({})).unwrap(), "low");
    assert_eq!(with(json!({"type": "enabled", "budget_tokens": 8000}), json!({})).unwrap(), "medium");
    assert_eq!(with(json!({"type": "enabled", "budget_tokens": 40000}), json!({})).unwrap(), "xhigh");
    assert_eq!(with(json!({"type": "adaptive"}), json!({})).unwrap(), "high");
    assert_eq!(with(json!({"type": "adaptive"}), json!({"output_config": {"effort": "max"}})).unwrap(), "xhigh");
    assert_eq!(with(json!({"type": "adaptive"}), json!({"output_config": {"effort": "low"}})).unwrap(), "low");
    assert_eq!(with(json!({"type": "disabled"}), json!({})).unwrap(), "");
    for effort in crate::canonical::REASONING_EFFORTS.iter().filter(|e| !matches!(**e, "none")) {
        let budget = super::super::provider::thinking_budget(effort).unwrap();
        assert_eq!(effort_of_budget(budget), *effort, "the budgets meshgate sends map back to their effort");
    }
}

#[test]
fn structured_output_and_count_tokens() {
    let body = json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "x"}],
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}});
    let request = parse(&body).unwrap();
    let format = request.chat.options.response_format.unwrap();
    assert_eq!(format.kind, pb::response_format::Kind::JsonSchema as i32);
    assert_eq!(format.schema_json, body["output_config"]["format"]["schema"].to_string());
    let count = json!({"model": "m", "messages": [{"role": "user", "content": "how many tokens?"}], "system": "s"});
    let request = parse_count_tokens(count.to_string().as_bytes()).unwrap();
    assert_eq!(request.chat.messages.len(), 2);
    assert_eq!(parse(&count).unwrap_err().field(), Some("max_tokens"));
    assert_eq!(count_tokens_json(42), br#"{"input_tokens":42}"#);
}

#[test]
fn bad_input_names_the_clients_field() {
    let with = |extra: Value| {
        let mut body = json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let messages = |messages: Value| with(json!({"messages": messages}));
    let cases = [
        (json!({"max_tokens": 1, "messages": []}), "model"),
        (json!({"model": "m", "max_tokens": 1}), "messages"),
        (json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}), "max_tokens"),
        (with(json!({"max_tokens": 0})), "max_tokens"),
        (with(json!({"temperature": 1.5})), "temperature"),
        (with(json!({"top_k": -1})), "top_k"),
        (with(json!({"top_p": 0})), "top_p"),
        (with(json!({"stop_sequences": ["a", "b", "c", "d", "e"]})), "stop_sequences"),
        (with(json!({"stop_sequences": ["a", ""]})), "stop_sequences[1]"),
        (with(json!({"metadata": {"user_id": "a\u{1}"}})), "metadata.user_id"),
        (with(json!({"system": [{"type": "image"}]})), "system[0].type"),
        (with(json!({"system": "a\u{0}"})), "system"),
        (with(json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]})), "tools[0].type"),
        (with(json!({"tools": [{"type": "bash_20250124", "name": "bash"}]})), "tools[0].type"),
        (with(json!({"tools": [{"name": "f"}]})), "tools[0].input_schema"),
        (with(json!({"tools": [{"name": "f", "input_schema": "s"}]})), "tools[0].input_schema"),
        (with(json!({"tools": [{"name": "", "input_schema": {}}]})), "tools[0].name"),
        (with(json!({"tool_choice": {"type": "tool"}})), "tool_choice.name"),
        (
            with(json!({"tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "tool", "name": "g"}})),
            "tool_choice.name",
        ),
        (with(json!({"tool_choice": {"type": "maybe"}})), "tool_choice.type"),
        (with(json!({"tool_choice": {"type": "any"}})), "tool_choice"),
        (with(json!({"thinking": {"type": "enabled"}})), "thinking.budget_tokens"),
        (with(json!({"thinking": {"type": "enabled", "budget_tokens": 500}})), "thinking.budget_tokens"),
        (with(json!({"thinking": {"type": "enabled", "budget_tokens": 2000}})), "thinking.budget_tokens"),
        (with(json!({"thinking": {"type": "sometimes"}})), "thinking.type"),
        (with(json!({"thinking": {"type": "adaptive"}, "output_config": {"effort": "huge"}})), "output_config.effort"),
        (with(json!({"output_config": {"verbosity": "low"}})), "output_config.verbosity"),
        (with(json!({"output_config": {"format": {"type": "xml"}}})), "output_config.format.type"),
        (with(json!({"output_config": {"format": {"type": "json_schema"}}})), "output_config.format.schema"),
        (with(json!({"output_config": {"format": {"type": "json_schema", "schema": [1]}}})), "output_config.format"),
        (messages(json!([{"role": "system", "content": "x"}])), "messages[0].role"),
        (messages(json!([{"role": "user"}])), "messages[0].content"),
        (messages(json!([{"role": "user", "content": [{"type": "text"}]}])), "messages[0].content[0].text"),
        (
            messages(json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video"}]}])),
            "messages[0].content[1].type",
        ),
        (
            messages(json!([{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}])),
            "messages[0].content[0].type",
        ),
        (
            messages(
                json!([{"role": "assistant", "content": [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]),
            ),
            "messages[0].content[0].type",
        ),
        (
            messages(
                json!([{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]),
            ),
            "messages[0].content[0].source.type",
        ),
        (messages(json!([{"role": "user", "content": [{"type": "image"}]}])), "messages[0].content[0].source"),
        (
            messages(
                json!([{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "AA=="}}]}]),
            ),
            "messages[0].content[0].source.media_type",
        ),
        (
            messages(
                json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image", "source": {"type": "url", "url": "ftp://x"}}]}]),
            ),
            "messages[0].content[1].source",
        ),
        (
            messages(
                json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}]),
            ),
            "messages[0].content[0].tool_use_id",
        ),
        (
            messages(json!([{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}])),
            "messages[0].content[0].tool_use_id",
        ),
        (
            messages(
                json!([{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "search_result"}]}]}]),
            ),
            "messages[1].content[0].content[0].type",
        ),
        (
            messages(
                json!([{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}]}]),
            ),
            "messages[1].content[0].content[0].type",
        ),
        (
            messages(json!([{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f"}]}])),
            "messages[0].content[0].input",
        ),
        (
            messages(
                json!([{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "", "input": {}}]}]),
            ),
            "messages[0].content[0].name",
        ),
        (
            messages(
                json!([{"role": "assistant", "content": [{"type": "tool_use", "id": "", "name": "f", "input": {}}]}]),
            ),
            "messages[0].content[0].id",
        ),
        (
            messages(
                json!([{"role": "assistant", "content": [{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}]}]),
            ),
            "messages[0].content[0].type",
        ),
        (messages(json!([{"role": "user", "content": "x"}, {"role": "user", "content": 5}])), "messages[1].content"),
    ];
    for (body, field) in cases {
        let err = parse(&body).unwrap_err();
        assert_eq!(err.field(), Some(field), "{body}: {err}");
    }
}

fn tool_answer() -> Vec<CompleteChunk> {
    vec![
        CompleteChunk { reasoning_delta: "Plan.".into(), model: "gpt-4.1-2025".into(), ..Default::default() },
        CompleteChunk { delta: "Running ls.".into(), ..Default::default() },
        CompleteChunk {
            tool_call_deltas: vec![pb::ToolCallDelta {
                index: 0,
                id: "call_1".into(),
                function_name: "Bash".into(),
                arguments_delta: "{\"command\"".into(),
            }],
            ..Default::default()
        },
        CompleteChunk {
            tool_call_deltas: vec![pb::ToolCallDelta {
                index: 0,
                arguments_delta: ":\"ls\"}".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
        CompleteChunk {
            finish_reason: "tool_calls".into(),
            usage: Some(pb::Usage {
                prompt_tokens: 100,
                completion_tokens: 12,
                total_tokens: 112,
                cached_prompt_tokens: 60,
                cache_write_tokens: 30,
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}

#[test]
fn whole_answers_are_messages() {
    let answer: Answer = tool_answer().into_iter().collect();
    let meta = MessageMeta { id: "msg_1".into(), model: "claude-sonnet-4-5".into(), estimated_input_tokens: 0 };
    let message: Value = serde_json::from_slice(&message_json(&meta, &answer)).unwrap();
    assert_eq!(
        message,
        json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "gpt-4.1-2025",
            "content": [
                {"type": "thinking", "thinking": "Plan.", "signature": ""},
                {"type": "text", "text": "Running ls."},
                {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}}
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 12, "cache_creation_input_tokens": 30, "cache_read_input_tokens": 60}})
    );
    let mut broken = Answer::default();
    broken.tool_calls.push(pb::ToolCall {
        id: "c".into(),
        function_name: "f".into(),
        arguments_json: "{\"a\":".into(),
        ..Default::default()
    });
    broken.tool_calls.push(pb::ToolCall {
        id: "d".into(),
        function_name: "g".into(),
        arguments_json: String::new(),
        ..Default::default()
    });
    let message: Value = serde_json::from_slice(&message_json(&meta, &broken)).unwrap();
    assert_eq!(
        message["content"][0]["input"],
        json!({"arguments": "{\"a\":"}),
        "malformed arguments are shown, not lost"
    );
    assert_eq!(message["content"][1]["input"], json!({}));
    assert_eq!(message["stop_reason"], "tool_use");
}

fn events_of(wire: &[u8]) -> Vec<(String, Value)> {
    let mut decoder = SseDecoder::new(1 << 20);
    decoder.push(wire).unwrap();
    let mut out = Vec::new();
    while let Some(event) = decoder.next_event().unwrap() {
        let data: Value = serde_json::from_str(&event.data).unwrap();
        let kind = event.event.expect("an event line");
        assert_eq!(data["type"], kind.as_str());
        out.push((kind, data));
    }
    out
}

#[test]
fn streamed_answers_are_message_events() {
    let mut encoder =
        MessagesEncoder::new(MessageMeta { id: "msg_2".into(), model: "claude".into(), estimated_input_tokens: 95 });
    let mut wire = Vec::new();
    for chunk in tool_answer() {
        wire.extend_from_slice(&encoder.encode(&chunk));
    }
    wire.extend_from_slice(&encoder.finish());
    assert!(encoder.finish().is_empty());
    let events = events_of(&wire);
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(events[0].1["message"]["model"], "gpt-4.1-2025");
    assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 95, "the estimate, until the provider's count");
    assert_eq!(events[2].1["content_block"], json!({"type": "thinking", "thinking": "", "signature": ""}));
    assert_eq!(
        events[8].1,
        json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "call_1", "name": "Bash", "input": {}}})
    );
    assert_eq!(events[10].1["delta"], json!({"type": "input_json_delta", "partial_json": ":\"ls\"}"}));
    assert_eq!(events[12].1["delta"], json!({"stop_reason": "tool_use", "stop_sequence": null}));
    assert_eq!(events[12].1["usage"]["cache_read_input_tokens"], 60);

    let mut failing =
        MessagesEncoder::new(MessageMeta { id: "msg_3".into(), model: "claude".into(), estimated_input_tokens: 0 });
    let wire = failing.fail(529, "Overloaded");
    assert_eq!(
        events_of(&wire),
        [(
            "error".to_owned(),
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        )]
    );
    assert!(failing.finish().is_empty());
}

#[test]
fn errors_in_anthropics_shape() {
    let body: Value = serde_json::from_slice(&error_json(400, "`messages` is required")).unwrap();
    assert_eq!(
        body,
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "`messages` is required"}})
    );
    let types: Vec<&str> = [401, 403, 404, 413, 429, 500, 504, 529].into_iter().map(error_type).collect();
    assert_eq!(
        types,
        [
            "authentication_error",
            "permission_error",
            "not_found_error",
            "request_too_large",
            "rate_limit_error",
            "api_error",
            "timeout_error",
            "overloaded_error"
        ]
    );
}
