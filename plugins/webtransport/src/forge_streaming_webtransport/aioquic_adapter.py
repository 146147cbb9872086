"""Every use of aioquic beyond its public API, in one place.

aioquic has no public way to do seven things this plugin needs, so they are
done here and nowhere else:

- reach the ``QuicConnection`` of a ``QuicConnectionProtocol`` (``_quic``;
  aioquic's own examples do the same);
- send once per loop turn instead of once per datagram received, and re-arm
  the connection's timer only when it must fire earlier:
  :class:`QuicProtocolBase` replaces ``datagram_received`` and ``transmit``
  of ``QuicConnectionProtocol`` with versions that use its private state
  (``_process_events``, ``_timer``, ``_timer_at``, ``_transport``);
- turn off aioquic's pacer (``QuicConnection._loss._pacer``, see
  :func:`disable_pacing`);
- count the bytes written to a stream that the peer has not acknowledged
  yet (``QuicConnection._streams[id].sender._buffer``): the slow-consumer
  bound of the message stream;
- make ``H3Connection`` read the peer's side of a bidirectional stream that
  *we* opened as WebTransport data rather than HTTP frames
  (``H3Connection._get_or_create_stream``);
- free ``H3Connection``'s state of a finished WebTransport stream, which
  aioquic never frees itself (``H3Connection._stream``);
- serve a UDP socket bound beforehand (``serve()`` binds its own and keeps
  the transport in ``QuicServer._transport``; :func:`listen` opens the
  endpoint on the transport's socket instead, with aioquic's public
  ``QuicServer``: the socket is bound, with ``SO_REUSEPORT``, before aioquic
  is even imported, see ``udp.py``).

Checked against aioquic 1.7.0, 1.7.1 and 1.7.2 (their sources read and this
plugin's tests run on each); hence ``aioquic>=1.7,<1.8`` in the plugin's
``pyproject.toml``. Check this module again before raising the ceiling.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import FrameType, H3Connection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

CHECKED_VERSIONS = ("1.7.0", "1.7.1", "1.7.2")


class QuicProtocolBase(QuicConnectionProtocol):
    """aioquic's asyncio protocol, with its ``QuicConnection`` made reachable, and cheaper sending.

    aioquic's protocol builds and sends packets (``transmit``) after every
    datagram it receives: under load, once per ACK from the client, each
    time with little to send. Here a datagram received only asks for a
    transmit (:meth:`schedule_transmit`, which a subclass provides: once per
    loop turn), so every ACK that arrived in one turn, and every write made
    in it, leave in one ``transmit``. And ``transmit`` re-arms the timer only
    when the connection needs it earlier than it is armed: a timer that
    fires early finds nothing due and is armed again, which costs less than
    cancelling and re-creating it on every transmit (the loss-detection
    deadline moves later with every packet sent).
    """

    @property
    def quic(self) -> QuicConnection:
        return self._quic

    def schedule_transmit(self) -> None:
        """Arrange for one ``transmit()`` soon (at the end of this loop turn)."""
        raise NotImplementedError

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        """:meta private:"""
        self._quic.receive_datagram(data, addr, now=self._loop.time())  # type: ignore[arg-type]
        self._process_events()
        self.schedule_transmit()

    def transmit(self) -> None:
        """Send every datagram the connection has ready, and arm its timer if it is due earlier."""
        self._transmit_task = None
        quic = self._quic
        loop = self._loop
        datagrams = quic.datagrams_to_send(now=loop.time())
        if datagrams:
            self.send_datagrams(datagrams)
        self._arm_timer(quic.get_timer())

    def send_datagrams(self, datagrams: list[tuple[bytes, Any]]) -> None:
        """Put ``datagrams`` on the wire (a subclass may batch them: see :class:`DatagramSender`)."""
        sendto = self._transport.sendto  # type: ignore[union-attr]
        for data, addr in datagrams:
            sendto(data, addr)

    def _arm_timer(self, timer_at: float | None) -> None:
        timer = self._timer
        if timer is not None:
            if timer_at is None or timer_at >= self._timer_at:  # type: ignore[operator]
                return  # fires early (or needlessly): it then finds nothing due and is armed again
            timer.cancel()
        self._timer = self._loop.call_at(timer_at, self._handle_timer) if timer_at is not None else None
        self._timer_at = timer_at

    def _handle_timer(self) -> None:
        armed, now = self._timer_at, self._loop.time()
        if armed is not None and armed > now:
            now = armed
        self._timer = None
        self._timer_at = None
        quic = self._quic
        timer_at = quic.get_timer()
        if timer_at is not None and timer_at > now:  # armed early (see transmit): nothing is due yet
            self._arm_timer(timer_at)
            return
        quic.handle_timer(now=now)
        self._process_events()
        self.transmit()


UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
"""Linux's UDP generic segmentation offload (``linux/udp.h``): one ``sendmsg`` carries several datagrams."""
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
_GSO_UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.EIO}


class DatagramSender:
    """Sends the datagrams of one transmit with one system call per run of equal-sized ones (UDP GSO).

    A transmit to one client usually holds several full-sized packets and a
    shorter last one: with Linux's ``UDP_SEGMENT`` they leave in one
    ``sendmsg`` on a second handle of the server's socket, which the kernel
    cuts into datagrams. Anything else, a socket that would block (the
    transport then queues as usual), and every OS without GSO, go through the
    transport's ``sendto``. One sender per UDP socket, closed with it.
    """

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self._transport = transport
        self._socket: socket.socket | None = None
        if sys.platform != "linux":
            return
        try:
            raw = transport.get_extra_info("socket")
            sock = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
        except (AttributeError, OSError, ValueError):
            return
        sock.setblocking(False)
        self._socket = sock

    @property
    def gso(self) -> bool:
        """Sends go through UDP GSO (until the OS refuses it once)."""
        return self._socket is not None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def send(self, datagrams: list[tuple[bytes, Any]]) -> None:
        sendto = self._transport.sendto
        count = len(datagrams)
        if count == 1 or self._socket is None:
            for data, addr in datagrams:
                sendto(data, addr)
            return
        start = 0
        while start < count:
            data, addr = datagrams[start]
            size = len(data)
            most = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size) if size else 1
            end = start + 1
            while end < count and end - start < most and datagrams[end][1] == addr:
                length = len(datagrams[end][0])
                if length > size:
                    break
                end += 1
                if length < size:  # only the last segment may be shorter
                    break
            if end - start == 1:
                sendto(data, addr)
            else:
                self._send_segments(datagrams[start:end], size, addr)
            start = end

    def _send_segments(self, run: list[tuple[bytes, Any]], size: int, addr: Any) -> None:
        sock = self._socket
        assert sock is not None
        try:
            sock.sendmsg([data for data, _ in run], [(socket.SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))],
                           0, addr)
            return
        except OSError as exc:
            if exc.errno in _GSO_UNSUPPORTED:
                self.close()  # this OS or interface does not segment: plain sends from now on
            # would block (the transport queues), or an error the transport reports as it always does
        sendto = self._transport.sendto
        for data, _ in run:
            sendto(data, addr)


class _NoPacer:
    """Stands in for aioquic's ``QuicPacketPacer``: never holds a packet back."""

    def next_send_time(self, now: float) -> None:
        return None

    def update_after_send(self, now: float) -> None:
        pass

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        pass


def disable_pacing(quic: QuicConnection) -> None:
    """Send what the congestion window allows at once, not spread over the RTT by aioquic's pacer.

    The pacer holds packets back to spread a window over a round trip, and a
    timer per connection sends them later: one ``transmit`` (and its per-call
    work) per few packets. Congestion control still bounds what is in flight.
    """
    quic._loss._pacer = _NoPacer()  # type: ignore[assignment]


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


async def listen(sock: socket.socket, *, configuration: QuicConfiguration,
                 create_protocol: Callable[..., QuicConnectionProtocol]) -> tuple[QuicServer, DatagramSender]:
    """Serve QUIC on the bound UDP socket ``sock`` (as aioquic's ``serve`` does on one it binds itself);
    return the server and the :class:`DatagramSender` of its socket (close it with the server).

    Datagrams that reached ``sock`` before this call are in its receive buffer: the server reads them first.
    """
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=configuration, create_protocol=create_protocol), sock=sock)
    return server, DatagramSender(transport)
