//! The `meshgate` binary as an operator runs it.

use std::io::Write;
use std::process::Command;

use meshgate_test_support::database_url;

fn meshgate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshgate"));
    command.env_remove("DATABASE_URL").env_remove("REDIS_URL").env_remove("MESHGATE_CONFIG");
    command
}

fn config(contents: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(contents.as_bytes()).unwrap();
    file
}

#[test]
fn check_config_accepts_a_valid_file_and_names_the_bad_key_of_another() {
    let good = config("[gateway]\nmax_body_bytes = 4096\n[quota.defaults.key]\ntokens_per_day = 5000\n");
    let output = meshgate().arg("--config").arg(good.path()).arg("check-config").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("configuration OK"));

    let bad = config("[gateway]\nmax_body_byte = 4096\n");
    let output = meshgate().arg("--config").arg(bad.path()).arg("check-config").output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("max_body_byte"));

    let output = meshgate().arg("check-config").env("MESHGATE_ROUTER__BREAKER__OPEN_MS", "soon").output().unwrap();
    assert!(!output.status.success(), "a mistyped environment override is refused");

    let edge = || {
        let mut command = meshgate();
        command.arg("check-config").env("MESHGATE_CLOUD_URL", "https://cloud.example.com");
        command
    };
    let output = edge().env_remove("MESHGATE_CLOUD_KEY").output().unwrap();
    assert!(!output.status.success(), "a cloud without a key is refused");
    assert!(String::from_utf8_lossy(&output.stderr).contains("MESHGATE_CLOUD_KEY"));
    let output = edge().env("MESHGATE_CLOUD_KEY", "mgk_edge").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn check_config_runs_the_validation_of_all_six_services() {
    let check = |vars: &[(&str, &str)]| {
        let output = meshgate().arg("check-config").envs(vars.iter().copied()).output().unwrap();
        (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    for (variable, value, named) in [
        ("MESHGATE_GATEWAY__MAX_CONCURRENT_REQUESTS", "0", "max_concurrent_requests"),
        ("MESHGATE_INFERENCE__MAX_IN_FLIGHT", "0", "max_in_flight"),
        ("MESHGATE_ROUTER__BREAKER__WINDOW", "0", "breaker.window"),
        ("MESHGATE_QUOTA__RESERVATION_TTL_SECS", "0", "reservation_ttl_secs"),
        ("MESHGATE_ANALYTICS__RETENTION_DAYS", "0", "retention_days"),
        ("MESHGATE_SYNC__TIMEOUT_MS", "0", "timeout_ms"),
        ("MESHGATE_PROVIDER_X_BASE_URL", "ftp://x/v1", "provider 'x'"),
    ] {
        let (ok, stderr) = check(&[(variable, value)]);
        assert!(!ok, "{variable}={value} is refused");
        assert!(stderr.contains(named), "{variable}={value}: {stderr}");
    }
}

#[test]
fn check_config_refuses_a_cloud_model_without_a_price_unless_told_otherwise() {
    let provider =
        [("MESHGATE_PROVIDER_UP_BASE_URL", "http://127.0.0.1:9/v1"), ("MESHGATE_PROVIDER_UP_MODELS", "gpt,mini")];
    let check = |file: Option<&tempfile::NamedTempFile>| {
        let mut command = meshgate();
        if let Some(file) = file {
            command.arg("--config").arg(file.path());
        }
        let output = command.arg("check-config").envs(provider).output().unwrap();
        (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (ok, stderr) = check(None);
    assert!(!ok, "unpriced models pass");
    assert!(stderr.contains("no price for up/gpt, up/mini"), "{stderr}");

    let priced =
        "[router.models.gpt]\ninput_price_micros_per_mtok = 2500000\noutput_price_micros_per_mtok = 10000000\n";
    let (ok, stderr) = check(Some(&config(priced)));
    assert!(!ok && stderr.contains("no price for up/mini") && !stderr.contains("up/gpt"), "{stderr}");
    let free =
        format!("{priced}[router.models.mini]\ninput_price_micros_per_mtok = 0\noutput_price_micros_per_mtok = 0\n");
    let (ok, stderr) = check(Some(&config(&free)));
    assert!(ok, "a declared price of 0 is a price: {stderr}");
    let defaulted = "[router.default_price]\ninput_price_micros_per_mtok = 1\noutput_price_micros_per_mtok = 2\n";
    let (ok, stderr) = check(Some(&config(defaulted)));
    assert!(ok, "{stderr}");
    let (ok, stderr) = check(Some(&config("[router]\nallow_unpriced_models = true\n")));
    assert!(ok, "{stderr}");

    // Sync's providers are the router's in one process: they are checked the same way.
    let sync = "[[sync.providers]]\nname = \"file\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodels = [\"solo\"]\n";
    let output = meshgate().arg("--config").arg(config(sync).path()).arg("check-config").output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no price for file/solo"));
    let bad = "[router.models.m]\ncapabilities = [\"x-ray\"]\n";
    let output = meshgate().arg("--config").arg(config(bad).path()).arg("check-config").output().unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("x-ray"));
}

#[test]
fn migrate_needs_a_database_and_applies_every_component_twice_safely() {
    let output = meshgate().arg("migrate").output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("DATABASE_URL"));

    let url = database_url();
    for _ in 0..2 {
        let output = meshgate().arg("migrate").env("DATABASE_URL", &url).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
}

/// Runs `meshgate ARGS` against the test database and parses its JSON output.
fn admin(args: &[&str]) -> serde_json::Value {
    let url = database_url();
    let output = meshgate().args(args).env("DATABASE_URL", &url).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn tenancy_commands_create_orgs_projects_users_and_keys_shown_once() {
    let org = admin(&["orgs", "create", "cli-tenant"]);
    let org_id = org["id"].as_str().unwrap();
    let project = admin(&["projects", "create", "cli-project", "--org", org_id]);
    let project_id = project["id"].as_str().unwrap();
    let user = admin(&["users", "create", "ops@cli.test", "--org", org_id]);
    let user_id = user["id"].as_str().unwrap();
    let granted = admin(&["users", "grant", user_id, project_id, "admin"]);
    assert_eq!(granted["role"], "admin");

    let created = admin(&["keys", "create", "--project", project_id, "--user", user_id, "--role", "admin"]);
    let secret = created["secret"].as_str().unwrap();
    let key_id = created["key"]["id"].as_str().unwrap();
    assert!(secret.starts_with("mgk_"));
    let listed = admin(&["keys", "list", "--project", project_id]);
    assert!(!listed.to_string().contains(secret), "a listing printed a secret");
    assert_eq!(listed[0]["prefix"].as_str(), Some(&secret[..12]));

    let rotated = admin(&["keys", "rotate", key_id]);
    assert_ne!(rotated["secret"], created["secret"]);
    let revoked = admin(&["keys", "revoke", rotated["key"]["id"].as_str().unwrap()]);
    assert!(revoked["revoked_at"].is_string());
    let listed = admin(&["keys", "list", "--project", project_id]);
    assert!(listed.as_array().unwrap().iter().all(|k| k["revoked_at"].is_string()), "{listed}");

    // Bad input is refused with a message, and nothing is written.
    let url = database_url();
    for args in [
        vec!["users", "grant", user_id, project_id, "emperor"],
        vec!["keys", "create", "--project", "prj_missing"],
        vec!["users", "create", "no-at-sign", "--org", org_id],
        vec!["keys", "revoke", "key_missing"],
    ] {
        let output = meshgate().args(&args).env("DATABASE_URL", &url).output().unwrap();
        assert!(!output.status.success(), "{args:?}");
        assert!(!output.stderr.is_empty());
    }
    assert_eq!(admin(&["users", "list", "--org", org_id]).as_array().unwrap().len(), 1);
}

#[test]
fn certs_makes_a_ca_and_a_certificate_per_service_and_never_overwrites_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tls");
    let certs = |extra: &[&str]| meshgate().arg("certs").arg("--out").arg(&out).args(extra).output().unwrap();
    let first =
        certs(&["--dns-prefix", "meshgate-", "--domain", "meshgate.svc.cluster.local", "--identity", "operator"]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    for name in ["ca", "gateway", "inference", "router", "quota", "analytics", "sync", "operator"] {
        let crt = std::fs::read_to_string(out.join(format!("{name}.crt"))).unwrap();
        assert!(crt.starts_with("-----BEGIN CERTIFICATE-----"), "{name}.crt");
        let key = out.join(format!("{name}.key"));
        assert!(std::fs::read_to_string(&key).unwrap().contains("PRIVATE KEY"), "{name}.key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600, "{name}.key");
        }
    }
    let ca = std::fs::read(out.join("ca.crt")).unwrap();
    let quota = std::fs::read(out.join("quota.crt")).unwrap();

    let again = certs(&[]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(!stdout.contains("wrote") && stdout.contains("kept"), "{stdout}");
    assert_eq!(
        (std::fs::read(out.join("ca.crt")).unwrap(), std::fs::read(out.join("quota.crt")).unwrap()),
        (ca.clone(), quota)
    );

    let forced = certs(&["--force"]);
    assert!(forced.status.success());
    assert_ne!(std::fs::read(out.join("ca.crt")).unwrap(), ca, "--force makes a new CA");

    let bad = certs(&["--identity", "Not A Name"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("Not A Name"));
}

#[test]
fn check_config_refuses_a_mesh_section_naming_an_unknown_rpc_or_plaintext_off_loopback() {
    let unknown = config("[mesh.extra_callers]\noperator = [\"Inference.Unload\"]\n");
    let output = meshgate().arg("--config").arg(unknown.path()).arg("check-config").output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("Inference.Unload"));

    let open = config("[mesh]\ntransport = \"plaintext\"\n[standalone]\nhost = \"0.0.0.0\"\n");
    let output = meshgate().arg("--config").arg(open.path()).arg("check-config").output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("loopback"));

    let operator = config("[mesh.extra_callers]\noperator = [\"Inference.Load\"]\n");
    let output = meshgate().arg("--config").arg(operator.path()).arg("check-config").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}
