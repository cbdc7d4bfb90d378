//! Deterministic reply content, token counts and embeddings.
//!
//! Everything the mock answers is a pure function of the request and the [`crate::Behavior`], so
//! tests can compute the exact text and usage they expect with the functions of this module.

use std::fmt;

use serde::{Serialize, Serializer};

/// First piece of every text reply.
pub const ECHO_PREFIX: &str = "echo:";

/// First piece of every reasoning text.
pub const REASONING_PREFIX: &str = "reasoning:";

/// At most this many words of the last user message are echoed back.
pub const MAX_ECHO_WORDS: usize = 32;

/// Prompt tokens charged per message on top of its words (role and framing).
pub const TOKENS_PER_MESSAGE: u64 = 3;

/// Prompt tokens charged once per request (reply priming).
pub const TOKENS_PER_REQUEST: u64 = 3;

/// Tokens of a text: one per whitespace-separated word.
pub fn count_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Prompt tokens of a conversation given the text content of each message:
/// [`TOKENS_PER_REQUEST`] plus, per message, [`TOKENS_PER_MESSAGE`] and one per word.
pub fn prompt_tokens<'a>(message_contents: impl IntoIterator<Item = &'a str>) -> u64 {
    message_contents.into_iter().map(|content| TOKENS_PER_MESSAGE + count_tokens(content)).sum::<u64>()
        + TOKENS_PER_REQUEST
}

/// How many completion pieces (tokens) a reply has and why it ends.
///
/// `natural` is the length of the echo (`1 +` echoed words); `stream_chunks` (when non-zero)
/// overrides it; `max_tokens` caps it, in which case the finish reason is `"length"`.
pub fn completion_plan(natural: usize, stream_chunks: u32, max_tokens: Option<u64>) -> (usize, &'static str) {
    let wanted = if stream_chunks == 0 { natural } else { stream_chunks as usize };
    match max_tokens {
        Some(max) if (max as usize) < wanted => (max as usize, "length"),
        _ => (wanted, "stop"),
    }
}

/// The exact text content the mock replies to a request whose last user message is
/// `last_user_message`, for the given [`crate::Behavior::stream_chunks`] and request `max_tokens`.
///
/// The reply cycles over `"echo:"` followed by the first [`MAX_ECHO_WORDS`] words of the message,
/// separated by single spaces: `"hello  big\nworld"` gives `"echo: hello big world"`.
pub fn reply_text(last_user_message: &str, stream_chunks: u32, max_tokens: Option<u64>) -> String {
    let echo = Echo::new(last_user_message.to_owned());
    let (count, _) = completion_plan(echo.len(), stream_chunks, max_tokens);
    echo.text(count)
}

/// Reasoning pieces (tokens) for an OpenAI `reasoning_effort`: `none` 0, `minimal` 2, `low` 4,
/// `medium` 8, `high` (and anything stronger) 16. Anthropic `thinking` reasons as `medium`.
pub fn reasoning_pieces(effort: &str) -> usize {
    match effort {
        "none" => 0,
        "minimal" => 2,
        "low" => 4,
        "medium" => 8,
        _ => 16,
    }
}

/// The reasoning text the mock produces for `effort` before answering a conversation whose echo
/// source (last user message, or the tool results it ends with) is `last_user_message`:
/// [`reasoning_pieces`] pieces cycling over `"reasoning:"` and the echoed words.
pub fn reasoning_text(last_user_message: &str, effort: &str) -> String {
    Echo::with_prefix(last_user_message.to_owned(), REASONING_PREFIX).text(reasoning_pieces(effort))
}

/// The content of a `json_object` reply: `{"reply": <the natural echo reply>}`.
pub fn json_object_text(last_user_message: &str) -> String {
    serde_json::json!({ "reply": reply_text(last_user_message, 0, None) }).to_string()
}

/// The pieces of an echo reply: a prefix (`"echo:"`) then the echoed words, cycled endlessly.
pub(crate) struct Echo {
    prefix: &'static str,
    text: String,
    /// Byte ranges of the echoed words inside `text`.
    words: Vec<(usize, usize)>,
}

impl Echo {
    pub(crate) fn new(text: String) -> Self {
        Self::with_prefix(text, ECHO_PREFIX)
    }

    pub(crate) fn with_prefix(text: String, prefix: &'static str) -> Self {
        let base = text.as_ptr() as usize;
        let words = text
            .split_whitespace()
            .take(MAX_ECHO_WORDS)
            .map(|word| {
                let start = word.as_ptr() as usize - base;
                (start, start + word.len())
            })
            .collect();
        Self { prefix, text, words }
    }

    /// The first `count` pieces as one string.
    pub(crate) fn text(&self, count: usize) -> String {
        use fmt::Write as _;
        let mut out = String::with_capacity(self.text.len().min(256) + 16);
        for i in 0..count {
            // Writing into a String cannot fail.
            let _ = write!(out, "{}", self.piece(i));
        }
        out
    }

    /// Pieces in one cycle (the natural reply length).
    pub(crate) fn len(&self) -> usize {
        1 + self.words.len()
    }

    /// Piece `i` of the endless cycle; every piece after the first starts with a space.
    pub(crate) fn piece(&self, i: usize) -> Piece<'_> {
        let k = i % self.len();
        let word = if k == 0 {
            self.prefix
        } else {
            let (start, end) = self.words[k - 1];
            &self.text[start..end]
        };
        Piece { space: i > 0, word }
    }
}

/// One reply piece, serialised as a JSON string without an intermediate allocation.
#[derive(Clone, Copy)]
pub(crate) struct Piece<'a> {
    space: bool,
    word: &'a str,
}

impl fmt::Display for Piece<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.space {
            f.write_str(" ")?;
        }
        f.write_str(self.word)
    }
}

impl Serialize for Piece<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Splits tool-call arguments into the fragments streamed one per chunk (4 characters each).
pub(crate) fn argument_fragments(arguments: &str) -> impl Iterator<Item = &str> {
    let mut rest = arguments;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = rest.char_indices().nth(4).map_or(rest.len(), |(i, _)| i);
        let (head, tail) = rest.split_at(cut);
        rest = tail;
        Some(head)
    })
}

/// A deterministic, L2-normalised embedding of `dims` dimensions: a signed hashing trick over
/// the words of `text`, so texts sharing words have a positive cosine similarity.
pub fn embed_text(text: &str, dims: usize) -> Vec<f32> {
    embed(text.split_whitespace().map(|w| fnv1a(w.as_bytes())), dims)
}

/// Like [`embed_text`] for an input given as token ids.
pub fn embed_tokens(tokens: &[i64], dims: usize) -> Vec<f32> {
    embed(tokens.iter().map(|t| fnv1a(&t.to_le_bytes())), dims)
}

fn embed(hashes: impl Iterator<Item = u64>, dims: usize) -> Vec<f32> {
    let mut v = vec![0f32; dims];
    if dims == 0 {
        return v;
    }
    for h in hashes {
        let idx = (h % dims as u64) as usize;
        v[idx] += if h >> 63 == 0 { 1.0 } else { -1.0 };
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    } else {
        // Words that cancel out still yield a unit vector so cosine similarity is defined.
        v[0] = 1.0;
    }
    v
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// SplitMix64: a cheap, well-mixed hash of a counter, used for seeded decisions and ids.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_reply_is_prefix_and_words() {
        assert_eq!(reply_text("hello  big\nworld", 0, None), "echo: hello big world");
        assert_eq!(reply_text("", 0, None), "echo:");
    }

    #[test]
    fn fixed_chunk_count_cycles_and_max_tokens_caps() {
        assert_eq!(reply_text("a b", 5, None), "echo: a b echo: a");
        assert_eq!(reply_text("a b", 5, Some(2)), "echo: a");
        assert_eq!(completion_plan(3, 5, Some(2)), (2, "length"));
        assert_eq!(completion_plan(3, 0, Some(3)), (3, "stop"));
    }

    #[test]
    fn reasoning_grows_with_the_effort() {
        assert_eq!(reasoning_text("why is the sky blue", "minimal"), "reasoning: why");
        assert_eq!(reasoning_text("a b", "low"), "reasoning: a b reasoning:");
        assert_eq!(reasoning_text("a b", "none"), "");
        assert_eq!(reasoning_text("a", "high").split_whitespace().count(), 16);
        assert_eq!(json_object_text("hi there"), r#"{"reply":"echo: hi there"}"#);
    }

    #[test]
    fn echo_is_capped() {
        let long = vec!["w"; 100].join(" ");
        assert_eq!(Echo::new(long).len(), MAX_ECHO_WORDS + 1);
    }

    #[test]
    fn prompt_tokens_count_words_and_framing() {
        assert_eq!(prompt_tokens(["you are terse", "hi there"]), 3 + (3 + 3) + (3 + 2));
        assert_eq!(prompt_tokens(std::iter::empty()), 3);
    }

    #[test]
    fn argument_fragments_respect_char_boundaries() {
        let parts: Vec<_> = argument_fragments("{\"é\":\"ab\"}").collect();
        assert_eq!(parts.concat(), "{\"é\":\"ab\"}");
        assert!(parts.iter().all(|p| p.chars().count() <= 4));
        assert_eq!(argument_fragments("").count(), 0);
    }

    #[test]
    fn embeddings_are_unit_and_deterministic() {
        let a = embed_text("the quick brown fox", 16);
        assert_eq!(a, embed_text("the quick brown fox", 16));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-5);
        assert_eq!(embed_tokens(&[1, 2, 3], 8).len(), 8);
    }
}
