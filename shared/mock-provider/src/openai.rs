//! `POST /v1/chat/completions`: OpenAI's Chat Completions, checked the way OpenAI checks a request
//! (400 naming the offending parameter) and answered by the agent game of the crate documentation,
//! as JSON or as `chat.completion.chunk` events.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::agent::{self, Body, Output, Plan, ToolMode};
use crate::checks::{self, Invalid};
use crate::reply::{self, argument_fragments};
use crate::server::{
    ABORT_FLUSH_PAUSE, Delivery, Endpoint, garbage, invalid, json_response, model_not_found, now_secs, pause,
    sse_response,
};
use crate::state::{Behavior, Shared, StreamFault};
use crate::wire::{self, ChatMessage, ChatRequest, Content, sse_frame};

const FINGERPRINT: &str = "fp_meshgate_mock";
const ROLES: [&str; 6] = ["system", "developer", "user", "assistant", "tool", "function"];

pub(crate) async fn chat(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let behavior = shared.behavior.load_full();
    let answering = shared.count(Endpoint::Chat, &headers, query.as_deref(), &body, &behavior);
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
    let request: ChatRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(err) => return invalid(&format!("Invalid chat completion request: {err}")),
    };
    let facts = match check(&request) {
        Ok(facts) => facts,
        Err(invalid) => return invalid.response(),
    };
    if behavior.strict_models && !behavior.models.contains(&request.model) {
        return model_not_found(&request.model);
    }
    let prompt_tokens = reply::TOKENS_PER_REQUEST
        + request.messages.iter().map(|m| reply::TOKENS_PER_MESSAGE + m.token_count()).sum::<u64>();
    if let Some(window) = behavior.context_window_of(&request.model)
        && prompt_tokens > window
    {
        let message = format!(
            "This model's maximum context length is {window} tokens. However, your messages resulted in \
             {prompt_tokens} tokens. Please reduce the length of the messages."
        );
        return Invalid::new("messages", message).code("context_length_exceeded").response();
    }
    if !delivery.replay
        && let Some(answer) = shared.injected_failure(behavior)
    {
        return answer;
    }
    let stream = request.stream.unwrap_or(false) && !behavior.ignore_stream;
    if behavior.garbage {
        return garbage(stream);
    }

    let plan = Plan::new(facts, behavior, || shared.next_id("call_mock"));
    let reply = Reply {
        id: shared.next_id("chatcmpl-mock"),
        created: now_secs(),
        prompt_tokens,
        cached_tokens: behavior.prompt_cache.map(|cache| cache.split(prompt_tokens).0),
        plan,
        model: request.model,
    };
    shared.succeeded.fetch_add(1, Ordering::Relaxed);
    if stream {
        let include_usage = request.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        delivery.mark(stream_reply(reply, behavior, include_usage, delivery.clone()))
    } else {
        delivery.completed();
        delivery.mark(json_reply(&reply))
    }
}

/// Checks the request as OpenAI does and reads what the answer depends on.
fn check(request: &ChatRequest) -> Result<agent::Request<'_>, Invalid> {
    let messages = &request.messages;
    if messages.is_empty() {
        return Err(Invalid::new("messages", "'messages' must contain at least one message."));
    }
    for (i, message) in messages.iter().enumerate() {
        check_message(i, message)?;
    }
    check_tool_results(messages)?;
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    if max_tokens == Some(0) {
        return Err(Invalid::new("max_tokens", "'max_tokens' must be at least 1."));
    }
    let (tools, tool_mode) = check_tools(request)?;
    let output = match &request.response_format {
        None => Output::Text,
        Some(format) => check_response_format(format)?,
    };
    let reasoning_pieces = match request.reasoning_effort.as_deref() {
        None => 0,
        Some(effort) => checks::reasoning_pieces("reasoning_effort", effort)?,
    };
    let last = messages.last().map_or("", |m| m.role.as_str());
    Ok(agent::Request {
        tools,
        tool_mode,
        parallel_tool_calls: request.parallel_tool_calls.unwrap_or(true),
        ends_in_user_turn: last == "user",
        output,
        reasoning_pieces,
        echo_source: echo_source(messages),
        max_tokens,
    })
}

/// The text the answer echoes: the tool results the conversation ends with, else the last user
/// message.
fn echo_source(messages: &[ChatMessage]) -> String {
    let results = messages.iter().rev().take_while(|m| m.role == "tool").count();
    if results > 0 {
        let texts: Vec<String> = messages[messages.len() - results..].iter().map(ChatMessage::text).collect();
        return texts.join(" ");
    }
    messages.iter().rev().find(|m| m.role == "user").map(ChatMessage::text).unwrap_or_default()
}

fn check_message(i: usize, message: &ChatMessage) -> Result<(), Invalid> {
    if !ROLES.contains(&message.role.as_str()) {
        return Err(Invalid::new(
            format!("messages[{i}].role"),
            format!("Invalid role '{}' in 'messages'.", message.role),
        ));
    }
    let Some(Content::Parts(parts)) = &message.content else {
        if message.content.is_none() && message.role != "assistant" {
            return Err(Invalid::missing(format!("messages[{i}].content")));
        }
        return Ok(());
    };
    // Which parts each role may send.
    let allowed: &[&str] = match message.role.as_str() {
        "user" => &["text", "image_url", "input_audio", "file"],
        "assistant" => &["text", "refusal"],
        _ => &["text"],
    };
    for (j, part) in parts.iter().enumerate() {
        let param = format!("messages[{i}].content[{j}]");
        let kind = part.kind.as_deref().unwrap_or_default();
        if !allowed.contains(&kind) {
            return Err(Invalid::new(
                format!("{param}.type"),
                format!(
                    "Invalid value: '{kind}'. Supported values for role '{}' are: {}.",
                    message.role,
                    allowed.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ")
                ),
            )
            .code("invalid_value"));
        }
        match kind {
            "text" if part.text.is_none() => {
                return Err(Invalid::missing(format!("{param}.text")));
            }
            "image_url" => {
                let Some(image) = &part.image_url else {
                    return Err(Invalid::missing(format!("{param}.image_url")));
                };
                if !checks::image_url_ok(&image.url) {
                    return Err(checks::invalid_image_url(format!("{param}.image_url.url")));
                }
            }
            "input_audio" => {
                let ok = part.input_audio.as_ref().is_some_and(|audio| checks::audio_ok(&audio.data, &audio.format));
                if !ok {
                    return Err(Invalid::new(
                        format!("{param}.input_audio"),
                        "Invalid input_audio: expected base64 'data' and a 'format' of 'wav' or 'mp3'.",
                    ));
                }
            }
            "file" => {
                let ok = part.file.as_ref().is_some_and(|file| file.file_id.is_some() || file.file_data.is_some());
                if !ok {
                    return Err(Invalid::new(
                        format!("{param}.file"),
                        "Invalid file: expected a 'file_id' or 'file_data'.",
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Every `tool` message answers a call of the assistant turn before it, and every call is
/// answered before the conversation goes on.
fn check_tool_results(messages: &[ChatMessage]) -> Result<(), Invalid> {
    let mut pending: Vec<&str> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if message.role == "tool" {
            let Some(id) = message.tool_call_id.as_deref() else {
                return Err(Invalid::missing(format!("messages[{i}].tool_call_id")));
            };
            let Some(at) = pending.iter().position(|p| *p == id) else {
                return Err(Invalid::new(
                    format!("messages[{i}].role"),
                    "Invalid parameter: messages with role 'tool' must be a response to a preceding message with \
                     'tool_calls'.",
                ));
            };
            pending.remove(at);
            continue;
        }
        unanswered(&pending, i)?;
        if message.role == "assistant" {
            for (j, call) in message.tool_calls.iter().flatten().enumerate() {
                if call.id.is_empty() || call.function.name.is_empty() {
                    return Err(Invalid::new(
                        format!("messages[{i}].tool_calls[{j}]"),
                        "Invalid tool call: 'id' and 'function.name' must not be empty.",
                    ));
                }
                pending.push(&call.id);
            }
        }
    }
    unanswered(&pending, messages.len() - 1)
}

fn unanswered(pending: &[&str], i: usize) -> Result<(), Invalid> {
    if pending.is_empty() {
        return Ok(());
    }
    Err(Invalid::new(
        format!("messages[{i}].role"),
        format!(
            "An assistant message with 'tool_calls' must be followed by tool messages responding to each \
             'tool_call_id'. The following tool_call_ids did not have response messages: {}",
            pending.join(", ")
        ),
    ))
}

/// The offered functions and how the model must use them.
fn check_tools(request: &ChatRequest) -> Result<(Vec<agent::Tool<'_>>, ToolMode<'_>), Invalid> {
    let definitions = request.tools.as_deref().unwrap_or_default();
    checks::check_tool_count(definitions.len())?;
    let mut tools = Vec::with_capacity(definitions.len());
    for (i, definition) in definitions.iter().enumerate() {
        match definition.kind.as_deref() {
            Some("function") => {}
            // Custom (free-form) tools take no JSON arguments: the mock does not call them.
            Some("custom") => continue,
            other => {
                return Err(Invalid::new(
                    format!("tools[{i}].type"),
                    format!("Invalid value: '{}'. Supported values are: 'function' and 'custom'.", other.unwrap_or("")),
                )
                .code("invalid_value"));
            }
        }
        let Some(function) = &definition.function else {
            return Err(Invalid::missing(format!("tools[{i}].function")));
        };
        checks::check_function(&format!("tools[{i}].function"), &function.name, function.parameters.as_ref())?;
        tools.push(agent::Tool { name: &function.name, parameters: function.parameters.as_ref() });
    }
    let Some(choice) = &request.tool_choice else {
        return Ok((tools, ToolMode::Auto));
    };
    if definitions.is_empty() {
        return Err(Invalid::new(
            "tool_choice",
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
        ));
    }
    let mode = match choice {
        Value::String(mode) => checks::tool_mode(mode)?,
        Value::Object(choice) if choice.get("type").and_then(Value::as_str) == Some("function") => {
            let Some(name) = choice.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) else {
                return Err(Invalid::missing("tool_choice.function.name"));
            };
            if !tools.iter().any(|t| t.name == name) {
                return Err(Invalid::new(
                    "tool_choice",
                    format!("Invalid value for 'tool_choice': function '{name}' is not one of the 'tools'."),
                ));
            }
            ToolMode::Named(name)
        }
        Value::Object(choice) if choice.get("type").and_then(Value::as_str) == Some("allowed_tools") => {
            let allowed = &choice.get("allowed_tools").unwrap_or(&Value::Null);
            let names: Vec<&str> = allowed["tools"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["function"]["name"].as_str())
                .collect();
            tools.retain(|t| names.contains(&t.name));
            match allowed["mode"].as_str() {
                Some("required") => ToolMode::Required,
                Some("auto") => ToolMode::Auto,
                _ => {
                    return Err(Invalid::new(
                        "tool_choice.allowed_tools.mode",
                        "Invalid value for 'tool_choice.allowed_tools.mode': expected 'auto' or 'required'.",
                    ));
                }
            }
        }
        _ => {
            return Err(Invalid::new(
                "tool_choice",
                "Invalid 'tool_choice': expected 'none', 'auto', 'required' or an object naming a function.",
            ));
        }
    };
    Ok((tools, mode))
}

fn check_response_format(format: &Value) -> Result<Output<'_>, Invalid> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Output::Text),
        Some("json_object") => Ok(Output::JsonObject),
        Some("json_schema") => {
            let Some(spec) = format.get("json_schema").filter(|s| s.is_object()) else {
                return Err(Invalid::missing("response_format.json_schema"));
            };
            checks::named_schema(spec, "response_format.json_schema")
        }
        _ => Err(Invalid::new(
            "response_format.type",
            "Invalid value for 'response_format.type': supported values are 'text', 'json_object' and 'json_schema'.",
        )
        .code("invalid_value")),
    }
}

struct Reply {
    id: String,
    model: String,
    created: u64,
    prompt_tokens: u64,
    /// Prompt tokens read from the cache, when the behaviour reports a prompt cache.
    cached_tokens: Option<u64>,
    plan: Plan,
}

impl Reply {
    fn usage(&self) -> wire::Usage {
        let completion_tokens = self.plan.completion_tokens();
        wire::Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            total_tokens: self.prompt_tokens + completion_tokens,
            prompt_tokens_details: self
                .cached_tokens
                .map(|cached_tokens| wire::PromptTokensDetails { cached_tokens, audio_tokens: 0 }),
            completion_tokens_details: (self.plan.reasoning_pieces > 0).then_some(wire::CompletionTokensDetails {
                reasoning_tokens: self.plan.reasoning_pieces as u64,
                audio_tokens: 0,
                accepted_prediction_tokens: 0,
                rejected_prediction_tokens: 0,
            }),
        }
    }

    fn calls(&self) -> &[agent::PlannedCall] {
        match &self.plan.body {
            Body::ToolCalls(calls) => calls,
            Body::Text | Body::Json(_) => &[],
        }
    }
}

fn json_reply(reply: &Reply) -> Response {
    let content = reply.plan.content();
    let reasoning = reply.plan.reasoning_text();
    let calls = reply.calls();
    let tool_calls = (!calls.is_empty()).then(|| {
        calls
            .iter()
            .map(|call| wire::ToolCallOut {
                id: &call.id,
                kind: "function",
                function: wire::FunctionOut { name: &call.name, arguments: &call.arguments },
            })
            .collect()
    });
    let body = wire::Completion {
        id: &reply.id,
        object: "chat.completion",
        created: reply.created,
        model: &reply.model,
        system_fingerprint: FINGERPRINT,
        choices: [wire::CompletionChoice {
            index: 0,
            message: wire::AssistantMessage {
                role: "assistant",
                content: content.as_deref(),
                refusal: None,
                reasoning_content: reasoning.as_deref(),
                tool_calls,
            },
            logprobs: None,
            finish_reason: reply.plan.finish.openai(),
        }],
        usage: reply.usage(),
    };
    json_response(StatusCode::OK, &body)
}

fn tool_start(index: usize, call: &agent::PlannedCall) -> wire::ToolCallStart<'_> {
    wire::ToolCallStart {
        index: index as u32,
        id: &call.id,
        kind: "function",
        function: wire::FunctionOut { name: &call.name, arguments: "" },
    }
}

fn stream_reply(reply: Reply, behavior: &Behavior, include_usage: bool, delivery: Delivery) -> Response {
    let chunk_delay = behavior.chunk_delay;
    let fail_after = behavior.fail_after_chunks.map(|n| n as usize);
    let fault = behavior.stream_fault;
    let total_pieces = reply.plan.reasoning_pieces + reply.plan.body_pieces;
    let streaming = delivery.streaming();
    let events = async_stream::try_stream! {
        let _streaming = streaming;
        // `usage: null` on every chunk but the last one when usage was asked for.
        let usage = include_usage.then_some(None);
        let calls = reply.calls();
        // The first call starts on the role delta, as OpenAI streams it, unless reasoning comes first.
        let call_on_role = reply.plan.reasoning.is_none() && !calls.is_empty();
        let role = wire::RoleDelta {
            role: "assistant",
            content: if calls.is_empty() { Some("") } else { None },
            refusal: None,
            tool_calls: call_on_role.then(|| [tool_start(0, &calls[0])]),
        };
        yield chunk_frame(&reply, usage, &[choice(role, None)])?;

        // Every piece (reasoning, text, JSON or argument fragment) counts towards fail_after.
        let mut sent = 0;
        'pieces: {
            if let Some(reasoning) = &reply.plan.reasoning {
                for i in 0..reply.plan.reasoning_pieces {
                    if fail_after == Some(sent) {
                        break 'pieces;
                    }
                    pause(chunk_delay).await;
                    let delta = wire::ReasoningDelta { reasoning_content: reasoning.piece(i) };
                    yield chunk_frame(&reply, usage, &[choice(delta, None)])?;
                    sent += 1;
                    delivery.streamed(sent);
                }
            }
            match &reply.plan.body {
                Body::Text => {
                    for i in 0..reply.plan.body_pieces {
                        if fail_after == Some(sent) {
                            break 'pieces;
                        }
                        pause(chunk_delay).await;
                        let delta = wire::ContentDelta { content: reply.plan.echo.piece(i) };
                        yield chunk_frame(&reply, usage, &[choice(delta, None)])?;
                        sent += 1;
                        delivery.streamed(sent);
                    }
                }
                Body::Json(json) => {
                    for fragment in argument_fragments(json).take(reply.plan.body_pieces) {
                        if fail_after == Some(sent) {
                            break 'pieces;
                        }
                        pause(chunk_delay).await;
                        yield chunk_frame(&reply, usage, &[choice(wire::ContentDelta { content: fragment }, None)])?;
                        sent += 1;
                        delivery.streamed(sent);
                    }
                }
                Body::ToolCalls(calls) => {
                    for (index, call) in calls.iter().enumerate() {
                        if index > 0 || !call_on_role {
                            let delta = wire::ToolStartDelta { tool_calls: [tool_start(index, call)] };
                            yield chunk_frame(&reply, usage, &[choice(delta, None)])?;
                        }
                        for arguments in argument_fragments(&call.arguments) {
                            if fail_after == Some(sent) {
                                break 'pieces;
                            }
                            pause(chunk_delay).await;
                            let delta = wire::ToolArgumentsDelta {
                                tool_calls: [wire::ToolArguments {
                                    index: index as u32,
                                    function: wire::ArgumentsOnly { arguments },
                                }],
                            };
                            yield chunk_frame(&reply, usage, &[choice(delta, None)])?;
                            sent += 1;
                            delivery.streamed(sent);
                        }
                    }
                }
            }
        }
        if fail_after.is_some_and(|n| n <= total_pieces) {
            delivery.cut();
            match fault {
                StreamFault::Abort => {
                    // Let the connection flush what was produced, so the client really holds
                    // the first chunks when the transport breaks.
                    tokio::time::sleep(ABORT_FLUSH_PAUSE).await;
                    Err(io::Error::other("mock provider: stream aborted"))?;
                }
                StreamFault::ErrorEvent => {
                    let body = wire::ErrorBody {
                        error: wire::ErrorObject {
                            message: "The server had an error while processing your request (mid-stream failure injected by the mock provider).",
                            kind: "server_error",
                            param: None,
                            code: None,
                        },
                    };
                    yield sse_frame(&body).map_err(io::Error::other)?;
                }
                StreamFault::Close => {}
            }
            return;
        }
        delivery.completed();
        yield chunk_frame(&reply, usage, &[choice(wire::EmptyDelta {}, Some(reply.plan.finish.openai()))])?;
        if include_usage {
            yield chunk_frame::<wire::EmptyDelta>(&reply, Some(Some(reply.usage())), &[])?;
        }
        yield Bytes::from_static(b"data: [DONE]\n\n");
    };
    sse_response(events)
}

/// One `chat.completion.chunk` event of `reply`.
fn chunk_frame<D: Serialize>(
    reply: &Reply,
    usage: Option<Option<wire::Usage>>,
    choices: &[wire::ChunkChoice<'_, D>],
) -> io::Result<Bytes> {
    let chunk = wire::Chunk {
        id: &reply.id,
        object: "chat.completion.chunk",
        created: reply.created,
        model: &reply.model,
        system_fingerprint: FINGERPRINT,
        choices,
        usage,
    };
    sse_frame(&chunk).map_err(io::Error::other)
}

fn choice<D: Serialize>(delta: D, finish_reason: Option<&str>) -> wire::ChunkChoice<'_, D> {
    wire::ChunkChoice { index: 0, delta, logprobs: None, finish_reason }
}
