"""Per-room history with monotonic sequences, to resume after a reconnect.

Sequences are microsecond timestamps forced to increase per room
(``max(last + 1, now)``), so they stay monotonic across a server restart
and are comparable between nodes of a cluster, without coordination.
Each room keeps its last ``size`` messages and a *floor*: the newest
sequence this node can no longer vouch for (evicted, or before it started
listening to the room). A resume from below the floor is answered with
``None`` (the caller sends ``resync``), never with a silent hole.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Collection

from .pubsub import Envelope


class Sequencer:
    """Issues per-room sequences that only go up."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def next(self, room: str) -> int:
        seq = max(self._last.get(room, 0) + 1, time.time_ns() // 1000)
        self._last[room] = seq
        return seq

    def observe(self, room: str, sequence: int) -> None:
        """Keep issuing above a sequence seen from another node."""
        if sequence > self._last.get(room, 0):
            self._last[room] = sequence


class _RoomLog:
    __slots__ = ("entries", "floor")

    def __init__(self, size: int, floor: int) -> None:
        self.entries: deque[Envelope] = deque(maxlen=size)
        self.floor = floor


class RoomHistory:
    """The bounded logs of every room this node hears, least recent dropped first."""

    def __init__(self, *, size: int, max_rooms: int) -> None:
        self.size = size
        self.max_rooms = max_rooms
        self._logs: OrderedDict[str, _RoomLog] = OrderedDict()

    def _log(self, room: str) -> _RoomLog:
        log = self._logs.get(room)
        if log is None:
            log = _RoomLog(self.size, floor=time.time_ns() // 1000 - 1)
            self._logs[room] = log
            if len(self._logs) > self.max_rooms:
                self._logs.popitem(last=False)
        else:
            self._logs.move_to_end(room)
        return log

    def forget(self, room: str) -> None:
        """Drop ``room``'s log (this node stopped listening to it)."""
        self._logs.pop(room, None)

    def track(self, room: str) -> None:
        """Start vouching for ``room`` from now on (this node began listening)."""
        log = self._log(room)
        # listening again after a pause: what was published meanwhile never reached this node
        log.floor = max(log.floor, time.time_ns() // 1000 - 1)

    def record(self, envelope: Envelope) -> None:
        if envelope.sequence is None or self.size == 0:
            return
        log = self._log(envelope.room)
        if len(log.entries) == log.entries.maxlen:
            log.floor = log.entries[0].sequence or log.floor
        log.entries.append(envelope)

    def since(self, room: str, sequence: int) -> list[Envelope] | None:
        """Messages after ``sequence`` in order, or None when some may be missing."""
        log = self._logs.get(room)
        if log is None or sequence < log.floor:
            return None
        return [e for e in log.entries if e.sequence is not None and e.sequence > sequence]

    def latest(self, room: str) -> int | None:
        log = self._logs.get(room)
        if log is None or not log.entries:
            return None
        return log.entries[-1].sequence

    def position(self, room: str) -> int:
        """Where a member joining now stands: resuming from here replays only what comes next."""
        return max(self.latest(room) or 0, time.time_ns() // 1000 - 1)

    def gap(self, rooms: Collection[str] | None = None) -> None:
        """Messages of ``rooms`` (None: of every room) may have been lost just now: vouch only from here on."""
        floor = time.time_ns() // 1000
        logs = self._logs.values() if rooms is None else [self._logs[r] for r in rooms if r in self._logs]
        for log in logs:
            log.floor = max(log.floor, floor)

    def merge(self, room: str, since: int, envelopes: list[Envelope]) -> None:
        """Add messages another node vouched for (everything after ``since``), in sequence order.

        Duplicates of what this node heard itself are dropped; the floor goes
        down to ``since`` unless the log had to evict some of them again.
        """
        log = self._log(room)
        merged = {(e.sequence, e.payload): e for e in log.entries}
        for envelope in envelopes:
            if envelope.sequence is not None and envelope.sequence > since:
                merged.setdefault((envelope.sequence, envelope.payload), envelope)
        ordered = sorted(merged.values(), key=lambda e: e.sequence or 0)
        keep = ordered[-self.size:] if self.size else []
        evicted = ordered[: len(ordered) - len(keep)]
        log.entries.clear()
        log.entries.extend(keep)
        log.floor = min(log.floor, since)
        if evicted:
            log.floor = max(log.floor, evicted[-1].sequence or 0)

    def recent(self, room: str, limit: int | None = None) -> list[Envelope]:
        log = self._logs.get(room)
        if log is None:
            return []
        entries = list(log.entries)
        return entries[-limit:] if limit else entries
