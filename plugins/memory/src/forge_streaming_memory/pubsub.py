"""The memory pub/sub backend: delivery is a function call on this node.

``publish`` hands the envelope to the kernel at once, in the publisher's
own call, so a burst of messages is fanned out without a task switch.
Envelopes of rooms this node did not subscribe to are dropped, as a
broker would.

It is the engine of one node, so it sets each room's order: a room's
positions count up by one from the microsecond clock at the room's first
message in this process, and a room without messages stands at the
clock's value when the process started. So a process that restarts never
gives a position again, and a cursor from an earlier run never equals one
of this run: resuming from it gets ``resync``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

from forge_streaming import (
    BackendListener,
    Envelope,
    EnvelopeKind,
    PubSubBackend,
    RoomPositions,
    StreamingConfig,
    hookimpl,
)


class MemoryPubSub(PubSubBackend):
    name: ClassVar[str] = "memory"

    def __init__(self) -> None:
        self._listener: BackendListener | None = None
        self._rooms: set[str] = set()
        self._positions = RoomPositions()

    async def start(self, node_id: str, listener: BackendListener) -> None:
        self._listener = listener

    async def stop(self) -> None:
        self._listener = None
        self._rooms.clear()

    async def publish(self, envelope: Envelope) -> None:
        self.publish_nowait(envelope)

    def publish_nowait(self, envelope: Envelope) -> bool:
        """Number and deliver ``envelope`` in this call: nothing here ever waits."""
        if envelope.kind is EnvelopeKind.MESSAGE:  # built directly: dataclasses.replace costs twice as much
            envelope = Envelope(envelope.room, envelope.payload, envelope.kind, self._positions.next(envelope.room)[0],
                                envelope.sender, envelope.node, envelope.binary, envelope.id)
        if self._listener is not None and envelope.room in self._rooms:
            self._listener.on_envelope(envelope)
        return True

    async def position(self, room: str) -> int | None:
        """The room's last position; the run's start if it had none; None if it may have been forgotten."""
        positions = self._positions
        last = positions.last(room)
        if last is None:
            return None if positions.forgot else positions.start
        return last

    async def subscribe(self, room: str) -> None:
        self._rooms.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)


@hookimpl
def streaming_register_pubsub_backends() -> Mapping[str, Callable[[StreamingConfig], PubSubBackend]]:
    return {"memory": lambda config: MemoryPubSub()}
