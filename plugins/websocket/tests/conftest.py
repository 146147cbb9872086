"""Shared fixtures: a Streaming service with only this plugin and the memory backend."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from forge_streaming import Streaming, hookimpl
from websockets.asyncio.client import connect
from websockets.frames import Opcode

ALLOW = ["websocket", "memory-pubsub", "memory-rooms"]


@pytest.fixture(autouse=True)
def only_our_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other transports are built elsewhere in the monorepo; keep their state out of these tests."""
    monkeypatch.setenv("FORGE_STREAMING_PLUGINS_ALLOW", ",".join(ALLOW))


@pytest.fixture
def make_streaming() -> Callable[..., Streaming]:
    def make(config: dict[str, Any] | None = None, **kwargs: Any) -> Streaming:
        return Streaming(dict(config or {}), **kwargs)

    return make


class Frames:
    """Read room-protocol frames from a websockets client, skipping the kinds a test does not look at."""

    @staticmethod
    async def next(ws: Any, kind: str, *, event: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        import asyncio

        async def wait() -> dict[str, Any]:
            while True:
                frame: dict[str, Any] = json.loads(await ws.recv())
                if frame.get("type") == kind and (event is None or frame.get("event") == event):
                    return frame

        return await asyncio.wait_for(wait(), timeout)

    @staticmethod
    async def send(ws: Any, **frame: Any) -> None:
        await ws.send(json.dumps(frame))


@pytest.fixture
def frames() -> type[Frames]:
    return Frames


class RawClient:
    """A WebSocket client that reads only when told to: a dead or slow peer on demand.

    Built on the websockets sans-I/O client protocol over a plain socket, so
    it answers pings only while :meth:`read_events` is running.
    """

    def __init__(self, url: str, *, rcvbuf: int | None = None) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.url = url
        self.rcvbuf = rcvbuf
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.reader: Any = None
        self.writer: Any = None

    async def open(self) -> RawClient:
        import asyncio
        import socket
        from urllib.parse import urlsplit

        from websockets.protocol import State

        parts = urlsplit(self.url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock)
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        while self.protocol.state is State.CONNECTING:
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            assert data, "server closed during the handshake"
            self.protocol.receive_data(data)
        # CLOSING: the server closed right after the handshake (its close frame came with the response)
        assert self.protocol.state in (State.OPEN, State.CLOSING), self.protocol.handshake_exc
        self.protocol.events_received()  # the handshake response
        return self

    def _flush(self) -> None:
        self.writer.write(b"".join(self.protocol.data_to_send()))

    def send_text(self, data: bytes) -> None:
        self.protocol.send_text(data)
        self._flush()

    async def read_events(self, until: Callable[[Any], bool], timeout: float = 5.0) -> list[Any]:
        """Read frames (answering pings) until ``until(frame)`` or the connection ends."""
        import asyncio

        seen: list[Any] = []

        async def loop() -> None:
            while True:
                data = await self.reader.read(65536)
                if data:
                    self.protocol.receive_data(data)
                else:
                    self.protocol.receive_eof()
                for frame in self.protocol.events_received():
                    seen.append(frame)
                    if until(frame):
                        return
                self._flush()
                if not data:
                    return

        await asyncio.wait_for(loop(), timeout)
        return seen

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


@pytest.fixture
async def raw_clients() -> Any:
    clients: list[RawClient] = []

    async def open_raw(url: str, **kwargs: Any) -> RawClient:
        client = RawClient(url, **kwargs)
        clients.append(client)
        return await client.open()

    yield open_raw
    for client in clients:
        client.close()


# -- shared scenario pieces (fixtures below hand them to the test modules) -------------------------

class Closes:
    """Records the kernel's disconnect and drop hooks."""

    def __init__(self) -> None:
        self.closed: dict[str, tuple[int, str]] = {}
        self.dropped: list[tuple[str, str]] = []

    @hookimpl
    def streaming_disconnected(self, connection: Any, code: int, reason: str) -> None:
        self.closed[connection.id] = (code, reason)

    @hookimpl
    def streaming_connection_dropped(self, connection: Any, reason: str) -> None:
        self.dropped.append((connection.id, reason))


async def until(predicate: Any, timeout: float = 5.0) -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(wait(), timeout)


def is_json(kind: str, event: str | None = None) -> Any:
    def check(frame: Any) -> bool:
        if frame.opcode is not Opcode.TEXT:
            return False
        obj = json.loads(frame.data)
        return bool(obj.get("type") == kind and (event is None or obj.get("event") == event))

    return check


async def slow_consumer_race(streaming: Streaming, ws_url: str, raw_clients: Any, closes: Closes,
                             *, pad: int = 16 * 1024, max_messages: int = 1500, reset: bool = True) -> None:
    """A fast and a stalled member share a room; the stalled one is dropped, the fast one gets all, in order.

    ``reset``: the server owns the socket (our protocol) and resets it; else (the ASGI fallback, no socket)
    the stalled client finds the close frame with the reason after its data.
    """
    from websockets.frames import Close

    async with connect(ws_url + "/ws", max_size=None) as fast:
        await fast.send(json.dumps({"type": "join", "room_id": "race"}))
        slow = await raw_clients(ws_url + "/ws", rcvbuf=16 * 1024)
        slow.send_text(b'{"type":"join","room_id":"race"}')
        await slow.read_events(is_json("system", "room.joined"))
        await until(lambda: len(streaming.local_members("race")) == 2)
        fast_id = _fast_id(streaming)
        (slow_id,) = set(streaming.connections) - {fast_id}
        received: list[int] = []

        async def read_fast() -> None:
            while True:
                frame = json.loads(await fast.recv())
                if frame["type"] == "message":
                    received.append(frame["data"]["n"])

        reader = asyncio.ensure_future(read_fast())
        try:
            sent = 0
            padding = "x" * pad
            # the test paces itself on the fast member only: it stays a few messages behind, never more
            while (not closes.dropped or sent < 20) and sent < max_messages:
                await until(lambda n=sent: len(received) >= n - 4)
                await streaming.broadcast("race", {"n": sent, "pad": padding})
                sent += 1
            assert closes.dropped == [(slow_id, "slow consumer")], f"not dropped after {sent} messages"
            await until(lambda: len(received) == sent)
            assert received == list(range(sent))  # everything, in order, no gap
            assert streaming.stats_counters()["dropped.slow consumer"] == 1
            assert await streaming.presence("race") == [fast_id]
            await until(lambda: slow_id in closes.closed)
            assert closes.closed[slow_id] == (1008, "slow consumer")
        finally:
            reader.cancel()
        if reset:
            # the stalled client, reading at last, finds its connection reset: the server freed the data it held at
            # once (SO_LINGER 0); a close frame could not reach it anyway, behind megabytes it was not reading
            with pytest.raises(ConnectionResetError):
                await slow.read_events(lambda f: isinstance(f, Close) or f.opcode is Opcode.CLOSE, timeout=10)
            assert slow.protocol.close_rcvd is None
            return
        events = await slow.read_events(lambda f: isinstance(f, Close) or f.opcode is Opcode.CLOSE, timeout=10)
        assert slow.protocol.close_rcvd is not None
        assert (slow.protocol.close_rcvd.code, slow.protocol.close_rcvd.reason) == (1008, "slow consumer")
        assert len(events) > 1


def _fast_id(streaming: Streaming) -> str:
    """The connection opened first (ids count up): the websockets client."""
    ids = sorted(streaming.connections, key=lambda cid: int(cid.split("-")[1], 16))
    return ids[0]




@pytest.fixture
def kit() -> SimpleNamespace:
    """Scenario helpers for the test modules (which cannot import each other)."""
    return SimpleNamespace(Closes=Closes, until=until, is_json=is_json, race=slow_consumer_race)
