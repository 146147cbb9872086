"""The one contract between the kernel and every plugin.

Each hook is prefixed ``streaming_``. Hooks marked *awaitable* may be
implemented with ``async def``; the kernel awaits the result. Hooks run
once per connection event or once per message, never once per recipient.

Refusing: ``streaming_authenticate`` and ``streaming_join_room`` refuse by
raising :class:`forge_streaming.Refused` (or, for joins, returning False).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from .config import ConfigSection, StreamingConfig
    from .connection import Connection, ConnectionRequest, Identity
    from .frames import ClientFrame
    from .pubsub import Envelope, PubSubBackend
    from .rooms import RoomStore
    from .service import PublishMessage, Streaming
    from .transports import Transport

PROJECT_NAME = "forge_streaming"
ENTRY_POINT_GROUP = "forge_streaming"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -- registration -------------------------------------------------------------


@hookspec
def streaming_register_transports() -> Sequence[type[Transport]]:  # type: ignore[empty-body]
    """Return the transport classes this plugin provides.

    Fires once per :class:`Streaming` service, when it is built. The kernel
    makes one instance of each class; two plugins giving the same
    ``Transport.name`` is an error at start.
    """


@hookspec
def streaming_register_pubsub_backends() -> Mapping[str, Callable[[StreamingConfig], PubSubBackend]]:  # type: ignore[empty-body]
    """Return pub/sub backend factories by name (the value of ``pubsub.backend``).

    Fires once per service. A factory receives the validated config and
    returns an unstarted backend.
    """


@hookspec
def streaming_register_room_stores() -> Mapping[str, Callable[[StreamingConfig], RoomStore]]:  # type: ignore[empty-body]
    """Return room store factories by name (the value of ``rooms.store``)."""


@hookspec
def streaming_config_sections() -> Mapping[str, type[ConfigSection]]:  # type: ignore[empty-body]
    """Return the config sections this plugin owns, by dotted key.

    E.g. ``{"websocket": WebSocketSettings}`` or ``{"pubsub.mqtt": MqttSettings}``.
    The kernel validates each section with its model at start, so a bad
    value is refused with its full key; ``config.section(key)`` returns it.
    """


# -- lifecycle ------------------------------------------------------------------


@hookspec
def streaming_configure(config: StreamingConfig) -> None:
    """Fires once, after the config is validated, before anything starts.

    Raise :class:`forge_streaming.ConfigError` to refuse a combination of
    values; the server does not start.
    """


@hookspec
def streaming_startup(streaming: Streaming) -> Any:
    """Fires once when the service has started (backend up, transports serving). Awaitable."""


@hookspec
def streaming_shutdown(streaming: Streaming) -> Any:
    """Fires once when the service stops, after connections were drained. Awaitable."""


# -- connections ----------------------------------------------------------------


@hookspec
def streaming_authenticate(request: ConnectionRequest, streaming: Streaming) -> Identity | None | Any:
    """Decide who is connecting, before the connection opens. Awaitable.

    ``streaming`` is the service being connected to (its config, its rooms);
    take only the arguments you need.

    Return an :class:`Identity` to name the client (the first one returned
    wins), None to have no opinion, or raise :class:`Refused` to refuse:
    WebSocket answers 403 before the upgrade, SSE 401/403, WebTransport 403.
    Fires once per connection attempt on every transport.
    """


@hookspec
def streaming_connected(connection: Connection) -> Any:
    """Fires once when a connection is open and counted. Awaitable."""


@hookspec
def streaming_disconnected(connection: Connection, code: int, reason: str) -> Any:
    """Fires once when a connection has ended, after it left its rooms. Awaitable.

    ``code`` is a WebSocket close code on every transport (1000 normal,
    1001 going away, 1006 lost, 1008 policy, 1009 too big, 1011 error);
    ``reason`` says why (``"slow consumer"``, ``"idle timeout"``, ...).
    """


# -- rooms ----------------------------------------------------------------------


@hookspec
def streaming_join_room(connection: Connection, room: str) -> bool | None | Any:
    """Fires before a connection joins a room. Awaitable.

    Return False (or raise :class:`Refused` with a reason) to refuse; the
    client gets an error frame. None or True lets the join go ahead.
    """


@hookspec
def streaming_room_joined(connection: Connection, room: str) -> Any:
    """Fires after a connection joined a room and the room was told. Awaitable."""


@hookspec
def streaming_room_left(connection: Connection, room: str) -> Any:
    """Fires after a connection left a room (by request or by disconnecting). Awaitable."""


# -- messages -------------------------------------------------------------------


@hookspec
def streaming_message_received(connection: Connection, frame: ClientFrame) -> bool | None | Any:
    """Fires once for each room-protocol frame a client sends, after parsing. Awaitable.

    Transform it by changing ``frame.data``; return False to drop it
    silently, or raise :class:`Refused` to answer with an error frame.
    """


@hookspec
def streaming_before_publish(message: PublishMessage) -> bool | None | Any:
    """Fires once per published room message on the publishing node. Awaitable.

    Whatever published it: a client frame, ``Streaming.broadcast``, the
    HTTP API. Change ``message.data`` to transform; return False to drop.
    """


@hookspec
def streaming_delivered(envelope: Envelope, recipients: int, streaming: Streaming) -> None:
    """Fires once per envelope on each node, after fan-out to its local members.

    Synchronous (it runs on the hot path): count, do not wait.
    ``recipients`` is the number of local connections the frame was handed to;
    ``streaming`` is the service that delivered it (implementations may omit it).
    """


@hookspec
def streaming_published(streaming: Streaming, envelope: Envelope, seconds: float) -> None:
    """Fires once per envelope this node hands to the pub/sub backend, after ``publish`` returned.

    Room messages and live notices alike. ``seconds`` is how long the
    backend's ``publish`` took. Synchronous: count, do not wait.
    """


@hookspec
def streaming_frame_rejected(connection: Connection, code: str, message: str) -> None:
    """Fires when a client frame is refused with an error frame.

    Synchronous. ``code`` is the error frame's code (``invalid_json``,
    ``not_member``, ``rate_limited``, ``join_refused``, ...); the connection
    stays open.
    """


@hookspec
def streaming_register_routes(streaming: Streaming) -> Sequence[BaseRoute]:  # type: ignore[empty-body]
    """Return extra Starlette routes to serve next to the kernel's own.

    Fires once per service, when its ASGI app is built. The kernel's routes
    (transports, ``/healthz``, ``/api/*``) come first and win on a clash.
    """


@hookspec
def streaming_connection_dropped(connection: Connection, reason: str) -> None:
    """Fires when the kernel or a transport drops a connection for cause.

    Synchronous. ``reason`` is one of ``slow consumer``, ``rate limited``,
    ``too large``, ``idle timeout``, ``protocol error`` (and may grow).
    """
