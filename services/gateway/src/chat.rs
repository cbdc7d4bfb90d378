//! `POST /v1/chat/completions`: the OpenAI chat request admitted, run through the request path,
//! and answered as one JSON completion or as server-sent chunks.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures::StreamExt;
use meshgate_runtime::{ApiError, ErrorCode};
use meshgate_wire::Answer;
use meshgate_wire::openai::ingress::{ChunkEncoder, ReplyMeta, completion_json};

use crate::api::{AppState, RequestContext};
use crate::chat_flow::{self, Begun};
use crate::concurrency::TenantSlot;
use crate::openai;
use crate::orchestrator::ChatReply;
use crate::response::{error_response, unix_now};

/// What `createChatCompletion` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const CHAT_COMPLETIONS_ERRORS: &[ErrorCode] = chat_flow::MODEL_CALL_ERRORS;

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
            (crate::openai::ChatCompletion = "application/json"),
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
    let received = chat_flow::receive(app, headers, body, context).await?;
    let chat = openai::parse_chat(&received.body)?;
    let call = chat_flow::admit(app, &received, headers, context, chat, Vec::new()).await?;
    let include_usage = call.chat.include_usage;
    let started = match chat_flow::start_or_queue(app, &received, headers, context, call).await? {
        Begun::Started(started) => started,
        Begun::Queued(job) => return Ok(job),
    };
    // The served model names the reply (the provider's own name for it, once it reports one).
    let meta = ReplyMeta {
        id: format!("chatcmpl-{}", context.request_id),
        created: unix_now(),
        model: started.reply.target.model.clone(),
    };
    match started.slot {
        Some(slot) => {
            Ok(stream_response(started.reply, meta, include_usage, context.request_id.clone(), started.risk, slot))
        }
        None => json_response(started.reply, &meta, started.risk).await,
    }
}

/// The whole reply as one `chat.completion`. `risk` is the prompt's; the reply's findings raise it
/// once the whole reply was scanned.
async fn json_response(mut reply: ChatReply, meta: &ReplyMeta, risk: u8) -> Result<Response, ApiError> {
    let mut answer = Answer::default();
    let mut risk = risk;
    while let Some(chunk) = reply.chunks.next().await {
        let chunk = chunk?;
        answer.push(&chunk.completion);
        risk = chunk.risk.unwrap_or(risk);
    }
    let mut response = chat_flow::json_reply(completion_json(meta, &answer), "application/json");
    chat_flow::reply_headers(&mut response, &reply, risk);
    Ok(response)
}

/// Server-sent events in the OpenAI chunk format (the wire crate's encoder): text, reasoning,
/// refusal and tool-call chunks as they come, the finish reason, the usage chunk when asked, then
/// `[DONE]`. An error after the first byte ends the stream with an `error` event instead of
/// `[DONE]`. The risk header is the prompt's: headers leave before the reply is scanned (the trace
/// has both). The stream holds `slot` until it ends.
fn stream_response(
    reply: ChatReply,
    meta: ReplyMeta,
    include_usage: bool,
    request_id: String,
    risk: u8,
    slot: TenantSlot,
) -> Response {
    let mut headers = Response::new(Body::empty());
    chat_flow::reply_headers(&mut headers, &reply, risk);
    let ChatReply { mut chunks, .. } = reply;
    let mut encoder = ChunkEncoder::new(meta, include_usage);
    let events = async_stream::stream! {
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Ok(chunk) => {
                    let events = encoder.encode(&chunk.completion);
                    if !events.is_empty() {
                        yield events;
                    }
                }
                Err(err) => {
                    yield error_event(&err.body(&request_id));
                    return;
                }
            }
        }
        yield encoder.done();
    };
    let mut response = chat_flow::event_stream(events, Some(slot));
    response.headers_mut().extend(headers.into_parts().0.headers);
    response
}

/// An SSE event carrying the error shape.
fn error_event<T: serde::Serialize>(value: &T) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    if serde_json::to_writer(&mut out, value).is_err() {
        out.truncate(6);
        out.extend_from_slice(br#"{"error":{"type":"api_error","code":"internal_error","message":"encoding failed"}}"#);
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
