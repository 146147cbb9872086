"""The HTTP/3 server: QUIC connections, extended CONNECT, and session admission.

One :class:`WebTransportServer` per service owns the UDP socket (aioquic's
``serve``), the live sessions, the tasks it started, and a transmit
scheduler: anything that writes to a QUIC connection marks it, and one
callback at the end of the loop iteration sends every marked connection's
packets, so a burst of deliveries costs one ``transmit()`` per client.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DatagramReceived, DataReceived, H3Event, HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, ProtocolNegotiated, QuicEvent, StopSendingReceived, StreamReset
from forge_streaming import CloseCode, ConnectionClosed, ConnectionRequest, Refused, Streaming

from .certificate import CertificatePair
from .framing import parse_close_capsule
from .session import WebTransportSession
from .settings import WebTransportSettings
from .streams import STREAM_REJECTED

if TYPE_CHECKING:
    from forge_streaming import Handler

log = logging.getLogger("forge_streaming.webtransport")


class WebTransportProtocol(QuicConnectionProtocol):
    """One QUIC connection: HTTP/3 framing and the sessions opened on it."""

    def __init__(self, *args: Any, server: WebTransportServer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server = server
        self.h3: H3Connection | None = None
        self.sessions: dict[int, WebTransportSession] = {}
        self.terminated = False
        self._dirty = False
        self._refused: set[int] = set()

    def schedule_transmit(self) -> None:
        if not self._dirty:
            self._dirty = True
            self.server.mark(self)

    def forget(self, session: WebTransportSession) -> None:
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
        self.server.sessions.discard(session)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            if event.alpn_protocol in H3_ALPN:
                self.h3 = H3Connection(self._quic, enable_webtransport=True)
        elif isinstance(event, StreamReset):
            self._route_stream(event.stream_id, lambda s: s._stream_reset(event.stream_id, event.error_code))
        elif isinstance(event, StopSendingReceived):
            self._route_stream(event.stream_id, lambda s: s._stop_sending(event.stream_id))
        elif isinstance(event, ConnectionTerminated):
            self.terminated = True
            code = CloseCode.NORMAL if event.error_code == 0 else CloseCode.ABNORMAL
            reason = event.reason_phrase or "QUIC connection closed"
            for session in list(self.sessions.values()):
                session._peer_closed(code, reason)
            return
        if self.h3 is not None:
            for h3_event in self.h3.handle_event(event):
                self._h3_event(h3_event)

    def _route_stream(self, stream_id: int, action: Callable[[WebTransportSession], None]) -> None:
        session = self.sessions.get(stream_id)
        if session is not None:  # the CONNECT stream itself was reset: the session is over
            session._peer_closed(CloseCode.ABNORMAL, "session stream reset by the client")
            return
        for session in self.sessions.values():
            if stream_id in session._streams:
                action(session)
                return

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, WebTransportStreamDataReceived):
            session = self.sessions.get(event.session_id)
            if session is not None:
                session._stream_data(event.stream_id, event.data, event.stream_ended)
            elif event.stream_id not in self._refused:
                self._refuse_stream(event.stream_id)
        elif isinstance(event, DatagramReceived):
            session = self.sessions.get(event.stream_id)
            if session is not None:
                session._datagram(event.data)
        elif isinstance(event, HeadersReceived):
            self.server.on_request(self, event)
        elif isinstance(event, DataReceived):
            session = self.sessions.get(event.stream_id)
            if session is None:
                return
            closing = parse_close_capsule(event.data)
            if closing is not None:
                session._peer_closed(*closing)
            elif event.stream_ended:
                session._peer_closed(CloseCode.NORMAL, "session closed by the client")

    def _refuse_stream(self, stream_id: int) -> None:
        """A stream for a session that is gone (or never was): tell the client to stop."""
        self._refused.add(stream_id)
        try:
            self._quic.stop_stream(stream_id, STREAM_REJECTED)
            if not stream_id & 2:
                self._quic.reset_stream(stream_id, STREAM_REJECTED)
        except Exception:  # aioquic already discarded the stream
            pass
        self.schedule_transmit()

    def respond(self, stream_id: int, status: int, *, end_stream: bool, body: bytes = b"") -> None:
        assert self.h3 is not None
        headers = [(b":status", str(status).encode())]
        if status == 200:
            headers.append((b"sec-webtransport-http3-draft", b"draft02"))
        elif body:
            headers.append((b"content-type", b"text/plain; charset=utf-8"))
        self.h3.send_headers(stream_id, headers, end_stream=end_stream and not body)
        if body:
            self.h3.send_data(stream_id, body, end_stream=True)
        self.schedule_transmit()


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
        self.pending = 0
        self.address: tuple[str, int] | None = None
        self._quic_server: QuicServer | None = None
        self._dirty: list[WebTransportProtocol] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        limits = streaming.config.limits
        self._send_limit = settings.send_buffer if settings.send_buffer is not None else limits.send_buffer

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        self._loop = asyncio.get_running_loop()
        idle = self.settings.idle_timeout
        configuration = QuicConfiguration(
            is_client=False,
            alpn_protocols=H3_ALPN,
            max_datagram_frame_size=65536,
            idle_timeout=idle + 5.0 if idle > 0 else 600.0,  # the session check fires first, cleanly
        )
        configuration.load_cert_chain(self.certificate.cert_file, self.certificate.key_file)
        self._quic_server = await serve(
            host, port, configuration=configuration,
            create_protocol=lambda *a, **kw: WebTransportProtocol(*a, server=self, **kw),
        )
        udp = self._quic_server._transport
        assert udp is not None
        sockname = udp.get_extra_info("sockname")
        self.address = (host, int(sockname[1]))

    async def stop(self) -> None:
        for session in list(self.sessions):
            if not session._finished:
                self.spawn(session.close(CloseCode.GOING_AWAY, "server shutting down"))
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.streaming.config.server.drain_timeout)
        for task in list(self._tasks):
            task.cancel()
        self.flush()
        if self._quic_server is not None:
            self._quic_server.close()
            self._quic_server = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in a task this server keeps and cancels at stop."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("WebTransport server task failed: %r", task.exception(), exc_info=task.exception())

    # -- transmit scheduling (hot path) ----------------------------------------------------------

    def mark(self, protocol: WebTransportProtocol) -> None:
        self._dirty.append(protocol)
        if not self._scheduled:
            self._scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for protocol in dirty:
            protocol._dirty = False
            if not protocol.terminated:
                protocol.transmit()

    # -- admission --------------------------------------------------------------------------------

    def on_request(self, protocol: WebTransportProtocol, event: HeadersReceived) -> None:
        pseudo, headers = _headers(event.headers)
        stream_id = event.stream_id
        if pseudo.get(":method") != "CONNECT" or pseudo.get(":protocol") != "webtransport":
            protocol.respond(stream_id, 404, end_stream=True,
                             body=b"this HTTP/3 endpoint serves WebTransport sessions only\n")
            return
        path, _, query = pseudo.get(":path", "/").partition("?")
        handler = self._handler(path)
        if handler is None:
            log.info("WebTransport session refused: no handler at %s", path)
            protocol.respond(stream_id, 404, end_stream=True)
            return
        authority = pseudo.get(":authority", "")
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, authority):
            log.info("WebTransport session to %s refused: origin %r is not allowed (webtransport.allowed_origins)",
                     path, origin)
            protocol.respond(stream_id, 403, end_stream=True)
            return
        if len(self.sessions) + self.pending >= self.settings.max_sessions:
            log.warning("WebTransport session refused: webtransport.max_sessions (%d) reached",
                        self.settings.max_sessions)
            protocol.respond(stream_id, 503, end_stream=True)
            return
        headers.setdefault("host", authority)
        peer = protocol._quic._network_paths[0].addr if protocol._quic._network_paths else None
        request = ConnectionRequest(transport="webtransport", path=path, query_string=query, headers=headers,
                                    client=(str(peer[0]), int(peer[1])) if peer else None)
        settings = self.settings
        session = WebTransportSession(
            request, self.streaming, protocol=protocol, session_id=stream_id, send_limit=self._send_limit,
            read_limit=settings.read_buffer, max_streams=settings.max_streams_per_session,
            max_datagram_size=settings.max_datagram_size, idle_timeout=settings.idle_timeout)
        protocol.sessions[stream_id] = session  # streams opened before the answer are kept for it
        self.pending += 1
        self.spawn(self._admit(session, handler))

    async def _admit(self, session: WebTransportSession, handler: Handler) -> None:
        protocol = session._protocol
        try:
            try:
                session.identity = await self.streaming.authenticate(session.request)
                await self.streaming.open(session)
            except Refused as exc:
                log.info("WebTransport session %s to %s refused (%d): %s", session.id, session.request.path,
                         exc.status, exc.reason)
                protocol.sessions.pop(session.session_id, None)
                session._finished = True
                if not protocol.terminated:
                    protocol.respond(session.session_id, exc.status, end_stream=True)
                return
        finally:
            self.pending -= 1
        if session._finished:  # the client left while we were deciding
            await self.streaming.closed(session, session.close_code or CloseCode.ABNORMAL, session.close_reason)
            return
        self.sessions.add(session)
        protocol.respond(session.session_id, 200, end_stream=False)
        session.start_idle_timer()
        session.log.debug("WebTransport session %s open at %s", session.id, session.request.path)
        code, reason = CloseCode.NORMAL, ""
        try:
            await handler(session)
        except ConnectionClosed:
            pass
        except asyncio.CancelledError:
            code, reason = CloseCode.GOING_AWAY, "server shutting down"
            raise
        except Exception as exc:
            session.log.error("handler for %s failed on session %s: %r", session.request.path, session.id, exc,
                              exc_info=exc)
            code, reason = CloseCode.INTERNAL_ERROR, "internal error"
        finally:
            if not session._finished:
                await asyncio.shield(self.spawn(session.close(code, reason)))

    def _handler(self, path: str) -> Handler | None:
        handlers: Mapping[str, Handler] = self.streaming.handlers("webtransport")
        if path in handlers:
            return handlers[path]
        if path == "/wt" and self.streaming.config.server.room_endpoints:
            return self.streaming.serve_room_protocol
        return None

    def _origin_allowed(self, origin: str, authority: str) -> bool:
        parts = urlsplit(origin)
        if parts.netloc and parts.netloc == authority:
            return True  # a page of this server (same host and port), over HTTP or HTTPS
        host, port = self.streaming.http_address
        if origin in (f"http://{host}:{port}", f"https://{host}:{port}"):
            return True
        return any(fnmatch.fnmatchcase(origin, pattern) for pattern in self.settings.allowed_origins)
