//! The project's output scanner over a streamed reply: the content, the reasoning, the refusal
//! and each tool call's arguments each pass through a stream scanner of their own, so a secret a
//! model writes into a tool call is flagged or masked like one in its text, and no text is held
//! back longer than a match in it needs.

use std::collections::BTreeMap;

use meshgate_policy::{Finding, PolicyEngine, StreamScanner};
use meshgate_proto::common::v1::{ToolCall, ToolCallDelta};
use meshgate_proto::sync::v1::CompleteChunk;

/// Scans one reply's chunks in order.
pub struct ReplyScanner {
    engine: PolicyEngine,
    content: StreamScanner,
    reasoning: StreamScanner,
    refusal: StreamScanner,
    /// One scanner per tool call, by index.
    calls: BTreeMap<i32, StreamScanner>,
    /// The tool calls as the client receives them (scanned), assembled from their chunks.
    assembled: BTreeMap<i32, ToolCall>,
}

impl ReplyScanner {
    pub fn new(engine: &PolicyEngine) -> Self {
        Self {
            engine: engine.clone(),
            content: engine.stream_scanner(),
            reasoning: engine.stream_scanner(),
            refusal: engine.stream_scanner(),
            calls: BTreeMap::new(),
            assembled: BTreeMap::new(),
        }
    }

    /// Scans `chunk` in place: each of its texts becomes what may be forwarded now (masked where
    /// the policy redacts output; a tail that may still become a match is held).
    pub fn push(&mut self, chunk: &mut CompleteChunk) {
        chunk.delta = self.content.push(&chunk.delta);
        chunk.reasoning_delta = self.reasoning.push(&chunk.reasoning_delta);
        chunk.refusal_delta = self.refusal.push(&chunk.refusal_delta);
        for delta in &mut chunk.tool_call_deltas {
            let engine = &self.engine;
            let scanner = self.calls.entry(delta.index).or_insert_with(|| engine.stream_scanner());
            delta.arguments_delta = scanner.push(&delta.arguments_delta);
            let call = self
                .assembled
                .entry(delta.index)
                .or_insert_with(|| ToolCall { r#type: "function".into(), ..ToolCall::default() });
            if call.id.is_empty() {
                call.id.clone_from(&delta.id);
            }
            call.function_name.push_str(&delta.function_name);
            call.arguments_json.push_str(&delta.arguments_delta);
        }
    }

    /// Ends the reply on its last chunk: every held tail is appended to it (a tool call's as one
    /// more chunk of its arguments), and its assembled `tool_calls` are the scanned ones — those
    /// pieced together from the stream, or, from a provider that sent its calls whole, each call
    /// scanned whole. Returns every finding.
    pub fn finish(mut self, chunk: &mut CompleteChunk) -> Vec<Finding> {
        chunk.delta.push_str(&self.content.finish());
        chunk.reasoning_delta.push_str(&self.reasoning.finish());
        chunk.refusal_delta.push_str(&self.refusal.finish());
        let mut findings = Vec::new();
        for (index, mut scanner) in std::mem::take(&mut self.calls) {
            let tail = scanner.finish();
            findings.extend_from_slice(scanner.findings());
            if tail.is_empty() {
                continue;
            }
            if let Some(call) = self.assembled.get_mut(&index) {
                call.arguments_json.push_str(&tail);
            }
            chunk.tool_call_deltas.push(ToolCallDelta { index, arguments_delta: tail, ..ToolCallDelta::default() });
        }
        if self.assembled.is_empty() {
            for call in &mut chunk.tool_calls {
                let mut scanner = self.engine.stream_scanner();
                let mut arguments = scanner.push(&call.arguments_json);
                arguments.push_str(&scanner.finish());
                call.arguments_json = arguments;
                findings.extend_from_slice(scanner.findings());
            }
        } else {
            chunk.tool_calls = std::mem::take(&mut self.assembled).into_values().collect();
        }
        findings.extend(self.text_findings());
        findings
    }

    /// What the scanners found so far, for a reply cut before its end.
    pub fn findings(&self) -> Vec<Finding> {
        let calls = self.calls.values().flat_map(|scanner| scanner.findings().iter().cloned());
        self.text_findings().chain(calls).collect()
    }

    fn text_findings(&self) -> impl Iterator<Item = Finding> + '_ {
        [&self.content, &self.reasoning, &self.refusal].into_iter().flat_map(|s| s.findings().iter().cloned())
    }
}

#[cfg(test)]
mod tests {
    use meshgate_policy::PolicyConfig;

    use super::*;

    const SECRET: &str = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";

    fn redacting() -> PolicyEngine {
        let config: PolicyConfig = serde_json::from_value(serde_json::json!({"output": {"action": "redact"}})).unwrap();
        PolicyEngine::new(config).unwrap()
    }

    fn delta(index: i32, id: &str, name: &str, arguments: &str) -> ToolCallDelta {
        ToolCallDelta { index, id: id.into(), function_name: name.into(), arguments_delta: arguments.into() }
    }

    #[test]
    fn a_secret_split_across_tool_call_pieces_is_masked_and_held_no_longer_than_needed() {
        let mut scanner = ReplyScanner::new(&redacting());
        let (head, tail) = SECRET.split_at(10);
        let deltas = [
            delta(0, "call_1", "lookup", r#"{"token": ""#),
            delta(0, "", "", head),
            delta(0, "", "", tail),
            delta(0, "", "", r#""}"#),
            delta(1, "call_2", "other", r#"{"x": 1}"#),
        ];
        let mut sent = BTreeMap::<i32, String>::new();
        for delta in deltas {
            let mut chunk = CompleteChunk { tool_call_deltas: vec![delta], ..Default::default() };
            scanner.push(&mut chunk);
            for d in chunk.tool_call_deltas {
                sent.entry(d.index).or_default().push_str(&d.arguments_delta);
            }
        }
        assert_eq!(sent[&1], r#"{"x": 1}"#, "a harmless call passes at once");
        let mut last = CompleteChunk { finish_reason: "tool_calls".into(), ..Default::default() };
        let findings = scanner.finish(&mut last);
        for d in &last.tool_call_deltas {
            sent.entry(d.index).or_default().push_str(&d.arguments_delta);
        }
        assert!(!sent[&0].contains(SECRET) && sent[&0].contains("[REDACTED:github_token]"), "{}", sent[&0]);
        assert!(findings.iter().any(|f| f.rule.as_str() == "github_token"));
        assert_eq!(last.tool_calls.len(), 2);
        assert_eq!(last.tool_calls[0].arguments_json, sent[&0], "the assembled call is the scanned one");
        assert_eq!((last.tool_calls[0].id.as_str(), last.tool_calls[0].function_name.as_str()), ("call_1", "lookup"));
    }

    #[test]
    fn calls_sent_whole_text_reasoning_and_refusal_are_scanned_too() {
        let mut scanner = ReplyScanner::new(&redacting());
        let mut chunk = CompleteChunk {
            delta: format!("text {SECRET}"),
            reasoning_delta: format!("thinking {SECRET}"),
            refusal_delta: format!("no {SECRET}"),
            ..Default::default()
        };
        scanner.push(&mut chunk);
        let mut last = CompleteChunk {
            finish_reason: "tool_calls".into(),
            tool_calls: vec![ToolCall {
                id: "c".into(),
                r#type: "function".into(),
                function_name: "f".into(),
                arguments_json: format!(r#"{{"k": "{SECRET}"}}"#),
            }],
            ..Default::default()
        };
        let findings = scanner.finish(&mut last);
        let texts = [
            format!("{}{}", chunk.delta, last.delta),
            format!("{}{}", chunk.reasoning_delta, last.reasoning_delta),
            format!("{}{}", chunk.refusal_delta, last.refusal_delta),
            last.tool_calls[0].arguments_json.clone(),
        ];
        for text in texts {
            assert!(!text.contains(SECRET) && text.contains("[REDACTED:github_token]"), "{text}");
        }
        assert_eq!(findings.len(), 4);
    }
}
