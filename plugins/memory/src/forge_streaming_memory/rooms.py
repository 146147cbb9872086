"""The memory room store: membership and presence of one node, in dicts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

from forge_streaming import Member, RoomStore, StreamingConfig, hookimpl


class MemoryRoomStore(RoomStore):
    name: ClassVar[str] = "memory"

    def __init__(self) -> None:
        self._rooms: dict[str, dict[str, Member]] = {}

    async def stop(self) -> None:
        self._rooms.clear()

    async def add_member(self, room: str, member: Member) -> None:
        self._rooms.setdefault(room, {}).setdefault(member.connection_id, member)

    async def remove_member(self, room: str, connection_id: str) -> None:
        members = self._rooms.get(room)
        if members is not None:
            members.pop(connection_id, None)
            if not members:
                del self._rooms[room]

    async def members(self, room: str) -> list[Member]:
        return list(self._rooms.get(room, {}).values())

    async def rooms(self) -> list[str]:
        return sorted(self._rooms)


@hookimpl
def streaming_register_room_stores() -> Mapping[str, Callable[[StreamingConfig], RoomStore]]:
    return {"memory": lambda config: MemoryRoomStore()}
