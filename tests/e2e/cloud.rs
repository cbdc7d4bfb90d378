//! Edge → cloud: a standalone edge mesh (in-memory stores, on-disk outbox) uploads its traffic to
//! a cloud mesh (Postgres, Redis) through a switchable link: the cloud unreachable, then answering
//! but every answer lost, then reachable, with the edge restarted on the same outbox in between.
//! The cloud's analytics and budgets must count every edge request exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use meshgate_tests::{ADMIN_KEY, CLOUD_MODEL, MeshOptions, TestMesh, chat_body};
use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::tenancy::{Tenant, call};

const DOWN: u8 = 0;
const LOSE_REPLIES: u8 = 1;
const UP: u8 = 2;

/// A TCP link to the cloud's edge: refusing connections, forwarding requests but losing every
/// reply, or forwarding both ways.
struct Link {
    url: String,
    mode: Arc<AtomicU8>,
}

impl Link {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mode = Arc::new(AtomicU8::new(DOWN));
        let shared = mode.clone();
        let target = target.trim_start_matches("http://").to_owned();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mode = shared.load(Ordering::SeqCst);
                let target = target.clone();
                tokio::spawn(async move {
                    match mode {
                        UP => {
                            let mut client = client;
                            if let Ok(mut cloud) = TcpStream::connect(&target).await {
                                let _ = tokio::io::copy_bidirectional(&mut client, &mut cloud).await;
                            }
                        }
                        LOSE_REPLIES => lose_reply(client, &target).await,
                        _ => drop(client),
                    }
                });
            }
        });
        Self { url, mode }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

/// Forwards what the client sends; once the cloud starts answering, drops both connections.
async fn lose_reply(client: TcpStream, target: &str) {
    let Ok(cloud) = TcpStream::connect(target).await else { return };
    let (mut client_read, _client_write) = client.into_split();
    let (mut cloud_read, mut cloud_write) = cloud.into_split();
    let forward = async {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = client_read.read(&mut buf).await {
            if n == 0 || cloud_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    };
    let mut first = [0u8; 1];
    tokio::select! {
        _ = forward => {}
        _ = cloud_read.read(&mut first) => {}
    }
}

/// The sum of the samples whose line starts with `prefix` (a name, or a name and leading labels).
async fn metric(http: &reqwest::Client, admin: &str, prefix: &str) -> f64 {
    let text = http.get(format!("{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The project's requests and tokens as the cloud's analytics and quota see them.
async fn cloud_counts(cloud: &TestMesh, owner: &str) -> (i64, i64, i64) {
    let (status, analytics) = call(&cloud.http, &cloud.edge, owner, Method::GET, "/v1/analytics", None).await;
    assert_eq!(status, 200, "{analytics}");
    let recorded: i64 = analytics["data"].as_array().unwrap().iter().map(|row| row["requests"].as_i64().unwrap()).sum();
    let (status, quota) = call(&cloud.http, &cloud.edge, owner, Method::GET, "/v1/quota/status", None).await;
    assert_eq!(status, 200, "{quota}");
    let project = quota["scopes"].as_array().unwrap().iter().find(|s| s["scope"]["kind"] == "project").unwrap();
    (recorded, project["used"]["requests"].as_i64().unwrap(), project["used"]["tokens"].as_i64().unwrap())
}

async fn edge_mesh(link: &Link, key: &str, outbox: &std::path::Path) -> TestMesh {
    let (url, key, outbox) = (link.url.clone(), key.to_owned(), outbox.to_path_buf());
    TestMesh::start_with(MeshOptions {
        stores: false,
        tune: Box::new(move |config| {
            config.sync.cloud.url = Some(url);
            config.sync.cloud.key = Some(key);
            config.sync.cloud.outbox = Some(outbox);
            config.sync.cloud.backoff_base_ms = 20;
            config.sync.cloud.backoff_cap_ms = 100;
            config.sync.cloud.timeout_ms = 2_000;
        }),
    })
    .await
}

/// Serves `count` chat requests at the edge; their request ids and total tokens.
async fn serve(edge: &TestMesh, count: usize) -> (Vec<String>, i64) {
    let mut ids = Vec::new();
    let mut tokens = 0;
    for i in 0..count {
        let response = edge.chat(chat_body(CLOUD_MODEL, &format!("edge request {i}"))).await;
        assert_eq!(response.status(), 200);
        ids.push(response.headers()["x-meshgate-request-id"].to_str().unwrap().to_owned());
        let body: Value = response.json().await.unwrap();
        tokens += body["usage"]["total_tokens"].as_i64().unwrap();
    }
    (ids, tokens)
}

/// Waits until the edge's sync service has staged `traces` traces.
async fn staged(edge: &TestMesh, traces: f64) {
    let admin = edge.admin_url("sync");
    for _ in 0..400 {
        if metric(&edge.http, &admin, "meshgate_sync_cloud_staged_traces_total").await >= traces {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the edge never staged {traces} traces");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_uploads_its_traffic_exactly_once_through_outages_lost_replies_and_a_restart() {
    let cloud = TestMesh::start().await;
    let tenant = Tenant::create(&cloud.http, &cloud.edge, "edgeco").await;
    let owner = tenant.secret("owner").to_owned();
    // The tenant's own first request, once its trace is flushed and its charge settled (a
    // leased slice reports its spending to quota at its next flush).
    let mut before = cloud_counts(&cloud, &owner).await;
    for _ in 0..200 {
        if (before.0, before.1) == (1, 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        before = cloud_counts(&cloud, &owner).await;
    }
    assert_eq!((before.0, before.1), (1, 1), "{before:?}");
    let link = Link::start(cloud.edge.clone()).await;
    let outbox = tempfile::tempdir().unwrap();

    // The cloud is unreachable: the edge serves and stages, the cloud sees nothing.
    let edge = edge_mesh(&link, tenant.secret("developer"), outbox.path()).await;
    let (mut ids, mut tokens) = serve(&edge, 12).await;
    staged(&edge, 12.0).await;
    let sync_admin = edge.admin_url("sync");
    for _ in 0..400 {
        if metric(&edge.http, &sync_admin, "meshgate_sync_cloud_uploads_total{outcome=\"retried\"").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let tried = metric(&edge.http, &sync_admin, "meshgate_sync_cloud_uploads_total{outcome=\"retried\"").await;
    assert!(tried >= 1.0, "the edge tried to upload");
    assert_eq!(cloud_counts(&cloud, &owner).await, before, "nothing crossed while the cloud was down");

    // The edge restarts on the same outbox and serves more.
    edge.stop().await;
    let edge = edge_mesh(&link, tenant.secret("developer"), outbox.path()).await;
    let (more_ids, more_tokens) = serve(&edge, 8).await;
    staged(&edge, 8.0).await;
    ids.extend(more_ids);
    tokens += more_tokens;

    // The cloud applies what arrives but every answer is lost: the edge sends the same batch again.
    link.set(LOSE_REPLIES);
    let cloud_admin = cloud.admin_url("gateway");
    for _ in 0..400 {
        if metric(&cloud.http, &cloud_admin, "meshgate_edge_batches_total{outcome=\"duplicate\"").await >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(metric(&cloud.http, &cloud_admin, "meshgate_edge_batches_total{outcome=\"duplicate\"").await >= 2.0);

    link.set(UP);
    let sync_admin = edge.admin_url("sync");
    let expected = (before.0 + 20, before.1 + 20, before.2 + tokens);
    let mut seen = before;
    for _ in 0..400 {
        seen = cloud_counts(&cloud, &owner).await;
        let empty = metric(&edge.http, &sync_admin, "meshgate_sync_cloud_outbox_batches").await == 0.0;
        if seen == expected && empty {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, expected, "(traces, requests charged, tokens charged) count each edge request once");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cloud_counts(&cloud, &owner).await, expected, "and nothing more arrives");

    // An edge trace is the uploading key's project's, and says where it came from.
    let (status, trace) =
        call(&cloud.http, &cloud.edge, &owner, Method::GET, format!("/v1/traces/{}", ids[0]), None).await;
    assert_eq!(status, 200, "{trace}");
    assert_eq!(trace["project_id"], tenant.project.as_str(), "{trace}");
    assert_eq!(trace["headers"]["x-meshgate-edge-project"], "default", "{trace}");
    let (status, _) =
        call(&cloud.http, &cloud.edge, ADMIN_KEY, Method::GET, format!("/v1/traces/{}", ids[0]), None).await;
    assert_eq!(status, 404, "the cloud's default project does not see the tenant's edge traffic");

    edge.stop().await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_edge_batches_get_clear_errors() {
    use prost::Message as _;
    let cloud = TestMesh::start().await;
    let tenant = Tenant::create(&cloud.http, &cloud.edge, "badedge").await;
    let url = format!("{}/v1/sync/batches", cloud.edge);
    let batch = meshgate_proto::sync::v1::EdgeBatch {
        batch_id: "edge-1".into(),
        traces: vec![meshgate_proto::analytics::v1::Trace {
            request_id: "r-1".into(),
            started_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            ..Default::default()
        }],
    };
    let post = |key: &str, id: &str, content_type: &str, body: Vec<u8>| {
        cloud
            .http
            .post(&url)
            .bearer_auth(key)
            .header("idempotency-key", id)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let developer = tenant.secret("developer");
    let cases = [
        (post(developer, "edge-1", "application/json", batch.encode_to_vec()).await.unwrap(), 415),
        (post(developer, "edge-1", "application/x-protobuf", b"\xff\xff".to_vec()).await.unwrap(), 400),
        (post(developer, "other", "application/x-protobuf", batch.encode_to_vec()).await.unwrap(), 400),
        (post(developer, "bad id!", "application/x-protobuf", batch.encode_to_vec()).await.unwrap(), 400),
        (post(tenant.secret("viewer"), "edge-1", "application/x-protobuf", batch.encode_to_vec()).await.unwrap(), 403),
        (post("sk-wrong", "edge-1", "application/x-protobuf", batch.encode_to_vec()).await.unwrap(), 401),
    ];
    for (response, expected) in cases {
        assert_eq!(response.status().as_u16(), expected);
        let body: Value = response.json().await.unwrap();
        assert!(body["error"]["code"].is_string(), "{body}");
    }

    let first = post(developer, "edge-1", "application/x-protobuf", batch.encode_to_vec()).await.unwrap();
    assert_eq!(first.status(), 200);
    let receipt: Value = first.json().await.unwrap();
    assert_eq!((receipt["duplicate"].as_bool(), receipt["recorded"].as_i64()), (Some(false), Some(1)), "{receipt}");
    let again = post(developer, "edge-1", "application/x-protobuf", batch.encode_to_vec()).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let receipt: Value = again.json().await.unwrap();
    assert_eq!(receipt["duplicate"], true, "{receipt}");
    cloud.stop().await;
}
