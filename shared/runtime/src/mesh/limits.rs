//! The largest request message each RPC may carry, enforced on the gRPC frame headers as the
//! body streams in: a message declared larger is refused before any of it is buffered.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::SecurityError;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// A conversation: the gateway's largest body (`[gateway] max_body_bytes`, 32 MiB at most by
/// default) with room for protobuf's framing.
const CONVERSATION: usize = 40 * MIB;

/// The largest message an RPC of the mesh carries (a conversation, or the vectors of a full batch
/// of embeddings). Servers and clients give tonic this as their decoding limit, whose default of
/// 4 MiB would refuse an agent's conversation with images before the table below is consulted;
/// the table holds each request to its own, smaller bound.
pub const MAX_MESSAGE_BYTES: usize = CONVERSATION;

/// Messages that carry a conversation (with its images, as agents send them) may be as large as
/// the largest request body an edge accepts plus protobuf's framing; budgets, lookups and queries
/// are small; batches of traces are large (the analytics service applies its own
/// `max_message_bytes` below this).
const TABLE: &[(&str, usize)] = &[
    ("/meshgate.gateway.v1.Gateway/Chat", CONVERSATION),
    ("/meshgate.gateway.v1.Gateway/Embed", 4 * MIB),
    ("/meshgate.gateway.v1.Gateway/ListModels", KIB),
    ("/grpc.health.v1.Health/Check", KIB),
    ("/grpc.health.v1.Health/Watch", KIB),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", 16 * KIB),
    ("/meshgate.quota.v1.Quota/Reserve", 8 * KIB),
    ("/meshgate.quota.v1.Quota/Commit", 8 * KIB),
    ("/meshgate.quota.v1.Quota/Release", 8 * KIB),
    ("/meshgate.quota.v1.Quota/Status", 8 * KIB),
    ("/meshgate.quota.v1.Quota/SetLimits", 16 * KIB),
    ("/meshgate.quota.v1.Quota/Charge", 8 * KIB),
    ("/meshgate.quota.v1.Quota/Lease", 8 * KIB),
    ("/meshgate.inference.v1.Inference/Generate", CONVERSATION),
    ("/meshgate.inference.v1.Inference/Embed", 4 * MIB),
    ("/meshgate.inference.v1.Inference/Classify", 4 * MIB),
    ("/meshgate.inference.v1.Inference/ListModels", KIB),
    ("/meshgate.inference.v1.Inference/Load", 4 * KIB),
    ("/meshgate.router.v1.Router/Decide", 4 * MIB),
    ("/meshgate.router.v1.Router/Route", 16 * KIB),
    ("/meshgate.router.v1.Router/ReportOutcome", 16 * KIB),
    ("/meshgate.router.v1.Router/ReportOutcomes", MIB),
    ("/meshgate.router.v1.Router/ListTargets", KIB),
    ("/meshgate.router.v1.Router/WatchRouting", KIB),
    ("/meshgate.sync.v1.Sync/Complete", CONVERSATION),
    ("/meshgate.sync.v1.Sync/Embed", CONVERSATION),
    ("/meshgate.sync.v1.Sync/Enqueue", CONVERSATION),
    ("/meshgate.sync.v1.Sync/GetJob", 8 * KIB),
    ("/meshgate.sync.v1.Sync/ListJobs", 8 * KIB),
    ("/meshgate.sync.v1.Sync/RetryJob", 16 * KIB),
    ("/meshgate.sync.v1.Sync/Uplink", 4 * MIB),
    ("/meshgate.analytics.v1.Analytics/Record", 64 * MIB),
    ("/meshgate.analytics.v1.Analytics/Query", 256 * KIB),
    ("/meshgate.analytics.v1.Analytics/TopExpensive", 256 * KIB),
    ("/meshgate.analytics.v1.Analytics/ErrorRates", 256 * KIB),
    ("/meshgate.analytics.v1.Analytics/Latency", 256 * KIB),
    ("/meshgate.analytics.v1.Analytics/GetTrace", 256 * KIB),
];

/// Paths outside the table (answered UNIMPLEMENTED anyway) may send this much.
const UNKNOWN_RPC_LIMIT: usize = KIB;

/// The table with a deployment's overrides.
#[derive(Debug)]
pub(crate) struct RequestLimits {
    limits: HashMap<&'static str, usize>,
}

impl RequestLimits {
    /// The table, with `overrides` by RPC name (`Service.Method`) applied.
    pub(crate) fn new(overrides: &BTreeMap<String, usize>) -> Result<Self, SecurityError> {
        let mut limits: HashMap<&'static str, usize> = TABLE.iter().copied().collect();
        for (rpc, bytes) in overrides {
            let path = super::access::resolve_rpc(rpc)
                .ok_or_else(|| SecurityError::Config(format!("max_request_bytes: unknown RPC {rpc:?}")))?;
            limits.insert(path, *bytes);
        }
        Ok(Self { limits })
    }

    /// The largest message `path` accepts.
    pub(crate) fn of(&self, path: &str) -> usize {
        self.limits.get(path).copied().unwrap_or(UNKNOWN_RPC_LIMIT)
    }
}

/// A request body that reads the 5-byte header of each gRPC message (flag, big-endian length)
/// as the bytes pass and fails with OUT_OF_RANGE on the chunk that declares a message larger
/// than `limit`, so the decoder never buffers it. `on_refusal` runs once, when it does.
pub(crate) struct LimitedBody<B> {
    inner: B,
    limit: usize,
    /// Header bytes of the next message seen so far.
    header: [u8; 5],
    header_len: usize,
    /// Payload bytes of the current message still to pass.
    payload_left: u64,
    on_refusal: Option<Box<dyn FnOnce() + Send>>,
    refused: bool,
}

impl<B> LimitedBody<B> {
    pub(crate) fn new(inner: B, limit: usize, on_refusal: Box<dyn FnOnce() + Send>) -> Self {
        Self {
            inner,
            limit,
            header: [0; 5],
            header_len: 0,
            payload_left: 0,
            on_refusal: Some(on_refusal),
            refused: false,
        }
    }

    /// Follows the messages through `chunk`; the declared length of the first one over the
    /// limit, if any.
    fn scan(&mut self, mut chunk: &[u8]) -> Option<u64> {
        while !chunk.is_empty() {
            if self.payload_left > 0 {
                let step = chunk.len().min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                self.payload_left -= step as u64;
                chunk = &chunk[step..];
                continue;
            }
            let step = chunk.len().min(5 - self.header_len);
            self.header[self.header_len..self.header_len + step].copy_from_slice(&chunk[..step]);
            self.header_len += step;
            chunk = &chunk[step..];
            if self.header_len == 5 {
                self.header_len = 0;
                let declared =
                    u64::from(u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]));
                if declared > self.limit as u64 {
                    return Some(declared);
                }
                self.payload_left = declared;
            }
        }
        None
    }
}

impl<B> http_body::Body for LimitedBody<B>
where
    B: http_body::Body<Data = Bytes, Error = tonic::Status> + Unpin,
{
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        if self.refused {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Some(declared) = self.scan(data)
        {
            self.refused = true;
            if let Some(count) = self.on_refusal.take() {
                count();
            }
            let limit = self.limit;
            return Poll::Ready(Some(Err(crate::ErrorCode::MessageTooLarge
                .status(format!("a request message of {declared} bytes is over this RPC's limit of {limit} bytes")))));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.refused || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn message(len: usize) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(len as u32).to_be_bytes());
        framed.extend(std::iter::repeat_n(7u8, len));
        framed
    }

    type Chunks = Vec<Result<http_body::Frame<Bytes>, tonic::Status>>;

    fn body(
        chunks: Vec<Vec<u8>>,
    ) -> http_body_util::StreamBody<futures::stream::Iter<<Chunks as IntoIterator>::IntoIter>> {
        let frames: Chunks = chunks.into_iter().map(|c| Ok(http_body::Frame::data(Bytes::from(c)))).collect();
        http_body_util::StreamBody::new(futures::stream::iter(frames))
    }

    /// The messages of `stream` split into chunks of `size` bytes, through a body limited to `limit`.
    async fn through(stream: Vec<u8>, size: usize, limit: usize) -> (Result<usize, tonic::Status>, usize) {
        let refusals = Arc::new(AtomicUsize::new(0));
        let counted = refusals.clone();
        let chunks = stream.chunks(size).map(<[u8]>::to_vec).collect();
        let limited = LimitedBody::new(
            body(chunks),
            limit,
            Box::new(move || {
                counted.fetch_add(1, Ordering::Relaxed);
            }),
        );
        let collected = limited.collect().await.map(|c| c.to_bytes().len());
        (collected, refusals.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn messages_within_the_limit_pass_whole_however_they_are_split() {
        let stream = [message(100), message(0), message(4096)].concat();
        for size in [1, 3, 5, 6, 99, 4096, 10_000] {
            let (passed, refusals) = through(stream.clone(), size, 4096).await;
            assert_eq!(passed.unwrap(), stream.len(), "chunks of {size}");
            assert_eq!(refusals, 0);
        }
    }

    #[tokio::test]
    async fn a_message_declared_over_the_limit_is_refused_at_its_header() {
        // Only the header and a little of the payload ever arrive: nothing waits for the rest.
        let mut stream = [message(10), message(5000)].concat();
        stream.truncate(15 + 5 + 10);
        for size in [1, 2, 7, 64] {
            let (passed, refusals) = through(stream.clone(), size, 4096).await;
            let status = passed.unwrap_err();
            assert_eq!(status.code(), tonic::Code::OutOfRange, "chunks of {size}");
            assert!(status.message().contains("5000 bytes"), "{}", status.message());
            assert_eq!(refusals, 1);
        }
    }

    #[test]
    fn overrides_apply_by_rpc_name() {
        let limits = RequestLimits::new(&BTreeMap::from([("Analytics.Record".to_owned(), 1024)])).unwrap();
        assert_eq!(limits.of("/meshgate.analytics.v1.Analytics/Record"), 1024);
        assert_eq!(limits.of("/meshgate.quota.v1.Quota/Reserve"), 8 * KIB);
        assert_eq!(limits.of("/made.Up/Call"), UNKNOWN_RPC_LIMIT);
        assert!(RequestLimits::new(&BTreeMap::from([("Quota.Nothing".to_owned(), 1)])).is_err());
    }

    #[test]
    fn every_rpc_has_a_limit() {
        for path in crate::rpc_methods::known_methods() {
            assert!(TABLE.iter().any(|(p, _)| p == path), "{path} has no request limit");
        }
    }
}
