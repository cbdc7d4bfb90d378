//! Dynamic batching for encoder models (`Embed`, `Classify`): requests for one model wait in a
//! bounded queue and a worker thread runs the texts of several requests in one session call.
//!
//! One session call over a batch costs far less than one call per text (the work is matrix
//! products that grow with the batch, while per-call overhead and thread start-up do not), and a
//! session runs one call at a time anyway. The worker takes a request, then whatever else is
//! queued, up to `max_batch_size` texts; when the previous batch merged several requests (there
//! is concurrency) it also waits up to `max_wait_us` for more, so a lone client never pays the
//! wait. A full queue refuses new requests at once with [`Error::QueueFull`]
//! (`RESOURCE_EXHAUSTED`) instead of letting latency grow without bound.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntGauge};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::error::Error;

/// Batching of `Embed` and `Classify` (`[inference.batching]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// Most texts one session call runs; 1 turns merging off (each request runs alone, in order).
    /// A request with more texts runs alone, in chunks of this size. The default, 8, is where
    /// int8 MiniLM's CPU per text was lowest on 2 cores (larger batches spill the caches).
    pub max_batch_size: usize,
    /// How long the worker waits for more requests to fill a batch, in microseconds, once
    /// requests are arriving concurrently. 0: merge only what is already queued.
    pub max_wait_us: u64,
    /// Requests that may wait per model; more are refused with `RESOURCE_EXHAUSTED`.
    pub queue_capacity: usize,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self { max_batch_size: 8, max_wait_us: 1000, queue_capacity: 256 }
    }
}

impl BatchingConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch_size == 0 {
            return Err("batching.max_batch_size must be at least 1".into());
        }
        if self.queue_capacity == 0 {
            return Err("batching.queue_capacity must be at least 1".into());
        }
        Ok(())
    }
}

/// A model whose work on several texts can be done in one call.
pub trait BatchModel: Send + Sync + 'static {
    /// The result for one text.
    type Item: Send + 'static;
    /// Runs `texts` in one call (blocking); one item per text, in order.
    fn run_batch(&self, texts: &[&str]) -> Result<Vec<Self::Item>, Error>;
}

/// Where a batcher reports its queue and batches.
#[derive(Clone)]
pub struct BatchMetrics {
    /// Requests waiting in the queue.
    pub queue_depth: IntGauge,
    /// Texts per session call.
    pub batch_size: Histogram,
    /// Requests merged into one session call.
    pub batch_requests: Histogram,
}

struct Job<T> {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<T>, Error>>,
}

/// The queue in front of one loaded encoder model and the worker thread that drains it. The
/// worker stops once the batcher is dropped and the queued requests are answered.
pub struct Batcher<M: BatchModel> {
    model: Arc<M>,
    name: String,
    queue: SyncSender<Job<M::Item>>,
    depth: Arc<AtomicUsize>,
    capacity: usize,
    metrics: BatchMetrics,
}

impl<M: BatchModel> Batcher<M> {
    /// Starts the worker thread of `model`.
    pub fn start(name: &str, model: Arc<M>, config: &BatchingConfig, metrics: BatchMetrics) -> Result<Self, Error> {
        config.validate().map_err(Error::Load)?;
        let (queue, rx) = std::sync::mpsc::sync_channel(config.queue_capacity);
        let depth = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            model: model.clone(),
            rx,
            depth: depth.clone(),
            max_batch: config.max_batch_size,
            max_wait: Duration::from_micros(config.max_wait_us),
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name(format!("batch-{name}"))
            .spawn(move || worker.run())
            .map_err(|e| Error::Load(format!("cannot start the batch worker: {e}")))?;
        Ok(Self { model, name: name.to_owned(), queue, depth, capacity: config.queue_capacity, metrics })
    }

    /// The model, for its properties (dims...).
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Requests waiting now.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    pub fn queue_capacity(&self) -> usize {
        self.capacity
    }

    /// Queues `texts` and waits for their results; refused at once when the queue is full.
    pub async fn submit(&self, texts: Vec<String>) -> Result<Vec<M::Item>, Error> {
        let (reply, answer) = oneshot::channel();
        // Counted before sending so the worker never sees the count go below zero.
        self.depth.fetch_add(1, Ordering::Relaxed);
        self.metrics.queue_depth.inc();
        if let Err(err) = self.queue.try_send(Job { texts, reply }) {
            self.depth.fetch_sub(1, Ordering::Relaxed);
            self.metrics.queue_depth.dec();
            return Err(match err {
                TrySendError::Full(_) => Error::QueueFull { model: self.name.clone(), capacity: self.capacity },
                TrySendError::Disconnected(_) => {
                    Error::Internal(format!("the batch worker of `{}` has stopped", self.name))
                }
            });
        }
        answer.await.map_err(|_| Error::Internal(format!("the batch worker of `{}` dropped a request", self.name)))?
    }
}

struct Worker<M: BatchModel> {
    model: Arc<M>,
    rx: Receiver<Job<M::Item>>,
    depth: Arc<AtomicUsize>,
    max_batch: usize,
    max_wait: Duration,
    metrics: BatchMetrics,
}

impl<M: BatchModel> Worker<M> {
    fn run(self) {
        let mut carried: Option<Job<M::Item>> = None;
        let mut concurrent = false;
        loop {
            let first = match carried.take() {
                Some(job) => job,
                None => match self.rx.recv() {
                    Ok(job) => self.taken(job),
                    // Every sender is gone: the model was unloaded and its queue is empty.
                    Err(_) => return,
                },
            };
            let mut jobs = vec![first];
            let mut texts = jobs[0].texts.len();
            let deadline = Instant::now() + self.max_wait;
            while texts < self.max_batch {
                let next = match self.rx.try_recv() {
                    Ok(job) => Some(job),
                    Err(TryRecvError::Empty) if concurrent && !self.max_wait.is_zero() => {
                        // A timeout or a closed queue both end the batch here.
                        self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok()
                    }
                    Err(_) => None,
                };
                let Some(job) = next else { break };
                let job = self.taken(job);
                if texts + job.texts.len() > self.max_batch {
                    carried = Some(job);
                    break;
                }
                texts += job.texts.len();
                jobs.push(job);
            }
            // Requests whose caller went away are not worth a model run.
            jobs.retain(|job| !job.reply.is_closed());
            concurrent = jobs.len() > 1;
            self.execute(jobs);
        }
    }

    fn taken(&self, job: Job<M::Item>) -> Job<M::Item> {
        self.depth.fetch_sub(1, Ordering::Relaxed);
        self.metrics.queue_depth.dec();
        job
    }

    /// Runs the texts of `jobs` and answers each. When a merged batch fails, each request is
    /// retried alone so one bad input cannot fail its neighbours.
    fn execute(&self, jobs: Vec<Job<M::Item>>) {
        if jobs.is_empty() {
            return;
        }
        self.metrics.batch_requests.observe(jobs.len() as f64);
        let texts: Vec<&str> = jobs.iter().flat_map(|job| job.texts.iter().map(String::as_str)).collect();
        match self.run_sorted(&texts) {
            Ok(items) => {
                let mut items = items.into_iter();
                for job in jobs {
                    let mine: Vec<M::Item> = items.by_ref().take(job.texts.len()).collect();
                    // The caller may be gone; nothing is left to tell it.
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(err) if jobs.len() == 1 => {
                let _ = jobs.into_iter().next().map(|job| job.reply.send(Err(err)));
            }
            Err(_) => {
                for job in jobs {
                    let texts: Vec<&str> = job.texts.iter().map(String::as_str).collect();
                    let result = self.run_sorted(&texts);
                    let _ = job.reply.send(result);
                }
            }
        }
    }

    /// Runs `texts` in chunks of at most `max_batch`, grouping texts of similar length so a
    /// chunk pads little, and returns the items in the original order.
    fn run_sorted(&self, texts: &[&str]) -> Result<Vec<M::Item>, Error> {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let mut slots: Vec<Option<M::Item>> = (0..texts.len()).map(|_| None).collect();
        for chunk in order.chunks(self.max_batch) {
            let batch: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            self.metrics.batch_size.observe(batch.len() as f64);
            // A panic in the model must not end the worker (and with it every later request).
            let items = std::panic::catch_unwind(AssertUnwindSafe(|| self.model.run_batch(&batch)))
                .map_err(|_| Error::Internal("the model run panicked".into()))??;
            if items.len() != chunk.len() {
                return Err(Error::Internal(format!("{} results for {} texts", items.len(), chunk.len())));
            }
            for (&i, item) in chunk.iter().zip(items) {
                slots[i] = Some(item);
            }
        }
        slots.into_iter().map(|s| s.ok_or_else(|| Error::Internal("a text got no result".into()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};

    use prometheus::HistogramOpts;

    use super::*;

    /// A test model of the batching trait (no ONNX Runtime involved: this checks the queue logic).
    /// Records the batches it runs; "fail" in a batch fails it; runs wait until `open`.
    #[derive(Default)]
    struct Recorder {
        started: AtomicUsize,
        open: Mutex<bool>,
        opened: Condvar,
        batches: Mutex<Vec<Vec<String>>>,
    }

    impl Recorder {
        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
    }

    impl BatchModel for Recorder {
        type Item = String;
        fn run_batch(&self, texts: &[&str]) -> Result<Vec<String>, Error> {
            self.started.fetch_add(1, Ordering::SeqCst);
            let _open = self.opened.wait_while(self.open.lock().unwrap(), |open| !*open).unwrap();
            self.batches.lock().unwrap().push(texts.iter().map(|t| t.to_string()).collect());
            if texts.contains(&"fail") {
                return Err(Error::Runtime("bad text".into()));
            }
            Ok(texts.iter().map(|t| t.to_uppercase()).collect())
        }
    }

    fn metrics() -> BatchMetrics {
        BatchMetrics {
            queue_depth: IntGauge::new("depth", "d").unwrap(),
            batch_size: Histogram::with_opts(HistogramOpts::new("size", "s")).unwrap(),
            batch_requests: Histogram::with_opts(HistogramOpts::new("requests", "r")).unwrap(),
        }
    }

    fn texts(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    type Answer = tokio::task::JoinHandle<Result<Vec<String>, Error>>;

    fn submit(batcher: &Arc<Batcher<Recorder>>, items: &[&str]) -> Answer {
        let (batcher, items) = (batcher.clone(), texts(items));
        tokio::spawn(async move { batcher.submit(items).await })
    }

    /// Polls until `done` holds (the worker is a plain thread the test cannot await).
    async fn until(mut done: impl FnMut() -> bool) {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A batcher whose worker is stuck on a first request (`["first"]`) until the model is
    /// opened, so the requests submitted next wait in the queue.
    async fn busy(config: BatchingConfig) -> (Arc<Recorder>, Arc<Batcher<Recorder>>, Answer) {
        let model = Arc::new(Recorder::default());
        let batcher = Arc::new(Batcher::start("t", model.clone(), &config, metrics()).unwrap());
        let first = submit(&batcher, &["first"]);
        until(|| model.started.load(Ordering::SeqCst) == 1).await;
        (model, batcher, first)
    }

    #[tokio::test]
    async fn queued_requests_are_merged_into_one_call_and_each_gets_its_own_answer() {
        let config = BatchingConfig { max_batch_size: 6, max_wait_us: 0, queue_capacity: 16 };
        let (model, batcher, first) = busy(config).await;
        let waiting = [submit(&batcher, &["bb", "c"]), submit(&batcher, &["ddd"]), submit(&batcher, &["e", "ff", "g"])];
        until(|| batcher.queue_depth() == 3).await;
        model.open();
        assert_eq!(first.await.unwrap().unwrap(), texts(&["FIRST"]));
        let mut answers = Vec::new();
        for answer in waiting {
            answers.push(answer.await.unwrap().unwrap());
        }
        assert_eq!(answers, [texts(&["BB", "C"]), texts(&["DDD"]), texts(&["E", "FF", "G"])]);
        let batches = model.batches.lock().unwrap().clone();
        // The three queued requests (6 texts) fill one batch, its texts grouped by length.
        assert_eq!(batches, [texts(&["first"]), texts(&["c", "e", "g", "bb", "ff", "ddd"])]);
        assert_eq!(batcher.queue_depth(), 0);
    }

    #[tokio::test]
    async fn a_batch_is_capped_and_the_rest_carried_to_the_next() {
        let config = BatchingConfig { max_batch_size: 2, max_wait_us: 0, queue_capacity: 16 };
        let (model, batcher, first) = busy(config).await;
        let waiting = [submit(&batcher, &["a"]), submit(&batcher, &["b"]), submit(&batcher, &["c", "d", "e"])];
        until(|| batcher.queue_depth() == 3).await;
        model.open();
        first.await.unwrap().unwrap();
        let mut answers = Vec::new();
        for answer in waiting {
            answers.push(answer.await.unwrap().unwrap());
        }
        assert_eq!(answers, [texts(&["A"]), texts(&["B"]), texts(&["C", "D", "E"])]);
        let batches = model.batches.lock().unwrap().clone();
        // A request larger than the cap runs alone, in chunks of the cap.
        assert_eq!(batches, [texts(&["first"]), texts(&["a", "b"]), texts(&["c", "d"]), texts(&["e"])]);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let config = BatchingConfig { max_batch_size: 4, max_wait_us: 0, queue_capacity: 1 };
        let (model, batcher, first) = busy(config).await;
        let queued = submit(&batcher, &["queued"]);
        until(|| batcher.queue_depth() == 1).await;
        let refused = batcher.submit(texts(&["refused"])).await.unwrap_err();
        assert!(matches!(refused, Error::QueueFull { capacity: 1, .. }), "{refused:?}");
        assert_eq!(refused.code(), meshgate_runtime::ErrorCode::Overloaded);
        assert_eq!(batcher.queue_depth(), 1);
        model.open();
        assert_eq!(first.await.unwrap().unwrap(), texts(&["FIRST"]));
        assert_eq!(queued.await.unwrap().unwrap(), texts(&["QUEUED"]));
    }

    #[tokio::test]
    async fn a_failing_text_fails_only_its_own_request() {
        let config = BatchingConfig { max_batch_size: 8, max_wait_us: 0, queue_capacity: 8 };
        let (model, batcher, first) = busy(config).await;
        let bad = submit(&batcher, &["ok1", "fail"]);
        let good = submit(&batcher, &["ok2"]);
        until(|| batcher.queue_depth() == 2).await;
        model.open();
        first.await.unwrap().unwrap();
        assert!(matches!(bad.await.unwrap().unwrap_err(), Error::Runtime(_)));
        assert_eq!(good.await.unwrap().unwrap(), texts(&["OK2"]));
        // Merged, failed, then each request alone.
        assert_eq!(model.batches.lock().unwrap().len(), 4);
    }

    #[test]
    fn zero_sizes_are_rejected() {
        assert!(BatchingConfig { max_batch_size: 0, ..BatchingConfig::default() }.validate().is_err());
        assert!(BatchingConfig { queue_capacity: 0, ..BatchingConfig::default() }.validate().is_err());
        assert!(BatchingConfig::default().validate().is_ok());
    }
}
