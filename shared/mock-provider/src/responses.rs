//! `POST /v1/responses`: OpenAI's Responses API, checked the way OpenAI checks a request (400
//! naming the offending parameter) and answered by the agent game of the crate documentation, as a
//! `response` object or as its event stream (`response.created` … `response.completed`, every
//! event named and numbered by its `sequence_number`; no `[DONE]`).
//!
//! The reasoning comes as a `reasoning` item's `summary_text` whenever `reasoning.effort` asks for
//! some (meshgate relays summaries as reasoning, and asks for none). `max_output_tokens` must be at
//! least 16, as OpenAI wants (meshgate refuses smaller budgets for such a provider before calling
//! it). The mock keeps nothing: `store` is accepted either way (and repeated), and a
//! `previous_response_id` is never found.
//!
//! Prompt tokens are counted as for Chat Completions with `instructions` as a system message, an
//! assistant turn (its message and `function_call` items) as one message and each
//! `function_call_output` as one message (a `tool` message there), so the same conversation costs
//! the same in every format.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::agent::{self, Body, Finish, Output, Plan, PlannedCall, ToolMode};
use crate::checks::{self, Invalid};
use crate::reply::{self, argument_fragments};
use crate::server::{
    ABORT_FLUSH_PAUSE, Delivery, Endpoint, garbage, invalid, json_response, model_not_found, now_secs, pause,
    sse_response,
};
use crate::state::{Behavior, Shared, StreamFault};
use crate::wire::InputAudio;

/// Smallest `max_output_tokens` OpenAI takes.
const MIN_OUTPUT_TOKENS: i64 = 16;
const ROLES: [&str; 4] = ["user", "system", "developer", "assistant"];
/// Parts of user, system and developer messages.
const INPUT_PARTS: [&str; 4] = ["input_text", "input_image", "input_file", "input_audio"];
/// Parts of assistant messages replayed as input.
const OUTPUT_PARTS: [&str; 2] = ["output_text", "refusal"];
/// Parts of a `function_call_output`'s output.
const OUTPUT_RESULT_PARTS: [&str; 3] = ["input_text", "input_image", "input_file"];
const SUMMARIES: [&str; 3] = ["auto", "concise", "detailed"];
const VERBOSITIES: [&str; 3] = ["low", "medium", "high"];

#[derive(Deserialize)]
struct ResponsesRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Option<Input>,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    /// `{"format": {...}, "verbosity": ...}`, repeated in the response as given.
    #[serde(default)]
    text: Option<Value>,
    #[serde(default)]
    reasoning: Option<Reasoning>,
    #[serde(default)]
    max_output_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_logprobs: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    truncation: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    service_tier: Option<String>,
}

/// A string (one user message) or a list of items.
#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<Item>),
}

/// An input item: a message (whose `type` may be omitted), a function call, its output, or a
/// reasoning item (accepted and ignored).
#[derive(Deserialize)]
struct Item {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
    /// A `function_call_output`'s output.
    #[serde(default)]
    output: Option<Content>,
}

impl Item {
    fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or("message")
    }

    fn is_message_of(&self, role: &str) -> bool {
        self.kind() == "message" && self.role.as_deref() == Some(role)
    }
}

/// A string, or a list of typed parts (only text parts carry text).
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

impl Content {
    /// The text the mock reads: text parts joined with a space.
    fn text(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Parts(parts) => parts.iter().filter_map(|p| p.text.as_deref()).collect::<Vec<_>>().join(" "),
        }
    }

    fn parts(&self) -> &[Part] {
        match self {
            Content::Text(_) => &[],
            Content::Parts(parts) => parts,
        }
    }
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
    /// An `input_image`'s URL or data URI (a value, so that a wrong shape is named).
    #[serde(default)]
    image_url: Option<Value>,
    #[serde(default)]
    file_id: Option<String>,
    #[serde(default)]
    file_data: Option<String>,
    #[serde(default)]
    file_url: Option<String>,
    #[serde(default)]
    input_audio: Option<InputAudio>,
}

/// A tool: only flat function tools are served.
#[derive(Deserialize)]
struct Tool {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
}

#[derive(Deserialize)]
struct Reasoning {
    #[serde(default)]
    effort: Option<String>,
    #[serde(default)]
    summary: Option<String>,
}

pub(crate) async fn responses(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let behavior = shared.behavior.load_full();
    let answering = shared.count(Endpoint::Responses, &headers, query.as_deref(), &body, &behavior);
    let delivery = shared.delivery(&headers, &behavior, &answering);
    let response = answer(&shared, &behavior, &headers, &body, delivery).await;
    answering.answered(response)
}

async fn answer(
    shared: &Shared,
    behavior: &Behavior,
    headers: &HeaderMap,
    body: &[u8],
    delivery: Delivery,
) -> Response {
    if let Some(answer) = shared.preamble(behavior, headers).await {
        return answer;
    }
    let request: ResponsesRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(err) => return invalid(&format!("Invalid Responses API request: {err}")),
    };
    let checked = match check(&request) {
        Ok(checked) => checked,
        Err(invalid) => return invalid.response(),
    };
    if behavior.strict_models && !behavior.models.iter().any(|m| m == checked.model) {
        return model_not_found(checked.model);
    }
    let prompt_tokens = checked.prompt_tokens;
    if let Some(window) = behavior.context_window_of(checked.model)
        && prompt_tokens > window
    {
        let message = format!(
            "Your input exceeds the context window of this model ({window} tokens; the input is {prompt_tokens} \
             tokens). Please adjust your input and try again."
        );
        return Invalid::new("input", message).code("context_length_exceeded").response();
    }
    if !delivery.replay
        && let Some(answer) = shared.injected_failure(behavior)
    {
        return answer;
    }
    let stream = request.stream.unwrap_or(false) && !behavior.ignore_stream;
    if behavior.garbage {
        return if stream {
            let body = "event: response.created\ndata: {\"type\": this is not json\n\n";
            (StatusCode::OK, [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")], body).into_response()
        } else {
            garbage(false)
        };
    }

    let model = checked.model.to_owned();
    let plan = Plan::new(checked.facts, behavior, || shared.next_id("call_mock"));
    let call_item_ids = match &plan.body {
        Body::ToolCalls(calls) => calls.iter().map(|_| shared.next_id("fc_mock")).collect(),
        Body::Text | Body::Json(_) => Vec::new(),
    };
    let reply = Reply {
        id: shared.next_id("resp_mock"),
        created_at: now_secs(),
        model,
        prompt_tokens,
        cached_tokens: behavior.prompt_cache.map_or(0, |cache| cache.split(prompt_tokens).0),
        reasoning_id: shared.next_id("rs_mock"),
        message_id: shared.next_id("msg_mock"),
        call_item_ids,
        settings: settings(&request),
        plan,
    };
    shared.succeeded.fetch_add(1, Ordering::Relaxed);
    if stream {
        delivery.mark(stream_reply(reply, behavior, delivery.clone()))
    } else {
        delivery.completed();
        delivery.mark(json_response(StatusCode::OK, &reply.object(true)))
    }
}

/// A checked request: what the answer depends on.
struct Checked<'a> {
    model: &'a str,
    facts: agent::Request<'a>,
    prompt_tokens: u64,
}

/// Checks the request as OpenAI does and reads what the answer depends on.
fn check(request: &ResponsesRequest) -> Result<Checked<'_>, Invalid> {
    let Some(model) = request.model.as_deref().filter(|m| !m.is_empty()) else {
        return Err(Invalid::missing("model"));
    };
    let Some(input) = &request.input else {
        return Err(Invalid::missing("input"));
    };
    if let Some(id) = &request.previous_response_id {
        // The mock stores no response.
        return Err(Invalid::new("previous_response_id", format!("Previous response with id '{id}' not found."))
            .code("previous_response_not_found"));
    }
    if let Some(max) = request.max_output_tokens
        && max < MIN_OUTPUT_TOKENS
    {
        return Err(Invalid::new(
            "max_output_tokens",
            format!(
                "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= {MIN_OUTPUT_TOKENS}, \
                 but got {max} instead."
            ),
        )
        .code("integer_below_min_value"));
    }
    check_range("temperature", request.temperature, 2.0)?;
    check_range("top_p", request.top_p, 1.0)?;
    if let Some(truncation) = request.truncation.as_deref()
        && !matches!(truncation, "auto" | "disabled")
    {
        return Err(Invalid::new(
            "truncation",
            format!("Invalid value: '{truncation}'. Supported values are: 'auto' and 'disabled'."),
        )
        .code("invalid_value"));
    }
    let conversation = match input {
        Input::Text(text) => Conversation {
            texts: request.instructions.iter().cloned().chain([text.clone()]).collect(),
            echo_source: text.clone(),
            ends_in_user_turn: true,
        },
        Input::Items(items) => {
            check_items(items)?;
            Conversation::of(request.instructions.as_deref(), items)
        }
    };
    let (tools, tool_mode) = check_tools(request)?;
    let output = check_text(request.text.as_ref())?;
    let reasoning_pieces = check_reasoning(request.reasoning.as_ref())?;
    Ok(Checked {
        model,
        prompt_tokens: reply::prompt_tokens(conversation.texts.iter().map(String::as_str)),
        facts: agent::Request {
            tools,
            tool_mode,
            parallel_tool_calls: request.parallel_tool_calls.unwrap_or(true),
            ends_in_user_turn: conversation.ends_in_user_turn,
            output,
            reasoning_pieces,
            echo_source: conversation.echo_source,
            max_tokens: request.max_output_tokens.map(|max| max as u64),
        },
    })
}

fn check_range(param: &str, value: Option<f64>, max: f64) -> Result<(), Invalid> {
    match value {
        Some(value) if value < 0.0 => Err(Invalid::new(
            param,
            format!("Invalid '{param}': decimal below minimum value. Expected a value >= 0, but got {value} instead."),
        )
        .code("decimal_below_min_value")),
        Some(value) if value > max => Err(Invalid::new(
            param,
            format!(
                "Invalid '{param}': decimal above maximum value. Expected a value <= {max}, but got {value} instead."
            ),
        )
        .code("decimal_above_max_value")),
        _ => Ok(()),
    }
}

/// The conversation as the other formats count and answer it.
struct Conversation {
    /// The text of each message, instructions first.
    texts: Vec<String>,
    /// The tool outputs the input ends with, else the last user message.
    echo_source: String,
    ends_in_user_turn: bool,
}

impl Conversation {
    fn of(instructions: Option<&str>, items: &[Item]) -> Self {
        let mut texts: Vec<String> = instructions.map(str::to_owned).into_iter().collect();
        // An assistant turn (its messages and calls, reasoning between them) is one message.
        let mut in_assistant_turn = false;
        for item in items {
            match item.kind() {
                "reasoning" => {}
                "function_call" => {
                    if !in_assistant_turn {
                        texts.push(String::new());
                    }
                    in_assistant_turn = true;
                }
                "function_call_output" => {
                    texts.push(item.output.as_ref().map(Content::text).unwrap_or_default());
                    in_assistant_turn = false;
                }
                _ => {
                    let text = item.content.as_ref().map(Content::text).unwrap_or_default();
                    let assistant = item.role.as_deref() == Some("assistant");
                    match texts.last_mut() {
                        Some(turn) if assistant && in_assistant_turn => {
                            turn.push(' ');
                            turn.push_str(&text);
                        }
                        _ => texts.push(text),
                    }
                    in_assistant_turn = assistant;
                }
            }
        }
        let outputs = items.iter().rev().take_while(|i| i.kind() == "function_call_output").count();
        let echo_source = if outputs > 0 {
            let texts: Vec<String> =
                items[items.len() - outputs..].iter().filter_map(|i| i.output.as_ref().map(Content::text)).collect();
            texts.join(" ")
        } else {
            let last_user = items.iter().rev().find(|i| i.is_message_of("user"));
            last_user.and_then(|i| i.content.as_ref()).map(Content::text).unwrap_or_default()
        };
        let ends_in_user_turn = items.last().is_some_and(|i| i.is_message_of("user"));
        Self { texts, echo_source, ends_in_user_turn }
    }
}

/// Every item is well formed, every `function_call_output` answers an earlier `function_call`, and
/// every call is answered.
fn check_items(items: &[Item]) -> Result<(), Invalid> {
    let mut calls: Vec<&str> = Vec::new();
    let mut answered: Vec<&str> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item.kind() {
            "message" => check_message(i, item)?,
            "function_call" => {
                let Some(call_id) = item.call_id.as_deref().filter(|id| !id.is_empty()) else {
                    return Err(Invalid::missing(format!("input[{i}].call_id")));
                };
                if item.name.as_deref().is_none_or(str::is_empty) {
                    return Err(Invalid::missing(format!("input[{i}].name")));
                }
                if item.arguments.is_none() {
                    return Err(Invalid::missing(format!("input[{i}].arguments")));
                }
                calls.push(call_id);
            }
            "function_call_output" => {
                let Some(call_id) = item.call_id.as_deref() else {
                    return Err(Invalid::missing(format!("input[{i}].call_id")));
                };
                if !calls.contains(&call_id) {
                    return Err(Invalid::new(
                        "input",
                        format!("No tool call found for function call output with call_id {call_id}."),
                    ));
                }
                let Some(output) = &item.output else {
                    return Err(Invalid::missing(format!("input[{i}].output")));
                };
                check_parts(&format!("input[{i}].output"), output.parts(), &OUTPUT_RESULT_PARTS)?;
                answered.push(call_id);
            }
            "reasoning" => {}
            other => {
                return Err(Invalid::new(
                    format!("input[{i}].type"),
                    format!(
                        "Invalid value: '{other}'. Supported values are: 'message', 'function_call', \
                         'function_call_output' and 'reasoning' (the mock provider serves no built-in tools)."
                    ),
                )
                .code("invalid_value"));
            }
        }
    }
    match calls.iter().find(|call| !answered.contains(call)) {
        Some(call) => Err(Invalid::new("input", format!("No tool output found for function call {call}."))),
        None => Ok(()),
    }
}

fn check_message(i: usize, item: &Item) -> Result<(), Invalid> {
    let Some(role) = item.role.as_deref() else {
        return Err(Invalid::missing(format!("input[{i}].role")));
    };
    if !ROLES.contains(&role) {
        return Err(Invalid::new(
            format!("input[{i}].role"),
            format!("Invalid value: '{role}'. Supported values are: 'user', 'system', 'developer' and 'assistant'."),
        )
        .code("invalid_value"));
    }
    let Some(content) = &item.content else {
        return Err(Invalid::missing(format!("input[{i}].content")));
    };
    let allowed: &[&str] = if role == "assistant" { &OUTPUT_PARTS } else { &INPUT_PARTS };
    check_parts(&format!("input[{i}].content"), content.parts(), allowed)
}

/// The parts at `path` are of the `allowed` types and hold what their type needs.
fn check_parts(path: &str, parts: &[Part], allowed: &[&str]) -> Result<(), Invalid> {
    for (j, part) in parts.iter().enumerate() {
        let param = format!("{path}[{j}]");
        let kind = part.kind.as_deref().unwrap_or_default();
        if !allowed.contains(&kind) {
            return Err(Invalid::new(
                format!("{param}.type"),
                format!(
                    "Invalid value: '{kind}'. Supported values are: {}.",
                    allowed.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ")
                ),
            )
            .code("invalid_value"));
        }
        match kind {
            "input_text" | "output_text" if part.text.is_none() => {
                return Err(Invalid::missing(format!("{param}.text")));
            }
            "input_image" => match &part.image_url {
                Some(Value::String(url)) if checks::image_url_ok(url) => {}
                Some(Value::String(_)) => return Err(checks::invalid_image_url(format!("{param}.image_url"))),
                None if part.file_id.is_some() => {}
                None => {
                    return Err(Invalid::new(param, "Invalid input_image: expected an 'image_url' or a 'file_id'."));
                }
                Some(_) => {
                    return Err(Invalid::new(
                        format!("{param}.image_url"),
                        format!("Invalid type for '{param}.image_url': expected a string."),
                    )
                    .code("invalid_type"));
                }
            },
            "input_file" if part.file_id.is_none() && part.file_data.is_none() && part.file_url.is_none() => {
                return Err(Invalid::new(
                    param,
                    "Invalid input_file: expected a 'file_id', 'file_data' or 'file_url'.",
                ));
            }
            "input_audio" if !part.input_audio.as_ref().is_some_and(|a| checks::audio_ok(&a.data, &a.format)) => {
                return Err(Invalid::new(
                    format!("{param}.input_audio"),
                    "Invalid input_audio: expected base64 'data' and a 'format' of 'wav' or 'mp3'.",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The offered functions and how the model must use them.
fn check_tools(request: &ResponsesRequest) -> Result<(Vec<agent::Tool<'_>>, ToolMode<'_>), Invalid> {
    let definitions = request.tools.as_deref().unwrap_or_default();
    checks::check_tool_count(definitions.len())?;
    let mut tools = Vec::with_capacity(definitions.len());
    for (i, tool) in definitions.iter().enumerate() {
        match tool.kind.as_deref() {
            Some("function") => {}
            None => return Err(Invalid::missing(format!("tools[{i}].type"))),
            Some(other) => {
                return Err(Invalid::new(
                    format!("tools[{i}].type"),
                    format!(
                        "Invalid value: '{other}'. Supported values are: 'function' (the mock provider serves no \
                         built-in or custom tools)."
                    ),
                )
                .code("invalid_value"));
            }
        }
        let Some(name) = tool.name.as_deref() else {
            return Err(Invalid::missing(format!("tools[{i}].name")));
        };
        checks::check_function(&format!("tools[{i}]"), name, tool.parameters.as_ref())?;
        tools.push(agent::Tool { name, parameters: tool.parameters.as_ref() });
    }
    let mode = match &request.tool_choice {
        None => ToolMode::Auto,
        Some(Value::String(mode)) => checks::tool_mode(mode)?,
        Some(Value::Object(choice)) => match choice.get("type").and_then(Value::as_str) {
            Some("function") => {
                let Some(name) = choice.get("name").and_then(Value::as_str) else {
                    return Err(Invalid::missing("tool_choice.name"));
                };
                if !tools.iter().any(|t| t.name == name) {
                    return Err(Invalid::new(
                        "tool_choice",
                        format!("Tool choice 'function' with name '{name}' not found in 'tools' parameter."),
                    ));
                }
                ToolMode::Named(name)
            }
            Some("allowed_tools") => {
                let allowed = choice.get("tools").and_then(Value::as_array);
                let names: Vec<&str> =
                    allowed.into_iter().flatten().filter_map(|t| t.get("name").and_then(Value::as_str)).collect();
                tools.retain(|t| names.contains(&t.name));
                match choice.get("mode").and_then(Value::as_str) {
                    Some("auto") => ToolMode::Auto,
                    Some("required") => ToolMode::Required,
                    _ => {
                        return Err(Invalid::new(
                            "tool_choice.mode",
                            "Invalid value for 'tool_choice.mode': expected 'auto' or 'required'.",
                        )
                        .code("invalid_value"));
                    }
                }
            }
            other => {
                return Err(Invalid::new(
                    "tool_choice.type",
                    format!(
                        "Invalid value: '{}'. Supported values are: 'function' and 'allowed_tools' (the mock \
                         provider serves no built-in tools).",
                        other.unwrap_or_default()
                    ),
                )
                .code("invalid_value"));
            }
        },
        Some(_) => {
            return Err(Invalid::new(
                "tool_choice",
                "Invalid 'tool_choice': expected 'none', 'auto', 'required' or an object naming a function.",
            ));
        }
    };
    if matches!(mode, ToolMode::Required) && tools.is_empty() {
        return Err(Invalid::new(
            "tool_choice",
            "Invalid value for 'tool_choice': 'required' needs at least one function in 'tools'.",
        ));
    }
    Ok((tools, mode))
}

/// `text.format` (flat: `name`, `schema` and `strict` beside its `type`) and `text.verbosity`.
fn check_text(text: Option<&Value>) -> Result<Output<'_>, Invalid> {
    let Some(text) = text else { return Ok(Output::Text) };
    if !text.is_object() {
        return Err(Invalid::new("text", "Invalid type for 'text': expected an object.").code("invalid_type"));
    }
    if let Some(verbosity) = text.get("verbosity").filter(|v| !v.is_null())
        && !verbosity.as_str().is_some_and(|v| VERBOSITIES.contains(&v))
    {
        return Err(Invalid::new(
            "text.verbosity",
            format!("Invalid value: {verbosity}. Supported values are: 'low', 'medium' and 'high'."),
        )
        .code("invalid_value"));
    }
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else { return Ok(Output::Text) };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Output::Text),
        Some("json_object") => Ok(Output::JsonObject),
        Some("json_schema") => {
            let output = checks::named_schema(format, "text.format")?;
            if format.get("schema").is_none() {
                return Err(Invalid::missing("text.format.schema"));
            }
            Ok(output)
        }
        _ => Err(Invalid::new(
            "text.format.type",
            "Invalid value for 'text.format.type': supported values are 'text', 'json_object' and 'json_schema'.",
        )
        .code("invalid_value")),
    }
}

/// Reasoning pieces for `reasoning.effort` (none without it).
fn check_reasoning(reasoning: Option<&Reasoning>) -> Result<usize, Invalid> {
    let Some(reasoning) = reasoning else { return Ok(0) };
    if let Some(summary) = reasoning.summary.as_deref()
        && !SUMMARIES.contains(&summary)
    {
        return Err(Invalid::new(
            "reasoning.summary",
            format!("Invalid value: '{summary}'. Supported values are: 'auto', 'concise' and 'detailed'."),
        )
        .code("invalid_value"));
    }
    reasoning.effort.as_deref().map_or(Ok(0), |effort| checks::reasoning_pieces("reasoning.effort", effort))
}

/// What the response object repeats of the request, with OpenAI's defaults.
fn settings(request: &ResponsesRequest) -> Value {
    let tools: Vec<Value> = request
        .tools
        .iter()
        .flatten()
        .map(|tool| {
            json!({
                "type": "function",
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
                // Function tools are strict unless the request says otherwise.
                "strict": tool.strict.unwrap_or(true),
            })
        })
        .collect();
    let mut text = match &request.text {
        Some(Value::Object(text)) => text.clone(),
        _ => Map::new(),
    };
    if text.get("format").is_none_or(Value::is_null) {
        text.insert("format".into(), json!({"type": "text"}));
    }
    if text.get("verbosity").is_none_or(Value::is_null) {
        text.insert("verbosity".into(), json!("medium"));
    }
    let reasoning = request.reasoning.as_ref();
    json!({
        "background": false,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": null,
        "metadata": request.metadata.clone().unwrap_or_else(|| json!({})),
        "parallel_tool_calls": request.parallel_tool_calls.unwrap_or(true),
        "previous_response_id": null,
        "reasoning": {
            "effort": reasoning.and_then(|r| r.effort.as_deref()),
            "summary": reasoning.and_then(|r| r.summary.as_deref()),
        },
        "service_tier": request.service_tier.as_deref().unwrap_or("default"),
        "store": request.store.unwrap_or(true),
        "temperature": request.temperature.unwrap_or(1.0),
        "text": text,
        "tool_choice": request.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        "tools": tools,
        "top_logprobs": request.top_logprobs.unwrap_or(0),
        "top_p": request.top_p.unwrap_or(1.0),
        "truncation": request.truncation.as_deref().unwrap_or("disabled"),
        "user": request.user,
    })
}

struct Reply {
    id: String,
    created_at: u64,
    model: String,
    /// Prompt tokens, cached ones included.
    prompt_tokens: u64,
    /// Prompt tokens read from the cache.
    cached_tokens: u64,
    plan: Plan,
    /// The reasoning item's id, when there is one.
    reasoning_id: String,
    /// The message item's id, when there is one.
    message_id: String,
    /// The `fc_…` item id of each call.
    call_item_ids: Vec<String>,
    /// See [`settings`].
    settings: Value,
}

impl Reply {
    fn incomplete(&self) -> bool {
        self.plan.finish == Finish::Length
    }

    /// The status of the response and of its message.
    fn status(&self) -> &'static str {
        if self.incomplete() { "incomplete" } else { "completed" }
    }

    fn usage(&self) -> Value {
        let output_tokens = self.plan.completion_tokens();
        json!({
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.plan.reasoning_pieces},
            "total_tokens": self.prompt_tokens + output_tokens,
        })
    }

    /// The finished output items: the reasoning, then the message or the calls. An answer cut
    /// before its first piece has no message.
    fn output(&self) -> Vec<Value> {
        let mut output = Vec::new();
        if let Some(text) = self.plan.reasoning_text() {
            output.push(reasoning_item(&self.reasoning_id, Some(&text)));
        }
        match &self.plan.body {
            Body::ToolCalls(calls) => {
                for (call, id) in calls.iter().zip(&self.call_item_ids) {
                    output.push(call_item(id, call, &call.arguments, "completed"));
                }
            }
            Body::Text | Body::Json(_) if self.plan.body_pieces > 0 => {
                let text = self.plan.content().unwrap_or_default();
                output.push(message_item(&self.message_id, self.status(), Some(&text)));
            }
            Body::Text | Body::Json(_) => {}
        }
        output
    }

    /// The `response` object: finished, or `in_progress` (no output, no usage yet).
    fn object(&self, finished: bool) -> Value {
        let mut object = self.settings.clone();
        object["id"] = json!(self.id);
        object["object"] = json!("response");
        object["created_at"] = json!(self.created_at);
        object["model"] = json!(self.model);
        object["error"] = Value::Null;
        if finished {
            object["status"] = json!(self.status());
            object["incomplete_details"] =
                if self.incomplete() { json!({"reason": "max_output_tokens"}) } else { Value::Null };
            object["output"] = Value::Array(self.output());
            object["usage"] = self.usage();
        } else {
            object["status"] = json!("in_progress");
            object["incomplete_details"] = Value::Null;
            object["output"] = json!([]);
            object["usage"] = Value::Null;
        }
        object
    }
}

fn summary_part(text: &str) -> Value {
    json!({"type": "summary_text", "text": text})
}

fn reasoning_item(id: &str, summary: Option<&str>) -> Value {
    let summary: Vec<Value> = summary.map(summary_part).into_iter().collect();
    json!({"type": "reasoning", "id": id, "summary": summary})
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn message_item(id: &str, status: &str, text: Option<&str>) -> Value {
    let content: Vec<Value> = text.map(output_text).into_iter().collect();
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

fn call_item(id: &str, call: &PlannedCall, arguments: &str, status: &str) -> Value {
    json!({
        "type": "function_call",
        "id": id,
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    })
}

/// Names, numbers and frames the events of one stream.
struct Events {
    next: u64,
}

impl Events {
    /// `event: <kind>` and `data:` the event's `fields` with its `type` and `sequence_number`.
    fn event(&mut self, kind: &str, mut fields: Value) -> Bytes {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.next);
        self.next += 1;
        Bytes::from(format!("event: {kind}\ndata: {fields}\n\n"))
    }
}

fn stream_reply(reply: Reply, behavior: &Behavior, delivery: Delivery) -> Response {
    let chunk_delay = behavior.chunk_delay;
    let fail_after = behavior.fail_after_chunks.map(|n| n as usize);
    let fault = behavior.stream_fault;
    let total_pieces = reply.plan.reasoning_pieces + reply.plan.body_pieces;
    let streaming = delivery.streaming();
    let events = async_stream::try_stream! {
        let _streaming = streaming;
        let mut events = Events { next: 0 };
        let started = reply.object(false);
        yield events.event("response.created", json!({"response": started}));
        yield events.event("response.in_progress", json!({"response": started}));

        // Every piece (reasoning, text, JSON or argument fragment) counts towards fail_after.
        let mut sent = 0;
        let mut output_index = 0;
        'pieces: {
            if let Some(reasoning) = &reply.plan.reasoning {
                let item_id = &reply.reasoning_id;
                yield events.event("response.output_item.added", json!({
                    "output_index": output_index, "item": reasoning_item(item_id, None)
                }));
                yield events.event("response.reasoning_summary_part.added", json!({
                    "item_id": item_id, "output_index": output_index, "summary_index": 0, "part": summary_part("")
                }));
                for i in 0..reply.plan.reasoning_pieces {
                    if fail_after == Some(sent) {
                        break 'pieces;
                    }
                    pause(chunk_delay).await;
                    yield events.event("response.reasoning_summary_text.delta", json!({
                        "item_id": item_id, "output_index": output_index, "summary_index": 0,
                        "delta": reasoning.piece(i).to_string()
                    }));
                    sent += 1;
                    delivery.streamed(sent);
                }
                let text = reply.plan.reasoning_text().unwrap_or_default();
                yield events.event("response.reasoning_summary_text.done", json!({
                    "item_id": item_id, "output_index": output_index, "summary_index": 0, "text": text
                }));
                yield events.event("response.reasoning_summary_part.done", json!({
                    "item_id": item_id, "output_index": output_index, "summary_index": 0, "part": summary_part(&text)
                }));
                yield events.event("response.output_item.done", json!({
                    "output_index": output_index, "item": reasoning_item(item_id, Some(&text))
                }));
                output_index += 1;
            }
            match &reply.plan.body {
                Body::ToolCalls(calls) => {
                    for (call, item_id) in calls.iter().zip(&reply.call_item_ids) {
                        yield events.event("response.output_item.added", json!({
                            "output_index": output_index, "item": call_item(item_id, call, "", "in_progress")
                        }));
                        for fragment in argument_fragments(&call.arguments) {
                            if fail_after == Some(sent) {
                                break 'pieces;
                            }
                            pause(chunk_delay).await;
                            yield events.event("response.function_call_arguments.delta", json!({
                                "item_id": item_id, "output_index": output_index, "delta": fragment
                            }));
                            sent += 1;
                            delivery.streamed(sent);
                        }
                        yield events.event("response.function_call_arguments.done", json!({
                            "item_id": item_id, "output_index": output_index, "name": call.name,
                            "arguments": call.arguments
                        }));
                        yield events.event("response.output_item.done", json!({
                            "output_index": output_index, "item": call_item(item_id, call, &call.arguments, "completed")
                        }));
                        output_index += 1;
                    }
                }
                Body::Text | Body::Json(_) if reply.plan.body_pieces > 0 => {
                    let item_id = &reply.message_id;
                    yield events.event("response.output_item.added", json!({
                        "output_index": output_index, "item": message_item(item_id, "in_progress", None)
                    }));
                    yield events.event("response.content_part.added", json!({
                        "item_id": item_id, "output_index": output_index, "content_index": 0, "part": output_text("")
                    }));
                    for delta in reply.plan.content_pieces() {
                        if fail_after == Some(sent) {
                            break 'pieces;
                        }
                        pause(chunk_delay).await;
                        yield events.event("response.output_text.delta", json!({
                            "item_id": item_id, "output_index": output_index, "content_index": 0, "delta": delta,
                            "logprobs": []
                        }));
                        sent += 1;
                        delivery.streamed(sent);
                    }
                    let text = reply.plan.content().unwrap_or_default();
                    yield events.event("response.output_text.done", json!({
                        "item_id": item_id, "output_index": output_index, "content_index": 0, "text": text,
                        "logprobs": []
                    }));
                    yield events.event("response.content_part.done", json!({
                        "item_id": item_id, "output_index": output_index, "content_index": 0, "part": output_text(&text)
                    }));
                    yield events.event("response.output_item.done", json!({
                        "output_index": output_index, "item": message_item(item_id, reply.status(), Some(&text))
                    }));
                }
                Body::Text | Body::Json(_) => {}
            }
        }
        if fail_after.is_some_and(|n| n <= total_pieces) {
            delivery.cut();
            match fault {
                StreamFault::Abort => {
                    tokio::time::sleep(ABORT_FLUSH_PAUSE).await;
                    Err(io::Error::other("mock provider: stream aborted"))?;
                }
                StreamFault::ErrorEvent => {
                    yield events.event("error", json!({
                        "code": "server_error",
                        "message": "The server had an error while processing your request (mid-stream failure injected by the mock provider).",
                        "param": null
                    }));
                }
                StreamFault::Close => {}
            }
            return;
        }
        delivery.completed();
        let end = if reply.incomplete() { "response.incomplete" } else { "response.completed" };
        yield events.event(end, json!({"response": reply.object(true)}));
    };
    sse_response(events)
}
