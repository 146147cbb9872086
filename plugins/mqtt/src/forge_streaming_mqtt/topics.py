"""The topic layout: a public interface, documented in README.md.

Room ids and node ids go into one topic level each. ``%``, ``/``, ``+``,
``#`` and every character that is not printable (NUL and other control
characters, Unicode noncharacters, surrogates, format characters) are
percent-encoded as UTF-8 bytes, so that an id never changes the topic
structure and never makes a topic that a broker calls malformed; everything
else stays readable (``lobby`` stays ``lobby``, ``café`` stays ``café``;
``a/b`` becomes ``a%2Fb``).

Decoding is strict: a level is accepted only in exactly the form
:func:`encode_level` gives (``%6Cobby`` is not ``lobby``, so no second
spelling of a room slips past a broker ACL written for the first), and
only when it decodes to a valid id: printable and at most
:data:`MAX_ROOM_ID_LENGTH` characters for rooms (the kernel's rule for
room ids from clients), :data:`MAX_NODE_ID_LENGTH` for nodes.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import unquote

MAX_ROOM_ID_LENGTH = 128  # the kernel's rule for a client's room_id: printable, at most 128 characters
MAX_NODE_ID_LENGTH = 256
_RESERVED = {"%": "%25", "/": "%2F", "+": "%2B", "#": "%23"}
# an encoded level is at most 3 characters per character of the id (``%25``); longer ones are refused unread
_MAX_ROOM_LEVEL = 3 * MAX_ROOM_ID_LENGTH

MAX_POSITION = 2**63  # sequences from the wire are below this (what a signed 64-bit integer holds)
MAX_DIGITS = 19  # len(str(MAX_POSITION - 1)): a longer number is refused before it is parsed

# MQTT v5 user properties carrying kernel metadata; the payload stays the clean frame.
PROP_KIND = "forge-kind"
PROP_SEQUENCE = "forge-sequence"
PROP_SENDER = "forge-sender"
PROP_NODE = "forge-node"
PROP_BINARY = "forge-binary"  # "1" on a binary room message (Envelope.binary); absent on text
PROP_COUNT = "forge-count"  # "{stream}:{number}", numbered per room by the publishing node (continuity.py)
PROP_PREVIOUS = "forge-previous"  # the room's position before this message, as the sequencer gave it (sequencer.py)
PROP_BATCH = "forge-batch"  # on a batch of room messages: how many (batch.py)
PROP_ID = "forge-id"  # the message id, when its publisher waits for the position (Envelope.id)


def valid_id(value: str, max_length: int = MAX_ROOM_ID_LENGTH) -> bool:
    """Non-empty, printable (no control character, noncharacter or surrogate), at most ``max_length``."""
    return 0 < len(value) <= max_length and value.isprintable()


def wire_number(text: str) -> int | None:
    """A non-negative integer below :data:`MAX_POSITION` written in ASCII digits, else None (nothing else parsed)."""
    if len(text) > MAX_DIGITS or not text.isdigit() or not text.isascii():
        return None
    number = int(text)
    return number if number < MAX_POSITION else None


def _escape(char: str) -> str:
    escaped = _RESERVED.get(char)
    if escaped is not None:
        return escaped
    if char.isprintable():
        return char
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


@lru_cache(maxsize=65_536)
def encode_level(value: str) -> str:
    """``value`` as one topic level that any broker accepts, whatever the string."""
    if value.isprintable() and not any(c in value for c in _RESERVED):
        return value
    return "".join(_escape(c) for c in value)


def _strict_decode(level: str, max_length: int) -> str | None:
    try:
        value = unquote(level, errors="strict")
    except UnicodeDecodeError:
        return None
    if not valid_id(value, max_length) or encode_level(value) != level:
        return None
    return value


@lru_cache(maxsize=65_536)
def _decode_room(level: str) -> str | None:  # one argument: lru_cache's fast key, once per received message
    return _strict_decode(level, MAX_ROOM_ID_LENGTH)


@lru_cache(maxsize=4_096)
def _decode_node(level: str) -> str | None:
    return _strict_decode(level, MAX_NODE_ID_LENGTH)


def decode_level(level: str, max_length: int = MAX_ROOM_ID_LENGTH) -> str | None:
    """The id a topic level encodes, or None when the level is not exactly what :func:`encode_level` gives
    for a valid id (non-canonical escapes, control characters, too long, empty)."""
    if len(level) > 3 * max_length:
        return None
    if max_length == MAX_ROOM_ID_LENGTH:
        return _decode_room(level)
    if max_length == MAX_NODE_ID_LENGTH:
        return _decode_node(level)
    return _strict_decode(level, max_length)


class Topics:
    """Every topic a node publishes or subscribes to, under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.rooms_root = f"{prefix}/rooms/"
        self.presence_root = f"{prefix}/presence/"
        self.nodes_root = f"{prefix}/nodes/"
        self.history_request = f"{prefix}/history/request"
        self.all_room_messages = f"{prefix}/rooms/+/messages"
        self.all_presence = f"{prefix}/presence/#"
        self.all_status = f"{prefix}/nodes/+/status"
        self.ingest_shared = f"$share/{prefix}-ingest/{prefix}/rooms/+/publish"
        self.marks_root = f"{prefix}/marks/"
        self.all_marks = f"{prefix}/marks/+"
        self.all_submits = f"{prefix}/rooms/+/submit"
        self.sequencer = f"{prefix}/sequencer"

    def messages(self, room: str) -> str:
        return f"{self.rooms_root}{encode_level(room)}/messages"

    def submit(self, room: str) -> str:
        return f"{self.rooms_root}{encode_level(room)}/submit"

    def publish(self, room: str) -> str:
        return f"{self.rooms_root}{encode_level(room)}/publish"

    def presence(self, node: str, room: str) -> str:
        return f"{self.presence_root}{encode_level(node)}/{encode_level(room)}"

    def status(self, node: str) -> str:
        return f"{self.nodes_root}{encode_level(node)}/status"

    def marks(self, node: str) -> str:
        return f"{self.marks_root}{encode_level(node)}"

    def node_of_marks(self, topic: str) -> str | None:
        level = topic[len(self.marks_root):] if topic.startswith(self.marks_root) else "/"
        return None if "/" in level else decode_level(level, MAX_NODE_ID_LENGTH)

    def history_response(self, node: str) -> str:
        return f"{self.prefix}/history/response/{encode_level(node)}"

    def room_of(self, topic: str) -> tuple[str, str] | None:
        """``(room, leaf)`` of a ``{prefix}/rooms/{room}/{leaf}`` topic whose room id is valid, else None."""
        if not topic.startswith(self.rooms_root):
            return None
        level, sep, leaf = topic[len(self.rooms_root):].partition("/")
        if not sep or "/" in leaf or len(level) > _MAX_ROOM_LEVEL:
            return None
        room = _decode_room(level)
        return None if room is None else (room, leaf)

    def presence_of(self, topic: str) -> tuple[str, str] | None:
        """``(node, room)`` of a presence topic with valid ids, else None."""
        if not topic.startswith(self.presence_root):
            return None
        level, sep, room_level = topic[len(self.presence_root):].partition("/")
        if not sep or "/" in room_level:
            return None
        node, room = decode_level(level, MAX_NODE_ID_LENGTH), decode_level(room_level)
        return None if node is None or room is None else (node, room)

    def node_of_status(self, topic: str) -> str | None:
        if not topic.startswith(self.nodes_root) or not topic.endswith("/status"):
            return None
        level = topic[len(self.nodes_root):-len("/status")]
        return None if "/" in level else decode_level(level, MAX_NODE_ID_LENGTH)
