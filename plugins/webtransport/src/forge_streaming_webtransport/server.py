"""The HTTP/3 server: QUIC connections, extended CONNECT, and the transport's own refusals.

One :class:`WebTransportServer` per service owns the UDP socket, the live
sessions and the tasks it started. A CONNECT that passes the transport's
own checks (a path served, the origin, ``webtransport.max_sessions``)
becomes a :class:`WebTransportSession` that the kernel runs from there:
``streaming.serve_connection(session, handler)``.

Writes and transmits are batched: anything that writes to a QUIC
connection, and every datagram it receives, marks its
:class:`WebTransportProtocol` on the kernel's flush scheduler, which calls
its ``flush()`` once at the end of the loop iteration. Room frames written
to a message stream during the iteration wait in the protocol and go to
aioquic there as one stream write per stream, then one ``transmit()``
builds the packets: a burst of deliveries costs one write and one transmit
per client, and the ACKs that came in meanwhile cost no transmit of their
own.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import H3_ALPN, ErrorCode, H3Connection
from aioquic.h3.events import DatagramReceived, DataReceived, H3Event, HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, ProtocolNegotiated, QuicEvent, StopSendingReceived
from aioquic.quic.events import StreamReset as QuicStreamReset
from forge_streaming import CloseCode, ConnectionRequest, FlushScheduler, Streaming, origin_allowed

from . import aioquic_adapter
from .certificate import CertificatePair
from .events import Datagram, SessionEnded, SessionEvent, StopSending, StreamData, StreamReset
from .framing import parse_close_capsule
from .session import WebTransportSession
from .settings import WebTransportSettings
from .streams import STREAM_REJECTED

if TYPE_CHECKING:
    from forge_streaming import Handler

log = logging.getLogger("forge_streaming.webtransport")


class WebTransportProtocol(aioquic_adapter.QuicProtocolBase):
    """One QUIC connection: HTTP/3 framing, and the sessions opened on it.

    Its public methods are what sessions and streams use of the connection
    (``send_stream_data``, ``open_stream``, ``respond``, ...); aioquic's
    events reach a session as ``events`` objects through ``handle_event``.
    """

    def __init__(self, *args: Any, server: WebTransportServer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server = server
        self.h3: H3Connection | None = None
        self.sessions: dict[int, WebTransportSession] = {}
        self._connection = self.quic  # looked up once: the hot path uses it per delivery
        if not server.settings.pacing:
            aioquic_adapter.disable_pacing(self._connection)
        self._terminated = False
        self._dirty = False
        self._pending: dict[int, list[bytes]] = {}
        """Bytes written with ``write_counted`` this loop iteration, per stream, not handed to aioquic yet."""
        self._pending_size: dict[int, int] = {}
        self._scheduler = server.scheduler
        self._refused_streams: set[int] = set()
        self._requested = False
        timeout = server.streaming.config.server.handshake_timeout
        self._first_request_timer: asyncio.TimerHandle | None = (
            asyncio.get_running_loop().call_later(timeout, self._no_request, timeout) if timeout > 0 else None)

    @property
    def terminated(self) -> bool:
        """The QUIC connection is gone: nothing can be sent any more."""
        return self._terminated

    # -- sending (hot path: no transmit here, one per loop iteration) ------------------

    def schedule_transmit(self) -> None:
        if not self._dirty:
            self._dirty = True
            self._scheduler.mark(self)

    def flush(self) -> None:
        """Write what was queued during this loop iteration, then send it (the flush scheduler calls this)."""
        self._dirty = False
        if self._pending:
            self._write_pending()
        if not self._terminated:
            self.transmit()

    def _write_pending(self) -> None:
        """Hand every stream's queued frames to aioquic, one write per stream."""
        pending, self._pending = self._pending, {}
        self._pending_size = {}
        if self._terminated:
            return
        connection = self._connection
        for stream_id, chunks in pending.items():
            try:
                connection.send_stream_data(stream_id, chunks[0] if len(chunks) == 1 else b"".join(chunks))
            except Exception as exc:  # the client stopped the stream this iteration: aioquic reset it
                log.debug("stream %d: %d queued bytes dropped: %r", stream_id, sum(map(len, chunks)), exc)

    def _write_stream(self, stream_id: int) -> None:
        """Hand ``stream_id``'s queued frames to aioquic now (before anything else on it)."""
        chunks = self._pending.pop(stream_id, None)
        if chunks is not None:
            del self._pending_size[stream_id]
            self._connection.send_stream_data(stream_id, b"".join(chunks))

    def send_datagrams(self, datagrams: list[tuple[bytes, Any]]) -> None:
        sender = self.server.sender
        if sender is not None:
            sender.send(datagrams)
        else:
            super().send_datagrams(datagrams)

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if stream_id in self._pending:
            self._write_stream(stream_id)
        self._connection.send_stream_data(stream_id, data, end_stream)
        self.schedule_transmit()

    def write_counted(self, stream_id: int, data: bytes) -> int:
        """Queue ``data`` on ``stream_id`` until the end of the loop iteration; return the bytes on it
        the client has not acknowledged, queued ones included (hot path)."""
        chunks = self._pending.get(stream_id)
        if chunks is None:
            self._pending[stream_id] = [data]
            queued = self._pending_size[stream_id] = len(data)
            if not self._dirty:
                self._dirty = True
                self._scheduler.mark(self)
        else:
            chunks.append(data)
            queued = self._pending_size[stream_id] = self._pending_size[stream_id] + len(data)
        return aioquic_adapter.unacked_bytes(self._connection, stream_id) + queued

    def unacked(self, stream_id: int) -> int:
        """Bytes written to ``stream_id`` that the client has not acknowledged yet (queued ones included)."""
        return aioquic_adapter.unacked_bytes(self._connection, stream_id) + self._pending_size.get(stream_id, 0)

    def open_stream(self, session_id: int, *, unidirectional: bool) -> int:
        """Open a WebTransport stream of ``session_id`` to the client; return its id."""
        h3 = self._h3()
        stream_id = h3.create_webtransport_stream(session_id, is_unidirectional=unidirectional)
        if not unidirectional:
            # aioquic parses replies on a bidirectional stream it opened as HTTP frames
            # unless told it carries WebTransport data for this session
            aioquic_adapter.carry_webtransport(h3, stream_id, session_id)
        self.schedule_transmit()
        return stream_id

    def peer_address(self) -> tuple[str, int] | None:
        """Where the client's datagrams come from (it may change while the connection lives)."""
        peer = self._connection.get_peer_address()
        return (str(peer[0]), int(peer[1])) if peer else None

    def send_datagram(self, session_id: int, data: bytes) -> None:
        self._h3().send_datagram(session_id, data)
        self.schedule_transmit()

    def abort_stream(self, stream_id: int, *, reset_sending: bool, stop_receiving: bool) -> None:
        """Reset our side and/or ask the client to stop sending, with ``STREAM_REJECTED``."""
        if self._terminated:
            return
        if reset_sending and stream_id in self._pending:  # a reset discards them anyway
            del self._pending[stream_id]
            del self._pending_size[stream_id]
        try:
            if reset_sending:
                self._connection.reset_stream(stream_id, STREAM_REJECTED)
            if stop_receiving:
                self._connection.stop_stream(stream_id, STREAM_REJECTED)
        except Exception:  # aioquic already discarded the stream
            pass
        self.schedule_transmit()

    def release_stream(self, stream_id: int) -> None:
        """A WebTransport stream carries nothing more: free the HTTP/3 state aioquic keeps for it."""
        if self.h3 is not None:
            aioquic_adapter.forget_stream(self.h3, stream_id)

    def respond(self, stream_id: int, status: int, *, end_stream: bool, body: bytes = b"") -> None:
        """Answer the request on ``stream_id`` (a CONNECT: 200 opens the session)."""
        if self._terminated or self.h3 is None:
            return
        headers = [(b":status", str(status).encode())]
        if status == 200:
            headers.append((b"sec-webtransport-http3-draft", b"draft02"))
        elif body:
            headers.append((b"content-type", b"text/plain; charset=utf-8"))
        try:
            self.h3.send_headers(stream_id, headers, end_stream=end_stream and not body)
            if body:
                self.h3.send_data(stream_id, body, end_stream=True)
        except Exception as exc:  # the client reset the request meanwhile
            log.debug("answering stream %d with %d failed: %r", stream_id, status, exc)
        self.schedule_transmit()

    def end_session(self, session_id: int, capsule: bytes) -> None:
        """Send ``capsule`` (CLOSE_WEBTRANSPORT_SESSION) and finish the CONNECT stream."""
        self._h3().send_data(session_id, capsule, end_stream=True)
        self.schedule_transmit()

    # -- sessions --------------------------------------------------------------------------

    def add_session(self, session: WebTransportSession) -> None:
        """Route the session's events to it (also streams it gets before it is accepted)."""
        self.sessions[session.session_id] = session

    def session_accepted(self, session: WebTransportSession) -> None:
        self.server.session_accepted(session)

    def forget(self, session: WebTransportSession) -> None:
        """The session is over: route nothing more to it."""
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
        self.server.session_over(session)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self.server.spawn(coro)

    # -- aioquic's events --------------------------------------------------------------------

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            if event.alpn_protocol in H3_ALPN:
                self.h3 = H3Connection(self._connection, enable_webtransport=True)
        elif isinstance(event, QuicStreamReset):
            self._stream_event(event.stream_id, StreamReset(event.stream_id, event.error_code))
        elif isinstance(event, StopSendingReceived):
            if event.stream_id in self._pending:  # aioquic has reset our side: nothing more may be written
                del self._pending[event.stream_id]
                del self._pending_size[event.stream_id]
            self._stream_event(event.stream_id, StopSending(event.stream_id))
        elif isinstance(event, ConnectionTerminated):
            self._terminated = True
            self._request_arrived()
            code = CloseCode.NORMAL if event.error_code == 0 else CloseCode.ABNORMAL
            ended = SessionEnded(code, event.reason_phrase or "QUIC connection closed")
            for session in list(self.sessions.values()):
                session.handle_event(ended)
            return
        if self.h3 is not None:
            for h3_event in self.h3.handle_event(event):
                self._h3_event(h3_event)

    def _stream_event(self, stream_id: int, event: SessionEvent) -> None:
        session = self.sessions.get(stream_id)
        if session is not None:  # the CONNECT stream itself: the session is over
            session.handle_event(SessionEnded(CloseCode.ABNORMAL, "session stream reset by the client"))
            return
        for session in self.sessions.values():
            if session.has_stream(stream_id):
                session.handle_event(event)
                return

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, WebTransportStreamDataReceived):
            session = self.sessions.get(event.session_id)
            if session is not None:
                session.handle_event(StreamData(event.stream_id, event.data, event.stream_ended))
            elif event.stream_id not in self._refused_streams:
                self._refuse_stream(event.stream_id)
        elif isinstance(event, DatagramReceived):
            session = self.sessions.get(event.stream_id)
            if session is not None:
                session.handle_event(Datagram(event.data))
        elif isinstance(event, HeadersReceived):
            self._request_arrived()
            self.server.on_request(self, event)
        elif isinstance(event, DataReceived):
            session = self.sessions.get(event.stream_id)
            if session is None:
                return
            closing = parse_close_capsule(event.data)
            if closing is not None:
                session.handle_event(SessionEnded(*closing))
            elif event.stream_ended:
                session.handle_event(SessionEnded(CloseCode.NORMAL, "session closed by the client"))

    def _request_arrived(self) -> None:
        self._requested = True
        if self._first_request_timer is not None:
            self._first_request_timer.cancel()
            self._first_request_timer = None

    def _no_request(self, timeout: float) -> None:
        """A QUIC connection that asked for nothing within ``server.handshake_timeout`` is closed."""
        self._first_request_timer = None
        if self._requested or self._terminated:
            return
        log.info("WebTransport: QUIC connection from %s sent no request within server.handshake_timeout (%gs); "
                 "closing it", self.peer_address(), timeout)
        self._connection.close(error_code=ErrorCode.H3_REQUEST_REJECTED,
                               reason_phrase="no request within server.handshake_timeout")
        self.transmit()

    def _refuse_stream(self, stream_id: int) -> None:
        """A stream for a session that is gone (or never was): tell the client to stop."""
        self._refused_streams.add(stream_id)
        self.abort_stream(stream_id, reset_sending=not stream_id & 2, stop_receiving=True)

    def _h3(self) -> H3Connection:
        if self.h3 is None:
            raise RuntimeError("no HTTP/3 on this QUIC connection")
        return self.h3


def _headers(raw: list[tuple[bytes, bytes]]) -> tuple[dict[str, str], dict[str, str]]:
    pseudo: dict[str, str] = {}
    regular: dict[str, str] = {}
    for key, value in raw:
        name, text = key.decode("latin-1").lower(), value.decode("latin-1")
        (pseudo if name.startswith(":") else regular)[name] = text
    return pseudo, regular


class WebTransportServer:
    """The aioquic server of one service and its sessions."""

    def __init__(self, streaming: Streaming, settings: WebTransportSettings, certificate: CertificatePair) -> None:
        self.streaming = streaming
        self.settings = settings
        self.certificate = certificate
        self.sessions: set[WebTransportSession] = set()
        """Accepted sessions, until they end."""
        self.pending: set[WebTransportSession] = set()
        """Sessions the kernel is deciding about (authenticate, limits)."""
        self.scheduler: FlushScheduler = streaming.flush_scheduler
        self._quic_server: QuicServer | None = None
        self.sender: aioquic_adapter.DatagramSender | None = None
        """Sends the datagrams of a transmit (several per system call where the OS segments them)."""
        self._tasks: set[asyncio.Task[None]] = set()
        limits = streaming.config.limits
        self._send_limit = settings.send_buffer if settings.send_buffer is not None else limits.send_buffer

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, sock: socket.socket) -> None:
        """Serve the bound UDP socket ``sock`` (the transport bound it at start; this server closes it)."""
        self.scheduler = self.streaming.flush_scheduler  # the one of the running loop
        idle = self.settings.idle_timeout
        configuration = QuicConfiguration(
            is_client=False,
            alpn_protocols=H3_ALPN,
            max_datagram_frame_size=65536,
            max_datagram_size=self.settings.max_packet_size,
            idle_timeout=idle + 5.0 if idle > 0 else 600.0,  # the session check fires first, cleanly
        )
        configuration.load_cert_chain(self.certificate.cert_file, self.certificate.key_file)

        def create(*args: Any, **kwargs: Any) -> WebTransportProtocol:
            return WebTransportProtocol(*args, server=self, **kwargs)

        self._quic_server, self.sender = await aioquic_adapter.listen(
            sock, configuration=configuration, create_protocol=create)

    async def stop(self) -> None:
        """Close what the kernel's drain left open, wait for our tasks a while, then close the socket."""
        for session in list(self.sessions | self.pending):
            if not session.closed.is_set():
                self.spawn(session.close(CloseCode.GOING_AWAY, "server shutting down"))
        timeout = self.streaming.config.server.drain_timeout
        for _ in range(2):  # cancelled tasks may spawn a last close: give those their turn too
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=timeout)
            for task in list(self._tasks):
                task.cancel()
            timeout = 1.0
        self.scheduler.flush_all()
        if self._quic_server is not None:
            self._quic_server.close()
            self._quic_server = None
        if self.sender is not None:
            self.sender.close()
            self.sender = None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` in a task this server keeps and cancels at stop."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("WebTransport server task failed: %r", task.exception(), exc_info=task.exception())

    # -- sessions -----------------------------------------------------------------------------

    def session_accepted(self, session: WebTransportSession) -> None:
        self.pending.discard(session)
        self.sessions.add(session)

    def session_over(self, session: WebTransportSession) -> None:
        self.pending.discard(session)
        self.sessions.discard(session)

    def on_request(self, protocol: WebTransportProtocol, event: HeadersReceived) -> None:
        """A request on a new stream: refuse it here, or make a session of it for the kernel to run."""
        pseudo, headers = _headers(event.headers)
        stream_id = event.stream_id
        if pseudo.get(":method") != "CONNECT" or pseudo.get(":protocol") != "webtransport":
            protocol.respond(stream_id, 404, end_stream=True,
                             body=b"this HTTP/3 endpoint serves WebTransport sessions only\n")
            return
        path, _, query = pseudo.get(":path", "/").partition("?")
        found, handler = self.streaming.endpoint("webtransport", path)
        if not found:
            log.info("WebTransport session refused: no handler at %s", path)
            protocol.respond(stream_id, 404, end_stream=True)
            return
        authority = pseudo.get(":authority", "")
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, authority):
            log.info("WebTransport session to %s refused: origin %r is not allowed (webtransport.allowed_origins)",
                     path, origin)
            protocol.respond(stream_id, 403, end_stream=True, body=b"origin not allowed\n")
            return
        if len(self.sessions) + len(self.pending) >= self.settings.max_sessions:
            log.warning("WebTransport session refused: webtransport.max_sessions (%d) reached",
                        self.settings.max_sessions)
            protocol.respond(stream_id, 503, end_stream=True, body=b"too many sessions\n")
            return
        headers.setdefault("host", authority)
        peer = protocol.peer_address()
        request = ConnectionRequest(transport="webtransport", path=path, query_string=query, headers=headers,
                                    client=peer)
        settings = self.settings
        session = WebTransportSession(
            request, self.streaming, protocol=protocol, session_id=stream_id, send_limit=self._send_limit,
            read_limit=settings.read_buffer, max_streams=settings.max_streams_per_session,
            max_datagram_size=settings.max_datagram_size, idle_timeout=settings.idle_timeout)
        protocol.add_session(session)  # streams opened before the answer are kept for it
        self.pending.add(session)
        self.spawn(self._serve(session, handler))
        timeout = self.streaming.config.server.handshake_timeout
        if timeout > 0:
            asyncio.get_running_loop().call_later(timeout, self._handshake_expired, protocol, session, timeout)

    def _handshake_expired(self, protocol: WebTransportProtocol, session: WebTransportSession,
                           timeout: float) -> None:
        """The kernel has not accepted nor refused the CONNECT within ``server.handshake_timeout``: 503."""
        if session not in self.pending or session.is_ended:
            return
        log.info("WebTransport session %s to %s not answered within server.handshake_timeout (%gs); refusing it",
                 session.id, session.request.path, timeout)
        protocol.respond(session.session_id, 503, end_stream=True,
                         body=f"handshake not completed within {timeout:g}s\n".encode())
        session.handle_event(SessionEnded(CloseCode.ABNORMAL, "handshake timeout"))

    async def _serve(self, session: WebTransportSession, handler: Handler | None) -> None:
        try:
            await self.streaming.serve_connection(session, handler)
        finally:
            self.pending.discard(session)

    def _origin_allowed(self, origin: str, authority: str) -> bool:
        """The kernel's rule of every transport; the server's own pages are also those of its HTTP address."""
        host, port = self.streaming.http_address
        return origin_allowed(origin, {"host": authority}, self.settings.allowed_origins, scheme="https",
                              also=[f"{host}:{port}"])
