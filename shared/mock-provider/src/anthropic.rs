//! `POST /v1/messages`: the Anthropic Messages API, with the same behaviour knobs, the same agent
//! game and the same deterministic replies as the OpenAI routes, checked the way Anthropic checks
//! a request (400 `invalid_request_error` whose message starts with the offending field's path).
//!
//! Prompt tokens are counted as for the OpenAI routes with the `system` prompt as one more
//! message, so the same conversation costs the same in both formats: `reply::prompt_tokens` over
//! the system text (when present) and the text of each message (text blocks and tool results).

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::agent::{self, Body, Output, Plan, ToolMode};
use crate::reply::{self, argument_fragments};
use crate::server::{ABORT_FLUSH_PAUSE, Delivery, Endpoint, header_str, is_base64, json_response, pause, sse_response};
use crate::state::{Behavior, Shared, StreamFault};

/// Smallest thinking budget Anthropic takes.
const MIN_THINKING_BUDGET: u64 = 1024;
/// Longest tool name.
const MAX_TOOL_NAME: usize = 128;
const IMAGE_MEDIA_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

#[derive(Deserialize)]
struct MessagesRequest {
    model: String,
    max_tokens: Option<u64>,
    messages: Vec<Message>,
    #[serde(default)]
    system: Option<Content>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    tool_choice: Option<ToolChoice>,
    #[serde(default)]
    thinking: Option<Thinking>,
    #[serde(default)]
    temperature: Option<f64>,
    /// Structured outputs, beta shape.
    #[serde(default)]
    output_format: Option<Value>,
    /// Structured outputs, `{"format": {...}}`.
    #[serde(default)]
    output_config: Option<Value>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Content,
}

/// A string, or a list of content blocks.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    /// A `tool_result`'s content: a string or text blocks.
    #[serde(default)]
    content: Option<Value>,
    /// A `tool_use`'s id.
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    tool_use_id: Option<String>,
    /// An `image`'s source.
    #[serde(default)]
    source: Option<Value>,
}

impl Content {
    /// The text the mock reads: text blocks and tool results, joined with a space.
    fn text(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Blocks(blocks) => {
                let mut parts: Vec<String> = Vec::new();
                for block in blocks {
                    match block.kind.as_str() {
                        "text" => parts.extend(block.text.clone()),
                        "tool_result" => match &block.content {
                            Some(Value::String(text)) => parts.push(text.clone()),
                            Some(Value::Array(items)) => {
                                parts.extend(items.iter().filter_map(|i| i["text"].as_str().map(str::to_owned)))
                            }
                            _ => {}
                        },
                        _ => {}
                    }
                }
                parts.join(" ")
            }
        }
    }

    fn blocks(&self) -> &[Block] {
        match self {
            Content::Text(_) => &[],
            Content::Blocks(blocks) => blocks,
        }
    }
}

#[derive(Deserialize)]
struct Tool {
    /// Absent or `custom` for client tools; server tools (`web_search_...`) name their version.
    #[serde(rename = "type", default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    input_schema: Option<Value>,
}

impl Tool {
    fn is_client_tool(&self) -> bool {
        self.kind.as_deref().is_none_or(|kind| kind == "custom")
    }
}

#[derive(Deserialize)]
struct ToolChoice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    disable_parallel_tool_use: Option<bool>,
}

#[derive(Deserialize)]
struct Thinking {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    budget_tokens: Option<u64>,
}

/// Anthropic's error shape.
fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    json_response(status, &json!({"type": "error", "error": {"type": kind, "message": message}}))
}

fn invalid(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

/// The error type Anthropic uses for a status.
fn error_kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

pub(crate) async fn messages(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let behavior = shared.behavior.load_full();
    let answering = shared.count(Endpoint::Messages, &headers, query.as_deref(), &body, &behavior);
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
    if shared.delay_or_hang(behavior).await {
        return error(
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
            "Overloaded",
        );
    }
    if let Some(expected) = &behavior.api_key
        && header_str(headers, "x-api-key") != Some(expected.as_str())
    {
        shared.unauthorized.fetch_add(1, Ordering::Relaxed);
        return error(StatusCode::UNAUTHORIZED, "authentication_error", "invalid x-api-key");
    }
    if header_str(headers, "anthropic-version").is_none_or(|v| v.trim().is_empty()) {
        return invalid("anthropic-version: header is required");
    }
    let request: MessagesRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(err) => return invalid(&format!("Invalid request body: {err}")),
    };
    let facts = match check(&request) {
        Ok(facts) => facts,
        Err(message) => return invalid(&message),
    };
    if behavior.strict_models && !behavior.models.contains(&request.model) {
        return error(StatusCode::NOT_FOUND, "not_found_error", &format!("model: {}", request.model));
    }
    let system = request.system.as_ref().map(Content::text);
    let texts: Vec<String> = system.into_iter().chain(request.messages.iter().map(|m| m.content.text())).collect();
    let prompt_tokens = reply::prompt_tokens(texts.iter().map(String::as_str));
    if let Some(window) = behavior.context_window_of(&request.model)
        && prompt_tokens > window
    {
        return invalid(&format!("prompt is too long: {prompt_tokens} tokens > {window} maximum"));
    }
    if !delivery.replay
        && let Some(status) = shared.injected_status(behavior)
    {
        let mut response = error(status, error_kind(status), "Injected failure of the mock provider.");
        if matches!(status.as_u16(), 429 | 503 | 529)
            && let Some(secs) = behavior.retry_after_secs
        {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return response;
    }
    let stream = request.stream.unwrap_or(false) && !behavior.ignore_stream;
    if behavior.garbage {
        return if stream {
            let body = "event: message_start\ndata: {\"type\": this is not json\n\n";
            (StatusCode::OK, [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")], body).into_response()
        } else {
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{\"type\": this is not json")
                .into_response()
        };
    }

    let (cache_read, cache_write) = behavior.prompt_cache.map_or((0, 0), |cache| cache.split(prompt_tokens));
    let reply = Reply {
        id: shared.next_id("msg_mock"),
        model: request.model.clone(),
        input_tokens: prompt_tokens - cache_read - cache_write,
        cache: behavior.prompt_cache.is_some().then_some((cache_read, cache_write)),
        plan: Plan::new(facts, behavior, || shared.next_id("toolu_mock")),
    };
    shared.succeeded.fetch_add(1, Ordering::Relaxed);
    if stream {
        delivery.mark(stream_reply(reply, behavior, delivery.clone()))
    } else {
        delivery.completed();
        delivery.mark(json_reply(&reply))
    }
}

/// Checks the request as Anthropic does (the error message starts with the field's path) and reads
/// what the answer depends on.
fn check(request: &MessagesRequest) -> Result<agent::Request<'_>, String> {
    let Some(max_tokens) = request.max_tokens else {
        return Err("max_tokens: Field required".into());
    };
    if max_tokens == 0 {
        return Err("max_tokens: must be greater than or equal to 1".into());
    }
    if request.messages.is_empty() {
        return Err("messages: at least one message is required".into());
    }
    if let Some(temperature) = request.temperature
        && !(0.0..=1.0).contains(&temperature)
    {
        return Err(format!("temperature: Input should be between 0 and 1, got {temperature}"));
    }
    for (i, message) in request.messages.iter().enumerate() {
        if message.role != "user" && message.role != "assistant" {
            return Err(format!(
                "messages.{i}.role: Unexpected role \"{}\". Allowed roles are \"user\" or \"assistant\".",
                message.role
            ));
        }
        check_blocks(i, message)?;
    }
    check_tool_results(&request.messages)?;
    let (tools, tool_mode, parallel) = check_tools(request)?;
    let reasoning_pieces = check_thinking(request, max_tokens, tool_mode)?;
    let output = check_output_format(request)?;
    let last = request.messages.last().map(|m| m.role.as_str() == "user" && !has_tool_results(m));
    let echo_source =
        request.messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.text()).unwrap_or_default();
    Ok(agent::Request {
        tools,
        tool_mode,
        parallel_tool_calls: parallel,
        ends_in_user_turn: last.unwrap_or(false),
        output,
        reasoning_pieces,
        echo_source,
        max_tokens: Some(max_tokens),
    })
}

fn has_tool_results(message: &Message) -> bool {
    message.content.blocks().iter().any(|b| b.kind == "tool_result")
}

fn check_blocks(i: usize, message: &Message) -> Result<(), String> {
    let allowed: &[&str] = if message.role == "user" {
        &["text", "image", "document", "tool_result", "search_result"]
    } else {
        &["text", "tool_use", "thinking", "redacted_thinking", "server_tool_use", "web_search_tool_result"]
    };
    for (j, block) in message.content.blocks().iter().enumerate() {
        let path = format!("messages.{i}.content.{j}");
        if !allowed.contains(&block.kind.as_str()) {
            return Err(format!(
                "{path}.type: Input tag '{}' found using 'type' does not match any of the expected tags: {}",
                block.kind,
                allowed.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ")
            ));
        }
        match block.kind.as_str() {
            "text" if block.text.as_deref().is_none_or(str::is_empty) => {
                return Err(format!("{path}.text: text content blocks must be non-empty"));
            }
            "image" => check_image(&path, block.source.as_ref())?,
            "tool_use" => {
                if block.id.as_deref().is_none_or(str::is_empty) || block.name.as_deref().is_none_or(str::is_empty) {
                    return Err(format!("{path}.tool_use: 'id' and 'name' are required"));
                }
                if !block.input.as_ref().is_some_and(Value::is_object) {
                    return Err(format!("{path}.tool_use.input: Input should be a valid dictionary"));
                }
            }
            "tool_result" if block.tool_use_id.as_deref().is_none_or(str::is_empty) => {
                return Err(format!("{path}.tool_result.tool_use_id: Field required"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_image(path: &str, source: Option<&Value>) -> Result<(), String> {
    let Some(source) = source else {
        return Err(format!("{path}.image.source: Field required"));
    };
    match source["type"].as_str() {
        Some("base64") => {
            let media_type = source["media_type"].as_str().unwrap_or_default();
            if !IMAGE_MEDIA_TYPES.contains(&media_type) {
                return Err(format!(
                    "{path}.image.source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or \
                     'image/webp'"
                ));
            }
            if !source["data"].as_str().is_some_and(is_base64) {
                return Err(format!("{path}.image.source.base64.data: invalid base64 data"));
            }
            Ok(())
        }
        Some("url") => {
            let url = source["url"].as_str().unwrap_or_default();
            if url.starts_with("https://") || url.starts_with("http://") {
                Ok(())
            } else {
                Err(format!("{path}.image.source.url.url: Input should be an http(s) URL"))
            }
        }
        _ => Err(format!("{path}.image.source.type: Input should be 'base64' or 'url'")),
    }
}

/// Each `tool_result` answers a `tool_use` of the message before it, and each assistant
/// `tool_use` is answered by a `tool_result` in the next message.
fn check_tool_results(messages: &[Message]) -> Result<(), String> {
    let calls_before = |i: usize| match i.checked_sub(1).map(|p| &messages[p]) {
        Some(previous) if previous.role == "assistant" => call_ids(previous),
        _ => Vec::new(),
    };
    for (i, message) in messages.iter().enumerate() {
        let calls = calls_before(i);
        if let Some((j, id)) = result_ids(message).into_iter().enumerate().find(|(_, id)| !calls.contains(id)) {
            return Err(format!(
                "messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each \
                 `tool_result` block must have a corresponding `tool_use` block in the previous message."
            ));
        }
    }
    for i in 1..=messages.len() {
        let answered = messages.get(i).map_or_else(Vec::new, result_ids);
        let missing: Vec<&str> = calls_before(i).into_iter().filter(|id| !answered.contains(id)).collect();
        if !missing.is_empty() {
            return Err(format!(
                "messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: {}. Each \
                 `tool_use` block must have a corresponding `tool_result` block in the next message.",
                missing.join(", ")
            ));
        }
    }
    Ok(())
}

/// The ids of a message's `tool_use` blocks.
fn call_ids(message: &Message) -> Vec<&str> {
    message.content.blocks().iter().filter(|b| b.kind == "tool_use").filter_map(|b| b.id.as_deref()).collect()
}

/// The call ids a message's `tool_result` blocks answer.
fn result_ids(message: &Message) -> Vec<&str> {
    message
        .content
        .blocks()
        .iter()
        .filter(|b| b.kind == "tool_result")
        .filter_map(|b| b.tool_use_id.as_deref())
        .collect()
}

/// The client tools offered, the tool choice, and whether parallel calls are allowed.
fn check_tools(request: &MessagesRequest) -> Result<(Vec<agent::Tool<'_>>, ToolMode<'_>, bool), String> {
    let definitions = request.tools.as_deref().unwrap_or_default();
    let mut tools = Vec::with_capacity(definitions.len());
    for (i, tool) in definitions.iter().enumerate() {
        if !tool.is_client_tool() {
            continue;
        }
        let name_ok = !tool.name.is_empty()
            && tool.name.len() <= MAX_TOOL_NAME
            && tool.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(format!("tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"));
        }
        let Some(schema) = &tool.input_schema else {
            return Err(format!("tools.{i}.custom.input_schema: Field required"));
        };
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return Err(format!("tools.{i}.custom.input_schema.type: Input should be 'object'"));
        }
        tools.push(agent::Tool { name: &tool.name, parameters: Some(schema) });
    }
    let Some(choice) = &request.tool_choice else {
        return Ok((tools, ToolMode::Auto, true));
    };
    if definitions.is_empty() && choice.kind != "none" {
        return Err("tool_choice: tool_choice may only be specified while providing tools".into());
    }
    let parallel = !choice.disable_parallel_tool_use.unwrap_or(false);
    let mode = match choice.kind.as_str() {
        "auto" => ToolMode::Auto,
        "none" => ToolMode::None,
        "any" => ToolMode::Required,
        "tool" => {
            let Some(name) = choice.name.as_deref() else {
                return Err("tool_choice.tool.name: Field required".into());
            };
            if !tools.iter().any(|t| t.name == name) {
                return Err(format!("tool_choice.tool.name: Tool '{name}' not found in tools"));
            }
            ToolMode::Named(name)
        }
        other => {
            return Err(format!(
                "tool_choice: Input tag '{other}' found using 'type' does not match any of the expected tags: \
                 'auto', 'any', 'tool', 'none'"
            ));
        }
    };
    Ok((tools, mode, parallel))
}

/// Reasoning pieces for the request's `thinking`.
fn check_thinking(request: &MessagesRequest, max_tokens: u64, tool_mode: ToolMode<'_>) -> Result<usize, String> {
    let Some(thinking) = &request.thinking else { return Ok(0) };
    match thinking.kind.as_str() {
        "disabled" => return Ok(0),
        "enabled" => {
            let Some(budget) = thinking.budget_tokens else {
                return Err("thinking.enabled.budget_tokens: Field required".into());
            };
            if budget < MIN_THINKING_BUDGET {
                return Err(format!(
                    "thinking.enabled.budget_tokens: Input should be greater than or equal to {MIN_THINKING_BUDGET}"
                ));
            }
            if max_tokens <= budget {
                return Err("max_tokens: `max_tokens` must be greater than `thinking.budget_tokens`".into());
            }
        }
        "adaptive" => {}
        other => {
            return Err(format!(
                "thinking: Input tag '{other}' found using 'type' does not match any of the expected tags: \
                 'enabled', 'disabled', 'adaptive'"
            ));
        }
    }
    if matches!(tool_mode, ToolMode::Required | ToolMode::Named(_)) {
        return Err("tool_choice: Thinking may not be enabled when tool_choice forces tool use.".into());
    }
    if request.temperature.is_some_and(|t| t != 1.0) {
        return Err("temperature: `temperature` may only be set to 1 when thinking is enabled.".into());
    }
    Ok(reply::reasoning_pieces("medium"))
}

/// Structured outputs: `output_config.format` or the beta `output_format`.
fn check_output_format(request: &MessagesRequest) -> Result<Output<'_>, String> {
    let (path, format) = match (&request.output_config, &request.output_format) {
        (Some(config), _) if config.get("format").is_some() => ("output_config.format", &config["format"]),
        (_, Some(format)) => ("output_format", format),
        _ => return Ok(Output::Text),
    };
    if format["type"].as_str() != Some("json_schema") {
        return Err(format!("{path}.type: Input should be 'json_schema'"));
    }
    match format.get("schema") {
        Some(schema) if schema.is_object() => Ok(Output::JsonSchema(schema)),
        _ => Err(format!("{path}.schema: Field required")),
    }
}

struct Reply {
    id: String,
    model: String,
    /// Prompt tokens neither read from nor written to the cache.
    input_tokens: u64,
    /// `(read, written)` cache tokens, when the behaviour reports a prompt cache.
    cache: Option<(u64, u64)>,
    plan: Plan,
}

impl Reply {
    fn usage(&self, output_tokens: u64) -> Value {
        let mut usage = json!({"input_tokens": self.input_tokens, "output_tokens": output_tokens});
        if let Some((read, write)) = self.cache {
            usage["cache_read_input_tokens"] = json!(read);
            usage["cache_creation_input_tokens"] = json!(write);
        }
        usage
    }

    fn signature(&self) -> String {
        format!("mock-signature-{}", self.id)
    }
}

fn json_reply(reply: &Reply) -> Response {
    let mut content = Vec::new();
    if let Some(thinking) = reply.plan.reasoning_text() {
        content.push(json!({"type": "thinking", "thinking": thinking, "signature": reply.signature()}));
    }
    match &reply.plan.body {
        Body::ToolCalls(calls) => {
            for call in calls {
                let input: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
                content.push(json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input}));
            }
        }
        Body::Text | Body::Json(_) => {
            content.push(json!({"type": "text", "text": reply.plan.content().unwrap_or_default()}));
        }
    }
    let body = json!({
        "id": reply.id,
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": content,
        "stop_reason": reply.plan.finish.anthropic(),
        "stop_sequence": null,
        "usage": reply.usage(reply.plan.completion_tokens()),
    });
    json_response(StatusCode::OK, &body)
}

/// One named SSE event.
fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

fn block_start(index: usize, block: Value) -> Bytes {
    event("content_block_start", &json!({"type": "content_block_start", "index": index, "content_block": block}))
}

fn block_delta(index: usize, delta: Value) -> Bytes {
    event("content_block_delta", &json!({"type": "content_block_delta", "index": index, "delta": delta}))
}

fn block_stop(index: usize) -> Bytes {
    event("content_block_stop", &json!({"type": "content_block_stop", "index": index}))
}

fn stream_reply(reply: Reply, behavior: &Behavior, delivery: Delivery) -> Response {
    let chunk_delay = behavior.chunk_delay;
    let fail_after = behavior.fail_after_chunks.map(|n| n as usize);
    let fault = behavior.stream_fault;
    let total_pieces = reply.plan.reasoning_pieces + reply.plan.body_pieces;
    let streaming = delivery.streaming();
    let events = async_stream::try_stream! {
        let _streaming = streaming;
        yield event("message_start", &json!({
            "type": "message_start",
            "message": {
                "id": reply.id, "type": "message", "role": "assistant", "model": reply.model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": reply.usage(1)
            }
        }));
        // Every piece (thinking, text, JSON or input fragment) counts towards fail_after; the ping
        // follows the first block's start, as Anthropic sends it.
        let mut sent = 0;
        let mut index = 0;
        'pieces: {
            if let Some(reasoning) = &reply.plan.reasoning {
                yield block_start(index, json!({"type": "thinking", "thinking": "", "signature": ""}));
                yield event("ping", &json!({"type": "ping"}));
                for i in 0..reply.plan.reasoning_pieces {
                    if fail_after == Some(sent) {
                        break 'pieces;
                    }
                    pause(chunk_delay).await;
                    yield block_delta(index, json!({"type": "thinking_delta", "thinking": reasoning.piece(i).to_string()}));
                    sent += 1;
                    delivery.streamed(sent);
                }
                yield block_delta(index, json!({"type": "signature_delta", "signature": reply.signature()}));
                yield block_stop(index);
                index += 1;
            }
            match &reply.plan.body {
                Body::ToolCalls(calls) => {
                    for call in calls {
                        yield block_start(index, json!({"type": "tool_use", "id": call.id, "name": call.name, "input": {}}));
                        if index == 0 {
                            yield event("ping", &json!({"type": "ping"}));
                        }
                        for partial in argument_fragments(&call.arguments) {
                            if fail_after == Some(sent) {
                                break 'pieces;
                            }
                            pause(chunk_delay).await;
                            yield block_delta(index, json!({"type": "input_json_delta", "partial_json": partial}));
                            sent += 1;
                            delivery.streamed(sent);
                        }
                        yield block_stop(index);
                        index += 1;
                    }
                }
                Body::Text | Body::Json(_) => {
                    yield block_start(index, json!({"type": "text", "text": ""}));
                    if index == 0 {
                        yield event("ping", &json!({"type": "ping"}));
                    }
                    for text in reply.plan.content_pieces() {
                        if fail_after == Some(sent) {
                            break 'pieces;
                        }
                        pause(chunk_delay).await;
                        yield block_delta(index, json!({"type": "text_delta", "text": text}));
                        sent += 1;
                        delivery.streamed(sent);
                    }
                    yield block_stop(index);
                }
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
                    yield event("error", &json!({
                        "type": "error",
                        "error": {"type": "overloaded_error", "message": "Overloaded (mid-stream failure injected by the mock provider)."}
                    }));
                }
                StreamFault::Close => {}
            }
            return;
        }
        delivery.completed();
        yield event("message_delta", &json!({
            "type": "message_delta",
            "delta": {"stop_reason": reply.plan.finish.anthropic(), "stop_sequence": null},
            "usage": {"output_tokens": reply.plan.completion_tokens()}
        }));
        yield event("message_stop", &json!({"type": "message_stop"}));
    };
    sse_response(events)
}
