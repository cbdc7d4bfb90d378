#!/usr/bin/env python3
"""Checks of meshgate's deployment files, run by scripts/check-deploy.sh (which prepares the tools).

Subcommands:
  static      the Helm chart (lint, schema, offline renders of several value sets), every rendered
              manifest and kustomize overlay against the Kubernetes schemas (kubernetes-validate,
              strict) and the chart's own rules (non-root read-only pods, probes, NetworkPolicies
              admitting exactly the configured calls, the stores, each pod's mesh certificate),
              the meshgate config each render mounts (`meshgate check-config`), the generated files
              being up to date, and the Compose file (compose-spec schema, images, mounts).
  render-k8s  writes k8s/ files generated from the chart (`--check`: fail when they are stale).
  live        against a running meshgate and a Prometheus scraping it: sends traffic, then
              evaluates every dashboard query and every rule expression.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "meshgate"
K8S = ROOT / "k8s"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "meshgate.rules.yml"
SERVICES = ["gateway", "inference", "router", "quota", "analytics", "sync"]
# Which pods need which store, from the code (`MeshConfig::use_stores` and each binary's
# `with_env_urls`): without them a replica keeps its own state in memory.
STORE_USERS = {"DATABASE_URL": {"gateway", "quota", "analytics", "sync"}, "REDIS_URL": {"gateway", "quota"}}
# Ports a NetworkPolicy may open to sources outside the release (an ingress, Prometheus).
OPEN_PORTS = {("gateway", "http"), ("gateway", "grpc")} | {(svc, "admin") for svc in SERVICES}
# The services' [mesh] tls_dir unless MESHGATE_MESH__TLS_DIR says otherwise.
TLS_DIR = "/etc/meshgate/tls"
# Kubernetes versions validated against: the chart's minimum and the newest schemas available.
KUBE_VERSIONS = ["1.27.0", "1.37.0"]
# Custom resources kubernetes-validate has no schema for, and how they are checked instead.
CUSTOM_KINDS = {"ModelRoute", "ServiceMonitor", "PrometheusRule", "Certificate"}
# Images Compose may name besides the one the Dockerfile builds: official or vendor images.
PUBLIC_IMAGES = {"postgres", "redis", "prom/prometheus", "grafana/grafana", "otel/opentelemetry-collector",
                 "otel/opentelemetry-collector-contrib", "jaegertracing/all-in-one"}
# What every install adds to the default values: the stores (with several gateway pods the chart
# refuses to render without them).
STORES = {"database": {"url": "postgres://meshgate@postgres.example:5432/meshgate"},
          "redis": {"url": "redis://redis.example:6379/0"}}
# Rendered into "default": kustomize's namespace transformer then moves RoleBinding subjects too.
RELEASE, NAMESPACE = "meshgate", "default"


class Failures:
    """Collects check failures so one run reports all of them."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")
        print(f"FAIL {where}: {message}", file=sys.stderr)

    def check(self, ok: bool, where: str, message: str) -> None:
        if not ok:
            self.add(where, message)


def log(message: str) -> None:
    print(f"[check-deploy] {message}", file=sys.stderr, flush=True)


# --- Helm ------------------------------------------------------------------------------------

class QuietHelm:
    """Silences Helm's Go logger, which writes straight to fd 2 (an INFO line for each symbolic
    link followed: the chart's files/ link into deploy/). Errors still raise with their message."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def helm_lint(values: dict | None, **options) -> dict:
    import helm_python as helm

    with QuietHelm():
        return helm.lint(CHART, values, **options)


def load_values(path: Path | None) -> dict | None:
    return yaml.safe_load(path.read_text()) if path else None


def render_chart(values: dict | None) -> tuple[list[dict], dict]:
    """Renders the chart offline; returns its objects (CRDs first) and the rendered files by path."""
    import helm_python as helm

    with QuietHelm(), helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        crds = [doc for crd in chart.crds for doc in yaml.safe_load_all(crd["data"]) if doc]
    objects = list(crds)
    for path in sorted(files):
        if path.endswith(".txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(files[path]) if doc)
    return objects, files


def dump_objects(objects: list[dict]) -> str:
    return "".join("---\n" + yaml.safe_dump(obj, sort_keys=False) for obj in objects)


def managed_by_kustomize(node):
    """The chart's objects as plain manifests: `managed-by: Helm` would be a lie there."""
    if isinstance(node, dict):
        return {k: ("kustomize" if k == "app.kubernetes.io/managed-by" else managed_by_kustomize(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [managed_by_kustomize(v) for v in node]
    return node


# --- manifest validation -----------------------------------------------------------------------

def kn(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def validate_kubernetes(objects: list[dict], where: str, failures: Failures, crd_schemas: dict) -> None:
    """kubernetes-validate --strict on every built-in object; custom resources against their CRD."""
    import jsonschema
    import kubernetes_validate.utils as kv

    for obj in objects:
        name = f"{where} {kn(obj)}"
        if obj.get("kind") in CUSTOM_KINDS:
            schema = crd_schemas.get((obj["apiVersion"], obj["kind"]))
            if schema is not None:
                errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=str)
                for err in errors:
                    failures.add(name, f"{'.'.join(map(str, err.path))}: {err.message}")
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as err:
                failures.add(name, f"kubernetes {version}: {'.'.join(map(str, err.path))}: {err.message}")
            except kv.SchemaNotFoundError:
                failures.add(name, f"kubernetes {version} has no schema for {obj['apiVersion']} {obj['kind']}")


def closed(schema):
    """A CRD schema that refuses unknown fields, as the API server does under kubectl's default
    strict field validation (a structural schema does not say `additionalProperties: false`)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
        # apiVersion, kind and metadata are the object's envelope, always allowed.
        if "spec" in out["properties"]:
            out["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                 "metadata": {"type": "object"}, **out["properties"]}
    return out


def crd_schemas_of(objects: list[dict]) -> dict:
    """(apiVersion, kind) -> the openAPIV3Schema of every CRD among `objects`, closed."""
    out = {}
    for obj in objects:
        if obj.get("kind") != "CustomResourceDefinition":
            continue
        spec = obj["spec"]
        for version in spec["versions"]:
            out[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = closed(version["schema"]["openAPIV3Schema"])
    return out


def pod_specs(objects: list[dict]) -> list[tuple[dict, dict]]:
    out = []
    for obj in objects:
        if obj.get("kind") in {"Deployment", "StatefulSet", "Job"}:
            out.append((obj, obj["spec"]["template"]["spec"]))
    return out


def component(obj: dict) -> str | None:
    return obj.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component")


def check_policies(objects: list[dict], where: str, failures: Failures) -> None:
    """The chart's promises: non-root read-only pods without capabilities, probes on the admin
    port, only the gateway exposed, a NetworkPolicy per service admitting only its callers."""
    for obj, pod in pod_specs(objects):
        name = f"{where} {kn(obj)}"
        psc = pod.get("securityContext", {})
        failures.check(psc.get("runAsNonRoot") is True, name, "pod securityContext.runAsNonRoot is not true")
        failures.check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name, "no RuntimeDefault seccomp profile")
        for container in pod.get("initContainers", []) + pod["containers"]:
            csc = container.get("securityContext", {})
            cname = f"{name} container {container['name']}"
            failures.check(csc.get("readOnlyRootFilesystem") is True, cname, "root filesystem is writable")
            failures.check(csc.get("allowPrivilegeEscalation") is False, cname, "privilege escalation allowed")
            failures.check("ALL" in csc.get("capabilities", {}).get("drop", []), cname, "capabilities not dropped")
        if obj["kind"] == "Deployment":
            container = pod["containers"][0]
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            failures.check("admin" in ports, name, "no admin port")
            for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
                get = container.get(probe, {}).get("httpGet", {})
                failures.check(get.get("path") == path and get.get("port") == "admin", name,
                               f"{probe} is not GET {path} on the admin port")
            failures.check(pod.get("automountServiceAccountToken") is False or component(obj) == "router", name,
                           "only the router may mount a service account token")
    for obj in objects:
        if obj.get("kind") == "RoleBinding" and obj["metadata"].get("namespace"):
            for subject in obj["subjects"]:
                failures.check(subject.get("namespace") == obj["metadata"]["namespace"], f"{where} {kn(obj)}",
                               f"binds {subject['name']} of namespace {subject.get('namespace')}, not its own")
        if obj.get("kind") == "Service" and component(obj) != "gateway":
            failures.check(obj["spec"].get("type", "ClusterIP") == "ClusterIP", f"{where} {kn(obj)}",
                           "only the gateway may be exposed outside the cluster")
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]
    failures.check(any(not p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
                       and "Ingress" in p["spec"].get("policyTypes", []) and not p["spec"].get("ingress")
                       for p in policies), where, "no default-deny ingress NetworkPolicy")
    if policies:
        check_network_edges(objects, where, failures)
    check_stores(objects, where, failures)
    check_mesh_tls(objects, where, failures)


# --- who talks to whom -------------------------------------------------------------------------

def secret_values(objects: list[dict]) -> dict[tuple[str, str], str]:
    """(Secret name, key) -> value of every Secret among `objects` (stringData or base64 data)."""
    import base64

    out = {}
    for obj in objects:
        if obj.get("kind") == "Secret":
            name = obj["metadata"]["name"]
            for key, value in (obj.get("data") or {}).items():
                out[(name, key)] = base64.b64decode(value).decode()
            for key, value in (obj.get("stringData") or {}).items():
                out[(name, key)] = value
    return out


def env_value(entry: dict, secrets: dict) -> str | None:
    """An env entry's value: literal, or from a Secret rendered with it (None: an outside Secret)."""
    if "value" in entry:
        return entry["value"]
    ref = entry.get("valueFrom", {}).get("secretKeyRef")
    return secrets.get((ref["name"], ref["key"])) if ref else None


def service_targets(objects: list[dict]) -> dict[str, tuple[str, dict[int, str]]]:
    """Each Service's name (and namespace forms) -> (component it selects, port -> target port name)."""
    out = {}
    for svc in (o for o in objects if o.get("kind") == "Service"):
        name, ns = svc["metadata"]["name"], svc["metadata"].get("namespace") or NAMESPACE
        target = (svc["spec"]["selector"].get("app.kubernetes.io/component"),
                  {p["port"]: p.get("targetPort", p["port"]) for p in svc["spec"]["ports"]})
        for host in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
            out[host] = target
    return out


def configured_edges(objects: list[dict], where: str, failures: Failures) -> set[tuple[str, str, str]]:
    """(caller, callee, port name) of every call the pods are configured to make: the gRPC peers
    of `MESHGATE_*_ENDPOINT` and the store URLs, resolved through the release's Services. Stores
    outside the release (managed Postgres, an outside Secret) are not release edges."""
    secrets = secret_values(objects)
    services = service_targets(objects)
    edges = set()
    for obj, pod in pod_specs(objects):
        caller = component(obj)
        for container in pod["containers"]:
            for entry in container.get("env", []):
                name = entry["name"]
                if not (re.fullmatch(r"MESHGATE_\w+_ENDPOINT", name) or name in STORE_USERS):
                    continue
                value = env_value(entry, secrets)
                if not value:
                    continue
                url = urllib.parse.urlsplit(value)
                target = services.get(url.hostname or "")
                if target is None:
                    failures.check(name in STORE_USERS, f"{where} {kn(obj)}",
                                   f"{name}={value} names no Service of the release")
                    continue
                callee, ports = target
                port = ports.get(url.port)
                if port is None:
                    failures.add(f"{where} {kn(obj)}", f"{name}={value}: Service port {url.port} does not exist")
                    continue
                edges.add((caller, callee, port))
    return edges


def allowed_edges(objects: list[dict]) -> set[tuple[str, str, str]]:
    """(source, destination, port name) the NetworkPolicies admit; source "*" = anything outside
    the release's pods (another namespace, an address block, or no `from` at all)."""
    port_names = {}
    for obj, pod in pod_specs(objects):
        for container in pod["containers"]:
            for port in container.get("ports", []):
                port_names[(component(obj), port["containerPort"])] = port["name"]
    edges = set()
    for policy in (o for o in objects if o.get("kind") == "NetworkPolicy"):
        dest = policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
        for rule in policy["spec"].get("ingress", []):
            ports = [port_names.get((dest, p["port"]), p["port"]) for p in rule.get("ports", [])] or ["*"]
            sources = set()
            for peer in rule.get("from") or [{}]:
                selected = peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
                sources.add(selected if selected and not peer.get("namespaceSelector") else "*")
            edges |= {(source, dest, port) for source in sources for port in ports}
    return edges


def check_network_edges(objects: list[dict], where: str, failures: Failures) -> None:
    """The NetworkPolicies admit every call the pods are configured to make, and nothing more:
    no other pod of the release on any port, and outside sources only on the edge and admin ports."""
    configured = configured_edges(objects, where, failures)
    allowed = allowed_edges(objects)
    for caller, callee, port in sorted(configured):
        failures.check((caller, callee, port) in allowed or ("*", callee, port) in allowed,
                       f"{where} NetworkPolicy {callee}", f"does not admit {caller} on its {port} port, which it calls")
    for source, dest, port in sorted(allowed):
        if source == "*":
            failures.check((dest, port) in OPEN_PORTS, f"{where} NetworkPolicy {dest}",
                           f"admits sources outside the release on its {port} port")
        else:
            failures.check((source, dest, port) in configured, f"{where} NetworkPolicy {dest}",
                           f"admits {source} on its {port} port, which {source} is not configured to call")
    log(f"{where}: {len(configured)} configured calls checked against the NetworkPolicies")


def check_stores(objects: list[dict], where: str, failures: Failures) -> None:
    """With a store configured, every service that keeps state there gets its URL."""
    given: dict[str, set[str]] = {name: set() for name in STORE_USERS}
    for obj, pod in pod_specs(objects):
        if obj["kind"] != "Deployment":
            continue
        for container in pod["containers"]:
            for entry in container.get("env", []):
                if entry["name"] in given:
                    given[entry["name"]].add(component(obj))
    for name, users in STORE_USERS.items():
        if given[name]:
            failures.check(given[name] == users, where,
                           f"{name} reaches {sorted(map(str, given[name]))}, expected {sorted(users)}")


def check_mesh_tls(objects: list[dict], where: str, failures: Failures) -> None:
    """Each service's pods mount its own certificate, key and the mesh CA where [mesh] tls_dir
    reads them, as a directory (no subPath, so rotation reaches the pod); each cert-manager
    Certificate names the service's identity and every name its peers dial."""
    services = service_targets(objects)
    dialed: dict[str, set[str]] = {}
    for obj, pod in pod_specs(objects):
        for container in pod["containers"]:
            for entry in container.get("env", []):
                if re.fullmatch(r"MESHGATE_\w+_ENDPOINT", entry["name"]) and "value" in entry:
                    host = urllib.parse.urlsplit(entry["value"]).hostname or ""
                    if host in services:
                        dialed.setdefault(services[host][0], set()).add(host)
    mounted: dict[str, str] = {}
    for obj in (o for o in objects if o.get("kind") == "Deployment"):
        svc, pod = component(obj), obj["spec"]["template"]["spec"]
        name = f"{where} {kn(obj)}"
        container = pod["containers"][0]
        tls_dir = next((e["value"] for e in container.get("env", []) if e["name"] == "MESHGATE_MESH__TLS_DIR"), TLS_DIR)
        for mount in container.get("volumeMounts", []):
            failures.check("subPath" not in mount and "subPathExpr" not in mount, name,
                           f"mounts {mount['mountPath']} with subPath: rotated files would never reach the pod")
        files = {}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            for secret in ([volume["secret"]] if "secret" in volume else []) + [
                    s["secret"] for s in volume.get("projected", {}).get("sources", []) if "secret" in s]:
                name_of = secret.get("secretName") or secret.get("name")
                for item in secret.get("items") or []:
                    files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = (name_of, item["key"])
        want = {f"{tls_dir}/ca.crt": "ca.crt", f"{tls_dir}/{svc}.crt": "tls.crt", f"{tls_dir}/{svc}.key": "tls.key"}
        secrets_used = set()
        for path, key in want.items():
            got = files.get(path)
            if got is None or got[1] != key:
                failures.add(name, f"{path} is not mounted from the key {key} of a Secret")
            else:
                secrets_used.add(got[0])
        failures.check(len(secrets_used) <= 1, name, f"the mesh files come from several Secrets {sorted(secrets_used)}")
        others = [p for p in files if p.endswith(".key") and p != f"{tls_dir}/{svc}.key"]
        failures.check(not others, name, f"also mounts other identities' keys {others}")
        if secrets_used:
            mounted[svc] = secrets_used.pop()
    for cert in (o for o in objects if o.get("kind") == "Certificate"):
        spec, name = cert["spec"], f"{where} {kn(cert)}"
        svc = component(cert)
        failures.check(spec.get("secretName") == mounted.get(svc), name,
                       f"writes Secret {spec.get('secretName')}, but the {svc} pods mount {mounted.get(svc)}")
        failures.check(spec.get("uris") == [f"spiffe://meshgate/{svc}"] and spec.get("commonName") == svc, name,
                       f"identity is {spec.get('uris')} / CN {spec.get('commonName')}, expected spiffe://meshgate/{svc}")
        missing = dialed.get(svc, set()) - set(spec.get("dnsNames", []))
        failures.check(not missing, name, f"no DNS SAN for {sorted(missing)}, which its peers dial")
        failures.check({"server auth", "client auth"} <= set(spec.get("usages", [])), name,
                       "needs both server auth and client auth usages")
        failures.check(spec.get("issuerRef", {}).get("name"), name, "no issuerRef.name")
    if any(o.get("kind") == "Certificate" for o in objects):
        failures.check({component(c) for c in objects if c.get("kind") == "Certificate"} == set(SERVICES), where,
                       "cert-manager Certificates do not cover the six services")


def check_configs(objects: list[dict], where: str, failures: Failures, meshgate: str | None) -> None:
    """`meshgate check-config` on the TOML the pods mount, with the MESHGATE_* settings the pods get
    from their environment (which overrides the file: an unknown key there is as fatal)."""
    if not meshgate:
        return
    pod_env = {}
    for obj in objects:
        if obj.get("kind") == "ConfigMap" and obj["metadata"]["name"].endswith("-providers"):
            pod_env.update(obj.get("data") or {})
        if obj.get("kind") == "Deployment":
            for container in obj["spec"]["template"]["spec"]["containers"]:
                pod_env.update({e["name"]: e["value"] for e in container.get("env", [])
                                if e["name"].startswith("MESHGATE_") and "value" in e})
    for obj in objects:
        if obj.get("kind") == "ConfigMap" and "meshgate.toml" in (obj.get("data") or {}):
            with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
                f.write(obj["data"]["meshgate.toml"])
                f.flush()
                env = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_")} | pod_env
                result = subprocess.run([meshgate, "check-config", "--config", f.name], capture_output=True,
                                        text=True, env=env, timeout=60)
                failures.check(result.returncode == 0, f"{where} {kn(obj)}",
                               f"meshgate check-config failed: {result.stderr.strip() or result.stdout.strip()}")


def check_prometheus_rules(objects: list[dict], where: str, failures: Failures, promtool: str) -> None:
    for obj in objects:
        if obj.get("kind") != "PrometheusRule":
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
            yaml.safe_dump({"groups": obj["spec"]["groups"]}, f)
            f.flush()
            result = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
            failures.check(result.returncode == 0, f"{where} {kn(obj)}", result.stdout + result.stderr)


def check_service_monitors(objects: list[dict], where: str, failures: Failures) -> None:
    services = [o for o in objects if o.get("kind") == "Service"]
    for sm in (o for o in objects if o.get("kind") == "ServiceMonitor"):
        selector = sm["spec"]["selector"]
        wanted = set(selector["matchExpressions"][0]["values"]) if selector.get("matchExpressions") else None
        chosen = [s for s in services
                  if all(s["metadata"]["labels"].get(k) == v for k, v in selector.get("matchLabels", {}).items())
                  and (wanted is None or component(s) in wanted)]
        failures.check({component(s) for s in chosen} == set(SERVICES), f"{where} {kn(sm)}",
                       f"selects {sorted(str(component(s)) for s in chosen)}, expected the six services")
        for endpoint in sm["spec"]["endpoints"]:
            failures.check(endpoint.get("honorLabels") is True, f"{where} {kn(sm)}",
                           "honorLabels is off: the target's `service` label would replace the metrics' own")
            for s in chosen:
                failures.check(any(p["name"] == endpoint["port"] for p in s["spec"]["ports"]), f"{where} {kn(sm)}",
                               f"Service {s['metadata']['name']} has no port {endpoint['port']}")


def check_objects(objects: list[dict], where: str, failures: Failures, args, *, crd_schemas: dict) -> None:
    validate_kubernetes(objects, where, failures, crd_schemas)
    check_policies(objects, where, failures)
    check_configs(objects, where, failures, args.meshgate)
    check_prometheus_rules(objects, where, failures, args.promtool)
    check_service_monitors(objects, where, failures)
    names = [(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objects]
    dupes = {n for n in names if names.count(n) > 1}
    failures.check(not dupes, where, f"duplicate objects {sorted(dupes)}")
    log(f"{where}: {len(objects)} objects checked")


# --- k8s/ generated from the chart -------------------------------------------------------------

def k8s_generated() -> dict[Path, str]:
    """The files of k8s/ rendered from the chart, by path."""
    header = ("# Generated from helm/meshgate by `deploy/tools/check_deploy.py render-k8s` with {values};\n"
              "# do not edit: change the chart or the values and regenerate.\n")
    base_values = load_values(K8S / "base" / "values.yaml")
    base = managed_by_kustomize(render_chart(base_values)[0])
    crds = [o for o in base if o["kind"] == "CustomResourceDefinition"]
    rest = [o for o in base if o["kind"] != "CustomResourceDefinition"]
    out = {
        K8S / "base" / "crds.yaml": header.format(values="k8s/base/values.yaml") + dump_objects(crds),
        K8S / "base" / "meshgate.yaml": header.format(values="k8s/base/values.yaml") + dump_objects(rest),
    }
    # dev: the bundled single-replica stores.
    dev_values = copy.deepcopy(base_values)
    dev_values["database"] = {"existingSecret": ""}
    dev_values["redis"] = {"existingSecret": ""}
    dev_values["bundled"] = {"postgres": {"enabled": True, "password": "dev-only-password"}, "redis": {"enabled": True}}
    dev = managed_by_kustomize(render_chart(dev_values)[0])
    stores = [o for o in dev if component(o) in {"postgres", "redis"}]
    out[K8S / "overlays" / "dev" / "stores.yaml"] = (
        header.format(values="k8s/base/values.yaml and bundled.{postgres,redis}.enabled") + dump_objects(stores))
    # prod: autoscalers and the Prometheus Operator objects.
    prod_values = copy.deepcopy(base_values)
    prod_values["metrics"] = {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                              "dashboards": {"enabled": True}}
    for svc in ("gateway", "router", "quota", "sync"):
        prod_values.setdefault("services", {}).setdefault(svc, {})["autoscaling"] = {"enabled": True}
    prod = managed_by_kustomize(render_chart(prod_values)[0])
    extra = [o for o in prod if o["kind"] in {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"}]
    out[K8S / "overlays" / "prod" / "generated.yaml"] = (
        header.format(values="k8s/base/values.yaml with autoscaling and monitoring on") + dump_objects(extra))
    return out


def cmd_render_k8s(args) -> int:
    stale = []
    for path, text in k8s_generated().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
            log(f"wrote {path.relative_to(ROOT)}")
    for path in stale:
        print(f"{path.relative_to(ROOT)} is stale: run .venv/bin/python deploy/tools/check_deploy.py render-k8s",
              file=sys.stderr)
    return 1 if stale else 0


# --- Compose -----------------------------------------------------------------------------------

def check_compose(args, failures: Failures) -> None:
    import jsonschema

    path = ROOT / "docker-compose.yml"
    compose = yaml.safe_load(path.read_text())
    schema = json.loads(Path(args.compose_schema).read_text())
    for err in sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str):
        failures.add("docker-compose.yml", f"{'.'.join(map(str, err.path))}: {err.message}")
    dockerfile = (ROOT / "Dockerfile").read_text()
    # The Dockerfile builds every binary of the workspace: the services' and the mock provider.
    binaries = {"meshgate", "meshgate-mock-provider"} | {f"meshgate-{s}" for s in SERVICES}
    failures.check("target/release/meshgate-*" in dockerfile or all(b in dockerfile for b in binaries),
                   "Dockerfile", "does not copy every meshgate binary into the image")
    built = set()
    for name, svc in compose["services"].items():
        where = f"docker-compose.yml services.{name}"
        image = svc.get("image", "")
        if "build" in svc:
            build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
            failures.check(Path(ROOT / build.get("context", ".")).resolve() == ROOT
                           and build.get("dockerfile", "Dockerfile") == "Dockerfile", where,
                           "builds something other than the repository's Dockerfile")
            built.add(image)
            command = svc.get("command") or []
            failures.check(not command or command[0] in binaries, where, f"runs {command[:1]}, not a meshgate binary")
        elif image in built:
            pass
        else:
            repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
            failures.check(repo in PUBLIC_IMAGES, where, f"image {image!r} is neither built here nor a known public image")
            failures.check(bool(tag) and tag != "latest", where, f"image {image!r} is not pinned to a version")
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                failures.check((ROOT / source).exists(), where, f"mounts {source}, which does not exist")
    # mTLS as in the chart: every service reads its mesh certificates at [mesh] tls_dir, made by
    # a `meshgate certs` step it waits for.
    certs_steps = {name for name, svc in compose["services"].items() if (svc.get("command") or [])[:2] == ["meshgate", "certs"]}
    failures.check(len(certs_steps) == 1, "docker-compose.yml", f"expected one `meshgate certs` step, found {sorted(certs_steps)}")
    for svc in SERVICES:
        spec = compose["services"].get(svc, {})
        targets = [(v.split(":")[1] if isinstance(v, str) else v.get("target")) for v in spec.get("volumes", [])]
        failures.check(TLS_DIR in targets, f"docker-compose.yml services.{svc}", f"mounts nothing at {TLS_DIR}")
        failures.check(bool(certs_steps & set(spec.get("depends_on") or [])), f"docker-compose.yml services.{svc}",
                       "does not wait for the `meshgate certs` step")
    # The same stores as in the chart: without them each container keeps its own state.
    for var, users in STORE_USERS.items():
        for svc in sorted(users):
            environment = compose["services"].get(svc, {}).get("environment") or {}
            names = environment if isinstance(environment, dict) else [e.split("=", 1)[0] for e in environment]
            failures.check(var in names, f"docker-compose.yml services.{svc}", f"no {var}")
    log(f"docker-compose.yml: {len(compose['services'])} services checked")


# --- rules -------------------------------------------------------------------------------------

def check_alert_tests(failures: Failures) -> None:
    """Every alert has a unit test in which it fires (promtool runs the tests themselves)."""
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    fired = set()
    for path in sorted((RULES.parent.parent / "tests").glob("*.test.yml")):
        for test in yaml.safe_load(path.read_text())["tests"]:
            fired |= {t["alertname"] for t in test.get("alert_rule_test", []) if t.get("exp_alerts")}
    for alert in sorted(alerts - fired):
        failures.add("deploy/prometheus/tests", f"no unit test in which {alert} fires")
    log(f"alert rules: {len(alerts)} alerts, each with a firing unit test" if alerts <= fired else "alert rules checked")


# --- static ------------------------------------------------------------------------------------

def cmd_static(args) -> int:
    import helm_python as helm

    failures = Failures()
    value_sets = {"default values and stores": STORES, "values-production.yaml": CHART / "values-production.yaml"}
    value_sets.update({f"ci/{p.name}": p for p in sorted((CHART / "ci").glob("*.yaml"))})
    for where, source in value_sets.items():
        values = source if isinstance(source, dict) else load_values(source)
        report = helm_lint(values, strict=True, namespace=NAMESPACE, kube_version="v1.27.0")
        for message in report["messages"]:
            # Severity 1 is informational ("icon is recommended").
            failures.check(message["severity"] < 2, f"helm lint ({where})", f"{message['path']}: {message['error']}")
        objects, files = render_chart(values)
        failures.check(bool(files.get("meshgate/templates/NOTES.txt", "").strip()), where, "NOTES.txt renders empty")
        check_objects(objects, f"chart ({where})", failures, args, crd_schemas=crd_schemas_of(objects))
    # The chart ships the CRD the router's Rust types generate.
    generated = ROOT / "services" / "router" / "crd" / "modelroute.yaml"
    if generated.exists():
        shipped = yaml.safe_load((CHART / "crds" / "modelroutes.meshgate.io.yaml").read_text())
        failures.check(shipped == yaml.safe_load(generated.read_text()), "helm/meshgate/crds",
                       f"the ModelRoute CRD differs from {generated.relative_to(ROOT)}: copy it over")
    # The schema rejects what the chart would silently ignore.
    for bad in ({"servces": {}}, {"services": {"gateway": {"replicas": "two"}}}, {"providers": [{"name": "x"}]}):
        report = helm_lint(bad, namespace=NAMESPACE)
        failures.check(any(m["severity"] == 3 for m in report["messages"]), "values.schema.json",
                       f"accepts invalid values {bad}")
    # What the schema cannot say is refused with a message.
    refused = [
        ({"database": {"url": "postgres://x"}, "bundled": {"postgres": {"enabled": True}}},
         "set only one of database.url"),
        # Two gateway pods with their tenancy in memory: a key would work on half the requests.
        (None, "services.gateway runs more than one pod, which needs database"),
        ({"database": STORES["database"]}, "services.gateway runs more than one pod, which needs redis"),
        (STORES | {"services": {"analytics": {"autoscaling": {"enabled": True}}}, "database": {}},
         "services.analytics runs more than one pod, which needs database"),
        (STORES | {"mesh": {"tls": {"certManager": {"enabled": True}}}}, "mesh.tls.certManager.enabled needs"),
    ]
    for values, message in refused:
        try:
            render_chart(values)
            failures.add("chart", f"renders {values}, which it should refuse with {message!r}")
        except helm.HelmError as err:
            failures.check(message in str(err), "chart", f"refuses {values} with {err}, expected {message!r}")

    # kustomize overlays (and the generated files they include).
    if cmd_render_k8s(argparse.Namespace(check=True)) != 0:
        failures.add("k8s/", "generated files are stale")
    base_crds = crd_schemas_of([o for o in yaml.safe_load_all((K8S / "base" / "crds.yaml").read_text()) if o])
    for overlay in sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir()):
        result = subprocess.run([args.kubectl, "kustomize", str(overlay)], capture_output=True, text=True)
        if result.returncode != 0:
            failures.add(f"k8s/overlays/{overlay.name}", f"kubectl kustomize failed: {result.stderr.strip()}")
            continue
        objects = [o for o in yaml.safe_load_all(result.stdout) if o]
        namespaces = {o["metadata"].get("namespace") for o in objects
                      if o["kind"] not in {"Namespace", "CustomResourceDefinition"}}
        failures.check(len(namespaces) == 1 and None not in namespaces, f"k8s/overlays/{overlay.name}",
                       f"objects in namespaces {sorted(map(str, namespaces))}, expected one")
        check_objects(objects, f"k8s/overlays/{overlay.name}", failures, args, crd_schemas=base_crds)

    check_compose(args, failures)
    check_alert_tests(failures)
    result = subprocess.run([sys.executable, str(ROOT / "deploy" / "grafana" / "build_dashboards.py"), "--check"],
                            capture_output=True, text=True)
    failures.check(result.returncode == 0, "deploy/grafana/dashboards", result.stderr.strip())
    uids = [json.loads(p.read_text())["uid"] for p in sorted(DASHBOARDS.glob("*.json"))]
    failures.check(len(uids) == len(set(uids)) == 4, "deploy/grafana/dashboards", f"expected 4 unique uids, got {uids}")

    if failures.items:
        log(f"static checks: {len(failures.items)} failure(s)")
        return 1
    log("static checks: ok")
    return 0


# --- live --------------------------------------------------------------------------------------

def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def send_traffic(edge: str, key: str, local_model: str | None, seconds: float) -> dict[int, int]:
    """A bounded mix of requests: successes (JSON and streamed; cloud with fallback, and local),
    client errors (bad key, bad JSON, unknown model) and quota rejections."""
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    chat = f"{edge}/v1/chat/completions"

    def body(model: str, **extra) -> bytes:
        return json.dumps({"model": model, "messages": [{"role": "user", "content": "hello mesh"}],
                           "max_tokens": 8, **extra}).encode()

    requests = [
        ("POST", chat, body("mock-gpt"), auth),
        ("POST", chat, body("mock-gpt", stream=True, stream_options={"include_usage": True}), auth),
        ("GET", f"{edge}/v1/models", None, auth),
        ("POST", chat, b"{not json", auth),
        ("POST", chat, body("no-such-model"), auth),
    ]
    if local_model:
        requests.append(("POST", chat, body(local_model), auth))
    # A few bad keys only: the gateway throttles an address after repeated failed authentications
    # (then even good keys from it get 429, which would starve the other panels of data).
    bad_key = ("POST", chat, body("mock-gpt"), {"Authorization": "Bearer wrong", "Content-Type": "application/json"})
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline and rounds < 1000:
        rounds += 1
        for method, url, data, headers in requests + ([bad_key] if rounds <= 5 else []):
            status, _ = http(method, url, data, headers)
            statuses[status] = statuses.get(status, 0) + 1
        time.sleep(0.05)
    return statuses


def prom_query(prom: str, expr: str) -> tuple[str, list]:
    """Instant query; returns ("", result) or (error, [])."""
    status, raw = http("GET", f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    try:
        payload = json.loads(raw)
    except ValueError:
        return f"HTTP {status}: {raw[:200]!r}", []
    if payload.get("status") != "success":
        return f"{payload.get('errorType')}: {payload.get('error')}", []
    return "", payload["data"]["result"]


def grafana_to_promql(expr: str) -> str:
    """Replaces the dashboards' variables by what "All" and a short range mean."""
    for var, value in (("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "5m"),
                       ("$namespace", ".*"), ("$service", ".*"), ("$model", ".*")):
        expr = expr.replace(var, value)
    return expr


METRIC_NAME = re.compile(r"\b(meshgate(?:_[a-z0-9_]+|:[a-z0-9_:]+)|up|ALERTS)\b")


def metric_names(expr: str) -> set[str]:
    # Label names and values inside {...} are not metrics.
    return set(METRIC_NAME.findall(re.sub(r"\{[^}]*\}", "{}", expr)))


def cmd_live(args) -> int:
    failures = Failures()
    # Wait for every target to be scraped once before the traffic (rates need a sample before it).
    for _ in range(60):
        err, result = prom_query(args.prometheus, 'count(up{job="meshgate"} == 1)')
        if not err and result and int(float(result[0]["value"][1])) == 6:
            break
        time.sleep(1)
    else:
        failures.add("prometheus", "the six admin ports are not all scraped")
    statuses = send_traffic(args.edge, args.key, args.local_model, args.seconds)
    log(f"traffic: {sum(statuses.values())} requests, by status {dict(sorted(statuses.items()))}")
    for wanted in (200, 401, 400, 404, 429):
        failures.check(statuses.get(wanted, 0) > 0, "traffic", f"no request answered {wanted}")
    # Let the last scrapes and rule evaluations see it.
    time.sleep(args.settle)

    err, result = prom_query(args.prometheus, 'group by (__name__) ({__name__=~"meshgate.*|up|ALERTS"})')
    failures.check(not err, "prometheus", f"cannot list series: {err}")
    existing = {r["metric"]["__name__"] for r in result}
    log(f"prometheus holds {len(existing)} meshgate metric names")

    absent: dict[str, set[str]] = {}
    checked = with_data = 0
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = grafana_to_promql(target["expr"])
                where = f"{path.name} / {panel['title']} / {target['refId']}"
                err, result = prom_query(args.prometheus, expr)
                checked += 1
                if err:
                    failures.add(where, f"{err} in {expr}")
                    continue
                missing = {m for m in metric_names(expr) if m not in existing}
                if missing:
                    for m in missing:
                        absent.setdefault(m, set()).add(f"{path.stem}: {panel['title']}")
                elif result:
                    with_data += 1
                else:
                    failures.add(where, f"returned no data although its metrics exist: {expr}")
        for var in dashboard["templating"]["list"]:
            match = re.fullmatch(r"label_values\((\w+), (\w+)\)", var.get("definition", ""))
            if var["type"] != "query":
                continue
            if not match:
                failures.add(f"{path.name} variable {var['name']}", f"unsupported query {var.get('definition')!r}")
                continue
            metric, label = match.groups()
            status, raw = http("GET", f"{args.prometheus}/api/v1/label/{label}/values?"
                               + urllib.parse.urlencode({"match[]": metric}))
            failures.check(status == 200 and json.loads(raw).get("status") == "success",
                           f"{path.name} variable {var['name']}", f"label values query failed: HTTP {status}")
            checked += 1
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            err, _ = prom_query(args.prometheus, rule["expr"])
            checked += 1
            failures.check(not err, f"rule {rule.get('alert') or rule.get('record')}", str(err))
    status, raw = http("GET", f"{args.prometheus}/api/v1/rules")
    loaded = json.loads(raw)["data"]["groups"] if status == 200 else []
    failures.check(len(loaded) == len(rules["groups"]), "prometheus", "did not load every rule group")
    for group in loaded:
        for rule in group["rules"]:
            failures.check(rule.get("health") == "ok", f"rule {rule['name']}",
                           f"health {rule.get('health')}: {rule.get('lastError')}")
    log(f"{checked} queries evaluated without error; {with_data} dashboard queries returned data")
    if absent:
        log("metrics the dashboards use that this mesh does not expose (yet) or that saw no traffic here:")
        for metric in sorted(absent):
            log(f"  {metric}: {'; '.join(sorted(absent[metric]))}")
    if failures.items:
        log(f"live checks: {len(failures.items)} failure(s)")
        return 1
    log("live checks: ok")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    static = sub.add_parser("static")
    static.add_argument("--kubectl", required=True)
    static.add_argument("--promtool", required=True)
    static.add_argument("--compose-schema", required=True)
    static.add_argument("--meshgate", help="meshgate binary for check-config (skipped when absent)")
    render = sub.add_parser("render-k8s")
    render.add_argument("--check", action="store_true")
    live = sub.add_parser("live")
    live.add_argument("--prometheus", required=True)
    live.add_argument("--edge", required=True)
    live.add_argument("--key", required=True)
    live.add_argument("--local-model")
    live.add_argument("--seconds", type=float, default=8)
    live.add_argument("--settle", type=float, default=4)
    args = parser.parse_args()
    return {"static": cmd_static, "render-k8s": cmd_render_k8s, "live": cmd_live}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
