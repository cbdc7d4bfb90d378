//! The edge's API contract: an OpenAPI 3.1 document generated from the handlers' `#[utoipa::path]`
//! attributes and the wire types' `ToSchema` derives, served at `GET /openapi.json`, and a
//! self-contained HTML reference rendered from it at `GET /docs` (no script, no CDN).
//!
//! The router is built from the same attributes ([`api_routes`]), so a route cannot be served
//! without being documented. What every operation shares is added here in one place: the bearer
//! security scheme, the error responses (the JSON error shape with the codes each operation can
//! answer, from the one [`ErrorCode`] table) and the response headers.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::LazyLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use meshgate_policy::{Action, Rule};
use meshgate_runtime::ErrorCode;
use serde_json::{Map, Value, json};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::AppState;
use crate::{
    admin, analytics, budget, chat, completions, edge_sync, embeddings, jobs, messages, models, orchestrator, quota,
    response, responses,
};

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
    finish(serde_json::to_value(api).expect("the OpenAPI document serializes"))
});
static SPEC_JSON: LazyLock<String> = LazyLock::new(|| SPEC.to_string());
static DOCS_HTML: LazyLock<String> = LazyLock::new(|| render_docs(&SPEC));

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

/// Error codes an operation can answer beyond [`COMMON_ERRORS`]; `None` for an operation that
/// needs no API key. A new operation without an entry fails the `every_operation_documents_its_errors`
/// test.
fn operation_errors(operation_id: &str) -> Option<&'static [ErrorCode]> {
    use ErrorCode::*;
    Some(match operation_id {
        "getOpenApi" | "getDocs" => return None,
        "createChatCompletion" => {
            &[ModelNotFound, PayloadTooLarge, PolicyViolation, QuotaExceeded, UpstreamError, Timeout]
        }
        "createResponse" => &[
            ModelNotFound,
            NotFound,
            PayloadTooLarge,
            PolicyViolation,
            QuotaExceeded,
            UpstreamError,
            ContextLengthExceeded,
            Timeout,
        ],
        "getResponse" | "deleteResponse" => &[NotFound],
        "createMessage" | "createCompletion" => &[
            ModelNotFound,
            PayloadTooLarge,
            PolicyViolation,
            QuotaExceeded,
            UpstreamError,
            ContextLengthExceeded,
            Timeout,
        ],
        "countMessageTokens" => &[PayloadTooLarge],
        "createEmbedding" => &[ModelNotFound, NotFound, PayloadTooLarge, PolicyViolation, QuotaExceeded, Timeout],
        "listModels" | "getQuotaStatus" => &[Timeout],
        "setQuotaLimits" => &[NotFound, PayloadTooLarge, Timeout],
        "createOrganization" => &[Conflict, PayloadTooLarge],
        "createProject" | "createUser" => &[NotFound, Conflict, PayloadTooLarge],
        "listOrganizations" => &[],
        "listProjects" | "listUsers" | "listKeys" | "getKey" | "revokeKey" | "getSecurityPolicy"
        | "getRequestLimits" => &[NotFound],
        "setProjectMember" | "setSecurityPolicy" | "setRequestLimits" | "createKey" => &[NotFound, PayloadTooLarge],
        "rotateKey" => &[NotFound, Conflict],
        // Admission holds the job's reservation: a spent budget is 429 `quota_exceeded`.
        "submitJob" => &[ModelNotFound, NotFound, Conflict, PayloadTooLarge, PolicyViolation, QuotaExceeded, Timeout],
        "listJobs" | "getAnalytics" | "getTopExpensive" | "getErrorRates" | "getLatency" => &[Timeout],
        "getTrace" => &[NotFound, Timeout],
        "getJob" => &[NotFound, Timeout],
        "retryJob" => &[NotFound, Conflict, QuotaExceeded, Timeout],
        "uploadEdgeBatch" => &[PayloadTooLarge, UnsupportedMediaType, Timeout],
        _ => return None,
    })
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

fn header_doc(description: &str, schema: Value, required: bool) -> Value {
    json!({"description": description, "required": required, "schema": schema})
}

fn string() -> Value {
    json!({"type": "string"})
}

/// Headers on every response of the edge.
fn common_headers() -> Map<String, Value> {
    let mut headers = Map::new();
    headers.insert(
        response::MESHGATE_REQUEST_ID.into(),
        header_doc("The gateway's id of this request: the key of its trace.", string(), true),
    );
    headers.insert(
        response::REQUEST_ID.into(),
        header_doc(
            "The client's `x-request-id` when it sent a plain one (1–128 of `A-Za-z0-9-_.:`), else the gateway's id.",
            string(),
            true,
        ),
    );
    headers.insert(response::TRACE_ID.into(), header_doc("The W3C trace id of this request.", string(), false));
    headers.insert("traceparent".into(), header_doc("W3C trace context of the edge's span.", string(), false));
    headers
}

fn quota_headers(headers: &mut Map<String, Value>) {
    let int = json!({"type": "integer", "minimum": 0});
    headers.insert(
        budget::REMAINING_TOKENS.into(),
        header_doc(
            "Daily tokens left in the tightest scope, this request's reservation held; absent when unlimited.",
            int.clone(),
            false,
        ),
    );
    headers.insert(
        budget::REMAINING_COST.into(),
        header_doc("Daily cost left in the tightest scope, micro-dollars; absent when unlimited.", int.clone(), false),
    );
    headers.insert(
        budget::REMAINING_REQUESTS.into(),
        header_doc(
            "Requests that may still start this minute in the tightest scope; absent when unlimited.",
            int,
            false,
        ),
    );
    headers.insert(
        budget::RESET.into(),
        header_doc("When the daily window resets (RFC 3339).", json!({"type": "string", "format": "date-time"}), false),
    );
}

fn risk_header(required: bool) -> Value {
    header_doc(
        "Risk score of the request, 0–100, from the project's security policy.",
        json!({"type": "integer", "minimum": 0, "maximum": 100}),
        required,
    )
}

/// Headers of the reply to an inference request (chat or embeddings). A chat request's 200 may
/// also be a queued job replayed by its idempotency key, which carries none of them.
fn usage_headers(headers: &mut Map<String, Value>, chat: bool) {
    headers.insert(crate::guard::RISK_SCORE.into(), risk_header(!chat));
    quota_headers(headers);
    if chat {
        headers.insert(
            orchestrator::TARGET_HEADER.into(),
            header_doc("The target that served the reply (`<provider>/<model>`).", string(), false),
        );
        headers.insert(
            orchestrator::LAYER_HEADER.into(),
            header_doc("The routing layer of the target that served the reply (`l0`–`l3`).", string(), false),
        );
        headers.insert(
            orchestrator::TASK_HEADER.into(),
            header_doc("The task the router classified the request as.", string(), false),
        );
    }
}

/// The error response for one HTTP status, listing the codes that produce it.
fn error_response(status: u16, codes: &[ErrorCode]) -> Value {
    let names: Vec<&str> = codes.iter().map(|c| c.as_str()).collect();
    let mut headers = common_headers();
    if status == 429 || status == 503 {
        headers.insert(
            "retry-after".into(),
            header_doc(
                "Seconds after which a retry may succeed.",
                json!({"type": "integer", "minimum": 0}),
                status == 429,
            ),
        );
    }
    if codes.contains(&ErrorCode::QuotaExceeded) {
        headers.insert(
            budget::RETRY_AFTER_MS.into(),
            header_doc(
                "The exact wait in milliseconds (quota refusals).",
                json!({"type": "integer", "minimum": 0}),
                false,
            ),
        );
        headers.insert(
            budget::SCOPE.into(),
            header_doc("The scope whose limit refused the request, `<kind>:<id>` (quota refusals).", string(), false),
        );
        headers.insert(
            budget::LIMIT.into(),
            header_doc("The limit that refused it, e.g. `requests_per_minute` (quota refusals).", string(), false),
        );
        headers.insert(
            budget::RESET.into(),
            header_doc("When a retry can succeed (RFC 3339).", json!({"type": "string", "format": "date-time"}), false),
        );
    }
    if codes.contains(&ErrorCode::PolicyViolation) {
        headers.insert(crate::guard::RISK_SCORE.into(), risk_header(false));
    }
    json!({
        "description": format!("Error: {}", names.join(", ")),
        "headers": headers,
        "content": {"application/json": {"schema": {
            "allOf": [{"$ref": "#/components/schemas/Error"}],
            "properties": {"error": {"properties": {"code": {"enum": names}}}}
        }}}
    })
}

/// Anthropic's error shape, which the Messages endpoints answer with.
fn anthropic_error_schema() -> Value {
    let kinds = [
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "timeout_error",
        "overloaded_error",
        "api_error",
    ];
    json!({
        "type": "object",
        "description": "An error of the Anthropic Messages endpoints, in Anthropic's shape.",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"enum": kinds}, "message": {"type": "string"}}
            }
        }
    })
}

/// The error shape's schema, with every code of the table.
fn error_schema() -> Value {
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    let kinds: BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.error_type()).collect();
    json!({
        "type": "object",
        "description": "Every error of the edge. `code` fixes the HTTP status (see the table on /docs).",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["type", "code", "message", "request_id"],
            "properties": {
                "type": {"type": "string", "enum": kinds, "description": "The OpenAI-compatible error type."},
                "code": {"type": "string", "enum": codes, "description": "The stable meshgate error code."},
                "message": {"type": "string", "description": "What went wrong, naming the offending field; never a secret."},
                "request_id": {"type": "string", "description": "The request's id (`x-meshgate-request-id`)."}
            }
        }}
    })
}

/// A project's security policy (`meshgate_policy::PolicyConfig`); every field is optional on a
/// write, and a read answers every default filled in.
fn policy_schema() -> Value {
    let actions: Vec<&str> = [Action::Block, Action::Redact, Action::Flag].iter().map(|a| a.as_str()).collect();
    let rule = json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "enabled": {"type": "boolean", "default": true},
            "action": {"type": "string", "enum": actions, "description": "Absent keeps the rule's default action."}
        }
    });
    let rules: Map<String, Value> = Rule::ALL.iter().map(|r| (r.as_str().to_owned(), rule.clone())).collect();
    json!({
        "type": "object",
        "additionalProperties": false,
        "description": "A project's security policy. Every field is optional on a write (an empty object is the default policy).",
        "properties": {
            "enabled": {"type": "boolean", "description": "Master switch: a disabled policy finds nothing and allows everything."},
            "rules": {
                "type": "object",
                "additionalProperties": false,
                "properties": rules,
                "description": "Overrides of the per-rule defaults; rules not listed keep theirs. `prompt_injection` cannot `redact`."
            },
            "blocked_keywords": {
                "type": "array",
                "maxItems": meshgate_policy::MAX_KEYWORDS,
                "items": {"type": "string", "minLength": 1, "maxLength": meshgate_policy::MAX_KEYWORD_LEN},
                "description": "Matched case-insensitively, never inside a word."
            },
            "injection": {
                "type": "object",
                "additionalProperties": false,
                "properties": {"threshold": {"type": "number", "minimum": 0, "maximum": 1}}
            },
            "output": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "enabled": {"type": "boolean"},
                    "action": {"type": "string", "enum": ["flag", "redact"]}
                }
            }
        }
    })
}

/// Adds what every operation shares to the generated document.
fn finish(mut spec: Value) -> Value {
    let schemas = &mut spec["components"]["schemas"];
    schemas["Error"] = error_schema();
    schemas["AnthropicError"] = anthropic_error_schema();
    schemas["SecurityPolicy"] = policy_schema();
    spec["components"]["securitySchemes"] = json!({"bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`mgk_…`, or the bootstrap `MESHGATE_ADMIN_KEY`)."
    }});
    spec["security"] = json!([{"bearer": []}]);
    spec["tags"] = TAGS.iter().map(|(name, description)| json!({"name": name, "description": description})).collect();
    // A queued chat request whose idempotency key was seen before answers 200 with that job.
    let chat_ok = &mut spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"];
    let completion = chat_ok["application/json"]["schema"].take();
    chat_ok["application/json"]["schema"] = json!({"anyOf": [completion, {"$ref": "#/components/schemas/Job"}]});
    // Before OpenAPI 3.2's `itemSchema`, an event stream's schema describes one event.
    chat_ok["text/event-stream"]["schema"] = json!({
        "type": "object",
        "description": "One server-sent event.",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "data": {
                "description": "A `ChatChunk` as JSON; an `Error` as JSON when the reply failed after it started; `[DONE]` last.",
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [
                            {"$ref": "#/components/schemas/ChatChunk"},
                            {"$ref": "#/components/schemas/Error"}
                        ]}
                    }
                ]
            }
        }
    });
    let policy = json!({"$ref": "#/components/schemas/SecurityPolicy"});
    let path = &mut spec["paths"]["/v1/projects/{project}/policy"];
    path["get"]["responses"]["200"]["content"]["application/json"]["schema"] = policy.clone();
    path["put"]["responses"]["200"]["content"]["application/json"]["schema"] = policy.clone();
    path["put"]["requestBody"]["content"]["application/json"]["schema"] = policy;
    let Some(paths) = spec["paths"].as_object_mut() else { return spec };
    for item in paths.values_mut() {
        for method in METHODS {
            let Some(op) = item.get_mut(*method) else { continue };
            let id = op["operationId"].as_str().unwrap_or_default().to_owned();
            let responses = op["responses"].as_object_mut().expect("every operation has responses");
            for (status, response) in responses.iter_mut() {
                let headers =
                    response.as_object_mut().expect("a response object").entry("headers").or_insert(json!({}));
                let headers = headers.as_object_mut().expect("a headers object");
                headers.extend(common_headers());
                if status == "200" && matches!(id.as_str(), "createChatCompletion" | "createEmbedding") {
                    usage_headers(headers, id == "createChatCompletion");
                }
                if matches!(status.as_str(), "200" | "202")
                    && matches!(id.as_str(), "createChatCompletion" | "submitJob")
                {
                    headers.insert(
                        crate::response::IDEMPOTENT_REPLAYED.into(),
                        header_doc(
                            "`true` when the job was submitted before with this idempotency key.",
                            string(),
                            false,
                        ),
                    );
                }
            }
            let Some(extra) = operation_errors(&id) else {
                op["security"] = json!([]);
                continue;
            };
            let mut by_status: std::collections::BTreeMap<u16, Vec<ErrorCode>> = Default::default();
            for &code in COMMON_ERRORS.iter().chain(extra) {
                let codes = by_status.entry(code.http_status().as_u16()).or_default();
                if !codes.contains(&code) {
                    codes.push(code);
                }
            }
            let anthropic = op["tags"].as_array().is_some_and(|tags| tags.iter().any(|t| t == "anthropic"));
            let responses = op["responses"].as_object_mut().expect("every operation has responses");
            for (status, codes) in by_status {
                let mut response = error_response(status, &codes);
                if anthropic {
                    response["content"]["application/json"]["schema"] =
                        json!({"$ref": "#/components/schemas/AnthropicError"});
                }
                responses.insert(status.to_string(), response);
            }
        }
    }
    // Relative: the document is served by the edge it describes, wherever that is reached.
    spec["servers"] = json!([{"url": "/", "description": "The edge serving this document."}]);
    prune_unused_schemas(&mut spec);
    spec
}

/// Drops the component schemas nothing refers to (utoipa registers a generic's parameter even
/// where it inlines it), so that every schema the document lists is one a client meets.
fn prune_unused_schemas(spec: &mut Value) {
    fn collect_refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("$ref", Value::String(target)) => out.push(ref_name(target).to_owned()),
                        _ => collect_refs(value, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| collect_refs(item, out)),
            _ => {}
        }
    }
    let Some(schemas) = spec["components"]["schemas"].as_object() else {
        return;
    };
    let mut pending = Vec::new();
    for (key, value) in spec.as_object().into_iter().flatten() {
        if key != "components" {
            collect_refs(value, &mut pending);
        }
    }
    let mut used = std::collections::BTreeSet::new();
    while let Some(name) = pending.pop() {
        if used.insert(name.clone())
            && let Some(schema) = schemas.get(&name)
        {
            collect_refs(schema, &mut pending);
        }
    }
    if let Some(schemas) = spec["components"]["schemas"].as_object_mut() {
        schemas.retain(|name, _| used.contains(name));
    }
}

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Inline code spans (`x`) of a description as `<code>`.
fn prose(text: &str) -> String {
    let escaped = esc(text);
    let mut out = String::with_capacity(escaped.len());
    for (i, part) in escaped.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{part}</code>");
        } else {
            out.push_str(part);
        }
    }
    out
}

fn ref_name(reference: &str) -> &str {
    reference.rsplit('/').next().unwrap_or(reference)
}

/// A short label of a schema's type, with links to named schemas.
fn type_label(schema: &Value) -> String {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = ref_name(reference);
        return format!("<a href=\"#schema-{0}\">{0}</a>", esc(name));
    }
    for combinator in ["oneOf", "anyOf", "allOf"] {
        if let Some(parts) = schema[combinator].as_array() {
            let sep = if combinator == "allOf" { " &amp; " } else { " | " };
            let labels: Vec<String> = parts.iter().map(type_label).filter(|l| !l.is_empty()).collect();
            if !labels.is_empty() {
                return labels.join(sep);
            }
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let mut labels = Vec::new();
    for t in types {
        labels.push(match t {
            "array" => format!("array of {}", type_label(&schema["items"])),
            "string" if schema["format"].is_string() => {
                format!("string ({})", esc(schema["format"].as_str().unwrap_or_default()))
            }
            other => esc(other),
        });
    }
    if let Some(values) = schema["enum"].as_array() {
        let values: Vec<String> = values.iter().map(|v| format!("<code>{}</code>", esc(&v.to_string()))).collect();
        labels.push(format!("one of {}", values.join(", ")));
    }
    labels.join(" or ")
}

/// Bounds of a schema (`min 1`, `≤ 256 chars`, …).
fn constraints(schema: &Value) -> String {
    let mut parts = Vec::new();
    for (key, label) in [
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
    ] {
        if let Some(v) = schema.get(key).filter(|v| v.is_number()) {
            parts.push(format!("{label} {v}"));
        }
    }
    if let Some(default) = schema.get("default") {
        parts.push(format!("default <code>{}</code>", esc(&default.to_string())));
    }
    parts.join(", ")
}

/// A table of an object schema's properties (nested objects inline).
fn properties_table(out: &mut String, schema: &Value) {
    let Some(props) = schema["properties"].as_object().filter(|p| !p.is_empty()) else { return };
    let required: BTreeSet<&str> =
        schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    out.push_str("<table><tr><th>field</th><th>type</th><th>notes</th></tr>");
    for (name, prop) in props {
        let req = if required.contains(name.as_str()) { " <span class=req>required</span>" } else { "" };
        let description = prop["description"].as_str().map(prose).unwrap_or_default();
        let bounds = constraints(prop);
        let _ =
            write!(out, "<tr><td><code>{}</code>{req}</td><td>{}</td><td>{description}", esc(name), type_label(prop));
        if !bounds.is_empty() {
            let _ = write!(out, " <span class=dim>{bounds}</span>");
        }
        if prop["properties"].is_object() {
            properties_table(out, prop);
        }
        out.push_str("</td></tr>");
    }
    out.push_str("</table>");
}

fn schema_block(out: &mut String, schema: &Value) {
    let _ = write!(out, "<p>{}</p>", type_label(schema));
    if schema["$ref"].is_null() {
        properties_table(out, schema);
    }
}

const STYLE: &str = "body{font:15px/1.5 system-ui,sans-serif;margin:0;display:flex;color:#1d2330}\
nav{width:260px;flex:none;height:100vh;overflow:auto;position:sticky;top:0;background:#f3f4f7;padding:1em;box-sizing:border-box}\
nav a{display:block;color:#1d2330;text-decoration:none;font-size:13px;padding:1px 0}nav h4{margin:1em 0 .2em}\
main{padding:1em 2em;max-width:1100px}code{background:#eef0f4;padding:0 3px;border-radius:3px;font-size:90%}\
table{border-collapse:collapse;margin:.4em 0 1em;width:100%}td,th{border:1px solid #d9dce3;padding:3px 8px;text-align:left;vertical-align:top}\
th{background:#f3f4f7}.op{border-top:2px solid #d9dce3;margin-top:2em}.m{font-weight:bold;text-transform:uppercase;padding:1px 6px;border-radius:3px;color:#fff}\
.get{background:#2f7d32}.post{background:#1f5fa8}.put{background:#a86b1f}.delete{background:#a8321f}\
.req{color:#a8321f;font-size:11px}.dim{color:#687085;font-size:12px}";

/// The reference page: operations grouped by tag with their parameters, bodies, responses,
/// headers and error codes, then every schema.
fn render_docs(spec: &Value) -> String {
    let title = spec["info"]["title"].as_str().unwrap_or("API");
    let mut nav = String::new();
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>{}</h1><p>{}</p><p>OpenAPI {} document: <a href=\"/openapi.json\">/openapi.json</a>.</p>",
        esc(title),
        prose(spec["info"]["description"].as_str().unwrap_or_default()),
        esc(spec["openapi"].as_str().unwrap_or_default())
    );
    body.push_str("<h2 id=errors>Errors</h2><table><tr><th>code</th><th>HTTP</th><th>type</th></tr>");
    for code in ErrorCode::ALL {
        let _ = write!(
            body,
            "<tr><td><code>{}</code></td><td>{}</td><td><code>{}</code></td></tr>",
            code.as_str(),
            code.http_status().as_u16(),
            code.error_type()
        );
    }
    body.push_str("</table>");
    nav.push_str("<a href=\"#errors\">Errors</a>");
    for (tag, description) in TAGS {
        let ops: Vec<_> = operations(spec)
            .filter(|(_, _, op)| op["tags"].as_array().is_some_and(|t| t.iter().any(|v| v == tag)))
            .collect();
        if ops.is_empty() {
            continue;
        }
        let _ = write!(nav, "<h4>{tag}</h4>");
        let _ = write!(body, "<h2 id=\"tag-{tag}\">{tag}</h2><p>{}</p>", prose(description));
        for (path, method, op) in ops {
            let id = esc(op["operationId"].as_str().unwrap_or_default());
            let _ = write!(nav, "<a href=\"#op-{id}\">{} {}</a>", method.to_uppercase(), esc(path));
            let _ = write!(
                body,
                "<div class=op id=\"op-{id}\"><h3><span class=\"m {method}\">{method}</span> <code>{}</code></h3><p><b>{}</b></p><p>{}</p>",
                esc(path),
                prose(op["summary"].as_str().unwrap_or_default()),
                prose(op["description"].as_str().unwrap_or_default())
            );
            if op["security"].as_array().is_some_and(Vec::is_empty) {
                body.push_str("<p class=dim>No API key needed.</p>");
            }
            if let Some(params) = op["parameters"].as_array().filter(|p| !p.is_empty()) {
                body.push_str("<h4>Parameters</h4><table><tr><th>name</th><th>in</th><th>type</th><th>notes</th></tr>");
                for p in params {
                    let req = if p["required"] == true { " <span class=req>required</span>" } else { "" };
                    let _ = write!(
                        body,
                        "<tr><td><code>{}</code>{req}</td><td>{}</td><td>{}</td><td>{} <span class=dim>{}</span></td></tr>",
                        esc(p["name"].as_str().unwrap_or_default()),
                        esc(p["in"].as_str().unwrap_or_default()),
                        type_label(&p["schema"]),
                        prose(p["description"].as_str().unwrap_or_default()),
                        constraints(&p["schema"])
                    );
                }
                body.push_str("</table>");
            }
            if let Some(content) = op["requestBody"]["content"].as_object() {
                body.push_str("<h4>Request body</h4>");
                for (media, c) in content {
                    let _ = write!(body, "<p><code>{}</code></p>", esc(media));
                    schema_block(&mut body, &c["schema"]);
                }
            }
            body.push_str(
                "<h4>Responses</h4><table><tr><th>status</th><th>description</th><th>body</th><th>headers</th></tr>",
            );
            for (status, response) in op["responses"].as_object().into_iter().flatten() {
                let mut bodies = Vec::new();
                for (media, c) in response["content"].as_object().into_iter().flatten() {
                    let schema = &c["schema"];
                    let shown =
                        if schema["allOf"].is_array() { type_label(&schema["allOf"][0]) } else { type_label(schema) };
                    bodies.push(format!("<code>{}</code> {shown}", esc(media)));
                }
                let headers: Vec<String> = response["headers"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, h)| {
                        format!(
                            "<code title=\"{}\">{}</code>{}",
                            esc(h["description"].as_str().unwrap_or_default()),
                            esc(name),
                            if h["required"] == true { "" } else { "?" }
                        )
                    })
                    .collect();
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td class=dim>{}</td></tr>",
                    esc(status),
                    prose(response["description"].as_str().unwrap_or_default()),
                    bodies.join("<br>"),
                    headers.join(" ")
                );
            }
            body.push_str("</table></div>");
        }
    }
    body.push_str("<h2 id=schemas>Schemas</h2>");
    nav.push_str("<h4><a href=\"#schemas\">Schemas</a></h4>");
    for (name, schema) in spec["components"]["schemas"].as_object().into_iter().flatten() {
        let name = esc(name);
        let _ = write!(nav, "<a href=\"#schema-{name}\">{name}</a>");
        let _ = write!(
            body,
            "<div id=\"schema-{name}\"><h3>{name}</h3><p>{}</p><p>{}</p>",
            prose(schema["description"].as_str().unwrap_or_default()),
            type_label(schema)
        );
        properties_table(&mut body, schema);
        body.push_str("</div>");
    }
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width\">\
<title>{}</title><style>{STYLE}</style></head><body><nav>{nav}</nav><main>{body}</main></body></html>",
        esc(title)
    )
}

#[cfg(test)]
mod tests {
    use meshgate_policy::PolicyConfig;

    use super::*;

    #[test]
    fn every_operation_documents_its_errors() {
        assert_eq!(undocumented_operations(), Vec::<String>::new());
    }

    #[test]
    fn the_policy_schema_names_every_field_of_the_policy() {
        let schema = policy_schema();
        let config = serde_json::to_value(PolicyConfig::default()).unwrap();
        let fields: BTreeSet<&String> = config.as_object().unwrap().keys().collect();
        let documented: BTreeSet<&String> = schema["properties"].as_object().unwrap().keys().collect();
        assert_eq!(fields, documented);
        for (part, value) in [("injection", &config["injection"]), ("output", &config["output"])] {
            let fields: BTreeSet<&String> = value.as_object().unwrap().keys().collect();
            let documented: BTreeSet<&String> =
                schema["properties"][part]["properties"].as_object().unwrap().keys().collect();
            assert_eq!(fields, documented, "{part}");
        }
    }

    #[test]
    fn errors_carry_the_status_of_their_code() {
        let spec = spec();
        for (path, method, op) in operations(spec) {
            for (status, response) in op["responses"].as_object().unwrap() {
                let codes = &response["content"]["application/json"]["schema"]["properties"]["error"]["properties"]["code"]
                    ["enum"];
                for code in codes.as_array().into_iter().flatten() {
                    let code = ErrorCode::parse(code.as_str().unwrap()).unwrap();
                    assert_eq!(code.http_status().as_str(), status, "{method} {path}: {code}");
                }
            }
        }
    }

    #[test]
    fn the_docs_page_escapes_and_links() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(prose("use `x<y>`"), "use <code>x&lt;y&gt;</code>");
        let html = render_docs(spec());
        assert!(html.contains("id=\"op-createChatCompletion\""));
        assert!(html.contains("href=\"#schema-ChatCompletionRequest\""));
        assert!(!html.contains("<script"), "no script, nothing fetched");
    }
}
