"""The pub/sub backend contract: how room traffic crosses nodes, and who sets a room's order.

The kernel publishes each room message once, as an :class:`Envelope` whose
payload is already the encoded frame members receive, but for its
position; the backend carries it to every node (itself included) whose
kernel subscribed to the room, and hands it back through
:meth:`BackendListener.on_envelope`. The memory backend does that in
process; the MQTT backend through a broker.

**The backend (the engine) sets each room message's position**, never the
kernel and never a clock: a ``MESSAGE`` envelope reaches :meth:`PubSubBackend.publish`
with ``sequence=None`` and must come back to every node with ``sequence``
set, and that position is

- unique in its room, the same on every node;
- strictly increasing in the order every node hands the room's messages back;
- never given again to another message of the room, even after the engine
  restarts (start a new run above the old one, e.g. from the clock's
  microseconds, and count up from there).

Positions need not be consecutive. The payload never holds the position:
the kernel adds ``"sequence"`` to the frame on each node
(:func:`~forge_streaming.frames.with_sequence`), so a backend stores and
returns payloads exactly as published. ``NOTICE`` envelopes (presence,
typing) have no position and are live only. When a backend cannot carry
some messages (an outage, a hole it detected), it says so through
:meth:`BackendListener.on_resync`; members are never left with a silent gap.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol


class EnvelopeKind(str, enum.Enum):
    MESSAGE = "message"  # kept in room history, has a sequence
    NOTICE = "notice"  # presence and typing notices: live only


@dataclass(slots=True)
class Envelope:
    """One room frame on its way to every node; read-only by convention.

    ``payload`` is the UTF-8 JSON frame members receive, encoded once by the
    publishing node, without its position; ``sequence`` is the position the
    engine gave it (None on the way in, and for notices). ``sender`` is the
    publishing connection's id, skipped at delivery so that
    ``broadcast_to_room`` reaches only the others. ``id`` is set (the
    message's id) only when the publisher waits to learn the position: a
    backend must hand it back with the envelope, so the publishing node can
    tell its own message when it returns.
    ``binary`` marks a binary room message: ``payload`` is then a JSON
    header, a ``\\n`` byte and the raw bytes (README, "The room protocol"),
    sent as a binary frame. A backend that crosses nodes must carry this
    flag with the payload (the MQTT backend: a user property); one that
    hands the envelope itself back (the memory backend) has nothing to do.

    Treat an envelope as read-only: a node shares one with its history and
    every member, so a changed field changes it for all of them; build a
    new one instead (positionally, as the kernel does). It is not a frozen
    dataclass because that costs 0.65 us per envelope against 0.13, and a
    room message makes three.
    """

    room: str
    payload: bytes
    kind: EnvelopeKind = EnvelopeKind.MESSAGE
    sequence: int | None = None
    sender: str | None = None
    node: str = ""
    binary: bool = False
    id: str | None = None


class BackendState(str, enum.Enum):
    UP = "up"
    CONNECTING = "connecting"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class BackendHealth:
    state: BackendState
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state is BackendState.UP


class BackendListener(Protocol):
    """What the kernel gives a backend to hand traffic and trouble back."""

    def on_envelope(self, envelope: Envelope) -> None:
        """Deliver an envelope to this node's members (synchronous, no await)."""

    def on_resync(self, reason: str, rooms: Collection[str] | None = None) -> None:
        """Messages of ``rooms`` (None: of every room) may have been lost: tell their members to resync.

        A broker outage concerns every room; a hole a backend noticed in one room's stream
        (e.g. a broker that dropped messages for a slow subscriber) only that room.
        """

    async def ingest(self, room: str, data: Any, *, user_id: str) -> None:
        """Publish a message that entered through the backend itself (a device on the broker).

        It goes through the same hooks as any other publish, and does not wait
        for its position (the next device message need not wait for this one's).
        """


class PubSubBackend(ABC):
    """A pub/sub backend; registered by name through a hook, chosen by config."""

    name: ClassVar[str]

    @abstractmethod
    async def start(self, node_id: str, listener: BackendListener) -> None:
        """Connect; from now on, deliver subscribed rooms' envelopes to ``listener``."""

    @abstractmethod
    async def stop(self) -> None:
        """Flush what is queued, disconnect, release everything."""

    @abstractmethod
    async def publish(self, envelope: Envelope) -> None:
        """Send to every node subscribed to ``envelope.room`` (this one included).

        A ``MESSAGE`` envelope comes in without a position; the backend gives
        it one (see the module's docstring) before any node receives it.
        """

    def publish_nowait(self, envelope: Envelope) -> bool:
        """Publish ``envelope`` at once if that needs no waiting: True if taken, False to have it awaited.

        Optional. The kernel calls it for a room message it acts on the
        moment the transport reads it (no task switch per message); on False
        it awaits :meth:`publish` instead (a backend whose broker is behind
        makes its publisher wait there). A backend that overrides it takes
        ``publish``'s job for what it accepts: ``publish`` is not called for
        that envelope. The default takes nothing, and the kernel then never
        calls it; nor when a subclass overrides ``publish`` but not this.
        """
        return False

    @abstractmethod
    async def subscribe(self, room: str) -> None:
        """Receive ``room``'s envelopes on this node (idempotent)."""

    @abstractmethod
    async def unsubscribe(self, room: str) -> None:
        """Stop receiving ``room``'s envelopes on this node (idempotent)."""

    def health(self) -> BackendHealth:
        return BackendHealth(BackendState.UP)

    async def fetch_history(self, room: str, since: int) -> list[Envelope] | None:
        """Messages of ``room`` after position ``since``, in order, held elsewhere in the cluster or the engine.

        Called when this node's own history cannot answer a resume. ``None``
        means the backend cannot tell either (the client gets ``resync``).
        """
        return None

    async def position(self, room: str) -> int | None:
        """Where ``room`` stands in the engine now: its latest message's position; None if unknown.

        A room with no message yet stands at a position below any it will get
        and never given in an earlier run of the engine (the memory backend:
        the clock when it started), so that a cursor from before a restart
        is never taken for "up to date". Asked only when this node has heard
        nothing in the room since it started listening: a member joining then
        is told where it stands, and a member resuming from exactly there gets
        no needless ``resync``.
        """
        return None


class RoomPositions:
    """The positions an engine gives, per room: one more than the last, or a new run.

    A room it has not numbered (or has forgotten) starts a new run: one
    above ``after`` when the caller knows a position already given in the
    room, else the clock's microseconds (above any earlier run, since no run
    gives a million positions a second for long), never below ``start``, the
    clock when this counter was made. At most ``max_rooms`` rooms are kept,
    the least recently used forgotten first. The memory backend and the
    MQTT sequencer number rooms with it.
    """

    def __init__(self, max_rooms: int = 100_000) -> None:
        self.max_rooms = max_rooms
        self.start = time.time_ns() // 1000
        self.forgot = False  # once a room was forgotten, a room without a position may have had some
        self._last: OrderedDict[str, int] = OrderedDict()

    def next(self, room: str, count: int = 1, *, after: int | None = None) -> tuple[int, int | None]:
        """The first of ``count`` positions for ``room``, and the room's position before them (None: a new run)."""
        last = self._last.get(room)
        if last is None:
            previous = after
            first = after + 1 if after is not None else max(time.time_ns() // 1000, self.start + 1)
            if len(self._last) >= self.max_rooms:
                self._last.popitem(last=False)
                self.forgot = True
        else:
            previous, first = last, last + 1
            self._last.move_to_end(room)
        self._last[room] = first + count - 1
        return first, previous

    def last(self, room: str) -> int | None:
        """The last position given in ``room``; None if none (or forgotten)."""
        return self._last.get(room)
