//! What a holder knows of one lease, without I/O: what the store holds for it, what requests
//! admitted under it still need, the usage not yet reported, and the call that reports it.
//!
//! The accounting that keeps a holder exact: a request is admitted only when every limit the lease
//! holds has its needs free (`held - in_flight - spent not yet charged`), and each call keeps
//! everything admitted requests could still use. A renewal keeps the whole unspent hold, so
//! requests admitted while it is on the wire stay covered whatever it answers; a return keeps only
//! what requests in flight need, and nothing is admitted under the lease while it is out.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use meshgate_proto::common::v1::Principal;
use meshgate_proto::quota::v1 as pb;

/// The limits a lease holds slices of, in the order of [`pb::LeaseAmounts`].
pub(crate) const LIMITS: usize = 4;
const TOKENS: usize = 0;
const COST: usize = 1;
const MINUTE_TOKENS: usize = 3;

/// Amounts in each limit a lease holds a slice of: daily tokens, daily cost, the minute's
/// requests, the minute's tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Amounts(pub [i64; LIMITS]);

impl Amounts {
    /// What one request with these estimates needs.
    pub fn of_request(tokens: i64, cost_micros: i64) -> Self {
        Self([tokens, cost_micros, 1, tokens])
    }

    /// What a request in flight keeps held: its estimates (its request already counted).
    fn in_flight(self) -> Self {
        Self([self.0[TOKENS], self.0[COST], 0, self.0[MINUTE_TOKENS]])
    }

    pub fn add(&mut self, other: Self) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_add(b);
        }
    }

    pub fn sub(&mut self, other: Self) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_sub(b);
        }
    }

    /// The larger of each limit's amounts.
    pub fn max_each(self, other: Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i].max(other.0[i])))
    }

    /// Within the bounds the quota service accepts in a call (larger asks are refused there).
    pub fn capped(self) -> Self {
        const MAX: [i64; LIMITS] = [1_000_000_000_000, 1_000_000_000_000_000, 1_000_000_000, 1_000_000_000];
        Self(std::array::from_fn(|i| self.0[i].clamp(0, MAX[i])))
    }

    pub fn from_proto(a: Option<&pb::LeaseAmounts>) -> Self {
        let a = a.cloned().unwrap_or_default();
        Self([a.tokens, a.cost_micros, a.minute_requests, a.minute_tokens])
    }

    pub fn to_proto(self) -> pb::LeaseAmounts {
        let [tokens, cost_micros, minute_requests, minute_tokens] = self.0.map(|v| v.max(0));
        pb::LeaseAmounts { tokens, cost_micros, minute_requests, minute_tokens }
    }
}

/// Usage spent under a lease and not yet acknowledged by the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Spent {
    pub tokens: i64,
    pub cost_micros: i64,
    pub started_requests: i64,
    pub settled_requests: i64,
}

impl Spent {
    /// What it takes of each limit's slice.
    fn consumed(self) -> Amounts {
        Amounts([self.tokens, self.cost_micros, self.started_requests, self.tokens])
    }

    fn is_empty(self) -> bool {
        self == Self::default()
    }

    fn to_proto(self) -> pb::LeaseSpent {
        pb::LeaseSpent {
            tokens: self.tokens,
            cost_micros: self.cost_micros,
            started_requests: self.started_requests,
            settled_requests: self.settled_requests,
        }
    }
}

/// What a call asks of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// Keep the unspent hold and carve up to `want` more, or nothing unless `need` fits.
    Renew { want: Amounts, need: Amounts },
    /// Keep only what requests in flight need.
    Return,
}

/// A call on the wire (or to be sent again: a call without an answer is resent as it was, so the
/// store applies it once).
#[derive(Debug, Clone)]
pub(crate) struct Sending {
    pub request: pb::LeaseRequest,
    spent: Spent,
    returning: bool,
}

/// Whether a lease serves admissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Active,
    /// Returned (idle, or its scope ran low): kept alive only for the requests in flight.
    Draining,
    /// Its daily window is over: settled and returned, never used again.
    Retiring,
}

/// One lease as its holder keeps it.
#[derive(Debug)]
pub(crate) struct LeaseBook {
    pub lease_id: String,
    sequence: i64,
    /// What the store holds, per the last answer; -1 where no scope sets a limit.
    held: Amounts,
    /// Estimates of the requests admitted and not settled.
    in_flight: Amounts,
    pending: Spent,
    pub sending: Option<Sending>,
    /// When the hold may have ended in the store (the store's lifetime counted from the moment
    /// the call left, less a margin for clocks). Nothing is admitted after it.
    live_until: Option<Instant>,
    /// The end of the lease's daily window, by the store's clock.
    pub window_reset: Option<DateTime<Utc>>,
    pub mode: Mode,
}

impl LeaseBook {
    pub fn new(lease_id: String) -> Self {
        Self {
            lease_id,
            sequence: 0,
            held: Amounts::default(),
            in_flight: Amounts::default(),
            pending: Spent::default(),
            sending: None,
            live_until: None,
            window_reset: None,
            mode: Mode::Active,
        }
    }

    /// What is free for new requests in each limit (`None` where the lease does not count).
    pub fn available(&self) -> [Option<i64>; LIMITS] {
        let mut used = self.in_flight;
        used.add(self.pending.consumed());
        if let Some(sending) = &self.sending {
            used.add(sending.spent.consumed());
        }
        std::array::from_fn(|i| (self.held.0[i] >= 0).then(|| self.held.0[i].saturating_sub(used.0[i])))
    }

    /// Whether requests may be admitted under the lease now.
    pub fn admissible(&self, now: Instant, wall: DateTime<Utc>) -> bool {
        self.mode == Mode::Active
            && !self.sending.as_ref().is_some_and(|s| s.returning)
            && self.live_until.is_some_and(|until| now < until)
            && self.window_reset.is_none_or(|reset| wall < reset)
    }

    /// Admits a request needing `need` if every limit the lease counts has it free.
    pub fn try_admit(&mut self, need: Amounts) -> bool {
        let fits = self.available().iter().zip(need.0).all(|(free, need)| free.is_none_or(|free| free >= need));
        if fits {
            self.in_flight.add(need.in_flight());
            self.pending.started_requests += 1;
        }
        fits
    }

    /// Settles a request admitted with `need`: its usage (tokens, cost) when it was served.
    pub fn settle(&mut self, need: Amounts, usage: Option<(i64, i64)>) {
        self.in_flight.sub(need.in_flight());
        if let Some((tokens, cost_micros)) = usage {
            self.pending.tokens = self.pending.tokens.saturating_add(tokens);
            self.pending.cost_micros = self.pending.cost_micros.saturating_add(cost_micros);
            self.pending.settled_requests += 1;
        }
    }

    /// Whether there is usage the store has not acknowledged.
    pub fn has_unreported(&self) -> bool {
        !self.pending.is_empty() || self.sending.is_some()
    }

    pub fn has_in_flight(&self) -> bool {
        self.in_flight.0.iter().any(|v| *v > 0)
    }

    /// Whether the store holds more than the requests in flight need: something to give back.
    pub fn holds_spare(&self) -> bool {
        self.held.0.iter().zip(self.in_flight.0).any(|(held, in_flight)| *held > in_flight)
    }

    /// Whether the hold ends within `margin`.
    pub fn expires_within(&self, now: Instant, margin: Duration) -> bool {
        self.live_until.is_none_or(|until| until.saturating_duration_since(now) < margin)
    }

    /// Nothing held, in flight or unreported: the book may be forgotten.
    pub fn is_finished(&self) -> bool {
        self.mode != Mode::Active && !self.has_unreported() && !self.has_in_flight() && !self.holds_spare()
    }

    /// The request of the next call: the unanswered one again, or a new one for `call`.
    pub fn next_request(&mut self, call: Call, principal: &Principal, ttl: Duration) -> pb::LeaseRequest {
        if let Some(sending) = &self.sending {
            return sending.request.clone();
        }
        let spent = std::mem::take(&mut self.pending);
        let consumed = spent.consumed();
        let keep = match call {
            // Everything unspent stays held: requests admitted while the call is out use it.
            Call::Renew { .. } => Amounts(std::array::from_fn(|i| {
                (self.held.0[i] - consumed.0[i]).max(self.in_flight.0[i]).min(self.held.0[i]).max(0)
            })),
            Call::Return => Amounts(self.in_flight.0.map(|v| v.max(0))),
        };
        let (want, need) = match call {
            Call::Renew { want, need } => (want, need),
            Call::Return => (Amounts::default(), Amounts::default()),
        };
        self.sequence += 1;
        let request = pb::LeaseRequest {
            lease_id: self.lease_id.clone(),
            principal: Some(principal.clone()),
            sequence: self.sequence,
            spent: Some(spent.to_proto()),
            keep: Some(keep.to_proto()),
            want: Some(want.to_proto()),
            need: Some(need.to_proto()),
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
        };
        self.sending = Some(Sending { request: request.clone(), spent, returning: matches!(call, Call::Return) });
        request
    }

    /// Takes the store's answer to the call sent at `sent_at`.
    pub fn answered(&mut self, response: &pb::LeaseResponse, sent_at: Instant) {
        self.sending = None;
        self.held = Amounts::from_proto(response.held.as_ref());
        let ttl = Duration::from_millis(u64::try_from(response.ttl_ms).unwrap_or(0));
        // A tenth of the lifetime (at most a second) covers clocks that disagree between the
        // quota replicas; the lifetime counts from the moment the call left, before the store
        // started it.
        let margin = (ttl / 10).min(Duration::from_secs(1));
        self.live_until = Some(sent_at + ttl.saturating_sub(margin));
        self.window_reset = response
            .reset_at
            .as_ref()
            .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)));
        if response.window_ended {
            self.mode = Mode::Retiring;
            self.window_reset = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(held: [i64; 4], ttl_ms: i64) -> pb::LeaseResponse {
        pb::LeaseResponse { held: Some(Amounts(held).to_proto_signed()), ttl_ms, ..Default::default() }
    }

    impl Amounts {
        fn to_proto_signed(self) -> pb::LeaseAmounts {
            let [tokens, cost_micros, minute_requests, minute_tokens] = self.0;
            pb::LeaseAmounts { tokens, cost_micros, minute_requests, minute_tokens }
        }
    }

    fn template() -> Principal {
        Principal::default()
    }

    fn renew(want: [i64; 4], need: [i64; 4]) -> Call {
        Call::Renew { want: Amounts(want), need: Amounts(need) }
    }

    #[test]
    fn admits_within_every_counted_limit_and_not_beyond() {
        let now = Instant::now();
        let mut book = LeaseBook::new("l".into());
        assert!(!book.admissible(now, Utc::now()), "nothing is admitted before the store answered");
        book.next_request(renew([100, 0, 0, 0], [10, 0, 0, 0]), &template(), Duration::from_secs(10));
        book.answered(&answer([100, 50, 3, -1], 10_000), now);
        assert!(book.admissible(now, Utc::now()));
        let need = Amounts::of_request(40, 10);
        assert!(book.try_admit(need));
        assert!(book.try_admit(need));
        // Tokens: 80 of 100 in flight, 20 left; 40 more do not fit.
        assert!(!book.try_admit(need));
        assert_eq!(book.available(), [Some(20), Some(30), Some(1), None]);
        // A third small request fits tokens and cost but is the third of three minute requests.
        assert!(book.try_admit(Amounts::of_request(5, 5)));
        assert!(!book.try_admit(Amounts::of_request(1, 1)), "no minute request left");
        // Settling frees the estimate and counts the actual usage instead.
        book.settle(need, Some((25, 4)));
        assert_eq!(book.available(), [Some(100 - 40 - 5 - 25), Some(50 - 10 - 5 - 4), Some(0), None]);
        // A release frees the estimate without usage; the started request stays counted.
        book.settle(need, None);
        assert_eq!(book.available(), [Some(70), Some(41), Some(0), None]);
    }

    #[test]
    fn a_renewal_keeps_the_unspent_hold_and_a_return_keeps_what_is_in_flight() {
        let now = Instant::now();
        let mut book = LeaseBook::new("l".into());
        book.next_request(renew([100, 0, 10, 0], [0; 4]), &template(), Duration::from_secs(10));
        book.answered(&answer([100, -1, 10, -1], 10_000), now);
        let a = Amounts::of_request(30, 0);
        assert!(book.try_admit(a));
        assert!(book.try_admit(a));
        book.settle(a, Some((20, 0)));

        let request = book.next_request(renew([50, 0, 0, 0], [30, 0, 1, 0]), &template(), Duration::from_secs(10));
        assert_eq!(request.sequence, 2);
        let spent = request.spent.unwrap();
        assert_eq!((spent.tokens, spent.started_requests, spent.settled_requests), (20, 2, 1));
        let keep = request.keep.unwrap();
        // 100 held, 20 spent: 80 kept (30 of them in flight); 10 requests, 2 started: 8 kept.
        assert_eq!((keep.tokens, keep.minute_requests), (80, 8));
        assert_eq!(request.want.unwrap().tokens, 50);
        // While the call is out, requests are still admitted against what it keeps.
        assert_eq!(book.available()[0], Some(50));
        assert!(book.try_admit(Amounts::of_request(50, 0)));
        // An unanswered call is sent again unchanged.
        let again = book.next_request(Call::Return, &template(), Duration::from_secs(10));
        assert_eq!(again, request);
        book.answered(&answer([130, -1, 8, -1], 10_000), now);
        // 130 held: 30 + 50 in flight, nothing pending.
        assert_eq!(book.available()[0], Some(50));

        let returning = book.next_request(Call::Return, &template(), Duration::from_secs(10));
        assert_eq!(returning.keep.unwrap().tokens, 80, "only what is in flight");
        assert!(!book.admissible(now, Utc::now()), "nothing is admitted while a return is out");
    }

    #[test]
    fn an_overrun_keeps_what_is_in_flight() {
        let now = Instant::now();
        let mut book = LeaseBook::new("l".into());
        book.next_request(renew([100, 0, 0, 0], [0; 4]), &template(), Duration::from_secs(10));
        book.answered(&answer([100, -1, -1, -1], 10_000), now);
        let a = Amounts::of_request(50, 0);
        assert!(book.try_admit(a));
        assert!(book.try_admit(a));
        // The first reply used 80 tokens instead of 50: the second still needs its 50 held.
        book.settle(a, Some((80, 0)));
        assert_eq!(book.available()[0], Some(-30));
        let request = book.next_request(renew([0; 4], [0; 4]), &template(), Duration::from_secs(10));
        assert_eq!(request.keep.unwrap().tokens, 50);
    }

    #[test]
    fn holds_expire_locally_before_the_store_and_windows_end() {
        let now = Instant::now();
        let mut book = LeaseBook::new("l".into());
        book.next_request(renew([1, 0, 0, 0], [0; 4]), &template(), Duration::from_secs(10));
        book.answered(&answer([1, -1, -1, -1], 10_000), now);
        assert!(book.admissible(now + Duration::from_millis(8_999), Utc::now()));
        assert!(!book.admissible(now + Duration::from_millis(9_000), Utc::now()), "a second of margin");
        assert!(book.expires_within(now + Duration::from_secs(5), Duration::from_secs(5)));

        let ended = pb::LeaseResponse { window_ended: true, ..answer([0, -1, -1, -1], 10_000) };
        book.next_request(Call::Return, &template(), Duration::from_secs(10));
        book.answered(&ended, now);
        assert_eq!(book.mode, Mode::Retiring);
        assert!(!book.admissible(now, Utc::now()));
        assert!(book.is_finished());
    }
}
