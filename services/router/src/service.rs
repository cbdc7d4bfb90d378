//! The router's gRPC service: requests in, plans and target states out, outcomes into the core.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use meshgate_proto::common::v1::ChatMessage;
use meshgate_proto::router::v1::router_server::Router;
use meshgate_proto::router::v1::{
    DecideRequest, ListTargetsRequest, ListTargetsResponse, Outcome, OutcomeBatch, ReportOutcomeResponse, RoutePlan,
    RouteRequest, RoutingEpoch, WatchRoutingRequest,
};
use meshgate_runtime::ErrorCode;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::state::RouterCore;

/// How long a plan for an unknown model waits for a fresh read of the local models.
const LOCAL_READ_WAIT: Duration = Duration::from_millis(500);

/// The gRPC service.
#[derive(Clone)]
pub struct RouterService {
    core: Arc<RouterCore>,
}

impl RouterService {
    pub fn new(core: Arc<RouterCore>) -> Self {
        Self { core }
    }

    async fn decide(&self, request: &RouteRequest, messages: &[ChatMessage], hint: &str) -> Result<RoutePlan, Error> {
        let features = self.core.features(request, messages, hint).await?;
        let first = self.core.plan(&features, Instant::now(), &mut rand::rng());
        let plan = match first {
            // A local model loaded since the last read is served at once, not after the next.
            Err(Error::UnknownModel(_)) if self.core.read_local_models(LOCAL_READ_WAIT).await => {
                self.core.plan(&features, Instant::now(), &mut rand::rng())?
            }
            plan => plan?,
        };
        tracing::debug!(
            request_id = %request.request_id,
            task = %plan.task,
            policy = %plan.policy,
            reasons = ?plan.reasons,
            "{}",
            plan.explanation
        );
        Ok(plan)
    }
}

#[tonic::async_trait]
impl Router for RouterService {
    async fn route(&self, request: Request<RouteRequest>) -> Result<Response<RoutePlan>, Status> {
        Ok(Response::new(self.decide(request.get_ref(), &[], "").await?))
    }

    async fn decide(&self, request: Request<DecideRequest>) -> Result<Response<RoutePlan>, Status> {
        let request = request.into_inner();
        let Some(route) = &request.request else {
            return Err(ErrorCode::InvalidRequest.status("request must be set"));
        };
        Ok(Response::new(RouterService::decide(self, route, &request.messages, request.task_hint.trim()).await?))
    }

    async fn report_outcome(&self, request: Request<Outcome>) -> Result<Response<ReportOutcomeResponse>, Status> {
        let outcome = request.into_inner();
        if outcome.target_id.is_empty() {
            return Err(ErrorCode::InvalidRequest.status("target_id must not be empty"));
        }
        self.core.report(&outcome, Instant::now());
        Ok(Response::new(ReportOutcomeResponse {}))
    }

    async fn report_outcomes(&self, request: Request<OutcomeBatch>) -> Result<Response<ReportOutcomeResponse>, Status> {
        let batch = request.into_inner();
        if batch.outcomes.iter().any(|o| o.target_id.is_empty()) {
            return Err(ErrorCode::InvalidRequest.status("every outcome needs a target_id"));
        }
        let now = Instant::now();
        for outcome in &batch.outcomes {
            self.core.report(outcome, now);
        }
        Ok(Response::new(ReportOutcomeResponse {}))
    }

    async fn list_targets(&self, _: Request<ListTargetsRequest>) -> Result<Response<ListTargetsResponse>, Status> {
        Ok(Response::new(ListTargetsResponse { targets: self.core.states(Instant::now()) }))
    }

    type WatchRoutingStream = Pin<Box<dyn Stream<Item = Result<RoutingEpoch, Status>> + Send>>;

    async fn watch_routing(
        &self,
        _: Request<WatchRoutingRequest>,
    ) -> Result<Response<Self::WatchRoutingStream>, Status> {
        let core = self.core.clone();
        let epochs = futures::stream::unfold((core.watch_epoch(), true), move |(mut watch, first)| {
            let core = core.clone();
            async move {
                if !first {
                    watch.changed().await;
                }
                let (router_instance, epoch) = core.epoch();
                Some((Ok(RoutingEpoch { router_instance, epoch }), (watch, false)))
            }
        });
        Ok(Response::new(Box::pin(epochs)))
    }
}
