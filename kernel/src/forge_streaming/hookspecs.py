"""The one contract between the kernel and every plugin.

Each hook is prefixed ``streaming_``. Hooks marked *awaitable* may be
implemented with ``async def``; the kernel awaits the result. Hooks run
once per connection event or once per message, never once per recipient.

Refusing: ``streaming_authenticate`` and ``streaming_join_room`` refuse by
raising :class:`forge_streaming.Refused` (or, for joins, returning False).

Order: pluggy calls the most recently registered implementation first;
plugins given to ``Streaming(plugins=[...])`` come after the installed
entry points, so they are asked first. ``tryfirst``/``trylast`` on
``@hookimpl`` change that.

An ``async def`` implementation of a hook that is not awaitable is refused
when the plugin loads (it would never run): :data:`AWAITABLE_HOOKS` lists
the hooks that may be awaited.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from .config import ConfigSection, StreamingConfig
    from .connection import Connection, ConnectionRequest, Identity
    from .fanout import PublishMessage
    from .frames import ClientFrame
    from .pubsub import Envelope, PubSubBackend
    from .rooms import RoomStore
    from .service import Streaming
    from .transports import Transport

PROJECT_NAME = "forge_streaming"
ENTRY_POINT_GROUP = "forge_streaming"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

AWAITABLE_HOOKS = frozenset({
    "streaming_startup", "streaming_shutdown", "streaming_authenticate", "streaming_connected",
    "streaming_disconnected", "streaming_join_room", "streaming_room_joined", "streaming_room_left",
    "streaming_message_received", "streaming_before_publish",
})
"""Hooks whose implementations may be ``async def``; the kernel awaits them."""


# -- registration -------------------------------------------------------------


@hookspec
def streaming_register_transports() -> Sequence[type[Transport]]:  # type: ignore[empty-body]
    """Return the transport classes this plugin provides (a list; every plugin's are collected).

    Fires once per :class:`Streaming` service, when it is built. The kernel
    makes one instance of each class; two plugins giving the same
    ``Transport.name`` is an error at start.
    """


@hookspec
def streaming_register_pubsub_backends() -> Mapping[str, Callable[[StreamingConfig], PubSubBackend]]:  # type: ignore[empty-body]
    """Return pub/sub backend factories by name (the value of ``pubsub.backend``).

    Fires once per service. A factory receives the validated config and
    returns an unstarted backend. Two plugins giving the same name is an error.
    """


@hookspec
def streaming_register_room_stores() -> Mapping[str, Callable[[StreamingConfig], RoomStore]]:  # type: ignore[empty-body]
    """Return room store factories by name (the value of ``rooms.store``).

    Fires once per service; a factory receives the validated config and
    returns an unstarted :class:`forge_streaming.RoomStore`.
    """


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

    :param config: the whole validated configuration, plugin sections included.

    Raise :class:`forge_streaming.ConfigError` to refuse a combination of
    values; the server does not start.
    """


@hookspec
def streaming_startup(streaming: Streaming) -> Any:
    """Fires once when the service has started (backend up, transports serving). Awaitable.

    :param streaming: the service that started.
    """


@hookspec
def streaming_shutdown(streaming: Streaming) -> Any:
    """Fires once when the service stops, after connections were drained. Awaitable.

    :param streaming: the service that is stopping; its backend is still up.
    """


# -- connections ----------------------------------------------------------------


@hookspec(firstresult=True)
def streaming_authenticate(request: ConnectionRequest, streaming: Streaming) -> Identity | None | Any:
    """Decide who is connecting, before the connection opens. Awaitable; first result wins.

    :param request: what the client sent: path, query, headers, cookies, client address.
    :param streaming: the service being connected to (its config, its rooms).

    Take only the arguments you need. Return an :class:`Identity` to name
    the client (the first one returned wins: later implementations are not
    asked), None to have no opinion, or raise :class:`Refused` to refuse
    with its ``status`` (401, 403, ...) on every transport. Fires once per
    connection attempt on every transport.
    """


@hookspec
def streaming_connected(connection: Connection) -> Any:
    """Fires once when a connection is open, counted and accepted, before its handler runs. Awaitable.

    :param connection: the new connection (its ``identity``, ``request``, ``transport``).

    An implementation that raises closes only this connection (1011).
    """


@hookspec
def streaming_disconnected(connection: Connection, code: int, reason: str) -> Any:
    """Fires exactly once when a connection that was accepted has ended, after it left its rooms. Awaitable.

    :param connection: the connection that ended.
    :param code: a WebSocket close code on every transport (1000 normal,
        1001 going away, 1006 lost, 1008 policy, 1009 too big, 1011 error).
    :param reason: why (``"slow consumer"``, ``"idle timeout"``, ...).
    """


# -- rooms ----------------------------------------------------------------------


@hookspec
def streaming_join_room(connection: Connection, room: str) -> bool | None | Any:
    """Fires before a connection joins a room. Awaitable.

    :param connection: the connection asking to join.
    :param room: the room id.

    Every implementation is asked: any one returning False (or raising
    :class:`Refused` with a reason) refuses, and the client gets an error
    frame. None or True lets the join go ahead.
    """


@hookspec
def streaming_room_joined(connection: Connection, room: str) -> Any:
    """Fires after a connection joined a room and the room was told. Awaitable.

    :param connection: the connection that joined.
    :param room: the room id.
    """


@hookspec
def streaming_room_left(connection: Connection, room: str) -> Any:
    """Fires after a connection left a room (by request or by disconnecting). Awaitable.

    :param connection: the connection that left.
    :param room: the room id.
    """


# -- messages -------------------------------------------------------------------


@hookspec
def streaming_message_received(connection: Connection, frame: ClientFrame) -> bool | None | Any:
    """Fires once for each room-protocol frame a client sends, after parsing. Awaitable.

    :param connection: the connection that sent it.
    :param frame: the parsed frame (``type``, ``room_id``, ``data``, ``since``).

    Transform it by changing ``frame.data``; return False to drop it
    silently, or raise :class:`Refused` to answer with an error frame.
    Every implementation runs, in order.
    """


@hookspec
def streaming_before_publish(message: PublishMessage) -> bool | None | Any:
    """Fires once per published room message on the publishing node. Awaitable.

    :param message: the message (``room``, ``data``, ``user_id``, ``sender``).

    Whatever published it: a client frame, ``Streaming.broadcast``, the
    HTTP API, a device on the broker. Change ``message.data`` to transform;
    return False to drop. Every implementation runs, in order.
    """


@hookspec
def streaming_delivered(envelope: Envelope, recipients: int, streaming: Streaming) -> None:
    """Fires once per envelope on each node, after fan-out to its local members.

    Synchronous (it runs on the hot path): count, do not wait.

    :param envelope: what was delivered (room, payload, kind, sequence).
    :param recipients: the number of local connections the frame was handed to.
    :param streaming: the service that delivered it (implementations may omit it).
    """


@hookspec
def streaming_published(streaming: Streaming, envelope: Envelope, seconds: float) -> None:
    """Fires once per envelope this node hands to the pub/sub backend, after ``publish`` returned.

    Room messages and live notices alike. Synchronous: count, do not wait.

    :param streaming: the publishing service.
    :param envelope: what was handed to the backend.
    :param seconds: how long the backend's ``publish`` took.
    """


@hookspec
def streaming_frame_rejected(connection: Connection, code: str, message: str) -> None:
    """Fires when a client frame is refused with an error frame.

    Synchronous; the connection stays open.

    :param connection: the connection whose frame was refused.
    :param code: the error frame's code (``invalid_json``, ``not_member``,
        ``rate_limited``, ``join_refused``, ...).
    :param message: the human-readable message sent with it.
    """


@hookspec
def streaming_register_routes(streaming: Streaming) -> Sequence[BaseRoute]:  # type: ignore[empty-body]
    """Return extra Starlette routes to serve next to the kernel's own.

    :param streaming: the service whose app is being built.

    Fires once per service, when its ASGI app is built. The kernel's routes
    (transports, ``/healthz``, ``/api/*``) come first and win on a clash.
    """


@hookspec
def streaming_connection_dropped(connection: Connection, reason: str) -> None:
    """Fires when the kernel or a transport drops a connection for cause.

    Synchronous.

    :param connection: the connection being dropped.
    :param reason: one of ``slow consumer``, ``idle timeout``, ``delivery failed``,
        ``too large``, ``protocol error`` (and may grow).
    """
