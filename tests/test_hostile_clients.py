"""Hostile clients on every transport: each gets an error frame or a close code,
everyone else keeps being served, and the server's resources come back."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import websockets
from forge_streaming import Streaming
from forge_streaming.frames import ProtocolError, parse_client_frame
from forge_streaming.testing import RunningServer, eventually, serve
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection

pytest.importorskip("forge_streaming_websocket")
pytest.importorskip("forge_streaming_sse")

MAX = 4096


# -- the frame parser, property-based -------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300), json_values.map(json.dumps)))
def test_parser_refuses_anything_with_a_protocol_error_only(raw: str | bytes) -> None:
    try:
        frame = parse_client_frame(raw, max_size=MAX)
    except ProtocolError as exc:
        assert exc.code and exc.message
    else:
        assert frame.type in {"join", "leave", "message", "typing"} and frame.room_id


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["join", "leave", "message", "typing"]),
       st.text(min_size=1, max_size=40).filter(str.isprintable), json_values,
       st.none() | st.integers(min_value=0, max_value=2**53))
def test_parser_accepts_every_valid_frame_unchanged(kind: str, room: str, data: Any, since: int | None) -> None:
    raw = json.dumps({"type": kind, "room_id": room, "data": data, "since": since})
    frame = parse_client_frame(raw, max_size=1 << 20)
    assert (frame.type, frame.room_id, frame.data, frame.since) == (kind, room, data, since)


def test_deep_nesting_is_refused_not_crashed() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame("[" * 3000 + "]" * 3000, max_size=1 << 20)
    assert info.value.code in {"invalid_json", "invalid_frame"}


# -- live servers ---------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def recv_json(ws: ClientConnection, predicate: Callable[[Any], bool] = lambda f: True,
                    timeout: float = 5.0) -> Any:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if predicate(frame):
            return frame


async def joined(url: str, room: str) -> ClientConnection:
    ws = await websockets.connect(url)
    await ws.send(json.dumps({"type": "join", "room_id": room}))
    await recv_json(ws, lambda f: f.get("event") == "room.joined")
    return ws


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    streaming = Streaming({"limits": {"max_message_size": MAX, "messages_per_second": 200, "message_burst": 50}})
    async with serve(streaming) as running:
        yield running


BAD_TEXT = [
    ("{", "invalid_json"),
    ('"just a string"', "invalid_frame"),
    ('{"type": 7, "room_id": "r"}', "invalid_frame"),
    ('{"type":"explode","room_id":"r"}', "unknown_type"),
    ('{"type":"join","room_id":12}', "missing_room"),
    ('{"type":"join","room_id":"' + "x" * 500 + '"}', "invalid_room"),
    ('{"type":"message","room_id":"elsewhere","data":1}', "not_member"),
    ('{"type":"join","room_id":"r","since":-4}', "invalid_frame"),
    ("[" * 1500 + "]" * 1500, "invalid_json"),
]


async def test_websocket_bad_frames_get_error_frames_and_others_are_served(server: RunningServer) -> None:
    fds_before = open_fds()
    url = server.ws_url + "/ws"
    good_a, good_b = await joined(url, "calm"), await joined(url, "calm")
    hostile = await joined(url, "calm")
    for raw, code in BAD_TEXT:
        await hostile.send(raw)
        error = await recv_json(hostile, lambda f: f.get("type") == "error")
        assert error["data"]["code"] == code, raw[:40]
    await hostile.send(b"\x00\xffbinary where text is expected")
    assert (await recv_json(hostile, lambda f: f.get("type") == "error"))["data"]["code"] == "binary_not_supported"
    # still a healthy member after all that
    await good_a.send(json.dumps({"type": "message", "room_id": "calm", "data": "still here"}))
    for ws in (good_b, hostile):
        assert (await recv_json(ws, lambda f: f.get("type") == "message"))["data"] == "still here"
    for ws in (good_a, good_b, hostile):
        await ws.close()
    await eventually(lambda: not server.streaming.connections, timeout=10)
    await eventually(lambda: open_fds() <= fds_before + 2, timeout=10)


async def test_websocket_oversize_and_invalid_utf8_close_with_codes(server: RunningServer) -> None:
    url = server.ws_url + "/ws"
    witness = await joined(url, "r")
    big = await websockets.connect(url, max_size=None)
    await big.send("x" * (MAX + 1))
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(big.recv(), 5)
    assert big.close_code == 1009
    assert await raw_invalid_utf8_close_code(server.port) == 1007
    await witness.send(json.dumps({"type": "message", "room_id": "r", "data": "fine"}))
    await witness.send(json.dumps({"type": "join", "room_id": "r2"}))
    assert (await recv_json(witness, lambda f: f.get("event") == "room.joined"))["data"]["room_id"] == "r2"
    await witness.close()


async def raw_invalid_utf8_close_code(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    payload, mask = b"\xc3\x28 not utf-8", b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    writer.write(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    await writer.drain()
    header = await asyncio.wait_for(reader.readexactly(2), 5)
    assert header[0] & 0x0F == 0x8, "expected a close frame"
    body = await reader.readexactly(header[1] & 0x7F)
    writer.close()
    return int(struct.unpack("!H", body[:2])[0])


async def test_flood_is_rate_limited_without_slowing_the_room(server: RunningServer) -> None:
    url = server.ws_url + "/ws"
    flooder, listener, speaker = [await joined(url, "busy") for _ in range(3)]
    for n in range(400):
        await flooder.send(json.dumps({"type": "message", "room_id": "busy", "data": n}))
    limited = 0
    while True:
        try:
            frame = json.loads(await asyncio.wait_for(flooder.recv(), 2))
        except TimeoutError:
            break
        if frame.get("type") == "error":
            assert frame["data"]["code"] == "rate_limited" and frame["data"]["retry_after_ms"] >= 1
            limited += 1
    assert limited > 0
    await speaker.send(json.dumps({"type": "message", "room_id": "busy", "data": "speaker"}))
    assert (await recv_json(listener, lambda f: f.get("data") == "speaker", timeout=10))["user_id"]
    for ws in (flooder, listener, speaker):
        await ws.close()


async def test_half_open_tcp_and_silent_sockets_do_not_block_anyone(server: RunningServer) -> None:
    silent: list[socket.socket] = []
    for _ in range(20):  # connect and never complete a request or handshake
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0")
        silent.append(sock)
    try:
        url = server.ws_url + "/ws"
        a, b = await joined(url, "live"), await joined(url, "live")
        await a.send(json.dumps({"type": "message", "room_id": "live", "data": "through"}))
        assert (await recv_json(b, lambda f: f.get("type") == "message"))["data"] == "through"
        await a.close()
        await b.close()
    finally:
        for sock in silent:
            sock.close()


async def test_sse_bad_posts_are_refused_and_the_stream_stays(server: RunningServer) -> None:
    from httpx_sse import aconnect_sse

    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        async with aconnect_sse(client, "GET", "/sse?rooms=r&last_event_id=%00garbage") as source:
            events = source.aiter_sse()
            session = json.loads((await anext(events)).data)
            url, token = session["send_url"], session["token"]
            assert (await client.post(url, content=b"{}")).status_code == 401
            assert (await client.post(url, content=b"{}", headers={"X-Stream-Token": "forged"})).status_code == 403
            too_big = await client.post(url, content=b"x" * (MAX * 4), headers={"X-Stream-Token": token})
            assert too_big.status_code == 413
            bad_utf8 = await client.post(url, content=b"\xc3\x28", headers={"X-Stream-Token": token})
            assert bad_utf8.status_code == 400
            for raw, code in BAD_TEXT[:5]:
                answer = await client.post(url, content=raw.encode(), headers={"X-Stream-Token": token})
                assert answer.status_code == 202
                async for event in events:
                    frame = json.loads(event.data)
                    if frame.get("type") == "error":
                        assert frame["data"]["code"] == code
                        break
            ok = await client.post(url, json={"type": "message", "room_id": "r", "data": "fine"},
                                   headers={"X-Stream-Token": token})
            assert ok.status_code == 202


async def test_idle_timeout_spares_talking_and_listening_clients_only() -> None:
    from httpx_sse import aconnect_sse

    streaming = Streaming({"limits": {"idle_timeout": "1s"}, "sse": {"keep_alive_interval": "200ms"}})
    async with serve(streaming) as server:
        url = server.ws_url + "/ws"
        silent = await joined(url, "r")
        talker = await joined(url, "r")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            async with aconnect_sse(client, "GET", "/sse?rooms=r") as source:
                events = source.aiter_sse()
                listener_id = json.loads((await anext(events)).data)["connection_id"]
                for n in range(12):  # 2.4 s: past the idle timeout
                    await talker.send(json.dumps({"type": "typing", "room_id": "r", "data": n % 2 == 0}))
                    await asyncio.sleep(0.2)
                ids = {c.id: c for c in streaming.connections.values()}
                assert listener_id in ids, "a listening SSE stream that drains is not idle"
                assert len([c for c in ids.values() if c.transport == "websocket"]) == 1
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(silent.recv(), 5)
        assert silent.close_code == 1001 and silent.close_reason == "idle timeout"
        await talker.close()
