#!/usr/bin/env python3
"""meshgate chaos suite (issue 19): the six-process mesh with Postgres and Redis, two gateway
replicas behind the runner's own round-robin, a steady open-loop mixed load from three tenants with
tight budgets, a schedule of faults each held and then healed, and the invariants checked after
every fault and at the end. Standard library only. Run it through scripts/chaos.sh, which prepares
the venv, the binaries and a fresh Postgres database.

Faults: SIGKILL and restart of each service (gateway-1, router, quota, analytics, sync,
inference), Redis FLUSHALL + SIGKILL, and provider faults set on the running mock through its
`PUT /_mock/behavior` (started with --control), held, then healed by putting its healthy knobs back:
provider-hang (never answers), provider-500, provider-429 (with Retry-After) and provider-cut
(streams aborted after --cut-after completion pieces; sync always streams from the provider, so
every chat completion and job is cut, embeddings are not).

Invariants (per fault window and at the end):
  A  every non-2xx answer is 4xx or 503 with the JSON error shape {"error": {"code", "message"}},
     within the request's deadline (a timeout, a reset, a cut stream, 500/502/504 all fail it;
     only requests in flight on a gateway replica at the moment it was SIGKILLed are excused).
     During a provider fault (a request that overlapped [fault, heal]) an upstream failure may
     also be answered 502 upstream_error, 504 timeout, 503 service_unavailable or 429
     rate_limited (with Retry-After), as a status or as the error event of a stream already
     answered 200, still with the JSON error shape, the code matching the status, and within
     --target-timeout-ms + 2 s (the gateway's upstream deadline, not the client's); 500, a
     client-side timeout, a reset or a stream ending without [DONE] or an error event still fail it
  B  every 200 chat/stream/embedding has its trace (GET /v1/traces/{x-meshgate-request-id}, polled
     with a bound) and exactly one row in request_traces
  C  per tenant: quota used <= budget, the Postgres ledger <= budget, what the mock served <= budget;
     at the end (load stopped, settled): quota used == ledger == what the mock served. The mock
     serves a request by its recorded outcome (scripts/chaos/oracle.py): a completed reply in
     full, a failed or abandoned-while-waiting one not at all, a cut one partially (prompt + the
     pieces streamed). meshgate charges a request's cut reply by its documented estimate (prompt
     estimate + streamed bytes / 4), so C exact compares quota with the mock for everything else
     and takes each such partial reply at the charge its trace records (none: uncharged); the
     estimate's error is reported. A job's cut attempt stays at what the mock served
  D  every job answered 202 ends succeeded or dead within a bound, and the mock completed its
     Idempotency-Key (the job id) at most once (a succeeded job at least once); failed attempts
     (an error answer, a cut stream, a hang) are retries, not deliveries, and are only counted
  E  after healing, 10 consecutive requests on the affected path succeed within N seconds
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from httpc import ConnectFailed, Cut, request  # noqa: E402
from mesh import Mesh  # noqa: E402
from oracle import MockOracle  # noqa: E402
from oracle import served as oracle_served  # noqa: E402

HOST = "127.0.0.1"
CODE_STATUS = {
    "invalid_request": 400, "context_length_exceeded": 400, "invalid_api_key": 401, "permission_denied": 403,
    "not_found": 404, "model_not_found": 404, "conflict": 409, "payload_too_large": 413,
    "unsupported_media_type": 415, "policy_violation": 422, "quota_exceeded": 429, "rate_limited": 429,
    "upstream_error": 502, "service_unavailable": 503, "overloaded": 503, "timeout": 504,
    "not_implemented": 501, "internal_error": 500,
}
DEADLINES = {"chat": 10.0, "stream": 15.0, "job": 10.0, "embed": 10.0}
SERVICE_FAULTS = ["gateway-1", "router", "quota", "analytics", "sync", "inference", "redis-flushall"]
# Dependencies made unreachable without losing data (SIGSTOP, then SIGCONT), or restarted.
DEPENDENCY_FAULTS = ["redis-stall", "postgres-stall", "postgres-restart"]
# Not a fault: steady load for --soak-seconds, sampling what a leak would grow (see `leaks`).
SOAK = "soak"
# What a series may still grow over the second half of a soak without being called a leak:
# (absolute, fraction of its level). Redis keys as a whole grow until their retention (600 s)
# plateaus them, so only keys without an expiry are judged.
LEAK_ALLOWANCE = {"rss_kb": (8192, 0.10), "fds": (10, 0.0), "alive_tasks": (50, 0.0),
                  "redis.keys_without_ttl": (20, 0.0), "postgres.connections": (5, 0.0)}
# The knobs each provider fault puts on the mock (PUT /_mock/behavior); healing puts back the
# knobs the mock had at the start. provider-cut's piece count comes from --cut-after.
PROVIDER_FAULTS = {
    "provider-hang": {"hang": True},
    "provider-500": {"failure_rate": 1.0, "failure_status": 500},
    "provider-429": {"failure_rate": 1.0, "failure_status": 429, "retry_after_secs": 1},
    "provider-cut": {"fail_after_chunks": 2, "stream_fault": "abort"},
}
# What an upstream failure may be answered with during a provider fault: code -> status.
PROVIDER_CODES = {"rate_limited": 429, "upstream_error": 502, "service_unavailable": 503, "timeout": 504}
MIX = [("chat", 40), ("stream", 30), ("job", 15), ("embed", 15)]
GOOD = {"ok"}
ACCEPTABLE = {"ok", "refused", "excused", "provider_fault", "stalled_peer"}

T0 = time.time()


def log(msg: str) -> None:
    print(f"[chaos {time.time() - T0:7.1f}s] {msg}", flush=True)


def error_shape(payload) -> tuple[bool, str | None]:
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), dict):
        return False, None
    err = payload["error"]
    code = err.get("code")
    return isinstance(code, str) and isinstance(err.get("message"), str), code if isinstance(code, str) else None


def service_level(recs: list[dict], t0: float, t1: float) -> dict:
    """What tenant tC's load (its budget is never spent, so no refusal is by design) met between t0
    and t1: requests sent and answered 2xx per second, and the p50 / p99 latency of the answered
    JSON chat requests (streams, embeddings and jobs differ in shape, so only chat is compared with
    the healthy baseline)."""
    sent = [r for r in recs if t0 <= r["t_start"] < t1 and r["tenant"] == "tC"]
    seconds = max(t1 - t0, 1e-9)
    chat = sorted(r["latency"] for r in sent if r["kind"] == "chat" and r.get("outcome") == "ok" and "latency" in r)

    def pct(q: float) -> float | None:
        return round(chat[min(len(chat) - 1, int(q * len(chat)))] * 1000, 1) if chat else None

    return {"seconds": round(seconds, 1), "sent_per_s": round(len(sent) / seconds, 1),
            "ok_per_s": round(sum(1 for r in sent if r.get("outcome") == "ok") / seconds, 1),
            "chat_ok": len(chat), "chat_p50_ms": pct(0.5), "chat_p99_ms": pct(0.99)}


class Runner:
    def __init__(self, args, mesh: Mesh):
        self.args = args
        self.mesh = mesh
        self.records: list[dict] = []
        self.inflight = 0
        self.dropped = 0
        self.serial = itertools.count(1)
        self.rr = itertools.count()
        self.rng = random.Random(args.seed)
        self.tenants: dict[str, dict] = {}
        self.oracle = MockOracle(HOST, mesh.mock_port)
        self.kill_windows: list[dict] = []  # {"replica", "t_kill", "t_back"}
        self.down: set[str] = set()
        self.stop_load = asyncio.Event()
        self.load_tasks: set[asyncio.Task] = set()
        self.windows: list[dict] = []
        self.trace_checked: dict[str, bool] = {}
        self.jobs: dict[str, dict] = {}
        self.paused = False
        self.last_quiet: dict | None = None
        self.over_budget_seen: list[list[str]] = []  # [tenant + ":", what] already reported
        self.provider_windows: list[dict] = []  # {"fault", "t_fault", "t_heal"}
        self.stall_windows: list[dict] = []  # Redis or Postgres stopped: {"fault", "t_fault", "t_heal"}
        self.healthy_knobs: dict | None = None
        self.partial_charges: dict[int, int] = {}  # mock seq -> tokens its trace says were charged
        self.partial_trace_missing: dict[int, dict] = {}  # mock seq -> entry whose trace was not found

    # --- HTTP helpers -------------------------------------------------------------------------
    def edge(self, replica: str) -> int:
        return self.mesh.edge[replica]

    async def call(self, method, path, key, body=None, replica=None, timeout=10.0, headers=None):
        """A check's call: the given replica, else whichever answers (gateway-2 first)."""
        replicas = [replica] if replica else ["gateway-2", "gateway-1"]
        last = None
        for r in replicas:
            h = {"Authorization": f"Bearer {key}"}
            if body is not None:
                h["Content-Type"] = "application/json"
            h.update(headers or {})
            try:
                return await request(HOST, self.edge(r), method, path, headers=h, body=body, timeout=timeout)
            except (ConnectFailed, Cut, TimeoutError) as err:
                last = err
        raise RuntimeError(f"{method} {path}: no replica answered ({last!r})")

    # --- setup --------------------------------------------------------------------------------
    async def wait_ready(self, seconds=90.0) -> None:
        deadline = time.monotonic() + seconds
        for replica in ("gateway-1", "gateway-2"):
            while True:
                try:
                    r = await request(HOST, self.edge(replica), "GET", "/v1/models",
                                      headers={"Authorization": f"Bearer {self.mesh.admin_key}"}, timeout=2)
                    if r.status == 200:
                        break
                except (ConnectFailed, Cut, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{replica} not ready within {seconds} s; logs in {self.mesh.logs}")
                await asyncio.sleep(0.3)
        # A chat through each replica: the whole path (router, quota, sync, mock) answers.
        for replica in ("gateway-1", "gateway-2"):
            while True:
                r = await self.call("POST", "/v1/chat/completions", self.mesh.admin_key, replica=replica,
                                    body={"model": "mock-gpt", "max_tokens": 4,
                                          "messages": [{"role": "user", "content": "warm up"}]})
                if r.status == 200:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{replica} does not serve chat: {r.status} {r.body[:300]!r}")
                await asyncio.sleep(0.5)

    async def setup_tenants(self) -> None:
        admin = self.mesh.admin_key
        budgets = {"tA": self.args.budget_a, "tB": self.args.budget_b, "tC": self.args.budget_c}
        for name, budget in budgets.items():
            r = await self.call("POST", "/v1/projects", admin, {"name": f"chaos-{name}"}, replica="gateway-1")
            assert r.status == 201, f"create project: {r.status} {r.body!r}"
            project = r.json()
            r = await self.call("POST", "/v1/keys", admin, replica="gateway-2",
                                body={"name": f"chaos-{name}", "project_id": project["id"], "service": True,
                                      "role": "developer"})
            assert r.status == 201, f"create key: {r.status} {r.body!r}"
            key = r.json()
            r = await self.call("PUT", "/v1/quota/limits", admin, replica="gateway-1",
                                body={"scope": {"kind": "project", "id": project["id"]},
                                      "limits": {"tokens_per_day": budget}})
            assert r.status == 200, f"set limits: {r.status} {r.body!r}"
            self.tenants[name] = {"project": project["id"], "key_id": key["id"], "secret": key["secret"],
                                  "budget": budget}
            log(f"tenant {name}: project {project['id']} key {key['id']} tokens_per_day {budget}")

    # --- load ---------------------------------------------------------------------------------
    def body_for(self, kind: str, tenant: str, nonce: str) -> tuple[str, dict]:
        words = " ".join(self.rng.choice(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf"])
                         for _ in range(self.rng.randint(3, 9)))
        text = f"chaos tenant={tenant} nonce={nonce} {kind} {words}"
        if kind == "embed":
            return "/v1/embeddings", {"model": "mock-embed", "input": text}
        body = {"model": "mock-gpt", "max_tokens": 16, "messages": [{"role": "user", "content": text}]}
        if kind == "stream":
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return ("/v1/jobs" if kind == "job" else "/v1/chat/completions"), body

    async def one_request(self, rec: dict) -> None:
        self.inflight += 1
        try:
            await self._one_request(rec)
        finally:
            self.inflight -= 1
            rec["t_end"] = time.time()

    async def _one_request(self, rec: dict) -> None:
        tenant = self.tenants[rec["tenant"]]
        path, body = self.body_for(rec["kind"], rec["tenant"], rec["nonce"])
        headers = {"Authorization": f"Bearer {tenant['secret']}", "Content-Type": "application/json"}
        if rec["kind"] == "job":
            headers["Idempotency-Key"] = f"chaos-{rec['nonce']}"
        deadline = DEADLINES[rec["kind"]]
        started = time.monotonic()
        order = [rec["replica"], "gateway-2" if rec["replica"] == "gateway-1" else "gateway-1"]
        for attempt, replica in enumerate(order):
            rec["served_by"] = replica
            remaining = deadline - (time.monotonic() - started)
            try:
                resp = await request(HOST, self.edge(replica), "POST", path, headers=headers, body=body,
                                     timeout=remaining)
            except ConnectFailed as err:
                # What a load balancer does with a refused connection: the other replica.
                rec["connect_failures"] = rec.get("connect_failures", []) + [f"{replica}: {err}"]
                if attempt == 0:
                    rec["failover"] = True
                    continue
                rec["outcome"], rec["detail"] = "conn_error", str(err)
                return
            except Cut as err:
                rec["status"] = err.status
                rec["request_id"] = (err.headers or {}).get("x-meshgate-request-id")
                rec["outcome"], rec["detail"] = "cut", f"{err} after {len(err.body)} bytes"
                rec["partial"] = err.body[-300:].decode(errors="replace")
                return
            except TimeoutError:
                rec["outcome"], rec["detail"] = "timeout", f"no complete answer within {deadline:.0f} s"
                return
            self.classify(rec, resp)
            return

    def classify(self, rec: dict, resp) -> None:
        rec["status"] = resp.status
        rec["latency"] = round(resp.elapsed, 4)
        rec["request_id"] = resp.headers.get("x-meshgate-request-id")
        payload = None
        if rec["kind"] != "stream" or resp.status != 200:
            payload = resp.json()
        if 200 <= resp.status < 300:
            if rec["kind"] == "stream":
                self.classify_stream(rec, resp.body)
                return
            if payload is None:
                rec["outcome"], rec["detail"] = "bad_body", resp.body[:200].decode(errors="replace")
                return
            rec["outcome"] = "ok"
            if rec["kind"] == "job":
                rec["job_id"] = payload.get("id")
                self.jobs[payload.get("id")] = {"tenant": rec["tenant"], "nonce": rec["nonce"], "t": rec["t_start"],
                                                "status": payload.get("status")}
            elif isinstance(payload.get("usage"), dict):
                rec["usage"] = payload["usage"].get("total_tokens")
            return
        shape_ok, code = error_shape(payload)
        rec["code"] = code
        if resp.status == 429:
            rec["retry_after"] = resp.headers.get("retry-after") or resp.headers.get("x-meshgate-retry-after")
        if not shape_ok:
            rec["outcome"], rec["detail"] = "bad_shape", resp.body[:300].decode(errors="replace")
        elif not (400 <= resp.status < 500 or resp.status == 503):
            rec["outcome"], rec["detail"] = "bad_status", resp.body[:300].decode(errors="replace")
        else:
            rec["outcome"] = "refused"

    def classify_stream(self, rec: dict, body: bytes) -> None:
        done = False
        error = None
        usage = None
        for line in body.decode(errors="replace").splitlines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                continue
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if isinstance(event, dict) and "error" in event:
                error = event
            if isinstance(event, dict) and isinstance(event.get("usage"), dict):
                usage = event["usage"].get("total_tokens")
        rec["usage"] = usage
        if error is not None:
            shape_ok, code = error_shape(error)
            rec["code"] = code
            rec["stream_error"] = True
            status = CODE_STATUS.get(code or "", 500)
            if not shape_ok:
                rec["outcome"], rec["detail"] = "bad_shape", json.dumps(error)[:300]
            elif not (400 <= status < 500 or status == 503):
                rec["outcome"], rec["detail"] = "stream_error_5xx", json.dumps(error)[:300]
            else:
                rec["outcome"], rec["detail"] = "refused", "error event after 200"
        elif done:
            rec["outcome"] = "ok"
        else:
            rec["outcome"], rec["detail"] = "stream_cut", f"no [DONE] and no error event ({len(body)} bytes)"
            rec["partial"] = body[-300:].decode(errors="replace")

    async def load(self) -> None:
        interval = 1.0 / self.args.rate
        kinds = [k for k, w in MIX for _ in range(w)]
        tenants = list(self.tenants)
        next_at = time.monotonic()
        while not self.stop_load.is_set():
            next_at += interval
            if self.paused:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                continue
            serial = next(self.serial)
            rec = {"n": serial, "t_start": time.time(), "tenant": tenants[serial % len(tenants)],
                   "kind": self.rng.choice(kinds), "replica": ("gateway-1", "gateway-2")[next(self.rr) % 2],
                   "nonce": f"{serial}-{uuid.uuid4().hex[:8]}"}
            self.records.append(rec)
            if self.inflight >= self.args.max_inflight:
                rec["outcome"], rec["detail"] = "not_sent", "generator at its in-flight cap"
                rec["t_end"] = rec["t_start"]
                self.dropped += 1
            else:
                task = asyncio.create_task(self.one_request(rec))
                self.load_tasks.add(task)
                task.add_done_callback(self.load_tasks.discard)
            delay = next_at - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(self.stop_load.wait(), delay)
                except TimeoutError:
                    pass

    # --- outcome bookkeeping -------------------------------------------------------------------
    def excused(self, rec: dict) -> bool:
        """In flight on a gateway replica when it was SIGKILLed: nothing could have answered it."""
        if rec.get("outcome") not in ("cut", "stream_cut", "conn_error"):
            return False
        for w in self.kill_windows:
            if rec.get("served_by") == w["replica"] and rec["t_start"] <= w["t_kill"] + 0.05 and \
                    rec.get("t_end", 0) >= w["t_kill"] - 0.05:
                return True
        return False

    def answered_before_kill(self, rec: dict) -> bool:
        """Answered by a gateway replica within `--report-window` before it was SIGKILLed: its usage
        and trace may still have been in the replica's memory (leased usage is reported
        `report_delay_ms`, 20 ms, after it settles; traces leave `trace_flush_ms`, 20 ms, after
        the batch's first), the documented loss of a replica killed without a drain."""
        if rec.get("outcome") != "ok":
            return False
        # Whatever the replica answered was written before the kill, though the runner may read it after.
        return any(rec.get("served_by") == w["replica"] and rec["t_start"] <= w["t_kill"] and
                   rec.get("t_end", 0) >= w["t_kill"] - self.args.report_window
                   for w in self.kill_windows)

    def kill_window_tokens(self, tenant: str) -> int:
        """What the mock served for the tenant's requests answered just before their replica's kill."""
        by_nonce = self.oracle.tokens_by_nonce()
        return sum(by_nonce.get(r["nonce"], 0) for r in self.records
                   if r["tenant"] == tenant and self.answered_before_kill(r))

    def provider_window(self, rec: dict) -> dict | None:
        """The provider fault the request overlapped, if any."""
        for w in self.provider_windows:
            if rec["t_start"] <= w["t_heal"] and rec.get("t_end", rec["t_start"]) >= w["t_fault"]:
                return w
        return None

    def provider_bound(self) -> float:
        """How long an upstream failure may take to be answered: the gateway's target timeout
        (its upstream deadline) and 2 s for retries' tails and scheduling."""
        return self.args.target_timeout_ms / 1000 + 2.0

    def provider_fault_answer(self, rec: dict) -> str | None:
        """During a provider fault, an upstream failure with the error shape (the outcome says it
        was checked) and a code of PROVIDER_CODES matching its status: `provider_fault` within
        the bound, `provider_error_late` past it, `rate_limited_without_retry_after` for a 429
        that does not say when to retry; None for anything else."""
        if rec.get("outcome") not in ("refused", "bad_status", "stream_error_5xx"):
            return None
        code = rec.get("code")
        if code not in PROVIDER_CODES or self.provider_window(rec) is None:
            return None
        if not rec.get("stream_error") and rec.get("status") != PROVIDER_CODES[code]:
            return None
        took = rec.get("t_end", float("inf")) - rec["t_start"]
        if took > self.provider_bound():
            return "provider_error_late"
        if code == "rate_limited" and not rec.get("stream_error") and not rec.get("retry_after"):
            return "rate_limited_without_retry_after"
        return "provider_fault"

    def stalled_peer_answer(self, rec: dict) -> str | None:
        """While Redis or Postgres is stopped, a service that waits on it may not answer the gateway
        within its peer deadline (`peer_timeout_ms`, 2 s): the gateway answers 504 `timeout`,
        saying the outcome is unknown (a job may still be queued: resubmit it with the same
        Idempotency-Key), not 503, which says nothing took effect. Accepted with the error shape
        within the deadline plus 1 s; None for anything else."""
        if rec.get("outcome") != "bad_status" or rec.get("code") != "timeout" or rec.get("status") != 504:
            return None
        if not any(rec["t_start"] <= w["t_heal"] and rec.get("t_end", rec["t_start"]) >= w["t_fault"]
                   for w in self.stall_windows):
            return None
        return "stalled_peer" if rec.get("t_end", float("inf")) - rec["t_start"] <= 3.0 else None

    def final_outcome(self, rec: dict) -> str:
        outcome = rec.get("outcome", "pending")
        if outcome in ("cut", "stream_cut", "conn_error") and self.excused(rec):
            return "excused"
        return self.provider_fault_answer(rec) or self.stalled_peer_answer(rec) or outcome

    # --- faults -------------------------------------------------------------------------------
    def faults(self) -> list[dict]:
        names = SERVICE_FAULTS + DEPENDENCY_FAULTS + list(PROVIDER_FAULTS) + [SOAK]
        chosen = self.args.faults.split(",") if self.args.faults else [n for n in names if n != SOAK]
        unknown = set(chosen) - set(names)
        if unknown:
            raise SystemExit(f"unknown faults {sorted(unknown)}; known: {names}")
        return [{"name": n, "round": r + 1} for r in range(self.args.rounds) for n in chosen]

    async def mock_behavior(self, knobs: dict | None = None) -> dict:
        """The mock's fault knobs (GET), or replaced by `knobs` (PUT); raises unless it answers 200."""
        method = "GET" if knobs is None else "PUT"
        resp = await request(HOST, self.mesh.mock_port, method, "/_mock/behavior", body=knobs,
                             headers={"Content-Type": "application/json"} if knobs is not None else None, timeout=5)
        if resp.status != 200:
            raise RuntimeError(f"{method} /_mock/behavior: {resp.status} {resp.body[:300]!r}")
        return resp.json()

    def provider_knobs(self, name: str) -> dict:
        knobs = dict(PROVIDER_FAULTS[name])
        if name == "provider-cut":
            knobs["fail_after_chunks"] = self.args.cut_after
        return knobs

    async def inject(self, fault: dict) -> tuple[float, float]:
        name = fault["name"]
        hold = self.args.duration_per_fault
        if name in PROVIDER_FAULTS:
            knobs = self.provider_knobs(name)
            t_fault = time.time()
            await self.mock_behavior(knobs)
            fault["detail"] = f"mock PUT {json.dumps(knobs)}, held {hold:.0f} s, healthy knobs put back"
            log(f"fault {name}: injected")
            await asyncio.sleep(hold)
            await self.mock_behavior(self.healthy_knobs)
            t_heal = time.time()
            self.provider_windows.append({"fault": name, "t_fault": t_fault, "t_heal": t_heal})
            log(f"fault {name}: healed")
            return t_fault, t_heal
        if name == SOAK:
            t_start = time.time()
            samples = []
            while time.time() - t_start < self.args.soak_seconds:
                samples.append(await self.sample())
                await asyncio.sleep(max(0.0, self.args.sample_every - (time.time() - samples[-1]["t"])))
            samples.append(await self.sample())
            fault["samples"] = samples
            fault["leaks"] = leaks(samples)
            fault["detail"] = f"steady load for {self.args.soak_seconds:.0f} s, sampled every {self.args.sample_every:.0f} s"
            log(f"soak: {len(samples)} samples; leaks: {fault['leaks']['leaking'] or 'none'}")
            return t_start, time.time()
        if name in DEPENDENCY_FAULTS:
            t_fault, t_heal = await self.dependency_fault(name, hold)
            fault["detail"] = {
                "redis-stall": f"SIGSTOP redis-server for {hold:.0f} s (unreachable, data kept), SIGCONT",
                "postgres-stall": f"SIGSTOP every process of the Postgres cluster for {hold:.0f} s, SIGCONT",
                "postgres-restart": f"pg_ctl stop -m immediate, {hold:.0f} s down, started again",
            }[name]
            return t_fault, t_heal
        if name == "redis-flushall":
            proc = self.mesh.procs["redis"]
            reply = self.mesh.redis_command("FLUSHALL")
            t_fault = time.time()
            proc.kill(signal.SIGKILL)
            fault["detail"] = f"FLUSHALL ({reply.strip().decode(errors='replace')}), SIGKILL redis-server, " \
                              f"{hold:.0f} s down, restarted empty on the same port"
        else:
            proc = self.mesh.procs[name]
            t_fault = time.time()
            proc.kill(signal.SIGKILL)
            if name.startswith("gateway"):
                self.kill_windows.append({"replica": name, "t_kill": t_fault})
            fault["detail"] = f"SIGKILL {name}, {hold:.0f} s down, restarted"
        log(f"fault {name}: injected")
        await asyncio.sleep(hold)
        proc.start()
        t_heal = time.time()
        log(f"fault {name}: healed (restarted pid {proc.popen.pid})")
        return t_fault, t_heal

    async def sample(self) -> dict:
        """One reading of what a leak would grow: each process's resident memory and open file
        descriptors, each service's live Tokio tasks, Redis keys (all, and those without an
        expiry), Postgres connections to the run's database."""
        row: dict = {"t": time.time()}
        for name, proc in self.mesh.procs.items():
            if not proc.alive():
                continue
            pid = proc.popen.pid
            try:
                rss = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
                row[f"{name}.fds"] = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue
            if rss:
                row[f"{name}.rss_kb"] = int(rss.group(1))
            if name in self.mesh.admin:
                try:
                    resp = await request(HOST, self.mesh.admin[name], "GET", "/metrics", timeout=5)
                    tasks = re.search(rb"^meshgate_runtime_alive_tasks(?:\{[^}]*\})? (\d+)", resp.body, re.M)
                    if tasks:
                        row[f"{name}.alive_tasks"] = int(tasks.group(1))
                except (RuntimeError, OSError):
                    pass
        keyspace = re.search(rb"db0:keys=(\d+),expires=(\d+)", self.mesh.redis_command("INFO", "keyspace"))
        keys, expiring = (int(keyspace.group(1)), int(keyspace.group(2))) if keyspace else (0, 0)
        row["redis.keys"], row["redis.keys_without_ttl"] = keys, keys - expiring
        try:
            row["postgres.connections"] = int(self.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")[0][0])
        except RuntimeError:
            pass
        return row

    def postgres_pids(self) -> list[int]:
        """The postmaster of the run's cluster and every process it started."""
        postmaster = int((Path(self.args.pg_dir) / "data" / "postmaster.pid").read_text().split()[0])
        pids = [postmaster]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                pids.append(int(stat.parent.name))
        return pids

    def pg_ctl(self, *args: str) -> None:
        argv = [str(Path(self.args.pg_bindir) / "pg_ctl"), *args, "-D", str(Path(self.args.pg_dir) / "data"), "-w",
                "-t", "60"]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, cwd=self.args.pg_dir, check=True, capture_output=True, timeout=90)

    async def dependency_fault(self, name: str, hold: float) -> tuple[float, float]:
        """Makes Redis or Postgres unreachable for `hold` seconds; returns (fault, heal) times."""
        if name in ("redis-stall", "postgres-stall"):
            pids = [self.mesh.procs["redis"].popen.pid] if name == "redis-stall" else self.postgres_pids()
            t_fault = time.time()
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            log(f"fault {name}: injected ({len(pids)} processes stopped)")
            await asyncio.sleep(hold)
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        else:
            t_fault = time.time()
            await asyncio.to_thread(self.pg_ctl, "stop", "-m", "immediate")
            log(f"fault {name}: injected")
            await asyncio.sleep(hold)
            # restart starts a stopped server with the options it last ran with (postmaster.opts).
            log_file = str(Path(self.args.pg_dir) / "postgres.log")
            await asyncio.to_thread(self.pg_ctl, "restart", "-m", "fast", "-l", log_file)
        t_heal = time.time()
        self.stall_windows.append({"fault": name, "t_fault": t_fault, "t_heal": t_heal})
        log(f"fault {name}: healed")
        return t_fault, t_heal

    def path_requests(self, fault: str, since: float) -> list[dict]:
        recs = [r for r in self.records if r["t_start"] >= since and r["tenant"] == "tC"]
        if fault.startswith("gateway"):
            recs = [r for r in recs if r["replica"] == fault]
        return recs

    def success_on_path(self, fault: str, rec: dict) -> bool:
        if rec.get("outcome") != "ok":
            return False
        if fault.startswith("gateway") and rec.get("served_by") != fault:
            return False
        return True

    def recovery(self, fault: str, t_heal: float, need: int = 10) -> tuple[float | None, bool]:
        """(seconds from healing to the first of `need` consecutive successes, decided)."""
        run_start = None
        streak = 0
        for rec in sorted(self.path_requests(fault, t_heal), key=lambda r: r["n"]):
            if "t_end" not in rec:
                return None, False
            if self.success_on_path(fault, rec):
                if streak == 0:
                    run_start = rec["t_start"]
                streak += 1
                if streak >= need:
                    return round(run_start - t_heal, 2), True
            else:
                streak = 0
        return None, False

    async def wait_recovery(self, fault: str, t_heal: float, bound: float) -> float | None:
        deadline = t_heal + bound
        while time.time() < deadline + max(DEADLINES.values()):
            seconds, decided = self.recovery(fault, t_heal)
            if decided:
                return seconds
            if time.time() > deadline and not any("t_end" not in r for r in self.path_requests(fault, t_heal)
                                                  if r["t_start"] <= deadline):
                return None
            await asyncio.sleep(0.25)
        return None

    # --- checks -------------------------------------------------------------------------------
    def check_answers(self, recs: list[dict]) -> dict:
        outcomes = Counter(self.final_outcome(r) for r in recs)
        statuses = Counter(f"{r.get('status')} {r.get('code') or ''}".strip() for r in recs if r.get("status"))
        bad = [r for r in recs if self.final_outcome(r) not in ACCEPTABLE | {"not_sent", "pending"}]
        upstream = [r for r in recs if self.final_outcome(r) == "provider_fault"]
        rate_limited = [r for r in upstream if r.get("code") == "rate_limited" and not r.get("stream_error")]
        return {
            "ok": not bad,
            "requests": len(recs),
            "outcomes": dict(outcomes),
            "statuses": dict(statuses),
            "violations": [self.brief(r) for r in bad[:25]],
            "violation_count": len(bad),
            "provider_fault_answers": {
                "count": len(upstream),
                "by_kind_and_code": dict(Counter(f"{r['kind']} {'200+event ' if r.get('stream_error') else ''}"
                                                 f"{r.get('status')} {r.get('code')}" for r in upstream)),
                "max_latency_s": max((round(r["t_end"] - r["t_start"], 3) for r in upstream), default=None),
                "bound_s": self.provider_bound(),
                "rate_limited_with_retry_after": sum(1 for r in rate_limited if r.get("retry_after")),
                "rate_limited_without_retry_after": sum(1 for r in rate_limited if not r.get("retry_after")),
            },
        }

    @staticmethod
    def brief(r: dict) -> dict:
        keys = ("n", "t_start", "tenant", "kind", "replica", "served_by", "status", "code", "outcome", "detail",
                "request_id", "latency", "partial")
        out = {k: r.get(k) for k in keys if r.get(k) is not None}
        if "t_end" in r:
            out["took"] = round(r["t_end"] - r["t_start"], 3)
        return out

    async def check_traces(self, recs: list[dict], bound: float) -> dict:
        wanted = [r for r in recs if r.get("outcome") == "ok" and r["kind"] in ("chat", "stream", "embed")]
        missing_id = [r for r in wanted if not r.get("request_id")]
        pending = [r for r in wanted if r.get("request_id") and not self.trace_checked.get(r["request_id"])]
        deadline = time.monotonic() + bound
        sem = asyncio.Semaphore(6)
        statuses: dict[str, int] = {}

        async def probe(r):
            async with sem:
                try:
                    resp = await self.call("GET", f"/v1/traces/{r['request_id']}", self.tenants[r["tenant"]]["secret"],
                                           timeout=5)
                    statuses[r["request_id"]] = resp.status
                    if resp.status == 200:
                        self.trace_checked[r["request_id"]] = True
                except RuntimeError:
                    statuses[r["request_id"]] = -1

        while pending:
            await asyncio.gather(*(probe(r) for r in pending))
            pending = [r for r in pending if not self.trace_checked.get(r["request_id"])]
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        ids = [r["request_id"] for r in wanted if r.get("request_id")]
        rows = self.trace_rows(ids)
        duplicated = {rid: n for rid, n in rows.items() if n > 1}
        lost_in_window = [r for r in pending if self.answered_before_kill(r)]
        pending = [r for r in pending if not self.answered_before_kill(r)]
        excused_ids = {r["request_id"] for r in lost_in_window}
        absent_in_db = [rid for rid in ids if rows.get(rid, 0) == 0 and rid not in excused_ids]
        return {
            "ok": not pending and not missing_id and not duplicated and not absent_in_db,
            "checked": len(wanted),
            "lost_within_report_window": [self.brief(r) for r in lost_in_window[:25]],
            "missing_after_bound": [{**self.brief(r), "trace_status": statuses.get(r["request_id"])}
                                    for r in pending[:25]],
            "missing_count": len(pending),
            "without_request_id": len(missing_id),
            "duplicated_rows": dict(list(duplicated.items())[:25]),
            "absent_in_request_traces": absent_in_db[:25],
            "bound_s": bound,
        }

    def psql(self, sql: str) -> list[list[str]]:
        out = subprocess.run(["psql", "-X", "-q", "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                              self.args.database_url, "-c", sql], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"psql: {out.stderr.strip()}")
        return [line.split("\t") for line in out.stdout.splitlines() if line]

    def trace_rows(self, ids: list[str]) -> dict[str, int]:
        if not ids:
            return {}
        rows: dict[str, int] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            values = ",".join("'" + rid.replace("'", "''") + "'" for rid in chunk)
            for rid, n in self.psql(f"SELECT request_id, count(*) FROM request_traces WHERE request_id IN ({values}) "
                                    f"GROUP BY request_id"):
                rows[rid] = int(n)
        return rows

    async def quota_snapshot(self) -> dict:
        snap = {}
        for name, t in self.tenants.items():
            entry = {"budget": t["budget"]}
            try:
                resp = await self.call("GET", "/v1/quota/status", t["secret"], timeout=5)
                entry["http_status"] = resp.status
                payload = resp.json() or {}
                for scope in payload.get("scopes", payload.get("data", [])) or []:
                    if scope.get("scope", {}).get("kind", scope.get("kind")) == "project":
                        entry["used"] = scope.get("used", {}).get("tokens")
                        entry["reserved"] = scope.get("reserved", {}).get("tokens")
                        entry["limit"] = scope.get("limits", {}).get("tokens_per_day")
                if "used" not in entry:
                    entry["raw"] = payload
            except RuntimeError as err:
                entry["error"] = str(err)
            try:
                rows = self.psql(f"SELECT coalesce(sum(tokens), 0) FROM usage_ledger WHERE scope_kind = 'project' "
                                 f"AND scope_id = '{t['project']}'")
                entry["ledger"] = int(rows[0][0])
            except RuntimeError as err:
                entry["ledger_error"] = str(err)
            # What holds the reserved budget: leases (the counter's `lt`) and reservations (the
            # members of its zset, `<id>|<tokens>|<cost>`), read from Redis itself.
            try:
                counter = f"meshgate:quota:c:{time.strftime('%Y%m%d', time.gmtime())}:project:{t['project']}"
                leased = re.search(rb"^:?\$?\d+\r\n(\d+)", self.mesh.redis_command("HGET", counter, "lt"))
                entry["leased"] = int(leased.group(1)) if leased else 0
                members = self.mesh.redis_command("ZRANGE", counter.replace(":c:", ":z:", 1), "0", "-1")
                entry["holds"] = [m.decode(errors="replace") for m in re.findall(rb"\r\n([^\r\n$*]+\|\d+\|\d+)", members)]
            except OSError as err:
                entry["holds_error"] = str(err)
            entry.update(self.mock_accounting(name))
            snap[name] = entry
        return snap

    @staticmethod
    def priced_by_trace(entry: dict) -> bool:
        """A partial reply meshgate charges by its estimate: a request's (its trace records the
        charge). A job's attempt carries the job id as Idempotency-Key; sync charges its failed
        attempts by its own estimate, taken from its log (see `job_adjustment`)."""
        return not entry.get("idempotency_key") and bool(entry.get("request_id"))

    def failed_attempt_charges(self) -> dict[str, int]:
        """Tokens sync charged for failed job attempts (cut mid-stream, or interrupted by a stopped
        worker and charged at the job's estimate), per job id, from its log: those are charged by
        meshgate's estimate, as a cut chat reply is."""
        charges: dict[str, int] = defaultdict(int)
        for line in self.failed_attempt_lines():
            job, tokens = re.search(r'job"?[=:]\s*"?([0-9a-f-]{36})', line), re.search(r'tokens"?[=:]\s*(\d+)', line)
            if job and tokens:
                charges[job.group(1)] += int(tokens.group(1))
        return charges

    def interrupted_charged(self, job_id: str) -> bool:
        """Whether sync charged an interrupted attempt of the job (its log says so)."""
        return any(job_id in line and 'why="interrupted"' in line for line in self.failed_attempt_lines())

    def failed_attempt_lines(self) -> list[str]:
        """The lines of sync's log charging a failed job attempt, without the log's colours."""
        log = self.mesh.logs / "sync.log"
        if not log.exists():
            return []
        return [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in log.read_text(errors="replace").splitlines()
                if "a failed attempt may have been served; charged" in line]

    def job_adjustment(self, tenant: str) -> tuple[int, int, int]:
        """What quota should hold for the tenant's jobs with charged failed attempts or still open,
        minus what the mock served for all their attempts: a finished job's final delivery as the
        mock served it plus sync's charges for its failed attempts; an open job only those charges
        (its delivery is charged when it is recorded). Returns (adjustment, jobs, tokens charged)."""
        charges = self.failed_attempt_charges()
        open_jobs = {j for j, v in self.jobs.items()
                     if v.get("tenant") == tenant and v.get("status") not in ("succeeded", "dead")}
        by_key: dict[str, list[dict]] = defaultdict(list)
        for e in self.oracle.tagged():
            if e["tenant"] == tenant and (e["idempotency_key"] in charges or e["idempotency_key"] in open_jobs):
                by_key[e["idempotency_key"]].append(e)
        adjustment = charged = 0
        for key, entries in by_key.items():
            completed = [e for e in entries if e["outcome"] == "completed" and not e["replay"]]
            final = oracle_served(completed[-1]) if completed and key not in open_jobs else 0
            adjustment += final + charges.get(key, 0) - sum(oracle_served(e) for e in entries)
            charged += charges.get(key, 0)
        return adjustment, sum(1 for key in by_key if key in charges), charged

    def mock_accounting(self, tenant: str) -> dict:
        """What the mock served the tenant, and what C exact expects quota to have charged for it:
        the mock's count, with each partial reply of a request (cut, or abandoned mid-stream)
        taken at the charge its trace records instead of what the mock streamed (meshgate
        estimates those)."""
        served = self.oracle.tokens_by_tenant().get(tenant, 0)
        partials = [e for e in self.oracle.partial_entries() if e["tenant"] == tenant]
        priced = [e for e in partials if self.priced_by_trace(e)]
        partial_served = sum(oracle_served(e) for e in priced)
        charged = sum(self.partial_charges.get(e["seq"], 0) for e in priced)
        unpriced = [e["seq"] for e in priced if e["seq"] not in self.partial_charges]
        job_partials = [e for e in partials if not self.priced_by_trace(e)]
        adjustment, charged_jobs, attempt_charges = self.job_adjustment(tenant)
        return {"mock_served": served, "mock_partial": partial_served, "partial_charged": charged,
                "partial_replies": len(priced), "partial_unpriced": len(unpriced),
                "job_partial_replies": len(job_partials),
                "job_partial_served": sum(oracle_served(e) for e in job_partials),
                "failed_attempt_jobs": charged_jobs, "failed_attempt_charged": attempt_charges,
                "kill_window_tokens": self.kill_window_tokens(tenant),
                "expected_used": served - partial_served + charged + adjustment}

    async def price_partials(self, bound: float) -> None:
        """Reads what meshgate charged for each partial reply of a request the mock recorded: the
        usage of its trace (the charge a request settles with is the usage its trace records). A
        reply whose trace does not appear within `bound` (its gateway died before settling it) is
        taken as uncharged, and listed."""
        deadline = time.monotonic() + bound
        sem = asyncio.Semaphore(6)

        async def probe(e):
            async with sem:
                try:
                    resp = await self.call("GET", f"/v1/traces/{e['request_id']}",
                                           self.tenants[e["tenant"]]["secret"], timeout=5)
                except RuntimeError:
                    return
                payload = resp.json() if resp.status == 200 else None
                if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                    self.partial_charges[e["seq"]] = int(payload["usage"].get("total_tokens") or 0)
                    self.partial_trace_missing.pop(e["seq"], None)

        while True:
            todo = [e for e in self.oracle.partial_entries() if e["seq"] not in self.partial_charges
                    and self.priced_by_trace(e) and e["tenant"] in self.tenants]
            if not todo:
                return
            await asyncio.gather(*(probe(e) for e in todo))
            left = [e for e in todo if e["seq"] not in self.partial_charges]
            if not left or time.monotonic() > deadline:
                for e in left:
                    self.partial_trace_missing[e["seq"]] = e
                    self.partial_charges[e["seq"]] = 0
                return
            await asyncio.sleep(1.0)

    async def quiet_snapshot(self) -> dict:
        """Pauses the load, lets everything in flight finish, leases return (idle_return_ms, 1 s) and
        the ledger flush (1 s), then snapshots: a point where quota, ledger and mock must agree."""
        self.paused = True
        try:
            while self.load_tasks:
                await asyncio.sleep(0.1)
            await asyncio.sleep(self.args.quiet)
            await self.poll_jobs(list(self.jobs), 0)
            await self.oracle.poll_once()
            await self.price_partials(self.args.trace_bound)
            snap = await self.quota_snapshot()
            snap["_open_jobs"] = sum(1 for j in self.jobs.values() if j.get("status") not in ("succeeded", "dead"))
            return snap
        finally:
            self.paused = False

    def check_deltas(self, prev: dict | None, snap: dict) -> dict:
        """Between two quiet points: the tokens quota charged == the tokens the mock served."""
        problems = []
        deltas = {}
        for name in self.tenants:
            now, before = snap[name], (prev or {}).get(name, {})
            d = {k: (now.get(k) or 0) - (before.get(k) or 0)
                 for k in ("used", "ledger", "mock_served", "mock_partial", "partial_charged", "partial_replies",
                           "job_partial_replies", "job_partial_served", "failed_attempt_charged",
                           "kill_window_tokens", "expected_used")}
            deltas[name] = d
            # Requests answered just before their replica's SIGKILL may go uncharged (the bound).
            within_bound = 0 <= d["expected_used"] - d["used"] <= d["kill_window_tokens"]
            if d["used"] != d["expected_used"] and within_bound:
                d["uncharged_within_report_window"] = d["expected_used"] - d["used"]
            elif d["used"] != d["expected_used"]:
                cut = (f"; {d['partial_replies']} partial replies served {d['mock_partial']}, charged "
                       f"{d['partial_charged']} by their traces" if d["partial_replies"] else "")
                if d["job_partial_replies"]:
                    cut += (f"; {d['job_partial_replies']} job attempts cut after serving {d['job_partial_served']} "
                            f"({d['failed_attempt_charged']} charged by sync for failed attempts)")
                problems.append(f"{name}: since the last quiet point quota charged {d['used']} but the mock served "
                                f"{d['mock_served']}{cut} ({d['expected_used'] - d['used']:+d} uncharged)")
            if d["ledger"] != d["used"]:
                problems.append(f"{name}: since the last quiet point ledger {d['ledger']} != quota {d['used']}")
            if now.get("reserved") and not snap.get("_open_jobs"):
                problems.append(f"{name}: {now['reserved']} tokens reserved at a quiet point with no job open "
                                f"(leases {now.get('leased')}, holds {now.get('holds')})")
        if self.oracle.incomplete:
            problems.append(f"the mock's ring lost {self.oracle.gaps} requests unread and {len(self.oracle.unsettled)} "
                            f"before they ended: counts incomplete")
        return {"ok": not problems, "problems": problems, "deltas": deltas, "open_jobs": snap.get("_open_jobs")}

    def check_budgets(self, snap: dict, exact: bool) -> dict:
        problems = []
        for name, e in snap.items():
            if name.startswith("_"):
                continue
            budget = e["budget"]
            for what in ("used", "ledger", "mock_served"):
                value = e.get(what)
                if value is None:
                    if what == "used":
                        problems.append(f"{name}: no quota status ({e.get('http_status')}, {e.get('error')})")
                    continue
                if value > budget:
                    problems.append(f"{name}: {what} {value} > budget {budget}")
            if exact and e.get("used") is not None:
                if self.oracle.incomplete:
                    problems.append(f"{name}: the mock's ring lost {self.oracle.incomplete} requests; exactness unknown")
                elif not 0 <= e["expected_used"] - e["used"] <= e.get("kill_window_tokens", 0):
                    cut = (f", of which {e['partial_replies']} partial replies served {e['mock_partial']} and were "
                           f"charged {e['partial_charged']}" if e.get("partial_replies") else "")
                    if e.get("job_partial_replies"):
                        cut += (f", and {e['job_partial_replies']} cut job attempts served {e['job_partial_served']} "
                                f"({e.get('failed_attempt_charged', 0)} charged by sync for failed attempts)")
                    problems.append(f"{name}: quota used {e['used']} != tokens the mock served {e['mock_served']}{cut} "
                                    f"(difference {e['expected_used'] - e['used']:+d})")
                if e.get("ledger") is not None and e["ledger"] != e["used"]:
                    problems.append(f"{name}: ledger {e['ledger']} != quota used {e['used']}")
                if e.get("reserved"):
                    problems.append(f"{name}: {e['reserved']} tokens still reserved after settling")
        return {"ok": not problems, "problems": problems, "tenants": snap}

    async def poll_jobs(self, ids: list[str], bound: float) -> dict[str, dict]:
        deadline = time.monotonic() + bound
        pending = [j for j in ids if self.jobs[j].get("status") not in ("succeeded", "dead")]
        sem = asyncio.Semaphore(6)

        async def probe(job_id):
            async with sem:
                try:
                    resp = await self.call("GET", f"/v1/jobs/{job_id}", self.tenants[self.jobs[job_id]["tenant"]]["secret"],
                                           timeout=5)
                    if resp.status == 200:
                        payload = resp.json() or {}
                        self.jobs[job_id].update({"status": payload.get("status"), "attempts": payload.get("attempts"),
                                                  "last_error": payload.get("last_error")})
                except RuntimeError:
                    pass

        while pending:
            await asyncio.gather(*(probe(j) for j in pending))
            pending = [j for j in pending if self.jobs[j].get("status") not in ("succeeded", "dead")]
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        return {j: self.jobs[j] for j in ids}

    def check_jobs(self, ids: list[str], final: bool) -> dict:
        states = Counter(self.jobs[j].get("status") for j in ids)
        delivered = self.oracle.deliveries_by_key()
        arrivals = self.oracle.arrivals_by_key()
        twice = {j: delivered[j] for j in ids if delivered[j] > 1}
        # At-least-once: a job whose worker died mid-delivery is delivered again. A provider that
        # ignores the job id as Idempotency-Key serves it again, and sync charges the interrupted
        # attempt (C exact holds it to that); one honouring keys (--idempotent-provider) must not.
        interrupted = {j for j, n in twice.items() if n == 2 and self.interrupted_charged(j)}
        redelivered = {j: n for j, n in twice.items() if j in interrupted and not self.args.idempotent_provider}
        twice = {j: n for j, n in twice.items() if j not in redelivered}
        never = [j for j in ids if self.jobs[j].get("status") == "succeeded" and delivered[j] == 0]
        open_jobs = [j for j in ids if self.jobs[j].get("status") not in ("succeeded", "dead")]
        problems = []
        if twice:
            problems.append(f"{len(twice)} job(s) delivered to the provider more than once")
        if never and not self.oracle.incomplete:
            problems.append(f"{len(never)} succeeded job(s) the provider never completed")
        if final and open_jobs:
            problems.append(f"{len(open_jobs)} job(s) neither succeeded nor dead within the bound")
        return {
            "ok": not problems,
            "problems": problems,
            "jobs": len(ids),
            "states": dict(states),
            "provider_attempts": dict(Counter(arrivals[j] for j in ids)),
            "delivered_more_than_once": {j: {"deliveries": n, "provider_attempts": arrivals[j], **self.jobs[j]}
                                         for j, n in list(twice.items())[:25]},
            "redelivered_after_an_interrupted_attempt": {j: {"deliveries": n, **self.jobs[j]}
                                                         for j, n in list(redelivered.items())[:25]},
            "succeeded_never_seen": never[:25],
            "not_terminal": [{"id": j, **self.jobs[j]} for j in open_jobs[:25]],
        }

    # --- the run ------------------------------------------------------------------------------
    async def run(self) -> dict:
        report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": vars(self.args),
                        "ports": {"edge": self.mesh.edge, "grpc": self.mesh.grpc, "mock": self.mesh.mock_port,
                                  "redis": self.mesh.redis_port}}
        await self.wait_ready()
        self.healthy_knobs = await self.mock_behavior()
        report["mock_knobs"] = {"healthy": self.healthy_knobs,
                                "faults": {n: self.provider_knobs(n) for n in PROVIDER_FAULTS}}
        await self.setup_tenants()
        oracle_task = asyncio.create_task(self.oracle.run())
        load_task = asyncio.create_task(self.load())
        log(f"load: {self.args.rate}/s open loop, mix {MIX}, two replicas round-robin")
        t_base = time.time()
        await asyncio.sleep(self.args.baseline)
        window_start = t_base
        baseline_recs = [r for r in self.records if t_base <= r["t_start"] < time.time()]
        self.last_quiet = await self.quiet_snapshot()
        baseline_exact = self.check_deltas(None, self.last_quiet)
        report["baseline"] = {"requests": len(baseline_recs), "C_exact": baseline_exact,
                              "service": service_level(baseline_recs, t_base, t_base + self.args.baseline)}
        log(f"baseline: {len(baseline_recs)} requests in {self.args.baseline:.0f} s; quiet point: exact "
            f"{'ok' if baseline_exact['ok'] else 'FAIL ' + '; '.join(baseline_exact['problems'])}")

        for fault in self.faults():
            if time.time() - T0 > self.args.total_timeout - 60:
                log("total time cap near: skipping the remaining faults")
                report.setdefault("skipped", []).append(fault["name"])
                continue
            # Steady load again after the last quiet point, so the fault meets leases, batches and
            # queues in their working state.
            await asyncio.sleep(self.args.lead)
            t_fault, t_heal = await self.inject(fault)
            rec_s = await self.wait_recovery(fault["name"], t_heal, self.args.recovery_bound)
            log(f"fault {fault['name']}: recovery {rec_s if rec_s is not None else 'NOT within bound'}"
                f"{'' if rec_s is None else ' s'}")
            await asyncio.sleep(self.args.steady)
            window_end = time.time()
            # Let every request of the window finish (each has a deadline).
            while any("t_end" not in r for r in self.records if r["t_start"] < window_end):
                await asyncio.sleep(0.2)
            recs = [r for r in self.records if window_start <= r["t_start"] < window_end]
            answers = self.check_answers(recs)
            traces = await self.check_traces(recs, self.args.trace_bound)
            snap = await self.quota_snapshot()
            budgets = self.check_budgets(snap, exact=False)
            quiet = await self.quiet_snapshot()
            exact = self.check_deltas(self.last_quiet, quiet)
            budgets_quiet = self.check_budgets(quiet, exact=False)
            self.last_quiet = quiet
            # A tenant over its budget stays over it: a window fails C for what is new in it; what an
            # earlier window already reported is listed as carried (the final check fails for it too).
            problems = list(dict.fromkeys(budgets["problems"] + budgets_quiet["problems"]))
            budgets["carried"] = [q for q in problems if q.split(" ", 2)[:2] in self.over_budget_seen]
            budgets["problems"] = [q for q in problems if q not in budgets["carried"]]
            budgets["ok"] = not budgets["problems"]
            for q in budgets["problems"]:
                self.over_budget_seen.append(q.split(" ", 2)[:2])
            window_jobs = [r["job_id"] for r in recs if r.get("job_id")]
            await self.poll_jobs(window_jobs, 0)
            jobs = self.check_jobs(window_jobs, final=False)
            impact = Counter(self.final_outcome(r) for r in self.path_requests(fault["name"], t_fault)
                             if r["t_start"] < t_heal + (self.args.recovery_bound if rec_s is None else rec_s))
            window = {
                "fault": fault["name"], "round": fault["round"], "detail": fault["detail"], "t_fault": t_fault, "t_heal": t_heal,
                "window": [window_start, window_end],
                "recovery_s": rec_s, "recovery_bound_s": self.args.recovery_bound,
                "recovery_ok": rec_s is not None and rec_s <= self.args.recovery_bound,
                "path_outcomes_until_recovered": dict(impact),
                # From the fault until full service again (or the recovery bound): what users met.
                "service_during": service_level(
                    self.records, t_fault, t_heal + (self.args.recovery_bound if rec_s is None else rec_s)),
                "A_answers": answers, "B_traces": traces, "C_budgets": budgets, "C_exact": exact, "D_jobs": jobs,
            }
            if "leaks" in fault:
                window["leaks"], window["samples"] = fault["leaks"], fault["samples"]
            self.windows.append(window)
            log(f"fault {fault['name']}: A {'ok' if answers['ok'] else 'FAIL'} {answers['outcomes']}; "
                f"B {'ok' if traces['ok'] else 'FAIL'} ({traces['checked']} traces); "
                f"C {'ok' if budgets['ok'] else 'FAIL'}, exact {'ok' if exact['ok'] else 'FAIL'}; D {'ok' if jobs['ok'] else 'FAIL'} {jobs['states']}; "
                f"E {'ok' if window['recovery_ok'] else 'FAIL'}")
            for p in budgets["problems"] + exact["problems"] + jobs["problems"]:
                log(f"  {p}")
            window_start = window_end

        log("stopping the load; settling")
        self.stop_load.set()
        await load_task
        if self.load_tasks:
            await asyncio.gather(*list(self.load_tasks), return_exceptions=True)
        final_recs = [r for r in self.records if r["t_start"] >= window_start]
        all_jobs = list(self.jobs)
        await self.poll_jobs(all_jobs, self.args.job_bound)
        # Leases come back after idle_return_ms (1 s) and the ledger is written every second.
        await asyncio.sleep(self.args.settle)
        await self.oracle.stop()
        oracle_task.cancel()
        await self.price_partials(self.args.trace_bound)
        snap = await self.quota_snapshot()
        final = {
            "A_answers_tail": self.check_answers(final_recs),
            "A_answers_all": self.check_answers(self.records),
            "B_traces_all": await self.check_traces(self.records, self.args.trace_bound),
            "C_budgets_exact": self.check_budgets(snap, exact=True),
            "D_jobs_all": self.check_jobs(all_jobs, final=True),
        }
        oracle_check = self.oracle_self_check()
        final["C_attribution"] = self.attribution()
        report.update({
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "requests": len(self.records), "not_sent": self.dropped,
            "baseline_requests": len(baseline_recs),
            "faults": self.windows, "final": final, "mock": self.oracle.summary(), "oracle_self_check": oracle_check,
            # Partial replies taken as uncharged because no trace recorded their charge.
            "partial_replies_without_trace": [{k: e.get(k) for k in ("seq", "tenant", "request_id", "nonce")}
                                              for e in list(self.partial_trace_missing.values())[:25]],
            "partial_replies": [{**{k: e.get(k) for k in ("seq", "tenant", "nonce", "request_id", "idempotency_key",
                                                            "outcome", "pieces", "prompt")},
                                 "mock_served": oracle_served(e), "charged": self.partial_charges.get(e["seq"])}
                                for e in self.oracle.partial_entries()],
            "process_history": {n: p.history for n, p in self.mesh.procs.items()},
        })
        return report

    def attribution(self) -> dict:
        """Where the mock's count and the client's view part: requests the mock served whose client
        did not get a success, successes the mock never saw, and requests the mock served twice.
        Evidence for C and D, not a check of its own (it never fails the run)."""
        by_nonce = {r["nonce"]: r for r in self.records}
        served_tokens = self.oracle.tokens_by_nonce()
        deliveries = self.oracle.deliveries_by_nonce()
        served_not_ok = []
        tokens = Counter()
        for nonce, n in served_tokens.items():
            rec = by_nonce.get(nonce)
            if rec is None or rec.get("outcome") == "ok" or n == 0:
                continue
            tokens[rec["tenant"]] += n
            served_not_ok.append({**self.brief(rec), "mock_completed": deliveries[nonce], "tokens": n})
        twice = [{**self.brief(by_nonce[n]), "mock_completed": c} for n, c in deliveries.items()
                 if c > 1 and n in by_nonce]
        ok_not_seen = [self.brief(r) for r in self.records
                       if r.get("outcome") == "ok" and r["kind"] != "job" and deliveries[r["nonce"]] == 0]
        return {
            "ok": True,
            "served_but_client_failed": served_not_ok[:50],
            "served_but_client_failed_count": len(served_not_ok),
            "served_but_client_failed_tokens": dict(tokens),
            "served_more_than_once": twice[:50],
            "client_ok_never_served": ok_not_seen[:50],
        }

    def oracle_self_check(self) -> dict:
        compared = mismatched = 0
        examples = []
        full = self.oracle.full_tokens_by_nonce()
        for r in self.records:
            if r.get("outcome") == "ok" and isinstance(r.get("usage"), int) and r["nonce"] in full:
                compared += 1
                if full[r["nonce"]] != r["usage"]:
                    mismatched += 1
                    if len(examples) < 5:
                        examples.append({"nonce": r["nonce"], "kind": r["kind"], "relayed": r["usage"],
                                         "oracle": full[r["nonce"]]})
        return {"compared": compared, "mismatched": mismatched, "examples": examples}


def cut_estimate(deltas: dict) -> str:
    """The charge of the window's partial replies against what the mock streamed, if any."""
    replies = sum(d.get("partial_replies", 0) for d in deltas.values())
    if not replies:
        return ""
    served = sum(d["mock_partial"] for d in deltas.values())
    charged = sum(d["partial_charged"] for d in deltas.values())
    return f" ({replies} cut: charged {charged} for {served} served)"


def table(report: dict) -> str:
    base = report["baseline"]["service"]
    rows = [("fault", "A answers", "B traces", "C budget", "C exact", "D jobs", "E recovery (s)", "path while down",
             f"tC during: ok/s of sent, chat p50/p99 ms (healthy {service_cell(base)})")]
    for w in report["faults"]:
        rows.append((
            w["fault"] + (f" #{w['round']}" if report["config"]["rounds"] > 1 else ""),
            ("ok" if w["A_answers"]["ok"] else f"FAIL {w['A_answers']['violation_count']}") +
            (f" ({w['A_answers']['provider_fault_answers']['count']} upstream errors)"
             if w["A_answers"]["provider_fault_answers"]["count"] else ""),
            "ok" if w["B_traces"]["ok"] else f"FAIL {w['B_traces']['missing_count']} missing",
            ("ok" if w["C_budgets"]["ok"] else "FAIL") + (" (carried)" if w["C_budgets"].get("carried") else ""),
            ("ok" if w["C_exact"]["ok"] else "FAIL " + ", ".join(
                f"{t} {d['expected_used'] - d['used']:+d}" for t, d in w["C_exact"]["deltas"].items()
                if d["expected_used"] != d["used"])) + cut_estimate(w["C_exact"]["deltas"]),
            "ok" if w["D_jobs"]["ok"] else "FAIL",
            (f"{w['recovery_s']}" if w["recovery_s"] is not None else "none") +
            f" (≤{w['recovery_bound_s']:.0f}) {'ok' if w['recovery_ok'] else 'FAIL'}",
            ", ".join(f"{k} {v}" for k, v in sorted(w["path_outcomes_until_recovered"].items())),
            service_cell(w["service_during"]),
        ))
    f = report["final"]
    rows.append(("final", "ok" if f["A_answers_all"]["ok"] else f"FAIL {f['A_answers_all']['violation_count']}",
                 "ok" if f["B_traces_all"]["ok"] else f"FAIL {f['B_traces_all']['missing_count']} missing",
                 "ok" if f["C_budgets_exact"]["ok"] else "FAIL", "", "ok" if f["D_jobs_all"]["ok"] else "FAIL", "", "", ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    text = "\n".join(" | ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)) for r in rows)
    for w in report["faults"]:
        if "leaks" in w:
            text += f"\n\nsoak #{w['round']}: {w['leaks']['samples']} samples; " + (
                "no leak" if w["leaks"]["ok"] else "LEAKING " + ", ".join(w["leaks"]["leaking"]))
            for key, v in w["leaks"]["series"].items():
                text += (f"\n  {key:32} level {v['level']:>10} grew {v['grew_first_half']:>8} then "
                         f"{v['grew_second_half']:>8} (allowed {v['allowed']}){'  LEAK' if v['leak'] else ''}")
    return text


def service_cell(level: dict) -> str:
    return (f"{level['ok_per_s']}/{level['sent_per_s']} over {level['seconds']} s, "
            f"{level['chat_p50_ms']}/{level['chat_p99_ms']}")


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares growth per second of (t, value) points."""
    n = len(points)
    mt, mv = sum(t for t, _ in points) / n, sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 0.0 if var == 0 else sum((t - mt) * (v - mv) for t, v in points) / var


def leaks(samples: list[dict], warmup: float = 0.2) -> dict:
    """A leak is a slope that does not flatten: after a warm-up (the first fifth), a series whose
    fitted growth over the second half exceeds its allowance (LEAK_ALLOWANCE) and is not smaller
    than half its growth over the first half. Every judged series is reported with both."""
    kept = samples[int(len(samples) * warmup):]
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in kept:
        for key, value in row.items():
            if key != "t":
                series[key].append((row["t"], float(value)))
    judged, leaking = {}, []
    for key, points in sorted(series.items()):
        kind = next((k for k in LEAK_ALLOWANCE if key == k or key.endswith("." + k)), None)
        # The mock provider is the run's instrument (it remembers every idempotency key it saw).
        if kind is None or len(points) < 6 or key.startswith("mock."):
            continue
        half = len(points) // 2
        first, second = points[: half + 1], points[half:]
        grew_first = slope(first) * (first[-1][0] - first[0][0])
        grew_second = slope(second) * (second[-1][0] - second[0][0])
        level = sum(v for _, v in second) / len(second)
        absolute, fraction = LEAK_ALLOWANCE[kind]
        allowed = max(absolute, fraction * level)
        leak = grew_second > allowed and grew_second >= 0.5 * grew_first
        judged[key] = {"level": round(level, 1), "grew_first_half": round(grew_first, 1),
                       "grew_second_half": round(grew_second, 1), "allowed": round(allowed, 1), "leak": leak}
        if leak:
            leaking.append(key)
    return {"ok": not leaking, "leaking": leaking, "series": judged, "samples": len(samples)}


def failed(report: dict) -> list[str]:
    out = []
    for w in report["faults"]:
        if "leaks" in w and not w["leaks"]["ok"]:
            out.append(f"{w['fault']} #{w['round']}: leaks {', '.join(w['leaks']['leaking'])}")
        for key in ("A_answers", "B_traces", "C_budgets", "C_exact", "D_jobs"):
            if not w[key]["ok"]:
                out.append(f"{w['fault']} #{w['round']}: {key}")
        if not w["recovery_ok"]:
            out.append(f"{w['fault']} #{w['round']}: E_recovery")
    for key, value in report["final"].items():
        if not value["ok"]:
            out.append(f"final: {key}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, type=Path, help="directory of the meshgate-* binaries")
    p.add_argument("--database-url", required=True)
    p.add_argument("--out", required=True, type=Path, help="run directory (logs, report.json)")
    p.add_argument("--shape", default="", help="free text recorded in the report (binaries, transport)")
    p.add_argument("--rate", type=float, default=30.0, help="requests per second, open loop (default 30)")
    p.add_argument("--duration-per-fault", type=float, default=5.0, help="how long each fault is held (s)")
    p.add_argument("--recovery-bound", type=float, default=20.0, help="N: recovery must come within N s of healing")
    p.add_argument("--steady", type=float, default=8.0, help="steady load after recovery before the checks (s)")
    p.add_argument("--baseline", type=float, default=10.0, help="steady load before the first fault (s)")
    p.add_argument("--trace-bound", type=float, default=30.0, help="how long a trace may take to appear (s)")
    p.add_argument("--job-bound", type=float, default=150.0, help="how long jobs may take to end at the end (s)")
    p.add_argument("--lead", type=float, default=5.0, help="steady load before each fault (s)")
    p.add_argument("--rounds", type=int, default=1, help="run the fault schedule this many times")
    p.add_argument("--quiet", type=float, default=3.0,
                   help="load paused this long after each fault's checks for an exact accounting point (s)")
    p.add_argument("--settle", type=float, default=5.0, help="quiet time before the exact accounting check (s)")
    p.add_argument("--total-timeout", type=float, default=900.0, help="cap on the whole run (s)")
    p.add_argument("--max-inflight", type=int, default=400)
    p.add_argument("--faults", default="", help="comma-separated subset, in order (default: all): "
                   + ", ".join(SERVICE_FAULTS + list(PROVIDER_FAULTS)))
    p.add_argument("--budget-a", type=int, default=6000, help="tenant tA tokens_per_day (spent early)")
    p.add_argument("--budget-b", type=int, default=40000, help="tenant tB tokens_per_day (spent late)")
    p.add_argument("--budget-c", type=int, default=100_000_000, help="tenant tC tokens_per_day (never spent)")
    p.add_argument("--target-timeout-ms", type=int, default=4000,
                   help="the gateways' target timeout ([gateway] target_timeout_ms): a hanging provider is "
                        "answered 504 after it, within the clients' deadlines (default 4000)")
    p.add_argument("--provider-first-byte-timeout-ms", type=int, default=5000,
                   help="the mock provider's first-byte timeout in sync (MESHGATE_PROVIDER_MOCK_FIRST_BYTE_TIMEOUT_MS): "
                        "bounds a job attempt against a hanging provider (default 5000)")
    p.add_argument("--cut-after", type=int, default=2,
                   help="provider-cut: completion pieces a stream sends before the mock aborts it (default 2)")
    p.add_argument("--soak-seconds", type=float, default=300.0,
                   help="how long the soak (--faults soak) runs its steady load (default 300)")
    p.add_argument("--sample-every", type=float, default=10.0, help="the soak's sampling period (s)")
    p.add_argument("--pg-dir", help="the run's own Postgres cluster (data/ and its socket), for its faults")
    p.add_argument("--pg-bindir", help="the bin directory holding that cluster's pg_ctl")
    p.add_argument("--report-window", type=float, default=0.05,
                   help="a request answered this long before its gateway replica's SIGKILL may lose its charge "
                        "and trace (report_delay_ms and trace_flush_ms, 20 ms, plus scheduling; default 0.05 s)")
    p.add_argument("--idempotent-provider", action="store_true",
                   help="start the mock with --honour-idempotency-keys: a job delivered again is answered as a "
                        "replay, not served twice")
    p.add_argument("--seed", type=int, default=19)
    p.add_argument("--rust-log", default="info")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    admin_key = f"mg-chaos-{uuid.uuid4().hex}"
    mesh = Mesh(args.bin, args.out, args.database_url, admin_key, args.rust_log,
                target_timeout_ms=args.target_timeout_ms,
                provider_first_byte_timeout_ms=args.provider_first_byte_timeout_ms,
                idempotent_provider=args.idempotent_provider)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(SystemExit("total time cap reached")))
    signal.alarm(int(args.total_timeout))
    report = None
    runner = None
    try:
        mesh.start_all()
        runner = Runner(args, mesh)
        report = asyncio.run(runner.run())
    except BaseException as err:  # noqa: BLE001 - the partial report is still written below
        print(f"[chaos] run aborted: {err!r}", file=sys.stderr)
    finally:
        signal.alarm(0)
        mesh.stop_all()
    if report is None:
        partial = {"aborted": True, "faults": runner.windows if runner else [],
                   "requests": len(runner.records) if runner else 0}
        (args.out / "report.partial.json").write_text(json.dumps(partial, indent=2, default=str))
        print(f"[chaos] aborted; partial report in {args.out / 'report.partial.json'}; logs in {mesh.logs}",
              file=sys.stderr)
        return 2
    report["shape"] = args.shape
    failures = failed(report)
    report["failed_invariants"] = failures
    report_path = args.out / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str))
    # The raw per-request records, for digging into a violation.
    with open(args.out / "requests.jsonl", "w") as fh:
        for rec in runner.records:
            fh.write(json.dumps(rec, default=str) + "\n")
    with open(args.out / "mock_requests.jsonl", "w") as fh:
        for entry in runner.oracle.entries.values():
            fh.write(json.dumps(entry) + "\n")
    (args.out / "table.txt").write_text(table(report) + "\n")
    print()
    print(table(report))
    print()
    print(f"requests {report['requests']} (not sent {report['not_sent']}); mock saw {report['mock']['requests_seen']} "
          f"(ring gaps {report['mock']['ring_gaps']}, unsettled {report['mock']['unsettled']}); oracle self-check {report['oracle_self_check']['mismatched']} "
          f"mismatches of {report['oracle_self_check']['compared']}")
    for name, e in report["final"]["C_budgets_exact"]["tenants"].items():
        print(f"tenant {name}: budget {e['budget']} used {e.get('used')} reserved {e.get('reserved')} "
              f"ledger {e.get('ledger')} mock served {e.get('mock_served')} (partial replies {e.get('partial_replies')}: "
              f"served {e.get('mock_partial')}, charged {e.get('partial_charged')})")
    print(f"report: {report_path}")
    if failures:
        print("FAILED invariants: " + "; ".join(failures))
        return 1
    print("all invariants held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
