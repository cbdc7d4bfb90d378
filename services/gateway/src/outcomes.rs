//! Target outcomes reach the router off the request path, in batches: under load one
//! `ReportOutcomes` call carries whatever accumulated while the previous one was in flight; at
//! low load each outcome goes alone, without waiting for a timer. Health is statistical, so an
//! outcome dropped when the buffer is full or the router is away is acceptable; a slower reply
//! is not.

use std::time::Duration;

use meshgate_proto::router::v1::router_client::RouterClient;
use meshgate_proto::router::v1::{Outcome, OutcomeBatch};
use meshgate_runtime::MeshChannel;
use tokio::sync::mpsc;

/// Outcomes buffered at most.
const CAPACITY: usize = 8192;
/// Outcomes per call at most.
const BATCH: usize = 512;

/// Handle used by request settlement; cheap to clone.
#[derive(Clone)]
pub struct OutcomeReporter {
    sender: mpsc::Sender<Outcome>,
}

impl OutcomeReporter {
    /// Starts the sender; it ends once every handle is dropped and the buffer is sent.
    pub fn start(router: RouterClient<MeshChannel>, timeout: Duration) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(CAPACITY);
        (Self { sender }, tokio::spawn(send_batches(router, receiver, timeout)))
    }

    /// Queues an outcome without waiting.
    pub fn report(&self, outcome: Outcome) {
        if self.sender.try_send(outcome).is_err() {
            tracing::debug!("outcome buffer full; outcome dropped");
        }
    }
}

async fn send_batches(mut router: RouterClient<MeshChannel>, mut receiver: mpsc::Receiver<Outcome>, timeout: Duration) {
    let mut failing = false;
    while let Some(first) = receiver.recv().await {
        let mut outcomes = vec![first];
        while outcomes.len() < BATCH {
            match receiver.try_recv() {
                Ok(outcome) => outcomes.push(outcome),
                Err(_) => break,
            }
        }
        match tokio::time::timeout(timeout, router.report_outcomes(OutcomeBatch { outcomes })).await {
            Ok(Ok(_)) if failing => {
                tracing::info!("router reachable again; outcomes flowing");
                failing = false;
            }
            Ok(Ok(_)) => {}
            Ok(Err(status)) if !failing => {
                tracing::warn!(%status, "cannot report outcomes to the router; dropping them until it answers");
                failing = true;
            }
            Err(_) if !failing => {
                tracing::warn!("the router did not take outcomes in time; dropping them until it answers");
                failing = true;
            }
            Ok(Err(_)) | Err(_) => {}
        }
    }
}
