# shellcheck shell=bash
# Shared helpers for scripts/*.sh: logging, an exit-time cleanup stack, apt installs, TCP probes
# and free-port picking. Source it; it defines functions and MG_* variables only.

MG_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
MG_LOG_TAG="${MG_LOG_TAG:-$(basename "$0")}"

mg_log() { printf '[%s] %s\n' "$MG_LOG_TAG" "$*" >&2; }
mg_warn() { printf '[%s] WARNING: %s\n' "$MG_LOG_TAG" "$*" >&2; }
mg_die() {
    printf '[%s] ERROR: %s\n' "$MG_LOG_TAG" "$*" >&2
    exit 1
}

mg_have() { command -v "$1" >/dev/null 2>&1; }

# --- cleanup stack -----------------------------------------------------------------------------
# Commands registered with mg_defer run in reverse order when the script exits, whatever the
# reason (success, failure, Ctrl-C, SIGTERM). Register a cleanup *before* creating the resource,
# so a half-made one is removed too.
MG_CLEANUP=()
MG_CLEANUP_FIRST=()

mg_defer() {
    local cmd
    printf -v cmd '%q ' "$@"
    MG_CLEANUP+=("$cmd")
}

# mg_defer_first CMD... : like mg_defer, but runs before every mg_defer command, whenever either
# was registered (e.g. stopping a watchdog, which must not interrupt the cleanup).
mg_defer_first() {
    local cmd
    printf -v cmd '%q ' "$@"
    MG_CLEANUP_FIRST+=("$cmd")
}

mg__run_cleanup() {
    local status=$? i
    set +e
    trap - EXIT INT TERM
    for ((i = ${#MG_CLEANUP_FIRST[@]} - 1; i >= 0; i--)); do
        eval "${MG_CLEANUP_FIRST[i]}"
    done
    for ((i = ${#MG_CLEANUP[@]} - 1; i >= 0; i--)); do
        eval "${MG_CLEANUP[i]}"
    done
    exit "$status"
}

mg_cleanup_init() {
    trap mg__run_cleanup EXIT
    # Turning signals into exits makes the EXIT trap run for them too.
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# --- packages ----------------------------------------------------------------------------------
MG_APT_UPDATED=0

# mg_apt_install PKG... : installs Debian packages (root only). A lock serialises parallel runs
# of our scripts; apt's own lock timeout covers other apt users.
mg_apt_install() {
    if [[ $EUID -ne 0 ]]; then
        mg_die "need packages [$*] but not running as root; install them and retry"
    fi
    mg_have apt-get || mg_die "need packages [$*] and apt-get is not available"
    local apt=(apt-get -y -q -o DPkg::Lock::Timeout=600)
    mg_log "installing $* (apt-get)"
    (
        flock 9
        export DEBIAN_FRONTEND=noninteractive
        if [[ $MG_APT_UPDATED -eq 0 ]]; then
            "${apt[@]}" update >&2
        fi
        "${apt[@]}" install --no-install-recommends "$@" >&2
    ) 9>/var/lock/meshgate-apt.lock || mg_die "apt-get install $* failed"
    MG_APT_UPDATED=1
}

# mg_need_cmd CMD PKG : makes sure CMD is on PATH, installing PKG when it is not.
mg_need_cmd() {
    mg_have "$1" && return 0
    mg_apt_install "$2"
    mg_have "$1" || mg_die "$2 was installed but '$1' is still not on PATH"
}

# --- network -----------------------------------------------------------------------------------

# mg_tcp_open PORT : true when something accepts TCP connections on 127.0.0.1:PORT.
mg_tcp_open() {
    # shellcheck disable=SC2016 # $0 is expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$1" 2>/dev/null
}

# mg_port_candidates PREFERRED : prints PREFERRED (when free) then random free ports, one per
# line, for "try to start a server here" loops. Freeness is only a hint (another process may
# bind the port first), so callers retry on the next candidate when their server fails to bind.
mg_port_candidates() {
    local preferred=$1 n=0 port
    if ! mg_tcp_open "$preferred"; then
        echo "$preferred"
    fi
    while ((n < 8)); do
        port=$((20000 + RANDOM % 40000))
        if ! mg_tcp_open "$port"; then
            echo "$port"
            n=$((n + 1))
        fi
    done
}

# mg_lock NAME CMD... : runs CMD holding an exclusive per-checkout lock, so parallel runs do not
# rebuild the venv or the test models at the same time.
mg_lock() {
    local name=$1
    shift
    mkdir -p "$MG_ROOT/.run/locks"
    flock "$MG_ROOT/.run/locks/$name.lock" "$@"
}
