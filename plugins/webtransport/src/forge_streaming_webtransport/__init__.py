"""WebTransport (HTTP/3 over QUIC, served by aioquic) for forge-streaming.

Sessions, streams and framing are imported on first use of their names:
every service loads this plugin at start, and they are needed only once
the QUIC server runs, which loads them off the event loop (see
``transport.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .certificate import CertificatePair, make_development_certificate
from .settings import WebTransportSettings
from .transport import WebTransportTransport

if TYPE_CHECKING:
    from .framing import encode_message
    from .session import WebTransportSession
    from .streams import StreamClosed, WebTransportStream

__all__ = [
    "CertificatePair", "StreamClosed", "WebTransportSession", "WebTransportSettings", "WebTransportStream",
    "WebTransportTransport", "encode_message", "make_development_certificate",
]


def __getattr__(name: str) -> Any:
    if name == "encode_message":
        from .framing import encode_message

        return encode_message
    if name == "WebTransportSession":
        from .session import WebTransportSession

        return WebTransportSession
    if name in ("StreamClosed", "WebTransportStream"):
        from . import streams

        return getattr(streams, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
