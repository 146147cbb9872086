"""The Streaming service: a thin facade over the kernel's parts.

Each job lives in its own module; this one builds them and starts and
stops them in order:

- :mod:`.admission`: authenticate, limits, the table of open connections;
- :mod:`.lifecycle`: every connection's life, for every transport;
- :mod:`.membership`: rooms on this node, replay, listening to rooms;
- :mod:`.fanout`: publishing, and delivering what the backend hands back;
- :mod:`.roomprotocol`: the built-in endpoints' JSON frames;
- :mod:`.app`: the ASGI app and the HTTP API.

Data flow of a room message::

    client frame -> transport -> room protocol (hook: received)
      -> publish (hook: before_publish; encoded once) -> pub/sub backend
      -> on_envelope on every node (history) -> Connection.deliver per member

Hooks run once per message or per connection event; the only per-recipient
work is ``Connection.deliver``, which never waits.

What a plugin may use of :class:`Streaming` is listed in
:data:`PLUGIN_API`; everything else is the kernel's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from . import frames, loopguard
from .admission import Admission
from .config import StreamingConfig, build_config, read_yaml, unwrap_forge
from .connection import CloseCode, Connection
from .delivery import FlushScheduler
from .errors import ConfigError, HookFailed, PluginLoadError, UnknownTransport
from .fanout import POSITION_TIMEOUT, FanOut
from .frames import OutboundFrame
from .history import RoomHistory
from .lifecycle import Lifecycle
from .membership import Membership
from .plugins import PluginManager, make_plugin_manager
from .pubsub import BackendHealth, Envelope, PubSubBackend
from .roomprotocol import RoomProtocol
from .rooms import Member, RoomStore
from .transports import Handler, Transport

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("forge_streaming")


class ServiceState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


H = TypeVar("H", bound=Handler)


class HandlerDecorator(Protocol):
    """What ``streaming.handle_websocket(path)`` returns: registers the decorated handler, returns it unchanged."""

    def __call__(self, handler: H, /) -> H: ...


PLUGIN_API = frozenset({
    # what the service is
    "config", "node_id", "state", "started_at", "http_address", "accepting", "transports", "backend", "store",
    "connections", "health", "stats_counters", "count", "flush_scheduler", "room_position",
    # serving connections (transports)
    "endpoints", "endpoint", "serve_connection", "room_protocol_frame",
    # rooms and messages
    "publish", "broadcast", "notify", "ingest", "rooms", "members", "presence", "local_members", "local_rooms",
    "join", "leave",
    # applications
    "handle", "handle_websocket", "handle_sse", "handle_webtransport", "start", "stop", "drain", "running",
    "lifespan", "asgi_app", "server_options",
})
"""The names of :class:`Streaming` a plugin may use; a test fails when plugins/ or contrib/ use another."""


def _raw_config(config: StreamingConfig | Mapping[str, Any] | str | os.PathLike[str] | None) -> dict[str, Any]:
    if config is None:
        path = os.environ.get("FORGE_STREAMING_CONFIG")
        return read_yaml(path) if path else {}
    if isinstance(config, (str, os.PathLike)):
        return read_yaml(config)
    if isinstance(config, StreamingConfig):
        return config.effective()
    unwrapped, _ = unwrap_forge(config)  # Forge's shape as a dict too; what cannot be unwrapped is refused later
    return unwrapped


class Streaming:
    """The real-time service: build one, register handlers, serve it over ASGI.

    ``config`` is a :class:`StreamingConfig`, a mapping shaped like the YAML
    file, a path to one, or None (``$FORGE_STREAMING_CONFIG`` or defaults).
    ``plugins`` are extra plugin objects (modules or instances with hook
    implementations) registered after the installed entry points;
    ``entry_points=False`` loads only those.
    """

    def __init__(
        self,
        config: StreamingConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        *,
        plugins: Iterable[object] = (),
        entry_points: bool = True,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        raw = _raw_config(config)
        plugin_settings = build_config({"plugins": raw.get("plugins") or {}}, environ={}).plugins
        self.plugins: PluginManager = make_plugin_manager(
            allow=plugin_settings.allow,
            deny=plugin_settings.deny,
            entry_points=entry_points,
            plugins=plugins,
        )
        sections: dict[str, Any] = {}
        for result in self.plugins.call("streaming_config_sections"):
            for key, model in (result or {}).items():
                if key in sections and sections[key] is not model:
                    raise PluginLoadError(f"two plugins claim the config section {key!r}")
                sections[key] = model
        self.config: StreamingConfig = build_config(raw, sections=sections, environ=environ)
        self.plugins.call("streaming_configure", config=self.config)

        self.node_id = self.config.server.node_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.state = ServiceState.CREATED
        self.started_at: float | None = None
        self.http_address: tuple[str, int] = (self.config.server.host, self.config.server.port)
        """Where the HTTP server really listens; set by ``forge-streaming serve`` and the test kit."""
        self._app: ASGIApp | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._counters: Counter[str] = Counter()
        self._flusher = FlushScheduler()

        self.transports: dict[str, Transport] = {}
        for result in self.plugins.call("streaming_register_transports"):
            for cls in result or ():
                if cls.name in self.transports:
                    raise PluginLoadError(f"two plugins provide the transport {cls.name!r}")
                self.transports[cls.name] = cls(self)
        self._handlers: dict[str, dict[str, Handler]] = {name: {} for name in self.transports}

        self.backend: PubSubBackend = self._make("pubsub.backend", self.config.pubsub.backend,
                                                 "streaming_register_pubsub_backends")
        self.store: RoomStore = self._make("rooms.store", self.config.rooms.store, "streaming_register_room_stores")

        self._history = RoomHistory(size=self.config.rooms.history_size,
                                    max_rooms=self.config.rooms.history_max_rooms,
                                    max_bytes=self.config.rooms.history_max_bytes,
                                    total_bytes=self.config.rooms.history_total_bytes)
        self._admission = Admission(self, self.plugins, self.config.limits)
        self._membership = Membership(self, self._history)
        self._lifecycle = Lifecycle(self, self._admission, self._membership)
        self._fanout = FanOut(self, self._membership.local, self._history, self._counters, self._membership.listen)
        self._room_protocol = RoomProtocol(self, self._membership, self._fanout, self._counters)
        # Bound straight to the part that does the work: the backend calls these once per message, and a
        # connection's task waits in serve_connection for its whole life (no facade frame kept per connection).
        self.on_envelope = self._fanout.on_envelope  # type: ignore[method-assign]
        self.on_resync = self._fanout.on_resync  # type: ignore[method-assign]
        self.serve_connection = self._lifecycle.serve  # type: ignore[method-assign]

    def _make(self, key: str, name: str, hook: str) -> Any:
        factories: dict[str, Callable[[StreamingConfig], Any]] = {}
        for result in self.plugins.call(hook):
            for factory_name, factory in (result or {}).items():
                if factory_name in factories and factories[factory_name] is not factory:
                    raise PluginLoadError(f"two plugins provide the {key.split('.')[0]} {factory_name!r} ({hook})")
                factories[factory_name] = factory
        if name not in factories:
            raise ConfigError(
                f"{key}: {name!r} is not provided by any installed plugin; available: {sorted(factories) or 'none'}"
                " (is its plugin installed and allowed?)"
            )
        return factories[name](self.config)

    # -- handlers --------------------------------------------------------------

    @overload
    def handle(self, transport: str, path: str, handler: H) -> H: ...

    @overload
    def handle(self, transport: str, path: str, handler: None = None) -> HandlerDecorator: ...

    def handle(self, transport: str, path: str, handler: Handler | None = None) -> Any:
        """Serve ``handler`` at ``path`` on ``transport``; usable as a decorator.

        Refused at once (not at the first connection): an unknown transport,
        a handler that is not ``async def``, a second handler on one path.
        """
        if transport not in self.transports:
            raise UnknownTransport(
                f"no installed plugin provides the transport {transport!r}; installed: {sorted(self.transports)}"
            )
        if self._app is not None:
            raise RuntimeError("handlers must be registered before the ASGI app is built")

        def register(fn: Handler) -> Handler:
            if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)):
                raise TypeError(f"the {transport} handler for {path!r} must be an async function "
                                f"(async def handler(conn)), got {fn!r}")
            if path in self._handlers[transport]:
                raise ValueError(f"a {transport} handler is already registered at {path!r}")
            self._handlers[transport][path] = fn
            return fn

        return register(handler) if handler is not None else register

    @overload
    def handle_websocket(self, path: str, handler: H) -> H: ...

    @overload
    def handle_websocket(self, path: str, handler: None = None) -> HandlerDecorator: ...

    def handle_websocket(self, path: str, handler: Handler | None = None) -> Any:
        """Serve a WebSocket handler at ``path``: ``async def handler(conn)``."""
        return self.handle("websocket", path, handler)

    @overload
    def handle_sse(self, path: str, handler: H) -> H: ...

    @overload
    def handle_sse(self, path: str, handler: None = None) -> HandlerDecorator: ...

    def handle_sse(self, path: str, handler: Handler | None = None) -> Any:
        """Serve an SSE handler at ``path``: ``async def handler(stream)``."""
        return self.handle("sse", path, handler)

    @overload
    def handle_webtransport(self, path: str, handler: H) -> H: ...

    @overload
    def handle_webtransport(self, path: str, handler: None = None) -> HandlerDecorator: ...

    def handle_webtransport(self, path: str, handler: Handler | None = None) -> Any:
        """Serve a WebTransport handler at ``path``: ``async def handler(session)``."""
        return self.handle("webtransport", path, handler)

    def endpoints(self, transport: str) -> dict[str, Handler | None]:
        """What ``transport`` serves, by path: the user's handlers, and None for the room endpoint.

        The room endpoint is at the transport's ``default_path`` unless
        ``server.room_endpoints`` is off or a handler took that path.
        """
        served: dict[str, Handler | None] = dict(self._handlers.get(transport, {}))
        instance = self.transports.get(transport)
        if instance is not None and self.config.server.room_endpoints:
            served.setdefault(instance.default_path, None)
        return served

    def endpoint(self, transport: str, path: str) -> tuple[bool, Handler | None]:
        """``(found, handler)`` for a request to ``path``; handler None means the room protocol."""
        served = self.endpoints(transport)
        return (path in served), served.get(path)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self.state is not ServiceState.CREATED:
            return
        self.state = ServiceState.STARTING
        loop = asyncio.get_running_loop()
        loopguard.install(loop)
        self._flusher = FlushScheduler(loop)
        self.store.watch(self)
        await self.store.start(self.node_id)
        await self.backend.start(self.node_id, self)
        for transport in self.transports.values():
            await transport.start()
        self._admission.start_sweeper()
        self.state = ServiceState.RUNNING
        self.started_at = time.time()
        await self.plugins.acall("streaming_startup", streaming=self)
        log.info("forge-streaming node %s started: transports %s, backend %s, store %s",
                 self.node_id, sorted(self.transports), self.backend.name, self.store.name)

    async def drain(self, timeout: float | None = None) -> None:
        """Tell every client the server is going away, flush, then close them (1001)."""
        if self.state in (ServiceState.DRAINING, ServiceState.STOPPED):
            return
        self.state = ServiceState.DRAINING
        timeout = self.config.server.drain_timeout if timeout is None else timeout
        conns = list(self._admission.connections.values())
        if conns:
            log.info("draining %d connections (timeout %.1fs)", len(conns), timeout)
        notice = frames.encode(frames.system_frame(
            "server.shutdown", {"reconnect_after_ms": int(self.config.server.reconnect_hint * 1000)}))
        for conn in conns:
            try:
                conn.deliver(OutboundFrame(payload=notice))
            except Exception:
                log.exception("telling connection %s of the shutdown failed", conn.id)
        self._flusher.flush_all()
        closing = [asyncio.ensure_future(c.close(CloseCode.GOING_AWAY, "server shutting down")) for c in conns]
        if closing:
            done, pending = await asyncio.wait(closing, timeout=timeout)
            for task in pending:
                task.cancel()

    async def stop(self) -> None:
        if self.state is ServiceState.STOPPED:
            return
        self._admission.stop_sweeper()
        await self.drain()
        self._membership.stop()
        for transport in self.transports.values():
            try:
                await transport.stop()
            except Exception:  # one transport failing to stop must not keep the others running
                log.exception("transport %s failed to stop", transport.name)
        await self.plugins.acall("streaming_shutdown", streaming=self)
        await self.backend.stop()
        await self.store.stop()
        self.state = ServiceState.STOPPED
        log.info("forge-streaming node %s stopped", self.node_id)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Streaming]:
        """``async with streaming.running():`` starts the service and stops it on exit."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[dict[str, Any]]:
        """A Starlette/FastAPI ``lifespan=`` for an app that mounts this service.

        Also puts the service in the lifespan state (``request.state.streaming``).
        """
        async with self.running():
            yield {"streaming": self}

    # -- ASGI ------------------------------------------------------------------------

    def asgi_app(self) -> ASGIApp:
        """The ASGI app (built once): transport routes, status, health and HTTP API."""
        if self._app is None:
            from .app import build_app

            self._app = build_app(self)
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.asgi_app()(scope, receive, send)

    def server_options(self) -> dict[str, Any]:
        """uvicorn options the installed transports need (protocol classes)."""
        options: dict[str, Any] = {}
        for transport in self.transports.values():
            for key, value in transport.server_options().items():
                if key in options and options[key] != value:
                    raise PluginLoadError(f"transports disagree on the server option {key!r}")
                options[key] = value
        return options


    # -- serving connections (the transports' side of the contract) -------------------

    @property
    def accepting(self) -> bool:
        """True while the service admits new connections (running, not draining)."""
        return self.state is ServiceState.RUNNING

    async def serve_connection(self, conn: Connection, handler: Handler | None) -> None:
        """Run ``conn`` from its opening request to its end; ``handler`` None serves the room protocol.

        The one lifecycle of every transport (see :mod:`forge_streaming.lifecycle`):
        returns once the connection has ended and ``streaming_disconnected`` fired.
        """
        await self._lifecycle.serve(conn, handler)

    async def room_protocol_frame(self, conn: Connection, raw: str | bytes) -> None:
        """Act on one room-protocol frame that reached ``conn`` out of band (an SSE POST)."""
        await self._room_protocol.handle(conn, raw)

    @property
    def connections(self) -> Mapping[str, Connection]:
        """Every open connection of this node, by id (read-only)."""
        return self._admission.view

    @property
    def flush_scheduler(self) -> FlushScheduler:
        """The scheduler a transport's :class:`BufferedWriter` flushes through, once per loop iteration."""
        return self._flusher

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name`` (shown in ``/api/stats``)."""
        self._counters[name] += n

    def stats_counters(self) -> Counter[str]:
        """A copy of every counter, sorted by name (a missing one reads 0)."""
        return Counter(dict(sorted(self._counters.items())))

    def room_position(self, room: str) -> int | None:
        """Where ``room`` stands for this node: the position a member joining now is given (None: unknown).

        The newest message this node holds, else where the engine said the room
        stands; never a clock value (positions are the engine's).
        """
        return self._history.position(room)

    def _dropped(self, conn: Connection, reason: str) -> None:
        """Count a connection dropped for cause, tell the plugins, and take it out of its rooms now."""
        self._counters[f"dropped.{reason}"] += 1
        conn.log.warning("connection %s dropped: %s", conn.id, reason)
        try:  # called from transports' write paths: a failing plugin must not break fan-out
            self.plugins.call("streaming_connection_dropped", connection=conn, reason=reason)
        except HookFailed as exc:
            conn.log.error("%s (connection %s)", exc, conn.id, exc_info=exc.error)
        if conn.is_ended:
            self._background(self._lifecycle.closed(conn))

    def _rejected(self, conn: Connection, code: str, message: str) -> None:
        """Count a refused client frame and tell the plugins (``streaming_frame_rejected``)."""
        self._counters[f"rejected.{code}"] += 1
        try:
            self.plugins.call("streaming_frame_rejected", connection=conn, code=code, message=message)
        except HookFailed as exc:
            conn.log.error("%s (connection %s)", exc, conn.id, exc_info=exc.error)

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- rooms ------------------------------------------------------------------------------

    async def join(self, conn: Connection, room: str, *, since: int | None = None) -> None:
        """Add ``conn`` to ``room``: hooks, presence, replay from ``since``; Refused if a hook says no."""
        await self._membership.join(conn, room, since=since)

    async def leave(self, conn: Connection, room: str) -> None:
        await self._membership.leave(conn, room)

    async def rooms(self) -> list[str]:
        """Every room with members, on every node."""
        return await self.store.rooms()

    async def members(self, room: str) -> list[Member]:
        """Every connection in ``room`` on every node, in join order."""
        return await self.store.members(room)

    async def presence(self, room: str) -> list[str]:
        """User ids present in ``room`` (identities, else connection ids)."""
        return await self.store.users(room)

    def local_members(self, room: str) -> list[Connection]:
        """This node's connections in ``room``."""
        return self._membership.local_members(room)

    def local_rooms(self) -> int:
        """How many rooms have members on this node."""
        return len(self._membership.local)

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, room: str, data: Any, *, sender: Connection | None = None,
                      user_id: str | None = None, timeout: float = POSITION_TIMEOUT) -> int | None:
        """Publish a message to ``room`` on every node; return its position, None if a hook dropped it.

        The position is the engine's (the pub/sub backend's): with a backend that
        numbers messages remotely (MQTT's sequencer) this waits for the message to
        come back numbered, a broker round trip or two. Raises ``TimeoutError``
        when no position came within ``timeout`` seconds (a broker outage, a
        sequencer failing over): the message is published all the same, and
        is delivered once the backend can.
        """
        return await self._fanout.publish(room, data, sender=sender, user_id=user_id, timeout=timeout)

    async def broadcast(self, room: str, message: Any) -> int | None:
        """Publish ``message`` to everyone in ``room`` (Forge's ``Broadcast``).

        ``message`` is JSON data, or bytes (a binary room message, as Forge's
        ``[]byte``), or a received :class:`Message` passed straight on.
        """
        return await self._fanout.publish(room, message)

    async def notify(self, room: str, frame: Mapping[str, Any], *, sender: Connection | None = None) -> None:
        """Send a live-only notice (presence, typing) to the room's members, not kept in history."""
        await self._fanout.notify(room, frame, sender=sender)

    # -- backend listener ----------------------------------------------------------------------

    def on_envelope(self, envelope: Envelope) -> None:
        """Fan one envelope out to this node's members of its room (bound to the fan-out at init)."""
        self._fanout.on_envelope(envelope)

    def on_resync(self, reason: str, rooms: Collection[str] | None = None) -> None:
        """The backend may have lost messages of ``rooms`` (None: every room): tell their members."""
        self._fanout.on_resync(reason, rooms)

    def on_members_changed(self, room: str, joined: Sequence[Member], left: Sequence[Member]) -> None:
        """The room store saw members of another node vanish or come back (a node died, or returned)."""
        self._background(self._membership.members_changed(room, joined, left))

    async def ingest(self, room: str, data: Any, *, user_id: str) -> None:
        """Publish a message that came from outside (a device on the broker), as ``user_id``, without waiting."""
        await self._fanout.publish(room, data, user_id=user_id, wait=False)

    def health(self) -> BackendHealth:
        """The backend's health, degraded by the room store's when that is not up."""
        health = self.backend.health()
        store = self.store.health()
        if health.ok and not store.ok:
            return BackendHealth(store.state, f"room store: {store.detail}")
        return health
