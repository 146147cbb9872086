"""A WebTransport session: the handler's API and a kernel Connection.

Handlers get streams and datagrams (``accept_bidirectional_stream``,
``open_unidirectional_stream``, ``send_datagram``, ...). The kernel gets
``read_message``/``write_message``/``deliver`` over the *message stream*:
the first client-opened bidirectional stream the handler has not accepted
itself (see ``framing`` for its framing). ``deliver`` is the hot path: it
writes the shared, already framed bytes into the QUIC stream and asks for
one transmit per event-loop iteration, never awaiting.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from aioquic.h3.connection import FrameType
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

from .framing import FramingError, MessageDecoder, close_capsule, encode_message
from .streams import STREAM_REJECTED, StreamClosed, WebTransportStream

if TYPE_CHECKING:
    from .server import WebTransportProtocol

MAX_QUEUED_DATAGRAMS = 256
ACK_WAIT = 1.0
"""How long ``close`` waits for the client to acknowledge the message stream before closing."""


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
        self._quic = protocol._quic
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
        self._queued = 0
        self._decoder = MessageDecoder(streaming.config.limits.max_message_size)
        self._changed = asyncio.Event()
        self._finished = False
        self._finish_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        """Set once the session has ended, whoever ended it."""

    # -- handler API: streams -----------------------------------------------------

    async def accept_bidirectional_stream(self) -> WebTransportStream:
        """The next bidirectional stream the client opens; ConnectionClosed once the session ends."""
        while not self._incoming_bidi:
            self._raise_if_finished()
            await self._wait_change()
        return self._incoming_bidi.popleft()

    async def accept_unidirectional_stream(self) -> WebTransportStream:
        """The next unidirectional (client-to-server) stream; ConnectionClosed once the session ends."""
        while not self._incoming_uni:
            self._raise_if_finished()
            await self._wait_change()
        return self._incoming_uni.popleft()

    async def open_bidirectional_stream(self) -> WebTransportStream:
        return self._open_stream(unidirectional=False)

    async def open_unidirectional_stream(self) -> WebTransportStream:
        return self._open_stream(unidirectional=True)

    def _open_stream(self, *, unidirectional: bool) -> WebTransportStream:
        self._raise_if_finished()
        if len(self._streams) >= self._max_streams:
            raise StreamClosed(f"session {self.id} has {len(self._streams)} open streams, the limit "
                               f"(webtransport.max_streams_per_session) is {self._max_streams}")
        h3 = self._protocol.h3
        assert h3 is not None
        stream_id = h3.create_webtransport_stream(self.session_id, is_unidirectional=unidirectional)
        if not unidirectional:
            # aioquic parses replies on a bidirectional stream it opened as HTTP frames
            # unless told it carries WebTransport data for this session
            with h3._get_or_create_stream(stream_id) as h3_stream:
                h3_stream.frame_type = FrameType.WEBTRANSPORT_STREAM
                h3_stream.session_id = self.session_id
        stream = WebTransportStream(self, stream_id, readable=not unidirectional, writable=True)
        self._streams[stream_id] = stream
        self._protocol.schedule_transmit()
        return stream

    # -- handler API: datagrams -----------------------------------------------------

    def send_datagram(self, data: bytes) -> None:
        """Send one unreliable datagram; ValueError past ``webtransport.max_datagram_size``."""
        if len(data) > self.max_datagram_size:
            raise ValueError(f"datagram of {len(data)} bytes is larger than webtransport.max_datagram_size "
                             f"({self.max_datagram_size} bytes)")
        self._raise_if_finished()
        h3 = self._protocol.h3
        assert h3 is not None
        h3.send_datagram(self.session_id, data)
        self._protocol.schedule_transmit()

    async def receive_datagram(self) -> bytes:
        """The next datagram from the client; ConnectionClosed once the session ends."""
        while not self._datagrams:
            self._raise_if_finished()
            await self._wait_change()
        return self._datagrams.popleft()

    async def wait_closed(self) -> None:
        """Return when the session has ended (peer went away, idle, closed, shutdown)."""
        await self.closed.wait()

    # -- kernel Connection -------------------------------------------------------------

    async def read_message(self) -> Message:
        await self._claim_message_stream()
        while not self._messages:
            self._raise_if_finished()
            stream = self._message_stream
            if stream is not None and stream.receive_ended:
                raise ConnectionClosed(CloseCode.NORMAL, "message stream finished by the client")
            await self._wait_change()
        data = self._messages.popleft()
        self._queued -= len(data)
        self.touch()
        return Message(data)

    async def write_message(self, message: str | bytes) -> None:
        stream = await self._claim_message_stream()
        while self._unacked(stream.stream_id) > self._send_limit // 2:
            self._raise_if_finished()
            await asyncio.sleep(0.005)  # waits on the client's acknowledgements; not the hot path
        self._raise_if_finished()
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
        stream_id = stream.stream_id
        self._quic.send_stream_data(stream_id, data)
        self._protocol.schedule_transmit()
        if self._unacked(stream_id) > self._send_limit:
            self.streaming.dropped(self, "slow consumer")
            self._close_soon(CloseCode.POLICY_VIOLATION, "slow consumer")

    def _unacked(self, stream_id: int) -> int:
        """Bytes written to the stream the client has not acknowledged yet (aioquic keeps them)."""
        stream = self._quic._streams.get(stream_id)
        return len(stream.sender._buffer) if stream is not None else 0

    async def _claim_message_stream(self) -> WebTransportStream:
        if self._message_stream is None:
            stream = await self.accept_bidirectional_stream()
            if self._message_stream is not None:  # another reader claimed one meanwhile
                self._incoming_bidi.appendleft(stream)
                return self._message_stream
            self._message_stream = stream
            stream._sink = self._message_data
            early = stream._take_buffered()
            if early or stream.receive_ended:
                self._message_data(early, stream.receive_ended)
        return self._message_stream

    def _message_data(self, data: bytes, ended: bool) -> None:
        try:
            messages = self._decoder.feed(data)
        except FramingError as exc:
            self.log.info("session %s broke the message framing: %s", self.id, exc)
            self.streaming.dropped(self, "too large" if exc.close_code == CloseCode.MESSAGE_TOO_BIG
                                   else "protocol error")
            self._close_soon(exc.close_code, str(exc))
            return
        for message in messages:
            self._messages.append(message)
            self._queued += len(message)
        if self._queued > self._read_limit:
            self._overflowed(f"{self._queued} bytes of messages not yet read")

    # -- closing -------------------------------------------------------------------------

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Flush the message stream, tell the client ``code``/``reason``, and forget the session."""
        if self._finished:
            if self._finish_task is not None:
                await asyncio.shield(self._finish_task)
            return
        self.state = ConnectionState.CLOSING
        stream = self._message_stream
        if stream is not None and not stream.send_ended and not self._protocol.terminated:
            stream.send_ended = True
            self._quic.send_stream_data(stream.stream_id, b"", end_stream=True)
            self._protocol.schedule_transmit()
            deadline = self._loop.time() + ACK_WAIT
            while self._unacked(stream.stream_id) and self._loop.time() < deadline and not self._finished:
                await asyncio.sleep(0.01)
        if self._finished:
            return
        if not self._protocol.terminated:
            h3 = self._protocol.h3
            try:
                if h3 is not None:
                    h3.send_data(self.session_id, close_capsule(int(code), reason), end_stream=True)
            except Exception as exc:  # the CONNECT stream may be gone already
                self.log.debug("session %s: close capsule not sent: %r", self.id, exc)
            self._protocol.schedule_transmit()
        self._start_finish(int(code), reason)
        await asyncio.shield(self._finish_task)  # type: ignore[arg-type]

    def _close_soon(self, code: int, reason: str) -> None:
        if not self._finished and self.state is not ConnectionState.CLOSING:
            self.state = ConnectionState.CLOSING
            self._protocol.server.spawn(self.close(code, reason))

    def _overflowed(self, detail: str) -> None:
        self.log.info("session %s: read buffer overflow: %s", self.id, detail)
        self.streaming.dropped(self, "too large")
        self._close_soon(CloseCode.MESSAGE_TOO_BIG, "read buffer overflow")

    def _peer_closed(self, code: int, reason: str) -> None:
        """The client closed the session, or the QUIC connection went away."""
        self._start_finish(code, reason)

    def _start_finish(self, code: int, reason: str) -> None:
        if self._finished:
            return
        self._finished = True
        self.close_code, self.close_reason = code, reason
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if not self._protocol.terminated:
            for stream in list(self._streams.values()):
                if stream is not self._message_stream:
                    self._abandon(stream)
        self._protocol.forget(self)
        self.closed.set()
        self._notify()
        self._finish_task = self._protocol.server.spawn(self.streaming.closed(self, code, reason))

    def _abandon(self, stream: WebTransportStream) -> None:
        quic = self._quic
        try:
            if not stream.send_ended:
                quic.reset_stream(stream.stream_id, STREAM_REJECTED)
            if not stream.receive_ended:
                quic.stop_stream(stream.stream_id, STREAM_REJECTED)
        except Exception:  # stream state already discarded by aioquic
            pass
        stream.send_ended = stream.receive_ended = True
        self._protocol.schedule_transmit()

    # -- fed by the protocol --------------------------------------------------------------

    def start_idle_timer(self) -> None:
        if self._idle_timeout > 0:
            self._idle_timer = self._loop.call_later(self._idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        remaining = self._last_activity + self._idle_timeout - self._loop.time()
        if remaining > 0:
            self._idle_timer = self._loop.call_later(remaining, self._check_idle)
            return
        self._idle_timer = None
        if self.state is ConnectionState.OPEN:
            self.streaming.dropped(self, "idle timeout")
            self._close_soon(CloseCode.GOING_AWAY, "idle timeout")

    def _stream_data(self, stream_id: int, data: bytes, ended: bool) -> None:
        self._last_activity = self._loop.time()
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._finished or stream_id & 1:  # server-initiated but forgotten: ignore
                return
            unidirectional = bool(stream_id & 2)
            if len(self._streams) >= self._max_streams:
                self.log.info("session %s: stream %d refused, webtransport.max_streams_per_session is %d",
                              self.id, stream_id, self._max_streams)
                self._abandon(WebTransportStream(self, stream_id, readable=True, writable=not unidirectional))
                return
            stream = WebTransportStream(self, stream_id, readable=True, writable=not unidirectional)
            self._streams[stream_id] = stream
            (self._incoming_uni if unidirectional else self._incoming_bidi).append(stream)
        stream._feed(data, ended)
        if ended:
            self._release(stream)

    def _stream_reset(self, stream_id: int, error_code: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.reset_code = error_code
            stream.receive_ended = True
            self._release(stream)
            self._notify()

    def _stop_sending(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.send_ended = True  # aioquic has reset our side already
            self._forget_if_done(stream)
            if stream is self._message_stream:
                self._close_soon(CloseCode.POLICY_VIOLATION, "message stream stopped by the client")

    def _datagram(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        if len(data) > self.max_datagram_size or len(self._datagrams) >= MAX_QUEUED_DATAGRAMS:
            self.streaming.counters["webtransport.datagrams_dropped"] += 1
            return
        self._datagrams.append(data)
        self._notify()

    # -- plumbing ---------------------------------------------------------------------------

    def _send_stream(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self._quic.send_stream_data(stream_id, data, end_stream)
        self._protocol.schedule_transmit()

    def _release(self, stream: WebTransportStream) -> None:
        """The peer will send nothing more on ``stream``: aioquic's HTTP/3 state for it can go."""
        self._forget_if_done(stream)
        h3 = self._protocol.h3
        if h3 is not None and stream.stream_id not in self._streams and stream is not self._message_stream:
            h3._stream.pop(stream.stream_id, None)  # aioquic never frees WebTransport streams itself

    def _forget_if_done(self, stream: WebTransportStream) -> None:
        if stream.receive_ended and stream.send_ended and stream is not self._message_stream:
            self._streams.pop(stream.stream_id, None)

    def _notify(self) -> None:
        self._changed.set()

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    def _raise_if_finished(self) -> None:
        if self._finished:
            raise ConnectionClosed(self.close_code or CloseCode.ABNORMAL, self.close_reason)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "session_id": self.session_id, "streams": len(self._streams)}
