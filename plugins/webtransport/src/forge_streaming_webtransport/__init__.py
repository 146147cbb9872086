"""WebTransport (HTTP/3 over QUIC, served by aioquic) for forge-streaming."""

from .certificate import CertificatePair, make_development_certificate
from .framing import encode_message
from .session import WebTransportSession
from .settings import WebTransportSettings
from .streams import StreamClosed, WebTransportStream
from .transport import WebTransportTransport

__all__ = [
    "CertificatePair", "StreamClosed", "WebTransportSession", "WebTransportSettings", "WebTransportStream",
    "WebTransportTransport", "encode_message", "make_development_certificate",
]
