"""The room protocol: JSON frames every built-in endpoint speaks.

Compatible with the Forge streaming extension's wire format, so a client of
one works with the other. Parsing is strict and cheap; every refusal is a
:class:`ProtocolError` with a machine-readable code that the caller turns
into an error frame (``{"type":"error","event":"message.rejected",...}``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

CLIENT_FRAME_TYPES = frozenset({"join", "leave", "message", "typing"})
MAX_ROOM_ID_LENGTH = 128

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
T = TypeVar("T")


class ProtocolError(Exception):
    """A client frame was refused; ``code`` goes into the error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class Message:
    """One message read from a connection: text or binary, kept distinct."""

    data: str | bytes

    @property
    def is_binary(self) -> bool:
        return isinstance(self.data, bytes)

    @property
    def text(self) -> str:
        if isinstance(self.data, bytes):
            raise ProtocolError("binary_not_supported", "expected a text message, got binary")
        return self.data

    def json(self) -> Any:
        return json.loads(self.text)


@dataclass(slots=True)
class ClientFrame:
    """A parsed client-to-server frame of the room protocol."""

    type: str
    room_id: str
    data: Any = None
    since: int | None = None


@dataclass(slots=True, eq=False)
class OutboundFrame:
    """One frame for many recipients, encoded once per publish.

    ``payload`` is what goes on the wire (UTF-8 JSON for room frames).
    Transports put their own framing of it (a WebSocket frame header, an SSE
    ``id:``/``data:`` block) in :meth:`encoded`, so it is built once per
    message and shared by every member using that transport.
    """

    payload: bytes
    binary: bool = False
    room: str | None = None
    sequence: int | None = None
    sender: str | None = None
    _encodings: dict[str, Any] = field(default_factory=dict)

    def encoded(self, key: str, encode: Callable[[OutboundFrame], T]) -> T:
        """Return the transport encoding stored under ``key``, making it once."""
        try:
            return self._encodings[key]  # type: ignore[no-any-return]
        except KeyError:
            value = encode(self)
            self._encodings[key] = value
            return value

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8")


def encode(frame: dict[str, Any]) -> bytes:
    """Encode a frame as compact UTF-8 JSON."""
    return _dumps(frame).encode("utf-8")


def new_message_id() -> str:
    """128 random bits as hex, like a UUID4's, at a sixth of uuid4()'s cost (once per message)."""
    return os.urandom(16).hex()


_second: list[Any] = [-1, ""]  # the whole second last formatted, and its text


def now_iso() -> str:
    """RFC 3339 UTC timestamp with milliseconds, as the Forge extension sends.

    The seconds part is formatted once per second: this runs once per message.
    """
    ms = time.time_ns() // 1_000_000
    second, millis = divmod(ms, 1000)
    if second != _second[0]:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{millis:03d}Z"


def message_frame(
    *, room_id: str, user_id: str, data: Any, sequence: int, message_id: str | None = None
) -> dict[str, Any]:
    return {
        "type": "message",
        "id": message_id or new_message_id(),
        "room_id": room_id,
        "user_id": user_id,
        "data": data,
        "timestamp": now_iso(),
        "sequence": sequence,
    }


def presence_frame(kind: str, *, room_id: str, user_id: str, **extra: Any) -> dict[str, Any]:
    """A ``join``/``leave``/``typing`` notice sent to the members of a room."""
    frame = {"type": kind, "room_id": room_id, "user_id": user_id, "timestamp": now_iso()}
    frame.update(extra)
    return frame


def system_frame(event: str, data: Any = None) -> dict[str, Any]:
    return {"type": "system", "event": event, "data": data, "timestamp": now_iso()}


def error_frame(code: str, message: str, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"code": code, "message": message}
    data.update(extra)
    return {"type": "error", "event": "message.rejected", "data": data}


def parse_client_frame(raw: str | bytes, *, max_size: int) -> ClientFrame:
    """Parse and validate one client frame; raise :class:`ProtocolError`."""
    if isinstance(raw, bytes):
        raise ProtocolError("binary_not_supported", "room frames are JSON text, got binary")
    if len(raw) > max_size:
        raise ProtocolError("too_large", f"frame of {len(raw)} characters, the limit is {max_size}")
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise ProtocolError("invalid_json", "frame nests too deeply") from None
    except ValueError as exc:
        raise ProtocolError("invalid_json", f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("invalid_frame", f"frame must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_frame", "frame needs a string 'type'")
    if kind not in CLIENT_FRAME_TYPES:
        raise ProtocolError(
            "unknown_type", f"unknown frame type {kind!r}; expected one of {sorted(CLIENT_FRAME_TYPES)}"
        )
    room_id = obj.get("room_id")
    if not isinstance(room_id, str) or not room_id:
        raise ProtocolError("missing_room", f"a {kind!r} frame needs a non-empty string 'room_id'")
    if len(room_id) > MAX_ROOM_ID_LENGTH or not room_id.isprintable():
        raise ProtocolError(
            "invalid_room", f"'room_id' must be printable and at most {MAX_ROOM_ID_LENGTH} characters"
        )
    since = obj.get("since")
    if since is not None and (not isinstance(since, int) or isinstance(since, bool) or since < 0):
        raise ProtocolError("invalid_frame", f"'since' must be a non-negative integer, got {since!r}")
    if kind == "message" and "data" not in obj:
        raise ProtocolError("invalid_frame", "a 'message' frame needs 'data'")
    return ClientFrame(type=kind, room_id=room_id, data=obj.get("data"), since=since)
