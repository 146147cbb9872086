"""The memory pub/sub backend: delivery is a function call on this node.

``publish`` hands the envelope to the kernel at once, in the publisher's
own call, so a burst of messages is fanned out without a task switch.
Envelopes of rooms this node did not subscribe to are dropped, as a
broker would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

from forge_streaming import BackendListener, Envelope, PubSubBackend, StreamingConfig, hookimpl


class MemoryPubSub(PubSubBackend):
    name: ClassVar[str] = "memory"

    def __init__(self) -> None:
        self._listener: BackendListener | None = None
        self._rooms: set[str] = set()

    async def start(self, node_id: str, listener: BackendListener) -> None:
        self._listener = listener

    async def stop(self) -> None:
        self._listener = None
        self._rooms.clear()

    async def publish(self, envelope: Envelope) -> None:
        if self._listener is not None and envelope.room in self._rooms:
            self._listener.on_envelope(envelope)

    async def subscribe(self, room: str) -> None:
        self._rooms.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)


@hookimpl
def streaming_register_pubsub_backends() -> Mapping[str, Callable[[StreamingConfig], PubSubBackend]]:
    return {"memory": lambda config: MemoryPubSub()}
