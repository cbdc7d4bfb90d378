"""The mock provider as the test oracle: what it was asked and what it served, per tenant.

The mock keeps its last 256 requests (`GET /_mock/requests`, oldest first), each with its arrival
number `seq` and how its answer ended so far (`outcome`: pending, completed, failed, cut,
abandoned; the HTTP `status`; the completion `pieces` a stream sent; `replay`). The poller reads
that ring often, adds the requests it has not seen (by `seq`) and updates the outcome of those it
saw pending. Requests that left the ring before a read are counted in `gaps` (by their numbers);
requests that left it while still pending are `unsettled`: their outcome is unknown, and the
checks that need the complete count say they are incomplete.

Every request the load sends carries `tenant=<t> nonce=<n>` in its text, so each recorded
request is attributed to its tenant without trusting anything meshgate says. Tokens are the
mock's own arithmetic (shared/mock-provider/src/reply.rs): prompt = 3 + Σ(3 + words) per
message, completion = min(max_tokens, 1 + min(32, words of the last user message)), one
completion token per streamed piece; embeddings = words of the inputs. `check_formula` compares
it with the usage the gateway relayed, so a drift of the mock is noticed rather than trusted.

What the provider served (what a provider bills), per request, by its outcome:
  completed (not a replay)          prompt + completion (embeddings: their tokens)
  cut, or abandoned mid-stream      prompt + the pieces it streamed (a *partial* reply)
  failed, abandoned while waiting   0 (an error answer, a hang the caller gave up on)
  replay of a completed key         0 (the work was done once)
A request the caller's retries sent again is several entries, each served (or not) on its own.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter, defaultdict

from httpc import request

TAG = re.compile(r"tenant=(\S+) nonce=(\S+)")
FINAL = {"completed", "failed", "cut", "abandoned"}


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def request_tokens(path: str, body) -> tuple[int, int, str | None, str | None]:
    """(prompt tokens, completion tokens of the whole reply, tenant, nonce) of a request body, by
    the mock's arithmetic; embeddings have only prompt tokens."""
    if not isinstance(body, dict):
        return 0, 0, None, None
    if path == "/v1/embeddings":
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else [t for t in inputs or [] if isinstance(t, str)]
        prompt, completion = sum(len(t.split()) for t in texts), 0
    else:
        messages = body.get("messages") or []
        texts = [_text(m.get("content")) for m in messages]
        prompt = 3 + sum(3 + len(t.split()) for t in texts)
        last_user = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        natural = 1 + min(32, len(last_user.split()))
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        completion = min(natural, cap) if isinstance(cap, int) else natural
    match = TAG.search(" ".join(texts))
    if not match:
        return prompt, completion, None, None
    return prompt, completion, match.group(1), match.group(2)


def served(entry: dict) -> int:
    """Tokens the provider served for one recorded request, by its outcome (see the module docs)."""
    outcome = entry["outcome"]
    if outcome == "completed":
        return 0 if entry["replay"] else entry["prompt"] + entry["completion"]
    if outcome in ("cut", "abandoned") and entry.get("pieces"):
        return entry["prompt"] + min(entry["pieces"], entry["completion"])
    return 0


def partial(entry: dict) -> bool:
    """A reply the provider started and did not finish: charged by meshgate's estimate, if at all."""
    return entry["outcome"] in ("cut", "abandoned") and bool(entry.get("pieces"))


class MockOracle:
    def __init__(self, host: str, port: int, interval: float = 0.2):
        self.host, self.port, self.interval = host, port, interval
        self.entries: dict[int, dict] = {}  # seq -> entry, in arrival order
        self.max_seq = 0
        self.gaps = 0  # requests that left the ring unread
        self.unsettled: set[int] = set()  # left the ring while pending
        self.open: set[int] = set()  # seen pending, still in the ring
        self.poll_errors = 0
        self._stop = asyncio.Event()

    def _entry(self, raw: dict) -> dict:
        prompt, completion, tenant, nonce = request_tokens(raw.get("path"), raw.get("body"))
        body = raw.get("body")
        return {**{k: raw.get(k) for k in ("seq", "path", "request_id", "idempotency_key")},
                "tenant": tenant, "nonce": nonce, "prompt": prompt, "completion": completion,
                "stream": bool(isinstance(body, dict) and body.get("stream")),
                "outcome": raw.get("outcome", "completed"), "status": raw.get("status"),
                "pieces": raw.get("pieces"), "replay": bool(raw.get("replay"))}

    def _ingest(self, current: list[dict]) -> None:
        if not current:
            return
        first = current[0]["seq"]
        if self.max_seq and first > self.max_seq + 1:
            self.gaps += first - self.max_seq - 1
        # Pending entries that left the ring: their end was never seen.
        gone = {seq for seq in self.open if seq < first}
        self.unsettled |= gone
        self.open -= gone
        for raw in current:
            seq = raw["seq"]
            if seq > self.max_seq:
                self.entries[seq] = self._entry(raw)
                self.max_seq = seq
            elif seq in self.open:
                self.entries[seq].update({k: raw.get(k) for k in ("outcome", "status", "pieces")})
                self.entries[seq]["replay"] = bool(raw.get("replay"))
            else:
                continue
            if self.entries[seq]["outcome"] in FINAL:
                self.open.discard(seq)
            else:
                self.open.add(seq)

    async def poll_once(self) -> None:
        response = await request(self.host, self.port, "GET", "/_mock/requests", timeout=5)
        self._ingest(json.loads(response.body))

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

    # --- what was served ----------------------------------------------------------------------
    def tagged(self):
        return (e for e in self.entries.values() if e["tenant"] is not None)

    @property
    def incomplete(self) -> int:
        """Requests whose outcome the oracle cannot know: missed, or gone while pending."""
        return self.gaps + len(self.unsettled)

    def tokens_by_tenant(self) -> Counter:
        out: Counter = Counter()
        for e in self.tagged():
            out[e["tenant"]] += served(e)
        return out

    def partial_entries(self) -> list[dict]:
        return [e for e in self.tagged() if partial(e)]

    def pending(self) -> int:
        return len(self.open)

    def tokens_by_nonce(self) -> dict[str, int]:
        """Tokens served per load request (all its entries: retries, redeliveries)."""
        out: dict[str, int] = defaultdict(int)
        for e in self.tagged():
            out[e["nonce"]] += served(e)
        return out

    def full_tokens_by_nonce(self) -> dict[str, int]:
        """The whole reply's tokens of each load request the provider completed (the self-check)."""
        return {e["nonce"]: e["prompt"] + e["completion"] for e in self.tagged()
                if e["outcome"] == "completed" and not e["replay"]}

    def deliveries_by_nonce(self) -> Counter:
        """Replies completed (replays excluded) per load request."""
        return Counter(e["nonce"] for e in self.tagged() if e["outcome"] == "completed" and not e["replay"])

    def deliveries_by_key(self) -> Counter:
        """Replies completed (replays excluded) per idempotency key: a job's deliveries."""
        return Counter(e["idempotency_key"] for e in self.entries.values()
                       if e["idempotency_key"] and e["outcome"] == "completed" and not e["replay"])

    def arrivals_by_key(self) -> Counter:
        """Requests received per idempotency key, whatever their outcome: a job's attempts."""
        return Counter(e["idempotency_key"] for e in self.entries.values() if e["idempotency_key"])

    def summary(self) -> dict:
        tagged = list(self.tagged())
        return {
            "requests_seen": len(self.entries),
            "by_path": dict(Counter(e["path"] for e in self.entries.values())),
            "by_outcome": dict(Counter(e["outcome"] for e in self.entries.values())),
            "by_status": dict(Counter(str(e["status"]) for e in self.entries.values())),
            "untagged": len(self.entries) - len(tagged),
            "ring_gaps": self.gaps,
            "unsettled": len(self.unsettled),
            "pending_at_end": self.pending(),
            "poll_errors": self.poll_errors,
            "tokens_by_tenant": dict(self.tokens_by_tenant()),
            "requests_by_tenant": dict(Counter(e["tenant"] for e in tagged)),
            "partial_replies": len([e for e in tagged if partial(e)]),
        }
