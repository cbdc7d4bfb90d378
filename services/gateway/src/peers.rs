//! The services the gateway calls, and the one way their failures reach a client: a peer that
//! does not answer within its deadline is a 504 `timeout` (the outcome is unknown: the call may
//! still have taken effect), one that cannot be reached or fails inside is a 503
//! `service_unavailable`, and any other status keeps its code.

use std::time::Duration;

use meshgate_proto::analytics::v1::analytics_client::AnalyticsClient;
use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_proto::router::v1::router_client::RouterClient;
use meshgate_proto::sync::v1::sync_client::SyncClient;
use meshgate_runtime::error::ERROR_CODE_METADATA;
use meshgate_runtime::{ApiError, ErrorCode, MeshChannel};

/// Clients of the services the gateway calls, and the deadline of a call to one.
#[derive(Clone)]
pub struct Peers {
    pub analytics: AnalyticsClient<MeshChannel>,
    pub quota: QuotaClient<MeshChannel>,
    pub router: RouterClient<MeshChannel>,
    pub sync: SyncClient<MeshChannel>,
    pub inference: InferenceClient<MeshChannel>,
    /// Deadline of a call to quota, router, sync (but `Complete`) or analytics.
    pub timeout: Duration,
}

/// Calls a peer service with a deadline; failures become the errors the edge reports.
pub(crate) async fn peer_call<T>(
    peer: &'static str,
    deadline: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ApiError> {
    peer_response(peer, deadline, call).await.map(tonic::Response::into_inner)
}

/// [`peer_call`], keeping the response's metadata.
pub(crate) async fn peer_response<T>(
    peer: &'static str,
    deadline: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<tonic::Response<T>, ApiError> {
    match tokio::time::timeout(deadline, call).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(status)) => Err(match (status.code(), ApiError::from_status(&status)) {
            // What the peer says went wrong beyond it (a provider failing: upstream_error).
            (_, err) if status.metadata().contains_key(ERROR_CODE_METADATA) && err.code != ErrorCode::Internal => err,
            (tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal, _) => {
                ApiError::new(ErrorCode::Unavailable, format!("{peer} service unavailable: {}", status.message()))
            }
            (_, err) => err,
        }),
        Err(_) => Err(ApiError::new(
            ErrorCode::Timeout,
            format!("{peer} service did not answer within {} ms", deadline.as_millis()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_silent_peer_is_a_timeout_and_a_failing_one_unavailable() {
        let silent = std::future::pending::<Result<tonic::Response<()>, tonic::Status>>();
        let err = peer_call("quota", Duration::from_millis(10), silent).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Timeout);
        assert!(err.message.contains("quota service did not answer within 10 ms"), "{}", err.message);
        let down = async { Err::<tonic::Response<()>, _>(tonic::Status::unavailable("connection refused")) };
        assert_eq!(peer_call("router", Duration::from_secs(1), down).await.unwrap_err().code, ErrorCode::Unavailable);
        let upstream =
            async { Err::<tonic::Response<()>, _>(ErrorCode::UpstreamError.status("provider answered 500")) };
        let err = peer_call("sync", Duration::from_secs(1), upstream).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::UpstreamError, "the peer's own code is kept");
        let broken = async { Err::<tonic::Response<()>, _>(ErrorCode::Internal.status("bug")) };
        assert_eq!(peer_call("sync", Duration::from_secs(1), broken).await.unwrap_err().code, ErrorCode::Unavailable);
        let refused = async { Err::<tonic::Response<()>, _>(tonic::Status::permission_denied("not yours")) };
        let err = peer_call("sync", Duration::from_secs(1), refused).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::PermissionDenied);
    }
}
