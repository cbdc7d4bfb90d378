#!/usr/bin/env bash
# Creates (or reuses) the project venv at <repo>/.venv with scripts/requirements.txt installed.
# Idempotent: pip runs only when the requirements changed since the last successful install
# (a stamp file holds their sha256). Prints the venv path on stdout; everything else is quiet.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MESHGATE_VENV:-$repo_root/.venv}"
requirements="$repo_root/scripts/requirements.txt"
stamp="$venv/.meshgate-requirements.sha256"
python="${PYTHON:-python3}"

log() { echo "setup-python: $*" >&2; }

want_hash="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want_hash" ]]; then
    echo "$venv"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    # A half-created venv (ensurepip missing) would make every later run fail: start clean.
    rm -rf "$venv"
    if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        # Debian ships venv/ensurepip separately from python3.
        if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
            log "python3 -m venv failed; installing python3-venv"
            export DEBIAN_FRONTEND=noninteractive
            apt-get install -y -qq python3-venv >/dev/null 2>&1 \
                || { apt-get update -qq >/dev/null && apt-get install -y -qq python3-venv >/dev/null; }
            "$python" -m venv "$venv"
        else
            log "cannot create a venv with $python (install python3-venv)"
            exit 1
        fi
    fi
fi

log "installing $(grep -cvE '^\s*(#|$)' "$requirements") packages into $venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements" >&2
echo "$want_hash" >"$stamp"
echo "$venv"
