//! The Anthropic Messages API, mapped to and from meshgate's OpenAI-shaped chat.
//!
//! Request (OpenAI chat → `POST <base>/messages`):
//! - `system` and `developer` messages become the top-level `system` prompt (joined by a blank
//!   line, wherever they appear);
//! - `user` text becomes a `text` block; an `assistant` message becomes its `text` block plus one
//!   `tool_use` block per tool call (the arguments JSON must be an object: it is sent as `input`);
//! - a `tool` message becomes a `tool_result` block of a `user` turn;
//! - consecutive turns of one role are merged into one turn (Anthropic alternates roles), empty
//!   text blocks are dropped;
//! - `max_tokens` is required by Anthropic: the request's, else the configured default;
//!   `temperature`, `top_p`, `top_k` and `stop` (as `stop_sequences`) are forwarded; `seed` has no
//!   Anthropic equivalent and is not sent.
//!
//! Answer (the SSE events → [`CompleteChunk`]s, same contract as the OpenAI path):
//! `message_start` gives the model and input tokens, `content_block_start` / `_delta` carry text
//! (`text_delta`) and tool calls (`tool_use` + `input_json_delta`), `message_delta` the stop reason
//! and output tokens, `message_stop` ends the stream; `ping` and unknown events are skipped (as
//! Anthropic asks clients to), an `error` event fails the stream. Stop reasons map to OpenAI's:
//! `end_turn` / `stop_sequence` / `pause_turn` → `stop`, `max_tokens` → `length`, `tool_use` →
//! `tool_calls`, `refusal` → `content_filter`.

use std::collections::BTreeMap;

use meshgate_proto::common::v1::{ToolCall, Usage};
use meshgate_proto::sync::v1::{CompleteChunk, CompleteRequest};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::Error;
use crate::sse::SseEvent;

/// The `anthropic-version` header meshgate speaks.
pub const API_VERSION: &str = "2023-06-01";

/// The Messages API body for `request`, streaming.
pub(crate) fn request_body(request: &CompleteRequest, default_max_tokens: i64) -> Result<Value, Error> {
    let mut system: Vec<&str> = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, message) in request.messages.iter().enumerate() {
        let (role, blocks) = match message.role.as_str() {
            "system" | "developer" => {
                if !message.content.is_empty() {
                    system.push(&message.content);
                }
                continue;
            }
            "user" => ("user", text_block(&message.content).into_iter().collect::<Vec<_>>()),
            "assistant" => {
                let mut blocks: Vec<Value> = text_block(&message.content).into_iter().collect();
                for (j, call) in message.tool_calls.iter().enumerate() {
                    let input = match serde_json::from_str::<Value>(&call.arguments_json) {
                        Ok(Value::Object(map)) => Value::Object(map),
                        _ if call.arguments_json.trim().is_empty() => Value::Object(Map::new()),
                        _ => {
                            return Err(Error::InvalidRequest(format!(
                                "messages[{i}].tool_calls[{j}].arguments_json must be a JSON object for an Anthropic provider"
                            )));
                        }
                    };
                    blocks.push(json!({"type": "tool_use", "id": call.id, "name": call.function_name, "input": input}));
                }
                ("assistant", blocks)
            }
            "tool" => (
                "user",
                vec![json!({"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.content})],
            ),
            other => return Err(Error::InvalidRequest(format!("messages[{i}].role {other:?} is not supported"))),
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    if turns.is_empty() {
        return Err(Error::InvalidRequest(
            "an Anthropic provider needs at least one user or assistant message with content".into(),
        ));
    }
    let sampling = request.sampling.clone().unwrap_or_default();
    let mut body = json!({
        "model": request.model,
        "max_tokens": sampling.max_tokens.unwrap_or(default_max_tokens),
        "messages": turns.into_iter().map(|(role, content)| json!({"role": role, "content": content})).collect::<Vec<_>>(),
        "stream": true,
    });
    let fields = body.as_object_mut().expect("built as an object");
    if !system.is_empty() {
        fields.insert("system".into(), Value::String(system.join("\n\n")));
    }
    if let Some(t) = sampling.temperature {
        fields.insert("temperature".into(), json!(t));
    }
    if let Some(p) = sampling.top_p {
        fields.insert("top_p".into(), json!(p));
    }
    if let Some(k) = sampling.top_k {
        fields.insert("top_k".into(), json!(k));
    }
    if !sampling.stop.is_empty() {
        fields.insert("stop_sequences".into(), json!(sampling.stop));
    }
    Ok(body)
}

fn text_block(text: &str) -> Option<Value> {
    (!text.is_empty()).then(|| json!({"type": "text", "text": text}))
}

/// OpenAI's finish reason for an Anthropic stop reason (unknown ones pass through).
pub(crate) fn finish_reason(stop_reason: &str) -> String {
    match stop_reason {
        "end_turn" | "stop_sequence" | "pause_turn" => "stop".into(),
        "max_tokens" => "length".into(),
        "tool_use" => "tool_calls".into(),
        "refusal" => "content_filter".into(),
        other => other.into(),
    }
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<StartMessage>,
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    content_block: Option<Value>,
    #[serde(default)]
    delta: Option<Value>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize, Default)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<i64>,
    #[serde(default)]
    output_tokens: Option<i64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<i64>,
    #[serde(default)]
    cache_read_input_tokens: Option<i64>,
}

/// A tool call being assembled, with the `input` given at its start (used when no JSON deltas
/// follow).
#[derive(Default)]
struct PendingTool {
    call: ToolCall,
    start_input: Option<Value>,
}

/// Turns Messages API events into [`CompleteChunk`]s.
pub(crate) struct Assembler {
    provider: String,
    requested_model: String,
    reported_model: Option<String>,
    model_sent: bool,
    input_tokens: i64,
    output_tokens: i64,
    saw_usage: bool,
    stop_reason: Option<String>,
    tools: BTreeMap<u32, PendingTool>,
    pub(crate) done: bool,
}

impl Assembler {
    pub(crate) fn new(provider: &str, requested_model: &str) -> Self {
        Self {
            provider: provider.to_owned(),
            requested_model: requested_model.to_owned(),
            reported_model: None,
            model_sent: false,
            input_tokens: 0,
            output_tokens: 0,
            saw_usage: false,
            stop_reason: None,
            tools: BTreeMap::new(),
            done: false,
        }
    }

    fn protocol(&self, message: String) -> Error {
        Error::Protocol { provider: self.provider.clone(), message }
    }

    fn model_once(&mut self) -> String {
        if self.model_sent {
            return String::new();
        }
        self.model_sent = true;
        self.reported_model.clone().unwrap_or_else(|| self.requested_model.clone())
    }

    fn text(&mut self, text: &str) -> Option<CompleteChunk> {
        (!text.is_empty()).then(|| CompleteChunk {
            delta: text.to_owned(),
            model: self.model_once(),
            ..CompleteChunk::default()
        })
    }

    pub(crate) fn on_event(&mut self, event: SseEvent) -> Result<Option<CompleteChunk>, Error> {
        let data = event.data.trim();
        if data.is_empty() {
            return Ok(None);
        }
        let parsed: Event = serde_json::from_str(data)
            .map_err(|err| self.protocol(format!("malformed event ({err}): {}", crate::upstream::truncate(data))))?;
        let kind = event.event.as_deref().unwrap_or(&parsed.kind);
        match kind {
            "message_start" => {
                let message = parsed.message.ok_or_else(|| self.protocol("message_start without a message".into()))?;
                if let Some(model) = message.model.filter(|m| !m.is_empty()) {
                    self.reported_model = Some(model);
                }
                if let Some(usage) = message.usage {
                    self.add_usage(&usage);
                }
                Ok(None)
            }
            "content_block_start" => {
                let index = parsed.index.unwrap_or(0);
                let block = parsed.content_block.unwrap_or(Value::Null);
                match block["type"].as_str() {
                    Some("tool_use") => {
                        let pending = PendingTool {
                            call: ToolCall {
                                id: block["id"].as_str().unwrap_or_default().to_owned(),
                                r#type: "function".into(),
                                function_name: block["name"].as_str().unwrap_or_default().to_owned(),
                                arguments_json: String::new(),
                            },
                            start_input: block.get("input").cloned(),
                        };
                        self.tools.insert(index, pending);
                        Ok(None)
                    }
                    Some("text") => Ok(self.text(block["text"].as_str().unwrap_or_default())),
                    _ => Ok(None),
                }
            }
            "content_block_delta" => {
                let index = parsed.index.unwrap_or(0);
                let delta = parsed.delta.unwrap_or(Value::Null);
                match delta["type"].as_str() {
                    Some("text_delta") => Ok(self.text(delta["text"].as_str().unwrap_or_default())),
                    Some("input_json_delta") => {
                        let tool = self.tools.get_mut(&index).ok_or_else(|| Error::Protocol {
                            provider: self.provider.clone(),
                            message: format!("input_json_delta for block {index}, which is not a tool_use"),
                        })?;
                        tool.call.arguments_json.push_str(delta["partial_json"].as_str().unwrap_or_default());
                        Ok(None)
                    }
                    // Thinking, signatures and future delta types carry no chat text.
                    _ => Ok(None),
                }
            }
            "message_delta" => {
                if let Some(reason) = parsed.delta.as_ref().and_then(|d| d["stop_reason"].as_str()) {
                    self.stop_reason = Some(reason.to_owned());
                }
                if let Some(usage) = parsed.usage {
                    self.add_usage(&usage);
                }
                Ok(None)
            }
            "message_stop" => {
                self.done = true;
                Ok(Some(self.finish()))
            }
            "error" => {
                let error = parsed.error.unwrap_or(Value::Null);
                let message = error["message"].as_str().map_or_else(|| crate::upstream::truncate(data), str::to_owned);
                Err(self.protocol(format!("error event: {message}")))
            }
            // `ping`, `content_block_stop` and event types added after this code was written.
            _ => Ok(None),
        }
    }

    /// Output tokens in `message_delta` are cumulative; input tokens come once, at the start.
    fn add_usage(&mut self, usage: &WireUsage) {
        self.saw_usage = true;
        let input = usage.input_tokens.unwrap_or(0)
            + usage.cache_creation_input_tokens.unwrap_or(0)
            + usage.cache_read_input_tokens.unwrap_or(0);
        if input > 0 {
            self.input_tokens = input;
        }
        if let Some(output) = usage.output_tokens {
            self.output_tokens = output;
        }
    }

    fn finish(&mut self) -> CompleteChunk {
        let tool_calls = std::mem::take(&mut self.tools)
            .into_values()
            .map(|mut tool| {
                if tool.call.arguments_json.is_empty() {
                    tool.call.arguments_json = tool.start_input.map_or_else(|| "{}".to_owned(), |v| v.to_string());
                }
                tool.call
            })
            .collect();
        CompleteChunk {
            delta: String::new(),
            finish_reason: self.stop_reason.take().map(|r| finish_reason(&r)).unwrap_or_default(),
            usage: self.saw_usage.then_some(Usage {
                prompt_tokens: self.input_tokens,
                completion_tokens: self.output_tokens,
                total_tokens: self.input_tokens + self.output_tokens,
                ..Usage::default()
            }),
            tool_calls,
            model: self.model_once(),
            ..CompleteChunk::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use meshgate_proto::common::v1::{ChatMessage, SamplingParams};

    use super::*;

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), ..ChatMessage::default() }
    }

    #[test]
    fn openai_conversations_map_to_messages_api_bodies() {
        let request = CompleteRequest {
            model: "claude-test".into(),
            messages: vec![
                message("system", "be terse"),
                message("user", "weather?"),
                message("user", "in Paris"),
                ChatMessage {
                    role: "assistant".into(),
                    content: "checking".into(),
                    tool_calls: vec![ToolCall {
                        id: "toolu_1".into(),
                        r#type: "function".into(),
                        function_name: "get_weather".into(),
                        arguments_json: r#"{"city":"Paris"}"#.into(),
                    }],
                    ..ChatMessage::default()
                },
                ChatMessage {
                    role: "tool".into(),
                    content: "21C".into(),
                    tool_call_id: "toolu_1".into(),
                    ..ChatMessage::default()
                },
                message("developer", "use celsius"),
                message("user", ""),
            ],
            sampling: Some(SamplingParams {
                temperature: Some(0.5),
                top_k: Some(5),
                seed: Some(7),
                stop: vec!["END".into()],
                ..SamplingParams::default()
            }),
            ..CompleteRequest::default()
        };
        let body = request_body(&request, 1024).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "claude-test",
                "max_tokens": 1024,
                "stream": true,
                "system": "be terse\n\nuse celsius",
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "weather?"}, {"type": "text", "text": "in Paris"}]},
                    {"role": "assistant", "content": [
                        {"type": "text", "text": "checking"},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                    ]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21C"}]}
                ],
                "temperature": 0.5,
                "top_k": 5,
                "stop_sequences": ["END"]
            })
        );

        let bad_args = CompleteRequest {
            messages: vec![ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![ToolCall { arguments_json: "[1]".into(), ..ToolCall::default() }],
                ..ChatMessage::default()
            }],
            ..request.clone()
        };
        assert!(matches!(request_body(&bad_args, 1), Err(Error::InvalidRequest(_))));
        let only_system = CompleteRequest { messages: vec![message("system", "x")], ..request };
        assert!(matches!(request_body(&only_system, 1), Err(Error::InvalidRequest(_))));
    }

    fn ev(name: &str, data: Value) -> SseEvent {
        SseEvent { event: Some(name.into()), data: data.to_string() }
    }

    #[test]
    fn events_assemble_text_tools_stop_reason_and_usage() {
        let mut a = Assembler::new("claude", "requested");
        let start = json!({"type": "message_start", "message": {"model": "claude-reported", "usage": {"input_tokens": 10, "cache_read_input_tokens": 2, "output_tokens": 1}}});
        assert_eq!(a.on_event(ev("message_start", start)).unwrap(), None);
        let block = json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}});
        assert_eq!(a.on_event(ev("content_block_start", block)).unwrap(), None);
        assert_eq!(a.on_event(ev("ping", json!({"type": "ping"}))).unwrap(), None);
        let delta = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}});
        let chunk = a.on_event(ev("content_block_delta", delta)).unwrap().unwrap();
        assert_eq!((chunk.delta.as_str(), chunk.model.as_str()), ("Hi", "claude-reported"));
        let tool = json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {}}});
        a.on_event(ev("content_block_start", tool)).unwrap();
        for part in [r#"{"a""#, r#":1}"#] {
            let d = json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": part}});
            assert_eq!(a.on_event(ev("content_block_delta", d)).unwrap(), None);
        }
        let thinking =
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "thinking_delta", "thinking": "hmm"}});
        assert_eq!(a.on_event(ev("content_block_delta", thinking)).unwrap(), None);
        let no_input = json!({"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use", "id": "toolu_10", "name": "g", "input": {"x": true}}});
        a.on_event(ev("content_block_start", no_input)).unwrap();
        let stop =
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}});
        a.on_event(ev("message_delta", stop)).unwrap();
        assert_eq!(a.on_event(ev("future_event", json!({"type": "future_event"}))).unwrap(), None);
        let last = a.on_event(ev("message_stop", json!({"type": "message_stop"}))).unwrap().unwrap();
        assert!(a.done);
        assert_eq!(last.finish_reason, "tool_calls");
        assert_eq!(last.model, "");
        assert_eq!(
            last.usage,
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 7,
                total_tokens: 19,
                cost_micros: 0,
                ..Usage::default()
            })
        );
        let calls: Vec<(&str, &str, &str)> = last
            .tool_calls
            .iter()
            .map(|c| (c.id.as_str(), c.function_name.as_str(), c.arguments_json.as_str()))
            .collect();
        assert_eq!(calls, [("toolu_9", "f", r#"{"a":1}"#), ("toolu_10", "g", r#"{"x":true}"#)]);
    }

    #[test]
    fn garbage_and_error_events_fail_and_stop_reasons_map() {
        let mut a = Assembler::new("claude", "m");
        let err = a.on_event(SseEvent { event: Some("message_start".into()), data: "{nope".into() }).unwrap_err();
        assert!(err.to_string().contains("malformed event"), "{err}");
        let error = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        let err = a.on_event(ev("error", error)).unwrap_err();
        assert!(err.to_string().contains("Overloaded"), "{err}");
        let orphan = json!({"type": "content_block_delta", "index": 4, "delta": {"type": "input_json_delta", "partial_json": "{"}});
        assert!(a.on_event(ev("content_block_delta", orphan)).is_err());
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
        ] {
            assert_eq!(finish_reason(stop), finish);
        }
    }
}
