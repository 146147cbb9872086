"""Room membership on this node: join, leave, replay, and listening to rooms.

One job: which local connections are in which room, and keeping this node
subscribed to a room (and its history warm) while it has members, plus
``rooms.history_linger`` after the last one left.

A replay (a join with ``since``) goes as fast as the client reads: before
each message the kernel awaits :meth:`Connection.drained`, so at most about
:data:`REPLAY_LOW_WATER` bytes of it wait in the connection's buffer. While
it runs, the member's place in its room's table is held by a
:class:`_ReplayGate`, which keeps the room's live frames (within
``limits.send_buffer`` on top of one message) until the replay is out: the
member gets the replay, then the live frames, in order and once: a live
frame at or below the last position replayed is not sent again (positions
name one message each and only go up). The fan-out sees one more object
with a ``deliver`` method; its hot path is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from . import frames
from .connection import CloseCode, Connection, ConnectionState
from .errors import Refused
from .fanout import numbered
from .frames import OutboundFrame
from .history import RoomHistory
from .pubsub import Envelope, EnvelopeKind
from .rooms import Member

if TYPE_CHECKING:
    from .service import Streaming

log = logging.getLogger("forge_streaming")

REPLAY_LOW_WATER = 64 * 1024
"""A replay delivers its next message once at most this many bytes (or a quarter of
``limits.send_buffer``, if less) are unsent to the client."""

SLOW_CONSUMER = "slow consumer"


class _ReplayGate:
    """Stands in a room's member table for a member being replayed to; holds the room's live frames.

    The fan-out calls :meth:`deliver` as it would the connection's. Past
    ``limit`` held bytes on top of one frame, the member is dropped as a
    slow consumer: live traffic is bounded during a replay as after it.
    Anything else the fan-out may ask of a member is the connection's.
    """

    __slots__ = ("conn", "held", "size", "limit", "allowance", "closed", "done")

    def __init__(self, conn: Connection, limit: int) -> None:
        self.conn = conn
        self.held: list[OutboundFrame] = []
        self.size = 0
        self.limit = limit
        self.allowance = 0
        self.closed = False
        self.done = asyncio.Event()

    def deliver(self, frame: OutboundFrame) -> None:
        if self.closed:
            return
        self.held.append(frame)
        size = len(frame.payload)
        self.size += size
        if self.size > self.limit:
            if size > self.allowance:
                self.allowance = size
            if self.size > self.limit + self.allowance:
                self._overflow()

    def take(self) -> list[OutboundFrame]:
        """The frames held so far, in order; the gate keeps holding what comes next."""
        held, self.held = self.held, []
        self.size = self.allowance = 0
        return held

    def _overflow(self) -> None:
        conn = self.conn
        conn.log.warning("connection %s: %d bytes of live traffic held during its replay (limit %d): "
                         "dropping it as %s", conn.id, self.size, self.limit, SLOW_CONSUMER)
        self.closed = True
        self.held = []
        if conn.is_ended:
            return
        conn.drop(SLOW_CONSUMER)
        conn.streaming._background(conn.close(CloseCode.POLICY_VIOLATION, SLOW_CONSUMER))  # noqa: SLF001

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


class Membership:
    """Local members per room, subscriptions, lingering, replay."""

    def __init__(self, streaming: Streaming, history: RoomHistory) -> None:
        self._s = streaming
        self.history = history
        self.local: dict[str, dict[str, Connection]] = {}
        self._subscribed: set[str] = set()
        self._subscribing: dict[str, asyncio.Future[None]] = {}  # room -> the backend's subscribe, on its way
        self._lingering: dict[str, asyncio.TimerHandle] = {}

    async def join(self, conn: Connection, room: str, *, since: int | None = None) -> None:
        """Add ``conn`` to ``room``: hooks, presence, replay from ``since``.

        Presence is per user, across connections and nodes: the room hears
        ``join`` when a user's first connection joins and ``leave`` when
        their last one leaves.
        """
        try:
            room = frames.validate_room_id(room)
        except frames.InvalidInput as exc:  # a handler's join_room(None) closes its connection with the reason
            raise Refused(exc.message, status=400, code=exc.code) from None
        s = self._s
        if room in conn.rooms:
            if since is not None:
                await self.replay(conn, room, since)
            return
        limit = s.config.limits.max_rooms_per_connection
        if len(conn.rooms) >= limit:
            raise Refused(f"at most {limit} rooms per connection", code="too_many_rooms")
        for result in await s.plugins.acall("streaming_join_room", connection=conn, room=room):
            if result is False:
                raise Refused(f"joining room {room!r} was refused", code="join_refused")
        lingering = self._lingering.pop(room, None)
        if lingering is not None:
            lingering.cancel()
        await self._subscribe(room)
        if conn.state is not ConnectionState.OPEN:
            if room not in self.local:
                self._linger(room)
            return
        members = self.local.setdefault(room, {})
        gate = None if since is None else self._gate(conn)
        members[conn.id] = conn if gate is None else cast(Connection, gate)  # live frames wait for the replay
        conn.rooms.add(room)
        try:
            await s.store.add_member(room, Member(conn.id, conn.user_id, s.node_id, conn.transport))
            present = await s.store.members(room)
            users = list(dict.fromkeys(m.user_id for m in present))
            first_of_user = sum(m.user_id == conn.user_id for m in present) <= 1
            conn.send_frame(frames.system_frame("room.joined", {
                "room_id": room, "user_id": conn.user_id, "users": users,
                "sequence": await self._position(room)}))
            if gate is not None and since is not None:
                await self._replay(conn, room, since, gate)
        finally:
            if gate is not None:
                self._ungate(conn, room, gate)
        if conn.is_ended or room not in conn.rooms:  # dropped or gone during its replay: nothing to announce
            return
        if first_of_user:  # presence is per user: a second tab of someone already here is no news
            await s.notify(room, frames.presence_frame("join", room_id=room, user_id=conn.user_id), sender=conn)
        await s.plugins.acall("streaming_room_joined", connection=conn, room=room)

    async def replay(self, conn: Connection, room: str, since: int) -> None:
        """Send ``conn`` (a member of ``room``) what the room had after ``since``, then what came meanwhile.

        One replay per member and room at a time: a second one waits for
        the first to finish.
        """
        members = self.local.get(room)
        while members is not None and isinstance(current := members.get(conn.id), _ReplayGate):
            await current.done.wait()
            members = self.local.get(room)
        if members is None or members.get(conn.id) is not conn:  # left meanwhile
            return
        gate = self._gate(conn)
        members[conn.id] = cast(Connection, gate)
        try:
            await self._replay(conn, room, since, gate)
        finally:
            self._ungate(conn, room, gate)

    async def listen(self, room: str) -> None:
        """Listen to ``room`` for at least ``rooms.history_linger`` (a publisher waits for its message there).

        Waits for a subscription on its way too (a join's), like a join does.
        """
        await self._subscribe(room)
        if room not in self.local and room not in self._lingering:
            self._linger(room)

    async def _subscribe(self, room: str) -> None:
        """Subscribe this node to ``room``; whoever needs it meanwhile waits for the same subscription.

        A second member joining while the first one's subscribe is on its
        way must not be told ``room.joined`` before the backend delivers the
        room: a message published in between would reach nobody here. The
        subscribe runs in a task of its own, so a joiner cancelled meanwhile
        does not leave the room marked subscribed but never subscribed.
        """
        pending = self._subscribing.get(room)
        if pending is None:
            if room in self._subscribed:
                return
            self._subscribed.add(room)
            self.history.track(room)
            pending = self._subscribing[room] = asyncio.ensure_future(self._s.backend.subscribe(room))
            pending.add_done_callback(lambda task: self._subscribed_or_not(room, task))
        await asyncio.shield(pending)

    def _subscribed_or_not(self, room: str, task: asyncio.Future[None]) -> None:
        self._subscribing.pop(room, None)
        if task.cancelled() or task.exception() is not None:  # the next join tries again
            self._subscribed.discard(room)

    async def _position(self, room: str) -> int:
        """Where a member joining now stands: resuming from here replays only what comes next.

        The latest message this node heard; if none since it listens, where
        the engine says the room stands (0 when it cannot tell: a resume from
        there asks the cluster, or gets ``resync``).
        """
        latest = self.history.latest(room)
        if latest is not None:
            return latest
        position = await self._s.backend.position(room) or 0
        self.history.note(room, position)  # what Streaming.room_position says now (the SSE cursor reads it)
        return position

    def _gate(self, conn: Connection) -> _ReplayGate:
        return _ReplayGate(conn, self._s.config.limits.send_buffer)

    async def _replay(self, conn: Connection, room: str, since: int, gate: _ReplayGate) -> None:
        """What ``room`` had after ``since``, asking the cluster if needed, then the live frames the gate held.

        When nobody can vouch for the gap, the client is told ``resync`` and
        then sent what history does hold after ``since``. Each message waits
        for the client to have taken all but :data:`REPLAY_LOW_WATER` bytes.
        """
        history = self.history
        missed = history.since(room, since)
        if missed is None and history.latest(room) is None:  # heard nothing since listening: does the engine know?
            if since == await self._s.backend.position(room):
                missed = []  # the engine's latest: nothing was published after ``since``
        if missed is None:
            fetched = await self._s.backend.fetch_history(room, since)
            if fetched is not None:  # as published: the position goes into each frame here, as for live ones
                history.merge(room, since, [numbered(e, e.sequence) for e in fetched if e.sequence is not None])
                missed = history.since(room, since)
        if missed is None:
            conn.send_frame(frames.system_frame("resync", {
                "room_id": room, "since": since, "reason": "history no longer holds messages after this sequence",
                "sequence": history.latest(room)}))
            missed = [e for e in history.recent(room) if e.sequence is not None and e.sequence > since]
        below = min(REPLAY_LOW_WATER, max(1, self._s.config.limits.send_buffer // 4))
        frames_out = (OutboundFrame(payload=e.payload, binary=e.binary, room=room, sequence=e.sequence) for e in missed)
        last = await self._paced(conn, gate, frames_out, below, since)
        while last is not None and gate.held:  # live frames that came during the replay (and during this loop)
            # those heard while the replay was gathered are in it already: a position is sent once
            fresh = [f for f in gate.take() if f.sequence is None or f.sequence > last]
            last = await self._paced(conn, gate, fresh, below, last)

    @staticmethod
    async def _paced(conn: Connection, gate: _ReplayGate, out: Iterable[OutboundFrame], below: int,
                     last: int) -> int | None:
        """Deliver ``out`` as the client takes it; the last position sent, None once the member is gone."""
        for frame in out:
            await conn.drained(below)
            if gate.closed or conn.is_ended:
                return None
            conn.deliver(frame)
            if frame.sequence is not None:
                last = frame.sequence
        return last

    def _ungate(self, conn: Connection, room: str, gate: _ReplayGate) -> None:
        """Put the member itself back in its room's table, with anything the gate still holds."""
        gate.done.set()
        members = self.local.get(room)
        if gate.closed or members is None or members.get(conn.id) is not cast(Connection, gate):
            gate.closed = True
            return
        members[conn.id] = conn
        gate.closed = True
        for frame in gate.take():  # only after a failure: a finished replay left the gate empty
            conn.deliver(frame)

    async def leave(self, conn: Connection, room: str) -> None:
        if room not in conn.rooms:
            return
        s = self._s
        conn.rooms.discard(room)
        local = self.local.get(room)
        if local is not None:
            member = local.pop(conn.id, None)
            if isinstance(member, _ReplayGate):
                member.closed = True  # its replay stops
            if not local:
                del self.local[room]
                self._linger(room)
        await s.store.remove_member(room, conn.id)
        if not any(m.user_id == conn.user_id for m in await s.store.members(room)):  # their last connection here
            await s.notify(room, frames.presence_frame("leave", room_id=room, user_id=conn.user_id), sender=conn)
        if conn.state is ConnectionState.OPEN:
            conn.send_frame(frames.system_frame("room.left", {"room_id": room}))
        await s.plugins.acall("streaming_room_left", connection=conn, room=room)

    async def members_changed(self, room: str, joined: Sequence[Member], left: Sequence[Member]) -> None:
        """Tell this node's members of ``room`` who left or came back without a notice of their own.

        Every node hears the same change from the store, so each tells only its
        own members (no publish). Per user, as for announced joins and leaves.
        """
        if room not in self.local:
            return
        present = await self._s.store.members(room)
        arrived = {m.connection_id for m in joined}
        here_before = {m.user_id for m in present if m.connection_id not in arrived}
        here_now = {m.user_id for m in present}
        notices = [frames.presence_frame("leave", room_id=room, user_id=user)
                   for user in dict.fromkeys(m.user_id for m in left) if user not in here_now]
        notices += [frames.presence_frame("join", room_id=room, user_id=user)
                    for user in dict.fromkeys(m.user_id for m in joined) if user not in here_before]
        for notice in notices:
            self._s.on_envelope(Envelope(room=room, payload=frames.encode(notice), kind=EnvelopeKind.NOTICE,
                                         node=self._s.node_id))

    async def leave_all(self, conn: Connection) -> None:
        """Take a closed connection out of every room; a failing store does not keep it there."""
        for room in list(conn.rooms):
            try:
                await self.leave(conn, room)
            except Exception:
                log.exception("leaving room %r for closed connection %s failed", room, conn.id)

    def local_members(self, room: str) -> list[Connection]:
        return [m.conn if isinstance(m, _ReplayGate) else m for m in self.local.get(room, {}).values()]

    # -- listening ------------------------------------------------------------------

    def _linger(self, room: str) -> None:
        """Keep listening to a room that emptied locally for ``rooms.history_linger``.

        A member that reconnects within that time resumes from history
        without a ``resync``; after it, the node unsubscribes.
        """
        delay = self._s.config.rooms.history_linger
        loop = asyncio.get_running_loop()
        self._lingering[room] = loop.call_later(
            delay, lambda: self._s._background(self._unsubscribe_if_empty(room)))  # noqa: SLF001

    async def _unsubscribe_if_empty(self, room: str) -> None:
        self._lingering.pop(room, None)
        if room in self.local or room not in self._subscribed:
            return
        self._subscribed.discard(room)
        self.history.forget(room)  # nobody here listens: its history is freed (a resume from it gets resync)
        try:
            await self._s.backend.unsubscribe(room)
        except Exception:
            log.exception("unsubscribing from room %r failed", room)

    def stop(self) -> None:
        for handle in self._lingering.values():
            handle.cancel()
        self._lingering.clear()
