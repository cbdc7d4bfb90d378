# shellcheck shell=bash
# Postgres for test runs. mg_pg_ensure uses the server on 127.0.0.1:${MESHGATE_PG_PORT:-5432} when
# it accepts a passwordless login as user postgres; otherwise it starts a throwaway cluster
# (trust auth, unix socket in its temp dir) that is stopped and deleted at exit.
# Needs common.sh sourced and mg_cleanup_init called.
#
# Sets: MG_PG_PORT, MG_PG_THROWAWAY (0 or 1), MG_PG_DB (mg_pg_create_db); for a throwaway
# cluster also MG_PG_DIR (its directory: data/, the socket, postgres.log) and MG_PG_BINDIR.

MG_PG_PORT=
MG_PG_THROWAWAY=0
MG_PG_DB=
MG_PG_DIR=
MG_PG_BINDIR=

# psql against 127.0.0.1:PORT as postgres, never prompting and ignoring any password in the
# caller's environment: the URL the tests get carries no password, so this must work without one.
mg__psql() {
    local port=$1
    shift
    env -u PGPASSWORD PGPASSFILE=/nonexistent/meshgate-no-pgpass PGCONNECT_TIMEOUT=5 \
        psql -X -w -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"
}

mg_pg_answers() {
    if mg_have pg_isready; then
        pg_isready -q -h 127.0.0.1 -p "$1" -t 3
    else
        mg_tcp_open "$1"
    fi
}

mg_pg_login_ok() {
    mg__psql "$1" -d postgres -Atc 'SELECT 1' >/dev/null 2>&1
}

# Throwaway clusters live in mktemp dirs with this prefix; it is how runs recognise each other's.
MG_PG_THROWAWAY_PREFIX=/tmp/meshgate-pg.

mg__pg_is_throwaway() {
    local datadir
    datadir=$(mg__psql "$1" -d postgres -Atc "SELECT current_setting('data_directory')" 2>/dev/null) || return 1
    [[ $datadir == "$MG_PG_THROWAWAY_PREFIX"* ]]
}

# Prints the bin directory of the newest installed Postgres server (Debian layout first).
mg_pg_bindir() {
    local found=() initdb
    for initdb in /usr/lib/postgresql/*/bin/initdb; do
        [[ -x $initdb ]] && found+=("${initdb%/initdb}")
    done
    if ((${#found[@]})); then
        printf '%s\n' "${found[@]}" | sort -V | tail -n 1
    elif initdb=$(command -v initdb); then
        dirname "$initdb"
    else
        return 1
    fi
}

# mg__as_pg DIR CMD... : initdb and postgres refuse to run as root, so as root run them as the
# postgres user, from DIR because that user may not be able to read the caller's cwd.
mg__as_pg() {
    local dir=$1
    shift
    if [[ $EUID -eq 0 ]]; then
        (cd "$dir" && runuser -u postgres -- "$@")
    else
        (cd "$dir" && "$@")
    fi
}

mg_pg_ensure() {
    local port="${MESHGATE_PG_PORT:-5432}"
    mg_need_cmd psql postgresql-client
    if mg_pg_answers "$port"; then
        if ! mg_pg_login_ok "$port"; then
            mg_warn "Postgres on 127.0.0.1:$port answers but refuses a passwordless login as postgres; starting a throwaway server"
        elif mg__pg_is_throwaway "$port"; then
            # Another run's server vanishes when that run ends, under our tests' feet.
            mg_log "Postgres on 127.0.0.1:$port is another test run's throwaway server; starting our own"
        else
            MG_PG_PORT=$port
            MG_PG_THROWAWAY=0
            mg_log "Postgres: using the server on 127.0.0.1:$port"
            return 0
        fi
    else
        mg_log "Postgres: nothing answers on 127.0.0.1:$port; starting a throwaway server"
    fi
    mg_pg_start_throwaway "$port"
}

# mg_pg_start_throwaway PREFERRED_PORT
mg_pg_start_throwaway() {
    local preferred=$1 bindir dir port
    if ! bindir=$(mg_pg_bindir); then
        mg_apt_install postgresql
        bindir=$(mg_pg_bindir) || mg_die "postgresql installed but no initdb found"
    fi
    if [[ $EUID -eq 0 ]] && ! getent passwd postgres >/dev/null; then
        mg_die "running as root but there is no 'postgres' user to run initdb as"
    fi

    # /tmp rather than $TMPDIR: the postgres user must reach it, and the socket path must stay short.
    dir=$(mktemp -d "${MG_PG_THROWAWAY_PREFIX}XXXXXX")
    mg_defer mg__pg_teardown "$bindir" "$dir"
    if [[ $EUID -eq 0 ]]; then
        chown postgres: "$dir"
    fi

    if ! mg__as_pg "$dir" "$bindir/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --no-locale --no-sync \
        >"$dir/initdb.log" 2>&1; then
        cat "$dir/initdb.log" >&2
        mg_die "initdb failed"
    fi

    # Durability settings are off: the cluster is deleted at exit and only speed matters. With
    # MG_PG_DURABLE=1 (the chaos suite, which kills the server) a commit is acknowledged once its
    # WAL is written, so a killed server keeps it; the host itself never crashes, so no fsync.
    local opts="-c listen_addresses=127.0.0.1 -k $dir -c fsync=off"
    [[ ${MG_PG_DURABLE:-0} == 1 ]] || opts+=" -c synchronous_commit=off"
    opts+=" -c full_page_writes=off -c max_connections=200"
    while read -r port; do
        if mg__as_pg "$dir" "$bindir/pg_ctl" start -w -t 60 -D "$dir/data" -l "$dir/postgres.log" \
            -o "-p $port $opts" >/dev/null 2>&1 && mg_pg_login_ok "$port"; then
            MG_PG_PORT=$port
            MG_PG_THROWAWAY=1
            MG_PG_DIR=$dir
            MG_PG_BINDIR=$bindir
            mg_log "Postgres: throwaway server on 127.0.0.1:$port (data in $dir)"
            return 0
        fi
        # Usually the port was taken between the probe and the bind: try the next one.
        mg__pg_stop "$bindir" "$dir"
    done < <(mg_port_candidates "$preferred")
    tail -n 20 "$dir/postgres.log" >&2 || true
    mg_die "could not start a throwaway Postgres (log above)"
}

mg__pg_stop() {
    local bindir=$1 dir=$2
    [[ -f $dir/data/postmaster.pid ]] || return 0
    mg__as_pg "$dir" "$bindir/pg_ctl" stop -D "$dir/data" -m fast -w -t 30 >/dev/null 2>&1 ||
        mg__as_pg "$dir" "$bindir/pg_ctl" stop -D "$dir/data" -m immediate -w -t 30 >/dev/null 2>&1 ||
        mg_warn "could not stop the throwaway Postgres in $dir"
}

mg__pg_teardown() {
    local bindir=$1 dir=$2
    mg__pg_stop "$bindir" "$dir"
    if [[ ${KEEP_TEST_DB:-0} == 1 ]]; then
        local as=
        [[ $EUID -eq 0 ]] && as="runuser -u postgres -- "
        mg_log "KEEP_TEST_DB=1: kept the throwaway cluster's data in $dir/data (database ${MG_PG_DB:-none});" \
            "restart it with: ${as}$bindir/pg_ctl start -D $dir/data -o '-p ${MG_PG_PORT:-5432} -k $dir'"
    else
        rm -rf "$dir"
    fi
}

# mg_pg_create_db NAME : creates a fresh database, dropped at exit unless KEEP_TEST_DB=1.
mg_pg_create_db() {
    local name=$1
    MG_PG_DB=$name
    # A throwaway cluster is deleted whole; only a shared server needs the drop.
    if [[ $MG_PG_THROWAWAY -eq 0 ]]; then
        mg_defer mg__pg_drop_db "$MG_PG_PORT" "$name"
    fi
    mg__psql "$MG_PG_PORT" -d postgres -c "CREATE DATABASE \"$name\"" ||
        mg_die "could not create database $name on 127.0.0.1:$MG_PG_PORT"
    mg_log "Postgres: created database $name"
}

mg__pg_drop_db() {
    local port=$1 name=$2
    if [[ ${KEEP_TEST_DB:-0} == 1 ]]; then
        mg_log "KEEP_TEST_DB=1: kept database $name on 127.0.0.1:$port"
        return 0
    fi
    # FORCE ends sessions a crashed or lingering test left open.
    mg__psql "$port" -d postgres -c "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE)" 2>/dev/null ||
        mg__psql "$port" -d postgres -c "DROP DATABASE IF EXISTS \"$name\"" ||
        mg_warn "could not drop database $name on 127.0.0.1:$port"
}
