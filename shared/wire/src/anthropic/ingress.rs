//! What clients of Anthropic's Messages API (Claude Code, the Anthropic SDKs) send the edge
//! (`POST /v1/messages`, `POST /v1/messages/count_tokens`) and what they get back.
//!
//! Request ([`parse_messages`]):
//! - `system` (a string or text blocks) → system messages, one per block; `cache_control` is
//!   accepted and listed as not forwarded (meshgate's provider bodies set no cache breakpoints);
//! - user turns: `text`, `image` (`base64` → a `data:` URI, `url`) and `document` blocks (a
//!   base64 PDF → a file, plain text → text) become the parts of a user message; each
//!   `tool_result` (text or text and images; `is_error` kept) becomes a `tool`
//!   message ahead of it, as Chat Completions requires results right after their calls;
//! - assistant turns: `text`, `tool_use` (→ tool calls) and `thinking` (→ replayed reasoning;
//!   signatures and `redacted_thinking`, which only Anthropic reads, are listed as not forwarded);
//! - `tools` (custom tools with `input_schema`; Anthropic's server and versioned client tools are
//!   refused), `tool_choice` (`auto`/`any`/`tool`/`none`, `disable_parallel_tool_use`),
//!   `thinking` (`enabled` with `budget_tokens` → a reasoning effort, see [`effort_of_budget`];
//!   `adaptive` → `output_config.effort`, else `high`), `output_config.format` / `output_format`
//!   (a JSON schema), `max_tokens` (required), `temperature` (0–1), `top_p`, `top_k`,
//!   `stop_sequences`, `metadata.user_id`, `service_tier`, `stream`; anything else is kept in
//!   `extra_json` as Chat Completions' unknown parameters are.
//!
//! Replies: [`message_json`] (the Message object, `stop_reason` mapped back, usage with
//! `cache_read_input_tokens` / `cache_creation_input_tokens` and `input_tokens` without them, as
//! Anthropic counts), [`MessagesEncoder`] (the event sequence), [`error_json`] (Anthropic's
//! error body) and [`count_tokens_json`].

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use bytes::Bytes;
use meshgate_proto::common::v1 as pb;
use meshgate_proto::common::v1::content_part::Part;
use meshgate_proto::sync::v1::CompleteChunk;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::provider::MIN_THINKING_BUDGET;
use crate::canonical::{Answer, ChatRequest};
use crate::error::WireError;
use crate::json_body::{extra_json, json_text, keep_extra, once, parse_body};
use crate::origin::{MessageOrigin, Origins, Spelling};
use crate::sse::write_json_event;

/// A Messages API request: the canonical request and what it asked that goes nowhere.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagesRequest {
    pub chat: ChatRequest,
    /// What the request carried that no provider will receive, by the client's field names
    /// (`system[].cache_control`, `messages[].content[].signature`, ...), for the trace.
    pub unforwarded: Vec<String>,
}

/// Parses and checks a `POST /v1/messages` body. Errors name the field as the client wrote it
/// (`messages[2].content[0].tool_use_id`, `tools[1].input_schema`).
pub fn parse_messages(body: &[u8]) -> Result<MessagesRequest, WireError> {
    let wire: WireRequest = parse_body(body)?;
    wire.into_request(true)
}

/// Parses and checks a `POST /v1/messages/count_tokens` body: the same request without
/// `max_tokens`.
pub fn parse_count_tokens(body: &[u8]) -> Result<MessagesRequest, WireError> {
    let wire: WireRequest = parse_body(body)?;
    wire.into_request(false)
}

/// The reasoning effort for a thinking budget: the effort whose budget at an Anthropic provider
/// ([`super::provider::thinking_budget`]) is the nearest at or above it, `xhigh` beyond.
pub fn effort_of_budget(budget: i64) -> &'static str {
    match budget {
        ..=1024 => "minimal",
        1025..=2048 => "low",
        2049..=8192 => "medium",
        8193..=16_384 => "high",
        _ => "xhigh",
    }
}

#[derive(Default)]
struct WireRequest {
    model: Option<String>,
    messages: Option<Vec<WireMessage>>,
    system: Option<WireSystem>,
    max_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    stop_sequences: Option<Vec<String>>,
    stream: Option<bool>,
    metadata: Option<WireMetadata>,
    tools: Option<Vec<WireTool>>,
    tool_choice: Option<WireToolChoice>,
    thinking: Option<WireThinking>,
    output_config: Option<WireOutputConfig>,
    output_format: Option<WireFormat>,
    service_tier: Option<String>,
    extra: Vec<(String, Box<RawValue>)>,
}

impl<'de> Deserialize<'de> for WireRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RequestVisitor)
    }
}

struct RequestVisitor;

impl<'de> Visitor<'de> for RequestVisitor {
    type Value = WireRequest;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a messages request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WireRequest, A::Error> {
        let mut r = WireRequest::default();
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let seen = &mut seen;
            match key.as_str() {
                "model" => once(&mut r.model, map.next_value()?, &key, seen)?,
                "messages" => once(&mut r.messages, map.next_value()?, &key, seen)?,
                "system" => once(&mut r.system, map.next_value()?, &key, seen)?,
                "max_tokens" => once(&mut r.max_tokens, map.next_value()?, &key, seen)?,
                "temperature" => once(&mut r.temperature, map.next_value()?, &key, seen)?,
                "top_p" => once(&mut r.top_p, map.next_value()?, &key, seen)?,
                "top_k" => once(&mut r.top_k, map.next_value()?, &key, seen)?,
                "stop_sequences" => once(&mut r.stop_sequences, map.next_value()?, &key, seen)?,
                "stream" => once(&mut r.stream, map.next_value()?, &key, seen)?,
                "metadata" => once(&mut r.metadata, map.next_value()?, &key, seen)?,
                "tools" => once(&mut r.tools, map.next_value()?, &key, seen)?,
                "tool_choice" => once(&mut r.tool_choice, map.next_value()?, &key, seen)?,
                "thinking" => once(&mut r.thinking, map.next_value()?, &key, seen)?,
                "output_config" => once(&mut r.output_config, map.next_value()?, &key, seen)?,
                "output_format" => once(&mut r.output_format, map.next_value()?, &key, seen)?,
                "service_tier" => once(&mut r.service_tier, map.next_value()?, &key, seen)?,
                _ => {
                    let value: Box<RawValue> = map.next_value()?;
                    keep_extra(&mut r.extra, key, value, seen)?;
                }
            }
        }
        Ok(r)
    }
}

/// `system`: a string or text blocks.
enum WireSystem {
    Text(String),
    Blocks(Vec<WireBlock>),
}

/// `content` of a message or of a tool result: a string or blocks.
enum WireContent {
    Text(String),
    Blocks(Vec<WireBlock>),
}

macro_rules! string_or_blocks {
    ($name:ident, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct StringOrBlocks;
                impl<'de> Visitor<'de> for StringOrBlocks {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, value: &str) -> Result<$name, E> {
                        Ok($name::Text(value.to_owned()))
                    }
                    fn visit_string<E: de::Error>(self, value: String) -> Result<$name, E> {
                        Ok($name::Text(value))
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<$name, A::Error> {
                        let mut blocks = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                        while let Some(block) = seq.next_element::<WireBlock>()? {
                            blocks.push(block);
                        }
                        Ok($name::Blocks(blocks))
                    }
                }
                deserializer.deserialize_any(StringOrBlocks)
            }
        }
    };
}

string_or_blocks!(WireSystem, "a string or a list of text blocks");
string_or_blocks!(WireContent, "a string or a list of content blocks");

#[derive(Deserialize)]
struct WireMessage {
    role: String,
    content: WireContent,
}

/// One content block, whatever its type (fields the type does not use are ignored, like
/// citations).
#[derive(Deserialize)]
struct WireBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    source: Option<WireSource>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Box<RawValue>>,
    #[serde(default)]
    tool_use_id: Option<String>,
    #[serde(default)]
    content: Option<WireContent>,
    #[serde(default)]
    is_error: Option<bool>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    cache_control: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct WireSource {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

#[derive(Deserialize)]
struct WireMetadata {
    #[serde(default)]
    user_id: Option<String>,
}

#[derive(Deserialize)]
struct WireTool {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    input_schema: Option<Box<RawValue>>,
    #[serde(default)]
    strict: Option<bool>,
    #[serde(default)]
    cache_control: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct WireToolChoice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Deserialize)]
struct WireThinking {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    budget_tokens: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireOutputConfig {
    #[serde(default)]
    format: Option<WireFormat>,
    #[serde(default)]
    effort: Option<String>,
}

#[derive(Deserialize)]
struct WireFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    schema: Option<Box<RawValue>>,
}

/// Anthropic's client tools with a schema of Anthropic's own (`bash_20250124`, ...) and its
/// server tools (`web_search_20250305`, ...) carry a `type`; custom tools carry none or `custom`.
fn is_custom(kind: Option<&str>) -> bool {
    matches!(kind, None | Some("custom"))
}

fn note(unforwarded: &mut Vec<String>, field: &str) {
    if !unforwarded.iter().any(|u| u == field) {
        unforwarded.push(field.to_owned());
    }
}

impl WireRequest {
    fn into_request(self, max_tokens_required: bool) -> Result<MessagesRequest, WireError> {
        let model = self.model.ok_or_else(|| WireError::invalid("model", "is required"))?;
        let wire_messages = self.messages.ok_or_else(|| WireError::invalid("messages", "is required"))?;
        if max_tokens_required && self.max_tokens.is_none() {
            return Err(WireError::invalid("max_tokens", "is required"));
        }
        let mut unforwarded = Vec::new();
        let mut messages = Vec::with_capacity(wire_messages.len() + 1);
        let mut origins = Origins::default();
        match self.system {
            None => {}
            Some(WireSystem::Text(text)) => {
                messages.push(pb::ChatMessage { role: "system".into(), content: text, ..Default::default() });
                origins.messages.push(MessageOrigin::of("system", ""));
            }
            Some(WireSystem::Blocks(blocks)) => {
                for (index, block) in blocks.into_iter().enumerate() {
                    let field = format!("system[{index}]");
                    if block.kind != "text" {
                        return Err(WireError::invalid(
                            format!("{field}.type"),
                            format!("is {:?}; system blocks are text", block.kind),
                        ));
                    }
                    if block.cache_control.is_some() {
                        note(&mut unforwarded, "system[].cache_control");
                    }
                    let text = block.text.ok_or_else(|| WireError::invalid(format!("{field}.text"), "is required"))?;
                    messages.push(pb::ChatMessage { role: "system".into(), content: text, ..Default::default() });
                    origins.messages.push(MessageOrigin::of(field, ".text"));
                }
            }
        }
        for (index, message) in wire_messages.into_iter().enumerate() {
            convert_message(index, message, &mut messages, &mut origins, &mut unforwarded)?;
        }

        let mut tools = Vec::new();
        for (index, tool) in self.tools.unwrap_or_default().into_iter().enumerate() {
            if !is_custom(tool.kind.as_deref()) {
                return Err(WireError::unsupported(
                    format!("tools[{index}].type"),
                    format!(
                        "is {:?}; meshgate runs no server tools and cannot give Anthropic's own tools to other models: \
                         declare a custom tool with an input_schema",
                        tool.kind.unwrap_or_default()
                    ),
                ));
            }
            if tool.cache_control.is_some() {
                note(&mut unforwarded, "tools[].cache_control");
            }
            let schema = tool
                .input_schema
                .ok_or_else(|| WireError::invalid(format!("tools[{index}].input_schema"), "is required"))?;
            tools.push(pb::ToolDefinition {
                name: tool.name,
                description: tool.description.unwrap_or_default(),
                parameters_json: json_text(Some(schema)),
                strict: tool.strict,
            });
        }
        let (tool_choice, parallel_tool_calls) = match self.tool_choice {
            None => (None, None),
            Some(choice) => convert_tool_choice(choice)?,
        };

        let output_config = self.output_config.unwrap_or(WireOutputConfig { format: None, effort: None });
        let reasoning_effort = match self.thinking {
            None => {
                if output_config.effort.is_some() {
                    // Without thinking, effort shapes how much Claude writes: no other model
                    // takes that.
                    note(&mut unforwarded, "output_config.effort");
                }
                String::new()
            }
            Some(thinking) => match thinking.kind.as_str() {
                "enabled" => {
                    let budget = thinking
                        .budget_tokens
                        .ok_or_else(|| WireError::invalid("thinking.budget_tokens", "is required"))?;
                    if budget < MIN_THINKING_BUDGET {
                        return Err(WireError::invalid(
                            "thinking.budget_tokens",
                            format!("must be at least {MIN_THINKING_BUDGET}"),
                        ));
                    }
                    if self.max_tokens.is_some_and(|max| budget >= max) {
                        return Err(WireError::invalid("thinking.budget_tokens", "must be less than max_tokens"));
                    }
                    effort_of_budget(budget).to_owned()
                }
                "adaptive" => match output_config.effort.as_deref() {
                    None => "high".to_owned(),
                    Some("max") => "xhigh".to_owned(),
                    Some(effort @ ("low" | "medium" | "high" | "xhigh")) => effort.to_owned(),
                    Some(other) => {
                        return Err(WireError::invalid(
                            "output_config.effort",
                            format!("is {other:?}; expected low, medium, high, xhigh or max"),
                        ));
                    }
                },
                "disabled" => String::new(),
                other => {
                    return Err(WireError::invalid(
                        "thinking.type",
                        format!("is {other:?}; expected enabled, adaptive or disabled"),
                    ));
                }
            },
        };
        let format = match (output_config.format, self.output_format) {
            (Some(_), Some(_)) => {
                return Err(WireError::invalid("output_format", "repeats output_config.format: give one of them"));
            }
            (Some(format), None) => Some(("output_config.format", format)),
            (None, Some(format)) => Some(("output_format", format)),
            (None, None) => None,
        };
        let response_format = match format {
            None => None,
            Some((field, format)) => {
                if format.kind != "json_schema" {
                    return Err(WireError::invalid(
                        format!("{field}.type"),
                        format!("is {:?}; expected json_schema", format.kind),
                    ));
                }
                let schema =
                    format.schema.ok_or_else(|| WireError::invalid(format!("{field}.schema"), "is required"))?;
                Some(pb::ResponseFormat {
                    kind: pb::response_format::Kind::JsonSchema as i32,
                    name: "response".into(),
                    description: String::new(),
                    schema_json: json_text(Some(schema)),
                    strict: Some(true),
                })
            }
        };
        if let Some(temperature) = self.temperature
            && !(0.0..=1.0).contains(&temperature)
        {
            return Err(WireError::invalid("temperature", "must be between 0 and 1"));
        }
        let top_k = match self.top_k {
            Some(k) if !(0..=i64::from(i32::MAX)).contains(&k) => {
                return Err(WireError::invalid("top_k", "must be a non-negative integer"));
            }
            k => k.map(|k| k as i32),
        };

        let options = pb::ChatOptions {
            tools,
            tool_choice,
            parallel_tool_calls,
            response_format,
            reasoning_effort,
            user: self.metadata.and_then(|m| m.user_id).unwrap_or_default(),
            service_tier: self.service_tier.unwrap_or_default(),
            extra_json: extra_json(&self.extra),
            ..Default::default()
        };
        let sampling = pb::SamplingParams {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k,
            seed: None,
            stop: self.stop_sequences.unwrap_or_default(),
        };
        let mut chat = ChatRequest {
            model,
            messages,
            sampling,
            options,
            stream: self.stream.unwrap_or(false),
            include_usage: true,
        };
        chat.check_conversation(true, false).map_err(|err| origins.relocate(err, &AnthropicSpelling))?;
        Ok(MessagesRequest { chat, unforwarded })
    }
}

fn convert_tool_choice(choice: WireToolChoice) -> Result<(Option<pb::ToolChoice>, Option<bool>), WireError> {
    use pb::tool_choice::Mode;
    let (mode, name) = match choice.kind.as_str() {
        "auto" => (Mode::Auto, String::new()),
        "any" => (Mode::Required, String::new()),
        "none" => (Mode::None, String::new()),
        "tool" => (Mode::Function, choice.name.ok_or_else(|| WireError::invalid("tool_choice.name", "is required"))?),
        other => {
            return Err(WireError::invalid(
                "tool_choice.type",
                format!("is {other:?}; expected auto, any, tool or none"),
            ));
        }
    };
    let parallel = choice.disable_parallel_tool_use.map(|disabled| !disabled);
    Ok((Some(pb::ToolChoice { mode: mode as i32, function_name: name }), parallel))
}

/// A user or assistant turn as canonical messages.
fn convert_message(
    index: usize,
    message: WireMessage,
    messages: &mut Vec<pb::ChatMessage>,
    origins: &mut Origins,
    unforwarded: &mut Vec<String>,
) -> Result<(), WireError> {
    let item = format!("messages[{index}]");
    if !matches!(message.role.as_str(), "user" | "assistant") {
        return Err(WireError::invalid(
            format!("{item}.role"),
            format!("is {:?}; expected user or assistant", message.role),
        ));
    }
    let blocks = match message.content {
        WireContent::Text(text) => {
            messages.push(pb::ChatMessage { role: message.role, content: text, ..Default::default() });
            origins.messages.push(MessageOrigin::of(item, ".content"));
            return Ok(());
        }
        WireContent::Blocks(blocks) => blocks,
    };
    let assistant = message.role == "assistant";
    let mut out = pb::ChatMessage { role: message.role, ..Default::default() };
    let mut origin = MessageOrigin::of(item.clone(), ".content");
    let mut parts = Vec::with_capacity(blocks.len());
    for (block_index, block) in blocks.into_iter().enumerate() {
        let path = format!("{item}.content[{block_index}]");
        if block.cache_control.is_some() {
            note(unforwarded, "messages[].content[].cache_control");
        }
        match (assistant, block.kind.as_str()) {
            (_, "text") => {
                let text = block.text.ok_or_else(|| WireError::invalid(format!("{path}.text"), "is required"))?;
                crate::text::check_text(|| format!("{path}.text"), &text)?;
                parts.push((path, Part::Text(text)));
            }
            (false, "image" | "document") => {
                let part = media_part(&path, &block)?;
                parts.push((path, part));
            }
            (false, "tool_result") => {
                let tool_use_id = block
                    .tool_use_id
                    .ok_or_else(|| WireError::invalid(format!("{path}.tool_use_id"), "is required"))?;
                let mut result = pb::ChatMessage {
                    role: "tool".into(),
                    tool_call_id: tool_use_id,
                    is_error: block.is_error == Some(true),
                    ..Default::default()
                };
                let mut result_origin = MessageOrigin::of(path.clone(), ".content");
                match block.content {
                    None => {}
                    Some(WireContent::Text(text)) => result.content = text,
                    Some(WireContent::Blocks(inner)) => {
                        let mut inner_parts = Vec::with_capacity(inner.len());
                        for (inner_index, inner_block) in inner.into_iter().enumerate() {
                            let inner_path = format!("{path}.content[{inner_index}]");
                            if inner_block.cache_control.is_some() {
                                note(unforwarded, "messages[].content[].cache_control");
                            }
                            let part =
                                match inner_block.kind.as_str() {
                                    "text" => Part::Text(inner_block.text.ok_or_else(|| {
                                        WireError::invalid(format!("{inner_path}.text"), "is required")
                                    })?),
                                    "image" | "document" => media_part(&inner_path, &inner_block)?,
                                    other => {
                                        return Err(WireError::unsupported(
                                            format!("{inner_path}.type"),
                                            format!("is {other:?}; a tool result holds text, images and documents"),
                                        ));
                                    }
                                };
                            inner_parts.push((inner_path, part));
                        }
                        set_parts(&mut result, &mut result_origin, inner_parts);
                    }
                }
                messages.push(result);
                origins.messages.push(result_origin);
            }
            (true, "tool_use") => {
                let field = |name: &str| format!("{path}.{name}");
                let input = block.input.ok_or_else(|| WireError::invalid(field("input"), "is required"))?;
                out.tool_calls.push(pb::ToolCall {
                    id: block.id.ok_or_else(|| WireError::invalid(field("id"), "is required"))?,
                    r#type: "function".into(),
                    function_name: block.name.ok_or_else(|| WireError::invalid(field("name"), "is required"))?,
                    arguments_json: String::from(input.get()),
                });
                origin.calls.push(path);
            }
            (true, "thinking") => {
                if !out.reasoning_content.is_empty() {
                    out.reasoning_content.push_str("\n\n");
                }
                out.reasoning_content.push_str(block.thinking.as_deref().unwrap_or_default());
                if block.signature.is_some_and(|s| !s.is_empty()) {
                    note(unforwarded, "messages[].content[].signature");
                }
            }
            (true, "redacted_thinking") => note(unforwarded, "messages[].content[].redacted_thinking"),
            (_, other) => {
                let role = if assistant { "an assistant" } else { "a user" };
                let expected = if assistant {
                    "text, tool_use, thinking or redacted_thinking"
                } else {
                    "text, image, document or tool_result"
                };
                return Err(WireError::unsupported(
                    format!("{path}.type"),
                    format!("is {other:?}, which {role} turn does not take here; expected {expected}"),
                ));
            }
        }
    }
    set_parts(&mut out, &mut origin, parts);
    let carries = !out.content.is_empty()
        || !out.parts.is_empty()
        || !out.tool_calls.is_empty()
        || !out.reasoning_content.is_empty();
    // A user turn of tool results only has nothing left for a user message.
    if carries || assistant {
        messages.push(out);
        origins.messages.push(origin);
    }
    Ok(())
}

/// One text part becomes the message's content; several, or any other part, stay parts.
fn set_parts(message: &mut pb::ChatMessage, origin: &mut MessageOrigin, parts: Vec<(String, Part)>) {
    if let [(path, Part::Text(_))] = parts.as_slice() {
        origin.content = format!("{path}.text");
        if let Some((_, Part::Text(text))) = parts.into_iter().next() {
            message.content = text;
        }
        return;
    }
    for (path, part) in parts {
        origin.parts.push(path);
        message.parts.push(pb::ContentPart { part: Some(part) });
    }
}

/// An `image` or `document` block as a part.
fn media_part(path: &str, block: &WireBlock) -> Result<Part, WireError> {
    let field = |name: &str| format!("{path}.{name}");
    let source = block.source.as_ref().ok_or_else(|| WireError::invalid(field("source"), "is required"))?;
    let required = |value: &Option<String>, name: &str| {
        value.clone().ok_or_else(|| WireError::invalid(field(&format!("source.{name}")), "is required"))
    };
    match (block.kind.as_str(), source.kind.as_str()) {
        ("image", "base64") => {
            let media_type = required(&source.media_type, "media_type")?;
            let data = required(&source.data, "data")?;
            Ok(Part::ImageUrl(pb::ImageUrl { url: format!("data:{media_type};base64,{data}"), detail: String::new() }))
        }
        ("image", "url") => {
            Ok(Part::ImageUrl(pb::ImageUrl { url: required(&source.url, "url")?, detail: String::new() }))
        }
        ("document", "base64") => {
            let media_type = required(&source.media_type, "media_type")?;
            let data = required(&source.data, "data")?;
            Ok(Part::File(pb::FileInput {
                file_id: String::new(),
                filename: block.title.clone().unwrap_or_default(),
                file_data: format!("data:{media_type};base64,{data}"),
            }))
        }
        ("document", "text") => Ok(Part::Text(required(&source.data, "data")?)),
        (_, other) => Err(WireError::unsupported(
            field("source.type"),
            format!(
                "is {other:?}; meshgate takes images as base64 or url sources and documents as base64 or text sources"
            ),
        )),
    }
}

/// How the Messages API spells what the canonical checks name.
struct AnthropicSpelling;

impl Spelling for AnthropicSpelling {
    fn message_field(&self, field: &str) -> String {
        match field {
            ".tool_call_id" => ".tool_use_id".into(),
            ".reasoning_content" => ".content".into(),
            other => other.into(),
        }
    }

    fn part_field(&self, field: &str) -> String {
        if field.starts_with(".image_url") || field.starts_with(".file") {
            return ".source".into();
        }
        field.into()
    }

    fn call_field(&self, field: &str) -> String {
        match field {
            ".function.name" => ".name".into(),
            ".function.arguments" => ".input".into(),
            other => other.into(),
        }
    }

    fn option_field(&self, field: &str) -> String {
        if let Some(rest) = field.strip_prefix("tools[")
            && let Some((index, sub)) = rest.split_once(']')
        {
            let sub = match sub {
                ".function.parameters" => ".input_schema",
                other => other.strip_prefix(".function").unwrap_or(other),
            };
            return format!("tools[{index}]{sub}");
        }
        if let Some(rest) = field.strip_prefix("stop") {
            return format!("stop_sequences{rest}");
        }
        if field.starts_with("response_format") {
            return "output_config.format".into();
        }
        match field {
            "tool_choice.function.name" => "tool_choice.name".into(),
            "user" => "metadata.user_id".into(),
            "reasoning_effort" => "thinking".into(),
            other => other.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replies

/// What a reply says about itself beyond the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    /// `msg_…`.
    pub id: String,
    /// The model to report when the answer names none (the served model wins).
    pub model: String,
    /// The prompt's tokens as estimated before the call, for `message_start` (clients size
    /// their context by it); `message_delta` carries the provider's count.
    pub estimated_input_tokens: i64,
}

/// Anthropic's stop reason for a finish reason.
pub fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

#[derive(Serialize)]
struct UsageJson {
    input_tokens: i64,
    output_tokens: i64,
    cache_creation_input_tokens: i64,
    cache_read_input_tokens: i64,
}

impl From<&pb::Usage> for UsageJson {
    fn from(usage: &pb::Usage) -> Self {
        // Anthropic's input tokens exclude the cache's; the canonical prompt counts them.
        let uncached =
            usage.prompt_tokens.saturating_sub(usage.cached_prompt_tokens).saturating_sub(usage.cache_write_tokens);
        Self {
            input_tokens: uncached.max(0),
            output_tokens: usage.completion_tokens,
            cache_creation_input_tokens: usage.cache_write_tokens,
            cache_read_input_tokens: usage.cached_prompt_tokens,
        }
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockJson<'a> {
    Thinking { thinking: &'a str, signature: &'static str },
    Text { text: &'a str },
    ToolUse { id: &'a str, name: &'a str, input: Box<RawValue> },
}

#[derive(Serialize)]
struct MessageJson<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<BlockJson<'a>>,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'a str>,
    usage: UsageJson,
}

/// A tool call's arguments as the `input` object Anthropic clients expect: empty arguments are
/// `{}`; arguments that are not a JSON object (a model's malformed output) are kept as text under
/// `arguments`, so the client sees them rather than an empty call.
fn tool_input(arguments: &str) -> Box<RawValue> {
    let trimmed = arguments.trim();
    if trimmed.is_empty() {
        return RawValue::from_string("{}".into()).expect("valid JSON");
    }
    match serde_json::from_str::<Box<RawValue>>(trimmed) {
        Ok(raw) if raw.get().starts_with('{') => raw,
        _ => serde_json::value::to_raw_value(&serde_json::json!({ "arguments": arguments })).expect("valid JSON"),
    }
}

/// The Message object of a whole answer: thinking, text (a refusal as text), then tool uses.
pub fn message_json(meta: &MessageMeta, answer: &Answer) -> Vec<u8> {
    let mut content = Vec::new();
    if !answer.reasoning.is_empty() {
        content.push(BlockJson::Thinking { thinking: &answer.reasoning, signature: "" });
    }
    if !answer.content.is_empty() {
        content.push(BlockJson::Text { text: &answer.content });
    }
    if !answer.refusal.is_empty() {
        content.push(BlockJson::Text { text: &answer.refusal });
    }
    for call in &answer.tool_calls {
        content.push(BlockJson::ToolUse {
            id: &call.id,
            name: &call.function_name,
            input: tool_input(&call.arguments_json),
        });
    }
    let message = MessageJson {
        id: &meta.id,
        kind: "message",
        role: "assistant",
        model: if answer.model.is_empty() { &meta.model } else { &answer.model },
        content,
        stop_reason: Some(stop_reason(answer.finish_reason_or_default())),
        stop_sequence: None,
        usage: UsageJson::from(&answer.usage.unwrap_or_default()),
    };
    serde_json::to_vec(&message).expect("a message serializes")
}

/// Anthropic's error type for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

/// Anthropic's error body (`{"type": "error", "error": {"type", "message"}}`) for an error
/// answered with HTTP `status`.
pub fn error_json(status: u16, message: &str) -> Vec<u8> {
    let error = ErrorJson { kind: "error", error: ErrorBody { kind: error_type(status), message } };
    serde_json::to_vec(&error).expect("an error serializes")
}

/// The answer to `POST /v1/messages/count_tokens`.
pub fn count_tokens_json(input_tokens: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "input_tokens": input_tokens })).expect("a JSON value serializes")
}

/// The block open in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text(u32),
    Thinking(u32),
    Tool(u32),
}

impl Block {
    fn index(self) -> u32 {
        match self {
            Self::Text(index) | Self::Thinking(index) | Self::Tool(index) => index,
        }
    }
}

#[derive(Serialize)]
struct Event<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize)]
struct StartBody<'a> {
    message: StartMessage<'a>,
}

#[derive(Serialize)]
struct StartMessage<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    content: [(); 0],
    model: &'a str,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'static str>,
    usage: UsageJson,
}

#[derive(Serialize)]
struct BlockStartBody<'a> {
    index: u32,
    content_block: StartBlock<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StartBlock<'a> {
    Text { text: &'static str },
    Thinking { thinking: &'static str, signature: &'static str },
    ToolUse { id: &'a str, name: &'a str, input: Empty },
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct BlockDeltaBody<'a> {
    index: u32,
    delta: Delta<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum Delta<'a> {
    #[serde(rename = "text_delta")]
    Text { text: &'a str },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: &'a str },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: &'a str },
}

#[derive(Serialize)]
struct IndexBody {
    index: u32,
}

#[derive(Serialize)]
struct MessageDeltaBody {
    delta: StopDelta,
    usage: UsageJson,
}

#[derive(Serialize)]
struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: Option<&'static str>,
}

#[derive(Serialize)]
struct NoBody {}

/// Writes a streamed answer as the Messages API's events (`event:` and `data:` lines):
/// `message_start` (with the serving model and the prompt's estimated tokens: the provider's count
/// comes at the end) and a `ping`; one block at a time — `thinking` with `thinking_delta`s,
/// `text` with `text_delta`s (a refusal as text), `tool_use` with `input_json_delta`s — each
/// started with `content_block_start` and closed with `content_block_stop` when the next one
/// starts; [`MessagesEncoder::finish`] closes the last, then `message_delta` (the stop reason, the
/// usage) and `message_stop`; [`MessagesEncoder::fail`] sends an `error` event. A provider that
/// came back to a tool call after starting another gets the late pieces on the call's own block
/// index, where the SDKs accumulate them.
#[derive(Debug)]
pub struct MessagesEncoder {
    meta: MessageMeta,
    started: bool,
    finished: bool,
    next_block: u32,
    open: Option<Block>,
    /// Canonical tool-call index → its block.
    calls: BTreeMap<i32, u32>,
    answer: Answer,
}

impl MessagesEncoder {
    pub fn new(meta: MessageMeta) -> Self {
        Self {
            meta,
            started: false,
            finished: false,
            next_block: 0,
            open: None,
            calls: BTreeMap::new(),
            answer: Answer::default(),
        }
    }

    /// The answer folded from the chunks so far (to trace and charge it).
    pub fn answer(&self) -> &Answer {
        &self.answer
    }

    /// A `ping` event, to keep a quiet stream open.
    pub fn ping(&self) -> Bytes {
        let mut out = Vec::new();
        write_json_event(&mut out, Some("ping"), &Event { kind: "ping", body: NoBody {} });
        Bytes::from(out)
    }

    fn emit<T: Serialize>(out: &mut Vec<u8>, kind: &str, body: T) {
        write_json_event(out, Some(kind), &Event { kind, body });
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let message = StartMessage {
            id: &self.meta.id,
            kind: "message",
            role: "assistant",
            content: [],
            model: &self.meta.model,
            stop_reason: None,
            stop_sequence: None,
            usage: UsageJson::from(&pb::Usage {
                prompt_tokens: self.meta.estimated_input_tokens,
                ..pb::Usage::default()
            }),
        };
        Self::emit(out, "message_start", StartBody { message });
        Self::emit(out, "ping", NoBody {});
    }

    fn open_block(&mut self, out: &mut Vec<u8>, block: StartBlock<'_>) -> u32 {
        self.close_block(out);
        let index = self.next_block;
        self.next_block += 1;
        self.open = Some(match block {
            StartBlock::Text { .. } => Block::Text(index),
            StartBlock::Thinking { .. } => Block::Thinking(index),
            StartBlock::ToolUse { .. } => Block::Tool(index),
        });
        Self::emit(out, "content_block_start", BlockStartBody { index, content_block: block });
        index
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if let Some(open) = self.open.take() {
            Self::emit(out, "content_block_stop", IndexBody { index: open.index() });
        }
    }

    /// The events for one chunk of the answer (possibly none).
    pub fn encode(&mut self, chunk: &CompleteChunk) -> Bytes {
        if self.finished {
            return Bytes::new();
        }
        if !self.started && !chunk.model.is_empty() {
            self.meta.model.clone_from(&chunk.model);
        }
        self.answer.push(chunk);
        let mut out = Vec::new();
        self.start(&mut out);
        if !chunk.reasoning_delta.is_empty() {
            let index = match self.open {
                Some(Block::Thinking(index)) => index,
                _ => self.open_block(&mut out, StartBlock::Thinking { thinking: "", signature: "" }),
            };
            Self::emit(
                &mut out,
                "content_block_delta",
                BlockDeltaBody { index, delta: Delta::Thinking { thinking: &chunk.reasoning_delta } },
            );
        }
        for text in [&chunk.delta, &chunk.refusal_delta] {
            if text.is_empty() {
                continue;
            }
            let index = match self.open {
                Some(Block::Text(index)) => index,
                _ => self.open_block(&mut out, StartBlock::Text { text: "" }),
            };
            Self::emit(&mut out, "content_block_delta", BlockDeltaBody { index, delta: Delta::Text { text } });
        }
        for piece in &chunk.tool_call_deltas {
            self.call_piece(&mut out, piece.index, &piece.id, &piece.function_name, &piece.arguments_delta);
        }
        // Calls that arrived whole on the last chunk go out whole.
        for (index, call) in chunk.tool_calls.iter().enumerate() {
            let index = index as i32;
            if !self.calls.contains_key(&index) {
                self.call_piece(&mut out, index, &call.id, &call.function_name, &call.arguments_json);
            }
        }
        Bytes::from(out)
    }

    fn call_piece(&mut self, out: &mut Vec<u8>, call: i32, id: &str, name: &str, arguments: &str) {
        let index = match self.calls.get(&call) {
            Some(index) => *index,
            None => {
                let index = self.open_block(out, StartBlock::ToolUse { id, name, input: Empty {} });
                self.calls.insert(call, index);
                index
            }
        };
        if !arguments.is_empty() {
            Self::emit(
                out,
                "content_block_delta",
                BlockDeltaBody { index, delta: Delta::InputJson { partial_json: arguments } },
            );
        }
    }

    /// Ends the stream: the open block closed, `message_delta` with the stop reason and the
    /// usage, `message_stop`.
    pub fn finish(&mut self) -> Bytes {
        if self.finished {
            return Bytes::new();
        }
        let mut out = Vec::new();
        self.start(&mut out);
        self.finished = true;
        self.close_block(&mut out);
        let delta = StopDelta { stop_reason: stop_reason(self.answer.finish_reason_or_default()), stop_sequence: None };
        let usage = UsageJson::from(&self.answer.usage.unwrap_or_default());
        Self::emit(&mut out, "message_delta", MessageDeltaBody { delta, usage });
        Self::emit(&mut out, "message_stop", NoBody {});
        Bytes::from(out)
    }

    /// Ends the stream with an `error` event, as Anthropic reports a failure after the stream
    /// began (`status`: the HTTP status the error would have had).
    pub fn fail(&mut self, status: u16, message: &str) -> Bytes {
        if self.finished {
            return Bytes::new();
        }
        self.finished = true;
        let mut out = Vec::new();
        let error = ErrorBody { kind: error_type(status), message };
        Self::emit(&mut out, "error", ErrorWrapper { error });
        Bytes::from(out)
    }
}

#[derive(Serialize)]
struct ErrorWrapper<'a> {
    error: ErrorBody<'a>,
}

#[cfg(test)]
mod tests;
