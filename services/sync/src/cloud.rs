//! Edge → cloud: a meshgate pointed at a cloud meshgate (`[sync.cloud] url` and `key`, or
//! `MESHGATE_CLOUD_URL` and `MESHGATE_CLOUD_KEY`) uploads the traces its gateway records — with
//! their usage and cost — so the cloud's analytics and budgets see the edge's traffic once.
//!
//! The gateway hands each batch of traces to `Sync.Uplink`, which stages it in the [`Outbox`]: one
//! file per batch, written to a temporary name, fsync'd, renamed, the directory fsync'd, before
//! the RPC answers. The [`Uploader`] sends the oldest staged batch to the cloud's
//! `POST /v1/sync/batches` (protobuf [`EdgeBatch`], gzip) with `Idempotency-Key: <batch id>` and
//! deletes the file only after a 2xx. A batch id is `<outbox id>-<sequence>`: the outbox id is
//! drawn once and kept in the directory, so a batch keeps its id across retries and restarts
//! and the cloud applies it once. Failures are retried with backoff 1 s·2ⁿ capped at 30 s
//! (`Retry-After` honoured). A batch that can never be sent is moved to `<outbox>/rejected/` and
//! kept for inspection rather than retried forever (blocking every batch behind it) or deleted:
//! one the cloud refuses as malformed (400, 409, 413, 422), one that cannot be read, decoded or
//! compressed here (poisoned), and one the cloud keeps failing on (500 or another answer no wait
//! can fix) `max_batch_failures` times in a row. An unreachable or overloaded cloud (a transport
//! error, 408, 429, 502, 503, 504) or one refusing the key (401, 403) or missing the endpoint
//! (404) is no fault of the batch: those are retried for as long as it takes.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshgate_proto::analytics::v1::Trace;
use meshgate_proto::sync::v1::EdgeBatch;
use meshgate_runtime::Shutdown;
use meshgate_runtime::error::ErrorCode;
use parking_lot::Mutex;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::error::Error;
use crate::retry::{RetryPolicy, retry_after};

/// Path of the cloud's batch endpoint, appended to `[sync.cloud] url`.
pub const BATCHES_PATH: &str = "/v1/sync/batches";
/// Content type of an [`EdgeBatch`] body.
pub const BATCH_CONTENT_TYPE: &str = "application/x-protobuf";
/// Traces one `Uplink` call may stage at most.
pub const MAX_UPLINK_TRACES: usize = meshgate_proto::sync::v1::EDGE_BATCH_MAX_TRACES;
/// Largest encoded batch staged: what the cloud accepts as a body, less room for gzip's framing
/// when the traces do not compress.
pub const MAX_STAGED_BYTES: usize = meshgate_proto::sync::v1::EDGE_BATCH_MAX_BODY_BYTES - 64 * 1024;

const ID_FILE: &str = "outbox.id";
const LOCK_FILE: &str = "outbox.lock";
const REJECTED_DIR: &str = "rejected";
const BATCH_PREFIX: &str = "batch-";
const BATCH_SUFFIX: &str = ".pb";
const TMP_PREFIX: &str = ".tmp-";

/// Upload of this meshgate's traces to a cloud meshgate (`[sync.cloud]`, `MESHGATE_SYNC__CLOUD__*`).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// Base URL of the cloud meshgate's edge, e.g. `https://gateway.example.com`
    /// (`MESHGATE_CLOUD_URL`). Without it nothing is uploaded.
    pub url: Option<String>,
    /// API key of the cloud project the edge's traffic is charged to (`MESHGATE_CLOUD_KEY`).
    pub key: Option<String>,
    /// Directory of the outbox (standalone: `<data_dir>/cloud-outbox`).
    pub outbox: Option<PathBuf>,
    /// Staged bytes at most; past it `Uplink` answers RESOURCE_EXHAUSTED and the gateway counts
    /// the traces as dropped.
    pub max_outbox_bytes: u64,
    /// Time allowed for one upload, connect to answer.
    pub timeout_ms: u64,
    /// Wait after the first failed upload; doubles per failure.
    pub backoff_base_ms: u64,
    /// Longest wait between uploads of a failing batch, `Retry-After` included.
    pub backoff_cap_ms: u64,
    /// Failures in a row of one batch that are the batch's own (see the module documentation)
    /// before it is moved to `rejected/` so the batches behind it flow.
    pub max_batch_failures: u32,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            url: None,
            key: None,
            outbox: None,
            max_outbox_bytes: 1 << 30,
            timeout_ms: 30_000,
            backoff_base_ms: 1_000,
            backoff_cap_ms: 30_000,
            max_batch_failures: 10,
        }
    }
}

impl std::fmt::Debug for CloudConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudConfig")
            .field("url", &self.url)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("outbox", &self.outbox)
            .field("max_outbox_bytes", &self.max_outbox_bytes)
            .field("timeout_ms", &self.timeout_ms)
            .field("backoff_base_ms", &self.backoff_base_ms)
            .field("backoff_cap_ms", &self.backoff_cap_ms)
            .field("max_batch_failures", &self.max_batch_failures)
            .finish()
    }
}

impl CloudConfig {
    /// Whether uploads are configured.
    pub fn enabled(&self) -> bool {
        self.url.is_some()
    }

    /// Fills `url` and `key` from `MESHGATE_CLOUD_URL` and `MESHGATE_CLOUD_KEY` when unset.
    pub fn with_env(mut self) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if self.url.is_none() {
            self.url = var("MESHGATE_CLOUD_URL");
        }
        if self.key.is_none() {
            self.key = var("MESHGATE_CLOUD_KEY");
        }
        self
    }

    pub(crate) fn validate(&self) -> Result<(), CloudError> {
        let invalid = |m: &str| Err(CloudError::Config(format!("cloud.{m}")));
        let Some(url) = &self.url else { return Ok(()) };
        match reqwest::Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some() => {}
            _ => return invalid(&format!("url must be an http(s) URL (got {url:?})")),
        }
        if self.key.as_deref().is_none_or(|k| k.trim().is_empty()) {
            return invalid("key is required with cloud.url (MESHGATE_CLOUD_KEY)");
        }
        if self.outbox.is_none() {
            return invalid("outbox (a directory) is required with cloud.url");
        }
        for (field, value) in [
            ("max_outbox_bytes", self.max_outbox_bytes),
            ("timeout_ms", self.timeout_ms),
            ("backoff_base_ms", self.backoff_base_ms),
            ("backoff_cap_ms", self.backoff_cap_ms),
            ("max_batch_failures", u64::from(self.max_batch_failures)),
        ] {
            if value == 0 {
                return invalid(&format!("{field} must be at least 1"));
            }
        }
        Ok(())
    }

    fn endpoint(&self) -> String {
        format!("{}{BATCHES_PATH}", self.url.as_deref().unwrap_or_default().trim_end_matches('/'))
    }
}

/// Failures of the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("{context} {path}: {source}")]
    Io { context: &'static str, path: PathBuf, source: std::io::Error },
    #[error("another process is using the cloud outbox in {0} (it holds {LOCK_FILE})")]
    Locked(PathBuf),
    #[error("the cloud outbox is full ({bytes} of {max} bytes staged): the cloud has been unreachable for long")]
    Full { bytes: u64, max: u64 },
}

/// Failures of the uplink: its configuration, an `Uplink` call it refuses, its outbox.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("invalid sync configuration: {0}")]
    Config(String),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

impl CloudError {
    /// The shared code of this error. A full outbox is overload, not an outage: the gateway
    /// counts the traces as dropped and goes on.
    pub fn code(&self) -> ErrorCode {
        match self {
            CloudError::Config(_) | CloudError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            CloudError::HttpClient(_) => ErrorCode::Internal,
            CloudError::Outbox(OutboxError::Full { .. }) => ErrorCode::Overloaded,
            CloudError::Outbox(_) => ErrorCode::Unavailable,
        }
    }
}

impl From<CloudError> for Error {
    fn from(err: CloudError) -> Self {
        Error::Cloud { code: err.code(), message: err.to_string() }
    }
}

fn io(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError {
    let path = path.to_path_buf();
    move |source| OutboxError::Io { context, path, source }
}

/// A staged batch waiting for upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedBatch {
    pub sequence: u64,
    pub batch_id: String,
    /// The encoded [`EdgeBatch`].
    pub body: Vec<u8>,
}

/// The fsync'd directory of batches waiting for upload; see the module documentation.
pub struct Outbox {
    dir: PathBuf,
    id: String,
    max_bytes: u64,
    state: Mutex<OutboxState>,
    staged: Notify,
    /// Kept open: the exclusive lock lives as long as the file handle.
    _lock: File,
}

struct OutboxState {
    next_sequence: u64,
    /// Sequence → file size of every staged batch.
    pending: BTreeMap<u64, u64>,
    bytes: u64,
}

impl Outbox {
    /// Opens (creating it if needed) the outbox in `dir`. Fails when another process holds it.
    pub fn open(dir: impl AsRef<Path>, max_bytes: u64) -> Result<Self, OutboxError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(dir.join(REJECTED_DIR)).map_err(io("cannot create", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("cannot open", &lock_path))?;
        lock.try_lock().map_err(|err| match err {
            std::fs::TryLockError::WouldBlock => OutboxError::Locked(dir.clone()),
            std::fs::TryLockError::Error(e) => io("cannot lock", &lock_path)(e),
        })?;
        let id = outbox_id(&dir)?;
        let mut pending = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(io("cannot list", &dir))? {
            let entry = entry.map_err(io("cannot list", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) {
                // A batch whose staging never finished was never acknowledged to the gateway.
                std::fs::remove_file(entry.path()).map_err(io("cannot remove", &entry.path()))?;
            } else if let Some(sequence) = parse_batch_name(&name) {
                let size = entry.metadata().map_err(io("cannot stat", &entry.path()))?.len();
                pending.insert(sequence, size);
            }
        }
        let next_sequence = pending.keys().next_back().map_or(1, |last| last + 1);
        let bytes = pending.values().sum();
        tracing::info!(dir = %dir.display(), batches = pending.len(), bytes, "cloud outbox opened");
        Ok(Self {
            dir,
            id,
            max_bytes,
            state: Mutex::new(OutboxState { next_sequence, pending, bytes }),
            staged: Notify::new(),
            _lock: lock,
        })
    }

    /// The id every batch id of this outbox starts with.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Staged batches and their bytes.
    pub fn pending(&self) -> (usize, u64) {
        let state = self.state.lock();
        (state.pending.len(), state.bytes)
    }

    /// Writes `traces` as one batch, durably, and returns its id. Blocking (it fsyncs).
    pub fn stage(&self, traces: Vec<Trace>) -> Result<String, OutboxError> {
        let mut state = self.state.lock();
        let sequence = state.next_sequence;
        let batch_id = self.batch_id(sequence);
        let body = EdgeBatch { batch_id: batch_id.clone(), traces }.encode_to_vec();
        let size = body.len() as u64;
        if state.bytes + size > self.max_bytes {
            return Err(OutboxError::Full { bytes: state.bytes, max: self.max_bytes });
        }
        let tmp = self.dir.join(format!("{TMP_PREFIX}{sequence}"));
        let mut file = File::create(&tmp).map_err(io("cannot create", &tmp))?;
        file.write_all(&body).map_err(io("cannot write", &tmp))?;
        file.sync_all().map_err(io("cannot fsync", &tmp))?;
        let path = self.batch_path(sequence);
        std::fs::rename(&tmp, &path).map_err(io("cannot rename", &tmp))?;
        sync_dir(&self.dir)?;
        state.next_sequence += 1;
        state.pending.insert(sequence, size);
        state.bytes += size;
        drop(state);
        self.staged.notify_one();
        Ok(batch_id)
    }

    /// The sequence of the oldest staged batch.
    pub fn oldest_sequence(&self) -> Option<u64> {
        self.state.lock().pending.keys().next().copied()
    }

    /// The oldest staged batch. Blocking (it reads the file).
    pub fn oldest(&self) -> Result<Option<StagedBatch>, OutboxError> {
        let Some(sequence) = self.oldest_sequence() else { return Ok(None) };
        let path = self.batch_path(sequence);
        let body = std::fs::read(&path).map_err(io("cannot read", &path))?;
        Ok(Some(StagedBatch { sequence, batch_id: self.batch_id(sequence), body }))
    }

    /// Deletes a delivered batch. Blocking.
    pub fn delivered(&self, sequence: u64) -> Result<(), OutboxError> {
        let path = self.batch_path(sequence);
        std::fs::remove_file(&path).map_err(io("cannot remove", &path))?;
        sync_dir(&self.dir)?;
        self.forget(sequence);
        Ok(())
    }

    /// Moves a batch that can never be sent to `rejected/` (see [`Outbox::reject`]); should even
    /// that fail, the batch is set aside for this process's life so the others flow. Blocking.
    pub fn quarantine(&self, sequence: u64) -> Result<(), OutboxError> {
        let moved = self.reject(sequence);
        if moved.is_err() {
            self.forget(sequence);
        }
        moved
    }

    /// Moves a batch the cloud refused as malformed to `rejected/`. Blocking.
    pub fn reject(&self, sequence: u64) -> Result<(), OutboxError> {
        let path = self.batch_path(sequence);
        let rejected = self.dir.join(REJECTED_DIR);
        let target = rejected.join(path.file_name().unwrap_or_default());
        std::fs::rename(&path, &target).map_err(io("cannot move", &path))?;
        sync_dir(&rejected)?;
        sync_dir(&self.dir)?;
        self.forget(sequence);
        Ok(())
    }

    fn forget(&self, sequence: u64) {
        let mut state = self.state.lock();
        if let Some(size) = state.pending.remove(&sequence) {
            state.bytes -= size;
        }
    }

    fn batch_id(&self, sequence: u64) -> String {
        format!("{}-{sequence}", self.id)
    }

    fn batch_path(&self, sequence: u64) -> PathBuf {
        self.dir.join(format!("{BATCH_PREFIX}{sequence:020}{BATCH_SUFFIX}"))
    }
}

fn parse_batch_name(name: &str) -> Option<u64> {
    name.strip_prefix(BATCH_PREFIX)?.strip_suffix(BATCH_SUFFIX)?.parse().ok()
}

fn sync_dir(dir: &Path) -> Result<(), OutboxError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("cannot fsync", dir))
}

/// The outbox's id, drawn and stored durably the first time.
fn outbox_id(dir: &Path) -> Result<String, OutboxError> {
    let path = dir.join(ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(io("cannot read", &path)(err)),
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let tmp = dir.join(format!("{TMP_PREFIX}{ID_FILE}"));
    let mut file = File::create(&tmp).map_err(io("cannot create", &tmp))?;
    file.write_all(id.as_bytes()).and_then(|()| file.sync_all()).map_err(io("cannot write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("cannot rename", &tmp))?;
    sync_dir(dir)?;
    Ok(id)
}

/// Counters of the uplink, registered in the sync service's registry.
#[derive(Clone)]
pub struct CloudMetrics {
    staged_traces: IntCounter,
    uploads: IntCounterVec,
    outbox_batches: IntGauge,
    outbox_bytes: IntGauge,
}

impl Default for CloudMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CloudMetrics {
    pub fn new() -> Self {
        let staged_traces =
            IntCounter::new("meshgate_sync_cloud_staged_traces_total", "Traces staged in the cloud outbox")
                .expect("static metric options are valid");
        let uploads = IntCounterVec::new(
            Opts::new(
                "meshgate_sync_cloud_uploads_total",
                "Batch uploads to the cloud by outcome: delivered, retried, rejected (refused as malformed, moved \
                 aside), quarantined (poisoned or failing again and again, moved aside)",
            ),
            &["outcome"],
        )
        .expect("static metric options are valid");
        let outbox_batches = IntGauge::new("meshgate_sync_cloud_outbox_batches", "Batches waiting for upload")
            .expect("static metric options are valid");
        let outbox_bytes = IntGauge::new("meshgate_sync_cloud_outbox_bytes", "Bytes waiting for upload")
            .expect("static metric options are valid");
        Self { staged_traces, uploads, outbox_batches, outbox_bytes }
    }

    pub fn register(&self, metrics: &meshgate_runtime::Metrics) {
        metrics.register(Box::new(self.staged_traces.clone()));
        metrics.register(Box::new(self.uploads.clone()));
        metrics.register(Box::new(self.outbox_batches.clone()));
        metrics.register(Box::new(self.outbox_bytes.clone()));
    }

    fn observe(&self, outbox: &Outbox) {
        let (batches, bytes) = outbox.pending();
        self.outbox_batches.set(batches as i64);
        self.outbox_bytes.set(bytes as i64);
    }
}

/// The staging side, used by the `Uplink` RPC.
#[derive(Clone)]
pub struct Uplink {
    outbox: Arc<Outbox>,
    metrics: CloudMetrics,
}

impl Uplink {
    pub fn new(outbox: Arc<Outbox>, metrics: CloudMetrics) -> Self {
        metrics.observe(&outbox);
        Self { outbox, metrics }
    }

    /// Stages `traces` durably; the batch id once they are on disk.
    pub async fn stage(&self, traces: Vec<Trace>) -> Result<String, CloudError> {
        if traces.is_empty() {
            return Err(CloudError::InvalidRequest("traces must not be empty".into()));
        }
        if traces.len() > MAX_UPLINK_TRACES {
            return Err(CloudError::InvalidRequest(format!(
                "at most {MAX_UPLINK_TRACES} traces per call (got {})",
                traces.len()
            )));
        }
        if let Some(trace) = traces.iter().find(|t| t.request_id.trim().is_empty()) {
            return Err(CloudError::InvalidRequest(format!(
                "a trace has no request_id (trace_id {:?})",
                trace.trace_id
            )));
        }
        let count = traces.len() as u64;
        let batches = split_by_size(traces, MAX_STAGED_BYTES)?;
        let outbox = self.outbox.clone();
        let staged = tokio::task::spawn_blocking(move || {
            let mut first = None;
            for batch in batches {
                let id = outbox.stage(batch)?;
                first.get_or_insert(id);
            }
            Ok::<_, OutboxError>(first.unwrap_or_default())
        })
        .await
        .map_err(|e| {
            CloudError::Outbox(OutboxError::Io { context: "staging task", path: PathBuf::new(), source: e.into() })
        })?;
        self.metrics.observe(&self.outbox);
        let batch_id = staged?;
        self.metrics.staged_traces.inc_by(count);
        Ok(batch_id)
    }
}

/// `traces` in order, as batches whose encoding stays within `max_bytes`, so the cloud never
/// refuses a batch for its size; a single trace larger than that is refused.
fn split_by_size(traces: Vec<Trace>, max_bytes: usize) -> Result<Vec<Vec<Trace>>, CloudError> {
    // A trace's cost in the batch: its bytes, its length prefix and its field key.
    let cost = |trace: &Trace| trace.encoded_len() + prost::length_delimiter_len(trace.encoded_len()) + 1;
    // Room for the batch id.
    let budget = max_bytes.saturating_sub(256);
    let mut batches = Vec::new();
    let (mut current, mut size) = (Vec::new(), 0);
    for trace in traces {
        let bytes = cost(&trace);
        if bytes > budget {
            return Err(CloudError::InvalidRequest(format!(
                "trace {:?} encodes to {bytes} bytes, more than a batch may carry ({budget})",
                trace.request_id
            )));
        }
        if size + bytes > budget {
            batches.push(std::mem::take(&mut current));
            size = 0;
        }
        size += bytes;
        current.push(trace);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    Ok(batches)
}

/// What one upload attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadOutcome {
    /// 2xx: the cloud has applied the batch (now or before).
    Delivered,
    /// The cloud refused the batch as malformed, or it cannot be decoded or compressed here:
    /// retrying cannot help.
    Rejected(String),
    /// The cloud failed on this batch (500 or an answer no wait can fix): retried, and set aside
    /// once it happened `max_batch_failures` times in a row.
    Failed(String),
    /// Unreachable, overloaded, or refusing the key: try again after the wait (or the backoff).
    Retry { reason: String, after: Option<Duration> },
}

/// Sends staged batches to the cloud, oldest first, one at a time.
pub struct Uploader {
    outbox: Arc<Outbox>,
    http: reqwest::Client,
    endpoint: String,
    key: String,
    policy: RetryPolicy,
    max_batch_failures: u32,
    metrics: CloudMetrics,
}

/// Failures in a row of the batch at the head of the outbox that are its own.
#[derive(Default)]
struct HeadFailures {
    sequence: u64,
    count: u32,
}

impl HeadFailures {
    /// Counts a failure of `sequence`; the count so far.
    fn count(&mut self, sequence: u64) -> u32 {
        if self.sequence != sequence {
            *self = Self { sequence, count: 0 };
        }
        self.count += 1;
        self.count
    }
}

impl Uploader {
    pub fn new(outbox: Arc<Outbox>, config: &CloudConfig, metrics: CloudMetrics) -> Result<Self, CloudError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.timeout_ms.min(10_000)))
            .build()
            .map_err(|e| CloudError::HttpClient(e.to_string()))?;
        Ok(Self {
            outbox,
            http,
            endpoint: config.endpoint(),
            key: config.key.clone().unwrap_or_default(),
            policy: RetryPolicy {
                max_attempts: i32::MAX,
                base: Duration::from_millis(config.backoff_base_ms),
                cap: Duration::from_millis(config.backoff_cap_ms),
            },
            max_batch_failures: config.max_batch_failures.max(1),
            metrics,
        })
    }

    /// Uploads until `shutdown`; a batch interrupted by it is sent again on the next start.
    pub async fn run(self, shutdown: Shutdown) {
        let mut failures: i32 = 0;
        let mut failing_since_logged = false;
        let mut head = HeadFailures::default();
        loop {
            let outbox = self.outbox.clone();
            let next = match tokio::task::spawn_blocking(move || outbox.oldest()).await {
                Ok(next) => next,
                Err(err) => Err(OutboxError::Io { context: "reading task", path: PathBuf::new(), source: err.into() }),
            };
            let wait = match next {
                Ok(None) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = self.outbox.staged.notified() => continue,
                    }
                }
                Ok(Some(batch)) => match self.upload(&batch).await {
                    UploadOutcome::Delivered => {
                        self.metrics.uploads.with_label_values(&["delivered"]).inc();
                        if failing_since_logged {
                            tracing::info!(batch_id = batch.batch_id, "cloud reachable again; uploads flowing");
                            failing_since_logged = false;
                        }
                        failures = 0;
                        self.settle(batch.sequence, Outbox::delivered).await
                    }
                    UploadOutcome::Rejected(reason) => {
                        self.metrics.uploads.with_label_values(&["rejected"]).inc();
                        tracing::error!(
                            batch_id = batch.batch_id,
                            reason,
                            "a batch can never be sent; moved to rejected/"
                        );
                        self.settle(batch.sequence, Outbox::quarantine).await
                    }
                    UploadOutcome::Failed(reason) => {
                        if head.count(batch.sequence) >= self.max_batch_failures {
                            self.metrics.uploads.with_label_values(&["quarantined"]).inc();
                            tracing::error!(
                                batch_id = batch.batch_id,
                                reason,
                                failures = self.max_batch_failures,
                                "the cloud keeps failing on a batch; moved to rejected/ so the others flow"
                            );
                            self.settle(batch.sequence, Outbox::quarantine).await
                        } else {
                            self.metrics.uploads.with_label_values(&["retried"]).inc();
                            tracing::warn!(batch_id = batch.batch_id, reason, "the cloud failed on a batch; retrying");
                            failures = failures.saturating_add(1);
                            Some(self.policy.backoff(failures))
                        }
                    }
                    UploadOutcome::Retry { reason, after } => {
                        self.metrics.uploads.with_label_values(&["retried"]).inc();
                        failures = failures.saturating_add(1);
                        let backoff = self.policy.backoff(failures);
                        let wait = after.map_or(backoff, |after| after.min(self.policy.cap));
                        if !failing_since_logged {
                            tracing::warn!(
                                batch_id = batch.batch_id,
                                reason,
                                ?wait,
                                "cannot upload to the cloud; retrying"
                            );
                            failing_since_logged = true;
                        }
                        Some(wait)
                    }
                },
                Err(err) => {
                    let head_sequence = self.outbox.oldest_sequence();
                    match head_sequence.filter(|s| head.count(*s) >= self.max_batch_failures) {
                        Some(sequence) => {
                            self.metrics.uploads.with_label_values(&["quarantined"]).inc();
                            tracing::error!(error = %err, "a staged batch stays unreadable; set aside");
                            self.settle(sequence, Outbox::quarantine).await
                        }
                        None => {
                            tracing::error!(error = %err, "cloud outbox unreadable; retrying");
                            failures = failures.saturating_add(1);
                            Some(self.policy.backoff(failures))
                        }
                    }
                }
            };
            self.metrics.observe(&self.outbox);
            if let Some(wait) = wait {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    /// Applies a settled batch to the outbox; a failure to is retried after a pause.
    async fn settle(&self, sequence: u64, apply: fn(&Outbox, u64) -> Result<(), OutboxError>) -> Option<Duration> {
        let outbox = self.outbox.clone();
        match tokio::task::spawn_blocking(move || apply(&outbox, sequence)).await {
            Ok(Ok(())) => None,
            Ok(Err(err)) => {
                tracing::error!(error = %err, "cloud outbox: cannot settle a batch");
                Some(self.policy.cap)
            }
            Err(err) => {
                tracing::error!(error = %err, "cloud outbox: the settling task failed");
                Some(self.policy.cap)
            }
        }
    }

    /// One upload attempt of `batch`.
    pub async fn upload(&self, batch: &StagedBatch) -> UploadOutcome {
        // A file that is not the batch it should be (cut short, overwritten) is poisoned.
        match EdgeBatch::decode(batch.body.as_slice()) {
            Ok(decoded) if decoded.batch_id == batch.batch_id => {}
            Ok(decoded) => {
                return UploadOutcome::Rejected(format!("the file holds batch {:?}, not this one", decoded.batch_id));
            }
            Err(err) => return UploadOutcome::Rejected(format!("the staged file does not decode: {err}")),
        }
        let body = match gzip(&batch.body) {
            Ok(body) => body,
            Err(err) => return UploadOutcome::Rejected(format!("cannot compress: {err}")),
        };
        let sent = self
            .http
            .post(&self.endpoint)
            .bearer_auth(&self.key)
            .header("idempotency-key", &batch.batch_id)
            .header(reqwest::header::CONTENT_TYPE, BATCH_CONTENT_TYPE)
            .header(reqwest::header::CONTENT_ENCODING, "gzip")
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(err) => return UploadOutcome::Retry { reason: format!("unreachable: {err}"), after: None },
        };
        let status = response.status();
        if status.is_success() {
            return UploadOutcome::Delivered;
        }
        let after = retry_after(response.headers()).map(Duration::from_secs);
        let text = response.text().await.unwrap_or_default();
        let reason = format!("{status}: {}", text.chars().take(500).collect::<String>());
        match status.as_u16() {
            400 | 409 | 413 | 422 => UploadOutcome::Rejected(reason),
            401 | 403 | 404 | 408 | 429 | 502 | 503 | 504 => UploadOutcome::Retry { reason, after },
            _ => UploadOutcome::Failed(reason),
        }
    }
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
    encoder.write_all(body)?;
    encoder.finish()
}

/// The outbox, the staging side and the uploader of `config`, or `None` when no cloud is set.
pub fn start(config: &CloudConfig, metrics: CloudMetrics, shutdown: Shutdown) -> Result<Option<Uplink>, CloudError> {
    if !config.enabled() {
        return Ok(None);
    }
    let dir = config.outbox.as_ref().ok_or_else(|| CloudError::Config("cloud.outbox is required".into()))?;
    let outbox = Arc::new(Outbox::open(dir, config.max_outbox_bytes)?);
    let uploader = Uploader::new(outbox.clone(), config, metrics.clone())?;
    tracing::info!(endpoint = uploader.endpoint, outbox = outbox.id(), "sync: uploading traces to the cloud");
    tokio::spawn(uploader.run(shutdown));
    Ok(Some(Uplink::new(outbox, metrics)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(id: &str) -> Trace {
        Trace { request_id: id.into(), ..Default::default() }
    }

    fn decode(batch: &StagedBatch) -> EdgeBatch {
        EdgeBatch::decode(batch.body.as_slice()).unwrap()
    }

    #[test]
    fn traces_are_staged_in_batches_the_cloud_accepts() {
        let big = |id: &str| Trace { request_id: id.into(), routing_reason: "r".repeat(400), ..Default::default() };
        let traces: Vec<Trace> = (0..10).map(|i| big(&format!("t{i}"))).collect();
        let batches = split_by_size(traces.clone(), 1_700).unwrap();
        assert!(batches.len() > 1);
        assert_eq!(batches.concat(), traces, "in order, none lost");
        for batch in &batches {
            let body = EdgeBatch { batch_id: "x".repeat(64), traces: batch.clone() }.encode_to_vec();
            assert!(body.len() <= 1_700, "{} bytes", body.len());
        }
        assert_eq!(split_by_size(traces.clone(), MAX_STAGED_BYTES).unwrap().len(), 1);
        let err = split_by_size(vec![big("huge")], 300).unwrap_err();
        assert!(err.to_string().contains("huge"), "{err}");
    }

    #[test]
    fn batches_survive_a_reopen_in_order_with_stable_ids() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), 1 << 20).unwrap();
        let first = outbox.stage(vec![trace("a"), trace("b")]).unwrap();
        let second = outbox.stage(vec![trace("c")]).unwrap();
        assert_ne!(first, second);
        assert!(first.starts_with(outbox.id()));
        let id = outbox.id().to_owned();
        drop(outbox);

        // A torn staging (a crash before the rename) was never acknowledged: it is discarded.
        std::fs::write(dir.path().join(format!("{TMP_PREFIX}99")), b"partial").unwrap();
        let outbox = Outbox::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(outbox.id(), id, "the outbox keeps its id");
        assert_eq!(outbox.pending().0, 2);
        let oldest = outbox.oldest().unwrap().unwrap();
        assert_eq!(oldest.batch_id, first);
        let ids: Vec<String> = decode(&oldest).traces.into_iter().map(|t| t.request_id).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(decode(&oldest).batch_id, first, "the body names its batch");
        outbox.delivered(oldest.sequence).unwrap();
        assert_eq!(outbox.oldest().unwrap().unwrap().batch_id, second);

        let third = outbox.stage(vec![trace("d")]).unwrap();
        assert!(!dir.path().join(format!("{TMP_PREFIX}99")).exists());
        drop(outbox);
        let outbox = Outbox::open(dir.path(), 1 << 20).unwrap();
        let next = outbox.oldest().unwrap().unwrap();
        assert_eq!(next.batch_id, second);
        outbox.reject(next.sequence).unwrap();
        assert_eq!(outbox.oldest().unwrap().unwrap().batch_id, third, "sequences never go back");
        assert_eq!(std::fs::read_dir(dir.path().join(REJECTED_DIR)).unwrap().count(), 1, "a rejected batch is kept");
    }

    #[test]
    fn a_full_outbox_refuses_and_one_process_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), 64).unwrap();
        let big = Trace { request_id: "x".repeat(100), ..Default::default() };
        assert!(matches!(outbox.stage(vec![big]), Err(OutboxError::Full { .. })));
        assert_eq!(outbox.pending(), (0, 0));
        assert!(outbox.stage(vec![trace("small")]).is_ok());
        assert!(matches!(Outbox::open(dir.path(), 64), Err(OutboxError::Locked(_))));
    }

    /// A stand-in for the cloud's batch endpoint over plain HTTP/1.1: answers each upload with the
    /// status `answer` gives its idempotency key and how many times that key was seen before, and
    /// counts the uploads per key.
    async fn cloud(
        answer: impl Fn(&str, usize) -> u16 + Send + Sync + 'static,
    ) -> (String, Arc<Mutex<BTreeMap<String, usize>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
        let (counts, answer) = (seen.clone(), Arc::new(answer));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (counts, answer) = (counts.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    let head_end = loop {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&request[..head_end]).to_ascii_lowercase();
                    let header = |name: &str| {
                        head.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned()).unwrap_or_default()
                    };
                    let length: usize = header("content-length:").parse().unwrap_or(0);
                    while request.len() < head_end + length {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        request.extend_from_slice(&buf[..n]);
                    }
                    let key = header("idempotency-key:");
                    let before = {
                        let mut counts = counts.lock();
                        let count = counts.entry(key.clone()).or_default();
                        *count += 1;
                        *count - 1
                    };
                    let status = answer(&key, before);
                    let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    let _ = stream.write_all(reply.as_bytes()).await;
                });
            }
        });
        (url, seen)
    }

    /// Runs an uploader over `outbox` against `url` until the outbox is empty.
    async fn drain(outbox: &Arc<Outbox>, dir: &Path, url: String, max_batch_failures: u32) {
        let config = CloudConfig {
            url: Some(url),
            key: Some("sk-edge".into()),
            outbox: Some(dir.to_path_buf()),
            backoff_base_ms: 1,
            backoff_cap_ms: 5,
            max_batch_failures,
            ..CloudConfig::default()
        };
        let uploader = Uploader::new(outbox.clone(), &config, CloudMetrics::new()).unwrap();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(uploader.run(shutdown.clone()));
        for _ in 0..1_000 {
            if outbox.pending().0 == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(outbox.pending().0, 0, "the outbox drained");
        shutdown.trigger();
        task.await.unwrap();
    }

    fn rejected(dir: &Path) -> usize {
        std::fs::read_dir(dir.join(REJECTED_DIR)).unwrap().count()
    }

    #[tokio::test]
    async fn a_batch_the_cloud_keeps_failing_on_is_set_aside_and_the_rest_flow() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(Outbox::open(dir.path(), 1 << 20).unwrap());
        let poisoned = outbox.stage(vec![trace("poisoned")]).unwrap();
        let fine = outbox.stage(vec![trace("fine")]).unwrap();
        let bad = poisoned.clone();
        let (url, seen) = cloud(move |key, _| if key == bad { 500 } else { 200 }).await;
        drain(&outbox, dir.path(), url, 3).await;
        let seen = seen.lock().clone();
        assert_eq!((seen[&poisoned], seen[&fine]), (3, 1), "{seen:?}");
        assert_eq!(rejected(dir.path()), 1, "kept for inspection");
    }

    #[tokio::test]
    async fn an_unreachable_or_overloaded_cloud_never_sets_a_batch_aside() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(Outbox::open(dir.path(), 1 << 20).unwrap());
        let id = outbox.stage(vec![trace("patient")]).unwrap();
        let answers = [503, 502, 504, 429, 408, 401, 403, 404, 503];
        let (url, seen) = cloud(move |_, before| answers.get(before).copied().unwrap_or(200)).await;
        drain(&outbox, dir.path(), url, 2).await;
        assert_eq!(seen.lock()[&id], answers.len() + 1);
        assert_eq!(rejected(dir.path()), 0, "delivered in the end");
    }

    #[tokio::test]
    async fn a_staged_file_that_is_not_its_batch_is_set_aside_unsent() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(Outbox::open(dir.path(), 1 << 20).unwrap());
        let torn = outbox.stage(vec![trace("torn")]).unwrap();
        let fine = outbox.stage(vec![trace("fine")]).unwrap();
        let sequence = outbox.oldest_sequence().unwrap();
        std::fs::write(outbox.batch_path(sequence), b"\xff\xff not a batch").unwrap();
        let (url, seen) = cloud(|_, _| 200).await;
        drain(&outbox, dir.path(), url, 3).await;
        let seen = seen.lock().clone();
        assert_eq!((seen.get(&torn), seen.get(&fine)), (None, Some(&1)), "{seen:?}");
        assert_eq!(rejected(dir.path()), 1);
    }

    #[test]
    fn the_config_needs_a_key_and_an_outbox_with_a_url() {
        let mut config = CloudConfig { url: Some("https://cloud.example.com".into()), ..Default::default() };
        assert!(config.validate().unwrap_err().to_string().contains("key"));
        config.key = Some("sk-edge".into());
        assert!(config.validate().unwrap_err().to_string().contains("outbox"));
        config.outbox = Some("/tmp/outbox".into());
        config.validate().unwrap();
        assert_eq!(config.endpoint(), "https://cloud.example.com/v1/sync/batches");
        assert!(!format!("{config:?}").contains("sk-edge"), "the key is not printed");
        config.url = Some("ftp://cloud".into());
        assert!(config.validate().is_err());
    }
}
