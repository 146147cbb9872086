"""SSE wire encoding: user events (through sse-starlette) and room frames (by hand, once per publish).

Room frames are compact JSON without raw line breaks (the kernel's encoder
escapes them), so one ``data:`` line carries a whole frame: the same bytes a
WebSocket member gets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from forge_streaming import OutboundFrame
from sse_starlette import ServerSentEvent

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode  # JSON.parse refuses NaN

KEEP_ALIVE = b": keep-alive\n\n"


@dataclass(frozen=True, slots=True)
class Event:
    """One Server-Sent Event, as a handler sends it with ``await stream.send_event(...)``.

    ``data`` that is not a string (dicts, lists, numbers) is sent as compact
    JSON; a string is sent as is, one ``data:`` line per line. ``retry`` is
    the reconnect delay in milliseconds.
    """

    data: Any = ""
    type: str | None = None
    id: str | None = None
    retry: int | None = None

    def encode(self) -> bytes:
        data = self.data
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        elif not isinstance(data, str):
            data = _dumps(data)
        if self.retry is not None and (not isinstance(self.retry, int) or self.retry < 0):
            raise ValueError(f"Event.retry must be a whole number of milliseconds >= 0, got {self.retry!r}")
        if self.id is not None and "\x00" in self.id:
            raise ValueError("Event.id must not contain NUL (browsers ignore such ids)")
        return ServerSentEvent(data, event=self.type, id=self.id, retry=self.retry, sep="\n").encode()


def plain(frame: OutboundFrame) -> bytes:
    """A frame as an unnamed event without an id (presence, notices, errors)."""
    return b"data: " + frame.payload + b"\n\n"


def with_id(cursor: bytes, frame: OutboundFrame) -> bytes:
    return b"id: " + cursor + b"\ndata: " + frame.payload + b"\n\n"


def named(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _dumps(data).encode() + b"\n\n"


def retry(seconds: float) -> bytes:
    """A ``retry:`` line, put in front of the next event's block.

    Sent inside an event rather than alone: some clients (httpx-sse) surface
    a block without data as an empty event.
    """
    return b"retry: %d\n" % int(seconds * 1000)
