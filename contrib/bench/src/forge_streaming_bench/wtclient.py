"""WebTransport members on aioquic: one QUIC connection, one session, one message stream each.

Unlike the WebSocket and SSE clients this one cannot be made cheap: aioquic
is a QUIC and TLS stack in pure Python, so every packet received, every ACK
sent and every stream frame costs the client about what it costs the
server. That is the limit of the WebTransport figures: the client's CPU per
delivery is reported beside the server's, and N stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import struct
import time
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection
from aioquic.h3.events import HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent

from .wsclient import Stats, count_region

_HEADER = struct.Struct(">BI")


class WtMember(QuicConnectionProtocol):
    """A room member over WebTransport; counts bench messages like the other clients."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        loop = asyncio.get_running_loop()
        self.accepted: asyncio.Future[int] = loop.create_future()
        self.joined: asyncio.Future[None] = loop.create_future()
        self.session_id = -1
        self.stream_id = -1
        self.buf = b""
        self.stats: Stats = Stats()
        self.sample = False
        self.counting = False
        self.count = 0
        self.last_n = -1
        self.group = 0
        self.closed = False

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived) and h3_event.stream_id == self.session_id:
                if not self.accepted.done():
                    self.accepted.set_result(int(dict(h3_event.headers).get(b":status", b"0")))
            elif isinstance(h3_event, WebTransportStreamDataReceived) and h3_event.stream_id == self.stream_id:
                self._data(h3_event.data)

    def _data(self, data: bytes) -> None:
        self.stats.frames += 1
        buf = self.buf + data if self.buf else data
        pos, size = 0, len(buf)
        while size - pos >= 5:
            _, length = _HEADER.unpack_from(buf, pos)
            if size - pos - 5 < length:
                break
            if not self.joined.done() and buf.find(b"room.joined", pos + 5, pos + 5 + length) >= 0:
                self.joined.set_result(None)
            pos += 5 + length
        if self.counting and pos:
            count_region(self, buf, 0, pos, time.monotonic())
        self.buf = buf[pos:]

    def open_session(self, port: int, path: str = "/wt") -> None:
        self.session_id = self._quic.get_next_available_stream_id()
        self.h3.send_headers(self.session_id, [
            (b":method", b"CONNECT"), (b":scheme", b"https"), (b":authority", f"127.0.0.1:{port}".encode()),
            (b":path", path.encode()), (b":protocol", b"webtransport")])
        self.transmit()

    def join(self, room: str) -> None:
        self.stream_id = self.h3.create_webtransport_stream(self.session_id, is_unidirectional=False)
        with self.h3._get_or_create_stream(self.stream_id) as h3_stream:  # read replies as WebTransport data
            h3_stream.frame_type = FrameType.WEBTRANSPORT_STREAM
            h3_stream.session_id = self.session_id
        payload = json.dumps({"type": "join", "room_id": room}).encode()
        self._quic.send_stream_data(self.stream_id, _HEADER.pack(1, len(payload)) + payload)
        self.transmit()


async def open_members(stack: contextlib.AsyncExitStack, port: int, count: int, room: str, stats: Stats, *,
                       sample_every: int, timeout: float = 20.0, concurrency: int = 20) -> list[WtMember]:
    """Open ``count`` sessions at /wt and join ``room`` on each; failures are left out."""
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE,
                                      max_datagram_frame_size=65536, server_name="localhost")
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> WtMember | None:
        async with sem:
            try:
                member: WtMember = await asyncio.wait_for(stack.enter_async_context(
                    connect("127.0.0.1", port, configuration=configuration, create_protocol=WtMember,
                            wait_connected=True)), timeout)  # type: ignore[arg-type]
                member.stats, member.sample = stats, bool(sample_every) and i % sample_every == 0
                member.open_session(port)
                if await asyncio.wait_for(member.accepted, timeout) != 200:
                    return None
                member.join(room)
                await asyncio.wait_for(member.joined, timeout)
                return member
            except (TimeoutError, OSError, ConnectionError):
                return None

    members = await asyncio.gather(*(one(i) for i in range(count)))
    return [m for m in members if m is not None]
