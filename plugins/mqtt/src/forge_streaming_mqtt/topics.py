"""The topic layout: a public interface, documented in README.md.

Room ids and node ids go into one topic level each, with only ``%``,
``/``, ``+``, ``#`` and NUL percent-encoded, so that they never change the
topic structure and everything else stays readable (``lobby`` stays
``lobby``, ``café`` stays ``café``; ``a/b`` becomes ``a%2Fb``).
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import unquote

_ESCAPES = {"%": "%25", "/": "%2F", "+": "%2B", "#": "%23", "\0": "%00"}

# MQTT v5 user properties carrying kernel metadata; the payload stays the clean frame.
PROP_KIND = "forge-kind"
PROP_SEQUENCE = "forge-sequence"
PROP_SENDER = "forge-sender"
PROP_NODE = "forge-node"
PROP_COUNT = "forge-count"  # "{stream}:{number}", numbered per room by the publishing node (continuity.py)


@lru_cache(maxsize=65_536)
def encode_level(value: str) -> str:
    if not any(c in value for c in _ESCAPES):
        return value
    return "".join(_ESCAPES.get(c, c) for c in value)


@lru_cache(maxsize=65_536)
def decode_level(level: str) -> str:
    return unquote(level)


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

    def messages(self, room: str) -> str:
        return f"{self.rooms_root}{encode_level(room)}/messages"

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
        return None if "/" in level else decode_level(level)

    def history_response(self, node: str) -> str:
        return f"{self.prefix}/history/response/{encode_level(node)}"

    def room_of(self, topic: str) -> tuple[str, str] | None:
        """``(room, leaf)`` of a ``{prefix}/rooms/{room}/{leaf}`` topic, else None."""
        if not topic.startswith(self.rooms_root):
            return None
        level, sep, leaf = topic[len(self.rooms_root):].partition("/")
        if not sep or "/" in leaf:
            return None
        return decode_level(level), leaf

    def presence_of(self, topic: str) -> tuple[str, str] | None:
        """``(node, room)`` of a presence topic, else None."""
        if not topic.startswith(self.presence_root):
            return None
        node, sep, room = topic[len(self.presence_root):].partition("/")
        if not sep or "/" in room:
            return None
        return decode_level(node), decode_level(room)

    def node_of_status(self, topic: str) -> str | None:
        if not topic.startswith(self.nodes_root) or not topic.endswith("/status"):
            return None
        level = topic[len(self.nodes_root):-len("/status")]
        return None if "/" in level else decode_level(level)
