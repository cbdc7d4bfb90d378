//! The legacy text completions (`POST /v1/completions`, what IDE autocomplete calls): the
//! prompt becomes one user message of a canonical chat request ([`parse_completion`]), and the
//! answer a `text_completion` object ([`text_completion_json`]) or chunk stream
//! ([`TextCompletionEncoder`]) with `choices[].text`.
//!
//! meshgate serves completions with chat models, so what only a raw completion model can do is
//! refused with a 400 naming the field: `suffix` (fill-in-the-middle), `echo`, token-id prompts
//! (chat models' tokenizers differ), several prompts or choices (`n`, `best_of` above 1). The
//! reference's default of 16 `max_tokens` applies. Legacy `logprobs` (0–5) asks for the chosen
//! token's logprob and that many alternatives, answered in the legacy shape (`tokens`,
//! `token_logprobs`, `top_logprobs`, `text_offset`). A refusal is answered as text; reasoning
//! text is not part of a completion.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use bytes::Bytes;
use meshgate_proto::common::v1 as pb;
use meshgate_proto::sync::v1::CompleteChunk;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::ingress::{ReplyMeta, Stop, UsageJson};
use crate::canonical::{Answer, ChatRequest};
use crate::error::WireError;
use crate::json_body::{extra_json, keep_extra, once, parse_body};
use crate::sse;

/// The reference's `max_tokens` when a request sets none.
pub const DEFAULT_MAX_TOKENS: i64 = 16;
/// The most alternatives legacy `logprobs` may ask for.
pub const MAX_LOGPROBS: i64 = 5;

/// A text completion request as a canonical chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub chat: ChatRequest,
    /// The legacy `logprobs` asked for (alternatives per token), to answer in its shape.
    pub logprobs: Option<i32>,
}

/// Parses and checks a `POST /v1/completions` body.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, WireError> {
    let wire: WireRequest = parse_body(body)?;
    wire.into_request()
}

#[derive(Default)]
struct WireRequest {
    model: Option<String>,
    prompt: Option<Prompt>,
    suffix: Option<String>,
    max_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<i64>,
    best_of: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<WireStreamOptions>,
    logprobs: Option<i64>,
    echo: Option<bool>,
    stop: Option<Stop>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<BTreeMap<String, f32>>,
    user: Option<String>,
    seed: Option<u64>,
    extra: Vec<(String, Box<RawValue>)>,
}

#[derive(Deserialize)]
struct WireStreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

impl<'de> Deserialize<'de> for WireRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RequestVisitor)
    }
}

struct RequestVisitor;

impl<'de> Visitor<'de> for RequestVisitor {
    type Value = WireRequest;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a completion request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WireRequest, A::Error> {
        let mut r = WireRequest::default();
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let seen = &mut seen;
            match key.as_str() {
                "model" => once(&mut r.model, map.next_value()?, &key, seen)?,
                "prompt" => once(&mut r.prompt, map.next_value()?, &key, seen)?,
                "suffix" => once(&mut r.suffix, map.next_value()?, &key, seen)?,
                "max_tokens" => once(&mut r.max_tokens, map.next_value()?, &key, seen)?,
                "temperature" => once(&mut r.temperature, map.next_value()?, &key, seen)?,
                "top_p" => once(&mut r.top_p, map.next_value()?, &key, seen)?,
                "n" => once(&mut r.n, map.next_value()?, &key, seen)?,
                "best_of" => once(&mut r.best_of, map.next_value()?, &key, seen)?,
                "stream" => once(&mut r.stream, map.next_value()?, &key, seen)?,
                "stream_options" => once(&mut r.stream_options, map.next_value()?, &key, seen)?,
                "logprobs" => once(&mut r.logprobs, map.next_value()?, &key, seen)?,
                "echo" => once(&mut r.echo, map.next_value()?, &key, seen)?,
                "stop" => once(&mut r.stop, map.next_value()?, &key, seen)?,
                "presence_penalty" => once(&mut r.presence_penalty, map.next_value()?, &key, seen)?,
                "frequency_penalty" => once(&mut r.frequency_penalty, map.next_value()?, &key, seen)?,
                "logit_bias" => once(&mut r.logit_bias, map.next_value()?, &key, seen)?,
                "user" => once(&mut r.user, map.next_value()?, &key, seen)?,
                "seed" => once(&mut r.seed, map.next_value()?, &key, seen)?,
                _ => {
                    let value: Box<RawValue> = map.next_value()?;
                    keep_extra(&mut r.extra, key, value, seen)?;
                }
            }
        }
        Ok(r)
    }
}

/// `prompt`: a string, a list of strings, a list of token ids or a list of such lists.
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens,
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PromptVisitor;
        impl<'de> Visitor<'de> for PromptVisitor {
            type Value = Prompt;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a list of strings, or token ids")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Prompt, E> {
                Ok(Prompt::Text(value.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
                let mut texts = Vec::new();
                let mut tokens = false;
                while let Some(item) = seq.next_element::<PromptItem>()? {
                    match item {
                        PromptItem::Text(text) if !tokens => texts.push(text),
                        PromptItem::Token | PromptItem::Tokens if texts.is_empty() => tokens = true,
                        _ => return Err(de::Error::custom("mixes strings and token ids")),
                    }
                }
                Ok(if tokens { Prompt::Tokens } else { Prompt::Texts(texts) })
            }
        }
        deserializer.deserialize_any(PromptVisitor)
    }
}

/// One entry of a prompt list.
enum PromptItem {
    Text(String),
    Token,
    Tokens,
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = PromptItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a token id or a list of token ids")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<PromptItem, E> {
                Ok(PromptItem::Text(value.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<PromptItem, E> {
                Ok(PromptItem::Token)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PromptItem, A::Error> {
                while seq.next_element::<u64>()?.is_some() {}
                Ok(PromptItem::Tokens)
            }
        }
        deserializer.deserialize_any(ItemVisitor)
    }
}

impl WireRequest {
    fn into_request(self) -> Result<CompletionRequest, WireError> {
        let model = self.model.ok_or_else(|| WireError::invalid("model", "is required"))?;
        let prompt = match self.prompt.ok_or_else(|| WireError::invalid("prompt", "is required"))? {
            Prompt::Text(text) => text,
            Prompt::Texts(mut texts) if texts.len() == 1 => texts.remove(0),
            Prompt::Texts(texts) if texts.is_empty() => {
                return Err(WireError::invalid("prompt", "must not be an empty list"));
            }
            Prompt::Texts(_) => {
                return Err(WireError::unsupported(
                    "prompt",
                    "takes one prompt per request here: send several prompts as several requests",
                ));
            }
            Prompt::Tokens => {
                return Err(WireError::unsupported(
                    "prompt",
                    "must be text: token ids are not supported (meshgate serves completions with chat models, whose \
                     tokenizers differ)",
                ));
            }
        };
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(WireError::unsupported(
                "suffix",
                "is not supported: no model here does fill-in-the-middle completion",
            ));
        }
        if self.echo == Some(true) {
            return Err(WireError::unsupported("echo", "is not supported: the prompt is not repeated in the answer"));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(WireError::unsupported("n", "must be 1: one completion per request"));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(WireError::unsupported("best_of", "must be 1: one completion per request"));
        }
        let logprobs = match self.logprobs {
            Some(n) if !(0..=MAX_LOGPROBS).contains(&n) => {
                return Err(WireError::invalid("logprobs", format!("must be between 0 and {MAX_LOGPROBS}")));
            }
            n => n.map(|n| n as i32),
        };
        let options = pb::ChatOptions {
            logprobs: logprobs.map(|_| true),
            top_logprobs: logprobs,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: self.logit_bias.unwrap_or_default().into_iter().collect(),
            user: self.user.unwrap_or_default(),
            extra_json: extra_json(&self.extra),
            ..Default::default()
        };
        let sampling = pb::SamplingParams {
            max_tokens: Some(self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: None,
            seed: self.seed,
            stop: self.stop.map(|s| s.0).unwrap_or_default(),
        };
        let mut chat = ChatRequest {
            model,
            messages: vec![pb::ChatMessage { role: "user".into(), content: prompt, ..Default::default() }],
            sampling,
            options,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        };
        chat.check_with(true).map_err(|err| match err {
            WireError::Invalid { field, problem } if field.starts_with("messages") => {
                WireError::Invalid { field: "prompt".into(), problem }
            }
            other => other,
        })?;
        Ok(CompletionRequest { chat, logprobs })
    }
}

// ---------------------------------------------------------------------------------------------
// Replies

/// One token's logprob as Chat Completions gives it.
#[derive(Deserialize)]
struct ChatLogprob {
    token: String,
    logprob: f64,
    #[serde(default)]
    top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Deserialize)]
struct ChatTopLogprob {
    token: String,
    logprob: f64,
}

/// Logprobs in the legacy shape.
#[derive(Serialize, Default)]
struct LegacyLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f64>,
    top_logprobs: Vec<BTreeMap<String, f64>>,
    text_offset: Vec<usize>,
}

impl LegacyLogprobs {
    /// `entries` (Chat Completions logprobs) for text starting at byte `offset` of the answer;
    /// returns the offset after them.
    fn extend(&mut self, entries: &[Box<RawValue>], mut offset: usize) -> usize {
        for entry in entries {
            let Ok(entry) = serde_json::from_str::<ChatLogprob>(entry.get()) else { continue };
            self.text_offset.push(offset);
            offset += entry.token.len();
            self.top_logprobs.push(entry.top_logprobs.into_iter().map(|t| (t.token, t.logprob)).collect());
            self.token_logprobs.push(entry.logprob);
            self.tokens.push(entry.token);
        }
        offset
    }
}

#[derive(Serialize)]
struct CompletionJson<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: Vec<ChoiceJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<UsageJson>>,
}

#[derive(Serialize)]
struct ChoiceJson<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<LegacyLogprobs>,
    finish_reason: Option<&'a str>,
}

/// The answer's text: the content, or what the model said when it refused.
fn answer_text(answer: &Answer) -> String {
    let mut text = answer.content.clone();
    text.push_str(&answer.refusal);
    text
}

/// The `text_completion` object of a whole answer; `logprobs`: the request asked for them.
pub fn text_completion_json(meta: &ReplyMeta, answer: &Answer, logprobs: bool) -> Vec<u8> {
    let text = answer_text(answer);
    let legacy = logprobs.then(|| {
        let mut legacy = LegacyLogprobs::default();
        if let Some(l) = &answer.logprobs {
            legacy.extend(&l.content, 0);
        }
        legacy
    });
    let completion = CompletionJson {
        id: &meta.id,
        object: "text_completion",
        created: meta.created,
        model: if answer.model.is_empty() { &meta.model } else { &answer.model },
        choices: vec![ChoiceJson {
            text: &text,
            index: 0,
            logprobs: legacy,
            finish_reason: Some(answer.finish_reason_or_default()),
        }],
        usage: Some(Some(UsageJson::from(&answer.usage.unwrap_or_default()))),
    };
    serde_json::to_vec(&completion).expect("a completion serializes")
}

/// A chunk's content logprobs.
#[derive(Deserialize)]
struct ChunkLogprobs {
    #[serde(default)]
    content: Option<Vec<Box<RawValue>>>,
}

/// Writes a streamed answer as `text_completion` chunks: text (and legacy logprobs) as it comes,
/// the finish reason in a chunk of its own, the usage chunk when the client asked for it, and
/// `data: [DONE]` from [`TextCompletionEncoder::done`].
#[derive(Debug)]
pub struct TextCompletionEncoder {
    meta: ReplyMeta,
    include_usage: bool,
    logprobs: bool,
    served_model_seen: bool,
    /// Bytes of text sent so far (the legacy `text_offset`).
    offset: usize,
    finished: bool,
}

impl TextCompletionEncoder {
    /// `logprobs`: the request asked for them.
    pub fn new(meta: ReplyMeta, include_usage: bool, logprobs: bool) -> Self {
        Self { meta, include_usage, logprobs, served_model_seen: false, offset: 0, finished: false }
    }

    /// The events for one chunk of the answer (possibly none).
    pub fn encode(&mut self, chunk: &CompleteChunk) -> Bytes {
        if !self.served_model_seen && !chunk.model.is_empty() {
            self.meta.model.clone_from(&chunk.model);
            self.served_model_seen = true;
        }
        let mut out = Vec::new();
        let mut text = chunk.delta.clone();
        text.push_str(&chunk.refusal_delta);
        let legacy = if self.logprobs && !chunk.logprobs_json.is_empty() {
            let entries = serde_json::from_str::<ChunkLogprobs>(&chunk.logprobs_json).ok().and_then(|l| l.content);
            entries.map(|entries| {
                let mut legacy = LegacyLogprobs::default();
                legacy.extend(&entries, self.offset);
                legacy
            })
        } else {
            None
        };
        if !text.is_empty() || legacy.is_some() {
            self.offset += text.len();
            self.write(
                &mut out,
                vec![ChoiceJson { text: &text, index: 0, logprobs: legacy, finish_reason: None }],
                None,
            );
        }
        if !chunk.finish_reason.is_empty() && !self.finished {
            self.finished = true;
            let finish = ChoiceJson { text: "", index: 0, logprobs: None, finish_reason: Some(&chunk.finish_reason) };
            self.write(&mut out, vec![finish], None);
            if self.include_usage {
                self.write(&mut out, Vec::new(), Some(UsageJson::from(&chunk.usage.unwrap_or_default())));
            }
        }
        Bytes::from(out)
    }

    /// The event that ends the stream.
    pub fn done(&self) -> Bytes {
        Bytes::from_static(sse::DONE)
    }

    fn write(&self, out: &mut Vec<u8>, choices: Vec<ChoiceJson<'_>>, usage: Option<UsageJson>) {
        let chunk = CompletionJson {
            id: &self.meta.id,
            object: "text_completion",
            created: self.meta.created,
            model: &self.meta.model,
            choices,
            usage: if self.include_usage { Some(usage) } else { None },
        };
        sse::write_json_event(out, None, &chunk);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn parse(body: &Value) -> Result<CompletionRequest, WireError> {
        parse_completion(body.to_string().as_bytes())
    }

    #[test]
    fn the_prompt_becomes_a_user_message() {
        let request = parse(&json!({"model": "m", "prompt": ["def add(a, b):"], "temperature": 0, "stop": "\n\n",
            "logprobs": 2, "stream": true, "stream_options": {"include_usage": true}, "vendor": 1}))
        .unwrap();
        let chat = &request.chat;
        assert_eq!(chat.messages.len(), 1);
        assert_eq!((chat.messages[0].role.as_str(), chat.messages[0].content.as_str()), ("user", "def add(a, b):"));
        assert_eq!(chat.sampling.max_tokens, Some(DEFAULT_MAX_TOKENS));
        assert_eq!(chat.sampling.stop, ["\n\n"]);
        assert_eq!(
            (chat.options.logprobs, chat.options.top_logprobs, request.logprobs),
            (Some(true), Some(2), Some(2))
        );
        assert!(chat.stream && chat.include_usage);
        assert_eq!(chat.options.extra_json, r#"{"vendor":1}"#);
        assert_eq!(
            parse(&json!({"model": "m", "prompt": "x", "max_tokens": 99})).unwrap().chat.sampling.max_tokens,
            Some(99)
        );
    }

    #[test]
    fn what_chat_models_cannot_do_is_refused_by_field() {
        let cases = [
            (json!({"model": "m"}), "prompt"),
            (json!({"model": "m", "prompt": ["a", "b"]}), "prompt"),
            (json!({"model": "m", "prompt": []}), "prompt"),
            (json!({"model": "m", "prompt": [1, 2, 3]}), "prompt"),
            (json!({"model": "m", "prompt": [[1, 2], [3]]}), "prompt"),
            (json!({"model": "m", "prompt": ["a", 1]}), "prompt"),
            (json!({"model": "m", "prompt": "a", "suffix": "b"}), "suffix"),
            (json!({"model": "m", "prompt": "a", "echo": true}), "echo"),
            (json!({"model": "m", "prompt": "a", "n": 2}), "n"),
            (json!({"model": "m", "prompt": "a", "best_of": 3}), "best_of"),
            (json!({"model": "m", "prompt": "a", "logprobs": 6}), "logprobs"),
            (json!({"model": "m", "prompt": "a", "max_tokens": 0}), "max_tokens"),
            (json!({"model": "m", "prompt": "a\u{0}"}), "prompt"),
            (json!({"model": "m", "prompt": "a", "temperature": "hot"}), "temperature"),
        ];
        for (body, field) in cases {
            let err = parse(&body).unwrap_err();
            assert_eq!(err.field(), Some(field), "{body}: {err}");
        }
        assert!(parse(&json!({"model": "m", "prompt": "a", "suffix": ""})).is_ok(), "an empty suffix is no suffix");
    }

    fn logprob(token: &str, logprob: f64) -> Value {
        json!({"token": token, "logprob": logprob, "bytes": [], "top_logprobs": [{"token": token, "logprob": logprob}, {"token": "z", "logprob": -9.0}]})
    }

    #[test]
    fn answers_are_text_completions_with_legacy_logprobs() {
        let meta = ReplyMeta { id: "cmpl-1".into(), created: 7, model: "asked".into() };
        let chunks = vec![
            CompleteChunk {
                delta: "  return".into(),
                model: "served".into(),
                logprobs_json: json!({"content": [logprob("  return", -0.5)]}).to_string(),
                ..Default::default()
            },
            CompleteChunk {
                delta: " a + b".into(),
                logprobs_json: json!({"content": [logprob(" a + b", -0.25)]}).to_string(),
                ..Default::default()
            },
            CompleteChunk {
                finish_reason: "stop".into(),
                usage: Some(pb::Usage {
                    prompt_tokens: 5,
                    completion_tokens: 3,
                    total_tokens: 8,
                    ..Default::default()
                }),
                ..Default::default()
            },
        ];
        let answer: Answer = chunks.iter().cloned().collect();
        let whole: Value = serde_json::from_slice(&text_completion_json(&meta, &answer, true)).unwrap();
        assert_eq!(whole["object"], "text_completion");
        assert_eq!(whole["model"], "served");
        assert_eq!(whole["choices"][0]["text"], "  return a + b");
        assert_eq!(whole["choices"][0]["finish_reason"], "stop");
        assert_eq!(whole["choices"][0]["logprobs"]["text_offset"], json!([0, 8]));
        assert_eq!(whole["choices"][0]["logprobs"]["token_logprobs"], json!([-0.5, -0.25]));
        assert_eq!(whole["choices"][0]["logprobs"]["top_logprobs"][1], json!({" a + b": -0.25, "z": -9.0}));
        assert_eq!(whole["usage"]["total_tokens"], 8);

        let mut encoder = TextCompletionEncoder::new(meta, true, true);
        let mut wire = Vec::new();
        for chunk in &chunks {
            wire.extend_from_slice(&encoder.encode(chunk));
        }
        wire.extend_from_slice(&encoder.done());
        let text = String::from_utf8(wire).unwrap();
        let events: Vec<Value> = text
            .split("\n\n")
            .filter(|e| !e.is_empty() && *e != "data: [DONE]")
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect();
        assert_eq!(events.len(), 4);
        assert_eq!(events[1]["choices"][0]["logprobs"]["text_offset"], json!([8]), "offsets run across chunks");
        assert!(events.iter().all(|e| e["model"] == "served" && e["object"] == "text_completion"));
        let streamed: String =
            events.iter().flat_map(|e| e["choices"].as_array().unwrap()).map(|c| c["text"].as_str().unwrap()).collect();
        assert_eq!(streamed, "  return a + b");
        assert_eq!(events[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(events[3]["choices"], json!([]));
        assert_eq!(events[3]["usage"]["prompt_tokens"], 5);
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
}
