"""The mock provider as the test oracle: what it was asked and what it served, per tenant.

The mock keeps its last 256 requests (`GET /_mock/requests`, oldest first); the poller reads that
ring often and appends only what is new (the longest overlap of the previous read's tail with the
new read's head is what both saw). A read with no overlap after a full ring means requests were
missed: `gaps` counts them and the checks that need the complete count say they are incomplete.

Every request the load sends carries `tenant=<t> nonce=<n>` in its text, so each recorded
request is attributed to its tenant without trusting anything meshgate says. Tokens are the
mock's own arithmetic (shared/mock-provider/src/reply.rs): prompt = 3 + Σ(3 + words) per
message, completion = min(max_tokens, 1 + min(32, words of the last user message)); embeddings
= words of the inputs. `check_formula` compares it with the usage the gateway relayed, so a drift
of the mock is noticed rather than trusted.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter, defaultdict

from httpc import request

TAG = re.compile(r"tenant=(\S+) nonce=(\S+)")
RING = 256


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def served_tokens(path: str, body) -> tuple[int, str | None, str | None]:
    """(tokens the mock served for this request, tenant, nonce)."""
    if not isinstance(body, dict):
        return 0, None, None
    if path == "/v1/embeddings":
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else [t for t in inputs or [] if isinstance(t, str)]
        tokens = sum(len(t.split()) for t in texts)
        match = TAG.search(" ".join(texts))
    else:
        messages = body.get("messages") or []
        texts = [_text(m.get("content")) for m in messages]
        prompt = 3 + sum(3 + len(t.split()) for t in texts)
        last_user = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        natural = 1 + min(32, len(last_user.split()))
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        completion = min(natural, cap) if isinstance(cap, int) else natural
        tokens = prompt + completion
        match = TAG.search(" ".join(texts))
    if not match:
        return tokens, None, None
    return tokens, match.group(1), match.group(2)


class MockOracle:
    def __init__(self, host: str, port: int, interval: float = 0.2):
        self.host, self.port, self.interval = host, port, interval
        self.previous: list[str] = []
        self.entries: list[dict] = []
        self.gaps = 0
        self.poll_errors = 0
        self.tokens_by_tenant: Counter = Counter()
        self.requests_by_tenant: Counter = Counter()
        self.by_nonce: Counter = Counter()
        self.tokens_by_nonce: dict[str, int] = {}
        self.by_idempotency_key: Counter = Counter()
        self.untagged = 0
        self._stop = asyncio.Event()

    def _ingest(self, new: list[dict]) -> None:
        for entry in new:
            tokens, tenant, nonce = served_tokens(entry.get("path"), entry.get("body"))
            self.entries.append({**{k: entry.get(k) for k in ("path", "request_id", "idempotency_key")},
                                 "tenant": tenant, "nonce": nonce, "tokens": tokens,
                                 "stream": bool(isinstance(entry.get("body"), dict) and entry["body"].get("stream"))})
            if tenant is None:
                self.untagged += 1
                continue
            self.tokens_by_tenant[tenant] += tokens
            self.requests_by_tenant[tenant] += 1
            self.by_nonce[nonce] += 1
            self.tokens_by_nonce[nonce] = tokens
            if entry.get("idempotency_key"):
                self.by_idempotency_key[entry["idempotency_key"]] += 1

    async def poll_once(self) -> None:
        response = await request(self.host, self.port, "GET", "/_mock/requests", timeout=5)
        current = json.loads(response.body)
        keys = [json.dumps(e, sort_keys=True) for e in current]
        prev = self.previous
        overlap = 0
        for m in range(min(len(prev), len(keys)), 0, -1):
            if prev[-m:] == keys[:m]:
                overlap = m
                break
        if prev and overlap == 0 and len(prev) >= RING - 1:
            self.gaps += 1
        self._ingest(current[overlap:])
        self.previous = keys

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - a missed poll is counted, the next one catches up
                self.poll_errors += 1
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self._stop.set()
        await self.poll_once()

    def summary(self) -> dict:
        paths = Counter(e["path"] for e in self.entries)
        return {
            "requests_seen": len(self.entries),
            "by_path": dict(paths),
            "untagged": self.untagged,
            "ring_gaps": self.gaps,
            "poll_errors": self.poll_errors,
            "tokens_by_tenant": dict(self.tokens_by_tenant),
            "requests_by_tenant": dict(self.requests_by_tenant),
        }


def per_tenant_default() -> defaultdict:
    return defaultdict(int)
