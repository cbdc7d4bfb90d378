//! Redaction never leaks the secret: not in the redacted text, not in findings or their `Debug`
//! output, not in events, not in the 422, not in the output and stream paths.

mod common;

use common::{default_engine, redacting_engine, secrets};
use meshgate_policy::{Action, Decision, Message, PolicyEngine, Rule, SanitizedHeaders};

fn assert_absent(haystack: &str, secret: &str, what: &str) {
    assert!(!haystack.contains(secret), "{what} leaks the secret");
    // No 8-character window of the secret either (a partial leak is still a leak).
    let bytes = secret.as_bytes();
    for window in bytes.windows(8).step_by(4) {
        let window = std::str::from_utf8(window).unwrap_or_default();
        if window.chars().all(|c| c.is_ascii_alphanumeric()) && window.bytes().any(|b| b.is_ascii_digit()) {
            assert!(!haystack.contains(window), "{what} leaks part of the secret ({window:?})");
        }
    }
}

fn redacted_content(decision: &Decision) -> Vec<String> {
    match decision {
        Decision::Redact(messages) => messages.iter().map(|m| m.content.clone()).collect(),
        other => panic!("expected a redaction, got {other:?}"),
    }
}

#[test]
fn redacted_prompts_keep_only_the_public_hint() {
    let engine = default_engine();
    for sample in secrets(10) {
        let prompt = format!("Here it is: {} -- please debug my script.", sample.text);
        let outcome = engine.scan_prompt(&[Message::new("user", &prompt)]);
        let contents = redacted_content(&outcome.decision);
        assert_eq!(contents.len(), 1);
        let marker = format!("[REDACTED:{}]", sample.rule);
        let expected = format!("Here it is: {}…{marker} -- please debug my script.", sample.public_prefix);
        assert_eq!(contents[0], expected, "{:?}", sample.rule);
        assert_absent(&contents[0], sample.secret_part(), "redacted prompt");
        assert_absent(&format!("{outcome:?}"), sample.secret_part(), "ScanOutcome Debug");
        let events = outcome.events("req-1", &SanitizedHeaders::default());
        assert_eq!(events.len(), 1);
        assert_absent(&serde_json::to_string(&events).unwrap(), sample.secret_part(), "security events");
        assert!(outcome.risk >= 70, "{:?}: a leaked credential is high risk, got {}", sample.rule, outcome.risk);
    }
}

#[test]
fn blocked_requests_name_the_rule_and_never_echo_the_secret() {
    let mut rules = serde_json::Map::new();
    for rule in Rule::ALL {
        rules.insert(rule.as_str().to_owned(), serde_json::json!({ "action": "block" }));
    }
    let engine = PolicyEngine::from_json(&serde_json::json!({ "rules": rules })).unwrap();
    for sample in secrets(11) {
        let outcome = engine.scan_prompt(&[Message::new("user", &sample.text)]);
        assert_eq!(outcome.decision, Decision::Block { rule: sample.rule });
        let err = outcome.block_error().expect("a blocked request has an error");
        assert_eq!(err.code.http_status().as_u16(), 422);
        assert!(err.message.contains(sample.rule.as_str()), "{}", err.message);
        assert_absent(&err.message, sample.secret_part(), "422 message");
        assert_absent(&format!("{err:?}"), sample.secret_part(), "ApiError Debug");
        assert_eq!(err.headers, vec![("x-meshgate-policy-rule", sample.rule.as_str().to_owned())]);
    }
}

#[test]
fn pii_keywords_and_shell_commands_redact_without_a_hint() {
    let engine = redacting_engine();
    let cases = [
        ("mail jane.doe@corp-mail.io now", "jane.doe@corp-mail.io", "mail [REDACTED:email] now"),
        ("ssn 123-45-6789.", "123-45-6789", "ssn [REDACTED:us_ssn]."),
        ("pay with 4111 1111 1111 1111 ok", "4111 1111 1111 1111", "pay with [REDACTED:card_number] ok"),
        ("then DROP TABLE users", "DROP TABLE", "then [REDACTED:blocked_keyword] users"),
        ("run dd if=/dev/zero of=/dev/sda please", "of=/dev/sda", "run [REDACTED:unsafe_shell] please"),
    ];
    for (prompt, secret, expected) in cases {
        let outcome = engine.scan_prompt(&[Message::new("user", prompt)]);
        assert_eq!(redacted_content(&outcome.decision), vec![expected.to_owned()], "{prompt}");
        assert!(!format!("{outcome:?}").contains(secret));
    }
}

#[test]
fn overlapping_matches_merge_into_one_mask() {
    let engine = redacting_engine();
    // `rm -rf /` is both a blocked keyword and an unsafe shell command.
    let outcome = engine.scan_prompt(&[Message::new("user", "now sudo rm -rf / ok")]);
    let rules: Vec<_> = outcome.findings.iter().map(|f| f.rule).collect();
    assert!(rules.contains(&Rule::BlockedKeyword) && rules.contains(&Rule::UnsafeShell), "{rules:?}");
    let contents = redacted_content(&outcome.decision);
    assert_eq!(contents.len(), 1);
    assert!(!contents[0].contains("rm -rf"), "{}", contents[0]);
    assert_eq!(contents[0].matches("[REDACTED:").count(), 1, "{}", contents[0]);
}

#[test]
fn flagged_findings_leave_the_text_alone() {
    let engine =
        PolicyEngine::from_json(&serde_json::json!({ "rules": { "openai_key": { "action": "flag" } } })).unwrap();
    let secret = &secrets(12)[0].text;
    let outcome = engine.scan_prompt(&[Message::new("user", secret)]);
    assert_eq!(outcome.decision, Decision::Allow);
    assert_eq!(outcome.findings[0].action, Action::Flag);
    assert!(!format!("{outcome:?}").contains(secret.as_str()));
}

#[test]
fn output_and_streams_are_redacted_the_same_way() {
    let engine = redacting_engine();
    for sample in secrets(13) {
        let reply = format!("Sure! Use `{}` in your config.", sample.text);
        let scan = engine.scan_output(&reply);
        let redacted = scan.redacted.clone().expect("the reply is redacted");
        assert_absent(&redacted, sample.secret_part(), "redacted reply");
        assert_absent(&format!("{scan:?}"), sample.secret_part(), "OutputScan Debug");
        let mut scanner = engine.stream_scanner();
        let mut streamed = String::new();
        for chunk in reply.as_bytes().chunks(5) {
            streamed.push_str(&scanner.push(std::str::from_utf8(chunk).unwrap()));
            assert_absent(&streamed, sample.secret_part(), "stream so far");
        }
        streamed.push_str(&scanner.finish());
        assert_eq!(streamed, redacted, "{:?}", sample.rule);
        assert_absent(&format!("{scanner:?}"), sample.secret_part(), "StreamScanner Debug");
        let events = scanner.events("req-2", &SanitizedHeaders::default());
        assert_absent(&serde_json::to_string(&events).unwrap(), sample.secret_part(), "stream events");
    }
}

#[test]
fn flag_mode_output_passes_through_but_reports() {
    let engine = default_engine();
    let sample = &secrets(14)[1];
    let reply = format!("key: {}", sample.text);
    let scan = engine.scan_output(&reply);
    assert_eq!(scan.redacted, None);
    assert_eq!(scan.findings.len(), 1);
    assert_eq!(scan.findings[0].action, Action::Flag);
    let mut scanner = engine.stream_scanner();
    let mut streamed = String::new();
    for chunk in reply.as_bytes().chunks(7) {
        streamed.push_str(&scanner.push(std::str::from_utf8(chunk).unwrap()));
    }
    streamed.push_str(&scanner.finish());
    assert_eq!(streamed, reply, "flag mode never alters the stream");
    assert_eq!(scanner.findings(), scan.findings.as_slice());
}
