"""Shared pieces for the SSE tests: services, a raw HTTP/1.1 SSE reader, httpx-sse helpers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from forge_streaming import Streaming

ONLY_SSE = ("sse", "memory-pubsub", "memory-rooms")
"""The installed plugins these tests load (a test that needs more widens it with ``streaming_plugins_only``)."""


@pytest.fixture(autouse=True)
def only_sse(streaming_plugins_only: Callable[..., None]) -> None:
    streaming_plugins_only(*ONLY_SSE)


def make_streaming(config: dict[str, Any] | None = None, *, plugins: tuple[object, ...] = ()) -> Streaming:
    """A service with the memory backend and the SSE transport (the plugins the allow list lets in)."""
    return Streaming(dict(config or {}), plugins=plugins, environ={})


@pytest.fixture
def streaming_factory() -> Callable[..., Streaming]:
    return make_streaming


@dataclass
class SSEEvent:
    event: str
    data: str
    id: str | None
    retry: int | None

    def json(self) -> Any:
        return json.loads(self.data)


class RawSSE:
    """A byte-exact HTTP/1.1 SSE client: it reads the chunked body itself and parses events by the spec."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""  # every body byte received so far, chunk framing removed (kept up to 64 KiB)
        self._buffer = bytearray()  # body bytes not parsed into events yet
        self.last_event_id: str | None = None
        self.ended = False

    @classmethod
    async def open(cls, url: str, path: str, headers: dict[str, str] | None = None, *,
                   rcvbuf: int | None = None, limit: int = 2**20) -> RawSSE:
        """Connect and read the response head. ``rcvbuf`` and ``limit`` small make a reader that,
        once it stops asking for events, really stops reading (asyncio buffers up to 2 * limit)."""
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        self = cls(reader, writer)
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
        return self

    async def _read_chunk(self) -> bool:
        """Read one chunk into ``body``; False at the end of the body or of the connection."""
        if self.ended:
            return False
        if self.headers.get("transfer-encoding") != "chunked":
            length = int(self.headers.get("content-length", "0"))
            data = await self.reader.readexactly(length)
            self.body += data
            self._buffer += data
            self.ended = True
            return bool(length)
        try:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.strip(), 16)
            data = await self.reader.readexactly(size + 2)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.ended = True
            return False
        if size == 0:
            self.ended = True
            return False
        assert data.endswith(b"\r\n"), "chunk not terminated by CRLF"
        if len(self.body) < 65536:
            self.body += data[:-2]
        self._buffer += data[:-2]
        return True

    def _next_block(self) -> bytes | None:
        end = self._buffer.find(b"\n\n")
        if end < 0:
            return None
        block = bytes(self._buffer[:end])
        del self._buffer[:end + 2]
        return block

    async def next_block(self) -> bytes | None:
        """The next raw event block (comments included), None when the stream ended."""
        while True:
            block = self._next_block()
            if block is not None:
                return block
            if not await self._read_chunk():
                return None

    async def next_event(self) -> SSEEvent | None:
        """The next dispatched event (comment-only and retry-only blocks skipped), None at the end."""
        while True:
            block = await self.next_block()
            if block is None:
                return None
            event, data, retry, has_data = "message", [], None, False
            for line in block.decode("utf-8").split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                    has_data = True
                elif name == "id":
                    self.last_event_id = value
                elif name == "retry":
                    retry = int(value)
            if has_data:
                return SSEEvent(event, "\n".join(data), self.last_event_id, retry)

    async def events(self) -> AsyncIterator[SSEEvent]:
        while (event := await self.next_event()) is not None:
            yield event

    async def until(self, predicate: Callable[[SSEEvent], bool], timeout: float = 5.0) -> list[SSEEvent]:
        """Events up to and including the first that matches ``predicate``."""
        seen: list[SSEEvent] = []

        async def collect() -> None:
            async for event in self.events():
                seen.append(event)
                if predicate(event):
                    return
            raise AssertionError(f"stream ended before the awaited event; got {seen!r}")

        await asyncio.wait_for(collect(), timeout)
        return seen

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (TimeoutError, OSError):
            pass


def frame_of(event: SSEEvent) -> dict[str, Any]:
    frame: dict[str, Any] = event.json()
    return frame


def is_message(event: SSEEvent, data: Any = ...) -> bool:
    if event.event != "message":
        return False
    frame = event.json()
    return frame.get("type") == "message" and (data is ... or frame.get("data") == data)


def is_system(event: SSEEvent, name: str) -> bool:
    if event.event != "message":
        return False
    frame = event.json()
    return bool(frame.get("type") == "system" and frame.get("event") == name)


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    """Wait until ``check()`` is true (state that changes asynchronously, like cleanup)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


class Kit:
    """Helpers handed to tests as the ``kit`` fixture (test modules cannot import conftest)."""

    make_streaming = staticmethod(make_streaming)
    RawSSE = RawSSE
    is_message = staticmethod(is_message)
    is_system = staticmethod(is_system)
    eventually = staticmethod(eventually)


@pytest.fixture
def kit() -> type[Kit]:
    return Kit
