"""The ``websocket`` config section."""

from __future__ import annotations

from typing import Annotated

from forge_streaming import ConfigSection, Duration, Meta, Size


class WebSocketSettings(ConfigSection):
    """Every key is enforced by the transport; see the plugin README for what each does."""

    read_buffer_size: Size | None = None
    """SO_RCVBUF of each accepted socket; None keeps the OS default (autotuned)."""

    write_buffer_size: Size | None = None
    """SO_SNDBUF of each accepted socket; None keeps the OS default (autotuned)."""

    enable_compression: bool = False
    """Offer permessage-deflate; when off it is never negotiated."""

    max_message_size: Size | None = None
    """Largest message a client may send (default: ``limits.max_message_size``, 64 KiB); larger closes 1009."""

    allowed_origins: list[str] = []
    """Browser origins allowed to connect; ``[]`` means same-origin only. Shell wildcards (``*``) allowed."""

    subprotocols: list[str] = []
    """Subprotocols the server speaks; it picks the first one the client offers that is in this list."""

    ping_interval: Duration | None = 20.0
    """Seconds between keepalive pings; 0 or None turns keepalive off."""

    ping_timeout: Duration | None = 20.0
    """Seconds to wait for the pong; a peer silent for longer is closed and its rooms cleaned up."""

    send_buffer: Size | None = None
    """Unsent bytes a client may fall behind by before it is closed as a ``slow consumer``
    (default: ``limits.send_buffer``, 1 MiB)."""

    close_timeout: Duration = 5.0
    """After sending a close frame, how long to wait for the peer before the socket is cut."""

    flush_window: Annotated[Duration, Meta(ge=0.0, le=1.0)] = 0.0
    """Delay a connection's flush by up to this long after its first pending write, so paced traffic
    leaves in fewer ``write()`` calls at a latency cost bounded by it; 0 (the default) flushes at the end
    of the loop iteration. At most 1 s."""
