"""Per-room publish numbers of each node: a message the broker delivers twice, or drops, is noticed.

Each node numbers what it publishes to a room, 1, 2, 3, ..., within a
*stream*: a random id drawn when the node starts numbering that room (at
start, or after it forgot the room). The pair travels in the
``forge-count`` user property as ``{stream}:{number}``, through the
sequencer and on to every node.

A receiving node remembers, per room and origin node, the last number. The
next one must be one more: a larger one means messages were lost in between
(the room's members get ``resync``), a smaller or equal one is a duplicate
(dropped: e.g. a message a sequencer sent on but died before acknowledging,
which the next sequencer numbers again). A new stream, or a room just
subscribed, starts counting afresh. A value that is not a stream of at most
:data:`MAX_STREAM` characters, a colon and at most 19 ASCII digits is
malformed (the message is dropped): no number from the wire is parsed
unbounded. (The lost end of a burst, which no later number reveals, is the
sequencer's marks' job: sequencer.py.)
"""

from __future__ import annotations

import secrets
from collections import OrderedDict

from .topics import MAX_DIGITS

DUPLICATE = -1
MALFORMED = -2
MAX_STREAM = 32  # characters of a stream id; ours are 8


class Numbering:
    """The sending side: the next ``forge-count`` value for a room."""

    def __init__(self, max_rooms: int = 100_000) -> None:
        self.max_rooms = max_rooms
        self._rooms: OrderedDict[str, list[str | int]] = OrderedDict()

    def next(self, room: str) -> str:
        entry = self._rooms.get(room)
        if entry is None:
            # past max_rooms the least recently used room is forgotten; its next message starts a new stream
            entry = self._rooms[room] = [secrets.token_hex(4), 0]
            if len(self._rooms) > self.max_rooms:
                self._rooms.popitem(last=False)
        else:
            self._rooms.move_to_end(room)
        number = int(entry[1]) + 1
        entry[1] = number
        return f"{entry[0]}:{number}"


class Continuity:
    """The receiving side: how many messages went missing before this one."""

    def __init__(self) -> None:
        self._rooms: dict[str, dict[str, tuple[str, int]]] = {}

    def check(self, room: str, origin: str, count: str) -> int:
        """Messages missing between the origin's last one and this one: 0 in order; DUPLICATE or MALFORMED: drop it."""
        stream, sep, text = count.partition(":")  # _parse, inlined: once per message
        if not sep or len(stream) > MAX_STREAM or len(text) > MAX_DIGITS or not text.isdigit() or not text.isascii():
            return MALFORMED
        number = int(text)
        seen = self._rooms.setdefault(room, {})
        last = seen.get(origin)
        if last is not None and last[0] == stream:
            if number <= last[1]:
                return DUPLICATE
            seen[origin] = (stream, number)
            return number - last[1] - 1
        seen[origin] = (stream, number)
        return 0

    def forget(self, room: str) -> None:
        """This node stopped listening to ``room``: the next subscription counts afresh."""
        self._rooms.pop(room, None)

    def reset(self) -> None:
        """A new connection: what was lost meanwhile is covered by the reconnect's own resync."""
        self._rooms.clear()
