"""The WebSocket transport: routes, the per-connection lifecycle, uvicorn options."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from forge_streaming import ConnectionRequest, FlushScheduler, Handler, Transport, origin_allowed
from starlette.routing import BaseRoute, WebSocketRoute

from .connection import DirectConnection, Limits, QueuedConnection, WebSocketConnection, reject
from .headers import PackedHeaderList
from .protocol import EXTENSION, ForgeWebSocketProtocol
from .settings import WebSocketSettings

if TYPE_CHECKING:
    from forge_streaming import Streaming

log = logging.getLogger("forge_streaming.websocket")

Scope = dict[str, Any]

SERVER_APPLIED = ("read_buffer_size", "write_buffer_size", "enable_compression", "ping_interval", "ping_timeout",
                  "flush_window")
"""Keys of the ``websocket`` section that only the server's WebSocket protocol can apply
(uvicorn options and this plugin's protocol class, from :meth:`WebSocketTransport.server_options`)."""


class WebSocketTransport(Transport):
    """``streaming.handle_websocket(path, handler)`` and the room endpoint at ``/ws``."""

    name = "websocket"
    default_path = "/ws"

    def __init__(self, streaming: Streaming) -> None:
        super().__init__(streaming)
        self.settings = streaming.config.section("websocket", WebSocketSettings)
        kernel_limits = streaming.config.limits
        s = self.settings
        self.limits = Limits(
            max_message_size=s.max_message_size if s.max_message_size is not None else kernel_limits.max_message_size,
            send_buffer=s.send_buffer if s.send_buffer is not None else kernel_limits.send_buffer,
            close_timeout=s.close_timeout,
            read_buffer_size=s.read_buffer_size,
            write_buffer_size=s.write_buffer_size,
        )
        self.flush_scheduler: FlushScheduler | None = FlushScheduler(window=s.flush_window) if s.flush_window else None
        """``websocket.flush_window`` on: one windowed scheduler for every connection of this transport (one
        timer for all of them); None: the kernel's end-of-iteration ``streaming.flush_scheduler``."""
        self.options_taken = False
        """True once the HTTP server asked for :meth:`server_options` (``forge-streaming serve``, the test
        kit, or ``uvicorn.run(app, **streaming.server_options())``): the keys in SERVER_APPLIED then apply."""

    def routes(self, endpoints: Mapping[str, Handler | None]) -> list[BaseRoute]:
        return [WebSocketRoute(path, Endpoint(self, handler)) for path, handler in endpoints.items()]

    async def start(self) -> None:
        # The windowed scheduler is bound to the serving loop, like the kernel's own: a timer left pending
        # on an earlier loop would otherwise leave it "scheduled" for good.
        if self.settings.flush_window:
            self.flush_scheduler = FlushScheduler(asyncio.get_running_loop(), window=self.settings.flush_window)
        if self.options_taken:
            return
        # Under a server that did not ask for our options (plain ``uvicorn app:app``) uvicorn's own
        # WebSocket protocol runs: say once which keys it decides instead, rather than ignore them silently
        # (a WARNING: uvicorn's default logging shows no INFO of other loggers).
        config = self.streaming.config
        explicit = [key for key in (*(f"websocket.{key}" for key in SERVER_APPLIED), "server.header_timeout",
                                    "server.body_timeout", "server.handshake_timeout",
                                    "limits.max_pending_connections") if config.is_set(key)]
        log.warning(
            "this app is not served by `forge-streaming serve` (plain uvicorn?), so uvicorn's own WebSocket "
            "protocol runs: %s are not applied (uvicorn's --ws-per-message-deflate, --ws-ping-interval and "
            "--ws-ping-timeout decide), and server.header_timeout, server.body_timeout, server.handshake_timeout "
            "and limits.max_pending_connections are not enforced%s. Run `forge-streaming serve module:app` "
            "(README: Ways to run)",
            ", ".join(f"websocket.{key}" for key in SERVER_APPLIED),
            f"; set in the config but not applied: {', '.join(explicit)}" if explicit else "")

    def server_options(self) -> dict[str, Any]:
        self.options_taken = True
        s = self.settings
        return {
            "ws": ForgeWebSocketProtocol,
            "ws_max_size": self.limits.max_message_size,
            "ws_per_message_deflate": s.enable_compression,
            "ws_ping_interval": s.ping_interval or None,
            "ws_ping_timeout": s.ping_timeout or None,
        }

    def describe(self) -> dict[str, Any]:
        conns = [c for c in self.streaming.connections.values() if isinstance(c, WebSocketConnection)]
        return {
            "path": self.default_path,
            "connections": len(conns),
            "direct": sum(isinstance(c, DirectConnection) for c in conns),
            "compression": self.settings.enable_compression,
            "max_message_size": self.limits.max_message_size,
            "send_buffer": self.limits.send_buffer,
        }

    def choose_subprotocol(self, offered: list[str]) -> str | None:
        """The first subprotocol the client offers that the server speaks."""
        supported = self.settings.subprotocols
        return next((p for p in offered if p in supported), None)


class Endpoint:
    """The ASGI app of one path: a user handler, or the room protocol when ``handler`` is None.

    Only the WebSocket part is here (the origin rule, which connection
    flavour to build); the kernel runs the connection's life.
    """

    def __init__(self, transport: WebSocketTransport, handler: Handler | None) -> None:
        self.transport = transport
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        transport = self.transport
        streaming = transport.streaming
        protocol = scope.get("extensions", {}).get(EXTENSION)
        direct = isinstance(protocol, ForgeWebSocketProtocol)
        request = _lean_request(scope) if direct and self.handler is None else ConnectionRequest.from_scope(
            "websocket", scope)
        if (await receive())["type"] != "websocket.connect":
            return
        if isinstance(protocol, ForgeWebSocketProtocol):
            protocol.limit_handshake(streaming.config.server.handshake_timeout)
        scheme = scope.get("scheme", "ws")
        if not origin_allowed(request.origin, request.headers, transport.settings.allowed_origins,
                              scheme="https" if scheme == "wss" else "http"):
            log.info("refused WebSocket to %s from origin %r (allowed: %s)", request.path, request.origin,
                     transport.settings.allowed_origins or "same origin only")
            await reject(scope, send, 403, f"origin {request.origin!r} is not allowed; "
                                           "list it in websocket.allowed_origins")
            return
        subprotocol = transport.choose_subprotocol(list(scope.get("subprotocols") or ()))
        conn: WebSocketConnection
        if isinstance(protocol, ForgeWebSocketProtocol):
            conn = DirectConnection(request, streaming, send, transport.limits, subprotocol, protocol,
                                    scheduler=transport.flush_scheduler)
            if self.handler is None:
                # The room protocol: its life goes on in a task of its own and this ASGI call returns, so
                # an idle connection keeps no chain of suspended coroutines through the middleware stack.
                protocol.run_detached(streaming.serve_connection(conn, None))
                return
        else:
            conn = QueuedConnection(request, streaming, receive, send, scope, transport.limits, subprotocol)
        await streaming.serve_connection(conn, self.handler)


def _lean_request(scope: Scope) -> ConnectionRequest:
    """The request of a connection that may stay open for hours: its headers packed in one bytes object.

    The scope's header list becomes a :class:`PackedHeaderList` (an ASGI
    header sequence, read by the kernel's request as any other); an empty
    subprotocol list becomes a shared empty tuple.
    """
    packed = PackedHeaderList.pack(scope.get("headers", ()))
    if packed is not None:  # else a header that cannot be packed: the list stays as it is
        scope["headers"] = packed
    if scope.get("subprotocols") == []:
        scope["subprotocols"] = ()
    return ConnectionRequest.from_scope("websocket", scope)
