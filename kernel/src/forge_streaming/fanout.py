"""Publishing and fan-out: a message goes to the backend once, comes back once per node.

Hot path. A room message is encoded once per publish, without its
position; the backend (the engine) sets the position, and each node adds
it to the frame once (:func:`frames.with_sequence`) and hands the shared
frame to its local members with one ``deliver`` call each. A member whose
``deliver`` raises is dropped (reason ``delivery failed``); the sender and
the rest of the room carry on.

A publisher that wants the position back (``Streaming.publish``, the HTTP
API) waits for its own message to return from the engine: the envelope
carries the message's id, and this node listens to the room meanwhile.
The room protocol does not wait: a member's next message need not wait
for the engine to number this one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import frames
from .connection import CloseCode, Connection
from .frames import BINARY_TYPES, Message, OutboundFrame
from .history import RoomHistory
from .pubsub import Envelope, EnvelopeKind, PubSubBackend

if TYPE_CHECKING:
    from .service import Streaming

log = logging.getLogger("forge_streaming")

DELIVERY_FAILED = "delivery failed"
POSITION_TIMEOUT = 10.0
"""Seconds a publisher waits for the engine to give its message a position (an MQTT sequencer failing over)."""


@dataclass(slots=True)
class PublishMessage:
    """A room message about to be published; ``streaming_before_publish`` may change ``data``."""

    room: str
    data: Any
    user_id: str
    sender: Connection | None = None


def numbered(envelope: Envelope, sequence: int) -> Envelope:
    """``envelope`` as members get it and history keeps it: its position ``sequence`` added to its frame.

    Built directly: ``dataclasses.replace`` costs twice as much (it looks up every field by name).
    """
    return Envelope(envelope.room, frames.with_sequence(envelope.payload, sequence, binary=envelope.binary),
                    envelope.kind, sequence, envelope.sender, envelope.node, envelope.binary, envelope.id)


def _publishes_nowait(backend: type[PubSubBackend]) -> bool:
    """True when ``backend``'s ``publish_nowait`` stands for its ``publish``.

    Not when it is the base class's (which takes nothing), nor when a
    subclass overrode ``publish`` alone: a test's or a user's backend built
    on the memory one must not be bypassed by the ``publish_nowait`` it inherited.
    """
    def owner(name: str) -> type:
        return next(cls for cls in backend.__mro__ if name in cls.__dict__)

    nowait = owner("publish_nowait")
    return nowait is not PubSubBackend and issubclass(nowait, owner("publish"))


class FanOut:
    """Publish to the backend; deliver what the backend hands back to local members."""

    def __init__(self, streaming: Streaming, local: dict[str, dict[str, Connection]], history: RoomHistory,
                 counters: Counter[str], listen: Callable[[str], Awaitable[None]]) -> None:
        self._s = streaming
        self._local = local
        self._history = history
        self._counters = counters
        self._listen = listen  # makes this node listen to a room for a while (Membership.listen)
        self._receipts: dict[str, asyncio.Future[int]] = {}  # message id -> its position, once it is back
        self._unnumbered_warned = False
        hook = streaming.plugins.hook
        self._deliver_hook = hook.streaming_delivered
        self._has_deliver_hook = bool(self._deliver_hook.get_hookimpls())
        self._published_hook = hook.streaming_published
        self._has_published_hook = bool(self._published_hook.get_hookimpls())
        self._backend_seen: PubSubBackend | None = None
        self._backend_nowait = False

    async def publish(self, room: str, data: Any, *, sender: Connection | None = None,
                      user_id: str | None = None, wait: bool = True,
                      timeout: float = POSITION_TIMEOUT) -> int | None:
        """Publish a message to ``room`` on every node; return its position, None if a hook dropped it.

        ``data`` is any JSON value, or ``bytes`` (also ``bytearray``, ``memoryview``) for a binary
        room message; a :class:`~forge_streaming.frames.Message` is published as its ``data``.
        Raises :class:`~forge_streaming.frames.InvalidInput` (a ``ValueError``) for an invalid room
        id, or data a browser could not parse (``NaN``, infinities, lone surrogates), and
        ``TimeoutError`` when the engine gave no position within ``timeout`` seconds (the message
        is published all the same: it may still be delivered, e.g. once a broker is back).
        With ``wait=False`` it returns None once the message is handed to the backend.
        """
        room = frames.validate_room_id(room)
        s = self._s
        if isinstance(data, Message):  # a received message passed straight on (Forge's BroadcastToRoom(room, msg))
            data = data.data
        user_id = user_id or (sender.user_id if sender else "server")
        if s.plugins.implemented("streaming_before_publish"):  # else no PublishMessage is made per message
            message = PublishMessage(room=room, data=data, user_id=user_id, sender=sender)
            for result in await s.plugins.acall("streaming_before_publish", message=message):
                if result is False:
                    return None
            data, user_id = message.data, message.user_id
        envelope = self.message_envelope(room, data, user_id, sender, keep_id=wait)
        if not wait:
            if self._has_published_hook:
                await self.publish_envelope(envelope)
            else:  # the room protocol's path: one coroutine less per message
                await s.backend.publish(envelope)
            self._counters["published"] += 1
            return None
        message_id = envelope.id
        assert message_id is not None
        await self._listen(room)  # its position comes with the message, which this node must hear
        receipt: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._receipts[message_id] = receipt
        try:
            await self.publish_envelope(envelope)
            self._counters["published"] += 1
            if not receipt.done():  # the memory backend has numbered and delivered it already
                await asyncio.wait_for(asyncio.shield(receipt), timeout)
            return receipt.result()
        except TimeoutError:
            raise TimeoutError(f"room {room!r}: the pub/sub backend {s.backend.name!r} gave the message no position "
                               f"within {timeout:g} s; it may still be delivered") from None
        finally:
            self._receipts.pop(message_id, None)

    def message_envelope(self, room: str, data: Any, user_id: str, sender: Connection | None, *,
                         keep_id: bool = False) -> Envelope:
        """A room message's envelope: its frame encoded once, without the position the engine will give it.

        ``keep_id``: the envelope carries the message's id, for a publisher that waits for its position.
        """
        binary = isinstance(data, BINARY_TYPES)
        message_id = frames.new_message_id()
        try:
            if binary:  # the header, a newline, the bytes: encoded once here, like text
                header = frames.message_frame(room_id=room, user_id=user_id, data=None, message_id=message_id)
                del header["data"]
                header["binary"] = True
                payload = frames.binary_frame(header, data)
            else:
                payload = frames.message_payload(room_id=room, user_id=user_id, data=data, message_id=message_id)
        except (ValueError, RecursionError) as exc:  # from an application or a hook: client data was checked
            raise frames.InvalidInput("invalid_json", f"message data is not JSON a browser can parse: {exc}") from None
        return Envelope(room, payload, EnvelopeKind.MESSAGE, None, sender.id if sender else None, self._s.node_id,
                        binary, message_id if keep_id else None)  # positional: cheaper than keywords

    def can_publish_now(self) -> bool:
        """True when a room message can be published without awaiting anything (:meth:`publish_now`).

        That is: no plugin implements ``streaming_before_publish`` or
        ``streaming_published``, and the backend implements ``publish_nowait``.
        """
        backend = self._s.backend
        if backend is not self._backend_seen:
            self._backend_seen = backend
            self._backend_nowait = _publishes_nowait(type(backend))
        return self._backend_nowait and not self._has_published_hook \
            and not self._s.plugins.implemented("streaming_before_publish")

    def publish_now(self, envelope: Envelope) -> bool:
        """Hand a room message to the backend without waiting; False: it must be awaited (:meth:`publish_envelope`)."""
        if self._s.backend.publish_nowait(envelope):
            self._counters["published"] += 1
            return True
        return False

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
        sequence = envelope.sequence
        if sequence is not None:  # a room message numbered by the engine: its position goes into the frame
            envelope = numbered(envelope, sequence)
            self._history.record(envelope)
            if envelope.id is not None and self._receipts:
                receipt = self._receipts.get(envelope.id)
                if receipt is not None and not receipt.done():
                    receipt.set_result(sequence)
        elif envelope.kind is EnvelopeKind.MESSAGE and not self._unnumbered_warned:
            self._unnumbered_warned = True
            log.error("pub/sub backend %r handed back a room message without a position: it breaks the backend "
                      "contract (pubsub.py); members get it, but it cannot be resumed from", self._s.backend.name)
        members = self._local.get(room)
        delivered = 0
        if members:
            sender = envelope.sender  # skipped: a member is not echoed its own message ...
            if sender is not None and envelope.node and envelope.node != self._s.node_id:
                sender = None  # ... but a sender on another node is none of these (even if an id were the same)
            frame = OutboundFrame(envelope.payload, envelope.binary, room, sequence, sender)
            for conn_id, conn in tuple(members.items()):  # a failed delivery drops its member from the room
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
            latest = history.latest(room)  # the gap is after the last message this node heard
            payload = frames.encode(frames.system_frame("resync", {
                "room_id": room, "reason": reason, "since": latest, "sequence": latest}))
            frame = OutboundFrame(payload=payload, room=room)
            for conn in list(members.values()):
                try:
                    conn.deliver(frame)
                except Exception as exc:
                    self._failed(conn, exc)
