#!/usr/bin/env bash
# The chaos suite (issue 19): the six services as separate processes (two gateway replicas) with
# Postgres and Redis, the mock provider as the only upstream, a steady open-loop mixed load from
# three tenants with tight budgets, and faults held then healed (SIGKILL and restart of each
# service in turn; Redis FLUSHALL and restart, Redis stalled; Postgres restarted and stalled; a
# provider that hangs, answers 500 or 429 with
# Retry-After, or cuts its streams, set on the running mock through its PUT /_mock/behavior), with
# the invariants checked after every fault and at the end (scripts/chaos/run.py says which).
# RELIABILITY.md has the results.
#
# Usage: scripts/chaos.sh [run.py options]     e.g. scripts/chaos.sh --rate 30 --duration-per-fault 5
#        scripts/chaos.sh --faults quota,redis-flushall      (a subset, in that order)
#        scripts/chaos.sh --faults provider-hang,provider-500,provider-429,provider-cut
#        scripts/chaos.sh --idempotent-provider              (the mock honours Idempotency-Key)
#        scripts/chaos.sh --help                             (every option of the runner)
# Knobs: MESHGATE_CHAOS_BIN=DIR uses the binaries in DIR (meshgate, meshgate-{gateway,inference,
#   router,quota,analytics,sync}, meshgate-mock-provider) instead of a debug build;
#   MESHGATE_CHAOS_TIMEOUT (default 1200) caps the whole run in seconds (the build is not counted).
# Everything runs on loopback, gRPC in plaintext (this slice; mTLS is the deployments' default).
# Postgres: the run's own throwaway cluster (initdb as the postgres user; stopped, stalled and
# restarted by its faults), deleted at exit. Redis: the runner's own redis-server on a free port
# (it flushes, stalls and restarts it).
# Output: .run/chaos/<UTC timestamp>/ (report.json, requests.jsonl, logs/, the soak's
# soak-*.png plots); exit 1 when an
# invariant failed, 2 when the run itself could not complete.
# shellcheck source-path=SCRIPTDIR/..
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MG_LOG_TAG=chaos.sh
source scripts/lib/common.sh
source scripts/lib/postgres.sh
source scripts/lib/python.sh
source scripts/lib/live.sh
cd "$MG_ROOT"
mg_cleanup_init

for arg in "$@"; do
    if [[ $arg == -h || $arg == --help ]]; then
        exec python3 scripts/chaos/run.py --help
    fi
done

mg_need_cmd redis-server redis-server
mg_python_setup
mg_pip_requirements scripts/chaos/requirements.txt
mg_export_ort_dylib_path

# --- binaries ----------------------------------------------------------------------------------
shape=debug
[[ ${MESHGATE_CHAOS_BIN:-} == */release || ${MESHGATE_CHAOS_BIN:-} == */release/ ]] && shape=release
bin=$(mg_mesh_bins MESHGATE_CHAOS_BIN)

# A watchdog (the build above is not counted); the runner's children die with it (PR_SET_PDEATHSIG).
timeout_secs=${MESHGATE_CHAOS_TIMEOUT:-1200}
mg_watchdog "$timeout_secs"

# --- Postgres: a cluster of the run's own (its faults stop and restart it), one fresh database --
mg_need_cmd psql postgresql-client
MG_PG_DURABLE=1 mg_pg_start_throwaway 55432
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mg_pg_create_db "meshgate_chaos_${stamp,,}_$$"
export DATABASE_URL="postgres://postgres@127.0.0.1:$MG_PG_PORT/$MG_PG_DB"
out="$MG_ROOT/.run/chaos/$stamp"
mkdir -p "$out/bin" "$out/logs"
mg_defer rm -rf "$out/bin"
mg_log "run directory $out"
"$bin/meshgate" migrate >"$out/logs/migrate.log" 2>&1 || mg_die "meshgate migrate failed (see $out/logs/migrate.log)"
# A snapshot of the binaries (hard links when possible): a rebuild during the run must not change
# what a restarted service runs.
for b in meshgate-gateway meshgate-inference meshgate-router meshgate-quota meshgate-analytics meshgate-sync \
    meshgate-mock-provider; do
    ln "$bin/$b" "$out/bin/$b" 2>/dev/null || cp "$bin/$b" "$out/bin/$b"
done

# The runner in the background so that a signal to this script reaches the trap at once; the
# trap stops the runner by its pid (its children follow it).
"$MG_VENV/bin/python" scripts/chaos/run.py --bin "$out/bin" --database-url "$DATABASE_URL" --out "$out" \
    --pg-dir "$MG_PG_DIR" --pg-bindir "$MG_PG_BINDIR" \
    --total-timeout "$((timeout_secs - 30))" --shape "$shape binaries, plaintext gRPC on loopback" "$@" &
runner=$!
mg_defer mg_stop "$runner"
status=0
wait "$runner" || status=$?
# The soak's curves (soak-<round>-<measure>.png beside report.json).
if [[ -f $out/report.json ]] && grep -q '"samples"' "$out/report.json"; then
    "$MG_VENV/bin/python" scripts/chaos/plot.py "$out" >&2 || mg_warn "plotting the soak failed"
fi
exit "$status"
