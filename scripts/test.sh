#!/usr/bin/env bash
# Runs meshgate's whole check suite: rustfmt, clippy, the workspace's tests, and the extra checks.
#
# Usage: scripts/test.sh [COMMAND...]    (from any directory)
#   Without a COMMAND it runs the suite. With one, it prepares the same environment and runs
#   COMMAND in it instead, e.g. `scripts/test.sh cargo nextest run -p meshgate-quota`.
#
# Environment prepared (exported to the tests):
#   MESHGATE_TEST_DATABASE_URL  a fresh database for this run, dropped at exit
#   MESHGATE_TEST_REDIS_URL     redis://127.0.0.1:<port>/0
#   ORT_DYLIB_PATH              libonnxruntime.so from the onnxruntime wheel in the project venv
#   MESHGATE_TEST_MODELS_DIR    tiny ONNX models built by scripts/make-test-models.py (and, in its
#                               smollm2-shaped/, the tiny model served as SmolLM2 is)
#   MESHGATE_TEST_REAL_MODELS_DIR  the real encoder models (MiniLM, the two classifiers) fetched
#                               and trained by scripts/fetch-models.sh into models/
# Postgres and Redis already answering on 127.0.0.1 are used; otherwise throwaway servers are
# started (installed with apt-get when missing, as root) and removed at exit, even on failure.
#
# Knobs:
#   MESHGATE_TEST_SETUP_ONLY=1  stop after the setup, print the exported variables, clean up
#                               (with KEEP_TEST_DB=1 and the machine's own servers, the printed
#                               variables stay usable for running cargo by hand)
#   KEEP_TEST_DB=1              keep the test database (or the throwaway cluster's data) at exit
#   MESHGATE_PG_PORT=5432       port probed for an existing Postgres, preferred for a throwaway one
#   MESHGATE_REDIS_PORT=6379    likewise for Redis
#   MESHGATE_CLIENT_TESTS=0     skip the real-client tests (scripts/clients/run.sh: the openai,
#                               anthropic and Agents SDKs and langchain-openai against the mock
#                               and through meshgate), which run by default
#   MESHGATE_SOAK_TESTS=0       skip the five-minute soak (scripts/chaos.sh --faults soak), which
#                               runs by default
#
# A check whose tool is missing (rustfmt, clippy, cargo-nextest) fails the run: the tool is
# installed first when it can be (rustup component add, cargo install --locked).
# shellcheck source-path=SCRIPTDIR/..
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MG_LOG_TAG=test.sh
source scripts/lib/common.sh
source scripts/lib/postgres.sh
source scripts/lib/redis.sh
source scripts/lib/python.sh
cd "$MG_ROOT"
mg_cleanup_init
# The concurrency tests open about a thousand loopback connections; a fresh machine's soft limit
# of 1024 descriptors would not do.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# A run from a clean clone gains nothing from incremental compilation, whose caches would double
# target/ (about 2 GiB of the workspace's debug build); a developer may turn it back on.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
# The disk a run needs is most of what CI can run out of: say what there is.
mg_log "Disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free where the run builds"

# --- setup -------------------------------------------------------------------------------------
mg_pg_ensure
mg_pg_create_db "meshgate_test_$(date -u +%Y%m%d%H%M%S)_$$"
export MESHGATE_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$MG_PG_PORT/$MG_PG_DB"

mg_redis_ensure
export MESHGATE_TEST_REDIS_URL="redis://127.0.0.1:$MG_REDIS_PORT/0"

mg_python_setup
mg_export_ort_dylib_path

export MESHGATE_TEST_MODELS_DIR="$MG_ROOT/target/test-models"
mg_log "Models: building test models into $MESHGATE_TEST_MODELS_DIR"
# stdout is kept for the SETUP_ONLY exports below.
mg_lock test-models "$MG_VENV/bin/python" scripts/make-test-models.py "$MESHGATE_TEST_MODELS_DIR" >&2 ||
    mg_die "scripts/make-test-models.py failed"

export MESHGATE_TEST_REAL_MODELS_DIR="$MG_ROOT/models"
mg_log "Models: fetching the real encoder models into $MESHGATE_TEST_REAL_MODELS_DIR (scripts/fetch-models.sh)"
# The script locks and skips what is already built and verified.
bash scripts/fetch-models.sh --dir "$MESHGATE_TEST_REAL_MODELS_DIR" >&2 || mg_die "scripts/fetch-models.sh failed"

if [[ ${MESHGATE_TEST_SETUP_ONLY:-0} == 1 ]]; then
    mg_log "MESHGATE_TEST_SETUP_ONLY=1: setup done; exported:"
    for var in MESHGATE_TEST_DATABASE_URL MESHGATE_TEST_REDIS_URL ORT_DYLIB_PATH MESHGATE_TEST_MODELS_DIR \
        MESHGATE_TEST_REAL_MODELS_DIR; do
        printf 'export %s=%q\n' "$var" "${!var}"
    done
    exit 0
fi

if (($#)); then
    mg_log "running: $*"
    "$@"
    exit $?
fi

# --- checks ------------------------------------------------------------------------------------

PASSED=()
FAILED=()
# Opt-in checks this run was not asked for.
NOT_REQUESTED=()
# The cargo-nextest installed when a machine has none.
NEXTEST_VERSION=0.9.143

# run_step NAME CMD... : runs one check, records its outcome, never stops the run.
run_step() {
    local name=$1 start=$SECONDS
    shift
    mg_log "==> $name: $*"
    if "$@"; then
        PASSED+=("$name")
        mg_log "<== $name: ok ($((SECONDS - start))s)"
    else
        FAILED+=("$name")
        mg_log "<== $name: FAILED ($((SECONDS - start))s)"
    fi
}

# ensure_component COMPONENT CARGO_SUBCOMMAND : true when `cargo SUBCOMMAND` works, adding the
# rustup component first if needed.
ensure_component() {
    cargo "$2" --version >/dev/null 2>&1 && return 0
    if mg_have rustup && rustup component add "$1" >&2 && cargo "$2" --version >/dev/null 2>&1; then
        return 0
    fi
    mg_warn "$1 is not available and rustup could not add it"
    return 1
}

# ensure_nextest : true when `cargo nextest` works, installing it from crates.io first if needed.
ensure_nextest() {
    cargo nextest --version >/dev/null 2>&1 && return 0
    mg_log "cargo-nextest is missing: cargo install --locked cargo-nextest@$NEXTEST_VERSION"
    if cargo install --locked "cargo-nextest@$NEXTEST_VERSION" >&2 && cargo nextest --version >/dev/null 2>&1; then
        return 0
    fi
    mg_warn "cargo-nextest is not available and could not be installed"
    return 1
}

# A check that cannot run fails: its tool missing is not a pass.
if ensure_component rustfmt fmt; then
    run_step fmt cargo fmt --all -- --check
else
    FAILED+=("fmt (no rustfmt)")
fi
if ensure_component clippy clippy; then
    run_step clippy cargo clippy --workspace --all-targets -- -D warnings
else
    FAILED+=("clippy (no clippy)")
fi
if ensure_nextest; then
    run_step tests cargo nextest run --workspace --no-fail-fast
else
    FAILED+=("tests (no cargo-nextest)")
fi
# nextest does not run doctests.
run_step doctests cargo test --workspace --doc

# ===== extra checks (begin) ====================================================================
# Checks added by later work (helm lint, promtool, ...) go here, one `run_step NAME CMD...` each.
# The layering: no import circle inside a crate, no service built on another service.
run_step modules python3 scripts/check-modules.py
run_step deploy scripts/check-deploy.sh
run_step topology scripts/check-topology.sh
run_step openapi scripts/check-openapi.sh
# The official SDKs as users run them, against the mock and through a standalone meshgate.
if [[ ${MESHGATE_CLIENT_TESTS:-1} == 1 ]]; then
    run_step clients scripts/clients/run.sh
else
    NOT_REQUESTED+=("clients (MESHGATE_CLIENT_TESTS=0 was set)")
fi
# Five minutes of steady mixed load on the six processes, two gateway replicas, Postgres and Redis:
# the invariants of the chaos suite, and no leak (memory, descriptors, Tokio tasks, Redis keys
# without an expiry, Postgres connections) in the samples taken every 10 s (RELIABILITY.md).
if [[ ${MESHGATE_SOAK_TESTS:-1} == 1 ]]; then
    run_step soak scripts/chaos.sh --faults soak --soak-seconds 300 --budget-a 100000000 --budget-b 100000000
else
    NOT_REQUESTED+=("soak (MESHGATE_SOAK_TESTS=0 was set)")
fi
# ===== extra checks (end) ======================================================================

# --- summary -----------------------------------------------------------------------------------
mg_log "Disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free at the end; target/ holds $(du -sh target 2>/dev/null | cut -f1)"
join() {
    local out
    printf -v out '%s, ' "$@"
    out=${out%, }
    echo "${out:-none}"
}
if ((${#FAILED[@]})); then
    mg_log "RESULT: FAILED [$(join "${FAILED[@]}")]; passed [$(join "${PASSED[@]}")]; not requested [$(join "${NOT_REQUESTED[@]}")]"
    exit 1
fi
mg_log "RESULT: PASSED [$(join "${PASSED[@]}")]; not requested [$(join "${NOT_REQUESTED[@]}")]"
