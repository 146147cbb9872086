"""The Streaming service: connections, rooms, presence, history, publishing.

Data flow of a room message::

    client frame -> transport -> handle_client_frame (hook: received)
      -> publish (hook: before_publish; encoded once) -> pub/sub backend
      -> on_envelope on every node (history) -> Connection.deliver per member

Hooks run once per message or per connection event; the only per-recipient
work is ``Connection.deliver``, which never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import frames, loopguard
from .config import StreamingConfig, build_config, read_yaml
from .connection import CloseCode, Connection, ConnectionRequest, ConnectionState, Identity
from .delivery import FlushScheduler
from .errors import ConfigError, ConnectionClosed, HookFailed, PluginLoadError, Refused, UnknownTransport
from .frames import ClientFrame, OutboundFrame, ProtocolError
from .history import RoomHistory, Sequencer
from .limits import TokenBucket
from .plugins import PluginManager, make_plugin_manager
from .pubsub import BackendHealth, Envelope, EnvelopeKind, PubSubBackend
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


@dataclass(slots=True)
class PublishMessage:
    """A room message about to be published; ``streaming_before_publish`` may change ``data``."""

    room: str
    data: Any
    user_id: str
    sender: Connection | None = None


def _raw_config(config: StreamingConfig | Mapping[str, Any] | str | os.PathLike[str] | None) -> dict[str, Any]:
    if config is None:
        path = os.environ.get("FORGE_STREAMING_CONFIG")
        return read_yaml(path) if path else {}
    if isinstance(config, (str, os.PathLike)):
        return read_yaml(config)
    if isinstance(config, StreamingConfig):
        return config.effective()
    return dict(config)


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

        self.connections: dict[str, Connection] = {}
        self._local: dict[str, dict[str, Connection]] = {}
        self._per_ip: Counter[str] = Counter()
        self._per_user: Counter[str] = Counter()
        self.history = RoomHistory(size=self.config.rooms.history_size, max_rooms=self.config.rooms.history_max_rooms)
        self.sequencer = Sequencer()
        self.flusher = FlushScheduler()
        self.counters: Counter[str] = Counter()
        self._app: ASGIApp | None = None
        self._sweeper: asyncio.Future[None] | None = None
        self._subscribed: set[str] = set()
        self._lingering: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._deliver_hook = self.plugins.hook.streaming_delivered
        self._has_deliver_hook = bool(self._deliver_hook.get_hookimpls())
        self._published_hook = self.plugins.hook.streaming_published
        self._has_published_hook = bool(self._published_hook.get_hookimpls())

    def _make(self, key: str, name: str, hook: str) -> Any:
        factories: dict[str, Callable[[StreamingConfig], Any]] = {}
        for result in self.plugins.call(hook):
            factories.update(result or {})
        if name not in factories:
            raise ConfigError(
                f"{key}: {name!r} is not provided by any installed plugin; available: {sorted(factories) or 'none'}"
                " (is its plugin installed and allowed?)"
            )
        return factories[name](self.config)

    # -- handlers --------------------------------------------------------------

    def handle(self, transport: str, path: str, handler: Handler | None = None) -> Any:
        """Serve ``handler`` at ``path`` on ``transport``; usable as a decorator."""
        if transport not in self.transports:
            raise UnknownTransport(
                f"no installed plugin provides the transport {transport!r}; installed: {sorted(self.transports)}"
            )
        if self._app is not None:
            raise RuntimeError("handlers must be registered before the ASGI app is built")

        def register(fn: Handler) -> Handler:
            self._handlers[transport][path] = fn
            return fn

        return register(handler) if handler is not None else register

    def handle_websocket(self, path: str, handler: Handler | None = None) -> Any:
        """Serve a WebSocket handler at ``path``: ``async def handler(conn)``."""
        return self.handle("websocket", path, handler)

    def handle_sse(self, path: str, handler: Handler | None = None) -> Any:
        """Serve an SSE handler at ``path``: ``async def handler(stream)``."""
        return self.handle("sse", path, handler)

    def handle_webtransport(self, path: str, handler: Handler | None = None) -> Any:
        """Serve a WebTransport handler at ``path``: ``async def handler(session)``."""
        return self.handle("webtransport", path, handler)

    def handlers(self, transport: str) -> Mapping[str, Handler]:
        return self._handlers.get(transport, {})

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self.state is not ServiceState.CREATED:
            return
        self.state = ServiceState.STARTING
        loop = asyncio.get_running_loop()
        loopguard.install(loop)
        self.flusher = FlushScheduler(loop)
        await self.store.start(self.node_id)
        await self.backend.start(self.node_id, self)
        for transport in self.transports.values():
            await transport.start()
        if self.config.limits.idle_timeout:
            self._sweeper = asyncio.ensure_future(self._sweep_idle(self.config.limits.idle_timeout))
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
        conns = list(self.connections.values())
        if conns:
            log.info("draining %d connections (timeout %.1fs)", len(conns), timeout)
        notice = frames.encode(frames.system_frame(
            "server.shutdown", {"reconnect_after_ms": int(self.config.server.reconnect_hint * 1000)}))
        for conn in conns:
            conn.deliver(OutboundFrame(payload=notice))
        self.flusher.flush_all()
        closing = [asyncio.ensure_future(c.close(CloseCode.GOING_AWAY, "server shutting down")) for c in conns]
        if closing:
            done, pending = await asyncio.wait(closing, timeout=timeout)
            for task in pending:
                task.cancel()

    async def _sweep_idle(self, timeout: float) -> None:
        """Close connections that sent nothing for ``limits.idle_timeout``; one task for all."""
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            cutoff = time.monotonic() - timeout
            for conn in [c for c in self.connections.values() if c.last_activity < cutoff]:
                self.dropped(conn, "idle timeout")
                self._background(conn.close(CloseCode.GOING_AWAY, "idle timeout"))

    async def stop(self) -> None:
        if self.state is ServiceState.STOPPED:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.drain()
        for handle in self._lingering.values():
            handle.cancel()
        self._lingering.clear()
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

    # -- connections -------------------------------------------------------------------

    async def authenticate(self, request: ConnectionRequest) -> Identity | None:
        """Run the authenticate hooks; raise Refused, or return the identity (or None)."""
        if self.state is not ServiceState.RUNNING:
            raise Refused("server is not accepting connections", status=503, close_code=1013, code="unavailable")
        identity = None
        try:
            results = await self.plugins.acall("streaming_authenticate", request=request, streaming=self)
        except HookFailed as exc:
            log.error("%s; refusing the %s connection to %s", exc, request.transport, request.path,
                      exc_info=exc.error)
            raise Refused("internal error", status=500, close_code=CloseCode.INTERNAL_ERROR,
                          code="internal_error") from exc
        for result in results:
            if result is not None and identity is None:
                identity = result
        return identity

    async def open(self, conn: Connection) -> None:
        """Admit and count an authenticated connection; raise Refused past a limit."""
        limits = self.config.limits
        ip = conn.request.client[0] if conn.request.client else ""
        if len(self.connections) >= limits.max_connections:
            raise Refused(f"server is full ({limits.max_connections} connections)", status=503,
                          close_code=1013, code="server_full")
        if limits.max_connections_per_ip and self._per_ip[ip] >= limits.max_connections_per_ip:
            raise Refused(f"too many connections from {ip}", status=429, close_code=1008, code="too_many_connections")
        if limits.max_connections_per_user and self._per_user[conn.user_id] >= limits.max_connections_per_user:
            raise Refused(f"too many connections for user {conn.user_id!r}", status=429, close_code=1008,
                          code="too_many_connections")
        if limits.messages_per_second:
            conn.rate_limit = TokenBucket(limits.messages_per_second, limits.message_burst)
        self.connections[conn.id] = conn
        self._per_ip[ip] += 1
        self._per_user[conn.user_id] += 1
        conn.state = ConnectionState.OPEN
        self.counters[f"connections_opened.{conn.transport}"] += 1
        conn.log.debug("connection %s open from %s as %s", conn.id, ip, conn.user_id)
        await self.plugins.acall("streaming_connected", connection=conn)

    async def closed(self, conn: Connection, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Forget a connection that ended: leave its rooms, uncount it, fire the hook. Idempotent."""
        if self.connections.pop(conn.id, None) is None:
            conn.state = ConnectionState.CLOSED
            return
        conn.state = ConnectionState.CLOSED
        conn.close_code, conn.close_reason = code, reason
        ip = conn.request.client[0] if conn.request.client else ""
        for counter, key in ((self._per_ip, ip), (self._per_user, conn.user_id)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]
        for room in list(conn.rooms):
            try:
                await self.leave(conn, room)
            except Exception:  # a failing store must not keep a dead connection around
                log.exception("leaving room %r for closed connection %s failed", room, conn.id)
        conn.log.debug("connection %s closed (%s %s)", conn.id, code, reason)
        try:
            await self.plugins.acall("streaming_disconnected", connection=conn, code=code, reason=reason)
        except HookFailed as exc:
            conn.log.error("%s (connection %s)", exc, conn.id, exc_info=exc.error)

    def dropped(self, conn: Connection, reason: str) -> None:
        """A transport or the kernel dropped ``conn`` for cause (slow consumer, ...)."""
        self.counters[f"dropped.{reason}"] += 1
        conn.log.warning("connection %s dropped: %s", conn.id, reason)
        try:  # called from transports' write paths: a failing plugin must not break fan-out
            self.plugins.call("streaming_connection_dropped", connection=conn, reason=reason)
        except HookFailed as exc:
            conn.log.error("%s (connection %s)", exc, conn.id, exc_info=exc.error)

    # -- rooms ------------------------------------------------------------------------------

    async def join(self, conn: Connection, room: str, *, since: int | None = None) -> None:
        """Add ``conn`` to ``room``: hooks, presence, replay from ``since``."""
        if room in conn.rooms:
            if since is not None:
                await self.replay(conn, room, since)
            return
        if len(conn.rooms) >= self.config.limits.max_rooms_per_connection:
            raise Refused(f"at most {self.config.limits.max_rooms_per_connection} rooms per connection",
                          code="too_many_rooms")
        for result in await self.plugins.acall("streaming_join_room", connection=conn, room=room):
            if result is False:
                raise Refused(f"joining room {room!r} was refused", code="join_refused")
        lingering = self._lingering.pop(room, None)
        if lingering is not None:
            lingering.cancel()
        if room not in self._subscribed:
            self._subscribed.add(room)
            self.history.track(room)
            await self.backend.subscribe(room)
        if conn.state is not ConnectionState.OPEN:
            if room not in self._local:
                self._linger(room)
            return
        self._local.setdefault(room, {})[conn.id] = conn
        conn.rooms.add(room)
        await self.store.add_member(room, Member(conn.id, conn.user_id, self.node_id, conn.transport))
        users = await self.store.users(room)
        conn.send_frame(frames.system_frame("room.joined", {
            "room_id": room, "user_id": conn.user_id, "users": users, "sequence": self.history.position(room)}))
        if since is not None:
            await self.replay(conn, room, since)
        await self.notify(room, frames.presence_frame("join", room_id=room, user_id=conn.user_id), sender=conn)
        await self.plugins.acall("streaming_room_joined", connection=conn, room=room)

    async def replay(self, conn: Connection, room: str, since: int) -> None:
        """Send ``conn`` what ``room`` had after ``since``, asking the cluster if needed.

        When nobody can vouch for the gap, the client is told ``resync`` and
        then sent what history does hold after ``since``.
        """
        missed = self.history.since(room, since)
        live: set[bytes] = set()
        if missed is None:
            heard = {e.payload for e in self.history.recent(room)}
            fetched = await self.backend.fetch_history(room, since)
            if fetched is not None:
                # What arrived while asking was delivered live already: do not send it twice.
                live = {e.payload for e in self.history.recent(room)} - heard
                self.history.merge(room, since, fetched)
                missed = self.history.since(room, since)
        if missed is None:
            conn.send_frame(frames.system_frame("resync", {
                "room_id": room, "since": since, "reason": "history no longer holds messages after this sequence",
                "sequence": self.history.latest(room)}))
            missed = [e for e in self.history.recent(room) if e.sequence is not None and e.sequence > since]
        for envelope in missed:
            if envelope.payload not in live:
                conn.deliver(OutboundFrame(payload=envelope.payload, room=room, sequence=envelope.sequence))

    async def leave(self, conn: Connection, room: str) -> None:
        if room not in conn.rooms:
            return
        conn.rooms.discard(room)
        local = self._local.get(room)
        if local is not None:
            local.pop(conn.id, None)
            if not local:
                del self._local[room]
                self._linger(room)
        await self.store.remove_member(room, conn.id)
        await self.notify(room, frames.presence_frame("leave", room_id=room, user_id=conn.user_id), sender=conn)
        if conn.state is ConnectionState.OPEN:
            conn.send_frame(frames.system_frame("room.left", {"room_id": room}))
        await self.plugins.acall("streaming_room_left", connection=conn, room=room)

    def _linger(self, room: str) -> None:
        """Keep listening to a room that emptied locally for ``rooms.history_linger``.

        A member that reconnects within that time resumes from history
        without a ``resync``; after it, the node unsubscribes.
        """
        delay = self.config.rooms.history_linger
        loop = asyncio.get_running_loop()
        self._lingering[room] = loop.call_later(
            delay, lambda: self._background(self._unsubscribe_if_empty(room)))

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unsubscribe_if_empty(self, room: str) -> None:
        self._lingering.pop(room, None)
        if room in self._local or room not in self._subscribed:
            return
        self._subscribed.discard(room)
        try:
            await self.backend.unsubscribe(room)
        except Exception:
            log.exception("unsubscribing from room %r failed", room)

    async def rooms(self) -> list[str]:
        """Every room with members, on every node."""
        return await self.store.rooms()

    async def members(self, room: str) -> list[Member]:
        return await self.store.members(room)

    async def presence(self, room: str) -> list[str]:
        """User ids present in ``room`` (identities, else connection ids)."""
        return await self.store.users(room)

    def local_members(self, room: str) -> list[Connection]:
        return list(self._local.get(room, {}).values())

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, room: str, data: Any, *, sender: Connection | None = None,
                      user_id: str | None = None) -> int | None:
        """Publish a message to ``room`` on every node; return its sequence, None if a hook dropped it."""
        message = PublishMessage(room=room, data=data, user_id=user_id or (sender.user_id if sender else "server"),
                                 sender=sender)
        for result in await self.plugins.acall("streaming_before_publish", message=message):
            if result is False:
                return None
        sequence = self.sequencer.next(room)
        payload = frames.encode(frames.message_frame(
            room_id=room, user_id=message.user_id, data=message.data, sequence=sequence))
        await self._publish_envelope(Envelope(room=room, payload=payload, kind=EnvelopeKind.MESSAGE,
                                            sequence=sequence, sender=sender.id if sender else None,
                                            node=self.node_id))
        self.counters["published"] += 1
        return sequence

    async def _publish_envelope(self, envelope: Envelope) -> None:
        """Hand ``envelope`` to the backend, timing it for ``streaming_published`` when a plugin listens."""
        if not self._has_published_hook:
            await self.backend.publish(envelope)
            return
        started = time.perf_counter()
        await self.backend.publish(envelope)
        try:
            self._published_hook(streaming=self, envelope=envelope, seconds=time.perf_counter() - started)
        except Exception:
            log.exception("a streaming_published hook failed (room %r)", envelope.room)

    async def broadcast(self, room: str, message: Any) -> int | None:
        """Publish ``message`` to everyone in ``room`` (the seed's ``Broadcast``)."""
        return await self.publish(room, message)

    async def notify(self, room: str, frame: Mapping[str, Any], *, sender: Connection | None = None) -> None:
        """Send a live-only notice (presence, typing) to the room's members, not kept in history."""
        await self._publish_envelope(Envelope(room=room, payload=frames.encode(dict(frame)), kind=EnvelopeKind.NOTICE,
                                            sender=sender.id if sender else None, node=self.node_id))

    # -- backend listener (hot path) ----------------------------------------------------------

    def on_envelope(self, envelope: Envelope) -> None:
        """Fan one envelope out to this node's members of its room."""
        room = envelope.room
        if envelope.sequence is not None:
            self.sequencer.observe(room, envelope.sequence)
            self.history.record(envelope)
        members = self._local.get(room)
        delivered = 0
        if members:
            frame = OutboundFrame(payload=envelope.payload, room=room, sequence=envelope.sequence,
                                  sender=envelope.sender)
            sender = envelope.sender
            for conn_id, conn in list(members.items()):
                if conn_id != sender:
                    conn.deliver(frame)
                    delivered += 1
        self.counters["deliveries"] += delivered
        if self._has_deliver_hook:
            try:
                self._deliver_hook(envelope=envelope, recipients=delivered, streaming=self)
            except Exception:
                log.exception("a streaming_delivered hook failed (room %r); fan-out goes on", room)

    def on_resync(self, reason: str, rooms: Collection[str] | None = None) -> None:
        """The backend may have lost messages of ``rooms`` (None: every room): their members are told to resync."""
        self.history.gap(rooms)  # a resume across the hole must get resync, not a silent hole
        affected = self._local.items() if rooms is None else [(r, self._local[r]) for r in rooms if r in self._local]
        for room, members in affected:
            payload = frames.encode(frames.system_frame("resync", {
                "room_id": room, "reason": reason, "sequence": self.history.latest(room)}))
            frame = OutboundFrame(payload=payload, room=room)
            for conn in list(members.values()):
                conn.deliver(frame)

    def health(self) -> BackendHealth:
        return self.backend.health()

    # -- the room protocol -----------------------------------------------------------------------

    async def serve_room_protocol(self, conn: Connection) -> None:
        """Read room-protocol frames from ``conn`` until it closes."""
        try:
            while True:
                message = await conn.read_message()
                await self.handle_client_frame(conn, message.data)
        except ConnectionClosed:
            return

    async def handle_client_frame(self, conn: Connection, raw: str | bytes) -> None:
        """Act on one client frame; answer anything refused with an error frame."""
        conn.touch()
        if conn.rate_limit is not None:
            wait = conn.rate_limit.take()
            if wait:
                text = f"more than {conn.rate_limit.rate:g} messages a second"
                self.rejected(conn, "rate_limited", text)
                conn.send_frame(frames.error_frame("rate_limited", text, retry_after_ms=max(1, int(wait * 1000))))
                return
        try:
            frame = frames.parse_client_frame(raw, max_size=self.config.limits.max_message_size)
            await self._act(conn, frame)
        except ProtocolError as exc:
            self.rejected(conn, exc.code, exc.message)
            conn.send_frame(frames.error_frame(exc.code, exc.message))
        except Refused as exc:
            self.rejected(conn, exc.code, exc.reason)
            conn.send_frame(frames.error_frame(exc.code, exc.reason))
        except HookFailed as exc:
            conn.log.error("%s while serving connection %s; closing it", exc, conn.id, exc_info=exc.error)
            await conn.close(CloseCode.INTERNAL_ERROR, "internal error")

    def rejected(self, conn: Connection, code: str, message: str) -> None:
        """Count a refused client frame and tell the plugins (``streaming_frame_rejected``)."""
        self.counters[f"rejected.{code}"] += 1
        try:
            self.plugins.call("streaming_frame_rejected", connection=conn, code=code, message=message)
        except HookFailed as exc:
            conn.log.error("%s (connection %s)", exc, conn.id, exc_info=exc.error)

    async def _act(self, conn: Connection, frame: ClientFrame) -> None:
        for result in await self.plugins.acall("streaming_message_received", connection=conn, frame=frame):
            if result is False:
                return
        room = frame.room_id
        if frame.type == "join":
            await self.join(conn, room, since=frame.since)
        elif frame.type == "leave":
            if room not in conn.rooms:
                raise ProtocolError("not_member", f"not a member of room {room!r}")
            await self.leave(conn, room)
        elif room not in conn.rooms:
            raise ProtocolError("not_member", f"join room {room!r} before sending to it")
        elif frame.type == "message":
            self.counters[f"messages_in.{conn.transport}"] += 1
            await self.publish(room, frame.data, sender=conn)
        elif frame.type == "typing":
            await self.notify(room, frames.presence_frame("typing", room_id=room, user_id=conn.user_id,
                                                          data=bool(frame.data)), sender=conn)
