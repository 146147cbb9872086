"""Binary room messages, end to end (issue 17): bytes in, bytes out, on every transport.

A binary room frame is a compact JSON header, one ``\\n`` byte, then the raw
payload (README, "The room protocol"). WebSocket and WebTransport members
get it as a binary frame/message; SSE members get the usual JSON message
frame with ``data`` = base64 of the payload and ``"encoding": "base64"``.
One server, real clients: websockets, aioquic, httpx-sse.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import struct
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import websockets
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection
from aioquic.h3.events import HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent
from forge_streaming import Connection, Streaming
from forge_streaming.testing import RunningServer, serve

TIMEOUT = 5.0
ROOM = "bin"
PAYLOAD = bytes(range(256)) + b"\n{not json}\n"  # every byte value, newlines included


def split(frame: bytes) -> tuple[dict[str, Any], bytes]:
    header, _, payload = frame.partition(b"\n")
    decoded: dict[str, Any] = json.loads(header)
    return decoded, payload


def client_frame(room: str, payload: bytes) -> bytes:
    return json.dumps({"type": "message", "room_id": room}, separators=(",", ":")).encode() + b"\n" + payload


@pytest.fixture(autouse=True)
def three_transports(streaming_plugins_only: Any) -> None:
    streaming_plugins_only("websocket", "sse", "webtransport", "memory-pubsub", "memory-rooms", "http-api")


async def relay(conn: Connection) -> None:
    """A Forge-style handler: joins the room and passes each message on, alternately as the Message and its data."""
    await conn.join_room(ROOM)
    n = 0
    while True:
        message = await conn.read_message()
        await conn.broadcast_to_room(ROOM, message if n % 2 == 0 else message.data)
        n += 1


@asynccontextmanager
async def server() -> AsyncIterator[RunningServer]:
    streaming = Streaming({"api": {"key": "k"}})
    streaming.handle("websocket", "/relay", relay)
    async with serve(streaming) as running:
        yield running


# -- clients ---------------------------------------------------------------------------------------


class WsMember:
    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def next_message(self) -> str | bytes:
        """The next room message (binary or text), skipping system and presence frames."""
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
            if isinstance(raw, bytes) or json.loads(raw).get("type") == "message":
                return raw  # type: ignore[no-any-return]


@asynccontextmanager
async def ws_member(port: int, since: int | None = None) -> AsyncIterator[WsMember]:
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws", open_timeout=TIMEOUT) as ws:
        join: dict[str, Any] = {"type": "join", "room_id": ROOM}
        if since is not None:
            join["since"] = since
        await ws.send(json.dumps(join))
        while json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)).get("event") != "room.joined":
            pass
        yield WsMember(ws)


class SseMember:
    def __init__(self, lines: AsyncIterator[str]) -> None:
        self.lines = lines

    async def next_frame(self, kind: str = "message") -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            async for line in self.lines:
                if line.startswith("data:"):
                    frame: dict[str, Any] = json.loads(line[5:])
                    if frame.get("type") == kind or frame.get("event") == kind:
                        return frame
            raise AssertionError("the SSE stream ended")

        return await asyncio.wait_for(read(), TIMEOUT)


@asynccontextmanager
async def sse_member(port: int) -> AsyncIterator[SseMember]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client, \
            client.stream("GET", f"http://127.0.0.1:{port}/sse?rooms={ROOM}") as response:
        assert response.status_code == 200
        member = SseMember(response.aiter_lines())
        await member.next_frame("room.joined")
        yield member


class WtClient(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.responses: dict[int, dict[bytes, bytes]] = {}
        self.data: dict[int, bytearray] = defaultdict(bytearray)
        self.changed = asyncio.Event()

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                self.responses[h3_event.stream_id] = dict(h3_event.headers)
            elif isinstance(h3_event, WebTransportStreamDataReceived):
                self.data[h3_event.stream_id] += h3_event.data
        self.changed.set()

    async def wait_for(self, predicate: Callable[[], Any]) -> Any:
        async def waiter() -> Any:
            while not (result := predicate()):
                self.changed.clear()
                await self.changed.wait()
            return result

        return await asyncio.wait_for(waiter(), TIMEOUT)


class WtMember:
    """A session with one bidirectional message stream: 1 byte type (1 text, 2 binary), 4 bytes length, payload."""

    def __init__(self, client: WtClient, session: int) -> None:
        self.client = client
        self.stream = client.h3.create_webtransport_stream(session, is_unidirectional=False)
        with client.h3._get_or_create_stream(self.stream) as h3_stream:  # parse replies as WebTransport data
            h3_stream.frame_type = FrameType.WEBTRANSPORT_STREAM
            h3_stream.session_id = session
        self.offset = 0

    def send(self, message: str | bytes) -> None:
        kind, payload = (2, message) if isinstance(message, bytes) else (1, message.encode())
        self.client._quic.send_stream_data(self.stream, struct.pack(">BI", kind, len(payload)) + payload)
        self.client.transmit()

    def _next(self) -> tuple[int, bytes] | None:
        buffer = self.client.data.get(self.stream, b"")
        if len(buffer) - self.offset < 5:
            return None
        kind, size = struct.unpack_from(">BI", buffer, self.offset)
        if len(buffer) - self.offset - 5 < size:
            return None
        start = self.offset + 5
        self.offset = start + size
        return kind, bytes(buffer[start:start + size])

    async def next_message(self) -> str | bytes:
        while True:
            message: tuple[int, bytes] = await self.client.wait_for(self._next)
            kind, payload = message
            if kind == 2:
                return payload
            if json.loads(payload).get("type") == "message":
                return payload.decode()

    async def joined(self) -> None:
        self.send(json.dumps({"type": "join", "room_id": ROOM}))
        while True:
            kind, payload = await self.client.wait_for(self._next)
            if kind == 1 and json.loads(payload).get("event") == "room.joined":
                return


@asynccontextmanager
async def wt_member(port: int) -> AsyncIterator[WtMember]:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE,
                                      max_datagram_frame_size=65536, server_name="localhost")
    async with connect("127.0.0.1", port, configuration=configuration, create_protocol=WtClient,
                       wait_connected=True) as client:
        assert isinstance(client, WtClient)
        session = client._quic.get_next_available_stream_id()
        client.h3.send_headers(session, [
            (b":method", b"CONNECT"), (b":scheme", b"https"), (b":authority", f"127.0.0.1:{port}".encode()),
            (b":path", b"/wt"), (b":protocol", b"webtransport")])
        client.transmit()
        response = await client.wait_for(lambda: client.responses.get(session))
        assert response[b":status"] == b"200"
        member = WtMember(client, session)
        await member.joined()
        yield member


# -- the checks ------------------------------------------------------------------------------------


def assert_binary(frame: str | bytes, payload: bytes, user_id: str | None = None) -> dict[str, Any]:
    assert isinstance(frame, bytes), f"expected a binary frame, got {frame!r:.200}"
    header, got = split(frame)
    assert got == payload
    assert header["type"] == "message" and header["room_id"] == ROOM and header["binary"] is True
    assert {"id", "user_id", "timestamp", "sequence"} <= header.keys() and "data" not in header
    if user_id is not None:
        assert header["user_id"] == user_id
    return header


def assert_base64(frame: dict[str, Any], payload: bytes, sequence: int) -> None:
    assert frame["encoding"] == "base64" and frame["binary"] is True
    assert base64.b64decode(frame["data"], validate=True) == payload
    assert frame["sequence"] == sequence and frame["room_id"] == ROOM


@pytest.mark.timeout(30)
async def test_broadcast_bytes_reaches_every_transport_as_bytes() -> None:
    async with server() as running, ws_member(running.port) as ws, sse_member(running.port) as sse, \
            wt_member(running.port) as wt:
        sequence = await running.streaming.broadcast(ROOM, PAYLOAD)
        assert isinstance(sequence, int)
        header = assert_binary(await ws.next_message(), PAYLOAD, "server")
        assert header["sequence"] == sequence
        assert_binary(await wt.next_message(), PAYLOAD, "server")
        assert_base64(await sse.next_frame(), PAYLOAD, sequence)
        # text keeps its frame exactly
        await running.streaming.broadcast(ROOM, {"text": "hi"})
        assert json.loads(await ws.next_message())["data"] == {"text": "hi"}
        assert json.loads(await wt.next_message())["data"] == {"text": "hi"}
        text = await sse.next_frame()
        assert text["data"] == {"text": "hi"} and "encoding" not in text


@pytest.mark.timeout(30)
async def test_binary_client_frames_on_websocket_and_webtransport() -> None:
    async with server() as running, ws_member(running.port) as ws, sse_member(running.port) as sse, \
            wt_member(running.port) as wt:
        await ws.ws.send(client_frame(ROOM, b"from ws\x00\xff"))
        header = assert_binary(await wt.next_message(), b"from ws\x00\xff")
        assert_base64(await sse.next_frame(), b"from ws\x00\xff", header["sequence"])
        wt.send(client_frame(ROOM, b"from wt\n"))
        header = assert_binary(await ws.next_message(), b"from wt\n")
        assert_base64(await sse.next_frame(), b"from wt\n", header["sequence"])
        # a binary frame for a room not joined, and a binary frame not in the form, are error frames
        await ws.ws.send(client_frame("elsewhere", b"x"))
        await ws.ws.send(b"\x00\x01")
        codes: list[str] = []
        while len(codes) < 2:
            raw = await asyncio.wait_for(ws.ws.recv(), TIMEOUT)
            if isinstance(raw, str) and json.loads(raw)["type"] == "error":
                codes.append(json.loads(raw)["data"]["code"])
        assert codes == ["not_member", "binary_not_supported"]


@pytest.mark.timeout(30)
async def test_broadcast_to_room_with_bytes_and_with_the_message() -> None:
    async with server() as running, ws_member(running.port) as member, wt_member(running.port) as wt:
        async with websockets.connect(f"ws://127.0.0.1:{running.port}/relay", open_timeout=TIMEOUT) as sender:
            await sender.send(b"\x01 the Message")  # relayed as the Message itself
            assert_binary(await member.next_message(), b"\x01 the Message")
            assert_binary(await wt.next_message(), b"\x01 the Message")
            await sender.send(b"\x02 its data")  # relayed as msg.data
            assert_binary(await member.next_message(), b"\x02 its data")
            await sender.send("text stays text")  # a text Message is passed on as its text
            assert json.loads(await member.next_message())["data"] == "text stays text"
            await sender.send("and its data too")
            assert json.loads(await member.next_message())["data"] == "and its data too"
            assert not sender.close_code, "the sender's connection stays open"


@pytest.mark.timeout(30)
async def test_history_replays_a_binary_message_as_binary() -> None:
    async with server() as running, ws_member(running.port):  # a member: the node keeps the room's history
        first = await running.streaming.broadcast(ROOM, b"kept")
        await running.streaming.broadcast(ROOM, "after")
        assert first is not None
        async with ws_member(running.port, since=first - 1) as late:
            assert_binary(await late.next_message(), b"kept")
            assert json.loads(await late.next_message())["data"] == "after"


@pytest.mark.timeout(30)
async def test_api_publish_data_base64() -> None:
    async with server() as running, ws_member(running.port) as ws, sse_member(running.port) as sse:
        async with httpx.AsyncClient(base_url=running.url, timeout=TIMEOUT,
                                     headers={"Authorization": "Bearer k"}) as http:
            answer = await http.post("/api/publish", json={"room_id": ROOM,
                                                           "data_base64": base64.b64encode(PAYLOAD).decode()})
            assert answer.status_code == 200, answer.text
            sequence = answer.json()["sequence"]
            assert assert_binary(await ws.next_message(), PAYLOAD, "api")["sequence"] == sequence
            assert_base64(await sse.next_frame(), PAYLOAD, sequence)
            bad = await http.post("/api/publish", json={"room_id": ROOM, "data_base64": "not base64!"})
            assert bad.status_code == 400 and bad.json()["error"] == "invalid_frame", bad.text
            both = await http.post("/api/publish", json={"room_id": ROOM, "data": 1, "data_base64": ""})
            assert both.status_code == 400, both.text
