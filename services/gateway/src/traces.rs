//! Trace records leave the request path through a bounded buffer: the reply never waits for
//! analytics. A background task sends batches (by size or age) over `Analytics.Record`; when the
//! buffer is full, records are dropped and counted rather than slowing requests down.

use std::time::Duration;

use meshgate_proto::analytics::v1::analytics_client::AnalyticsClient;
use meshgate_proto::analytics::v1::{RecordBatch, Trace};
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
}

/// Handle used by request handlers; cheap to clone.
#[derive(Clone)]
pub struct TraceSink {
    sender: mpsc::Sender<Trace>,
    metrics: TraceSinkMetrics,
}

impl TraceSink {
    /// Starts the uploader. It runs until every handle is dropped (the servers have stopped and
    /// their requests settled), then sends what is left and ends: await the returned task.
    pub fn start(
        client: AnalyticsClient<MeshChannel>,
        config: TraceSinkConfig,
        metrics: TraceSinkMetrics,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(config.capacity.max(1));
        let uploader = tokio::spawn(upload(client, receiver, config, metrics.clone()));
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
    mut receiver: mpsc::Receiver<Trace>,
    config: TraceSinkConfig,
    metrics: TraceSinkMetrics,
) {
    let mut batch = Vec::with_capacity(config.batch_size);
    let mut failing = false;
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
