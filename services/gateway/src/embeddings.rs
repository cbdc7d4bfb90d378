//! `POST /v1/embeddings` (OpenAI format, `float` or `base64`) served by the local embedding
//! models of the inference service, with quota reserved and committed like a chat request, and the
//! inputs scanned by the project's security policy first.

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use meshgate_runtime::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::{AppState, RequestContext, authenticate, read_body};
use crate::guard::RISK_SCORE;
use crate::openai::json_error;
use crate::response::error_response;
use crate::tenancy::EndpointScope;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
#[schema(as = EmbeddingInput)]
pub(crate) enum Input {
    One(String),
    Many(Vec<String>),
}

/// Unknown fields (`user`, ...) are accepted as the OpenAI API does; the key identifies the user.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"model": "all-minilm-l6-v2", "input": ["Hello", "world"]}))]
pub(crate) struct EmbeddingsRequest {
    /// A local embedding model from `GET /v1/models` (task `embeddings`).
    #[schema(min_length = 1)]
    model: String,
    /// A non-empty string, or an array of 1 to 2048 non-empty strings.
    #[schema(value_type = Input)]
    input: serde_json::Value,
    /// `float` (the default) or `base64` (little-endian f32).
    #[serde(default)]
    #[schema(value_type = Option<EncodingFormat>)]
    encoding_format: Option<String>,
    /// When set, must equal the model's dimensions.
    #[serde(default)]
    dimensions: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
#[schema(as = EmbeddingVector)]
pub(crate) enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Embedding)]
pub(crate) struct Datum {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EmbeddingUsage {
    prompt_tokens: i64,
    total_tokens: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EmbeddingsResponse {
    object: &'static str,
    data: Vec<Datum>,
    model: String,
    usage: EmbeddingUsage,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

/// The inputs of a request: a string or an array of non-empty strings (token arrays are refused:
/// local models tokenize themselves).
fn inputs(value: serde_json::Value) -> Result<Vec<String>, ApiError> {
    let input: Input = serde_json::from_value(value)
        .map_err(|_| invalid("input must be a string or an array of strings (token arrays are not supported)"))?;
    let inputs = match input {
        Input::One(text) => vec![text],
        Input::Many(texts) => texts,
    };
    Ok(inputs)
}

/// `encoding_format` values.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // a schema only: the handler reads the field as a string to name a bad value
pub(crate) enum EncodingFormat {
    Float,
    Base64,
}

/// Little-endian f32 bytes in base64, as the OpenAI SDKs decode `encoding_format: "base64"`.
fn base64_vector(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// What `createEmbedding` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const EMBEDDINGS_ERRORS: &[ErrorCode] = &[
    ErrorCode::ModelNotFound,
    ErrorCode::NotFound,
    ErrorCode::PayloadTooLarge,
    ErrorCode::PolicyViolation,
    ErrorCode::QuotaExceeded,
    ErrorCode::Timeout,
];

/// `POST /v1/embeddings`.
#[utoipa::path(
    post,
    path = "/v1/embeddings",
    operation_id = "createEmbedding",
    tag = "openai",
    summary = "Embed text with a local embedding model",
    description = "OpenAI-compatible (`float` or `base64`). Inputs are scanned by the project's security policy \
(every rule but prompt injection) and quota is reserved and settled like a chat request.",
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
        let request: EmbeddingsRequest = serde_json::from_slice(&body).map_err(json_error)?;
        let base64 = match request.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => return Err(invalid(format!("encoding_format {other:?} is not float or base64"))),
        };
        // The encoder receives the redacted inputs; a blocking rule refuses the request.
        let admitted = app.admission.embeddings(&caller, &settings, &request.model, inputs(request.input)?)?;
        let (model, risk) = (admitted.model, admitted.risk);
        let (embedded, budget) = app.orchestrator.embed(&id, &caller.principal, &model, admitted.inputs).await?;
        if let Some(dimensions) = request.dimensions
            && dimensions != i64::from(embedded.dims)
        {
            return Err(invalid(format!("dimensions must be {} for {model} (got {dimensions})", embedded.dims)));
        }
        let prompt_tokens = embedded.usage.map_or(0, |u| u.prompt_tokens);
        let data = embedded
            .embeddings
            .into_iter()
            .enumerate()
            .map(|(index, e)| Datum {
                object: "embedding",
                index,
                embedding: if base64 { Vector::Base64(base64_vector(&e.values)) } else { Vector::Float(e.values) },
            })
            .collect();
        let body = EmbeddingsResponse {
            object: "list",
            data,
            model,
            usage: EmbeddingUsage { prompt_tokens, total_tokens: prompt_tokens },
        };
        let mut response = axum::Json(body).into_response();
        response.headers_mut().insert(RISK_SCORE, HeaderValue::from(u16::from(risk)));
        for (name, value) in budget.headers() {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
        Ok(response)
    }
    .await;
    result.unwrap_or_else(|err| error_response(&err, &id))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn inputs_are_a_string_or_strings_never_tokens() {
        assert_eq!(inputs(json!("hi")).unwrap(), ["hi"]);
        assert_eq!(inputs(json!(["a", "b"])).unwrap(), ["a", "b"]);
        for bad in [json!([1, 2]), json!([[1]]), json!(null), json!(5)] {
            assert_eq!(inputs(bad.clone()).unwrap_err().code, ErrorCode::InvalidRequest, "{bad}");
        }
    }

    #[test]
    fn base64_is_little_endian_f32() {
        let encoded = base64_vector(&[1.0, -2.5]);
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
        assert_eq!(bytes, [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat());
    }
}
