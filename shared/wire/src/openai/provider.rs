//! What meshgate sends an OpenAI-compatible provider (OpenAI, Azure OpenAI, vLLM, Ollama,
//! OpenRouter, ...) and how it reads the answer back.
//!
//! - [`request_body`]: every canonical field in its OpenAI place, always streaming with usage;
//!   `max_completion_tokens` instead of `max_tokens` for the models that want it; `top_k` and
//!   `ChatOptions.extra_json` by the provider's [`UnknownParams`] policy.
//! - [`StreamDecoder`]: the SSE answer → [`CompleteChunk`]s. The role-only opening chunk is not
//!   forwarded, so the first chunk out carries real content (text, a tool-call piece, refusal,
//!   reasoning or logprobs) and the model; the last, on `[DONE]`, carries the finish reason, the
//!   usage and the tool calls assembled from their pieces.
//! - [`decode_completion`]: the same chunks from a non-streamed `chat.completion` (providers that
//!   ignore `stream`).
//! - [`provider_error`]: an error answer classified, `context_length_exceeded` kept.

use std::collections::BTreeMap;

use meshgate_proto::common::v1 as pb;
use meshgate_proto::common::v1::content_part::Part;
use meshgate_proto::sync::v1::{CompleteChunk, CompleteRequest};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{
    CONTEXT_LENGTH_EXCEEDED, ProviderError, ProviderErrorKind, WireError, kind_of_status, loose_message, truncate,
};
use crate::provider::{AnswerModel, ProviderBody, ProviderModel, UnknownParams, merge_extra};
use crate::sse::SseEvent;
use crate::text::raw_json;

/// The fields of the body meshgate writes itself; `extra_json` may not set them.
const MODELLED: [&str; 25] = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning_effort",
    "n",
    "logprobs",
    "top_logprobs",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "user",
    "metadata",
    "service_tier",
];

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: Vec<MessageOut<'a>>,
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ToolOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoiceOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<ResponseFormatOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    logit_bias: BTreeMap<&'a str, f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_tier: Option<&'a str>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct MessageOut<'a> {
    role: &'a str,
    /// `null` for an assistant message that only calls tools or refuses.
    content: ContentOut<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallOut<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ContentOut<'a> {
    Null,
    Text(&'a str),
    Parts(Vec<PartOut<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum PartOut<'a> {
    Text { text: &'a str },
    ImageUrl { image_url: ImageOut<'a> },
    InputAudio { input_audio: AudioOut<'a> },
    File { file: FileOut<'a> },
}

#[derive(Serialize)]
struct ImageOut<'a> {
    url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
}

#[derive(Serialize)]
struct AudioOut<'a> {
    data: &'a str,
    format: &'a str,
}

#[derive(Serialize)]
struct FileOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    file_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    filename: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file_data: Option<&'a str>,
}

#[derive(Serialize)]
struct ToolCallOut<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    function: FunctionCallOut<'a>,
}

#[derive(Serialize)]
struct FunctionCallOut<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[derive(Serialize)]
struct ToolOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionOut<'a>,
}

#[derive(Serialize)]
struct FunctionOut<'a> {
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
enum ToolChoiceOut<'a> {
    Mode(&'static str),
    Named {
        #[serde(rename = "type")]
        kind: &'static str,
        function: NamedFunction<'a>,
    },
}

#[derive(Serialize)]
struct NamedFunction<'a> {
    name: &'a str,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormatOut<'a> {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaOut<'a> },
}

#[derive(Serialize)]
struct JsonSchemaOut<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

fn non_empty(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// The Chat Completions body for `request` at a provider whose model takes requests as `model`
/// says. `request` is a checked canonical request ([`crate::ChatRequest::check`]).
pub fn request_body(request: &CompleteRequest, model: &ProviderModel) -> Result<ProviderBody, WireError> {
    let mut dropped = Vec::new();
    let (default_sampling, default_options) = (pb::SamplingParams::default(), pb::ChatOptions::default());
    let sampling = request.sampling.as_ref().unwrap_or(&default_sampling);
    let options = request.options.as_ref().unwrap_or(&default_options);
    let mut messages = Vec::with_capacity(request.messages.len());
    for (index, message) in request.messages.iter().enumerate() {
        if !message.reasoning_content.is_empty() {
            // Reasoning replayed to an OpenAI-format provider is refused by some (DeepSeek) and
            // ignored by the rest: left out, and said so.
            if !dropped.iter().any(|d| d == "messages[].reasoning_content") {
                dropped.push("messages[].reasoning_content".to_owned());
            }
        }
        if message.is_error && !dropped.iter().any(|d| d == "messages[].is_error") {
            // Chat Completions has no field for a failed tool result: its content says it.
            dropped.push("messages[].is_error".to_owned());
        }
        messages.push(message_out(index, message)?);
    }
    let top_k = match (sampling.top_k, model.unknown_params) {
        (Some(k), UnknownParams::Forward) => Some(k),
        (Some(_), _) => {
            model.leave_out("top_k", &mut dropped)?;
            None
        }
        (None, _) => None,
    };
    let mut tools = Vec::with_capacity(options.tools.len());
    for (index, tool) in options.tools.iter().enumerate() {
        let parameters = match tool.parameters_json.as_str() {
            "" => None,
            json => Some(raw_json(|| format!("tools[{index}].function.parameters"), json)?),
        };
        tools.push(ToolOut {
            kind: "function",
            function: FunctionOut { name: &tool.name, description: &tool.description, parameters, strict: tool.strict },
        });
    }
    let tool_choice = options.tool_choice.as_ref().and_then(|choice| {
        use pb::tool_choice::Mode;
        match Mode::try_from(choice.mode).unwrap_or(Mode::Unspecified) {
            Mode::Unspecified => None,
            Mode::Auto => Some(ToolChoiceOut::Mode("auto")),
            Mode::None => Some(ToolChoiceOut::Mode("none")),
            Mode::Required => Some(ToolChoiceOut::Mode("required")),
            Mode::Function => {
                Some(ToolChoiceOut::Named { kind: "function", function: NamedFunction { name: &choice.function_name } })
            }
        }
    });
    let response_format = match options.response_format.as_ref() {
        None => None,
        Some(format) => {
            use pb::response_format::Kind;
            match Kind::try_from(format.kind).unwrap_or(Kind::Unspecified) {
                Kind::Unspecified => None,
                Kind::Text => Some(ResponseFormatOut::Text),
                Kind::JsonObject => Some(ResponseFormatOut::JsonObject),
                Kind::JsonSchema => Some(ResponseFormatOut::JsonSchema {
                    json_schema: JsonSchemaOut {
                        name: &format.name,
                        description: &format.description,
                        schema: match format.schema_json.as_str() {
                            "" => None,
                            json => Some(raw_json(|| "response_format.json_schema.schema".into(), json)?),
                        },
                        strict: format.strict,
                    },
                }),
            }
        }
    };
    let body = Body {
        model: &request.model,
        messages,
        stream: true,
        stream_options: StreamOptions { include_usage: true },
        max_tokens: sampling.max_tokens.filter(|_| !model.max_completion_tokens),
        max_completion_tokens: sampling.max_tokens.filter(|_| model.max_completion_tokens),
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        top_k,
        seed: sampling.seed,
        stop: &sampling.stop,
        tools,
        tool_choice,
        parallel_tool_calls: options.parallel_tool_calls,
        response_format,
        reasoning_effort: non_empty(&options.reasoning_effort),
        n: options.n,
        logprobs: options.logprobs,
        top_logprobs: options.top_logprobs,
        frequency_penalty: options.frequency_penalty,
        presence_penalty: options.presence_penalty,
        logit_bias: options.logit_bias.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
        user: non_empty(&options.user),
        metadata: options.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
        service_tier: non_empty(&options.service_tier),
    };
    let mut bytes =
        serde_json::to_vec(&body).map_err(|err| WireError::invalid("", format!("cannot encode the request: {err}")))?;
    merge_extra(&mut bytes, &options.extra_json, &MODELLED, model, &mut dropped)?;
    Ok(ProviderBody { body: bytes, dropped })
}

fn message_out(index: usize, message: &pb::ChatMessage) -> Result<MessageOut<'_>, WireError> {
    let content = if !message.parts.is_empty() {
        let mut parts = Vec::with_capacity(message.parts.len() + 1);
        // Unchecked requests may carry text beside their parts; it leads them.
        if !message.content.is_empty() {
            parts.push(PartOut::Text { text: &message.content });
        }
        for (part_index, part) in message.parts.iter().enumerate() {
            let part = part
                .part
                .as_ref()
                .ok_or_else(|| WireError::invalid(format!("messages[{index}].content[{part_index}]"), "is empty"))?;
            parts.push(match part {
                Part::Text(text) => PartOut::Text { text },
                Part::ImageUrl(image) => {
                    PartOut::ImageUrl { image_url: ImageOut { url: &image.url, detail: non_empty(&image.detail) } }
                }
                Part::InputAudio(audio) => {
                    PartOut::InputAudio { input_audio: AudioOut { data: &audio.data, format: &audio.format } }
                }
                Part::File(file) => PartOut::File {
                    file: FileOut {
                        file_id: non_empty(&file.file_id),
                        filename: non_empty(&file.filename),
                        file_data: non_empty(&file.file_data),
                    },
                },
            });
        }
        ContentOut::Parts(parts)
    } else if message.role == "assistant"
        && message.content.is_empty()
        && (!message.tool_calls.is_empty() || !message.refusal.is_empty())
    {
        ContentOut::Null
    } else {
        ContentOut::Text(&message.content)
    };
    Ok(MessageOut {
        role: if message.role == "developer" { "system" } else { &message.role },
        content,
        refusal: non_empty(&message.refusal),
        name: non_empty(&message.name),
        tool_call_id: non_empty(&message.tool_call_id),
        tool_calls: message
            .tool_calls
            .iter()
            .map(|call| ToolCallOut {
                id: &call.id,
                kind: if call.r#type.is_empty() { "function" } else { &call.r#type },
                function: FunctionCallOut { name: &call.function_name, arguments: &call.arguments_json },
            })
            .collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// The answer

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Option<Vec<WireChoice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    index: Option<u32>,
    /// Streamed answers carry `delta`, whole ones `message`.
    #[serde(default, alias = "message")]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    /// The name some servers (vLLM, OpenRouter) give the reasoning text.
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Deserialize)]
struct WireToolCall {
    #[serde(default)]
    index: Option<i32>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunction>,
}

#[derive(Deserialize)]
struct WireFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: i64,
    #[serde(default)]
    completion_tokens: i64,
    #[serde(default)]
    total_tokens: Option<i64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
    /// DeepSeek's name for cached prompt tokens.
    #[serde(default)]
    prompt_cache_hit_tokens: Option<i64>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<i64>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<i64>,
}

impl From<WireUsage> for pb::Usage {
    fn from(usage: WireUsage) -> Self {
        let cached = usage.prompt_tokens_details.and_then(|d| d.cached_tokens).or(usage.prompt_cache_hit_tokens);
        pb::Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens.unwrap_or(usage.prompt_tokens.saturating_add(usage.completion_tokens)),
            cost_micros: 0,
            cached_prompt_tokens: cached.unwrap_or(0),
            cache_write_tokens: 0,
            reasoning_tokens: usage.completion_tokens_details.and_then(|d| d.reasoning_tokens).unwrap_or(0),
        }
    }
}

/// Turns the provider's SSE events into [`CompleteChunk`]s (see the module docs).
#[derive(Debug)]
pub struct StreamDecoder {
    model: AnswerModel,
    finish_reason: Option<String>,
    usage: Option<pb::Usage>,
    tool_calls: BTreeMap<i32, pb::ToolCall>,
    done: bool,
}

/// The event that ends a complete answer.
pub const END_MARKER: &str = "[DONE]";

impl StreamDecoder {
    pub fn new(request: &CompleteRequest) -> Self {
        Self {
            model: AnswerModel::new(&request.model),
            finish_reason: None,
            usage: None,
            tool_calls: BTreeMap::new(),
            done: false,
        }
    }

    /// Whether the end of the answer (`[DONE]`) was seen.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The chunk for one event, if it carries anything for the caller.
    pub fn on_event(&mut self, event: &SseEvent) -> Result<Option<CompleteChunk>, WireError> {
        let data = event.data.trim();
        if event.event.as_deref() == Some("error") {
            return Err(WireError::Provider(provider_error(0, data.as_bytes())));
        }
        if data == END_MARKER {
            self.done = true;
            return Ok(Some(self.last_chunk()));
        }
        let chunk: WireChunk = serde_json::from_str(data)
            .map_err(|err| WireError::protocol(format!("malformed chunk ({err}): {}", truncate(data))))?;
        if chunk.error.as_ref().is_some_and(|e| e.get() != "null") {
            return Err(WireError::Provider(provider_error(0, data.as_bytes())));
        }
        Ok(self.on_chunk(chunk))
    }

    fn on_chunk(&mut self, chunk: WireChunk) -> Option<CompleteChunk> {
        if self.model.reported.is_none()
            && let Some(model) = chunk.model.filter(|m| !m.is_empty())
        {
            self.model.reported = Some(model);
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage.into());
        }
        let mut out = CompleteChunk::default();
        // Only the first choice is relayed: a chunk has no choice index.
        for choice in chunk.choices.unwrap_or_default().into_iter().filter(|c| c.index.unwrap_or(0) == 0) {
            if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty()) {
                self.finish_reason = Some(reason);
            }
            if let Some(logprobs) = choice.logprobs.filter(|l| l.get() != "null") {
                out.logprobs_json = String::from(logprobs.get());
            }
            let Some(delta) = choice.delta else { continue };
            out.delta.push_str(delta.content.as_deref().unwrap_or_default());
            out.refusal_delta.push_str(delta.refusal.as_deref().unwrap_or_default());
            out.reasoning_delta.push_str(delta.reasoning_content.or(delta.reasoning).as_deref().unwrap_or_default());
            for (position, piece) in delta.tool_calls.unwrap_or_default().into_iter().enumerate() {
                let index = piece.index.unwrap_or(position as i32);
                let call = self
                    .tool_calls
                    .entry(index)
                    .or_insert_with(|| pb::ToolCall { r#type: "function".into(), ..pb::ToolCall::default() });
                let id = piece.id.unwrap_or_default();
                if call.id.is_empty() {
                    call.id.clone_from(&id);
                }
                let (name, arguments) = piece.function.map_or((None, None), |f| (f.name, f.arguments));
                let name = name.unwrap_or_default();
                let arguments = arguments.unwrap_or_default();
                call.function_name.push_str(&name);
                call.arguments_json.push_str(&arguments);
                out.tool_call_deltas.push(pb::ToolCallDelta {
                    index,
                    id,
                    function_name: name,
                    arguments_delta: arguments,
                });
            }
        }
        let carries = !out.delta.is_empty()
            || !out.refusal_delta.is_empty()
            || !out.reasoning_delta.is_empty()
            || !out.tool_call_deltas.is_empty()
            || !out.logprobs_json.is_empty();
        if !carries {
            return None;
        }
        out.model = self.model.once();
        Some(out)
    }

    fn last_chunk(&mut self) -> CompleteChunk {
        CompleteChunk {
            finish_reason: self.finish_reason.take().unwrap_or_default(),
            usage: self.usage.take(),
            tool_calls: std::mem::take(&mut self.tool_calls).into_values().collect(),
            model: self.model.once(),
            ..CompleteChunk::default()
        }
    }
}

/// The chunks of a non-streamed `chat.completion` answer, as [`StreamDecoder`] would give them.
pub fn decode_completion(request: &CompleteRequest, body: &[u8]) -> Result<Vec<CompleteChunk>, WireError> {
    let completion: WireChunk = serde_json::from_slice(body).map_err(|err| {
        WireError::protocol(format!("malformed completion ({err}): {}", truncate(&String::from_utf8_lossy(body))))
    })?;
    if completion.error.as_ref().is_some_and(|e| e.get() != "null") {
        return Err(WireError::Provider(provider_error(0, body)));
    }
    if completion.choices.as_ref().is_none_or(Vec::is_empty) {
        return Err(WireError::protocol("a completion without choices"));
    }
    // As a stream that said everything in one event.
    let mut decoder = StreamDecoder::new(request);
    let mut chunks: Vec<CompleteChunk> = decoder.on_chunk(completion).into_iter().collect();
    chunks.push(decoder.last_chunk());
    Ok(chunks)
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Deserialize)]
struct ErrorEnvelope {
    #[serde(default)]
    error: Option<ErrorBody>,
    /// vLLM answers `{"object": "error", "message": ..., "type": ..., "code": 400}`.
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    param: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

/// Messages of context overflows from servers that give no code (vLLM, llama.cpp, TGI).
const CONTEXT_MESSAGES: [&str; 5] = [
    "maximum context length",
    "context length exceeded",
    "context_length_exceeded",
    "exceeds the context window",
    "is longer than the model's context length",
];

/// An OpenAI-format error answer (`status` 0 for one inside a stream), classified.
pub fn provider_error(status: u16, body: &[u8]) -> ProviderError {
    let envelope = serde_json::from_slice::<ErrorEnvelope>(body).ok();
    let (message, code, param) = match envelope {
        Some(ErrorEnvelope { error: Some(error), .. }) => {
            let code = match error.code {
                Some(serde_json::Value::String(code)) => code,
                _ => error.kind.unwrap_or_default(),
            };
            (error.message.map(|m| truncate(&m)), code, error.param.unwrap_or_default())
        }
        Some(ErrorEnvelope { message: Some(message), kind, .. }) => {
            (Some(truncate(&message)), kind.unwrap_or_default(), String::new())
        }
        _ => (None, String::new(), String::new()),
    };
    let message = message.unwrap_or_else(|| loose_message(body));
    let mut kind = if status == 0 { ProviderErrorKind::Server } else { kind_of_status(status) };
    let lowered = message.to_ascii_lowercase();
    let overflow = code == CONTEXT_LENGTH_EXCEEDED
        || (matches!(status, 0 | 400 | 413 | 422) && CONTEXT_MESSAGES.iter().any(|m| lowered.contains(m)));
    if overflow {
        kind = ProviderErrorKind::ContextLengthExceeded;
        let param = if param.is_empty() { "messages".to_owned() } else { param };
        return ProviderError { kind, status, message, code: CONTEXT_LENGTH_EXCEEDED.to_owned(), param };
    }
    if status == 0 {
        kind = match code.as_str() {
            "rate_limit_exceeded" | "rate_limit_error" => ProviderErrorKind::RateLimited,
            "invalid_request_error" => ProviderErrorKind::InvalidRequest,
            _ => ProviderErrorKind::Server,
        };
    }
    ProviderError { kind, status, message, code, param }
}

#[cfg(test)]
mod tests;
