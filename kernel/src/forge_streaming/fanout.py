"""Publishing and fan-out: a message goes to the backend once, comes back once per node.

Hot path. A room message is encoded once per publish; each node hands the
shared frame to its local members with one ``deliver`` call each. A member
whose ``deliver`` raises is dropped (reason ``delivery failed``); the
sender and the rest of the room carry on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import frames
from .connection import CloseCode, Connection
from .frames import BINARY_TYPES, Message, OutboundFrame
from .history import RoomHistory, Sequencer
from .pubsub import Envelope, EnvelopeKind

if TYPE_CHECKING:
    from .service import Streaming

log = logging.getLogger("forge_streaming")

DELIVERY_FAILED = "delivery failed"


@dataclass(slots=True)
class PublishMessage:
    """A room message about to be published; ``streaming_before_publish`` may change ``data``."""

    room: str
    data: Any
    user_id: str
    sender: Connection | None = None


class FanOut:
    """Publish to the backend; deliver what the backend hands back to local members."""

    def __init__(self, streaming: Streaming, local: dict[str, dict[str, Connection]], history: RoomHistory,
                 counters: Counter[str]) -> None:
        self._s = streaming
        self._local = local
        self._history = history
        self._counters = counters
        self._sequencer = Sequencer()
        hook = streaming.plugins.hook
        self._deliver_hook = hook.streaming_delivered
        self._has_deliver_hook = bool(self._deliver_hook.get_hookimpls())
        self._published_hook = hook.streaming_published
        self._has_published_hook = bool(self._published_hook.get_hookimpls())

    async def publish(self, room: str, data: Any, *, sender: Connection | None = None,
                      user_id: str | None = None) -> int | None:
        """Publish a message to ``room`` on every node; return its sequence, None if a hook dropped it.

        ``data`` is any JSON value, or ``bytes`` (also ``bytearray``, ``memoryview``) for a binary
        room message; a :class:`~forge_streaming.frames.Message` is published as its ``data``.
        Raises :class:`~forge_streaming.frames.InvalidInput` (a ``ValueError``) for an invalid room
        id, or data a browser could not parse (``NaN``, infinities, lone surrogates).
        """
        room = frames.validate_room_id(room)
        s = self._s
        if isinstance(data, Message):  # a received message passed straight on (Forge's BroadcastToRoom(room, msg))
            data = data.data
        message = PublishMessage(room=room, data=data, user_id=user_id or (sender.user_id if sender else "server"),
                                 sender=sender)
        for result in await s.plugins.acall("streaming_before_publish", message=message):
            if result is False:
                return None
        sequence = self._sequencer.next(room)
        data = message.data
        binary = isinstance(data, BINARY_TYPES)
        try:
            if binary:  # the header, a newline, the bytes: encoded once here, like text
                header = frames.message_frame(room_id=room, user_id=message.user_id, data=None, sequence=sequence)
                del header["data"]
                header["binary"] = True
                payload = frames.binary_frame(header, data)
            else:
                payload = frames.encode(frames.message_frame(
                    room_id=room, user_id=message.user_id, data=data, sequence=sequence))
        except (ValueError, RecursionError) as exc:  # from an application or a hook: client data was checked
            raise frames.InvalidInput("invalid_json", f"message data is not JSON a browser can parse: {exc}") from None
        await self.publish_envelope(Envelope(room=room, payload=payload, kind=EnvelopeKind.MESSAGE,
                                             sequence=sequence, sender=sender.id if sender else None,
                                             node=s.node_id, binary=binary))
        self._counters["published"] += 1
        return sequence

    async def publish_envelope(self, envelope: Envelope) -> None:
        """Hand ``envelope`` to the backend, timing it for ``streaming_published`` when a plugin listens."""
        backend = self._s.backend
        if not self._has_published_hook:
            await backend.publish(envelope)
            return
        started = time.perf_counter()
        await backend.publish(envelope)
        try:
            self._published_hook(streaming=self._s, envelope=envelope, seconds=time.perf_counter() - started)
        except Exception:
            log.exception("a streaming_published hook failed (room %r)", envelope.room)

    async def notify(self, room: str, frame: Mapping[str, Any], *, sender: Connection | None = None) -> None:
        """Send a live-only notice (presence, typing) to the room's members, not kept in history."""
        room = frames.validate_room_id(room)
        await self.publish_envelope(Envelope(room=room, payload=frames.encode(dict(frame)), kind=EnvelopeKind.NOTICE,
                                             sender=sender.id if sender else None, node=self._s.node_id))

    # -- backend listener (hot path) ----------------------------------------------------------

    def on_envelope(self, envelope: Envelope) -> None:
        """Fan one envelope out to this node's members of its room."""
        room = envelope.room
        if envelope.sequence is not None:
            self._sequencer.observe(room, envelope.sequence)
            self._history.record(envelope)
        members = self._local.get(room)
        delivered = 0
        if members:
            frame = OutboundFrame(payload=envelope.payload, binary=envelope.binary, room=room,
                                  sequence=envelope.sequence, sender=envelope.sender)
            sender = envelope.sender
            for conn_id, conn in list(members.items()):
                if conn_id != sender:
                    try:
                        conn.deliver(frame)
                    except Exception as exc:  # one member never fails the sender or the room
                        self._failed(conn, exc)
                        continue
                    delivered += 1
        self._counters["deliveries"] += delivered
        if self._has_deliver_hook:
            try:
                self._deliver_hook(envelope=envelope, recipients=delivered, streaming=self._s)
            except Exception:
                log.exception("a streaming_delivered hook failed (room %r); fan-out goes on", room)

    def _failed(self, conn: Connection, exc: Exception) -> None:
        conn.log.error("delivery to connection %s failed: %r; dropping it", conn.id, exc, exc_info=exc)
        try:
            conn.drop(DELIVERY_FAILED, CloseCode.INTERNAL_ERROR)
            self._s._background(conn.close(CloseCode.INTERNAL_ERROR, DELIVERY_FAILED))  # noqa: SLF001
        except Exception:
            log.exception("dropping connection %s failed", conn.id)

    def on_resync(self, reason: str, rooms: Collection[str] | None = None) -> None:
        """The backend may have lost messages of ``rooms`` (None: every room): their members are told to resync."""
        history = self._history
        history.gap(rooms)  # a resume across the hole must get resync, not a silent hole
        local = self._local
        affected = local.items() if rooms is None else [(r, local[r]) for r in rooms if r in local]
        for room, members in affected:
            payload = frames.encode(frames.system_frame("resync", {
                "room_id": room, "reason": reason, "sequence": history.latest(room)}))
            frame = OutboundFrame(payload=payload, room=room)
            for conn in list(members.values()):
                try:
                    conn.deliver(frame)
                except Exception as exc:
                    self._failed(conn, exc)
