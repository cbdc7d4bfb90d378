//! The OpenAI chat format at the edge. Parsing and the reply's JSON and chunks are the wire
//! crate's (`meshgate_wire::openai::ingress`); here are the limits a project puts on a request,
//! the mapping of the wire crate's errors to the edge's, and the request and reply shapes the
//! OpenAPI document describes (schemas only: what the wire crate reads and writes).

use meshgate_runtime::{ApiError, ErrorCode};
use meshgate_wire::{ChatRequest, WireError};
use serde::Serialize;
use utoipa::ToSchema;

pub use schema::{ChatChunk, ChatCompletion, ChatCompletionRequest};

/// Limits applied to a chat request (the gateway's ceilings, lowered by its project's).
#[derive(Debug, Clone, Copy)]
pub struct ChatLimits {
    pub max_messages: usize,
    pub max_tokens_cap: i64,
}

/// Longest model id accepted (trace and quota records bound their fields too).
pub const MAX_MODEL_ID_BYTES: usize = 256;

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

/// A request the wire crate refused: 400 naming the field.
pub fn wire_error(err: WireError) -> ApiError {
    invalid(err.to_string())
}

/// Parses an OpenAI chat completions body (checked field by field, every field named).
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    meshgate_wire::openai::ingress::parse_chat(body).map_err(wire_error)
}

/// Maps a serde_json error to a 400 that says what was wrong and where.
pub fn json_error(err: serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => invalid(format!("malformed JSON body: {err}")),
        Category::Data => invalid(format!("invalid request body: {err}")),
    }
}

/// The project's limits on a checked request: the model id's length, the message count and the
/// completion length.
pub fn check_limits(chat: &ChatRequest, limits: ChatLimits) -> Result<(), ApiError> {
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
    if let Some(max) = chat.sampling.max_tokens
        && !(1..=limits.max_tokens_cap).contains(&max)
    {
        return Err(invalid(format!("`max_completion_tokens` must be between 1 and {}", limits.max_tokens_cap)));
    }
    // The mesh's chunks carry one choice: more would be answered as one.
    if chat.options.n.is_some_and(|n| n != 1) {
        return Err(invalid("`n` must be 1: one choice per request is supported"));
    }
    Ok(())
}

/// The request and reply as the OpenAPI document describes them: read by utoipa's derives, never
/// built (the wire crate reads and writes the JSON).
#[allow(dead_code)]
pub mod schema {
    use serde::{Deserialize, Serialize};
    use utoipa::ToSchema;

    /// `POST /v1/chat/completions` body: the OpenAI Chat Completions request. Parameters meshgate
    /// does not model are kept and forwarded as the provider's `unknown_params` setting says.
    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    #[schema(example = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_completion_tokens": 16}))]
    pub struct ChatCompletionRequest {
        /// A model id from `GET /v1/models`.
        #[schema(min_length = 1, max_length = 256)]
        model: String,
        #[schema(min_items = 1)]
        messages: Vec<RequestMessage>,
        /// Answer with server-sent events (`text/event-stream`) instead of one JSON object.
        stream: Option<bool>,
        stream_options: Option<StreamOptions>,
        /// At most `[gateway] max_tokens_cap` (or the project's `max_tokens` limit).
        #[schema(minimum = 1)]
        max_completion_tokens: Option<i64>,
        /// The older name of `max_completion_tokens`.
        #[schema(minimum = 1)]
        max_tokens: Option<i64>,
        #[schema(minimum = 0, maximum = 2)]
        temperature: Option<f32>,
        #[schema(exclusive_minimum = 0, maximum = 1)]
        top_p: Option<f32>,
        seed: Option<i64>,
        stop: Option<Stop>,
        #[schema(minimum = 1, maximum = 128)]
        n: Option<i32>,
        #[schema(minimum = -2, maximum = 2)]
        frequency_penalty: Option<f32>,
        #[schema(minimum = -2, maximum = 2)]
        presence_penalty: Option<f32>,
        /// Token id → bias (−100 to 100).
        logit_bias: Option<std::collections::HashMap<String, f32>>,
        logprobs: Option<bool>,
        #[schema(minimum = 0, maximum = 20)]
        top_logprobs: Option<i32>,
        /// Tools the model may call.
        tools: Option<Vec<ToolSpec>>,
        tool_choice: Option<ToolChoice>,
        parallel_tool_calls: Option<bool>,
        response_format: Option<ResponseFormat>,
        /// `none`, `minimal`, `low`, `medium`, `high` or `xhigh`.
        reasoning_effort: Option<String>,
        /// The end user, for the provider's abuse monitoring.
        user: Option<String>,
        metadata: Option<std::collections::HashMap<String, String>>,
        service_tier: Option<String>,
    }

    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct StreamOptions {
        include_usage: Option<bool>,
    }

    /// `stop` is a string or a list of up to four strings.
    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    #[serde(untagged)]
    pub enum Stop {
        One(String),
        Many(Vec<String>),
    }

    /// One entry of `tools`.
    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct ToolSpec {
        /// Always `function`.
        #[serde(rename = "type")]
        kind: String,
        function: FunctionSpec,
    }

    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct FunctionSpec {
        #[schema(min_length = 1, max_length = 256)]
        name: String,
        description: Option<String>,
        /// The arguments' JSON schema (an object).
        #[schema(value_type = Option<Object>)]
        parameters: Option<serde_json::Value>,
        strict: Option<bool>,
    }

    /// `none`, `auto`, `required`, or `{"type": "function", "function": {"name": ...}}`.
    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    #[serde(untagged)]
    pub enum ToolChoice {
        Mode(String),
        #[schema(value_type = Object)]
        Function(serde_json::Value),
    }

    /// `{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema": {name, schema, strict}}`.
    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct ResponseFormat {
        #[serde(rename = "type")]
        kind: String,
        #[schema(value_type = Option<Object>)]
        json_schema: Option<serde_json::Value>,
    }

    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct RequestMessage {
        /// `developer` is sent on as `system`.
        #[schema(value_type = MessageRole)]
        role: String,
        /// A string, or content parts (`text`, `image_url`, `input_audio`, `file`).
        content: Option<Content>,
        name: Option<String>,
        /// For role `tool`: the call this message answers.
        tool_call_id: Option<String>,
        /// For role `assistant`: the tool calls it made.
        tool_calls: Option<Vec<ToolCallJson>>,
        refusal: Option<String>,
    }

    /// The roles a message may have.
    #[derive(ToSchema)]
    #[schema(rename_all = "snake_case")]
    pub enum MessageRole {
        System,
        Developer,
        User,
        Assistant,
        Tool,
    }

    /// Message content: a string or a list of typed parts.
    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    #[serde(untagged)]
    pub enum Content {
        Text(String),
        Parts(Vec<ContentPart>),
    }

    /// `{"type": "text", "text"}`, `{"type": "image_url", "image_url": {"url", "detail"}}` (an http(s)
    /// URL or a `data:` URI), `{"type": "input_audio", "input_audio": {"data", "format"}}` or
    /// `{"type": "file", "file": {"file_id" | "file_data", "filename"}}`.
    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct ContentPart {
        #[serde(rename = "type")]
        kind: String,
        text: Option<String>,
        #[schema(value_type = Option<Object>)]
        image_url: Option<serde_json::Value>,
        #[schema(value_type = Option<Object>)]
        input_audio: Option<serde_json::Value>,
        #[schema(value_type = Option<Object>)]
        file: Option<serde_json::Value>,
    }

    /// One tool call: `{"id", "type": "function", "function": {"name", "arguments"}}`.
    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct ToolCallJson {
        id: String,
        #[serde(rename = "type")]
        kind: String,
        function: FunctionCall,
    }

    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct FunctionCall {
        name: String,
        /// The arguments as a JSON text.
        arguments: String,
    }

    /// `usage`, with the provider's cache and reasoning details.
    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    #[schema(as = Usage)]
    pub struct WireUsage {
        prompt_tokens: i64,
        completion_tokens: i64,
        total_tokens: i64,
        prompt_tokens_details: PromptTokensDetails,
        completion_tokens_details: CompletionTokensDetails,
    }

    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct PromptTokensDetails {
        /// Prompt tokens read from the provider's cache.
        cached_tokens: i64,
    }

    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct CompletionTokensDetails {
        /// Completion tokens spent reasoning.
        reasoning_tokens: i64,
    }

    /// The `chat.completion` object.
    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct ChatCompletion {
        id: String,
        object: String,
        created: i64,
        /// The model that served the request.
        model: String,
        #[schema(min_items = 1, max_items = 1)]
        choices: Vec<Choice>,
        usage: WireUsage,
    }

    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct Choice {
        index: u32,
        message: AssistantMessage,
        /// `stop`, `length`, `tool_calls` or `content_filter`.
        finish_reason: String,
        /// The tokens' logprobs when asked for, else null.
        #[schema(value_type = Option<Object>)]
        logprobs: Option<serde_json::Value>,
    }

    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct AssistantMessage {
        role: String,
        /// Null when the model only called tools or refused.
        content: Option<String>,
        refusal: Option<String>,
        tool_calls: Option<Vec<ToolCallJson>>,
        /// The model's reasoning text, when the provider returns it.
        reasoning_content: Option<String>,
    }

    /// One `chat.completion.chunk` event of a streamed reply.
    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct ChatChunk {
        id: String,
        object: String,
        created: i64,
        model: String,
        choices: Vec<ChunkChoice>,
        /// Present (as null) on every chunk when the client asked for usage, set on the last one.
        usage: Option<WireUsage>,
    }

    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct ChunkChoice {
        index: u32,
        delta: Delta,
        finish_reason: Option<String>,
        #[schema(value_type = Option<Object>)]
        logprobs: Option<serde_json::Value>,
    }

    #[derive(Debug, Deserialize, Serialize, ToSchema)]
    pub struct Delta {
        role: Option<String>,
        content: Option<String>,
        refusal: Option<String>,
        reasoning_content: Option<String>,
        /// Tool calls as they stream: `index`, and on a call's first chunk its `id`, `type` and
        /// `function.name`; `function.arguments` chunks to append.
        #[schema(value_type = Option<Vec<Object>>)]
        tool_calls: Option<Vec<serde_json::Value>>,
    }
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

    fn parse(json: &str) -> Result<ChatRequest, ApiError> {
        let chat = parse_chat(json.as_bytes())?;
        check_limits(&chat, LIMITS)?;
        Ok(chat)
    }

    #[test]
    fn the_projects_limits_bind_a_parsed_request() {
        let ok = parse(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":5}"#);
        assert_eq!(ok.unwrap().sampling.max_tokens, Some(5));
        let many = format!(r#"{{"model":"m","messages":[{}]}}"#, [r#"{"role":"user","content":"x"}"#; 9].join(","));
        assert!(parse(&many).unwrap_err().message.contains("at most 8"));
        let long = r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":1001}"#;
        assert!(parse(long).unwrap_err().message.contains("max_completion_tokens"));
        let model = serde_json::json!({"model": "m".repeat(MAX_MODEL_ID_BYTES + 1), "messages": [{"role": "user", "content": "x"}]});
        assert!(parse(&model.to_string()).unwrap_err().message.contains("`model` must be at most"));
        let choices = r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#;
        assert!(parse(choices).unwrap_err().message.contains("`n` must be 1"));
    }

    #[test]
    fn wire_errors_are_400s_naming_the_field() {
        let cases = [
            ("{", "JSON"),
            (r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#, "messages[0].role"),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"ftp://x/y.png"}}]}]}"#,
                "messages[0].content[0].image_url.url",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f","parameters":"nope"}}]}"#,
                "tools[0].function.parameters",
            ),
            (
                r#"{"model":"m","messages":[{"role":"tool","tool_call_id":"c9","content":"x"}]}"#,
                "messages[0].tool_call_id",
            ),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#, "temperature"),
        ];
        for (body, needle) in cases {
            let err = parse(body).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidRequest, "{body}");
            assert!(err.message.contains(needle), "{body}: {}", err.message);
        }
    }
}
