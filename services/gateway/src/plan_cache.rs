//! Routing plans the router marked reusable (`RoutePlan.reuse`), held so that a request like one
//! already planned waits on no router call: the router pushes its routing epoch over a watch
//! stream (`WatchRouting`) and every held plan is dropped at each new epoch, when the stream
//! breaks, when its time is up, and when a target fails here. The router stays the authority:
//! it decides which plans may be reused and for how long, and a plan is held only while the
//! stream says it is still of the epoch it was decided in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_proto::router::v1::router_client::RouterClient;
use meshgate_proto::router::v1::{RoutePlan, RouteRequest, WatchRoutingRequest};
use meshgate_runtime::{MeshChannel, Shutdown};
use parking_lot::Mutex;

/// Plans held at most; past it the held ones are dropped (a bound on memory, not a cache policy:
/// keys are projects × models × a few shapes, far fewer in practice).
const MAX_PLANS: usize = 4_096;

/// How long a broken watch stream waits before it is opened again.
const REWATCH_DELAY: Duration = Duration::from_millis(500);

/// What a reusable plan is held under: everything it may depend on but the context range.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    org: String,
    project: String,
    model: String,
    kind: String,
    stream: bool,
    capabilities: Vec<String>,
}

impl PlanKey {
    fn of(route: &RouteRequest) -> Self {
        let principal = route.principal.as_ref();
        let mut capabilities = route.capabilities.clone();
        capabilities.sort();
        capabilities.dedup();
        Self {
            org: principal.map(|p| p.org_id.clone()).unwrap_or_default(),
            project: principal.map(|p| p.project_id.clone()).unwrap_or_default(),
            model: route.model.trim().to_owned(),
            kind: route.task.clone(),
            stream: route.stream,
            capabilities,
        }
    }
}

struct Held {
    plan: Arc<RoutePlan>,
    context_above: i64,
    context_up_to: i64,
    expires: Instant,
}

#[derive(Default)]
struct Book {
    /// The router instance and epoch the watch stream last told; `None` while no stream is open.
    epoch: Option<(u64, u64)>,
    plans: HashMap<PlanKey, Held>,
}

/// The plans held by this gateway replica.
#[derive(Default)]
pub struct PlanCache {
    book: Mutex<Book>,
}

impl PlanCache {
    /// A held plan for `route` (whose `prompt_tokens` and `max_tokens` are set), if one is.
    pub fn get(&self, route: &RouteRequest) -> Option<Arc<RoutePlan>> {
        let required = if route.task == "embeddings" {
            route.prompt_tokens
        } else {
            route.prompt_tokens.saturating_add(route.max_tokens)
        };
        let book = self.book.lock();
        book.epoch?;
        let held = book.plans.get(&PlanKey::of(route))?;
        let fits = required > held.context_above && required <= held.context_up_to;
        (fits && Instant::now() < held.expires).then(|| held.plan.clone())
    }

    /// Holds `plan`, decided for `route`, if the router marked it reusable in the epoch this
    /// replica is watching.
    pub fn put(&self, route: &RouteRequest, plan: &RoutePlan) {
        let Some(reuse) = &plan.reuse else { return };
        let mut book = self.book.lock();
        if book.epoch != Some((reuse.router_instance, reuse.epoch)) {
            return;
        }
        if book.plans.len() >= MAX_PLANS {
            book.plans.clear();
        }
        let held = Held {
            plan: Arc::new(plan.clone()),
            context_above: reuse.context_above,
            context_up_to: reuse.context_up_to,
            expires: Instant::now() + Duration::from_millis(u64::from(reuse.ttl_ms)),
        };
        book.plans.insert(PlanKey::of(route), held);
    }

    /// Drops every held plan (a target failed here: the router decides again).
    pub fn forget_all(&self) {
        self.book.lock().plans.clear();
    }

    fn set_epoch(&self, epoch: Option<(u64, u64)>) {
        let mut book = self.book.lock();
        if book.epoch != epoch {
            book.epoch = epoch;
            book.plans.clear();
        }
    }

    /// Follows the router's routing epoch until `stop`; plans are held only while it does.
    pub async fn watch(self: Arc<Self>, mut router: RouterClient<MeshChannel>, stop: Shutdown) {
        loop {
            let opened = tokio::select! {
                _ = stop.cancelled() => return,
                opened = router.watch_routing(WatchRoutingRequest {}) => opened,
            };
            match opened {
                Ok(response) => {
                    let mut epochs = response.into_inner();
                    loop {
                        let next = tokio::select! {
                            _ = stop.cancelled() => return,
                            next = epochs.message() => next,
                        };
                        match next {
                            Ok(Some(epoch)) => self.set_epoch(Some((epoch.router_instance, epoch.epoch))),
                            Ok(None) => break,
                            Err(status) => {
                                tracing::debug!(%status, "routing epoch stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(status) => tracing::debug!(%status, "cannot watch the routing epoch"),
            }
            self.set_epoch(None);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(REWATCH_DELAY) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use meshgate_proto::common::v1::Principal;
    use meshgate_proto::router::v1::PlanReuse;

    use super::*;

    fn route(project: &str, prompt_tokens: i64) -> RouteRequest {
        RouteRequest {
            principal: Some(Principal { org_id: "o".into(), project_id: project.into(), ..Default::default() }),
            model: "m".into(),
            task: "chat".into(),
            prompt_tokens,
            max_tokens: 100,
            ..Default::default()
        }
    }

    fn plan(epoch: u64, ttl_ms: u32) -> RoutePlan {
        RoutePlan {
            task: "chat".into(),
            reuse: Some(PlanReuse {
                router_instance: 7,
                epoch,
                ttl_ms,
                context_above: 1_000,
                context_up_to: 8_000,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn plans_are_held_within_their_epoch_range_and_key() {
        let cache = PlanCache::default();
        cache.put(&route("p", 2_000), &plan(3, 60_000));
        assert!(cache.get(&route("p", 2_000)).is_none(), "nothing is held before the stream tells an epoch");
        cache.set_epoch(Some((7, 3)));
        cache.put(&route("p", 2_000), &plan(2, 60_000));
        assert!(cache.get(&route("p", 2_000)).is_none(), "a plan of an older epoch is not held");
        cache.put(&route("p", 2_000), &plan(3, 60_000));
        assert!(cache.get(&route("p", 5_000)).is_some());
        assert!(cache.get(&route("p", 900)).is_none(), "1,000 required tokens are not above the range's floor");
        assert!(cache.get(&route("p", 7_901)).is_none(), "8,001 required tokens exceed the range");
        assert!(cache.get(&route("q", 2_000)).is_none(), "another project has its own plans");
        let streamed = RouteRequest { stream: true, ..route("p", 2_000) };
        assert!(cache.get(&streamed).is_none());
        cache.set_epoch(Some((7, 4)));
        assert!(cache.get(&route("p", 2_000)).is_none(), "a new epoch drops every plan");
        cache.put(&route("p", 2_000), &plan(4, 60_000));
        cache.set_epoch(None);
        assert!(cache.get(&route("p", 2_000)).is_none(), "a broken stream drops every plan");
        cache.set_epoch(Some((7, 4)));
        cache.put(&route("p", 2_000), &plan(4, 0));
        assert!(cache.get(&route("p", 2_000)).is_none(), "a plan past its time is not reused");
        cache.put(&route("p", 2_000), &RoutePlan { reuse: None, ..plan(4, 60_000) });
        assert!(cache.get(&route("p", 2_000)).is_none(), "a plan not marked reusable is not held");
    }
}
