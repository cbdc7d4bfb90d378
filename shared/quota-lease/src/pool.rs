//! The leases of one gateway replica: a holder per principal with its lease books, the calls that
//! feed them (one at a time per principal), the background flusher, and the admissions made
//! against them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use chrono::Utc;
use meshgate_proto::common::v1::{Principal, Usage};
use meshgate_proto::quota::v1 as pb;
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_runtime::MeshChannel;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tonic::Status;
use tracing::{debug, error, warn};

use crate::book::{Amounts, Call, LIMITS, LeaseBook, Mode};
use crate::{AdmitError, Estimate, LeaseSettings, QuotaBackend, SettingsError};

/// A slice covers at least this many requests like the last one, so a principal's first
/// requests do not each need a call.
const MIN_SLICE_REQUESTS: i64 = 4;
/// Rounds of calls and waits one admission makes before it reserves instead.
const ADMIT_ROUNDS: usize = 16;
/// Holders flushed at once by the flusher.
const FLUSH_CONCURRENCY: usize = 64;
/// Retries of a reservation's commit or release (as the gateway settles reservations).
const SETTLE_BACKOFF: [Duration; 3] = [Duration::from_millis(100), Duration::from_millis(500), Duration::from_secs(2)];

/// The leases a gateway replica holds, per principal. Cheap to clone; the background flusher
/// (started by [`LeasePool::new`], which needs a Tokio runtime) reports usage and renews or
/// returns slices every `flush_interval_ms` until the last clone is dropped. Dropping the pool
/// without [`LeasePool::close`] is what a crash does: the slices it held come back to the budget
/// when they expire.
pub struct LeasePool<B: QuotaBackend = QuotaClient<MeshChannel>> {
    inner: Arc<Inner<B>>,
}

impl<B: QuotaBackend> Clone for LeasePool<B> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

/// What a pool did since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Requests admitted against a lease, without a call.
    pub leased: u64,
    /// Requests admitted by a reservation of their own.
    pub reserved: u64,
    /// Requests refused.
    pub refused: u64,
    /// Lease calls made, and those that failed (retried).
    pub lease_calls: u64,
    pub failed_calls: u64,
    /// Principals holding leases now.
    pub principals: usize,
}

struct Inner<B> {
    /// This pool, for the tasks it spawns.
    me: Weak<Inner<B>>,
    backend: B,
    settings: LeaseSettings,
    /// Names this pool's leases: `<holder id>-<n>`.
    holder_id: String,
    next_book: AtomicU64,
    holders: Mutex<HashMap<[String; 4], Arc<Holder>>>,
    closed: AtomicBool,
    leased: AtomicU64,
    reserved: AtomicU64,
    refused: AtomicU64,
    lease_calls: AtomicU64,
    failed_calls: AtomicU64,
}

/// One principal's leases.
pub(crate) struct Holder {
    principal: Principal,
    state: Mutex<HolderState>,
    /// Woken when a call ends, for admissions waiting on it.
    changed: Notify,
}

struct HolderState {
    books: BTreeMap<u64, LeaseBook>,
    /// The book admissions use.
    current: Option<u64>,
    /// A call is out (calls of one principal go one at a time).
    busy: bool,
    /// A flush was spawned to top the current book up.
    prefetching: bool,
    /// A report of settled usage is scheduled (see `report_delay_ms`).
    report_scheduled: bool,
    /// Left the pool's map: whoever finds it makes a new one.
    removed: bool,
    /// A scope ran low: requests are reserved one by one until then.
    fallback_until: Option<Instant>,
    last_admission: Instant,
    rate: Rate,
    /// What the last admitted request needed.
    last_need: Amounts,
    /// What admissions waiting on the call out need.
    waiting: Amounts,
    /// The budget left per the last answer, this principal's holds counted as spent.
    remaining: pb::LeaseResponse,
}

/// The principal's admission rate on this replica, in each limit, per second (exponentially
/// weighted over windows of at least 50 ms).
struct Rate {
    per_second: [f64; LIMITS],
    since: Instant,
    admitted: Amounts,
}

impl Rate {
    fn new(now: Instant) -> Self {
        Self { per_second: [0.0; LIMITS], since: now, admitted: Amounts::default() }
    }

    fn sample(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.since);
        if elapsed < Duration::from_millis(50) {
            return;
        }
        let seconds = elapsed.as_secs_f64();
        for (rate, admitted) in self.per_second.iter_mut().zip(self.admitted.0) {
            *rate = 0.5 * (admitted as f64 / seconds) + 0.5 * *rate;
        }
        self.admitted = Amounts::default();
        self.since = now;
    }

    /// What a slice should hold: the rate over the horizon, at least a few requests like `need`.
    fn target(&self, horizon: Duration, need: Amounts) -> Amounts {
        Amounts(std::array::from_fn(|i| {
            let over_horizon = (self.per_second[i] * horizon.as_secs_f64()).ceil() as i64;
            over_horizon.max(need.0[i].saturating_mul(MIN_SLICE_REQUESTS))
        }))
    }
}

/// What an admission does next.
enum Step {
    Admitted { book: u64, response: pb::ReserveResponse, prefetch: bool },
    Reserve,
    Wait,
    Call { book: u64, request: pb::LeaseRequest },
}

impl HolderState {
    fn new(now: Instant) -> Self {
        Self {
            books: BTreeMap::new(),
            current: None,
            busy: false,
            prefetching: false,
            report_scheduled: false,
            removed: false,
            fallback_until: None,
            last_admission: now,
            rate: Rate::new(now),
            last_need: Amounts::default(),
            waiting: Amounts::default(),
            remaining: pb::LeaseResponse::default(),
        }
    }

    /// A renewal of book `no` sized for the principal's rate and `need` more right now.
    fn renewal(&self, no: u64, need: Amounts, settings: &LeaseSettings) -> Call {
        let available = self.books.get(&no).map(LeaseBook::available).unwrap_or([Some(0); LIMITS]);
        let target = self.rate.target(settings.horizon(), need.max_each(self.last_need));
        let free = |i: usize| available[i].unwrap_or(0).max(0);
        let want = Amounts(std::array::from_fn(|i| target.0[i].max(need.0[i]).saturating_sub(free(i))));
        let need = Amounts(std::array::from_fn(|i| need.0[i].saturating_sub(free(i))));
        Call::Renew { want: want.capped(), need: need.capped() }
    }

    /// Whether book `no` has less free than half of what it should hold.
    fn below_target(&self, no: u64, settings: &LeaseSettings) -> bool {
        let Some(book) = self.books.get(&no) else { return false };
        let target = self.rate.target(settings.horizon(), self.last_need);
        book.available().iter().zip(target.0).any(|(free, target)| free.is_some_and(|free| free < target / 2))
    }

    /// The book for new admissions: the current one unless its window is over.
    fn current_book(&mut self, pool_lease_id: impl FnOnce() -> (u64, String)) -> u64 {
        if let Some(no) = self.current
            && self.books.get(&no).is_some_and(|b| b.mode != Mode::Retiring)
        {
            return no;
        }
        let (no, lease_id) = pool_lease_id();
        self.books.insert(no, LeaseBook::new(lease_id));
        self.current = Some(no);
        no
    }

    /// What an admission is told of the budget left: the store's answer plus this principal's
    /// unused slice.
    fn response(&self, no: u64) -> pb::ReserveResponse {
        let available = self.books.get(&no).map(LeaseBook::available).unwrap_or([None; LIMITS]);
        let plus = |store: i64, free: Option<i64>| if store < 0 { -1 } else { store + free.unwrap_or(0).max(0) };
        pb::ReserveResponse {
            admitted: true,
            reset_at: self.remaining.reset_at,
            remaining_tokens: plus(self.remaining.remaining_tokens, available[0]),
            remaining_cost_micros: plus(self.remaining.remaining_cost_micros, available[1]),
            remaining_requests_this_minute: plus(self.remaining.remaining_requests_this_minute, available[2]),
            ..Default::default()
        }
    }

    /// The next call the flusher should make for this principal, if any is due.
    fn due(&mut self, now: Instant, settings: &LeaseSettings, closing: bool) -> Option<(u64, Call)> {
        let idle = now.duration_since(self.last_admission) >= settings.idle_return();
        let falling_back = self.fallback_until.is_some_and(|until| now < until);
        let current = self.current;
        let numbers: Vec<u64> = self.books.keys().copied().collect();
        for no in numbers {
            let is_current = current == Some(no);
            let below_target = is_current && self.below_target(no, settings);
            let book = self.books.get_mut(&no)?;
            if book.sending.is_some() {
                // Sent again unchanged whatever is asked.
                return Some((no, Call::Return));
            }
            if book.mode == Mode::Active && (!is_current || idle || falling_back || closing) {
                book.mode = Mode::Draining;
            }
            let keepalive =
                (book.has_in_flight() || book.holds_spare()) && book.expires_within(now, settings.ttl() / 2);
            let call = match book.mode {
                Mode::Active => (book.has_unreported() || keepalive || below_target).then_some(None),
                Mode::Draining | Mode::Retiring => {
                    (book.has_unreported() || book.holds_spare() || keepalive).then_some(Some(Call::Return))
                }
            };
            match call {
                Some(Some(call)) => return Some((no, call)),
                Some(None) => return Some((no, self.renewal(no, self.last_need, settings))),
                None => {}
            }
        }
        None
    }

    /// Forgets books with nothing held, in flight or unreported.
    fn forget_finished(&mut self) {
        self.books.retain(|_, book| !book.is_finished());
        if self.current.is_some_and(|no| !self.books.contains_key(&no)) {
            self.current = None;
        }
    }
}

impl Holder {
    /// Books the request's usage; whether a report of it should be scheduled (none is yet).
    fn settle(&self, book: u64, need: Amounts, usage: Option<(i64, i64)>) -> bool {
        let mut state = self.state.lock();
        let Some(book) = state.books.get_mut(&book) else { return false };
        book.settle(need, usage);
        let schedule = usage.is_some() && !state.report_scheduled;
        state.report_scheduled |= schedule;
        schedule
    }
}

impl<B: QuotaBackend> LeasePool<B> {
    /// A pool calling `backend`; starts its flusher on the current Tokio runtime.
    pub fn new(backend: B, settings: LeaseSettings) -> Result<Self, SettingsError> {
        settings.validate()?;
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            backend,
            settings,
            holder_id: uuid::Uuid::new_v4().simple().to_string(),
            next_book: AtomicU64::new(1),
            holders: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            leased: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            lease_calls: AtomicU64::new(0),
            failed_calls: AtomicU64::new(0),
        });
        tokio::spawn(flusher(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// Admits a request of `principal` expected to cost `estimate`: against the principal's
    /// lease when it has room (no call), else after renewing it, else with a reservation of its
    /// own under `request_id` (a scope nearly spent, the pool full or closed). A refusal is the
    /// refused reservation, as the gateway answers it today.
    pub async fn admit(
        &self,
        request_id: &str,
        principal: &Principal,
        estimate: Estimate,
    ) -> Result<Admission<B>, AdmitError> {
        let inner = &self.inner;
        let need = Amounts::of_request(estimate.tokens.max(0), estimate.cost_micros.max(0));
        if inner.closed.load(Ordering::Acquire) {
            return inner.reserve(request_id, principal, estimate).await;
        }
        for _ in 0..ADMIT_ROUNDS {
            let Some(holder) = inner.holder(principal) else {
                return inner.reserve(request_id, principal, estimate).await;
            };
            let notified = holder.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let step = {
                let mut state = holder.state.lock();
                if state.removed {
                    continue;
                }
                inner.step(&holder, &mut state, need)
            };
            match step {
                Step::Admitted { book, response, prefetch } => {
                    inner.leased.fetch_add(1, Ordering::Relaxed);
                    if prefetch {
                        let (inner, holder) = (self.inner.clone(), holder.clone());
                        tokio::spawn(async move { inner.flush_holder(&holder, false).await });
                    }
                    let settlement = Settlement::Leased { pool: inner.me.clone(), holder: holder.clone(), book, need };
                    return Ok(Admission { response, settlement: Some(settlement) });
                }
                Step::Reserve => return inner.reserve(request_id, principal, estimate).await,
                Step::Wait => {
                    let _ = tokio::time::timeout(inner.settings.call_timeout(), notified).await;
                    holder.state.lock().waiting.sub(need);
                }
                Step::Call { book, request } => {
                    if inner.call(&holder, book, request).await.map_err(AdmitError::Quota)? {
                        // The scope's last budget goes to requests reserved one by one: the unused
                        // slice goes back before this one is, or it could stand in its way.
                        inner.flush_holder(&holder, false).await;
                    }
                }
            }
        }
        inner.reserve(request_id, principal, estimate).await
    }

    /// Stops leasing: later requests are reserved one by one, and every slice is given back
    /// (what requests still in flight need stays held until they settle, and the flusher reports
    /// their usage while the pool lives). Returns once nothing is left to report or return, or
    /// after four call deadlines.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.settle_all(true).await;
    }

    /// Makes every principal's next admission lease anew, under the limits in force now (a limit
    /// was changed): the slices held so far go back with the next flush, what requests in flight
    /// need staying held until they settle.
    pub fn limits_changed(&self) {
        for holder in self.inner.holders.lock().values() {
            holder.state.lock().current = None;
        }
    }

    /// Reports the usage settled so far now rather than at the next tick; returns once the store
    /// has it (or after four call deadlines).
    pub async fn flush(&self) {
        self.inner.settle_all(false).await;
    }

    pub fn stats(&self) -> PoolStats {
        let inner = &self.inner;
        PoolStats {
            leased: inner.leased.load(Ordering::Relaxed),
            reserved: inner.reserved.load(Ordering::Relaxed),
            refused: inner.refused.load(Ordering::Relaxed),
            lease_calls: inner.lease_calls.load(Ordering::Relaxed),
            failed_calls: inner.failed_calls.load(Ordering::Relaxed),
            principals: inner.holders.lock().len(),
        }
    }
}

impl<B: QuotaBackend> Inner<B> {
    /// The principal's holder, made when it has none; `None` when the pool holds as many
    /// principals as it may.
    fn holder(&self, principal: &Principal) -> Option<Arc<Holder>> {
        let key = [
            principal.org_id.clone(),
            principal.project_id.clone(),
            principal.user_id.clone(),
            principal.key_id.clone(),
        ];
        let mut holders = self.holders.lock();
        if let Some(holder) = holders.get(&key) {
            return Some(holder.clone());
        }
        if holders.len() >= self.settings.max_principals {
            return None;
        }
        let holder = Arc::new(Holder {
            principal: principal.clone(),
            state: Mutex::new(HolderState::new(Instant::now())),
            changed: Notify::new(),
        });
        holders.insert(key, holder.clone());
        Some(holder)
    }

    fn step(&self, holder: &Holder, state: &mut HolderState, need: Amounts) -> Step {
        let now = Instant::now();
        if state.fallback_until.is_some_and(|until| now < until) {
            return Step::Reserve;
        }
        state.fallback_until = None;
        if let Some(no) = state.current
            && let Some(book) = state.books.get_mut(&no)
            && book.admissible(now, Utc::now())
            && book.try_admit(need)
        {
            state.last_admission = now;
            state.last_need = need;
            state.rate.admitted.add(need);
            let prefetch = !state.busy && !state.prefetching && state.below_target(no, &self.settings);
            state.prefetching |= prefetch;
            return Step::Admitted { book: no, response: state.response(no), prefetch };
        }
        if state.busy {
            state.waiting.add(need);
            return Step::Wait;
        }
        state.rate.sample(now);
        let no = state.current_book(|| self.new_book());
        let mut demand = need;
        demand.add(state.waiting);
        let call = state.renewal(no, demand, &self.settings);
        let book = state.books.get_mut(&no).expect("the current book exists");
        if book.mode == Mode::Draining {
            book.mode = Mode::Active;
        }
        let request = book.next_request(call, &holder.principal, self.settings.ttl());
        state.busy = true;
        Step::Call { book: no, request }
    }

    fn new_book(&self) -> (u64, String) {
        let no = self.next_book.fetch_add(1, Ordering::Relaxed);
        (no, format!("{}-{no}", self.holder_id))
    }

    /// Makes one lease call for book `no` of `holder` (whose state is marked busy) and takes the
    /// answer; whether a scope answered that it is nearly spent. A call without an answer stays on
    /// the book and is sent again unchanged.
    async fn call(&self, holder: &Arc<Holder>, no: u64, request: pb::LeaseRequest) -> Result<bool, Status> {
        let sent_at = Instant::now();
        self.lease_calls.fetch_add(1, Ordering::Relaxed);
        let timeout = self.settings.call_timeout();
        let result = match tokio::time::timeout(timeout, self.backend.lease(request)).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "quota service did not answer a lease call within {} ms",
                timeout.as_millis()
            ))),
        };
        let mut low = false;
        {
            let mut state = holder.state.lock();
            state.busy = false;
            match &result {
                Ok(response) => {
                    if let Some(book) = state.books.get_mut(&no) {
                        book.answered(response, sent_at);
                    }
                    if response.window_ended && state.current == Some(no) {
                        state.current = None;
                    }
                    if response.low_scope.is_some() {
                        state.fallback_until = Some(Instant::now() + self.settings.fallback());
                        low = true;
                        debug!(scope = ?response.low_scope, limit = response.low_limit, "quota lease: scope nearly spent");
                    }
                    state.remaining = response.clone();
                }
                Err(status) => {
                    self.failed_calls.fetch_add(1, Ordering::Relaxed);
                    if status.code() == tonic::Code::InvalidArgument
                        && let Some(book) = state.books.get_mut(&no)
                    {
                        // Never accepted however often it is sent: drop it rather than block the
                        // lease (its usage goes unreported).
                        error!(%status, lease = book.lease_id, "quota refused a lease call; its usage is dropped");
                        book.sending = None;
                    } else {
                        warn!(%status, "quota lease call failed; it is sent again");
                    }
                }
            }
        }
        holder.changed.notify_waiters();
        result.map(|_| low)
    }

    /// Makes the calls due for one principal, one at a time, until none is due or one fails.
    async fn flush_holder(&self, holder: &Arc<Holder>, closing: bool) {
        for _ in 0..8 {
            let (no, request) = {
                let mut state = holder.state.lock();
                state.prefetching = false;
                if state.busy || state.removed {
                    return;
                }
                let now = Instant::now();
                state.rate.sample(now);
                state.forget_finished();
                let Some((no, call)) = state.due(now, &self.settings, closing) else { return };
                let book = state.books.get_mut(&no).expect("a due book exists");
                let request = book.next_request(call, &holder.principal, self.settings.ttl());
                state.busy = true;
                (no, request)
            };
            if self.call(holder, no, request).await.is_err() {
                return;
            }
        }
    }

    /// Reports `holder`'s settled usage after the report delay (a call already out is waited
    /// for: it may have left before the usage was settled).
    async fn report_soon(&self, holder: Arc<Holder>) {
        tokio::time::sleep(self.settings.report_delay()).await;
        holder.state.lock().report_scheduled = false;
        for _ in 0..4 {
            let notified = holder.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !holder.state.lock().busy {
                self.flush_holder(&holder, self.closed.load(Ordering::Acquire)).await;
                return;
            }
            let _ = tokio::time::timeout(self.settings.call_timeout(), notified).await;
        }
    }

    /// One flusher tick: every principal's due calls, and principals with nothing left forgotten.
    async fn flush_all(&self) {
        let closing = self.closed.load(Ordering::Acquire);
        let holders: Vec<Arc<Holder>> = self.holders.lock().values().cloned().collect();
        let mut flushes = tokio::task::JoinSet::new();
        for chunk in holders.chunks(holders.len().div_ceil(FLUSH_CONCURRENCY).max(1)) {
            let chunk = chunk.to_vec();
            let weak = self.me.clone();
            flushes.spawn(async move {
                let Some(inner) = weak.upgrade() else { return };
                for holder in chunk {
                    inner.flush_holder(&holder, closing).await;
                }
            });
        }
        while flushes.join_next().await.is_some() {}
        let now = Instant::now();
        let mut holders = self.holders.lock();
        holders.retain(|_, holder| {
            let mut state = holder.state.lock();
            state.forget_finished();
            let forgotten = state.books.is_empty()
                && !state.busy
                && now.duration_since(state.last_admission) >= self.settings.idle_return();
            state.removed |= forgotten;
            !forgotten
        });
    }

    /// Flushes every principal until nothing is left to report (nor, when `closing`, to return).
    async fn settle_all(&self, closing: bool) {
        let deadline = Instant::now() + self.settings.call_timeout() * 4;
        loop {
            let holders: Vec<Arc<Holder>> = self.holders.lock().values().cloned().collect();
            let mut open = false;
            for holder in holders {
                self.flush_holder(&holder, closing).await;
                let state = holder.state.lock();
                open |= state.busy || state.books.values().any(|b| b.has_unreported() || (closing && b.holds_spare()));
            }
            if !open || Instant::now() >= deadline {
                return;
            }
            // A call of the flusher's is out: its answer comes within a call deadline.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Reserves one request under its own id, as the gateway did before leases.
    async fn reserve(
        &self,
        request_id: &str,
        principal: &Principal,
        estimate: Estimate,
    ) -> Result<Admission<B>, AdmitError> {
        let request = pb::ReserveRequest {
            request_id: request_id.to_owned(),
            principal: Some(principal.clone()),
            estimated_tokens: estimate.tokens,
            estimated_cost_micros: estimate.cost_micros,
            ttl_seconds: 0,
        };
        let timeout = self.settings.call_timeout();
        let response = match tokio::time::timeout(timeout, self.backend.reserve(request)).await {
            Ok(result) => result.map_err(AdmitError::Quota)?,
            Err(_) => {
                return Err(AdmitError::Quota(Status::deadline_exceeded(format!(
                    "quota service did not answer a reservation within {} ms",
                    timeout.as_millis()
                ))));
            }
        };
        if !response.admitted {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(AdmitError::Refused(Box::new(response)));
        }
        self.reserved.fetch_add(1, Ordering::Relaxed);
        let settlement = Settlement::Reserved {
            backend: self.backend.clone(),
            reservation_id: response.reservation_id.clone(),
            principal: principal.clone(),
        };
        Ok(Admission { response, settlement: Some(settlement) })
    }
}

/// A request admitted by a [`LeasePool`]: settle it with its usage once served. Dropped without
/// being settled, it is released (nothing charged).
pub struct Admission<B: QuotaBackend = QuotaClient<MeshChannel>> {
    response: pb::ReserveResponse,
    settlement: Option<Settlement<B>>,
}

enum Settlement<B> {
    Leased { pool: Weak<Inner<B>>, holder: Arc<Holder>, book: u64, need: Amounts },
    Reserved { backend: B, reservation_id: String, principal: Principal },
}

impl<B: QuotaBackend> Admission<B> {
    /// The budget left with this request admitted, in the shape of an admitted reservation
    /// (`remaining_*`, `reset_at`), for the quota headers.
    pub fn response(&self) -> &pb::ReserveResponse {
        &self.response
    }

    /// Whether it was admitted against a lease (without a call of its own).
    pub fn is_leased(&self) -> bool {
        matches!(self.settlement, Some(Settlement::Leased { .. }))
    }

    /// The reservation of a request reserved one by one.
    pub fn reservation_id(&self) -> Option<&str> {
        match &self.settlement {
            Some(Settlement::Reserved { reservation_id, .. }) => Some(reservation_id),
            _ => None,
        }
    }

    /// Charges `usage` (the target's report, its cost set), or releases the request when
    /// nothing was served (`None`). Against a lease this is bookkeeping, reported with the next
    /// flush; a reservation is committed or released now, retried while the quota service is
    /// unreachable.
    pub async fn settle(mut self, usage: Option<&Usage>) {
        match self.settlement.take() {
            Some(Settlement::Leased { pool, holder, book, need }) => {
                if holder.settle(book, need, usage.map(usage_amounts))
                    && let Some(inner) = pool.upgrade()
                {
                    tokio::spawn(async move { inner.report_soon(holder).await });
                }
            }
            Some(Settlement::Reserved { backend, reservation_id, principal }) => {
                settle_reservation(backend, reservation_id, principal, usage.cloned()).await;
            }
            None => {}
        }
    }
}

impl<B: QuotaBackend> Drop for Admission<B> {
    fn drop(&mut self) {
        match self.settlement.take() {
            Some(Settlement::Leased { holder, book, need, .. }) => {
                holder.settle(book, need, None);
            }
            Some(Settlement::Reserved { backend, reservation_id, principal }) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(settle_reservation(backend, reservation_id, principal, None));
                }
            }
            None => {}
        }
    }
}

/// Tokens and cost of a usage report, never negative.
fn usage_amounts(usage: &Usage) -> (i64, i64) {
    (usage.tokens().max(0), usage.cost_micros.max(0))
}

/// Commits `usage` (or releases) a reservation, retrying while quota is unreachable: a lost
/// commit is usage nobody pays for.
async fn settle_reservation<B: QuotaBackend>(
    backend: B,
    reservation_id: String,
    principal: Principal,
    usage: Option<Usage>,
) {
    let mut attempt = 0;
    loop {
        let result = match &usage {
            Some(usage) => {
                let request = pb::CommitRequest {
                    reservation_id: reservation_id.clone(),
                    usage: Some(*usage),
                    principal: Some(principal.clone()),
                };
                backend.commit(request).await
            }
            None => backend.release(pb::ReleaseRequest { reservation_id: reservation_id.clone() }).await,
        };
        match result {
            Ok(()) => return,
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
                ) && attempt < SETTLE_BACKOFF.len() =>
            {
                tokio::time::sleep(SETTLE_BACKOFF[attempt]).await;
                attempt += 1;
            }
            Err(status) => {
                warn!(%status, reservation_id, "settling the reservation failed; its TTL releases the hold");
                return;
            }
        }
    }
}

async fn flusher<B: QuotaBackend>(pool: Weak<Inner<B>>) {
    let interval = match pool.upgrade() {
        Some(inner) => inner.settings.flush_interval(),
        None => return,
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(inner) = pool.upgrade() else { return };
        inner.flush_all().await;
    }
}
