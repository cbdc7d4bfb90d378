//! What every operation of the generated document shares, added in one place: the bearer
//! security scheme, the error responses (the JSON error shape with the codes each operation can
//! answer, from the one [`ErrorCode`] table), the response headers, and the schemas utoipa cannot
//! derive.

use std::collections::{BTreeMap, BTreeSet};

use meshgate_policy::{Action, Rule};
use meshgate_runtime::ErrorCode;
use serde_json::{Map, Value, json};

use super::{COMMON_ERRORS, METHODS, TAGS, operation_errors};
use crate::{budget, orchestrator, response};

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
pub(super) fn finish(mut spec: Value) -> Value {
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
            let mut by_status: BTreeMap<u16, Vec<ErrorCode>> = Default::default();
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
    let mut used = BTreeSet::new();
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

pub(super) fn ref_name(reference: &str) -> &str {
    reference.rsplit('/').next().unwrap_or(reference)
}

#[cfg(test)]
mod tests {
    use meshgate_policy::PolicyConfig;

    use super::*;

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
}
