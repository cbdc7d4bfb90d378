//! Kubernetes discovery: `ModelRoute` custom resources carry routing policies, and the
//! inference Service's EndpointSlices tell how many local replicas are ready. Both are watched,
//! so changes apply without a restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use futures::{Stream, StreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, CustomResource, CustomResourceExt, ResourceExt};
use meshgate_runtime::Shutdown;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::KubeConfig;
use crate::policy::{KubePolicy, PolicyStore, RoutePolicy};

/// Routing policy for one project (or, without `project`, the default of every project),
/// laid over the router's file and configuration policies.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "meshgate.io",
    version = "v1alpha1",
    kind = "ModelRoute",
    namespaced,
    shortname = "mroute",
    doc = "Routing policy of a meshgate project: layers, cost cap, task preferences, fallbacks.",
    printcolumn = r#"{"name":"Project","type":"string","jsonPath":".spec.project"}"#,
    printcolumn = r#"{"name":"Max layer","type":"string","jsonPath":".spec.policy.max_layer"}"#
)]
#[serde(deny_unknown_fields)]
pub struct ModelRouteSpec {
    /// Project id the policy applies to; absent, it is the default of every project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The policy (same fields as the router's policy file).
    #[serde(default)]
    pub policy: RoutePolicy,
}

/// The CRD manifest as YAML, as kept in `services/router/crd/modelroute.yaml`.
pub fn crd_yaml() -> String {
    let yaml = serde_saphyr::to_string(&ModelRoute::crd()).unwrap_or_else(|err| {
        // The CRD is built from static types: failing to render it is a bug, not an input error.
        unreachable!("the ModelRoute CRD always renders: {err}")
    });
    format!(
        "# Generated from services/router/src/discovery.rs by `cargo run -p meshgate-router --bin modelroute-crd`.\n# Do not edit: the router's tests fail when it is stale.\n{yaml}"
    )
}

/// Ready inference replicas as the EndpointSlices tell; unknown until the first list.
#[derive(Debug)]
pub struct Replicas {
    ready: AtomicI64,
    /// Counts the changes of `ready`, for whoever holds plans decided with an older count.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Replicas {
    fn default() -> Self {
        Self { ready: AtomicI64::new(-1), changes: tokio::sync::watch::Sender::new(0) }
    }
}

impl Replicas {
    pub fn get(&self) -> Option<u32> {
        u32::try_from(self.ready.load(Ordering::Relaxed)).ok()
    }

    /// Changes so far.
    pub fn changes(&self) -> u64 {
        *self.changes.borrow()
    }

    /// [`Replicas::changes`], changing as each change happens.
    pub fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn set(&self, ready: usize) {
        let ready = i64::try_from(ready).unwrap_or(i64::MAX);
        if self.ready.swap(ready, Ordering::Relaxed) != ready {
            tracing::info!(ready, "inference replicas changed");
            self.changes.send_modify(|changes| *changes += 1);
        }
    }
}

/// Starts watching, with `client`, the `ModelRoute`s (into `policies`) and, when
/// `config.inference_service` is set, its EndpointSlices (into `replicas`).
pub fn spawn_watches(
    client: Client,
    config: &KubeConfig,
    policies: Arc<PolicyStore>,
    replicas: Arc<Replicas>,
    shutdown: Shutdown,
) {
    let namespace = config.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
    let routes_namespace = (!config.all_namespaces).then(|| namespace.clone());
    tracing::info!(namespace = %namespace, all_namespaces = config.all_namespaces, "watching ModelRoutes");
    tokio::spawn(watch_model_routes(client.clone(), routes_namespace, policies, shutdown.clone()));
    if let Some(service) = &config.inference_service {
        tracing::info!(namespace = %namespace, service = %service, "watching inference EndpointSlices");
        tokio::spawn(watch_inference_endpoints(client, namespace, service.clone(), replicas, shutdown));
    }
}

/// Watches `ModelRoute`s (in `namespace`, or everywhere) into the policy store until shutdown.
/// A resource whose policy is invalid is skipped with an error log; its last valid version, if
/// any, stays in force.
pub async fn watch_model_routes(
    client: Client,
    namespace: Option<String>,
    store: Arc<PolicyStore>,
    shutdown: Shutdown,
) {
    let api: Api<ModelRoute> = match &namespace {
        Some(namespace) => Api::namespaced(client, namespace),
        None => Api::all(client),
    };
    let events = watcher(api, watcher::Config::default());
    let mut listing: Option<BTreeMap<String, KubePolicy>> = None;
    run(events, shutdown, |event| match event {
        Event::Init => listing = Some(BTreeMap::new()),
        Event::InitApply(route) => {
            if let (Some(listing), Some((key, policy))) = (listing.as_mut(), accepted(&route)) {
                listing.insert(key, policy);
            }
        }
        Event::InitDone => {
            // A relist replaces the whole set: resources deleted while the watch was down go.
            let routes = listing.take().unwrap_or_default();
            tracing::info!(count = routes.len(), "ModelRoutes listed");
            store.update(|set| set.kube = routes);
        }
        Event::Apply(route) => {
            if let Some((key, policy)) = accepted(&route) {
                tracing::info!(route = %key, "ModelRoute applied");
                store.update(|set| {
                    set.kube.insert(key, policy);
                });
            }
        }
        Event::Delete(route) => {
            let key = key_of(&route);
            tracing::info!(route = %key, "ModelRoute deleted");
            store.update(|set| {
                set.kube.remove(&key);
            });
        }
    })
    .await;
}

fn key_of(route: &ModelRoute) -> String {
    format!("{}/{}", route.namespace().unwrap_or_default(), route.name_any())
}

fn accepted(route: &ModelRoute) -> Option<(String, KubePolicy)> {
    let key = key_of(route);
    match route.spec.policy.validate() {
        Ok(()) => Some((key, KubePolicy { project: route.spec.project.clone(), policy: route.spec.policy.clone() })),
        Err(err) => {
            tracing::error!(route = %key, %err, "invalid ModelRoute ignored");
            None
        }
    }
}

/// Watches the EndpointSlices of `service` in `namespace` and keeps `replicas` at the number of
/// ready endpoints across them.
pub async fn watch_inference_endpoints(
    client: Client,
    namespace: String,
    service: String,
    replicas: Arc<Replicas>,
    shutdown: Shutdown,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let mut slices: BTreeMap<String, usize> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, usize>> = None;
    run(watcher(api, config), shutdown, |event| {
        match event {
            Event::Init => listing = Some(BTreeMap::new()),
            Event::InitApply(slice) => {
                if let Some(listing) = listing.as_mut() {
                    listing.insert(slice.name_any(), ready_endpoints(&slice));
                }
                return;
            }
            Event::InitDone => slices = listing.take().unwrap_or_default(),
            Event::Apply(slice) => {
                slices.insert(slice.name_any(), ready_endpoints(&slice));
            }
            Event::Delete(slice) => {
                slices.remove(&slice.name_any());
            }
        }
        replicas.set(slices.values().sum());
    })
    .await;
}

/// Endpoints ready to serve. A missing `ready` condition means ready (the API's contract).
fn ready_endpoints(slice: &EndpointSlice) -> usize {
    slice.endpoints.iter().filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)).count()
}

fn watcher<K>(api: Api<K>, config: watcher::Config) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    // Errors (API server down, RBAC missing) back off exponentially and retry: the router keeps
    // routing with what it last knew.
    watcher::watcher(api, config).default_backoff()
}

async fn run<K>(
    events: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    shutdown: Shutdown,
    mut apply: impl FnMut(Event<K>),
) {
    let mut events = std::pin::pin!(events);
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.next() => event,
        };
        match event {
            None => return,
            Some(Ok(event)) => apply(event),
            Some(Err(err)) => tracing::warn!(%err, "Kubernetes watch failed; retrying with backoff"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;
    use crate::policy::LayerName;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn respond(send: tower_test::mock::SendResponse<Response<Body>>, body: Vec<u8>) {
        send.send_response(Response::builder().status(200).body(Body::from(body)).unwrap());
    }

    /// The next request of the watcher, with its path and query.
    async fn next(handle: &mut Handle) -> (String, String, tower_test::mock::SendResponse<Response<Body>>) {
        let (request, send) = handle.next_request().await.expect("the watcher calls the API server");
        assert_eq!(request.method(), http::Method::GET);
        let uri = request.uri();
        (uri.path().to_owned(), uri.query().unwrap_or_default().to_owned(), send)
    }

    fn route(name: &str, project: Option<&str>, policy: Value) -> Value {
        let mut spec = json!({ "policy": policy });
        if let Some(project) = project {
            spec["project"] = json!(project);
        }
        json!({
            "apiVersion": "meshgate.io/v1alpha1",
            "kind": "ModelRoute",
            "metadata": { "name": name, "namespace": "mesh", "resourceVersion": "1" },
            "spec": spec,
        })
    }

    fn watch_lines(events: &[(&str, Value)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, object) in events {
            body.extend(serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap());
            body.push(b'\n');
        }
        body
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never happened: {what}");
    }

    #[tokio::test]
    async fn model_routes_are_listed_then_watched_into_the_policy_store() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "mesh");
        let store = Arc::new(PolicyStore::new(RoutePolicy::default()));
        let shutdown = Shutdown::new();
        let task = tokio::spawn(watch_model_routes(client, Some("mesh".into()), store.clone(), shutdown.clone()));

        let (path, query, send) = next(&mut handle).await;
        assert_eq!(path, "/apis/meshgate.io/v1alpha1/namespaces/mesh/modelroutes");
        assert!(!query.contains("watch=true"), "a list comes first: {query}");
        let list = json!({
            "apiVersion": "meshgate.io/v1alpha1",
            "kind": "ModelRouteList",
            "metadata": { "resourceVersion": "10" },
            "items": [
                route("everyone", None, json!({ "max_layer": "l2" })),
                route("team-a", Some("a"), json!({ "default_layer": "l0", "race": true })),
                // default above max: refused, the others still apply.
                route("broken", Some("b"), json!({ "default_layer": "l3", "max_layer": "l1" })),
            ],
        });
        respond(send, serde_json::to_vec(&list).unwrap());

        let (_, query, send) = next(&mut handle).await;
        assert!(query.contains("watch=true") && query.contains("resourceVersion=10"), "{query}");
        eventually("the listed routes are in force", || store.load().kube.len() == 2).await;
        let a = store.load().resolve("a");
        assert_eq!(a.policy.max_layer, Some(LayerName::L2));
        assert_eq!(a.policy.default_layer, Some(LayerName::L0));
        assert!(a.policy.race());
        assert_eq!(a.label, "default(config) + default(kube:mesh/everyone) + project:a(kube:mesh/team-a)");
        assert_eq!(store.load().resolve("b").policy.max_layer, Some(LayerName::L2), "the broken route is ignored");

        let mut changed = route("team-a", Some("a"), json!({ "max_layer": "l1" }));
        changed["metadata"]["resourceVersion"] = json!("11");
        let mut deleted = route("everyone", None, json!({}));
        deleted["metadata"]["resourceVersion"] = json!("12");
        respond(send, watch_lines(&[("MODIFIED", changed), ("DELETED", deleted)]));
        eventually("the watched changes are in force", || store.load().kube.len() == 1).await;
        let a = store.load().resolve("a");
        assert_eq!(a.policy.max_layer, Some(LayerName::L1));
        assert_eq!(a.policy.default_layer, None, "a modified route replaces the old version whole");
        assert_eq!(a.label, "default(config) + project:a(kube:mesh/team-a)");

        // The watch ended: the watcher resumes from the last version it saw.
        let (_, query, _send) = next(&mut handle).await;
        assert!(query.contains("watch=true") && query.contains("resourceVersion=12"), "{query}");
        shutdown.trigger();
        task.await.unwrap();
    }

    fn slice(name: &str, ready: &[Option<bool>]) -> Value {
        let endpoints: Vec<Value> = ready
            .iter()
            .enumerate()
            .map(|(i, ready)| {
                let mut endpoint = json!({ "addresses": [format!("10.0.0.{i}")] });
                if let Some(ready) = ready {
                    endpoint["conditions"] = json!({ "ready": ready });
                }
                endpoint
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "mesh",
                "resourceVersion": "5",
                "labels": { "kubernetes.io/service-name": "inference" },
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
        })
    }

    #[tokio::test]
    async fn endpoint_slices_count_ready_inference_replicas() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "mesh");
        let replicas = Arc::new(Replicas::default());
        assert_eq!(replicas.get(), None, "unknown before the first list");
        let shutdown = Shutdown::new();
        let task = tokio::spawn(watch_inference_endpoints(
            client,
            "mesh".into(),
            "inference".into(),
            replicas.clone(),
            shutdown.clone(),
        ));

        let (path, query, send) = next(&mut handle).await;
        assert_eq!(path, "/apis/discovery.k8s.io/v1/namespaces/mesh/endpointslices");
        assert!(query.contains("labelSelector=kubernetes.io%2Fservice-name%3Dinference"), "{query}");
        let list = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSliceList",
            "metadata": { "resourceVersion": "20" },
            // Unset readiness counts as ready; a not-ready endpoint does not.
            "items": [slice("inference-a", &[Some(true), None, Some(false)]), slice("inference-b", &[Some(true)])],
        });
        respond(send, serde_json::to_vec(&list).unwrap());
        let (_, query, send) = next(&mut handle).await;
        assert!(query.contains("watch=true") && query.contains("resourceVersion=20"), "{query}");
        eventually("three ready replicas", || replicas.get() == Some(3)).await;

        let mut gone = slice("inference-a", &[]);
        gone["metadata"]["resourceVersion"] = json!("21");
        let mut scaled = slice("inference-b", &[Some(false)]);
        scaled["metadata"]["resourceVersion"] = json!("22");
        respond(send, watch_lines(&[("DELETED", gone), ("MODIFIED", scaled)]));
        eventually("no ready replica", || replicas.get() == Some(0)).await;
        shutdown.trigger();
        task.await.unwrap();
    }
}
