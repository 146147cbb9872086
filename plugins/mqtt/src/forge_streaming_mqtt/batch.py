"""Several room messages in one MQTT publish: a burst costs the broker, the sequencer and every node one message.

A node gathers the room messages it publishes to one room within one turn
of its event loop and submits them together; the sequencer numbers the
batch (``forge-batch: k`` items get the positions ``forge-sequence`` ..
``forge-sequence + k - 1``) and publishes it on as one message; every node
splits it again. A message published alone travels as before, its payload
the frame itself. Submissions are QoS 1, and a broker lets a client have
only a few unacknowledged at once (Mosquitto: 20), so one message per room
message would cut a burst into slices of 20, each fanned out apart.

The payload of a batch is its items one after the other, each a 4-byte
big-endian length and a JSON header (``{"c": count, "s": sender, "b": 1,
"i": id}``: its ``forge-count``, and the fields an alone message carries
in user properties), then a 4-byte length and the frame's bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

_LENGTH = struct.Struct(">I")
MAX_ITEMS = 10_000
"""Items a batch may hold; a publish claiming more is refused."""


@dataclass(frozen=True, slots=True)
class Item:
    """One room message of a batch, as its node published it."""

    payload: bytes
    count: str
    sender: str | None = None
    binary: bool = False
    id: str | None = None


def encode(items: list[Item]) -> bytes:
    parts: list[bytes] = []
    for item in items:
        header: dict[str, object] = {"c": item.count}
        if item.sender is not None:
            header["s"] = item.sender
        if item.binary:
            header["b"] = 1
        if item.id is not None:
            header["i"] = item.id
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        parts += [_LENGTH.pack(len(encoded)), encoded, _LENGTH.pack(len(item.payload)), item.payload]
    return b"".join(parts)


def decode(payload: bytes, expected: int) -> list[Item]:
    """The ``expected`` items of a batch; ValueError when the payload is not exactly that."""
    if not 0 < expected <= MAX_ITEMS:
        raise ValueError(f"a batch of {expected} items (1 to {MAX_ITEMS})")
    items: list[Item] = []
    view = memoryview(payload)
    pos, end = 0, len(payload)
    while pos < end:
        if len(items) == expected:
            raise ValueError(f"more than the {expected} items announced")
        header, pos = _chunk(view, pos, end)
        body, pos = _chunk(view, pos, end)
        fields = json.loads(bytes(header))
        if not isinstance(fields, dict):
            raise ValueError("an item's header is not a JSON object")
        count, sender, ident = fields.get("c"), fields.get("s"), fields.get("i")
        if not isinstance(count, str) or not (sender is None or isinstance(sender, str)) \
                or not (ident is None or isinstance(ident, str)):
            raise ValueError("an item's count, sender or id is not a string")
        items.append(Item(bytes(body), count, sender, fields.get("b") == 1, ident))
    if len(items) != expected:
        raise ValueError(f"{len(items)} items, {expected} announced")
    return items


def _chunk(view: memoryview, pos: int, end: int) -> tuple[memoryview, int]:
    if pos + 4 > end:
        raise ValueError("cut short")
    (size,) = _LENGTH.unpack_from(view, pos)
    pos += 4
    if pos + size > end:
        raise ValueError("cut short")
    return view[pos:pos + size], pos + size
