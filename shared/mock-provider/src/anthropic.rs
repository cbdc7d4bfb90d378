//! `POST /v1/messages`: the Anthropic Messages API, with the same behaviour knobs and the same
//! deterministic replies as the OpenAI routes.
//!
//! Prompt tokens are counted as for the OpenAI routes with the `system` prompt as one more
//! message, so the same conversation costs the same in both formats: `reply::prompt_tokens` over
//! the system text (when present) and the text of each message.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::reply::{self, Echo, argument_fragments, completion_plan};
use crate::server::{ABORT_FLUSH_PAUSE, Delivery, Endpoint, header_str, io_body, json_response};
use crate::{Behavior, Shared, StreamFault};

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
}

#[derive(Deserialize)]
struct Tool {
    name: String,
}

#[derive(Deserialize)]
struct ToolChoice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
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

pub(crate) async fn messages(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let behavior = shared.behavior.load_full();
    shared.count(Endpoint::Messages, &headers, &body, &behavior);
    let delivery = shared.delivery(&headers, &behavior);
    if shared.delay_or_hang(&behavior).await {
        return error(
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
            "Overloaded",
        );
    }
    if let Some(expected) = &behavior.api_key
        && header_str(&headers, "x-api-key") != Some(expected.as_str())
    {
        shared.unauthorized.fetch_add(1, Ordering::Relaxed);
        return error(StatusCode::UNAUTHORIZED, "authentication_error", "invalid x-api-key");
    }
    if header_str(&headers, "anthropic-version").is_none_or(|v| v.trim().is_empty()) {
        return invalid("anthropic-version: header is required");
    }
    let request: MessagesRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => return invalid(&format!("Invalid request body: {err}")),
    };
    let Some(max_tokens) = request.max_tokens else {
        return invalid("max_tokens: Field required");
    };
    if max_tokens == 0 {
        return invalid("max_tokens: must be greater than or equal to 1");
    }
    if request.messages.is_empty() {
        return invalid("messages: at least one message is required");
    }
    if let Some(bad) = request.messages.iter().find(|m| m.role != "user" && m.role != "assistant") {
        return invalid(&format!(
            "messages: Unexpected role \"{}\". Allowed roles are \"user\" or \"assistant\".",
            bad.role
        ));
    }
    if behavior.strict_models && !behavior.models.contains(&request.model) {
        return error(StatusCode::NOT_FOUND, "not_found_error", &format!("model: {}", request.model));
    }
    if !delivery.replay
        && let Some(status) = shared.injected_status(&behavior)
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

    let last_user =
        request.messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.text()).unwrap_or_default();
    let system = request.system.as_ref().map(Content::text);
    let texts: Vec<String> = system.into_iter().chain(request.messages.iter().map(|m| m.content.text())).collect();
    let input_tokens = reply::prompt_tokens(texts.iter().map(String::as_str));
    let tool = tool_call_for(&behavior, &request, &last_user);
    let reply = Reply {
        id: shared.next_id("msg_mock"),
        model: request.model,
        input_tokens,
        max_tokens,
        echo: Echo::new(last_user),
        tool: tool.map(|(name, input)| (shared.next_id("toolu_mock"), name, input)),
    };
    shared.succeeded.fetch_add(1, Ordering::Relaxed);
    if stream {
        delivery.mark(stream_reply(reply, &behavior, delivery.clone()))
    } else {
        delivery.completed();
        delivery.mark(json_reply(&reply, &behavior))
    }
}

/// The tool the mock calls: the behaviour's, or the one `tool_choice` demands (`any` or `tool`).
fn tool_call_for(behavior: &Behavior, request: &MessagesRequest, last_user: &str) -> Option<(String, String)> {
    if let Some(call) = &behavior.tool_call {
        return Some((call.name.clone(), call.arguments.clone()));
    }
    let tools = request.tools.as_ref()?;
    let choice = request.tool_choice.as_ref()?;
    let name = match choice.kind.as_str() {
        "any" => tools.first()?.name.clone(),
        "tool" => choice.name.clone()?,
        _ => return None,
    };
    Some((name, json!({ "input": last_user }).to_string()))
}

struct Reply {
    id: String,
    model: String,
    input_tokens: u64,
    max_tokens: u64,
    echo: Echo,
    /// `(id, name, arguments JSON)`.
    tool: Option<(String, String, String)>,
}

/// Anthropic's stop reason for the mock's plan.
fn stop_reason(finish: &str) -> &'static str {
    if finish == "length" { "max_tokens" } else { "end_turn" }
}

fn json_reply(reply: &Reply, behavior: &Behavior) -> Response {
    let (content, stop, output_tokens) = match &reply.tool {
        Some((id, name, arguments)) => {
            let input: Value = serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
            (
                json!([{"type": "tool_use", "id": id, "name": name, "input": input}]),
                "tool_use",
                argument_fragments(arguments).count(),
            )
        }
        None => {
            let (count, finish) = completion_plan(reply.echo.len(), behavior.stream_chunks, Some(reply.max_tokens));
            let text: String = (0..count).map(|i| reply.echo.piece(i).to_string()).collect();
            (json!([{"type": "text", "text": text}]), stop_reason(finish), count)
        }
    };
    let body = json!({
        "id": reply.id,
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": {"input_tokens": reply.input_tokens, "output_tokens": output_tokens},
    });
    json_response(StatusCode::OK, &body)
}

/// One named SSE event.
fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

fn stream_reply(reply: Reply, behavior: &Behavior, delivery: Delivery) -> Response {
    let chunk_delay = behavior.chunk_delay;
    let fail_after = behavior.fail_after_chunks.map(|n| n as usize);
    let fault = behavior.stream_fault;
    let (count, stop) = match &reply.tool {
        Some((_, _, arguments)) => (argument_fragments(arguments).count(), "tool_use"),
        None => {
            let (count, finish) = completion_plan(reply.echo.len(), behavior.stream_chunks, Some(reply.max_tokens));
            (count, stop_reason(finish))
        }
    };
    let body = async_stream::try_stream! {
        yield event("message_start", &json!({
            "type": "message_start",
            "message": {
                "id": reply.id, "type": "message", "role": "assistant", "model": reply.model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": reply.input_tokens, "output_tokens": 1}
            }
        }));
        let block = match &reply.tool {
            Some((id, name, _)) => json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
            None => json!({"type": "text", "text": ""}),
        };
        yield event("content_block_start", &json!({"type": "content_block_start", "index": 0, "content_block": block}));
        yield event("ping", &json!({"type": "ping"}));
        let mut fragments = reply.tool.as_ref().map(|(_, _, arguments)| argument_fragments(arguments));
        for i in 0..count {
            if fail_after == Some(i) {
                break;
            }
            if !chunk_delay.is_zero() {
                tokio::time::sleep(chunk_delay).await;
            }
            let delta = match fragments.as_mut().and_then(Iterator::next) {
                Some(partial) => json!({"type": "input_json_delta", "partial_json": partial}),
                None => json!({"type": "text_delta", "text": reply.echo.piece(i).to_string()}),
            };
            yield event("content_block_delta", &json!({"type": "content_block_delta", "index": 0, "delta": delta}));
        }
        if fail_after.is_some_and(|n| n <= count) {
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
        yield event("content_block_stop", &json!({"type": "content_block_stop", "index": 0}));
        delivery.completed();
        yield event("message_delta", &json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": null},
            "usage": {"output_tokens": count}
        }));
        yield event("message_stop", &json!({"type": "message_stop"}));
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        io_body(body),
    )
        .into_response()
}
