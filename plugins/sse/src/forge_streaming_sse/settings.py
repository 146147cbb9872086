"""The ``sse`` config section."""

from __future__ import annotations

from typing import Annotated

from forge_streaming import Check, ConfigSection, Duration, Meta, Size


def _absolute(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"expected a path starting with '/', got {value!r}")
    return value.rstrip("/") or "/"


class SSESettings(ConfigSection):
    """Keys under ``sse:`` in the config file (``FORGE_STREAMING__SSE__<KEY>`` in the environment)."""

    keep_alive_interval: Duration = 15.0
    """A ``: keep-alive`` comment is sent when a stream was idle this long (0 turns it off)."""

    retry: Duration = 3.0
    """Reconnect delay suggested to clients with the ``retry:`` field (sent in milliseconds)."""

    send_buffer: Annotated[Size, Meta(ge=1024)] | None = None
    """Unsent bytes a stream may hold before it is ended as a slow consumer (default: ``limits.send_buffer``)."""

    max_post_size: Annotated[Size, Meta(ge=16)] | None = None
    """Largest body accepted at the send URL (default: ``limits.max_message_size``)."""

    send_path: Annotated[str, Check(_absolute)] = "/sse/send"
    """Where clients POST room-protocol frames for their stream."""

    allowed_origins: list[str] = []
    """Browser origins allowed besides the server's own (the same rule as ``websocket.allowed_origins``):
    shell wildcards, ``https://*.example.com``. A refused origin gets 403 on the stream and the send URL."""

    fast_path: bool = True
    """Serve with the plugin's uvicorn protocol, which writes events straight to the socket.

    Off, every stream is written through ASGI ``send`` by one writer task (what
    happens anyway under another ASGI server).
    """
