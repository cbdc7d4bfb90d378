//! The `meshgate.sync.v1.Sync` gRPC service.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use meshgate_proto::sync::v1::sync_server::Sync as SyncApi;
use meshgate_proto::sync::v1::{
    CompleteChunk, CompleteRequest, EnqueueRequest, GetJobRequest, Job, ListJobsRequest, ListJobsResponse,
};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::upstream::Upstream;

/// Message of the queue RPCs until the durable queue exists.
const QUEUE_NOT_BUILT: &str = "the durable sync queue (Enqueue, GetJob, ListJobs) is not built yet: it is issue 7";

/// Serves `Complete` over an [`Upstream`]; the queue RPCs answer UNIMPLEMENTED (issue 7).
#[derive(Clone)]
pub struct SyncService {
    upstream: Upstream,
}

impl SyncService {
    pub fn new(upstream: Upstream) -> Self {
        Self { upstream }
    }
}

#[tonic::async_trait]
impl SyncApi for SyncService {
    type CompleteStream = Pin<Box<dyn Stream<Item = Result<CompleteChunk, Status>> + Send>>;

    async fn complete(&self, request: Request<CompleteRequest>) -> Result<Response<Self::CompleteStream>, Status> {
        // A caller that only set the x-request-id header still gets it forwarded upstream.
        let header_id = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut request = request.into_inner();
        if request.request_id.is_empty()
            && let Some(id) = header_id
        {
            request.request_id = id;
        }
        let stream = self.upstream.complete(request)?;
        Ok(Response::new(Box::pin(stream.map(|item| item.map_err(Status::from)))))
    }

    async fn enqueue(&self, _request: Request<EnqueueRequest>) -> Result<Response<Job>, Status> {
        Err(Error::NotImplemented(QUEUE_NOT_BUILT).into())
    }

    async fn get_job(&self, _request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Err(Error::NotImplemented(QUEUE_NOT_BUILT).into())
    }

    async fn list_jobs(&self, _request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        Err(Error::NotImplemented(QUEUE_NOT_BUILT).into())
    }
}
