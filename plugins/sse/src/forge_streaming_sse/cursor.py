"""The resume cursor carried in each room message's ``id:``.

One ``Last-Event-ID`` must resume a member in every room it is in, so the id
is the member's position in each room: ``room:sequence`` pairs joined by
commas, rooms percent-encoded and sorted (``lobby:1732755200123456,news:17...``).
A position is the last sequence this member was given in that room (or the
room's latest when it joined), so resuming from it replays exactly what
came after.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import quote, unquote

MAX_LENGTH = 16_384
MAX_SEQUENCE_DIGITS = 19
"""Sequences are microsecond timestamps (16 digits today); anything past 2**63 - 1 is not one of ours."""


class CursorError(ValueError):
    """A Last-Event-ID that is not a cursor this plugin wrote."""


@lru_cache(maxsize=4096)
def quoted(room: str) -> bytes:
    return quote(room, safe="").encode("ascii")


def part_size(room: str) -> int:
    """The most ``room`` can add to a cursor: its quoted name, ``:``, a sequence and a comma."""
    return len(quoted(room)) + MAX_SEQUENCE_DIGITS + 2


def encode(positions: dict[str, int]) -> bytes:
    return b",".join(quoted(room) + b":%d" % seq for room, seq in positions.items())


def parse(value: str, *, max_rooms: int) -> dict[str, int]:
    """``"a:1,b%2Cc:2"`` -> ``{"a": 1, "b,c": 2}``; raise :class:`CursorError` saying what is wrong."""
    value = value.strip()
    if not value:
        return {}
    if len(value) > MAX_LENGTH:
        raise CursorError(f"longer than {MAX_LENGTH} characters")
    positions: dict[str, int] = {}
    for part in value.split(","):
        room, sep, seq = part.rpartition(":")
        if not sep or not room or not (seq.isascii() and seq.isdigit()):
            raise CursorError(f"expected room:sequence pairs separated by commas, got {part[:80]!r}")
        if len(seq) > MAX_SEQUENCE_DIGITS or int(seq) >= 2**63:
            raise CursorError(f"sequence {seq[:24]}{'...' if len(seq) > 24 else ''} is out of range")
        positions[unquote(room)] = int(seq)
        if len(positions) > max_rooms:
            raise CursorError(f"names more than {max_rooms} rooms")
    return positions
