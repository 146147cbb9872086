"""What an SSE handler sends: one Server-Sent Event, beside ``Streaming`` as Forge has it.

The class is plain data; the SSE transport plugin encodes it for the wire
(so the kernel needs no SSE library). ``from forge_streaming_sse import
Event`` names the same class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    """One Server-Sent Event, as a handler sends it with ``await stream.send_event(Event(...))``.

    ``data`` that is not a string (dicts, lists, numbers) is sent as compact
    JSON; a string is sent as is, one ``data:`` line per line. ``type`` is
    the event name (``event:``), ``id`` what the browser sends back as
    ``Last-Event-ID``, ``retry`` the reconnect delay in milliseconds.
    """

    data: Any = ""
    type: str | None = None
    id: str | None = None
    retry: int | None = None
