//! The golden conformance fixtures of `tests/fixtures/wire/` (see the README there): for each
//! case, the client's request → the provider request meshgate must send (and what it leaves out);
//! the provider's answer, fed through the SSE decoder a few bytes at a time → the chunks → the
//! client's SSE stream and JSON answer meshgate must return. JSON is compared as values (numbers by
//! value), SSE framing byte for byte.

use std::path::{Path, PathBuf};

use meshgate_proto::common::v1 as pb;
use meshgate_proto::common::v1::content_part::Part;
use meshgate_proto::sync::v1::{CompleteChunk, CompleteRequest};
use meshgate_wire::openai::ingress::{ChunkEncoder, ReplyMeta, completion_json, parse_chat};
use meshgate_wire::sse::SseDecoder;
use meshgate_wire::{Answer, ProviderModel, UnknownParams, WireError, anthropic, openai};
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/wire")
}

fn read(dir: &Path, name: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join(name)).ok()
}

fn json_file(dir: &Path, name: &str) -> Option<Value> {
    read(dir, name)
        .map(|bytes| serde_json::from_slice(&bytes).unwrap_or_else(|err| panic!("{}/{name}: {err}", dir.display())))
}

/// JSON equality with numbers compared by value (`0` and `0.0` are the same temperature).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn assert_same(case: &str, what: &str, actual: &Value, expected: &Value) {
    assert!(
        same(actual, expected),
        "{case}: {what} differs\n  actual:   {}\n  expected: {}",
        serde_json::to_string(actual).unwrap(),
        serde_json::to_string(expected).unwrap()
    );
}

fn provider_model(case: &Value) -> ProviderModel {
    let model = &case["provider_model"];
    ProviderModel {
        max_completion_tokens: model["max_completion_tokens"].as_bool().unwrap_or(false),
        unknown_params: match model["unknown_params"].as_str().unwrap_or("forward") {
            "forward" => UnknownParams::Forward,
            "drop" => UnknownParams::Drop,
            "refuse" => UnknownParams::Refuse,
            other => panic!("unknown_params {other:?}"),
        },
        max_output_tokens: model["max_output_tokens"].as_i64().unwrap_or(0),
        native_structured_output: model["native_structured_output"].as_bool().unwrap_or(false),
    }
}

/// The canonical requests of the gRPC → OpenAI cases, as a gRPC client builds them.
fn canonical_request(case: &str) -> CompleteRequest {
    match case {
        "canonical_openai_agent" => CompleteRequest {
            model: "gpt-4.1".into(),
            messages: vec![
                pb::ChatMessage { role: "system".into(), content: "You read receipts.".into(), ..Default::default() },
                pb::ChatMessage {
                    role: "user".into(),
                    parts: vec![
                        pb::ContentPart { part: Some(Part::Text("Total of this receipt, converted to EUR?".into())) },
                        pb::ContentPart {
                            part: Some(Part::ImageUrl(pb::ImageUrl {
                                url: "data:image/jpeg;base64,/9j/4AAQSkZJRg==".into(),
                                detail: "high".into(),
                            })),
                        },
                    ],
                    ..Default::default()
                },
            ],
            sampling: Some(pb::SamplingParams { max_tokens: Some(1024), seed: Some(42), ..Default::default() }),
            options: Some(pb::ChatOptions {
                tools: vec![pb::ToolDefinition {
                    name: "convert_currency".into(),
                    description: "Convert an amount between currencies".into(),
                    parameters_json: r#"{"type":"object","properties":{"amount":{"type":"number"},"from":{"type":"string"},"to":{"type":"string"}},"required":["amount","from","to"]}"#.into(),
                    strict: None,
                }],
                tool_choice: Some(pb::ToolChoice { mode: pb::tool_choice::Mode::Required as i32, function_name: String::new() }),
                response_format: Some(pb::ResponseFormat {
                    kind: pb::response_format::Kind::JsonSchema as i32,
                    name: "receipt_total".into(),
                    description: String::new(),
                    schema_json: r#"{"type":"object","properties":{"total_eur":{"type":"number"}},"required":["total_eur"],"additionalProperties":false}"#.into(),
                    strict: Some(true),
                }),
                reasoning_effort: "medium".into(),
                user: "grpc-client-7".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        other => panic!("no canonical request for {other}"),
    }
}

fn chunk_json(chunk: &CompleteChunk) -> Value {
    let mut out = serde_json::Map::new();
    let mut put = |key: &str, value: Value| {
        out.insert(key.to_owned(), value);
    };
    if !chunk.delta.is_empty() {
        put("delta", json!(chunk.delta));
    }
    if !chunk.model.is_empty() {
        put("model", json!(chunk.model));
    }
    if !chunk.tool_call_deltas.is_empty() {
        put(
            "tool_call_deltas",
            chunk
                .tool_call_deltas
                .iter()
                .map(|d| json!({"index": d.index, "id": d.id, "function_name": d.function_name, "arguments_delta": d.arguments_delta}))
                .collect(),
        );
    }
    if !chunk.refusal_delta.is_empty() {
        put("refusal_delta", json!(chunk.refusal_delta));
    }
    if !chunk.reasoning_delta.is_empty() {
        put("reasoning_delta", json!(chunk.reasoning_delta));
    }
    if !chunk.finish_reason.is_empty() {
        put("finish_reason", json!(chunk.finish_reason));
    }
    if let Some(u) = &chunk.usage {
        put(
            "usage",
            json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
                "cached_prompt_tokens": u.cached_prompt_tokens, "cache_write_tokens": u.cache_write_tokens,
                "reasoning_tokens": u.reasoning_tokens}),
        );
    }
    if !chunk.tool_calls.is_empty() {
        put(
            "tool_calls",
            chunk
                .tool_calls
                .iter()
                .map(|c| json!({"id": c.id, "type": c.r#type, "function_name": c.function_name, "arguments_json": c.arguments_json}))
                .collect(),
        );
    }
    Value::Object(out)
}

/// The client's SSE stream checked event by event: framing byte for byte, payloads as JSON.
fn assert_sse(case: &str, actual: &[u8], expected: &[u8]) {
    let actual = std::str::from_utf8(actual).unwrap();
    let expected = std::str::from_utf8(expected).unwrap();
    assert!(actual.ends_with("data: [DONE]\n\n"), "{case}: the stream must end with [DONE]");
    let split =
        |text: &str| -> Vec<String> { text.split("\n\n").filter(|e| !e.is_empty()).map(str::to_owned).collect() };
    let (actual_events, expected_events) = (split(actual), split(expected));
    assert_eq!(actual_events.len(), expected_events.len(), "{case}: event count\n{actual}");
    for (i, (a, e)) in actual_events.iter().zip(&expected_events).enumerate() {
        assert!(a.starts_with("data: ") && !a.contains('\n'), "{case}: event {i} is not one data line: {a:?}");
        let (a, e) = (&a["data: ".len()..], e.strip_prefix("data: ").unwrap());
        if e == "[DONE]" {
            assert_eq!(a, e, "{case}: event {i}");
            continue;
        }
        let a: Value = serde_json::from_str(a).unwrap();
        let e: Value = serde_json::from_str(e).unwrap_or_else(|err| panic!("{case}: expected event {i}: {err}"));
        assert_same(case, &format!("client event {i}"), &a, &e);
    }
}

/// Runs one fixture directory; returns the pair it exercised.
fn run(dir: &Path) -> String {
    let case_name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let case = json_file(dir, "case.json").expect("case.json");
    let pair = case["pair"].as_str().expect("pair").to_owned();
    let model = provider_model(&case);

    let (request, include_usage, client_model) = match read(dir, "client_request.json") {
        Some(body) => {
            let chat = parse_chat(&body).unwrap_or_else(|err| panic!("{case_name}: the client request: {err}"));
            let request = CompleteRequest {
                model: chat.model.clone(),
                messages: chat.messages,
                sampling: Some(chat.sampling),
                options: Some(chat.options),
                ..Default::default()
            };
            (request, chat.include_usage, chat.model)
        }
        None => {
            let request = canonical_request(&case_name);
            let model = request.model.clone();
            (request, true, model)
        }
    };

    let anthropic = pair.ends_with("anthropic");
    let body = if anthropic {
        anthropic::provider::request_body(&request, &model)
    } else {
        openai::provider::request_body(&request, &model)
    };
    if let Some(expected) = case.get("expected_error") {
        let err = body.expect_err(&case_name);
        let kind = match err {
            WireError::Invalid { .. } => "invalid",
            WireError::Unsupported { .. } => "unsupported",
            _ => panic!("{case_name}: {err:?}"),
        };
        assert_same(&case_name, "the refusal", &json!({"kind": kind, "field": err.field()}), expected);
        return pair;
    }
    let body = body.unwrap_or_else(|err| panic!("{case_name}: {err}"));
    let sent: Value = serde_json::from_slice(&body.body).unwrap();
    assert_same(
        &case_name,
        "the provider request",
        &sent,
        &json_file(dir, "provider_request.json").expect("provider_request.json"),
    );
    assert_same(&case_name, "what was left out", &json!(body.dropped), &case["dropped"]);

    if let Some(error) = read(dir, "provider_error.json") {
        let status = case["provider_status"].as_u64().expect("provider_status") as u16;
        let error = if anthropic {
            anthropic::provider::provider_error(status, &error)
        } else {
            openai::provider::provider_error(status, &error)
        };
        let classified = json!({"kind": format!("{:?}", error.kind), "code": error.code, "param": error.param, "status": error.status});
        assert_same(&case_name, "the provider error", &classified, &case["expected_provider_error"]);
        assert!(!error.message.is_empty());
        return pair;
    }

    let Some(stream) = read(dir, "provider_response.sse") else { return pair };
    let mut sse = SseDecoder::new(1 << 20);
    let mut openai_decoder = openai::provider::StreamDecoder::new(&request);
    let mut anthropic_decoder = anthropic::provider::StreamDecoder::new(&request, &model);
    let mut chunks = Vec::new();
    // A few bytes at a time, as a slow network delivers them.
    for piece in stream.chunks(7) {
        sse.push(piece).unwrap();
        while let Some(event) = sse.next_event().unwrap() {
            let chunk = if anthropic { anthropic_decoder.on_event(&event) } else { openai_decoder.on_event(&event) };
            chunks.extend(chunk.unwrap_or_else(|err| panic!("{case_name}: {err}")));
        }
    }
    assert_eq!(sse.finish().unwrap(), None);
    assert!(if anthropic { anthropic_decoder.is_done() } else { openai_decoder.is_done() }, "{case_name}: unfinished");

    if let Some(expected) = json_file(dir, "expected_chunks.json") {
        let actual: Value = chunks.iter().map(chunk_json).collect();
        assert_same(&case_name, "the chunks", &actual, &expected);
    }
    let meta = ReplyMeta { id: "chatcmpl-fixture".into(), created: 1_700_000_000, model: client_model };
    if let Some(expected) = read(dir, "client_response.sse") {
        let mut encoder = ChunkEncoder::new(meta.clone(), include_usage);
        let mut wire = Vec::new();
        for chunk in &chunks {
            wire.extend_from_slice(&encoder.encode(chunk));
        }
        wire.extend_from_slice(&encoder.done());
        assert_sse(&case_name, &wire, &expected);
    }
    if let Some(expected) = json_file(dir, "client_response.json") {
        let answer: Answer = chunks.iter().cloned().collect();
        let actual: Value = serde_json::from_slice(&completion_json(&meta, &answer)).unwrap();
        assert_same(&case_name, "the client's JSON answer", &actual, &expected);
    }
    pair
}

#[test]
fn every_fixture_holds() {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(fixtures()).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    let mut pairs = std::collections::BTreeMap::<String, Vec<String>>::new();
    for dir in &dirs {
        let pair = run(dir);
        pairs.entry(pair).or_default().push(dir.file_name().unwrap().to_string_lossy().into_owned());
    }
    for pair in ["openai-openai", "openai-anthropic", "canonical-openai"] {
        assert!(pairs.contains_key(pair), "no fixture for {pair}: {pairs:?}");
    }
}
