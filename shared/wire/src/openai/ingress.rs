//! What clients send the edge (`POST /v1/chat/completions`, OpenAI's Chat Completions format)
//! and what they get back: [`parse_chat`] turns the body into the canonical [`ChatRequest`],
//! checking every field and naming the offending one; [`completion_json`] and [`ChunkEncoder`]
//! write the answer as one `chat.completion` object or as `chat.completion.chunk` events.
//!
//! Parameters meshgate does not model (`modalities`, `prediction`, `store`, `verbosity`, a
//! provider's own knobs, ...) are kept, in order and byte for byte, in `options.extra_json`.
//! Limits that depend on the project (message count, `max_tokens` cap, body size) are the
//! gateway's.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use bytes::Bytes;
use meshgate_proto::common::v1 as pb;
use meshgate_proto::common::v1::content_part::Part;
use meshgate_proto::sync::v1::CompleteChunk;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::canonical::{Answer, ChatRequest};
use crate::error::WireError;
use crate::json_body::{extra_json, json_text, keep_extra, narrow, once, parse_body};
use crate::sse;

/// Parses and checks a Chat Completions request body (see [`ChatRequest::check`]).
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, WireError> {
    let wire: WireRequest = parse_body(body)?;
    wire.into_canonical()
}

/// The request as sent. Every field is optional here so that a missing one is reported by name.
#[derive(Default)]
struct WireRequest {
    model: Option<String>,
    messages: Option<Vec<WireMessage>>,
    stream: Option<bool>,
    stream_options: Option<WireStreamOptions>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<i64>,
    tools: Option<Vec<WireTool>>,
    tool_choice: Option<WireToolChoice>,
    parallel_tool_calls: Option<bool>,
    response_format: Option<WireResponseFormat>,
    reasoning_effort: Option<String>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    logit_bias: Option<BTreeMap<String, f32>>,
    user: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
    service_tier: Option<String>,
    /// Everything else at the top level, in order.
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
        f.write_str("a chat completion request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WireRequest, A::Error> {
        let mut r = WireRequest::default();
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let seen = &mut seen;
            match key.as_str() {
                "model" => once(&mut r.model, map.next_value()?, &key, seen)?,
                "messages" => once(&mut r.messages, map.next_value()?, &key, seen)?,
                "stream" => once(&mut r.stream, map.next_value()?, &key, seen)?,
                "stream_options" => once(&mut r.stream_options, map.next_value()?, &key, seen)?,
                "max_tokens" => once(&mut r.max_tokens, map.next_value()?, &key, seen)?,
                "max_completion_tokens" => once(&mut r.max_completion_tokens, map.next_value()?, &key, seen)?,
                "temperature" => once(&mut r.temperature, map.next_value()?, &key, seen)?,
                "top_p" => once(&mut r.top_p, map.next_value()?, &key, seen)?,
                "seed" => once(&mut r.seed, map.next_value()?, &key, seen)?,
                "stop" => once(&mut r.stop, map.next_value()?, &key, seen)?,
                "n" => once(&mut r.n, map.next_value()?, &key, seen)?,
                "tools" => once(&mut r.tools, map.next_value()?, &key, seen)?,
                "tool_choice" => once(&mut r.tool_choice, map.next_value()?, &key, seen)?,
                "parallel_tool_calls" => once(&mut r.parallel_tool_calls, map.next_value()?, &key, seen)?,
                "response_format" => once(&mut r.response_format, map.next_value()?, &key, seen)?,
                "reasoning_effort" => once(&mut r.reasoning_effort, map.next_value()?, &key, seen)?,
                "logprobs" => once(&mut r.logprobs, map.next_value()?, &key, seen)?,
                "top_logprobs" => once(&mut r.top_logprobs, map.next_value()?, &key, seen)?,
                "frequency_penalty" => once(&mut r.frequency_penalty, map.next_value()?, &key, seen)?,
                "presence_penalty" => once(&mut r.presence_penalty, map.next_value()?, &key, seen)?,
                "logit_bias" => once(&mut r.logit_bias, map.next_value()?, &key, seen)?,
                "user" => once(&mut r.user, map.next_value()?, &key, seen)?,
                "metadata" => once(&mut r.metadata, map.next_value()?, &key, seen)?,
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

#[derive(Deserialize)]
struct WireStreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// `stop`: one string or a list.
pub(crate) struct Stop(pub(crate) Vec<String>);

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StopVisitor;
        impl<'de> Visitor<'de> for StopVisitor {
            type Value = Stop;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Stop, E> {
                Ok(Stop(vec![value.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Stop, A::Error> {
                let mut list = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    list.push(item);
                }
                Ok(Stop(list))
            }
        }
        deserializer.deserialize_any(StopVisitor)
    }
}

#[derive(Deserialize)]
struct WireMessage {
    role: String,
    #[serde(default)]
    content: Option<WireContent>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default)]
    refusal: Option<String>,
    /// Reasoning replayed by clients of providers that return it (DeepSeek, vLLM).
    #[serde(default)]
    reasoning_content: Option<String>,
}

/// Message content: a string or a list of typed parts.
enum WireContent {
    Text(String),
    Parts(Vec<WirePart>),
}

impl<'de> Deserialize<'de> for WireContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor;
        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = WireContent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<WireContent, E> {
                Ok(WireContent::Text(value.to_owned()))
            }
            fn visit_string<E: de::Error>(self, value: String) -> Result<WireContent, E> {
                Ok(WireContent::Text(value))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<WireContent, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(part) = seq.next_element::<WirePart>()? {
                    parts.push(part);
                }
                Ok(WireContent::Parts(parts))
            }
        }
        deserializer.deserialize_any(ContentVisitor)
    }
}

#[derive(Deserialize)]
struct WirePart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    image_url: Option<WireImageUrl>,
    #[serde(default)]
    input_audio: Option<WireAudio>,
    #[serde(default)]
    file: Option<WireFile>,
}

#[derive(Deserialize)]
struct WireImageUrl {
    url: String,
    #[serde(default)]
    detail: Option<String>,
}

#[derive(Deserialize)]
struct WireAudio {
    data: String,
    format: String,
}

#[derive(Deserialize)]
struct WireFile {
    #[serde(default)]
    file_id: Option<String>,
    #[serde(default)]
    filename: Option<String>,
    #[serde(default)]
    file_data: Option<String>,
}

#[derive(Deserialize)]
struct WireToolCall {
    id: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    function: WireFunctionCall,
}

#[derive(Deserialize)]
struct WireFunctionCall {
    name: String,
    arguments: String,
}

#[derive(Deserialize)]
struct WireTool {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    function: Option<WireFunction>,
}

#[derive(Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Box<RawValue>>,
    #[serde(default)]
    strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"` or `{"type": "function", "function": {"name"}}`.
enum WireToolChoice {
    Mode(String),
    Named(WireNamedTool),
}

#[derive(Deserialize)]
struct WireNamedTool {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    function: Option<WireToolName>,
}

#[derive(Deserialize)]
struct WireToolName {
    name: String,
}

impl<'de> Deserialize<'de> for WireToolChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ChoiceVisitor;
        impl<'de> Visitor<'de> for ChoiceVisitor {
            type Value = WireToolChoice;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""none", "auto", "required" or {"type": "function", "function": {"name": ...}}"#)
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<WireToolChoice, E> {
                Ok(WireToolChoice::Mode(value.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<WireToolChoice, A::Error> {
                WireNamedTool::deserialize(de::value::MapAccessDeserializer::new(map)).map(WireToolChoice::Named)
            }
        }
        deserializer.deserialize_any(ChoiceVisitor)
    }
}

#[derive(Deserialize)]
struct WireResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    json_schema: Option<WireJsonSchema>,
}

#[derive(Deserialize)]
struct WireJsonSchema {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    schema: Option<Box<RawValue>>,
    #[serde(default)]
    strict: Option<bool>,
}

impl WireRequest {
    /// The canonical request: the shapes converted here, every value checked by
    /// [`ChatRequest::check`].
    fn into_canonical(self) -> Result<ChatRequest, WireError> {
        let model = self.model.ok_or_else(|| WireError::invalid("model", "is required"))?;
        let wire_messages = self.messages.ok_or_else(|| WireError::invalid("messages", "is required"))?;
        let messages =
            wire_messages.into_iter().enumerate().map(|(i, m)| convert_message(i, m)).collect::<Result<Vec<_>, _>>()?;
        // The newer name wins; the older one is checked all the same.
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(newer), _) if newer < 1 => {
                return Err(WireError::invalid("max_completion_tokens", "must be at least 1"));
            }
            (newer, older) => newer.or(older),
        };
        let sampling = pb::SamplingParams {
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: None,
            seed: self.seed,
            stop: self.stop.map(|s| s.0).unwrap_or_default(),
        };
        let tools =
            self.tools.unwrap_or_default().into_iter().enumerate().map(convert_tool).collect::<Result<_, _>>()?;
        let options = pb::ChatOptions {
            tools,
            tool_choice: self.tool_choice.map(convert_tool_choice).transpose()?,
            parallel_tool_calls: self.parallel_tool_calls,
            response_format: self.response_format.map(convert_response_format).transpose()?,
            reasoning_effort: self.reasoning_effort.unwrap_or_default(),
            n: self.n.map(narrow),
            logprobs: self.logprobs,
            top_logprobs: self.top_logprobs.map(narrow),
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: self.logit_bias.unwrap_or_default().into_iter().collect(),
            user: self.user.unwrap_or_default(),
            metadata: self.metadata.unwrap_or_default().into_iter().collect(),
            service_tier: self.service_tier.unwrap_or_default(),
            extra_json: extra_json(&self.extra),
        };
        let mut chat = ChatRequest {
            model,
            messages,
            sampling,
            options,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        };
        chat.check_with(true)?;
        Ok(chat)
    }
}

fn convert_message(index: usize, message: WireMessage) -> Result<pb::ChatMessage, WireError> {
    let field = |name: &str| format!("messages[{index}].{name}");
    let mut out = pb::ChatMessage {
        role: message.role,
        name: message.name.unwrap_or_default(),
        tool_call_id: message.tool_call_id.unwrap_or_default(),
        refusal: message.refusal.unwrap_or_default(),
        reasoning_content: message.reasoning_content.unwrap_or_default(),
        ..pb::ChatMessage::default()
    };
    match message.content {
        None if out.role == "assistant" => {}
        None => return Err(WireError::invalid(field("content"), format!("is required in a {} message", out.role))),
        Some(WireContent::Text(text)) => out.content = text,
        Some(WireContent::Parts(parts)) => convert_parts(index, parts, &mut out)?,
    }
    for (call_index, call) in message.tool_calls.unwrap_or_default().into_iter().enumerate() {
        let kind = call.kind.unwrap_or_else(|| "function".into());
        if kind != "function" {
            return Err(WireError::invalid(
                field(&format!("tool_calls[{call_index}].type")),
                format!("is {kind:?}; only function calls are supported"),
            ));
        }
        out.tool_calls.push(pb::ToolCall {
            id: call.id,
            r#type: kind,
            function_name: call.function.name,
            arguments_json: call.function.arguments,
        });
    }
    Ok(out)
}

/// Text-only content (refusal parts aside) becomes the message's `content`; anything else keeps
/// every part, in order, in `parts`.
fn convert_parts(index: usize, parts: Vec<WirePart>, out: &mut pb::ChatMessage) -> Result<(), WireError> {
    let mut converted = Vec::with_capacity(parts.len());
    let mut text_only = true;
    for (part_index, part) in parts.into_iter().enumerate() {
        let field = |name: &str| format!("messages[{index}].content[{part_index}].{name}");
        let missing = |name: &str| WireError::invalid(field(name), format!("is required in a {} part", part.kind));
        let converted_part = match part.kind.as_str() {
            "text" => {
                let text = part.text.ok_or_else(|| missing("text"))?;
                // Checked here: text-only content is joined, and the part's place lost.
                crate::text::check_text(|| field("text"), &text)?;
                Part::Text(text)
            }
            "refusal" if out.role == "assistant" => {
                out.refusal.push_str(&part.refusal.ok_or_else(|| missing("refusal"))?);
                continue;
            }
            "image_url" => {
                let image = part.image_url.ok_or_else(|| missing("image_url"))?;
                Part::ImageUrl(pb::ImageUrl { url: image.url, detail: image.detail.unwrap_or_default() })
            }
            "input_audio" => {
                let audio = part.input_audio.ok_or_else(|| missing("input_audio"))?;
                Part::InputAudio(pb::InputAudio { data: audio.data, format: audio.format })
            }
            "file" => {
                let file = part.file.ok_or_else(|| missing("file"))?;
                Part::File(pb::FileInput {
                    file_id: file.file_id.unwrap_or_default(),
                    filename: file.filename.unwrap_or_default(),
                    file_data: file.file_data.unwrap_or_default(),
                })
            }
            other => {
                return Err(WireError::invalid(
                    field("type"),
                    format!(
                        "is {other:?}; expected text, image_url, input_audio or file (refusal in assistant messages)"
                    ),
                ));
            }
        };
        text_only &= matches!(converted_part, Part::Text(_));
        converted.push(pb::ContentPart { part: Some(converted_part) });
    }
    if text_only {
        for part in converted {
            if let Some(Part::Text(text)) = part.part {
                out.content.push_str(&text);
            }
        }
    } else {
        out.parts = converted;
    }
    Ok(())
}

fn convert_tool((index, tool): (usize, WireTool)) -> Result<pb::ToolDefinition, WireError> {
    if tool.kind != "function" {
        return Err(WireError::invalid(
            format!("tools[{index}].type"),
            format!("is {:?}; only function tools are supported", tool.kind),
        ));
    }
    let function =
        tool.function.ok_or_else(|| WireError::invalid(format!("tools[{index}].function"), "is required"))?;
    Ok(pb::ToolDefinition {
        name: function.name,
        description: function.description.unwrap_or_default(),
        parameters_json: json_text(function.parameters),
        strict: function.strict,
    })
}

fn convert_tool_choice(choice: WireToolChoice) -> Result<pb::ToolChoice, WireError> {
    use pb::tool_choice::Mode;
    let (mode, function_name) = match choice {
        WireToolChoice::Mode(mode) => match mode.as_str() {
            "none" => (Mode::None, String::new()),
            "auto" => (Mode::Auto, String::new()),
            "required" => (Mode::Required, String::new()),
            other => {
                return Err(WireError::invalid(
                    "tool_choice",
                    format!("is {other:?}; expected none, auto, required or a named function"),
                ));
            }
        },
        WireToolChoice::Named(named) => {
            if named.kind != "function" {
                return Err(WireError::invalid(
                    "tool_choice.type",
                    format!("is {:?}; only function is supported", named.kind),
                ));
            }
            let name = named.function.ok_or_else(|| WireError::invalid("tool_choice.function", "is required"))?.name;
            (Mode::Function, name)
        }
    };
    Ok(pb::ToolChoice { mode: mode as i32, function_name })
}

fn convert_response_format(format: WireResponseFormat) -> Result<pb::ResponseFormat, WireError> {
    use pb::response_format::Kind;
    let kind = match format.kind.as_str() {
        "text" => Kind::Text,
        "json_object" => Kind::JsonObject,
        "json_schema" => {
            let schema =
                format.json_schema.ok_or_else(|| WireError::invalid("response_format.json_schema", "is required"))?;
            return Ok(pb::ResponseFormat {
                kind: Kind::JsonSchema as i32,
                name: schema.name,
                description: schema.description.unwrap_or_default(),
                schema_json: json_text(schema.schema),
                strict: schema.strict,
            });
        }
        other => {
            return Err(WireError::invalid(
                "response_format.type",
                format!("is {other:?}; expected text, json_object or json_schema"),
            ));
        }
    };
    Ok(pb::ResponseFormat { kind: kind as i32, ..pb::ResponseFormat::default() })
}

// ---------------------------------------------------------------------------------------------
// Replies

/// What a reply says about itself beyond the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyMeta {
    /// `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: i64,
    /// The model to report when the answer names none (the served model wins).
    pub model: String,
}

#[derive(Serialize)]
pub(crate) struct UsageJson {
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
    prompt_tokens_details: PromptDetails,
    completion_tokens_details: CompletionDetails,
}

#[derive(Serialize)]
struct PromptDetails {
    cached_tokens: i64,
}

#[derive(Serialize)]
struct CompletionDetails {
    reasoning_tokens: i64,
}

impl From<&pb::Usage> for UsageJson {
    fn from(usage: &pb::Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.tokens(),
            prompt_tokens_details: PromptDetails { cached_tokens: usage.cached_prompt_tokens },
            completion_tokens_details: CompletionDetails { reasoning_tokens: usage.reasoning_tokens },
        }
    }
}

#[derive(Serialize)]
struct ToolCallJson<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    function: FunctionJson<'a>,
}

#[derive(Serialize)]
struct FunctionJson<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[derive(Serialize)]
struct CompletionJson<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: [ChoiceJson<'a>; 1],
    usage: UsageJson,
}

#[derive(Serialize)]
struct ChoiceJson<'a> {
    index: u32,
    message: MessageJson<'a>,
    logprobs: Option<LogprobsJson<'a>>,
    finish_reason: &'a str,
}

#[derive(Serialize)]
struct MessageJson<'a> {
    role: &'static str,
    content: Option<&'a str>,
    refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
}

#[derive(Serialize)]
struct LogprobsJson<'a> {
    content: &'a [Box<RawValue>],
    refusal: Option<&'a [Box<RawValue>]>,
}

fn non_empty(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// The `chat.completion` object of a whole answer.
pub fn completion_json(meta: &ReplyMeta, answer: &Answer) -> Vec<u8> {
    let tool_calls: Vec<ToolCallJson<'_>> = answer
        .tool_calls
        .iter()
        .map(|call| ToolCallJson {
            id: &call.id,
            kind: if call.r#type.is_empty() { "function" } else { &call.r#type },
            function: FunctionJson { name: &call.function_name, arguments: &call.arguments_json },
        })
        .collect();
    // OpenAI answers `content: null` when the model only called tools or refused.
    let content = if answer.content.is_empty() && (!tool_calls.is_empty() || !answer.refusal.is_empty()) {
        None
    } else {
        Some(answer.content.as_str())
    };
    let completion = CompletionJson {
        id: &meta.id,
        object: "chat.completion",
        created: meta.created,
        model: if answer.model.is_empty() { &meta.model } else { &answer.model },
        choices: [ChoiceJson {
            index: 0,
            message: MessageJson {
                role: "assistant",
                content,
                refusal: non_empty(&answer.refusal),
                tool_calls,
                reasoning_content: non_empty(&answer.reasoning),
            },
            logprobs: answer.logprobs.as_ref().map(|l| LogprobsJson {
                content: &l.content,
                refusal: (!l.refusal.is_empty()).then_some(l.refusal.as_slice()),
            }),
            finish_reason: answer.finish_reason_or_default(),
        }],
        usage: UsageJson::from(&answer.usage.unwrap_or_default()),
    };
    serde_json::to_vec(&completion).expect("a completion serializes")
}

#[derive(Serialize)]
struct ChunkJson<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: Vec<ChunkChoiceJson<'a>>,
    /// Present (as null) on every chunk when the client asked for usage, set on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<UsageJson>>,
}

#[derive(Serialize)]
struct ChunkChoiceJson<'a> {
    index: u32,
    delta: DeltaJson<'a>,
    logprobs: Option<&'a RawValue>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize, Default)]
struct DeltaJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallDeltaJson<'a>>,
}

impl DeltaJson<'_> {
    fn is_empty(&self) -> bool {
        self.role.is_none()
            && self.content.is_none()
            && self.refusal.is_none()
            && self.reasoning_content.is_none()
            && self.tool_calls.is_empty()
    }
}

/// A piece of a tool call: `id`, `type` and the name on its first piece only, since the SDKs
/// concatenate every string they receive for an index.
#[derive(Serialize)]
struct ToolCallDeltaJson<'a> {
    index: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    function: FunctionDeltaJson<'a>,
}

#[derive(Serialize)]
struct FunctionDeltaJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: Cow<'a, str>,
}

/// Writes a streamed answer as OpenAI `chat.completion.chunk` events: the role on the first,
/// then text, refusal, reasoning and tool-call pieces as they come (with the chunk's logprobs),
/// the finish reason in a chunk of its own, the usage chunk when the client asked for it, and
/// `data: [DONE]` from [`ChunkEncoder::done`].
#[derive(Debug)]
pub struct ChunkEncoder {
    meta: ReplyMeta,
    include_usage: bool,
    served_model_seen: bool,
    started: bool,
    finished: bool,
    /// Tool calls whose first piece went out.
    calls_started: BTreeSet<i32>,
}

impl ChunkEncoder {
    pub fn new(meta: ReplyMeta, include_usage: bool) -> Self {
        Self {
            meta,
            include_usage,
            served_model_seen: false,
            started: false,
            finished: false,
            calls_started: BTreeSet::new(),
        }
    }

    /// The events for one chunk of the answer (possibly none).
    pub fn encode(&mut self, chunk: &CompleteChunk) -> Bytes {
        if !self.served_model_seen && !chunk.model.is_empty() {
            self.meta.model.clone_from(&chunk.model);
            self.served_model_seen = true;
        }
        let mut out = Vec::new();
        let mut delta = DeltaJson {
            role: (!self.started).then_some("assistant"),
            content: if self.started { non_empty(&chunk.delta) } else { Some(&chunk.delta) },
            refusal: non_empty(&chunk.refusal_delta),
            reasoning_content: non_empty(&chunk.reasoning_delta),
            tool_calls: Vec::new(),
        };
        // One entry per call, in index order: the SDKs keep the first list they see as it is
        // and find later pieces by position, so a call must not appear twice in one chunk.
        let mut calls: BTreeMap<i32, ToolCallDeltaJson<'_>> = BTreeMap::new();
        for piece in &chunk.tool_call_deltas {
            let first = self.calls_started.insert(piece.index);
            match calls.get_mut(&piece.index) {
                Some(entry) => entry.function.arguments.to_mut().push_str(&piece.arguments_delta),
                None => {
                    calls.insert(
                        piece.index,
                        ToolCallDeltaJson {
                            index: piece.index,
                            id: first.then_some(piece.id.as_str()),
                            kind: first.then_some("function"),
                            function: FunctionDeltaJson {
                                name: first.then_some(piece.function_name.as_str()),
                                arguments: Cow::Borrowed(&piece.arguments_delta),
                            },
                        },
                    );
                }
            }
        }
        // Calls that arrived whole on the last chunk (a provider or model that does not stream
        // them) go out whole.
        for (index, call) in chunk.tool_calls.iter().enumerate() {
            let index = index as i32;
            if self.calls_started.insert(index) {
                calls.insert(
                    index,
                    ToolCallDeltaJson {
                        index,
                        id: Some(&call.id),
                        kind: Some("function"),
                        function: FunctionDeltaJson {
                            name: Some(&call.function_name),
                            arguments: Cow::Borrowed(&call.arguments_json),
                        },
                    },
                );
            }
        }
        delta.tool_calls = calls.into_values().collect();
        let logprobs: Option<&RawValue> =
            non_empty(&chunk.logprobs_json).and_then(|json| serde_json::from_str(json).ok());
        if !delta.is_empty() || logprobs.is_some() {
            self.write(&mut out, vec![ChunkChoiceJson { index: 0, delta, logprobs, finish_reason: None }], None);
            self.started = true;
        }
        if !chunk.finish_reason.is_empty() && !self.finished {
            self.finished = true;
            let finish = ChunkChoiceJson {
                index: 0,
                delta: DeltaJson::default(),
                logprobs: None,
                finish_reason: Some(&chunk.finish_reason),
            };
            self.write(&mut out, vec![finish], None);
            if self.include_usage {
                let usage = UsageJson::from(&chunk.usage.unwrap_or_default());
                self.write(&mut out, Vec::new(), Some(usage));
            }
        }
        Bytes::from(out)
    }

    /// The event that ends the stream.
    pub fn done(&self) -> Bytes {
        Bytes::from_static(sse::DONE)
    }

    fn write(&self, out: &mut Vec<u8>, choices: Vec<ChunkChoiceJson<'_>>, usage: Option<UsageJson>) {
        let chunk = ChunkJson {
            id: &self.meta.id,
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: &self.meta.model,
            choices,
            usage: if self.include_usage { Some(usage) } else { None },
        };
        sse::write_json_event(out, None, &chunk);
    }
}

#[cfg(test)]
mod tests;
