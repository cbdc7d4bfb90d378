//! What every provider translation shares: how a provider and model take a request
//! ([`ProviderModel`]), the body it produces ([`ProviderBody`]), the handling of parameters a
//! provider has no field for, and the model an answer's first chunk names ([`AnswerModel`]).

use serde_json::value::RawValue;

use crate::error::WireError;

/// What to do with request parameters a provider has no field for: those meshgate does not
/// model (`ChatOptions.extra_json`) and, for non-OpenAI formats, modelled ones without an
/// equivalent (`seed` or `logit_bias` for Anthropic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownParams {
    /// Sent as they are (merged into the body); for a format without the field, left out and
    /// listed, since sending it would only make the provider refuse the request.
    #[default]
    Forward,
    /// Left out and listed in [`ProviderBody::dropped`], for the caller's trace.
    Drop,
    /// The request is refused with a [`WireError::Unsupported`] naming the parameter.
    Refuse,
}

/// How one provider's model takes a request (from the provider catalog).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProviderModel {
    /// OpenAI format: the model takes `max_completion_tokens` rather than `max_tokens` (OpenAI's
    /// o-series and gpt-5 refuse `max_tokens`).
    pub max_completion_tokens: bool,
    pub unknown_params: UnknownParams,
    /// The model's largest completion (0 = unknown): Anthropic's `max_tokens` when the request
    /// sets none.
    pub max_output_tokens: i64,
    /// Anthropic format: the model has native structured outputs (`output_config.format`, and
    /// `strict` tools), used for JSON-schema answers instead of a forced tool.
    pub native_structured_output: bool,
}

/// A provider request body and what was left out of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProviderBody {
    /// The JSON body.
    pub body: Vec<u8>,
    /// Parameters left out because the provider does not take them, by the names the client
    /// used (`seed`, `logit_bias`, an unknown parameter's own name,
    /// `messages[].reasoning_content`, ...), for the trace.
    pub dropped: Vec<String>,
}

impl ProviderModel {
    /// Decides the fate of `field`, a parameter the provider's format has no place for: `Ok`
    /// (listed as dropped) unless the provider refuses such parameters.
    pub(crate) fn leave_out(&self, field: &str, dropped: &mut Vec<String>) -> Result<(), WireError> {
        if self.unknown_params == UnknownParams::Refuse {
            return Err(WireError::unsupported(field, "is not supported by this provider"));
        }
        if !dropped.iter().any(|d| d == field) {
            dropped.push(field.to_owned());
        }
        Ok(())
    }
}

/// The parameters of `ChatOptions.extra_json`, in order.
pub(crate) fn extra_params(extra_json: &str) -> Result<Vec<(String, &RawValue)>, WireError> {
    if extra_json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let map: Vec<(String, &RawValue)> = serde_json::from_str::<ExtraParams<'_>>(extra_json)
        .map_err(|err| WireError::invalid("extra_json", format!("must be a JSON object ({err})")))?
        .0;
    Ok(map)
}

/// A JSON object's members in document order, values as raw text.
struct ExtraParams<'a>(Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for ExtraParams<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = ExtraParams<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    members.push((key, map.next_value::<&RawValue>()?));
                }
                Ok(ExtraParams(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

/// Adds `extra_json`'s parameters to `body` (a serialized JSON object) by the provider's policy,
/// refusing any named in `modelled`, the fields the format's body has (meshgate writes those from
/// their own canonical fields; an extra one would overwrite them or contradict them).
pub(crate) fn merge_extra(
    body: &mut Vec<u8>,
    extra_json: &str,
    modelled: &[&str],
    model: &ProviderModel,
    dropped: &mut Vec<String>,
) -> Result<(), WireError> {
    let extras = extra_params(extra_json)?;
    for (key, value) in extras {
        if modelled.contains(&key.as_str()) {
            return Err(WireError::invalid(
                key,
                "is a parameter meshgate sets itself; send it in its own field, not among the extra parameters",
            ));
        }
        match model.unknown_params {
            UnknownParams::Forward => {
                debug_assert_eq!(body.last(), Some(&b'}'));
                body.pop();
                if body.len() > 1 {
                    body.push(b',');
                }
                serde_json::to_writer(&mut *body, &key).map_err(|err| WireError::invalid(&key, err.to_string()))?;
                body.push(b':');
                body.extend_from_slice(value.get().as_bytes());
                body.push(b'}');
            }
            UnknownParams::Drop => dropped.push(key),
            UnknownParams::Refuse => {
                return Err(WireError::unsupported(
                    key,
                    "is not a parameter meshgate knows, and this provider refuses unknown parameters",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extras_merge_by_policy() {
        let written = ["model", "stream"];
        let forward = ProviderModel::default();
        let mut body = br#"{"model":"m","stream":true}"#.to_vec();
        let mut dropped = Vec::new();
        merge_extra(&mut body, r#"{"top_k": 5, "repetition_penalty":1.1}"#, &written[..], &forward, &mut dropped)
            .unwrap();
        assert_eq!(body, br#"{"model":"m","stream":true,"top_k":5,"repetition_penalty":1.1}"#);
        assert!(dropped.is_empty());

        let drop = ProviderModel { unknown_params: UnknownParams::Drop, ..ProviderModel::default() };
        let mut body = br#"{"model":"m"}"#.to_vec();
        merge_extra(&mut body, r#"{"top_k": 5}"#, &written[..], &drop, &mut dropped).unwrap();
        assert_eq!(body, br#"{"model":"m"}"#);
        assert_eq!(dropped, ["top_k"]);

        let refuse = ProviderModel { unknown_params: UnknownParams::Refuse, ..ProviderModel::default() };
        let err = merge_extra(&mut body, r#"{"top_k": 5}"#, &written[..], &refuse, &mut dropped).unwrap_err();
        assert_eq!(err.field(), Some("top_k"));
        let err = merge_extra(&mut body, r#"{"stream": false}"#, &written[..], &forward, &mut dropped).unwrap_err();
        assert_eq!(err.field(), Some("stream"));
        let err = merge_extra(&mut body, "[1]", &written[..], &forward, &mut dropped).unwrap_err();
        assert_eq!(err.field(), Some("extra_json"));
    }
}

/// The model a decoded answer names on its first chunk (and on none after): the one the provider
/// reported, else the one requested.
#[derive(Debug, Clone)]
pub(crate) struct AnswerModel {
    requested: String,
    /// What the provider's answer said it was served by, once seen.
    pub(crate) reported: Option<String>,
    sent: bool,
}

impl AnswerModel {
    pub(crate) fn new(requested: &str) -> Self {
        Self { requested: requested.to_owned(), reported: None, sent: false }
    }

    /// The model for the first chunk out, empty afterwards.
    pub(crate) fn once(&mut self) -> String {
        if self.sent {
            return String::new();
        }
        self.sent = true;
        self.reported.clone().unwrap_or_else(|| self.requested.clone())
    }
}
