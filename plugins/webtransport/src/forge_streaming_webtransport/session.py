"""A WebTransport session: the handler's API and a kernel Connection.

Handlers get streams and datagrams (``accept_bidirectional_stream``,
``open_unidirectional_stream``, ``send_datagram``, ...). The kernel gets
``accept``/``refuse``/``read_message``/``write_message``/``deliver``/``close``
over the *message stream*: the first client-opened bidirectional stream the
handler has not accepted itself (see ``framing`` for its framing), and runs
the session's life (``streaming.serve_connection``). ``deliver`` is the hot
path: it writes the shared, already framed bytes into the QUIC stream and
asks for one transmit per event-loop iteration, never awaiting.

The session hears from its QUIC connection through :meth:`handle_event`
(the small event objects of ``events``) and reaches it through the public
methods of :class:`~forge_streaming_webtransport.server.WebTransportProtocol`.

Bounds, per session: what the client has not acknowledged on the message
stream (``webtransport.send_buffer`` on top of one message, else ``slow
consumer``; the kernel's replays wait on :meth:`WebTransportSession.drained`),
and what the client sent that nobody has read yet: data on every stream,
complete messages, streams not accepted yet and datagrams count together
against ``webtransport.read_buffer`` (on top of one message), past which the
session is closed 1009 and dropped as ``too large``. A datagram that would
pass the bound is dropped instead (datagrams may be lost anyway).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from forge_streaming import (
    CloseCode,
    Connection,
    ConnectionClosed,
    ConnectionRequest,
    ConnectionState,
    Message,
    OutboundFrame,
    Streaming,
)

from .events import Datagram, SessionEnded, SessionEvent, StopSending, StreamData, StreamReset
from .framing import FramingError, MessageDecoder, close_capsule, encode_message
from .streams import StreamClosed, WebTransportStream

if TYPE_CHECKING:
    from .server import WebTransportProtocol

MAX_QUEUED_DATAGRAMS = 256
ITEM_COST = 64
"""What a queued message or datagram is counted as on top of its bytes (the objects that hold it)."""
STREAM_COST = 1024
"""What an incoming stream not accepted yet is counted as (its state here, in HTTP/3 and in QUIC)."""
DRAIN_POLL = 0.005
"""Seconds between looks at the unacknowledged bytes while a replay waits for the client (``drained``)."""
ACK_WAIT = 1.0
"""How long ``close`` waits for the client to acknowledge the message stream before closing."""

SLOW_CONSUMER = "slow consumer"
TOO_LARGE = "too large"
IDLE_TIMEOUT = "idle timeout"


def _wt_bytes(frame: OutboundFrame) -> bytes:
    return encode_message(frame.payload, frame.binary)


class WebTransportSession(Connection):
    """One WebTransport session (one extended CONNECT stream)."""

    transport = "webtransport"

    def __init__(self, request: ConnectionRequest, streaming: Streaming, *, protocol: WebTransportProtocol,
                 session_id: int, send_limit: int, read_limit: int, max_streams: int,
                 max_datagram_size: int, idle_timeout: float) -> None:
        super().__init__(request, streaming)
        self.session_id = session_id
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()
        self._send_limit = send_limit
        self._read_limit = read_limit
        self._max_streams = max_streams
        self.max_datagram_size = max_datagram_size
        self._idle_timeout = idle_timeout
        self._last_activity = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None

        self._streams: dict[int, WebTransportStream] = {}
        self._incoming_bidi: deque[WebTransportStream] = deque()
        self._incoming_uni: deque[WebTransportStream] = deque()
        self._datagrams: deque[bytes] = deque()
        self._message_stream: WebTransportStream | None = None
        self._messages: deque[str | bytes] = deque()
        self._queued = 0  # bytes (and ITEM_COST each) of the messages not read yet
        self._largest = 0  # the largest of them: one message is allowed on top of the read bound
        self._unread = 0  # bytes held for the client's streams, datagrams and streams not accepted yet
        self._allowance = 0  # the one message allowed on top of the send bound
        self._decoder = MessageDecoder(streaming.config.limits.max_message_size)
        self._changed = asyncio.Event()
        self._over = False
        """The session's I/O is over (closed by either side, refused, or its QUIC connection gone)."""
        self._close_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        """Set once the session has ended, whoever ended it."""

    # -- handler API: streams -----------------------------------------------------

    async def accept_bidirectional_stream(self) -> WebTransportStream:
        """The next bidirectional stream the client opens; ConnectionClosed once the session ends."""
        while not self._incoming_bidi:
            self._raise_if_ended()
            await self._wait_change()
        self._unread -= STREAM_COST
        return self._incoming_bidi.popleft()

    async def accept_unidirectional_stream(self) -> WebTransportStream:
        """The next unidirectional (client-to-server) stream; ConnectionClosed once the session ends."""
        while not self._incoming_uni:
            self._raise_if_ended()
            await self._wait_change()
        self._unread -= STREAM_COST
        return self._incoming_uni.popleft()

    async def open_bidirectional_stream(self) -> WebTransportStream:
        return self._open_stream(unidirectional=False)

    async def open_unidirectional_stream(self) -> WebTransportStream:
        return self._open_stream(unidirectional=True)

    def _open_stream(self, *, unidirectional: bool) -> WebTransportStream:
        self._raise_if_ended()
        if len(self._streams) >= self._max_streams:
            raise StreamClosed(f"session {self.id} has {len(self._streams)} open streams, the limit "
                               f"(webtransport.max_streams_per_session) is {self._max_streams}")
        stream_id = self._protocol.open_stream(self.session_id, unidirectional=unidirectional)
        stream = self._new_stream(stream_id, readable=not unidirectional, writable=True)
        self._streams[stream_id] = stream
        return stream

    def has_stream(self, stream_id: int) -> bool:
        """True if ``stream_id`` is one of this session's open streams."""
        return stream_id in self._streams

    # -- handler API: datagrams -----------------------------------------------------

    def send_datagram(self, data: bytes) -> None:
        """Send one unreliable datagram; ValueError past ``webtransport.max_datagram_size``."""
        if len(data) > self.max_datagram_size:
            raise ValueError(f"datagram of {len(data)} bytes is larger than webtransport.max_datagram_size "
                             f"({self.max_datagram_size} bytes)")
        self._raise_if_ended()
        self._protocol.send_datagram(self.session_id, data)

    async def receive_datagram(self) -> bytes:
        """The next datagram from the client; ConnectionClosed once the session ends."""
        while not self._datagrams:
            self._raise_if_ended()
            await self._wait_change()
        data = self._datagrams.popleft()
        self._unread -= len(data) + ITEM_COST
        return data

    async def wait_closed(self) -> None:
        """Return when the session has ended (peer went away, idle, closed, shutdown)."""
        await self.closed.wait()

    # -- kernel Connection: opening --------------------------------------------------

    async def accept(self) -> None:
        """Answer the CONNECT with 200 and start the idle timer (the kernel admitted the session)."""
        if self.is_ended:  # the client left, or broke the framing, while the kernel was deciding
            raise ConnectionClosed(self.close_code or CloseCode.ABNORMAL, self.close_reason)
        self._protocol.respond(self.session_id, 200, end_stream=False)
        self._protocol.session_accepted(self)
        if self._idle_timeout > 0:
            self._idle_timer = self._loop.call_later(self._idle_timeout, self._check_idle)
        self.log.debug("WebTransport session %s open at %s", self.id, self.request.path)

    async def refuse(self, status: int, code: str, reason: str) -> None:
        """Answer the CONNECT with ``status`` (and ``reason`` as a text body); the session never opens."""
        if self._over:  # the client gave up first: nobody to answer
            return
        self._end_io()
        self._protocol.respond(self.session_id, status, end_stream=True, body=f"{reason}\n".encode())

    # -- kernel Connection: messages ---------------------------------------------------

    async def read_message(self) -> Message:
        await self._claim_message_stream()
        while not self._messages:
            self._raise_if_ended()
            stream = self._message_stream
            if stream is not None and stream.receive_ended:
                raise ConnectionClosed(CloseCode.NORMAL, "message stream finished by the client")
            await self._wait_change()
        data = self._messages.popleft()
        self._queued -= len(data) + ITEM_COST
        if not self._messages:
            self._largest = 0
        self.touch()
        return Message(data)

    async def write_message(self, message: str | bytes) -> None:
        stream = await self._claim_message_stream()
        while self._protocol.unacked(stream.stream_id) > self._send_limit // 2:
            self._raise_if_ended()
            await asyncio.sleep(0.005)  # waits on the client's acknowledgements; not the hot path
        self._raise_if_ended()
        binary = isinstance(message, bytes)
        payload = message if isinstance(message, bytes) else message.encode("utf-8")
        self._write_message_bytes(encode_message(payload, binary))

    def deliver(self, frame: OutboundFrame) -> None:
        if self.state is not ConnectionState.OPEN or self._message_stream is None:
            return
        self._write_message_bytes(frame.encoded("wt", _wt_bytes))

    def _write_message_bytes(self, data: bytes) -> None:
        stream = self._message_stream
        assert stream is not None
        if stream.send_ended:  # the client stopped the stream; the session is being closed
            return
        unacked = self._protocol.write_counted(stream.stream_id, data)
        if unacked > self._send_limit:
            self._behind(unacked, len(data))
        elif self._allowance:
            self._allowance = 0

    def _behind(self, unacked: int, size: int) -> None:
        """Past the send bound: one message on top of it is allowed (the largest written since it fitted)."""
        if size > self._allowance:
            self._allowance = size
        if unacked > self._send_limit + self._allowance:
            self.log.info("session %s: %d bytes not acknowledged (limit %d on top of one message)",
                          self.id, unacked, self._send_limit)
            self._cut(CloseCode.POLICY_VIOLATION, SLOW_CONSUMER, SLOW_CONSUMER)

    async def drained(self, below: int) -> None:
        """Wait until the client has acknowledged all but ``below`` bytes (at most half the send bound)."""
        stream = self._message_stream
        if stream is None:
            return
        below = min(below, self._send_limit // 2)
        protocol = self._protocol
        while protocol.unacked(stream.stream_id) > below and not self.is_ended and not self._over:
            await asyncio.sleep(DRAIN_POLL)  # acknowledgements have no event of their own here

    async def _claim_message_stream(self) -> WebTransportStream:
        if self._message_stream is None:
            stream = await self.accept_bidirectional_stream()
            if self._message_stream is not None:  # another reader claimed one meanwhile
                self._incoming_bidi.appendleft(stream)
                self._unread += STREAM_COST
                return self._message_stream
            self._message_stream = stream
            stream.divert(self._message_data)
        return self._message_stream

    def _message_data(self, data: bytes, ended: bool) -> None:
        try:
            messages = self._decoder.feed(data)
        except FramingError as exc:
            self.log.info("session %s broke the message framing: %s", self.id, exc)
            why = TOO_LARGE if exc.close_code == CloseCode.MESSAGE_TOO_BIG else "protocol error"
            self._cut(exc.close_code, str(exc), why)
            return
        for message in messages:
            self._messages.append(message)
            size = len(message)
            self._queued += size + ITEM_COST
            if size > self._largest:
                self._largest = size
        if messages:
            self._check_unread()
        self._notify()

    def _taken(self, size: int) -> None:
        """A stream's reader (or the message decoder) took ``size`` buffered bytes."""
        self._unread -= size

    def _check_unread(self) -> None:
        """Close the session once what its client sent and nobody read passes the bound (on top of one message)."""
        unread = self._unread + self._queued
        if unread > self._read_limit + self._largest:
            self._overflowed(f"{unread} bytes unread ({self._queued} in messages, the rest in streams, streams "
                             f"not accepted yet and datagrams), webtransport.read_buffer is {self._read_limit}")

    # -- closing -------------------------------------------------------------------------

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Flush the message stream, tell the client ``code``/``reason``, and forget the session."""
        if self._close_task is None:
            if self._over:
                return
            self._close_task = self._protocol.spawn(self._close(int(code), reason))
        await asyncio.shield(self._close_task)

    def ended(self, code: int, reason: str) -> None:
        """Over for the kernel; if the session is still open on the wire, close it with that code."""
        first = not self.is_ended
        super().ended(code, reason)
        if first:
            self._close_soon(int(code), reason)

    async def _close(self, code: int, reason: str) -> None:
        if self.state is ConnectionState.OPEN:
            self.state = ConnectionState.CLOSING
        stream = self._message_stream
        protocol = self._protocol
        if stream is not None and not stream.send_ended and not protocol.terminated:
            stream.close()  # what was delivered goes out before the close capsule
            deadline = self._loop.time() + ACK_WAIT
            while protocol.unacked(stream.stream_id) and self._loop.time() < deadline and not self._over:
                await asyncio.sleep(0.01)
        if self._over:
            return
        if not protocol.terminated:
            try:
                protocol.end_session(self.session_id, close_capsule(code, reason))
            except Exception as exc:  # the CONNECT stream may be gone already
                self.log.debug("session %s: close capsule not sent: %r", self.id, exc)
        self._finish(code, reason)

    def _close_soon(self, code: int, reason: str) -> None:
        if self._close_task is None and not self._over:
            self._close_task = self._protocol.spawn(self._close(code, reason))

    def _cut(self, code: int, reason: str, why: str) -> None:
        """Drop the session for cause ``why`` (counted, hooked) and close it with ``code``/``reason``."""
        if self.is_ended:
            return
        self._close_soon(code, reason)  # first, so that the close the drop asks for carries ``reason``
        self.drop(why, code)

    def _overflowed(self, detail: str) -> None:
        if self.is_ended:
            return
        self.log.info("session %s: read buffer overflow: %s", self.id, detail)
        self._cut(CloseCode.MESSAGE_TOO_BIG, "read buffer overflow", TOO_LARGE)

    def _finish(self, code: int, reason: str) -> None:
        """The session's I/O is over: end its streams, forget it, and tell the kernel."""
        if self._over:
            return
        self._end_io()
        self.ended(code, reason)

    def _end_io(self) -> None:
        self._over = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        terminated = self._protocol.terminated
        for stream in list(self._streams.values()):
            if terminated or stream is self._message_stream:
                stream.end()
            else:
                stream.abandon()
        self._protocol.forget(self)
        self.closed.set()
        self._notify()

    # -- fed by the protocol --------------------------------------------------------------

    def handle_event(self, event: SessionEvent) -> None:
        """What the QUIC connection has for this session (see ``events``)."""
        if isinstance(event, StreamData):
            self._stream_data(event.stream_id, event.data, event.ended)
        elif isinstance(event, Datagram):
            self._datagram(event.data)
        elif isinstance(event, StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.peer_reset(event.error_code)
                self._notify()
        elif isinstance(event, StopSending):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.peer_stopped()
                if stream is self._message_stream:
                    self._close_soon(CloseCode.POLICY_VIOLATION, "message stream stopped by the client")
        elif isinstance(event, SessionEnded):
            self._finish(event.code, event.reason)

    def _check_idle(self) -> None:
        remaining = self._last_activity + self._idle_timeout - self._loop.time()
        if remaining > 0:
            self._idle_timer = self._loop.call_later(remaining, self._check_idle)
            return
        self._idle_timer = None
        if self.state is ConnectionState.OPEN:
            self._cut(CloseCode.GOING_AWAY, IDLE_TIMEOUT, IDLE_TIMEOUT)

    def _stream_data(self, stream_id: int, data: bytes, ended: bool) -> None:
        self._last_activity = self._loop.time()
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._over or stream_id & 1:  # server-initiated but forgotten: ignore
                return
            unidirectional = bool(stream_id & 2)
            stream = self._new_stream(stream_id, readable=True, writable=not unidirectional)
            if len(self._streams) >= self._max_streams:
                self.log.info("session %s: stream %d refused, webtransport.max_streams_per_session is %d",
                              self.id, stream_id, self._max_streams)
                stream.abandon()
                return
            self._streams[stream_id] = stream
            (self._incoming_uni if unidirectional else self._incoming_bidi).append(stream)
            self._unread += STREAM_COST
            self._notify()
        before = stream.buffered
        stream.receive(data, ended)
        self._unread += stream.buffered - before
        self._check_unread()

    def _datagram(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        cost = len(data) + ITEM_COST
        if (len(data) > self.max_datagram_size or len(self._datagrams) >= MAX_QUEUED_DATAGRAMS
                or self._unread + self._queued + cost > self._read_limit):
            self.streaming.count("webtransport.datagrams_dropped")
            return
        self._datagrams.append(data)
        self._unread += cost
        self._notify()

    # -- plumbing ---------------------------------------------------------------------------

    def _new_stream(self, stream_id: int, *, readable: bool, writable: bool) -> WebTransportStream:
        return WebTransportStream(self, stream_id, readable=readable, writable=writable, wire=self._protocol,
                                  on_finished=self._stream_finished, on_taken=self._taken)

    def _stream_finished(self, stream: WebTransportStream) -> None:
        """Both sides of ``stream`` are over: forget it, and the HTTP/3 state aioquic keeps for it."""
        if stream is self._message_stream or self._streams.get(stream.stream_id) is not stream:
            return
        del self._streams[stream.stream_id]
        self._protocol.release_stream(stream.stream_id)

    def _notify(self) -> None:
        self._changed.set()

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    def _raise_if_ended(self) -> None:
        if self.is_ended or self._over:
            raise ConnectionClosed(self.close_code or CloseCode.ABNORMAL, self.close_reason)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "session_id": self.session_id, "streams": len(self._streams)}
