//! The gRPC adapter over [`QuotaEngine`].

use std::sync::Arc;

use meshgate_proto::quota::v1 as pb;
use tonic::{Request, Response, Status};

use crate::engine::QuotaEngine;

/// `meshgate.quota.v1.Quota` over an engine.
#[derive(Clone)]
pub struct QuotaService {
    engine: Arc<QuotaEngine>,
}

impl QuotaService {
    pub fn new(engine: Arc<QuotaEngine>) -> Self {
        Self { engine }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> pb::quota_server::QuotaServer<Self> {
        pb::quota_server::QuotaServer::new(self)
    }
}

#[tonic::async_trait]
impl pb::quota_server::Quota for QuotaService {
    async fn reserve(&self, request: Request<pb::ReserveRequest>) -> Result<Response<pb::ReserveResponse>, Status> {
        Ok(Response::new(self.engine.reserve(request.get_ref()).await?))
    }

    async fn commit(&self, request: Request<pb::CommitRequest>) -> Result<Response<pb::CommitResponse>, Status> {
        Ok(Response::new(self.engine.commit(request.get_ref()).await?))
    }

    async fn charge(&self, request: Request<pb::ChargeRequest>) -> Result<Response<pb::ChargeResponse>, Status> {
        Ok(Response::new(self.engine.charge(request.get_ref()).await?))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        Ok(Response::new(self.engine.release(request.get_ref()).await?))
    }

    async fn lease(&self, request: Request<pb::LeaseRequest>) -> Result<Response<pb::LeaseResponse>, Status> {
        Ok(Response::new(self.engine.lease(request.get_ref()).await?))
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.engine.status(request.get_ref()).await?))
    }

    async fn set_limits(
        &self,
        request: Request<pb::SetLimitsRequest>,
    ) -> Result<Response<pb::SetLimitsResponse>, Status> {
        Ok(Response::new(self.engine.set_limits(request.get_ref()).await?))
    }
}
