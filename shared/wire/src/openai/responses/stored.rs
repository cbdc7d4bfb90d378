//! The canonical types as they are kept between requests (JSON, through serde): messages, tool
//! definitions and usage of stored responses. Empty fields are left out of the JSON and default
//! when read back, so records stay small and readable by later versions.

use meshgate_proto::common::v1 as pb;
use meshgate_proto::common::v1::content_part::Part;
use serde::{Deserialize, Serialize};

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// A `ChatMessage`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub role: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub content: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub name: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub tool_call_id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<StoredToolCall>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<StoredPart>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub refusal: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub reasoning_content: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub is_error: bool,
}

/// A `ToolCall`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// A `ContentPart`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StoredPart {
    Text {
        text: String,
    },
    ImageUrl {
        url: String,
        #[serde(default, skip_serializing_if = "is_default")]
        detail: String,
    },
    InputAudio {
        data: String,
        format: String,
    },
    File {
        #[serde(default, skip_serializing_if = "is_default")]
        file_id: String,
        #[serde(default, skip_serializing_if = "is_default")]
        filename: String,
        #[serde(default, skip_serializing_if = "is_default")]
        file_data: String,
    },
}

/// A `ToolDefinition`: the schema as the client wrote it (JSON text).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredTool {
    pub name: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub description: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub parameters_json: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// A `Usage` (tokens; the cost is the ledger's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredUsage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    #[serde(default)]
    pub cached_prompt_tokens: i64,
    #[serde(default)]
    pub cache_write_tokens: i64,
    #[serde(default)]
    pub reasoning_tokens: i64,
}

impl From<&pb::ChatMessage> for StoredMessage {
    fn from(message: &pb::ChatMessage) -> Self {
        Self {
            role: message.role.clone(),
            content: message.content.clone(),
            name: message.name.clone(),
            tool_call_id: message.tool_call_id.clone(),
            tool_calls: message.tool_calls.iter().map(StoredToolCall::from).collect(),
            parts: message.parts.iter().filter_map(|p| p.part.as_ref()).map(StoredPart::from).collect(),
            refusal: message.refusal.clone(),
            reasoning_content: message.reasoning_content.clone(),
            is_error: message.is_error,
        }
    }
}

impl From<&StoredMessage> for pb::ChatMessage {
    fn from(message: &StoredMessage) -> Self {
        Self {
            role: message.role.clone(),
            content: message.content.clone(),
            name: message.name.clone(),
            tool_call_id: message.tool_call_id.clone(),
            tool_calls: message.tool_calls.iter().map(pb::ToolCall::from).collect(),
            parts: message.parts.iter().map(|p| pb::ContentPart { part: Some(Part::from(p)) }).collect(),
            refusal: message.refusal.clone(),
            reasoning_content: message.reasoning_content.clone(),
            is_error: message.is_error,
        }
    }
}

impl From<&pb::ToolCall> for StoredToolCall {
    fn from(call: &pb::ToolCall) -> Self {
        Self { id: call.id.clone(), name: call.function_name.clone(), arguments: call.arguments_json.clone() }
    }
}

impl From<&StoredToolCall> for pb::ToolCall {
    fn from(call: &StoredToolCall) -> Self {
        Self {
            id: call.id.clone(),
            r#type: "function".into(),
            function_name: call.name.clone(),
            arguments_json: call.arguments.clone(),
        }
    }
}

impl From<&Part> for StoredPart {
    fn from(part: &Part) -> Self {
        match part {
            Part::Text(text) => Self::Text { text: text.clone() },
            Part::ImageUrl(image) => Self::ImageUrl { url: image.url.clone(), detail: image.detail.clone() },
            Part::InputAudio(audio) => Self::InputAudio { data: audio.data.clone(), format: audio.format.clone() },
            Part::File(file) => Self::File {
                file_id: file.file_id.clone(),
                filename: file.filename.clone(),
                file_data: file.file_data.clone(),
            },
        }
    }
}

impl From<&StoredPart> for Part {
    fn from(part: &StoredPart) -> Self {
        match part {
            StoredPart::Text { text } => Part::Text(text.clone()),
            StoredPart::ImageUrl { url, detail } => {
                Part::ImageUrl(pb::ImageUrl { url: url.clone(), detail: detail.clone() })
            }
            StoredPart::InputAudio { data, format } => {
                Part::InputAudio(pb::InputAudio { data: data.clone(), format: format.clone() })
            }
            StoredPart::File { file_id, filename, file_data } => Part::File(pb::FileInput {
                file_id: file_id.clone(),
                filename: filename.clone(),
                file_data: file_data.clone(),
            }),
        }
    }
}

impl From<&pb::ToolDefinition> for StoredTool {
    fn from(tool: &pb::ToolDefinition) -> Self {
        Self {
            name: tool.name.clone(),
            description: tool.description.clone(),
            parameters_json: tool.parameters_json.clone(),
            strict: tool.strict,
        }
    }
}

impl From<&pb::Usage> for StoredUsage {
    fn from(usage: &pb::Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_prompt_tokens: usage.cached_prompt_tokens,
            cache_write_tokens: usage.cache_write_tokens,
            reasoning_tokens: usage.reasoning_tokens,
        }
    }
}

impl From<StoredUsage> for pb::Usage {
    fn from(usage: StoredUsage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
            cost_micros: 0,
            cached_prompt_tokens: usage.cached_prompt_tokens,
            cache_write_tokens: usage.cache_write_tokens,
            reasoning_tokens: usage.reasoning_tokens,
        }
    }
}
