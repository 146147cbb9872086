"""The backend's own bounded log of room messages, to answer other nodes' resumes.

Independent of the kernel's history on purpose: it holds what this node
heard from the broker, and a *floor* below which it cannot vouch (before
its subscription took effect, evicted, or across a broker outage), so an
answer is either complete or not given.
"""

from __future__ import annotations

from collections import deque

from forge_streaming import Envelope

from .link import now_us


class _Log:
    __slots__ = ("entries", "floor")

    def __init__(self, size: int, floor: int) -> None:
        self.entries: deque[Envelope] = deque(maxlen=size)
        self.floor = floor


class RoomLogs:
    def __init__(self, size: int) -> None:
        self.size = size
        self._logs: dict[str, _Log] = {}

    def track(self, room: str) -> None:
        """Start keeping ``room``; vouch from now on (raised again once the subscription is acknowledged)."""
        if room not in self._logs:
            self._logs[room] = _Log(self.size, now_us())

    def vouch_from_now(self, room: str) -> None:
        log = self._logs.get(room)
        if log is not None:
            log.floor = max(log.floor, now_us())

    def forget(self, room: str) -> None:
        self._logs.pop(room, None)

    def tracks(self, room: str) -> bool:
        return room in self._logs

    def record(self, envelope: Envelope) -> None:
        log = self._logs.get(envelope.room)
        if log is None or self.size == 0:
            return
        if len(log.entries) == self.size:
            log.floor = max(log.floor, log.entries[0].sequence or 0)
        log.entries.append(envelope)

    def since(self, room: str, sequence: int) -> list[Envelope] | None:
        """Every message after ``sequence``, or None when some may be missing."""
        log = self._logs.get(room)
        if log is None or sequence < log.floor:
            return None
        return [e for e in log.entries if e.sequence is not None and e.sequence > sequence]

    def gap(self) -> None:
        """Messages may have been lost just now (broker outage): vouch only from here on."""
        floor = now_us()
        for log in self._logs.values():
            log.floor = max(log.floor, floor)
