//! Anthropic's Messages API at the edge — what Claude Code and every Anthropic-SDK application
//! call: `POST /v1/messages` translated to the canonical request (the wire crate's
//! `anthropic::ingress`), routed like any request (a Claude Code session may be served by an
//! OpenAI model and the reverse), answered as the Message object or Anthropic's event stream;
//! `POST /v1/messages/count_tokens`. A meshgate key is accepted as `x-api-key` (the SDKs' way)
//! or as a Bearer token; `anthropic-version` is accepted; errors come in Anthropic's shape.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use meshgate_runtime::{ApiError, ErrorCode};
use meshgate_wire::Answer;
use meshgate_wire::anthropic::ingress::{
    MessageMeta, MessagesEncoder, count_tokens_json, error_json, message_json, parse_count_tokens, parse_messages,
};

use crate::api::{AppState, RequestContext};
use crate::chat_flow::{self, Begun, Started};
use crate::openai::wire_error;

/// An error as Anthropic answers one: its status, `{"type": "error", "error": {"type",
/// "message"}}`, and `Retry-After` when there is a wait.
fn anthropic_error(err: &ApiError) -> Response {
    let status = err.code.http_status();
    let mut response = (status, error_json(status.as_u16(), &err.message)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(seconds) = err.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    for (name, value) in &err.headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(*name, value);
        }
    }
    response
}

async fn answered<F, Fut>(request: Request, f: F) -> Response
where
    F: FnOnce(HeaderMap, Body, RequestContext) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let (parts, body) = request.into_parts();
    let Some(context) = parts.extensions.get::<RequestContext>().cloned() else {
        return anthropic_error(&ApiError::new(ErrorCode::Internal, "request context missing"));
    };
    f(parts.headers, body, context).await.unwrap_or_else(|err| anthropic_error(&err))
}

/// What `createMessage` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const CREATE_ERRORS: &[ErrorCode] = chat_flow::MODEL_CALL_ERRORS;

/// `POST /v1/messages`.
#[utoipa::path(
    post,
    path = "/v1/messages",
    operation_id = "createMessage",
    tag = "anthropic",
    summary = "Create a message (Anthropic Messages API)",
    description = "Anthropic's Messages API: `system`, content blocks (text, image, `tool_use`, `tool_result`), `tools` \
and `tool_choice`, `thinking`, `max_tokens`, `stream` (Anthropic's event sequence). The key goes in `x-api-key` (or \
`Authorization: Bearer`); `anthropic-version` is accepted. Routed, screened, budgeted and traced like a chat \
completion; errors in Anthropic's shape. With `x-meshgate-allow-queue: true`, a request no cloud target could serve \
is queued: 202 and the job.",
    params(
        ("anthropic-version" = Option<String>, Header, description = "Accepted (any version)."),
        ("x-meshgate-allow-queue" = Option<bool>, Header, description = "`true`: queue the request (202) when no cloud target answers."),
        ("idempotency-key" = Option<String>, Header, description = "With `x-meshgate-allow-queue`: the key of the queued job."),
    ),
    request_body(content = Object, description = "A Messages API request."),
    responses(
        (status = 200, description = "The Message; server-sent Messages events when `stream` is true", content(
            (Object = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 202, description = "No cloud target answered and the request allowed queueing: the job", body = crate::jobs::JobJson),
    )
)]
pub(crate) async fn create(State(app): State<AppState>, request: Request) -> Response {
    answered(request, |headers, body, context| async move { run(&app, &headers, body, &context).await }).await
}

async fn run(app: &AppState, headers: &HeaderMap, body: Body, context: &RequestContext) -> Result<Response, ApiError> {
    let received = chat_flow::receive(app, headers, body, context).await?;
    let request = parse_messages(&received.body).map_err(wire_error)?;
    let call = chat_flow::admit(app, &received, headers, context, request.chat, request.unforwarded).await?;
    let estimated_input_tokens = crate::tokens::prompt_tokens(&call.chat);
    let Started { reply, risk, slot } = match chat_flow::start_or_queue(app, &received, headers, context, call).await? {
        Begun::Started(started) => started,
        Begun::Queued(job) => return Ok(job),
    };
    let meta = MessageMeta {
        id: format!("msg_{}", context.request_id.replace('-', "")),
        model: reply.target.model.clone(),
        estimated_input_tokens,
    };
    let mut response = Response::new(Body::empty());
    chat_flow::reply_headers(&mut response, &reply, risk);
    let reply_headers = response.into_parts().0.headers;
    let mut chunks = reply.chunks;
    let mut response = match slot {
        Some(slot) => {
            let mut encoder = MessagesEncoder::new(meta);
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
                            yield encoder.fail(err.code.http_status().as_u16(), &err.message);
                            return;
                        }
                    }
                }
                yield encoder.finish();
            };
            chat_flow::event_stream(events.map(|bytes: Bytes| bytes), Some(slot))
        }
        None => {
            let mut answer = Answer::default();
            while let Some(chunk) = chunks.next().await {
                answer.push(&chunk?.completion);
            }
            chat_flow::json_reply(message_json(&meta, &answer), "application/json")
        }
    };
    response.headers_mut().extend(reply_headers);
    Ok(response)
}

/// What `countMessageTokens` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const COUNT_TOKENS_ERRORS: &[ErrorCode] = &[ErrorCode::PayloadTooLarge];

/// `POST /v1/messages/count_tokens`.
#[utoipa::path(
    post,
    path = "/v1/messages/count_tokens",
    operation_id = "countMessageTokens",
    tag = "anthropic",
    summary = "Count a Messages request's input tokens",
    description = "The input tokens of a Messages request (without `max_tokens`), as meshgate estimates them for its \
budgets: exact for models whose tokenizer it has, else estimated from the length.",
    params(("anthropic-version" = Option<String>, Header, description = "Accepted (any version).")),
    request_body(content = Object, description = "A Messages API request without `max_tokens`."),
    responses((status = 200, description = "`{\"input_tokens\"}`", body = Object))
)]
pub(crate) async fn count_tokens(State(app): State<AppState>, request: Request) -> Response {
    answered(request, |headers, body, context| async move {
        let received = chat_flow::receive(&app, &headers, body, &context).await?;
        let request = parse_count_tokens(&received.body).map_err(wire_error)?;
        received.caller.require_model(&request.chat.model)?;
        received.settings.check_model(&request.chat.model)?;
        app.orchestrator.check_served(&context.request_id, &received.caller.principal, &request.chat.model).await?;
        let tokens = crate::tokens::prompt_tokens(&request.chat);
        Ok(chat_flow::json_reply(count_tokens_json(tokens), "application/json"))
    })
    .await
}
