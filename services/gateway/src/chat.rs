//! `POST /v1/chat/completions`: the OpenAI chat request admitted, run through the request path,
//! and answered as one JSON completion or as server-sent chunks.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use meshgate_runtime::{ApiError, ErrorCode};

use crate::admission::RequestFacts;
use crate::api::{AppState, RequestContext, authorization, read_body};
use crate::budget::QuotaSnapshot;
use crate::concurrency::TenantSlot;
use crate::guard::RISK_SCORE;
use crate::jobs;
use crate::openai;
use crate::orchestrator::{ChatReply, Piece};
use crate::response::{error_response, unix_now};
use crate::tenancy::EndpointScope;

/// `POST /v1/chat/completions`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    operation_id = "createChatCompletion",
    tag = "openai",
    summary = "Create a chat completion",
    description = "OpenAI-compatible. The prompt is scanned by the project's security policy (a blocking rule \
answers 422 naming the rule; redaction masks the text before it leaves), quota is reserved (429 with `Retry-After` when \
out), and the routing plan's targets are tried in order. With `stream: true` the reply is server-sent events in the \
OpenAI chunk format (`ChatChunk`), ending with `data: [DONE]`; an error after the first byte ends the stream with an \
`Error` event instead. With `x-meshgate-allow-queue: true`, a request no cloud target could serve is queued: 202 and \
the job.",
    params(
        ("x-meshgate-allow-queue" = Option<bool>, Header, description = "`true`: queue the request (202) when no cloud target answers."),
        ("idempotency-key" = Option<String>, Header, description = "With `x-meshgate-allow-queue`: the key of the queued job."),
        ("x-request-id" = Option<String>, Header, description = "A client request id echoed in `x-request-id` (1–128 of `A-Za-z0-9-_.:`)."),
    ),
    request_body = crate::openai::ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion; server-sent events of `ChatChunk` when `stream` is true; \
the existing `Job` when a queued request's idempotency key was seen before", content(
            (crate::openai::ChatCompletion<'static> = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 202, description = "No cloud target answered and the request allowed queueing: the job", body = crate::jobs::JobJson),
    )
)]
pub(crate) async fn chat_completions(State(app): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Some(context) = parts.extensions.get::<RequestContext>().cloned() else {
        return error_response(&ApiError::new(ErrorCode::Internal, "request context missing"), "");
    };
    match run_chat(&app, &parts.headers, body, &context).await {
        Ok(response) => response,
        Err(err) => error_response(&err, &context.request_id),
    }
}

async fn run_chat(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
    context: &RequestContext,
) -> Result<Response, ApiError> {
    let caller = app.auth.authenticate(authorization(headers), context.client).await?;
    caller.require(EndpointScope::Chat)?;
    let settings = app.settings.get(&caller.principal.project_id).await?;
    let body = read_body(body, headers, settings.max_body_bytes(app.max_body_bytes)).await?;
    let chat = openai::parse_chat(&body, settings.chat_limits(app.admission.limits))?;
    let facts = RequestFacts {
        request_id: context.request_id.clone(),
        trace_id: context.trace_id.clone(),
        started: context.started,
        headers: meshgate_policy::sanitize_headers(headers),
    };
    let call = app.admission.chat(&caller, &settings, chat, facts).await?;
    let risk = call.security.risk;
    let shape = ReplyShape { model: call.chat.model.clone(), include_usage: call.chat.include_usage };
    let stream = call.chat.stream;
    // Kept only when the caller or the project allows the offline fallback.
    let queueable_copy =
        (jobs::allows_queue(headers) || settings.limits.queue_when_unreachable).then(|| call.chat.clone());
    // Held by the stream's body: the place is given back when the stream ends.
    let slot = stream.then(|| app.streams.open(&caller.principal)).transpose()?;
    let reply = match (app.orchestrator.chat(call).await, queueable_copy) {
        (Ok(reply), _) => reply,
        (Err(err), Some(chat)) if jobs::queueable(&err) && caller.require(EndpointScope::Jobs).is_ok() => {
            tracing::info!(request_id = %context.request_id, error = %err, "no cloud target answered; queueing the request");
            let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            return jobs::enqueue(app, &caller, chat, &context.request_id, key).await;
        }
        (Err(err), _) => return Err(err),
    };
    let completion_id = format!("chatcmpl-{}", context.request_id);
    if let Some(slot) = slot {
        Ok(stream_response(reply, shape, completion_id, context.request_id.clone(), risk, slot))
    } else {
        json_response(reply, &shape, &completion_id, risk).await
    }
}

/// The headers every chat reply carries: the target that served it, the caller's budget and the
/// request's risk score.
fn reply_headers(response: &mut Response, routing: [(&'static str, &str); 3], quota: &QuotaSnapshot, risk: u8) {
    let headers = response.headers_mut();
    headers.insert(RISK_SCORE, HeaderValue::from(u16::from(risk)));
    for (name, value) in routing {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    }
    for (name, value) in quota.headers() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
}

/// What the reply's wire format needs from the request.
struct ReplyShape {
    model: String,
    include_usage: bool,
}

/// `risk` is the prompt's; the reply's findings raise it once the whole reply was scanned.
async fn json_response(
    mut reply: ChatReply,
    chat: &ReplyShape,
    completion_id: &str,
    risk: u8,
) -> Result<Response, ApiError> {
    let mut content = String::new();
    let mut last = Piece::default();
    while let Some(piece) = reply.pieces.next().await {
        let piece = piece?;
        content.push_str(&piece.delta);
        last = piece;
    }
    let usage = last.usage.unwrap_or_default();
    let body = openai::ChatCompletion {
        id: completion_id,
        object: "chat.completion",
        created: unix_now(),
        model: &chat.model,
        choices: [openai::Choice {
            index: 0,
            message: openai::AssistantMessage { role: "assistant", content: &content },
            finish_reason: if last.finish_reason.is_empty() { "stop" } else { &last.finish_reason },
            logprobs: None,
        }],
        usage: openai::WireUsage::from(&usage),
    };
    let mut response = axum::Json(body).into_response();
    reply_headers(&mut response, reply.routing_headers(), &reply.quota, last.risk.unwrap_or(risk));
    Ok(response)
}

/// Server-sent events in the OpenAI chunk format: the first chunk carries the role, each piece
/// its text, the last its finish reason, then (when asked) a usage chunk, then `[DONE]`. An
/// error after the first byte ends the stream with an `error` event instead of `[DONE]`. The risk
/// header is the prompt's: headers leave before the reply is scanned (the trace has both).
fn stream_response(
    reply: ChatReply,
    chat: ReplyShape,
    completion_id: String,
    request_id: String,
    risk: u8,
    slot: TenantSlot,
) -> Response {
    let model = chat.model;
    let include_usage = chat.include_usage;
    let created = unix_now();
    let mut response = Response::new(Body::empty());
    reply_headers(&mut response, reply.routing_headers(), &reply.quota, risk);
    let ChatReply { mut pieces, .. } = reply;
    let events = async_stream::stream! {
        let _slot = slot;
        let usage_field = include_usage.then_some(None);
        let mut first = true;
        while let Some(piece) = pieces.next().await {
            let piece = match piece {
                Ok(piece) => piece,
                Err(err) => {
                    yield Ok::<Bytes, std::convert::Infallible>(sse(&err.body(&request_id)));
                    return;
                }
            };
            let finish = (!piece.finish_reason.is_empty()).then_some(piece.finish_reason.as_str());
            if first || !piece.delta.is_empty() || finish.is_none() {
                let chunk = openai::ChatChunk {
                    id: &completion_id,
                    object: "chat.completion.chunk",
                    created,
                    model: &model,
                    choices: vec![openai::ChunkChoice {
                        index: 0,
                        delta: openai::Delta { role: first.then_some("assistant"), content: Some(&piece.delta) },
                        finish_reason: None,
                        logprobs: None,
                    }],
                    usage: usage_field,
                };
                yield Ok(sse(&chunk));
                first = false;
            }
            if let Some(reason) = finish {
                let chunk = openai::ChatChunk {
                    id: &completion_id,
                    object: "chat.completion.chunk",
                    created,
                    model: &model,
                    choices: vec![openai::ChunkChoice { index: 0, delta: openai::Delta::default(), finish_reason: Some(reason), logprobs: None }],
                    usage: usage_field,
                };
                yield Ok(sse(&chunk));
                if include_usage {
                    let usage = piece.usage.unwrap_or_default();
                    let chunk = openai::ChatChunk {
                        id: &completion_id,
                        object: "chat.completion.chunk",
                        created,
                        model: &model,
                        choices: Vec::new(),
                        usage: Some(Some(openai::WireUsage::from(&usage))),
                    };
                    yield Ok(sse(&chunk));
                }
            }
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    *response.body_mut() = Body::from_stream(events);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn sse<T: serde::Serialize>(value: &T) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    if serde_json::to_writer(&mut out, value).is_err() {
        out.truncate(6);
        out.extend_from_slice(br#"{"error":{"type":"api_error","code":"internal_error","message":"encoding failed"}}"#);
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
