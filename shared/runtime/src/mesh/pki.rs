//! A development PKI: a mesh CA and one certificate per identity, in the layout every service
//! reads (`ca.crt`, `<identity>.crt`, `<identity>.key`). Production deployments bring their own
//! (cert-manager, or `meshgate certs` once).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::{Duration, OffsetDateTime};

use super::config::is_valid_identity;

/// The URI SAN prefix of an identity: `spiffe://meshgate/<identity>`.
pub const SPIFFE_PREFIX: &str = "spiffe://meshgate/";

/// Certificates younger than this before their end are made anew by [`ensure_dev_pki`].
const RENEW_BEFORE_DAYS: i64 = 30;

/// A certificate or key that could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0:?} is not a valid identity (lowercase letters, digits and '-', at most 63)")]
    InvalidIdentity(String),
    #[error("{0}")]
    Invalid(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_owned(), source }
}

/// Names and addresses the service certificates are valid for, besides the service's name,
/// `localhost`, 127.0.0.1 and ::1.
#[derive(Debug, Clone)]
pub struct SanOptions {
    /// Prepended to each service name (`meshgate-` for the chart's `meshgate-quota` Services).
    pub dns_prefix: String,
    /// `<prefix><service>.<domain>` for each (e.g. `meshgate.svc.cluster.local`).
    pub domains: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Validity of each identity certificate, in days.
    pub days: u32,
}

impl Default for SanOptions {
    fn default() -> Self {
        Self { dns_prefix: String::new(), domains: Vec::new(), ips: Vec::new(), days: 365 }
    }
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The mesh CA: signs identity certificates.
pub struct Authority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// A new CA, valid for ten years.
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "meshgate mesh CA");
        params.distinguished_name.push(DnType::OrganizationName, "meshgate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(Self { cert_pem: cert.pem(), key_pem: key.serialize_pem(), issuer: Issuer::new(params, key) })
    }

    /// The CA in `dir` (`ca.crt`, `ca.key`).
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_error(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_error(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Self { cert_pem, key_pem, issuer })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `identity`: CN and URI SAN `spiffe://meshgate/<identity>`, DNS SANs
    /// `<identity>`, `<prefix><identity>`, `<prefix><identity>.<domain>`, `localhost`, IP SANs
    /// 127.0.0.1, ::1 and `options.ips`; usable as server and as client.
    pub fn issue(&self, identity: &str, options: &SanOptions) -> Result<IssuedCert, PkiError> {
        if !is_valid_identity(identity) {
            return Err(PkiError::InvalidIdentity(identity.to_owned()));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, identity);
        params.distinguished_name.push(DnType::OrganizationName, "meshgate");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(i64::from(options.days.max(1)));
        let invalid = |err: rcgen::Error| PkiError::Invalid(format!("{identity}: {err}"));
        let mut sans = vec![SanType::URI(format!("{SPIFFE_PREFIX}{identity}").try_into().map_err(invalid)?)];
        let prefixed = format!("{}{identity}", options.dns_prefix);
        let mut names = vec![identity.to_owned(), prefixed.clone()];
        names.extend(options.domains.iter().map(|domain| format!("{prefixed}.{}", domain.trim_matches('.'))));
        names.push("localhost".to_owned());
        names.dedup();
        for name in names {
            sans.push(SanType::DnsName(name.try_into().map_err(invalid)?));
        }
        let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];
        ips.extend(options.ips.iter().copied().filter(|ip| !ips.contains(ip)).collect::<Vec<_>>());
        sans.extend(ips.into_iter().map(SanType::IpAddress));
        params.subject_alt_names = sans;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        write_file(&dir.join("ca.crt"), self.cert_pem.as_bytes(), false)?;
        write_file(&dir.join("ca.key"), self.key_pem.as_bytes(), true)
    }
}

/// Writes `<identity>.crt` and `<identity>.key` (mode 0600) into `dir`.
pub fn write_identity(dir: &Path, identity: &str, issued: &IssuedCert) -> Result<(), PkiError> {
    write_file(&dir.join(format!("{identity}.crt")), issued.cert_pem.as_bytes(), false)?;
    write_file(&dir.join(format!("{identity}.key")), issued.key_pem.as_bytes(), true)
}

/// Writes `contents` to `path` through a temporary file renamed into place, so a reader (a
/// reloading service) never sees half a file; `secret` files are readable by their owner only.
fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), PkiError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let staging = dir.join(format!(".{name}.{}", uuid::Uuid::new_v4().simple()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let written = options.open(&staging).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    if let Err(err) = written.and_then(|()| std::fs::rename(&staging, path)) {
        let _ = std::fs::remove_file(&staging);
        return Err(PkiError::Io { path: path.to_owned(), source: err });
    }
    Ok(())
}

/// What [`write_pki`] did with each file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PkiReport {
    pub written: Vec<PathBuf>,
    /// Files that existed and were left alone (without `force`).
    pub kept: Vec<PathBuf>,
}

/// Makes the CA (unless `dir` has one and `force` is off) and a certificate for each identity
/// into `dir`. Existing files are never replaced without `force`: a run that finds everything
/// in place writes nothing.
pub fn write_pki(dir: &Path, identities: &[String], options: &SanOptions, force: bool) -> Result<PkiReport, PkiError> {
    if let Some(bad) = identities.iter().find(|name| !is_valid_identity(name) || *name == "ca") {
        return Err(PkiError::InvalidIdentity(bad.clone()));
    }
    let mut report = PkiReport::default();
    let (ca_cert, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let ca_exists = ca_cert.exists() || ca_key.exists();
    let authority = if ca_exists && !force {
        let authority = Authority::load(dir).map_err(|err| {
            PkiError::Invalid(format!(
                "{} exists but its CA cannot sign ({err}); --force makes a new one",
                dir.display()
            ))
        })?;
        report.kept.extend([ca_cert, ca_key]);
        authority
    } else {
        let authority = Authority::generate()?;
        authority.write(dir)?;
        report.written.extend([ca_cert, ca_key]);
        authority
    };
    for identity in identities {
        let (cert, key) = (dir.join(format!("{identity}.crt")), dir.join(format!("{identity}.key")));
        if !force && (cert.exists() || key.exists()) {
            report.kept.extend([cert, key]);
            continue;
        }
        write_identity(dir, identity, &authority.issue(identity, options)?)?;
        report.written.extend([cert, key]);
    }
    Ok(report)
}

/// Makes a development PKI for `identities` under `dir` unless one is there and valid for at
/// least another 30 days. Processes racing to make it agree on one: each builds its own in a
/// staging directory and renames it into place; the losers use the winner's.
pub fn ensure_dev_pki(dir: &Path, identities: &[String], options: &SanOptions) -> Result<(), PkiError> {
    if dev_pki_is_usable(dir, identities) {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_error(parent))?;
    let staging = parent.join(format!(".tls-staging-{}", uuid::Uuid::new_v4().simple()));
    let made = write_pki(&staging, identities, options, true);
    if let Err(err) = made {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(err);
    }
    if dir.exists() {
        if dev_pki_is_usable(dir, identities) {
            let _ = std::fs::remove_dir_all(&staging);
            return Ok(());
        }
        // An incomplete or expiring development PKI: replaced whole.
        std::fs::remove_dir_all(dir).map_err(io_error(dir))?;
    }
    if let Err(err) = std::fs::rename(&staging, dir) {
        let _ = std::fs::remove_dir_all(&staging);
        if !dev_pki_is_usable(dir, identities) {
            return Err(PkiError::Io { path: dir.to_owned(), source: err });
        }
    }
    Ok(())
}

fn dev_pki_is_usable(dir: &Path, identities: &[String]) -> bool {
    let renew_after = OffsetDateTime::now_utc() + Duration::days(RENEW_BEFORE_DAYS);
    let files = std::iter::once("ca".to_owned()).chain(identities.iter().cloned());
    files.into_iter().all(|name| {
        dir.join(format!("{name}.key")).is_file()
            && std::fs::read(dir.join(format!("{name}.crt")))
                .ok()
                .and_then(|pem| not_after(&pem))
                .is_some_and(|end| end > renew_after.unix_timestamp())
    })
}

/// The end of validity (Unix seconds) of the first certificate in `pem`.
fn not_after(pem: &[u8]) -> Option<i64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_certificates_carry_every_name_and_address() {
        let authority = Authority::generate().unwrap();
        let options = SanOptions {
            dns_prefix: "mg-".into(),
            domains: vec!["meshgate.svc.cluster.local".into()],
            ips: vec!["10.0.0.7".parse().unwrap()],
            days: 30,
        };
        let issued = authority.issue("quota", &options).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
        let text: Vec<String> = sans.iter().map(|name| name.to_string()).collect();
        for expected in [
            "URI(spiffe://meshgate/quota)",
            "DNSName(quota)",
            "DNSName(mg-quota)",
            "DNSName(mg-quota.meshgate.svc.cluster.local)",
            "DNSName(localhost)",
        ] {
            assert!(text.iter().any(|t| t == expected), "{expected} in {text:?}");
        }
        let ips = sans.iter().filter(|name| matches!(name, x509_parser::extensions::GeneralName::IPAddress(_))).count();
        assert_eq!(ips, 3, "127.0.0.1, ::1 and the extra address");
        assert_eq!(cert.subject().iter_common_name().next().unwrap().as_str().unwrap(), "quota");
        assert!(authority.issue("Quota", &options).is_err());
    }

    #[test]
    fn certs_write_missing_files_only_and_replace_them_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let identities = vec!["quota".to_owned(), "sync".to_owned()];
        let first = write_pki(dir.path(), &identities, &SanOptions::default(), false).unwrap();
        assert_eq!(first.written.len(), 6);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("quota.key")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "keys are readable by their owner only");
        }
        let quota = std::fs::read(dir.path().join("quota.crt")).unwrap();

        let again = write_pki(dir.path(), &identities, &SanOptions::default(), false).unwrap();
        assert!(again.written.is_empty(), "nothing is overwritten without --force: {again:?}");
        assert_eq!(std::fs::read(dir.path().join("quota.crt")).unwrap(), quota);

        let more = write_pki(dir.path(), &["operator".to_owned()], &SanOptions::default(), false).unwrap();
        assert_eq!(more.written.len(), 2, "a new identity is signed by the existing CA");

        let forced = write_pki(dir.path(), &identities, &SanOptions::default(), true).unwrap();
        assert_eq!(forced.written.len(), 6);
        assert_ne!(std::fs::read(dir.path().join("quota.crt")).unwrap(), quota);
    }

    #[test]
    fn a_dev_pki_is_made_once_and_reused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tls");
        let identities = vec!["gateway".to_owned()];
        ensure_dev_pki(&dir, &identities, &SanOptions::default()).unwrap();
        let ca = std::fs::read(dir.join("ca.crt")).unwrap();
        ensure_dev_pki(&dir, &identities, &SanOptions::default()).unwrap();
        assert_eq!(std::fs::read(dir.join("ca.crt")).unwrap(), ca, "reused");

        std::fs::remove_file(dir.join("gateway.key")).unwrap();
        ensure_dev_pki(&dir, &identities, &SanOptions::default()).unwrap();
        assert!(dir.join("gateway.key").is_file(), "an incomplete one is made anew");
    }
}
