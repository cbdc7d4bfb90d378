//! The calls a pool makes to the quota service, as a trait so the pool is the same over any
//! client of `meshgate.quota.v1.Quota`.

use std::future::Future;

use meshgate_proto::quota::v1 as pb;
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_runtime::MeshChannel;
use tonic::Status;

/// The quota service as a pool calls it.
pub trait QuotaBackend: Clone + Send + Sync + 'static {
    fn lease(&self, request: pb::LeaseRequest) -> impl Future<Output = Result<pb::LeaseResponse, Status>> + Send;
    fn reserve(&self, request: pb::ReserveRequest) -> impl Future<Output = Result<pb::ReserveResponse, Status>> + Send;
    fn commit(&self, request: pb::CommitRequest) -> impl Future<Output = Result<(), Status>> + Send;
    fn release(&self, request: pb::ReleaseRequest) -> impl Future<Output = Result<(), Status>> + Send;
}

impl QuotaBackend for QuotaClient<MeshChannel> {
    fn lease(&self, request: pb::LeaseRequest) -> impl Future<Output = Result<pb::LeaseResponse, Status>> + Send {
        let mut client = self.clone();
        async move { QuotaClient::lease(&mut client, request).await.map(tonic::Response::into_inner) }
    }

    fn reserve(&self, request: pb::ReserveRequest) -> impl Future<Output = Result<pb::ReserveResponse, Status>> + Send {
        let mut client = self.clone();
        async move { QuotaClient::reserve(&mut client, request).await.map(tonic::Response::into_inner) }
    }

    fn commit(&self, request: pb::CommitRequest) -> impl Future<Output = Result<(), Status>> + Send {
        let mut client = self.clone();
        async move { QuotaClient::commit(&mut client, request).await.map(drop) }
    }

    fn release(&self, request: pb::ReleaseRequest) -> impl Future<Output = Result<(), Status>> + Send {
        let mut client = self.clone();
        async move { QuotaClient::release(&mut client, request).await.map(drop) }
    }
}
