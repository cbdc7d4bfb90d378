//! What meshgate sends a provider that speaks the Responses API natively (OpenAI's
//! `POST <base>/responses`), and how it reads the events back.
//!
//! Request ([`provider_body`]): the canonical conversation as input items (`system`, `user` and
//! `assistant` messages, `function_call` and `function_call_output` items), function tools,
//! `tool_choice`, `text.format`, `reasoning.effort`, `max_output_tokens`; always streaming and
//! `store: false` (meshgate keeps conversations itself). The Responses API has no `stop`,
//! `seed`, `n`, penalties, `logit_bias` or message names, and takes back no reasoning text it did
//! not encrypt itself: those are left out and listed (refused under
//! [`crate::UnknownParams::Refuse`]); `n` above 1 and a completion limit under
//! [`MIN_OUTPUT_TOKENS`] (OpenAI's minimum) are refused. A `verbosity` among the extra
//! parameters goes to `text.verbosity`.
//!
//! Answer ([`StreamDecoder`], the same chunk sequence as the Chat Completions decoder):
//! `response.output_text.delta` → text, `response.refusal.delta` → refusal,
//! `response.reasoning_summary_text.delta` and `response.reasoning_text.delta` → reasoning,
//! `function_call` items and `response.function_call_arguments.delta` → tool-call pieces (the
//! index counts calls), `response.completed` / `response.incomplete` → the finish reason and the
//! usage, `response.failed` and `error` → a provider error (a context overflow keeps its code).

use std::collections::BTreeMap;

use meshgate_proto::common::v1 as pb;
use meshgate_proto::common::v1::content_part::Part;
use meshgate_proto::sync::v1::{CompleteChunk, CompleteRequest};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{ProviderErrorKind, WireError, truncate};
use crate::openai::provider::provider_error;
use crate::provider::{AnswerModel, ProviderBody, ProviderModel, UnknownParams, extra_params, merge_extra};
use crate::sse::SseEvent;
use crate::text::raw_json;

/// The smallest `max_output_tokens` OpenAI's Responses API takes.
pub const MIN_OUTPUT_TOKENS: i64 = 16;

/// The fields of the body meshgate writes itself; `extra_json` may not set them.
const MODELLED: [&str; 19] = [
    "model",
    "input",
    "instructions",
    "stream",
    "store",
    "previous_response_id",
    "max_output_tokens",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "reasoning",
    "top_logprobs",
    "include",
    "user",
    "metadata",
    "service_tier",
];

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    input: Vec<Item<'a>>,
    stream: bool,
    store: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<Reasoning<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<i32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    include: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_tier: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Item<'a> {
    Message { role: &'a str, content: Content<'a> },
    FunctionCall { call_id: &'a str, name: &'a str, arguments: &'a str },
    FunctionCallOutput { call_id: &'a str, output: Content<'a> },
}

#[derive(Serialize)]
#[serde(untagged)]
enum Content<'a> {
    Text(&'a str),
    Parts(Vec<InputPart<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum InputPart<'a> {
    #[serde(rename = "input_text")]
    Text { text: &'a str },
    #[serde(rename = "input_image")]
    Image { image_url: &'a str, detail: &'a str },
    #[serde(rename = "input_audio")]
    Audio { input_audio: Audio<'a> },
    #[serde(rename = "input_file")]
    File {
        #[serde(skip_serializing_if = "Option::is_none")]
        file_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        filename: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        file_data: Option<&'a str>,
    },
}

#[derive(Serialize)]
struct Audio<'a> {
    data: &'a str,
    format: &'a str,
}

#[derive(Serialize)]
struct Tool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ToolChoice<'a> {
    Mode(&'static str),
    Function {
        #[serde(rename = "type")]
        kind: &'static str,
        name: &'a str,
    },
}

#[derive(Serialize)]
struct Text<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<Format<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verbosity: Option<&'a RawValue>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Format<'a> {
    Text,
    JsonObject,
    JsonSchema {
        name: &'a str,
        #[serde(skip_serializing_if = "str::is_empty")]
        description: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        schema: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        strict: Option<bool>,
    },
}

#[derive(Serialize)]
struct Reasoning<'a> {
    effort: &'a str,
}

fn non_empty(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// The Responses API body for `request` (a checked canonical request), streaming.
pub fn provider_body(request: &CompleteRequest, model: &ProviderModel) -> Result<ProviderBody, WireError> {
    let mut dropped = Vec::new();
    let (default_sampling, default_options) = (pb::SamplingParams::default(), pb::ChatOptions::default());
    let sampling = request.sampling.as_ref().unwrap_or(&default_sampling);
    let options = request.options.as_ref().unwrap_or(&default_options);
    let input = input_items(&request.messages, model, &mut dropped)?;

    if options.n.is_some_and(|n| n > 1) {
        return Err(WireError::unsupported("n", "must be 1 for a Responses API provider (one answer per request)"));
    }
    if let Some(max) = sampling.max_tokens.filter(|&max| max < MIN_OUTPUT_TOKENS) {
        return Err(WireError::unsupported(
            "max_tokens",
            format!("must be at least {MIN_OUTPUT_TOKENS} for a Responses API provider (got {max})"),
        ));
    }
    let unsupported = [
        ("stop", !sampling.stop.is_empty()),
        ("seed", sampling.seed.is_some()),
        ("top_k", sampling.top_k.is_some()),
        ("frequency_penalty", options.frequency_penalty.is_some()),
        ("presence_penalty", options.presence_penalty.is_some()),
        ("logit_bias", !options.logit_bias.is_empty()),
    ];
    for (field, set) in unsupported {
        if set {
            model.leave_out(field, &mut dropped)?;
        }
    }

    let mut tools = Vec::with_capacity(options.tools.len());
    for (index, tool) in options.tools.iter().enumerate() {
        let parameters = match tool.parameters_json.as_str() {
            "" => None,
            json => Some(raw_json(|| format!("tools[{index}].function.parameters"), json)?),
        };
        tools.push(Tool {
            kind: "function",
            name: &tool.name,
            description: &tool.description,
            parameters,
            strict: tool.strict,
        });
    }
    let tool_choice = options.tool_choice.as_ref().and_then(|choice| {
        use pb::tool_choice::Mode;
        match Mode::try_from(choice.mode).unwrap_or(Mode::Unspecified) {
            Mode::Unspecified => None,
            Mode::Auto => Some(ToolChoice::Mode("auto")),
            Mode::None => Some(ToolChoice::Mode("none")),
            Mode::Required => Some(ToolChoice::Mode("required")),
            Mode::Function => Some(ToolChoice::Function { kind: "function", name: &choice.function_name }),
        }
    });
    let format = match options.response_format.as_ref() {
        None => None,
        Some(format) => {
            use pb::response_format::Kind;
            match Kind::try_from(format.kind).unwrap_or(Kind::Unspecified) {
                Kind::Unspecified => None,
                Kind::Text => Some(Format::Text),
                Kind::JsonObject => Some(Format::JsonObject),
                Kind::JsonSchema => Some(Format::JsonSchema {
                    name: &format.name,
                    description: &format.description,
                    schema: match format.schema_json.as_str() {
                        "" => None,
                        json => Some(raw_json(|| "response_format.json_schema.schema".into(), json)?),
                    },
                    strict: format.strict,
                }),
            }
        }
    };

    // `verbosity` is a Chat Completions parameter at the top level, `text.verbosity` here.
    let extras = extra_params(&options.extra_json)?;
    let verbosity = extras.iter().find(|(key, _)| key == "verbosity").map(|(_, value)| *value);
    let verbosity = match (verbosity, model.unknown_params) {
        (Some(value), UnknownParams::Forward) => Some(value),
        (Some(_), _) => {
            model.leave_out("verbosity", &mut dropped)?;
            None
        }
        (None, _) => None,
    };
    let rest: Vec<(&str, &RawValue)> =
        extras.iter().filter(|(key, _)| key != "verbosity").map(|(key, value)| (key.as_str(), *value)).collect();
    let rest = members_json(&rest);

    let body = Body {
        model: &request.model,
        input,
        stream: true,
        store: false,
        max_output_tokens: sampling.max_tokens,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        tools,
        tool_choice,
        parallel_tool_calls: options.parallel_tool_calls,
        text: (format.is_some() || verbosity.is_some()).then_some(Text { format, verbosity }),
        reasoning: non_empty(&options.reasoning_effort).map(|effort| Reasoning { effort }),
        top_logprobs: options.top_logprobs,
        include: if options.logprobs == Some(true) { vec!["message.output_text.logprobs"] } else { Vec::new() },
        user: non_empty(&options.user),
        metadata: options.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
        service_tier: non_empty(&options.service_tier),
    };
    let mut bytes =
        serde_json::to_vec(&body).map_err(|err| WireError::invalid("", format!("cannot encode the request: {err}")))?;
    merge_extra(&mut bytes, &rest, &MODELLED, model, &mut dropped)?;
    Ok(ProviderBody { body: bytes, dropped })
}

/// Members as a JSON object's text (empty for none).
fn members_json(members: &[(&str, &RawValue)]) -> String {
    if members.is_empty() {
        return String::new();
    }
    let mut json = String::from("{");
    for (i, (key, value)) in members.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&serde_json::to_string(key).unwrap_or_default());
        json.push(':');
        json.push_str(value.get());
    }
    json.push('}');
    json
}

fn input_items<'a>(
    messages: &'a [pb::ChatMessage],
    model: &ProviderModel,
    dropped: &mut Vec<String>,
) -> Result<Vec<Item<'a>>, WireError> {
    let mut items = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        if !message.name.is_empty() {
            model.leave_out("messages[].name", dropped)?;
        }
        let role = match message.role.as_str() {
            "developer" => "system",
            role => role,
        };
        match role {
            "system" | "user" => items.push(Item::Message { role, content: content(index, message)? }),
            "assistant" => {
                if !message.reasoning_content.is_empty() {
                    // The API takes back only its own (encrypted) reasoning items.
                    model.leave_out("messages[].reasoning_content", dropped)?;
                }
                let text = content(index, message)?;
                if !matches!(text, Content::Text("")) {
                    items.push(Item::Message { role, content: text });
                }
                if !message.refusal.is_empty() {
                    items.push(Item::Message { role, content: Content::Text(&message.refusal) });
                }
                for call in &message.tool_calls {
                    items.push(Item::FunctionCall {
                        call_id: &call.id,
                        name: &call.function_name,
                        arguments: &call.arguments_json,
                    });
                }
            }
            "tool" => items
                .push(Item::FunctionCallOutput { call_id: &message.tool_call_id, output: content(index, message)? }),
            other => return Err(WireError::invalid(format!("messages[{index}].role"), format!("is {other:?}"))),
        }
    }
    Ok(items)
}

fn content(index: usize, message: &pb::ChatMessage) -> Result<Content<'_>, WireError> {
    if message.parts.is_empty() {
        return Ok(Content::Text(&message.content));
    }
    let mut parts = Vec::with_capacity(message.parts.len() + 1);
    if !message.content.is_empty() {
        parts.push(InputPart::Text { text: &message.content });
    }
    for (part_index, part) in message.parts.iter().enumerate() {
        let part = part
            .part
            .as_ref()
            .ok_or_else(|| WireError::invalid(format!("messages[{index}].content[{part_index}]"), "is empty"))?;
        parts.push(match part {
            Part::Text(text) => InputPart::Text { text },
            Part::ImageUrl(image) => InputPart::Image {
                image_url: &image.url,
                detail: if image.detail.is_empty() { "auto" } else { &image.detail },
            },
            Part::InputAudio(audio) => {
                InputPart::Audio { input_audio: Audio { data: &audio.data, format: &audio.format } }
            }
            Part::File(file) => InputPart::File {
                file_id: non_empty(&file.file_id),
                filename: non_empty(&file.filename),
                file_data: non_empty(&file.file_data),
            },
        });
    }
    Ok(Content::Parts(parts))
}

// ---------------------------------------------------------------------------------------------
// The answer

#[derive(Deserialize)]
struct WireEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    response: Option<WireResponse>,
    #[serde(default)]
    item: Option<WireItem>,
    #[serde(default)]
    item_id: Option<String>,
    #[serde(default)]
    output_index: Option<u64>,
    #[serde(default)]
    delta: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
    #[serde(default)]
    logprobs: Option<Vec<Box<RawValue>>>,
    /// `error` events.
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    param: Option<String>,
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    output: Option<Vec<WireItem>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    incomplete_details: Option<WireIncomplete>,
    #[serde(default)]
    error: Option<FailureBody>,
}

#[derive(Deserialize)]
struct WireItem {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
    #[serde(default)]
    content: Option<Vec<WireContent>>,
    #[serde(default)]
    summary: Option<Vec<WireContent>>,
}

#[derive(Deserialize)]
struct WireContent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    logprobs: Option<Vec<Box<RawValue>>>,
}

#[derive(Deserialize)]
struct WireIncomplete {
    #[serde(default)]
    reason: Option<String>,
}

/// The error of a failed response, or of an `error` event.
#[derive(Default, Deserialize, Serialize)]
struct FailureBody {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    param: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: i64,
    #[serde(default)]
    output_tokens: i64,
    #[serde(default)]
    total_tokens: Option<i64>,
    #[serde(default)]
    input_tokens_details: Option<InputDetails>,
    #[serde(default)]
    output_tokens_details: Option<OutputDetails>,
}

#[derive(Deserialize)]
struct InputDetails {
    #[serde(default)]
    cached_tokens: Option<i64>,
}

#[derive(Deserialize)]
struct OutputDetails {
    #[serde(default)]
    reasoning_tokens: Option<i64>,
}

impl From<WireUsage> for pb::Usage {
    fn from(usage: WireUsage) -> Self {
        pb::Usage {
            prompt_tokens: usage.input_tokens,
            completion_tokens: usage.output_tokens,
            total_tokens: usage.total_tokens.unwrap_or(usage.input_tokens.saturating_add(usage.output_tokens)),
            cost_micros: 0,
            cached_prompt_tokens: usage.input_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0),
            cache_write_tokens: 0,
            reasoning_tokens: usage.output_tokens_details.and_then(|d| d.reasoning_tokens).unwrap_or(0),
        }
    }
}

/// A tool call of the answer as it streams.
#[derive(Debug)]
struct Call {
    index: i32,
    call: pb::ToolCall,
}

/// Turns a Responses API event stream into [`CompleteChunk`]s (see the module docs).
#[derive(Debug)]
pub struct StreamDecoder {
    model: AnswerModel,
    /// Function calls by item id.
    calls: BTreeMap<String, Call>,
    /// Function-call item ids by output index (argument events may name either).
    call_ids: BTreeMap<u64, String>,
    finish_reason: Option<String>,
    usage: Option<pb::Usage>,
    done: bool,
}

/// The event types that end a complete answer.
pub const END_EVENTS: [&str; 2] = ["response.completed", "response.incomplete"];

impl StreamDecoder {
    pub fn new(request: &CompleteRequest) -> Self {
        Self {
            model: AnswerModel::new(&request.model),
            calls: BTreeMap::new(),
            call_ids: BTreeMap::new(),
            finish_reason: None,
            usage: None,
            done: false,
        }
    }

    /// Whether the end of the answer (`response.completed` or `response.incomplete`) was seen.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn chunk(&mut self, fill: impl FnOnce(&mut CompleteChunk)) -> Option<CompleteChunk> {
        let mut chunk = CompleteChunk::default();
        fill(&mut chunk);
        let empty = chunk.delta.is_empty()
            && chunk.refusal_delta.is_empty()
            && chunk.reasoning_delta.is_empty()
            && chunk.tool_call_deltas.is_empty()
            && chunk.logprobs_json.is_empty();
        if empty {
            return None;
        }
        chunk.model = self.model.once();
        Some(chunk)
    }

    /// The chunk for one event, if it carries anything for the caller.
    pub fn on_event(&mut self, event: &SseEvent) -> Result<Option<CompleteChunk>, WireError> {
        let data = event.data.trim();
        if data.is_empty() || data == "[DONE]" {
            return Ok(None);
        }
        let parsed: WireEvent = serde_json::from_str(data)
            .map_err(|err| WireError::protocol(format!("malformed event ({err}): {}", truncate(data))))?;
        self.on_wire_event(parsed)
    }

    fn on_wire_event(&mut self, event: WireEvent) -> Result<Option<CompleteChunk>, WireError> {
        match event.kind.as_str() {
            "response.created" | "response.in_progress" | "response.queued" => {
                if let Some(model) = event.response.and_then(|r| r.model).filter(|m| !m.is_empty()) {
                    self.model.reported.get_or_insert(model);
                }
                Ok(None)
            }
            "response.output_item.added" => {
                let Some(item) = event.item.filter(|i| i.kind == "function_call") else { return Ok(None) };
                Ok(self.start_call(event.output_index, item))
            }
            "response.function_call_arguments.delta" => {
                let delta = event.delta.unwrap_or_default();
                Ok(self.call_arguments(event.item_id, event.output_index, &delta))
            }
            "response.function_call_arguments.done" => {
                // Arguments that were not streamed piece by piece come whole here.
                let id = event.item_id.or_else(|| event.output_index.and_then(|i| self.call_ids.get(&i).cloned()));
                let unstreamed =
                    id.as_ref().and_then(|id| self.calls.get(id)).is_some_and(|c| c.call.arguments_json.is_empty());
                if !unstreamed {
                    return Ok(None);
                }
                Ok(self.call_arguments(id, None, event.arguments.as_deref().unwrap_or_default()))
            }
            "response.output_item.done" => {
                // Arguments that came only whole, with the finished item.
                let Some(item) = event.item.filter(|i| i.kind == "function_call") else { return Ok(None) };
                let id = item.id.clone().or_else(|| event.output_index.and_then(|i| self.call_ids.get(&i).cloned()));
                let streamed =
                    id.as_ref().and_then(|id| self.calls.get(id)).is_some_and(|c| !c.call.arguments_json.is_empty());
                match (id.as_ref().is_some_and(|id| self.calls.contains_key(id)), streamed) {
                    (true, true) => Ok(None),
                    (true, false) => Ok(self.call_arguments(id, None, item.arguments.as_deref().unwrap_or_default())),
                    (false, _) => Ok(self.start_call(event.output_index, item)),
                }
            }
            "response.output_text.delta" => {
                let delta = event.delta.unwrap_or_default();
                let logprobs = logprobs_json(event.logprobs);
                Ok(self.chunk(|c| {
                    c.delta = delta;
                    c.logprobs_json = logprobs;
                }))
            }
            "response.refusal.delta" => {
                let delta = event.delta.unwrap_or_default();
                Ok(self.chunk(|c| c.refusal_delta = delta))
            }
            "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => {
                let delta = event.delta.unwrap_or_default();
                Ok(self.chunk(|c| c.reasoning_delta = delta))
            }
            "response.completed" | "response.incomplete" => {
                let response =
                    event.response.ok_or_else(|| WireError::protocol("a final event without its response"))?;
                Ok(Some(self.finish(response)))
            }
            "response.failed" => {
                let error = event.response.and_then(|r| r.error);
                Err(WireError::Provider(failure(error)))
            }
            "error" => {
                let error = FailureBody { code: event.code, message: event.message, param: event.param };
                Err(WireError::Provider(failure(Some(error))))
            }
            // Done events repeat what the deltas said; other events (built-in tools, audio)
            // carry nothing meshgate relays.
            _ => Ok(None),
        }
    }

    fn start_call(&mut self, output_index: Option<u64>, item: WireItem) -> Option<CompleteChunk> {
        let item_id = item.id.clone().unwrap_or_else(|| format!("output_{}", output_index.unwrap_or_default()));
        let index = self.calls.len() as i32;
        let id = item.call_id.unwrap_or_default();
        let name = item.name.unwrap_or_default();
        let arguments = item.arguments.unwrap_or_default();
        let call = pb::ToolCall {
            id: id.clone(),
            r#type: "function".into(),
            function_name: name.clone(),
            arguments_json: arguments.clone(),
        };
        self.calls.insert(item_id.clone(), Call { index, call });
        if let Some(output_index) = output_index {
            self.call_ids.insert(output_index, item_id);
        }
        self.chunk(|c| {
            c.tool_call_deltas.push(pb::ToolCallDelta { index, id, function_name: name, arguments_delta: arguments });
        })
    }

    fn call_arguments(
        &mut self,
        item_id: Option<String>,
        output_index: Option<u64>,
        delta: &str,
    ) -> Option<CompleteChunk> {
        if delta.is_empty() {
            return None;
        }
        let id = item_id.or_else(|| output_index.and_then(|i| self.call_ids.get(&i).cloned()))?;
        let call = self.calls.get_mut(&id)?;
        call.call.arguments_json.push_str(delta);
        let index = call.index;
        self.chunk(|c| {
            c.tool_call_deltas.push(pb::ToolCallDelta {
                index,
                arguments_delta: delta.to_owned(),
                ..Default::default()
            });
        })
    }

    fn finish(&mut self, response: WireResponse) -> CompleteChunk {
        self.done = true;
        if let Some(model) = response.model.filter(|m| !m.is_empty()) {
            self.model.reported.get_or_insert(model);
        }
        let incomplete = response.incomplete_details.and_then(|d| d.reason);
        let finish = match (response.status.as_deref(), incomplete.as_deref()) {
            (Some("incomplete"), Some("content_filter")) => "content_filter",
            (Some("incomplete"), _) => "length",
            _ if !self.calls.is_empty() => "tool_calls",
            _ => "stop",
        };
        self.finish_reason = Some(finish.to_owned());
        self.usage = response.usage.map(Into::into);
        let mut calls: Vec<&Call> = self.calls.values().collect();
        calls.sort_by_key(|c| c.index);
        CompleteChunk {
            finish_reason: self.finish_reason.take().unwrap_or_default(),
            usage: self.usage.take(),
            tool_calls: calls.into_iter().map(|c| c.call.clone()).collect(),
            model: self.model.once(),
            ..CompleteChunk::default()
        }
    }
}

/// A chunk's `logprobs_json` (the choice's logprobs object) from an event's content logprobs.
fn logprobs_json(logprobs: Option<Vec<Box<RawValue>>>) -> String {
    match logprobs {
        Some(entries) if !entries.is_empty() => {
            serde_json::to_string(&serde_json::json!({"content": entries, "refusal": null})).unwrap_or_default()
        }
        _ => String::new(),
    }
}

/// A failed response's error, classified as an error answer of the OpenAI format is.
fn failure(error: Option<FailureBody>) -> crate::error::ProviderError {
    let body = serde_json::json!({ "error": error.unwrap_or_default() });
    let mut error = provider_error(0, body.to_string().as_bytes());
    if error.message.is_empty() {
        error.message = "the provider reported a failed response".to_owned();
    }
    if error.code.is_empty() {
        error.kind = ProviderErrorKind::Server;
    }
    error
}

/// The chunks of a non-streamed `response` object, as [`StreamDecoder`] would give them.
pub fn decode_response(request: &CompleteRequest, body: &[u8]) -> Result<Vec<CompleteChunk>, WireError> {
    let response: WireResponse = serde_json::from_slice(body).map_err(|err| {
        WireError::protocol(format!("malformed response ({err}): {}", truncate(&String::from_utf8_lossy(body))))
    })?;
    if response.status.as_deref() == Some("failed") {
        return Err(WireError::Provider(failure(response.error)));
    }
    let output = response.output.as_deref().unwrap_or_default();
    let mut decoder = StreamDecoder::new(request);
    if let Some(model) = response.model.as_ref().filter(|m| !m.is_empty()) {
        decoder.model.reported = Some(model.clone());
    }
    let mut chunks = Vec::new();
    let (mut text, mut refusal, mut reasoning, mut logprobs) =
        (String::new(), String::new(), String::new(), Vec::new());
    for item in output {
        match item.kind.as_str() {
            "message" => {
                for part in item.content.as_deref().unwrap_or_default() {
                    match part.kind.as_str() {
                        "output_text" => {
                            text.push_str(part.text.as_deref().unwrap_or_default());
                            logprobs.extend(part.logprobs.iter().flatten().cloned());
                        }
                        "refusal" => refusal.push_str(part.refusal.as_deref().unwrap_or_default()),
                        _ => {}
                    }
                }
            }
            "reasoning" => {
                let parts = item.summary.iter().chain(item.content.iter()).flatten();
                for part in parts.filter(|p| matches!(p.kind.as_str(), "summary_text" | "reasoning_text")) {
                    reasoning.push_str(part.text.as_deref().unwrap_or_default());
                }
            }
            _ => {}
        }
    }
    let logprobs = logprobs_json(Some(logprobs));
    chunks.extend(decoder.chunk(|c| {
        c.delta = text;
        c.refusal_delta = refusal;
        c.reasoning_delta = reasoning;
        c.logprobs_json = logprobs;
    }));
    for (position, item) in output.iter().enumerate().filter(|(_, i)| i.kind == "function_call") {
        let item = WireItem {
            kind: item.kind.clone(),
            id: item.id.clone(),
            call_id: item.call_id.clone(),
            name: item.name.clone(),
            arguments: item.arguments.clone(),
            content: None,
            summary: None,
        };
        chunks.extend(decoder.start_call(Some(position as u64), item));
    }
    chunks.push(decoder.finish(response));
    Ok(chunks)
}
