"""MQTT v5 user properties packed in a few microseconds, for the publish hot path.

paho-mqtt's ``Properties`` costs tens of microseconds to build and pack
per message (it scans its property table by name); on publish paho only
calls ``properties.pack()``, so this packs the one property kind we send
(User Property, identifier 0x26: a UTF-8 string pair) directly, following
the MQTT 5.0 wire format (section 2.2.2). Received properties are still
parsed by paho.
"""

from __future__ import annotations

_USER_PROPERTY = b"\x26"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError(f"an MQTT string holds at most 65535 bytes, got {len(data)}")
    return len(data).to_bytes(2, "big") + data


class UserProperties:
    """What paho needs of a properties object to publish: ``pack()``."""

    __slots__ = ("UserProperty", "_packed")

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.UserProperty = pairs
        body = b"".join(_USER_PROPERTY + _utf8(key) + _utf8(value) for key, value in pairs)
        self._packed = _varint(len(body)) + body

    def pack(self) -> bytes:
        return self._packed
