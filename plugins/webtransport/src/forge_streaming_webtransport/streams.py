"""One WebTransport stream as a handler sees it: read, write, close.

A stream sends through its *wire* (the QUIC connection it lives on, see
:class:`StreamWire`) and tells its session through one callback when both
of its sides are over; its session feeds it what arrives (``receive``,
``peer_reset``, ``peer_stopped``) and ends it with the session
(``abandon``, ``end``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from forge_streaming import StreamingError

if TYPE_CHECKING:
    from .session import WebTransportSession

STREAM_REJECTED = 0x3994BD84
"""WEBTRANSPORT_BUFFERED_STREAM_REJECTED: the code a refused or abandoned stream is reset with."""


class StreamClosed(StreamingError):
    """Writing to a stream whose sending side has ended (closed, reset, or its session ended)."""


class StreamWire(Protocol):
    """How a stream reaches the network: the QUIC connection's side (``WebTransportProtocol``)."""

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...

    def abort_stream(self, stream_id: int, *, reset_sending: bool, stop_receiving: bool) -> None: ...


class WebTransportStream:
    """A bidirectional or unidirectional stream of one session.

    ``read()`` returns the next chunk the peer sent, in order, and ``b""``
    once the peer finished (or reset) the stream or the session ended.
    ``write()`` never waits: QUIC flow control and congestion control pace
    the bytes; ``close()`` finishes the sending side (FIN).
    """

    def __init__(self, session: WebTransportSession, stream_id: int, *, readable: bool, writable: bool,
                 wire: StreamWire, on_finished: Callable[[WebTransportStream], None],
                 on_taken: Callable[[int], None] | None = None) -> None:
        """``on_finished(stream)`` is called once both sides are over (the session then forgets the stream);
        ``on_taken(n)`` when ``n`` buffered bytes leave the stream (read, or handed to a sink), so that the
        session can bound what its streams hold unread."""
        self.session = session
        self.stream_id = stream_id
        self.readable = readable
        self.writable = writable
        self.receive_ended = not readable
        self.send_ended = not writable
        self.reset_code: int | None = None
        """The error code if the peer reset the stream."""
        self._wire = wire
        self._on_finished = on_finished
        self._on_taken = on_taken
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._sink: Callable[[bytes, bool], None] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<WebTransportStream {self.stream_id} of {self.session.id}>"

    @property
    def is_unidirectional(self) -> bool:
        return bool(self.stream_id & 2)

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return self._buffered

    @property
    def finished(self) -> bool:
        """Both sides are over: nothing more will be sent or received."""
        return self.receive_ended and self.send_ended

    # -- handler API ------------------------------------------------------------

    async def read(self) -> bytes:
        """The next chunk of data, or ``b""`` at the end of the stream."""
        if not self.readable:
            raise StreamClosed(f"stream {self.stream_id} is send-only")
        while not self._chunks:
            if self.receive_ended:
                return b""
            waiter = self._waiter
            if waiter is None:
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)  # shared by every reader; one cancelled reader leaves it to the others
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._taken()
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
        self._wire.send_stream_data(self.stream_id, data, end_stream)
        if end_stream:
            self._sending_over()

    def close(self) -> None:
        """Finish the sending side; the peer reads the end of the stream."""
        if not self.send_ended:
            self._wire.send_stream_data(self.stream_id, b"", True)
            self._sending_over()

    # -- fed by the session -------------------------------------------------------

    def divert(self, sink: Callable[[bytes, bool], None]) -> None:
        """Hand everything received, from now on, to ``sink(data, ended)`` instead of ``read()``.

        What arrived before is handed over at once. The session does this
        with its message stream, whose bytes it decodes itself.
        """
        self._sink = sink
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._taken()
        if data or self.receive_ended:
            sink(data, self.receive_ended)

    def receive(self, data: bytes, ended: bool) -> None:
        """Data from the peer; ``ended``: the peer finished its side."""
        if self._sink is not None:
            self._sink(data, ended)
        elif data:
            self._chunks.append(data)
            self._buffered += len(data)
        if ended:
            self._receiving_over()
        else:
            self._wake()

    def peer_reset(self, error_code: int) -> None:
        """The peer abandoned its sending side with ``error_code``."""
        self.reset_code = error_code
        self._receiving_over()

    def peer_stopped(self) -> None:
        """The peer asked us to stop sending (aioquic has reset our sending side already)."""
        if not self.send_ended:
            self._sending_over()

    def abandon(self) -> None:
        """The session is over and its QUIC connection lives on: reset and stop what is still open."""
        if not self.finished:
            self._wire.abort_stream(self.stream_id, reset_sending=not self.send_ended,
                                    stop_receiving=not self.receive_ended)
        self.end()

    def end(self) -> None:
        """The session is over: nothing more is sent or received; a waiting ``read()`` returns ``b""``."""
        self.send_ended = self.receive_ended = True
        self._wake()

    # -- plumbing ---------------------------------------------------------------------

    def _taken(self) -> None:
        taken, self._buffered = self._buffered, 0
        if taken and self._on_taken is not None:
            self._on_taken(taken)

    def _receiving_over(self) -> None:
        self.receive_ended = True
        self._wake()
        if self.send_ended:
            self._on_finished(self)

    def _sending_over(self) -> None:
        self.send_ended = True
        if self.receive_ended:
            self._on_finished(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set_result(None)
