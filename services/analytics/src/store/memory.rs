//! Traces in process memory for standalone mode, bounded by count: past the bound the oldest
//! inserted traces are dropped and counted.

use std::collections::{BTreeMap, HashMap, VecDeque};

use async_trait::async_trait;
use meshgate_proto::analytics::v1 as pb;
use parking_lot::RwLock;
use prometheus::IntCounter;

use super::{TraceStore, dedupe, error_rate};
use crate::Error;
use crate::model::{GroupBy, TimeWindow, TraceQuery, TraceRow, aggregate};

type Id = (String, String);

#[derive(Default)]
struct State {
    rows: HashMap<Id, TraceRow>,
    /// Insertion order, for eviction.
    order: VecDeque<Id>,
}

/// The in-memory trace store.
pub struct MemoryTraceStore {
    state: RwLock<State>,
    max_traces: usize,
    evicted: IntCounter,
}

impl MemoryTraceStore {
    /// Keeps at most `max_traces` (at least 1); `evicted` counts the ones dropped.
    pub fn new(max_traces: usize, evicted: IntCounter) -> Self {
        Self { state: RwLock::default(), max_traces: max_traces.max(1), evicted }
    }

    pub fn len(&self) -> usize {
        self.state.read().rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn matching<'a>(state: &'a State, org_id: &str, window: &TimeWindow) -> Vec<&'a TraceRow> {
        state.rows.values().filter(|r| r.org_id == org_id && window.contains(r.started_at)).collect()
    }
}

#[async_trait]
impl TraceStore for MemoryTraceStore {
    async fn insert(&self, rows: Vec<TraceRow>) -> Result<u64, Error> {
        let mut state = self.state.write();
        let mut inserted = 0;
        for row in dedupe(rows) {
            let id = (row.org_id.clone(), row.request_id.clone());
            if state.rows.contains_key(&id) {
                continue;
            }
            state.rows.insert(id.clone(), row);
            state.order.push_back(id);
            inserted += 1;
            while state.rows.len() > self.max_traces {
                let Some(oldest) = state.order.pop_front() else { break };
                state.rows.remove(&oldest);
                self.evicted.inc();
            }
        }
        Ok(inserted)
    }

    async fn get(&self, org_id: &str, request_id: &str) -> Result<Option<pb::Trace>, Error> {
        let state = self.state.read();
        Ok(state.rows.get(&(org_id.to_owned(), request_id.to_owned())).map(|r| r.trace.clone()))
    }

    async fn query(&self, query: &TraceQuery) -> Result<Vec<pb::AggregateRow>, Error> {
        let state = self.state.read();
        let rows: Vec<&TraceRow> = state.rows.values().filter(|r| query.matches(r)).collect();
        if query.group_by == GroupBy::Total {
            return Ok(vec![aggregate(String::new(), &rows)]);
        }
        let mut groups: BTreeMap<String, Vec<&TraceRow>> = BTreeMap::new();
        for row in rows {
            groups.entry(query.group_by.key(row)).or_default().push(row);
        }
        Ok(groups.into_iter().map(|(key, rows)| aggregate(key, &rows)).collect())
    }

    async fn top_expensive(&self, org_id: &str, window: &TimeWindow, limit: usize) -> Result<Vec<pb::Trace>, Error> {
        let state = self.state.read();
        let mut rows = Self::matching(&state, org_id, window);
        rows.sort_by(|a, b| {
            b.cost_micros
                .cmp(&a.cost_micros)
                .then(b.started_at.cmp(&a.started_at))
                .then(a.request_id.cmp(&b.request_id))
        });
        Ok(rows.into_iter().take(limit).map(|r| r.trace.clone()).collect())
    }

    async fn error_rates(&self, org_id: &str, window: &TimeWindow) -> Result<Vec<pb::ModelErrorRate>, Error> {
        let state = self.state.read();
        let mut by_model: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        for row in Self::matching(&state, org_id, window) {
            let entry = by_model.entry(row.model()).or_default();
            entry.0 += 1;
            entry.1 += i64::from(row.is_error());
        }
        Ok(by_model.into_iter().map(|(m, (req, err))| error_rate(m.to_owned(), req, err)).collect())
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
