"""MQTT v5 packets and user properties in a few microseconds, for the hot path.

paho-mqtt's ``Properties`` costs tens of microseconds to build and pack
per message (it scans its property table by name); on publish paho only
calls ``properties.pack()``, so this packs the one property kind we send
(User Property, identifier 0x26: a UTF-8 string pair) directly, following
the MQTT 5.0 wire format (section 2.2.2). A QoS 0 room message is encoded
here whole (:func:`qos0_publish_packet`): paho's ``publish`` would add a
``threading.Condition`` per message for a delivery receipt nobody waits on.
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
        body = b"".join([_USER_PROPERTY + _utf8(key) + _utf8(value) for key, value in pairs])
        self._packed = _varint(len(body)) + body

    def pack(self) -> bytes:
        return self._packed


def qos0_publish_packet(topic: bytes, properties: UserProperties, payload: bytes) -> bytes:
    """A QoS 0, not retained, MQTT v5 PUBLISH packet (MQTT 5.0 section 3.3)."""
    if len(topic) > 0xFFFF:
        raise ValueError(f"an MQTT topic holds at most 65535 bytes, got {len(topic)}")
    props = properties.pack()
    body_length = 2 + len(topic) + len(props) + len(payload)
    return b"".join((b"\x30", _varint(body_length), len(topic).to_bytes(2, "big"), topic, props, payload))


class ReceivedProperties:
    """The properties of a received PUBLISH that carries only User Properties (what nodes send).

    Read like paho's ``Properties``: ``getattr(props, "UserProperty", None)``; any other
    property (``ResponseTopic``, ``CorrelationData``, ...) is absent. Packets with other
    properties are parsed by paho as usual (see :func:`parse_user_properties`).
    """

    __slots__ = ("UserProperty",)

    def __init__(self, pairs: list[tuple[str, str]] | None) -> None:
        if pairs:
            self.UserProperty = pairs

    def __repr__(self) -> str:
        return f"[UserProperty : {getattr(self, 'UserProperty', [])}]"


def parse_user_properties(data: bytes | bytearray, pos: int) -> tuple[ReceivedProperties, int] | None:
    """Parse the property block at ``data[pos:]`` if it holds only User Properties.

    Returns the properties and the position after the block, or None (any other property,
    or anything malformed: the caller lets paho parse and judge the packet).
    """
    length = shift = 0
    for _ in range(4):
        if pos >= len(data):
            return None
        byte = data[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        return None
    end = pos + length
    if end > len(data):
        return None
    pairs: list[tuple[str, str]] = []
    try:
        while pos < end:
            if data[pos] != 0x26:
                return None
            pos += 1
            strings = []
            for _ in range(2):
                size = (data[pos] << 8) | data[pos + 1]
                pos += 2
                if pos + size > end:
                    return None
                strings.append(data[pos:pos + size].decode("utf-8"))
                pos += size
            pairs.append((strings[0], strings[1]))
    except (IndexError, UnicodeDecodeError):
        return None
    if pos != end:
        return None
    return ReceivedProperties(pairs), end
