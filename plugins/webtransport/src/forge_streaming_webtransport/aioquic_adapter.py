"""Every use of aioquic beyond its public API, in one place.

aioquic has no public way to do five things this plugin needs, so they are
done here and nowhere else:

- reach the ``QuicConnection`` of a ``QuicConnectionProtocol`` (``_quic``;
  aioquic's own examples do the same);
- count the bytes written to a stream that the peer has not acknowledged
  yet (``QuicConnection._streams[id].sender._buffer``): the slow-consumer
  bound of the message stream;
- make ``H3Connection`` read the peer's side of a bidirectional stream that
  *we* opened as WebTransport data rather than HTTP frames
  (``H3Connection._get_or_create_stream``);
- free ``H3Connection``'s state of a finished WebTransport stream, which
  aioquic never frees itself (``H3Connection._stream``);
- know the UDP address the server is bound to (``serve()`` keeps the
  transport in ``QuicServer._transport``; :func:`listen` opens the endpoint
  itself instead, with aioquic's public ``QuicServer``, and with
  ``SO_REUSEPORT`` so that several worker processes share the port).

Checked against aioquic 1.7.0, 1.7.1 and 1.7.2 (their sources read and this
plugin's tests run on each); hence ``aioquic>=1.7,<1.8`` in the plugin's
``pyproject.toml``. Check this module again before raising the ceiling.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import FrameType, H3Connection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

CHECKED_VERSIONS = ("1.7.0", "1.7.1", "1.7.2")


class QuicProtocolBase(QuicConnectionProtocol):
    """aioquic's asyncio protocol, with its ``QuicConnection`` made reachable."""

    @property
    def quic(self) -> QuicConnection:
        return self._quic


def unacked_bytes(quic: QuicConnection, stream_id: int) -> int:
    """Bytes written to ``stream_id`` that the peer has not acknowledged (0 once aioquic dropped the stream)."""
    stream = quic._streams.get(stream_id)
    return len(stream.sender._buffer) if stream is not None else 0


def carry_webtransport(h3: H3Connection, stream_id: int, session_id: int) -> None:
    """Make ``h3`` hand the peer's data on our bidirectional ``stream_id`` to the session as stream data."""
    with h3._get_or_create_stream(stream_id) as h3_stream:
        h3_stream.frame_type = FrameType.WEBTRANSPORT_STREAM
        h3_stream.session_id = session_id


def forget_stream(h3: H3Connection, stream_id: int) -> None:
    """Drop ``h3``'s state of a WebTransport stream that carries nothing more."""
    h3._stream.pop(stream_id, None)


REUSE_PORT = hasattr(socket, "SO_REUSEPORT")


async def listen(host: str, port: int, *, configuration: QuicConfiguration,
                 create_protocol: Callable[..., QuicConnectionProtocol],
                 reuse_port: bool = REUSE_PORT) -> tuple[QuicServer, tuple[str, int]]:
    """Serve QUIC on UDP ``host:port`` (as aioquic's ``serve``); return the server and the bound address.

    With ``reuse_port`` (``SO_REUSEPORT``, where the OS has it) several processes of one user bind the
    same port, as ``uvicorn --workers N`` does with its TCP port: the kernel hands each client's
    datagrams to one of them, always the same one for a given client address.
    """
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=configuration, create_protocol=create_protocol),
        local_addr=(host, port),
        reuse_port=reuse_port or None,
    )
    sockname: Any = transport.get_extra_info("sockname")
    return server, (host, int(sockname[1]))
