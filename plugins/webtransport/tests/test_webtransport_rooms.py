"""The room protocol at /wt, with WebSocket members in the same rooms, and session limits."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import websockets
from forge_streaming import Streaming
from forge_streaming.testing import RunningServer, serve
from websockets.asyncio.client import ClientConnection

if TYPE_CHECKING:
    from conftest import ClientKit  # the wt fixture's type (test modules do not import conftest at run time)


async def ws_frame(ws: ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if frame.get("type") == kind:
            return frame


async def test_room_protocol_across_webtransport_and_websocket(server: RunningServer, wt: ClientKit) -> None:
    async with wt.client(server.port) as client, websockets.connect(f"{server.ws_url}/ws") as ws:
        session = await wt.session(client, server.port, "/wt")
        session.send_message({"type": "join", "room_id": "lobby"})
        joined = await session.read_frame("system")
        assert joined["event"] == "room.joined" and joined["data"]["room_id"] == "lobby"
        await ws.send(json.dumps({"type": "join", "room_id": "lobby"}))
        await ws_frame(ws, "system")
        assert (await session.read_frame("join"))["room_id"] == "lobby"

        session.send_message({"type": "message", "room_id": "lobby", "data": {"text": "from wt"}})
        got = await ws_frame(ws, "message")
        assert got["data"] == {"text": "from wt"}
        await ws.send(json.dumps({"type": "message", "room_id": "lobby", "data": "from ws ü"}))
        got = await session.read_frame("message")
        assert got["data"] == "from ws ü" and got["sequence"] > 0
        assert len(await server.streaming.presence("lobby")) == 2

        session.close(1000, "done")
        assert (await ws_frame(ws, "leave"))["room_id"] == "lobby"
        await wt.until(lambda: len(server.streaming.connections) == 1)
        assert len(await server.streaming.presence("lobby")) == 1


async def test_binary_and_invalid_messages_get_error_frames(server: RunningServer, wt: ClientKit) -> None:
    async with wt.client(server.port) as client:
        session = await wt.session(client, server.port, "/wt")
        session.send_message(b"\x00\x01")
        assert (await session.read_frame("error"))["data"]["code"] == "binary_not_supported"
        session.send_message("{not json")
        assert (await session.read_frame("error"))["data"]["code"] == "invalid_json"
        session.send_message({"type": "join", "room_id": "still-open"})
        assert (await session.read_frame("system"))["event"] == "room.joined"


@pytest.mark.parametrize(("wire", "code"), [
    (struct.pack(">BI", 0x01, 10_000_000), 1009),  # over limits.max_message_size
    (struct.pack(">BI", 0x07, 2) + b"{}", 1002),  # unknown message type
    (struct.pack(">BI", 0x01, 2) + b"\xff\xfe", 1007),  # text that is not UTF-8
], ids=["too-large", "unknown-type", "invalid-utf8"])
async def test_framing_violations_close_the_session(server: RunningServer, wt: ClientKit, wire: bytes,
                                                    code: int) -> None:
    async with wt.client(server.port) as client:
        session = await wt.session(client, server.port, "/wt")
        sid = session.open_stream()
        session.send(sid, wire)
        closed_code, _ = await session.closed_by_server()
        assert closed_code == code
        await wt.until(lambda: not server.streaming.connections)


async def test_idle_session_is_closed_and_frees_its_rooms(make_streaming: Callable[..., Streaming],
                                                          wt: ClientKit) -> None:
    streaming = make_streaming({"webtransport": {"idle_timeout": "300ms"}})
    async with serve(streaming) as srv, wt.client(srv.port) as client:
        busy = await wt.session(client, srv.port, "/wt")
        idle = await wt.session(client, srv.port, "/wt")
        for s in (busy, idle):
            s.send_message({"type": "join", "room_id": "r"})
            await s.read_frame("system")
        assert len(await srv.streaming.presence("r")) == 2
        for _ in range(8):  # keep one session talking past the idle timeout of the other
            busy.send_message({"type": "typing", "room_id": "r", "data": True})
            await asyncio.sleep(0.1)
        assert await idle.closed_by_server() == (1001, "idle timeout")
        await wt.until(lambda: len(srv.streaming.connections) == 1)
        assert len(await srv.streaming.presence("r")) == 1
        assert srv.streaming.stats_counters().get("dropped.idle timeout", 0) == 1


async def test_shutdown_tells_sessions_and_frees_them(make_streaming: Callable[..., Streaming],
                                                      wt: ClientKit) -> None:
    streaming = make_streaming()
    async with wt.client_for_shutdown(streaming) as (client, port, stopped):
        session = await wt.session(client, port, "/wt")
        session.send_message({"type": "join", "room_id": "r"})
        await session.read_frame("system")
        await stopped()
        notice = await session.read_frame("system")
        assert notice["event"] == "server.shutdown"
        assert await session.closed_by_server() == (1001, "server shutting down")
    assert streaming.connections == {}


async def test_slow_consumer_is_dropped(make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    streaming = make_streaming({"webtransport": {"send_buffer": "64KiB"}})
    async with serve(streaming) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/wt")
        session.send_message({"type": "join", "room_id": "r"})
        await session.read_frame("system")
        client.pause_acks()  # stops reading from the socket: nothing is acknowledged any more
        payload = "x" * 4000
        for _ in range(40):  # 160 KB in one loop iteration, far past 64 KiB unacknowledged
            await srv.streaming.broadcast("r", payload)
        await wt.until(lambda: not srv.streaming.connections)
        assert srv.streaming.stats_counters().get("dropped.slow consumer", 0) == 1
        assert await srv.streaming.presence("r") == []


async def test_webtransport_websocket_and_sse_members_of_one_room(server: RunningServer, wt: ClientKit) -> None:
    import httpx

    sse_frames: list[dict[str, Any]] = []

    async def read_sse(response: httpx.Response) -> None:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                try:
                    sse_frames.append(json.loads(line[5:].strip()))
                except ValueError:
                    pass

    async with httpx.AsyncClient(timeout=10) as http, \
            http.stream("GET", f"{server.url}/sse?rooms=lobby") as sse, \
            websockets.connect(f"{server.ws_url}/ws") as ws, \
            wt.client(server.port) as client:
        assert sse.status_code == 200
        reader = asyncio.ensure_future(read_sse(sse))
        try:
            await wt.until(lambda: len(server.streaming.local_members("lobby")) == 1)
            session = await wt.session(client, server.port, "/wt")
            session.send_message({"type": "join", "room_id": "lobby"})
            await session.read_frame("system")
            await ws.send(json.dumps({"type": "join", "room_id": "lobby"}))
            await ws_frame(ws, "system")

            session.send_message({"type": "message", "room_id": "lobby", "data": "from wt"})
            assert (await ws_frame(ws, "message"))["data"] == "from wt"
            await ws.send(json.dumps({"type": "message", "room_id": "lobby", "data": "from ws"}))
            assert (await session.read_frame("message"))["data"] == "from ws"
            await wt.until(lambda: {f.get("data") for f in sse_frames if f.get("type") == "message"}
                           >= {"from wt", "from ws"})
            transports = {m.transport for m in await server.streaming.members("lobby")}
            assert transports == {"sse", "websocket", "webtransport"}
        finally:
            reader.cancel()


async def test_client_stopping_the_message_stream_closes_the_session(server: RunningServer,
                                                                     wt: ClientKit) -> None:
    async with wt.client(server.port) as client:
        session = await wt.session(client, server.port, "/wt")
        session.send_message({"type": "join", "room_id": "r"})
        await session.read_frame("system")
        assert session._message_stream is not None
        client._quic.stop_stream(session._message_stream, 0)
        client.transmit()
        assert await session.closed_by_server() == (1008, "message stream stopped by the client")
        await server.streaming.broadcast("r", "after")  # must not raise in fan-out
        await wt.until(lambda: not server.streaming.connections)
