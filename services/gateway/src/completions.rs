//! Legacy text completions (`POST /v1/completions`, what IDE autocomplete calls): the prompt
//! becomes a canonical chat request (the wire crate's `openai::completions`), served by chat
//! models like any request, and answered as a `text_completion` object or its chunks.
//! Fill-in-the-middle (`suffix`), `echo` and several prompts at once are refused with a 400
//! naming the field: no target here does them.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures::StreamExt;
use meshgate_runtime::{ApiError, ErrorCode};
use meshgate_wire::Answer;
use meshgate_wire::openai::completions::{TextCompletionEncoder, parse_completion, text_completion_json};
use meshgate_wire::openai::ingress::ReplyMeta;

use crate::api::{AppState, RequestContext};
use crate::chat_flow::{self, Begun, Started};
use crate::openai::wire_error;
use crate::response::{error_response, unix_now};

/// What `createCompletion` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const CREATE_ERRORS: &[ErrorCode] = chat_flow::MODEL_CALL_ERRORS;

/// `POST /v1/completions`.
#[utoipa::path(
    post,
    path = "/v1/completions",
    operation_id = "createCompletion",
    tag = "openai",
    summary = "Create a text completion (legacy)",
    description = "OpenAI's legacy completions: one `prompt` (a string, or a list of one), `max_tokens` (default 16), \
sampling, `stop`, `logprobs`, `stream`. Served by chat models: the prompt is one user message. `suffix`, `echo` and \
several prompts are refused with 400. With `x-meshgate-allow-queue: true`, a request no cloud target could serve is \
queued: 202 and the job.",
    params(
        ("x-meshgate-allow-queue" = Option<bool>, Header, description = "`true`: queue the request (202) when no cloud target answers."),
        ("idempotency-key" = Option<String>, Header, description = "With `x-meshgate-allow-queue`: the key of the queued job."),
    ),
    request_body(content = Object, description = "A legacy completions request."),
    responses(
        (status = 200, description = "The `text_completion`; server-sent chunks when `stream` is true", content(
            (Object = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 202, description = "No cloud target answered and the request allowed queueing: the job", body = crate::jobs::JobJson),
    )
)]
pub(crate) async fn create(State(app): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Some(context) = parts.extensions.get::<RequestContext>().cloned() else {
        return error_response(&ApiError::new(ErrorCode::Internal, "request context missing"), "");
    };
    run(&app, &parts.headers, body, &context).await.unwrap_or_else(|err| error_response(&err, &context.request_id))
}

async fn run(app: &AppState, headers: &HeaderMap, body: Body, context: &RequestContext) -> Result<Response, ApiError> {
    let received = chat_flow::receive(app, headers, body, context).await?;
    let request = parse_completion(&received.body).map_err(wire_error)?;
    let logprobs = request.logprobs.is_some();
    let include_usage = request.chat.include_usage;
    let call = chat_flow::admit(app, &received, headers, context, request.chat, Vec::new()).await?;
    let Started { reply, risk, slot } = match chat_flow::start_or_queue(app, &received, headers, context, call).await? {
        Begun::Started(started) => started,
        Begun::Queued(job) => return Ok(job),
    };
    let meta = ReplyMeta {
        id: format!("cmpl-{}", context.request_id.replace('-', "")),
        created: unix_now(),
        model: reply.target.model.clone(),
    };
    let mut response = Response::new(Body::empty());
    chat_flow::reply_headers(&mut response, &reply, risk);
    let reply_headers = response.into_parts().0.headers;
    let mut chunks = reply.chunks;
    let request_id = context.request_id.clone();
    let mut response = match slot {
        Some(slot) => {
            let mut encoder = TextCompletionEncoder::new(meta, include_usage, logprobs);
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
                            let mut event = b"data: ".to_vec();
                            event.extend(serde_json::to_vec(&err.body(&request_id)).unwrap_or_default());
                            event.extend_from_slice(b"\n\n");
                            yield Bytes::from(event);
                            return;
                        }
                    }
                }
                yield encoder.done();
            };
            chat_flow::event_stream(events.map(|bytes: Bytes| bytes), Some(slot))
        }
        None => {
            let mut answer = Answer::default();
            while let Some(chunk) = chunks.next().await {
                answer.push(&chunk?.completion);
            }
            chat_flow::json_reply(text_completion_json(&meta, &answer, logprobs), "application/json")
        }
    };
    response.headers_mut().extend(reply_headers);
    Ok(response)
}
