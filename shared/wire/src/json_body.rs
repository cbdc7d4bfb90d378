//! Reading client request bodies, shared by every ingress format: serde errors placed in the
//! document ([`json_error`]), fields that may be set once ([`once`]), and the parameters a format
//! does not model kept in order, byte for byte ([`extra_json`]).

use serde::de;
use serde_json::value::RawValue;

use crate::error::WireError;
use crate::json_path::path_at;

/// Parses a request body. A body of valid UTF-8 is checked once, whole (a vectorised pass),
/// rather than string by string inside the parser; any other body is left to the parser, which
/// says where the bad byte is.
pub(crate) fn parse_body<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, WireError> {
    match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    }
    .map_err(|err| json_error(body, &err))
}

/// A serde error as a [`WireError`] naming the field it is about.
pub(crate) fn json_error(body: &[u8], err: &serde_json::Error) -> WireError {
    use serde_json::error::Category;
    let message = err.to_string();
    let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => WireError::invalid(
            "",
            format!("malformed JSON body (line {}, column {}): {message}", err.line(), err.column()),
        ),
        Category::Data => {
            let mut field = path_at(body, err.line(), err.column());
            // serde places a missing field at the object that lacks it: name the field itself.
            if let Some(missing) = message.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`')) {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(missing);
                return WireError::invalid(field, "is required");
            }
            if field.is_empty() {
                WireError::invalid("", format!("invalid request body: {message}"))
            } else {
                WireError::invalid(field, message)
            }
        }
    }
}

/// Sets a field once: a repeated key is an error, as serde's derived code makes it.
pub(crate) fn once<T, E: de::Error>(
    slot: &mut Option<T>,
    value: Option<T>,
    key: &str,
    seen: &mut std::collections::HashSet<String>,
) -> Result<(), E> {
    if !seen.insert(key.to_owned()) {
        return Err(E::custom(format_args!("duplicate field `{key}`")));
    }
    *slot = value;
    Ok(())
}

/// Keeps an unknown top-level parameter (a null is the parameter left unset), refusing a repeat.
pub(crate) fn keep_extra<E: de::Error>(
    extra: &mut Vec<(String, Box<RawValue>)>,
    key: String,
    value: Box<RawValue>,
    seen: &mut std::collections::HashSet<String>,
) -> Result<(), E> {
    if !seen.insert(key.clone()) {
        return Err(E::custom(format_args!("duplicate field `{key}`")));
    }
    if value.get() != "null" {
        extra.push((key, value));
    }
    Ok(())
}

/// The unknown parameters as one JSON object, in the client's order (empty for none).
pub(crate) fn extra_json(extra: &[(String, Box<RawValue>)]) -> String {
    if extra.is_empty() {
        return String::new();
    }
    let mut json = String::with_capacity(2 + extra.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum::<usize>());
    json.push('{');
    for (i, (key, value)) in extra.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&serde_json::to_string(key).unwrap_or_default());
        json.push(':');
        json.push_str(value.get());
    }
    json.push('}');
    json
}

/// A JSON document the client gave where an object belongs (a schema), as text.
pub(crate) fn json_text(raw: Option<Box<RawValue>>) -> String {
    match raw {
        Some(raw) if raw.get() != "null" => String::from(raw.get()),
        _ => String::new(),
    }
}

/// An integer parameter narrowed to the contract's `int32`, saturating (the checks then refuse
/// it as out of range rather than wrapping it into range).
pub(crate) fn narrow(value: i64) -> i32 {
    i32::try_from(value).unwrap_or(if value < 0 { i32::MIN } else { i32::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extras_keep_order_and_text() {
        let a: Box<RawValue> = serde_json::from_str("[1, 2]").unwrap();
        let b: Box<RawValue> = serde_json::from_str("{\"x\":\"y\"}").unwrap();
        assert_eq!(extra_json(&[("z".into(), a), ("a\"b".into(), b)]), r#"{"z":[1, 2],"a\"b":{"x":"y"}}"#);
        assert_eq!(extra_json(&[]), "");
        assert_eq!((narrow(1 << 40), narrow(-(1 << 40)), narrow(7)), (i32::MAX, i32::MIN, 7));
    }
}
