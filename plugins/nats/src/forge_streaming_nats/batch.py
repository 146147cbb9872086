"""Several room messages in one stored JetStream message, each still at its own stream sequence.

A node gathers the room messages it publishes to one room within one turn
of its event loop. Two or more go out as one JetStream *atomic batch*
(nats-server 2.12+, ``allow_atomic`` on the stream) of ``k`` messages:
``k - 1`` empty pads on ``{prefix}.pads`` (stored, never republished), then
one message on the room's subject that carries the ``k`` room messages and
commits the batch. The server stores a batch's messages together at
consecutive sequences, so the batch message at sequence ``S`` owns the
``k`` sequences ``S - k + 1 .. S``: they are the positions of its room
messages, in order. Each room message keeps a stream sequence of its own,
no other message of the room can have one of them, and every node (live,
or reading the stream later) computes the same positions from the stored
message alone (its sequence and ``Nats-Batch-Sequence``, which the server
checked). A room message published alone travels as before, its payload the
frame itself, its fields in headers.

The payload of a batch message is its room messages one after the other,
each a fixed header (flags, then the byte lengths of the sender, the id and
the frame; 13 bytes, big-endian) followed by those bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from forge_streaming import Envelope

_ITEM = struct.Struct(">BIII")
_BINARY, _SENDER, _ID = 1, 2, 4
MAX_ITEMS = 1000
"""Room messages one batch carries at most: the messages a server takes in one atomic batch."""


@dataclass(frozen=True, slots=True)
class Item:
    """One room message of a batch, as its node published it."""

    payload: bytes
    sender: str | None = None
    binary: bool = False
    id: str | None = None


def size(envelope: Envelope) -> int:
    """Bytes ``envelope`` takes in a batch (its frame, plus 13 and its sender's and id's UTF-8 bytes at most)."""
    return _ITEM.size + len(envelope.payload) + 4 * (len(envelope.sender or "") + len(envelope.id or ""))


def encode(envelopes: Sequence[Envelope]) -> bytes:
    parts: list[bytes] = []
    pack = _ITEM.pack
    for envelope in envelopes:
        sender = b"" if envelope.sender is None else envelope.sender.encode()
        ident = b"" if envelope.id is None else envelope.id.encode()
        flags = (_BINARY if envelope.binary else 0) | (0 if envelope.sender is None else _SENDER) \
            | (0 if envelope.id is None else _ID)
        parts += [pack(flags, len(sender), len(ident), len(envelope.payload)), sender, ident, envelope.payload]
    return b"".join(parts)


def decode(payload: bytes, expected: int) -> list[Item]:
    """The ``expected`` room messages of a batch; ValueError when the payload is not exactly that."""
    if not 1 < expected <= MAX_ITEMS:
        raise ValueError(f"a batch of {expected} room messages (2 to {MAX_ITEMS})")
    items: list[Item] = []
    unpack = _ITEM.unpack_from
    head = _ITEM.size
    pos, end = 0, len(payload)
    try:
        while pos < end:
            if len(items) == expected:
                raise ValueError(f"more than the {expected} room messages announced")
            if pos + head > end:
                raise ValueError("cut short")
            flags, sender_size, id_size, body_size = unpack(payload, pos)
            pos += head
            stop = pos + sender_size + id_size + body_size
            if stop > end or flags & ~(_BINARY | _SENDER | _ID):
                raise ValueError("cut short" if stop > end else f"unknown flags {flags}")
            sender = payload[pos:pos + sender_size].decode() if flags & _SENDER else None
            pos += sender_size
            ident = payload[pos:pos + id_size].decode() if flags & _ID else None
            pos += id_size
            items.append(Item(payload[pos:stop], sender, bool(flags & _BINARY), ident))
            pos = stop
    except UnicodeDecodeError as exc:
        raise ValueError(f"a sender or id is not UTF-8: {exc}") from None
    if len(items) != expected:
        raise ValueError(f"{len(items)} room messages, {expected} announced")
    return items
