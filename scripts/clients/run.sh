#!/usr/bin/env bash
# Real clients against meshgate (issues 15, 18): the official openai Python SDK (chat completions,
# the Responses API, legacy completions), langchain-openai, the official anthropic SDK (Messages)
# and the OpenAI Agents SDK (pinned in scripts/clients/requirements.txt, installed into the project
# venv) run scripts/clients/test_*.py with pytest twice:
#   1. against the mock provider itself, the oracle: a failure there is a fault of the tests;
#      tests marked mesh_only (what the mock does not serve: stored responses, /v1/completions,
#      count_tokens; or meshgate's own keys) are skipped there;
#   2. against a standalone `meshgate up` (debug build, in-memory stores, free loopback ports) whose
#      providers are that mock provider: "mock" (chat completions, model $MODEL) and "mocknative"
#      (kind openai-responses, model $MODEL-native): what the clients get through the mesh, and
#      what the mock received (its GET /_mock/requests), must be what they got from the mock directly.
# A known meshgate defect is a strict xfail naming it: the run stays green, and fails once it is fixed.
# Exits non-zero on any failure; JUnit reports go to .run/clients-{mock,mesh}-junit.xml.
#
# Usage: scripts/clients/run.sh [--mock-only] [PYTEST ARGS...]
#   (best as `scripts/test.sh scripts/clients/run.sh`, which provides ONNX Runtime and the models)
#   --mock-only   only step 1 (checks the tests themselves; no meshgate is started)
#   PYTEST ARGS   passed to both runs, e.g. -k parse, -x
# Knobs: MESHGATE_CLIENTS_BIN=DIR (meshgate and meshgate-mock-provider binaries in DIR instead of a
#   debug build).
# shellcheck source-path=SCRIPTDIR/../..
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MG_LOG_TAG=clients
source scripts/lib/common.sh
source scripts/lib/python.sh
source scripts/lib/live.sh
cd "$MG_ROOT"
mg_cleanup_init

mock_only=0
if [[ ${1:-} == --mock-only ]]; then
    mock_only=1
    shift
fi
# The model the clients ask for; meshgate serves it from the provider "mock".
MODEL=gpt-4o-mini

# --- tools -------------------------------------------------------------------------------------
mg_python_setup
mg_pip_requirements scripts/clients/requirements.txt
if ((mock_only)) && [[ -z ${MESHGATE_CLIENTS_BIN:-} ]]; then
    mg_log "building the mock provider (debug)"
    cargo build --quiet -p meshgate-mock-provider >&2 || mg_die "cargo build failed"
    bin="${CARGO_TARGET_DIR:-$MG_ROOT/target}/debug"
else
    bin=$(mg_meshgate_bins MESHGATE_CLIENTS_BIN)
fi

MG_LIVE_DIR=$(mktemp -d)
mg_defer rm -rf "$MG_LIVE_DIR"
read -r -a ports <<<"$(mg_free_ports 14)"
mock=${ports[0]} edge=${ports[1]}
grpc=("${ports[@]:2:6}")
admin=("${ports[@]:8:6}")

# The mock records what it receives, so the tests can check what reached the provider.
mg_start mock "$bin/meshgate-mock-provider" --port "$mock" --track-requests
mg_wait_http "http://127.0.0.1:$mock/health" mock || exit 1

# run_clients NAME BASE_URL API_KEY PYTEST_ARGS... : the client tests against one endpoint.
run_clients() {
    local name=$1 base_url=$2 key=$3
    shift 3
    mg_log "clients against the $name ($base_url)"
    (cd scripts/clients && MESHGATE_CLIENTS_BASE_URL=$base_url MESHGATE_CLIENTS_API_KEY=$key \
        MESHGATE_CLIENTS_MODEL=$MODEL MESHGATE_CLIENTS_RESPONSES_MODEL=$MODEL-native MESHGATE_CLIENTS_MOCK_URL="http://127.0.0.1:$mock" MESHGATE_CLIENTS_TARGET=$name \
        "$MG_VENV/bin/python" -m pytest -p no:cacheprovider -q -rfEx \
        --junitxml "$MG_ROOT/.run/clients-$name-junit.xml" "$@")
}

run_clients mock "http://127.0.0.1:$mock/v1" sk-mock "$@" ||
    mg_die "the client tests fail against the mock provider itself: the tests are wrong, not meshgate"
if ((mock_only)); then
    mg_log "the client tests pass against the mock provider (--mock-only: no mesh)"
    exit 0
fi

# --- the mesh ----------------------------------------------------------------------------------
key="mg-clients-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
{
    mg_standalone_listen "$edge" "$(IFS=,; echo "${grpc[*]}")" "$(IFS=,; echo "${admin[*]}")"
    # The injection classifier the policy asks, when the test models are there.
    models=${MESHGATE_TEST_REAL_MODELS_DIR:-${MESHGATE_TEST_MODELS_DIR:-}}
    if [[ -n $models && -f $models/manifest.json && -n ${ORT_DYLIB_PATH:-} ]]; then
        printf '\n[inference]\nmodels_dir = "%s"\n' "$models"
    fi
} >"$MG_LIVE_DIR/meshgate.toml"
mg_start meshgate env MESHGATE_ADMIN_KEY="$key" \
    MESHGATE_PROVIDER_MOCK_BASE_URL="http://127.0.0.1:$mock/v1" MESHGATE_PROVIDER_MOCK_MODELS="$MODEL" \
    MESHGATE_PROVIDER_MOCK_EMBEDDING_MODELS=text-embedding-3-small \
    MESHGATE_PROVIDER_MOCKNATIVE_KIND=openai-responses MESHGATE_PROVIDER_MOCKNATIVE_MODELS="$MODEL-native" \
    MESHGATE_PROVIDER_MOCKNATIVE_BASE_URL="http://127.0.0.1:$mock/v1" \
    "$bin/meshgate" --config "$MG_LIVE_DIR/meshgate.toml" up
for port in "${admin[@]}"; do mg_wait_http "http://127.0.0.1:$port/readyz" meshgate || exit 1; done

if ! run_clients mesh "http://127.0.0.1:$edge/v1" "$key" "$@"; then
    mg_warn "the client tests fail through meshgate (they pass against the mock); meshgate's last log lines:"
    grep -E 'ERROR|WARN|panicked' "$MG_LIVE_DIR/meshgate.log" | tail -n 20 >&2 || true
    exit 1
fi
mg_log "the client tests pass against the mock provider and through meshgate"
