//! Properties over generated inputs: the edge's parser takes any JSON without panicking (and what
//! it accepts passes the canonical checks again); the chunk stream the encoder writes, folded
//! the way the official `openai` Python SDK folds it, is the answer meshgate assembled itself.

use meshgate_proto::common::v1 as pb;
use meshgate_proto::sync::v1::CompleteChunk;
use meshgate_wire::Answer;
use meshgate_wire::openai::ingress::{ChunkEncoder, ReplyMeta, parse_chat};
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
