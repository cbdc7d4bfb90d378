//! Text handling around the models: loading tokenizers, streaming detokenization and stop
//! sequences.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::Error;

/// Loads a `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, Error> {
    Tokenizer::from_file(path).map_err(|e| Error::Load(format!("cannot load tokenizer {}: {e}", path.display())))
}

/// Turns generated token ids into text as they arrive.
///
/// Decoding one token at a time is wrong for byte-level vocabularies (a character may span several
/// tokens) and for decoders that depend on neighbours (leading-space rules). So the decoder keeps a
/// window of recent tokens, decodes the window with and without the newest tokens, and emits the
/// difference, holding text back while it ends in an incomplete UTF-8 sequence (U+FFFD).
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window whose text was already emitted up to `read_offset`.
    prefix_offset: usize,
    /// Tokens before this index have been emitted.
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every token pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, Error> {
        self.ids.push(id);
        let prefix = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset])?;
        let text = decode(tokenizer, &self.ids[self.prefix_offset..])?;
        if text.len() > prefix.len()
            && !text.ends_with('\u{FFFD}')
            && let Some(delta) = text.strip_prefix(prefix.as_str())
        {
            let delta = delta.to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(delta);
        }
        Ok(String::new())
    }

    /// The text still held back, even if incomplete; call once generation ends.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, Error> {
        let prefix = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset])?;
        let text = decode(tokenizer, &self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(match text.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_owned(),
            None => String::new(),
        })
    }
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, Error> {
    if ids.is_empty() {
        return Ok(String::new());
    }
    tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
}

/// What [`StopBuffer::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Text safe to send now (it cannot be the start of a stop sequence).
    Emit(String),
    /// A stop sequence matched: the text before it, and generation ends.
    Stopped(String),
}

/// Holds back streamed text that might be the beginning of a stop sequence, and cuts the output
/// right before the first stop sequence that appears.
#[derive(Debug, Default)]
pub struct StopBuffer {
    stops: Vec<String>,
    pending: String,
}

impl StopBuffer {
    /// `stops` must not contain empty strings.
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, pending: String::new() }
    }

    pub fn push(&mut self, delta: &str) -> StopCheck {
        self.pending.push_str(delta);
        // Text already emitted never holds the start of a match (it would have been held back), so
        // the earliest match is inside `pending`.
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let before = self.pending[..at].to_owned();
            self.pending.clear();
            return StopCheck::Stopped(before);
        }
        let hold = self.held_suffix_len();
        let emit = self.pending[..self.pending.len() - hold].to_owned();
        self.pending.drain(..self.pending.len() - hold);
        StopCheck::Emit(emit)
    }

    /// The rest of the text once generation ended for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop sequence.
    fn held_suffix_len(&self) -> usize {
        self.pending
            .char_indices()
            .map(|(i, _)| &self.pending[i..])
            .find(|suffix| self.stops.iter().any(|s| s.len() > suffix.len() && s.starts_with(suffix)))
            .map_or(0, str::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut buffer = StopBuffer::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for delta in deltas {
            match buffer.push(delta) {
                StopCheck::Emit(text) => out.push_str(&text),
                StopCheck::Stopped(text) => {
                    out.push_str(&text);
                    return (out, true);
                }
            }
        }
        out.push_str(&buffer.flush());
        (out, false)
    }

    #[test]
    fn stop_sequence_split_across_deltas_is_cut_before_it() {
        assert_eq!(run(&["END"], &["hello E", "N", "D world"]), ("hello ".into(), true));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn a_near_miss_is_released_and_the_earliest_stop_wins() {
        assert_eq!(run(&["END"], &["hello EN", "X"]), ("hello ENX".into(), false));
        assert_eq!(run(&["b", "abc"], &["xab", "c"]), ("xa".into(), true));
        assert_eq!(run(&["c", "ab"], &["xabc"]), ("x".into(), true));
    }

    #[test]
    fn incremental_decoding_rebuilds_multibyte_text_without_broken_characters() {
        let tokenizer = &crate::testing::chat_tokenizer();
        let text = "Café naïve 日本語 🙂🚀 “quoted” done";
        let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        // The byte-level vocabulary splits some characters across tokens, which is what this
        // test is about.
        assert!(ids.iter().any(|&id| tokenizer.decode(&[id], true).unwrap().contains('\u{FFFD}')));

        let mut decoder = IncrementalDecoder::new();
        let mut deltas = Vec::new();
        for &id in &ids {
            deltas.push(decoder.push(tokenizer, id).unwrap());
        }
        deltas.push(decoder.finish(tokenizer).unwrap());
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
        assert_eq!(deltas.concat(), text);
        assert_eq!(decoder.ids(), ids.as_slice());
    }

    #[test]
    fn an_incomplete_character_at_the_end_is_flushed() {
        let tokenizer = &crate::testing::chat_tokenizer();
        let ids = tokenizer.encode("ok 🙂", false).unwrap().get_ids().to_vec();
        let mut decoder = IncrementalDecoder::new();
        let mut out: String = ids[..ids.len() - 1].iter().map(|&id| decoder.push(tokenizer, id).unwrap()).collect();
        assert!(!out.contains('\u{FFFD}'));
        out.push_str(&decoder.finish(tokenizer).unwrap());
        assert_eq!(out, tokenizer.decode(&ids[..ids.len() - 1], true).unwrap());
        assert!(out.starts_with("ok ") && out.ends_with('\u{FFFD}'), "{out:?}");
    }

    #[test]
    fn held_text_is_never_sent_early_and_multibyte_suffixes_are_safe() {
        let mut buffer = StopBuffer::new(vec!["日本語".into()]);
        assert_eq!(buffer.push("ok 日"), StopCheck::Emit("ok ".into()));
        assert_eq!(buffer.push("本"), StopCheck::Emit(String::new()));
        assert_eq!(buffer.push("x"), StopCheck::Emit("日本x".into()));
        assert_eq!(buffer.flush(), "");
    }
}
