//! Traces in process memory for standalone mode, bounded by count: past the bound the oldest
//! inserted traces are dropped and counted.

use std::collections::{BTreeMap, HashMap, VecDeque};

use async_trait::async_trait;
use meshgate_proto::analytics::v1 as pb;
use parking_lot::RwLock;
use prometheus::IntCounter;

use super::{Inserted, TraceStore, dedupe};
use crate::Error;
use crate::hist::Acc;
use crate::model::{Scope, TimeWindow, TraceQuery, TraceRow};

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
}

#[async_trait]
impl TraceStore for MemoryTraceStore {
    async fn insert(&self, rows: Vec<TraceRow>) -> Result<Inserted, Error> {
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
        Ok(Inserted { stored: inserted, refused: Vec::new() })
    }

    async fn get(&self, scope: &Scope, request_id: &str) -> Result<Option<pb::Trace>, Error> {
        let state = self.state.read();
        let row = state.rows.get(&(scope.org_id.clone(), request_id.to_owned()));
        Ok(row.filter(|r| scope.allows(&r.org_id, &r.project_id)).map(|r| r.trace.clone()))
    }

    async fn aggregate(&self, query: &TraceQuery) -> Result<BTreeMap<String, Acc>, Error> {
        let state = self.state.read();
        let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
        for row in state.rows.values().filter(|r| query.matches(r)) {
            groups.entry(query.group_by.key(row)).or_default().add(row.is_error(), &row.spend(), row.latency_us);
        }
        Ok(groups)
    }

    async fn top_expensive(&self, scope: &Scope, window: &TimeWindow, limit: usize) -> Result<Vec<pb::Trace>, Error> {
        let state = self.state.read();
        let mut rows: Vec<&TraceRow> = state
            .rows
            .values()
            .filter(|r| scope.allows(&r.org_id, &r.project_id) && window.contains(r.started_at))
            .collect();
        rows.sort_by(|a, b| {
            b.cost_micros
                .cmp(&a.cost_micros)
                .then(b.started_at.cmp(&a.started_at))
                .then(a.request_id.cmp(&b.request_id))
        });
        Ok(rows.into_iter().take(limit).map(|r| r.trace.clone()).collect())
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
