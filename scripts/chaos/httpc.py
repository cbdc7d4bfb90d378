"""A minimal HTTP/1.1 client on asyncio streams (standard library only).

One connection per request (`Connection: close`), the whole exchange bounded by a deadline, and
the failure kinds a chaos run must tell apart: the connection refused (nothing listens: a load
balancer may send the request elsewhere), the connection reset or the body cut after the head,
and the deadline passed.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field


class ConnectFailed(Exception):
    """Nothing accepted the connection (refused, or reset before the request was sent)."""


class Cut(Exception):
    """The connection ended before the answer was complete."""

    def __init__(self, message: str, status: int | None = None, headers: dict | None = None, body: bytes = b""):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.body = body


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float = 0.0
    first_byte: float = 0.0
    extra: dict = field(default_factory=dict)

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    line = await reader.readline()
    if not line:
        raise Cut("connection closed before the status line")
    parts = line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise Cut(f"bad status line {line[:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if not line:
            raise Cut("connection closed inside the head", status, headers)
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _read_body(reader: asyncio.StreamReader, status: int, headers: dict[str, str]) -> bytes:
    body = bytearray()
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readline()
                if not size_line:
                    raise Cut("connection closed inside a chunked body", status, headers, bytes(body))
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Trailers until the blank line (or the end).
                    while True:
                        line = await reader.readline()
                        if line in (b"\r\n", b"\n", b""):
                            break
                    return bytes(body)
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        elif "content-length" in headers:
            return await reader.readexactly(int(headers["content-length"]))
        else:
            return await reader.read()
    except asyncio.IncompleteReadError as err:
        raise Cut("body cut short", status, headers, bytes(body) + err.partial) from None
    except (ConnectionResetError, BrokenPipeError) as err:
        raise Cut(f"connection reset in the body: {err}", status, headers, bytes(body)) from None


async def request(
    host: str,
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | dict | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request. Raises ConnectFailed, Cut or TimeoutError (the deadline covers everything)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as err:
            raise ConnectFailed(str(err)) from None
        try:
            head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
            for name, value in (headers or {}).items():
                head.append(f"{name}: {value}")
            if body is not None:
                head.append(f"Content-Length: {len(body)}")
            try:
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
                await writer.drain()
            except (ConnectionResetError, BrokenPipeError) as err:
                raise ConnectFailed(f"reset while sending: {err}") from None
            try:
                status, got = await _read_head(reader)
            except (ConnectionResetError, BrokenPipeError) as err:
                raise Cut(f"connection reset before the head: {err}") from None
            first_byte = time.monotonic() - started
            data = await _read_body(reader, status, got)
            return Response(status, got, data, time.monotonic() - started, first_byte)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except Exception:  # noqa: BLE001 - the peer may be gone already
                pass
