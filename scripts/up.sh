#!/usr/bin/env bash
# Builds meshgate and runs `meshgate up`: all six services in one process on loopback ports.
#
# Usage: scripts/up.sh [ARGS for `meshgate up`...]    (from any directory)
# The environment passes through untouched (DATABASE_URL, REDIS_URL, MESHGATE_* ...). When
# MESHGATE_ADMIN_KEY is unset, a bootstrap admin key is generated once into .run/admin-key and
# reused on later runs.
# shellcheck source-path=SCRIPTDIR/..
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MG_LOG_TAG=up.sh
source scripts/lib/common.sh
source scripts/lib/python.sh
cd "$MG_ROOT"

mg_log "building meshgate (release)"
cargo build --release -p meshgate

mg_python_setup
mg_export_ort_dylib_path

if [[ -f scripts/fetch-models.sh ]]; then bash scripts/fetch-models.sh; fi

if [[ -z ${MESHGATE_ADMIN_KEY:-} ]]; then
    key_file=.run/admin-key
    if [[ ! -s $key_file ]]; then
        mkdir -p .run
        tmp=$(mktemp .run/admin-key.XXXXXX)
        printf 'mg-admin-%s\n' "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >"$tmp"
        chmod 600 "$tmp"
        # -n: a concurrent run that wrote its key first wins, and both then use that one.
        mv -n "$tmp" "$key_file"
        rm -f "$tmp"
    fi
    MESHGATE_ADMIN_KEY=$(<"$key_file")
    export MESHGATE_ADMIN_KEY
    mg_log "admin key (from $key_file): $MESHGATE_ADMIN_KEY"
    key_hint=$MESHGATE_ADMIN_KEY
else
    # shellcheck disable=SC2016 # printed for the user's shell to expand
    key_hint='$MESHGATE_ADMIN_KEY'
fi

mg_log "edge: http://127.0.0.1:8080 (the default; meshgate logs its actual listeners on start)"
mg_log "try:  curl -H \"Authorization: Bearer $key_hint\" http://127.0.0.1:8080/v1/models"
exec "${CARGO_TARGET_DIR:-target}/release/meshgate" up "$@"
