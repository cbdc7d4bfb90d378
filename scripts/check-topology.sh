#!/usr/bin/env bash
# The Helm chart's topology, run for real: renders the chart with what a real install sets
# (Postgres, Redis, a provider, two gateway replicas), starts every Deployment replica's binary
# and the migration Job with the rendered command, environment, volumes and user, each "pod" in
# its own network namespace on a bridge with its own address, the chart's Service names resolved
# to the pods behind them (/etc/netns/<ns>/hosts) and the NetworkPolicies enforced in each pod
# (nftables), the mesh certificates from `meshgate certs` in the Secrets the chart names (as an
# operator makes them). Then a smoke suite through both gateway replicas and probes of an internal
# port's mTLS (deploy/tools/topology.py), and a check that no policy refused a call of the
# release's pods.
#
# Run from the suite as `scripts/test.sh scripts/check-topology.sh` (it then uses the suite's
# Postgres and Redis; alone it finds or starts its own). Needs root (network namespaces, mounts).
# MESHGATE_TOPOLOGY_BIN=DIR uses the binaries in DIR instead of a debug build;
# MESHGATE_TOPOLOGY_CHART=DIR checks another copy of the chart (e.g. a release's) with this suite;
# MESHGATE_TOPOLOGY_TIMEOUT (default 300) bounds the whole run in seconds.
# shellcheck source-path=SCRIPTDIR/..
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MG_LOG_TAG=check-topology
source scripts/lib/common.sh
source scripts/lib/postgres.sh
source scripts/lib/redis.sh
source scripts/lib/python.sh
source scripts/lib/live.sh
cd "$MG_ROOT"
mg_cleanup_init

[[ $EUID -eq 0 ]] || mg_die "needs root: it makes network namespaces and mounts"

mg_need_cmd ip iproute2
mg_need_cmd nft nftables
mg_need_cmd socat socat
mg_need_cmd setpriv util-linux
mg_python_setup
mg_pip_requirements deploy/tools/requirements.txt

# --- binaries ----------------------------------------------------------------------------------
bin=$(mg_mesh_bins MESHGATE_TOPOLOGY_BIN)

# A watchdog (the build above is not counted).
mg_watchdog "${MESHGATE_TOPOLOGY_TIMEOUT:-300}"

MG_LIVE_DIR="$MG_ROOT/.run/topology-$$"
mg_defer rm -rf "$MG_LIVE_DIR"
mkdir -p "$MG_LIVE_DIR"
# The pods run as the chart's user and must reach their volumes.
chmod 755 "$MG_LIVE_DIR"

# --- stores ------------------------------------------------------------------------------------
# url_port URL : the port of a postgres:// or redis:// URL.
url_port() { sed -E 's#^[a-z]+://([^@/]*@)?[^:/]+:([0-9]+).*#\2#' <<<"$1"; }

if [[ -n ${MESHGATE_TEST_DATABASE_URL:-} ]]; then
    MG_PG_PORT=$(url_port "$MESHGATE_TEST_DATABASE_URL")
else
    mg_pg_ensure
fi
mg_pg_create_db "meshgate_topology_$(date -u +%Y%m%d%H%M%S)_$$"
if [[ -n ${MESHGATE_TEST_REDIS_URL:-} ]]; then
    MG_REDIS_PORT=$(url_port "$MESHGATE_TEST_REDIS_URL")
else
    mg_redis_ensure
fi

# --- network -----------------------------------------------------------------------------------
# Names stay under the 15 characters of an interface name: mt<id>b, mt<id>v<n>.
id=$(($$ % 100000))
prefix="mt$id-"
subnet=
for _ in $(seq 20); do
    candidate="10.$((200 + RANDOM % 50)).$((RANDOM % 256))"
    if ! ip -4 route show | grep -q "^$candidate\." && ! ip -4 addr show | grep -q "inet $candidate\."; then
        subnet=$candidate
        break
    fi
done
[[ -n $subnet ]] || mg_die "found no free 10.x.y.0/24 for the pods"
node="$subnet.1"
bridge="mt${id}b"
mg_defer ip link del "$bridge"
ip link add "$bridge" type bridge
ip addr add "$node/24" dev "$bridge"
ip link set "$bridge" up
mg_log "pods on $subnet.0/24 (bridge $bridge, the node at $node)"

# The machine's Postgres and Redis listen on 127.0.0.1 only: the node forwards ports of its own
# address to them (ports free here, whatever else listens on all addresses).
read -r pg_port redis_port mock_port <<<"$(mg_free_ports 3)"
mg_start forward-postgres socat "TCP-LISTEN:$pg_port,bind=$node,fork,reuseaddr" "TCP:127.0.0.1:$MG_PG_PORT"
mg_start forward-redis socat "TCP-LISTEN:$redis_port,bind=$node,fork,reuseaddr" "TCP:127.0.0.1:$MG_REDIS_PORT"
mg_start mock-provider "$bin/meshgate-mock-provider" --host "$node" --port "$mock_port" --models mock-gpt
mg_wait_http "http://$node:$mock_port/health" mock-provider || mg_die "the mock provider did not start"

# --- mTLS material -----------------------------------------------------------------------------
# A development CA and each service's certificate, for the names the chart's pods dial (release
# and namespace "meshgate"); and a renewal of them by the same CA, for the rotation.
certs() {
    "$bin/meshgate" certs --out "$1" --dns-prefix meshgate- \
        --domain meshgate --domain meshgate.svc --domain meshgate.svc.cluster.local >>"$MG_LIVE_DIR/certs.log" 2>&1 ||
        { cat "$MG_LIVE_DIR/certs.log" >&2; mg_die "meshgate certs failed"; }
}
certs "$MG_LIVE_DIR/certs"
mkdir "$MG_LIVE_DIR/rotated"
cp "$MG_LIVE_DIR/certs/ca.crt" "$MG_LIVE_DIR/certs/ca.key" "$MG_LIVE_DIR/rotated/"
certs "$MG_LIVE_DIR/rotated"

# --- the pods ----------------------------------------------------------------------------------
models_args=()
if [[ -n ${MESHGATE_TEST_MODELS_DIR:-} && -n ${ORT_DYLIB_PATH:-} ]]; then
    models_args=(--models "$MESHGATE_TEST_MODELS_DIR" --ort "$ORT_DYLIB_PATH")
fi
admin_key="mg-topology-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
"$MG_VENV/bin/python" deploy/tools/topology.py plan --out "$MG_LIVE_DIR" --subnet "$subnet" --bin "$bin" \
    --chart "${MESHGATE_TOPOLOGY_CHART:-helm/meshgate}" \
    --database-url "postgres://postgres@$node:$pg_port/$MG_PG_DB" --redis-url "redis://$node:$redis_port/0" \
    --upstream "http://$node:$mock_port/v1" --admin-key "$admin_key" --quota-prefix "topology-$$:" \
    --certs "$MG_LIVE_DIR/certs" "${models_args[@]}" || mg_die "cannot plan the pods"

# A container's volumes hide what this machine has below their mount points (an emptyDir on /tmp
# hides a checkout under /tmp): binaries and the ONNX Runtime library found there are linked (or
# copied) into a directory outside them, and the launchers point at that copy.
staged=""
while read -r point; do
    for host_path in "$bin" "${ORT_DYLIB_PATH:-}"; do
        [[ -n $host_path && $host_path == "$point"/* ]] || continue
        if [[ -z $staged ]]; then
            staged=$(mktemp -d /var/tmp/meshgate-topology.XXXXXX)
            chmod 755 "$staged"
            mg_defer rm -rf "$staged"
        fi
        if [[ -d $host_path ]]; then
            target=$staged/bin
            mkdir -p "$target"
            for b in "$host_path"/meshgate*; do
                [[ -x $b && -f $b ]] && { ln "$b" "$target/" 2>/dev/null || cp "$b" "$target/"; }
            done
        else
            target=$staged/$(basename "$host_path")
            ln "$host_path" "$target" 2>/dev/null || cp "$host_path" "$target"
        fi
        mg_log "$host_path is below the pods' mount point $point: they use $target"
        sed -i "s|$host_path|$target|g" "$MG_LIVE_DIR"/pods/*/run.sh
    done
done <"$MG_LIVE_DIR/mountpoints"

# Mount points the containers see that this machine lacks (e.g. /etc/meshgate) are made for the
# run and recorded. Runs at the same time share them (each holds a shared lock): removing one
# would unmount it in the other run's pods, so only the last run out removes them.
MOUNTPOINTS_LOCK=/run/lock/meshgate-topology.lock
MOUNTPOINTS_MADE=/run/lock/meshgate-topology.mountpoints
remove_mountpoints() {
    flock -x -n 8 || return 0
    if [[ -f $MOUNTPOINTS_MADE ]]; then
        xargs -r -d '\n' rmdir --ignore-fail-on-non-empty <"$MOUNTPOINTS_MADE"
        rm -f "$MOUNTPOINTS_MADE"
    fi
}
exec 8>>"$MOUNTPOINTS_LOCK"
flock -s 8
mg_defer remove_mountpoints
while read -r point; do
    if [[ ! -e $point ]]; then
        mkdir "$point"
        echo "$point" >>"$MOUNTPOINTS_MADE"
    fi
done <"$MG_LIVE_DIR/mountpoints"

n=0
while IFS=$'\t' read -r -u 3 name ip _ _; do
    ns="$prefix$name"
    pod="$MG_LIVE_DIR/pods/$name"
    mg_defer ip netns del "$ns"
    ip netns add "$ns"
    if [[ ! -d /etc/netns ]]; then
        mg_defer rmdir --ignore-fail-on-non-empty /etc/netns
        mkdir /etc/netns
    fi
    mg_defer rm -rf "/etc/netns/$ns"
    mkdir "/etc/netns/$ns"
    cp "$pod/hosts" "/etc/netns/$ns/hosts"
    ip link add "mt${id}v$n" type veth peer name eth0 netns "$ns"
    ip link set "mt${id}v$n" master "$bridge" up
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    if [[ -s $pod/policy.nft ]]; then
        ip netns exec "$ns" nft -f "$pod/policy.nft"
    fi
    n=$((n + 1))
done 3<"$MG_LIVE_DIR/pods.tsv"

# show_logs : the last lines of every pod's log (the run's directory goes at exit).
show_logs() {
    local log
    for log in "$MG_LIVE_DIR"/*-[0-9].log; do
        mg_log "--- last lines of $(basename "$log")"
        tail -n 15 "$log" >&2
    done
}

# pod_command NAME : sets POD_COMMAND to the pod's launcher in its network namespace and a mount
# namespace of its own (every step execs the next, so its pid is the container process's).
pod_command() {
    POD_COMMAND=(ip netns exec "$prefix$1" unshare --mount --propagation private bash "$MG_LIVE_DIR/pods/$1/run.sh")
}

# The migration Job first (a post-install hook), retried as its backoffLimit would.
while IFS=$'\t' read -r -u 3 name _ kind _; do
    [[ $kind == Job ]] || continue
    for attempt in 1 2 3 4 5; do
        pod_command "$name"
        if "${POD_COMMAND[@]}" >>"$MG_LIVE_DIR/$name.log" 2>&1; then
            mg_log "$name: done"
            break
        fi
        ((attempt < 5)) || { tail -n 20 "$MG_LIVE_DIR/$name.log" >&2; mg_die "$name failed"; }
        sleep 1
    done
done 3<"$MG_LIVE_DIR/pods.tsv"

declare -A pids
while IFS=$'\t' read -r -u 3 name _ kind _; do
    [[ $kind == Deployment ]] || continue
    pod_command "$name"
    mg_start "$name" "${POD_COMMAND[@]}"
    pids[$name]=$!
done 3<"$MG_LIVE_DIR/pods.tsv"
while IFS=$'\t' read -r -u 3 name ip kind admin; do
    [[ $kind == Deployment ]] || continue
    mg_wait_http "http://$ip:$admin/readyz" "$name" || { show_logs; mg_die "$name did not become ready"; }
done 3<"$MG_LIVE_DIR/pods.tsv"
mg_log "every pod is ready"

# --- checks ------------------------------------------------------------------------------------
failed=0
if ! "$MG_VENV/bin/python" deploy/tools/topology.py smoke --plan "$MG_LIVE_DIR/plan.json" --certs "$MG_LIVE_DIR/certs" \
    --rotated-certs "$MG_LIVE_DIR/rotated" --probe-netns "${prefix}gateway-0"; then
    failed=1
    show_logs
fi
"$MG_VENV/bin/python" deploy/tools/topology.py policy --pods "$MG_LIVE_DIR/pods.tsv" --netns-prefix "$prefix" ||
    failed=1
# The same processes throughout: none exited (a rotation, for one, needs no restart).
for name in "${!pids[@]}"; do
    if ! kill -0 "${pids[$name]}" 2>/dev/null; then
        mg_warn "$name exited during the run"
        failed=1
    fi
done
if ((failed)); then
    mg_die "the topology check failed"
fi
mg_log "the chart's topology runs as drawn"
