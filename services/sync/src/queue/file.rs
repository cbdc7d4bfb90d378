//! The queue on local disk for standalone mode: an append-only log in a directory, fsync'd before
//! any change is acknowledged, replayed into memory when the process starts.
//!
//! Layout: `<dir>/queue.log` holds records `[len: u32 LE][check: u32 LE][payload]`, where the
//! payload is a protobuf [`JobRecord`] (the job's whole new state; a record with status
//! unspecified deletes the job) and `check` is the first four bytes of the payload's SHA-256.
//! Replay keeps the last state of each job. A torn tail (a crash mid-append) fails its length or
//! check and is cut off; it was never acknowledged. `<dir>/queue.lock` is held with an exclusive
//! lock by the one process using the directory. The log is rewritten (to `queue.log.tmp`, fsync'd,
//! renamed, directory fsync'd) when it holds far more records than live jobs.
//!
//! Because the lock proves that no other process uses the queue, a job replayed as `running` was
//! being delivered by a process that died (a crash, SIGKILL): its lease is void and the job is due
//! at once, not when the lease would have expired (`lease_ms`).

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use meshgate_proto::sync::v1::JobStatus;
use parking_lot::Mutex;
use prost::Message as _;
use sha2::{Digest, Sha256};

use super::{Finish, JobRecord, JobStore, QueueError, Readmission, micros, status_name};

const LOG: &str = "queue.log";
const LOCK: &str = "queue.lock";
/// Largest record accepted on replay: anything longer is a corrupt length.
const MAX_RECORD: usize = 64 * 1024 * 1024;
/// The log is compacted when it holds more than this many records per live job (plus a floor).
const COMPACT_RATIO: usize = 4;
const COMPACT_FLOOR: usize = 10_000;

/// [`JobStore`] in a local directory.
#[derive(Clone)]
pub struct FileJobStore {
    inner: Arc<Mutex<State>>,
}

struct State {
    dir: PathBuf,
    log: File,
    /// Kept open: the exclusive lock lives as long as the file handle.
    _lock: File,
    records: usize,
    jobs: HashMap<String, JobRecord>,
    by_key: HashMap<(String, String), String>,
    /// Queued jobs by `(next_attempt_at, id)`.
    due: BTreeSet<(i64, String)>,
    /// Running jobs by `(lease_until, id)`.
    leased: BTreeSet<(i64, String)>,
}

fn io(context: &str, path: &Path, err: std::io::Error) -> QueueError {
    QueueError::Unavailable(format!("{context} {}: {err}", path.display()))
}

fn check(payload: &[u8]) -> u32 {
    let digest = Sha256::digest(payload);
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

fn frame(job: &JobRecord, out: &mut Vec<u8>) {
    let payload = job.encode_to_vec();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&check(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// Reads every whole record; returns them and the length of the valid prefix.
fn replay(file: &File) -> Result<(Vec<JobRecord>, u64), std::io::Error> {
    let mut reader = BufReader::new(file);
    let mut records = Vec::new();
    let mut valid = 0u64;
    loop {
        let mut head = [0u8; 8];
        match reader.read_exact(&mut head) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(err) => return Err(err),
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let sum = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_RECORD {
            break;
        }
        let mut payload = vec![0u8; len];
        match reader.read_exact(&mut payload) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(err) => return Err(err),
        }
        if check(&payload) != sum {
            break;
        }
        let Ok(record) = JobRecord::decode(payload.as_slice()) else { break };
        records.push(record);
        valid += 8 + len as u64;
    }
    Ok((records, valid))
}

impl FileJobStore {
    /// Opens (creating it if needed) the queue in `dir`, replaying its log. Fails when another
    /// process holds the directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, QueueError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| io("cannot create the queue directory", &dir, e))?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io("cannot open", &lock_path, e))?;
        lock.try_lock().map_err(|err| match err {
            std::fs::TryLockError::WouldBlock => QueueError::Unavailable(format!(
                "another process is using the queue in {} (it holds {LOCK})",
                dir.display()
            )),
            std::fs::TryLockError::Error(e) => io("cannot lock", &lock_path, e),
        })?;
        let log_path = dir.join(LOG);
        let log = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io("cannot open", &log_path, e))?;
        let (records, valid) = replay(&log).map_err(|e| io("cannot read", &log_path, e))?;
        let length = log.metadata().map_err(|e| io("cannot stat", &log_path, e))?.len();
        if valid < length {
            tracing::warn!(path = %log_path.display(), valid, length, "sync queue: cutting a torn tail off the log");
            log.set_len(valid).map_err(|e| io("cannot truncate", &log_path, e))?;
            log.sync_all().map_err(|e| io("cannot fsync", &log_path, e))?;
        }
        let mut state = State {
            dir,
            log,
            _lock: lock,
            records: records.len(),
            jobs: HashMap::new(),
            by_key: HashMap::new(),
            due: BTreeSet::new(),
            leased: BTreeSet::new(),
        };
        for record in records {
            state.index(record);
        }
        let interrupted = state.void_leases();
        if state.records > COMPACT_FLOOR + COMPACT_RATIO * state.jobs.len() {
            state.compact()?;
        }
        tracing::info!(dir = %state.dir.display(), jobs = state.jobs.len(), interrupted, "sync queue: log replayed");
        Ok(Self { inner: Arc::new(Mutex::new(state)) })
    }

    /// Runs `f` on the state off the async workers: it may write and fsync.
    async fn with<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&mut State) -> Result<T, QueueError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&mut inner.lock()))
            .await
            .map_err(|err| QueueError::Unavailable(format!("the queue task failed: {err}")))?
    }
}

impl State {
    /// Applies a record to the in-memory indexes (no I/O).
    fn index(&mut self, job: JobRecord) {
        if let Some(old) = self.jobs.remove(&job.id) {
            self.due.remove(&(old.next_attempt_at_us, old.id.clone()));
            self.leased.remove(&(old.lease_until_us, old.id.clone()));
            if !old.idempotency_key.is_empty() && job.job_status() == JobStatus::Unspecified {
                self.by_key.remove(&(old.project_id.clone(), old.idempotency_key.clone()));
            }
        }
        match job.job_status() {
            JobStatus::Unspecified => return,
            JobStatus::Queued => {
                self.due.insert((job.next_attempt_at_us, job.id.clone()));
            }
            JobStatus::Running => {
                self.leased.insert((job.lease_until_us, job.id.clone()));
            }
            JobStatus::Succeeded | JobStatus::Dead => {}
        }
        if !job.idempotency_key.is_empty() {
            self.by_key.insert((job.project_id.clone(), job.idempotency_key.clone()), job.id.clone());
        }
        self.jobs.insert(job.id.clone(), job);
    }

    /// Voids the lease of every `running` job: at open, they all belong to a process that died
    /// holding the lock (this one holds it now), so they are claimed again at once (or become
    /// dead letters when that was their last attempt) under the usual rules of
    /// [`JobStore::claim`]. In memory only: a crash before the claim replays them as running and
    /// voids them again. Returns how many.
    fn void_leases(&mut self) -> usize {
        let leased = std::mem::take(&mut self.leased);
        for (_, id) in &leased {
            if let Some(job) = self.jobs.get_mut(id) {
                job.lease_until_us = 0;
            }
            self.leased.insert((0, id.clone()));
        }
        leased.len()
    }

    /// Makes `jobs` durable (one write, one fsync), then applies them.
    fn commit(&mut self, jobs: Vec<JobRecord>) -> Result<(), QueueError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(jobs.len() * 512);
        for job in &jobs {
            frame(job, &mut buf);
        }
        let path = self.dir.join(LOG);
        self.log.write_all(&buf).map_err(|e| io("cannot append to", &path, e))?;
        self.log.sync_data().map_err(|e| io("cannot fsync", &path, e))?;
        self.records += jobs.len();
        for job in jobs {
            self.index(job);
        }
        Ok(())
    }

    /// Rewrites the log with one record per live job.
    fn compact(&mut self) -> Result<(), QueueError> {
        let path = self.dir.join(LOG);
        let tmp = self.dir.join(format!("{LOG}.tmp"));
        let mut buf = Vec::with_capacity(self.jobs.len() * 512);
        for job in self.jobs.values() {
            frame(job, &mut buf);
        }
        let mut file = File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
        file.write_all(&buf).map_err(|e| io("cannot write", &tmp, e))?;
        file.sync_all().map_err(|e| io("cannot fsync", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io("cannot replace", &path, e))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| io("cannot fsync", &self.dir, e))?;
        self.log = OpenOptions::new().read(true).append(true).open(&path).map_err(|e| io("cannot open", &path, e))?;
        self.records = self.jobs.len();
        Ok(())
    }

    fn visible(&self, id: &str, project_id: &str) -> Option<&JobRecord> {
        self.jobs.get(id).filter(|job| job.project_id == project_id)
    }
}

#[async_trait::async_trait]
impl JobStore for FileJobStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }

    async fn enqueue(&self, job: JobRecord) -> Result<(JobRecord, bool), QueueError> {
        self.with(move |state| {
            if !job.idempotency_key.is_empty()
                && let Some(id) = state.by_key.get(&(job.project_id.clone(), job.idempotency_key.clone()))
                && let Some(existing) = state.jobs.get(id)
            {
                if existing.request_hash != job.request_hash {
                    return Err(QueueError::IdempotencyConflict {
                        key: job.idempotency_key,
                        job_id: existing.id.clone(),
                    });
                }
                return Ok((existing.clone(), false));
            }
            state.commit(vec![job.clone()])?;
            Ok((job, true))
        })
        .await
    }

    // Readers wait for the lock off the async workers too: a writer holds it through its fsync.
    async fn get(&self, id: &str, project_id: &str) -> Result<Option<JobRecord>, QueueError> {
        let (id, project_id) = (id.to_owned(), project_id.to_owned());
        self.with(move |state| Ok(state.visible(&id, &project_id).cloned())).await
    }

    async fn list(&self, project_id: &str, status: JobStatus, limit: usize) -> Result<Vec<JobRecord>, QueueError> {
        let project_id = project_id.to_owned();
        self.with(move |state| {
            let mut jobs: Vec<&JobRecord> = state
                .jobs
                .values()
                .filter(|j| j.project_id == project_id)
                .filter(|j| status == JobStatus::Unspecified || j.job_status() == status)
                .collect();
            jobs.sort_by(|a, b| (b.created_at_us, &b.id).cmp(&(a.created_at_us, &a.id)));
            Ok(jobs.into_iter().take(limit).cloned().collect())
        })
        .await
    }

    async fn claim(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, QueueError> {
        let (now, lease_until) = (micros(now), micros(lease_until));
        self.with(move |state| {
            let token = uuid::Uuid::new_v4().to_string();
            let mut changed = Vec::new();
            let mut claimed = Vec::new();
            let expired: Vec<String> =
                state.leased.iter().take_while(|(until, _)| *until <= now).map(|(_, id)| id.clone()).collect();
            let due: Vec<String> =
                state.due.iter().take_while(|(at, _)| *at <= now).map(|(_, id)| id.clone()).collect();
            for id in expired.into_iter().chain(due) {
                if claimed.len() >= limit {
                    break;
                }
                let Some(job) = state.jobs.get(&id) else { continue };
                let mut job = job.clone();
                job.updated_at_us = now;
                let charging = job.outcome.is_some();
                if job.job_status() == JobStatus::Running && job.attempts >= job.max_attempts && !charging {
                    job.status = JobStatus::Dead as i32;
                    job.lease_until_us = 0;
                    job.lease_token.clear();
                    job.finished_at_us = now;
                    job.last_error =
                        "the last attempt was interrupted (its worker stopped before finishing)".to_owned();
                    job.last_error_code = "service_unavailable".to_owned();
                    changed.push(job);
                    continue;
                }
                let interrupted = job.job_status() == JobStatus::Running && !charging;
                job.status = JobStatus::Running as i32;
                if !charging {
                    job.attempts += 1;
                }
                job.lease_until_us = lease_until;
                job.lease_token = token.clone();
                claimed.push(JobRecord { interrupted, ..job.clone() });
                changed.push(job);
            }
            state.commit(changed)?;
            Ok(claimed)
        })
        .await
    }

    /// In memory only: a lease matters to this process alone, and a restart voids them all.
    async fn renew(&self, id: &str, lease_token: &str, lease_until: DateTime<Utc>) -> Result<bool, QueueError> {
        let (id, lease_token, until) = (id.to_owned(), lease_token.to_owned(), micros(lease_until));
        self.with(move |state| {
            let Some(job) = state.jobs.get(&id) else { return Ok(false) };
            if job.job_status() != JobStatus::Running || job.lease_token != lease_token {
                return Ok(false);
            }
            if job.lease_until_us < until {
                let mut job = job.clone();
                job.lease_until_us = until;
                state.index(job);
            }
            Ok(true)
        })
        .await
    }

    async fn finish(
        &self,
        id: &str,
        lease_token: &str,
        finish: Finish,
        now: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let (id, lease_token, now) = (id.to_owned(), lease_token.to_owned(), micros(now));
        self.with(move |state| {
            let Some(job) = state.jobs.get(&id) else { return Ok(false) };
            if job.job_status() != JobStatus::Running || job.lease_token != lease_token {
                return Ok(false);
            }
            let mut job = job.clone();
            job.updated_at_us = now;
            job.lease_until_us = 0;
            job.lease_token.clear();
            match finish {
                Finish::Succeeded(outcome) => {
                    job.status = JobStatus::Succeeded as i32;
                    job.outcome = Some(outcome);
                    job.last_error.clear();
                    job.last_error_code.clear();
                    job.finished_at_us = now;
                    job.reservation_open = false;
                }
                Finish::ChargePending { outcome, error, code, next_attempt_at_us } => {
                    job.status = JobStatus::Queued as i32;
                    job.outcome = Some(outcome);
                    job.last_error = error;
                    job.last_error_code = code;
                    job.next_attempt_at_us = next_attempt_at_us;
                }
                Finish::Retry { error, code, next_attempt_at_us } => {
                    job.status = JobStatus::Queued as i32;
                    job.last_error = error;
                    job.last_error_code = code;
                    job.next_attempt_at_us = next_attempt_at_us;
                }
                Finish::Dead { error, code } => {
                    job.status = JobStatus::Dead as i32;
                    job.last_error = error;
                    job.last_error_code = code;
                    job.finished_at_us = now;
                }
            }
            state.commit(vec![job])?;
            Ok(true)
        })
        .await
    }

    async fn retry_dead(
        &self,
        id: &str,
        project_id: &str,
        now: DateTime<Utc>,
        readmission: Option<Readmission>,
    ) -> Result<Option<JobRecord>, QueueError> {
        let (id, project_id, now) = (id.to_owned(), project_id.to_owned(), micros(now));
        self.with(move |state| {
            let Some(job) = state.visible(&id, &project_id) else { return Ok(None) };
            let status = job.job_status();
            if status != JobStatus::Dead {
                return Err(QueueError::NotDead { id, status: status_name(status) });
            }
            let mut job = job.clone();
            job.status = JobStatus::Queued as i32;
            job.attempts = 0;
            job.next_attempt_at_us = now;
            job.updated_at_us = now;
            job.finished_at_us = 0;
            let reservation = match readmission {
                Some(r) => {
                    job.user_id = r.user_id;
                    job.key_id = r.key_id;
                    r.reservation
                }
                None => Default::default(),
            };
            job.reservation_open = !reservation.reservation_id.is_empty();
            job.reservation_id = reservation.reservation_id;
            job.reserved_tokens = reservation.estimated_tokens;
            job.reserved_cost_micros = reservation.estimated_cost_micros;
            state.commit(vec![job.clone()])?;
            Ok(Some(job))
        })
        .await
    }

    async fn open_dead_reservations(&self, limit: usize) -> Result<Vec<JobRecord>, QueueError> {
        self.with(move |state| {
            let mut open: Vec<&JobRecord> =
                state.jobs.values().filter(|j| j.reservation_open && j.job_status() == JobStatus::Dead).collect();
            open.sort_by_key(|j| (j.updated_at_us, j.id.clone()));
            Ok(open.into_iter().take(limit).cloned().collect())
        })
        .await
    }

    async fn close_reservation(&self, id: &str, reservation_id: &str) -> Result<(), QueueError> {
        let (id, reservation_id) = (id.to_owned(), reservation_id.to_owned());
        self.with(move |state| {
            let Some(job) = state.jobs.get(&id).filter(|j| j.reservation_open && j.reservation_id == reservation_id)
            else {
                return Ok(());
            };
            let closed = JobRecord { reservation_open: false, ..job.clone() };
            state.commit(vec![closed])
        })
        .await
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, QueueError> {
        let before = micros(before);
        self.with(move |state| {
            let old: Vec<JobRecord> = state
                .jobs
                .values()
                .filter(|j| j.job_status() == JobStatus::Succeeded && j.finished_at_us < before)
                .map(|j| JobRecord { id: j.id.clone(), status: JobStatus::Unspecified as i32, ..JobRecord::default() })
                .collect();
            let purged = old.len() as u64;
            state.commit(old)?;
            if state.records > COMPACT_FLOOR + COMPACT_RATIO * state.jobs.len() {
                state.compact()?;
            }
            Ok(purged)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> JobRecord {
        JobRecord {
            id: id.into(),
            project_id: "p".into(),
            status: JobStatus::Queued as i32,
            max_attempts: 3,
            request_hash: "h".into(),
            ..JobRecord::default()
        }
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_acknowledged_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FileJobStore::open(dir.path()).unwrap();
            store.enqueue(job("a")).await.unwrap();
            store.enqueue(job("b")).await.unwrap();
        }
        // A crash in the middle of the next append: half a header and a few payload bytes.
        let mut log = OpenOptions::new().append(true).open(dir.path().join(LOG)).unwrap();
        log.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(log);
        let store = FileJobStore::open(dir.path()).unwrap();
        let ids: Vec<String> =
            store.list("p", JobStatus::Unspecified, 10).await.unwrap().into_iter().map(|j| j.id).collect();
        assert_eq!(ids.len(), 2);
        store.enqueue(job("c")).await.unwrap();
        drop(store);
        let store = FileJobStore::open(dir.path()).unwrap();
        assert!(store.get("c", "p").await.unwrap().is_some(), "appends after the cut replay");
    }

    /// A record as logs held it before jobs kept reservations (tags 1 to 21).
    #[derive(Clone, PartialEq, prost::Message)]
    struct LegacyRecord {
        #[prost(string, tag = "1")]
        id: String,
        #[prost(string, tag = "3")]
        project_id: String,
        #[prost(int32, tag = "9")]
        status: i32,
        #[prost(int32, tag = "11")]
        max_attempts: i32,
    }

    #[tokio::test]
    async fn a_log_written_before_reservations_replays() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path()).unwrap();
        let legacy = LegacyRecord {
            id: "old".into(),
            project_id: "p".into(),
            status: JobStatus::Queued as i32,
            max_attempts: 3,
        };
        let payload = legacy.encode_to_vec();
        let mut log = Vec::new();
        log.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        log.extend_from_slice(&check(&payload).to_le_bytes());
        log.extend_from_slice(&payload);
        std::fs::write(dir.path().join(LOG), log).unwrap();
        let store = FileJobStore::open(dir.path()).unwrap();
        let old = store.get("old", "p").await.unwrap().unwrap();
        assert_eq!((old.job_status(), old.max_attempts), (JobStatus::Queued, 3));
        assert_eq!((old.reservation_id.as_str(), old.reservation_open), ("", false));
    }

    #[tokio::test]
    async fn a_restart_takes_back_the_attempts_a_dead_process_left_running() {
        let dir = tempfile::tempdir().unwrap();
        let now = DateTime::parse_from_rfc3339("2031-01-01T00:00:00Z").unwrap().to_utc();
        let lease = now + chrono::TimeDelta::minutes(6);
        let stale = {
            let store = FileJobStore::open(dir.path()).unwrap();
            store.enqueue(job("again")).await.unwrap();
            store.enqueue(JobRecord { max_attempts: 1, ..job("last") }).await.unwrap();
            let claimed = store.claim(now, lease, 10).await.unwrap();
            assert_eq!(claimed.len(), 2);
            assert!(store.claim(now, lease, 10).await.unwrap().is_empty(), "leased while the process lives");
            claimed.into_iter().find(|j| j.id == "again").unwrap().lease_token
            // The process dies here, both attempts in flight.
        };
        let store = FileJobStore::open(dir.path()).unwrap();
        let soon = now + chrono::TimeDelta::seconds(1);
        let again = store.claim(soon, soon + chrono::TimeDelta::minutes(6), 10).await.unwrap();
        assert_eq!(again.iter().map(|j| (j.id.as_str(), j.attempts)).collect::<Vec<_>>(), [("again", 2)]);
        let last = store.get("last", "p").await.unwrap().unwrap();
        assert_eq!(last.job_status(), JobStatus::Dead, "its only attempt was interrupted");
        assert!(last.last_error.contains("interrupted"), "{}", last.last_error);
        let outcome = Finish::Succeeded(super::super::JobOutcome::default());
        assert!(!store.finish("again", &stale, outcome, soon).await.unwrap(), "the dead process's token is void");
    }

    #[tokio::test]
    async fn one_process_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = FileJobStore::open(dir.path()).unwrap();
        let err = FileJobStore::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("another process"), "{err}");
    }

    #[tokio::test]
    async fn compaction_keeps_the_live_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileJobStore::open(dir.path()).unwrap();
        store.enqueue(job("keep")).await.unwrap();
        {
            let mut state = store.inner.lock();
            for _ in 0..5 {
                let again = state.jobs["keep"].clone();
                state.commit(vec![again]).unwrap();
            }
            assert_eq!(state.records, 6);
            state.compact().unwrap();
            assert_eq!(state.records, 1);
        }
        drop(store);
        let store = FileJobStore::open(dir.path()).unwrap();
        assert_eq!(store.get("keep", "p").await.unwrap().unwrap().job_status(), JobStatus::Queued);
    }
}
