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
    return _HeadersMiddleware(app, extra, streaming) if extra else app


class _HeadersMiddleware:
    """Adds transport headers (``Alt-Svc``) to every HTTP response."""

    def __init__(self, app: ASGIApp, headers: dict[str, str], streaming: Streaming | None = None) -> None:
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
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
            self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in fresh.items()]
            self._streaming = None

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + self.headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
