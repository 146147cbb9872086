"""The transport contract: how a transport plugin plugs into the kernel.

A transport class is handed to the kernel by the
``streaming_register_transports`` hook; the kernel makes one instance per
:class:`~forge_streaming.Streaming` service, asks it for ASGI routes (its
endpoints: user handlers and the built-in room endpoint), and starts and
stops it with the service. A transport that is not served over ASGI
(WebTransport over UDP) returns no routes for its sessions and runs its own
server between ``start`` and ``stop``, looking endpoints up with
``streaming.endpoint(name, path)``.

For each client, the transport builds its :class:`~forge_streaming.Connection`
subclass (the I/O) and hands it to ``streaming.serve_connection(conn,
handler)``, which runs the whole life of the connection.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from .service import Streaming

Handler = Callable[[Any], Awaitable[None]]
"""An application's handler: receives the transport's connection (or stream)."""


class Transport(ABC):
    """A way for clients to connect (WebSocket, SSE, WebTransport, ...)."""

    name: ClassVar[str]
    """Registry key and config section name, e.g. ``"websocket"``."""

    default_path: ClassVar[str]
    """Where the built-in room endpoint is served, e.g. ``"/ws"``."""

    def __init__(self, streaming: Streaming) -> None:
        self.streaming = streaming

    @abstractmethod
    def routes(self, endpoints: Mapping[str, Handler | None]) -> list[BaseRoute]:
        """ASGI routes for ``endpoints``: path -> the user's handler, or None for the room protocol."""

    async def start(self) -> None:
        """Called at service startup, after the backend is up."""

    async def stop(self) -> None:
        """Called at service shutdown, after connections were drained."""

    def server_options(self) -> dict[str, Any]:
        """Options this transport needs from the HTTP server (uvicorn keyword arguments)."""
        return {}

    def response_headers(self) -> Mapping[str, str]:
        """Headers to add to every HTTP response of the service (e.g. ``Alt-Svc``)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What the status page and ``/api/stats`` show of this transport."""
        return {}

