"""A cheap WebSocket client: asyncio Protocol, handshake by hand, header-only parsing.

The load generator must cost less per message than the server it measures,
so nothing here builds a frame object per message: server frames are
unmasked, so walking a chunk is reading 2-10 byte headers. While a member
counts a burst, the message numbers ``"n":`` of every complete frame in a
chunk are read by one regex scan (lost and out-of-order counts), and the
send times ``"t":`` only on sampled members (latency). Client frames are
masked with the all-zero key, which RFC 6455 allows and which makes
masking a no-op.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_ZERO_MASK = b"\x00\x00\x00\x00"
_T_KEY = b'"t":'
_USER_KEY = b'"user_id":"'
_N_RE = re.compile(rb'"n":(\d+)')
_T_RE = re.compile(rb'"t":([0-9.]+)')


def client_frame(text: str | bytes, opcode: int = 1) -> bytes:
    """One masked client frame (mask key 0, so the payload goes as is)."""
    payload = text.encode() if isinstance(text, str) else text
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return header + _ZERO_MASK + payload


def _read_number(data: bytes, key: bytes, start: int, end: int) -> bytes | None:
    i = data.find(key, start, end)
    if i < 0:
        return None
    i += len(key)
    j = i
    while j < end and data[j] not in b",}]":
        j += 1
    return data[i:j]


class Dialect:
    """How one kind of server is spoken to: path, join frame, message frame.

    The default is the room protocol (ours, and the minimal peers, which
    speak the same join/message frames and broadcast the text unchanged).
    """

    name = "room"
    has_control = False

    def path(self) -> str:
        return "/ws"

    def on_open(self, conn: WsConn) -> bool:
        """Called after the HTTP upgrade; True when the connection is usable now."""
        return True

    def control(self, conn: WsConn, data: bytes, start: int, end: int) -> bool:
        """Handle a transport-level message; True if it was one (not for counting)."""
        return False

    def join(self, room: str) -> bytes:
        return client_frame(f'{{"type":"join","room_id":"{room}"}}')

    def message(self, room: str, data_json: str) -> bytes:
        return client_frame(f'{{"type":"message","room_id":"{room}","data":{data_json}}}')

    def is_joined(self, data: bytes, start: int, end: int) -> bool:
        return data.find(b"room.joined", start, end) >= 0


class SocketIODialect(Dialect):
    """Socket.IO v5 over Engine.IO v4, WebSocket transport only, default namespace."""

    name = "socketio"
    has_control = True

    def path(self) -> str:
        return "/socket.io/?EIO=4&transport=websocket"

    def on_open(self, conn: WsConn) -> bool:
        return False  # ready once the namespace CONNECT is acknowledged ("40{...}")

    def control(self, conn: WsConn, data: bytes, start: int, end: int) -> bool:
        first = data[start:start + 2]
        if first == b"2" or (end - start == 1 and data[start] == 0x32):  # Engine.IO ping
            conn.send(client_frame("3"))
            return True
        if first[:1] == b"0":  # Engine.IO open: connect to the default namespace
            conn.send(client_frame("40"))
            return True
        if first == b"40":
            conn.mark_open()
            return True
        return False

    def join(self, room: str) -> bytes:
        return client_frame(f'42["join","{room}"]')

    def message(self, room: str, data_json: str) -> bytes:
        return client_frame(f'42["message",{{"room_id":"{room}","data":{data_json}}}]')

    def is_joined(self, data: bytes, start: int, end: int) -> bool:
        return data.find(b'"joined"', start, end) >= 0


DIALECTS: dict[str, type[Dialect]] = {"room": Dialect, "socketio": SocketIODialect}


@dataclass(slots=True)
class Stats:
    """Counters shared by every connection of one load-generator run."""

    received: int = 0
    frames: int = 0
    """Chunks received (any connection): the quiesce step waits for this to stop moving."""
    out_of_order: int = 0
    last_receive: float = 0.0
    latencies: dict[int, list[float]] = field(default_factory=dict)
    """Sampled latencies by member group (the target server the member is connected to)."""
    joined: int = 0


class WsConn(asyncio.Protocol):
    """One client connection. ``on_message`` is set per role by the load generator."""

    def __init__(self, handshake: bytes, dialect: Dialect, stats: Stats, *, sample: bool = False) -> None:
        self.handshake = handshake
        self.dialect = dialect
        self.stats = stats
        self.sample = sample
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.joined: asyncio.Future[None] | None = None
        self.closed = False
        self.count = 0
        self.ident = ""
        self.resynced = False
        """A ``resync`` frame came while counting (the server says messages may be missing)."""
        """The server's name for this connection, from its join acknowledgement (``user_id`` of an anonymous one)."""
        self.last_n = -1
        self.group = 0
        self.counting = False
        """Member role during a burst: frames are counted by one regex scan per received chunk."""
        self.on_message: Callable[[WsConn, bytes, int, int, float], None] | None = None

    # -- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.handshake)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.stats.frames += 1  # per chunk: enough to tell when traffic has stopped
        if self.buf:
            data = self.buf + data
            self.buf = b""
        pos = 0
        if not self.upgraded:
            i = data.find(b"\r\n\r\n")
            if i < 0:
                self.buf = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                status = data[:data.find(b"\r\n")].decode(errors="replace")
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(f"upgrade refused: {status}"))
                self.transport.close()  # type: ignore[union-attr]
                return
            self.upgraded = True
            pos = i + 4
            if self.dialect.on_open(self):
                self.mark_open()
        now = time.monotonic()
        size = len(data)
        first = pos
        counting = self.counting
        has_control = self.dialect.has_control
        while size - pos >= 2:
            length = data[pos + 1] & 0x7F
            if length < 126:
                head = 2
            elif length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                head = 4
            else:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                head = 10
            end = pos + head + length
            if end > size:
                break
            opcode = data[pos] & 0x0F
            start = pos + head
            pos = end
            if opcode == 1 or opcode == 2:
                if has_control and self.dialect.control(self, data, start, end):
                    continue
                if counting:
                    continue  # counted below, in one scan of the whole region
                if self.joined is not None and not self.joined.done():
                    if self.dialect.is_joined(data, start, end):
                        self.ident = _read_string(data, _USER_KEY, start, end)
                        self.joined.set_result(None)
                    continue
                if self.on_message is not None:
                    self.on_message(self, data, start, end, now)
            elif opcode == 9:
                self.send(client_frame(data[start:end], opcode=10))
            elif opcode == 8:
                self.transport.close()  # type: ignore[union-attr]
        if counting and pos > first:
            count_region(self, data, first, pos, now)
        if pos < size:
            self.buf = data[pos:]

    # -- helpers --------------------------------------------------------------

    def mark_open(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def send(self, frame: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(frame)

    def join(self, room: str) -> asyncio.Future[None]:
        self.joined = asyncio.get_running_loop().create_future()
        self.send(self.dialect.join(room))
        return self.joined

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def count_region(conn: Any, data: bytes, start: int, end: int, now: float) -> None:
    """Member role: count the bench messages in ``data[start:end]``, check order, sample latency.

    One C-level regex scan per received chunk instead of Python work per
    frame keeps the client's cost per delivery below the servers'. Frames
    without ``"n":`` (presence, system notices) are not counted.
    """
    found = _N_RE.findall(data, start, end)
    if not found:
        if data.find(b'"resync"', start, end) >= 0:  # told it may have missed messages: not a delivery
            conn.resynced = True
        return
    numbers = list(map(int, found))
    stats = conn.stats
    if numbers[0] <= conn.last_n or numbers != sorted(set(numbers)):
        stats.out_of_order += _disorder(conn.last_n, numbers)
    conn.last_n = numbers[-1]
    conn.count += len(numbers)
    stats.received += len(numbers)
    stats.last_receive = now
    if conn.sample:
        group = stats.latencies.setdefault(conn.group, [])
        group.extend(now - float(t) for t in _T_RE.findall(data, start, end))


def _disorder(last: int, numbers: list[int]) -> int:
    """How many numbers are not above their predecessor (duplicates and reorderings)."""
    bad = 0
    for n in numbers:
        if n <= last:
            bad += 1
        last = n
    return bad


def _read_string(data: bytes, key: bytes, start: int, end: int) -> str:
    """The first JSON string value after ``key`` in ``data[start:end]``, or "" (no escapes expected: ids)."""
    i = data.find(key, start, end)
    if i < 0:
        return ""
    i += len(key)
    j = data.find(b'"', i, end)
    return data[i:j].decode(errors="replace") if j >= 0 else ""


def read_t(data: bytes, start: int, end: int) -> float | None:
    raw = _read_number(data, _T_KEY, start, end)
    return float(raw) if raw is not None else None


def handshake_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://{host}:{port}\r\n\r\n"
    ).encode()


async def connect(host: str, port: int, dialect: Dialect, stats: Stats, *, sample: bool = False,
                  source: str | None = None, timeout: float = 10.0) -> WsConn:
    """Open one connection and wait for the upgrade (and the dialect's own handshake)."""
    loop = asyncio.get_running_loop()
    handshake = handshake_request(host, port, dialect.path())
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: WsConn(handshake, dialect, stats, sample=sample), host, port,
                               local_addr=(source, 0) if source else None),
        timeout)
    try:
        await asyncio.wait_for(asyncio.shield(conn.ready), timeout)
    except BaseException:
        conn.close()
        raise
    return conn
