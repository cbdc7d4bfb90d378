//! `POST /v1/embeddings` (OpenAI format: texts or token ids, `dimensions`, `float` or `base64`)
//! served by a local embedding model of the inference service or a provider's embedding model, as
//! the router plans it, with quota held and charged at the serving model's price, and the texts
//! scanned by the project's security policy first.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use meshgate_proto::common::v1::Layer;
use meshgate_runtime::{ApiError, ErrorCode};
use meshgate_wire::openai::embeddings::{embeddings_json, parse_embeddings};
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::{AppState, RequestContext, authenticate, read_body};
use crate::guard::RISK_SCORE;
use crate::openai::wire_error;
use crate::orchestrator::{LAYER_HEADER, TARGET_HEADER};
use crate::response::error_response;
use crate::tenancy::EndpointScope;

/// `input`: what to embed.
#[derive(ToSchema)]
#[serde(untagged)]
#[schema(as = EmbeddingInput)]
#[allow(dead_code)] // a schema only: meshgate-wire parses the body
pub(crate) enum Input {
    /// One text.
    One(String),
    /// Texts, one vector each.
    Many(Vec<String>),
    /// One text as token ids of the model's tokenizer (cloud models only).
    Tokens(Vec<u32>),
    /// Several texts as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// Unknown fields are kept and forwarded to a provider as its `unknown_params` setting says; the
/// key identifies the user to meshgate.
#[derive(ToSchema)]
#[schema(example = json!({"model": "all-minilm-l6-v2", "input": ["Hello", "world"]}))]
#[allow(dead_code)] // a schema only: meshgate-wire parses the body
pub(crate) struct EmbeddingsRequest {
    /// An embedding model from `GET /v1/models` (task `embeddings`): a local model, or a
    /// provider's embedding model.
    #[schema(min_length = 1)]
    model: String,
    /// A non-empty string, an array of 1 to 2048 non-empty strings, an array of token ids, or an
    /// array of 1 to 2048 non-empty arrays of token ids. Token ids are sent only to providers:
    /// local models tokenize text themselves.
    #[schema(value_type = Input)]
    input: serde_json::Value,
    /// `float` (the default) or `base64` (little-endian f32).
    #[schema(value_type = Option<EncodingFormat>)]
    encoding_format: Option<String>,
    /// Vector length: passed to a provider's model; a local model takes only its own length.
    #[schema(minimum = 1)]
    dimensions: Option<i64>,
    /// The end user, passed to the provider.
    user: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
#[schema(as = EmbeddingVector)]
#[allow(dead_code)] // a schema only: meshgate-wire writes the answer
pub(crate) enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Embedding)]
#[allow(dead_code)] // a schema only
pub(crate) struct Datum {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)] // a schema only
pub(crate) struct EmbeddingUsage {
    prompt_tokens: i64,
    total_tokens: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)] // a schema only
pub(crate) struct EmbeddingsResponse {
    object: &'static str,
    data: Vec<Datum>,
    model: String,
    usage: EmbeddingUsage,
}

/// `encoding_format` values.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // a schema only
pub(crate) enum EncodingFormat {
    Float,
    Base64,
}

/// What `createEmbedding` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const EMBEDDINGS_ERRORS: &[ErrorCode] = &[
    ErrorCode::ModelNotFound,
    ErrorCode::NotFound,
    ErrorCode::PayloadTooLarge,
    ErrorCode::PolicyViolation,
    ErrorCode::QuotaExceeded,
    ErrorCode::UpstreamError,
    ErrorCode::Timeout,
];

/// `POST /v1/embeddings`.
#[utoipa::path(
    post,
    path = "/v1/embeddings",
    operation_id = "createEmbedding",
    tag = "openai",
    summary = "Embed text with a local or a provider's embedding model",
    description = "OpenAI-compatible: texts or token ids, `dimensions`, `float` or `base64`. Local embedding models \
come first, then the providers listing the model among their embedding models, in fallback order. Texts are scanned \
by the project's security policy (every rule but prompt injection); token ids are not text and are not scanned. \
Quota is held for the inputs' tokens and charged at the serving model's input price.",
    request_body = EmbeddingsRequest,
    responses((status = 200, description = "The embeddings, in input order", body = EmbeddingsResponse))
)]
pub async fn embeddings(State(app): State<AppState>, request: Request) -> Response {
    let context = request.extensions().get::<RequestContext>().cloned();
    let id = context.as_ref().map(|c| c.request_id.clone()).unwrap_or_default();
    let caller = authenticate(&app, request.headers(), context.as_ref().and_then(|c| c.client)).await;
    let (parts, body) = request.into_parts();
    let result = async {
        let caller = caller?;
        caller.require(EndpointScope::Embeddings)?;
        let settings = app.settings.get(&caller.principal.project_id).await?;
        let body = read_body(body, &parts.headers, settings.max_body_bytes(app.max_body_bytes)).await?;
        let request = parse_embeddings(&body).map_err(wire_error)?;
        let format = request.encoding_format;
        let (trace_id, started) =
            context.as_ref().map_or_else(|| (String::new(), Instant::now()), |c| (c.trace_id.clone(), c.started));
        // The encoder receives the redacted inputs; a blocking rule refuses the request.
        let call = app.admission.embeddings(&caller, &settings, request, (id.clone(), trace_id, started))?;
        let risk = call.risk;
        let embedded = app.orchestrator.embed(call).await?;
        let body = embeddings_json(&embedded.target.model, &embedded.vectors, embedded.prompt_tokens, format);
        let mut response = ([(CONTENT_TYPE, "application/json")], body).into_response();
        let headers = response.headers_mut();
        headers.insert(RISK_SCORE, HeaderValue::from(u16::from(risk)));
        headers.insert(TARGET_HEADER, HeaderValue::from_str(&embedded.target.id).map_err(|_| bad_target())?);
        headers.insert(LAYER_HEADER, HeaderValue::from_static(Layer::short_name_of(embedded.target.layer)));
        for (name, value) in embedded.budget.headers() {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        Ok(response)
    }
    .await;
    result.unwrap_or_else(|err| error_response(&err, &id))
}

fn bad_target() -> ApiError {
    ApiError::new(ErrorCode::Internal, "the serving target's id is not a header value")
}
