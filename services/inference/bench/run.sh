#!/usr/bin/env bash
# Local-inference benchmark: the Rust service (over gRPC on loopback) beside a Python
# onnxruntime loop on the same model files, threads and inputs, measured in one run.
#
# Usage: services/inference/bench/run.sh [OUT_DIR]     (default <repo>/bench-results/inference-<time>)
# Needs the models of scripts/fetch-models.sh (generation figures need --with-chat; skipped
# without). Knobs: THREADS (intra-op threads, default 2), DURATION (seconds per embedding point,
# default 10), CONCURRENCY (default "1 8 32"), RUNS (generation rounds, default 3), MAX_TOKENS
# (default 64), MAX_BATCH (texts per call with batching, default 8), MAX_WAIT_US (batching wait,
# default 1000), INTRA_OP_SPINNING (1: idle ONNX Runtime threads busy-wait, both sides; default 0
# as the service), MODELS (models dir).
# Results: OUT_DIR/results.jsonl (one JSON object per measurement) and OUT_DIR/results.md.
# shellcheck source-path=SCRIPTDIR/../../..
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
MG_LOG_TAG=bench-inference
source scripts/lib/common.sh
source scripts/lib/python.sh
cd "$MG_ROOT"

THREADS=${THREADS:-2}
DURATION=${DURATION:-10}
CONCURRENCY=${CONCURRENCY:-1 8 32}
RUNS=${RUNS:-3}
MAX_TOKENS=${MAX_TOKENS:-64}
MAX_WAIT_US=${MAX_WAIT_US:-1000}
MAX_BATCH=${MAX_BATCH:-8}
MODELS=${MODELS:-$MG_ROOT/models}
export INTRA_OP_SPINNING=${INTRA_OP_SPINNING:-0}
OUT=${1:-$MG_ROOT/bench-results/inference-$(date -u +%Y%m%dT%H%M%SZ)}
EMBED_MODEL=all-minilm-l6-v2
CHAT_MODEL=smollm2-135m-instruct

[[ -f $MODELS/manifest.json ]] || mg_die "no models in $MODELS: run scripts/fetch-models.sh [--with-chat]"
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

mg_python_setup
mg_export_ort_dylib_path
PY=$MG_VENV/bin/python

mg_log "building the benchmark driver (release)"
cargo build --release -q -p meshgate-inference --example bench
BENCH=${CARGO_TARGET_DIR:-$MG_ROOT/target}/release/examples/bench

# Inputs: the task classifier's held-out prompts (varied lengths, deterministic), and a few chat prompts.
"$PY" -c 'import sys; sys.path.insert(0, "scripts/models"); import task_data
print("\n".join(t.replace("\n", " ") for t, _ in task_data.generate()[1]))' >"$OUT/sentences.txt"
printf '%s\n' "Tell me a story about a dragon who learns to fly." \
    "Explain how a rainbow forms." "Write a Python function that checks whether a number is prime." >"$OUT/prompts.txt"

for c in $CONCURRENCY; do
    mg_log "embeddings, concurrency $c: Python onnxruntime"
    "$PY" services/inference/bench/bench_python.py embed "$MODELS/$EMBED_MODEL" "$OUT/sentences.txt" \
        "$THREADS" "$DURATION" "$c" | tee -a "$RESULTS"
    for transport in engine grpc; do
        mg_log "embeddings, concurrency $c: meshgate ($transport), batching off"
        "$BENCH" "$MODELS" embed "$EMBED_MODEL" "$OUT/sentences.txt" "$THREADS" "$DURATION" "$c" 1 0 "$transport" |
            tee -a "$RESULTS"
        mg_log "embeddings, concurrency $c: meshgate ($transport), dynamic batching ($MAX_BATCH texts, ${MAX_WAIT_US} µs)"
        "$BENCH" "$MODELS" embed "$EMBED_MODEL" "$OUT/sentences.txt" "$THREADS" "$DURATION" "$c" "$MAX_BATCH" \
            "$MAX_WAIT_US" "$transport" | tee -a "$RESULTS"
    done
done

if [[ -f $MODELS/$CHAT_MODEL/model.onnx ]]; then
    mg_log "generation: Python onnxruntime loop"
    "$PY" services/inference/bench/bench_python.py generate "$MODELS/$CHAT_MODEL" "$OUT/prompts.txt" \
        "$THREADS" "$RUNS" "$MAX_TOKENS" | tee -a "$RESULTS"
    mg_log "generation: meshgate"
    "$BENCH" "$MODELS" generate "$CHAT_MODEL" "$OUT/prompts.txt" "$THREADS" "$RUNS" "$MAX_TOKENS" | tee -a "$RESULTS"
else
    mg_warn "no $CHAT_MODEL (scripts/fetch-models.sh --with-chat): generation figures skipped"
fi

mg_log "resident memory per model"
"$BENCH" "$MODELS" memory "$THREADS" | tee -a "$RESULTS"

"$PY" - "$RESULTS" >"$OUT/results.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| embeddings (one text per request) | concurrency | req/s | p50 ms | p99 ms | CPU ms / request | texts per call |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    if r["what"] == "embed":
        if r["impl"] == "python-ort":
            name = "Python onnxruntime, batch-1 loop per thread"
        else:
            where = "in-process engine" if r["impl"] == "rust-engine" else "gRPC"
            how = "batching off" if r["max_batch_size"] == 1 else f"dynamic batching ({r['max_batch_size']}, {r['max_wait_us']} µs)"
            name = f"meshgate {where}, {how}"
        mean = r.get("mean_batch")
        print(f"| {name} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['cpu_ms_per_request']:.2f} | {'' if mean is None else f'{mean:.1f}'} |")
gen = [r for r in rows if r["what"] == "generate"]
if gen:
    print("\n| generation | time to first token p50 (ms) | tokens/s p50 | generations |")
    print("|---|---:|---:|---:|")
    for r in gen:
        name = "Python onnxruntime loop" if r["impl"] == "python-ort" else "meshgate (gRPC stream)"
        print(f"| {name} | {r['ttft_p50_ms']:.1f} | {r['tokens_per_s_p50']:.1f} | {r['generations']} |")
print("\n| model | file MiB | RSS after load MiB | RSS after first request MiB |")
print("|---|---:|---:|---:|")
for r in rows:
    if r["what"] == "memory":
        print(f"| {r['model']} | {r['file_mib']:.0f} | {r['rss_after_load_mib']:.0f} | {r['rss_after_first_request_mib']:.0f} |")
PY
cat "$OUT/results.md"
mg_log "results in $OUT"
