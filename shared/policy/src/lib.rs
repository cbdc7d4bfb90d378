//! meshgate's prompt and output policy (the edge's "policy enforcer").
//!
//! A project's [`PolicyConfig`] (JSONB) compiles into a [`PolicyEngine`]; cache one per project
//! policy and share it. Per request:
//!
//! 1. [`PolicyEngine::scan_prompt_with`] (or [`PolicyEngine::scan_prompt`] without a classifier)
//!    → [`ScanOutcome`]: findings, a [`Decision`] (allow, redact these messages, block naming the
//!    rule — [`ScanOutcome::block_error`] is the 422) and a 0–100 risk score.
//! 2. Replies: [`PolicyEngine::scan_output`] for JSON completions, a [`StreamScanner`] per streamed
//!    choice (push every delta, forward what it returns, `finish` at the end).
//! 3. [`sanitize_headers`] once per request, then [`ScanOutcome::events`] / [`OutputScan::events`] /
//!    [`StreamScanner::events`] → [`SecurityEvent`]s for analytics.
//!
//! Nothing this crate returns — findings, events, errors, `Debug` output — contains matched text.

mod config;
mod detect;
mod engine;
mod error;
mod event;
mod headers;
mod injection;
mod liveness;
mod rules;
mod stream;

pub use config::{
    DEFAULT_BLOCKED_KEYWORDS, InjectionConfig, MAX_KEYWORD_LEN, MAX_KEYWORDS, OutputAction, OutputConfig, PolicyConfig,
    RuleSetting,
};
pub use engine::{Decision, Finding, Message, OutputScan, PolicyEngine, RedactedMessage, ScanOutcome, risk_score};
pub use error::PolicyError;
pub use event::{Direction, SecurityEvent, security_events};
pub use headers::{
    MAX_HEADER_VALUE, SENSITIVE_HEADERS, SanitizedHeaders, is_sensitive_header, sanitize_headers, sanitize_value,
};
pub use injection::{InjectionClassifier, InjectionSource, role_is_untrusted};
pub use rules::{Action, Category, Rule, Severity};
pub use stream::{MAX_HOLD, StreamScanner};
