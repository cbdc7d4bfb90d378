//! Kubernetes discovery against a mocked API server (tower-test): `ModelRoute`s and the inference
//! Service's EndpointSlices, listed then watched, change the router's decisions without a
//! restart, deletions included.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use kube::client::Body;
use meshgate_catalog::{Catalog, ProviderSpec};
use meshgate_proto::router::v1::{RoutePlan, RouteRequest};
use meshgate_router::{BreakerConfig, Error, KubeConfig, LocalModel, PolicyStore, RouterCore, TaskClassifier};
use meshgate_runtime::Shutdown;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

type Reply = SendResponse<Response<Body>>;

/// The API server's side: requests are answered by path, whichever watcher asks first.
struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
    pending: Vec<(String, String, Reply)>,
}

impl ApiServer {
    /// The next request whose path ends with `resource`, and its query.
    async fn next(&mut self, resource: &str) -> (String, Reply) {
        loop {
            if let Some(i) = self.pending.iter().position(|(path, _, _)| path.ends_with(resource)) {
                let (_, query, send) = self.pending.remove(i);
                return (query, send);
            }
            let (request, send) = tokio::time::timeout(Duration::from_secs(10), self.handle.next_request())
                .await
                .expect("the watchers call the API server")
                .expect("the client is alive");
            let uri = request.uri();
            self.pending.push((uri.path().to_owned(), uri.query().unwrap_or_default().to_owned(), send));
        }
    }
}

fn respond(send: Reply, body: Vec<u8>) {
    send.send_response(Response::builder().status(200).body(Body::from(body)).unwrap());
}

fn list(kind: &str, api_version: &str, version: &str, items: Vec<Value>) -> Vec<u8> {
    let list =
        json!({ "apiVersion": api_version, "kind": kind, "metadata": { "resourceVersion": version }, "items": items });
    serde_json::to_vec(&list).unwrap()
}

fn events(events: &[(&str, Value)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (kind, object) in events {
        body.extend(serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap());
        body.push(b'\n');
    }
    body
}

fn route(name: &str, version: &str, project: &str, policy: Value) -> Value {
    json!({
        "apiVersion": "meshgate.io/v1alpha1",
        "kind": "ModelRoute",
        "metadata": { "name": name, "namespace": "mesh", "resourceVersion": version },
        "spec": { "project": project, "policy": policy },
    })
}

fn slice(version: &str, ready: &[bool]) -> Value {
    let endpoints: Vec<Value> = ready
        .iter()
        .enumerate()
        .map(|(i, ready)| json!({ "addresses": [format!("10.0.0.{i}")], "conditions": { "ready": ready } }))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "inference-x1",
            "namespace": "mesh",
            "resourceVersion": version,
            "labels": { "kubernetes.io/service-name": "inference" },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
    })
}

/// A local chat model (L0) and a cloud one (L2), with the router choosing for "auto".
fn core() -> Arc<RouterCore> {
    let cloud = [ProviderSpec {
        name: "c".into(),
        base_url: "http://c.test/v1".into(),
        models: vec!["gpt".into()],
        ..Default::default()
    }];
    let catalog = Catalog::resolve(&cloud, std::iter::empty::<(String, String)>(), &BTreeMap::new(), None).unwrap();
    let policies = Arc::new(PolicyStore::new(Default::default()));
    let core = RouterCore::new(Arc::new(catalog), BreakerConfig::default(), policies, TaskClassifier::heuristic_only());
    core.set_local_models(vec![LocalModel { name: "tiny".into(), task: "chat".into(), context_length: 4096 }]);
    Arc::new(core)
}

async fn plan(core: &RouterCore, project: &str) -> Result<RoutePlan, Error> {
    let request = RouteRequest {
        model: "auto".into(),
        max_tokens: 100,
        principal: Some(meshgate_proto::common::v1::Principal { project_id: project.into(), ..Default::default() }),
        ..Default::default()
    };
    let features = core.features(&request, &[], "").await?;
    core.plan(&features, Instant::now(), &mut StdRng::seed_from_u64(1))
}

async fn ids(core: &RouterCore, project: &str) -> Vec<String> {
    plan(core, project).await.unwrap().targets.iter().map(|t| t.target.as_ref().unwrap().id.clone()).collect()
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test]
async fn model_routes_and_endpoint_slices_change_decisions_without_a_restart() {
    let core = core();
    assert_eq!(ids(&core, "a").await, ["local/tiny", "c/gpt"], "before Kubernetes says anything");

    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let shutdown = Shutdown::new();
    let config = KubeConfig {
        enabled: true,
        namespace: Some("mesh".into()),
        inference_service: Some("inference".into()),
        all_namespaces: false,
    };
    core.spawn_kube_watches(kube::Client::new(service, "mesh"), &config, shutdown.clone());
    let mut api = ApiServer { handle, pending: Vec::new() };

    // The lists: project a may not leave l0; one inference replica is ready.
    let (query, send) = api.next("/namespaces/mesh/modelroutes").await;
    assert!(!query.contains("watch=true"), "{query}");
    let routes = vec![route("team-a", "3", "a", json!({ "max_layer": "l0" }))];
    respond(send, list("ModelRouteList", "meshgate.io/v1alpha1", "10", routes));
    let (query, send) = api.next("/namespaces/mesh/endpointslices").await;
    assert!(query.contains("labelSelector=kubernetes.io%2Fservice-name%3Dinference"), "{query}");
    respond(send, list("EndpointSliceList", "discovery.k8s.io/v1", "20", vec![slice("20", &[true])]));
    eventually("the listed ModelRoute applies", async || ids(&core, "a").await == ["local/tiny"]).await;
    let a = plan(&core, "a").await.unwrap();
    assert_eq!(a.policy, "default(config) + project:a(kube:mesh/team-a)");
    assert_eq!(ids(&core, "b").await, ["local/tiny", "c/gpt"], "other projects are not limited");

    // The replica goes unready: local targets leave every plan, and project a has nothing left.
    let (query, send) = api.next("/namespaces/mesh/endpointslices").await;
    assert!(query.contains("watch=true") && query.contains("resourceVersion=20"), "{query}");
    respond(send, events(&[("MODIFIED", slice("21", &[false]))]));
    eventually("no ready replica", async || ids(&core, "b").await == ["c/gpt"]).await;
    let b = plan(&core, "b").await.unwrap();
    let local = b.rejected.iter().find(|r| r.target_id == "local/tiny").unwrap();
    assert_eq!(local.reason, "no ready inference replica");
    let refused = plan(&core, "a").await.unwrap_err();
    assert_eq!(refused.code(), meshgate_runtime::ErrorCode::PolicyViolation, "{refused}");

    // The ModelRoute is modified, then deleted: project a follows each version.
    let (query, send) = api.next("/namespaces/mesh/modelroutes").await;
    assert!(query.contains("watch=true") && query.contains("resourceVersion=10"), "{query}");
    let modified = route("team-a", "11", "a", json!({ "max_layer": "l2", "escalation": false }));
    respond(send, events(&[("MODIFIED", modified)]));
    eventually("the modified ModelRoute applies", async || {
        plan(&core, "a")
            .await
            .is_ok_and(|p| p.targets.len() == 1 && p.targets[0].target.as_ref().unwrap().id == "c/gpt")
    })
    .await;
    let (_, send) = api.next("/namespaces/mesh/modelroutes").await;
    respond(
        send,
        events(&[("DELETED", route("team-a", "12", "a", json!({ "max_layer": "l2", "escalation": false })))]),
    );
    eventually("the deleted ModelRoute no longer applies", async || {
        plan(&core, "a").await.is_ok_and(|p| p.policy == "default(config)")
    })
    .await;

    // The replica is back: local targets return.
    let (_, send) = api.next("/namespaces/mesh/endpointslices").await;
    respond(send, events(&[("MODIFIED", slice("22", &[true, true]))]));
    eventually("ready replicas again", async || ids(&core, "a").await == ["local/tiny", "c/gpt"]).await;
    shutdown.trigger();
}
