//! The decision: from a request's features, the project's policy, the catalog and the live
//! state to an ordered, explained plan. Pure but for the half-open probe it may hand out.

use std::collections::HashSet;
use std::time::Instant;

use meshgate_proto::common::v1::{Layer, TargetKind};
use meshgate_proto::router::v1::{PlanReuse, PlannedTarget, Rejected, RoutePlan, StepRole};
use rand::Rng;

use crate::error::Error;
use crate::health::{BreakerState, HealthBook, Load};
use crate::policy::{Resolved, layer_name};
use crate::request::Features;
use crate::targets::{Entry, Targets};

/// Everything one decision reads.
pub struct Inputs<'a> {
    pub targets: &'a Targets,
    pub policy: &'a Resolved,
    pub features: &'a Features,
    pub health: &'a HealthBook,
    /// Ready inference replicas when Kubernetes tells (`None`: unknown, assume serving).
    pub local_replicas: Option<u32>,
    pub now: Instant,
}

/// Estimated cost of a request at a target's prices (every prompt token uncached),
/// micro-dollars, rounded up.
pub fn estimated_cost_micros(entry: &Entry, prompt_tokens: i64, max_tokens: i64) -> i64 {
    entry.target.cost_micros(prompt_tokens, max_tokens)
}

/// Why a target may not serve a request.
struct Ineligible {
    reason: String,
    cause: Cause,
}

/// What ruled a target out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// Its context window cannot hold the request.
    Context,
    /// Its model lacks a capability the request needs.
    Capability,
    /// The project's policy (layer, cost, task, weight, or no ready replica to serve its choice).
    Policy,
}

impl Ineligible {
    fn because(cause: Cause, reason: String) -> Option<Self> {
        Some(Self { reason, cause })
    }
}

struct Step<'a> {
    entry: &'a Entry,
    role: StepRole,
    reason: String,
}

struct Planner<'a, 'i, R> {
    inputs: &'i Inputs<'a>,
    rng: &'i mut R,
    steps: Vec<Step<'a>>,
    used: HashSet<&'a str>,
    rejected: Vec<Rejected>,
    /// The causes of the rejections in `rejected`.
    causes: Vec<Cause>,
    reasons: Vec<String>,
    /// Whether equivalent targets were ordered by draws and loads (the plan is then this
    /// request's alone).
    compared: bool,
}

impl<'a, R: Rng> Planner<'a, '_, R> {
    /// Why `entry` may not serve this request, if it may not. `chosen` says the router (not the
    /// caller) picked the model, so the target must be declared for the task.
    fn ineligible(&self, entry: &Entry, chosen: bool) -> Option<Ineligible> {
        let features = self.inputs.features;
        let policy = &self.inputs.policy.policy;
        let required = features.required_context();
        let target = &entry.target;
        if let Some(missing) = entry.lacks(&features.capabilities) {
            let has: Vec<&str> = entry.profile.capabilities.iter().map(|c| c.as_str()).collect();
            let has = if has.is_empty() { "none".to_owned() } else { has.join(", ") };
            return Ineligible::because(
                Cause::Capability,
                format!("lacks capability {} (has: {has})", missing.as_str()),
            );
        }
        // An embedding input is not held to a window: a local encoder truncates it, a provider
        // refuses one too long for its model (and the prompt tokens of a batch are a sum).
        if features.kind == "chat" && target.context_window > 0 && required > target.context_window {
            let reason = format!("context window {} < {required} tokens needed", target.context_window);
            return Ineligible::because(Cause::Context, reason);
        }
        if entry.layer() > policy.max_layer() {
            return Ineligible::because(
                Cause::Policy,
                format!(
                    "layer {} above the policy's maximum {}",
                    layer_name(entry.layer()),
                    layer_name(policy.max_layer())
                ),
            );
        }
        if let Some(cap) = policy.max_cost_micros {
            let cost = estimated_cost_micros(entry, features.prompt_tokens, features.max_tokens);
            if cost > cap {
                return Ineligible::because(
                    Cause::Policy,
                    format!("estimated cost {cost} µ$ above the cap of {cap} µ$"),
                );
            }
        }
        if chosen && !entry.serves_task(features.task_name()) {
            return Ineligible::because(
                Cause::Policy,
                format!(
                    "not declared for task {} (declared: {})",
                    features.task_name(),
                    entry.profile.tasks.join(", ")
                ),
            );
        }
        if target.kind == TargetKind::Local as i32 && self.inputs.local_replicas == Some(0) {
            return Ineligible::because(Cause::Policy, "no ready inference replica".into());
        }
        if policy.weight(&target.id) == 0 {
            return Ineligible::because(Cause::Policy, "weight 0 in the policy".into());
        }
        None
    }

    fn reject(&mut self, entry: &Entry, why: Ineligible) {
        if !self.rejected.iter().any(|r| r.target_id == entry.target.id) {
            self.causes.push(why.cause);
            self.rejected.push(Rejected { target_id: entry.target.id.clone(), reason: why.reason });
        }
    }

    /// The eligible entries of `pool`, recording why the others are left out.
    fn eligible(&mut self, pool: impl IntoIterator<Item = &'a Entry>, chosen: bool) -> Vec<&'a Entry> {
        let mut out = Vec::new();
        for entry in pool {
            match self.ineligible(entry, chosen) {
                None => out.push(entry),
                Some(why) => self.reject(entry, why),
            }
        }
        out
    }

    fn push(&mut self, entry: &'a Entry, role: StepRole, reason: String) {
        if self.used.insert(entry.target.id.as_str()) {
            self.steps.push(Step { entry, role, reason });
        }
    }

    /// Adds `group` ordered by declared rank, with power-of-two-choices inside each set of
    /// equivalent targets (same layer and rank).
    fn push_balanced(&mut self, mut group: Vec<&'a Entry>, role: StepRole, why: &str) {
        group.retain(|e| !self.used.contains(e.target.id.as_str()));
        group.sort_by_key(|e| (e.layer(), e.rank));
        let mut start = 0;
        while start < group.len() {
            let key = (group[start].layer(), group[start].rank);
            let end = start + group[start..].iter().take_while(|e| (e.layer(), e.rank) == key).count();
            let class = group[start..end].to_vec();
            let size = class.len();
            for (entry, how) in self.two_choices(class) {
                let reason = if size > 1 { format!("{why}; {how}") } else { why.to_owned() };
                self.push(entry, role, reason);
            }
            start = end;
        }
    }

    /// Orders equivalent targets: repeatedly draw two (by weight), keep the less loaded one
    /// first. Ties keep the first drawn; a pair is not drawn but taken in declared order, so
    /// two unweighted, equally loaded targets keep their configured preference.
    fn two_choices(&mut self, mut class: Vec<&'a Entry>) -> Vec<(&'a Entry, String)> {
        let policy = &self.inputs.policy.policy;
        let health = |e: &Entry| self.inputs.health.load(&e.target.id, self.inputs.now);
        let mut out = Vec::with_capacity(class.len());
        self.compared |= class.len() > 1;
        while class.len() > 1 {
            let weights: Vec<u64> = class.iter().map(|e| u64::from(policy.weight(&e.target.id))).collect();
            let weighted = weights.iter().any(|w| *w != 1);
            let (first, second) = if weighted {
                let first = draw(self.rng, &weights, None);
                (first, draw(self.rng, &weights, Some(first)))
            } else if class.len() == 2 {
                (0, 1)
            } else {
                let a = self.rng.random_range(0..class.len());
                let b = (a + self.rng.random_range(1..class.len())) % class.len();
                (a, b)
            };
            let (h1, h2) = (health(class[first]), health(class[second]));
            let (l1, l2) = loads(&h1, &h2, self.inputs, class[first], class[second]);
            let winner = if l2 < l1 { second } else { first };
            let loser = if winner == first { second } else { first };
            let how = format!(
                "least loaded of {} and {} (load {:.0} vs {:.0})",
                class[winner].target.id,
                class[loser].target.id,
                l1.min(l2),
                l1.max(l2)
            );
            out.push((class.remove(winner), how));
        }
        out.extend(class.into_iter().map(|e| (e, "last of its equivalents".to_owned())));
        out
    }
}

/// Draws an index with probability proportional to its weight, skipping `except`.
fn draw<R: Rng>(rng: &mut R, weights: &[u64], except: Option<usize>) -> usize {
    let total: u64 = weights.iter().enumerate().filter(|(i, _)| Some(*i) != except).map(|(_, w)| w).sum();
    let fallback = (0..weights.len()).find(|i| Some(*i) != except).unwrap_or(0);
    if total == 0 {
        return fallback;
    }
    let mut pick = rng.random_range(0..total);
    for (i, w) in weights.iter().enumerate().filter(|(i, _)| Some(*i) != except) {
        if pick < *w {
            return i;
        }
        pick -= w;
    }
    fallback
}

/// Load of two targets for comparison: calls in flight (per ready replica for local targets)
/// times the latency, inflated by the recent error rate. Latency counts only when both have
/// samples, so an unmeasured target is neither favoured nor shunned for it.
fn loads(h1: &Load, h2: &Load, inputs: &Inputs<'_>, e1: &Entry, e2: &Entry) -> (f64, f64) {
    let both_measured = h1.measured && h2.measured;
    let load = |h: &Load, e: &Entry| {
        let replicas = match (e.target.kind == TargetKind::Local as i32, inputs.local_replicas) {
            (true, Some(n)) if n > 0 => f64::from(n),
            _ => 1.0,
        };
        let latency = if both_measured { h.ewma_latency_us.max(1.0) } else { 1.0 };
        (h.in_flight as f64 / replicas + 1.0) * latency * (1.0 + 4.0 * h.error_rate)
    };
    (load(h1, e1), load(h2, e2))
}

/// Decides the plan. `rng` drives the power-of-two-choices draws.
pub fn decide<R: Rng>(inputs: &Inputs<'_>, rng: &mut R) -> Result<RoutePlan, Error> {
    let features = inputs.features;
    let policy = &inputs.policy.policy;
    let kind = features.kind;
    let task = features.task_name();
    let mut planner = Planner {
        inputs,
        rng,
        steps: Vec::new(),
        used: HashSet::new(),
        rejected: Vec::new(),
        causes: Vec::new(),
        reasons: Vec::new(),
        compared: false,
    };
    match &features.task {
        Some(guess) => {
            let mut reason = format!("task {task} from {} (confidence {:.2})", guess.source, guess.confidence);
            if let Some(note) = &guess.note {
                reason.push_str(&format!("; {note}"));
            }
            planner.reasons.push(reason);
        }
        None => planner.reasons.push("embeddings request".into()),
    }
    planner.reasons.push(format!("policy {}", inputs.policy.label));
    if !features.capabilities.is_empty() {
        let needed: Vec<&str> = features.capabilities.iter().map(|c| c.as_str()).collect();
        planner.reasons.push(format!("needs {}", needed.join(", ")));
    }
    let rule = policy.tasks.get(task).cloned().unwrap_or_default();
    let chosen = kind == "chat" && policy.chooses(&features.model);

    if chosen {
        planner.reasons.push(format!("the router chooses the model (requested {:?})", features.model));
        let pool: Vec<&Entry> = inputs.targets.of_kind("chat").collect();
        if pool.is_empty() {
            return Err(Error::UnknownModel(features.model.clone()));
        }
        let eligible = planner.eligible(pool, true);
        for id in &rule.prefer {
            match eligible.iter().find(|e| &e.target.id == id) {
                Some(entry) => planner.push(entry, StepRole::Fallback, format!("preferred for task {task} by policy")),
                None => {
                    let why = planner.rejected.iter().find(|r| &r.target_id == id).map(|r| r.reason.clone());
                    let why = why.unwrap_or_else(|| "not a known chat target".into());
                    planner.reasons.push(format!("preferred target {id} skipped: {why}"));
                }
            }
        }
        let (start, from) = match (rule.layer, policy.default_layer) {
            (Some(layer), _) => (Some(layer.layer()), format!("task {task}'s layer")),
            (None, Some(layer)) => (Some(layer.layer()), "the default layer".to_owned()),
            (None, None) => (None, "the cheapest fitting layer".to_owned()),
        };
        let layers: Vec<Layer> = {
            let mut layers: Vec<Layer> = eligible.iter().map(|e| e.layer()).collect();
            layers.sort();
            layers.dedup();
            layers
        };
        let layer = match start {
            None => layers.first().copied(),
            Some(start) => {
                layers.iter().find(|l| **l >= start).or_else(|| layers.iter().rev().find(|l| **l < start)).copied()
            }
        };
        if let Some(layer) = layer {
            let mut why = format!("layer {} ({from})", layer_name(layer));
            if let Some(start) = start.filter(|s| *s != layer) {
                why = format!("layer {} (no eligible target in {}, {from})", layer_name(layer), layer_name(start));
            }
            let group = eligible.iter().copied().filter(|e| e.layer() == layer).collect();
            planner.push_balanced(group, StepRole::Fallback, &why);
        }
    } else {
        let pool = inputs.targets.targets_for(kind, &features.model);
        if pool.is_empty() && kind == "embeddings" && !inputs.targets.targets_for("chat", &features.model).is_empty() {
            return Err(Error::InvalidRequest(format!(
                "{} is a chat model: embeddings need an embedding model",
                features.model
            )));
        }
        if pool.is_empty() {
            return Err(Error::UnknownModel(features.model.clone()));
        }
        let eligible = planner.eligible(pool, false);
        if eligible.is_empty() && planner.rejected.iter().any(|r| r.reason.starts_with("context window")) {
            planner.reasons.push(format!(
                "no target of {} holds {} tokens",
                features.model,
                features.required_context()
            ));
        }
        planner.push_balanced(eligible, StepRole::Fallback, &format!("serves the requested model {}", features.model));
    }

    // Larger-context models, for a request its model cannot hold or whose provider says so.
    if kind == "chat" {
        let mut models: Vec<String> = if chosen { Vec::new() } else { vec![features.model.clone()] };
        for step in &planner.steps {
            if !models.contains(&step.entry.target.model) {
                models.push(step.entry.target.model.clone());
            }
        }
        for model in models {
            for larger in policy.context_window_fallbacks.get(&model).into_iter().flatten() {
                let pool = inputs.targets.targets_for("chat", larger);
                if pool.is_empty() {
                    planner.reasons.push(format!("context window fallback {larger} skipped: no target serves it"));
                    continue;
                }
                let eligible = planner.eligible(pool, false);
                planner.push_balanced(eligible, StepRole::Fallback, &format!("context window fallback of {model}"));
            }
        }
    }

    // The fallback chain: the operator's consent to serve this task with these targets.
    let chain = rule.fallback.iter().filter_map(|id| inputs.targets.find(id)).collect::<Vec<_>>();
    for entry in planner.eligible(chain, false) {
        planner.push(entry, StepRole::Fallback, format!("fallback chain of task {task}"));
    }
    for id in rule.fallback.iter().filter(|id| inputs.targets.find(id).is_none()) {
        planner.reasons.push(format!("fallback target {id} skipped: not a known target"));
    }

    if planner.steps.is_empty() {
        let detail = planner.rejected.iter().map(|r| format!("{}: {}", r.target_id, r.reason)).collect::<Vec<_>>();
        let detail = detail.join("; ");
        let causes = &planner.causes;
        return Err(if causes.contains(&Cause::Policy) {
            Error::NoEligibleTarget { detail, by_policy: true }
        } else if !causes.is_empty() && causes.iter().all(|c| *c == Cause::Context) {
            Error::ContextOverflow { detail }
        } else {
            Error::NoEligibleTarget { detail, by_policy: false }
        });
    }

    // Escalation: the next layer up, for when every lower step fails or its answer is unusable.
    let primary_layer = planner.steps[0].entry.layer();
    if kind == "chat" && policy.escalation() {
        let candidates: Vec<&Entry> = inputs.targets.of_kind("chat").filter(|e| e.layer() > primary_layer).collect();
        let candidates = planner.eligible(candidates, true);
        let next = candidates.iter().map(|e| e.layer()).min();
        match next {
            Some(next) => {
                let group = candidates.into_iter().filter(|e| e.layer() == next).collect();
                let why = format!("escalation: one layer up from {}", layer_name(primary_layer));
                planner.push_balanced(group, StepRole::Escalation, &why);
            }
            None => {
                planner.reasons.push(format!("no escalation: no eligible target above {}", layer_name(primary_layer)))
            }
        }
    }

    // Open circuits go last, as a last resort; a half-open target in the plan takes its probe.
    let steps = std::mem::take(&mut planner.steps);
    let (mut admitted, open): (Vec<Step<'_>>, Vec<Step<'_>>) =
        steps.into_iter().partition(|s| inputs.health.admit(&s.entry.target.id, inputs.now));
    let healthy = admitted.len();
    for mut step in open {
        step.role = StepRole::LastResort;
        step.reason = format!("circuit open: last resort (was: {})", step.reason);
        admitted.push(step);
    }
    let mut steps = admitted;
    steps[0].role = StepRole::Primary;
    let race = policy.race() && healthy >= 2;
    if race {
        steps[1].role = StepRole::Primary;
        planner
            .reasons
            .push(format!("fastest-first: racing {} and {}", steps[0].entry.target.id, steps[1].entry.target.id));
    } else if policy.race() {
        planner.reasons.push("fastest-first wanted but fewer than two healthy targets".into());
    }

    if features.stream && steps.len() > 1 {
        planner.reasons.push("streamed: a later step takes over only before the first byte reaches the client".into());
    }

    let count = |role: StepRole| steps.iter().filter(|s| s.role == role).count();
    let explanation = format!(
        "task {task}; {} ({}) first; {} fallback(s), {} escalation(s), {} last resort(s){}",
        steps[0].entry.target.id,
        layer_name(steps[0].entry.layer()),
        count(StepRole::Fallback),
        count(StepRole::Escalation),
        count(StepRole::LastResort),
        if race { "; racing the first two" } else { "" }
    );
    let layer = steps[0].entry.layer();
    let reuse = reusable(inputs, &planner, &steps, chosen || !policy.tasks.is_empty(), race).then(|| {
        let windows = || inputs.targets.all().map(|e| e.target.context_window).filter(|w| *w > 0);
        let required = features.required_context();
        if kind == "chat" {
            PlanReuse {
                context_above: windows().filter(|w| *w < required).max().unwrap_or(-1),
                context_up_to: windows().filter(|w| *w >= required).min().unwrap_or(i64::MAX),
                ..Default::default()
            }
        } else {
            PlanReuse { context_above: -1, context_up_to: i64::MAX, ..Default::default() }
        }
    });
    let (task_source, task_confidence) =
        features.task.as_ref().map_or(("request".to_owned(), 1.0), |t| (t.source.clone(), t.confidence));
    let targets = steps
        .into_iter()
        .map(|step| PlannedTarget {
            estimated_cost_micros: estimated_cost_micros(step.entry, features.prompt_tokens, features.max_tokens),
            target: Some(step.entry.target.clone()),
            reason: step.reason,
            role: step.role as i32,
        })
        .collect();
    Ok(RoutePlan {
        targets,
        task: task.to_owned(),
        explanation,
        race,
        task_source,
        task_confidence,
        policy: inputs.policy.label.clone(),
        layer: layer as i32,
        reasons: planner.reasons,
        rejected: planner.rejected,
        required_context: features.required_context(),
        reuse,
    })
}

/// Whether the plan's targets hold for every request with the same project, model, kind,
/// streaming and capabilities (in its context range) until the epoch changes: they did not depend
/// on the task (`by_task`: the router chose the model or the policy has task rules), on a cost cap
/// (the prompt's size), on draws or loads, on a context-window rejection (its reason names the
/// size), on racing, or on a breaker that is not closed (a half-open one reopens or closes by time
/// and probes, not only by epoch). The task itself is each request's: the reuser labels it.
fn reusable<R>(
    inputs: &Inputs<'_>,
    planner: &Planner<'_, '_, R>,
    steps: &[Step<'_>],
    by_task: bool,
    race: bool,
) -> bool {
    !by_task
        && !race
        && !planner.compared
        && inputs.policy.policy.max_cost_micros.is_none()
        && !planner.causes.contains(&Cause::Context)
        && steps.iter().all(|s| {
            s.role != StepRole::LastResort
                && inputs.health.state(&s.entry.target.id, inputs.now) == BreakerState::Closed
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use meshgate_catalog::{Capability, Catalog, ModelFacts, ProviderSpec};

    use super::*;
    use crate::health::BreakerConfig;
    use crate::policy::{PolicyFile, PolicySet};
    use crate::targets::LocalModel;
    use meshgate_catalog::task::{Task, TaskGuess};

    fn facts(layer: &str, input: i64, output: i64, context: i64, tasks: &[&str]) -> ModelFacts {
        ModelFacts {
            layer: Some(layer.into()),
            input_price_micros_per_mtok: Some(input),
            output_price_micros_per_mtok: Some(output),
            context_window: Some(context),
            tasks: tasks.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }
    }

    fn provider(name: &str, priority: i32, models: &[&str]) -> ProviderSpec {
        ProviderSpec {
            name: name.into(),
            base_url: format!("http://{name}.test/v1"),
            priority: Some(priority),
            models: models.iter().map(|m| m.to_string()).collect(),
            ..Default::default()
        }
    }

    fn build(cloud: &[ProviderSpec], local: &[LocalModel], facts: Vec<(&str, ModelFacts)>) -> Targets {
        let facts = facts.into_iter().map(|(m, f)| (m.to_owned(), f)).collect();
        let catalog = Catalog::resolve(cloud, std::iter::empty::<(String, String)>(), &facts, None).unwrap();
        Targets::build(&catalog, local)
    }

    /// L0 tiny (chat only, 2k context), L1 mini and coder (code only), L2 gpt on three
    /// providers (alt2 and std equivalent, alt behind them), L3 opus (not for chat, no vision).
    fn targets() -> Targets {
        let cloud = [
            provider("cheap", 0, &["mini", "coder"]),
            provider("std", 0, &["gpt"]),
            provider("alt2", 0, &["gpt"]),
            provider("alt", 1, &["gpt"]),
            provider("prem", 0, &["opus"]),
        ];
        let local = [
            LocalModel { name: "tiny".into(), task: "chat".into(), context_length: 2048 },
            LocalModel { name: "e".into(), task: "embeddings".into(), context_length: 512 },
        ];
        let opus = ModelFacts {
            capabilities: Some(vec![Capability::Tools, Capability::JsonSchema, Capability::Reasoning]),
            ..facts("l3", 15_000_000, 75_000_000, 200_000, &["code", "math", "reasoning", "creative"])
        };
        build(
            &cloud,
            &local,
            vec![
                ("tiny", facts("l0", 0, 0, 2048, &["chat"])),
                ("mini", facts("l1", 150_000, 600_000, 128_000, &[])),
                ("coder", facts("l1", 200_000, 800_000, 128_000, &["code"])),
                ("gpt", facts("l2", 2_500_000, 10_000_000, 128_000, &[])),
                ("opus", opus),
            ],
        )
    }

    fn features(model: &str, task: Option<Task>, prompt_tokens: i64) -> Features {
        Features {
            kind: if task.is_some() { "chat" } else { "embeddings" },
            model: model.into(),
            project: "p".into(),
            task: task.map(|task| TaskGuess { task, confidence: 0.9, source: "hint".into(), note: None }),
            prompt_tokens,
            max_tokens: 1000,
            stream: false,
            capabilities: Vec::new(),
        }
    }

    fn needing(mut features: Features, capabilities: &[Capability]) -> Features {
        features.capabilities = capabilities.to_vec();
        features
    }

    struct World {
        targets: Targets,
        health: HealthBook,
        replicas: Option<u32>,
    }

    impl World {
        fn new() -> Self {
            Self { targets: targets(), health: HealthBook::new(BreakerConfig::default()), replicas: None }
        }

        fn fail(&self, target: &str, times: usize) {
            for _ in 0..times {
                self.health.record(target, false, Duration::from_millis(1), Instant::now());
            }
        }

        fn plan(&self, policy: &str, features: &Features, seed: u64) -> Result<RoutePlan, Error> {
            let file = PolicyFile::parse(&format!("[projects.p]\n{policy}")).unwrap();
            let policy = PolicySet { file: Some(file), ..Default::default() }.resolve("p");
            let inputs = Inputs {
                targets: &self.targets,
                policy: &policy,
                features,
                health: &self.health,
                local_replicas: self.replicas,
                now: Instant::now(),
            };
            decide(&inputs, &mut StdRng::seed_from_u64(seed))
        }
    }

    fn ids(plan: &RoutePlan) -> Vec<&str> {
        plan.targets.iter().map(|t| t.target.as_ref().unwrap().id.as_str()).collect()
    }

    fn roles(plan: &RoutePlan) -> String {
        plan.targets
            .iter()
            .map(|t| match StepRole::try_from(t.role).unwrap() {
                StepRole::Primary => 'P',
                StepRole::Fallback => 'F',
                StepRole::Escalation => 'E',
                StepRole::LastResort => 'L',
                StepRole::Unspecified => '?',
            })
            .collect()
    }

    #[test]
    fn decision_table() {
        use Task::*;
        struct Case {
            name: &'static str,
            policy: &'static str,
            features: Features,
            broken: &'static [&'static str],
            expect: &'static [&'static str],
            roles: &'static str,
        }
        let long = |mut f: Features| {
            f.prompt_tokens = 3000;
            f
        };
        let streamed = |mut f: Features| {
            f.stream = true;
            f
        };
        let cases = [
            Case {
                name: "requested model: its targets by rank, equivalents in declared order, no chat target above",
                policy: "",
                features: features("gpt", Some(Chat), 10),
                broken: &[],
                expect: &["alt2/gpt", "std/gpt", "alt/gpt"],
                roles: "PFF",
            },
            Case {
                name: "requested model for code: escalation to the premium layer",
                policy: "",
                features: features("gpt", Some(Code), 10),
                broken: &[],
                expect: &["alt2/gpt", "std/gpt", "alt/gpt", "prem/opus"],
                roles: "PFFE",
            },
            Case {
                name: "auto: the cheapest fitting layer, then one layer up",
                policy: "",
                features: features("auto", Some(Chat), 10),
                broken: &[],
                expect: &["local/tiny", "cheap/mini"],
                roles: "PE",
            },
            Case {
                name: "auto: a prompt too long for the local model starts at l1",
                policy: "",
                features: long(features("auto", Some(Chat), 0)),
                broken: &[],
                expect: &["cheap/mini", "alt2/gpt", "std/gpt", "alt/gpt"],
                roles: "PEEE",
            },
            Case {
                name: "auto for code: task-only targets join, chat-only ones leave",
                policy: "",
                features: features("auto", Some(Code), 10),
                broken: &[],
                expect: &["cheap/coder", "cheap/mini", "alt2/gpt", "std/gpt", "alt/gpt"],
                roles: "PFEEE",
            },
            Case {
                name: "preferred targets of the task lead",
                policy: "[projects.p.tasks.code]\nprefer = [\"prem/opus\", \"nope/x\"]",
                features: features("auto", Some(Code), 10),
                broken: &[],
                expect: &["prem/opus", "cheap/coder", "cheap/mini"],
                roles: "PFF",
            },
            Case {
                name: "choose_model serves a named model from the cheapest layer",
                policy: "choose_model = true\nescalation = false",
                features: features("gpt", Some(Chat), 10),
                broken: &[],
                expect: &["local/tiny"],
                roles: "P",
            },
            Case {
                name: "default layer",
                policy: "default_layer = \"l2\"\nescalation = false",
                features: features("auto", Some(Chat), 10),
                broken: &[],
                expect: &["alt2/gpt", "std/gpt", "alt/gpt"],
                roles: "PFF",
            },
            Case {
                name: "a task layer without a fitting target falls to the highest below",
                policy: "[projects.p.tasks.chat]\nlayer = \"l3\"",
                features: features("auto", Some(Chat), 10),
                broken: &[],
                expect: &["alt2/gpt", "std/gpt", "alt/gpt"],
                roles: "PFF",
            },
            Case {
                name: "the maximum layer bounds escalation",
                policy: "max_layer = \"l1\"",
                features: long(features("auto", Some(Chat), 0)),
                broken: &[],
                expect: &["cheap/mini"],
                roles: "P",
            },
            Case {
                name: "the cost cap leaves dear targets out",
                policy: "max_cost_micros = 2000",
                features: long(features("auto", Some(Chat), 0)),
                broken: &[],
                expect: &["cheap/mini"],
                roles: "P",
            },
            Case {
                name: "fallback chain after the requested model",
                policy: "escalation = false\n[projects.p.tasks.chat]\nfallback = [\"std/gpt\", \"gone/x\"]",
                features: features("mini", Some(Chat), 10),
                broken: &[],
                expect: &["cheap/mini", "std/gpt"],
                roles: "PF",
            },
            Case {
                name: "open circuits go last",
                policy: "",
                features: features("gpt", Some(Chat), 10),
                broken: &["alt2/gpt"],
                expect: &["std/gpt", "alt/gpt", "alt2/gpt"],
                roles: "PFL",
            },
            Case {
                name: "an open requested model makes way for the escalation",
                policy: "",
                features: features("mini", Some(Chat), 10),
                broken: &["cheap/mini"],
                expect: &["alt2/gpt", "std/gpt", "alt/gpt", "cheap/mini"],
                roles: "PEEL",
            },
            Case {
                name: "race: the first two are both primaries",
                policy: "race = true",
                features: features("gpt", Some(Chat), 10),
                broken: &[],
                expect: &["alt2/gpt", "std/gpt", "alt/gpt"],
                roles: "PPF",
            },
            Case {
                name: "weight 0 takes a target out",
                policy: "weights = { \"alt2/gpt\" = 0 }",
                features: features("gpt", Some(Chat), 10),
                broken: &[],
                expect: &["std/gpt", "alt/gpt"],
                roles: "PF",
            },
            Case {
                name: "a streamed request gets the same steps (the gateway switches only before the first byte)",
                policy: "",
                features: streamed(features("auto", Some(Chat), 10)),
                broken: &[],
                expect: &["local/tiny", "cheap/mini"],
                roles: "PE",
            },
            Case {
                name: "a long streamed request for math: no local model, escalation only to the next layer",
                policy: "",
                features: streamed(long(features("auto", Some(Math), 0))),
                broken: &[],
                expect: &["cheap/mini", "alt2/gpt", "std/gpt", "alt/gpt"],
                roles: "PEEE",
            },
            Case {
                name: "tools: the local model cannot call them, so auto starts at l1",
                policy: "",
                features: needing(features("auto", Some(Chat), 10), &[Capability::Tools]),
                broken: &[],
                expect: &["cheap/mini", "alt2/gpt", "std/gpt", "alt/gpt"],
                roles: "PEEE",
            },
            Case {
                name: "tools and a JSON schema: the premium escalation has both",
                policy: "",
                features: needing(features("gpt", Some(Code), 10), &[Capability::Tools, Capability::JsonSchema]),
                broken: &[],
                expect: &["alt2/gpt", "std/gpt", "alt/gpt", "prem/opus"],
                roles: "PFFE",
            },
            Case {
                name: "a reasoning effort: the local model leaves, undescribed cloud models stay",
                policy: "",
                features: needing(features("auto", Some(Chat), 10), &[Capability::Reasoning]),
                broken: &[],
                expect: &["cheap/mini", "alt2/gpt", "std/gpt", "alt/gpt"],
                roles: "PEEE",
            },
            Case {
                name: "an image: the premium model without vision is no escalation",
                policy: "",
                features: needing(features("gpt", Some(Code), 10), &[Capability::Vision]),
                broken: &[],
                expect: &["alt2/gpt", "std/gpt", "alt/gpt"],
                roles: "PFF",
            },
            Case {
                name: "embeddings have no task and no escalation",
                policy: "",
                features: features("e", None, 10),
                broken: &[],
                expect: &["local/e"],
                roles: "P",
            },
            Case {
                name: "embedding inputs are not held to a context window",
                policy: "",
                features: features("e", None, 100_000),
                broken: &[],
                expect: &["local/e"],
                roles: "P",
            },
        ];
        for case in cases {
            let world = World::new();
            for target in case.broken {
                world.fail(target, 5);
            }
            let plan = world.plan(case.policy, &case.features, 7).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!(ids(&plan), case.expect, "{}: {:?}", case.name, plan.reasons);
            assert_eq!(roles(&plan), case.roles, "{}", case.name);
            assert!(plan.targets.iter().all(|t| !t.reason.is_empty()), "{}: every step says why", case.name);
            assert_eq!(plan.task, case.features.task_name(), "{}", case.name);
            assert_eq!(plan.layer, plan.targets[0].target.as_ref().unwrap().layer, "{}", case.name);
        }
    }

    #[test]
    fn streamed_plans_say_when_a_later_step_may_take_over() {
        let world = World::new();
        let mut request = features("auto", Some(Task::Chat), 10);
        let said = |plan: &RoutePlan| plan.reasons.iter().any(|r| r.starts_with("streamed: a later step takes over"));
        assert!(!said(&world.plan("", &request, 1).unwrap()));
        request.stream = true;
        assert!(said(&world.plan("", &request, 1).unwrap()));
        assert!(!said(&world.plan("escalation = false", &request, 1).unwrap()), "a single step has nothing to say");
    }

    #[test]
    fn refusals_say_why() {
        let world = World::new();
        let unknown = world.plan("", &features("nope", Some(Task::Chat), 10), 1);
        assert!(matches!(unknown, Err(Error::UnknownModel(_))));
        let too_long = world.plan("", &features("tiny", Some(Task::Chat), 5000), 1).unwrap_err();
        assert_eq!(too_long.code(), meshgate_runtime::ErrorCode::ContextLengthExceeded);
        assert!(too_long.to_string().contains("local/tiny: context window 2048 < 6000 tokens needed"), "{too_long}");
        let capped = world.plan("max_layer = \"l1\"", &features("gpt", Some(Task::Chat), 10), 1).unwrap_err();
        assert_eq!(capped.code(), meshgate_runtime::ErrorCode::PolicyViolation);
        assert!(capped.to_string().contains("layer l2 above the policy's maximum l1"), "{capped}");
    }

    #[test]
    fn a_model_without_a_needed_capability_is_refused_as_a_bad_request() {
        let world = World::new();
        let image = needing(features("opus", Some(Task::Code), 10), &[Capability::Vision]);
        let err = world.plan("", &image, 1).unwrap_err();
        assert_eq!(err.code(), meshgate_runtime::ErrorCode::InvalidRequest, "{err}");
        assert!(
            err.to_string().contains("prem/opus: lacks capability vision (has: tools, json_schema, reasoning)"),
            "{err}"
        );
        let tools = needing(features("tiny", Some(Task::Chat), 10), &[Capability::Tools]);
        let err = world.plan("", &tools, 1).unwrap_err();
        assert!(err.to_string().contains("local/tiny: lacks capability tools (has: none)"), "{err}");
        let plan = world.plan("", &needing(features("auto", Some(Task::Chat), 10), &[Capability::Tools]), 1).unwrap();
        assert!(plan.reasons.iter().any(|r| r == "needs tools"), "{:?}", plan.reasons);
        let tiny = plan.rejected.iter().find(|r| r.target_id == "local/tiny").unwrap();
        assert_eq!(tiny.reason, "lacks capability tools (has: none)");
    }

    #[test]
    fn context_window_fallbacks_follow_the_model_and_serve_what_it_cannot_hold() {
        let mut world = World::new();
        let cloud = [provider("p", 0, &["small"]), provider("q", 0, &["big"]), provider("r", 0, &["huge"])];
        world.targets = build(
            &cloud,
            &[],
            vec![
                ("small", facts("l1", 1, 1, 4096, &[])),
                ("big", facts("l2", 2, 2, 128_000, &[])),
                ("huge", facts("l2", 3, 3, 1_000_000, &[])),
            ],
        );
        let policy = "escalation = false\ncontext_window_fallbacks = { small = [\"big\", \"gone\"] }";

        let fits = world.plan(policy, &features("small", Some(Task::Chat), 100), 1).unwrap();
        assert_eq!((ids(&fits), roles(&fits)), (vec!["p/small", "q/big"], "PF".to_owned()));
        assert_eq!(fits.targets[1].reason, "context window fallback of small");
        assert!(fits.reasons.iter().any(|r| r == "context window fallback gone skipped: no target serves it"));

        let long = world.plan(policy, &features("small", Some(Task::Chat), 5000), 1).unwrap();
        assert_eq!((ids(&long), roles(&long)), (vec!["q/big"], "P".to_owned()));
        assert!(long.reasons.iter().any(|r| r == "no target of small holds 6000 tokens"), "{:?}", long.reasons);
        assert_eq!(long.rejected[0].reason, "context window 4096 < 6000 tokens needed");

        let too_long = world.plan(policy, &features("small", Some(Task::Chat), 200_000), 1).unwrap_err();
        assert_eq!(too_long.code(), meshgate_runtime::ErrorCode::ContextLengthExceeded, "{too_long}");
        assert!(too_long.to_string().contains("q/big: context window 128000 < 201000"), "{too_long}");

        let without = world.plan("escalation = false", &features("small", Some(Task::Chat), 5000), 1);
        assert!(without.is_err(), "no fallbacks configured: nothing holds the request");
        let embeddings = world.plan(policy, &features("small", None, 100), 1).unwrap_err();
        assert!(matches!(embeddings, Error::InvalidRequest(_)), "a chat model embeds nothing: {embeddings}");
        assert!(embeddings.to_string().contains("small is a chat model"), "{embeddings}");
    }

    #[test]
    fn reasons_and_rejections_explain_the_plan() {
        let world = World::new();
        let policy = "max_cost_micros = 2000\n[projects.p.tasks.chat]\nprefer = [\"std/gpt\"]";
        let plan = world.plan(policy, &features("auto", Some(Task::Chat), 3000), 1).unwrap();
        assert_eq!(plan.task_source, "hint");
        assert_eq!(plan.policy, "default(config) + project:p(file)");
        assert_eq!(plan.required_context, 4000);
        assert!(plan.reasons[0].starts_with("task chat from hint"), "{:?}", plan.reasons);
        assert!(
            plan.reasons.iter().any(|r| r.starts_with("preferred target std/gpt skipped: estimated cost 17500 µ$"))
        );
        let rejected: BTreeMap<&str, &str> =
            plan.rejected.iter().map(|r| (r.target_id.as_str(), r.reason.as_str())).collect();
        assert_eq!(rejected["local/tiny"], "context window 2048 < 4000 tokens needed");
        assert_eq!(rejected["cheap/coder"], "not declared for task chat (declared: code)");
        assert_eq!(plan.targets[0].estimated_cost_micros, 1050, "3000 × 0.15 + 1000 × 0.60");
        assert!(plan.explanation.starts_with("task chat; cheap/mini (l1) first"), "{}", plan.explanation);
    }

    #[test]
    fn no_ready_replica_takes_local_targets_out() {
        let mut world = World::new();
        world.replicas = Some(0);
        let plan = world.plan("", &features("auto", Some(Task::Chat), 10), 1).unwrap();
        assert_eq!(ids(&plan)[0], "cheap/mini");
        let tiny = plan.rejected.iter().find(|r| r.target_id == "local/tiny").unwrap();
        assert_eq!(tiny.reason, "no ready inference replica");
    }

    #[test]
    fn two_choices_prefer_fewer_calls_in_flight_then_lower_latency() {
        let world = World::new();
        let now = Instant::now();
        world.health.start("alt2/gpt", now);
        let plan = world.plan("", &features("gpt", Some(Task::Chat), 10), 1).unwrap();
        assert_eq!(ids(&plan)[..2], ["std/gpt", "alt2/gpt"]);
        assert!(plan.targets[0].reason.contains("least loaded of std/gpt and alt2/gpt"), "{}", plan.targets[0].reason);

        let world = World::new();
        world.health.record("alt2/gpt", true, Duration::from_millis(900), now);
        world.health.record("std/gpt", true, Duration::from_millis(100), now);
        assert_eq!(ids(&world.plan("", &features("gpt", Some(Task::Chat), 10), 1).unwrap())[0], "std/gpt");
    }

    #[test]
    fn weights_share_the_primary_among_equivalents() {
        let world = World::new();
        let features = features("gpt", Some(Task::Chat), 10);
        let policy = "weights = { \"alt2/gpt\" = 3, \"std/gpt\" = 1 }";
        let mut rng = StdRng::seed_from_u64(42);
        let file = PolicyFile::parse(&format!("[projects.p]\n{policy}")).unwrap();
        let resolved = PolicySet { file: Some(file), ..Default::default() }.resolve("p");
        let inputs = Inputs {
            targets: &world.targets,
            policy: &resolved,
            features: &features,
            health: &world.health,
            local_replicas: None,
            now: Instant::now(),
        };
        let draws = 4000;
        let alt2 = (0..draws)
            .filter(|_| decide(&inputs, &mut rng).unwrap().targets[0].target.as_ref().unwrap().id == "alt2/gpt")
            .count();
        let share = alt2 as f64 / draws as f64;
        assert!((0.70..0.80).contains(&share), "alt2 led {share:.3} of plans; weight 3:1 means 0.75");
    }

    #[test]
    fn more_than_two_equivalents_all_get_traffic() {
        let mut world = World::new();
        let cloud = [provider("a", 0, &["m"]), provider("b", 0, &["m"]), provider("c", 0, &["m"])];
        world.targets = build(&cloud, &[], Vec::new());
        let features = features("m", Some(Task::Chat), 10);
        let mut leaders = BTreeMap::new();
        for seed in 0..300 {
            let plan = world.plan("", &features, seed).unwrap();
            assert_eq!(plan.targets.len(), 3);
            *leaders.entry(ids(&plan)[0].to_owned()).or_insert(0) += 1;
        }
        assert_eq!(leaders.len(), 3, "{leaders:?}");
        assert!(leaders.values().all(|n| *n >= 50), "{leaders:?}");
    }

    #[test]
    fn only_plans_that_depend_on_nothing_but_the_request_s_shape_are_reusable() {
        let world = World::new();
        let chat = |model: &str| features(model, Some(Task::Chat), 500);
        let plan = world.plan("escalation = false", &chat("mini"), 1).unwrap();
        let reuse = plan.reuse.expect("one target per step, closed breakers: reusable");
        // 1,500 tokens needed: above the embedding model's 512 and up to tiny's 2,048.
        assert_eq!((reuse.context_above, reuse.context_up_to), (512, 2_048));
        let embeddings = world.plan("", &features("e", None, 10), 1).unwrap().reuse.unwrap();
        assert_eq!((embeddings.context_above, embeddings.context_up_to), (-1, i64::MAX), "embeddings have no window");

        let not_reusable = |policy: &str, features: &Features| world.plan(policy, features, 1).unwrap().reuse.is_none();
        assert!(not_reusable("", &chat("mini")), "escalation to l2 compares std and alt2 by load");
        assert!(not_reusable("escalation = false", &chat("gpt")), "equivalent targets compared by load");
        assert!(not_reusable("escalation = false", &chat("auto")), "the router chose the model by task");
        assert!(not_reusable("escalation = false\nmax_cost_micros = 1000000000", &chat("mini")), "a cost cap");
        let rules = "escalation = false\n[projects.p.tasks.code]\nfallback = [\"cheap/coder\"]";
        assert!(not_reusable(rules, &chat("mini")), "task rules");
        let too_big = features("tiny", Some(Task::Chat), 1_500);
        assert!(world.plan("escalation = false", &too_big, 1).is_err(), "tiny cannot hold 2,500 tokens");
        world.fail("cheap/mini", 10);
        assert!(not_reusable("escalation = false", &chat("mini")), "an open breaker");
    }
}
