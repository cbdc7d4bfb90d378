//! Service identity inside the mesh: every internal listener speaks mTLS, knows its caller by the
//! caller's certificate (or, in process, by the calling service's channel), lets it call only
//! the RPCs the allow-list gives it, refuses oversized messages at their header, and picks up
//! rotated certificates without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use meshgate_proto::common::v1::{Principal, Role, Usage};
use meshgate_proto::gateway::v1::ListModelsRequest;
use meshgate_proto::gateway::v1::gateway_client::GatewayClient;
use meshgate_proto::inference::v1::LoadRequest;
use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_proto::quota::v1::quota_client::QuotaClient;
use meshgate_proto::quota::v1::{
    ChargeRequest, Limits, ReserveRequest, Scope, ScopeKind, SetLimitsRequest, StatusRequest,
};
use meshgate_runtime::mesh::{self, Mesh, Transport, pki};
use meshgate_runtime::{ListenConfig, Listeners, MeshChannel, Shutdown};
use meshgate_tests::{ADMIN_KEY, CLOUD_MODEL, MeshOptions, TestMesh, chat_body, test_pki};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const QUOTA: &str = "meshgate.quota.v1.Quota";

/// A quota service on its own, on Postgres and Redis, serving as the `quota` identity of `mesh`.
struct Quota {
    url: String,
    admin: String,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), meshgate_quota::Error>>,
}

impl Quota {
    async fn start(mesh: &Mesh) -> Self {
        let listeners = Listeners::ephemeral().await.unwrap().with_identity(mesh.identity("quota").unwrap());
        Self::start_on(listeners).await
    }

    async fn start_on(listeners: Listeners) -> Self {
        meshgate_runtime::telemetry::init("meshgate-tests");
        let mut config = meshgate_tests::base_config(&[], true).quota;
        config.database_url = Some(meshgate_tests::isolated_database_url().await);
        let url = format!("http://{}", listeners.grpc_addr());
        let admin = format!("http://{}", listeners.admin_addr());
        let shutdown = Shutdown::new();
        let task = tokio::spawn(meshgate_quota::serve(config, listeners, shutdown.clone()));
        Self { url, admin, shutdown, task }
    }

    /// Waits until it serves, asking as `identity`.
    async fn wait_serving(&self, identity: &mesh::ServiceIdentity) {
        let channel = identity.channel(&self.url, Duration::from_secs(1)).unwrap();
        meshgate_runtime::client::wait_serving(&channel, QUOTA, Duration::from_secs(20)).await.unwrap();
    }

    fn client(&self, identity: &mesh::ServiceIdentity) -> QuotaClient<MeshChannel> {
        QuotaClient::new(identity.channel(&self.url, Duration::from_secs(1)).unwrap())
    }

    /// `meshgate_grpc_server_refused_total` for this method, caller and reason.
    async fn refused(&self, method: &str, caller: &str, reason: &str) -> u64 {
        refused(&self.admin, &format!("/{QUOTA}/{method}"), caller, reason).await
    }

    async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.unwrap().unwrap();
    }
}

/// The refusal counter of the service whose admin listener is `admin`.
async fn refused(admin: &str, method: &str, caller: &str, reason: &str) -> u64 {
    let text = reqwest::get(format!("{admin}/metrics")).await.unwrap().text().await.unwrap();
    let labels = [format!("method=\"{method}\""), format!("caller=\"{caller}\""), format!("reason=\"{reason}\"")];
    text.lines()
        .filter(|line| line.starts_with("meshgate_grpc_server_refused_total{"))
        .find(|line| labels.iter().all(|label| line.contains(label.as_str())))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn test_mesh() -> Mesh {
    Mesh::new(&mesh::Config { tls_dir: Some(test_pki()), ..Default::default() }).unwrap()
}

fn principal() -> Principal {
    Principal {
        org_id: "org-identity".into(),
        project_id: "project-identity".into(),
        user_id: "user-identity".into(),
        key_id: "key-identity".into(),
        role: Role::Owner as i32,
    }
}

fn reserve(request_id: &str) -> ReserveRequest {
    ReserveRequest {
        request_id: request_id.into(),
        principal: Some(principal()),
        estimated_tokens: 10,
        ..Default::default()
    }
}

fn set_limits() -> SetLimitsRequest {
    SetLimitsRequest {
        scope: Some(Scope { kind: ScopeKind::Project as i32, id: "project-identity".into() }),
        limits: Some(Limits { tokens_per_day: 1_000_000, ..Default::default() }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_identity_calls_only_the_quota_rpcs_its_code_makes() {
    let mesh = test_mesh();
    let quota = Quota::start(&mesh).await;
    let (gateway, sync) = (mesh.identity("gateway").unwrap(), mesh.identity("sync").unwrap());
    quota.wait_serving(&sync).await;

    let mut as_sync = quota.client(&sync);
    let charge = ChargeRequest {
        charge_id: "job:identity-1".into(),
        principal: Some(principal()),
        usage: Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            total_tokens: 7,
            cost_micros: 0,
            ..Usage::default()
        }),
        requests: 1,
    };
    as_sync.charge(charge).await.expect("sync charges delivered jobs");
    let denied = as_sync.reserve(reserve("sync-reserve")).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("sync"), "{}", denied.message());
    let denied = as_sync.set_limits(set_limits()).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert_eq!(quota.refused("Reserve", "sync", "permission_denied").await, 1);
    assert_eq!(quota.refused("SetLimits", "sync", "permission_denied").await, 1);

    let mut as_gateway = quota.client(&gateway);
    as_gateway.set_limits(set_limits()).await.expect("the gateway sets budgets");
    assert!(as_gateway.reserve(reserve("gateway-reserve")).await.unwrap().into_inner().admitted);
    assert_eq!(quota.refused("SetLimits", "gateway", "permission_denied").await, 0);
    quota.stop().await;
}

/// A TLS directory trusting the real mesh CA that holds a `sync` certificate of another CA.
fn foreign_sync_identity(dir: &Path) -> mesh::ServiceIdentity {
    let foreign = pki::Authority::generate().unwrap();
    pki::write_identity(dir, "sync", &foreign.issue("sync", &pki::SanOptions::default()).unwrap()).unwrap();
    std::fs::copy(test_pki().join("ca.crt"), dir.join("ca.crt")).unwrap();
    let config = mesh::Config { tls_dir: Some(dir.to_owned()), ..Default::default() };
    Mesh::new(&config).unwrap().identity("sync").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_a_certificate_of_the_mesh_are_unauthenticated() {
    let mesh = test_mesh();
    let quota = Quota::start(&mesh).await;
    quota.wait_serving(&mesh.identity("gateway").unwrap()).await;

    let anonymous = mesh.anonymous_channel(&quota.url, Duration::from_secs(1)).unwrap();
    let refused = QuotaClient::new(anonymous.clone()).reserve(reserve("anonymous")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let health = meshgate_runtime::client::health_status(anonymous, "", Duration::from_secs(2)).await;
    assert!(health.is_err(), "health needs an identity too: {health:?}");
    assert_eq!(quota.refused("Reserve", "none", "unauthenticated").await, 1);

    let dir = tempfile::tempdir().unwrap();
    let foreign = foreign_sync_identity(dir.path());
    let charge = ChargeRequest { charge_id: "job:foreign".into(), principal: Some(principal()), ..Default::default() };
    let refused = quota.client(&foreign).charge(charge).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("certificate"), "{}", refused.message());
    assert_eq!(quota.refused("Charge", "untrusted", "unauthenticated").await, 1);

    let plaintext = meshgate_runtime::channel(&quota.url, Duration::from_secs(1)).unwrap();
    assert!(
        QuotaClient::new(plaintext).reserve(reserve("plaintext")).await.is_err(),
        "no plaintext on an mTLS listener"
    );
    quota.stop().await;
}

/// The services the reflection service of `channel` lists.
async fn reflected_services(channel: MeshChannel) -> Result<Vec<String>, tonic::Status> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let response = responses.message().await?.ok_or_else(|| tonic::Status::unknown("no answer"))?;
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => Ok(list.service.into_iter().map(|s| s.name).collect()),
        other => Err(tonic::Status::unknown(format!("{other:?}"))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_is_served_only_when_enabled() {
    let mesh = test_mesh();
    let quota = Quota::start(&mesh).await;
    let gateway = mesh.identity("gateway").unwrap();
    quota.wait_serving(&gateway).await;
    let off = reflected_services(gateway.channel(&quota.url, Duration::from_secs(1)).unwrap()).await.unwrap_err();
    assert_eq!(off.code(), tonic::Code::Unimplemented, "reflection is off by default: {off:?}");
    quota.stop().await;

    let config = mesh::Config { tls_dir: Some(test_pki()), reflection: true, ..Default::default() };
    let mesh = Mesh::new(&config).unwrap();
    let quota = Quota::start(&mesh).await;
    let operator = mesh.identity("operator").unwrap();
    quota.wait_serving(&operator).await;
    let services = reflected_services(operator.channel(&quota.url, Duration::from_secs(1)).unwrap()).await.unwrap();
    assert!(services.iter().any(|s| s == QUOTA), "{services:?}");
    let anonymous = mesh.anonymous_channel(&quota.url, Duration::from_secs(1)).unwrap();
    assert_eq!(reflected_services(anonymous).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    quota.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_reserve_is_refused_at_its_header() {
    let mesh = test_mesh();
    let quota = Quota::start(&mesh).await;
    let gateway = mesh.identity("gateway").unwrap();
    quota.wait_serving(&gateway).await;
    let mut client = quota.client(&gateway);

    let refused = client.reserve(reserve(&"x".repeat(64 * 1024))).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    assert_eq!(
        refused.metadata().get(meshgate_runtime::error::ERROR_CODE_METADATA).unwrap(),
        meshgate_runtime::ErrorCode::MessageTooLarge.as_str()
    );
    assert!(refused.message().contains("8192"), "names the limit: {}", refused.message());
    assert_eq!(quota.refused("Reserve", "gateway", "message_too_large").await, 1);
    assert!(client.reserve(reserve("small")).await.unwrap().into_inner().admitted, "the channel stays usable");
    quota.stop().await;
}

/// Writes a TLS directory for `identity`: the CA bundle `ca_pem` and its certificate.
fn identity_dir(dir: &Path, identity: &str, ca_pem: &str, issued: &pki::IssuedCert) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca.crt"), ca_pem).unwrap();
    pki::write_identity(dir, identity, issued).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_used_by_new_connections_without_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let options = pki::SanOptions::default();
    let (old_ca, new_ca) = (pki::Authority::generate().unwrap(), pki::Authority::generate().unwrap());
    let dir_of = |name: &str| root.path().join(name);
    identity_dir(&dir_of("server"), "quota", old_ca.cert_pem(), &old_ca.issue("quota", &options).unwrap());
    identity_dir(&dir_of("old"), "gateway", old_ca.cert_pem(), &old_ca.issue("gateway", &options).unwrap());
    identity_dir(&dir_of("new"), "gateway", new_ca.cert_pem(), &new_ca.issue("gateway", &options).unwrap());
    let open = |dir: &str| {
        let config = mesh::Config { tls_dir: Some(dir_of(dir)), reload_secs: 1, ..Default::default() };
        Mesh::new(&config).unwrap()
    };
    let server = open("server");
    let (old_client, new_client) = (open("old").identity("gateway").unwrap(), open("new").identity("gateway").unwrap());
    let quota = Quota::start(&server).await;
    quota.wait_serving(&old_client).await;
    let mut pooled = quota.client(&old_client);
    pooled.status(StatusRequest { principal: Some(principal()) }).await.unwrap();
    let fresh_new = || quota.client(&new_client);
    assert!(fresh_new().status(StatusRequest { principal: Some(principal()) }).await.is_err(), "not trusted yet");

    // The rotation as a Secret update delivers it: a certificate of the new CA, and a bundle
    // trusting both CAs while clients move over.
    let bundle = format!("{}{}", old_ca.cert_pem(), new_ca.cert_pem());
    identity_dir(&dir_of("server"), "quota", &bundle, &new_ca.issue("quota", &options).unwrap());
    let mut rotated = false;
    for _ in 0..100 {
        if fresh_new().status(StatusRequest { principal: Some(principal()) }).await.is_ok() {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "new connections present the new certificate within the reload interval");
    let stale = quota.client(&old_client).status(StatusRequest { principal: Some(principal()) }).await;
    assert!(stale.is_err(), "a client trusting only the old CA no longer accepts a new connection");
    pooled.status(StatusRequest { principal: Some(principal()) }).await.expect("an open connection goes on");
    assert!(!quota.task.is_finished(), "no restart");
    quota.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_off_loopback_and_served_on_it() {
    let config = mesh::Config { transport: Transport::Plaintext, ..Default::default() };
    let plaintext = Mesh::new(&config).unwrap();
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let everywhere = ListenConfig { grpc: SocketAddr::from(([0, 0, 0, 0], 0)), admin: any, http: None };
    let listeners = Listeners::bind(&everywhere).await.unwrap().with_identity(plaintext.identity("quota").unwrap());
    let quota = Quota::start_on(listeners).await;
    let err = quota.task.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("plaintext") && err.contains("loopback"), "{err}");

    let quota = Quota::start(&plaintext).await;
    let gateway = plaintext.identity("gateway").unwrap();
    quota.wait_serving(&gateway).await;
    quota.client(&gateway).status(StatusRequest { principal: Some(principal()) }).await.expect("plaintext on loopback");
    quota.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_calls_carry_the_callers_identity_through_the_same_guard() {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| {
            config.mesh.extra_callers.insert("operator".into(), vec!["Quota.Status".into()]);
        }),
        ..MeshOptions::default()
    })
    .await;
    let quota_addr: SocketAddr = mesh.grpc_url("quota").trim_start_matches("http://").parse().unwrap();
    assert!(meshgate_runtime::in_process::registered(quota_addr), "the standalone calls quota in process");

    let denied = QuotaClient::new(mesh.channel_as("sync", "quota")).reserve(reserve("in-process")).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let admin = mesh.admin_url("quota");
    assert_eq!(refused(&admin, &format!("/{QUOTA}/Reserve"), "sync", "permission_denied").await, 1);

    // A channel without an identity reaches the service in process (over the network it would
    // fail its TLS handshake) and is refused by the guard.
    let anonymous = meshgate_runtime::channel(&mesh.grpc_url("quota"), Duration::from_secs(1)).unwrap();
    let refused_status = QuotaClient::new(anonymous).status(StatusRequest { principal: Some(principal()) }).await;
    assert_eq!(refused_status.unwrap_err().code(), tonic::Code::Unauthenticated);

    let mut operator = QuotaClient::new(mesh.channel_as("operator", "quota"));
    operator.status(StatusRequest { principal: Some(principal()) }).await.expect("an extra caller");
    assert_eq!(operator.reserve(reserve("operator")).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    let load = LoadRequest { model: "prompt-injection".into(), unload: true };
    let unload = InferenceClient::new(mesh.channel_as("operator", "inference")).load(load).await.unwrap_err();
    assert_eq!(unload.code(), tonic::Code::PermissionDenied, "nobody unloads a model unless configured");

    let response = mesh.chat(chat_body(CLOUD_MODEL, "in process, as the gateway")).await;
    assert_eq!(response.status(), 200, "the gateway's own in-process calls pass");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_services_over_mtls_listeners_serve_a_chat_and_record_its_trace() {
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| config.standalone.in_process_calls = false),
        ..MeshOptions::default()
    })
    .await;
    let quota_addr: SocketAddr = mesh.grpc_url("quota").trim_start_matches("http://").parse().unwrap();
    assert!(!meshgate_runtime::in_process::registered(quota_addr), "every call crosses a listener");
    let response = mesh
        .http
        .post(format!("{}/v1/chat/completions", mesh.edge))
        .bearer_auth(ADMIN_KEY)
        .json(&chat_body(CLOUD_MODEL, "over mTLS"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-meshgate-request-id"].to_str().unwrap().to_owned();
    let trace = mesh.trace(&request_id).await;
    assert_eq!(trace.status_code, 200, "recorded through analytics' mTLS listener");

    // The gateway's gRPC listener is the public edge: TLS without a client certificate, API keys.
    let public = mesh.mesh.anonymous_channel(&mesh.grpc_url("gateway"), Duration::from_secs(1)).unwrap();
    let mut request = tonic::Request::new(ListModelsRequest {});
    request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_KEY}").parse().unwrap());
    let models = GatewayClient::new(public.clone()).list_models(request).await.expect("a public client");
    assert!(models.into_inner().models.iter().any(|m| m.id == CLOUD_MODEL));
    let unkeyed = GatewayClient::new(public.clone()).list_models(ListModelsRequest {}).await.unwrap_err();
    assert_eq!(unkeyed.code(), tonic::Code::Unauthenticated, "the API key still decides");
    let health = meshgate_runtime::client::health_status(public, "", Duration::from_secs(2)).await;
    assert!(health.is_err(), "its health is for the mesh: {health:?}");
    mesh.stop().await;
}
