//! What translation costs per request: an agent request of 20 tools and 8 turns (about 30 KB)
//! parsed at the edge, turned into an OpenAI and an Anthropic body, its streamed answer (text
//! and two tool calls in about 60 events) decoded, and re-encoded as the client's chunks; the
//! same conversation sent as a Responses API request and as an Anthropic Messages request,
//! parsed and answered as those clients' events.
//!
//! `cargo run --release -p meshgate-wire --example translate_bench [iterations]`

use std::time::Instant;

use meshgate_proto::sync::v1::CompleteRequest;
use meshgate_wire::anthropic::ingress::{MessageMeta, MessagesEncoder, parse_messages};
use meshgate_wire::openai::ingress::{ChunkEncoder, ReplyMeta, parse_chat};
use meshgate_wire::openai::responses::{ResponseMeta, ResponsesEncoder, parse_responses};
use meshgate_wire::sse::SseDecoder;
use meshgate_wire::{ProviderModel, anthropic, openai};
use serde_json::{Value, json};

fn agent_request() -> Vec<u8> {
    let tools: Vec<Value> = (0..20)
        .map(|i| {
            json!({"type": "function", "function": {
                "name": format!("tool_{i}"),
                "description": format!("Tool number {i}: looks things up in system {i} and returns what it found, as JSON, with sources and timestamps."),
                "parameters": {"type": "object", "properties": {
                    "query": {"type": "string", "description": "What to look for, in plain words"},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                    "filters": {"type": "object", "properties": {"since": {"type": "string", "format": "date-time"}, "tags": {"type": "array", "items": {"type": "string"}}}},
                    "mode": {"type": "string", "enum": ["fast", "thorough", "exhaustive"]}
                }, "required": ["query"], "additionalProperties": false},
                "strict": true
            }})
        })
        .collect();
    let mut messages = vec![json!({"role": "system", "content": "You are a careful research agent. ".repeat(30)})];
    for turn in 0..8 {
        messages.push(json!({"role": "user", "content": format!("Step {turn}: find the next piece of evidence. {}", "Context sentence. ".repeat(60))}));
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": [{"id": format!("call_{turn}"), "type": "function",
            "function": {"name": format!("tool_{turn}"), "arguments": format!("{{\"query\":\"evidence {turn}\",\"limit\":10}}")}}]}));
        messages.push(json!({"role": "tool", "tool_call_id": format!("call_{turn}"), "content": format!("{{\"results\":[{}]}}", "{\"title\":\"a result\",\"score\":0.9},".repeat(12).trim_end_matches(','))}));
    }
    let body = json!({"model": "gpt-4.1", "messages": messages, "tools": tools, "tool_choice": "auto",
        "parallel_tool_calls": true, "stream": true, "stream_options": {"include_usage": true}, "temperature": 0.2});
    serde_json::to_vec(&body).unwrap()
}

/// The same conversation as a Responses API request: the system message as `instructions`, the
/// calls and results as items, the tools flat.
fn responses_request(chat: &Value) -> Vec<u8> {
    let mut input = Vec::new();
    for message in chat["messages"].as_array().unwrap().iter().skip(1) {
        match message["role"].as_str().unwrap() {
            "user" => input.push(json!({"role": "user", "content": [{"type": "input_text", "text": message["content"]}]})),
            "assistant" => {
                for call in message["tool_calls"].as_array().unwrap() {
                    input.push(json!({"type": "function_call", "call_id": call["id"], "name": call["function"]["name"],
                        "arguments": call["function"]["arguments"]}));
                }
            }
            _ => input.push(json!({"type": "function_call_output", "call_id": message["tool_call_id"], "output": message["content"]})),
        }
    }
    let tools: Vec<Value> = chat["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let f = &t["function"];
            json!({"type": "function", "name": f["name"], "description": f["description"], "parameters": f["parameters"], "strict": f["strict"]})
        })
        .collect();
    let body = json!({"model": "gpt-4.1", "instructions": chat["messages"][0]["content"], "input": input, "tools": tools,
        "tool_choice": "auto", "parallel_tool_calls": true, "stream": true, "temperature": 0.2});
    serde_json::to_vec(&body).unwrap()
}

/// The same conversation as an Anthropic Messages request.
fn messages_request(chat: &Value) -> Vec<u8> {
    let mut messages: Vec<Value> = Vec::new();
    for message in chat["messages"].as_array().unwrap().iter().skip(1) {
        match message["role"].as_str().unwrap() {
            "user" => messages.push(json!({"role": "user", "content": message["content"]})),
            "assistant" => {
                let blocks: Vec<Value> = message["tool_calls"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|call| {
                        let input: Value =
                            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
                        json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": input})
                    })
                    .collect();
                messages.push(json!({"role": "assistant", "content": blocks}));
            }
            _ => messages.push(
                json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": message["tool_call_id"],
                "content": message["content"]}]}),
            ),
        }
    }
    let tools: Vec<Value> = chat["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| json!({"name": t["function"]["name"], "description": t["function"]["description"], "input_schema": t["function"]["parameters"]}))
        .collect();
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 4096, "system": chat["messages"][0]["content"],
        "messages": messages, "tools": tools, "tool_choice": {"type": "auto"}, "stream": true, "temperature": 0.2});
    serde_json::to_vec(&body).unwrap()
}

fn provider_stream() -> Vec<u8> {
    let mut sse = String::new();
    let mut event = |delta: Value, finish: Value| {
        let chunk = json!({"id": "chatcmpl-b", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4.1-2025-04-14",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}], "usage": null});
        sse.push_str(&format!("data: {chunk}\n\n"));
    };
    event(json!({"role": "assistant", "content": ""}), Value::Null);
    for i in 0..40 {
        event(json!({"content": format!("word{i} ")}), Value::Null);
    }
    for call in 0..2 {
        event(
            json!({"tool_calls": [{"index": call, "id": format!("call_n{call}"), "type": "function", "function": {"name": "tool_3", "arguments": ""}}]}),
            Value::Null,
        );
        for piece in ["{\"query\":", "\"more evidence\",", "\"limit\":", "5}"] {
            event(json!({"tool_calls": [{"index": call, "function": {"arguments": piece}}]}), Value::Null);
        }
    }
    event(json!({}), json!("tool_calls"));
    sse.push_str("data: {\"id\":\"chatcmpl-b\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4.1-2025-04-14\",\"choices\":[],\"usage\":{\"prompt_tokens\":9000,\"completion_tokens\":120,\"total_tokens\":9120,\"prompt_tokens_details\":{\"cached_tokens\":8192}}}\n\ndata: [DONE]\n\n");
    sse.into_bytes()
}

fn main() {
    let iterations: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let body = agent_request();
    let chat_json: Value = serde_json::from_slice(&body).unwrap();
    let responses_body = responses_request(&chat_json);
    let messages_body = messages_request(&chat_json);
    let stream = provider_stream();
    let (mut parse_r, mut parse_m, mut encode_r, mut encode_m) = (0u128, 0u128, 0u128, 0u128);
    let model = ProviderModel::default();
    let (mut parse, mut openai_body, mut anthropic_body, mut decode, mut encode) = (0u128, 0u128, 0u128, 0u128, 0u128);
    let mut sink = 0usize;
    for i in 0..iterations + iterations / 10 {
        let warm = i >= iterations / 10;
        let t = Instant::now();
        let chat = parse_chat(&body).expect("the request parses");
        let parsed = t.elapsed().as_nanos();
        let request = CompleteRequest {
            model: chat.model.clone(),
            messages: chat.messages,
            sampling: Some(chat.sampling),
            options: Some(chat.options),
            ..Default::default()
        };
        let t = Instant::now();
        sink += openai::provider::request_body(&request, &model).unwrap().body.len();
        let to_openai = t.elapsed().as_nanos();
        let t = Instant::now();
        sink += anthropic::provider::request_body(&request, &model).unwrap().body.len();
        let to_anthropic = t.elapsed().as_nanos();
        let t = Instant::now();
        let mut sse = SseDecoder::new(1 << 20);
        let mut decoder = openai::provider::StreamDecoder::new(&request);
        let mut chunks = Vec::new();
        for piece in stream.chunks(1400) {
            sse.push(piece).unwrap();
            while let Some(event) = sse.next_event().unwrap() {
                chunks.extend(decoder.on_event(&event).unwrap());
            }
        }
        let decoded = t.elapsed().as_nanos();
        let t = Instant::now();
        let mut encoder = ChunkEncoder::new(ReplyMeta { id: "chatcmpl-b".into(), created: 1, model: chat.model }, true);
        for chunk in &chunks {
            sink += encoder.encode(chunk).len();
        }
        sink += encoder.done().len();
        let encoded = t.elapsed().as_nanos();
        let t = Instant::now();
        let responses = parse_responses(&responses_body).expect("the Responses request parses");
        let parsed_r = t.elapsed().as_nanos();
        let t = Instant::now();
        sink += parse_messages(&messages_body).expect("the Messages request parses").chat.messages.len();
        let parsed_m = t.elapsed().as_nanos();
        let t = Instant::now();
        let mut encoder = ResponsesEncoder::new(ResponseMeta::new(&responses, "resp_b", 1));
        for chunk in &chunks {
            sink += encoder.encode(chunk).len();
        }
        sink += encoder.finish().len();
        let encoded_r = t.elapsed().as_nanos();
        let t = Instant::now();
        let mut encoder = MessagesEncoder::new(MessageMeta {
            id: "msg_b".into(),
            model: "claude-sonnet-4-5".into(),
            estimated_input_tokens: 0,
        });
        for chunk in &chunks {
            sink += encoder.encode(chunk).len();
        }
        sink += encoder.finish().len();
        let encoded_m = t.elapsed().as_nanos();
        if warm {
            parse_r += parsed_r;
            parse_m += parsed_m;
            encode_r += encoded_r;
            encode_m += encoded_m;
            parse += parsed;
            openai_body += to_openai;
            anthropic_body += to_anthropic;
            decode += decoded;
            encode += encoded;
        }
    }
    let per = |total: u128| total as f64 / f64::from(iterations) / 1000.0;
    println!(
        "request {} bytes, provider stream {} bytes, {iterations} iterations (checksum {sink})",
        body.len(),
        stream.len()
    );
    println!("parse_chat                 {:8.1} µs", per(parse));
    println!("openai request_body        {:8.1} µs", per(openai_body));
    println!("anthropic request_body     {:8.1} µs", per(anthropic_body));
    println!("openai stream decode       {:8.1} µs", per(decode));
    println!("chunk encode               {:8.1} µs", per(encode));
    println!("edge + OpenAI provider     {:8.1} µs per request", per(parse + openai_body + decode + encode));
    println!("Responses request {} bytes, Messages request {} bytes", responses_body.len(), messages_body.len());
    println!("parse_responses            {:8.1} µs", per(parse_r));
    println!("Responses events encode    {:8.1} µs", per(encode_r));
    println!("parse_messages             {:8.1} µs", per(parse_m));
    println!("Messages events encode     {:8.1} µs", per(encode_m));
    println!("Responses edge + OpenAI    {:8.1} µs per request", per(parse_r + openai_body + decode + encode_r));
    println!("Messages edge + OpenAI     {:8.1} µs per request", per(parse_m + openai_body + decode + encode_m));
}
