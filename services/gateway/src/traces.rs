//! Trace records leave the request path through a bounded buffer: the reply never waits for
//! analytics. A background task sends batches (by size or age) over `Analytics.Record` and, on
//! an edge that uploads to a cloud meshgate, hands the same batch to `Sync.Uplink`, which stages
//! it on disk for upload. When the buffer is full, records are dropped and counted rather than
//! slowing requests down. A batch analytics could not take for a passing reason (unreachable,
//! overloaded, timed out) is sent again a few times with backoff before it is dropped; meanwhile
//! new records wait in the same bounded buffer.

use std::time::Duration;

use meshgate_proto::analytics::v1::analytics_client::AnalyticsClient;
use meshgate_proto::analytics::v1::{RecordBatch, Trace};
use meshgate_proto::sync::v1::UplinkRequest;
use meshgate_proto::sync::v1::sync_client::SyncClient;
use meshgate_runtime::MeshChannel;
use prometheus::IntCounter;
use tokio::sync::mpsc;

/// How long a batch failing for a passing reason (analytics restarting, its Postgres down) is
/// tried again before it is dropped (counted): a dependency's outage of up to a minute loses no
/// trace, while later traces wait in the buffer (`trace_buffer`) behind it.
const RECORD_PATIENCE: Duration = Duration::from_secs(60);
/// The same while the gateway drains for shutdown, which must not wait a minute.
const RECORD_PATIENCE_DRAINING: Duration = Duration::from_secs(6);
/// Waits between attempts: doubling from the first, capped.
const RECORD_RETRY_FIRST: Duration = Duration::from_millis(200);
const RECORD_RETRY_CAP: Duration = Duration::from_secs(2);

/// Failures after which the same batch may be taken (request ids make a resent trace count once).
fn transient(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted | Code::Unknown
    )
}

/// Sends one batch to analytics, again while it fails for a passing reason, for `patience`.
async fn record(
    client: &mut AnalyticsClient<MeshChannel>,
    traces: Vec<Trace>,
    patience: Duration,
) -> Result<(), tonic::Status> {
    let give_up = tokio::time::Instant::now() + patience;
    let mut delay = RECORD_RETRY_FIRST;
    loop {
        let request = futures::stream::iter([RecordBatch { traces: traces.clone() }]);
        match client.record(request).await {
            Ok(_) => return Ok(()),
            Err(status) if transient(&status) && tokio::time::Instant::now() + delay <= give_up => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RECORD_RETRY_CAP);
            }
            Err(status) => return Err(status),
        }
    }
}

/// Batching of trace uploads.
#[derive(Debug, Clone, Copy)]
pub struct TraceSinkConfig {
    /// Records held in memory at most; beyond it new records are dropped.
    pub capacity: usize,
    /// Records per `Record` call at most.
    pub batch_size: usize,
    /// A partial batch is sent after this long.
    pub flush_interval: Duration,
}

/// Counters of the sink, registered by the caller.
#[derive(Clone)]
pub struct TraceSinkMetrics {
    pub dropped: IntCounter,
    pub sent: IntCounter,
    pub failed: IntCounter,
    pub uplinked: IntCounter,
    pub uplink_failed: IntCounter,
}

/// Handle used by request handlers; cheap to clone.
#[derive(Clone)]
pub struct TraceSink {
    sender: mpsc::Sender<Trace>,
    metrics: TraceSinkMetrics,
}

impl TraceSink {
    /// Starts the uploader, which also stages every batch for the cloud through `uplink` when
    /// given. It runs until every handle is dropped (the servers have stopped and their requests
    /// settled), then sends what is left and ends: await the returned task.
    pub fn start(
        client: AnalyticsClient<MeshChannel>,
        uplink: Option<SyncClient<MeshChannel>>,
        config: TraceSinkConfig,
        metrics: TraceSinkMetrics,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(config.capacity.max(1));
        let uploader = tokio::spawn(upload(client, uplink, receiver, config, metrics.clone()));
        (Self { sender, metrics }, uploader)
    }

    /// Queues a trace without waiting.
    pub fn record(&self, trace: Trace) {
        if self.sender.try_send(trace).is_err() {
            self.metrics.dropped.inc();
        }
    }
}

async fn upload(
    mut client: AnalyticsClient<MeshChannel>,
    mut uplink: Option<SyncClient<MeshChannel>>,
    mut receiver: mpsc::Receiver<Trace>,
    config: TraceSinkConfig,
    metrics: TraceSinkMetrics,
) {
    let mut batch = Vec::with_capacity(config.batch_size);
    let mut failing = false;
    let mut uplink_failing = false;
    loop {
        // A batch leaves `flush_interval` after its first trace (or when full): what a replica
        // killed without a drain loses.
        match receiver.recv().await {
            Some(trace) => batch.push(trace),
            None => return,
        }
        let deadline = tokio::time::sleep(config.flush_interval);
        tokio::pin!(deadline);
        let closing = batch.len() < config.batch_size
            && loop {
                tokio::select! {
                    received = receiver.recv() => match received {
                        Some(trace) => {
                            batch.push(trace);
                            if batch.len() >= config.batch_size { break false; }
                        }
                        None => break true,
                    },
                    _ = &mut deadline => break false,
                }
            };
        while !batch.is_empty() {
            let take = batch.len().min(config.batch_size);
            let chunk: Vec<Trace> = batch.drain(..take).collect();
            let count = chunk.len() as u64;
            if let Some(sync) = uplink.as_mut() {
                // Not retried: the batch may have been staged before the answer was lost, and a
                // second copy would be charged twice in the cloud.
                match sync.uplink(UplinkRequest { traces: chunk.clone() }).await {
                    Ok(_) => {
                        metrics.uplinked.inc_by(count);
                        uplink_failing = false;
                    }
                    Err(status) => {
                        metrics.uplink_failed.inc_by(count);
                        if !uplink_failing {
                            tracing::warn!(%status, "cannot stage traces for the cloud");
                            uplink_failing = true;
                        }
                    }
                }
            }
            let patience = if closing { RECORD_PATIENCE_DRAINING } else { RECORD_PATIENCE };
            match record(&mut client, chunk, patience).await {
                Ok(_) => {
                    metrics.sent.inc_by(count);
                    if failing {
                        tracing::info!("analytics reachable again; traces flowing");
                        failing = false;
                    }
                }
                Err(status) => {
                    metrics.failed.inc_by(count);
                    if !failing {
                        tracing::warn!(%status, "cannot record traces; dropping the batches it keeps refusing");
                        failing = true;
                    }
                }
            }
        }
        if closing {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use meshgate_proto::analytics::v1::GetTraceRequest;
    use meshgate_proto::common::v1::Principal;
    use meshgate_runtime::{ListenConfig, Listeners, Shutdown};

    use super::*;

    fn metrics() -> TraceSinkMetrics {
        let counter = |name: &str| IntCounter::new(name, name).unwrap();
        TraceSinkMetrics {
            dropped: counter("dropped"),
            sent: counter("sent"),
            failed: counter("failed"),
            uplinked: counter("uplinked"),
            uplink_failed: counter("uplink_failed"),
        }
    }

    fn trace(i: usize) -> Trace {
        Trace {
            request_id: format!("sink-{i}"),
            principal: Some(Principal { org_id: "o".into(), project_id: "p".into(), ..Principal::default() }),
            started_at: Some(prost_types::Timestamp { seconds: chrono::Utc::now().timestamp(), nanos: 0 }),
            ..Trace::default()
        }
    }

    /// Analytics is down when the batches are sent and comes up within the retry window: the
    /// batches held are recorded, nothing past the buffer's bound was kept, and every trace is
    /// either recorded or counted as dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_refused_for_a_passing_reason_is_sent_again_within_the_buffers_bound() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let channel = meshgate_runtime::channel(&format!("http://{free}"), Duration::from_secs(1)).unwrap();
        let config = TraceSinkConfig { capacity: 4, batch_size: 2, flush_interval: Duration::from_millis(10) };
        let metrics = metrics();
        let (sink, uploader) = TraceSink::start(AnalyticsClient::new(channel.clone()), None, config, metrics.clone());
        for i in 0..10 {
            sink.record(trace(i));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(metrics.sent.get(), 0, "analytics is not up yet");

        let addrs = ListenConfig { grpc: free, admin: "127.0.0.1:0".parse().unwrap(), http: None };
        let listeners = Listeners::bind(&addrs).await.unwrap();
        let shutdown = Shutdown::new();
        let analytics = tokio::spawn(meshgate_analytics::serve(Default::default(), listeners, shutdown.clone()));
        drop(sink);
        tokio::time::timeout(Duration::from_secs(15), uploader).await.unwrap().unwrap();

        let (sent, dropped) = (metrics.sent.get(), metrics.dropped.get());
        assert_eq!(metrics.failed.get(), 0, "every held batch got through");
        assert_eq!(sent + dropped, 10);
        assert!((2..=6).contains(&sent), "at most the buffer plus the batch in hand: {sent}");
        let mut client = AnalyticsClient::new(channel);
        let mut found = 0;
        for i in 0..10 {
            let lookup = GetTraceRequest {
                request_id: format!("sink-{i}"),
                org_id: "o".into(),
                all_projects: true,
                ..GetTraceRequest::default()
            };
            found += usize::from(client.get_trace(lookup).await.is_ok());
        }
        assert_eq!(found as u64, sent);
        shutdown.trigger();
        analytics.await.unwrap().unwrap();
    }

    /// Analytics (or its Postgres) down for longer than a restart takes — here 7 s — loses no
    /// trace: the batch in hand is tried again for a minute (found by the chaos suite's
    /// postgres-restart, which lost the traces of the requests just before it).
    #[tokio::test]
    async fn a_batch_outlives_an_analytics_outage_of_several_seconds() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let channel = meshgate_runtime::channel(&format!("http://{free}"), Duration::from_secs(1)).unwrap();
        let config = TraceSinkConfig { capacity: 16, batch_size: 4, flush_interval: Duration::from_millis(10) };
        let metrics = metrics();
        let (sink, _uploader) = TraceSink::start(AnalyticsClient::new(channel), None, config, metrics.clone());
        for i in 0..3 {
            sink.record(trace(i));
        }
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!((metrics.sent.get(), metrics.failed.get()), (0, 0), "still held while analytics is down");

        let addrs = ListenConfig { grpc: free, admin: "127.0.0.1:0".parse().unwrap(), http: None };
        let listeners = Listeners::bind(&addrs).await.unwrap();
        let shutdown = Shutdown::new();
        let analytics = tokio::spawn(meshgate_analytics::serve(Default::default(), listeners, shutdown.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while metrics.sent.get() < 3 {
            assert!(tokio::time::Instant::now() < deadline, "not sent after analytics came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(metrics.failed.get(), 0);
        drop(sink);
        shutdown.trigger();
        analytics.await.unwrap().unwrap();
    }
}
