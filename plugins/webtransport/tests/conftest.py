"""A WebTransport client on aioquic (the tests' own, independent of the server code) and server fixtures."""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection
from aioquic.h3.events import DatagramReceived, DataReceived, HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamReset
from forge_streaming import Streaming
from forge_streaming.testing import RunningServer, serve

TIMEOUT = 5.0


class ClientProtocol(QuicConnectionProtocol):
    """Records everything the server sends, by stream; tests wait on predicates."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.responses: dict[int, dict[bytes, bytes]] = {}
        self.data: dict[int, bytearray] = defaultdict(bytearray)
        self.ended: set[int] = set()
        self.reset: set[int] = set()
        self.server_streams: list[int] = []
        self.datagrams: list[bytes] = []
        self.session_data: dict[int, bytearray] = defaultdict(bytearray)
        self.session_ended: set[int] = set()
        self.terminated = False
        self.changed = asyncio.Event()
        self.acks_paused = False

    def pause_acks(self) -> None:
        """Drop every packet from now on, as a client that stopped reading would."""
        self.acks_paused = True

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        if not self.acks_paused:
            super().datagram_received(data, addr)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.terminated = True
        if isinstance(event, StreamReset):
            self.reset.add(event.stream_id)
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                self.responses[h3_event.stream_id] = dict(h3_event.headers)
                if h3_event.stream_ended:
                    self.session_ended.add(h3_event.stream_id)
            elif isinstance(h3_event, DataReceived):
                self.session_data[h3_event.stream_id] += h3_event.data
                if h3_event.stream_ended:
                    self.session_ended.add(h3_event.stream_id)
            elif isinstance(h3_event, WebTransportStreamDataReceived):
                if h3_event.stream_id % 4 in (1, 3) and h3_event.stream_id not in self.data:
                    self.server_streams.append(h3_event.stream_id)
                self.data[h3_event.stream_id] += h3_event.data
                if h3_event.stream_ended:
                    self.ended.add(h3_event.stream_id)
            elif isinstance(h3_event, DatagramReceived):
                self.datagrams.append(h3_event.data)
        self.changed.set()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
        async def waiter() -> Any:
            while not (result := predicate()):
                self.changed.clear()
                await self.changed.wait()
            return result

        return await asyncio.wait_for(waiter(), timeout)


class Session:
    """One WebTransport session from the client side."""

    def __init__(self, client: ClientProtocol, session_id: int, status: int) -> None:
        self.client = client
        self.session_id = session_id
        self.status = status
        self._message_stream: int | None = None
        self._read_offset = 0

    def open_stream(self, unidirectional: bool = False) -> int:
        h3 = self.client.h3
        stream_id = h3.create_webtransport_stream(self.session_id, is_unidirectional=unidirectional)
        if not unidirectional:  # else aioquic would parse the server's replies as HTTP frames
            with h3._get_or_create_stream(stream_id) as h3_stream:
                h3_stream.frame_type = FrameType.WEBTRANSPORT_STREAM
                h3_stream.session_id = self.session_id
        self.client.transmit()
        return stream_id

    def send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        self.client._quic.send_stream_data(stream_id, data, end_stream)
        self.client.transmit()

    async def read_until_end(self, stream_id: int) -> bytes:
        await self.client.wait_for(lambda: stream_id in self.client.ended)
        return bytes(self.client.data[stream_id])

    def send_datagram(self, data: bytes) -> None:
        self.client.h3.send_datagram(self.session_id, data)
        self.client.transmit()

    # the message stream: 1 byte type, 4 bytes big-endian length, payload
    def send_message(self, message: str | bytes | dict[str, Any]) -> None:
        if self._message_stream is None:
            self._message_stream = self.open_stream()
        if isinstance(message, dict):
            message = json.dumps(message)
        kind, payload = (2, message) if isinstance(message, bytes) else (1, message.encode())
        self.send(self._message_stream, struct.pack(">BI", kind, len(payload)) + payload)

    def _next_message(self) -> tuple[int, bytes] | None:
        buffer = self.client.data.get(self._message_stream or -1, b"")
        if len(buffer) - self._read_offset < 5:
            return None
        kind, size = struct.unpack_from(">BI", buffer, self._read_offset)
        if len(buffer) - self._read_offset - 5 < size:
            return None
        start = self._read_offset + 5
        self._read_offset = start + size
        return kind, bytes(buffer[start:start + size])

    async def read_message(self, timeout: float = TIMEOUT) -> str | bytes:
        message: tuple[int, bytes] = await self.client.wait_for(self._next_message, timeout)
        kind, payload = message
        return payload.decode() if kind == 1 else payload

    async def read_frame(self, kind: str | None = None, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next room-protocol JSON frame (of ``kind``, skipping others)."""
        while True:
            frame: dict[str, Any] = json.loads(await self.read_message(timeout))
            if kind is None or frame.get("type") == kind:
                return frame

    def close(self, code: int = 0, reason: str = "") -> None:
        value = code.to_bytes(4, "big") + reason.encode()
        capsule = bytes([0x80 | 0x00, 0x00, 0x28, 0x43]) + bytes([len(value)]) + value
        self.client.h3.send_data(self.session_id, capsule, end_stream=True)
        self.client.transmit()

    async def closed_by_server(self) -> tuple[int, str]:
        """The CLOSE_WEBTRANSPORT_SESSION capsule's code and reason, or (-1, "") without one."""
        await self.client.wait_for(lambda: self.session_id in self.client.session_ended or self.client.terminated)
        data = bytes(self.client.session_data[self.session_id])
        kind, pos = _varint(data, 0)
        length, pos = _varint(data, pos)
        if kind != 0x2843 or len(data) < pos + length:
            return -1, ""
        return int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + length].decode()


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        return -1, pos
    size = 1 << (data[pos] >> 6)
    return int.from_bytes(bytes([data[pos] & 0x3F]) + data[pos + 1:pos + size], "big"), pos + size


@asynccontextmanager
async def wt_client(port: int, host: str = "127.0.0.1") -> AsyncIterator[ClientProtocol]:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE,
                                      max_datagram_frame_size=65536, server_name="localhost")
    async with connect(host, port, configuration=configuration, create_protocol=ClientProtocol,
                       wait_connected=True) as client:
        assert isinstance(client, ClientProtocol)  # create_protocol=ClientProtocol
        yield client


async def open_session(client: ClientProtocol, port: int, path: str = "/wt",
                       headers: list[tuple[bytes, bytes]] | None = None) -> Session:
    stream_id = client._quic.get_next_available_stream_id()
    client.h3.send_headers(stream_id, [
        (b":method", b"CONNECT"), (b":scheme", b"https"), (b":authority", f"127.0.0.1:{port}".encode()),
        (b":path", path.encode()), (b":protocol", b"webtransport"), *(headers or []),
    ])
    client.transmit()
    response = await client.wait_for(lambda: client.responses.get(stream_id))
    return Session(client, stream_id, int(response[b":status"]))


@pytest.fixture
def make_streaming() -> Callable[..., Streaming]:
    def make(config: dict[str, Any] | None = None, **kwargs: Any) -> Streaming:
        return Streaming(config or {}, **kwargs)

    return make


@pytest.fixture
async def server(make_streaming: Callable[..., Streaming]) -> AsyncIterator[RunningServer]:
    async with serve(make_streaming()) as running:
        yield running


async def until(predicate: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Poll server-side state (which no client event announces) until ``predicate`` holds."""
    async def poll() -> Any:
        while not (result := predicate()):
            await asyncio.sleep(0.02)
        return result

    return await asyncio.wait_for(poll(), timeout)


@asynccontextmanager
async def client_for_shutdown(streaming: Streaming) -> AsyncIterator[tuple[ClientProtocol, int, Callable[[], Any]]]:
    """A client of a server the test stops while the client stays connected."""
    stop = asyncio.Event()
    stopped = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def run_server() -> None:
        async with serve(streaming) as running:
            ready.set_result(running.port)
            await stop.wait()
        stopped.set()

    task = asyncio.ensure_future(run_server())
    port = await asyncio.wait_for(ready, 10)

    async def stop_server() -> None:
        stop.set()

    try:
        async with wt_client(port) as client:
            yield client, port, stop_server
            await asyncio.wait_for(stopped.wait(), 10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


class ClientKit:
    """What tests use to be a WebTransport client (conftest is not importable in importlib mode)."""

    client = staticmethod(wt_client)
    session = staticmethod(open_session)
    until = staticmethod(until)
    client_for_shutdown = staticmethod(client_for_shutdown)


@pytest.fixture
def wt() -> ClientKit:
    return ClientKit()
