"""The failure table of plugin-guide.md, on every transport, with real servers and clients.

One kernel lifecycle serves WebSocket, SSE and WebTransport, so one failure
has one outcome: the same HTTP status before the connection opens, the same
close code after, and ``streaming_disconnected`` exactly once with it. Each
row drives a handler at ``/t`` through the query string.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import websockets
from aioquic._buffer import Buffer  # where it is typed: aioquic.buffer re-exports it only implicitly
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent
from forge_streaming import Connection, ConnectionRequest, Identity, Refused, Streaming, hookimpl
from forge_streaming.testing import eventually, serve

TRANSPORTS = ["websocket", "sse", "webtransport"]
CLOSE_SESSION_CAPSULE = 0x2843


@dataclass(frozen=True)
class Row:
    """One line of the table: what the test asks for, and what every transport must answer."""

    name: str
    query: str
    status: int  # the HTTP status of the opening request
    close: tuple[int, str] | None  # the close code and reason after it opened (None: refused before)
    limits: tuple[tuple[str, int], ...] = ()  # for the limit rows: one connection is held open first


TABLE = [
    Row("authenticate refuses", "auth=refuse", 401, None),
    Row("authenticate hook fails", "auth=fail", 500, None),
    Row("server is full", "full=1", 503, None, (("max_connections", 1),)),
    Row("per-IP limit reached", "per_ip=1", 429, None, (("max_connections_per_ip", 1),)),
    Row("streaming_connected fails", "connected=fail", 200, (1011, "internal error")),
    Row("handler returns", "do=return", 200, (1000, "")),
    Row("handler raises Refused", "do=refuse", 200, (4003, "not in this room")),
    Row("handler raises", "do=raise", 200, (1011, "internal error")),
]


class TablePlugin:
    """Refuses or fails where the request's query says so, and records every disconnect."""

    def __init__(self) -> None:
        self.disconnects: list[tuple[str, int, str]] = []

    @hookimpl
    def streaming_authenticate(self, request: ConnectionRequest) -> Identity | None:
        if request.query.get("auth") == "refuse":
            raise Refused("log in first", status=401, code="unauthorized")
        if request.query.get("auth") == "fail":
            raise RuntimeError("token service down")
        return None

    @hookimpl
    def streaming_connected(self, connection: Connection) -> None:
        if connection.query("connected") == "fail":
            raise RuntimeError("audit log down")

    @hookimpl
    def streaming_disconnected(self, connection: Connection, code: int, reason: str) -> None:
        self.disconnects.append((connection.transport, code, reason))


async def handler(conn: Connection) -> None:
    action = conn.query("do")
    if action == "refuse":
        raise Refused("not in this room", close_code=4003)
    if action == "raise":
        raise RuntimeError("handler bug")
    if action == "hold":
        await conn.wait_ended()


# -- one small client per transport: open /t?query, return (status, (code, reason) or None) -------------


async def websocket_client(port: int, query: str) -> tuple[int, tuple[int, str] | None]:
    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}/t?{query}", open_timeout=5) as ws:
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None
                return 101, (closed.rcvd.code, closed.rcvd.reason)
            raise AssertionError("the server sent a message instead of closing")
    except websockets.InvalidStatus as refused:
        return refused.response.status_code, None


async def sse_client(port: int, query: str) -> tuple[int, tuple[int, str] | None]:
    async with httpx.AsyncClient(timeout=5) as client, client.stream("GET", f"http://127.0.0.1:{port}/t?{query}") as r:
        if r.status_code != 200:
            return r.status_code, None
        body = b"".join([chunk async for chunk in r.aiter_bytes()])  # until the server ends the stream
    for line in body.decode().splitlines():  # the close is a system event; a plain 1000 has none
        if line.startswith("data:") and '"connection.closed"' in line:
            data = json.loads(line[5:])["data"]
            return 200, (data["code"], data["reason"])
    return 200, (1000, "")


class _WtClient(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self.session = -1

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated) and not self.closed.done():
            self.closed.set_result((1006, event.reason_phrase))
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived) and h3_event.stream_id == self.session:
                if not self.status.done():
                    self.status.set_result(int(dict(h3_event.headers)[b":status"]))
                if h3_event.stream_ended and not self.closed.done():
                    self.closed.set_result((0, "ended"))
            elif isinstance(h3_event, DataReceived) and h3_event.stream_id == self.session:
                if h3_event.data and not self.closed.done():
                    buf = Buffer(data=h3_event.data)
                    if buf.pull_uint_var() == CLOSE_SESSION_CAPSULE:
                        length = buf.pull_uint_var()
                        code = buf.pull_uint32()
                        self.closed.set_result((code, buf.pull_bytes(length - 4).decode()))
                if h3_event.stream_ended and not self.closed.done():
                    self.closed.set_result((0, "ended"))


async def webtransport_client(port: int, query: str) -> tuple[int, tuple[int, str] | None]:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE,
                                      max_datagram_frame_size=65536, server_name="localhost")
    async with connect("127.0.0.1", port, configuration=configuration,
                       create_protocol=_WtClient) as client:
        assert isinstance(client, _WtClient)
        client.session = client._quic.get_next_available_stream_id()
        client.h3.send_headers(client.session, [
            (b":method", b"CONNECT"), (b":scheme", b"https"), (b":authority", f"127.0.0.1:{port}".encode()),
            (b":path", f"/t?{query}".encode()), (b":protocol", b"webtransport")])
        client.transmit()
        status = await asyncio.wait_for(client.status, 5)
        if status != 200:
            return status, None
        return 200, await asyncio.wait_for(client.closed, 5)


CLIENTS = {"websocket": websocket_client, "sse": sse_client, "webtransport": webtransport_client}


@asynccontextmanager
async def table_server(transport: str, limits: dict[str, int]) -> AsyncIterator[tuple[Any, TablePlugin, Streaming]]:
    plugin = TablePlugin()
    streaming = Streaming({"limits": limits, "server": {"room_endpoints": False}}, plugins=[plugin])
    streaming.handle(transport, "/t", handler)
    async with serve(streaming) as server:
        yield server, plugin, streaming


@pytest.fixture(autouse=True)
def three_transports(streaming_plugins_only: Any) -> None:
    streaming_plugins_only("websocket", "sse", "webtransport", "memory-pubsub", "memory-rooms")


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.timeout(60)
async def test_every_failure_has_the_same_outcome_on_every_transport(transport: str) -> None:
    client = CLIENTS[transport]
    for row in TABLE:
        async with table_server(transport, dict(row.limits)) as (server, plugin, streaming):
            holder: asyncio.Future[Any] | None = None
            if row.limits:  # one connection held open reaches the limit
                holder = asyncio.ensure_future(client(server.port, "do=hold"))
                await eventually(lambda: len(streaming.connections) == 1, what="the holder is connected")
            status, closed = await client(server.port, row.query)
            expected_status = 101 if transport == "websocket" and row.status == 200 else row.status
            assert status == expected_status, f"{transport}: {row.name}"
            if holder is not None:
                for conn in list(streaming.connections.values()):
                    await conn.close(1000, "")
                await asyncio.wait_for(holder, 5)
                await eventually(lambda: (transport, 1000, "") in plugin.disconnects, what="the holder is gone")
                plugin.disconnects.remove((transport, 1000, ""))
            if row.close is None:
                assert not plugin.disconnects, f"{transport}: {row.name}: refused, yet disconnected fired"
                continue
            assert closed == row.close, f"{transport}: {row.name}: the client saw {closed}"
            await eventually(lambda: plugin.disconnects, what=f"{transport}: {row.name}: streaming_disconnected")
            await asyncio.sleep(0.05)  # a second call would come now
            assert plugin.disconnects == [(transport, *row.close)], f"{transport}: {row.name}"
            assert not streaming.connections, f"{transport}: {row.name}: still counted"
