"""The mesh under test as OS processes: the mock provider, a Redis of the run's own, the six
services (two gateway replicas) over plaintext loopback gRPC, each with its own log.

Every child gets PR_SET_PDEATHSIG(SIGKILL), so nothing outlives the runner even when the runner
itself is killed; `Mesh.stop_all` ends them (by pid) on a normal exit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_ports(n: int) -> list[int]:
    held = [socket.socket() for _ in range(n)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def tcp_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen | None = None
    starts: int = 0
    history: list[dict] = field(default_factory=list)

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as log:
            log.write(f"\n=== chaos: start #{self.starts} at {time.time():.3f} ===\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        self.history.append({"event": "start", "t": time.time(), "pid": self.popen.pid})

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        os.kill(self.popen.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self.history.append({"event": f"signal {signal.Signals(sig).name}", "t": time.time(), "pid": self.popen.pid})
        with open(self.log, "ab") as log:
            log.write(f"\n=== chaos: {signal.Signals(sig).name} pid {self.popen.pid} at {time.time():.3f} ===\n".encode())


SERVICES = ["inference", "router", "quota", "analytics", "sync"]


class Mesh:
    def __init__(self, bin_dir: Path, run_dir: Path, database_url: str, admin_key: str, rust_log: str, *,
                 target_timeout_ms: int, provider_first_byte_timeout_ms: int, idempotent_provider: bool = False):
        self.bin = bin_dir
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url
        self.admin_key = admin_key
        ports = free_ports(2 + 2 * len(SERVICES) + 3 * 2)
        self.mock_port, self.redis_port = ports[0], ports[1]
        rest = ports[2:]
        self.grpc = {}
        self.admin = {}
        for svc in SERVICES:
            self.grpc[svc], self.admin[svc] = rest.pop(0), rest.pop(0)
        self.edge = {}
        for gw in ("gateway-1", "gateway-2"):
            self.grpc[gw], self.admin[gw], self.edge[gw] = rest.pop(0), rest.pop(0), rest.pop(0)
        self.procs: dict[str, Proc] = {}
        redis_dir = run_dir / "redis"
        redis_dir.mkdir(exist_ok=True)
        models_dir = run_dir / "no-models"
        models_dir.mkdir(exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_")}
        self.procs["redis"] = Proc(
            "redis",
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
             "--appendonly", "no", "--dir", str(redis_dir)],
            base, self.logs / "redis.log")
        # --control: the runner sets the provider faults through PUT /_mock/behavior.
        mock_argv = [str(bin_dir / "meshgate-mock-provider"), "--port", str(self.mock_port),
                     "--models", "mock-gpt,mock-embed", "--track-requests", "--control"]
        if idempotent_provider:
            mock_argv.append("--honour-idempotency-keys")
        self.procs["mock"] = Proc("mock", mock_argv, base, self.logs / "mock.log")
        common = dict(base)
        common.update({
            "DATABASE_URL": database_url,
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "MESHGATE_ADMIN_KEY": admin_key,
            "MESHGATE_MESH__TRANSPORT": "plaintext",
            "MESHGATE_PROVIDER_MOCK_BASE_URL": f"http://127.0.0.1:{self.mock_port}/v1",
            "MESHGATE_PROVIDER_MOCK_MODELS": "mock-gpt",
            "MESHGATE_PROVIDER_MOCK_EMBEDDING_MODELS": "mock-embed",
            "MESHGATE_PROVIDER_MOCK_FIRST_BYTE_TIMEOUT_MS": str(provider_first_byte_timeout_ms),
            "MESHGATE_GATEWAY__TARGET_TIMEOUT_MS": str(target_timeout_ms),
            "MESHGATE_INFERENCE__MODELS_DIR": str(models_dir),
            "MESHGATE_ROUTER__INFERENCE_ENDPOINT": f"http://127.0.0.1:{self.grpc['inference']}",
            "MESHGATE_GATEWAY__QUOTA_ENDPOINT": f"http://127.0.0.1:{self.grpc['quota']}",
            "MESHGATE_GATEWAY__ROUTER_ENDPOINT": f"http://127.0.0.1:{self.grpc['router']}",
            "MESHGATE_GATEWAY__SYNC_ENDPOINT": f"http://127.0.0.1:{self.grpc['sync']}",
            "MESHGATE_GATEWAY__INFERENCE_ENDPOINT": f"http://127.0.0.1:{self.grpc['inference']}",
            "MESHGATE_GATEWAY__ANALYTICS_ENDPOINT": f"http://127.0.0.1:{self.grpc['analytics']}",
            "MESHGATE_SYNC__QUOTA_ENDPOINT": f"http://127.0.0.1:{self.grpc['quota']}",
            "RUST_LOG": rust_log,
            # Told to sync, which then does not charge an interrupted job attempt's estimate.
            "MESHGATE_PROVIDER_MOCK_HONOURS_IDEMPOTENCY_KEYS": "true" if idempotent_provider else "false",
        })
        for name in SERVICES + ["gateway-1", "gateway-2"]:
            env = dict(common)
            env["MESHGATE_LISTEN__GRPC"] = f"127.0.0.1:{self.grpc[name]}"
            env["MESHGATE_LISTEN__ADMIN"] = f"127.0.0.1:{self.admin[name]}"
            binary = name
            if name.startswith("gateway"):
                env["MESHGATE_LISTEN__HTTP"] = f"127.0.0.1:{self.edge[name]}"
                binary = "gateway"
            self.procs[name] = Proc(name, [str(bin_dir / f"meshgate-{binary}")], env, self.logs / f"{name}.log")

    def start_all(self) -> None:
        for name in ["redis", "mock"] + SERVICES + ["gateway-1", "gateway-2"]:
            self.procs[name].start()
            if name == "redis":
                self.wait_port(self.redis_port, "redis")
            if name == "mock":
                self.wait_port(self.mock_port, "mock")

    def wait_port(self, port: int, name: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if tcp_open(port):
                return
            if not self.procs[name].alive():
                raise RuntimeError(f"{name} exited; see {self.procs[name].log}")
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not listen on {port} within {seconds} s")

    def redis_command(self, *args: str) -> bytes:
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.redis_port), timeout=3) as s:
            s.sendall(payload)
            return s.recv(4096)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.alive():
                try:
                    proc.popen.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            if proc.popen is None:
                continue
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
