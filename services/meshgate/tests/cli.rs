//! The `meshgate` binary as an operator runs it.

use std::io::Write;
use std::process::Command;

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
fn migrate_needs_a_database_and_applies_every_component_twice_safely() {
    let output = meshgate().arg("migrate").output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("DATABASE_URL"));

    let url = std::env::var("MESHGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    for _ in 0..2 {
        let output = meshgate().arg("migrate").env("DATABASE_URL", &url).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
}

/// Runs `meshgate ARGS` against the test database and parses its JSON output.
fn admin(args: &[&str]) -> serde_json::Value {
    let url = std::env::var("MESHGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
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
    let url = std::env::var("MESHGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
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
