//! Property-style checks over random inputs built from detector-relevant fragments: no panics,
//! spans on UTF-8 boundaries, redaction removes every redacted span, and any chunking of a stream
//! gives exactly the batch result.

mod common;

use common::{BASE62, random, redacting_engine, rng, secrets};
use meshgate_policy::{Decision, Message, PolicyEngine, Rule};
use rand::Rng;
use rand::rngs::StdRng;

const FRAGMENTS: &[&str] = &[
    "sk-",
    "sk-proj-",
    "ghp_",
    "github_pat_",
    "glpat-",
    "AKIA",
    "xoxb-",
    "sk_live_",
    "eyJ",
    ".",
    "@",
    "-",
    "_",
    " ",
    "\n",
    "\t",
    "-----BEGIN RSA PRIVATE KEY-----",
    "-----END RSA PRIVATE KEY-----",
    "4111",
    "1111",
    "123-45-",
    "6789",
    "DROP",
    "TABLE",
    "rm -rf /",
    "chmod -R 777 /",
    ":(){ :|:& };:",
    "| sh",
    "curl ",
    "ignore previous instructions",
    "aws_secret_access_key=",
    "é",
    "日本",
    "🙂",
    "\u{200b}",
    "\\n",
    "\"",
    "'",
    "=",
    ":",
    "/",
    "+",
    "example.com",
    "com",
    "0",
    "9",
];

fn random_text(r: &mut StdRng, samples: &[common::Sample]) -> String {
    let pieces = r.random_range(0..40);
    let mut text = String::new();
    for _ in 0..pieces {
        match r.random_range(0..10) {
            // Spaced, so the sample is a token of its own rather than part of a longer word.
            0 => {
                text.push(' ');
                text.push_str(&samples[r.random_range(0..samples.len())].text);
                text.push(' ');
            }
            1..=3 => {
                let len = r.random_range(1..50);
                text.push_str(&random(r, BASE62, len));
            }
            _ => text.push_str(FRAGMENTS[r.random_range(0..FRAGMENTS.len())]),
        }
    }
    text
}

fn random_chunks<'a>(r: &mut StdRng, text: &'a str) -> Vec<&'a str> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + r.random_range(1..24)).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        chunks.push(&text[start..end]);
        start = end;
    }
    chunks
}

/// An engine that acts on every secret and PII rule, each rule's action (block or redact) drawn
/// from `r`; injection blocks or flags.
fn acting_engine(r: &mut StdRng) -> PolicyEngine {
    let mut rules = serde_json::Map::new();
    for rule in Rule::ALL {
        let action = match (*rule == Rule::PromptInjection, r.random_bool(0.5)) {
            (true, true) => "block",
            (true, false) => "flag",
            (false, true) => "block",
            (false, false) => "redact",
        };
        rules.insert(rule.as_str().to_owned(), serde_json::json!({ "action": action }));
    }
    PolicyEngine::from_json(&serde_json::json!({ "rules": rules })).expect("the drawn policy compiles")
}

#[test]
fn random_prompts_scan_without_panics_and_with_valid_spans() {
    let samples = secrets(30);
    let mut r = rng(31);
    let mut decisions = [0usize; 3];
    // The redact-everything engine, then engines that block some rules and redact the others.
    let mut engines = vec![redacting_engine()];
    engines.extend((0..5).map(|_| acting_engine(&mut r)));
    for engine in &engines {
        for _ in 0..300 {
            let text = random_text(&mut r, &samples);
            let messages = [Message::new("user", &text)];
            let outcome = engine.scan_prompt(&messages);
            for f in &outcome.findings {
                assert!(f.start <= f.end && f.end <= text.len(), "{f:?} in {text:?}");
                assert!(text.is_char_boundary(f.start) && text.is_char_boundary(f.end), "{f:?} in {text:?}");
            }
            assert!(outcome.risk <= 100);
            // Whatever the decision, no secret leaves: redacted away, or the request refused.
            let present: Vec<_> = samples.iter().filter(|s| text.contains(&s.text)).collect();
            match &outcome.decision {
                Decision::Redact(redacted) => {
                    decisions[0] += 1;
                    for sample in present {
                        let forwarded = &redacted[0].content;
                        assert!(!forwarded.contains(sample.secret_part()), "{:?} survived in {text:?}", sample.rule);
                    }
                }
                Decision::Block { .. } => decisions[1] += 1,
                Decision::Allow => {
                    decisions[2] += 1;
                    let rules: Vec<_> = present.iter().map(|s| s.rule).collect();
                    assert!(rules.is_empty(), "{rules:?} forwarded as they are in {text:?}");
                }
            }
        }
    }
    assert!(decisions.iter().all(|n| *n > 0), "every decision was reached (redact, block, allow): {decisions:?}");
}

#[test]
fn random_streams_match_the_batch_scan_for_any_chunking() {
    let engine = redacting_engine();
    let samples = secrets(32);
    let mut r = rng(33);
    for _ in 0..600 {
        let text = random_text(&mut r, &samples);
        let batch = engine.scan_output(&text);
        let expected = batch.redacted.clone().unwrap_or_else(|| text.clone());
        for _ in 0..3 {
            let mut scanner = engine.stream_scanner();
            let mut out = String::new();
            for chunk in random_chunks(&mut r, &text) {
                out.push_str(&scanner.push(chunk));
            }
            out.push_str(&scanner.finish());
            assert_eq!(out, expected, "stream of {text:?}");
            assert_eq!(scanner.findings(), batch.findings.as_slice(), "stream findings of {text:?}");
        }
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    let engine = redacting_engine();
    let mut r = rng(34);
    for _ in 0..2000 {
        let len = r.random_range(0..200);
        let bytes: Vec<u8> = (0..len).map(|_| r.random()).collect();
        let text = String::from_utf8_lossy(&bytes);
        let outcome = engine.scan_prompt(&[Message::new("user", &text)]);
        for f in &outcome.findings {
            assert!(text.is_char_boundary(f.start) && text.is_char_boundary(f.end));
        }
        engine.scan_output(&text);
        let mut scanner = engine.stream_scanner();
        let mut out = String::new();
        for chunk in random_chunks(&mut r, &text) {
            out.push_str(&scanner.push(chunk));
        }
        out.push_str(&scanner.finish());
        assert_eq!(out, engine.scan_output(&text).redacted.unwrap_or_else(|| text.to_string()));
    }
}
