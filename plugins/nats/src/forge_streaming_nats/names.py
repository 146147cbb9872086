"""Room and node ids as NATS subject tokens and KV key tokens: one encoding, decoded only in its exact form.

A room id may hold any printable character, ``.``, ``*``, ``>`` and spaces
included, none of which may stand in a subject token as they are. Every
UTF-8 byte outside ``[A-Za-z0-9_-]`` is written ``=HH`` (two upper-case hex
digits, as in quoted-printable), so the token is valid both in a subject
and in a JetStream KV key (``[-/_=.a-zA-Z0-9]``): ``lobby`` stays ``lobby``,
``a.b`` becomes ``a=2Eb``, ``café`` becomes ``caf=C3=A9``.

Decoding is strict: a token is accepted only when it is exactly what
:func:`encode` gives for a valid id (``=6Cobby`` is not ``lobby``), so no
second spelling of a room slips past a server permission written for the
first, and a forged subject cannot name an id the kernel would refuse.
"""

from __future__ import annotations

import re
from functools import lru_cache

MAX_ROOM_ID_LENGTH = 128  # the kernel's rule for a client's room_id: printable, at most 128 characters
MAX_NODE_ID_LENGTH = 256
_PLAIN = re.compile(r"[A-Za-z0-9_-]+")
_TOKEN = re.compile(r"(?:[A-Za-z0-9_-]|=[0-9A-F]{2})+")
_HEX = "0123456789ABCDEF"


def valid_id(value: str, max_length: int = MAX_ROOM_ID_LENGTH) -> bool:
    """Non-empty, printable (no control character, noncharacter or surrogate), at most ``max_length``."""
    return 0 < len(value) <= max_length and value.isprintable()


@lru_cache(maxsize=65_536)
def encode(value: str) -> str:
    """``value`` as one subject token (and KV key token), whatever the string."""
    if _PLAIN.fullmatch(value):
        return value
    out: list[str] = []
    for char in value:
        if char.isascii() and (char.isalnum() or char in "_-"):
            out.append(char)
        else:
            for byte in char.encode("utf-8", "surrogatepass"):
                out.append(f"={_HEX[byte >> 4]}{_HEX[byte & 15]}")
    return "".join(out)


def _decode(token: str, max_length: int) -> str | None:
    if len(token) > 12 * max_length or not _TOKEN.fullmatch(token):  # 4 UTF-8 bytes of 3 characters each
        return None
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "=":
            raw.append(int(token[i + 1:i + 3], 16))
            i += 3
        else:
            raw.append(ord(token[i]))
            i += 1
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not valid_id(value, max_length) or encode(value) != token:
        return None
    return value


@lru_cache(maxsize=65_536)
def decode_room(token: str) -> str | None:
    """The room id ``token`` encodes, or None when it is not exactly ``encode`` of a valid room id."""
    return _decode(token, MAX_ROOM_ID_LENGTH)


@lru_cache(maxsize=4_096)
def decode_node(token: str) -> str | None:
    """The node id ``token`` encodes, or None when it is not exactly ``encode`` of a valid node id."""
    return _decode(token, MAX_NODE_ID_LENGTH)


class Subjects:
    """Every subject the backend publishes or reads, under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.rooms_root = f"{prefix}.rooms."
        self.notices_root = f"{prefix}.notices."
        self.live_root = f"{prefix}.live."
        self.all_rooms = f"{prefix}.rooms.>"
        self.all_notices = f"{prefix}.notices.>"
        self.all_live = f"{prefix}.live.>"
        self.pads = f"{prefix}.pads"  # the empty messages that reserve a batch's positions (batch.py)

    def room(self, room: str) -> str:
        """Where ``room``'s messages are published and stored (one subject per room)."""
        return self.rooms_root + encode(room)

    def live(self, room: str) -> str:
        """Where the stream republishes ``room``'s messages once stored, with their sequence (core NATS)."""
        return self.live_root + encode(room)

    def notice(self, room: str) -> str:
        """Where ``room``'s live-only notices go (core NATS, never stored)."""
        return self.notices_root + encode(room)

    def room_of(self, subject: str) -> str | None:
        """The room of a message subject, or None when it is not one of ours in its exact form."""
        if not subject.startswith(self.rooms_root):
            return None
        return decode_room(subject[len(self.rooms_root):])

    def room_of_live(self, subject: str) -> str | None:
        if not subject.startswith(self.live_root):
            return None
        return decode_room(subject[len(self.live_root):])

    def room_of_notice(self, subject: str) -> str | None:
        if not subject.startswith(self.notices_root):
            return None
        return decode_room(subject[len(self.notices_root):])
