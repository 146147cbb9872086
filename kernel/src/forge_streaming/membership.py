"""Room membership on this node: join, leave, replay, and listening to rooms.

One job: which local connections are in which room, and keeping this node
subscribed to a room (and its history warm) while it has members, plus
``rooms.history_linger`` after the last one left.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from . import frames
from .connection import Connection, ConnectionState
from .errors import Refused
from .frames import OutboundFrame
from .history import RoomHistory
from .rooms import Member

if TYPE_CHECKING:
    from .service import Streaming

log = logging.getLogger("forge_streaming")


class Membership:
    """Local members per room, subscriptions, lingering, replay."""

    def __init__(self, streaming: Streaming, history: RoomHistory) -> None:
        self._s = streaming
        self.history = history
        self.local: dict[str, dict[str, Connection]] = {}
        self._subscribed: set[str] = set()
        self._lingering: dict[str, asyncio.TimerHandle] = {}

    async def join(self, conn: Connection, room: str, *, since: int | None = None) -> None:
        """Add ``conn`` to ``room``: hooks, presence, replay from ``since``."""
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
        if room not in self._subscribed:
            self._subscribed.add(room)
            self.history.track(room)
            await s.backend.subscribe(room)
        if conn.state is not ConnectionState.OPEN:
            if room not in self.local:
                self._linger(room)
            return
        self.local.setdefault(room, {})[conn.id] = conn
        conn.rooms.add(room)
        await s.store.add_member(room, Member(conn.id, conn.user_id, s.node_id, conn.transport))
        users = await s.store.users(room)
        conn.send_frame(frames.system_frame("room.joined", {
            "room_id": room, "user_id": conn.user_id, "users": users, "sequence": self.history.position(room)}))
        if since is not None:
            await self.replay(conn, room, since)
        await s.notify(room, frames.presence_frame("join", room_id=room, user_id=conn.user_id), sender=conn)
        await s.plugins.acall("streaming_room_joined", connection=conn, room=room)

    async def replay(self, conn: Connection, room: str, since: int) -> None:
        """Send ``conn`` what ``room`` had after ``since``, asking the cluster if needed.

        When nobody can vouch for the gap, the client is told ``resync`` and
        then sent what history does hold after ``since``.
        """
        history = self.history
        missed = history.since(room, since)
        live: set[bytes] = set()
        if missed is None:
            heard = {e.payload for e in history.recent(room)}
            fetched = await self._s.backend.fetch_history(room, since)
            if fetched is not None:
                # What arrived while asking was delivered live already: do not send it twice.
                live = {e.payload for e in history.recent(room)} - heard
                history.merge(room, since, fetched)
                missed = history.since(room, since)
        if missed is None:
            conn.send_frame(frames.system_frame("resync", {
                "room_id": room, "since": since, "reason": "history no longer holds messages after this sequence",
                "sequence": history.latest(room)}))
            missed = [e for e in history.recent(room) if e.sequence is not None and e.sequence > since]
        for envelope in missed:
            if envelope.payload not in live:
                conn.deliver(OutboundFrame(payload=envelope.payload, room=room, sequence=envelope.sequence))

    async def leave(self, conn: Connection, room: str) -> None:
        if room not in conn.rooms:
            return
        s = self._s
        conn.rooms.discard(room)
        local = self.local.get(room)
        if local is not None:
            local.pop(conn.id, None)
            if not local:
                del self.local[room]
                self._linger(room)
        await s.store.remove_member(room, conn.id)
        await s.notify(room, frames.presence_frame("leave", room_id=room, user_id=conn.user_id), sender=conn)
        if conn.state is ConnectionState.OPEN:
            conn.send_frame(frames.system_frame("room.left", {"room_id": room}))
        await s.plugins.acall("streaming_room_left", connection=conn, room=room)

    async def leave_all(self, conn: Connection) -> None:
        """Take a closed connection out of every room; a failing store does not keep it there."""
        for room in list(conn.rooms):
            try:
                await self.leave(conn, room)
            except Exception:
                log.exception("leaving room %r for closed connection %s failed", room, conn.id)

    def local_members(self, room: str) -> list[Connection]:
        return list(self.local.get(room, {}).values())

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
        try:
            await self._s.backend.unsubscribe(room)
        except Exception:
            log.exception("unsubscribing from room %r failed", room)

    def stop(self) -> None:
        for handle in self._lingering.values():
            handle.cancel()
        self._lingering.clear()
