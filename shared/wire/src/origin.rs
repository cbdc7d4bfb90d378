//! Where each canonical message came from in the client's own document. The canonical checks
//! ([`crate::ChatRequest::check`]) name fields as OpenAI chat spells them
//! (`messages[3].content[1].image_url.url`); a request that arrived in another format (the
//! Responses API's `input` items, Anthropic's content blocks) must be told about its own fields
//! (`input[5].content[1].image_url`, `messages[2].content[0].source`), so its parser records
//! the origin of every message, part and tool call it makes, and relocates the errors.

use crate::error::WireError;

/// How a format spells what the canonical checks name.
pub(crate) trait Spelling {
    /// A message-level field (`.role`, `.tool_call_id`, `.name`, ...), appended to the item.
    fn message_field(&self, field: &str) -> String;
    /// The rest of a part's path (`.text`, `.image_url.url`, `.file.file_id`, `.type`).
    fn part_field(&self, field: &str) -> String;
    /// The rest of a tool call's path (`.id`, `.function.name`, `.function.arguments`).
    fn call_field(&self, field: &str) -> String;
    /// A field outside the messages (`tools[0].function.name`, `max_tokens`, `messages`).
    fn option_field(&self, field: &str) -> String;
}

/// The origin of one canonical message.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct MessageOrigin {
    /// The item or message it came from (`input[3]`, `messages[1].content[0]`, `instructions`).
    pub item: String,
    /// Where its text content was (`input[3].content`, `input[4].output`, `system`).
    pub content: String,
    /// Where each of its parts was.
    pub parts: Vec<String>,
    /// Where each of its tool calls was.
    pub calls: Vec<String>,
}

impl MessageOrigin {
    /// A message whose content and parts all sit in the item's `content_field`.
    pub fn of(item: impl Into<String>, content_field: &str) -> Self {
        let item = item.into();
        let content = format!("{item}{content_field}");
        Self { item, content, parts: Vec::new(), calls: Vec::new() }
    }
}

/// The origins of a canonical request's messages, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Origins {
    pub messages: Vec<MessageOrigin>,
}

/// `[<index>]<rest>` split into the index and the rest.
fn index_and_rest(text: &str) -> Option<(usize, &str)> {
    let (index, rest) = text.split_once(']')?;
    Some((index.parse().ok()?, rest))
}

impl Origins {
    /// The error with its field moved to where the client wrote it.
    pub fn relocate(&self, err: WireError, spelling: &dyn Spelling) -> WireError {
        match err {
            WireError::Invalid { field, problem } => {
                WireError::Invalid { field: self.place(&field, spelling), problem }
            }
            WireError::Unsupported { field, problem } => {
                WireError::Unsupported { field: self.place(&field, spelling), problem }
            }
            other => other,
        }
    }

    fn place(&self, field: &str, spelling: &dyn Spelling) -> String {
        let Some((index, rest)) = field.strip_prefix("messages[").and_then(index_and_rest) else {
            return spelling.option_field(field);
        };
        let Some(origin) = self.messages.get(index) else { return field.to_owned() };
        if rest.is_empty() {
            return origin.item.clone();
        }
        if rest == ".content" {
            return origin.content.clone();
        }
        if let Some((part, sub)) = rest.strip_prefix(".content[").and_then(index_and_rest) {
            return match origin.parts.get(part) {
                Some(path) => format!("{path}{}", spelling.part_field(sub)),
                None => origin.content.clone(),
            };
        }
        if let Some((call, sub)) = rest.strip_prefix(".tool_calls[").and_then(index_and_rest) {
            return match origin.calls.get(call) {
                Some(path) => format!("{path}{}", spelling.call_field(sub)),
                None => origin.item.clone(),
            };
        }
        format!("{}{}", origin.item, spelling.message_field(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Renamed;
    impl Spelling for Renamed {
        fn message_field(&self, field: &str) -> String {
            field.replace("tool_call_id", "call_id")
        }
        fn part_field(&self, field: &str) -> String {
            field.replace("image_url.url", "image_url")
        }
        fn call_field(&self, field: &str) -> String {
            field.replace(".function", "")
        }
        fn option_field(&self, field: &str) -> String {
            if field == "max_tokens" { "max_output_tokens".into() } else { field.into() }
        }
    }

    #[test]
    fn errors_move_to_the_clients_fields() {
        let origins = Origins {
            messages: vec![
                MessageOrigin::of("instructions", ""),
                MessageOrigin {
                    item: "input[0]".into(),
                    content: "input[0].content".into(),
                    parts: vec!["input[0].content[0]".into(), "input[0].content[1]".into()],
                    calls: Vec::new(),
                },
                MessageOrigin {
                    item: "input[1]".into(),
                    content: "input[1].content".into(),
                    parts: Vec::new(),
                    calls: vec!["input[2]".into(), "input[3]".into()],
                },
                MessageOrigin::of("input[4]", ".output"),
            ],
        };
        let moved =
            |field: &str| origins.relocate(WireError::invalid(field, "bad"), &Renamed).field().unwrap().to_owned();
        assert_eq!(moved("messages[0].content"), "instructions");
        assert_eq!(moved("messages[1].content[1].image_url.url"), "input[0].content[1].image_url");
        assert_eq!(moved("messages[2].tool_calls[1].function.arguments"), "input[3].arguments");
        assert_eq!(moved("messages[3].tool_call_id"), "input[4].call_id");
        assert_eq!(moved("messages[3].content"), "input[4].output");
        assert_eq!(moved("messages[3]"), "input[4]");
        assert_eq!(moved("max_tokens"), "max_output_tokens");
        assert_eq!(moved("messages[9].role"), "messages[9].role");
        let protocol = origins.relocate(WireError::protocol("x"), &Renamed);
        assert_eq!(protocol, WireError::protocol("x"));
    }
}
