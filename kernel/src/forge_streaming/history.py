"""Per-room history, to resume after a reconnect from a position.

Positions are set by the engine (the pub/sub backend), never here: unique
in their room, the same on every node, increasing in delivery order, not
necessarily consecutive. Each room keeps its last ``size`` messages, within
``max_bytes`` of encoded frames, and a *floor*: the newest position this
node can no longer vouch for. A node vouches only for what it heard while
listening: when it starts (or starts again) listening to a room, or hears
that it may have missed something, the floor is unknown until the next
message arrives, and then sits just below that message's position (anything
before it was published before this node was listening). All rooms
together keep at most ``total_bytes``; past it the least recently active
rooms lose their oldest messages first. A resume from below the floor, or
while the floor is unknown, is answered with ``None`` (the caller asks the
cluster, or sends ``resync``), never with a silent hole. The kernel forgets
a room's log once it stops listening to the room (``rooms.history_linger``
after its last local member left).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Collection

from .pubsub import Envelope


class _RoomLog:
    __slots__ = ("entries", "floor", "bytes", "stands")

    def __init__(self) -> None:
        self.entries: deque[Envelope] = deque()
        self.floor: int | None = None  # None: vouch from just below the next message heard
        self.bytes = 0  # payload bytes of ``entries``
        self.stands: int | None = None  # where the engine said the room stands, while nothing was heard


class RoomHistory:
    """The bounded logs of every room this node hears, least recent dropped first.

    Bounded three ways: ``size`` messages and ``max_bytes`` of payload per
    room, ``total_bytes`` for every room together (and ``max_rooms`` logs).
    Every eviction raises the room's floor past what it dropped.
    """

    def __init__(self, *, size: int, max_rooms: int, max_bytes: int = 1 << 20, total_bytes: int = 64 << 20) -> None:
        self.size = size
        self.max_rooms = max_rooms
        self.total_bytes = total_bytes
        self.max_bytes = min(max_bytes, total_bytes)
        self._logs: OrderedDict[str, _RoomLog] = OrderedDict()
        self._bytes = 0

    @property
    def bytes_held(self) -> int:
        """Payload bytes held in every room's log."""
        return self._bytes

    def usage(self) -> dict[str, int]:
        """What history holds now: rooms with a log, messages and their payload bytes."""
        return {"rooms": len(self._logs), "messages": sum(len(log.entries) for log in self._logs.values()),
                "bytes": self._bytes}

    def _log(self, room: str) -> _RoomLog:
        log = self._logs.get(room)
        if log is None:
            log = _RoomLog()
            self._logs[room] = log
            if len(self._logs) > self.max_rooms:
                self._bytes -= self._logs.popitem(last=False)[1].bytes
        else:
            self._logs.move_to_end(room)
        return log

    def _evict_oldest(self, log: _RoomLog) -> None:
        envelope = log.entries.popleft()
        size = len(envelope.payload)
        log.bytes -= size
        self._bytes -= size
        if envelope.sequence is not None and (log.floor is None or envelope.sequence > log.floor):
            log.floor = envelope.sequence

    def _within_total(self) -> None:
        """Evict the least recently active rooms' oldest messages until all rooms fit ``total_bytes``."""
        for log in self._logs.values():  # least recently active first
            while log.entries and self._bytes > self.total_bytes:
                self._evict_oldest(log)
            if self._bytes <= self.total_bytes:
                return

    def forget(self, room: str) -> None:
        """Drop ``room``'s log and free its bytes (this node stopped listening to it)."""
        log = self._logs.pop(room, None)
        if log is not None:
            self._bytes -= log.bytes

    def track(self, room: str) -> None:
        """Start vouching for ``room`` from the next message heard (this node began listening)."""
        # listening again after a pause: what was published meanwhile never reached this node
        self._log(room).floor = None

    def record(self, envelope: Envelope) -> None:
        if envelope.sequence is None or self.size == 0:
            return
        log = self._log(envelope.room)
        if log.floor is None:  # the first message heard since listening (again): vouch from just below it
            log.floor = envelope.sequence - 1
        size = len(envelope.payload)
        if size > self.max_bytes:  # cannot be kept: a resume from before it is a resync
            while log.entries:
                self._evict_oldest(log)
            log.floor = max(log.floor, envelope.sequence)
            return
        log.entries.append(envelope)
        log.bytes += size
        self._bytes += size
        while len(log.entries) > self.size or log.bytes > self.max_bytes:
            self._evict_oldest(log)
        if self._bytes > self.total_bytes:
            self._within_total()

    def since(self, room: str, sequence: int) -> list[Envelope] | None:
        """Messages after ``sequence`` in order, or None when some may be missing."""
        log = self._logs.get(room)
        if log is None or log.floor is None or sequence < log.floor:
            return None
        return [e for e in log.entries if e.sequence is not None and e.sequence > sequence]

    def note(self, room: str, position: int) -> None:
        """The engine says ``room`` stands at ``position`` (asked while this node had heard nothing in it)."""
        log = self._logs.get(room)
        if log is not None:
            log.stands = position

    def position(self, room: str) -> int | None:
        """Where ``room`` stands for this node: its newest message, else what the engine said; None if unknown."""
        log = self._logs.get(room)
        if log is None:
            return None
        return log.entries[-1].sequence if log.entries else log.stands

    def latest(self, room: str) -> int | None:
        log = self._logs.get(room)
        if log is None or not log.entries:
            return None
        return log.entries[-1].sequence

    def gap(self, rooms: Collection[str] | None = None) -> None:
        """Messages of ``rooms`` (None: of every room) may have been lost just now: vouch only from the next one."""
        logs = self._logs.values() if rooms is None else [self._logs[r] for r in rooms if r in self._logs]
        for log in logs:
            log.floor = None

    def merge(self, room: str, since: int, envelopes: list[Envelope]) -> None:
        """Add messages another node vouched for (everything after ``since``), in position order.

        What this node heard itself is kept (a position names one message);
        the floor goes down to ``since`` unless the log had to evict some of them again.
        """
        log = self._log(room)
        merged = {e.sequence: e for e in log.entries}
        for envelope in envelopes:
            if envelope.sequence is not None and envelope.sequence > since:
                merged.setdefault(envelope.sequence, envelope)
        ordered = sorted(merged.values(), key=lambda e: e.sequence or 0)
        kept, kept_bytes = 0, 0
        for envelope in reversed(ordered):  # the newest that fit both bounds
            size = len(envelope.payload)
            if kept == self.size or kept_bytes + size > self.max_bytes:
                break
            kept, kept_bytes = kept + 1, kept_bytes + size
        evicted = ordered[: len(ordered) - kept]
        log.entries.clear()
        log.entries.extend(ordered[len(ordered) - kept:])
        self._bytes += kept_bytes - log.bytes
        log.bytes = kept_bytes
        log.floor = since if log.floor is None else min(log.floor, since)
        if evicted:
            log.floor = max(log.floor, evicted[-1].sequence or 0)
        if self._bytes > self.total_bytes:
            self._within_total()

    def recent(self, room: str, limit: int | None = None) -> list[Envelope]:
        log = self._logs.get(room)
        if log is None:
            return []
        entries = list(log.entries)
        return entries[-limit:] if limit else entries
