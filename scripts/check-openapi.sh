#!/usr/bin/env bash
# Fuzzes the edge against its own contract: boots a standalone `meshgate up` (the project's mock
# provider upstream, free loopback ports, Postgres and Redis when MESHGATE_TEST_DATABASE_URL /
# MESHGATE_TEST_REDIS_URL are set, else in-memory stores) and runs schemathesis (PyPI,
# scripts/openapi-requirements.txt, into the project venv) on /openapi.json with a valid admin
# key, every phase (examples, coverage, fuzzing, stateful over the links schemathesis infers) and
# every operation (none is excluded: the bootstrap key cannot be revoked through the API, so no
# case can lock the run out). Every check below must pass on every generated case: no 5xx, every
# status, content type, header and body as documented. Exits non-zero on any failure; the JUnit
# report is left in .run/check-openapi-junit.xml. Before the fuzzing the document is linted by
# Redocly CLI (scripts/openapi-lint).
#
# Usage: scripts/check-openapi.sh    (best as `scripts/test.sh scripts/check-openapi.sh`, which
#   provides the stores, ONNX Runtime and the test models)
# Knobs: MESHGATE_OPENAPI_EXAMPLES (cases per operation and phase, default 100: about a minute),
#   MESHGATE_OPENAPI_SEED (schemathesis seed, default random), MESHGATE_OPENAPI_CHECK_BIN=DIR
#   (meshgate and meshgate-mock-provider binaries in DIR instead of a debug build).
# shellcheck source-path=SCRIPTDIR/..
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MG_LOG_TAG=check-openapi
source scripts/lib/common.sh
source scripts/lib/postgres.sh
source scripts/lib/python.sh
source scripts/lib/live.sh
cd "$MG_ROOT"
mg_cleanup_init

CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance
EXAMPLES=${MESHGATE_OPENAPI_EXAMPLES:-100}
# The model id the spec's examples name, so the examples phase reaches a real reply.
MODEL=gpt-4o-mini

# --- tools -------------------------------------------------------------------------------------
mg_python_setup
mg_pip_requirements scripts/openapi-requirements.txt
bin=$(mg_meshgate_bins MESHGATE_OPENAPI_CHECK_BIN)

# --- the mesh ----------------------------------------------------------------------------------
MG_LIVE_DIR=$(mktemp -d)
mg_defer rm -rf "$MG_LIVE_DIR"

read -r -a ports <<<"$(mg_free_ports 14)"
mock=${ports[0]} edge=${ports[1]}
grpc=("${ports[@]:2:6}")
admin=("${ports[@]:8:6}")
key="mg-openapi-check-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"

mg_start mock "$bin/meshgate-mock-provider" --port "$mock"
{
    mg_standalone_listen "$edge" "$(IFS=,; echo "${grpc[*]}")" "$(IFS=,; echo "${admin[*]}")"
    # Its own counters, and per-minute limits out of the way: a fuzzer's burst would otherwise
    # turn most later cases into (documented) 429s and test little else.
    # The fuzzer sends requests without a valid key on purpose; throttling their address (tested
    # in the gateway's own tests) would answer everything after the 20th with 429.
    printf '\n[gateway]\nmax_auth_failures_per_minute = 1000000\n'
    printf '\n[quota]\nkey_prefix = "%s:"\n\n[quota.defaults.user]\nrequests_per_minute = 0\n' "$key"
    # The real encoders (the spec's embedding example, and the injection classifier the policy
    # asks), else the tiny test models.
    models=${MESHGATE_TEST_REAL_MODELS_DIR:-${MESHGATE_TEST_MODELS_DIR:-}}
    if [[ -n $models && -f $models/manifest.json && -n ${ORT_DYLIB_PATH:-} ]]; then
        printf '\n[inference]\nmodels_dir = "%s"\n' "$models"
    fi
} >"$MG_LIVE_DIR/meshgate.toml"

stores=()
if [[ -n ${MESHGATE_TEST_DATABASE_URL:-} && -n ${MESHGATE_TEST_REDIS_URL:-} ]]; then
    # The fuzzer rewrites tenants, policies and limits: a database of its own (dropped at exit)
    # keeps that away from the suite's other checks.
    database_url=$MESHGATE_TEST_DATABASE_URL
    if [[ $database_url =~ ^postgres(ql)?://postgres@127\.0\.0\.1:([0-9]+)/([A-Za-z0-9_]+)$ ]]; then
        MG_PG_PORT=${BASH_REMATCH[2]}
        mg_pg_create_db "${BASH_REMATCH[3]}_openapi"
        database_url="postgres://postgres@127.0.0.1:$MG_PG_PORT/$MG_PG_DB"
    else
        mg_warn "MESHGATE_TEST_DATABASE_URL is not a local postgres@127.0.0.1 URL: fuzzing in that database itself"
    fi
    stores=(DATABASE_URL="$database_url" REDIS_URL="$MESHGATE_TEST_REDIS_URL")
    env "${stores[@]}" "$bin/meshgate" migrate >"$MG_LIVE_DIR/migrate.log" 2>&1 ||
        { tail -n 20 "$MG_LIVE_DIR/migrate.log" >&2; mg_die "meshgate migrate failed"; }
    mg_log "stores: Postgres and Redis"
else
    mg_log "stores: in memory (MESHGATE_TEST_DATABASE_URL / MESHGATE_TEST_REDIS_URL unset)"
fi
mg_start meshgate env "${stores[@]}" MESHGATE_ADMIN_KEY="$key" \
    MESHGATE_PROVIDER_MOCK_BASE_URL="http://127.0.0.1:$mock/v1" MESHGATE_PROVIDER_MOCK_MODELS="$MODEL" \
    "$bin/meshgate" --config "$MG_LIVE_DIR/meshgate.toml" up

mg_wait_http "http://127.0.0.1:$mock/health" mock || exit 1
for port in "${admin[@]}"; do mg_wait_http "http://127.0.0.1:$port/readyz" meshgate || exit 1; done

# --- the lint ----------------------------------------------------------------------------------
# Redocly CLI (npm, pinned in scripts/openapi-lint/package-lock.json) on the served document, with
# the committed ruleset: every finding is an error, but those listed with their reasons in
# scripts/openapi-lint/.redocly.lint-ignore.yaml.
lint=$MG_ROOT/scripts/openapi-lint
mg_have npm || mg_die "npm is required for the OpenAPI lint (apt-get install nodejs npm)"
if [[ ! -x $lint/node_modules/.bin/redocly ]]; then
    mg_log "installing the OpenAPI linter (npm ci in scripts/openapi-lint)"
    (cd "$lint" && npm ci --no-audit --no-fund --loglevel=error >&2) || mg_die "npm ci in scripts/openapi-lint failed"
fi
curl -sf -o "$MG_LIVE_DIR/openapi.json" "http://127.0.0.1:$edge/openapi.json" || mg_die "GET /openapi.json failed"
mg_log "redocly lint: the served /openapi.json"
# The linter's telemetry and update checks would reach beyond the registries: both off.
(cd "$lint" && cp "$MG_LIVE_DIR/openapi.json" openapi.json && REDOCLY_TELEMETRY=off REDOCLY_SUPPRESS_UPDATE_NOTICE=true \
    node_modules/.bin/redocly lint openapi.json --config redocly.yaml --format stylish >&2; status=$?; rm -f openapi.json; exit $status) ||
    mg_die "the OpenAPI document does not pass the lint"

# --- the fuzzing -------------------------------------------------------------------------------
seed=()
if [[ -n ${MESHGATE_OPENAPI_SEED:-} ]]; then seed=(--seed "$MESHGATE_OPENAPI_SEED"); fi
mg_log "schemathesis: $EXAMPLES examples per operation and phase, checks $CHECKS"
status=0
# From the scratch directory: schemathesis keeps a cache (.schemathesis/) in its working directory.
# scripts/openapi_hooks.py: request bodies schemathesis cannot generate itself (protobuf).
(cd "$MG_LIVE_DIR" && PYTHONPATH="$MG_ROOT/scripts" SCHEMATHESIS_HOOKS=openapi_hooks "$MG_VENV/bin/schemathesis" run "http://127.0.0.1:$edge/openapi.json" \
    --header "Authorization: Bearer $key" \
    --checks "$CHECKS" \
    --phases examples,coverage,fuzzing,stateful \
    --max-examples "$EXAMPLES" \
    --workers 1 \
    --request-timeout 20 \
    --generation-database none \
    --no-color \
    --report junit --report-junit-path "$MG_ROOT/.run/check-openapi-junit.xml" \
    "${seed[@]}") || status=$?

if ((status != 0)); then
    mg_warn "schemathesis found failures (exit $status); the gateway's last log lines:"
    grep -E 'ERROR|WARN|panicked' "$MG_LIVE_DIR/meshgate.log" | tail -n 20 >&2 || true
    exit 1
fi
mg_log "schemathesis: every case passed"
