//! Trace records leave the request path through a bounded buffer: the reply never waits for
//! analytics. A background task sends batches (by size or age) over `Analytics.Record` and, on
//! an edge that uploads to a cloud meshgate, hands the same batch to `Sync.Uplink`, which stages
//! it on disk for upload. When the buffer is full, records are dropped and counted rather than
//! slowing requests down.

use std::time::Duration;

use meshgate_proto::analytics::v1::analytics_client::AnalyticsClient;
use meshgate_proto::analytics::v1::{RecordBatch, Trace};
use meshgate_proto::sync::v1::UplinkRequest;
use meshgate_proto::sync::v1::sync_client::SyncClient;
use meshgate_runtime::MeshChannel;
use prometheus::IntCounter;
use tokio::sync::mpsc;

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
        let deadline = tokio::time::sleep(config.flush_interval);
        tokio::pin!(deadline);
        let closing = loop {
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
            let request = futures::stream::iter([RecordBatch { traces: chunk }]);
            match client.record(request).await {
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
                        tracing::warn!(%status, "cannot record traces; dropping batches until analytics answers");
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
