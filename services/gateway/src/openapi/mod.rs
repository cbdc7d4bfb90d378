//! The edge's API contract: an OpenAPI 3.1 document generated from the handlers' `#[utoipa::path]`
//! attributes and the wire types' `ToSchema` derives, served at `GET /openapi.json`, and a
//! self-contained HTML reference rendered from it at `GET /docs` (no script, no CDN).
//!
//! The router is built from the same attributes ([`api_routes`]), so a route cannot be served
//! without being documented. What every operation shares is added here in one place: the bearer
//! security scheme, the error responses (the JSON error shape with the codes each operation can
//! answer, from the one [`ErrorCode`] table) and the response headers.
//! Three parts: this module is the route table and what it declares (tags, each operation's
//! errors, the served document and page); [`document`] post-processes the generated document;
//! [`docs`] renders the HTML page.

mod docs;
mod document;

use std::sync::LazyLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use meshgate_runtime::ErrorCode;
use serde_json::Value;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::AppState;
use crate::{admin, analytics, chat, completions, edge_sync, embeddings, jobs, messages, models, quota, responses};

/// Tags, in the order the docs page shows them.
pub const TAGS: &[(&str, &str)] = &[
    (
        "openai",
        "OpenAI-compatible inference: chat completions, the Responses API, legacy completions (JSON and server-sent \
events), embeddings, models.",
    ),
    (
        "anthropic",
        "Anthropic's Messages API, as Claude Code and the Anthropic SDKs call it; errors in Anthropic's shape.",
    ),
    ("jobs", "Chat completions delivered later through the durable queue."),
    ("sync", "Edge → cloud: an edge meshgate's traffic uploaded to this one, applied once."),
    ("quota", "Budgets and rate limits of the caller's organization, project, user and key."),
    ("analytics", "Spend, errors, latency and traces, scoped to the caller's organization or project."),
    ("tenancy", "Organizations, projects, users and their roles."),
    ("keys", "API keys: created (the secret is shown once), listed by prefix, revoked, rotated."),
    ("projects", "A project's security policy and request limits."),
    ("meta", "This document and its human-readable page."),
];

#[derive(OpenApi)]
#[openapi(
    info(
        title = "meshgate edge API",
        description = "The HTTP/JSON edge of meshgate, an AI gateway. The OpenAI-compatible endpoints work with \
the official OpenAI SDKs unchanged. Every request but the two `meta` ones needs an API key: `Authorization: Bearer \
<key>`. Every error is one JSON shape, `{\"error\": {\"type\", \"code\", \"message\", \"request_id\"}}`, whose `code` \
fixes the HTTP status.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    components(schemas(crate::openai::ChatChunk, crate::tenancy::EndpointScope,))
)]
struct ApiDoc;

/// Every documented route of the edge, with its handlers. [`http::router`] mounts exactly these.
pub fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(chat::chat_completions))
        .routes(routes!(responses::create))
        .routes(routes!(responses::get, responses::delete))
        .routes(routes!(messages::create))
        .routes(routes!(messages::count_tokens))
        .routes(routes!(completions::create))
        .routes(routes!(embeddings::embeddings))
        .routes(routes!(models::list_models))
        .routes(routes!(quota::status))
        .routes(routes!(quota::set_limits))
        .routes(routes!(admin::create_org, admin::list_orgs))
        .routes(routes!(admin::create_project, admin::list_projects))
        .routes(routes!(admin::set_member))
        .routes(routes!(admin::get_policy, admin::set_policy))
        .routes(routes!(admin::get_limits, admin::set_limits))
        .routes(routes!(admin::create_user, admin::list_users))
        .routes(routes!(admin::create_key, admin::list_keys))
        .routes(routes!(admin::get_key, admin::revoke_key))
        .routes(routes!(admin::rotate_key))
        .routes(routes!(jobs::submit, jobs::list))
        .routes(routes!(jobs::get))
        .routes(routes!(jobs::retry))
        .routes(routes!(edge_sync::upload_batch))
        .routes(routes!(analytics::summary))
        .routes(routes!(analytics::top_expensive))
        .routes(routes!(analytics::error_rate))
        .routes(routes!(analytics::latency))
        .routes(routes!(analytics::trace))
        .routes(routes!(openapi_json))
        .routes(routes!(docs))
}

static SPEC: LazyLock<Value> = LazyLock::new(|| {
    let (_, api) = api_routes().split_for_parts();
    document::finish(serde_json::to_value(api).expect("the OpenAPI document serializes"))
});
static SPEC_JSON: LazyLock<String> = LazyLock::new(|| SPEC.to_string());
static DOCS_HTML: LazyLock<String> = LazyLock::new(|| docs::render(&SPEC));

/// The edge's OpenAPI document.
pub fn spec() -> &'static Value {
    &SPEC
}

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "getOpenApi",
    tag = "meta",
    summary = "This API's OpenAPI 3.1 document",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
pub async fn openapi_json() -> Response {
    let mut response = SPEC_JSON.as_str().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `GET /docs`.
#[utoipa::path(
    get,
    path = "/docs",
    operation_id = "getDocs",
    tag = "meta",
    summary = "This API's reference as one HTML page",
    responses((status = 200, description = "The reference, rendered from the OpenAPI document", content_type = "text/html", body = String))
)]
pub async fn docs() -> Response {
    axum::response::Html(DOCS_HTML.as_str()).into_response()
}

/// Error codes each operation can answer beyond [`COMMON_ERRORS`], declared beside its handler.
/// An operation not listed needs no API key; a new operation must be listed (the
/// `every_operation_documents_its_errors` test).
const OPERATION_ERRORS: &[(&str, &[ErrorCode])] = &[
    ("createOrganization", admin::CREATE_ORG_ERRORS),
    ("listOrganizations", admin::LIST_ORGS_ERRORS),
    ("createProject", admin::CREATE_PROJECT_ERRORS),
    ("listProjects", admin::LIST_PROJECTS_ERRORS),
    ("createUser", admin::CREATE_USER_ERRORS),
    ("listUsers", admin::LIST_USERS_ERRORS),
    ("setProjectMember", admin::SET_MEMBER_ERRORS),
    ("getSecurityPolicy", admin::GET_POLICY_ERRORS),
    ("setSecurityPolicy", admin::SET_POLICY_ERRORS),
    ("getRequestLimits", admin::GET_LIMITS_ERRORS),
    ("setRequestLimits", admin::SET_LIMITS_ERRORS),
    ("createKey", admin::CREATE_KEY_ERRORS),
    ("listKeys", admin::LIST_KEYS_ERRORS),
    ("getKey", admin::GET_KEY_ERRORS),
    ("revokeKey", admin::REVOKE_KEY_ERRORS),
    ("rotateKey", admin::ROTATE_KEY_ERRORS),
    ("getAnalytics", analytics::SUMMARY_ERRORS),
    ("getTopExpensive", analytics::TOP_EXPENSIVE_ERRORS),
    ("getErrorRates", analytics::ERROR_RATE_ERRORS),
    ("getLatency", analytics::LATENCY_ERRORS),
    ("getTrace", analytics::TRACE_ERRORS),
    ("createChatCompletion", chat::CHAT_COMPLETIONS_ERRORS),
    ("createCompletion", completions::CREATE_ERRORS),
    ("uploadEdgeBatch", edge_sync::UPLOAD_BATCH_ERRORS),
    ("createEmbedding", embeddings::EMBEDDINGS_ERRORS),
    ("submitJob", jobs::SUBMIT_ERRORS),
    ("getJob", jobs::GET_ERRORS),
    ("listJobs", jobs::LIST_ERRORS),
    ("retryJob", jobs::RETRY_ERRORS),
    ("createMessage", messages::CREATE_ERRORS),
    ("countMessageTokens", messages::COUNT_TOKENS_ERRORS),
    ("listModels", models::LIST_MODELS_ERRORS),
    ("getQuotaStatus", quota::STATUS_ERRORS),
    ("setQuotaLimits", quota::SET_LIMITS_ERRORS),
    ("createResponse", responses::CREATE_ERRORS),
    ("getResponse", responses::GET_ERRORS),
    ("deleteResponse", responses::DELETE_ERRORS),
];

fn operation_errors(operation_id: &str) -> Option<&'static [ErrorCode]> {
    OPERATION_ERRORS.iter().find(|(id, _)| *id == operation_id).map(|(_, codes)| *codes)
}

/// Errors every authenticated operation can answer: a bad query, path or body (400), a missing
/// or invalid key (401), a key without the scope or role (403), too many failed authentications
/// from the address (429), the edge at its concurrency limit or a store down (503), a stored
/// setting that no longer parses (500).
const COMMON_ERRORS: &[ErrorCode] = &[
    ErrorCode::InvalidRequest,
    ErrorCode::Unauthenticated,
    ErrorCode::PermissionDenied,
    ErrorCode::RateLimited,
    ErrorCode::Overloaded,
    ErrorCode::Unavailable,
    ErrorCode::Internal,
];

/// Operation ids that have no error table entry (empty when every operation is covered).
pub fn undocumented_operations() -> Vec<String> {
    operations(spec())
        .filter_map(|(_, _, op)| op["operationId"].as_str())
        .filter(|id| !matches!(*id, "getOpenApi" | "getDocs") && operation_errors(id).is_none())
        .map(str::to_owned)
        .collect()
}

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options", "trace"];

/// `(path, method, operation)` of every operation in a document.
pub fn operations(spec: &Value) -> impl Iterator<Item = (&str, &'static str, &Value)> {
    spec["paths"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(path, item)| METHODS.iter().filter_map(move |m| item.get(*m).map(|op| (path.as_str(), *m, op))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_documents_its_errors() {
        assert_eq!(undocumented_operations(), Vec::<String>::new());
    }

    #[test]
    fn every_listed_operation_is_served() {
        let served: Vec<&str> = operations(spec()).filter_map(|(_, _, op)| op["operationId"].as_str()).collect();
        for (id, _) in OPERATION_ERRORS {
            assert!(served.contains(id), "{id} is listed but not routed");
        }
    }
}
