//! `meshgate.analytics.v1.Analytics` over a [`TraceStore`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::TimeDelta;
use meshgate_proto::analytics::v1 as pb;
use meshgate_storage::SharedClock;
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

use crate::Error;
use crate::metrics::AnalyticsMetrics;
use crate::model::{Filters, GroupBy, Scope, TimeWindow, TraceQuery, TraceRow};
use crate::store::{self, TraceStore, error_rate};

/// TopExpensive's default and largest page.
const TOP_DEFAULT: usize = 10;
const TOP_MAX: usize = 100;

/// What Record accepts.
#[derive(Debug, Clone, Copy)]
pub struct IngestLimits {
    pub max_trace_age: Duration,
    pub max_future_skew: Duration,
    pub max_batch_traces: usize,
}

/// The analytics gRPC service.
#[derive(Clone)]
pub struct AnalyticsService {
    store: Arc<dyn TraceStore>,
    clock: SharedClock,
    limits: IngestLimits,
    metrics: AnalyticsMetrics,
}

impl AnalyticsService {
    pub fn new(
        store: Arc<dyn TraceStore>,
        clock: SharedClock,
        limits: IngestLimits,
        metrics: AnalyticsMetrics,
    ) -> Self {
        Self { store, clock, limits, metrics }
    }

    /// The valid traces of a batch as rows, and why each invalid one was refused: one trace's bad
    /// input never costs the others of its batch (another tenant's, often). Only a batch over the
    /// size limit is refused whole.
    fn rows(&self, batch: pb::RecordBatch) -> Result<(Vec<TraceRow>, Vec<String>), Error> {
        if batch.traces.len() > self.limits.max_batch_traces {
            return Err(Error::InvalidArgument(format!(
                "a batch holds at most {} traces (got {})",
                self.limits.max_batch_traces,
                batch.traces.len()
            )));
        }
        let now = self.clock.now();
        let delta = |d: Duration| TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX);
        let oldest = now.checked_sub_signed(delta(self.limits.max_trace_age)).unwrap_or(now);
        let newest = now.checked_add_signed(delta(self.limits.max_future_skew)).unwrap_or(now);
        let (mut rows, mut refused) = (Vec::with_capacity(batch.traces.len()), Vec::new());
        let checked = batch.traces.into_iter().map(|trace| {
            let row = TraceRow::from_trace(trace)?;
            if row.started_at < oldest {
                return Err(Error::InvalidArgument(format!(
                    "trace {}: started_at {} is older than the accepted {} days",
                    row.request_id,
                    row.started_at.to_rfc3339(),
                    self.limits.max_trace_age.as_secs() / 86_400
                )));
            }
            if row.started_at > newest {
                return Err(Error::InvalidArgument(format!(
                    "trace {}: started_at {} is in the future",
                    row.request_id,
                    row.started_at.to_rfc3339()
                )));
            }
            Ok(row)
        });
        for result in checked {
            match result {
                Ok(row) => rows.push(row),
                Err(err) => refused.push(err.to_string()),
            }
        }
        Ok((rows, refused))
    }

    fn store_failed(&self, op: &str, err: Error) -> Status {
        if !matches!(err, Error::InvalidArgument(_) | Error::NotFound(_)) {
            self.metrics.store_errors.with_label_values(&[op]).inc();
            warn!(op, error = %err, store = self.store.kind(), "trace store operation failed");
        }
        err.into()
    }

    /// The gRPC server, accepting messages up to `max_message_bytes`.
    pub fn into_server(self, max_message_bytes: usize) -> pb::analytics_server::AnalyticsServer<Self> {
        pb::analytics_server::AnalyticsServer::new(self).max_decoding_message_size(max_message_bytes)
    }
}

#[tonic::async_trait]
impl pb::analytics_server::Analytics for AnalyticsService {
    async fn record(
        &self,
        request: Request<Streaming<pb::RecordBatch>>,
    ) -> Result<Response<pb::RecordSummary>, Status> {
        let mut stream = request.into_inner();
        let mut summary = pb::RecordSummary::default();
        // Each batch is stored as it arrives; a batch refused whole (over the size limit) or a
        // store failure ends the stream, and the ones before it stay stored (retrying them is
        // harmless: request ids are idempotent).
        while let Some(batch) = stream.message().await? {
            let received = batch.traces.len() as u64;
            self.metrics.traces_received.inc_by(received);
            self.metrics.batch_traces.observe(received as f64);
            let (rows, mut refused) =
                self.rows(batch).inspect_err(|_| self.metrics.traces_rejected.inc_by(received))?;
            let started = Instant::now();
            let inserted = self.store.insert(rows).await.map_err(|e| self.store_failed("record", e))?;
            self.metrics.insert_duration.observe(started.elapsed().as_secs_f64());
            refused.extend(inserted.refused.into_iter().map(|(id, why)| format!("trace {id}: {why}")));
            let rejected = refused.len() as u64;
            if rejected > 0 {
                warn!(rejected, first = refused[0], "traces refused; the rest of their batch is stored");
                if summary.first_rejection.is_empty() {
                    summary.first_rejection = refused.swap_remove(0);
                }
            }
            self.metrics.traces_stored.inc_by(inserted.stored);
            self.metrics.traces_rejected.inc_by(rejected);
            self.metrics.traces_duplicate.inc_by(received.saturating_sub(inserted.stored + rejected));
            summary.accepted = summary.accepted.saturating_add(i64::try_from(inserted.stored).unwrap_or(i64::MAX));
            summary.rejected = summary.rejected.saturating_add(i64::try_from(rejected).unwrap_or(i64::MAX));
        }
        Ok(Response::new(summary))
    }

    async fn query(&self, request: Request<pb::QueryRequest>) -> Result<Response<pb::QueryResponse>, Status> {
        let query = TraceQuery::from_proto(request.get_ref())?;
        let rows = store::query(self.store.as_ref(), &query).await.map_err(|e| self.store_failed("query", e))?;
        Ok(Response::new(pb::QueryResponse { rows }))
    }

    async fn top_expensive(
        &self,
        request: Request<pb::TopExpensiveRequest>,
    ) -> Result<Response<pb::TopExpensiveResponse>, Status> {
        let req = request.get_ref();
        let scope = Scope::from_proto(&req.org_id, &req.project_ids, req.all_projects)?;
        let window = TimeWindow::from_proto(req.range.as_ref())?;
        let limit = match usize::try_from(req.limit) {
            Ok(0) => TOP_DEFAULT,
            Ok(n) => n.min(TOP_MAX),
            Err(_) => return Err(Error::InvalidArgument("limit must not be negative".into()).into()),
        };
        let traces = self
            .store
            .top_expensive(&scope, &window, limit)
            .await
            .map_err(|e| self.store_failed("top_expensive", e))?;
        Ok(Response::new(pb::TopExpensiveResponse { traces }))
    }

    async fn error_rates(
        &self,
        request: Request<pb::ErrorRatesRequest>,
    ) -> Result<Response<pb::ErrorRatesResponse>, Status> {
        let req = request.get_ref();
        let query = TraceQuery {
            group_by: GroupBy::Model,
            ..TraceQuery::total(
                Scope::from_proto(&req.org_id, &req.project_ids, req.all_projects)?,
                TimeWindow::from_proto(req.range.as_ref())?,
            )
        };
        let groups = self.store.aggregate(&query).await.map_err(|e| self.store_failed("error_rates", e))?;
        let models = groups.into_iter().map(|(model, acc)| error_rate(model, acc.requests, acc.errors)).collect();
        Ok(Response::new(pb::ErrorRatesResponse { models }))
    }

    async fn latency(&self, request: Request<pb::LatencyRequest>) -> Result<Response<pb::LatencyResponse>, Status> {
        let req = request.get_ref();
        let query = TraceQuery {
            scope: Scope::from_proto(&req.org_id, &req.project_ids, req.all_projects)?,
            filters: Filters::from_proto(&req.project_id, &req.user_id, &req.model, &req.layer)?,
            window: TimeWindow::from_proto(req.range.as_ref())?,
            group_by: GroupBy::Model,
        };
        let groups = self.store.aggregate(&query).await.map_err(|e| self.store_failed("latency", e))?;
        let models = groups
            .into_iter()
            .map(|(model, acc)| pb::ModelLatency {
                model,
                requests: acc.requests,
                p50_latency_us: acc.percentile(0.5),
                p95_latency_us: acc.percentile(0.95),
                p99_latency_us: acc.percentile(0.99),
                avg_latency_us: acc.avg_latency_us(),
                max_latency_us: acc.latency_max_us,
            })
            .collect();
        Ok(Response::new(pb::LatencyResponse { models }))
    }

    async fn get_trace(&self, request: Request<pb::GetTraceRequest>) -> Result<Response<pb::Trace>, Status> {
        let req = request.get_ref();
        let scope = Scope::from_proto(&req.org_id, &req.project_ids, req.all_projects)?;
        if req.request_id.is_empty() {
            return Err(Error::InvalidArgument("request_id is required".into()).into());
        }
        match self.store.get(&scope, &req.request_id).await {
            Ok(Some(trace)) => Ok(Response::new(trace)),
            // Another organization's or project's trace answers exactly like an unknown one.
            Ok(None) => Err(Error::NotFound(req.request_id.clone()).into()),
            Err(e) => Err(self.store_failed("get_trace", e)),
        }
    }
}
