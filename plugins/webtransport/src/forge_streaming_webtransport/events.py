"""What the QUIC connection tells a session: small event objects, as aioquic's own.

:class:`~forge_streaming_webtransport.server.WebTransportProtocol` turns
aioquic's QUIC and HTTP/3 events into these and hands each to its session's
``handle_event``; the session never looks into the protocol, nor the
protocol into the session.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """The client closed the session (close capsule or FIN), or the QUIC connection went away."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class StreamData:
    """Data (possibly empty) on one of the session's streams; ``ended``: the peer finished it."""

    stream_id: int
    data: bytes
    ended: bool


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The client reset (abandoned) its sending side of a stream."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class StopSending:
    """The client asked us to stop sending on a stream (aioquic has reset our side already)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Datagram:
    """One datagram of the session."""

    data: bytes


SessionEvent = SessionEnded | StreamData | StreamReset | StopSending | Datagram
