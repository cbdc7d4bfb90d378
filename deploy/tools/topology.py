#!/usr/bin/env python3
"""The Helm chart's topology, run for real by scripts/check-topology.sh (which makes the network
namespaces, starts the pods and cleans up).

Subcommands:
  plan    renders the chart with what a real install sets (Postgres, Redis, a provider, two
          gateway replicas) and turns every Deployment replica and the migration Job into a "pod":
          its address, its /etc/hosts (the chart's Service names resolved to the pods behind
          them), its volumes written as the kubelet would (projected ConfigMap and Secret files in
          the atomic-writer layout, emptyDirs, claims mapped to host directories), a launcher that
          runs its container's command with its environment, user and read-only root, and
          nftables rules enforcing the NetworkPolicies that select it. The mesh certificates
          (`meshgate certs` output) go into the Secrets the chart names, as an operator does.
  smoke   the smoke suite through both gateway replicas: a key created on one works on the other
          (and its revocation reaches the other), a job is enqueued on one and delivered, a tight
          budget refuses on both once spent, a local model is served, a trace recorded through
          one is readable on the other. Then the mesh: no pod refused any call of another; an
          internal port refuses plaintext, UNAUTHENTICATED without a certificate,
          PERMISSION_DENIED outside the allow-list (counted), and presents a renewed certificate
          after the kubelet swaps it in, without a restart.
  mtls-probe  the probes of an internal port, run inside a pod's network namespace.
  policy  fails when a NetworkPolicy refused a connection from a pod of the release: the pods
          made a call the chart does not admit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_deploy  # noqa: E402  (the chart render and manifest helpers)

ROOT = check_deploy.ROOT
RELEASE, NAMESPACE = "meshgate", "meshgate"
# The nftables table holding a pod's NetworkPolicy rules.
POLICY_TABLE = "meshgate_policy"
# How long the smoke suite waits for something asynchronous (a delivery, a trace, a revocation).
SETTLE_SECONDS = 30


def log(message: str) -> None:
    print(f"[topology] {message}", file=sys.stderr, flush=True)


# --- plan --------------------------------------------------------------------------------------

def install_values(args) -> dict:
    """The default values plus what a real install sets."""
    config = "[inference]\nmodels_dir = \"/models\"\n\n"
    # Its own counters in a Redis other checks may share.
    config += f"[quota]\nkey_prefix = \"{args.quota_prefix}\"\n"
    values = {
        "adminKey": {"value": args.admin_key},
        "database": {"url": args.database_url},
        "redis": {"url": args.redis_url},
        "providers": [{"name": "mock", "baseUrl": args.upstream, "models": ["mock-gpt"]}],
        "config": config,
        "services": {
            "gateway": {"replicas": 2},
            # No Kubernetes API server here: the router plans from its config and the catalog.
            "router": {"kubernetes": {"enabled": False}},
        },
    }
    if args.models:
        values["services"]["inference"] = {"models": {"existingClaim": "meshgate-models"}}
    return values


def render(chart_dir: Path, values: dict) -> list[dict]:
    import helm_python as helm

    with check_deploy.QuietHelm(), helm.Chart.load(chart_dir) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path in sorted(files):
        if not path.endswith(".txt"):
            objects.extend(doc for doc in yaml.safe_load_all(files[path]) if doc)
    return objects


def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage (what every container starts with)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    final = text[text.rindex("\nFROM "):]
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/"}
    for line in final.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in shlex.split(line[4:]))
    return env


def tls_secrets(objects: list[dict], certs: Path) -> list[dict]:
    """The Secrets an operator makes from `meshgate certs` output (helm/README.md): for each
    Deployment, the Secret its pods read `tls/<service>.crt` from, in cert-manager's layout."""
    out = {}
    for obj in objects:
        if obj.get("kind") != "Deployment":
            continue
        svc = check_deploy.component(obj)
        for volume in obj["spec"]["template"]["spec"].get("volumes", []):
            for source in volume.get("projected", {}).get("sources", []):
                secret = source.get("secret")
                if secret and any(item["path"] == f"tls/{svc}.crt" for item in secret.get("items", [])):
                    out[secret["name"]] = {
                        "kind": "Secret", "metadata": {"name": secret["name"]},
                        "stringData": {"tls.crt": (certs / f"{svc}.crt").read_text(),
                                       "tls.key": (certs / f"{svc}.key").read_text(),
                                       "ca.crt": (certs / "ca.crt").read_text()}}
    return list(out.values())


class Store:
    """The ConfigMaps and Secrets of the release (and the operator's), by name."""

    def __init__(self, objects: list[dict]) -> None:
        self.config_maps = {o["metadata"]["name"]: o.get("data") or {} for o in objects if o.get("kind") == "ConfigMap"}
        secrets = check_deploy.secret_values(objects)
        self.secrets: dict[str, dict[str, str]] = {}
        for (name, key), value in secrets.items():
            self.secrets.setdefault(name, {})[key] = value
        for obj in objects:
            if obj.get("kind") == "Secret":
                self.secrets.setdefault(obj["metadata"]["name"], {})

    def source(self, kind: str, name: str) -> dict[str, str] | None:
        return (self.config_maps if kind == "configMap" else self.secrets).get(name)


class Pod:
    """One replica of a Deployment (or the Job's pod) at its address."""

    def __init__(self, name: str, obj: dict, ip: str) -> None:
        self.name, self.obj, self.ip = name, obj, ip
        self.spec = obj["spec"]["template"]["spec"]
        self.labels = obj["spec"]["template"]["metadata"]["labels"]
        self.component = self.labels.get("app.kubernetes.io/component")
        self.container = self.spec["containers"][0]
        self.ports = {p["name"]: p["containerPort"] for p in self.container.get("ports", [])}


def make_pods(objects: list[dict], subnet: str) -> list[Pod]:
    """A pod per Deployment replica (one when an autoscaler owns the count) and per Job, at
    <subnet>.10 onwards."""
    pods, host = [], 10
    for obj in objects:
        if obj.get("kind") in ("Deployment", "Job"):
            replicas = obj["spec"].get("replicas", 1) if obj["kind"] == "Deployment" else 1
            for i in range(replicas):
                name = f"{check_deploy.component(obj)}-{i}"
                pods.append(Pod(name, obj, f"{subnet}.{host}"))
                host += 1
    return pods


def selects(selector: dict, labels: dict) -> bool:
    if selector.get("matchExpressions"):
        raise SystemExit(f"selectors with matchExpressions are not emulated: {selector}")
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def hosts_file(pod: Pod, pods: list[Pod], objects: list[dict]) -> str:
    """/etc/hosts of a pod: the Services' names (all their namespace forms) resolved to the pods
    behind them, rotated per pod so that callers spread over a Service's replicas."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost", f"{pod.ip} {pod.name}"]
    index = pods.index(pod)
    for svc in (o for o in objects if o.get("kind") == "Service"):
        behind = [p.ip for p in pods if p.obj.get("kind") == "Deployment" and selects({"matchLabels": svc["spec"]["selector"]}, p.labels)]
        if not behind:
            continue
        shift = index % len(behind)
        name = svc["metadata"]["name"]
        names = f"{name} {name}.{NAMESPACE} {name}.{NAMESPACE}.svc {name}.{NAMESPACE}.svc.cluster.local"
        lines += [f"{ip} {names}" for ip in behind[shift:] + behind[:shift]]
    return "\n".join(lines) + "\n"


def policy_rules(pod: Pod, pods: list[Pod], objects: list[dict]) -> str | None:
    """nftables rules enforcing the NetworkPolicies that select `pod` (None: no policy selects
    it, everything is admitted). New TCP connections pass only as a policy's rule admits them;
    refused ones are counted per source pod so `policy` can name who tried."""
    policies = [p for p in objects if p.get("kind") == "NetworkPolicy" and "Ingress" in p["spec"].get("policyTypes", [])
                and selects(p["spec"]["podSelector"], pod.labels)]
    if not policies:
        return None
    accepts = []
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = sorted({pod.ports.get(p["port"], p["port"]) for p in rule.get("ports", [])
                            if p.get("protocol", "TCP") == "TCP"})
            sources: set[str] | None = set()
            for peer in rule.get("from") or [{}]:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    sources |= {p.ip for p in pods if selects(peer["podSelector"], p.labels)}
                else:
                    # Another namespace or an address block: anything outside the release, and
                    # here the release's own pods too (too open rather than wrongly refusing;
                    # scripts/check-deploy.sh checks who such rules may admit).
                    sources = None
                    break
            if sources is not None and not sources:
                continue
            match = f"tcp dport {{ {', '.join(map(str, ports))} }}" if ports else "meta l4proto tcp"
            source = f" ip saddr {{ {', '.join(sorted(sources))} }}" if sources is not None else ""
            accepts.append(f"    {match}{source} accept")
    refusals = [f"    ip saddr {p.ip} counter drop comment \"{p.name}\"" for p in pods if p is not pod]
    return "\n".join([
        f"table inet {POLICY_TABLE} {{",
        "  chain input {",
        "    type filter hook input priority 0; policy accept;",
        "    ct state established,related accept",
        "    iif lo accept",
        "    meta l4proto != tcp accept",
        *accepts,
        *refusals,
        "    counter drop comment \"outside\"",
        "  }",
        "}",
    ]) + "\n"


def write_files(directory: Path, files: dict[str, tuple[str, int]], group: int | None) -> None:
    """A ConfigMap/Secret/projected volume as the kubelet's atomic writer lays it out, and
    updates it as the kubelet does when a Secret changes: the files in a new timestamped
    directory, `..data` switched to it in one rename, each top-level entry a link through
    `..data`, the previous directory removed."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = Path(tempfile.mkdtemp(prefix=f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.", dir=directory))
    os.chmod(stamp, 0o755)
    for path, (content, mode) in files.items():
        target = stamp / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        os.chmod(target, mode)
        if group is not None:
            os.chown(target, 0, group)
    data = directory / "..data"
    previous = data.resolve() if data.is_symlink() else None
    (directory / "..data_tmp").symlink_to(stamp.name)
    os.rename(directory / "..data_tmp", data)
    for top in sorted({path.split("/")[0] for path in files}):
        if not (directory / top).is_symlink():
            (directory / top).symlink_to(f"..data/{top}")
    if previous:
        shutil.rmtree(previous)


def read_files(directory: Path) -> tuple[dict[str, tuple[str, int]], int | None]:
    """The files a volume written by `write_files` holds now, and their group."""
    data = (directory / "..data").resolve()
    files, group = {}, None
    for path in sorted(p for p in data.rglob("*") if p.is_file()):
        stat = path.stat()
        files[str(path.relative_to(data))] = (path.read_text(), stat.st_mode & 0o7777)
        group = stat.st_gid
    return files, group


def volume_files(volume: dict, store: Store) -> dict[str, tuple[str, int]]:
    """The files of a configMap, secret or projected volume: relative path -> (content, mode)."""
    if "projected" in volume:
        default = volume["projected"].get("defaultMode", 0o644)
        sources = volume["projected"]["sources"]
    else:
        default = volume.get("configMap", volume.get("secret", {})).get("defaultMode", 0o644)
        sources = [volume]
    files = {}
    for source in sources:
        kind = "configMap" if "configMap" in source else "secret"
        spec = source[kind]
        name = spec.get("name") or spec.get("secretName")
        data = store.source(kind, name)
        if data is None:
            raise SystemExit(f"the {kind} {name} a volume needs is neither rendered nor given")
        items = spec.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                raise SystemExit(f"{kind} {name} has no key {item['key']}")
            files[item["path"]] = (data[item["key"]], item.get("mode", default))
    return files


def env_of(pod: Pod, store: Store, base: dict[str, str]) -> dict[str, str]:
    """The container's environment: the image's, then envFrom, then env (later wins)."""
    env = dict(base)
    for source in pod.container.get("envFrom", []):
        kind = "configMap" if "configMapRef" in source else "secret"
        ref = source.get("configMapRef") or source.get("secretRef")
        env.update(store.source(kind, ref["name"]) or {})
    env["HOSTNAME"] = pod.name
    for entry in pod.container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
            continue
        ref = entry["valueFrom"]
        if "secretKeyRef" in ref or "configMapKeyRef" in ref:
            kind = "secret" if "secretKeyRef" in ref else "configMap"
            key_ref = ref.get("secretKeyRef") or ref.get("configMapKeyRef")
            data = store.source(kind, key_ref["name"]) or {}
            if key_ref["key"] not in data:
                raise SystemExit(f"{pod.name}: {entry['name']} reads {kind} {key_ref['name']} key {key_ref['key']}, which is not there")
            env[entry["name"]] = data[key_ref["key"]]
        elif "fieldRef" in ref:
            field = ref["fieldRef"]["fieldPath"]
            env[entry["name"]] = {"metadata.name": pod.name, "metadata.namespace": NAMESPACE, "status.podIP": pod.ip}[field]
        else:
            raise SystemExit(f"{pod.name}: unsupported env source {ref}")
    return env


def launcher(pod: Pod, pod_dir: Path, store: Store, args, base_env: dict[str, str]) -> tuple[str, list[str]]:
    """The pod's volumes written out, and a bash script that mounts them where the container
    sees them and runs its command; returns the script and the mount points it needs."""
    volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
    security = pod.spec.get("securityContext", {})
    group = security.get("fsGroup")
    lines = ["#!/usr/bin/env bash", f"# {pod.name}: {check_deploy.kn(pod.obj)}, container {pod.container['name']}.",
             "set -euo pipefail"]
    mount_points = []
    for mount in sorted(pod.container.get("volumeMounts", []), key=lambda m: m["mountPath"]):
        if "subPath" in mount or "subPathExpr" in mount:
            raise SystemExit(f"{pod.name}: subPath mounts are not emulated (and would keep rotations out)")
        volume = volumes[mount["name"]]
        source = pod_dir / "volumes" / mount["name"]
        if not source.exists():
            if "emptyDir" in volume:
                source.mkdir(parents=True)
                os.chmod(source, 0o1777)
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if claim != "meshgate-models" or not args.models:
                    raise SystemExit(f"{pod.name}: no directory for the claim {claim}")
                source = Path(args.models)
            else:
                source.mkdir(parents=True)
                os.chmod(source, 0o755)
                write_files(source, volume_files(volume, store), group)
        lines.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(mount['mountPath'])}")
        if mount.get("readOnly"):
            lines.append(f"mount -o remount,bind,ro {shlex.quote(mount['mountPath'])}")
        mount_points.append(mount["mountPath"])
    container_security = pod.container.get("securityContext", {})
    if container_security.get("readOnlyRootFilesystem"):
        lines.append("mount -o remount,bind,ro /")
    env = env_of(pod, store, base_env)
    command = pod.container["command"] + pod.container.get("args", [])
    binary = Path(args.bin) / command[0]
    if not binary.is_file():
        raise SystemExit(f"{pod.name}: no binary {binary} for the command {command[0]}")
    user = ["setpriv"]
    if "runAsUser" in security:
        user += [f"--reuid={security['runAsUser']}", f"--regid={security.get('runAsGroup', security['runAsUser'])}",
                 f"--groups={group if group is not None else security.get('runAsGroup', security['runAsUser'])}"]
    if "ALL" in container_security.get("capabilities", {}).get("drop", []):
        user += ["--inh-caps=-all", "--bounding-set=-all"]
    if container_security.get("allowPrivilegeEscalation") is False:
        user.append("--no-new-privs")
    lines.append("cd /")
    lines.append("exec " + " ".join(shlex.quote(a) for a in user + ["--", "env", "-i"]
                                    + [f"{k}={v}" for k, v in sorted(env.items())] + [str(binary)] + command[1:]))
    return "\n".join(lines) + "\n", mount_points


def cmd_plan(args) -> int:
    out = Path(args.out)
    objects = render(Path(args.chart), install_values(args))
    objects += tls_secrets(objects, Path(args.certs))
    store = Store(objects)
    pods = make_pods(objects, args.subnet)
    base_env = image_env()
    if args.ort:
        base_env["ORT_DYLIB_PATH"] = args.ort
    else:
        base_env.pop("ORT_DYLIB_PATH", None)
    table, mount_points = [], set()
    for pod in pods:
        pod_dir = out / "pods" / pod.name
        pod_dir.mkdir(parents=True)
        os.chmod(pod_dir, 0o755)
        script, points = launcher(pod, pod_dir, store, args, base_env)
        mount_points |= set(points)
        (pod_dir / "run.sh").write_text(script)
        os.chmod(pod_dir / "run.sh", 0o700)
        (pod_dir / "hosts").write_text(hosts_file(pod, pods, objects))
        rules = policy_rules(pod, pods, objects)
        (pod_dir / "policy.nft").write_text(rules or "")
        table.append([pod.name, pod.ip, pod.obj["kind"], str(pod.ports.get("admin", 0))])
    (out / "pods.tsv").write_text("".join("\t".join(row) + "\n" for row in table))
    (out / "mountpoints").write_text("".join(f"{p}\n" for p in sorted(mount_points)))
    gateways = [p for p in pods if p.component == "gateway"]
    internal = next(p for p in pods if p.component == "quota")
    quota_service = next(o["metadata"]["name"] for o in objects if o.get("kind") == "Service"
                         and o["spec"]["selector"].get("app.kubernetes.io/component") == "quota")
    plan = {
        "gateways": [f"http://{p.ip}:{p.ports['http']}" for p in gateways],
        "admin_key": args.admin_key,
        "admin": {p.name: f"http://{p.ip}:{p.ports['admin']}" for p in pods if "admin" in p.ports},
        # The volume each pod reads its mesh certificate from, for the rotation.
        "tls_volumes": {p.name: str(out / "pods" / p.name / "volumes" / v["name"]) for p in pods
                        for v in p.spec.get("volumes", []) if any(
                            item["path"] == f"tls/{p.component}.crt" for s in v.get("projected", {}).get("sources", [])
                            for item in s.get("secret", {}).get("items", []))},
        # Chat models of the inference claim: served by the inference pod through the gateway.
        "local_chat_models": [m["name"] for m in json.loads((Path(args.models) / "manifest.json").read_text())["models"]
                              if m.get("task") == "chat"] if args.models else [],
        # An internal port and the name its callers dial, for the mTLS probe.
        "internal": {"pod": internal.name, "ip": internal.ip, "port": internal.ports["grpc"], "host": quota_service},
    }
    (out / "plan.json").write_text(json.dumps(plan, indent=2))
    log(f"{len(pods)} pods: " + ", ".join(f"{p.name} {p.ip}" for p in pods))
    return 0


# --- smoke -------------------------------------------------------------------------------------

class Failed(Exception):
    pass


def call(method: str, url: str, key: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict, dict]:
    """One edge request: (status, JSON body or {}, headers)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {key}"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw, status, got = response.read(), response.status, response.headers
    except urllib.error.HTTPError as err:
        raw, status, got = err.read(), err.code, err.headers
    try:
        payload = json.loads(raw) if raw else {}
    except ValueError:
        payload = {"raw": raw[:200].decode(errors="replace")}
    return status, payload, {k.lower(): v for k, v in got.items()}


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise Failed(message)


def eventually(what: str, probe, seconds: float = SETTLE_SECONDS):
    """Polls `probe` (returning a truthy result when done) for up to `seconds`."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last and last[0]:
            return last
        time.sleep(0.25)
    raise Failed(f"{what} within {seconds:.0f} s; last: {last}")


def chat_body(text: str, max_tokens: int = 16) -> dict:
    return {"model": "mock-gpt", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}


def smoke(plan: dict) -> None:
    one, two = plan["gateways"]
    admin = plan["admin_key"]
    for gateway in (one, two):
        status, body, _ = call("GET", f"{gateway}/v1/models", admin)
        expect(status == 200, f"{gateway}: the admin key lists models: {status} {body}")

    # Tenancy lives in Postgres: a key made through one replica works through the other at once,
    # and its revocation (published on Redis) reaches the other replica's cache.
    status, key, _ = call("POST", f"{one}/v1/keys", admin, {"name": "topology-tenant", "role": "developer"})
    expect(status == 201, f"creating a key on gateway-0: {status} {key}")
    status, body, _ = call("POST", f"{two}/v1/chat/completions", key["secret"], chat_body("across replicas"))
    expect(status == 200, f"the key made on gateway-0 on gateway-1: {status} {body}")
    status, listed, _ = call("GET", f"{two}/v1/keys", admin)
    expect(status == 200 and any(k["id"] == key["id"] for k in listed.get("data", [])),
           f"gateway-1 lists the key made on gateway-0: {status} {listed}")
    status, body, _ = call("DELETE", f"{two}/v1/keys/{key['id']}", admin)
    expect(status in (200, 204), f"revoking the key on gateway-1: {status} {body}")
    eventually("the key revoked on gateway-1 is refused by gateway-0",
               lambda: (call("GET", f"{one}/v1/models", key["secret"])[0] == 401,))
    log("tenancy: a key made on gateway-0 works on gateway-1; revoked on gateway-1, gateway-0 refuses it")

    # The durable queue in Postgres, delivered by either sync replica through the provider and
    # charged through quota.
    status, job, _ = call("POST", f"{one}/v1/jobs", admin, chat_body("deliver me later"))
    expect(status == 202, f"enqueueing a job on gateway-0: {status} {job}")
    done = eventually(f"job {job.get('id')} delivered (read through gateway-1)", lambda: (
        lambda got: (got[1].get("status") == "succeeded", got[1]))(call("GET", f"{two}/v1/jobs/{job['id']}", admin)))
    expect(bool(done[1].get("result", {}).get("content")), f"the delivered job has no content: {done[1]}")
    log(f"jobs: {job['id']} enqueued on gateway-0, delivered, read on gateway-1")

    # Quota counters in Redis: a budget spent through both replicas refuses on both.
    status, tight, _ = call("POST", f"{two}/v1/keys", admin, {"name": "topology-budget", "role": "developer"})
    expect(status == 201, f"creating the budget key on gateway-1: {status} {tight}")
    limits = {"scope": {"kind": "key", "id": tight["id"]}, "limits": {"tokens_per_day": 200}}
    status, body, _ = call("PUT", f"{one}/v1/quota/limits", admin, limits)
    expect(status == 200, f"setting the key's budget on gateway-0: {status} {body}")
    served = {one: 0, two: 0}
    # Spent once both replicas refuse in a row: one replica's refusal alone may only mean the
    # rest of the budget is leased to the other, which may still serve from its slice.
    refused = set()
    for attempt in range(60):
        gateway = (one, two)[attempt % 2]
        status, body, _ = call("POST", f"{gateway}/v1/chat/completions", tight["secret"], chat_body("spend", 32))
        if status == 429:
            expect(body.get("error", {}).get("code") == "quota_exceeded", f"a 429 that is not quota_exceeded: {body}")
            refused.add(gateway)
            if len(refused) == 2:
                break
            continue
        expect(status == 200, f"{gateway} while spending the budget: {status} {body}")
        served[gateway] += 1
        refused.clear()
    expect(len(refused) == 2, "a budget of 200 tokens a day was never spent in 60 requests")
    expect(all(served.values()), f"both replicas should serve before the budget runs out: {served}")
    for gateway in (one, two):
        status, body, headers = call("POST", f"{gateway}/v1/chat/completions", tight["secret"], chat_body("more", 32))
        expect(status == 429 and body.get("error", {}).get("code") == "quota_exceeded"
               and headers.get("x-meshgate-quota-scope") == f"key:{tight['id']}",
               f"{gateway} after the budget was spent: {status} {body} {headers.get('x-meshgate-quota-scope')}")
    log(f"quota: {sum(served.values())} requests served across both replicas, then both refuse (key budget)")

    # A local model: the inference pod's, in the router's plan (router → inference) and served
    # through the gateway (gateway → inference).
    for model in plan["local_chat_models"][:1]:
        eventually(f"{model} listed by gateway-1", lambda: (
            lambda got: (any(m.get("id") == model for m in got[1].get("data", [])), got[0]))(
                call("GET", f"{two}/v1/models", admin)))
        body = chat_body("hello local") | {"model": model}
        status, answer, headers = call("POST", f"{two}/v1/chat/completions", admin, body)
        expect(status == 200 and headers.get("x-meshgate-layer") == "l0",
               f"{model} through gateway-1: {status} {answer} layer {headers.get('x-meshgate-layer')}")
        log(f"local models: {model} served by the inference pod through gateway-1")

    # Traces: recorded by analytics from one replica, read through the other.
    status, body, headers = call("POST", f"{one}/v1/chat/completions", admin, chat_body("trace me"))
    expect(status == 200, f"a chat on gateway-0: {status} {body}")
    request_id = headers["x-meshgate-request-id"]
    trace = eventually(f"trace {request_id} readable on gateway-1", lambda: (
        lambda got: (got[0] == 200, got[1]))(call("GET", f"{two}/v1/traces/{request_id}", admin)))
    expect(json.dumps(trace[1]).find(request_id) >= 0, f"the trace does not name its request: {trace[1]}")
    log(f"traces: {request_id} served by gateway-0 is readable on gateway-1")


def grpc_call(ip: str, port: int, host: str, path: str, ca: Path, identity: tuple[Path, Path] | None) -> int:
    """One unary gRPC call with an empty request over TLS (HTTP/2): the server must present a
    certificate of the mesh CA for `host`; `identity` is the client certificate and key, if any.
    Returns the grpc-status."""
    import h2.config
    import h2.connection
    import h2.events

    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    if identity:
        context.load_cert_chain(str(identity[0]), str(identity[1]))
    with socket.create_connection((ip, port), timeout=10) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [(":method", "POST"), (":scheme", "https"), (":path", path), (":authority", host),
                                   ("content-type", "application/grpc"), ("te", "trailers")])
        conn.send_data(stream, b"\0\0\0\0\0", end_stream=True)
        tls.sendall(conn.data_to_send())
        status = None
        while True:
            data = tls.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    headers = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                               for k, v in event.headers}
                    status = int(headers["grpc-status"]) if "grpc-status" in headers else status
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    expect(status is not None, f"{path}: the stream ended without a grpc-status ({event})")
                    return status
            tls.sendall(conn.data_to_send())
    raise Failed(f"{path}: the connection closed without an answer")


def served_certificate(target: dict, ca: Path) -> bytes:
    """The certificate (DER) an internal port presents, checked against the mesh CA and name."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((target["ip"], target["port"]), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=target["host"]) as tls:
            return tls.getpeercert(binary_form=True)


def mtls_probe(plan: dict, certs: Path, serves: Path | None) -> None:
    """An internal gRPC port speaks only TLS, with a server certificate of the mesh CA for the
    name its callers dial (with `serves`: that certificate, once the pod has re-read its files);
    a caller without a certificate is UNAUTHENTICATED, a mesh identity outside the RPC's
    allow-list PERMISSION_DENIED, an allowed one served. Run from inside a pod the
    NetworkPolicies let reach it."""
    target = plan["internal"]
    ca = certs / "ca.crt"
    if serves:
        want = ssl.PEM_cert_to_DER_cert(serves.read_text())
        eventually(f"{target['pod']} presenting {serves.name} as rotated",
                   lambda: (served_certificate(target, ca) == want,), seconds=SETTLE_SECONDS)
        log(f"mtls: {target['pod']} presents its rotated certificate, re-read without a restart")
    health, set_limits = "/grpc.health.v1.Health/Check", "/meshgate.quota.v1.Quota/SetLimits"
    identity = {name: (certs / f"{name}.crt", certs / f"{name}.key") for name in ("gateway", "sync")}
    where = f"{target['pod']} ({target['host']}:{target['port']})"
    with socket.create_connection((target["ip"], target["port"]), timeout=10) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
        raw.settimeout(5)
        try:
            reply = raw.recv(64)
        except (ConnectionError, TimeoutError):
            reply = b""
        # A TLS alert (content type 21) or nothing; never an HTTP/2 SETTINGS frame (type 4).
        expect(not reply or reply[0] == 21, f"{where} answered a plaintext HTTP/2 client: {reply[:16]!r}")
    for path, who, want in ((health, None, 16), (set_limits, "sync", 7), (health, "gateway", 0)):
        got = grpc_call(target["ip"], target["port"], target["host"], path, ca, identity.get(who) if who else None)
        expect(got == want, f"{where} {path} as {who or 'no certificate'}: grpc-status {got}, expected {want}")
    log(f"mtls: {where} refuses plaintext, answers UNAUTHENTICATED without a certificate, "
        "PERMISSION_DENIED to sync for SetLimits, and serves the gateway")


def mesh_refusals(plan: dict) -> dict[tuple[str, str, str, str], float]:
    """(pod, method, caller, reason) -> calls its gRPC listener refused (allow-list, identity,
    size), from every pod's /metrics."""
    line = re.compile(r'^meshgate_grpc_server_refused_total\{(.*)\} (\S+)$')
    out = {}
    for pod, admin in plan["admin"].items():
        with urllib.request.urlopen(f"{admin}/metrics", timeout=10) as response:
            for text in response.read().decode().splitlines():
                match = line.match(text)
                if match and float(match[2]):
                    labels = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
                    out[(pod, labels.get("method", ""), labels.get("caller", ""), labels.get("reason", ""))] = float(match[2])
    return out


def cmd_smoke(args) -> int:
    plan = json.loads(Path(args.plan).read_text())
    try:
        smoke(plan)
        # Every call the pods made passed their peers' allow-lists.
        refused = mesh_refusals(plan)
        expect(not refused, f"the mesh refused calls of the release's pods: {refused}")
        log("mtls: every call between the pods passed its peer's identity and allow-list checks")
        # From gateway-0's network namespace: the NetworkPolicies admit it to quota.
        result = subprocess.run(["ip", "netns", "exec", args.probe_netns, sys.executable, __file__, "mtls-probe",
                                 "--plan", args.plan, "--certs", args.certs], timeout=60)
        expect(result.returncode == 0, "the mTLS probe failed")
        # The probe's two refusals, counted where they happened.
        refused = mesh_refusals(plan)
        expect(len(refused) == 2 and all(key[0] == plan["internal"]["pod"] for key in refused),
               f"the probe's refusals are not counted as two on {plan['internal']['pod']}: {refused}")
        log(f"mtls: the probe's refusals are counted: {sorted(refused)}")
        rotate(plan, args)
    except Failed as err:
        log(f"FAILED: {err}")
        return 1
    log("smoke suite passed")
    return 0


def rotate(plan: dict, args) -> None:
    """cert-manager renews the probed pod's certificate (same CA): the kubelet swaps the files in
    its volume; the running process must present the new one, and both gateways keep serving."""
    pod = plan["internal"]["pod"]
    service = pod.rsplit("-", 1)[0]
    volume = Path(plan["tls_volumes"][pod])
    files, group = read_files(volume)
    rotated = Path(args.rotated_certs)
    for suffix in ("crt", "key"):
        path = f"tls/{service}.{suffix}"
        files[path] = ((rotated / f"{service}.{suffix}").read_text(), files[path][1])
    write_files(volume, files, group)
    result = subprocess.run(["ip", "netns", "exec", args.probe_netns, sys.executable, __file__, "mtls-probe",
                             "--plan", args.plan, "--certs", str(rotated), "--serves", str(rotated / f"{service}.crt")],
                            timeout=SETTLE_SECONDS + 60)
    expect(result.returncode == 0, "the rotated certificate was not picked up")
    for gateway in plan["gateways"]:
        status, body, _ = call("POST", f"{gateway}/v1/chat/completions", plan["admin_key"], chat_body("after rotation"))
        expect(status == 200, f"{gateway} after {pod}'s certificate rotated: {status} {body}")


def cmd_mtls_probe(args) -> int:
    try:
        mtls_probe(json.loads(Path(args.plan).read_text()), Path(args.certs), Path(args.serves) if args.serves else None)
    except (Failed, OSError) as err:
        log(f"FAILED: {err}")
        return 1
    return 0


# --- policy ------------------------------------------------------------------------------------

def cmd_policy(args) -> int:
    """Every connection a pod's NetworkPolicy rules refused, from a pod of the release, fails."""
    refused = []
    for line in Path(args.pods).read_text().splitlines():
        name = line.split("\t")[0]
        result = subprocess.run(["ip", "netns", "exec", f"{args.netns_prefix}{name}", "nft", "-j", "list", "table",
                                 "inet", POLICY_TABLE],
                                capture_output=True, text=True)
        if result.returncode != 0:
            continue
        for item in json.loads(result.stdout)["nftables"]:
            rule = item.get("rule")
            if not rule or rule.get("comment") in (None, "outside"):
                continue
            packets = next((e["counter"]["packets"] for e in rule["expr"] if "counter" in e), 0)
            if packets:
                refused.append(f"{rule['comment']} -> {name} ({packets} packets)")
    for entry in refused:
        log(f"FAILED: the NetworkPolicies refused {entry}: a call the chart does not admit")
    if not refused:
        log("NetworkPolicies: no pod of the release was refused a connection")
    return 1 if refused else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan")
    plan.add_argument("--out", required=True)
    plan.add_argument("--chart", default=str(check_deploy.CHART), help="the chart directory (default: the repository's)")
    plan.add_argument("--subnet", required=True, help="the first three octets of the pods' /24")
    plan.add_argument("--bin", required=True, help="directory of the meshgate binaries")
    plan.add_argument("--database-url", required=True)
    plan.add_argument("--redis-url", required=True)
    plan.add_argument("--upstream", required=True, help="base URL of the mock provider")
    plan.add_argument("--admin-key", required=True)
    plan.add_argument("--quota-prefix", required=True)
    plan.add_argument("--certs", required=True, help="`meshgate certs` output, stored as the mesh Secrets")
    plan.add_argument("--models", help="models directory mounted as the inference claim")
    plan.add_argument("--ort", help="ORT_DYLIB_PATH for the pods")
    smoke_cmd = sub.add_parser("smoke")
    smoke_cmd.add_argument("--plan", required=True)
    smoke_cmd.add_argument("--certs", required=True)
    smoke_cmd.add_argument("--probe-netns", required=True, help="a pod's network namespace the probe runs in")
    smoke_cmd.add_argument("--rotated-certs", required=True, help="new certificates of the same CA, for the rotation")
    probe = sub.add_parser("mtls-probe")
    probe.add_argument("--plan", required=True)
    probe.add_argument("--certs", required=True)
    probe.add_argument("--serves", help="the certificate the probed port must present (after a rotation)")
    policy = sub.add_parser("policy")
    policy.add_argument("--pods", required=True)
    policy.add_argument("--netns-prefix", required=True)
    args = parser.parse_args()
    return {"plan": cmd_plan, "smoke": cmd_smoke, "mtls-probe": cmd_mtls_probe, "policy": cmd_policy}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
