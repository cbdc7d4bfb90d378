//! Properties over generated inputs: the edge's parsers (Chat Completions, Responses, Anthropic
//! Messages, legacy completions, embeddings) take any JSON without panicking (and what they accept
//! passes the canonical checks again); the event streams the encoders write, folded the way the
//! official SDKs fold them (`openai`'s chunk and Responses accumulators, Anthropic's message
//! stream), are the answer meshgate assembled itself.

use meshgate_proto::common::v1 as pb;
use meshgate_proto::sync::v1::CompleteChunk;
use meshgate_wire::Answer;
use meshgate_wire::anthropic::ingress::{
    MessageMeta, MessagesEncoder, parse_count_tokens, parse_messages, stop_reason,
};
use meshgate_wire::openai::completions::parse_completion;
use meshgate_wire::openai::embeddings::parse_embeddings;
use meshgate_wire::openai::ingress::{ChunkEncoder, ReplyMeta, parse_chat};
use meshgate_wire::openai::responses::{ResponseMeta, ResponsesEncoder, parse_responses, response_json};
use meshgate_wire::sse::SseDecoder;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e3f64..1e3).prop_map(Value::from),
        "[a-z_:/.\u{0}\u{1b}é\"\\\\ ]{0,12}".prop_map(Value::from),
        Just(json!("https://example.com/a.png")),
        Just(json!("data:image/png;base64,AAAA")),
        Just(json!("{\"type\":\"object\"}")),
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::vec(("[a-z_]{1,8}", inner), 0..5)
                .prop_map(|members| Value::Object(members.into_iter().collect())),
        ]
    })
}

/// An object with keys drawn from `keys` (and a stray one now and then) and arbitrary values.
fn object_of(keys: &'static [&'static str], value: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    proptest::collection::vec((proptest::sample::select(keys), value), 0..keys.len() + 1)
        .prop_map(|members| {
            let mut object = Map::new();
            for (key, value) in members {
                object.insert(key.to_owned(), value);
            }
            Value::Object(object)
        })
        .boxed()
}

/// Requests shaped like chat requests, with every value possibly of the wrong type.
fn request_like() -> impl Strategy<Value = Value> {
    let part = object_of(
        &["type", "text", "image_url", "input_audio", "file", "refusal"],
        prop_oneof![
            proptest::sample::select(vec!["text", "image_url", "input_audio", "file", "refusal", "video"])
                .prop_map(Value::from),
            object_of(&["url", "detail", "data", "format", "file_id", "file_data"], scalar().boxed()),
            any_json(),
        ]
        .boxed(),
    );
    let call = object_of(
        &["id", "type", "function"],
        prop_oneof![scalar(), object_of(&["name", "arguments"], scalar().boxed())].boxed(),
    );
    let message = object_of(
        &["role", "content", "name", "tool_calls", "tool_call_id", "refusal", "reasoning_content"],
        prop_oneof![
            proptest::sample::select(vec!["system", "developer", "user", "assistant", "tool", "robot"])
                .prop_map(Value::from),
            proptest::collection::vec(part, 0..4).prop_map(Value::Array),
            proptest::collection::vec(call, 0..3).prop_map(Value::Array),
            scalar(),
        ]
        .boxed(),
    );
    let tool = object_of(
        &["type", "function"],
        prop_oneof![
            Just(json!("function")),
            object_of(&["name", "description", "parameters", "strict"], any_json().boxed()),
        ]
        .boxed(),
    );
    let keys: &'static [&'static str] = &[
        "model",
        "messages",
        "tools",
        "tool_choice",
        "response_format",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "metadata",
        "user",
        "reasoning_effort",
        "parallel_tool_calls",
        "service_tier",
        "vendor_knob",
    ];
    let value = prop_oneof![
        proptest::collection::vec(message, 0..5).prop_map(Value::Array),
        proptest::collection::vec(tool, 0..3).prop_map(Value::Array),
        any_json(),
        Just(json!("m")),
    ]
    .boxed();
    object_of(keys, value)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Any JSON, and any bytes, are parsed or refused with a message: never a panic. What is
    /// accepted is a request the canonical checks accept again unchanged.
    #[test]
    fn parse_chat_takes_anything(body in prop_oneof![any_json(), request_like()], bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        for input in [body.to_string().into_bytes(), bytes] {
            match parse_chat(&input) {
                Ok(chat) => {
                    let mut again = chat.clone();
                    prop_assert!(again.check().is_ok());
                    prop_assert_eq!(again, chat);
                }
                Err(err) => prop_assert!(!err.to_string().is_empty()),
            }
        }
    }
}

/// One thing a provider's stream may say.
#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Refusal(String),
    Reasoning(String),
    /// The first piece of the next tool call.
    NewCall(String, String),
    /// More arguments for a call already started (chosen among them).
    Arguments(usize, String),
}

fn text() -> impl Strategy<Value = String> {
    "[a-z {}\":,\\\\\n\u{e9}\u{1F600}]{0,8}"
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        3 => text().prop_map(Piece::Text),
        1 => text().prop_map(Piece::Refusal),
        1 => text().prop_map(Piece::Reasoning),
        1 => ("call_[a-z0-9]{1,6}", "[a-z_]{1,10}").prop_map(|(id, name)| Piece::NewCall(id, name)),
        3 => (any::<usize>(), text()).prop_map(|(call, args)| Piece::Arguments(call, args)),
    ]
}

/// Chunks as the decoders produce them: pieces grouped arbitrarily, the model on the first, and a
/// last chunk with the finish reason, the usage, the assembled calls and perhaps calls that
/// arrived whole.
fn chunks() -> impl Strategy<Value = Vec<CompleteChunk>> {
    (
        proptest::collection::vec(proptest::collection::vec(piece(), 1..4), 0..12),
        proptest::sample::select(vec!["stop", "length", "tool_calls", "content_filter"]),
        (0i64..5000, 0i64..5000, 0i64..100, 0i64..100),
        proptest::collection::vec(("call_w[0-9]{1,3}", "[a-z]{1,6}", text()), 0..3),
    )
        .prop_map(|(groups, finish, (prompt, completion, cached, reasoning), whole)| {
            let mut calls: Vec<pb::ToolCall> = Vec::new();
            let mut chunks = Vec::new();
            for (i, group) in groups.into_iter().enumerate() {
                let mut chunk =
                    CompleteChunk { model: if i == 0 { "served".into() } else { String::new() }, ..Default::default() };
                for piece in group {
                    match piece {
                        Piece::Text(t) => chunk.delta.push_str(&t),
                        Piece::Refusal(t) => chunk.refusal_delta.push_str(&t),
                        Piece::Reasoning(t) => chunk.reasoning_delta.push_str(&t),
                        Piece::NewCall(id, name) => {
                            let index = calls.len() as i32;
                            calls.push(pb::ToolCall {
                                id: id.clone(),
                                r#type: "function".into(),
                                function_name: name.clone(),
                                arguments_json: String::new(),
                            });
                            chunk.tool_call_deltas.push(pb::ToolCallDelta {
                                index,
                                id,
                                function_name: name,
                                arguments_delta: String::new(),
                            });
                        }
                        Piece::Arguments(call, args) if !calls.is_empty() => {
                            let index = call % calls.len();
                            calls[index].arguments_json.push_str(&args);
                            chunk.tool_call_deltas.push(pb::ToolCallDelta {
                                index: index as i32,
                                arguments_delta: args,
                                ..Default::default()
                            });
                        }
                        Piece::Arguments(..) => {}
                    }
                }
                chunks.push(chunk);
            }
            for (id, name, args) in whole {
                calls.push(pb::ToolCall { id, r#type: "function".into(), function_name: name, arguments_json: args });
            }
            chunks.push(CompleteChunk {
                finish_reason: finish.into(),
                usage: Some(pb::Usage {
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    total_tokens: prompt + completion,
                    cached_prompt_tokens: cached,
                    reasoning_tokens: reasoning,
                    ..Default::default()
                }),
                tool_calls: calls,
                model: if chunks.is_empty() { "served".into() } else { String::new() },
                ..Default::default()
            });
            chunks
        })
}

/// `openai`'s `accumulate_delta` (openai/lib/streaming/chat/_completions.py): strings are
/// concatenated except `index` and `type`; lists of objects are merged by their `index`, a new
/// index inserted at that position.
fn accumulate(acc: &mut Map<String, Value>, delta: &Map<String, Value>) {
    for (key, value) in delta {
        let Some(existing) = acc.get_mut(key).filter(|v| !v.is_null()) else {
            acc.insert(key.clone(), value.clone());
            continue;
        };
        if key == "index" || key == "type" {
            *existing = value.clone();
            continue;
        }
        match (existing, value) {
            (Value::String(a), Value::String(b)) => a.push_str(b),
            (Value::Object(a), Value::Object(b)) => accumulate(a, b),
            (Value::Array(a), Value::Array(b)) => {
                for entry in b {
                    let index = entry["index"].as_u64().expect("list entries carry an index") as usize;
                    match a.get_mut(index) {
                        Some(Value::Object(existing)) => accumulate(existing, entry.as_object().unwrap()),
                        _ => a.insert(index.min(a.len()), entry.clone()),
                    }
                }
            }
            (existing, value) => *existing = value.clone(),
        }
    }
}

/// What an SDK client ends up with from the SSE bytes.
fn sdk_fold(wire: &[u8]) -> (Map<String, Value>, Option<String>, Option<Value>, String) {
    let text = std::str::from_utf8(wire).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let mut message = Map::new();
    let (mut finish, mut usage, mut model) = (None, None, String::new());
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").expect("one data line per event");
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        if model.is_empty() {
            model = chunk["model"].as_str().unwrap().to_owned();
        }
        if !chunk["usage"].is_null() {
            usage = Some(chunk["usage"].clone());
        }
        for choice in chunk["choices"].as_array().unwrap() {
            accumulate(&mut message, choice["delta"].as_object().unwrap());
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = Some(reason.to_owned());
            }
        }
    }
    (message, finish, usage, model)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The encoder's stream, folded as the SDKs fold it, is the answer meshgate assembled.
    #[test]
    fn encoded_streams_fold_into_the_answer(chunks in chunks()) {
        let answer: Answer = chunks.iter().cloned().collect();
        let mut encoder = ChunkEncoder::new(ReplyMeta { id: "chatcmpl-p".into(), created: 1, model: "requested".into() }, true);
        let mut wire = Vec::new();
        for chunk in &chunks {
            wire.extend_from_slice(&encoder.encode(chunk));
        }
        wire.extend_from_slice(&encoder.done());
        let (message, finish, usage, model) = sdk_fold(&wire);
        let text = |key: &str| message.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
        prop_assert_eq!(&model, &answer.model);
        prop_assert_eq!(text("role"), "assistant");
        prop_assert_eq!(text("content"), answer.content.clone());
        prop_assert_eq!(text("refusal"), answer.refusal.clone());
        prop_assert_eq!(text("reasoning_content"), answer.reasoning.clone());
        let sdk_calls: Vec<(String, String, String)> = message.get("tool_calls").and_then(Value::as_array).map(|calls| {
            calls.iter().map(|c| (
                c["id"].as_str().unwrap().to_owned(),
                c["function"]["name"].as_str().unwrap().to_owned(),
                c["function"]["arguments"].as_str().unwrap().to_owned(),
            )).collect()
        }).unwrap_or_default();
        let answer_calls: Vec<(String, String, String)> =
            answer.tool_calls.iter().map(|c| (c.id.clone(), c.function_name.clone(), c.arguments_json.clone())).collect();
        prop_assert_eq!(sdk_calls, answer_calls);
        prop_assert_eq!(finish.as_deref(), Some(answer.finish_reason_or_default()));
        let usage = usage.expect("the usage chunk");
        let expected = answer.usage.unwrap();
        prop_assert_eq!(usage["prompt_tokens"].as_i64(), Some(expected.prompt_tokens));
        prop_assert_eq!(usage["completion_tokens"].as_i64(), Some(expected.completion_tokens));
        prop_assert_eq!(usage["prompt_tokens_details"]["cached_tokens"].as_i64(), Some(expected.cached_prompt_tokens));
        prop_assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"].as_i64(), Some(expected.reasoning_tokens));
    }
}

/// Responses API requests, with every value possibly of the wrong type.
fn responses_like() -> impl Strategy<Value = Value> {
    let part = object_of(
        &["type", "text", "image_url", "file_id", "file_data", "detail", "refusal"],
        prop_oneof![
            proptest::sample::select(vec![
                "input_text",
                "input_image",
                "input_file",
                "output_text",
                "refusal",
                "input_video"
            ])
            .prop_map(Value::from),
            scalar(),
        ]
        .boxed(),
    );
    let item = object_of(
        &["type", "role", "content", "call_id", "name", "arguments", "output", "summary", "encrypted_content", "id"],
        prop_oneof![
            proptest::sample::select(vec![
                "message",
                "function_call",
                "function_call_output",
                "reasoning",
                "item_reference",
                "web_search_call",
                "user",
                "assistant",
                "system",
                "developer",
            ])
            .prop_map(Value::from),
            proptest::collection::vec(part, 0..3).prop_map(Value::Array),
            Just(json!([{"type": "summary_text", "text": "thought"}])),
            Just(json!("call_1")),
            scalar(),
        ]
        .boxed(),
    );
    let tool = object_of(
        &["type", "name", "parameters", "strict", "description"],
        prop_oneof![Just(json!("function")), Just(json!("web_search")), any_json()].boxed(),
    );
    let keys: &'static [&'static str] = &[
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "text",
        "reasoning",
        "max_output_tokens",
        "temperature",
        "top_p",
        "top_logprobs",
        "metadata",
        "user",
        "store",
        "previous_response_id",
        "stream",
        "include",
        "truncation",
        "parallel_tool_calls",
        "background",
        "vendor_knob",
    ];
    let value = prop_oneof![
        proptest::collection::vec(item, 0..5).prop_map(Value::Array),
        proptest::collection::vec(tool, 0..3).prop_map(Value::Array),
        Just(json!({"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}})),
        Just(json!({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "f"}]})),
        any_json(),
        Just(json!("m")),
    ]
    .boxed();
    object_of(keys, value)
}

/// Anthropic Messages requests, with every value possibly of the wrong type.
fn messages_like() -> impl Strategy<Value = Value> {
    let block = object_of(
        &[
            "type",
            "text",
            "source",
            "id",
            "name",
            "input",
            "tool_use_id",
            "content",
            "is_error",
            "thinking",
            "cache_control",
        ],
        prop_oneof![
            proptest::sample::select(vec![
                "text",
                "image",
                "document",
                "tool_use",
                "tool_result",
                "thinking",
                "redacted_thinking",
                "server_tool_use"
            ])
            .prop_map(Value::from),
            Just(json!({"type": "base64", "media_type": "image/png", "data": "AAAA"})),
            Just(json!({"type": "url", "url": "https://example.com/a.png"})),
            Just(json!({"a": 1})),
            scalar(),
        ]
        .boxed(),
    );
    let message = object_of(
        &["role", "content"],
        prop_oneof![
            proptest::sample::select(vec!["user", "assistant", "system"]).prop_map(Value::from),
            proptest::collection::vec(block, 0..4).prop_map(Value::Array),
            scalar(),
        ]
        .boxed(),
    );
    let keys: &'static [&'static str] = &[
        "model",
        "max_tokens",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "metadata",
        "stream",
        "output_config",
        "vendor_knob",
    ];
    let value = prop_oneof![
        proptest::collection::vec(message, 0..5).prop_map(Value::Array),
        Just(json!([{"name": "f", "input_schema": {"type": "object"}}])),
        Just(json!({"type": "enabled", "budget_tokens": 2048})),
        Just(json!({"type": "tool", "name": "f"})),
        Just(json!(4096)),
        any_json(),
        Just(json!("m")),
    ]
    .boxed();
    object_of(keys, value)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// The other formats' parsers take any JSON and any bytes without panicking; what they accept
    /// is a request the canonical checks accept again unchanged.
    #[test]
    fn every_parser_takes_anything(
        responses in prop_oneof![any_json(), responses_like()],
        messages in prop_oneof![any_json(), messages_like()],
        other in any_json(),
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        for input in [responses.to_string().into_bytes(), bytes.clone()] {
            match parse_responses(&input) {
                Ok(request) if request.previous_response_id.is_none() => {
                    let mut again = request.chat.clone();
                    prop_assert!(again.check().is_ok(), "{}", responses);
                    prop_assert_eq!(again, request.chat);
                }
                Ok(_) => {}
                Err(err) => prop_assert!(!err.to_string().is_empty()),
            }
        }
        for input in [messages.to_string().into_bytes(), bytes.clone()] {
            for parsed in [parse_messages(&input), parse_count_tokens(&input)] {
                match parsed {
                    Ok(request) => {
                        let mut again = request.chat.clone();
                        prop_assert!(again.check().is_ok(), "{}", messages);
                        prop_assert_eq!(again, request.chat);
                    }
                    Err(err) => prop_assert!(!err.to_string().is_empty()),
                }
            }
        }
        let completion = json!({"model": "m", "prompt": other.clone(), "stop": other.clone()});
        let embeddings = json!({"model": "m", "input": other.clone(), "dimensions": other.clone()});
        for input in [other.to_string().into_bytes(), completion.to_string().into_bytes(), embeddings.to_string().into_bytes(), bytes] {
            if let Err(err) = parse_completion(&input) {
                prop_assert!(!err.to_string().is_empty());
            }
            if let Err(err) = parse_embeddings(&input) {
                prop_assert!(!err.to_string().is_empty());
            }
        }
    }
}

/// Named events of a stream, each with its JSON data.
fn named_events(wire: &[u8]) -> Vec<(String, Value)> {
    let mut decoder = SseDecoder::new(1 << 24);
    decoder.push(wire).unwrap();
    let mut events = Vec::new();
    while let Some(event) = decoder.next_event().unwrap() {
        events.push((event.event.expect("a named event"), serde_json::from_str(&event.data).unwrap()));
    }
    assert_eq!(decoder.finish().unwrap(), None);
    events
}

/// `openai`'s `ResponseStreamState.accumulate_event` (openai/lib/streaming/responses/_responses.py):
/// the snapshot starts from `response.created`; items are added at their output index, content
/// parts appended, text and argument deltas appended to the part or item they name.
fn responses_fold(events: &[(String, Value)]) -> (Vec<Value>, Value) {
    let mut items: Vec<Value> = Vec::new();
    let mut completed = Value::Null;
    for (kind, event) in events {
        assert_eq!(event["type"], kind.as_str());
        let index = event["output_index"].as_u64().unwrap_or(0) as usize;
        match kind.as_str() {
            "response.output_item.added" => {
                assert_eq!(index, items.len(), "items are added in order");
                items.push(event["item"].clone());
            }
            "response.content_part.added" => {
                items[index]["content"].as_array_mut().unwrap().push(event["part"].clone())
            }
            "response.output_text.delta" => {
                let part = &mut items[index]["content"][event["content_index"].as_u64().unwrap() as usize];
                assert_eq!(part["type"], "output_text");
                let text = format!("{}{}", part["text"].as_str().unwrap(), event["delta"].as_str().unwrap());
                part["text"] = Value::from(text);
            }
            "response.refusal.delta" => {
                let part = &mut items[index]["content"][event["content_index"].as_u64().unwrap() as usize];
                assert_eq!(part["type"], "refusal");
                let text = format!("{}{}", part["refusal"].as_str().unwrap(), event["delta"].as_str().unwrap());
                part["refusal"] = Value::from(text);
            }
            "response.function_call_arguments.delta" => {
                let item = &mut items[index];
                assert_eq!(item["type"], "function_call");
                let text = format!("{}{}", item["arguments"].as_str().unwrap(), event["delta"].as_str().unwrap());
                item["arguments"] = Value::from(text);
            }
            "response.reasoning_summary_part.added" => {
                items[index]["summary"].as_array_mut().unwrap().push(event["part"].clone())
            }
            "response.reasoning_summary_text.delta" => {
                let part = &mut items[index]["summary"][event["summary_index"].as_u64().unwrap() as usize];
                let text = format!("{}{}", part["text"].as_str().unwrap(), event["delta"].as_str().unwrap());
                part["text"] = Value::from(text);
            }
            "response.completed" | "response.incomplete" => completed = event["response"].clone(),
            _ => {}
        }
    }
    (items, completed)
}

/// `@anthropic-ai/sdk`'s `MessageStream` accumulation: blocks by index, text and thinking
/// appended, `input_json_delta`s joined; `message_delta` sets the stop reason and usage.
fn messages_fold(events: &[(String, Value)]) -> (Vec<Value>, Value, Value, String) {
    let mut blocks: Vec<Value> = Vec::new();
    let mut json_pieces: Vec<String> = Vec::new();
    let (mut stop, mut usage, mut model) = (Value::Null, Value::Null, String::new());
    for (kind, event) in events {
        assert_eq!(event["type"], kind.as_str());
        match kind.as_str() {
            "message_start" => model = event["message"]["model"].as_str().unwrap().to_owned(),
            "content_block_start" => {
                assert_eq!(event["index"].as_u64(), Some(blocks.len() as u64), "blocks are numbered in order");
                blocks.push(event["content_block"].clone());
                json_pieces.push(String::new());
            }
            "content_block_delta" => {
                let index = event["index"].as_u64().unwrap() as usize;
                let delta = &event["delta"];
                let block = &mut blocks[index];
                match delta["type"].as_str().unwrap() {
                    "text_delta" => {
                        block["text"] = Value::from(format!(
                            "{}{}",
                            block["text"].as_str().unwrap(),
                            delta["text"].as_str().unwrap()
                        ))
                    }
                    "thinking_delta" => {
                        block["thinking"] = Value::from(format!(
                            "{}{}",
                            block["thinking"].as_str().unwrap(),
                            delta["thinking"].as_str().unwrap()
                        ));
                    }
                    "input_json_delta" => json_pieces[index].push_str(delta["partial_json"].as_str().unwrap()),
                    other => panic!("delta {other}"),
                }
            }
            "message_delta" => {
                stop = event["delta"]["stop_reason"].clone();
                usage = event["usage"].clone();
            }
            _ => {}
        }
    }
    for (block, json) in blocks.iter_mut().zip(json_pieces) {
        if block["type"] == "tool_use" {
            block["input"] = Value::from(json);
        }
    }
    (blocks, stop, usage, model)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The Responses event stream, folded as the SDK folds it, holds the answer: its messages'
    /// text and refusals, its reasoning and its calls; and it ends with the response object
    /// the same answer gets whole (when the answer's items come in the object's order).
    #[test]
    fn responses_streams_fold_into_the_answer(chunks in chunks()) {
        let answer: Answer = chunks.iter().cloned().collect();
        let request = parse_responses(br#"{"model": "requested", "input": "x"}"#).unwrap();
        let meta = ResponseMeta::new(&request, "resp_p", 1);
        let mut encoder = ResponsesEncoder::new(meta.clone());
        let mut wire = Vec::new();
        for chunk in &chunks {
            wire.extend_from_slice(&encoder.encode(chunk));
        }
        wire.extend_from_slice(&encoder.finish());
        let events = named_events(&wire);
        for (i, (_, event)) in events.iter().enumerate() {
            prop_assert_eq!(event["sequence_number"].as_u64(), Some(i as u64));
        }
        let (items, completed) = responses_fold(&events);
        let done: Vec<Value> = events.iter().filter(|(k, _)| k == "response.output_item.done").map(|(_, e)| e["item"].clone()).collect();
        prop_assert_eq!(done.len(), items.len(), "every item is done");
        let output = completed["output"].as_array().unwrap();
        prop_assert_eq!(output.len(), items.len());
        for (folded, final_item) in items.iter().zip(output) {
            // The folded snapshot carries what the deltas said; the final item adds statuses.
            for key in ["type", "id", "call_id", "name", "arguments", "content", "summary"] {
                prop_assert_eq!(&folded[key], &final_item[key], "{}", key);
            }
        }
        let texts = |kind: &str, key: &str| -> String {
            items.iter().flat_map(|i| i["content"].as_array().cloned().unwrap_or_default())
                .filter(|p| p["type"] == kind).map(|p| p[key].as_str().unwrap().to_owned()).collect()
        };
        prop_assert_eq!(texts("output_text", "text"), answer.content.clone());
        prop_assert_eq!(texts("refusal", "refusal"), answer.refusal.clone());
        let reasoning: String = items.iter().flat_map(|i| i["summary"].as_array().cloned().unwrap_or_default())
            .map(|p| p["text"].as_str().unwrap().to_owned()).collect();
        prop_assert_eq!(reasoning, answer.reasoning.clone());
        let calls: Vec<(String, String, String)> = items.iter().filter(|i| i["type"] == "function_call").map(|i| (
            i["call_id"].as_str().unwrap().to_owned(), i["name"].as_str().unwrap().to_owned(), i["arguments"].as_str().unwrap().to_owned(),
        )).collect();
        let expected: Vec<(String, String, String)> =
            answer.tool_calls.iter().map(|c| (c.id.clone(), c.function_name.clone(), c.arguments_json.clone())).collect();
        prop_assert_eq!(calls, expected);
        prop_assert_eq!(completed["model"].as_str(), Some(answer.model.as_str()));
        let usage = answer.usage.unwrap();
        prop_assert_eq!(completed["usage"]["input_tokens"].as_i64(), Some(usage.prompt_tokens));
        prop_assert_eq!(completed["usage"]["output_tokens_details"]["reasoning_tokens"].as_i64(), Some(usage.reasoning_tokens));
        let whole: Value = serde_json::from_slice(&response_json(&meta, &answer)).unwrap();
        let kinds: Vec<&str> = output.iter().map(|i| i["type"].as_str().unwrap()).collect();
        // The object's order: one reasoning item, one message (text, then refusal), the calls.
        let canonical_order = kinds.windows(2).all(|w| {
            let rank = |k: &str| match k { "reasoning" => 0, "message" => 1, _ => 2 };
            rank(w[0]) < rank(w[1]) || (w[0] == "function_call" && w[1] == "function_call")
        }) && output.iter().filter(|i| i["type"] == "message").all(|m| {
            let parts: Vec<&str> = m["content"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
            matches!(parts.as_slice(), ["output_text"] | ["refusal"] | ["output_text", "refusal"])
        });
        if canonical_order {
            prop_assert_eq!(&completed, &whole);
        }
    }

    /// The Messages event stream, folded as Anthropic's SDK folds it, holds the answer.
    #[test]
    fn messages_streams_fold_into_the_answer(chunks in chunks()) {
        let answer: Answer = chunks.iter().cloned().collect();
        let mut encoder = MessagesEncoder::new(MessageMeta { id: "msg_p".into(), model: "requested".into(), estimated_input_tokens: 0 });
        let mut wire = Vec::new();
        for chunk in &chunks {
            wire.extend_from_slice(&encoder.encode(chunk));
        }
        wire.extend_from_slice(&encoder.finish());
        let events = named_events(&wire);
        prop_assert_eq!(events.last().map(|(k, _)| k.as_str()), Some("message_stop"));
        let starts = events.iter().filter(|(k, _)| k == "content_block_start").count();
        let stops = events.iter().filter(|(k, _)| k == "content_block_stop").count();
        prop_assert_eq!(starts, stops, "every block is closed");
        let (blocks, stop, usage, model) = messages_fold(&events);
        prop_assert_eq!(model, answer.model.clone());
        let text: String = blocks.iter().filter(|b| b["type"] == "text").map(|b| b["text"].as_str().unwrap()).collect();
        let said: String = chunks.iter().map(|c| format!("{}{}", c.delta, c.refusal_delta)).collect();
        prop_assert_eq!(text, said);
        let thinking: String = blocks.iter().filter(|b| b["type"] == "thinking").map(|b| b["thinking"].as_str().unwrap()).collect();
        prop_assert_eq!(thinking, answer.reasoning.clone());
        let calls: Vec<(String, String, String)> = blocks.iter().filter(|b| b["type"] == "tool_use").map(|b| (
            b["id"].as_str().unwrap().to_owned(), b["name"].as_str().unwrap().to_owned(), b["input"].as_str().unwrap().to_owned(),
        )).collect();
        let expected: Vec<(String, String, String)> =
            answer.tool_calls.iter().map(|c| (c.id.clone(), c.function_name.clone(), c.arguments_json.clone())).collect();
        prop_assert_eq!(calls, expected);
        prop_assert_eq!(stop.as_str(), Some(stop_reason(answer.finish_reason_or_default())));
        let expected_usage = answer.usage.unwrap();
        prop_assert_eq!(usage["output_tokens"].as_i64(), Some(expected_usage.completion_tokens));
        prop_assert_eq!(usage["cache_read_input_tokens"].as_i64(), Some(expected_usage.cached_prompt_tokens));
    }
}
