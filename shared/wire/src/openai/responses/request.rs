//! `POST /v1/responses` as clients send it, parsed into the canonical request ([`parse_responses`]).

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use meshgate_proto::common::v1 as pb;
use meshgate_proto::common::v1::content_part::Part;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::canonical::ChatRequest;
use crate::error::WireError;
use crate::json_body::{extra_json, json_text, keep_extra, narrow, once, parse_body};
use crate::origin::{MessageOrigin, Origins, Spelling};

/// A Responses API request: the canonical request and what only the Responses API has.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponsesRequest {
    /// The conversation as the model will see it: the instructions (a system message) first,
    /// then the input items. With a `previous_response_id` it is complete (and fully checked)
    /// only once the stored conversation is joined ([`ResponsesRequest::continue_from`]).
    pub chat: ChatRequest,
    /// The system message the request starts with (not carried over to the next response).
    pub instructions: Option<String>,
    /// The response this one continues.
    pub previous_response_id: Option<String>,
    /// Keep the response for `GET /v1/responses/{id}` and later `previous_response_id`s (the
    /// API's default: true).
    pub store: bool,
    /// The `include` values asked for.
    pub include: Vec<String>,
    /// `reasoning.summary` (`auto`, `concise`, `detailed`), repeated in the response object.
    pub reasoning_summary: Option<String>,
    /// `truncation` (`auto` or `disabled`), repeated in the response object.
    pub truncation: Option<String>,
    /// What the request asked that no provider will receive (the canonical request has no place
    /// for it), by the client's field names (`reasoning.summary`, `input[3].encrypted_content`,
    /// `truncation`, ...), for the trace.
    pub unforwarded: Vec<String>,
    /// Where each canonical message came from, to name the client's fields in errors.
    pub(crate) origins: Origins,
}

/// Built-in tools of OpenAI's Responses API, which meshgate does not run.
const BUILT_IN_TOOLS: &str = "web_search, file_search, computer_use, code_interpreter, image_generation, mcp, shell";

/// `include` values a client may ask for: logprobs are honoured; the rest concern built-in tools
/// or encrypted reasoning, which meshgate does not produce.
const INCLUDABLE: [&str; 9] = [
    "message.output_text.logprobs",
    "reasoning.encrypted_content",
    "message.input_image.image_url",
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "mcp_call.output",
];

/// Parses and checks a Responses API request body. Errors name the field as the client wrote it
/// (`input[3].content[1].image_url`, `tools[0].name`, `text.format.schema`).
pub fn parse_responses(body: &[u8]) -> Result<ResponsesRequest, WireError> {
    let wire: WireRequest = parse_body(body)?;
    wire.into_request()
}

/// The request as sent; every field optional so a missing one is reported by name.
#[derive(Default)]
struct WireRequest {
    model: Option<String>,
    input: Option<WireInput>,
    instructions: Option<String>,
    tools: Option<Vec<WireTool>>,
    tool_choice: Option<WireToolChoice>,
    parallel_tool_calls: Option<bool>,
    text: Option<WireText>,
    reasoning: Option<WireReasoning>,
    max_output_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_logprobs: Option<i64>,
    metadata: Option<BTreeMap<String, String>>,
    user: Option<String>,
    store: Option<bool>,
    previous_response_id: Option<String>,
    stream: Option<bool>,
    stream_options: Option<WireStreamOptions>,
    include: Option<Vec<String>>,
    truncation: Option<String>,
    service_tier: Option<String>,
    background: Option<bool>,
    conversation: Option<Box<RawValue>>,
    prompt: Option<Box<RawValue>>,
    max_tool_calls: Option<i64>,
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
        f.write_str("a response request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WireRequest, A::Error> {
        let mut r = WireRequest::default();
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let seen = &mut seen;
            match key.as_str() {
                "model" => once(&mut r.model, map.next_value()?, &key, seen)?,
                "input" => once(&mut r.input, map.next_value()?, &key, seen)?,
                "instructions" => once(&mut r.instructions, map.next_value()?, &key, seen)?,
                "tools" => once(&mut r.tools, map.next_value()?, &key, seen)?,
                "tool_choice" => once(&mut r.tool_choice, map.next_value()?, &key, seen)?,
                "parallel_tool_calls" => once(&mut r.parallel_tool_calls, map.next_value()?, &key, seen)?,
                "text" => once(&mut r.text, map.next_value()?, &key, seen)?,
                "reasoning" => once(&mut r.reasoning, map.next_value()?, &key, seen)?,
                "max_output_tokens" => once(&mut r.max_output_tokens, map.next_value()?, &key, seen)?,
                "temperature" => once(&mut r.temperature, map.next_value()?, &key, seen)?,
                "top_p" => once(&mut r.top_p, map.next_value()?, &key, seen)?,
                "top_logprobs" => once(&mut r.top_logprobs, map.next_value()?, &key, seen)?,
                "metadata" => once(&mut r.metadata, map.next_value()?, &key, seen)?,
                "user" => once(&mut r.user, map.next_value()?, &key, seen)?,
                "store" => once(&mut r.store, map.next_value()?, &key, seen)?,
                "previous_response_id" => once(&mut r.previous_response_id, map.next_value()?, &key, seen)?,
                "stream" => once(&mut r.stream, map.next_value()?, &key, seen)?,
                "stream_options" => once(&mut r.stream_options, map.next_value()?, &key, seen)?,
                "include" => once(&mut r.include, map.next_value()?, &key, seen)?,
                "truncation" => once(&mut r.truncation, map.next_value()?, &key, seen)?,
                "service_tier" => once(&mut r.service_tier, map.next_value()?, &key, seen)?,
                "background" => once(&mut r.background, map.next_value()?, &key, seen)?,
                "conversation" => once(&mut r.conversation, map.next_value()?, &key, seen)?,
                "prompt" => once(&mut r.prompt, map.next_value()?, &key, seen)?,
                "max_tool_calls" => once(&mut r.max_tool_calls, map.next_value()?, &key, seen)?,
                _ => {
                    let value: Box<RawValue> = map.next_value()?;
                    keep_extra(&mut r.extra, key, value, seen)?;
                }
            }
        }
        Ok(r)
    }
}

/// `stream_options`: only `include_obfuscation`, which meshgate has no use for (it adds no
/// obfuscation padding).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireStreamOptions {
    #[serde(default)]
    #[allow(dead_code)] // read only by serde: the option is accepted and has nothing to do here
    include_obfuscation: Option<bool>,
}

/// `input`: a string (one user message) or a list of items.
enum WireInput {
    Text(String),
    Items(Vec<WireItem>),
}

impl<'de> Deserialize<'de> for WireInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InputVisitor;
        impl<'de> Visitor<'de> for InputVisitor {
            type Value = WireInput;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of input items")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<WireInput, E> {
                Ok(WireInput::Text(value.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<WireInput, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(4));
                while let Some(item) = seq.next_element::<WireItem>()? {
                    items.push(item);
                }
                Ok(WireInput::Items(items))
            }
        }
        deserializer.deserialize_any(InputVisitor)
    }
}

/// One input item, whatever its type (fields the type does not use are ignored, as OpenAI's
/// own replayed items carry ids, statuses and annotations).
#[derive(Deserialize)]
struct WireItem {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<WireContent>,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
    #[serde(default)]
    output: Option<WireContent>,
    #[serde(default)]
    summary: Option<Vec<WireSummary>>,
    #[serde(default)]
    encrypted_content: Option<String>,
}

#[derive(Deserialize)]
struct WireSummary {
    #[serde(rename = "type")]
    kind: String,
    text: String,
}

/// Message content or a function call's output: a string or a list of parts.
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
    image_url: Option<String>,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    file_id: Option<String>,
    #[serde(default)]
    file_data: Option<String>,
    #[serde(default)]
    file_url: Option<String>,
    #[serde(default)]
    filename: Option<String>,
    #[serde(default)]
    input_audio: Option<WireAudio>,
}

#[derive(Deserialize)]
struct WireAudio {
    data: String,
    format: String,
}

#[derive(Deserialize)]
struct WireTool {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Box<RawValue>>,
    #[serde(default)]
    strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"`, `{"type": "function", "name"}` or
/// `{"type": "allowed_tools", "mode", "tools"}`.
enum WireToolChoice {
    Mode(String),
    Object(WireToolChoiceObject),
}

#[derive(Deserialize)]
struct WireToolChoiceObject {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    tools: Option<Vec<WireAllowedTool>>,
}

#[derive(Deserialize)]
struct WireAllowedTool {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
}

impl<'de> Deserialize<'de> for WireToolChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ChoiceVisitor;
        impl<'de> Visitor<'de> for ChoiceVisitor {
            type Value = WireToolChoice;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""none", "auto", "required" or {"type": "function", "name": ...}"#)
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<WireToolChoice, E> {
                Ok(WireToolChoice::Mode(value.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<WireToolChoice, A::Error> {
                WireToolChoiceObject::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(WireToolChoice::Object)
            }
        }
        deserializer.deserialize_any(ChoiceVisitor)
    }
}

#[derive(Deserialize)]
struct WireText {
    #[serde(default)]
    format: Option<WireFormat>,
    #[serde(default)]
    verbosity: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct WireFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    schema: Option<Box<RawValue>>,
    #[serde(default)]
    strict: Option<bool>,
}

#[derive(Deserialize)]
struct WireReasoning {
    #[serde(default)]
    effort: Option<String>,
    #[serde(default)]
    summary: Option<String>,
    /// The older name of `summary`.
    #[serde(default)]
    generate_summary: Option<String>,
}

/// The conversation being built from the items, with each message's origin.
#[derive(Default)]
struct Conversation {
    messages: Vec<pb::ChatMessage>,
    origins: Origins,
    /// Reasoning replayed for the next assistant message, and the item it came from.
    reasoning: Option<(String, usize)>,
}

impl Conversation {
    fn push(&mut self, message: pb::ChatMessage, origin: MessageOrigin) {
        self.messages.push(message);
        self.origins.messages.push(origin);
    }

    /// The assistant message the next function call joins: the last message when it is an
    /// assistant's (a message item and the calls that follow it are one turn), else a new one.
    fn assistant_for_call(&mut self, index: usize) -> usize {
        if self.reasoning.is_none() && self.messages.last().is_some_and(|m| m.role == "assistant") {
            return self.messages.len() - 1;
        }
        let mut message = pb::ChatMessage { role: "assistant".into(), ..Default::default() };
        message.reasoning_content = self.reasoning.take().map(|(text, _)| text).unwrap_or_default();
        self.push(message, MessageOrigin::of(format!("input[{index}]"), ""));
        self.messages.len() - 1
    }
}

impl WireRequest {
    fn into_request(self) -> Result<ResponsesRequest, WireError> {
        let model = self.model.ok_or_else(|| WireError::invalid("model", "is required"))?;
        let input = self.input.ok_or_else(|| WireError::invalid("input", "is required"))?;
        if self.background == Some(true) {
            return Err(WireError::unsupported(
                "background",
                "is not supported: meshgate answers within the request (stream long answers instead)",
            ));
        }
        if self.conversation.as_ref().is_some_and(|c| c.get() != "null") {
            return Err(WireError::unsupported(
                "conversation",
                "is not supported: continue a conversation with previous_response_id",
            ));
        }
        if self.prompt.as_ref().is_some_and(|p| p.get() != "null") {
            return Err(WireError::unsupported("prompt", "is not supported: meshgate keeps no prompt templates"));
        }
        let mut unforwarded = Vec::new();
        let mut conversation = Conversation::default();
        if let Some(instructions) = &self.instructions {
            let message =
                pb::ChatMessage { role: "system".into(), content: instructions.clone(), ..Default::default() };
            conversation.push(message, MessageOrigin::of("instructions", ""));
        }
        match input {
            WireInput::Text(text) => {
                conversation.push(
                    pb::ChatMessage { role: "user".into(), content: text, ..Default::default() },
                    MessageOrigin::of("input", ""),
                );
            }
            WireInput::Items(items) => {
                if items.is_empty() && self.previous_response_id.is_none() {
                    return Err(WireError::invalid("input", "must contain at least one item"));
                }
                for (index, item) in items.into_iter().enumerate() {
                    convert_item(index, item, &mut conversation, &mut unforwarded)?;
                }
            }
        }
        if let Some((_, index)) = conversation.reasoning.take() {
            // Reasoning that no assistant output follows has nothing to be replayed with.
            unforwarded.push(format!("input[{index}]"));
        }

        let include = self.include.unwrap_or_default();
        let mut logprobs = None;
        for (index, value) in include.iter().enumerate() {
            if !INCLUDABLE.contains(&value.as_str()) {
                return Err(WireError::invalid(
                    format!("include[{index}]"),
                    format!("is {value:?}; expected one of {}", INCLUDABLE.join(", ")),
                ));
            }
            if value == "message.output_text.logprobs" {
                logprobs = Some(true);
            } else {
                unforwarded.push(format!("include[{index}]"));
            }
        }
        let top_logprobs = self.top_logprobs.map(narrow);
        if top_logprobs.is_some() {
            logprobs = Some(true);
        }

        let mut tools = Vec::new();
        for (index, tool) in self.tools.unwrap_or_default().into_iter().enumerate() {
            tools.push(convert_tool(index, tool)?);
        }
        let tool_choice = match self.tool_choice {
            None => None,
            Some(choice) => Some(convert_tool_choice(choice, &mut tools)?),
        };
        let (response_format, verbosity) = match self.text {
            None => (None, None),
            Some(text) => (text.format.map(convert_format).transpose()?, text.verbosity),
        };
        let (effort, summary) = match self.reasoning {
            None => (None, None),
            Some(reasoning) => (reasoning.effort, reasoning.summary.or(reasoning.generate_summary)),
        };
        if summary.is_some() {
            unforwarded.push("reasoning.summary".to_owned());
        }
        match self.truncation.as_deref() {
            None | Some("disabled") => {}
            Some("auto") => unforwarded.push("truncation".to_owned()),
            Some(other) => {
                return Err(WireError::invalid("truncation", format!("is {other:?}; expected auto or disabled")));
            }
        }
        if self.max_tool_calls.is_some() {
            // It limits calls to built-in tools, which meshgate does not run.
            unforwarded.push("max_tool_calls".to_owned());
        }
        let mut extra = self.extra;
        if let Some(verbosity) = verbosity.filter(|v| v.get() != "null") {
            // Chat Completions takes the same setting at the top level.
            extra.push(("verbosity".to_owned(), verbosity));
        }
        if let Some(previous) = &self.previous_response_id {
            crate::text::check_identifier(|| "previous_response_id".into(), previous, false)?;
        }

        let options = pb::ChatOptions {
            tools,
            tool_choice,
            parallel_tool_calls: self.parallel_tool_calls,
            response_format,
            reasoning_effort: effort.unwrap_or_default(),
            n: None,
            logprobs,
            top_logprobs,
            frequency_penalty: None,
            presence_penalty: None,
            logit_bias: Default::default(),
            user: self.user.unwrap_or_default(),
            metadata: self.metadata.unwrap_or_default().into_iter().collect(),
            service_tier: self.service_tier.unwrap_or_default(),
            extra_json: extra_json(&extra),
        };
        let sampling = pb::SamplingParams {
            max_tokens: self.max_output_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            ..Default::default()
        };
        let chat = ChatRequest {
            model,
            messages: conversation.messages,
            sampling,
            options,
            stream: self.stream.unwrap_or(false),
            include_usage: true,
        };
        let mut request = ResponsesRequest {
            chat,
            instructions: self.instructions,
            previous_response_id: self.previous_response_id,
            store: self.store.unwrap_or(true),
            include,
            reasoning_summary: summary,
            truncation: self.truncation,
            unforwarded,
            origins: conversation.origins,
        };
        let continued = request.previous_response_id.is_some();
        request.check(continued)?;
        Ok(request)
    }
}

impl ResponsesRequest {
    /// The canonical checks, their errors naming the client's fields.
    pub(crate) fn check(&mut self, continued: bool) -> Result<(), WireError> {
        let Self { chat, origins, .. } = self;
        chat.check_conversation(true, continued).map_err(|err| origins.relocate(err, &ResponsesSpelling))
    }
}

fn missing(field: String) -> WireError {
    WireError::invalid(field, "is required")
}

fn convert_item(
    index: usize,
    item: WireItem,
    conversation: &mut Conversation,
    unforwarded: &mut Vec<String>,
) -> Result<(), WireError> {
    let field = |name: &str| format!("input[{index}].{name}");
    match item.kind.as_deref().unwrap_or("message") {
        "message" => {
            let role = item.role.ok_or_else(|| missing(field("role")))?;
            if !matches!(role.as_str(), "user" | "system" | "developer" | "assistant") {
                return Err(WireError::invalid(
                    field("role"),
                    format!("is {role:?}; expected user, system, developer or assistant"),
                ));
            }
            let content = item.content.ok_or_else(|| missing(field("content")))?;
            let mut message = pb::ChatMessage { role, ..Default::default() };
            let mut origin = MessageOrigin::of(format!("input[{index}]"), ".content");
            convert_content(index, "content", content, &mut message, &mut origin)?;
            if message.role == "assistant"
                && let Some((reasoning, _)) = conversation.reasoning.take()
            {
                message.reasoning_content = reasoning;
            }
            conversation.push(message, origin);
        }
        "function_call" => {
            let call = pb::ToolCall {
                id: item.call_id.ok_or_else(|| missing(field("call_id")))?,
                r#type: "function".into(),
                function_name: item.name.ok_or_else(|| missing(field("name")))?,
                arguments_json: item.arguments.ok_or_else(|| missing(field("arguments")))?,
            };
            let at = conversation.assistant_for_call(index);
            conversation.messages[at].tool_calls.push(call);
            conversation.origins.messages[at].calls.push(format!("input[{index}]"));
        }
        "function_call_output" => {
            let call_id = item.call_id.ok_or_else(|| missing(field("call_id")))?;
            let output = item.output.ok_or_else(|| missing(field("output")))?;
            let mut message = pb::ChatMessage { role: "tool".into(), tool_call_id: call_id, ..Default::default() };
            let mut origin = MessageOrigin::of(format!("input[{index}]"), ".output");
            convert_content(index, "output", output, &mut message, &mut origin)?;
            conversation.push(message, origin);
        }
        "reasoning" => {
            let mut text = String::new();
            let summary = item.summary.unwrap_or_default().into_iter().filter(|s| s.kind == "summary_text");
            let content = match item.content {
                Some(WireContent::Parts(parts)) => parts,
                _ => Vec::new(),
            };
            let reasoning_text = content.into_iter().filter(|p| p.kind == "reasoning_text").filter_map(|p| p.text);
            for piece in summary.map(|s| s.text).chain(reasoning_text) {
                if !text.is_empty() {
                    text.push_str("\n\n");
                }
                text.push_str(&piece);
            }
            if item.encrypted_content.is_some() {
                unforwarded.push(field("encrypted_content"));
            }
            match &mut conversation.reasoning {
                Some((pending, _)) if !text.is_empty() => {
                    pending.push_str("\n\n");
                    pending.push_str(&text);
                }
                Some(_) => {}
                None if text.is_empty() => {}
                None => conversation.reasoning = Some((text, index)),
            }
        }
        "item_reference" => {
            return Err(WireError::unsupported(
                field("type"),
                "item_reference is not supported: send the item itself, or continue with previous_response_id",
            ));
        }
        other => {
            return Err(WireError::unsupported(
                field("type"),
                format!(
                    "is {other:?}; meshgate takes message, function_call, function_call_output and reasoning items \
                     (it runs no built-in tools)"
                ),
            ));
        }
    }
    Ok(())
}

/// A message's content (or a function call's output): text, or typed parts in order.
fn convert_content(
    index: usize,
    name: &str,
    content: WireContent,
    message: &mut pb::ChatMessage,
    origin: &mut MessageOrigin,
) -> Result<(), WireError> {
    let parts = match content {
        WireContent::Text(text) => {
            message.content = text;
            return Ok(());
        }
        WireContent::Parts(parts) => parts,
    };
    let mut converted = Vec::with_capacity(parts.len());
    let mut paths = Vec::with_capacity(parts.len());
    for (part_index, part) in parts.into_iter().enumerate() {
        let path = format!("input[{index}].{name}[{part_index}]");
        let field = |sub: &str| format!("{path}.{sub}");
        let kind = part.kind.as_str();
        let require = |value: Option<String>, sub: &str| {
            value.ok_or_else(|| WireError::invalid(field(sub), format!("is required in an {kind} part")))
        };
        let converted_part = match kind {
            "input_text" | "output_text" => Part::Text(require(part.text, "text")?),
            "refusal" if message.role == "assistant" => {
                message.refusal.push_str(&require(part.refusal, "refusal")?);
                continue;
            }
            "input_image" => match (part.image_url, part.file_id) {
                (Some(url), _) => Part::ImageUrl(pb::ImageUrl { url, detail: part.detail.unwrap_or_default() }),
                (None, Some(_)) => {
                    return Err(WireError::unsupported(
                        field("file_id"),
                        "is not supported for images: give the image as image_url (an http(s) URL or a data: URI)",
                    ));
                }
                (None, None) => {
                    return Err(WireError::invalid(field("image_url"), "is required in an input_image part"));
                }
            },
            "input_file" => {
                if part.file_url.is_some() {
                    return Err(WireError::unsupported(
                        field("file_url"),
                        "is not supported: give the file as file_data (a data: URI) or file_id",
                    ));
                }
                Part::File(pb::FileInput {
                    file_id: part.file_id.unwrap_or_default(),
                    filename: part.filename.unwrap_or_default(),
                    file_data: part.file_data.unwrap_or_default(),
                })
            }
            "input_audio" => {
                let audio = part.input_audio.ok_or_else(|| missing(field("input_audio")))?;
                Part::InputAudio(pb::InputAudio { data: audio.data, format: audio.format })
            }
            other => {
                return Err(WireError::invalid(
                    field("type"),
                    format!(
                        "is {other:?}; expected input_text, input_image, input_file or input_audio \
                         (output_text and refusal in assistant messages)"
                    ),
                ));
            }
        };
        if let Part::Text(text) = &converted_part {
            // Checked here: text-only content is joined, and the part's place lost.
            crate::text::check_text(|| field("text"), text)?;
        }
        converted.push(pb::ContentPart { part: Some(converted_part) });
        paths.push(path);
    }
    if converted.iter().all(|p| matches!(p.part, Some(Part::Text(_)))) {
        for part in converted {
            if let Some(Part::Text(text)) = part.part {
                message.content.push_str(&text);
            }
        }
    } else {
        message.parts = converted;
        origin.parts = paths;
    }
    Ok(())
}

fn convert_tool(index: usize, tool: WireTool) -> Result<pb::ToolDefinition, WireError> {
    let field = |name: &str| format!("tools[{index}].{name}");
    if tool.kind != "function" {
        return Err(WireError::unsupported(
            field("type"),
            format!(
                "is {:?}; meshgate runs no built-in tools ({BUILT_IN_TOOLS}, ...): declare a function tool and run it \
                 yourself",
                tool.kind
            ),
        ));
    }
    Ok(pb::ToolDefinition {
        name: tool.name.ok_or_else(|| missing(field("name")))?,
        description: tool.description.unwrap_or_default(),
        parameters_json: json_text(tool.parameters),
        strict: tool.strict,
    })
}

fn convert_tool_choice(
    choice: WireToolChoice,
    tools: &mut Vec<pb::ToolDefinition>,
) -> Result<pb::ToolChoice, WireError> {
    use pb::tool_choice::Mode;
    let mode_of = |field: &str, mode: &str| match mode {
        "none" => Ok(Mode::None),
        "auto" => Ok(Mode::Auto),
        "required" => Ok(Mode::Required),
        other => Err(WireError::invalid(field, format!("is {other:?}; expected none, auto or required"))),
    };
    let (mode, function_name) = match choice {
        WireToolChoice::Mode(mode) => (mode_of("tool_choice", &mode)?, String::new()),
        WireToolChoice::Object(object) => match object.kind.as_str() {
            "function" => {
                (Mode::Function, object.name.ok_or_else(|| WireError::invalid("tool_choice.name", "is required"))?)
            }
            "allowed_tools" => {
                // The model may call only the listed tools: the others are not offered.
                let mode = mode_of("tool_choice.mode", object.mode.as_deref().unwrap_or("auto"))?;
                let allowed = object.tools.ok_or_else(|| WireError::invalid("tool_choice.tools", "is required"))?;
                let mut names = HashSet::with_capacity(allowed.len());
                for (index, tool) in allowed.into_iter().enumerate() {
                    let field = |name: &str| format!("tool_choice.tools[{index}].{name}");
                    if tool.kind != "function" {
                        return Err(WireError::unsupported(
                            field("type"),
                            format!("is {:?}; only function tools are supported", tool.kind),
                        ));
                    }
                    let name = tool.name.ok_or_else(|| WireError::invalid(field("name"), "is required"))?;
                    if !tools.iter().any(|t| t.name == name) {
                        return Err(WireError::invalid(
                            field("name"),
                            format!("is {name:?}, which is not among the tools"),
                        ));
                    }
                    names.insert(name);
                }
                tools.retain(|t| names.contains(&t.name));
                (mode, String::new())
            }
            other => {
                return Err(WireError::unsupported(
                    "tool_choice.type",
                    format!("is {other:?}; expected function or allowed_tools (meshgate runs no built-in tools)"),
                ));
            }
        },
    };
    Ok(pb::ToolChoice { mode: mode as i32, function_name })
}

fn convert_format(format: WireFormat) -> Result<pb::ResponseFormat, WireError> {
    use pb::response_format::Kind;
    let kind = match format.kind.as_str() {
        "text" => Kind::Text,
        "json_object" => Kind::JsonObject,
        "json_schema" => {
            return Ok(pb::ResponseFormat {
                kind: Kind::JsonSchema as i32,
                name: format.name.ok_or_else(|| WireError::invalid("text.format.name", "is required"))?,
                description: format.description.unwrap_or_default(),
                schema_json: json_text(format.schema),
                strict: format.strict,
            });
        }
        other => {
            return Err(WireError::invalid(
                "text.format.type",
                format!("is {other:?}; expected text, json_object or json_schema"),
            ));
        }
    };
    Ok(pb::ResponseFormat { kind: kind as i32, ..Default::default() })
}

/// How the Responses API spells what the canonical checks name.
pub(crate) struct ResponsesSpelling;

impl Spelling for ResponsesSpelling {
    fn message_field(&self, field: &str) -> String {
        match field {
            ".tool_call_id" => ".call_id".into(),
            ".refusal" => ".content".into(),
            // Replayed reasoning came from a reasoning item before the message.
            ".reasoning_content" => String::new(),
            other => other.into(),
        }
    }

    fn part_field(&self, field: &str) -> String {
        match field {
            ".image_url.url" => ".image_url".into(),
            ".image_url.detail" => ".detail".into(),
            ".file" => String::new(),
            other => other.strip_prefix(".file").map_or_else(|| other.into(), str::to_owned),
        }
    }

    fn call_field(&self, field: &str) -> String {
        match field {
            ".id" => ".call_id".into(),
            other => other.strip_prefix(".function").map_or_else(|| other.into(), str::to_owned),
        }
    }

    fn option_field(&self, field: &str) -> String {
        if let Some(rest) = field.strip_prefix("tools[")
            && let Some((index, sub)) = rest.split_once(']')
        {
            return format!("tools[{index}]{}", sub.strip_prefix(".function").unwrap_or(sub));
        }
        if let Some(sub) = field.strip_prefix("response_format") {
            return format!("text.format{}", sub.strip_prefix(".json_schema").unwrap_or(sub));
        }
        match field {
            "messages" => "input".into(),
            "max_tokens" => "max_output_tokens".into(),
            "reasoning_effort" => "reasoning.effort".into(),
            "tool_choice.function.name" => "tool_choice.name".into(),
            other => other.into(),
        }
    }
}
