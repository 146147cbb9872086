"""The room store contract: who is in which room, across every node.

The kernel keeps the connections of its own node for fan-out; the room
store is the shared registry behind presence (``members``) and the list of
rooms. The memory store serves one node; the MQTT plugin shares it across
a cluster.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from .pubsub import BackendHealth, BackendState


@dataclass(frozen=True, slots=True)
class Member:
    """One connection in one room, as every node sees it."""

    connection_id: str
    user_id: str
    node: str = ""
    transport: str = ""
    joined_at: float = field(default_factory=time.time)


class RoomStore(ABC):
    """Room membership and presence; registered by name through a hook."""

    name: ClassVar[str]

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
