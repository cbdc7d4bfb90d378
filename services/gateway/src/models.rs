//! `GET /v1/models`.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use meshgate_runtime::ErrorCode;

use crate::api::{AppState, authenticate, client_of, request_id_of};
use crate::openai;
use crate::response::error_response;
use crate::tenancy::EndpointScope;

/// What `listModels` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const LIST_MODELS_ERRORS: &[ErrorCode] = &[ErrorCode::Timeout];

/// `GET /v1/models`.
#[utoipa::path(
    get,
    path = "/v1/models",
    operation_id = "listModels",
    tag = "openai",
    summary = "List the models the mesh can serve",
    description = "OpenAI-compatible, with `tasks` (`chat`, `embeddings`, `classification`) as a meshgate extension.",
    responses((status = 200, description = "The models", body = crate::openai::ModelList))
)]
pub(crate) async fn list_models(State(app): State<AppState>, request: Request) -> Response {
    let id = request_id_of(&request);
    let caller = authenticate(&app, request.headers(), client_of(&request)).await.and_then(|caller| {
        caller.require(EndpointScope::Models)?;
        Ok(caller)
    });
    if let Err(err) = caller {
        return error_response(&err, &id);
    }
    let data = match app.orchestrator.models().await {
        Ok(targets) => targets
            .into_iter()
            .map(|(t, tasks)| openai::ModelEntry {
                id: t.model,
                object: "model",
                created: 0,
                owned_by: t.provider,
                tasks,
            })
            .collect(),
        Err(err) => return error_response(&err, &id),
    };
    axum::Json(openai::ModelList { object: "list", data }).into_response()
}
