"""SSE wire encoding: user events (through sse-starlette) and room frames (by hand, once per publish).

Room frames are compact JSON without raw line breaks (the kernel's encoder
escapes them), so one ``data:`` line carries a whole frame: the same bytes a
WebSocket member gets.
"""

from __future__ import annotations

import json
from typing import Any

from forge_streaming import Event, OutboundFrame

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode  # JSON.parse refuses NaN

KEEP_ALIVE = b": keep-alive\n\n"


def encode_event(event: Event) -> bytes:
    """A handler's :class:`forge_streaming.Event` on the wire (through sse-starlette)."""
    data = event.data
    if isinstance(data, bytes):
        data = data.decode("utf-8")
    elif not isinstance(data, str):
        data = _dumps(data)
    if event.retry is not None and (not isinstance(event.retry, int) or event.retry < 0):
        raise ValueError(f"Event.retry must be a whole number of milliseconds >= 0, got {event.retry!r}")
    if event.id is not None and "\x00" in event.id:
        raise ValueError("Event.id must not contain NUL (browsers ignore such ids)")
    from sse_starlette import ServerSentEvent  # only for handler events: ~4 ms off the plugin's import

    return ServerSentEvent(data, event=event.type, id=event.id, retry=event.retry, sep="\n").encode()


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
