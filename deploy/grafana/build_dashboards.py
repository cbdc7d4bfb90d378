#!/usr/bin/env python3
"""Writes meshgate's Grafana dashboards (deploy/grafana/dashboards/*.json) from the panel lists below.

The JSON files are committed (Compose provisions them, the Helm chart ships them as ConfigMaps) and
scripts/check-deploy.sh fails when they differ from what this script writes, so edit the panels
here and run `python3 deploy/grafana/build_dashboards.py`.

Queries use the variables $namespace, $service and $model (regex matchers, "All" = ".*", which
also matches series without the label, as under Compose) and Grafana's $__rate_interval.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"

# Server-fault gRPC codes: UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS (the SLO
# rules in deploy/prometheus/rules use the same set).
FAULT_CODES = "2|4|13|14|15"
NS = 'namespace=~"$namespace"'
NOT_HEALTH = 'method!~"/grpc\\\\..*"'
BUDGET = 0.005  # error budget of the 99.5 % availability and 0.5 % error-rate objectives


def target(expr: str, legend: str = "", ref: str = "A") -> dict:
    return {
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": True,
        "refId": ref,
    }


def panel(kind: str, title: str, targets: list[dict], w: int, h: int, unit: str = "short",
          description: str = "", thresholds: list[tuple[str, float | None]] | None = None,
          stack: bool = False) -> dict:
    steps = [{"color": color, "value": value} for color, value in (thresholds or [("green", None)])]
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    p: dict = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "targets": targets,
        "gridPos": {"w": w, "h": h},
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "line" if thresholds else "off"},
        }
        p["options"] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif kind == "stat":
        p["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        }
    return p


def ts(title: str, targets: list[dict], unit: str = "short", w: int = 12, h: int = 8, **kw) -> dict:
    return panel("timeseries", title, targets, w, h, unit, **kw)


def stat(title: str, expr: str, unit: str = "short", w: int = 6, h: int = 4, **kw) -> dict:
    return panel("stat", title, [target(expr)], w, h, unit, **kw)


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def quantiles(metric: str, by: str, selector: str, legend_prefix: str = "") -> list[dict]:
    out = []
    for q in ("0.5", "0.95", "0.99"):
        group = f"{by}, le" if by else "le"
        legend = f"{legend_prefix}p{q[2:].ljust(2, '0')}"
        out.append(target(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[$__rate_interval])))",
            legend,
        ))
    return out


def variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard(uid: str, title: str, description: str, panels: list[dict], extra_vars: list[dict]) -> dict:
    # Lay panels out left to right, wrapping at Grafana's 24 columns.
    x = y = line_h = 0
    for i, p in enumerate(panels):
        p["id"] = i + 1
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if p["type"] == "row" or x + w > 24:
            x, y, line_h = 0, y + line_h, 0
        p["gridPos"].update({"x": x, "y": y})
        x += w
        line_h = max(line_h, h)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["meshgate"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "utc",
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["meshgate"], "asDropdown": True, "title": "meshgate"}],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
                },
                variable("namespace", "Namespace", "label_values(meshgate_grpc_server_requests_total, namespace)"),
                *extra_vars,
            ]
        },
        "panels": panels,
    }


def overview() -> dict:
    edge = f"{NS}"
    grpc = f'{NS},service=~"$service",{NOT_HEALTH}'
    panels = [
        stat("Edge requests/s", f"sum(rate(meshgate_http_requests_total{{{edge}}}[$__rate_interval]))", "reqps"),
        stat("Edge server faults (5xx)",
             f'sum(rate(meshgate_http_requests_total{{{edge},status=~"5.."}}[$__rate_interval])) or vector(0)',
             "reqps", thresholds=[("green", None), ("red", 0.001)]),
        stat("Edge p95 (to headers)",
             f"histogram_quantile(0.95, sum by (le) (rate(meshgate_http_request_duration_seconds_bucket{{{edge}}}[$__rate_interval])))",
             "s", thresholds=[("green", None), ("orange", 1), ("red", 2)]),
        stat("Scraped services up", 'sum(up{job=~".*meshgate.*"})', "none"),
        row("Edge (gateway HTTP)"),
        ts("Requests by route and status",
           [target(f"sum by (route, status) (rate(meshgate_http_requests_total{{{edge}}}[$__rate_interval]))",
                   "{{route}} {{status}}")], "reqps", stack=True),
        ts("Latency to response headers", quantiles("meshgate_http_request_duration_seconds", "", edge), "s",
           thresholds=[("green", None), ("red", 2)], description="Objective: p95 under 2 s."),
        row("Services (gRPC)"),
        ts("Calls by service",
           [target(f"sum by (service) (rate(meshgate_grpc_server_requests_total{{{grpc}}}[$__rate_interval]))",
                   "{{service}}")], "reqps", w=8),
        ts("Errors by service and code",
           [target(f'sum by (service, code) (rate(meshgate_grpc_server_requests_total{{{grpc},code!="0"}}[$__rate_interval]))',
                   "{{service}} code {{code}}")], "reqps", w=8,
           description="Non-OK gRPC codes. 2, 4, 13, 14 and 15 are server faults; 3, 5, 7, 8, 16 are the caller's."),
        ts("Server-fault ratio by service",
           [target(f'(sum by (service) (rate(meshgate_grpc_server_requests_total{{{grpc},code=~"{FAULT_CODES}"}}[$__rate_interval]))'
                   f" or 0 * sum by (service) (rate(meshgate_grpc_server_requests_total{{{grpc}}}[$__rate_interval])))"
                   f" / sum by (service) (rate(meshgate_grpc_server_requests_total{{{grpc}}}[$__rate_interval]))",
                   "{{service}}")], "percentunit", w=8, thresholds=[("green", None), ("red", BUDGET)],
           description="Objective: under 0.5 % per service."),
        ts("p95 by service",
           [target(f"histogram_quantile(0.95, sum by (service, le) (rate(meshgate_grpc_server_request_duration_seconds_bucket{{{grpc}}}[$__rate_interval])))",
                   "{{service}}")], "s"),
        ts("p99 by method",
           [target(f"histogram_quantile(0.99, sum by (method, le) (rate(meshgate_grpc_server_request_duration_seconds_bucket{{{grpc}}}[$__rate_interval])))",
                   "{{method}}")], "s"),
        row("Trace pipeline"),
        ts("Trace records",
           [target(f"sum(rate(meshgate_traces_sent_total{{{NS}}}[$__rate_interval]))", "sent"),
            target(f"sum(rate(meshgate_traces_dropped_total{{{NS}}}[$__rate_interval]))", "dropped (buffer full)"),
            target(f"sum(rate(meshgate_traces_failed_total{{{NS}}}[$__rate_interval]))", "failed (analytics refused)"),
            target(f"sum(rate(meshgate_analytics_traces_stored_total{{{NS}}}[$__rate_interval]))", "stored")], "ops"),
        ts("Analytics insert latency", quantiles("meshgate_analytics_insert_duration_seconds", "", NS), "s"),
        row("Durable queue (sync jobs)"),
        ts("Job events",
           [target(f"sum by (event) (rate(meshgate_sync_jobs_total{{{NS}}}[$__rate_interval]))", "{{event}}")], "ops"),
        ts("Job delivery p95 by outcome",
           [target(f"histogram_quantile(0.95, sum by (outcome, le) (rate(meshgate_sync_job_delivery_seconds_bucket{{{NS}}}[$__rate_interval])))",
                   "{{outcome}}")], "s"),
    ]
    return dashboard("meshgate-overview", "meshgate / Overview",
                     "Traffic, latency and errors at the edge and per service.", panels,
                     [variable("service", "Service", "label_values(meshgate_grpc_server_requests_total, service)")])


def models() -> dict:
    m = f'{NS},model=~"$model"'
    panels = [
        stat("Tokens/s", f"sum(rate(meshgate_tokens_total{{{m}}}[$__rate_interval]))", "short"),
        stat("Spend (USD/h)", f"sum(rate(meshgate_cost_micros_total{{{m}}}[$__rate_interval])) * 3600 / 1e6", "currencyUSD"),
        stat("Spend, last 24 h (USD)", f"sum(increase(meshgate_cost_micros_total{{{m}}}[24h])) / 1e6", "currencyUSD"),
        stat("Fallbacks/s", f"sum(rate(meshgate_target_failures_total{{{NS}}}[$__rate_interval])) or vector(0)", "ops",
             thresholds=[("green", None), ("orange", 0.01)]),
        row("Usage and cost"),
        ts("Tokens by model and kind",
           [target(f"sum by (model, kind) (rate(meshgate_tokens_total{{{m}}}[$__rate_interval]))", "{{model}} {{kind}}")],
           "short", stack=True),
        ts("Spend by model (USD/h)",
           [target(f"sum by (model) (rate(meshgate_cost_micros_total{{{m}}}[$__rate_interval])) * 3600 / 1e6", "{{model}}")],
           "currencyUSD", stack=True),
        ts("Spend by project (USD/h)",
           [target(f"sum by (project) (rate(meshgate_cost_micros_total{{{m}}}[$__rate_interval])) * 3600 / 1e6",
                   "{{project}}")], "currencyUSD", stack=True,
           description="Cost charged at the edge per project (meshgate_cost_micros_total by project)."),
        ts("Local tokens by model (inference)",
           [target(f"sum by (model, kind) (rate(meshgate_inference_tokens_total{{{m}}}[$__rate_interval]))",
                   "{{model}} {{kind}}")], "short"),
        row("Routing"),
        ts("Routing mix by layer",
           [target(f"sum by (layer) (rate(meshgate_router_decisions_total{{{NS}}}[$__rate_interval]))", "{{layer}}")],
           "reqps", w=8, stack=True, description="Targets chosen first by the router, by layer (L0 local ... L3 premium)."),
        ts("Routing mix by target",
           [target(f"sum by (target) (rate(meshgate_router_decisions_total{{{NS}}}[$__rate_interval]))", "{{target}}")],
           "reqps", w=8, stack=True),
        ts("Calls served by provider and local model",
           [target(f'sum by (provider) (rate(meshgate_sync_upstream_requests_total{{{m},outcome="ok"}}[$__rate_interval]))',
                   "cloud {{provider}}"),
            target(f'sum by (model) (rate(meshgate_inference_requests_total{{{m},outcome="ok"}}[$__rate_interval]))',
                   "local {{model}}")], "reqps", w=8, stack=True),
        ts("Fallbacks by failed target",
           [target(f"sum by (target) (rate(meshgate_target_failures_total{{{NS}}}[$__rate_interval]))", "{{target}}")],
           "ops", w=8, description="Targets that failed before their first piece; the next target in the plan took over."),
        ts("Circuit breakers open",
           [target(f"max by (target) (meshgate_router_breaker_open{{{NS}}})", "{{target}}")], "short", w=8),
        ts("Provider outcomes",
           [target(f"sum by (provider, outcome) (rate(meshgate_sync_upstream_requests_total{{{m}}}[$__rate_interval]))",
                   "{{provider}} {{outcome}}")], "reqps", w=8),
        ts("Provider retries by error",
           [target(f"sum by (provider, error) (rate(meshgate_sync_upstream_retries_total{{{m}}}[$__rate_interval]))",
                   "{{provider}} {{error}}")], "ops", w=8,
           description="Calls retried by sync before their first chunk reached the caller."),
        row("Latency"),
        ts("Model call latency p95 by model and layer",
           [target(f"histogram_quantile(0.95, sum by (model, layer, le) (rate(meshgate_model_call_duration_seconds_bucket{{{m}}}[$__rate_interval])))",
                   "{{model}} {{layer}}")], "s", w=24,
           description="Gateway-side duration of every model call (fallbacks and race losers included), by model and layer."),
        ts("Provider call duration p95",
           [target(f"histogram_quantile(0.95, sum by (provider, model, le) (rate(meshgate_sync_upstream_duration_seconds_bucket{{{m}}}[$__rate_interval])))",
                   "{{provider}} {{model}}")], "s"),
        ts("Provider time to first chunk p95",
           [target(f"histogram_quantile(0.95, sum by (provider, model, le) (rate(meshgate_sync_upstream_first_chunk_seconds_bucket{{{m}}}[$__rate_interval])))",
                   "{{provider}} {{model}}")], "s"),
        ts("Local time to first token p95",
           [target(f"histogram_quantile(0.95, sum by (model, le) (rate(meshgate_inference_time_to_first_token_seconds_bucket{{{m}}}[$__rate_interval])))",
                   "{{model}}")], "s", w=8),
        ts("Local embed duration p95",
           [target(f"histogram_quantile(0.95, sum by (model, le) (rate(meshgate_inference_embed_duration_seconds_bucket{{{m}}}[$__rate_interval])))",
                   "{{model}}")], "s", w=8),
        ts("Local models loaded and in flight",
           [target(f"sum(meshgate_inference_model_loaded{{{m}}})", "models loaded"),
            target(f"sum(meshgate_inference_in_flight{{{NS}}})", "requests in flight")], "short", w=8),
        ts("Local batching queue depth",
           [target(f"sum by (model) (meshgate_inference_queue_depth{{{m}}})", "{{model}}")], "short", w=8),
        ts("Encoder batch size p50 / p95",
           [target(f"histogram_quantile(0.5, sum by (model, le) (rate(meshgate_inference_batch_size_bucket{{{m}}}[$__rate_interval])))",
                   "{{model}} p50"),
            target(f"histogram_quantile(0.95, sum by (model, le) (rate(meshgate_inference_batch_size_bucket{{{m}}}[$__rate_interval])))",
                   "{{model}} p95")], "short", w=8, description="Texts per session call of an encoder model."),
        ts("Requests merged per encoder call p95",
           [target(f"histogram_quantile(0.95, sum by (model, le) (rate(meshgate_inference_batch_requests_bucket{{{m}}}[$__rate_interval])))",
                   "{{model}}")], "short", w=8),
    ]
    return dashboard("meshgate-models", "meshgate / Models",
                     "Tokens, cost, latency by model and layer, routing mix and fallbacks.", panels,
                     [variable("model", "Model", "label_values(meshgate_tokens_total, model)")])


def quota_security() -> dict:
    panels = [
        stat("Quota rejections/s", f"sum(rate(meshgate_quota_rejections_total{{{NS}}}[$__rate_interval])) or vector(0)", "reqps"),
        stat("Auth failures/s (401/403)",
             f'sum(rate(meshgate_http_requests_total{{{NS},status=~"401|403"}}[$__rate_interval])) or vector(0)', "reqps"),
        stat("Policy violations/s (422)",
             f'sum(rate(meshgate_http_requests_total{{{NS},status="422"}}[$__rate_interval])) or vector(0)', "reqps"),
        stat("Quota failing open/s",
             f'sum(rate(meshgate_quota_reservations_total{{{NS},result="fail_open"}}[$__rate_interval])) or vector(0)', "reqps",
             thresholds=[("green", None), ("red", 0.0001)]),
        row("Quota"),
        ts("Rejections by limit",
           [target(f"sum by (limit) (rate(meshgate_quota_rejections_total{{{NS}}}[$__rate_interval]))", "{{limit}}")],
           "reqps", w=8, stack=True),
        ts("Reservations by result",
           [target(f"sum by (result) (rate(meshgate_quota_reservations_total{{{NS}}}[$__rate_interval]))", "{{result}}")],
           "reqps", w=8, stack=True),
        ts("Commits and releases",
           [target(f"sum by (result) (rate(meshgate_quota_commits_total{{{NS}}}[$__rate_interval]))", "commit {{result}}"),
            target(f"sum(rate(meshgate_quota_releases_total{{{NS}}}[$__rate_interval]))", "released")], "ops", w=8),
        ts("Reserve latency", quantiles("meshgate_quota_reserve_duration_seconds", "", NS), "s", w=8),
        ts("Tokens charged by commits",
           [target(f"sum(rate(meshgate_quota_committed_tokens_total{{{NS}}}[$__rate_interval]))", "tokens")], "short", w=8),
        ts("Store errors",
           [target(f"sum by (op) (rate(meshgate_quota_store_errors_total{{{NS}}}[$__rate_interval]))", "quota {{op}}"),
            target(f"sum by (op) (rate(meshgate_analytics_store_errors_total{{{NS}}}[$__rate_interval]))", "analytics {{op}}"),
            target(f"sum(rate(meshgate_quota_ledger_flush_errors_total{{{NS}}}[$__rate_interval]))", "ledger flush")],
           "ops", w=8),
        row("Security"),
        ts("Edge refusals by status",
           [target(f'sum by (status) (rate(meshgate_http_requests_total{{{NS},status=~"4.."}}[$__rate_interval]))',
                   "{{status}}")], "reqps", w=8, stack=True,
           description="401 bad key, 403 role, 413 too large, 422 policy, 429 quota/rate limit."),
        ts("Policy findings by policy and action",
           [target(f"sum by (policy, action) (rate(meshgate_policy_findings_total{{{NS}}}[$__rate_interval]))",
                   "{{policy}} {{action}}")], "ops", w=8,
           description="Policy findings on prompts and replies (secrets, PII, keywords, unsafe shell, prompt injection), by rule and action."),
        ts("Request risk score",
           quantiles("meshgate_request_risk_score", "", NS), "none", w=8,
           description="Risk score 0-100 per scanned request."),
    ]
    return dashboard("meshgate-quota-security", "meshgate / Quota and security",
                     "Budget and rate-limit rejections, quota store health, refusals, policy findings and risk.",
                     panels, [])


def slo() -> dict:
    avail = "meshgate:slo_availability_errors:ratio_rate"
    errors = "meshgate:slo_grpc_errors:ratio_rate"
    p95 = "meshgate:slo_edge_latency_seconds:p95_rate"
    panels = [
        stat("Availability, 1 day", f"1 - max({avail}1d{{{NS}}})", "percentunit",
             thresholds=[("red", None), ("green", 1 - BUDGET)], description="Objective: 99.5 %."),
        stat("Availability, 3 days", f"1 - max({avail}3d{{{NS}}})", "percentunit",
             thresholds=[("red", None), ("green", 1 - BUDGET)]),
        stat("Error budget left (3-day pace)", f"1 - max({avail}3d{{{NS}}}) / {BUDGET}", "percentunit",
             thresholds=[("red", None), ("orange", 0.25), ("green", 0.5)],
             description="1 - burn rate over 3 days: below 0 the monthly budget runs out before the month does."),
        stat("Edge p95, 1 h", f"max({p95}1h{{{NS}}})", "s", thresholds=[("green", None), ("red", 2)]),
        row("Availability burn rate (budget 0.5 %)"),
        ts("Availability burn rate",
           [target(f"max({avail}5m{{{NS}}}) / {BUDGET}", "5m"),
            target(f"max({avail}1h{{{NS}}}) / {BUDGET}", "1h"),
            target(f"max({avail}6h{{{NS}}}) / {BUDGET}", "6h"),
            target(f"max({avail}1d{{{NS}}}) / {BUDGET}", "1d"),
            target(f"max({avail}3d{{{NS}}}) / {BUDGET}", "3d")], "none", w=24,
           thresholds=[("green", None), ("orange", 3), ("red", 14.4)],
           description="1 = spending the budget exactly over 30 days. Pages at 14.4 (1h and 5m) or 6 (6h and 30m); "
                       "tickets at 3 (1d and 2h) or 1 (3d and 6h)."),
        row("Error rate per service (budget 0.5 %)"),
        ts("Error-rate burn rate by service, 1 h",
           [target(f'{errors}1h{{{NS},service=~"$service"}} / {BUDGET}', "{{service}}")], "none",
           thresholds=[("green", None), ("red", 14.4)]),
        ts("Error-rate burn rate by service, 1 day",
           [target(f'{errors}1d{{{NS},service=~"$service"}} / {BUDGET}', "{{service}}")], "none",
           thresholds=[("green", None), ("orange", 3)]),
        row("Latency (objective p95 < 2 s)"),
        ts("Edge p95",
           [target(f"max({p95}5m{{{NS}}})", "5m"), target(f"max({p95}1h{{{NS}}})", "1h"),
            target(f"max({p95}6h{{{NS}}})", "6h")], "s", thresholds=[("green", None), ("red", 2)]),
        ts("Firing and pending alerts",
           [target('sum by (alertname, alertstate) (ALERTS{alertname=~"Meshgate.*"})', "{{alertname}} {{alertstate}}")],
           "short"),
    ]
    return dashboard("meshgate-slo", "meshgate / SLOs",
                     "Availability, error-rate and latency objectives with their multi-window burn rates "
                     "(rules: deploy/prometheus/rules/meshgate.rules.yml).",
                     panels, [variable("service", "Service", "label_values(meshgate_grpc_server_requests_total, service)")])


def main() -> int:
    """Writes the dashboards; with --check, only reports (exit 1) the files that are out of date."""
    check = sys.argv[1:] == ["--check"]
    stale = []
    OUT.mkdir(parents=True, exist_ok=True)
    for name, build in (("overview", overview), ("models", models), ("quota-security", quota_security), ("slo", slo)):
        path = OUT / f"meshgate-{name}.json"
        text = json.dumps(build(), indent=2, sort_keys=True) + "\n"
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    for path in stale:
        print(f"{path} is out of date: run python3 deploy/grafana/build_dashboards.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
