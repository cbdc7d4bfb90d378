//! OpenAI's Responses API at the edge — what the OpenAI Agents SDK, Codex CLI and the Vercel AI
//! SDK call by default: `POST /v1/responses` translated to the canonical request (the wire
//! crate's `openai::responses`), run on the same request path as chat, answered as the `response`
//! object or its event stream; `store: true` keeps the conversation and its answer per project
//! (`previous_response_id` continues it), and `GET`/`DELETE /v1/responses/{id}` read and forget
//! it. A response of another project does not exist for the caller.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures::StreamExt;
use meshgate_runtime::{ApiError, ErrorCode};
use meshgate_wire::Answer;
use meshgate_wire::openai::responses::{
    ResponseError, ResponseMeta, ResponseRecord, ResponsesEncoder, ResponsesRequest, deleted_json, parse_responses,
    response_json,
};

use crate::api::{ApiPath, AppState, RequestContext, authenticate, client_of, request_id_of};
use crate::chat_flow::{self, Begun, Started};
use crate::openai::wire_error;
use crate::response::{error_response, unix_now};
use crate::stored_responses::ResponseStore;
use crate::tenancy::EndpointScope;

/// The request's context, which the middleware always records.
fn context_of(parts: &axum::http::request::Parts) -> Result<RequestContext, ApiError> {
    parts
        .extensions
        .get::<RequestContext>()
        .cloned()
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "request context missing"))
}

/// What `createResponse` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const CREATE_ERRORS: &[ErrorCode] = &[
    ErrorCode::ModelNotFound,
    ErrorCode::NotFound,
    ErrorCode::PayloadTooLarge,
    ErrorCode::PolicyViolation,
    ErrorCode::QuotaExceeded,
    ErrorCode::UpstreamError,
    ErrorCode::ContextLengthExceeded,
    ErrorCode::Timeout,
];

/// `POST /v1/responses`.
#[utoipa::path(
    post,
    path = "/v1/responses",
    operation_id = "createResponse",
    tag = "openai",
    summary = "Create a model response (the Responses API)",
    description = "OpenAI's Responses API: `input` as a string or items (messages with text, image and file parts, \
`function_call`, `function_call_output`), `instructions`, function `tools`, `tool_choice`, `text.format` (JSON schema), \
`reasoning`, `max_output_tokens`, `stream` (the Responses event sequence). Built-in tools (web or file search, computer \
use, code interpreter, MCP) are refused with 400. `store` (default true) keeps the response for `GET \
/v1/responses/{id}` and `previous_response_id`, within the caller's project. Routed, screened, budgeted and traced \
like a chat completion. With `x-meshgate-allow-queue: true`, a request no cloud target could serve is queued (not \
stored as a response): 202 and the job.",
    params(
        ("x-meshgate-allow-queue" = Option<bool>, Header, description = "`true`: queue the request (202) when no cloud target answers."),
        ("idempotency-key" = Option<String>, Header, description = "With `x-meshgate-allow-queue`: the key of the queued job."),
    ),
    request_body(content = Object, description = "A Responses API request."),
    responses(
        (status = 200, description = "The `response` object; server-sent Responses events when `stream` is true", content(
            (Object = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 202, description = "No cloud target answered and the request allowed queueing: the job", body = crate::jobs::JobJson),
    )
)]
pub(crate) async fn create(State(app): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let context = match context_of(&parts) {
        Ok(context) => context,
        Err(err) => return error_response(&err, ""),
    };
    match run(&app, &parts.headers, body, &context).await {
        Ok(response) => response,
        Err(err) => error_response(&err, &context.request_id),
    }
}

/// What storing a response needs once its answer is whole.
struct Keeper {
    store: Arc<dyn ResponseStore>,
    project_id: String,
    /// The request as the model saw it (redacted), whose conversation the record keeps.
    request: ResponsesRequest,
}

impl Keeper {
    /// Stores the response; a failure is logged (the client has its answer already).
    async fn keep(self, meta: ResponseMeta, answer: &Answer, error: Option<&ApiError>) {
        let id = meta.id.clone();
        let record = match error {
            None => ResponseRecord::new(&self.request, meta, answer),
            Some(err) => ResponseRecord::failed(&self.request, meta, answer, response_error(err)),
        };
        let stored = match serde_json::to_value(&record) {
            Ok(value) => self.store.put(&self.project_id, &id, &value).await.map_err(|err| err.to_string()),
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = stored {
            tracing::warn!(response = %id, %err, "the response could not be stored");
        }
    }
}

fn response_error(err: &ApiError) -> ResponseError {
    ResponseError { code: err.code.as_str().to_owned(), message: err.message.clone() }
}

async fn run(app: &AppState, headers: &HeaderMap, body: Body, context: &RequestContext) -> Result<Response, ApiError> {
    let received = chat_flow::receive(app, headers, body, context).await?;
    let project_id = received.caller.principal.project_id.clone();
    let mut request = parse_responses(&received.body).map_err(wire_error)?;
    if let Some(previous) = request.previous_response_id.clone() {
        let record = stored_record(app.responses.as_ref(), &project_id, &previous).await?;
        request.continue_from(&record).map_err(wire_error)?;
    }
    let unforwarded = std::mem::take(&mut request.unforwarded);
    let id = format!("resp_{}", context.request_id.replace('-', ""));
    let mut meta = ResponseMeta::new(&request, id, unix_now());
    // The canonical request moves on to the request path; a stored response keeps the redacted
    // conversation the model saw.
    let chat = std::mem::take(&mut request.chat);
    let call = chat_flow::admit(app, &received, headers, context, chat, unforwarded).await?;
    let keeper = request.store.then(|| {
        request.chat = call.chat.clone();
        Keeper { store: app.responses.clone(), project_id, request }
    });
    let Started { reply, risk, slot } = match chat_flow::start_or_queue(app, &received, headers, context, call).await? {
        Begun::Started(started) => started,
        Begun::Queued(job) => return Ok(job),
    };
    meta.model.clone_from(&reply.target.model);
    let mut headers = Response::new(Body::empty());
    chat_flow::reply_headers(&mut headers, &reply, risk);
    let headers = headers.into_parts().0.headers;
    let mut chunks = reply.chunks;
    let mut response = match slot {
        Some(slot) => {
            let mut encoder = ResponsesEncoder::new(meta);
            let events = async_stream::stream! {
                yield encoder.start();
                let mut failure = None;
                while let Some(chunk) = chunks.next().await {
                    match chunk {
                        Ok(chunk) => {
                            let events = encoder.encode(&chunk.completion);
                            if !events.is_empty() {
                                yield events;
                            }
                        }
                        Err(err) => {
                            yield encoder.fail(err.code.as_str(), &err.message);
                            failure = Some(err);
                            break;
                        }
                    }
                }
                if failure.is_none() {
                    yield encoder.finish();
                }
                if let Some(keeper) = keeper {
                    keeper.keep(encoder.meta().clone(), encoder.answer(), failure.as_ref()).await;
                }
            };
            chat_flow::event_stream(events.map(|bytes: Bytes| bytes), Some(slot))
        }
        None => {
            let mut answer = Answer::default();
            let mut risk = risk;
            while let Some(chunk) = chunks.next().await {
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(err) => {
                        if let Some(keeper) = keeper {
                            keeper.keep(meta, &answer, Some(&err)).await;
                        }
                        return Err(err);
                    }
                };
                answer.push(&chunk.completion);
                risk = chunk.risk.unwrap_or(risk);
            }
            let body = response_json(&meta, &answer);
            if let Some(keeper) = keeper {
                keeper.keep(meta, &answer, None).await;
            }
            let mut response = chat_flow::json_reply(body, "application/json");
            response.headers_mut().insert(crate::guard::RISK_SCORE, u16::from(risk).into());
            response
        }
    };
    for (name, value) in headers.iter() {
        if !response.headers().contains_key(name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    Ok(response)
}

/// The stored record `id` of `project_id`, or 404.
async fn stored_record(store: &dyn ResponseStore, project_id: &str, id: &str) -> Result<ResponseRecord, ApiError> {
    let missing = || ApiError::new(ErrorCode::NotFound, format!("response {id:?} not found"));
    let value = store.get(project_id, id).await?.ok_or_else(missing)?;
    serde_json::from_value(value).map_err(|err| {
        tracing::error!(response = id, %err, "a stored response no longer reads");
        ApiError::new(ErrorCode::Internal, format!("the stored response {id} cannot be read"))
    })
}

/// Runs `f` for a caller allowed to chat, with its project id.
async fn with_project<F, Fut>(app: AppState, request: Request, f: F) -> Response
where
    F: FnOnce(AppState, String) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let id = request_id_of(&request);
    let client = client_of(&request);
    let (parts, _) = request.into_parts();
    let result = async {
        let caller = authenticate(&app, &parts.headers, client).await?;
        caller.require(EndpointScope::Chat)?;
        f(app, caller.principal.project_id).await
    }
    .await;
    result.unwrap_or_else(|err| error_response(&err, &id))
}

/// What `getResponse` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const GET_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound];

/// `GET /v1/responses/{id}`.
#[utoipa::path(
    get,
    path = "/v1/responses/{id}",
    operation_id = "getResponse",
    tag = "openai",
    summary = "A stored response",
    description = "A response created with `store` by the caller's project, as it was answered.",
    params(("id" = String, Path, description = "Response id (`resp_…`)")),
    responses((status = 200, description = "The `response` object", body = Object))
)]
pub(crate) async fn get(State(app): State<AppState>, ApiPath(id): ApiPath<String>, request: Request) -> Response {
    with_project(app, request, |app, project_id| async move {
        let record = stored_record(app.responses.as_ref(), &project_id, &id).await?;
        Ok(chat_flow::json_reply(record.response_json(), "application/json"))
    })
    .await
}

/// What `deleteResponse` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const DELETE_ERRORS: &[ErrorCode] = &[ErrorCode::NotFound];

/// `DELETE /v1/responses/{id}`.
#[utoipa::path(
    delete,
    path = "/v1/responses/{id}",
    operation_id = "deleteResponse",
    tag = "openai",
    summary = "Delete a stored response",
    params(("id" = String, Path, description = "Response id (`resp_…`)")),
    responses((status = 200, description = "`{\"id\", \"object\": \"response\", \"deleted\": true}`", body = Object))
)]
pub(crate) async fn delete(State(app): State<AppState>, ApiPath(id): ApiPath<String>, request: Request) -> Response {
    with_project(app, request, |app, project_id| async move {
        if !app.responses.delete(&project_id, &id).await? {
            return Err(ApiError::new(ErrorCode::NotFound, format!("response {id:?} not found")));
        }
        Ok(chat_flow::json_reply(deleted_json(&id), "application/json"))
    })
    .await
}
