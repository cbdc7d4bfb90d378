//! Which caller may call which RPC: the table derived from the calls the services' code makes,
//! plus the callers a deployment adds (`[mesh] extra_callers`).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::SecurityError;
use super::config::is_valid_identity;
use super::tls::Peer;

/// Who may call an RPC.
#[derive(Debug, Clone, Copy)]
enum Callers {
    /// Anyone, certificate or not: the public edge (API keys authenticate its callers).
    Anyone,
    /// Any identity of the mesh.
    AnyIdentity,
    /// These identities only.
    Only(&'static [&'static str]),
}

const GATEWAY: &[&str] = &["gateway"];
const NOBODY: &[&str] = &[];

/// Every RPC the services serve. Methods absent from the table (and unknown paths) are
/// refused to everyone; the test below keeps the table complete.
const TABLE: &[(&str, Callers)] = &[
    ("/meshgate.gateway.v1.Gateway/Chat", Callers::Anyone),
    ("/meshgate.gateway.v1.Gateway/Embed", Callers::Anyone),
    ("/meshgate.gateway.v1.Gateway/ListModels", Callers::Anyone),
    ("/grpc.health.v1.Health/Check", Callers::AnyIdentity),
    ("/grpc.health.v1.Health/Watch", Callers::AnyIdentity),
    // Served only with `[mesh] reflection = true`.
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Callers::AnyIdentity),
    // The gateway reserves, settles and reads budgets; the sync service charges delivered jobs
    // and settles the reservations of queued ones.
    ("/meshgate.quota.v1.Quota/Reserve", Callers::Only(GATEWAY)),
    ("/meshgate.quota.v1.Quota/Commit", Callers::Only(&["gateway", "sync"])),
    ("/meshgate.quota.v1.Quota/Release", Callers::Only(&["gateway", "sync"])),
    ("/meshgate.quota.v1.Quota/Status", Callers::Only(GATEWAY)),
    ("/meshgate.quota.v1.Quota/SetLimits", Callers::Only(GATEWAY)),
    ("/meshgate.quota.v1.Quota/Charge", Callers::Only(&["gateway", "sync"])),
    ("/meshgate.quota.v1.Quota/Lease", Callers::Only(GATEWAY)),
    ("/meshgate.inference.v1.Inference/Generate", Callers::Only(GATEWAY)),
    ("/meshgate.inference.v1.Inference/Embed", Callers::Only(GATEWAY)),
    // The gateway's injection classifier, the router's task classifier.
    ("/meshgate.inference.v1.Inference/Classify", Callers::Only(&["gateway", "router"])),
    ("/meshgate.inference.v1.Inference/ListModels", Callers::Only(&["gateway", "router"])),
    ("/meshgate.inference.v1.Inference/Load", Callers::Only(NOBODY)),
    ("/meshgate.router.v1.Router/Decide", Callers::Only(GATEWAY)),
    ("/meshgate.router.v1.Router/ReportOutcomes", Callers::Only(GATEWAY)),
    ("/meshgate.router.v1.Router/ListTargets", Callers::Only(GATEWAY)),
    ("/meshgate.router.v1.Router/WatchRouting", Callers::Only(GATEWAY)),
    ("/meshgate.router.v1.Router/Route", Callers::Only(NOBODY)),
    ("/meshgate.router.v1.Router/ReportOutcome", Callers::Only(NOBODY)),
    ("/meshgate.sync.v1.Sync/Complete", Callers::Only(GATEWAY)),
    ("/meshgate.sync.v1.Sync/Embed", Callers::Only(GATEWAY)),
    ("/meshgate.sync.v1.Sync/Enqueue", Callers::Only(GATEWAY)),
    ("/meshgate.sync.v1.Sync/GetJob", Callers::Only(GATEWAY)),
    ("/meshgate.sync.v1.Sync/ListJobs", Callers::Only(GATEWAY)),
    ("/meshgate.sync.v1.Sync/RetryJob", Callers::Only(GATEWAY)),
    ("/meshgate.sync.v1.Sync/Uplink", Callers::Only(GATEWAY)),
    ("/meshgate.analytics.v1.Analytics/Record", Callers::Only(GATEWAY)),
    ("/meshgate.analytics.v1.Analytics/Query", Callers::Only(GATEWAY)),
    ("/meshgate.analytics.v1.Analytics/TopExpensive", Callers::Only(GATEWAY)),
    ("/meshgate.analytics.v1.Analytics/ErrorRates", Callers::Only(GATEWAY)),
    ("/meshgate.analytics.v1.Analytics/Latency", Callers::Only(GATEWAY)),
    ("/meshgate.analytics.v1.Analytics/GetTrace", Callers::Only(GATEWAY)),
];

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Unauthenticated,
    PermissionDenied,
}

/// The table with a deployment's extra callers folded in.
#[derive(Debug)]
pub(crate) struct AccessPolicy {
    rules: HashMap<&'static str, Rule>,
}

#[derive(Debug)]
struct Rule {
    anyone: bool,
    any_identity: bool,
    callers: HashSet<String>,
}

impl AccessPolicy {
    /// The table plus `extra`: identity → RPCs (`Service.Method` or `/package.Service/Method`).
    pub(crate) fn new(extra: &BTreeMap<String, Vec<String>>) -> Result<Self, SecurityError> {
        let mut rules: HashMap<&'static str, Rule> = TABLE
            .iter()
            .map(|(path, callers)| {
                let rule = match callers {
                    Callers::Anyone => Rule { anyone: true, any_identity: true, callers: HashSet::new() },
                    Callers::AnyIdentity => Rule { anyone: false, any_identity: true, callers: HashSet::new() },
                    Callers::Only(names) => Rule {
                        anyone: false,
                        any_identity: false,
                        callers: names.iter().map(|n| (*n).to_owned()).collect(),
                    },
                };
                (*path, rule)
            })
            .collect();
        for (identity, rpcs) in extra {
            if !is_valid_identity(identity) {
                return Err(SecurityError::Config(format!("extra_callers: {identity:?} is not a valid identity")));
            }
            for rpc in rpcs {
                let path = resolve_rpc(rpc)
                    .ok_or_else(|| SecurityError::Config(format!("extra_callers.{identity}: unknown RPC {rpc:?}")))?;
                let rule =
                    rules.entry(path).or_insert(Rule { anyone: false, any_identity: false, callers: HashSet::new() });
                rule.callers.insert(identity.clone());
            }
        }
        Ok(Self { rules })
    }

    /// Whether `caller` may call `path`.
    pub(crate) fn check(&self, path: &str, caller: &Peer) -> Result<(), Refusal> {
        let rule = self.rules.get(path);
        if rule.is_some_and(|rule| rule.anyone) {
            return Ok(());
        }
        let Peer::Verified(name) = caller else { return Err(Refusal::Unauthenticated) };
        match rule {
            Some(rule) if rule.any_identity || rule.callers.contains(&**name) => Ok(()),
            _ => Err(Refusal::PermissionDenied),
        }
    }
}

/// The path of an RPC named `Service.Method` (case-insensitively) or `/package.Service/Method`.
pub(crate) fn resolve_rpc(name: &str) -> Option<&'static str> {
    let known = crate::rpc_methods::known_methods();
    if let Some(path) = known.get(name) {
        return Some(path);
    }
    let (service, method) = name.split_once('.')?;
    let mut matches = known.iter().filter(|path| {
        let Some((qualified, found_method)) = path.trim_start_matches('/').rsplit_once('/') else { return false };
        let found_service = qualified.rsplit('.').next().unwrap_or_default();
        found_service.eq_ignore_ascii_case(service) && found_method.eq_ignore_ascii_case(method)
    });
    let path = matches.next()?;
    matches.next().is_none().then_some(*path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(name: &str) -> Peer {
        Peer::Verified(name.into())
    }

    #[test]
    fn the_table_names_every_rpc_served_and_nothing_else() {
        let known = crate::rpc_methods::known_methods();
        let listed: HashSet<&str> = TABLE.iter().map(|(path, _)| *path).collect();
        assert_eq!(listed.len(), TABLE.len(), "no RPC is listed twice");
        for path in known {
            assert!(listed.contains(path), "{path} has no rule: add who calls it to the table");
        }
        for path in &listed {
            assert!(known.contains(path), "{path} is not an RPC anyone serves");
        }
    }

    #[test]
    fn callers_get_exactly_the_calls_their_code_makes() {
        let policy = AccessPolicy::new(&BTreeMap::new()).unwrap();
        let quota = |method: &str| format!("/meshgate.quota.v1.Quota/{method}");
        for method in ["Reserve", "Commit", "Release", "Status", "SetLimits", "Charge"] {
            assert_eq!(policy.check(&quota(method), &verified("gateway")), Ok(()), "{method}");
        }
        assert_eq!(policy.check(&quota("Charge"), &verified("sync")), Ok(()));
        for method in ["Reserve", "Status", "SetLimits"] {
            assert_eq!(policy.check(&quota(method), &verified("sync")), Err(Refusal::PermissionDenied), "{method}");
        }
        let load = "/meshgate.inference.v1.Inference/Load";
        for caller in ["gateway", "router", "sync", "operator"] {
            assert_eq!(policy.check(load, &verified(caller)), Err(Refusal::PermissionDenied), "{caller}");
        }
        assert_eq!(policy.check("/meshgate.inference.v1.Inference/Classify", &verified("router")), Ok(()));
        assert_eq!(policy.check("/grpc.health.v1.Health/Check", &verified("analytics")), Ok(()));
        assert_eq!(policy.check("/grpc.health.v1.Health/Check", &Peer::Anonymous), Err(Refusal::Unauthenticated));
        let untrusted = Peer::Untrusted("another CA".into());
        assert_eq!(policy.check(&quota("Charge"), &untrusted), Err(Refusal::Unauthenticated));
        assert_eq!(policy.check("/meshgate.gateway.v1.Gateway/Chat", &Peer::Anonymous), Ok(()), "the public edge");
        assert_eq!(policy.check("/made.Up/Call", &verified("gateway")), Err(Refusal::PermissionDenied));
        assert_eq!(policy.check("/made.Up/Call", &Peer::Anonymous), Err(Refusal::Unauthenticated));
    }

    #[test]
    fn extra_callers_extend_the_table_by_rpc_name() {
        let extra =
            BTreeMap::from([("operator".to_owned(), vec!["Inference.Load".to_owned(), "quota.status".to_owned()])]);
        let policy = AccessPolicy::new(&extra).unwrap();
        assert_eq!(policy.check("/meshgate.inference.v1.Inference/Load", &verified("operator")), Ok(()));
        assert_eq!(policy.check("/meshgate.quota.v1.Quota/Status", &verified("operator")), Ok(()));
        assert_eq!(
            policy.check("/meshgate.quota.v1.Quota/Reserve", &verified("operator")),
            Err(Refusal::PermissionDenied)
        );
        assert_eq!(policy.check("/meshgate.quota.v1.Quota/Status", &verified("gateway")), Ok(()), "the table stays");

        let unknown = BTreeMap::from([("operator".to_owned(), vec!["Inference.Unload".to_owned()])]);
        assert!(AccessPolicy::new(&unknown).unwrap_err().to_string().contains("Inference.Unload"));
        let ambiguous = BTreeMap::from([("operator".to_owned(), vec!["Embed".to_owned()])]);
        assert!(AccessPolicy::new(&ambiguous).is_err());
        let bad_name = BTreeMap::from([("Op".to_owned(), vec!["Quota.Status".to_owned()])]);
        assert!(AccessPolicy::new(&bad_name).is_err());
    }

    #[test]
    fn rpc_names_resolve_to_paths() {
        assert_eq!(resolve_rpc("Inference.Load"), Some("/meshgate.inference.v1.Inference/Load"));
        assert_eq!(resolve_rpc("/meshgate.quota.v1.Quota/Charge"), Some("/meshgate.quota.v1.Quota/Charge"));
        assert_eq!(resolve_rpc("Gateway.Embed"), Some("/meshgate.gateway.v1.Gateway/Embed"));
        assert_eq!(resolve_rpc("Quota.Nothing"), None);
    }
}
