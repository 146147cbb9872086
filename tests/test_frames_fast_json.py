"""The kernel's fast JSON (orjson to encode, msgspec to parse) gives exactly the standard library's answers.

``frames.encode``, ``frames.message_payload`` and ``frames.loads`` take a
fast path and fall back to the standard library for what the fast library
writes otherwise or refuses. Each test compares them with the reference
(the stdlib path they replaced, kept in ``frames``): the same bytes, the
same value (types included), or the same exception with the same message.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import math
import os
import re
import uuid
from collections import OrderedDict, namedtuple
from typing import Any

import orjson
import pytest
from forge_streaming import frames
from forge_streaming.frames import InvalidInput, OutboundFrame
from forge_streaming.pubsub import Envelope
from hypothesis import example, given, settings
from hypothesis import strategies as st

# -- the references: the code the fast paths replaced ------------------------------------------


def reference_encode(frame: Any) -> bytes:
    return frames._dumps(frame).encode("utf-8")


def reference_loads(text: str, max_depth: int = frames.MAX_JSON_DEPTH) -> Any:
    return frames._loads_stdlib(text, max_depth)


def outcome(function: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """("ok", result) or ("raised", (exception type, message)): what a caller would see."""
    try:
        return "ok", function(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 (the exception is the answer being compared)
        return "raised", (type(exc), str(exc))


def same_value(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down, the same key order, and the sign of zero."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is float:
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


def assert_same_encoding(value: Any) -> None:
    fast, reference = outcome(frames.encode, value), outcome(reference_encode, value)
    assert fast == reference, value


def assert_same_parse(text: str, max_depth: int = frames.MAX_JSON_DEPTH) -> None:
    fast = outcome(frames.loads, text, max_depth=max_depth)
    reference = outcome(reference_loads, text, max_depth)
    assert fast[0] == reference[0], (text[:200], fast, reference)
    if fast[0] == "ok":
        assert same_value(fast[1], reference[1]), text[:200]
    else:
        assert fast[1] == reference[1], text[:200]


# -- strategies ----------------------------------------------------------------------------------

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)  # lone surrogates included
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=1e-11, max_value=1e-3),  # where orjson writes some floats otherwise
    st.floats(min_value=-1e-3, max_value=-1e-11),
    st.floats(min_value=1e15, max_value=1e17),  # where repr starts writing an exponent
    st.sampled_from([0.0, -0.0, 1e-4, 1e-5, 9e-10, 1e-9, 1e16, 1e22, 5e-324, 1.7976931348623157e308]),
)
integers = st.one_of(st.integers(), st.integers(min_value=2**62, max_value=2**66),
                     st.integers(max_value=-(2**62), min_value=-(2**66)),
                     st.integers(min_value=10**30, max_value=10**40))
scalars = st.one_of(st.none(), st.booleans(), integers, floats, any_text)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=5), st.tuples(children, children),
                               st.dictionaries(any_text, children, max_size=5)),
    max_leaves=30,
)
plain_values = st.recursive(  # what frames.loads can return: no NaN, no lone surrogate
    st.one_of(st.none(), st.booleans(), integers, st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=12)),
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(st.text(max_size=8), children, max_size=5)),
    max_leaves=30,
)
JSONISH = '{}[]",:0123456789.eE+- \t\n\r\\/ubfnrtaslINfiy\x00\x1f\x7f\u2028\ud800\udc00\ufeffé😀'
hostile_text = st.text(st.sampled_from(list(JSONISH)), max_size=40)


# -- encode ------------------------------------------------------------------------------------


@settings(max_examples=1500, deadline=None)
@given(json_values)
@example(float("nan"))
@example({"a": [float("-inf")]})
@example(1e-05)
@example(1.5e-07)
@example(2**64)
@example(-(2**63) - 1)
@example("\ud800")
@example({"\udfff": 1})
@example("\x00\x1f\x7f\u2028\u2029\"\\/")
def test_encode_is_the_stdlib_encoding(value: Any) -> None:
    assert_same_encoding(value)
    assert_same_encoding({"type": "message", "data": value})


@settings(max_examples=500, deadline=None)
@given(plain_values, st.text(min_size=1, max_size=20), st.text(max_size=20))
def test_message_payload_is_the_encoded_message_frame(data: Any, room: str, user: str) -> None:
    stamp = frames.now_iso()
    original = frames.now_iso
    frames.now_iso = lambda: stamp
    try:
        fast = outcome(frames.message_payload, room_id=room, user_id=user, data=data, message_id="ab" * 16)
        reference = outcome(lambda: reference_encode(frames.message_frame(room_id=room, user_id=user, data=data,
                                                                           message_id="ab" * 16)))
    finally:
        frames.now_iso = original
    assert fast == reference


class Colour(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    LOW = 1


class Name(str, enum.Enum):
    ALICE = "alice"


class Text(str):
    pass


class Number(int):
    pass


class Real(float):
    pass


@dataclasses.dataclass
class Point:
    x: int = 1


Pair = namedtuple("Pair", "a b")  # noqa: PYI024


@pytest.mark.parametrize("value", [
    Colour.RED, Level.LOW, Name.ALICE, Text("t"), Number(3), Real(1.5), Point(), uuid.UUID(int=7),
    datetime.datetime(2024, 1, 2, 3, 4, 5), datetime.date(2024, 1, 2), decimal.Decimal("1.5"), Pair(1, 2),
    {1: "int key"}, {1.5: "float key"}, {True: "bool key"}, {None: "none key"}, {Text("k"): 1}, set(), frozenset(),
    b"bytes", bytearray(b"x"), memoryview(b"x"), OrderedDict(a=1), orjson.Fragment(b"1"), range(2), 1 + 2j,
    [Colour.RED], {"deep": {"er": [uuid.UUID(int=1)]}}, [[[[[[[[[[[[1]]]]]]]]]]]],
], ids=repr)
def test_encode_leaves_every_other_type_to_the_stdlib(value: Any) -> None:
    """Types orjson writes and the stdlib refuses (Enum, UUID, Fragment) stay refused; the rest encode the same."""
    assert_same_encoding(value)
    assert_same_encoding({"data": value})


def test_encode_refuses_deep_and_circular_values_as_before() -> None:
    deep: Any = 1
    for _ in range(300):  # past orjson's own limit (255) and the walk's
        deep = [deep]
    assert_same_encoding(deep)
    loop: list[Any] = []
    loop.append(loop)
    assert outcome(frames.encode, loop) == outcome(reference_encode, loop)


def test_message_payload_with_a_non_str_user_id_is_the_stdlib_encoding() -> None:
    for user in (uuid.UUID(int=3), Text("bob"), 42):
        fast = outcome(frames.message_payload, room_id="r", user_id=user, data=1, message_id="00" * 16)
        assert fast[0] == "raised" or fast[1].startswith(b'{"type":"message"')
        frame = json.loads(fast[1]) if fast[0] == "ok" else None
        reference = outcome(reference_encode, {**frame, "user_id": user}) if frame else outcome(
            reference_encode, {"user_id": user})
        assert fast[0] == reference[0]


# -- loads -------------------------------------------------------------------------------------


@settings(max_examples=1500, deadline=None)
@given(json_values, st.booleans(), st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", "\t:\r")]))
def test_loads_of_encoded_values_is_the_stdlib_parse(value: Any, ascii_only: bool, separators: tuple[str, str]) -> None:
    try:
        text = json.dumps(value, ensure_ascii=ascii_only, separators=separators)  # NaN and lone surrogates too
    except (ValueError, RecursionError):
        return
    assert_same_parse(text)
    assert_same_parse(text, max_depth=2)


@settings(max_examples=3000, deadline=None)
@given(hostile_text)
@example('{"a":1,"a":2,"b":3}')
@example('{"a":1,"b":2,"a":[3]}')
@example("NaN")
@example("[-Infinity]")
@example("1e999")
@example("-1e400")
@example('"\\ud800"')
@example('"\\udc00\\ud800"')
@example('"\\ud800\\u0041"')
@example('"\\\\ud800"')
@example('"\ud800"')
@example("18446744073709551616")
@example("-9223372036854775809")
@example("1" * 4300)
@example("1" * 4301)
@example("\ufeff{}")
@example(" [1, 2.50, -0, -0.0, 1E2, 0.1e-1] ")
def test_loads_of_hostile_text_is_the_stdlib_parse(text: str) -> None:
    assert_same_parse(text)


@pytest.mark.parametrize("depth", [1, 2, 3, 63, 64, 65, 100, 1000, 5000, 100_000])
@pytest.mark.parametrize("max_depth", [1, 2, 64, 200])
def test_loads_depth_limit_is_the_stdlib_one(depth: int, max_depth: int) -> None:
    for text in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth,
                 '{"data":' + "[" * depth + "]" * depth + "}"):
        assert_same_parse(text, max_depth=max_depth)


def test_loads_refuses_with_the_old_messages() -> None:
    for text, message in [("NaN", "NaN is not a JSON number"), ("1e999", "out of range"),
                          ('"\\ud800"', "lone UTF-16 surrogate"), ("[" * 65 + "]" * 65, "deeper than 64"),
                          ("{", "not valid JSON")]:
        with pytest.raises(InvalidInput, match=re.escape(message)):
            frames.loads(text)


def test_loads_keeps_big_integers_exact() -> None:
    for number in (2**64, -(2**63) - 1, 10**100, -(10**4299)):
        value = frames.loads(json.dumps({"n": number}))
        assert value == {"n": number} and type(value["n"]) is int
        assert frames.encode(value) == reference_encode(value)


def test_loads_of_what_is_not_text_is_the_stdlib_answer() -> None:
    assert outcome(frames.loads, b"{}") == outcome(reference_loads, b"{}")


# -- stamping ----------------------------------------------------------------------------------


def test_message_ids_are_128_random_bits_in_hex_and_unique() -> None:
    ids = [frames.new_message_id() for _ in range(5000)]  # several batches
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_makes_its_own_message_ids() -> None:
    frames.new_message_id()  # the parent holds spare ids now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, frames.new_message_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{32}", child)
    assert child not in {frames.new_message_id() for _ in range(256)}


def test_now_iso_is_rfc3339_utc_with_milliseconds_and_current() -> None:
    import time

    before = time.time()
    stamp = frames.now_iso()
    after = time.time()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    parsed = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC).timestamp()
    assert before - 0.002 <= parsed <= after
    assert frames.now_iso() >= stamp


def test_with_sequence_appends_the_position() -> None:
    assert frames.with_sequence(b'{"a":1}', 42) == b'{"a":1,"sequence":42}'
    binary = frames.binary_frame({"type": "message"}, b"\x00\n\xff")
    assert frames.with_sequence(binary, 7, binary=True) == b'{"type":"message","sequence":7}\n\x00\n\xff'


def test_outbound_frame_encodes_once_per_key() -> None:
    calls: list[str] = []
    frame = OutboundFrame(payload=b"{}")

    def make(key: str) -> Any:
        def encode(frame: OutboundFrame) -> bytes:
            calls.append(key)
            return key.encode()

        return encode

    keys = ("ws", "ws", "sse", "ws", "sse")
    assert [frame.encoded(k, make(k)) for k in keys] == [k.encode() for k in keys]
    assert calls == ["ws", "sse"]


def test_fanout_rebuilds_envelopes_with_every_field() -> None:
    """``FanOut`` builds envelopes positionally (cheaper than ``dataclasses.replace``): add a new field there."""
    assert [f.name for f in dataclasses.fields(Envelope)] == [
        "room", "payload", "kind", "sequence", "sender", "node", "binary", "id"]
