# shellcheck shell=bash
# Running the project's own binaries for a check: requirements into the venv, free ports,
# background processes stopped at exit, waiting for an HTTP endpoint, and a standalone mesh
# config. Needs common.sh and python.sh (mg_python_setup done) sourced first; MG_LIVE_DIR holds
# each process's log.

# mg_pip_requirements FILE : installs FILE into the project venv unless that exact file already was.
mg_pip_requirements() {
    local requirements=$1 stamp want
    stamp="$MG_VENV/.meshgate-$(basename "$(dirname "$requirements")")-$(basename "$requirements").sha256"
    want=$(sha256sum "$requirements" | cut -d' ' -f1)
    if [[ ! -f $stamp || $(<"$stamp") != "$want" ]]; then
        mg_log "installing $requirements into $MG_VENV"
        mg_lock python "$MG_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
            -r "$requirements" >&2 || mg_die "pip install -r $requirements failed"
        echo "$want" >"$stamp"
    fi
}

# mg_meshgate_bins ENV_VAR : the directory with the meshgate and mock-provider binaries: $ENV_VAR
# when set, else a fresh debug build.
mg_meshgate_bins() {
    local dir=${!1:-}
    if [[ -z $dir ]]; then
        mg_log "building meshgate and the mock provider (debug)"
        cargo build --quiet -p meshgate -p meshgate-mock-provider >&2 || mg_die "cargo build failed"
        dir="${CARGO_TARGET_DIR:-$MG_ROOT/target}/debug"
    fi
    [[ -x $dir/meshgate && -x $dir/meshgate-mock-provider ]] || mg_die "no meshgate binaries in $dir"
    printf '%s\n' "$dir"
}

# mg_mesh_bins ENV_VAR : the directory (absolute) with every service's binary, meshgate's and the
# mock provider's: $ENV_VAR when set, else a fresh debug build.
mg_mesh_bins() {
    local dir=${!1:-} b packages=()
    local binaries=(meshgate meshgate-gateway meshgate-inference meshgate-router meshgate-quota meshgate-analytics
        meshgate-sync meshgate-mock-provider)
    if [[ -z $dir ]]; then
        mg_log "building the services, meshgate and the mock provider (debug)"
        for b in "${binaries[@]}"; do packages+=(-p "$b"); done
        cargo build --quiet "${packages[@]}" >&2 || mg_die "cargo build failed"
        dir="${CARGO_TARGET_DIR:-$MG_ROOT/target}/debug"
    fi
    dir=$(cd "$dir" && pwd -P) || mg_die "no directory $dir"
    for b in "${binaries[@]}"; do
        [[ -x $dir/$b ]] || mg_die "no $b in $dir"
    done
    printf '%s\n' "$dir"
}

# mg_watchdog SECONDS : past SECONDS this script ends as if interrupted (TERM), and its cleanup
# still runs: the watchdog is stopped first, so that it cannot interrupt the cleanup.
mg_watchdog() {
    local seconds=$1 script=$$
    (
        for ((i = 0; i < seconds; i++)); do sleep 1; done
        echo "[$MG_LOG_TAG] ERROR: still running after ${seconds}s: stopping" >&2
        kill -TERM "$script"
    ) &
    mg_defer_first mg_stop "$!"
}

# mg_free_ports N : N distinct free loopback ports (all held open until printed, so none repeats).
mg_free_ports() {
    "$MG_VENV/bin/python" -c '
import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))' "$1"
}

# mg_stop PID : SIGTERM, up to 10 s to drain, then SIGKILL.
mg_stop() {
    kill "$1" 2>/dev/null || return 0
    timeout 10 tail --pid="$1" -f /dev/null || kill -KILL "$1" 2>/dev/null || true
}

# mg_start NAME CMD... : runs CMD in the background, logging to $MG_LIVE_DIR/NAME.log, stopped at exit.
mg_start() {
    local name=$1
    shift
    "$@" >"$MG_LIVE_DIR/$name.log" 2>&1 &
    mg_defer mg_stop "$!"
}

# mg_wait_http URL NAME : waits up to 30 s for URL to answer 2xx; otherwise shows NAME's log.
mg_wait_http() {
    local url=$1 name=$2 i
    for ((i = 0; i < 150; i++)); do
        if "$MG_VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
            "$url" 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    mg_warn "$name did not answer at $url; its log:"
    tail -n 30 "$MG_LIVE_DIR/$name.log" >&2 || true
    return 1
}

# mg_standalone_listen EDGE_PORT GRPC_PORTS ADMIN_PORTS : the `[standalone]` section placing a
# `meshgate up` on the given ports (six comma-separated gRPC and admin ports), with its data
# (the on-disk job queue) under $MG_LIVE_DIR so that checks running at once never share it.
mg_standalone_listen() {
    printf '[standalone]\nedge = "127.0.0.1:%s"\ngrpc_ports = [%s]\nadmin_ports = [%s]\ndata_dir = "%s"\n' \
        "$1" "$2" "$3" "$MG_LIVE_DIR/data"
}
