"""The memory backend and room store pass the kernel's contract kit."""

from __future__ import annotations

from forge_streaming.testing import PubSubBackendContract, RoomStoreContract
from forge_streaming_memory import MemoryPubSub, MemoryRoomStore


class TestMemoryPubSub(PubSubBackendContract):
    multi_node = False

    def make_backend(self) -> MemoryPubSub:
        return MemoryPubSub()


class TestMemoryRoomStore(RoomStoreContract):
    multi_node = False

    def make_store(self) -> MemoryRoomStore:
        return MemoryRoomStore()
