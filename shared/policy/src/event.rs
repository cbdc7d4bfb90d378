//! Security events: one per finding, in the shape analytics records (`security_events`).

use serde::{Deserialize, Serialize};

use crate::engine::{Finding, OutputScan, ScanOutcome};
use crate::headers::SanitizedHeaders;
use crate::rules::{Action, Category, Rule, Severity};
use crate::stream::StreamScanner;

/// Which side of the exchange a finding was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Prompt,
    Output,
}

/// A finding ready to be recorded. It holds no matched text, and headers only in sanitized form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecurityEvent {
    pub request_id: String,
    pub direction: Direction,
    pub rule: Rule,
    pub category: Category,
    pub severity: Severity,
    pub action: Action,
    /// The request's (or reply's) risk score, 0–100.
    pub risk: u8,
    /// Message index (prompt) or 0 (output), and the byte span in it.
    pub message: usize,
    pub start: usize,
    pub end: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    pub headers: SanitizedHeaders,
}

/// Events for `findings`, all carrying the same request id, risk and headers.
pub fn security_events(
    request_id: &str,
    direction: Direction,
    findings: &[Finding],
    risk: u8,
    headers: &SanitizedHeaders,
) -> Vec<SecurityEvent> {
    findings
        .iter()
        .map(|f| SecurityEvent {
            request_id: request_id.to_owned(),
            direction,
            rule: f.rule,
            category: f.category,
            severity: f.severity,
            action: f.action,
            risk,
            message: f.message,
            start: f.start,
            end: f.end,
            score: f.score,
            headers: headers.clone(),
        })
        .collect()
}

impl ScanOutcome {
    pub fn events(&self, request_id: &str, headers: &SanitizedHeaders) -> Vec<SecurityEvent> {
        security_events(request_id, Direction::Prompt, &self.findings, self.risk, headers)
    }
}

impl OutputScan {
    pub fn events(&self, request_id: &str, headers: &SanitizedHeaders) -> Vec<SecurityEvent> {
        security_events(request_id, Direction::Output, &self.findings, self.risk, headers)
    }
}

impl StreamScanner {
    /// Events for everything found in the stream so far (call after [`StreamScanner::finish`]).
    pub fn events(&self, request_id: &str, headers: &SanitizedHeaders) -> Vec<SecurityEvent> {
        security_events(request_id, Direction::Output, self.findings(), self.risk(), headers)
    }
}
