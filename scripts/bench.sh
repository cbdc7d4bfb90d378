#!/usr/bin/env bash
# Measures meshgate's added latency and throughput beside LiteLLM and Portkey, in one run, with
# the peers harness in ../shared/bench/peers (install it once with its install.sh).
#
# Usage: scripts/bench.sh [PEERS_BENCH_ARGS...]     e.g. scripts/bench.sh -m rate -r 200 -d 15
#   Starts the mock upstream, LiteLLM and Portkey (peers.sh), then meshgate twice against the same
#   mock: as `./scripts/up.sh` runs it (`default`: the standalone with the models of
#   scripts/fetch-models.sh loaded, so prompt-injection scanning and task routing are on), the
#   standalone without models (`standalone`), and as six processes using Postgres and Redis
#   (DATABASE_URL / REDIS_URL, default the local ones) over mTLS (`six`). All run with auth,
#   quota, routing and tracing on. Everything is stopped at exit. Results land in
#   ../shared/bench/peers/results/<timestamp>/ (oha JSON, results.csv, results.txt).
# Knobs: MESHGATE_BENCH_PEERS=0 skips LiteLLM and Portkey; MESHGATE_BENCH_MODES="default standalone six"
# picks the meshgate shapes (add `loopback`: the standalone with its services calling each other
# over loopback gRPC instead of in process; `six-plaintext`: the six processes without mTLS, to
# measure what mTLS costs); MESHGATE_PEERS_DIR points at the harness.
# MESHGATE_BENCH_MODES=apis instead compares meshgate's ingress APIs on the standalone without
# models: the same conversation as Chat Completions, Responses and Anthropic Messages beside the
# mock at 200 req/s, three interleaved rounds (scripts/bench_apis.py; its arguments follow).
# BENCHMARKS.md records every run with its command.
# shellcheck source-path=SCRIPTDIR/..
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MG_LOG_TAG=bench.sh
source scripts/lib/common.sh
source scripts/lib/python.sh
cd "$MG_ROOT"
mg_cleanup_init

PEERS=$(cd "${MESHGATE_PEERS_DIR:-$MG_ROOT/../shared/bench/peers}" && pwd)
[[ -x $PEERS/bench.sh ]] || mg_die "peer harness not found at $PEERS"
[[ -x $PEERS/mock-upstream/target/release/mock-upstream ]] || mg_die "run $PEERS/install.sh first"
MODES=${MESHGATE_BENCH_MODES:-default standalone six}
KEY=sk-meshgate-bench
RUN_DIR=$MG_ROOT/.run/bench
mkdir -p "$RUN_DIR"

mg_log "building release binaries"
cargo build --release -q -p meshgate -p meshgate-gateway -p meshgate-inference -p meshgate-router \
    -p meshgate-quota -p meshgate-analytics -p meshgate-sync
BIN=${CARGO_TARGET_DIR:-$MG_ROOT/target}/release
mg_python_setup
mg_export_ort_dylib_path

export NICE=${NICE:--10}
"$PEERS/peers.sh" start mock
mg_defer "$PEERS/peers.sh" stop all
if [[ ${MESHGATE_BENCH_PEERS:-1} == 1 ]]; then
    "$PEERS/peers.sh" start litellm 1
    "$PEERS/peers.sh" start portkey
fi

# Providers from the environment alone, as an operator would set them.
export MESHGATE_PROVIDER_MOCK_BASE_URL=http://127.0.0.1:18000/v1
export MESHGATE_PROVIDER_MOCK_MODELS=mock-gpt
export MESHGATE_ADMIN_KEY=$KEY
# The benchmark sends far more than a user's default budget (and 100 requests a minute): limits
# far above the load keep every check running (daily counters and per-minute buckets) without
# refusing anything.
export MESHGATE_QUOTA__DEFAULTS__USER__TOKENS_PER_DAY=1000000000000
export MESHGATE_QUOTA__DEFAULTS__USER__COST_MICROS_PER_DAY=1000000000000
export MESHGATE_QUOTA__DEFAULTS__USER__REQUESTS_PER_MINUTE=1000000000
export MESHGATE_QUOTA__DEFAULTS__USER__TOKENS_PER_MINUTE=1000000000
export MESHGATE_INFERENCE__MODELS_DIR=$RUN_DIR/no-models
export RUST_LOG=${RUST_LOG:-warn}

wait_ready() { # url
    local i
    for ((i = 0; i < 200; i++)); do
        curl -sf -o /dev/null -m 1 -H "Authorization: Bearer $KEY" "$1/v1/models" && return 0
        sleep 0.1
    done
    mg_die "meshgate at $1 did not become ready"
}

# One standalone meshgate named NAME (the harness's target name) with its edge on port EDGE and
# its services on the six ports from BASE (gRPC) and ADMIN_BASE; IN_PROCESS sets in_process_calls;
# MODELS is the inference service's models directory.
start_standalone() { # NAME EDGE BASE ADMIN_BASE IN_PROCESS MODELS
    local name=$1 edge=$2 base=$3 admin=$4 in_process=$5 models=$6 pid
    cat >"$RUN_DIR/$name.toml" <<TOML
[standalone]
edge = "127.0.0.1:$edge"
grpc_ports = [$base, $((base + 1)), $((base + 2)), $((base + 3)), $((base + 4)), $((base + 5))]
admin_ports = [$admin, $((admin + 1)), $((admin + 2)), $((admin + 3)), $((admin + 4)), $((admin + 5))]
data_dir = "$RUN_DIR/$name-data"
in_process_calls = $in_process
TOML
    env -u DATABASE_URL -u REDIS_URL MESHGATE_INFERENCE__MODELS_DIR="$models" nice -n "$NICE" "$BIN/meshgate" --config "$RUN_DIR/$name.toml" up \
        >"$RUN_DIR/$name.log" 2>&1 &
    pid=$!
    mg_defer kill "$pid"
    wait_ready "http://127.0.0.1:$edge"
    TARGETS+=(--target "$name" "http://127.0.0.1:$edge" --key "$KEY" --pids "$pid")
}

TARGETS=()
if [[ $MODES == apis ]]; then
    start_standalone meshgate-apis 8095 28051 9161 true "$RUN_DIR/no-models"
    out=$PEERS/results/apis-$(date -u +%Y%m%dT%H%M%SZ)
    nice -n "$NICE" "$MG_VENV/bin/python" scripts/bench_apis.py --edge http://127.0.0.1:8095 --mock http://127.0.0.1:18000 \
        --key "$KEY" --oha "$PEERS/tools/bin/oha" --out "$out" "$@"
    exit 0
fi
if [[ " $MODES " == *" default "* ]]; then
    # What up.sh loads; the script skips what is already built.
    bash scripts/fetch-models.sh >&2 || mg_die "scripts/fetch-models.sh failed"
    start_standalone meshgate-default 8094 55051 9151 true "$MG_ROOT/models"
fi
if [[ " $MODES " == *" standalone "* ]]; then start_standalone meshgate 8090 51051 9111 true "$RUN_DIR/no-models"; fi
if [[ " $MODES " == *" loopback "* ]]; then
    start_standalone meshgate-loopback 8092 53051 9131 false "$RUN_DIR/no-models"
fi

# The six services as processes named NAME, with the gateway's edge on EDGE, gRPC ports from
# BASE and admin ports from ADMIN_BASE, calling each other over TRANSPORT (mtls, as the chart
# runs them, with certificates from `meshgate certs`; or plaintext, allowed on loopback).
start_six() { # NAME EDGE BASE ADMIN_BASE TRANSPORT
    local name=$1 edge=$2 base=$3 admin_base=$4 transport=$5 port svc pids=()
    local -A grpc
    port=$base
    for svc in inference router quota analytics sync gateway; do
        grpc[$svc]=$port
        port=$((port + 1))
    done
    for svc in inference router quota analytics sync gateway; do
        local admin=$((grpc[$svc] - base + admin_base)) http=()
        [[ $svc == gateway ]] && http=(MESHGATE_LISTEN__HTTP="127.0.0.1:$edge")
        env MESHGATE_LISTEN__GRPC="127.0.0.1:${grpc[$svc]}" MESHGATE_LISTEN__ADMIN="127.0.0.1:$admin" "${http[@]}" \
            MESHGATE_MESH__TRANSPORT="$transport" MESHGATE_MESH__TLS_DIR="$RUN_DIR/tls" \
            MESHGATE_ROUTER__INFERENCE_ENDPOINT="http://127.0.0.1:${grpc[inference]}" \
            MESHGATE_GATEWAY__QUOTA_ENDPOINT="http://127.0.0.1:${grpc[quota]}" \
            MESHGATE_GATEWAY__ROUTER_ENDPOINT="http://127.0.0.1:${grpc[router]}" \
            MESHGATE_GATEWAY__SYNC_ENDPOINT="http://127.0.0.1:${grpc[sync]}" \
            MESHGATE_GATEWAY__INFERENCE_ENDPOINT="http://127.0.0.1:${grpc[inference]}" \
            MESHGATE_GATEWAY__ANALYTICS_ENDPOINT="http://127.0.0.1:${grpc[analytics]}" \
            MESHGATE_SYNC__QUOTA_ENDPOINT="http://127.0.0.1:${grpc[quota]}" \
            nice -n "$NICE" "$BIN/meshgate-$svc" >"$RUN_DIR/$name-$svc.log" 2>&1 &
        pids+=("$!")
        mg_defer kill "$!"
    done
    wait_ready "http://127.0.0.1:$edge"
    TARGETS+=(--target "$name" "http://127.0.0.1:$edge" --key "$KEY" --pids "$(IFS=,; echo "${pids[*]}")")
}

if [[ " $MODES " == *" six"* ]]; then
    export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/meshgate_bench}
    export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
    psql "${DATABASE_URL%/*}/postgres" -qtc "SELECT 1 FROM pg_database WHERE datname = '${DATABASE_URL##*/}'" | grep -q 1 ||
        psql "${DATABASE_URL%/*}/postgres" -qc "CREATE DATABASE ${DATABASE_URL##*/}"
    "$BIN/meshgate" migrate
    # Creates only what is missing: one development PKI for every run.
    "$BIN/meshgate" certs --out "$RUN_DIR/tls" >/dev/null
fi
if [[ " $MODES " == *" six "* ]]; then start_six meshgate-6p 8091 52051 9121 mtls; fi
if [[ " $MODES " == *" six-plaintext "* ]]; then start_six meshgate-6p-plain 8093 54051 9141 plaintext; fi

args=(--nice "$NICE" --quiet-wait 60)
if [[ ${MESHGATE_BENCH_PEERS:-1} == 1 ]]; then
    args+=(--preset peers)
else
    args+=(--target mock http://127.0.0.1:18000 --pids "$("$PEERS/peers.sh" pids mock)")
fi
"$PEERS/bench.sh" "${args[@]}" "${TARGETS[@]}" "$@"
