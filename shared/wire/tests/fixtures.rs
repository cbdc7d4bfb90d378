//! The golden conformance fixtures of `tests/fixtures/wire/` (see the README there): for each
//! case, the client's request in its format (Chat Completions, Responses, Anthropic Messages,
//! legacy completions, embeddings) → the provider request meshgate must send in the provider's
//! (Chat Completions, Anthropic Messages, Responses), and what it leaves out; the provider's
//! answer, fed through the SSE decoder a few bytes at a time → the chunks → the client's event
//! stream and JSON answer meshgate must return. JSON is compared as values (numbers by value),
//! event names and framing exactly.

use std::path::{Path, PathBuf};

use meshgate_proto::common::v1 as pb;
use meshgate_proto::common::v1::content_part::Part;
use meshgate_proto::sync::v1::{CompleteChunk, CompleteRequest};
use meshgate_wire::anthropic::ingress::{MessageMeta, MessagesEncoder, message_json, parse_messages};
use meshgate_wire::openai::completions::{TextCompletionEncoder, parse_completion, text_completion_json};
use meshgate_wire::openai::embeddings::{self, parse_embeddings};
use meshgate_wire::openai::ingress::{ChunkEncoder, ReplyMeta, completion_json, parse_chat};
use meshgate_wire::openai::responses::{
    self, ResponseMeta, ResponsesEncoder, ResponsesRequest, parse_responses, response_json,
};
use meshgate_wire::sse::SseDecoder;
use meshgate_wire::{Answer, ChatRequest, ProviderModel, UnknownParams, WireError, anthropic, openai};
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

/// One event of a stream: its `event:` name, if any, and its `data:` line.
fn split_events(text: &str) -> Vec<(Option<&str>, &str)> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|event| {
            let (name, data) = match event.strip_prefix("event: ") {
                Some(rest) => {
                    let (name, data) = rest.split_once('\n').expect("an event line, then its data");
                    (Some(name), data)
                }
                None => (None, event),
            };
            let data = data.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data line: {data:?}"));
            assert!(!data.contains('\n'), "one data line per event: {event:?}");
            (name, data)
        })
        .collect()
}

/// The client's SSE stream checked event by event: names and framing exactly, payloads as JSON.
fn assert_sse(case: &str, actual: &[u8], expected: &[u8]) {
    let actual = std::str::from_utf8(actual).unwrap();
    let expected = std::str::from_utf8(expected).unwrap();
    let (actual_events, expected_events) = (split_events(actual), split_events(expected));
    assert_eq!(actual_events.len(), expected_events.len(), "{case}: event count\n{actual}");
    for (i, ((a_name, a), (e_name, e))) in actual_events.iter().zip(&expected_events).enumerate() {
        assert_eq!(a_name, e_name, "{case}: the name of event {i}");
        if *e == "[DONE]" {
            assert_eq!(a, e, "{case}: event {i}");
            continue;
        }
        let a: Value = serde_json::from_str(a).unwrap();
        let e: Value = serde_json::from_str(e).unwrap_or_else(|err| panic!("{case}: expected event {i}: {err}"));
        assert_same(case, &format!("client event {i}"), &a, &e);
    }
}

/// What the client sent, in its own format.
enum ClientRequest {
    Chat { include_usage: bool },
    Canonical,
    Responses(Box<ResponsesRequest>),
    Messages,
    Completions { include_usage: bool, logprobs: bool },
}

fn complete_request(chat: ChatRequest) -> CompleteRequest {
    CompleteRequest {
        model: chat.model,
        messages: chat.messages,
        sampling: Some(chat.sampling),
        options: Some(chat.options),
        ..Default::default()
    }
}

fn refusal(err: &WireError) -> Value {
    let kind = match err {
        WireError::Invalid { .. } => "invalid",
        WireError::Unsupported { .. } => "unsupported",
        _ => panic!("{err:?}"),
    };
    json!({"kind": kind, "field": err.field()})
}

type Parsed = (ClientRequest, ChatRequest, Vec<String>);

/// The client's request parsed by its format's parser; `None` when the case expects it refused
/// (and it was).
fn parse_client(case_name: &str, case: &Value, client: &str, dir: &Path) -> Option<(ClientRequest, CompleteRequest)> {
    let Some(body) = read(dir, "client_request.json") else {
        assert_eq!(client, "canonical", "{case_name}: client_request.json");
        return Some((ClientRequest::Canonical, canonical_request(case_name)));
    };
    let parsed: Result<Parsed, WireError> = match client {
        "openai" => {
            parse_chat(&body).map(|chat| (ClientRequest::Chat { include_usage: chat.include_usage }, chat, Vec::new()))
        }
        "responses" => parse_responses(&body).map(|r| {
            let (chat, unforwarded) = (r.chat.clone(), r.unforwarded.clone());
            (ClientRequest::Responses(Box::new(r)), chat, unforwarded)
        }),
        "messages" => parse_messages(&body).map(|r| (ClientRequest::Messages, r.chat, r.unforwarded)),
        "completions" => parse_completion(&body).map(|r| {
            let client =
                ClientRequest::Completions { include_usage: r.chat.include_usage, logprobs: r.logprobs.is_some() };
            (client, r.chat, Vec::new())
        }),
        other => panic!("{case_name}: unknown client format {other}"),
    };
    if let Some(expected) = case.get("expected_client_error") {
        let err = parsed.err().unwrap_or_else(|| panic!("{case_name}: the client request must be refused"));
        assert_same(case_name, "the client's refusal", &refusal(&err), expected);
        return None;
    }
    let (client_request, chat, unforwarded) =
        parsed.unwrap_or_else(|err| panic!("{case_name}: the client request: {err}"));
    let expected = case.get("unforwarded").cloned().unwrap_or(json!([]));
    assert_same(case_name, "what goes to no provider", &json!(unforwarded), &expected);
    Some((client_request, complete_request(chat)))
}

/// A provider's stream decoder.
enum Decoder {
    OpenAi(openai::provider::StreamDecoder),
    Anthropic(anthropic::provider::StreamDecoder),
    Responses(responses::provider::StreamDecoder),
}

impl Decoder {
    fn on_event(&mut self, event: &meshgate_wire::sse::SseEvent) -> Result<Option<CompleteChunk>, WireError> {
        match self {
            Self::OpenAi(d) => d.on_event(event),
            Self::Anthropic(d) => d.on_event(event),
            Self::Responses(d) => d.on_event(event),
        }
    }

    fn is_done(&self) -> bool {
        match self {
            Self::OpenAi(d) => d.is_done(),
            Self::Anthropic(d) => d.is_done(),
            Self::Responses(d) => d.is_done(),
        }
    }
}

const CREATED: i64 = 1_700_000_000;

/// The client's streamed and whole answers, in its format.
fn client_answer(client: &ClientRequest, client_model: &str, chunks: &[CompleteChunk]) -> (Vec<u8>, Vec<u8>) {
    let answer: Answer = chunks.iter().cloned().collect();
    let reply_meta = |id: &str| ReplyMeta { id: id.into(), created: CREATED, model: client_model.into() };
    match client {
        ClientRequest::Chat { .. } | ClientRequest::Canonical => {
            let include_usage = !matches!(client, ClientRequest::Chat { include_usage: false });
            let meta = reply_meta("chatcmpl-fixture");
            let mut encoder = ChunkEncoder::new(meta.clone(), include_usage);
            let mut wire: Vec<u8> = chunks.iter().flat_map(|c| encoder.encode(c)).collect();
            wire.extend_from_slice(&encoder.done());
            (wire, completion_json(&meta, &answer))
        }
        ClientRequest::Responses(request) => {
            let meta = ResponseMeta::new(request, "resp_fixture", CREATED);
            let mut encoder = ResponsesEncoder::new(meta.clone());
            let mut wire: Vec<u8> = chunks.iter().flat_map(|c| encoder.encode(c)).collect();
            wire.extend_from_slice(&encoder.finish());
            (wire, response_json(&meta, &answer))
        }
        ClientRequest::Messages => {
            let meta = MessageMeta { id: "msg_fixture".into(), model: client_model.into(), estimated_input_tokens: 0 };
            let mut encoder = MessagesEncoder::new(meta.clone());
            let mut wire: Vec<u8> = chunks.iter().flat_map(|c| encoder.encode(c)).collect();
            wire.extend_from_slice(&encoder.finish());
            (wire, message_json(&meta, &answer))
        }
        ClientRequest::Completions { include_usage, logprobs } => {
            let meta = reply_meta("cmpl-fixture");
            let mut encoder = TextCompletionEncoder::new(meta.clone(), *include_usage, *logprobs);
            let mut wire: Vec<u8> = chunks.iter().flat_map(|c| encoder.encode(c)).collect();
            wire.extend_from_slice(&encoder.done());
            (wire, text_completion_json(&meta, &answer, *logprobs))
        }
    }
}

/// An embeddings case: the client's request → the provider's body; the provider's answer → the
/// client's.
fn run_embeddings(case_name: &str, case: &Value, dir: &Path) {
    let model = provider_model(case);
    let request = parse_embeddings(&read(dir, "client_request.json").expect("client_request.json"))
        .unwrap_or_else(|err| panic!("{case_name}: {err}"));
    let model_id = case["provider_model_id"].as_str().expect("provider_model_id");
    let body = embeddings::provider_body(&request, model_id, &model).unwrap_or_else(|err| panic!("{case_name}: {err}"));
    let sent: Value = serde_json::from_slice(&body.body).unwrap();
    let expected = json_file(dir, "provider_request.json").expect("provider_request.json");
    assert_same(case_name, "the provider request", &sent, &expected);
    let answer = read(dir, "provider_response.json").expect("provider_response.json");
    let decoded =
        embeddings::decode_embeddings(&answer, request.input.len()).unwrap_or_else(|err| panic!("{case_name}: {err}"));
    let client = embeddings::embeddings_json(
        &request.model,
        &decoded.vectors,
        decoded.usage.prompt_tokens,
        request.encoding_format,
    );
    let client: Value = serde_json::from_slice(&client).unwrap();
    let expected = json_file(dir, "client_response.json").expect("client_response.json");
    assert_same(case_name, "the client's answer", &client, &expected);
}

/// Runs one fixture directory; returns the pair it exercised.
fn run(dir: &Path) -> String {
    let case_name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let case = json_file(dir, "case.json").expect("case.json");
    let pair = case["pair"].as_str().expect("pair").to_owned();
    let (client, provider) = pair.split_once('-').expect("a pair is <client>-<provider>");
    if client == "embeddings" {
        run_embeddings(&case_name, &case, dir);
        return pair;
    }
    let model = provider_model(&case);
    let Some((client_request, request)) = parse_client(&case_name, &case, client, dir) else { return pair };
    let client_model = request.model.clone();

    let body = match provider {
        "openai" => openai::provider::request_body(&request, &model),
        "anthropic" => anthropic::provider::request_body(&request, &model),
        "responses" => responses::provider::provider_body(&request, &model),
        other => panic!("{case_name}: unknown provider format {other}"),
    };
    if let Some(expected) = case.get("expected_error") {
        let err = body.expect_err(&case_name);
        assert_same(&case_name, "the refusal", &refusal(&err), expected);
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
        let error = match provider {
            "anthropic" => anthropic::provider::provider_error(status, &error),
            _ => openai::provider::provider_error(status, &error),
        };
        let classified = json!({"kind": format!("{:?}", error.kind), "code": error.code, "param": error.param, "status": error.status});
        assert_same(&case_name, "the provider error", &classified, &case["expected_provider_error"]);
        assert!(!error.message.is_empty());
        return pair;
    }

    let Some(stream) = read(dir, "provider_response.sse") else { return pair };
    let mut sse = SseDecoder::new(1 << 20);
    let mut decoder = match provider {
        "openai" => Decoder::OpenAi(openai::provider::StreamDecoder::new(&request)),
        "anthropic" => Decoder::Anthropic(anthropic::provider::StreamDecoder::new(&request, &model)),
        _ => Decoder::Responses(responses::provider::StreamDecoder::new(&request)),
    };
    let mut chunks = Vec::new();
    // A few bytes at a time, as a slow network delivers them.
    for piece in stream.chunks(7) {
        sse.push(piece).unwrap();
        while let Some(event) = sse.next_event().unwrap() {
            chunks.extend(decoder.on_event(&event).unwrap_or_else(|err| panic!("{case_name}: {err}")));
        }
    }
    assert_eq!(sse.finish().unwrap(), None);
    assert!(decoder.is_done(), "{case_name}: unfinished");

    if let Some(expected) = json_file(dir, "expected_chunks.json") {
        let actual: Value = chunks.iter().map(chunk_json).collect();
        assert_same(&case_name, "the chunks", &actual, &expected);
    }
    let (wire, whole) = client_answer(&client_request, &client_model, &chunks);
    if let Some(expected) = read(dir, "client_response.sse") {
        assert_sse(&case_name, &wire, &expected);
    }
    if let Some(expected) = json_file(dir, "client_response.json") {
        let actual: Value = serde_json::from_slice(&whole).unwrap();
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
    let needed = [
        "openai-openai",
        "openai-anthropic",
        "canonical-openai",
        "responses-openai",
        "responses-anthropic",
        "responses-responses",
        "messages-openai",
        "messages-anthropic",
        "completions-openai",
        "embeddings-openai",
    ];
    for pair in needed {
        assert!(pairs.contains_key(pair), "no fixture for {pair}: {pairs:?}");
    }
}
