"""The room store contract: who is in which room, across every node.

The kernel keeps the connections of its own node for fan-out; the room
store is the shared registry behind presence (``members``) and the list of
rooms. The memory store serves one node; the MQTT plugin shares it across
a cluster.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from .pubsub import BackendHealth, BackendState


@dataclass(frozen=True, slots=True)
class Member:
    """One connection in one room, as every node sees it."""

    connection_id: str
    user_id: str
    node: str = ""
    transport: str = ""
    joined_at: float = field(default_factory=time.time)


class RoomStoreListener(Protocol):
    """What the kernel gives a room store to report changes no member announced itself."""

    def on_members_changed(self, room: str, joined: Sequence[Member], left: Sequence[Member]) -> None:
        """Members of ``room`` on another node appeared or vanished without their own join/leave.

        A node died or was partitioned away (its members left), or came back
        (they joined again). The kernel tells this node's members of the
        room, per user: ``leave`` for a user with no connection left in the
        room, ``join`` for one who was not there. Synchronous; no await.
        """


class RoomStore(ABC):
    """Room membership and presence; registered by name through a hook."""

    name: ClassVar[str]

    def watch(self, listener: RoomStoreListener) -> None:
        """Called once before :meth:`start`: where to report members that vanish or come back
        without a join or leave of their own (a store that spans nodes). A one-node store ignores it."""

    async def start(self, node_id: str) -> None:
        """Prepare the store (connect, load); called once at startup."""

    async def stop(self) -> None:
        """Release what the store holds; called once at shutdown."""

    def health(self) -> BackendHealth:
        """Whether the store can answer now; ``/healthz`` is degraded while it cannot."""
        return BackendHealth(BackendState.UP)

    @abstractmethod
    async def add_member(self, room: str, member: Member) -> None:
        """Record ``member`` in ``room`` (idempotent)."""

    @abstractmethod
    async def remove_member(self, room: str, connection_id: str) -> None:
        """Forget the connection in ``room``; a room left empty disappears."""

    @abstractmethod
    async def members(self, room: str) -> list[Member]:
        """Everyone in ``room`` on every node, in join order."""

    @abstractmethod
    async def rooms(self) -> list[str]:
        """Every room with at least one member, sorted."""

    async def users(self, room: str) -> list[str]:
        """Distinct user ids present in ``room``, in join order."""
        seen: dict[str, None] = {}
        for member in await self.members(room):
            seen.setdefault(member.user_id, None)
        return list(seen)


class LocalMembers:
    """This node's members per room, for a room store that shares them with other nodes (MQTT, NATS).

    A change marks its room; ``publish(room)`` is called once for every
    marked room, ``delay`` seconds after the first change, so a burst of
    joins is one write per room rather than one per join. ``rooms`` is the
    registry itself (room -> connection id -> member); ``pending`` the rooms
    changed and not published yet.
    """

    def __init__(self, publish: Callable[[str], None], delay: float = 0.02) -> None:
        self.rooms: dict[str, dict[str, Member]] = {}
        self.pending: set[str] = set()
        self._publish = publish
        self._delay = delay
        self._handle: asyncio.TimerHandle | None = None

    def add(self, room: str, member: Member) -> None:
        members = self.rooms.setdefault(room, {})
        if member.connection_id not in members:
            members[member.connection_id] = member
            self._mark(room)

    def remove(self, room: str, connection_id: str) -> None:
        members = self.rooms.get(room)
        if members is None or members.pop(connection_id, None) is None:
            return
        if not members:
            del self.rooms[room]
        self._mark(room)

    def members(self, room: str) -> list[Member]:
        return list(self.rooms.get(room, {}).values())

    def _mark(self, room: str) -> None:
        self.pending.add(room)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self._delay, self._flush)

    def _flush(self) -> None:
        self._handle = None
        pending, self.pending = self.pending, set()
        for room in sorted(pending):
            self._publish(room)

    def cancel(self) -> None:
        """Publish nothing more (the store stops; it says what it must itself)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.pending.clear()
