//! The request checks both OpenAI formats share (Chat Completions and the Responses API): the 400
//! naming the offending parameter, function tools, tool-choice modes, named JSON schemas,
//! reasoning efforts, image URLs and audio.

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::Value;

use crate::agent::{Output, ToolMode};
use crate::reply;
use crate::server::{error_with_param, is_base64};

/// Most tools a request may offer.
pub(crate) const MAX_TOOLS: usize = 128;
/// Longest function name.
const MAX_FUNCTION_NAME: usize = 64;
const REASONING_EFFORTS: [&str; 6] = ["none", "minimal", "low", "medium", "high", "xhigh"];

/// A request OpenAI would refuse: 400 `invalid_request_error` naming `param`.
pub(crate) struct Invalid {
    message: String,
    param: String,
    code: Option<&'static str>,
}

impl Invalid {
    pub(crate) fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { message: message.into(), param: param.into(), code: None }
    }

    /// `Missing required parameter: '<param>'.`
    pub(crate) fn missing(param: impl Into<String>) -> Self {
        let param = param.into();
        let message = format!("Missing required parameter: '{param}'.");
        Self::new(param, message).code("missing_required_parameter")
    }

    pub(crate) fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub(crate) fn response(&self) -> Response {
        error_with_param(StatusCode::BAD_REQUEST, &self.message, "invalid_request_error", Some(&self.param), self.code)
    }
}

/// A function tool's name and parameter schema; `path` is where the function is described
/// (`tools[0].function` in Chat Completions, `tools[0]` in the Responses API).
pub(crate) fn check_function(path: &str, name: &str, parameters: Option<&Value>) -> Result<(), Invalid> {
    let name_ok = !name.is_empty()
        && name.len() <= MAX_FUNCTION_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !name_ok {
        return Err(Invalid::new(
            format!("{path}.name"),
            format!(
                "Invalid '{path}.name': string does not match pattern. Expected a string that matches the pattern \
                 '^[a-zA-Z0-9_-]{{1,{MAX_FUNCTION_NAME}}}$'."
            ),
        )
        .code("invalid_value"));
    }
    if let Some(parameters) = parameters {
        let kind = parameters.get("type");
        if !parameters.is_object() || kind.is_some_and(|k| k != "object") {
            return Err(Invalid::new(
                format!("{path}.parameters"),
                format!(
                    "Invalid schema for function '{name}': schema must be a JSON Schema of 'type: \"object\"', got \
                     '{}'.",
                    kind.map_or_else(|| parameters.to_string(), |k| format!("type: {k}"))
                ),
            )
            .code("invalid_function_parameters"));
        }
    }
    Ok(())
}

/// `tools` may hold at most [`MAX_TOOLS`] tools.
pub(crate) fn check_tool_count(count: usize) -> Result<(), Invalid> {
    if count <= MAX_TOOLS {
        return Ok(());
    }
    Err(Invalid::new(
        "tools",
        format!("Invalid 'tools': array too long. Expected an array with maximum length {MAX_TOOLS}."),
    )
    .code("array_above_max_length"))
}

/// A `tool_choice` given as a string.
pub(crate) fn tool_mode(mode: &str) -> Result<ToolMode<'static>, Invalid> {
    match mode {
        "auto" => Ok(ToolMode::Auto),
        "none" => Ok(ToolMode::None),
        "required" => Ok(ToolMode::Required),
        other => Err(Invalid::new(
            "tool_choice",
            format!("Invalid value: '{other}'. Supported values are: 'none', 'auto' and 'required'."),
        )
        .code("invalid_value")),
    }
}

/// A `json_schema` format whose `name` and `schema` are members of `spec`, found at `path`
/// (`response_format.json_schema` in Chat Completions, `text.format` in the Responses API).
pub(crate) fn named_schema<'a>(spec: &'a Value, path: &str) -> Result<Output<'a>, Invalid> {
    if spec.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err(Invalid::missing(format!("{path}.name")));
    }
    match spec.get("schema") {
        None => Ok(Output::JsonObject),
        Some(schema) if schema.is_object() => Ok(Output::JsonSchema(schema)),
        Some(_) => Err(Invalid::new(format!("{path}.schema"), format!("Invalid '{path}.schema': expected an object."))
            .code("invalid_type")),
    }
}

/// Reasoning pieces for a reasoning effort given at `param`.
pub(crate) fn reasoning_pieces(param: &str, effort: &str) -> Result<usize, Invalid> {
    if REASONING_EFFORTS.contains(&effort) {
        return Ok(reply::reasoning_pieces(effort));
    }
    Err(Invalid::new(
        param,
        format!(
            "Invalid value: '{effort}'. Supported values are: 'none', 'minimal', 'low', 'medium', 'high' and 'xhigh'."
        ),
    )
    .code("invalid_value"))
}

/// `http(s)`, or a `data:image/...;base64,` URI whose data is base64.
pub(crate) fn image_url_ok(url: &str) -> bool {
    if url.starts_with("https://") || url.starts_with("http://") {
        return url.len() > "https://".len();
    }
    let Some(rest) = url.strip_prefix("data:image/") else { return false };
    let Some((media, data)) = rest.split_once(',') else { return false };
    media.ends_with(";base64") && is_base64(data)
}

/// The error of an image URL that is not [`image_url_ok`].
pub(crate) fn invalid_image_url(param: String) -> Invalid {
    Invalid::new(param, "Invalid image URL: expected an http(s) URL or a base64 data URI of an image.")
        .code("invalid_image_url")
}

/// An `input_audio` part: base64 `data` in a `format` OpenAI takes.
pub(crate) fn audio_ok(data: &str, format: &str) -> bool {
    matches!(format, "wav" | "mp3") && is_base64(data)
}
