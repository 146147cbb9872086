"""The room protocol: JSON frames every built-in endpoint speaks.

Compatible with the Forge streaming extension's wire format, so a client of
one works with the other. Parsing is strict and cheap; every refusal is a
:class:`ProtocolError` with a machine-readable code that the caller turns
into an error frame (``{"type":"error","event":"message.rejected",...}``).

Two validators are the kernel's one rule for everything a client or an
application hands in, whatever the API:

- :func:`loads`: JSON a browser's ``JSON.parse`` accepts too (no ``NaN``,
  ``Infinity`` or number that overflows to it, no lone surrogate) and that
  nests at most ``limits.max_json_depth`` deep, so that re-encoding what
  was accepted can never fail;
- :func:`validate_room_id`: a non-empty string of at most
  :data:`MAX_ROOM_ID_LENGTH` printable characters.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, TypeVar

import msgspec
import orjson

CLIENT_FRAME_TYPES = frozenset({"join", "leave", "message", "typing"})
MAX_ROOM_ID_LENGTH = 128
MAX_JSON_DEPTH = 64
"""The default of ``limits.max_json_depth``: how deep a JSON text may nest (``{}`` is 1, ``{"a":[]}`` 2)."""

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
"""The reference encoder: what :func:`encode` returns, made faster by orjson wherever orjson writes the same bytes."""
T = TypeVar("T")


class ProtocolError(Exception):
    """A client frame was refused; ``code`` goes into the error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidInput(ProtocolError, ValueError):
    """Refused JSON or room id: a :class:`ProtocolError` for the protocol, a ``ValueError`` for applications."""


# -- strict JSON ------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise InvalidInput("invalid_json", f"{name} is not a JSON number (JSON.parse refuses it)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value - value != 0.0:  # inf - inf is nan
        raise InvalidInput("invalid_json", f"number {text[:40]} is out of range (it overflows to Infinity)")
    return value


_decode = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float).decode
_CONTAINERS = frozenset({dict, list})
_ESCAPE = re.compile(r"\\.", re.DOTALL)  # in valid JSON, only inside strings
_NOT_BRACKETS = str.maketrans("", "", "0123456789+-.eE" "truefalsn" ",: \t\n\r")  # all else outside strings
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_PAIR_OR_BACKSLASH = re.compile(r"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def json_depth(text: str) -> int:
    """How deep valid JSON ``text`` nests (``1`` is 0, ``{}`` 1, ``{"a":[]}`` 2): brackets outside strings.

    Linear in the text: the strings are cut out (escapes first, so that a
    quote is always a string's end), then the brackets left are peeled a level
    at a time while that halves them (C-speed ``str.replace``), and what
    remains is counted.
    """
    if "\\" in text:
        text = _ESCAPE.sub("", text)
    brackets = "".join(text.split('"')[::2]).translate(_NOT_BRACKETS)
    peeled = 0
    while brackets:
        inner = brackets.replace("[]", "\0").replace("{}", "\0").replace("\0", "")  # one level: the leaves
        peeled += 1
        if len(inner) * 2 > len(brackets):  # peeling no longer pays: count what is left
            return peeled + max(accumulate(map(_BRACKET_STEP.__getitem__, inner)), default=0)
        brackets = inner
    return peeled


def _lone_surrogate(text: str) -> bool:
    """True when valid JSON ``text`` escapes a UTF-16 surrogate that is not half of a pair.

    Escaped backslashes and well-formed pairs are cut out (left to right, so a
    ``\\\\`` before a ``u`` is never taken for an escape); any surrogate escape left is alone.
    """
    return _SURROGATE_ESCAPE.search(_SURROGATE_PAIR_OR_BACKSLASH.sub("", text)) is not None


_fast_decode = msgspec.json.Decoder().decode


def loads(text: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON that a browser can parse and the kernel can re-encode; raise :class:`InvalidInput`.

    ``invalid_json`` for: malformed JSON, ``NaN``/``Infinity``/``-Infinity``,
    a number that overflows to infinity (``1e999``), an escaped lone
    surrogate (``"\\ud800"``), nesting deeper than ``max_depth``. The checks
    past the parse cost nothing for a frame whose values nest only one
    level and hold no ``\\`` escape (most frames); see the README's limits.

    msgspec parses (a seventh of ``json.loads``' cost): it gives the same
    values as the stdlib for every text it accepts (integers of any size
    included), and refuses ``NaN``, ``Infinity``, ``1e999``, escaped lone
    surrogates and texts nested past the recursion limit; whatever it
    refuses goes through the stdlib path, which says why (or, for the few
    texts only the stdlib accepts, such as an unescaped surrogate, accepts it).
    ``tests/test_frames_fast_json.py`` holds the two paths to the same answers.
    """
    if not isinstance(text, str):  # the stdlib's answer (a TypeError) for what is not text
        return _loads_stdlib(text, max_depth)
    try:
        value = _fast_decode(text)
    except Exception:  # any refusal: the stdlib path answers it, as it always did
        return _loads_stdlib(text, max_depth)
    return _checked(value, text, max_depth)


def _loads_stdlib(text: str, max_depth: int) -> Any:
    """:func:`loads` by the standard library alone: the reference, and the path for what msgspec refuses."""
    try:
        value = _decode(text)
    except InvalidInput:
        raise
    except RecursionError:
        raise InvalidInput("invalid_json", f"JSON nests deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise InvalidInput("invalid_json", f"not valid JSON: {exc}") from None
    return _checked(value, text, max_depth)


def _checked(value: Any, text: str, max_depth: int) -> Any:
    """``value`` parsed from ``text``, once it nests at most ``max_depth`` deep and escapes no lone surrogate."""
    if type(value) is dict and _CONTAINERS.isdisjoint(map(type, value.values())):
        pass  # one level: nothing to count
    elif text.count("[") + text.count("{") > max_depth and json_depth(text) > max_depth:
        raise InvalidInput("invalid_json", f"JSON nests deeper than {max_depth} levels")
    if "\\" in text and _SURROGATE_ESCAPE.search(text) and _lone_surrogate(text):
        raise InvalidInput("invalid_json", "JSON escapes a lone UTF-16 surrogate (not valid Unicode text)")
    return value


# -- room ids ---------------------------------------------------------------------------------


def validate_room_id(room: object) -> str:
    """``room`` if it is a valid room id, else :class:`InvalidInput` saying why (the same rule in every API).

    A room id is a non-empty ``str`` of at most :data:`MAX_ROOM_ID_LENGTH`
    characters, all printable: no control or format characters, no
    surrogates, no Unicode noncharacters or unassigned code points, no
    separators but the ASCII space.
    """
    if type(room) is str and 0 < len(room) <= MAX_ROOM_ID_LENGTH and room.isprintable():
        return room
    if room is None or room == "":
        raise InvalidInput("missing_room", f"a room id is required: a non-empty string, got {room!r}")
    if not isinstance(room, str):
        raise InvalidInput("missing_room", f"a room id must be a non-empty string, got {type(room).__name__}")
    if len(room) > MAX_ROOM_ID_LENGTH:
        raise InvalidInput("invalid_room", f"room id of {len(room)} characters, the limit is {MAX_ROOM_ID_LENGTH}")
    if room.isprintable():  # a str subclass
        return str(room)
    bad = next(c for c in room if not c.isprintable())
    raise InvalidInput("invalid_room", f"room id holds the unprintable character U+{ord(bad):04X}; "
                                       f"room ids are printable text of at most {MAX_ROOM_ID_LENGTH} characters")


@dataclass(slots=True)
class Message:
    """One message read from a connection: text or binary, kept distinct."""

    data: str | bytes

    @property
    def is_binary(self) -> bool:
        return isinstance(self.data, bytes)

    @property
    def text(self) -> str:
        if isinstance(self.data, bytes):
            raise ProtocolError("binary_not_supported", "expected a text message, got binary")
        return self.data

    def json(self, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
        """The message as JSON, parsed by the kernel's strict :func:`loads` (:class:`InvalidInput` if refused)."""
        return loads(self.text, max_depth=max_depth)


@dataclass(slots=True)
class ClientFrame:
    """A parsed client-to-server frame of the room protocol."""

    type: str
    room_id: str
    data: Any = None
    since: int | None = None


@dataclass(slots=True, eq=False)
class OutboundFrame:
    """One frame for many recipients, encoded once per publish.

    ``payload`` is what goes on the wire (UTF-8 JSON for room frames).
    Transports put their own framing of it (a WebSocket frame header, an SSE
    ``id:``/``data:`` block) in :meth:`encoded`, so it is built once per
    message and shared by every member using that transport.
    """

    payload: bytes
    binary: bool = False
    room: str | None = None
    sequence: int | None = None
    sender: str | None = None
    _encodings: dict[str, Any] | None = None  # made at the first encoding: most frames have one

    def encoded(self, key: str, encode: Callable[[OutboundFrame], T]) -> T:
        """Return the transport encoding stored under ``key``, making it once."""
        encodings = self._encodings
        if encodings is None:
            value = encode(self)
            self._encodings = {key: value}
            return value
        if key in encodings:
            return encodings[key]  # type: ignore[no-any-return]
        value = encode(self)
        encodings[key] = value
        return value

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8")

    def as_text(self) -> OutboundFrame:
        """This frame for a text-only transport (SSE, long-polling): itself if text, else its base64 JSON form.

        A binary room message becomes its JSON message frame with ``"data"``
        the payload in base64 and ``"encoding": "base64"``, made once per
        message and shared by every member (:func:`binary_as_text`).
        """
        if not self.binary:
            return self
        return self.encoded("text", binary_as_text)


def encode(frame: dict[str, Any]) -> bytes:
    """Encode a frame as compact UTF-8 JSON.

    Raises ``ValueError`` for what a browser could not parse (``NaN``,
    infinities, a lone surrogate): what :func:`loads` accepted never does.

    The bytes are the standard library's (``ensure_ascii=False``, compact
    separators, ``allow_nan=False``), made by orjson at a tenth of the cost
    whenever orjson writes the same: when every value is a plain JSON value
    (``dict`` with ``str`` keys, ``list``, ``tuple``, ``str``, ``int``,
    ``float``, ``bool``, ``None``; no subclass) and no float is one orjson
    writes otherwise (``NaN``, infinities, ``1e-09 <= |x| < 1e-04``). Anything
    else, and anything orjson refuses (an integer beyond 64 bits, a lone
    surrogate), is encoded, or refused, by the standard library as before.
    """
    if _plain(frame, 0):
        try:
            return _orjson_dumps(frame, _not_plain, _ORJSON_OPTIONS)
        except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits, a lone surrogate
            pass
    return _dumps(frame).encode("utf-8")


_orjson_dumps = orjson.dumps
_ORJSON_OPTIONS = (orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
                   | orjson.OPT_PASSTHROUGH_DATETIME)
"""Subclasses, dataclasses and datetimes go to ``default`` (which refuses them): the stdlib decides for them."""
_PLAIN_SCALARS = frozenset({str, int, bool, type(None)})
_PLAIN_DEPTH = 100
"""Deeper values are left to the stdlib: orjson refuses past 255, and the walk stays far from the recursion limit."""


def _not_plain(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is left to the standard library")


def _plain(value: Any, depth: int) -> bool:
    """True when ``value`` holds only values orjson encodes exactly as the standard library does.

    Plain JSON values: ``dict`` (``str`` keys), ``list``, ``tuple``, ``str``,
    ``int``, ``bool``, ``None``, and finite floats outside ``[9e-10, 1e-04)``
    (orjson writes ``1e-7`` and ``0.00001`` where ``repr`` writes ``1e-07`` and
    ``1e-05``). Exact types only: a subclass may encode otherwise. Integers
    beyond 64 bits pass here and make orjson raise.
    """
    kind = type(value)
    if kind is dict:
        if depth >= _PLAIN_DEPTH:
            return False
        for key in value:
            if type(key) is not str:
                return False
        items = value.values()
    elif kind is list or kind is tuple:
        if depth >= _PLAIN_DEPTH:
            return False
        items = value
    else:
        return kind in _PLAIN_SCALARS or (kind is float and _plain_float(value))
    for item in items:
        kind = type(item)
        if kind in _PLAIN_SCALARS:
            continue
        if not (_plain_float(item) if kind is float else _plain(item, depth + 1)):
            return False
    return True


def _plain_float(value: float) -> bool:
    """Finite, and written by orjson as ``repr`` writes it."""
    magnitude = abs(value)
    return magnitude - magnitude == 0.0 and not 9e-10 <= magnitude < 1e-4  # nan and inf give nan


_spare_ids: list[str] = []
"""Message ids made ahead from one ``os.urandom`` call (cleared in a forked child, which must make its own)."""
_IDS_PER_BATCH = 256
os.register_at_fork(after_in_child=_spare_ids.clear)


def new_message_id() -> str:
    """128 random bits as hex, like a UUID4's (once per message).

    From the operating system's random source like ``uuid4()``, read for 256
    ids at a time: one ``getrandom`` call and one ``hex()`` per 256 messages.
    ``list.pop`` and ``list.extend`` are atomic, so threads never share an id.
    """
    try:
        return _spare_ids.pop()
    except IndexError:
        block = os.urandom(16 * _IDS_PER_BATCH).hex()
        _spare_ids.extend([block[at:at + 32] for at in range(32, len(block), 32)])
        return block[:32]


_second: list[Any] = [-1, ""]  # the whole second last formatted, and its text
_stamp: list[Any] = [-1, ""]  # the millisecond last stamped, and its text


def now_iso() -> str:
    """RFC 3339 UTC timestamp with milliseconds, as the Forge extension sends.

    Formatted once per millisecond (the seconds part once per second): this
    runs once per message, and a busy node stamps many messages per millisecond.
    """
    ms = time.time_ns() // 1_000_000
    stamp = _stamp
    if ms == stamp[0]:
        return stamp[1]  # type: ignore[no-any-return]
    second, millis = divmod(ms, 1000)
    if second != _second[0]:
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    text = f"{_second[1]}.{millis:03d}Z"
    stamp[0], stamp[1] = ms, text
    return text


def message_frame(*, room_id: str, user_id: str, data: Any, message_id: str | None = None) -> dict[str, Any]:
    """A room message as published: without its position, which the engine sets (see :func:`with_sequence`)."""
    return {
        "type": "message",
        "id": message_id or new_message_id(),
        "room_id": room_id,
        "user_id": user_id,
        "data": data,
        "timestamp": now_iso(),
    }


def message_payload(*, room_id: str, user_id: str, data: Any, message_id: str) -> bytes:
    """:func:`encode` of :func:`message_frame`: the bytes a room message is published as (once per message).

    The same bytes, at less cost: of the frame's values only ``data`` (and
    ``user_id``, if it is not a ``str``) can be something orjson writes
    otherwise, so only they are walked. Raises as :func:`encode` does.
    """
    frame = {"type": "message", "id": message_id, "room_id": room_id, "user_id": user_id, "data": data,
             "timestamp": now_iso()}
    if type(room_id) is str and type(user_id) is str and type(message_id) is str and _plain(data, 1):
        try:
            return _orjson_dumps(frame, _not_plain, _ORJSON_OPTIONS)
        except TypeError:  # an integer beyond 64 bits, a lone surrogate: the stdlib decides
            pass
    return _dumps(frame).encode("utf-8")


def with_sequence(payload: bytes, sequence: int, *, binary: bool = False) -> bytes:
    """``payload`` (an encoded room message, text or binary) with ``"sequence": sequence`` as its last field.

    A message is encoded once by its publishing node, before the engine gives
    it a position; each node adds the position here, once per message and
    node. A text frame ends with ``}``; a binary frame's JSON header ends
    just before its first ``\n`` byte.
    """
    if not binary:
        return payload[:-1] + b',"sequence":%d}' % sequence  # half the cost of one %-format of both
    end = payload.index(SEPARATOR)
    return b'%b,"sequence":%d}%b' % (payload[:end - 1], sequence, payload[end:])


def presence_frame(kind: str, *, room_id: str, user_id: str, **extra: Any) -> dict[str, Any]:
    """A ``join``/``leave``/``typing`` notice sent to the members of a room."""
    frame = {"type": kind, "room_id": room_id, "user_id": user_id, "timestamp": now_iso()}
    frame.update(extra)
    return frame


def system_frame(event: str, data: Any = None) -> dict[str, Any]:
    return {"type": "system", "event": event, "data": data, "timestamp": now_iso()}


def error_frame(code: str, message: str, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"code": code, "message": message}
    data.update(extra)
    return {"type": "error", "event": "message.rejected", "data": data}


BINARY_TYPES = (bytes, bytearray, memoryview)
"""What the kernel publishes as a binary room message (``Message`` is unwrapped to its ``data`` first)."""

SEPARATOR = b"\n"
"""Ends a binary frame's JSON header; compact JSON never holds a raw newline, so the first one is it."""


def binary_frame(header: dict[str, Any], payload: bytes | bytearray | memoryview) -> bytes:
    """A binary room frame: ``header`` as compact UTF-8 JSON, one ``\\n`` byte, then ``payload`` as is."""
    return encode(header) + SEPARATOR + payload


def split_binary_frame(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """``(header, payload)`` of a binary room frame; :class:`ProtocolError` ``binary_not_supported`` if not one."""
    end = raw.find(SEPARATOR)
    if end <= 0 or raw[0] != 0x7B:  # "{"
        raise ProtocolError("binary_not_supported", "a binary room frame is a JSON object header, a newline byte, "
                                                    'then the payload: {"type":"message","room_id":"r"}\\n<bytes>')
    try:
        header = loads(raw[:end].decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError("invalid_json", "a binary frame's header must be UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("invalid_frame", "a binary frame's header must be a JSON object")
    return header, raw[end + 1:]


def binary_as_text(frame: OutboundFrame) -> OutboundFrame:
    """The text form of a binary room frame, for text-only transports (SSE, long-polling).

    The header's fields plus ``"data"``: the payload in base64, and
    ``"encoding": "base64"``. Transports cache it per frame
    (``frame.encoded("text", binary_as_text)``): made once per message, not per member.
    """
    header, payload = split_binary_frame(frame.payload)
    header["data"] = base64.b64encode(payload).decode("ascii")
    header["encoding"] = "base64"
    return OutboundFrame(payload=encode(header), room=frame.room, sequence=frame.sequence, sender=frame.sender)


def decode_base64(text: object) -> bytes:
    """Strict base64 (RFC 4648, padding required) to bytes; :class:`InvalidInput` ``invalid_frame`` if it is not."""
    if not isinstance(text, str):
        raise InvalidInput("invalid_frame", f"base64 data must be a string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("invalid_frame", "data_base64 is not valid base64") from None


def parse_client_frame(raw: str | bytes, *, max_size: int, max_depth: int = MAX_JSON_DEPTH) -> ClientFrame:
    """Parse and validate one client frame; raise :class:`ProtocolError`.

    A binary frame is a ``message`` frame in the binary form (see
    :func:`split_binary_frame`): its ``data`` is the payload, as ``bytes``.
    """
    if isinstance(raw, bytes):
        return _parse_binary_frame(raw, max_size=max_size)
    if len(raw) > max_size:
        raise ProtocolError("too_large", f"frame of {len(raw)} characters, the limit is {max_size}")
    obj = loads(raw, max_depth=max_depth)
    if not isinstance(obj, dict):
        raise ProtocolError("invalid_frame", f"frame must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_frame", "frame needs a string 'type'")
    if kind not in CLIENT_FRAME_TYPES:
        raise ProtocolError(
            "unknown_type", f"unknown frame type {kind!r}; expected one of {sorted(CLIENT_FRAME_TYPES)}"
        )
    try:
        room_id = validate_room_id(obj.get("room_id"))
    except InvalidInput as exc:
        raise ProtocolError(exc.code, f"{kind!r} frame: {exc.message}") from None
    since = obj.get("since")
    if since is not None and (not isinstance(since, int) or isinstance(since, bool) or since < 0):
        raise ProtocolError("invalid_frame", f"'since' must be a non-negative integer, got {since!r}")
    if kind == "message" and "data" not in obj:
        raise ProtocolError("invalid_frame", "a 'message' frame needs 'data'")
    return ClientFrame(type=kind, room_id=room_id, data=obj.get("data"), since=since)


def _parse_binary_frame(raw: bytes, *, max_size: int) -> ClientFrame:
    if len(raw) > max_size:
        raise ProtocolError("too_large", f"frame of {len(raw)} bytes, the limit is {max_size}")
    header, payload = split_binary_frame(raw)
    if header.get("type") != "message":
        raise ProtocolError("invalid_frame", "a binary frame is a 'message' frame: its header needs "
                                             '"type":"message"')
    try:
        room_id = validate_room_id(header.get("room_id"))
    except InvalidInput as exc:
        raise ProtocolError(exc.code, f"binary 'message' frame: {exc.message}") from None
    return ClientFrame(type="message", room_id=room_id, data=payload)
