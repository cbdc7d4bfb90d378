//! What the router knows about one request before choosing: its kind, model, sizes, the
//! capabilities it needs, whether it streams, and (set by the classifier) its task.

use meshgate_catalog::Capability;
use meshgate_catalog::task::TaskGuess;
use meshgate_proto::common::v1::ChatMessage;
use meshgate_proto::common::v1::content_part::Part;
use meshgate_proto::router::v1::RouteRequest;

use crate::error::Error;

/// Tokens an image part is estimated at: what OpenAI charges for a 1024 × 1024 image in high
/// detail, a common size, and enough to keep a small-context model from getting it.
const IMAGE_TOKENS: i64 = 765;

/// Tokens of framing per message (role, separators), as OpenAI-style chat templates spend.
const MESSAGE_FRAMING_TOKENS: i64 = 4;

/// The features of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// "chat" or "embeddings".
    pub kind: &'static str,
    /// Model id asked for.
    pub model: String,
    pub project: String,
    /// The task of a chat request (`None` for embeddings).
    pub task: Option<TaskGuess>,
    pub prompt_tokens: i64,
    pub max_tokens: i64,
    pub stream: bool,
    /// What a target's model must do beyond text, each once.
    pub capabilities: Vec<Capability>,
}

impl Features {
    /// The validated features of `request` whose conversation is `messages`; the task is left
    /// for the caller to classify.
    pub fn from_request(request: &RouteRequest, messages: &[ChatMessage]) -> Result<Self, Error> {
        let model = request.model.trim();
        if model.is_empty() {
            return Err(Error::InvalidRequest("model must not be empty".into()));
        }
        let kind = match request.task.as_str() {
            "" | "chat" => "chat",
            "embeddings" => "embeddings",
            other => return Err(Error::InvalidRequest(format!("unknown task {other:?}; expected chat or embeddings"))),
        };
        if request.prompt_tokens < 0 || request.max_tokens < 0 {
            return Err(Error::InvalidRequest("prompt_tokens and max_tokens must not be negative".into()));
        }
        let mut capabilities = Vec::with_capacity(request.capabilities.len());
        for name in &request.capabilities {
            let capability = Capability::parse(name).ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "unknown capability {name:?}; expected tools, vision, audio, json_schema or reasoning"
                ))
            })?;
            if !capabilities.contains(&capability) {
                capabilities.push(capability);
            }
        }
        Ok(Self {
            kind,
            model: model.to_owned(),
            project: request.principal.as_ref().map(|p| p.project_id.clone()).unwrap_or_default(),
            task: None,
            prompt_tokens: if request.prompt_tokens == 0 { estimate_tokens(messages) } else { request.prompt_tokens },
            max_tokens: request.max_tokens,
            stream: request.stream,
            capabilities,
        })
    }

    /// Context a target must have: the prompt plus the longest answer allowed (embeddings
    /// answer no tokens).
    pub fn required_context(&self) -> i64 {
        if self.kind == "embeddings" { self.prompt_tokens } else { self.prompt_tokens.saturating_add(self.max_tokens) }
    }

    pub fn task_name(&self) -> &'static str {
        self.task.as_ref().map_or("embeddings", |t| t.task.as_str())
    }
}

/// Rough token count of a conversation when the caller did not count: four bytes a token of
/// everything the model reads as text (content, text parts, tool calls, refusals, reasoning),
/// [`IMAGE_TOKENS`] an image, and a few tokens of framing per message. Audio and files are not
/// estimated: the provider's own count decides (a `context_length_exceeded` answer moves the
/// request to the plan's next step).
pub fn estimate_tokens(messages: &[ChatMessage]) -> i64 {
    let text_tokens = |bytes: usize| (bytes as u64).div_ceil(4) as i64;
    messages
        .iter()
        .map(|m| {
            let calls: usize = m.tool_calls.iter().map(|c| c.function_name.len() + c.arguments_json.len()).sum();
            let parts: i64 = m
                .parts
                .iter()
                .map(|part| match &part.part {
                    Some(Part::Text(text)) => text_tokens(text.len()),
                    Some(Part::ImageUrl(_)) => IMAGE_TOKENS,
                    Some(Part::InputAudio(_) | Part::File(_)) | None => 0,
                })
                .sum();
            let text = m.content.len() + m.name.len() + m.refusal.len() + m.reasoning_content.len() + calls;
            text_tokens(text) + parts + MESSAGE_FRAMING_TOKENS
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use meshgate_proto::common::v1::{ContentPart, ImageUrl, InputAudio, ToolCall};

    use super::*;

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), ..Default::default() }
    }

    #[test]
    fn token_estimate_counts_text_parts_images_and_tool_calls() {
        assert_eq!(estimate_tokens(&[]), 0);
        assert_eq!(estimate_tokens(&[message("user", "abcdefgh")]), 6);
        let parts = ChatMessage {
            role: "user".into(),
            parts: vec![
                ContentPart { part: Some(Part::Text("abcd".into())) },
                ContentPart {
                    part: Some(Part::ImageUrl(ImageUrl { url: "https://x/y.png".into(), detail: "".into() })),
                },
                ContentPart {
                    part: Some(Part::InputAudio(InputAudio { data: "A".repeat(4000), format: "wav".into() })),
                },
            ],
            ..Default::default()
        };
        assert_eq!(estimate_tokens(std::slice::from_ref(&parts)), 1 + IMAGE_TOKENS + 4);
        let call = ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![ToolCall {
                function_name: "get".into(),
                arguments_json: "{\"city\":\"Oslo\"}".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(estimate_tokens(&[call]), 5 + 4, "3 + 15 bytes of call");
        assert_eq!(meshgate_catalog::task::message_text(&parts), "abcd");
    }

    #[test]
    fn requests_are_validated_and_capabilities_named() {
        let request = |capabilities: &[&str]| RouteRequest {
            model: " gpt ".into(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        let features = Features::from_request(&request(&["tools", "vision", "tools"]), &[]).unwrap();
        assert_eq!(features.model, "gpt");
        assert_eq!(features.capabilities, [Capability::Tools, Capability::Vision]);
        let err = Features::from_request(&request(&["telepathy"]), &[]).unwrap_err();
        assert!(matches!(&err, Error::InvalidRequest(m) if m.contains("unknown capability \"telepathy\"")), "{err}");
        let embeddings = RouteRequest { task: "embeddings".into(), prompt_tokens: 7, max_tokens: 50, ..request(&[]) };
        assert_eq!(Features::from_request(&embeddings, &[]).unwrap().required_context(), 7);
        let bad_task = RouteRequest { task: "dance".into(), ..request(&[]) };
        assert!(Features::from_request(&bad_task, &[]).is_err());
    }
}
