//! Nothing lost, nothing done twice: 1,000 jobs enqueued while the provider is down, the real
//! `meshgate-sync` process killed with SIGKILL once in the middle of a batch of submissions and
//! once in the middle of deliveries, restarted, the provider brought up — and every job completes
//! exactly once as the mock provider counts completions per idempotency key, and is charged once
//! to its principal's budgets by a real quota service. On Postgres and on the on-disk queue.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use meshgate_mock_provider::{Behavior, MockProvider};
use meshgate_proto::sync::v1::sync_client::SyncClient;
use meshgate_proto::sync::v1::{JobStatus, ListJobsRequest};
use meshgate_runtime::MeshChannel;
use tokio::sync::Mutex;

const JOBS: usize = 1_000;
/// Submissions acknowledged before the first kill.
const KILL_AFTER_ACKS: usize = 400;
/// Completions seen by the provider before the second kill.
const KILL_AFTER_COMPLETIONS: u64 = 250;

/// A `meshgate-sync` child process.
struct SyncProcess {
    child: Child,
    client: SyncClient<MeshChannel>,
}

impl SyncProcess {
    /// Starts the binary with the queue in `queue_env`, the provider at `provider` and the quota
    /// service at `quota`, and waits until it serves.
    async fn start(queue_env: &[(&str, String)], provider: SocketAddr, quota: &str) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_meshgate-sync"));
        command
            .env_remove("DATABASE_URL")
            .env("MESHGATE_SYNC__QUOTA_ENDPOINT", quota)
            .env("MESHGATE_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            // The quota service and the test's clients are plaintext on loopback.
            .env("MESHGATE_MESH__TRANSPORT", "plaintext")
            .env("MESHGATE_LISTEN__GRPC", "127.0.0.1:0")
            .env("MESHGATE_LISTEN__ADMIN", "127.0.0.1:0")
            .env("MESHGATE_PROVIDER_MOCK_BASE_URL", format!("http://{provider}/v1"))
            .env("MESHGATE_PROVIDER_MOCK_MODELS", MODEL)
            .env("MESHGATE_PROVIDER_MOCK_CONNECT_TIMEOUT_MS", "500")
            // The mock answers repeated job ids with the first completion (step 3 below).
            .env("MESHGATE_PROVIDER_MOCK_HONOURS_IDEMPOTENCY_KEYS", "true")
            // Short waits so the test does not sit out a 30 s backoff once the provider is up;
            // enough attempts that none becomes a dead letter while it is down.
            .env("MESHGATE_SYNC__QUEUE__BACKOFF_BASE_MS", "100")
            .env("MESHGATE_SYNC__QUEUE__BACKOFF_CAP_MS", "1000")
            .env("MESHGATE_SYNC__QUEUE__MAX_ATTEMPTS", "100000")
            .env("MESHGATE_SYNC__QUEUE__LEASE_MS", "3000")
            .env("MESHGATE_SYNC__QUEUE__POLL_INTERVAL_MS", "50")
            .env("MESHGATE_SYNC__QUEUE__CONCURRENCY", "32")
            .env("MESHGATE_SYNC__QUEUE__BATCH_SIZE", "16")
            .stdout(Stdio::inherit())
            // Logs go to stderr.
            .stderr(Stdio::piped());
        for (key, value) in queue_env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("meshgate-sync starts");
        let logs = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the log until the gRPC address shows, then keeps draining so the child never
        // blocks on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(logs).lines() {
                let Ok(line) = line else { break };
                if let Some(sender) = &tx
                    && let Ok(event) = serde_json::from_str::<serde_json::Value>(&line)
                    && event["fields"]["message"] == "serving"
                    && let Some(addr) = event["fields"]["grpc"].as_str()
                {
                    let _ = sender.send(addr.to_owned());
                    tx = None;
                }
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("meshgate-sync logs its gRPC address");
        let channel = meshgate_runtime::channel(&format!("http://{addr}"), Duration::from_secs(1)).unwrap();
        meshgate_runtime::client::wait_serving(&channel, "meshgate.sync.v1.Sync", Duration::from_secs(30))
            .await
            .expect("meshgate-sync serves");
        Self { child, client: SyncClient::new(channel) }
    }

    /// SIGKILL: no shutdown, no flush, no goodbye.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn stop(mut self) {
        // SIGTERM through the shell-free route: the child handles it as a graceful shutdown.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        self.child.wait().unwrap();
    }
}

/// A test that fails leaves no process behind (nor one holding the test's output open).
impl Drop for SyncProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Submits `keys` with 16 concurrent clients; returns the keys acknowledged (job ids by key).
/// Stops early once `stop_after` were acknowledged and `on_threshold` ran (it kills the process:
/// the submissions in flight then fail, as they would for a real client).
async fn submit(
    client: &SyncClient<MeshChannel>,
    keys: &[String],
    stop_after: Option<(usize, Box<dyn FnOnce() + Send>)>,
) -> HashMap<String, String> {
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let (threshold, action) = match stop_after {
        Some((n, action)) => (n, Some(action)),
        None => (usize::MAX, None),
    };
    let action = Arc::new(std::sync::Mutex::new(action));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let keys = Arc::new(keys.to_vec());
    let workers = (0..16).map(|_| {
        let (client, acked, action, next, keys) =
            (client.clone(), acked.clone(), action.clone(), next.clone(), keys.clone());
        tokio::spawn(async move {
            let mut client = client;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(key) = keys.get(i) else { break };
                match client.enqueue(enqueue_request(key, "mock", &format!("job {key}"))).await {
                    Ok(job) => {
                        let mut acked = acked.lock().await;
                        acked.insert(key.clone(), job.into_inner().id);
                        if acked.len() >= threshold
                            && let Some(kill) = action.lock().unwrap().take()
                        {
                            kill();
                        }
                    }
                    // The process died under this submission.
                    Err(_) => break,
                }
            }
        })
    });
    futures::future::join_all(workers).await;
    Arc::try_unwrap(acked).unwrap().into_inner()
}

async fn every_job(client: &SyncClient<MeshChannel>) -> Vec<meshgate_proto::sync::v1::Job> {
    client
        .clone()
        .list_jobs(ListJobsRequest { project_id: PROJECT.into(), status: 0, limit: 1000 })
        .await
        .unwrap()
        .into_inner()
        .jobs
}

async fn nothing_lost_nothing_twice(queue_env: Vec<(&'static str, String)>) {
    let (quota, quota_shutdown) = quota_service("127.0.0.1:0".parse().unwrap()).await;
    let provider = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    // The provider is down: nothing listens at its address.
    let keys: Vec<String> = (0..JOBS).map(|i| format!("crash-{i:04}")).collect();

    // 1. Killed in the middle of a batch of 1,000 submissions.
    let first = SyncProcess::start(&queue_env, provider, &quota).await;
    let pid = first.child.id();
    let acked_before_kill = submit(
        &first.client,
        &keys,
        Some((
            KILL_AFTER_ACKS,
            Box::new(move || {
                let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            }),
        )),
    )
    .await;
    first.kill();
    assert!(
        acked_before_kill.len() >= KILL_AFTER_ACKS && acked_before_kill.len() < JOBS,
        "{}",
        acked_before_kill.len()
    );

    // 2. Restarted: every acknowledged job survived; the client resubmits everything under the
    // same keys and gets the same jobs back, plus the ones it never got an answer for.
    let second = SyncProcess::start(&queue_env, provider, &quota).await;
    let survived: HashMap<String, String> =
        every_job(&second.client).await.into_iter().map(|j| (j.idempotency_key, j.id)).collect();
    for (key, id) in &acked_before_kill {
        assert_eq!(survived.get(key), Some(id), "acknowledged job {key} survived the kill");
    }
    let all = submit(&second.client, &keys, None).await;
    assert_eq!(all.len(), JOBS);
    for (key, id) in &acked_before_kill {
        assert_eq!(&all[key], id, "resubmitting {key} returns the same job");
    }
    let jobs = every_job(&second.client).await;
    assert_eq!(jobs.len(), JOBS, "one job per key");
    assert!(jobs.iter().all(|j| j.status != JobStatus::Succeeded as i32));

    // 3. The provider comes up (slow enough that deliveries overlap) and the process is killed
    // while streams are open and claimed batches are half done.
    let behavior = Behavior {
        models: vec![MODEL.into()],
        chunk_delay: Duration::from_millis(15),
        honour_idempotency_keys: true,
        ..Behavior::default()
    };
    let mock = MockProvider::bind(provider, behavior).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stats = mock.stats();
        let in_flight = stats.chat_requests - stats.completions - stats.idempotent_replays;
        if stats.completions >= KILL_AFTER_COMPLETIONS && in_flight > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "deliveries never got going: {stats:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    second.kill();
    let at_kill = mock.stats();

    // 4. Restarted once more: the leases of the killed deliveries expire and they run again.
    let third = SyncProcess::start(&queue_env, provider, &quota).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let jobs = loop {
        let jobs = every_job(&third.client).await;
        if jobs.iter().all(|j| j.status == JobStatus::Succeeded as i32) {
            break jobs;
        }
        assert!(
            jobs.iter().all(|j| j.status != JobStatus::Dead as i32),
            "no job may die: {:?}",
            jobs.iter().find(|j| j.status == JobStatus::Dead as i32)
        );
        assert!(tokio::time::Instant::now() < deadline, "jobs still pending: {}", jobs.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    third.stop();

    let stats = mock.stats();
    assert_eq!(jobs.len(), JOBS);
    let ids: HashSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids.len(), JOBS);
    let completed = mock.completed_idempotency_keys();
    for job in &jobs {
        assert_eq!(completed.get(&job.id), Some(&1), "job {} ({}) completed exactly once", job.id, job.idempotency_key);
        assert_eq!(job.result, format!("echo: job {}", job.idempotency_key));
    }
    assert_eq!(completed.len(), JOBS, "no completion for anything but the jobs");
    assert_eq!(stats.completions, JOBS as u64);
    assert!(
        stats.chat_requests > JOBS as u64,
        "the kill interrupted deliveries that were made again: {stats:?} (at the kill: {at_kill:?})"
    );
    // Charged once per job, at the provider's price, however many times it was delivered.
    let tokens: i64 = jobs.iter().map(|j| j.usage.unwrap().total_tokens).sum();
    let cost: i64 = jobs.iter().map(|j| j.usage.unwrap().cost_micros).sum();
    let expected_cost: i64 = jobs
        .iter()
        .map(|j| {
            let usage = j.usage.unwrap();
            usage.prompt_tokens + 2 * usage.completion_tokens
        })
        .sum();
    assert_eq!(cost, expected_cost, "each job's cost is its usage at the mock's price");
    for scope in &quota_status(&quota).await.scopes {
        assert_eq!(
            (scope.requests_today, scope.used_tokens, scope.used_cost_micros),
            (JOBS as i64, tokens, cost),
            "scope {:?} is charged once per job",
            scope.scope
        );
    }
    quota_shutdown.trigger();
    eprintln!(
        "crash test: {} submissions acknowledged before the first kill; at the second kill {} completions and {} \
         deliveries in flight; {} provider requests in all, {} answered as idempotent replays",
        acked_before_kill.len(),
        at_kill.completions,
        at_kill.chat_requests - at_kill.completions - at_kill.idempotent_replays,
        stats.chat_requests,
        stats.idempotent_replays
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_and_duplicates_nothing_on_postgres() {
    let url = isolated_database_url().await;
    nothing_lost_nothing_twice(vec![("MESHGATE_SYNC__QUEUE__DATABASE_URL", url)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_and_duplicates_nothing_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path: &Path = dir.path();
    nothing_lost_nothing_twice(vec![("MESHGATE_SYNC__QUEUE__PATH", path.join("queue").display().to_string())]).await;
}

/// The on-disk queue is one process's alone (it holds the directory's lock): after a SIGKILL, the
/// restarted process takes back at once the deliveries the killed one left `running`, instead of
/// leaving them `running` until their lease runs out (six minutes here, far past the test); each is
/// still completed once at the provider, under its idempotency key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_disk_a_restart_takes_back_killed_deliveries_before_their_lease_expires() {
    const KILLED: usize = 20;
    let (quota, quota_shutdown) = quota_service("127.0.0.1:0".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let queue_env = vec![
        ("MESHGATE_SYNC__QUEUE__PATH", dir.path().join("queue").display().to_string()),
        ("MESHGATE_SYNC__QUEUE__LEASE_MS", "360000".to_owned()),
    ];
    let behavior = Behavior { models: vec![MODEL.into()], honour_idempotency_keys: true, ..Behavior::default() };
    let mock = MockProvider::start_with(behavior).await.unwrap();
    // The provider takes every delivery and answers none: all are in flight when the process dies.
    mock.set_hang(true);
    let first = SyncProcess::start(&queue_env, mock.addr(), &quota).await;
    let keys: Vec<String> = (0..KILLED).map(|i| format!("lease-{i:02}")).collect();
    assert_eq!(submit(&first.client, &keys, None).await.len(), KILLED);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while mock.stats().chat_requests < KILLED as u64 {
        assert!(tokio::time::Instant::now() < deadline, "the deliveries never started: {:?}", mock.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill();
    mock.set_hang(false);

    let second = SyncProcess::start(&queue_env, mock.addr(), &quota).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let jobs = loop {
        let jobs = every_job(&second.client).await;
        if jobs.len() == KILLED && jobs.iter().all(|j| j.status == JobStatus::Succeeded as i32) {
            break jobs;
        }
        let statuses: Vec<(i32, i32)> = jobs.iter().map(|j| (j.status, j.attempts)).collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "30 s after the restart the killed deliveries are not done (status, attempts): {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    second.stop();
    let completed = mock.completed_idempotency_keys();
    for job in &jobs {
        assert_eq!(job.attempts, 2, "the interrupted attempt and the one after the restart: {job:?}");
        assert_eq!(completed.get(&job.id), Some(&1), "job {} completed once", job.id);
    }
    quota_shutdown.trigger();
}
