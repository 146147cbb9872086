"""In-process pub/sub backend and room store: one node, no broker."""

from .pubsub import MemoryPubSub
from .rooms import MemoryRoomStore

__all__ = ["MemoryPubSub", "MemoryRoomStore"]
