"""A single message up to ``limits.max_message_size`` never drops its receiver (issue 16.4).

With ``max_message_size: 20MiB`` and the default ``send_buffer`` (1 MiB), the
bound is "send_buffer on top of one message": a handler echoing 1, 4 and 16 MiB
text and binary messages (the yardstick of Autobahn's group 9, which is not run
here) and a room delivering such messages to WebSocket and SSE members keep
their connections. WebTransport's twin is
plugins/webtransport/tests/test_webtransport_pacing.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from forge_streaming import Connection, Streaming
from forge_streaming.testing import DropRecorder, free_port, serve

pytestmark = pytest.mark.timeout(90)

MiB = 1024 * 1024
SIZES = [1 * MiB, 4 * MiB, 16 * MiB]
ALLOW = ("websocket", "sse", "memory-pubsub", "memory-rooms")


@pytest.fixture(autouse=True)
def only_these(streaming_plugins_only: Any) -> None:
    streaming_plugins_only(*ALLOW)




def big_service(make_streaming: Any, drops: DropRecorder) -> Streaming:
    streaming: Streaming = make_streaming({"limits": {"max_message_size": "20MiB"}}, plugins=(drops,))
    assert streaming.config.limits.send_buffer == MiB

    async def echo(conn: Connection) -> None:
        while True:
            message = await conn.read_message()
            await conn.write_message(message.data)

    streaming.handle_websocket("/echo", echo)
    return streaming


async def echo_every_size(url: str) -> None:
    async with websockets.connect(url, max_size=32 * MiB) as ws:
        for size in SIZES:
            for message in ("t" * size, b"\x02" * size):
                await ws.send(message)
                echoed = await asyncio.wait_for(ws.recv(), 30)
                assert type(echoed) is type(message) and len(echoed) == size and echoed == message
        await ws.send("small")
        assert await asyncio.wait_for(ws.recv(), 5) == "small"
        assert ws.close_code is None


async def test_websocket_echo_of_1_4_16_mib_text_and_binary(make_streaming: Any) -> None:
    drops = DropRecorder()
    streaming = big_service(make_streaming, drops)
    async with serve(streaming) as server:
        assert streaming.transports["websocket"].describe()["send_buffer"] == MiB
        await echo_every_size(server.ws_url + "/echo")
    assert drops.reasons == []


@contextlib.asynccontextmanager
async def plain_uvicorn(streaming: Streaming) -> AsyncIterator[str]:
    """uvicorn's own WebSocket protocol: the app's connections are the queued fallback flavour."""
    port = free_port()
    config = uvicorn.Config(streaming.asgi_app(), host="127.0.0.1", port=port, ws="websockets-sansio",
                            ws_max_size=32 * MiB, lifespan="on", log_config=None, log_level="warning",
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    try:
        while not server.started:
            assert not task.done(), "server stopped during startup"
            await asyncio.sleep(0.01)
        yield f"ws://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def test_websocket_fallback_echo_of_1_4_16_mib_text_and_binary(make_streaming: Any) -> None:
    drops = DropRecorder()
    streaming = big_service(make_streaming, drops)
    async with plain_uvicorn(streaming) as url:
        await echo_every_size(url + "/echo")
        assert streaming.transports["websocket"].describe()["direct"] == 0
    assert drops.reasons == []


async def test_room_messages_of_1_4_16_mib_reach_websocket_and_sse_members(make_streaming: Any) -> None:
    drops = DropRecorder()
    streaming = big_service(make_streaming, drops)
    async with serve(streaming) as server, \
            websockets.connect(server.ws_url + "/ws", max_size=32 * MiB) as sender, \
            websockets.connect(server.ws_url + "/ws", max_size=32 * MiB) as receiver, \
            httpx.AsyncClient(timeout=30) as http, \
            http.stream("GET", server.url + "/sse?rooms=big") as sse:
        for ws in (sender, receiver):
            await ws.send(json.dumps({"type": "join", "room_id": "big"}))
            while json.loads(await ws.recv()).get("event") != "room.joined":
                pass
        lines = sse.aiter_lines()

        async def sse_message() -> Any:
            async for line in lines:
                if line.startswith("data: ") and json.loads(line[6:]).get("type") == "message":
                    return json.loads(line[6:])["data"]
            raise AssertionError("the SSE stream ended")

        for size in SIZES:
            data = "d" * size
            await sender.send(json.dumps({"type": "message", "room_id": "big", "data": data}))
            while (frame := json.loads(await asyncio.wait_for(receiver.recv(), 30)))["type"] != "message":
                pass
            assert frame["data"] == data
            assert await asyncio.wait_for(sse_message(), 30) == data
        await sender.send(json.dumps({"type": "message", "room_id": "big", "data": "small"}))
        assert await asyncio.wait_for(sse_message(), 5) == "small"
    assert drops.reasons == []
