//! Prompt token counts for quota reservations: exact for OpenAI models, whose BPE vocabularies
//! ship inside the `tiktoken-rs` crate (nothing is downloaded), estimated for every other model.
//! Providers report exact usage afterwards and commits charge that; the count only sizes the hold.

use meshgate_proto::common::v1::ChatMessage;
use meshgate_proto::common::v1::content_part::Part;
use meshgate_wire::ChatRequest;
use tiktoken_rs::CoreBPE;
use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};

/// Tokens the OpenAI chat format adds per message (`<|start|>{role}\n … <|end|>\n`), per name,
/// and once to prime the reply, as OpenAI documents for counting chat prompts.
const PER_MESSAGE: i64 = 3;
const PER_NAME: i64 = 1;
const REPLY_PRIMING: i64 = 3;

/// The vocabulary of `model`, when it is an OpenAI model the crate knows.
fn vocabulary(model: &str) -> Option<&'static CoreBPE> {
    Some(match get_tokenizer(model)? {
        Tokenizer::O200kHarmony => tiktoken_rs::o200k_harmony_singleton(),
        Tokenizer::O200kBase => tiktoken_rs::o200k_base_singleton(),
        Tokenizer::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        Tokenizer::P50kBase => tiktoken_rs::p50k_base_singleton(),
        Tokenizer::P50kEdit => tiktoken_rs::p50k_edit_singleton(),
        Tokenizer::R50kBase | Tokenizer::Gpt2 => tiktoken_rs::r50k_base_singleton(),
    })
}

/// Loads the vocabularies of current OpenAI models (a few hundred milliseconds of CPU), so the
/// first request naming one does not pay for it.
pub fn warm_up() {
    tiktoken_rs::o200k_base_singleton();
    tiktoken_rs::cl100k_base_singleton();
}

/// Tokens an image, an audio clip or a file part is reserved for: more than OpenAI charges for a
/// high-detail 1024 × 1024 image (765), since a reservation must not fall short; the commit
/// charges what the provider reports.
pub const PER_MEDIA_PART: i64 = 1_000;

/// Prompt tokens of `chat`: its messages' texts (content, text parts, names, replayed tool calls
/// and refusals), its tool definitions and response schema, and [`PER_MEDIA_PART`] per image,
/// audio or file part; counted with the model's tokenizer when it is known, else estimated from
/// the length (about four characters per token).
pub fn prompt_tokens(chat: &ChatRequest) -> i64 {
    let vocabulary = vocabulary(&chat.model);
    let count = |text: &str| match vocabulary {
        _ if text.is_empty() => 0,
        Some(bpe) => bpe.encode_ordinary(text).len() as i64,
        None => (text.chars().count() as u64).div_ceil(4) as i64,
    };
    let messages: i64 = chat.messages.iter().map(|m| PER_MESSAGE + message_tokens(m, &count)).sum();
    let tools: i64 =
        chat.options.tools.iter().map(|t| count(&t.name) + count(&t.description) + count(&t.parameters_json)).sum();
    let schema = chat.options.response_format.as_ref().map_or(0, |f| count(&f.schema_json));
    messages + tools + schema + REPLY_PRIMING
}

fn message_tokens(message: &ChatMessage, count: &impl Fn(&str) -> i64) -> i64 {
    let parts: i64 = message
        .parts
        .iter()
        .map(|part| match &part.part {
            Some(Part::Text(text)) => count(text),
            Some(Part::ImageUrl(_) | Part::InputAudio(_) | Part::File(_)) => PER_MEDIA_PART,
            None => 0,
        })
        .sum();
    let calls: i64 = message.tool_calls.iter().map(|c| count(&c.function_name) + count(&c.arguments_json)).sum();
    count(&message.role)
        + count(&message.content)
        + parts
        + calls
        + count(&message.refusal)
        + if message.name.is_empty() { 0 } else { PER_NAME + count(&message.name) }
}

#[cfg(test)]
mod tests {
    use meshgate_proto::common::v1::{ContentPart, ImageUrl, ToolDefinition};

    use super::*;

    fn chat(model: &str, messages: Vec<ChatMessage>) -> ChatRequest {
        ChatRequest { model: model.into(), messages, ..Default::default() }
    }

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), ..Default::default() }
    }

    #[test]
    fn openai_models_are_counted_with_their_vocabulary() {
        // "Hello world" is two tokens in cl100k_base: 3 + 1 (role) + 2 per message, 3 to prime.
        let hello = || vec![message("user", "Hello world")];
        assert_eq!(prompt_tokens(&chat("gpt-4", hello())), 3 + 1 + 2 + 3);
        assert_eq!(prompt_tokens(&chat("gpt-3.5-turbo-0125", hello())), 9);
        let named = vec![ChatMessage { name: "bob".into(), ..message("user", "Hello world") }];
        assert_eq!(prompt_tokens(&chat("gpt-4", named)), 9 + 1 + 1);
    }

    #[test]
    fn other_models_are_estimated_from_the_length() {
        let long = chat("claude-3-5-sonnet", vec![message("user", &"x".repeat(400))]);
        assert_eq!(prompt_tokens(&long), 3 + 1 + 100 + 3);
    }

    #[test]
    fn parts_images_tools_and_schemas_all_count() {
        let text = chat("gpt-4", vec![message("user", "Hello world")]);
        let mut rich = text.clone();
        rich.messages[0].parts = vec![
            ContentPart { part: Some(Part::Text("Hello world".into())) },
            ContentPart {
                part: Some(Part::ImageUrl(ImageUrl { url: "https://x/y.png".into(), detail: String::new() })),
            },
        ];
        assert_eq!(prompt_tokens(&rich), prompt_tokens(&text) + 2 + PER_MEDIA_PART);
        let mut tooled = text.clone();
        tooled.options.tools = vec![ToolDefinition {
            name: "lookup".into(),
            parameters_json: r#"{"type":"object"}"#.into(),
            ..Default::default()
        }];
        assert!(prompt_tokens(&tooled) > prompt_tokens(&text) + 3);
    }
}
