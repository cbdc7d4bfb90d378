//! The table of every RPC a meshgate service serves, read from the compiled contracts: the
//! allow-list and the message limits are checked against it, and it bounds the metrics' method
//! label.

use std::collections::HashSet;
use std::sync::LazyLock;

/// `/package.Service/Method` of every RPC served: meshgate's contracts, health and reflection.
pub(crate) fn known_methods() -> &'static HashSet<&'static str> {
    &KNOWN_METHODS
}

static KNOWN_METHODS: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    let mut methods = HashSet::from(["/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"]);
    for encoded in [meshgate_proto::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
        let Ok(set) = <prost_types::FileDescriptorSet as prost::Message>::decode(encoded) else {
            continue;
        };
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    // Built once per process from a fixed set.
                    methods.insert(&*Box::leak(path.into_boxed_str()));
                }
            }
        }
    }
    methods
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_cover_every_contract_and_nothing_else() {
        assert!(known_methods().contains("/meshgate.quota.v1.Quota/Reserve"));
        assert!(known_methods().contains("/meshgate.gateway.v1.Gateway/Chat"));
        assert!(known_methods().contains("/grpc.health.v1.Health/Check"));
        assert!(!known_methods().contains("/meshgate.quota.v1.Quota/Made-Up"));
    }
}
