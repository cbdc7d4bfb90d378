//! The OpenAI wire format of the edge: request parsing with validation that names the offending
//! field, and the response and stream-chunk shapes the official SDKs expect.

use meshgate_proto::common::v1::{ChatMessage, SamplingParams, Usage};
use meshgate_runtime::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Limits applied while validating a chat request.
#[derive(Debug, Clone, Copy)]
pub struct ChatLimits {
    pub max_messages: usize,
    pub max_tokens_cap: i64,
}

/// `POST /v1/chat/completions` body. Fields the gateway does not act on yet (tools,
/// response_format, penalties, ...) are accepted and ignored, as OpenAI-compatible servers do.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}))]
pub struct ChatCompletionRequest {
    /// A model id from `GET /v1/models`.
    #[schema(min_length = 1, max_length = 256)]
    pub model: String,
    #[schema(min_items = 1)]
    pub messages: Vec<RequestMessage>,
    /// Answer with server-sent events (`text/event-stream`) instead of one JSON object.
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// At most `[gateway] max_tokens_cap` (or the project's `max_tokens` limit); larger is a 400.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    /// The newer name of `max_tokens`; it wins when both are set.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    #[serde(default)]
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Only 1 is supported.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u32>,
    /// Tools offered to the model; only their names are used (recorded in the trace).
    #[serde(default)]
    pub tools: Option<Vec<ToolSpec>>,
}

/// One entry of `tools`: `{"type": "function", "function": {"name": ...}}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ToolSpec {
    #[serde(default)]
    pub function: Option<FunctionSpec>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct FunctionSpec {
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `stop` is a string or a list of up to four strings.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RequestMessage {
    /// `developer` is sent on as `system`.
    #[schema(value_type = MessageRole)]
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// The roles a message may have.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // a schema only: roles are read as strings so that a bad one gets a clear 400
pub enum MessageRole {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

/// Message content: a string or a list of typed parts.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ContentPart {
    /// Only `text` parts are supported; others are a 400.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// A validated chat request in the mesh's terms.
#[derive(Debug, Clone)]
pub struct ValidChat {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub sampling: SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    /// Names of the tools the request offered.
    pub tools: Vec<String>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

/// Parses and validates a chat request body.
pub fn parse_chat(body: &[u8], limits: ChatLimits) -> Result<ValidChat, ApiError> {
    let request: ChatCompletionRequest = serde_json::from_slice(body).map_err(json_error)?;
    validate_chat(request, limits)
}

/// Maps a serde_json error to a 400 that says what was wrong and where.
pub fn json_error(err: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => invalid(format!("malformed JSON body: {err}")),
        Category::Data => invalid(format!("invalid request body: {err}")),
    }
}

pub fn validate_chat(request: ChatCompletionRequest, limits: ChatLimits) -> Result<ValidChat, ApiError> {
    if let Some(n) = request.n
        && n != 1
    {
        return Err(invalid("`n` must be 1: one choice per request is supported"));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (index, message) in request.messages.into_iter().enumerate() {
        let content = match message.content {
            None => String::new(),
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (part_index, part) in parts.into_iter().enumerate() {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(part_text)) => text.push_str(&part_text),
                        (kind, _) => {
                            return Err(invalid(format!(
                                "`messages[{index}].content[{part_index}]` has type {kind:?}; only text parts are supported"
                            )));
                        }
                    }
                }
                text
            }
        };
        messages.push(ChatMessage {
            role: message.role,
            content,
            name: message.name.unwrap_or_default(),
            tool_call_id: message.tool_call_id.unwrap_or_default(),
            ..ChatMessage::default()
        });
    }
    let stop = match request.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(list)) => list,
    };
    let mut chat = ValidChat {
        model: request.model.trim().to_owned(),
        messages,
        sampling: SamplingParams {
            max_tokens: request.max_completion_tokens.or(request.max_tokens),
            temperature: request.temperature,
            top_p: request.top_p,
            top_k: None,
            seed: request.seed,
            stop,
        },
        stream: request.stream.unwrap_or(false),
        include_usage: request.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        tools: request.tools.unwrap_or_default().into_iter().filter_map(|t| t.function.map(|f| f.name)).collect(),
    };
    check_chat(&mut chat, limits)?;
    Ok(chat)
}

/// Longest model id accepted (trace and quota records bound their fields too).
pub const MAX_MODEL_ID_BYTES: usize = 256;

/// Checks a chat request however it arrived (HTTP/JSON or gRPC), normalising what has two
/// spellings (`developer` is the newer name of `system`, which every provider knows).
pub fn check_chat(chat: &mut ValidChat, limits: ChatLimits) -> Result<(), ApiError> {
    if chat.model.is_empty() {
        return Err(invalid("`model` must not be empty"));
    }
    if chat.model.len() > MAX_MODEL_ID_BYTES || chat.model.chars().any(char::is_control) {
        return Err(invalid(format!("`model` must be at most {MAX_MODEL_ID_BYTES} bytes without control characters")));
    }
    if chat.messages.is_empty() {
        return Err(invalid("`messages` must contain at least one message"));
    }
    if chat.messages.len() > limits.max_messages {
        return Err(invalid(format!(
            "`messages` has {} entries; at most {} are allowed",
            chat.messages.len(),
            limits.max_messages
        )));
    }
    for (index, message) in chat.messages.iter_mut().enumerate() {
        if message.role == "developer" {
            message.role = "system".into();
        }
        if !matches!(message.role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(invalid(format!(
                "`messages[{index}].role` is {:?}; expected system, developer, user, assistant or tool",
                message.role
            )));
        }
        check_message_fields(index, message)?;
    }
    for (index, tool) in chat.tools.iter().enumerate() {
        check_identifier(&format!("tools[{index}].function.name"), tool, false)?;
    }
    let sampling = &chat.sampling;
    if let Some(max) = sampling.max_tokens
        && !(1..=limits.max_tokens_cap).contains(&max)
    {
        return Err(invalid(format!("`max_tokens` must be between 1 and {}", limits.max_tokens_cap)));
    }
    if let Some(t) = sampling.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(invalid("`temperature` must be between 0 and 2"));
    }
    if let Some(p) = sampling.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(invalid("`top_p` must be in (0, 1]"));
    }
    if let Some(k) = sampling.top_k
        && k < 0
    {
        return Err(invalid("`top_k` must not be negative"));
    }
    if sampling.stop.len() > 4 || sampling.stop.iter().any(String::is_empty) {
        return Err(invalid("`stop` takes at most 4 non-empty strings"));
    }
    if sampling.stop.iter().any(|s| s.contains('\0')) {
        return Err(invalid("`stop` must not contain NUL characters"));
    }
    Ok(())
}

/// Longest name, tool name or call id accepted.
pub const MAX_IDENTIFIER_BYTES: usize = 256;

/// Names and ids are recorded in traces and sent to providers as they are: no control characters
/// (a NUL would make Postgres refuse the whole trace batch it lands in), and bounded. Free text
/// (content, tool arguments) may hold newlines and tabs, but no NUL.
fn check_message_fields(index: usize, message: &ChatMessage) -> Result<(), ApiError> {
    let field = |name: &str| format!("messages[{index}].{name}");
    check_identifier(&field("name"), &message.name, true)?;
    check_identifier(&field("tool_call_id"), &message.tool_call_id, true)?;
    if message.content.contains('\0') {
        return Err(invalid(format!("`{}` must not contain NUL characters", field("content"))));
    }
    for (call_index, call) in message.tool_calls.iter().enumerate() {
        let call_field = |name: &str| field(&format!("tool_calls[{call_index}].{name}"));
        check_identifier(&call_field("id"), &call.id, true)?;
        check_identifier(&call_field("type"), &call.r#type, true)?;
        check_identifier(&call_field("function.name"), &call.function_name, false)?;
        if call.arguments_json.contains('\0') {
            return Err(invalid(format!("`{}` must not contain NUL characters", call_field("function.arguments"))));
        }
    }
    Ok(())
}

fn check_identifier(field: &str, value: &str, may_be_empty: bool) -> Result<(), ApiError> {
    if value.is_empty() && !may_be_empty {
        return Err(invalid(format!("`{field}` must not be empty")));
    }
    if value.len() > MAX_IDENTIFIER_BYTES || value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "`{field}` must be at most {MAX_IDENTIFIER_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// `usage` object of responses and the last stream chunk.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[schema(as = Usage)]
pub struct WireUsage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
}

impl From<&Usage> for WireUsage {
    fn from(usage: &Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens + usage.completion_tokens,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: i64,
    pub model: &'a str,
    #[schema(value_type = Vec<Choice<'static>>, min_items = 1, max_items = 1)]
    pub choices: [Choice<'a>; 1],
    pub usage: WireUsage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Choice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub finish_reason: &'a str,
    /// Always null.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<()>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AssistantMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: i64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice<'a>>,
    /// Present (as null) on every chunk when the client asked for usage, set on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<WireUsage>)]
    pub usage: Option<Option<WireUsage>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub finish_reason: Option<&'a str>,
    /// Always null.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<()>,
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelEntry>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelEntry {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: String,
    /// What the model does here: `chat`, `embeddings`, `classification` (a meshgate extension
    /// the OpenAI SDKs ignore).
    pub tasks: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ChatLimits = ChatLimits { max_messages: 8, max_tokens_cap: 1000 };

    fn parse(json: &str) -> Result<ValidChat, ApiError> {
        parse_chat(json.as_bytes(), LIMITS)
    }

    #[test]
    fn accepts_the_sdk_shapes() {
        let chat = parse(
            r#"{"model":" m ","messages":[{"role":"developer","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}]}],
                "stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":5,
                "stop":"END","temperature":0.5,"seed":7,"tools":[],"user":"u"}"#,
        )
        .unwrap();
        assert_eq!(chat.model, "m");
        assert_eq!(chat.messages[0].role, "system");
        assert_eq!(chat.messages[1].content, "hi there");
        assert!(chat.stream && chat.include_usage);
        assert_eq!(chat.sampling.max_tokens, Some(5));
        assert_eq!(chat.sampling.stop, ["END"]);
        assert_eq!(chat.sampling.seed, Some(7));
    }

    #[test]
    fn rejects_bad_input_with_a_message_naming_the_field() {
        let cases = [
            ("{", "malformed JSON"),
            (r#"{"messages":[]}"#, "missing field `model`"),
            (r#"{"model":"m","messages":"hi"}"#, "invalid request body"),
            (r#"{"model":"","messages":[{"role":"user","content":"x"}]}"#, "`model`"),
            (r#"{"model":"m","messages":[]}"#, "`messages`"),
            (r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#, "messages[0].role"),
            (r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#, "content[0]"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#, "max_tokens"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":1001}"#, "max_tokens"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":"many"}"#, "invalid request body"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#, "temperature"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_p":0}"#, "top_p"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#, "`n`"),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#, "stop"),
        ];
        for (body, needle) in cases {
            let err = parse(body).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidRequest, "{body}");
            assert!(err.message.contains(needle), "{body}: {}", err.message);
        }
        for model in ["m\u{7}x".to_owned(), "m".repeat(MAX_MODEL_ID_BYTES + 1)] {
            let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "x"}]}).to_string();
            assert!(parse(&body).unwrap_err().message.contains("`model` must be at most"), "{model:?}");
        }
        let many = format!(r#"{{"model":"m","messages":[{}]}}"#, [r#"{"role":"user","content":"x"}"#; 9].join(","));
        assert!(parse(&many).unwrap_err().message.contains("at most 8"));
    }

    #[test]
    fn control_characters_in_names_and_nul_in_text_are_refused() {
        let user = |extra: serde_json::Value| {
            let mut message = serde_json::json!({"role": "user", "content": "x"});
            message.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            serde_json::json!({"model": "m", "messages": [message]}).to_string()
        };
        let cases = [
            (user(serde_json::json!({"name": "a\u{0}b"})), "messages[0].name"),
            (user(serde_json::json!({"tool_call_id": "c\u{1b}"})), "messages[0].tool_call_id"),
            (user(serde_json::json!({"content": "hi\u{0}"})), "messages[0].content"),
            (user(serde_json::json!({"name": "n".repeat(MAX_IDENTIFIER_BYTES + 1)})), "messages[0].name"),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                    "tools": [{"type": "function", "function": {"name": "get\u{0}weather"}}]})
                .to_string(),
                "tools[0].function.name",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                    "tools": [{"type": "function", "function": {"name": ""}}]})
                .to_string(),
                "tools[0].function.name",
            ),
        ];
        for (body, needle) in cases {
            let err = parse(&body).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidRequest, "{body}");
            assert!(err.message.contains(needle), "{body}: {}", err.message);
        }
        // What gRPC clients send directly: tool calls replayed in an assistant message.
        let mut chat = parse(&user(serde_json::json!({"content": "multi\nline\ttext"}))).unwrap();
        chat.messages.push(ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![meshgate_proto::common::v1::ToolCall {
                id: "call_1".into(),
                r#type: "function".into(),
                function_name: "lookup\u{0}".into(),
                arguments_json: "{}".into(),
            }],
            ..Default::default()
        });
        let err = check_chat(&mut chat, LIMITS).unwrap_err();
        assert!(err.message.contains("messages[1].tool_calls[0].function.name"), "{}", err.message);
        chat.messages[1].tool_calls[0].function_name = "lookup".into();
        chat.messages[1].tool_calls[0].arguments_json = "{\"q\": \"\u{0}\"}".into();
        let err = check_chat(&mut chat, LIMITS).unwrap_err();
        assert!(err.message.contains("function.arguments"), "{}", err.message);
        chat.messages[1].tool_calls[0].arguments_json = "{\"q\": \"x\"}".into();
        check_chat(&mut chat, LIMITS).unwrap();
    }

    #[test]
    fn chunk_carries_null_usage_only_when_asked() {
        let chunk = ChatChunk {
            id: "c",
            object: "chat.completion.chunk",
            created: 1,
            model: "m",
            choices: vec![ChunkChoice {
                index: 0,
                delta: Delta { role: None, content: Some("hi") },
                finish_reason: None,
                logprobs: None,
            }],
            usage: Some(None),
        };
        let json = serde_json::to_value(&chunk).unwrap();
        assert!(json.get("usage").unwrap().is_null());
        let chunk = ChatChunk { usage: None, ..chunk };
        assert!(serde_json::to_value(&chunk).unwrap().get("usage").is_none());
    }
}
