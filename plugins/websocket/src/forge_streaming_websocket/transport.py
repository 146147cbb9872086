"""The WebSocket transport: routes, the per-connection lifecycle, uvicorn options."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from forge_streaming import ConnectionRequest, Handler, Transport
from starlette.routing import BaseRoute, WebSocketRoute

from .connection import DirectConnection, Limits, QueuedConnection, WebSocketConnection, reject
from .origins import origin_allowed
from .protocol import EXTENSION, ForgeWebSocketProtocol
from .settings import WebSocketSettings

if TYPE_CHECKING:
    from forge_streaming import Streaming

log = logging.getLogger("forge_streaming.websocket")

Scope = dict[str, Any]


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

    def routes(self, endpoints: Mapping[str, Handler | None]) -> list[BaseRoute]:
        return [WebSocketRoute(path, Endpoint(self, handler)) for path, handler in endpoints.items()]

    def server_options(self) -> dict[str, Any]:
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
        request = ConnectionRequest.from_scope("websocket", scope)
        if (await receive())["type"] != "websocket.connect":
            return
        scheme = scope.get("scheme", "ws")
        if not origin_allowed(request.origin, request.headers, transport.settings.allowed_origins,
                              scheme="https" if scheme == "wss" else "http"):
            log.info("refused WebSocket to %s from origin %r (allowed: %s)", request.path, request.origin,
                     transport.settings.allowed_origins or "same origin only")
            await reject(scope, send, 403, f"origin {request.origin!r} is not allowed; "
                                           "list it in websocket.allowed_origins")
            return
        protocol = scope.get("extensions", {}).get(EXTENSION)
        subprotocol = transport.choose_subprotocol(list(scope.get("subprotocols") or ()))
        conn: WebSocketConnection
        if isinstance(protocol, ForgeWebSocketProtocol):
            conn = DirectConnection(request, streaming, receive, send, scope, transport.limits, subprotocol, protocol)
        else:
            conn = QueuedConnection(request, streaming, receive, send, scope, transport.limits, subprotocol)
        await streaming.serve_connection(conn, self.handler)
