"""A cheap SSE client: one GET per member, chunked decoding and event splitting by hand.

Like the WebSocket client it never builds an object per event: each event
block (up to the blank line) is handed to the same ``on_message`` callback
the WebSocket members use, which reads only ``"n":`` (and ``"t":`` when
sampled). Members join rooms with ``?rooms=`` (ours) or by the peer's
default; the publisher is a WebSocket connection to the same server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .wsclient import Stats, count_region


class SseConn(asyncio.Protocol):
    """One SSE member. ``joined`` resolves on the first event mentioning ``room.joined``."""

    def __init__(self, request: bytes, stats: Stats, *, sample: bool = False) -> None:
        self.request = request
        self.stats = stats
        self.sample = sample
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.joined: asyncio.Future[None] = loop.create_future()
        self.head = b""
        self.raw = b""
        self.events = b""
        self.chunked = False
        self.chunk_left = 0
        self.closed = False
        self.count = 0
        self.last_n = -1
        self.group = 0
        self.counting = False
        self.on_message: Callable[[SseConn, bytes, int, int, float], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for fut in (self.ready, self.joined):
            if not fut.done():
                fut.set_exception(ConnectionError(f"closed: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.stats.frames += 1  # per chunk: enough to tell when traffic has stopped
        if not self.ready.done():
            data = self.head + data
            i = data.find(b"\r\n\r\n")
            if i < 0:
                self.head = data
                return
            head = data[:i].lower()
            if not head.startswith(b"http/1.1 200"):
                self.ready.set_exception(ConnectionError(data[:data.find(b"\r\n")].decode(errors="replace")))
                return
            self.chunked = b"transfer-encoding: chunked" in head
            self.ready.set_result(None)
            data = data[i + 4:]
        body = self._dechunk(data) if self.chunked else data
        if self.events:
            body = self.events + body
        now = time.monotonic()
        start = 0
        if self.counting and self.joined.done():
            last = body.rfind(b"\n\n")
            if last >= 0:
                count_region(self, body, 0, last, now)
                self.events = body[last + 2:]
            else:
                self.events = body
            return
        while True:
            end = body.find(b"\n\n", start)
            if end < 0:
                break
            if not self.joined.done():
                if body.find(b"room.joined", start, end) >= 0:
                    self.joined.set_result(None)
            elif self.on_message is not None:
                self.on_message(self, body, start, end, now)
            start = end + 2
        self.events = body[start:]

    def _dechunk(self, data: bytes) -> bytes:
        buf = self.raw + data if self.raw else data
        out: list[bytes] = []
        pos, size = 0, len(buf)
        while pos < size:
            if self.chunk_left == 0:
                i = buf.find(b"\r\n", pos)
                if i < 0:
                    break
                line = buf[pos:i]
                pos = i + 2
                if line:
                    self.chunk_left = int(line.split(b";")[0], 16)
                continue
            take = min(self.chunk_left, size - pos)
            out.append(buf[pos:pos + take])
            pos += take
            self.chunk_left -= take
        self.raw = buf[pos:]
        return out[0] if len(out) == 1 else b"".join(out)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect_sse(host: str, port: int, path: str, stats: Stats, *, sample: bool = False,
                      timeout: float = 10.0) -> SseConn:
    """Open one SSE stream and wait for the response headers."""
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
               "Cache-Control: no-cache\r\n\r\n").encode()
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: SseConn(request, stats, sample=sample), host, port), timeout)
    try:
        await asyncio.wait_for(asyncio.shield(conn.ready), timeout)
    except BaseException:
        conn.close()
        raise
    return conn
