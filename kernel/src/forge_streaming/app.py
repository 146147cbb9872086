"""The ASGI app of a Streaming service: transport routes, then every plugin's routes.

The HTTP API (``/healthz``, ``/api/*``) is the built-in plugin
:mod:`forge_streaming.httpapi`. Lifespan starts and stops the service, so
``uvicorn module:streaming`` just works.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from . import httpapi

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from .service import Streaming


def build_app(streaming: Streaming) -> ASGIApp:
    routes: list[BaseRoute] = []
    for transport in streaming.transports.values():
        routes.extend(transport.routes(streaming.endpoints(transport.name)))
    for extra_routes in streaming.plugins.call("streaming_register_routes", streaming=streaming):
        routes.extend(extra_routes or ())
    if not any(getattr(r, "path", None) == "/" for r in routes) and streaming.plugins.has(httpapi.NAME):
        routes.append(httpapi.status_page(streaming))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with streaming.running():
            yield

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.streaming = streaming
    extra: dict[str, str] = {}
    for transport in streaming.transports.values():
        extra.update(transport.response_headers())
    return _HeadersMiddleware(app, extra, streaming)


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                                "frame-ancestors 'none'; form-action 'self'"),
}
"""On every HTTP response the service serves, plugin routes included, unless the response sets its own.

The default policy allows what a same-origin page needs (its own scripts,
styles, WebSocket, SSE and WebTransport endpoints), nothing inline and no framing.
"""


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


class _HeadersMiddleware:
    """Adds transport headers (``Alt-Svc``) and :data:`SECURITY_HEADERS` to every HTTP response.

    A header the response already has (a route's own ``Content-Security-Policy``) is kept as it is.
    """

    def __init__(self, app: ASGIApp, headers: dict[str, str], streaming: Streaming | None = None) -> None:
        self.app = app
        self.headers = _raw({**SECURITY_HEADERS, **headers})
        self.state = getattr(app, "state", None)
        self._streaming = streaming  # headers are read again once it runs: Alt-Svc needs the bound port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._streaming is not None and self._streaming.state.value == "running":
            fresh: dict[str, str] = {}
            for transport in self._streaming.transports.values():
                fresh.update(transport.response_headers())
            self.headers = _raw({**SECURITY_HEADERS, **fresh})
            self._streaming = None
        added = self.headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                message["headers"] = headers + [h for h in added if h[0] not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)
