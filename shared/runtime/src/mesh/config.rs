//! The `[mesh]` section: how the services of one meshgate talk to each other.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the service binaries read their certificates when `tls_dir` is unset (the Helm chart
/// mounts its Secrets there).
pub const DEFAULT_TLS_DIR: &str = "/etc/meshgate/tls";

/// The six services; each is an identity of its own (`spiffe://meshgate/<service>`).
pub const SERVICES: [&str; 6] = ["gateway", "inference", "router", "quota", "analytics", "sync"];

/// `[mesh]`, `MESHGATE_MESH__*`: read by every service binary and by `meshgate up`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `mtls` (every gRPC listener and channel) or `plaintext` (refused unless every gRPC
    /// listener binds to a loopback address).
    pub transport: Transport,
    /// `ca.crt`, `<service>.crt` and `<service>.key` (PEM). Unset: [`DEFAULT_TLS_DIR`] for the
    /// service binaries; a development PKI made once under `<data_dir>/tls` for `meshgate up`.
    pub tls_dir: Option<PathBuf>,
    /// How often the files are checked; a changed certificate is used by new connections from
    /// then on, without a restart (0: never re-read).
    pub reload_secs: u64,
    /// Serve gRPC reflection (to authenticated mesh identities).
    pub reflection: bool,
    /// Callers allowed beyond the built-in table, by identity: `operator = ["Inference.Load"]`
    /// (`Service.Method`), `MESHGATE_MESH__EXTRA_CALLERS__OPERATOR='["Inference.Load"]'`.
    pub extra_callers: BTreeMap<String, Vec<String>>,
    /// Raises or lowers the largest request message of an RPC: `"Analytics.Record" = 33554432`.
    pub max_request_bytes: BTreeMap<String, usize>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            transport: Transport::Mtls,
            tls_dir: None,
            reload_secs: 10,
            reflection: false,
            extra_callers: BTreeMap::new(),
            max_request_bytes: BTreeMap::new(),
        }
    }
}

/// How gRPC calls between services travel.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Mutual TLS: each side proves its identity with a certificate of the mesh CA.
    #[default]
    Mtls,
    /// No TLS and no authentication of network callers; loopback listeners only.
    Plaintext,
}

/// Whether `name` can be an identity: lowercase letters, digits and `-`, at most 63 bytes,
/// starting with a letter or digit (it becomes a DNS label and a metric label).
pub fn is_valid_identity(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    // figment's Jail closure returns figment's own (large) error type.
    #[allow(clippy::result_large_err)]
    fn file_and_environment_set_every_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "meshgate.toml",
                "[mesh]\ntransport = \"plaintext\"\ntls_dir = \"/tls\"\n[mesh.extra_callers]\nops = [\"Quota.Status\"]\n",
            )?;
            let config: Config = crate::config::load("mesh", Some(Path::new("meshgate.toml"))).unwrap();
            assert_eq!(config.transport, Transport::Plaintext);
            assert_eq!(config.tls_dir.as_deref(), Some(Path::new("/tls")));
            assert_eq!(config.extra_callers["ops"], ["Quota.Status"]);

            jail.set_env("MESHGATE_MESH__TRANSPORT", "mtls");
            jail.set_env("MESHGATE_MESH__RELOAD_SECS", "2");
            jail.set_env("MESHGATE_MESH__EXTRA_CALLERS__OPERATOR", "[\"Inference.Load\"]");
            jail.set_env("MESHGATE_MESH__MAX_REQUEST_BYTES", "{\"Analytics.Record\" = 1024}");
            let config: Config = crate::config::load("mesh", Some(Path::new("meshgate.toml"))).unwrap();
            assert_eq!((config.transport, config.reload_secs), (Transport::Mtls, 2));
            assert_eq!(config.extra_callers["operator"], ["Inference.Load"]);
            assert_eq!(config.max_request_bytes["Analytics.Record"], 1024);

            jail.set_env("MESHGATE_MESH__TRANSPORT", "tls");
            assert!(crate::config::load::<Config>("mesh", None).is_err(), "an unknown transport is refused");
            Ok(())
        });
    }

    #[test]
    fn identities_are_dns_labels() {
        assert!(SERVICES.iter().all(|s| is_valid_identity(s)));
        assert!(is_valid_identity("operator-2"));
        for bad in ["", "-x", "Quota", "a/b", "a.b", &"x".repeat(64)] {
            assert!(!is_valid_identity(bad), "{bad:?}");
        }
    }
}
