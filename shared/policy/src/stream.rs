//! Incremental output scanning for streamed replies.
//!
//! A secret can arrive split across chunks (`"sk-pr"`, `"oj-Ab12…"`). The scanner keeps the
//! unreleased tail of the stream and, after each chunk, releases everything before the earliest
//! position from which a match could still be under way. That position is found exactly: a lazy
//! DFA built from per-rule "liveness" patterns (every prefix of every possible match) is run,
//! anchored, from each candidate start (a byte not preceded by `[A-Za-z0-9_]`, as every match
//! starts) in the tail; the earliest start whose run has not died by the end of the buffer is where
//! the hold begins. In prose that is usually just the last word; an unfinished token, an open PEM
//! block or a `curl …` line is held until it ends.
//!
//! In `redact` mode the released text is masked; in `flag` mode chunks pass through untouched and
//! immediately, and the tail is kept only to detect matches that span chunks. At most
//! [`MAX_HOLD`] bytes are held: a single match longer than that is released in pieces, each piece
//! masked as far as it was matched.

use std::sync::Arc;

use regex_automata::hybrid::dfa::Cache;

use crate::detect::Hit;
use crate::engine::{Finding, PolicyEngine, finding, redact, risk_score};
use crate::liveness::Liveness;
use crate::rules::Action;

/// Upper bound of the held-back tail, in bytes.
pub const MAX_HOLD: usize = 64 * 1024;

/// Released bytes kept in front of the tail for the detectors' look-behind.
const CONTEXT: usize = 8;

/// Scans one streamed reply. Feed it every text delta with [`StreamScanner::push`], forward what it
/// returns, and call [`StreamScanner::finish`] at the end of the stream and forward that too.
pub struct StreamScanner {
    engine: PolicyEngine,
    liveness: Option<Arc<Liveness>>,
    cache: Option<Cache>,
    /// Up to [`CONTEXT`] released bytes, then the held tail.
    buf: String,
    ctx: usize,
    /// Stream offset of `buf[ctx]`.
    base: usize,
    findings: Vec<Finding>,
    action: Action,
    finished: bool,
}

impl std::fmt::Debug for StreamScanner {
    // Deliberately omits the buffer: it may hold a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamScanner")
            .field("held_bytes", &(self.buf.len() - self.ctx))
            .field("offset", &self.base)
            .field("findings", &self.findings)
            .field("action", &self.action)
            .finish()
    }
}

impl PolicyEngine {
    /// An incremental scanner for one streamed reply (one per choice).
    pub fn stream_scanner(&self) -> StreamScanner {
        StreamScanner::new(self.clone(), self.liveness())
    }
}

impl Drop for StreamScanner {
    fn drop(&mut self) {
        if let (Some(liveness), Some(cache)) = (&self.liveness, self.cache.take()) {
            liveness.return_cache(cache);
        }
    }
}

impl StreamScanner {
    pub(crate) fn new(engine: PolicyEngine, liveness: Option<Arc<Liveness>>) -> Self {
        let cache = liveness.as_ref().map(|l| l.take_cache());
        let action = engine.output_action();
        Self {
            engine,
            liveness,
            cache,
            buf: String::new(),
            ctx: 0,
            base: 0,
            findings: Vec::new(),
            action,
            finished: false,
        }
    }

    /// Takes the next chunk; returns the text that may be forwarded now.
    pub fn push(&mut self, chunk: &str) -> String {
        if !self.engine.output_enabled() || self.finished {
            return chunk.to_owned();
        }
        self.buf.push_str(chunk);
        let released = self.release(false);
        if self.action == Action::Redact { released } else { chunk.to_owned() }
    }

    /// Ends the stream; returns the held tail (masked in redact mode).
    pub fn finish(&mut self) -> String {
        if self.finished || !self.engine.output_enabled() {
            self.finished = true;
            return String::new();
        }
        self.finished = true;
        let released = self.release(true);
        if self.action == Action::Redact { released } else { String::new() }
    }

    /// Everything found so far, with offsets into the whole stream.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    pub fn risk(&self) -> u8 {
        risk_score(&self.findings)
    }

    /// Bytes currently held back.
    pub fn held(&self) -> usize {
        self.buf.len() - self.ctx
    }

    fn release(&mut self, finished: bool) -> String {
        let mut hits: Vec<Hit> = Vec::new();
        self.engine.detect_output(&self.buf, self.ctx, &mut hits);
        let len = self.buf.len();
        let cut = if finished { len } else { self.safe_cut(&hits) };
        // Matches wholly released, and (only when MAX_HOLD forced the cut) the released part of
        // one cut through.
        let released: Vec<Hit> = hits
            .iter()
            .filter(|h| h.start < cut)
            .map(|h| Hit { end: h.end.min(cut), ..*h })
            .filter(|h| h.end > h.start)
            .collect();
        for h in &released {
            let start = self.base + h.start - self.ctx;
            let end = self.base + h.end - self.ctx;
            self.findings.push(finding(h.rule, self.action, 0, start, end, None));
        }
        let text = &self.buf[self.ctx..cut];
        let out = if self.action == Action::Redact && !released.is_empty() {
            let shifted: Vec<Hit> = released
                .iter()
                .map(|h| Hit { start: h.start - self.ctx, end: h.end - self.ctx, anchor: h.anchor - self.ctx, ..*h })
                .collect();
            redact(text, &shifted)
        } else {
            text.to_owned()
        };
        self.base += cut - self.ctx;
        // The last released bytes stay as context: detectors look up to two bytes back.
        let keep_from = if cut > self.ctx {
            let mut k = cut.saturating_sub(CONTEXT);
            while !self.buf.is_char_boundary(k) {
                k += 1;
            }
            k
        } else {
            0
        };
        self.buf.drain(..keep_from);
        self.ctx = cut - keep_from;
        out
    }

    /// The earliest position that may be part of a match still under way.
    fn safe_cut(&mut self, hits: &[Hit]) -> usize {
        let len = self.buf.len();
        let mut lo = len.saturating_sub(MAX_HOLD).max(self.ctx);
        while !self.buf.is_char_boundary(lo) {
            lo += 1;
        }
        let mut hold = match (&self.liveness, &mut self.cache) {
            (Some(liveness), Some(cache)) => liveness.earliest_live(cache, &self.buf, lo).unwrap_or(len),
            _ => len,
        };
        // A finished match the hold point falls inside is held whole, with the context it was
        // recognised by: otherwise the next scan, starting after the released part, would miss it.
        while let Some(h) = hits.iter().find(|h| h.anchor >= lo && h.anchor < hold && h.end > hold) {
            hold = h.anchor;
        }
        hold
    }
}
