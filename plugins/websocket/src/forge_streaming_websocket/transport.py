"""The WebSocket transport: routes, the per-connection lifecycle, uvicorn options."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from forge_streaming import (
    CloseCode,
    ConnectionClosed,
    ConnectionRequest,
    Handler,
    Refused,
    Transport,
)
from starlette.routing import BaseRoute, WebSocketRoute

from .connection import DirectConnection, Limits, QueuedConnection, WebSocketConnection
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

    def routes(self, handlers: Mapping[str, Handler], *, room_endpoint: bool) -> list[BaseRoute]:
        routes: list[BaseRoute] = [WebSocketRoute(path, Endpoint(self, handler)) for path, handler in handlers.items()]
        if room_endpoint and self.default_path not in handlers:
            routes.append(WebSocketRoute(self.default_path, Endpoint(self, None)))
        return routes

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


async def _reject(scope: Scope, send: Any, status: int, message: str) -> None:
    """Answer the upgrade request with an HTTP error (before any WebSocket exists)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "websocket.http.response.body", "body": message.encode("utf-8")})
    else:  # servers without the denial-response extension answer 403
        await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION, "reason": message[:120]})


class Endpoint:
    """The ASGI app of one path: a user handler, or the room protocol when ``handler`` is None."""

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
            await _reject(scope, send, 403, f"origin {request.origin!r} is not allowed; "
                                            "list it in websocket.allowed_origins")
            return
        try:
            identity = await streaming.authenticate(request)
        except Refused as exc:
            await _reject(scope, send, exc.status, exc.reason)
            return
        protocol = scope.get("extensions", {}).get(EXTENSION)
        conn: WebSocketConnection
        if isinstance(protocol, ForgeWebSocketProtocol):
            conn = DirectConnection(request, streaming, receive, transport.limits, protocol)
        else:
            conn = QueuedConnection(request, streaming, receive, transport.limits, send)
        conn.identity = identity
        try:
            await streaming.open(conn)
        except Refused as exc:
            await _reject(scope, send, exc.status, exc.reason)
            return
        try:
            conn.subprotocol = transport.choose_subprotocol(list(scope.get("subprotocols") or ()))
            await send({"type": "websocket.accept", "subprotocol": conn.subprotocol})
            conn.attach()
            await self._run(conn)
        finally:
            if isinstance(conn, QueuedConnection):
                await conn.stop()
            code, reason = conn.final_close()
            await streaming.closed(conn, code, reason)

    async def _run(self, conn: WebSocketConnection) -> None:
        """Run the handler; however it ends, the connection ends with the right close code."""
        try:
            if self.handler is None:
                await conn.streaming.serve_room_protocol(conn)
            else:
                await self.handler(conn)
        except ConnectionClosed:
            return
        except Refused as exc:
            conn.log.info("connection %s refused by its handler: %s", conn.id, exc.reason)
            await conn.close(exc.close_code, exc.reason)
        except Exception as exc:
            conn.log.error("handler for %s failed on connection %s: %r", conn.request.path, conn.id, exc,
                           exc_info=exc)
            await conn.close(CloseCode.INTERNAL_ERROR, "internal error")
        else:
            await conn.close(CloseCode.NORMAL, "")
