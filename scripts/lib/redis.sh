# shellcheck shell=bash disable=SC2034 # MG_* outputs are read by the sourcing script
# Redis for test runs. mg_redis_ensure uses the server on 127.0.0.1:${MESHGATE_REDIS_PORT:-6379}
# when it answers PING without auth; otherwise it starts a throwaway, memory-only redis-server
# that is killed (and its temp dir deleted) at exit.
# Needs common.sh sourced and mg_cleanup_init called.
#
# Sets: MG_REDIS_PORT.

MG_REDIS_PORT=

# mg_redis_ping PORT : true when 127.0.0.1:PORT answers PING with PONG (so no auth is needed).
mg_redis_ping() {
    local reply
    if mg_have redis-cli; then
        reply=$(timeout 3 redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null) || return 1
    else
        # RESP inline command over bash's /dev/tcp when redis-tools is not installed.
        # shellcheck disable=SC2016 # $0 is expanded by the inner bash
        reply=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" && printf "PING\r\n" >&3 && head -n 1 <&3' \
            "$1" 2>/dev/null) || return 1
        reply=${reply#+}
    fi
    [[ ${reply%$'\r'} == PONG ]]
}

# Throwaway servers run in mktemp dirs named like this; it is how runs recognise each other's.
MG_REDIS_THROWAWAY_DIR=meshgate-redis.

mg__redis_is_throwaway() {
    local reply
    # Without redis-cli no throwaway can exist: redis-server's package brings redis-cli.
    mg_have redis-cli || return 1
    reply=$(timeout 3 redis-cli -h 127.0.0.1 -p "$1" config get dir 2>/dev/null) || return 1
    [[ $reply == *"/$MG_REDIS_THROWAWAY_DIR"* ]]
}

mg_redis_ensure() {
    local port="${MESHGATE_REDIS_PORT:-6379}"
    if mg_redis_ping "$port"; then
        if ! mg__redis_is_throwaway "$port"; then
            MG_REDIS_PORT=$port
            mg_log "Redis: using the server on 127.0.0.1:$port"
            return 0
        fi
        # Another run's server vanishes when that run ends, under our tests' feet.
        mg_log "Redis on 127.0.0.1:$port is another test run's throwaway server; starting our own"
    elif mg_tcp_open "$port"; then
        mg_warn "something on 127.0.0.1:$port does not answer PING without auth; starting a throwaway Redis"
    else
        mg_log "Redis: nothing answers on 127.0.0.1:$port; starting a throwaway server"
    fi
    mg_redis_start_throwaway "$port"
}

# mg_redis_start_throwaway PREFERRED_PORT
mg_redis_start_throwaway() {
    local preferred=$1 dir port pid i
    mg_need_cmd redis-server redis-server
    dir=$(mktemp -d "${TMPDIR:-/tmp}/${MG_REDIS_THROWAWAY_DIR}XXXXXX")
    mg_defer mg__redis_teardown "$dir"
    while read -r port; do
        # Memory only: no RDB snapshots, no AOF.
        redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$dir" \
            --daemonize no >>"$dir/redis.log" 2>&1 &
        pid=$!
        echo "$pid" >"$dir/pid"
        for ((i = 0; i < 50; i++)); do
            if mg_redis_ping "$port"; then
                MG_REDIS_PORT=$port
                mg_log "Redis: throwaway server on 127.0.0.1:$port (pid $pid)"
                return 0
            fi
            # Exited: usually the port was taken between the probe and the bind.
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        mg__redis_stop "$dir"
    done < <(mg_port_candidates "$preferred")
    tail -n 20 "$dir/redis.log" >&2 || true
    mg_die "could not start a throwaway Redis (log above)"
}

mg__redis_stop() {
    local dir=$1 pid i
    [[ -f $dir/pid ]] || return 0
    pid=$(<"$dir/pid")
    rm -f "$dir/pid"
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

mg__redis_teardown() {
    mg__redis_stop "$1"
    rm -rf "$1"
}
