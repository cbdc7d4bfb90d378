//! Server-Sent Events: an incremental decoder for provider answers and the framing of the
//! events meshgate writes. The decoder: bytes go in as the network delivers them (an event
//! may be split anywhere, even inside a UTF-8 sequence), complete events come out.
//!
//! Follows the WHATWG event-stream rules that matter for LLM providers: `\n` or `\r\n` line ends,
//! `data:` lines joined with `\n`, `event:` names, `:` comments and other fields ignored, one
//! optional space after the colon stripped, an event dispatched at a blank line.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field (`None` for the default `message` type).
    pub event: Option<String>,
    /// The joined `data:` lines.
    pub data: String,
}

/// What makes a byte stream an invalid event stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an event or line exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("a line is not valid UTF-8")]
    InvalidUtf8,
}

/// The decoder state between reads.
#[derive(Debug)]
pub struct SseDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` before this offset are already known to hold no line end.
    scanned: usize,
    pending: Pending,
    limit: usize,
}

/// The event being assembled from its lines.
#[derive(Debug)]
struct Pending {
    event: Option<String>,
    data: String,
    has_data: bool,
    limit: usize,
}

impl SseDecoder {
    /// A decoder refusing lines or events larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::with_capacity(4096),
            scanned: 0,
            pending: Pending { event: None, data: String::new(), has_data: false, limit },
            limit,
        }
    }

    /// Appends bytes read from the network.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.limit && !self.buf[self.scanned..].contains(&b'\n') {
            return Err(SseError::TooLarge { limit: self.limit });
        }
        Ok(())
    }

    /// The next complete event, if the bytes pushed so far hold one.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, SseError> {
        let mut consumed = 0;
        let result = loop {
            let Some(offset) = self.buf[consumed.max(self.scanned)..].iter().position(|b| *b == b'\n') else {
                self.scanned = self.buf.len() - consumed;
                break Ok(None);
            };
            let end = consumed.max(self.scanned) + offset;
            let mut line = &self.buf[consumed..end];
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            let line = match std::str::from_utf8(line) {
                Ok(line) => line,
                Err(_) => break Err(SseError::InvalidUtf8),
            };
            consumed = end + 1;
            self.scanned = 0;
            if let Some(event) = self.pending.take_line(line)? {
                break Ok(Some(event));
            }
        };
        self.buf.drain(..consumed);
        result
    }

    /// Ends the stream: an unterminated last line or event is dispatched rather than lost
    /// (some servers omit the final blank line).
    pub fn finish(&mut self) -> Result<Option<SseEvent>, SseError> {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            let line = std::str::from_utf8(&rest).map_err(|_| SseError::InvalidUtf8)?;
            // A non-empty line never dispatches; the blank line below does.
            self.pending.take_line(line.strip_suffix('\r').unwrap_or(line))?;
        }
        self.pending.take_line("")
    }
}

impl Pending {
    fn take_line(&mut self, line: &str) -> Result<Option<SseEvent>, SseError> {
        if line.is_empty() {
            if !self.has_data {
                self.event = None;
                return Ok(None);
            }
            self.has_data = false;
            return Ok(Some(SseEvent { event: self.event.take(), data: std::mem::take(&mut self.data) }));
        }
        if line.starts_with(':') {
            return Ok(None);
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.data.len() + value.len() + 1 > self.limit {
                    return Err(SseError::TooLarge { limit: self.limit });
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_owned()),
            _ => {}
        }
        Ok(None)
    }
}

/// The line that ends an OpenAI stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// Appends one event to `out`: an optional `event:` line, one `data:` line per line of `data`
/// (so a payload holding newlines survives the round trip), and the blank line that dispatches it.
/// `data` must hold no `\r` (JSON text never does): readers take it for a line end.
pub fn write_event(out: &mut Vec<u8>, event: Option<&str>, data: &str) {
    if let Some(name) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
}

/// Appends one event whose data is `payload` as JSON, written straight into `out` on one
/// `data:` line. Documents embedded as they came (a client's schema, a provider's logprobs) may
/// hold line ends between their tokens; those are whitespace to JSON (inside a JSON string a line
/// end is always escaped), so they are written as spaces.
pub fn write_json_event<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, event: Option<&str>, payload: &T) {
    if let Some(name) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    let start = out.len();
    serde_json::to_writer(&mut *out, payload).expect("an event payload serializes");
    for byte in &mut out[start..] {
        if matches!(*byte, b'\n' | b'\r') {
            *byte = b' ';
        }
    }
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_events_are_one_data_line() {
        let mut out = Vec::new();
        write_json_event(&mut out, Some("ping"), &serde_json::json!({"text": "a\nb\r"}));
        assert_eq!(out, b"event: ping\ndata: {\"text\":\"a\\nb\\r\"}\n\n");
        // A document kept as the client wrote it, line ends and all.
        #[derive(serde::Serialize)]
        struct Document<'a> {
            schema: &'a serde_json::value::RawValue,
        }
        let schema: Box<serde_json::value::RawValue> = serde_json::from_str("{\n  \"a\": \"x\\ny\"\r\n}").unwrap();
        let mut out = Vec::new();
        write_json_event(&mut out, None, &Document { schema: &schema });
        assert_eq!(out, b"data: {\"schema\":{   \"a\": \"x\\ny\"  }}\n\n");
        let data: serde_json::Value = serde_json::from_slice(&out[6..out.len() - 2]).unwrap();
        assert_eq!(data["schema"]["a"], "x\ny");
    }

    fn drain(decoder: &mut SseDecoder) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(event) = decoder.next_event().unwrap() {
            out.push(event);
        }
        out
    }

    fn data(s: &str) -> SseEvent {
        SseEvent { event: None, data: s.to_owned() }
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::super::*;

        /// Events as a provider writes them: optional name, data of one or more lines, and
        /// comments between events, with `\n` or `\r\n` line ends.
        fn events() -> impl Strategy<Value = (Vec<SseEvent>, String)> {
            let event = (
                proptest::option::of("[a-z_.]{1,12}"),
                proptest::collection::vec("[^\r\n]{0,40}", 1..4),
                any::<bool>(),
                any::<bool>(),
            );
            proptest::collection::vec(event, 0..12).prop_map(|events| {
                let mut wire = String::new();
                let mut expected = Vec::new();
                for (name, lines, crlf, comment) in events {
                    let end = if crlf { "\r\n" } else { "\n" };
                    if comment {
                        wire.push_str(&format!(": keep-alive{end}"));
                    }
                    if let Some(name) = &name {
                        wire.push_str(&format!("event: {name}{end}"));
                    }
                    for line in &lines {
                        wire.push_str(&format!("data: {line}{end}"));
                    }
                    wire.push_str(end);
                    // The one space after `data:` is the writer's; the decoder strips it alone.
                    expected.push(SseEvent { event: name, data: lines.join("\n") });
                }
                (expected, wire)
            })
        }

        fn chunked(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            points.push(0);
            points.push(bytes.len());
            points.sort_unstable();
            points.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// However the network splits a stream, the same events come out, in order.
            #[test]
            fn any_chunking_decodes_the_events_written((expected, wire) in events(), cuts in proptest::collection::vec(any::<usize>(), 0..24)) {
                let mut decoder = SseDecoder::new(1 << 16);
                let mut events = Vec::new();
                for chunk in chunked(wire.as_bytes(), &cuts) {
                    decoder.push(&chunk).unwrap();
                    while let Some(event) = decoder.next_event().unwrap() {
                        events.push(event);
                    }
                }
                prop_assert_eq!(decoder.finish().unwrap(), None);
                prop_assert_eq!(events, expected);
            }

            /// Arbitrary bytes never panic, and the decoder holds no more than its limit plus the
            /// chunk it was just given.
            #[test]
            fn arbitrary_bytes_are_decoded_or_refused_within_the_limit(
                bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                cuts in proptest::collection::vec(any::<usize>(), 0..16),
            ) {
                let limit = 256;
                let mut decoder = SseDecoder::new(limit);
                for chunk in chunked(&bytes, &cuts) {
                    if decoder.push(&chunk).is_err() {
                        return Ok(());
                    }
                    loop {
                        match decoder.next_event() {
                            Ok(Some(event)) => prop_assert!(event.data.len() <= limit),
                            Ok(None) => break,
                            Err(_) => return Ok(()),
                        }
                    }
                    prop_assert!(decoder.buf.len() <= limit + chunk.len(), "{} bytes held", decoder.buf.len());
                }
                let _ = decoder.finish();
            }
        }
    }

    #[test]
    fn events_split_at_every_byte_boundary() {
        let stream = "data: {\"a\":\"é\"}\n\n: keep-alive\n\ndata: two\r\ndata: lines\r\n\r\nevent: error\ndata:x\n\ndata: [DONE]\n\n";
        let expected = vec![
            data("{\"a\":\"é\"}"),
            data("two\nlines"),
            SseEvent { event: Some("error".into()), data: "x".into() },
            data("[DONE]"),
        ];
        for split in 0..stream.len() {
            let mut decoder = SseDecoder::new(1024);
            let (a, b) = stream.as_bytes().split_at(split);
            decoder.push(a).unwrap();
            let mut events = drain(&mut decoder);
            decoder.push(b).unwrap();
            events.extend(drain(&mut decoder));
            assert_eq!(events, expected, "split at {split}");
            assert_eq!(decoder.finish().unwrap(), None);
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let stream = b"data: hello\n\ndata: world\n\n";
        let mut decoder = SseDecoder::new(64);
        let mut events = Vec::new();
        for byte in stream {
            decoder.push(&[*byte]).unwrap();
            events.extend(drain(&mut decoder));
        }
        assert_eq!(events, vec![data("hello"), data("world")]);
    }

    #[test]
    fn unterminated_last_event_is_flushed_at_the_end() {
        let mut decoder = SseDecoder::new(64);
        decoder.push(b"data: [DONE]").unwrap();
        assert_eq!(decoder.next_event().unwrap(), None);
        assert_eq!(decoder.finish().unwrap(), Some(data("[DONE]")));

        let mut decoder = SseDecoder::new(64);
        decoder.push(b"data: [DONE]\n").unwrap();
        assert_eq!(decoder.next_event().unwrap(), None);
        assert_eq!(decoder.finish().unwrap(), Some(data("[DONE]")));
    }

    #[test]
    fn oversized_lines_and_invalid_utf8_are_errors() {
        let mut decoder = SseDecoder::new(16);
        assert_eq!(decoder.push(&[b'x'; 17]), Err(SseError::TooLarge { limit: 16 }));

        let mut decoder = SseDecoder::new(16);
        decoder.push(b"data: 0123456789\ndata: 0123456789\n").unwrap();
        assert_eq!(decoder.next_event(), Err(SseError::TooLarge { limit: 16 }));

        let mut decoder = SseDecoder::new(16);
        decoder.push(b"data: \xff\xfe\n\n").unwrap();
        assert_eq!(decoder.next_event(), Err(SseError::InvalidUtf8));
    }

    #[test]
    fn blank_lines_without_data_dispatch_nothing() {
        let mut decoder = SseDecoder::new(64);
        decoder.push(b"\n\nevent: ping\n\nid: 3\nretry: 10\n\n").unwrap();
        assert!(drain(&mut decoder).is_empty());
    }
    #[test]
    fn written_events_decode_to_themselves() {
        let mut wire = Vec::new();
        write_event(&mut wire, None, r#"{"a":1}"#);
        write_event(&mut wire, Some("message_stop"), "two\nlines");
        wire.extend_from_slice(DONE);
        assert_eq!(wire, b"data: {\"a\":1}\n\nevent: message_stop\ndata: two\ndata: lines\n\ndata: [DONE]\n\n");
        let mut decoder = SseDecoder::new(1024);
        decoder.push(&wire).unwrap();
        assert_eq!(
            drain(&mut decoder),
            vec![
                data(r#"{"a":1}"#),
                SseEvent { event: Some("message_stop".into()), data: "two\nlines".into() },
                data("[DONE]")
            ]
        );
    }
}
