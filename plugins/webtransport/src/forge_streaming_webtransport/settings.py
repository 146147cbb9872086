"""The ``webtransport`` config section."""

from __future__ import annotations

from typing import Annotated

from forge_streaming import ConfigSection, Duration, Meta, Size


class WebTransportSettings(ConfigSection):
    """Keys under ``webtransport:`` in the YAML file (see the plugin README)."""

    host: str | None = None
    """UDP interface of the HTTP/3 server; None = the HTTP server's host."""
    port: Annotated[int, Meta(ge=0, le=65535)] | None = None
    """UDP port; None = the HTTP server's port number (browsers find it via Alt-Svc)."""
    cert_file: str | None = None
    """PEM certificate chain; without it a development certificate is made at start."""
    key_file: str | None = None
    """PEM private key matching ``cert_file``."""
    allowed_origins: list[str] = []
    """Origins allowed besides the server's own, ``fnmatch`` wildcards (``https://*.example.com``)."""
    max_sessions: Annotated[int, Meta(ge=1)] = 1000
    max_streams_per_session: Annotated[int, Meta(ge=1)] = 100
    idle_timeout: Duration = 60.0
    """A session with no data from its client for this long is closed; 0 disables the check."""
    max_datagram_size: Annotated[Size, Meta(ge=1)] = 1200
    """Largest datagram payload a handler may send or will be handed."""
    max_packet_size: Annotated[Size, Meta(ge=1200, le=65527)] = 1350
    """Largest UDP payload of a QUIC packet the server sends (the path MTU less the IP and UDP headers).
    Fewer, fuller packets cost less CPU per message; a path that cannot carry them drops them, and
    the server does no path MTU discovery. 1350 is what Google's QUIC servers send; 1452 fits any
    Ethernet path (1500 less 48 bytes of IPv6 and UDP headers); 1200 is QUIC's minimum."""
    pacing: bool = False
    """Spread each congestion window over a round trip (aioquic's pacer) instead of sending what the
    window allows at once. It costs a timer and a transmit per few packets per client."""
    send_buffer: Size | None = None
    """Unacknowledged bytes allowed on a session's message stream; None = ``limits.send_buffer``."""
    udp_buffer: Annotated[Size, Meta(ge=0)] = 4 * 1024 * 1024
    """Bytes of receive and of send buffer asked of the OS for the UDP socket every client shares (0: the OS
    default, 208 KiB on Linux, which the datagrams of many clients at once overflow). Linux grants
    at most ``net.core.rmem_max`` / ``wmem_max`` unless the process has CAP_NET_ADMIN; the start log says
    when it got less."""
    read_buffer: Annotated[Size, Meta(ge=1024)] = 1024 * 1024
    """Unread bytes a session may hold, all together: data on its streams, messages not read yet,
    streams not accepted yet and datagrams. Past it, on top of one message (``limits.max_message_size``),
    the session is closed 1009 ``read buffer overflow``; a datagram that would pass it is dropped."""
