//! The subset of the OpenAI wire format the mock reads and writes (its own code on purpose: a test
//! oracle does not share the code it tests).
//!
//! Requests are parsed leniently (unknown fields are ignored, as OpenAI-compatible servers do);
//! responses are serialised from borrowed structs so a reply costs a handful of allocations.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::reply::Piece;

#[derive(Deserialize)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub tools: Option<Vec<ToolDefinition>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub reasoning_effort: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Deserialize)]
pub(crate) struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub tool_calls: Option<Vec<AssistantToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// Message content: a string or a list of typed parts (only text parts carry text).
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub image_url: Option<ImageUrl>,
    #[serde(default)]
    pub input_audio: Option<InputAudio>,
    #[serde(default)]
    pub file: Option<FilePart>,
}

#[derive(Deserialize)]
pub(crate) struct ImageUrl {
    pub url: String,
}

#[derive(Deserialize)]
pub(crate) struct InputAudio {
    pub data: String,
    pub format: String,
}

#[derive(Deserialize)]
pub(crate) struct FilePart {
    #[serde(default)]
    pub file_id: Option<String>,
    #[serde(default)]
    pub file_data: Option<String>,
}

/// A tool call of an assistant message replayed in the conversation.
#[derive(Deserialize)]
pub(crate) struct AssistantToolCall {
    pub id: String,
    pub function: CalledFunction,
}

#[derive(Deserialize)]
pub(crate) struct CalledFunction {
    pub name: String,
}

impl ChatMessage {
    /// The message's text; parts are joined with a space.
    pub fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(Content::Text(text)) => text.clone(),
            Some(Content::Parts(parts)) => parts.iter().filter_map(|p| p.text.as_deref()).collect::<Vec<_>>().join(" "),
        }
    }

    /// Words of the message, without building its text.
    pub fn token_count(&self) -> u64 {
        match &self.content {
            None => 0,
            Some(Content::Text(text)) => crate::reply::count_tokens(text),
            Some(Content::Parts(parts)) => {
                parts.iter().filter_map(|p| p.text.as_deref()).map(crate::reply::count_tokens).sum()
            }
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct ToolDefinition {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub function: Option<FunctionDefinition>,
}

#[derive(Deserialize)]
pub(crate) struct FunctionDefinition {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<Value>,
}

#[derive(Deserialize)]
pub(crate) struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<usize>,
}

/// The four input shapes the embeddings endpoint accepts.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

/// `usage`; the details appear when there is something to detail (cached or reasoning tokens).
#[derive(Serialize, Clone, Copy)]
pub(crate) struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

#[derive(Serialize, Clone, Copy)]
pub(crate) struct PromptTokensDetails {
    pub cached_tokens: u64,
    pub audio_tokens: u64,
}

#[derive(Serialize, Clone, Copy)]
pub(crate) struct CompletionTokensDetails {
    pub reasoning_tokens: u64,
    pub audio_tokens: u64,
    pub accepted_prediction_tokens: u64,
    pub rejected_prediction_tokens: u64,
}

#[derive(Serialize)]
pub(crate) struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: &'static str,
    pub choices: [CompletionChoice<'a>; 1],
    pub usage: Usage,
}

#[derive(Serialize)]
pub(crate) struct CompletionChoice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: &'a str,
}

#[derive(Serialize)]
pub(crate) struct AssistantMessage<'a> {
    pub role: &'static str,
    pub content: Option<&'a str>,
    pub refusal: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut<'a>>>,
}

#[derive(Serialize)]
pub(crate) struct ToolCallOut<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut<'a>,
}

#[derive(Serialize)]
pub(crate) struct FunctionOut<'a> {
    pub name: &'a str,
    pub arguments: &'a str,
}

/// One `chat.completion.chunk`; `usage` is absent without `include_usage`, `null` on every
/// chunk but the last with it.
#[derive(Serialize)]
pub(crate) struct Chunk<'a, D: Serialize> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: &'static str,
    pub choices: &'a [ChunkChoice<'a, D>],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
pub(crate) struct ChunkChoice<'a, D: Serialize> {
    pub index: u32,
    pub delta: D,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'a str>,
}

/// First delta of a stream.
#[derive(Serialize)]
pub(crate) struct RoleDelta<'a> {
    pub role: &'static str,
    pub content: Option<&'static str>,
    pub refusal: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<[ToolCallStart<'a>; 1]>,
}

#[derive(Serialize)]
pub(crate) struct ToolCallStart<'a> {
    pub index: u32,
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut<'a>,
}

/// A delta of text (a [`Piece`]) or of JSON content (a `&str` fragment).
#[derive(Serialize)]
pub(crate) struct ContentDelta<T: Serialize> {
    pub content: T,
}

#[derive(Serialize)]
pub(crate) struct ReasoningDelta<'a> {
    pub reasoning_content: Piece<'a>,
}

/// The first delta of a tool call after the first one (the first rides on the role delta).
#[derive(Serialize)]
pub(crate) struct ToolStartDelta<'a> {
    pub tool_calls: [ToolCallStart<'a>; 1],
}

#[derive(Serialize)]
pub(crate) struct ToolArgumentsDelta<'a> {
    pub tool_calls: [ToolArguments<'a>; 1],
}

#[derive(Serialize)]
pub(crate) struct ToolArguments<'a> {
    pub index: u32,
    pub function: ArgumentsOnly<'a>,
}

#[derive(Serialize)]
pub(crate) struct ArgumentsOnly<'a> {
    pub arguments: &'a str,
}

/// The `{}` delta of the chunk carrying the finish reason.
#[derive(Serialize)]
pub(crate) struct EmptyDelta {}

#[derive(Serialize)]
pub(crate) struct ErrorBody<'a> {
    pub error: ErrorObject<'a>,
}

#[derive(Serialize)]
pub(crate) struct ErrorObject<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

#[derive(Serialize)]
pub(crate) struct EmbeddingList<'a, E: Serialize> {
    pub object: &'static str,
    pub data: Vec<EmbeddingItem<E>>,
    pub model: &'a str,
    pub usage: EmbeddingUsage,
}

#[derive(Serialize)]
pub(crate) struct EmbeddingItem<E: Serialize> {
    pub object: &'static str,
    pub index: usize,
    pub embedding: E,
}

#[derive(Serialize)]
pub(crate) struct EmbeddingUsage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Serialize)]
pub(crate) struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelObject<'a>>,
}

#[derive(Serialize)]
pub(crate) struct ModelObject<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

/// Serialises `value` as one SSE event: `data: <json>\n\n`.
pub(crate) fn sse_frame<T: Serialize>(value: &T) -> serde_json::Result<Bytes> {
    let mut buf = Vec::with_capacity(320);
    buf.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut buf, value)?;
    buf.extend_from_slice(b"\n\n");
    Ok(Bytes::from(buf))
}
