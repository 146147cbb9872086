"""Server-to-client WebSocket frames built by hand, once per message.

A server frame is never masked (RFC 6455 5.1), so an uncompressed frame is
a 2-10 byte header plus the payload: the same bytes for every recipient.
"""

from __future__ import annotations

import struct

from forge_streaming import OutboundFrame

OP_TEXT = 0x1
OP_BINARY = 0x2
FIN = 0x80

ENCODING_KEY = "websocket"
"""The key under which a shared :class:`OutboundFrame` keeps its WebSocket framing."""


def frame_bytes(payload: bytes, *, binary: bool) -> bytes:
    """One complete unmasked frame (FIN set) carrying ``payload``."""
    first = FIN | (OP_BINARY if binary else OP_TEXT)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 126, n)
    else:
        header = struct.pack("!BBQ", first, 127, n)
    return header + payload


def make_ws_frame(frame: OutboundFrame) -> bytes:
    """The encoder handed to ``OutboundFrame.encoded``: run once per published message."""
    return frame_bytes(frame.payload, binary=frame.binary)
