//! Checks and parsers of the text fields of a request: identifiers, free text, `data:` URIs and
//! JSON documents carried as text.

use serde_json::value::RawValue;

use crate::error::WireError;

/// Longest model id, name, tool name or call id accepted.
pub const MAX_IDENTIFIER_BYTES: usize = 256;

/// Names and ids are recorded in traces and sent to providers as they are: bounded, and without
/// control characters (a NUL would make Postgres refuse the trace batch it lands in).
pub(crate) fn check_identifier(
    field: impl FnOnce() -> String,
    value: &str,
    may_be_empty: bool,
) -> Result<(), WireError> {
    if value.is_empty() && !may_be_empty {
        return Err(WireError::invalid(field(), "must not be empty"));
    }
    if value.len() > MAX_IDENTIFIER_BYTES || value.chars().any(char::is_control) {
        return Err(WireError::invalid(
            field(),
            format!("must be at most {MAX_IDENTIFIER_BYTES} bytes without control characters"),
        ));
    }
    Ok(())
}

/// Free text may hold newlines and tabs, but no NUL.
pub(crate) fn check_text(field: impl FnOnce() -> String, value: &str) -> Result<(), WireError> {
    if value.contains('\0') {
        return Err(WireError::invalid(field(), "must not contain NUL characters"));
    }
    Ok(())
}

/// A JSON document given as text (a schema), checked to be an object. `verified` skips the
/// parse of a text already known to be valid JSON (one the edge parsed itself).
pub(crate) fn check_json_object(field: impl FnOnce() -> String, text: &str, verified: bool) -> Result<(), WireError> {
    let text = text.trim();
    if !verified && let Err(err) = serde_json::from_str::<&RawValue>(text) {
        return Err(WireError::invalid(field(), format!("is not valid JSON ({err})")));
    }
    if !text.starts_with('{') {
        return Err(WireError::invalid(field(), "must be a JSON object (a JSON schema)"));
    }
    Ok(())
}

/// `text` as a raw JSON value, for a body that embeds it as it is. Checked requests hold valid
/// JSON; anything else is refused here rather than sent on as a broken body.
pub(crate) fn raw_json(field: impl FnOnce() -> String, text: &str) -> Result<&RawValue, WireError> {
    serde_json::from_str(text.trim()).map_err(|err| WireError::invalid(field(), format!("is not valid JSON ({err})")))
}

/// A `data:` URI's parts: `data:<media type>[;<parameter>...][;base64],<data>`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DataUri<'a> {
    pub media_type: &'a str,
    pub base64: bool,
    pub data: &'a str,
}

impl<'a> DataUri<'a> {
    /// `None` when `uri` is not a data URI.
    pub(crate) fn parse(uri: &'a str) -> Option<Self> {
        let rest = uri.get(..5).filter(|scheme| scheme.eq_ignore_ascii_case("data:")).map(|_| &uri[5..])?;
        let (header, data) = rest.split_once(',')?;
        let (media_type, base64) = match header.strip_suffix(";base64") {
            Some(media_type) => (media_type, true),
            None => (header, false),
        };
        let media_type = media_type.split(';').next().unwrap_or_default();
        Some(Self { media_type, base64, data })
    }
}

/// Images come by http(s) URL or inline as a `data:` URI.
pub(crate) fn check_image_url(field: impl Fn() -> String, url: &str) -> Result<(), WireError> {
    let scheme = url.split_once(':').map(|(scheme, _)| scheme.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http" | "https")
            if url.split_once("://").is_some_and(|(_, rest)| !rest.is_empty())
                && !url.chars().any(|c| c.is_control() || c == ' ') =>
        {
            Ok(())
        }
        Some("data") if DataUri::parse(url).is_some() => check_text(field, url),
        Some("data") => {
            Err(WireError::invalid(field(), "must be a data URI of the form data:<media type>;base64,<data>"))
        }
        _ => Err(WireError::invalid(field(), "must be an http(s) URL or a data: URI")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_uris_are_split() {
        assert_eq!(
            DataUri::parse("data:image/png;base64,iVBO"),
            Some(DataUri { media_type: "image/png", base64: true, data: "iVBO" })
        );
        assert_eq!(
            DataUri::parse("DATA:text/plain;charset=utf-8,hi"),
            Some(DataUri { media_type: "text/plain", base64: false, data: "hi" })
        );
        assert_eq!(DataUri::parse("https://x/y.png"), None);
        assert_eq!(DataUri::parse("data:image/png;base64"), None);
    }

    #[test]
    fn image_urls_are_http_or_data() {
        let field = || "url".to_owned();
        for good in ["https://example.com/a.png", "HTTP://x", "data:image/png;base64,AAAA"] {
            check_image_url(field, good).unwrap();
        }
        for bad in [
            "ftp://x/y.png",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "https://",
            "https://a b",
            "data:xyz",
            "/relative.png",
        ] {
            assert_eq!(check_image_url(field, bad).unwrap_err().field(), Some("url"), "{bad}");
        }
    }

    #[test]
    fn json_documents_must_be_objects() {
        let field = || "p".to_owned();
        check_json_object(field, r#" {"type":"object"} "#, false).unwrap();
        assert_eq!(check_json_object(field, "[1]", false).unwrap_err().field(), Some("p"));
        assert_eq!(check_json_object(field, "{", false).unwrap_err().field(), Some("p"));
        assert_eq!(raw_json(field, r#" {"a":1} "#).unwrap().get(), r#"{"a":1}"#);
        assert!(raw_json(field, "{").is_err());
    }
}
