//! ONNX Runtime plumbing: the process-wide environment, session creation, graph introspection and
//! file integrity checks.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::ValueType;
use sha2::{Digest, Sha256};

use crate::error::Error;

/// ONNX Runtime allows one environment per process, and the shared library can be loaded once:
/// the first caller's library path wins, and a failure is remembered (and reported per model).
static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The library path used when none is configured: `ORT_DYLIB_PATH`, else the bare name, which
/// the dynamic loader looks up in the system library path.
fn default_dylib_path() -> PathBuf {
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from("libonnxruntime.so"),
    }
}

/// The process-wide ONNX Runtime environment, loading the shared library on first use.
pub fn environment(dylib: Option<&Path>) -> Result<&'static Environment, Error> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = dylib.map(Path::to_path_buf).unwrap_or_else(default_dylib_path);
            let builder = ort::init_from(&path)
                .map_err(|err| format!("cannot load the ONNX Runtime library {}: {err}", path.display()))?;
            builder
                .with_name("meshgate-inference")
                .with_telemetry(false)
                .build()
                .map_err(|err| format!("cannot create the ONNX Runtime environment: {err}"))
        })
        .as_ref()
        .map_err(|reason| Error::Load(reason.clone()))
}

/// Opens `path` as a session with `intra_op_threads` (0: ONNX Runtime's default); `spinning`
/// lets idle intra-op threads busy-wait for the next operator instead of sleeping.
pub fn open_session(env: &Environment, path: &Path, intra_op_threads: usize, spinning: bool) -> Result<Session, Error> {
    let load_err = |err: String| Error::Load(format!("cannot load {}: {err}", path.display()));
    let mut builder = Session::builder(env).map_err(|e| load_err(e.to_string()))?;
    if intra_op_threads > 0 {
        builder = builder.with_intra_threads(intra_op_threads).map_err(|e| load_err(e.to_string()))?;
    }
    builder = builder.with_intra_op_spinning(spinning).map_err(|e| load_err(e.to_string()))?;
    builder.commit_from_file(path).map_err(|e| load_err(e.to_string()))
}

/// Shape of a graph input or output, `None` when it is not a tensor. Dynamic dimensions are -1.
pub fn tensor_shape(ty: &ValueType) -> Option<Vec<i64>> {
    match ty {
        ValueType::Tensor { shape, .. } => Some(shape.to_vec()),
        _ => None,
    }
}

/// Checks that `path` exists and, when `expected` is given, that its sha256 matches.
pub fn verify_file(path: &Path, expected: Option<&str>, verify: bool) -> Result<(), Error> {
    if !path.is_file() {
        return Err(Error::Load(format!("file {} is missing", path.display())));
    }
    let Some(expected) = expected.filter(|_| verify) else {
        return Ok(());
    };
    let actual = sha256_file(path).map_err(|e| Error::Load(format!("cannot read {}: {e}", path.display())))?;
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(Error::Load(format!(
            "file {} is corrupt: sha256 {actual}, manifest says {expected}",
            path.display()
        )));
    }
    Ok(())
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
