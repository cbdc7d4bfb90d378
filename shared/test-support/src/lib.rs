//! What every crate's tests share, in one place: where the test Postgres and Redis are, a fresh
//! schema of the test database per caller, the model directories `scripts/test.sh` prepares and
//! the ONNX Runtime library of the project's venv, and unique ids. Outside `scripts/test.sh`,
//! what is missing fails the test with a message naming it rather than letting it pass.

use std::path::PathBuf;

use meshgate_proto::common::v1::Principal;

/// The workspace root (this crate is `shared/test-support`).
fn workspace() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// `MESHGATE_TEST_DATABASE_URL` (set by `scripts/test.sh`), else the local Postgres.
pub fn database_url() -> String {
    std::env::var("MESHGATE_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `MESHGATE_TEST_REDIS_URL` (set by `scripts/test.sh`), else the local Redis.
pub fn redis_url() -> String {
    std::env::var("MESHGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A URL of the test database whose connections use a fresh schema of their own (named
/// `<prefix>_<uuid>`), so tests that name the same tenants never meet.
pub async fn isolated_database_url(prefix: &str) -> String {
    let schema = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let (client, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|err| panic!("the test database answers ({err}); run the tests through scripts/test.sh"));
    let connection = tokio::spawn(connection);
    client.batch_execute(&format!("CREATE SCHEMA {schema}")).await.expect("a schema of its own");
    drop(client);
    let _ = connection.await;
    let separator = if database_url().contains('?') { '&' } else { '?' };
    format!("{}{separator}options=-c%20search_path%3D{schema}", database_url())
}

/// `<prefix>-<uuid>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A principal with fresh ids for every scope.
pub fn principal() -> Principal {
    Principal {
        org_id: unique("org"),
        project_id: unique("proj"),
        user_id: unique("user"),
        key_id: unique("key"),
        role: 0,
    }
}

/// The tiny models `scripts/test.sh` builds (`scripts/make-test-models.py`):
/// `MESHGATE_TEST_MODELS_DIR`, else `<workspace>/target/test-models`. Panics, naming
/// `scripts/test.sh`, when they are not there.
pub fn models_dir() -> PathBuf {
    let dir = env_path("MESHGATE_TEST_MODELS_DIR").unwrap_or_else(|| workspace().join("target/test-models"));
    assert!(
        ["manifest.json", "smollm2-shaped/manifest.json", "cascade/manifest.json"]
            .iter()
            .all(|f| dir.join(f).is_file()),
        "no test models in {}: run the tests through scripts/test.sh, which builds them \
         (e.g. `scripts/test.sh cargo nextest run -p meshgate-inference`)",
        dir.display()
    );
    dir
}

/// The real models `scripts/test.sh` fetches and trains (`scripts/fetch-models.sh`):
/// `MESHGATE_TEST_REAL_MODELS_DIR`, else `<workspace>/models`. Panics, naming `scripts/test.sh`,
/// when they are not there.
pub fn real_models_dir() -> PathBuf {
    let dir = env_path("MESHGATE_TEST_REAL_MODELS_DIR").unwrap_or_else(|| workspace().join("models"));
    assert!(
        dir.join("manifest.json").is_file(),
        "no real models in {}: run the tests through scripts/test.sh, which fetches them \
         (scripts/fetch-models.sh), or set MESHGATE_TEST_REAL_MODELS_DIR",
        dir.display()
    );
    dir
}

/// `ORT_DYLIB_PATH`, else the library of the onnxruntime wheel in `<workspace>/.venv` (which
/// `scripts/test.sh` installs).
pub fn ort_dylib() -> PathBuf {
    if let Some(path) = env_path("ORT_DYLIB_PATH") {
        return path;
    }
    let lib = workspace().join(".venv/lib");
    std::fs::read_dir(&lib)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| python.path().join("site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no ONNX Runtime under {}: run the tests through scripts/test.sh, or set ORT_DYLIB_PATH",
                lib.display()
            )
        })
}
