"""Hostile input, round two (issues 16 and 17): JSON a browser can parse, one rule for room ids,
bounded HTTP bodies and cursors, security headers. Real servers and clients on loopback.

Every refusal is an error frame, a 4xx or a close code with a reason, never a traceback in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest
import websockets
from forge_streaming import Connection, Refused, Streaming, hookimpl
from forge_streaming.frames import (
    MAX_JSON_DEPTH,
    MAX_ROOM_ID_LENGTH,
    InvalidInput,
    ProtocolError,
    encode,
    loads,
    message_frame,
    parse_client_frame,
    validate_room_id,
)
from forge_streaming.testing import RunningServer, eventually, serve
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from websockets.asyncio.client import ClientConnection

pytest.importorskip("forge_streaming_websocket")
pytest.importorskip("forge_streaming_sse")

API_KEY = "hostile-input-key"
MAX = 16 * 1024
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def message(data_json: str) -> str:
    return '{"type":"message","room_id":"r","data":' + data_json + "}"


def nested(levels: int, inner: str = "1") -> str:
    return "[" * levels + inner + "]" * levels


# What JSON.parse refuses, or what the kernel could not re-encode: all are `invalid_json`.
BAD_DATA = {
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
    "1e999": "1e999",
    "-1E400": "-1E400",
    "400-digit float": "1" * 400 + ".5",
    "5000-digit integer": "7" * 5000,
    "lone high surrogate": '"\\ud800"',
    "lone low surrogate": '"x\\udc00y"',
    "high then high": '"\\ud83d\\ud83d\\ude00"',
    "low after a pair": '"\\ud83d\\ude00\\ude00"',
    "lone surrogate in a key": '{"\\udfff": 1}',
    "escaped backslash then a lone one": '"\\\\\\ud800"',
    "nesting past the limit": nested(MAX_JSON_DEPTH),  # the frame's own object is one level more
    "nesting 972 deep": nested(972),
    "nesting 100000 deep": nested(5000),
}

GOOD_DATA = {
    "surrogate pair": ('"\\ud83d\\ude00"', "\U0001f600"),
    "escaped backslash before u": ('"\\\\ud800"', "\\ud800"),
    "largest double": ("1.7976931348623157e308", 1.7976931348623157e308),
    "underflow is zero": ("1e-999", 0.0),
    "big integer": (str(2**70), 2**70),
    "brackets in strings": ('"' + "[{" * 500 + '"', "[{" * 500),
    "nesting at the limit": (nested(MAX_JSON_DEPTH - 1), json.loads(nested(MAX_JSON_DEPTH - 1))),
    "wide and shallow": ("[" + ",".join(["[1,{}]"] * 500) + "]", [[1, {}]] * 500),
}


# -- the strict loader and the room-id rule, on their own ----------------------------------------------


@pytest.mark.parametrize("data", BAD_DATA.values(), ids=list(BAD_DATA))
def test_json_a_browser_cannot_parse_is_refused_at_parse(data: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(message(data), max_size=1 << 20)
    assert info.value.code == "invalid_json" and info.value.message
    with pytest.raises(ValueError):  # the same refusal for an application's `Message.json()` or the HTTP API
        loads(message(data))


@pytest.mark.parametrize("data,value", GOOD_DATA.values(), ids=list(GOOD_DATA))
def test_json_at_the_edges_is_accepted_and_re_encodes(data: str, value: Any) -> None:
    frame = parse_client_frame(message(data), max_size=1 << 20)
    assert frame.data == value
    assert json.loads(encode(message_frame(room_id="r", user_id="u", data=frame.data)))["data"] == value


def test_the_depth_limit_is_a_parameter() -> None:
    assert loads(nested(10), max_depth=10) == json.loads(nested(10))
    with pytest.raises(InvalidInput, match="deeper than 10"):
        loads(nested(11), max_depth=10)
    with pytest.raises(InvalidInput, match="deeper than 10"):
        loads('{"a":' + nested(10) + "}", max_depth=10)


hostile_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(), max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(hostile_values, st.integers(min_value=1, max_value=80))
def test_what_the_parser_accepts_always_re_encodes(value: Any, wrap: int) -> None:
    """NaN, infinities and surrogates (Python's json writes them all) are refused or re-encode."""
    raw = message(nested(wrap, json.dumps(value)))
    try:
        frame = parse_client_frame(raw, max_size=1 << 20)
    except ProtocolError as exc:
        assert exc.code == "invalid_json"
        return
    payload = encode(message_frame(room_id="r", user_id="u", data=frame.data))
    assert json.loads(payload)["room_id"] == "r"


BAD_ROOMS: dict[str, Any] = {
    "None": None, "empty": "", "int": 7, "bytes": b"r", "too long": "x" * (MAX_ROOM_ID_LENGTH + 1),
    "NUL": "a\x00b", "newline": "a\nb", "DEL": "a\x7f", "zero-width space": "a\u200bb",
    "lone surrogate": "a\ud800", "noncharacter FDD0": "a\ufdd0", "noncharacter FFFF": "a\uffff",
    "line separator": "a\u2028b",
}
GOOD_ROOMS = ["lobby", "x" * MAX_ROOM_ID_LENGTH, "café ☕", "team-1/β", "a b"]


@pytest.mark.parametrize("room", BAD_ROOMS.values(), ids=list(BAD_ROOMS))
def test_room_ids_are_refused_with_a_clear_message(room: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_room_id(room)
    assert info.value.code in {"missing_room", "invalid_room"}
    assert "room id" in info.value.message and len(info.value.message) < 120  # fits a WebSocket close reason
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("room", GOOD_ROOMS)
def test_printable_room_ids_pass(room: str) -> None:
    assert validate_room_id(room) == room


# -- live servers -----------------------------------------------------------------------------------------


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Client input never makes the server log an ERROR (with or without a traceback)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


async def forge_chat(conn: Connection) -> None:
    """The Forge pattern, ported line by line: the room comes from the query string."""
    await conn.join_room(conn.query("room"))  # type: ignore[arg-type]  # exactly what a ported app writes
    while True:
        msg = await conn.read_message()
        await conn.broadcast_to_room(conn.query("room"), msg.data)  # type: ignore[arg-type]


async def probe(conn: Connection) -> None:
    """Every application API with every bad room id; answers what each raised."""
    streaming = conn.streaming
    results: dict[str, list[str]] = {}
    for name, room in BAD_ROOMS.items():
        outcomes = results[name] = []
        calls: dict[str, Callable[[Any], Awaitable[object]]] = {
            "join_room": lambda r: conn.join_room(r),
            "streaming.join": lambda r: streaming.join(conn, r),
            "broadcast_to_room": lambda r: conn.broadcast_to_room(r, "x"),
            "broadcast": lambda r: streaming.broadcast(r, "x"),
            "publish": lambda r: streaming.publish(r, "x"),
        }
        for api, call in calls.items():
            try:
                await call(room)
            except (InvalidInput, Refused) as exc:
                outcomes.append(f"{api}:{exc.code}")
            else:
                outcomes.append(f"{api}:accepted")
    await conn.write_message(json.dumps(results))


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    streaming = Streaming({"api": {"key": API_KEY}, "limits": {"max_message_size": MAX}})
    streaming.handle_websocket("/forge", forge_chat)
    streaming.handle_websocket("/probe", probe)
    async with serve(streaming) as running:
        yield running


async def recv_json(ws: ClientConnection, want: str | None = None, timeout: float = 5.0) -> Any:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if want is None or frame.get("type") == want or frame.get("event") == want:
            return frame


async def joined(server: RunningServer, room: str = "r") -> ClientConnection:
    ws = await websockets.connect(server.ws_url + "/ws")
    await ws.send(json.dumps({"type": "join", "room_id": room}))
    await recv_json(ws, "room.joined")
    return ws


async def api_ok(server: RunningServer) -> None:
    """/api/rooms and /api/stats answer 200 and name only valid rooms."""
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=5) as client:
        rooms = await client.get("/api/rooms")
        assert rooms.status_code == 200, rooms.text
        for room in rooms.json()["rooms"]:
            validate_room_id(room["room_id"])
        stats = await client.get("/api/stats")
        assert stats.status_code == 200, stats.text


async def test_websocket_frames_with_unparseable_json_get_error_frames_and_are_not_relayed(
        server: RunningServer, no_tracebacks: None) -> None:
    sender, witness = await joined(server), await joined(server)
    for name, data in BAD_DATA.items():
        raw = message(data)
        if len(raw) > MAX:
            continue
        await sender.send(raw)
        error = await recv_json(sender, "error")
        assert error["data"]["code"] == "invalid_json", name
    await sender.send(message('"fine"'))
    relayed = await recv_json(witness, "message")
    assert relayed["data"] == "fine", "nothing refused reached the room"
    assert sender.close_code is None and witness.close_code is None
    await api_ok(server)
    for ws in (sender, witness):
        await ws.close()


async def test_sse_posts_with_unparseable_json_get_error_events_never_500(
        server: RunningServer, no_tracebacks: None) -> None:
    from httpx_sse import aconnect_sse

    witness = await joined(server)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        async with aconnect_sse(client, "GET", "/sse?rooms=r") as source:
            events = source.aiter_sse()
            session = json.loads((await anext(events)).data)
            url, headers = session["send_url"], {"X-Stream-Token": session["token"]}
            bodies = [message(data) for data in BAD_DATA.values() if len(message(data)) <= MAX]
            bodies.append('{"type":"join","room_id":"r","since":1,"x":' + nested(900) + "}")  # deep, with since
            bodies.append('{"type":"join","room_id":"r","since":1e999}')
            for body in bodies:
                answer = await client.post(url, content=body.encode(), headers=headers)
                assert answer.status_code == 202, (body[:60], answer.status_code)
                async for event in events:
                    frame = json.loads(event.data)
                    if frame.get("type") == "error":
                        assert frame["data"]["code"] in {"invalid_json", "invalid_frame"}, body[:60]
                        break
            await witness.send(message('"after all that"'))
            async for event in events:
                if json.loads(event.data).get("data") == "after all that":
                    break
    await witness.close()


async def test_an_sse_post_nesting_past_the_recursion_limit_with_since_is_not_a_500(server: RunningServer) -> None:
    from httpx_sse import aconnect_sse

    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        async with aconnect_sse(client, "GET", "/sse?rooms=r") as source:
            session = json.loads((await anext(source.aiter_sse())).data)
            body = '{"type":"join","room_id":"r","since":1,"x":' + nested(5000) + "}"
            answer = await client.post(session["send_url"], content=body.encode(),
                                       headers={"X-Stream-Token": session["token"]})
            assert answer.status_code == 202


async def test_a_huge_last_event_id_sequence_is_ignored_not_fatal(server: RunningServer, no_tracebacks: None) -> None:
    from httpx_sse import aconnect_sse

    witness = await joined(server)
    cursors = ["r:" + "9" * 5000, "r:" + "9" * 20, "r:" + str(2**63), "r:12,s:" + "1" * 40]
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for value in cursors:
            async with aconnect_sse(client, "GET", "/sse?rooms=r", headers={"Last-Event-ID": value}) as source:
                events = source.aiter_sse()
                seen: list[dict[str, Any]] = []
                await witness.send(message(json.dumps(value[:12])))
                async for event in events:
                    frame = json.loads(event.data)
                    seen.append(frame)
                    if frame.get("type") == "message":
                        break
                assert any(f.get("event") == "resume.ignored" for f in seen), value[:20]
                assert seen[-1]["data"] == value[:12]
    await witness.close()


async def test_http_api_publish_is_strict_and_bounded(server: RunningServer, no_tracebacks: None) -> None:
    member = await joined(server, "ok")
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=10) as client:
        async def publish(body: str | bytes, **kwargs: Any) -> httpx.Response:
            content = body.encode() if isinstance(body, str) else body
            return await client.post("/api/publish", content=content,
                                     headers={"content-type": "application/json"}, **kwargs)

        for name, data in BAD_DATA.items():
            body = '{"room_id":"ok","data":' + data + "}"
            answer = await publish(body)
            expected = 413 if len(body.encode()) > MAX else 400
            assert answer.status_code == expected, (name, answer.status_code, answer.text)
            assert answer.json()["error"] == ("too_large" if expected == 413 else "invalid_json"), name
        for name, room in BAD_ROOMS.items():
            if isinstance(room, bytes) or (isinstance(room, str) and "\ud800" in room):
                continue  # not expressible as a JSON string (the lone surrogate is invalid_json above)
            answer = await publish(json.dumps({"room_id": room, "data": 1}))
            assert answer.status_code == 400, name
            assert answer.json()["error"] in {"missing_room", "invalid_room"}, name
        big = json.dumps({"room_id": "ok", "data": "x" * MAX})
        assert (await publish(big)).status_code == 413

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit is counted as it arrives
            yield b'{"room_id":"ok","data":"'
            for _ in range(64):
                yield b"x" * 1024
            yield b'"}'

        streamed = await client.post("/api/publish", content=chunks())
        assert streamed.status_code == 413 and streamed.json()["error"] == "too_large"
        assert (await publish(b'{"room_id":"ok","data":"\xc3\x28"}')).status_code == 400
        assert (await publish("[1]")).status_code == 400
        ok = await publish(json.dumps({"room_id": "ok", "data": {"n": 1.5}}))
        assert ok.status_code == 200 and ok.json()["published"] is True
    assert (await recv_json(member, "message"))["data"] == {"n": 1.5}
    await api_ok(server)
    await member.close()


async def test_room_ids_are_checked_the_same_way_in_every_api(server: RunningServer, no_tracebacks: None) -> None:
    witness = await joined(server, "real")
    # the Forge pattern without ?room=: a clear close, no room "None", and the HTTP API still answers
    async with websockets.connect(server.ws_url + "/forge") as forge:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(forge.recv(), 5)
    assert forge.close_code == 1008 and "room id" in (forge.close_reason or ""), forge.close_reason
    assert forge.close_reason and "None" in forge.close_reason
    assert await server.streaming.rooms() == ["real"]
    await api_ok(server)
    # with a room it works as in Forge
    async with websockets.connect(server.ws_url + "/forge?room=real") as forge:
        await eventually(lambda: len(server.streaming.local_members("real")) == 2)
        await forge.send("hello from forge")
        assert (await recv_json(witness, "message"))["data"] == "hello from forge"
    # every application API, called from a handler on a live connection
    async with websockets.connect(server.ws_url + "/probe") as prober:
        results = json.loads(await asyncio.wait_for(prober.recv(), 10))
    for name, outcomes in results.items():
        for outcome in outcomes:
            assert outcome.split(":")[1] in {"missing_room", "invalid_room"}, (name, outcome)
    # the room protocol
    for name, room in BAD_ROOMS.items():
        if isinstance(room, bytes):
            continue
        await witness.send(json.dumps({"type": "join", "room_id": room}))
        error = await recv_json(witness, "error")
        expected = {"invalid_json"} if isinstance(room, str) and "\ud800" in room else {"missing_room", "invalid_room"}
        assert error["data"]["code"] in expected, name
    assert await server.streaming.rooms() == ["real"]
    await api_ok(server)
    await witness.close()


# -- security headers ------------------------------------------------------------------------------------------


class OwnPolicy:
    """A plugin route that sets its own Content-Security-Policy, and one that sets none."""

    @hookimpl
    def streaming_register_routes(self) -> list[BaseRoute]:
        async def own(request: Request) -> Response:
            return PlainTextResponse("own", headers={"Content-Security-Policy": "default-src 'none'"})

        async def plain(request: Request) -> Response:
            return PlainTextResponse("plain")

        return [Route("/own", own), Route("/plain", plain)]


SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


async def test_every_http_response_carries_security_headers(streaming_plugins_only: Any) -> None:
    streaming_plugins_only("websocket", "sse", "memory-pubsub", "memory-rooms")
    streaming = Streaming({"api": {"key": API_KEY}}, plugins=[OwnPolicy()])
    async with serve(streaming) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
            answers = [await client.get(path) for path in
                       ("/", "/healthz", "/api/stats", "/forge-streaming.js", "/no-such-page", "/plain", "/own")]
            answers.append(await client.post("/api/publish", headers=AUTH, content=b"{"))
            answers.append(await client.post("/sse/send?connection_id=x", content=b"{}"))
            async with client.stream("GET", "/sse?rooms=r") as stream:
                answers.append(stream)
            for answer in answers:
                for name, value in SECURITY_HEADERS.items():
                    assert answer.headers.get(name) == value, (answer.url.path, name)
                assert "frame-ancestors 'none'" in answer.headers.get("content-security-policy", "") or \
                    answer.url.path == "/own", answer.url.path
            assert answers[0].headers["content-security-policy"].startswith("default-src 'none'"), "status page"
            assert answers[1].headers["content-security-policy"].startswith("default-src 'self'")
            assert answers[-4].headers.get_list("content-security-policy") == ["default-src 'none'"], \
                "a route's own policy is kept, not doubled"


async def test_a_configured_depth_limit_applies_to_frames_and_the_http_api(no_tracebacks: None) -> None:
    streaming = Streaming({"api": {"key": API_KEY}, "limits": {"max_json_depth": 8}})
    async with serve(streaming) as server:
        ws, witness = await joined(server), await joined(server)
        await ws.send(message(nested(7)))  # 8 levels with the frame's own object: accepted
        assert (await recv_json(witness, "message"))["data"] == json.loads(nested(7))
        await ws.send(message(nested(8)))
        error = await recv_json(ws, "error")
        assert error["data"]["code"] == "invalid_json" and "deeper than 8" in error["data"]["message"]
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=5) as client:
            ok = await client.post("/api/publish", content='{"room_id":"r","data":' + nested(7) + "}")
            assert ok.status_code == 200
            deep = await client.post("/api/publish", content='{"room_id":"r","data":' + nested(8) + "}")
            assert deep.status_code == 400 and "deeper than 8" in deep.json()["message"]
        assert (await recv_json(ws, "message"))["data"] == json.loads(nested(7)), "the API's message arrives"
        for conn in (ws, witness):
            await conn.close()


def test_the_readme_limits_table_names_every_bound_and_its_default() -> None:
    from pathlib import Path

    from forge_streaming.config import LimitSettings, RoomSettings

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("### Limits", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]

    def renderings(value: Any) -> list[str]:
        if value is None:
            return ["none", "off", "half the open-file limit"]
        found = [str(value)]
        if isinstance(value, float):
            found.append(f"{value:g}s")
        if isinstance(value, int) and value >= 1024:
            for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
                if value % size == 0:
                    found.append(f"{value // size}{unit}")
                    break
        return found

    keys = [(f"limits.{field.name}", field.default) for field in msgspec.structs.fields(LimitSettings)]
    keys += [(f"rooms.{field.name}", field.default) for field in msgspec.structs.fields(RoomSettings)
             if field.name.startswith("history_")]
    for key, default in keys:
        row = next((r for r in rows if f"`{key}`" in r), None)
        assert row is not None, f"the README's limits table does not name {key}"
        default_cell = row.split(" | ")[2]
        assert any(text in default_cell for text in renderings(default)), (key, default, default_cell)
