//! Header sanitizing: what of a request's headers may reach logs, traces and the database.
//!
//! Credential-bearing headers keep only their presence (and, for `Authorization`, the scheme);
//! every other value is scanned by the secret detectors, masked where one matches, and truncated.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::detect::{Detectors, RuleMask};
use crate::engine::redact;
use crate::rules::Category;

/// Headers that always carry credentials.
pub const SENSITIVE_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "x-auth-token",
    "x-access-token",
    "x-refresh-token",
    "x-amz-security-token",
    "x-csrf-token",
    "x-xsrf-token",
];

/// Name fragments that mark a custom header as credential-bearing (`x-acme-session-token`).
const SENSITIVE_FRAGMENTS: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "apikey",
    "api-key",
    "api_key",
    "auth",
    "cookie",
    "session",
    "signature",
    "credential",
];

/// Longest value kept, in bytes.
pub const MAX_HEADER_VALUE: usize = 256;

const REDACTED: &str = "[REDACTED]";

/// Whether a header (name in any case) is never recorded in clear.
pub fn is_sensitive_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SENSITIVE_HEADERS.contains(&name.as_str()) || SENSITIVE_FRAGMENTS.iter().any(|f| name.contains(f))
}

/// Headers safe to record: lowercase names, sanitized values (repeated headers joined by `, `).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SanitizedHeaders(pub BTreeMap<String, String>);

impl SanitizedHeaders {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(&name.to_ascii_lowercase()).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

static SECRET_SCAN: LazyLock<(Detectors, RuleMask)> =
    LazyLock::new(|| (Detectors::new(&[]), RuleMask::from_fn(|rule| rule.category() == Category::Secret)));

/// Sanitizes a request's or a response's headers.
pub fn sanitize_headers(headers: &http::HeaderMap) -> SanitizedHeaders {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = sanitize_value(name.as_str(), value.as_bytes());
        out.entry(name.as_str().to_owned())
            .and_modify(|existing| {
                existing.push_str(", ");
                existing.push_str(&value);
            })
            .or_insert(value);
    }
    SanitizedHeaders(out)
}

/// Sanitizes one header value.
pub fn sanitize_value(name: &str, value: &[u8]) -> String {
    if is_sensitive_header(name) {
        if name.eq_ignore_ascii_case("authorization") || name.eq_ignore_ascii_case("proxy-authorization") {
            let scheme = value.iter().position(|b| *b == b' ').map(|i| &value[..i]);
            if let Some(scheme) =
                scheme.filter(|s| !s.is_empty() && s.len() <= 16 && s.iter().all(u8::is_ascii_alphabetic))
            {
                return format!("{} {REDACTED}", String::from_utf8_lossy(scheme));
            }
        }
        return REDACTED.to_owned();
    }
    let Ok(text) = std::str::from_utf8(value) else { return "[non-utf8]".to_owned() };
    let (detectors, mask) = &*SECRET_SCAN;
    let mut hits = Vec::new();
    detectors.detect(text, 0, mask, &mut hits, &mut Vec::new());
    // Masked before truncation, so a secret straddling the cut is still recognised whole.
    let mut clean = if hits.is_empty() { text.to_owned() } else { redact(text, &hits) };
    if clean.len() > MAX_HEADER_VALUE {
        let mut cut = MAX_HEADER_VALUE;
        while !clean.is_char_boundary(cut) {
            cut -= 1;
        }
        clean.truncate(cut);
        clean.push('…');
    }
    clean
}
