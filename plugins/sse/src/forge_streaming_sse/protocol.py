"""The fast path: a uvicorn HTTP protocol that lets SSE streams write to their socket.

Under uvicorn, ASGI ``send`` for a streaming body is a coroutine, so writing
each event through it costs a task switch per delivery. This protocol (the
httptools one, otherwise unchanged) puts a :class:`DirectWrite` in the ASGI
scope under :data:`EXTENSION`; once the response headers went out through
``send``, a stream writes chunk-framed bytes to the asyncio transport itself
and finishes the response through ``send`` as usual.

The uvicorn names used here (``HttpToolsProtocol``, its ``cycle`` with
``response_started``, ``response_complete``, ``chunked_encoding``,
``keep_alive``, ``disconnected``) were checked in the sources of uvicorn
0.30.0 and 0.54.0, the floor and the tested release.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

EXTENSION = "forge_streaming.sse"
TERMINATOR = b"0\r\n\r\n"


def chunk_join(pending: list[bytes], size: int) -> bytes:
    """A :class:`forge_streaming.BufferedWriter` ``join``: the events of one flush as ONE HTTP/1.1 chunk.

    The chunk header and trailer go in with the events in the one join, so
    the body bytes are copied once per flush, whatever the number of events.
    """
    pending.insert(0, b"%x\r\n" % size)
    pending.append(b"\r\n")
    return b"".join(pending)


class DirectWrite:
    """The asyncio transport under one request, for writing the chunked body directly.

    :meth:`write` sends one HTTP/1.1 chunk. A stream's
    :class:`forge_streaming.BufferedWriter` writes to :attr:`transport` itself
    and frames each flush with :func:`chunk_join`.
    """

    __slots__ = ("transport", "cycle")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.cycle: Any = None

    def usable(self) -> bool:
        """True when headers went out chunked and the body is still open."""
        cycle = self.cycle
        return (cycle is not None and cycle.response_started and cycle.chunked_encoding is True
                and not cycle.response_complete and not cycle.disconnected)

    def write(self, data: bytes) -> None:
        self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def end(self) -> None:
        """End the chunked body and the connection without waiting for the client to read."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.response_complete = True
            cycle.keep_alive = False
            if not self.transport.is_closing():
                self.transport.write(TERMINATOR)
        self.transport.close()


class SSEHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the :data:`EXTENSION` scope entry."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._sse_direct = DirectWrite(self.transport)
        # uvicorn types extension values as dicts (ASGI's convention); this one is the writer object
        self.scope["extensions"] = {EXTENSION: self._sse_direct}  # type: ignore[dict-item]

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._sse_direct.cycle = self.cycle
