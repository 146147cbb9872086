"""Message framing on the message stream, and WebTransport capsules.

A QUIC stream is a byte stream, so messages need boundaries. Each message,
in both directions, is::

    1 byte   type: 0x01 text (UTF-8), 0x02 binary
    4 bytes  payload length, unsigned big-endian
    N bytes  payload

Text stays text and bytes stay bytes, as on a WebSocket.
"""

from __future__ import annotations

import struct

TEXT = 0x01
BINARY = 0x02
HEADER = struct.Struct(">BI")

CLOSE_SESSION_CAPSULE = 0x2843
"""CLOSE_WEBTRANSPORT_SESSION (draft-ietf-webtrans-http3): 32-bit code + UTF-8 reason."""
MAX_CLOSE_REASON = 1024


class FramingError(Exception):
    """The client broke the framing; ``close_code`` says how the session ends."""

    def __init__(self, message: str, close_code: int) -> None:
        super().__init__(message)
        self.close_code = close_code


def encode_message(payload: bytes, binary: bool) -> bytes:
    return HEADER.pack(BINARY if binary else TEXT, len(payload)) + payload


class MessageDecoder:
    """Splits a message stream into messages, refusing any over ``max_size``."""

    __slots__ = ("_buffer", "_max_size")

    def __init__(self, max_size: int) -> None:
        self._buffer = bytearray()
        self._max_size = max_size

    def feed(self, data: bytes) -> list[str | bytes]:
        """Every complete message in what has arrived so far; raise FramingError on bad input."""
        buffer = self._buffer
        buffer += data
        out: list[str | bytes] = []
        start = 0
        while len(buffer) - start >= HEADER.size:
            kind, size = HEADER.unpack_from(buffer, start)
            if kind not in (TEXT, BINARY):
                raise FramingError(f"unknown message type 0x{kind:02x}; expected 0x01 text or 0x02 binary", 1002)
            if size > self._max_size:
                raise FramingError(f"message of {size} bytes, the limit is {self._max_size}", 1009)
            end = start + HEADER.size + size
            if len(buffer) < end:
                break
            payload = bytes(buffer[start + HEADER.size:end])
            if kind == TEXT:
                try:
                    out.append(payload.decode("utf-8"))
                except UnicodeDecodeError:
                    raise FramingError("text message is not valid UTF-8", 1007) from None
            else:
                out.append(payload)
            start = end
        if start:
            del buffer[:start]
        return out

    @property
    def pending(self) -> int:
        return len(self._buffer)


def encode_varint(value: int) -> bytes:
    if value < 0x40:
        return bytes([value])
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x40000000:
        return (value | 0x80000000).to_bytes(4, "big")
    return (value | 0xC000000000000000).to_bytes(8, "big")


def decode_varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, next position), or None if ``data`` ends before the varint does."""
    if pos >= len(data):
        return None
    length = 1 << (data[pos] >> 6)
    if pos + length > len(data):
        return None
    value = data[pos] & 0x3F
    for byte in data[pos + 1:pos + length]:
        value = (value << 8) | byte
    return value, pos + length


def close_capsule(code: int, reason: str) -> bytes:
    reason_bytes = reason.encode("utf-8")[:MAX_CLOSE_REASON]
    value = (code & 0xFFFFFFFF).to_bytes(4, "big") + reason_bytes
    return encode_varint(CLOSE_SESSION_CAPSULE) + encode_varint(len(value)) + value


def parse_close_capsule(data: bytes) -> tuple[int, str] | None:
    """The code and reason of a CLOSE_WEBTRANSPORT_SESSION capsule at the start of ``data``."""
    parsed = decode_varint(data, 0)
    if parsed is None or parsed[0] != CLOSE_SESSION_CAPSULE:
        return None
    length = decode_varint(data, parsed[1])
    if length is None or length[1] + length[0] > len(data) or length[0] < 4:
        return None
    start = length[1]
    code = int.from_bytes(data[start:start + 4], "big")
    return code, data[start + 4:start + length[0]].decode("utf-8", "replace")
