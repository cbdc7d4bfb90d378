//! What meshgate sends Anthropic's Messages API (`POST <base>/messages`, `anthropic-version:
//! 2023-06-01`) and how it reads the answer back.
//!
//! Request ([`request_body`]):
//! - `system` messages become the top-level `system` prompt (joined by a blank line, wherever
//!   they stand); consecutive turns of one role are merged (Anthropic alternates roles), empty
//!   text left out;
//! - content parts become blocks: text; images by URL or, for `data:` URIs, as base64 `source`s;
//!   PDFs given as `file_data` as `document` blocks. Audio and provider file ids have no
//!   Anthropic equivalent and are refused (the router avoids such targets by capability);
//! - assistant tool calls become `tool_use` blocks (the arguments must be a JSON object), `tool`
//!   messages `tool_result` blocks (text, or text and images) at the head of a user turn; a
//!   replayed refusal is sent as the text it was; replayed reasoning cannot be (Anthropic needs
//!   the signature of its own thinking blocks) and is left out, listed;
//! - tools with `input_schema`; `tool_choice` auto/none/required/named → `auto`/`none`/`any`/
//!   `tool`; `parallel_tool_calls: false` → `disable_parallel_tool_use`;
//! - structured output: by default through a forced tool, [`JSON_TOOL`], whose input is the
//!   answer (every Claude model with tool use takes it; the decoder turns its input back into
//!   content), or `output_config.format` for models whose catalog entry says they have native
//!   structured outputs. With tools of the client's own, the choice becomes `any` (a real tool
//!   or the answer), so agents keep calling tools before they answer;
//! - `reasoning_effort` → `thinking` with a budget ([`thinking_budget`], below `max_tokens`);
//!   Anthropic refuses thinking beside a forced tool, a temperature, `top_k` or a `top_p` under
//!   0.95, so those are left out (listed) when thinking is on, and thinking is left out when a
//!   tool is forced, and in a tool-use loop (the last assistant turn called tools: Anthropic
//!   wants that turn's signed thinking replayed, which the canonical request does not carry);
//! - `max_tokens` (required): the request's, else the model's catalog limit, else
//!   [`DEFAULT_MAX_TOKENS`] (plus the thinking budget, which counts against it); temperature clamped to Anthropic's 0–1; `top_p`, `top_k`, stop
//!   sequences kept; `user` → `metadata.user_id`. `seed`, penalties, `logit_bias`, logprobs and
//!   `metadata` have no equivalent: left out and listed (refused under
//!   [`crate::UnknownParams::Refuse`]); `n` above 1 is refused.
//!
//! Answer ([`StreamDecoder`], same chunk sequence as the OpenAI decoder): `text_delta` → text,
//! `input_json_delta` → `tool_call_deltas` (the index counts tool calls, not blocks),
//! `thinking_delta` → `reasoning_delta`; usage with cache reads and writes (the prompt counts
//! them, as OpenAI's does); stop reasons mapped (`tool_use` → `tool_calls`, `max_tokens` →
//! `length`, `refusal` → `content_filter`, the rest → `stop`).

use std::collections::BTreeMap;

use meshgate_proto::common::v1 as pb;
use meshgate_proto::common::v1::content_part::Part;
use meshgate_proto::sync::v1::{CompleteChunk, CompleteRequest};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{
    CONTEXT_LENGTH_EXCEEDED, ProviderError, ProviderErrorKind, WireError, kind_of_status, loose_message, truncate,
};
use crate::provider::{AnswerModel, ProviderBody, ProviderModel, merge_extra};
use crate::sse::SseEvent;
use crate::text::{DataUri, raw_json};

/// The `anthropic-version` header meshgate speaks.
pub const API_VERSION: &str = "2023-06-01";
/// `max_tokens` when neither the request nor the model's catalog entry gives one.
pub const DEFAULT_MAX_TOKENS: i64 = 4096;
/// The forced tool whose input is a structured answer.
pub const JSON_TOOL: &str = "json_response";
/// Anthropic's smallest thinking budget.
pub const MIN_THINKING_BUDGET: i64 = 1024;
/// Image types Anthropic takes inline.
const IMAGE_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

/// The fields of the body meshgate writes itself; `extra_json` may not set them.
const MODELLED: [&str; 15] = [
    "model",
    "max_tokens",
    "messages",
    "system",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "tools",
    "tool_choice",
    "thinking",
    "output_config",
    "metadata",
    "service_tier",
];

/// The thinking budget of a reasoning effort (`None` for no thinking).
pub fn thinking_budget(effort: &str) -> Option<i64> {
    match effort {
        "minimal" => Some(MIN_THINKING_BUDGET),
        "low" => Some(2048),
        "medium" => Some(8192),
        "high" => Some(16_384),
        "xhigh" => Some(32_768),
        _ => None,
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: i64,
    messages: Vec<Turn<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<i32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ToolOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoiceOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<Thinking>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_config: Option<OutputConfig<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_tier: Option<&'a str>,
}

#[derive(Serialize)]
struct Turn<'a> {
    role: &'static str,
    content: Vec<Block<'a>>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text {
        text: &'a str,
    },
    Image {
        source: Source<'a>,
    },
    Document {
        source: Source<'a>,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: &'a RawValue,
    },
    ToolResult {
        tool_use_id: &'a str,
        content: ToolResultContent<'a>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
    },
}

#[derive(Serialize)]
#[serde(untagged)]
enum ToolResultContent<'a> {
    Text(&'a str),
    Blocks(Vec<Block<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Source<'a> {
    Url { url: &'a str },
    Base64 { media_type: &'a str, data: &'a str },
}

#[derive(Serialize)]
struct ToolOut<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
    input_schema: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    strict: Option<bool>,
}

#[derive(Serialize)]
struct ToolChoiceOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Serialize)]
struct Thinking {
    #[serde(rename = "type")]
    kind: &'static str,
    budget_tokens: i64,
}

#[derive(Serialize)]
struct OutputConfig<'a> {
    format: OutputFormat<'a>,
}

#[derive(Serialize)]
struct OutputFormat<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    schema: &'a RawValue,
}

#[derive(Serialize)]
struct Metadata<'a> {
    user_id: &'a str,
}

/// How a request asks for a structured answer at Anthropic.
enum StructuredOutput<'a> {
    None,
    /// The forced [`JSON_TOOL`], with the answer's schema as its input schema.
    ForcedTool {
        schema: &'a RawValue,
        description: &'a str,
    },
    Native {
        schema: &'a RawValue,
    },
}

fn any_object() -> &'static RawValue {
    serde_json::from_str(r#"{"type":"object"}"#).expect("a valid JSON object")
}

fn empty_object() -> &'static RawValue {
    serde_json::from_str("{}").expect("a valid JSON object")
}

fn structured_output<'a>(
    options: &'a pb::ChatOptions,
    model: &ProviderModel,
) -> Result<StructuredOutput<'a>, WireError> {
    use pb::response_format::Kind;
    let Some(format) = &options.response_format else { return Ok(StructuredOutput::None) };
    Ok(match Kind::try_from(format.kind).unwrap_or(Kind::Unspecified) {
        Kind::Unspecified | Kind::Text => StructuredOutput::None,
        Kind::JsonObject => StructuredOutput::ForcedTool { schema: any_object(), description: "" },
        Kind::JsonSchema => {
            let schema = match format.schema_json.as_str() {
                "" => any_object(),
                json => raw_json(|| "response_format.json_schema.schema".into(), json)?,
            };
            if model.native_structured_output && !format.schema_json.is_empty() {
                StructuredOutput::Native { schema }
            } else {
                StructuredOutput::ForcedTool { schema, description: &format.description }
            }
        }
    })
}

/// The Messages API body for `request` (a checked canonical request), streaming.
pub fn request_body(request: &CompleteRequest, model: &ProviderModel) -> Result<ProviderBody, WireError> {
    let mut dropped = Vec::new();
    let (default_sampling, default_options) = (pb::SamplingParams::default(), pb::ChatOptions::default());
    let sampling = request.sampling.as_ref().unwrap_or(&default_sampling);
    let options = request.options.as_ref().unwrap_or(&default_options);
    let structured = structured_output(options, model)?;
    if matches!(structured, StructuredOutput::ForcedTool { .. })
        && options.response_format.as_ref().is_some_and(|f| f.strict == Some(true))
    {
        // A forced tool's input follows its schema as the model sees fit, not strictly.
        model.leave_out("response_format.json_schema.strict", &mut dropped)?;
    }
    let (system, messages) = turns(&request.messages, &mut dropped)?;
    if messages.is_empty() {
        return Err(WireError::invalid(
            "messages",
            "needs a user or assistant message with content for an Anthropic provider",
        ));
    }
    let effort_budget = thinking_budget(&options.reasoning_effort);
    let max_tokens =
        sampling.max_tokens.or((model.max_output_tokens > 0).then_some(model.max_output_tokens)).unwrap_or(
            // Thinking counts against max_tokens: the stated default is left for the answer.
            DEFAULT_MAX_TOKENS + effort_budget.unwrap_or(0),
        );

    let (tools, tool_choice) = tools_and_choice(options, model, &structured, &mut dropped)?;
    let forced = tool_choice.as_ref().is_some_and(|c| matches!(c.kind, "any" | "tool"));
    // With thinking on, Anthropic wants the last assistant turn of a tool-use loop to start with
    // its own signed thinking block, which a replayed conversation cannot carry (the canonical
    // request keeps reasoning text, not Anthropic's signatures): such a request goes without.
    let in_tool_loop =
        request.messages.iter().rev().find(|m| m.role == "assistant").is_some_and(|m| !m.tool_calls.is_empty());
    let mut thinking = None;
    if let Some(budget) = effort_budget {
        let budget = budget.min(max_tokens - 1);
        if forced || in_tool_loop || budget < MIN_THINKING_BUDGET {
            model.leave_out("reasoning_effort", &mut dropped)?;
        } else {
            thinking = Some(Thinking { kind: "enabled", budget_tokens: budget });
        }
    }
    let mut temperature = sampling.temperature.map(|t| t.clamp(0.0, 1.0));
    let mut top_k = sampling.top_k;
    let mut top_p = sampling.top_p;
    if thinking.is_some() {
        if temperature.take().is_some() {
            model.leave_out("temperature", &mut dropped)?;
        }
        if top_k.take().is_some() {
            model.leave_out("top_k", &mut dropped)?;
        }
        if top_p.is_some_and(|p| p < 0.95) {
            top_p = None;
            model.leave_out("top_p", &mut dropped)?;
        }
    }

    if options.n.is_some_and(|n| n > 1) {
        return Err(WireError::unsupported("n", "must be 1 for an Anthropic provider (one answer per request)"));
    }
    let unsupported = [
        ("seed", sampling.seed.is_some()),
        ("frequency_penalty", options.frequency_penalty.is_some()),
        ("presence_penalty", options.presence_penalty.is_some()),
        ("logit_bias", !options.logit_bias.is_empty()),
        ("logprobs", options.logprobs == Some(true)),
        ("top_logprobs", options.top_logprobs.is_some()),
        ("metadata", !options.metadata.is_empty()),
        ("service_tier", !matches!(options.service_tier.as_str(), "" | "auto" | "standard_only")),
    ];
    for (field, set) in unsupported {
        if set {
            model.leave_out(field, &mut dropped)?;
        }
    }

    let body = Body {
        model: &request.model,
        max_tokens,
        messages,
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        stream: true,
        temperature,
        top_p,
        top_k,
        stop_sequences: &sampling.stop,
        tools,
        tool_choice,
        thinking,
        output_config: match structured {
            StructuredOutput::Native { schema } => {
                Some(OutputConfig { format: OutputFormat { kind: "json_schema", schema } })
            }
            _ => None,
        },
        metadata: (!options.user.is_empty()).then_some(Metadata { user_id: &options.user }),
        service_tier: (!options.service_tier.is_empty()
            && matches!(options.service_tier.as_str(), "auto" | "standard_only"))
        .then_some(options.service_tier.as_str()),
    };
    let mut bytes =
        serde_json::to_vec(&body).map_err(|err| WireError::invalid("", format!("cannot encode the request: {err}")))?;
    merge_extra(&mut bytes, &options.extra_json, &MODELLED, model, &mut dropped)?;
    Ok(ProviderBody { body: bytes, dropped })
}

/// The system prompt's pieces and the alternating turns.
fn turns<'a>(
    messages: &'a [pb::ChatMessage],
    dropped: &mut Vec<String>,
) -> Result<(Vec<&'a str>, Vec<Turn<'a>>), WireError> {
    let mut system = Vec::new();
    let mut turns: Vec<Turn<'a>> = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        let (role, blocks, tool_result) = match message.role.as_str() {
            "system" | "developer" => {
                if !message.content.is_empty() {
                    system.push(message.content.as_str());
                }
                for part in message.parts.iter().filter_map(|p| p.part.as_ref()) {
                    if let Part::Text(text) = part
                        && !text.is_empty()
                    {
                        system.push(text);
                    }
                }
                continue;
            }
            "user" => ("user", content_blocks(index, message)?, false),
            "assistant" => {
                if !message.reasoning_content.is_empty() && !dropped.iter().any(|d| d == "messages[].reasoning_content")
                {
                    dropped.push("messages[].reasoning_content".to_owned());
                }
                let mut blocks = content_blocks(index, message)?;
                if !message.refusal.is_empty() {
                    blocks.push(Block::Text { text: &message.refusal });
                }
                for (call_index, call) in message.tool_calls.iter().enumerate() {
                    let field = || format!("messages[{index}].tool_calls[{call_index}].function.arguments");
                    let input = match call.arguments_json.trim() {
                        "" => empty_object(),
                        json => raw_json(field, json)?,
                    };
                    if !input.get().starts_with('{') {
                        return Err(WireError::unsupported(field(), "must be a JSON object for an Anthropic provider"));
                    }
                    blocks.push(Block::ToolUse { id: &call.id, name: &call.function_name, input });
                }
                ("assistant", blocks, false)
            }
            "tool" => {
                let content = if message.parts.is_empty() {
                    ToolResultContent::Text(&message.content)
                } else {
                    ToolResultContent::Blocks(content_blocks(index, message)?)
                };
                let block =
                    Block::ToolResult { tool_use_id: &message.tool_call_id, content, is_error: message.is_error };
                ("user", vec![block], true)
            }
            other => return Err(WireError::invalid(format!("messages[{index}].role"), format!("is {other:?}"))),
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some(last) if last.role == role => {
                if tool_result {
                    // Tool results lead their user turn, as Anthropic requires.
                    let at = last.content.iter().take_while(|b| matches!(b, Block::ToolResult { .. })).count();
                    last.content.splice(at..at, blocks);
                } else {
                    last.content.extend(blocks);
                }
            }
            _ => turns.push(Turn { role, content: blocks }),
        }
    }
    Ok((system, turns))
}

/// A message's text and parts as blocks (empty text left out).
fn content_blocks(index: usize, message: &pb::ChatMessage) -> Result<Vec<Block<'_>>, WireError> {
    let mut blocks = Vec::with_capacity(message.parts.len().max(1));
    if !message.content.is_empty() {
        blocks.push(Block::Text { text: &message.content });
    }
    for (part_index, part) in message.parts.iter().enumerate() {
        let field = |name: &str| format!("messages[{index}].content[{part_index}].{name}");
        match part.part.as_ref() {
            None => {}
            Some(Part::Text(text)) if !text.is_empty() => blocks.push(Block::Text { text }),
            Some(Part::Text(_)) => {}
            Some(Part::ImageUrl(image)) => {
                let source = match DataUri::parse(&image.url) {
                    Some(uri) if uri.base64 && IMAGE_TYPES.contains(&uri.media_type) => {
                        Source::Base64 { media_type: uri.media_type, data: uri.data }
                    }
                    Some(_) => {
                        return Err(WireError::unsupported(
                            field("image_url.url"),
                            format!(
                                "must be a base64 data URI of {} for an Anthropic provider",
                                IMAGE_TYPES.join(", ")
                            ),
                        ));
                    }
                    None => Source::Url { url: &image.url },
                };
                blocks.push(Block::Image { source });
            }
            Some(Part::InputAudio(_)) => {
                return Err(WireError::unsupported(
                    field("input_audio"),
                    "cannot be sent to an Anthropic provider (no audio input)",
                ));
            }
            Some(Part::File(file)) => match DataUri::parse(&file.file_data) {
                Some(uri) if uri.base64 && uri.media_type == "application/pdf" => {
                    blocks.push(Block::Document {
                        source: Source::Base64 { media_type: uri.media_type, data: uri.data },
                    });
                }
                _ => {
                    return Err(WireError::unsupported(
                        field("file"),
                        "must be a PDF given as file_data (data:application/pdf;base64,...) for an Anthropic provider",
                    ));
                }
            },
        }
    }
    Ok(blocks)
}

type ToolsAndChoice<'a> = (Vec<ToolOut<'a>>, Option<ToolChoiceOut<'a>>);

fn tools_and_choice<'a>(
    options: &'a pb::ChatOptions,
    model: &ProviderModel,
    structured: &StructuredOutput<'a>,
    dropped: &mut Vec<String>,
) -> Result<ToolsAndChoice<'a>, WireError> {
    use pb::tool_choice::Mode;
    let mode =
        options.tool_choice.as_ref().map_or(Mode::Unspecified, |c| Mode::try_from(c.mode).unwrap_or(Mode::Unspecified));
    let named = options.tool_choice.as_ref().map_or("", |c| c.function_name.as_str());
    let json_tool = match structured {
        StructuredOutput::ForcedTool { schema, description } => Some(ToolOut {
            name: JSON_TOOL,
            description: if description.is_empty() {
                "Give your final answer by calling this tool: its input is the answer, following the input schema."
            } else {
                description
            },
            input_schema: schema,
            strict: None,
        }),
        _ => None,
    };
    let mut tools = Vec::with_capacity(options.tools.len() + 1);
    // With tool_choice none and a forced answer, the client's tools are not to be called:
    // only the answer tool is sent.
    let client_tools = !(json_tool.is_some() && mode == Mode::None);
    if client_tools {
        for (index, tool) in options.tools.iter().enumerate() {
            let field = || format!("tools[{index}].function.parameters");
            if json_tool.is_some() && tool.name == JSON_TOOL {
                return Err(WireError::unsupported(
                    format!("tools[{index}].function.name"),
                    format!("{JSON_TOOL:?} is the tool structured answers use at an Anthropic provider"),
                ));
            }
            let input_schema = match tool.parameters_json.as_str() {
                "" => any_object(),
                json => raw_json(field, json)?,
            };
            let strict = match tool.strict {
                Some(true) if model.native_structured_output => Some(true),
                Some(true) => {
                    model.leave_out("tools[].function.strict", dropped)?;
                    None
                }
                _ => None,
            };
            tools.push(ToolOut { name: &tool.name, description: &tool.description, input_schema, strict });
        }
    }
    let has_client_tools = client_tools && !tools.is_empty();
    let disable_parallel = (options.parallel_tool_calls == Some(false)).then_some(true);
    let choice = |kind: &'static str, name: Option<&'a str>| {
        Some(ToolChoiceOut {
            kind,
            name,
            disable_parallel_tool_use: if kind == "none" { None } else { disable_parallel },
        })
    };
    let tool_choice = match (json_tool.is_some(), has_client_tools, mode) {
        (true, false, _) => choice("tool", Some(JSON_TOOL)),
        (true, true, Mode::Function) => choice("tool", Some(named)),
        (true, true, _) => choice("any", None),
        (false, false, _) => None,
        (false, true, Mode::Auto) => choice("auto", None),
        (false, true, Mode::None) => choice("none", None),
        (false, true, Mode::Required) => choice("any", None),
        (false, true, Mode::Function) => choice("tool", Some(named)),
        (false, true, Mode::Unspecified) => disable_parallel.and_then(|_| choice("auto", None)),
    };
    tools.extend(json_tool);
    Ok((tools, tool_choice))
}

// ---------------------------------------------------------------------------------------------
// The answer

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<StartMessage>,
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    content_block: Option<ContentBlock>,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct ContentBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    stop_reason: Option<String>,
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

/// What a content block of the answer is.
#[derive(Debug)]
enum BlockState {
    Text,
    Thinking,
    /// A tool call: its index among the answer's calls, its arguments so far and the input its
    /// start gave (used when no JSON pieces follow).
    Tool {
        call: i32,
        start_input: String,
    },
    /// The forced [`JSON_TOOL`]'s input: the answer's content.
    JsonAnswer {
        streamed: bool,
        start_input: String,
    },
    Other,
}

/// Turns Messages API events into [`CompleteChunk`]s (see the module docs).
#[derive(Debug)]
pub struct StreamDecoder {
    model: AnswerModel,
    /// Whether the request forced [`JSON_TOOL`].
    json_tool: bool,
    blocks: BTreeMap<u32, BlockState>,
    tool_calls: Vec<pb::ToolCall>,
    input_tokens: i64,
    cache_read: i64,
    cache_write: i64,
    output_tokens: i64,
    saw_usage: bool,
    stop_reason: Option<String>,
    done: bool,
}

/// The event that ends a complete answer.
pub const END_MARKER: &str = "message_stop";

impl StreamDecoder {
    /// A decoder for the answer to `request` as [`request_body`] sent it for `model`.
    pub fn new(request: &CompleteRequest, model: &ProviderModel) -> Self {
        let default_options = pb::ChatOptions::default();
        let options = request.options.as_ref().unwrap_or(&default_options);
        let json_tool = matches!(structured_output(options, model), Ok(StructuredOutput::ForcedTool { .. }));
        Self {
            model: AnswerModel::new(&request.model),
            json_tool,
            blocks: BTreeMap::new(),
            tool_calls: Vec::new(),
            input_tokens: 0,
            cache_read: 0,
            cache_write: 0,
            output_tokens: 0,
            saw_usage: false,
            stop_reason: None,
            done: false,
        }
    }

    /// Whether the end of the answer (`message_stop`) was seen.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn chunk(&mut self, fill: impl FnOnce(&mut CompleteChunk)) -> Option<CompleteChunk> {
        let mut chunk = CompleteChunk::default();
        fill(&mut chunk);
        let empty = chunk.delta.is_empty() && chunk.reasoning_delta.is_empty() && chunk.tool_call_deltas.is_empty();
        if empty {
            return None;
        }
        chunk.model = self.model.once();
        Some(chunk)
    }

    fn tool_piece(&mut self, call: i32, arguments: &str) -> Option<CompleteChunk> {
        if arguments.is_empty() {
            return None;
        }
        if let Some(tool) = self.tool_calls.get_mut(call as usize) {
            tool.arguments_json.push_str(arguments);
        }
        self.chunk(|c| {
            c.tool_call_deltas.push(pb::ToolCallDelta {
                index: call,
                arguments_delta: arguments.to_owned(),
                ..Default::default()
            });
        })
    }

    /// The chunk for one event, if it carries anything for the caller.
    pub fn on_event(&mut self, event: &SseEvent) -> Result<Option<CompleteChunk>, WireError> {
        let data = event.data.trim();
        if data.is_empty() {
            return Ok(None);
        }
        let parsed: Event = serde_json::from_str(data)
            .map_err(|err| WireError::protocol(format!("malformed event ({err}): {}", truncate(data))))?;
        match event.event.as_deref().unwrap_or(&parsed.kind) {
            "message_start" => {
                let message = parsed.message.ok_or_else(|| WireError::protocol("message_start without a message"))?;
                if let Some(model) = message.model.filter(|m| !m.is_empty()) {
                    self.model.reported = Some(model);
                }
                if let Some(usage) = message.usage {
                    self.add_usage(&usage);
                }
                Ok(None)
            }
            "content_block_start" => {
                let index = parsed.index.unwrap_or(0);
                let block =
                    parsed.content_block.ok_or_else(|| WireError::protocol("content_block_start without a block"))?;
                Ok(self.start_block(index, block))
            }
            "content_block_delta" => {
                let index = parsed.index.unwrap_or(0);
                let delta = parsed.delta.ok_or_else(|| WireError::protocol("content_block_delta without a delta"))?;
                self.block_delta(index, delta)
            }
            "content_block_stop" => Ok(self.stop_block(parsed.index.unwrap_or(0))),
            "message_delta" => {
                if let Some(reason) = parsed.delta.and_then(|d| d.stop_reason) {
                    self.stop_reason = Some(reason);
                }
                if let Some(usage) = parsed.usage {
                    self.add_usage(&usage);
                }
                Ok(None)
            }
            "message_stop" => {
                self.done = true;
                Ok(Some(self.last_chunk()))
            }
            "error" => Err(WireError::Provider(provider_error(0, data.as_bytes()))),
            // `ping` and event types added after this code was written.
            _ => Ok(None),
        }
    }

    fn start_block(&mut self, index: u32, block: ContentBlock) -> Option<CompleteChunk> {
        let input = block.input.map(|i| String::from(i.get())).unwrap_or_default();
        match block.kind.as_str() {
            "text" => {
                self.blocks.insert(index, BlockState::Text);
                let text = block.text.unwrap_or_default();
                self.chunk(|c| c.delta = text)
            }
            "thinking" => {
                self.blocks.insert(index, BlockState::Thinking);
                let thinking = block.thinking.unwrap_or_default();
                self.chunk(|c| c.reasoning_delta = thinking)
            }
            "tool_use" if self.json_tool && block.name.as_deref() == Some(JSON_TOOL) => {
                self.blocks.insert(index, BlockState::JsonAnswer { streamed: false, start_input: input });
                None
            }
            "tool_use" => {
                let call = self.tool_calls.len() as i32;
                let id = block.id.unwrap_or_default();
                let name = block.name.unwrap_or_default();
                self.tool_calls.push(pb::ToolCall {
                    id: id.clone(),
                    r#type: "function".into(),
                    function_name: name.clone(),
                    arguments_json: String::new(),
                });
                self.blocks.insert(index, BlockState::Tool { call, start_input: input });
                self.chunk(|c| {
                    c.tool_call_deltas.push(pb::ToolCallDelta {
                        index: call,
                        id,
                        function_name: name,
                        arguments_delta: String::new(),
                    });
                })
            }
            _ => {
                self.blocks.insert(index, BlockState::Other);
                None
            }
        }
    }

    fn block_delta(&mut self, index: u32, delta: Delta) -> Result<Option<CompleteChunk>, WireError> {
        match delta.kind.as_deref() {
            Some("text_delta") => {
                let text = delta.text.unwrap_or_default();
                Ok(self.chunk(|c| c.delta = text))
            }
            Some("thinking_delta") => {
                let thinking = delta.thinking.unwrap_or_default();
                Ok(self.chunk(|c| c.reasoning_delta = thinking))
            }
            Some("input_json_delta") => {
                let piece = delta.partial_json.unwrap_or_default();
                match self.blocks.get_mut(&index) {
                    Some(BlockState::Tool { call, .. }) => {
                        let call = *call;
                        Ok(self.tool_piece(call, &piece))
                    }
                    Some(BlockState::JsonAnswer { streamed, .. }) => {
                        *streamed |= !piece.is_empty();
                        Ok(self.chunk(|c| c.delta = piece))
                    }
                    _ => {
                        Err(WireError::protocol(format!("input_json_delta for block {index}, which is not a tool_use")))
                    }
                }
            }
            // Signatures, citations and delta types added after this code was written.
            _ => Ok(None),
        }
    }

    /// A tool block whose input came whole at its start (no JSON pieces) is relayed now.
    fn stop_block(&mut self, index: u32) -> Option<CompleteChunk> {
        match self.blocks.get(&index) {
            Some(BlockState::Tool { call, start_input }) => {
                let call = *call;
                let streamed = self.tool_calls.get(call as usize).is_some_and(|t| !t.arguments_json.is_empty());
                if streamed {
                    return None;
                }
                let whole = if start_input.is_empty() { "{}".to_owned() } else { start_input.clone() };
                self.tool_piece(call, &whole)
            }
            Some(BlockState::JsonAnswer { streamed: false, start_input }) => {
                let whole = if start_input.is_empty() { "{}".to_owned() } else { start_input.clone() };
                self.chunk(|c| c.delta = whole)
            }
            _ => None,
        }
    }

    /// Input tokens come at the start (and again, cumulative, in newer `message_delta`s); output
    /// tokens in `message_delta` are cumulative.
    fn add_usage(&mut self, usage: &WireUsage) {
        self.saw_usage = true;
        if let Some(input) = usage.input_tokens.filter(|t| *t > 0) {
            self.input_tokens = input;
        }
        if let Some(read) = usage.cache_read_input_tokens.filter(|t| *t > 0) {
            self.cache_read = read;
        }
        if let Some(write) = usage.cache_creation_input_tokens.filter(|t| *t > 0) {
            self.cache_write = write;
        }
        if let Some(output) = usage.output_tokens {
            self.output_tokens = output;
        }
    }

    fn last_chunk(&mut self) -> CompleteChunk {
        let mut finish = self.stop_reason.take().map(|r| finish_reason(&r).to_owned()).unwrap_or_default();
        // The forced answer tool is the answer, not a call.
        if finish == "tool_calls" && self.tool_calls.is_empty() {
            finish = "stop".into();
        }
        let prompt = self.input_tokens + self.cache_read + self.cache_write;
        CompleteChunk {
            finish_reason: finish,
            usage: self.saw_usage.then_some(pb::Usage {
                prompt_tokens: prompt,
                completion_tokens: self.output_tokens,
                total_tokens: prompt + self.output_tokens,
                cost_micros: 0,
                cached_prompt_tokens: self.cache_read,
                cache_write_tokens: self.cache_write,
                reasoning_tokens: 0,
            }),
            tool_calls: std::mem::take(&mut self.tool_calls),
            model: self.model.once(),
            ..CompleteChunk::default()
        }
    }
}

/// OpenAI's finish reason for an Anthropic stop reason (unknown ones pass through).
pub fn finish_reason(stop_reason: &str) -> &str {
    match stop_reason {
        "end_turn" | "stop_sequence" | "pause_turn" => "stop",
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        other => other,
    }
}

#[derive(Deserialize)]
struct WholeMessage {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    content: Vec<ContentBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

/// The chunks of a non-streamed Messages answer, as [`StreamDecoder`] would give them.
pub fn decode_message(
    request: &CompleteRequest,
    model: &ProviderModel,
    body: &[u8],
) -> Result<Vec<CompleteChunk>, WireError> {
    if serde_json::from_slice::<ErrorEnvelope>(body).is_ok_and(|e| e.kind.as_deref() == Some("error")) {
        return Err(WireError::Provider(provider_error(0, body)));
    }
    let message: WholeMessage = serde_json::from_slice(body).map_err(|err| {
        WireError::protocol(format!("malformed message ({err}): {}", truncate(&String::from_utf8_lossy(body))))
    })?;
    let mut decoder = StreamDecoder::new(request, model);
    decoder.model.reported = message.model.filter(|m| !m.is_empty());
    if let Some(usage) = &message.usage {
        decoder.add_usage(usage);
    }
    let mut chunks = Vec::new();
    for (index, block) in message.content.into_iter().enumerate() {
        let index = index as u32;
        chunks.extend(decoder.start_block(index, block));
        chunks.extend(decoder.stop_block(index));
    }
    decoder.stop_reason = message.stop_reason;
    chunks.push(decoder.last_chunk());
    Ok(chunks)
}

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Deserialize)]
struct ErrorEnvelope {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// An Anthropic error answer (`status` 0 for an `error` event inside a stream), classified; a
/// prompt too long for the model's context is a context overflow with OpenAI's code.
pub fn provider_error(status: u16, body: &[u8]) -> ProviderError {
    let error = serde_json::from_slice::<ErrorEnvelope>(body).ok().and_then(|e| e.error);
    let (kind_name, message) = match error {
        Some(ErrorBody { kind, message }) => (kind.unwrap_or_default(), message.map(|m| truncate(&m))),
        None => (String::new(), None),
    };
    let message = message.unwrap_or_else(|| loose_message(body));
    let lowered = message.to_ascii_lowercase();
    let overflow = lowered.starts_with("prompt is too long")
        || lowered.contains("exceed context limit")
        || lowered.contains("exceeds the context window");
    if overflow && matches!(status, 0 | 400 | 413) {
        return ProviderError {
            kind: ProviderErrorKind::ContextLengthExceeded,
            status,
            message,
            code: CONTEXT_LENGTH_EXCEEDED.to_owned(),
            param: "messages".to_owned(),
        };
    }
    let kind = match kind_name.as_str() {
        "invalid_request_error" => ProviderErrorKind::InvalidRequest,
        "authentication_error" | "permission_error" => ProviderErrorKind::Auth,
        "not_found_error" => ProviderErrorKind::ModelNotFound,
        "request_too_large" => ProviderErrorKind::PayloadTooLarge,
        "rate_limit_error" => ProviderErrorKind::RateLimited,
        "overloaded_error" => ProviderErrorKind::Overloaded,
        "timeout_error" => ProviderErrorKind::Timeout,
        "api_error" => ProviderErrorKind::Server,
        _ if status == 0 => ProviderErrorKind::Server,
        _ => kind_of_status(status),
    };
    ProviderError { kind, status, message, code: kind_name, param: String::new() }
}

#[cfg(test)]
mod tests;
