"""Entry point ``sse`` (group ``forge_streaming``): registers the transport and its config section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from forge_streaming import ConfigSection, Connection, Refused, Transport, hookimpl

from . import cursor
from .settings import SSESettings
from .transport import SSETransport


@hookimpl
def streaming_register_transports() -> Sequence[type[Transport]]:
    return [SSETransport]


@hookimpl
def streaming_config_sections() -> Mapping[str, type[ConfigSection]]:
    return {"sse": SSESettings}


@hookimpl
def streaming_join_room(connection: Connection, room: str) -> None:
    """An SSE stream's event id is its resume cursor, naming every room it is in: a join that could make it
    longer than a ``Last-Event-ID`` this plugin reads back is refused, rather than a stream that cannot resume."""
    if connection.transport != "sse" or room in connection.rooms:
        return
    size = sum(cursor.part_size(r) for r in connection.rooms) + cursor.part_size(room)
    if size > cursor.MAX_LENGTH:
        raise Refused(f"this stream's resume id would pass {cursor.MAX_LENGTH} bytes with room {room[:40]!r}: "
                      f"an SSE stream resumes all its rooms from one Last-Event-ID; use fewer rooms (or shorter "
                      f"names) per stream", code="cursor_full")
