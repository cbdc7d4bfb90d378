//! Embeddings in OpenAI's format, both ways: the edge request (`POST /v1/embeddings`) with its
//! four input shapes ([`parse_embeddings`]), the body for an OpenAI-compatible provider
//! ([`provider_body`]) and the decoding of its answer ([`decode_embeddings`]), and the answer
//! to the client ([`embeddings_json`], `float` or `base64`).
//!
//! Providers are always asked for `float` vectors (every OpenAI-compatible server takes it; not
//! all take `base64`), which the edge re-encodes as the client asked. [`shorten`] cuts a vector
//! to fewer dimensions and re-normalises it, as models trained for it (Matryoshka embeddings)
//! are used.

use std::collections::HashSet;
use std::fmt;

use base64::Engine;
use meshgate_proto::common::v1 as pb;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{WireError, truncate};
use crate::json_body::{extra_json, keep_extra, once, parse_body};
use crate::provider::{ProviderBody, ProviderModel, merge_extra};

/// OpenAI's limit on inputs per request.
pub const MAX_INPUTS: usize = 2048;

/// What to embed: texts, or texts already tokenized by the model's tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddingInput {
    Texts(Vec<String>),
    Tokens(Vec<Vec<u32>>),
}

impl EmbeddingInput {
    /// How many vectors the answer holds.
    pub fn len(&self) -> usize {
        match self {
            Self::Texts(texts) => texts.len(),
            Self::Tokens(tokens) => tokens.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How vectors are written in the answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EncodingFormat {
    #[default]
    Float,
    /// Little-endian `f32`s in base64, as the OpenAI SDKs decode them.
    Base64,
}

/// A checked embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: EmbeddingInput,
    pub dimensions: Option<u32>,
    pub encoding_format: EncodingFormat,
    /// The end user, as the client names them (empty when unnamed).
    pub user: String,
    /// Parameters meshgate does not model, as one JSON object (empty for none).
    pub extra_json: String,
}

/// Parses and checks a `POST /v1/embeddings` body: `input` a string, a list of strings, a list of
/// token ids or a list of such lists (1 to [`MAX_INPUTS`] of them, none empty).
pub fn parse_embeddings(body: &[u8]) -> Result<EmbeddingsRequest, WireError> {
    let wire: WireRequest = parse_body(body)?;
    wire.into_request()
}

#[derive(Default)]
struct WireRequest {
    model: Option<String>,
    input: Option<WireInput>,
    dimensions: Option<i64>,
    encoding_format: Option<String>,
    user: Option<String>,
    extra: Vec<(String, Box<RawValue>)>,
}

impl<'de> Deserialize<'de> for WireRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RequestVisitor;
        impl<'de> Visitor<'de> for RequestVisitor {
            type Value = WireRequest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an embeddings request object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WireRequest, A::Error> {
                let mut r = WireRequest::default();
                let mut seen = HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    let seen = &mut seen;
                    match key.as_str() {
                        "model" => once(&mut r.model, map.next_value()?, &key, seen)?,
                        "input" => once(&mut r.input, map.next_value()?, &key, seen)?,
                        "dimensions" => once(&mut r.dimensions, map.next_value()?, &key, seen)?,
                        "encoding_format" => once(&mut r.encoding_format, map.next_value()?, &key, seen)?,
                        "user" => once(&mut r.user, map.next_value()?, &key, seen)?,
                        _ => {
                            let value: Box<RawValue> = map.next_value()?;
                            keep_extra(&mut r.extra, key, value, seen)?;
                        }
                    }
                }
                Ok(r)
            }
        }
        deserializer.deserialize_map(RequestVisitor)
    }
}

/// The four input shapes.
enum WireInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl<'de> Deserialize<'de> for WireInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InputVisitor;
        impl<'de> Visitor<'de> for InputVisitor {
            type Value = WireInput;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a list of strings, a list of token ids or a list of token-id lists")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<WireInput, E> {
                Ok(WireInput::Text(value.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<WireInput, A::Error> {
                let mut input = WireInput::Texts(Vec::new());
                let mut count = 0;
                while let Some(item) = seq.next_element::<InputItem>()? {
                    count += 1;
                    input = match (input, item) {
                        (WireInput::Texts(mut texts), InputItem::Text(text)) if texts.len() + 1 == count => {
                            texts.push(text);
                            WireInput::Texts(texts)
                        }
                        (WireInput::Texts(texts), InputItem::Token(token)) if texts.is_empty() && count == 1 => {
                            WireInput::Tokens(vec![token])
                        }
                        (WireInput::Tokens(mut tokens), InputItem::Token(token)) => {
                            tokens.push(token);
                            WireInput::Tokens(tokens)
                        }
                        (WireInput::Texts(texts), InputItem::Tokens(list)) if texts.is_empty() && count == 1 => {
                            WireInput::TokenLists(vec![list])
                        }
                        (WireInput::TokenLists(mut lists), InputItem::Tokens(list)) => {
                            lists.push(list);
                            WireInput::TokenLists(lists)
                        }
                        _ => return Err(de::Error::custom("mixes strings, token ids and token-id lists")),
                    };
                }
                Ok(input)
            }
        }
        deserializer.deserialize_any(InputVisitor)
    }
}

enum InputItem {
    Text(String),
    Token(u32),
    Tokens(Vec<u32>),
}

impl<'de> Deserialize<'de> for InputItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = InputItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a token id or a list of token ids")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<InputItem, E> {
                Ok(InputItem::Text(value.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<InputItem, E> {
                u32::try_from(value).map(InputItem::Token).map_err(|_| E::custom("a token id is at most 4294967295"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<InputItem, E> {
                Err(E::custom("a token id is not negative"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<InputItem, A::Error> {
                let mut tokens = Vec::with_capacity(seq.size_hint().unwrap_or(16));
                while let Some(token) = seq.next_element::<u32>()? {
                    tokens.push(token);
                }
                Ok(InputItem::Tokens(tokens))
            }
        }
        deserializer.deserialize_any(ItemVisitor)
    }
}

impl WireRequest {
    fn into_request(self) -> Result<EmbeddingsRequest, WireError> {
        let model = self.model.ok_or_else(|| WireError::invalid("model", "is required"))?;
        crate::text::check_identifier(|| "model".into(), model.trim(), false)?;
        let input = match self.input.ok_or_else(|| WireError::invalid("input", "is required"))? {
            WireInput::Text(text) => EmbeddingInput::Texts(vec![text]),
            WireInput::Texts(texts) => EmbeddingInput::Texts(texts),
            WireInput::Tokens(tokens) => EmbeddingInput::Tokens(vec![tokens]),
            WireInput::TokenLists(lists) => EmbeddingInput::Tokens(lists),
        };
        if input.is_empty() {
            return Err(WireError::invalid("input", "must not be an empty list"));
        }
        if input.len() > MAX_INPUTS {
            return Err(WireError::invalid("input", format!("takes at most {MAX_INPUTS} inputs")));
        }
        match &input {
            EmbeddingInput::Texts(texts) => {
                for (index, text) in texts.iter().enumerate() {
                    if text.is_empty() {
                        return Err(WireError::invalid(format!("input[{index}]"), "must not be empty"));
                    }
                    crate::text::check_text(|| format!("input[{index}]"), text)?;
                }
            }
            EmbeddingInput::Tokens(lists) => {
                if let Some(index) = lists.iter().position(Vec::is_empty) {
                    return Err(WireError::invalid(format!("input[{index}]"), "must not be empty"));
                }
            }
        }
        let dimensions = match self.dimensions {
            None => None,
            Some(d) if d >= 1 && d <= i64::from(u32::MAX) => Some(d as u32),
            Some(_) => return Err(WireError::invalid("dimensions", "must be at least 1")),
        };
        let encoding_format = match self.encoding_format.as_deref() {
            None | Some("float") => EncodingFormat::Float,
            Some("base64") => EncodingFormat::Base64,
            Some(other) => {
                return Err(WireError::invalid("encoding_format", format!("is {other:?}; expected float or base64")));
            }
        };
        let user = self.user.unwrap_or_default();
        crate::text::check_identifier(|| "user".into(), &user, true)?;
        Ok(EmbeddingsRequest {
            model: model.trim().to_owned(),
            input,
            dimensions,
            encoding_format,
            user,
            extra_json: extra_json(&self.extra),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The provider

/// The fields of the body meshgate writes itself; `extra_json` may not set them.
const MODELLED: [&str; 5] = ["model", "input", "dimensions", "encoding_format", "user"];

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    input: InputOut<'a>,
    encoding_format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
    #[serde(skip_serializing_if = "str::is_empty")]
    user: &'a str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum InputOut<'a> {
    Texts(&'a [String]),
    Tokens(&'a [Vec<u32>]),
}

/// The body asking an OpenAI-compatible provider's `model_id` (the model's id there) for the
/// request's vectors, as floats; unknown parameters by the provider's policy.
pub fn provider_body(
    request: &EmbeddingsRequest,
    model_id: &str,
    model: &ProviderModel,
) -> Result<ProviderBody, WireError> {
    let body = Body {
        model: model_id,
        input: match &request.input {
            EmbeddingInput::Texts(texts) => InputOut::Texts(texts),
            EmbeddingInput::Tokens(lists) => InputOut::Tokens(lists),
        },
        encoding_format: "float",
        dimensions: request.dimensions,
        user: &request.user,
    };
    let mut bytes =
        serde_json::to_vec(&body).map_err(|err| WireError::invalid("", format!("cannot encode the request: {err}")))?;
    let mut dropped = Vec::new();
    merge_extra(&mut bytes, &request.extra_json, &MODELLED, model, &mut dropped)?;
    Ok(ProviderBody { body: bytes, dropped })
}

/// A provider's vectors, in input order, and its usage.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// The model the provider says it used (empty when it says none).
    pub model: String,
    pub vectors: Vec<Vec<f32>>,
    /// Prompt and total tokens.
    pub usage: pb::Usage,
}

#[derive(Deserialize)]
struct WireAnswer {
    data: Vec<WireDatum>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireDatum {
    #[serde(default)]
    index: Option<usize>,
    embedding: WireVector,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WireVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: i64,
    #[serde(default)]
    total_tokens: Option<i64>,
}

/// Decodes a provider's answer to a request of `expected` inputs: one vector per input, by
/// `index` (float or base64), all of one length.
pub fn decode_embeddings(body: &[u8], expected: usize) -> Result<Embeddings, WireError> {
    let answer: WireAnswer = serde_json::from_slice(body).map_err(|err| {
        WireError::protocol(format!("malformed embeddings ({err}): {}", truncate(&String::from_utf8_lossy(body))))
    })?;
    if answer.data.len() != expected {
        return Err(WireError::protocol(format!("{} embeddings for {expected} inputs", answer.data.len())));
    }
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; expected];
    for (position, datum) in answer.data.into_iter().enumerate() {
        let index = datum.index.unwrap_or(position);
        let slot = vectors
            .get_mut(index)
            .filter(|slot| slot.is_none())
            .ok_or_else(|| WireError::protocol(format!("embedding index {index} is out of range or repeated")))?;
        *slot = Some(match datum.embedding {
            WireVector::Float(values) => values,
            WireVector::Base64(text) => decode_base64(&text)?,
        });
    }
    let vectors: Vec<Vec<f32>> = vectors.into_iter().flatten().collect();
    if let Some(first) = vectors.first()
        && vectors.iter().any(|v| v.len() != first.len() || v.is_empty())
    {
        return Err(WireError::protocol("embeddings of different or zero lengths"));
    }
    let usage = answer.usage.map_or_else(pb::Usage::default, |u| pb::Usage {
        prompt_tokens: u.prompt_tokens,
        total_tokens: u.total_tokens.unwrap_or(u.prompt_tokens),
        ..Default::default()
    });
    Ok(Embeddings { model: answer.model.unwrap_or_default(), vectors, usage })
}

fn decode_base64(text: &str) -> Result<Vec<f32>, WireError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|err| WireError::protocol(format!("an embedding is not base64 ({err})")))?;
    if bytes.len() % 4 != 0 {
        return Err(WireError::protocol("a base64 embedding is not a whole number of f32s"));
    }
    Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// A vector as `encoding_format: base64` writes it: little-endian `f32`s in base64.
pub fn base64_vector(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `vector` cut to its first `dimensions` values and scaled back to unit length (a zero vector
/// stays zero). Unchanged when it is no longer than `dimensions`.
pub fn shorten(vector: &mut Vec<f32>, dimensions: usize) {
    if vector.len() <= dimensions {
        return;
    }
    vector.truncate(dimensions);
    let norm = vector.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt();
    if norm > 0.0 {
        for value in vector.iter_mut() {
            *value = (f64::from(*value) / norm) as f32;
        }
    }
}

#[derive(Serialize)]
struct AnswerJson<'a> {
    object: &'static str,
    data: Vec<DatumJson<'a>>,
    model: &'a str,
    usage: UsageJson,
}

#[derive(Serialize)]
struct DatumJson<'a> {
    object: &'static str,
    index: usize,
    embedding: VectorJson<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum VectorJson<'a> {
    Float(&'a [f32]),
    Base64(String),
}

#[derive(Serialize)]
struct UsageJson {
    prompt_tokens: i64,
    total_tokens: i64,
}

/// The client's answer: the vectors in input order, as `format` asks.
pub fn embeddings_json(model: &str, vectors: &[Vec<f32>], prompt_tokens: i64, format: EncodingFormat) -> Vec<u8> {
    let data = vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| DatumJson {
            object: "embedding",
            index,
            embedding: match format {
                EncodingFormat::Float => VectorJson::Float(vector),
                EncodingFormat::Base64 => VectorJson::Base64(base64_vector(vector)),
            },
        })
        .collect();
    let answer =
        AnswerJson { object: "list", data, model, usage: UsageJson { prompt_tokens, total_tokens: prompt_tokens } };
    serde_json::to_vec(&answer).expect("embeddings serialize")
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::UnknownParams;

    fn parse(body: &Value) -> Result<EmbeddingsRequest, WireError> {
        parse_embeddings(body.to_string().as_bytes())
    }

    #[test]
    fn four_input_shapes() {
        let input = |v: Value| parse(&json!({"model": "m", "input": v})).unwrap().input;
        assert_eq!(input(json!("hi")), EmbeddingInput::Texts(vec!["hi".into()]));
        assert_eq!(input(json!(["a", "b"])), EmbeddingInput::Texts(vec!["a".into(), "b".into()]));
        assert_eq!(input(json!([1, 2, 3])), EmbeddingInput::Tokens(vec![vec![1, 2, 3]]));
        assert_eq!(input(json!([[1, 2], [3]])), EmbeddingInput::Tokens(vec![vec![1, 2], vec![3]]));
        let request = parse(&json!({"model": " m ", "input": "x", "dimensions": 256, "encoding_format": "base64",
            "user": "u", "vendor": {"a": 1}}))
        .unwrap();
        assert_eq!(request.model, "m");
        assert_eq!((request.dimensions, request.encoding_format), (Some(256), EncodingFormat::Base64));
        assert_eq!((request.user.as_str(), request.extra_json.as_str()), ("u", r#"{"vendor":{"a":1}}"#));
    }

    #[test]
    fn bad_input_names_its_field() {
        let cases = [
            (json!({"input": "x"}), "model"),
            (json!({"model": "m"}), "input"),
            (json!({"model": "m", "input": []}), "input"),
            (json!({"model": "m", "input": ["a", ""]}), "input[1]"),
            (json!({"model": "m", "input": [[1], []]}), "input[1]"),
            (json!({"model": "m", "input": ["a", 1]}), "input"),
            (json!({"model": "m", "input": [[1], 2]}), "input"),
            (json!({"model": "m", "input": [-1]}), "input[0]"),
            (json!({"model": "m", "input": [[1, 5000000000u64]]}), "input[0][1]"),
            (json!({"model": "m", "input": {"text": "a"}}), "input"),
            (json!({"model": "m", "input": "a", "dimensions": 0}), "dimensions"),
            (json!({"model": "m", "input": "a", "encoding_format": "int8"}), "encoding_format"),
            (json!({"model": "m", "input": "a\u{0}"}), "input[0]"),
        ];
        for (body, field) in cases {
            let err = parse(&body).unwrap_err();
            assert_eq!(err.field(), Some(field), "{body}: {err}");
        }
        let many: Vec<&str> = vec!["a"; MAX_INPUTS + 1];
        assert_eq!(parse(&json!({"model": "m", "input": many})).unwrap_err().field(), Some("input"));
    }

    #[test]
    fn provider_round_trip() {
        let request = parse(
            &json!({"model": "emb", "input": [[1, 2], [3]], "dimensions": 2, "encoding_format": "base64", "x": true}),
        )
        .unwrap();
        let body = provider_body(&request, "text-embedding-3-small", &ProviderModel::default()).unwrap();
        let sent: Value = serde_json::from_slice(&body.body).unwrap();
        assert_eq!(
            sent,
            json!({"model": "text-embedding-3-small", "input": [[1, 2], [3]], "encoding_format": "float", "dimensions": 2, "x": true})
        );
        let refuse = ProviderModel { unknown_params: UnknownParams::Refuse, ..ProviderModel::default() };
        assert_eq!(provider_body(&request, "e", &refuse).unwrap_err().field(), Some("x"));

        let answer = json!({"object": "list", "model": "text-embedding-3-small",
            "data": [{"object": "embedding", "index": 1, "embedding": base64_vector(&[0.5, -1.0])},
                     {"object": "embedding", "index": 0, "embedding": [1.0, 0.0]}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3}});
        let decoded = decode_embeddings(answer.to_string().as_bytes(), 2).unwrap();
        assert_eq!(decoded.vectors, vec![vec![1.0, 0.0], vec![0.5, -1.0]]);
        assert_eq!(
            (decoded.model.as_str(), decoded.usage.prompt_tokens, decoded.usage.total_tokens),
            ("text-embedding-3-small", 3, 3)
        );
        assert!(decode_embeddings(answer.to_string().as_bytes(), 3).is_err());
        let repeated = json!({"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]});
        assert!(decode_embeddings(repeated.to_string().as_bytes(), 2).is_err());
        let ragged = json!({"data": [{"embedding": [1.0]}, {"embedding": [1.0, 2.0]}]});
        assert!(decode_embeddings(ragged.to_string().as_bytes(), 2).is_err());

        let json: Value =
            serde_json::from_slice(&embeddings_json("m", &decoded.vectors, 3, EncodingFormat::Base64)).unwrap();
        assert_eq!(json["data"][1]["embedding"], base64_vector(&[0.5, -1.0]));
        assert_eq!(json["usage"], json!({"prompt_tokens": 3, "total_tokens": 3}));
        let json: Value =
            serde_json::from_slice(&embeddings_json("m", &decoded.vectors, 3, EncodingFormat::Float)).unwrap();
        assert_eq!(json["data"][0], json!({"object": "embedding", "index": 0, "embedding": [1.0, 0.0]}));
    }

    #[test]
    fn shortened_vectors_are_unit_length() {
        let mut vector = vec![3.0, 4.0, 12.0];
        shorten(&mut vector, 2);
        assert_eq!(vector, vec![0.6, 0.8]);
        let mut zero = vec![0.0, 0.0, 1.0];
        shorten(&mut zero, 2);
        assert_eq!(zero, vec![0.0, 0.0]);
        let mut short = vec![1.0];
        shorten(&mut short, 4);
        assert_eq!(short, vec![1.0]);
    }
}
