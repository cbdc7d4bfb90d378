//! Prompt token counts for quota reservations: exact for OpenAI models, whose BPE vocabularies
//! ship inside the `tiktoken-rs` crate (nothing is downloaded), estimated for every other model.
//! Providers report exact usage afterwards and commits charge that; the count only sizes the hold.

use meshgate_proto::common::v1::ChatMessage;
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

/// Prompt tokens of `messages` sent to `model`: counted with the model's tokenizer when it is
/// known, else [`estimate_prompt_tokens`].
pub fn prompt_tokens(model: &str, messages: &[ChatMessage]) -> i64 {
    let Some(bpe) = vocabulary(model) else {
        return estimate_prompt_tokens(messages);
    };
    let count = |text: &str| if text.is_empty() { 0 } else { bpe.encode_ordinary(text).len() as i64 };
    messages
        .iter()
        .map(|m| {
            PER_MESSAGE
                + count(&m.role)
                + count(&m.content)
                + if m.name.is_empty() { 0 } else { PER_NAME + count(&m.name) }
        })
        .sum::<i64>()
        + REPLY_PRIMING
}

/// Prompt tokens estimated without a tokenizer: about four characters per token plus a few
/// tokens of per-message framing (the OpenAI chat format spends 3–4). It over-counts code and
/// CJK text less than a fixed byte ratio would under-count it.
pub fn estimate_prompt_tokens(messages: &[ChatMessage]) -> i64 {
    let chars: usize = messages.iter().map(|m| m.content.chars().count() + m.role.len() + m.name.len()).sum();
    (chars as u64).div_ceil(4) as i64 + 4 * messages.len() as i64 + 3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), ..Default::default() }
    }

    #[test]
    fn openai_models_are_counted_with_their_vocabulary() {
        // "Hello world" is two tokens in cl100k_base: 3 + 1 (role) + 2 per message, 3 to prime.
        let messages = [message("user", "Hello world")];
        assert_eq!(prompt_tokens("gpt-4", &messages), 3 + 1 + 2 + 3);
        assert_eq!(prompt_tokens("gpt-3.5-turbo-0125", &messages), 9);
        let named = [ChatMessage { name: "bob".into(), ..message("user", "Hello world") }];
        assert_eq!(prompt_tokens("gpt-4", &named), 9 + 1 + 1);
    }

    #[test]
    fn other_models_fall_back_to_the_estimate() {
        let messages = [message("user", &"x".repeat(400))];
        assert_eq!(prompt_tokens("claude-3-5-sonnet", &messages), estimate_prompt_tokens(&messages));
        assert_eq!(estimate_prompt_tokens(&messages), 101 + 4 + 3);
        let two = [message("user", "abc"), message("assistant", "def")];
        assert!(estimate_prompt_tokens(&two) > estimate_prompt_tokens(&two[..1]));
    }
}
