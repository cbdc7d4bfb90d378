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
