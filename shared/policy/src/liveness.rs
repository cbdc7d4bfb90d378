//! The liveness automaton behind the streaming scanner's hold-back: from which position of the
//! unreleased tail a match of an output rule could still be under way. It is a lazy DFA built
//! from per-rule "liveness" patterns (every prefix of every possible match), compiled once per
//! engine and shared by its stream scanners.

use std::sync::{Mutex, PoisonError};

use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::{Anchored, Input, MatchKind};

use crate::detect::{Keywords, RuleMask, boundary_before, liveness_patterns};
use crate::rules::Rule;

/// Caches kept for reuse at most (one per reply streamed at once is plenty).
const POOLED_CACHES: usize = 64;

/// The compiled liveness automaton of one engine's output rules, and the lazy DFA's caches of
/// the replies it scanned: a cache holds the states determinized so far, so a reply that reuses
/// one skips the determinization earlier replies already paid for.
#[derive(Debug)]
pub(crate) struct Liveness {
    dfa: DFA,
    caches: Mutex<Vec<Cache>>,
}

impl Liveness {
    pub fn build(mask: &RuleMask, keywords: Option<&Keywords>) -> Result<Option<Self>, String> {
        let mut patterns: Vec<String> = Vec::new();
        for rule in mask.rules() {
            for pattern in liveness_patterns(rule) {
                if !patterns.iter().any(|p| p == pattern) {
                    patterns.push((*pattern).to_owned());
                }
            }
        }
        if mask.has(Rule::BlockedKeyword)
            && let Some(keywords) = keywords
        {
            patterns.extend(keywords.liveness_patterns());
        }
        if patterns.is_empty() {
            return Ok(None);
        }
        let dfa = DFA::builder()
            .configure(DFA::config().match_kind(MatchKind::All).skip_cache_capacity_check(true))
            .thompson(regex_automata::nfa::thompson::Config::new().nfa_size_limit(None))
            .build_many(&patterns)
            .map_err(|e| format!("output liveness automaton: {e}"))?;
        Ok(Some(Self { dfa, caches: Mutex::new(Vec::new()) }))
    }

    /// A cache from the pool, or a new one.
    pub fn take_cache(&self) -> Cache {
        let pooled = self.caches.lock().unwrap_or_else(PoisonError::into_inner).pop();
        pooled.unwrap_or_else(|| self.dfa.create_cache())
    }

    /// Gives a cache back for the next reply.
    pub fn return_cache(&self, cache: Cache) {
        let mut caches = self.caches.lock().unwrap_or_else(PoisonError::into_inner);
        if caches.len() < POOLED_CACHES {
            caches.push(cache);
        }
    }

    /// The earliest candidate start in `[lo, len)` from which the text to the end is still a
    /// prefix of some match.
    pub fn earliest_live(&self, cache: &mut Cache, hay: &str, lo: usize) -> Option<usize> {
        let bytes = hay.as_bytes();
        (lo..bytes.len())
            .filter(|&p| hay.is_char_boundary(p) && boundary_before(bytes, p))
            .find(|&p| self.alive_from(cache, hay, p))
    }

    fn alive_from(&self, cache: &mut Cache, hay: &str, p: usize) -> bool {
        let input = Input::new(hay).range(p..).anchored(Anchored::Yes);
        // A cache failure means "unknown": holding is the safe answer.
        let Ok(mut sid) = self.dfa.start_state_forward(cache, &input) else { return true };
        for &b in &hay.as_bytes()[p..] {
            match self.dfa.next_state(cache, sid, b) {
                Ok(next) if next.is_dead() => return false,
                Ok(next) if next.is_quit() => return true,
                Ok(next) => sid = next,
                Err(_) => return true,
            }
        }
        // Matches are reported one byte late, so a state that is not dead may only be carrying
        // the match that ended at the previous byte. The run is alive only if some next byte
        // keeps it going.
        (0..=u8::MAX).any(|b| self.dfa.next_state(cache, sid, b).is_ok_and(|next| !next.is_dead()))
    }
}
