"""One WebTransport stream as a handler sees it: read, write, close."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from forge_streaming import StreamingError

if TYPE_CHECKING:
    from .session import WebTransportSession

STREAM_REJECTED = 0x3994BD84
"""WEBTRANSPORT_BUFFERED_STREAM_REJECTED: the code a refused or abandoned stream is reset with."""


class StreamClosed(StreamingError):
    """Writing to a stream whose sending side has ended (closed, reset, or its session ended)."""


class WebTransportStream:
    """A bidirectional or unidirectional stream of one session.

    ``read()`` returns the next chunk the peer sent, in order, and ``b""``
    once the peer finished (or reset) the stream or the session ended.
    ``write()`` never waits: QUIC flow control and congestion control pace
    the bytes; ``close()`` finishes the sending side (FIN).
    """

    def __init__(self, session: WebTransportSession, stream_id: int, *, readable: bool, writable: bool) -> None:
        self.session = session
        self.stream_id = stream_id
        self.readable = readable
        self.writable = writable
        self.receive_ended = not readable
        self.send_ended = not writable
        self.reset_code: int | None = None
        """The error code if the peer reset the stream."""
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._sink: Callable[[bytes, bool], None] | None = None

    def __repr__(self) -> str:
        return f"<WebTransportStream {self.stream_id} of {self.session.id}>"

    @property
    def is_unidirectional(self) -> bool:
        return bool(self.stream_id & 2)

    async def read(self) -> bytes:
        """The next chunk of data, or ``b""`` at the end of the stream."""
        if not self.readable:
            raise StreamClosed(f"stream {self.stream_id} is send-only")
        while not self._chunks:
            if self.receive_ended or self.session._finished:
                return b""
            await self.session._wait_change()
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    async def read_all(self) -> bytes:
        """Everything until the peer finishes the stream."""
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    def write(self, data: bytes, *, end_stream: bool = False) -> None:
        """Queue ``data`` on the stream (and finish it with ``end_stream``)."""
        if self.send_ended or not self.session.is_open:
            raise StreamClosed(f"stream {self.stream_id} of session {self.session.id} can no longer send")
        self.session._send_stream(self.stream_id, data, end_stream)
        if end_stream:
            self.send_ended = True
            self.session._release(self)

    def close(self) -> None:
        """Finish the sending side; the peer reads the end of the stream."""
        if not self.send_ended and self.session.is_open:
            self.write(b"", end_stream=True)

    # -- fed by the session ---------------------------------------------------

    def _feed(self, data: bytes, ended: bool) -> None:
        if self._sink is not None:
            self._sink(data, ended)
        elif data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > self.session._read_limit:
                self.session._overflowed(f"stream {self.stream_id} holds {self._buffered} unread bytes")
        if ended:
            self.receive_ended = True
        self.session._notify()

    def _take_buffered(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data
