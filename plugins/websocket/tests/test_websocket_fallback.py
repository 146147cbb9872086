"""The fallback path: the app under plain uvicorn, without this plugin's protocol class.

Every connection is then a QueuedConnection (bounded queue + one writer task
through the ASGI send); the project's limits must hold all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from forge_streaming import Streaming
from forge_streaming.testing import free_port
from websockets.asyncio.client import connect


@contextlib.asynccontextmanager
async def plain_uvicorn(streaming: Streaming) -> AsyncIterator[str]:
    """uvicorn with its own sans-I/O WebSocket implementation and defaults (16 MiB limit, deflate on)."""
    port = free_port()
    config = uvicorn.Config(streaming.asgi_app(), host="127.0.0.1", port=port, ws="websockets-sansio",
                            lifespan="on", log_config=None, log_level="warning", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    try:
        async def started() -> None:
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)

        await asyncio.wait_for(started(), 10)
        yield f"ws://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def test_fallback_echo_room_and_size_limit(make_streaming: Any, frames: Any) -> None:
    streaming: Streaming = make_streaming()

    async def echo(conn: Any) -> None:
        while True:
            msg = await conn.read_message()
            await conn.write_message(msg.data)

    streaming.handle_websocket("/echo", echo)

    async with plain_uvicorn(streaming) as url:
        async with connect(url + "/echo") as ws:
            assert streaming.transports["websocket"].describe()["direct"] == 0
            await ws.send("text")
            assert await asyncio.wait_for(ws.recv(), 5) == "text"
            await ws.send(b"\x00bin")
            assert await asyncio.wait_for(ws.recv(), 5) == b"\x00bin"
        async with connect(url + "/ws") as a, connect(url + "/ws") as b:
            for ws in (a, b):
                await frames.send(ws, type="join", room_id="q")
                await frames.next(ws, "system", event="room.joined")
            await frames.send(a, type="message", room_id="q", data="over the queue")
            assert (await frames.next(b, "message"))["data"] == "over the queue"
            # uvicorn alone would take 16 MiB; the project's 64 KiB limit still holds
            await b.send("x" * (64 * 1024 + 1))
            await asyncio.wait_for(b.wait_closed(), 5)
            assert b.close_reason is not None
            assert b.close_code == 1009 and "65537" in b.close_reason
            assert (await frames.next(a, "leave"))["room_id"] == "q"


async def test_fallback_slow_consumer(make_streaming: Any, raw_clients: Any, kit: Any) -> None:
    closes = kit.Closes()
    streaming: Streaming = make_streaming({"websocket": {"send_buffer": "256KiB"}}, plugins=[closes])
    async with plain_uvicorn(streaming) as url:
        await kit.race(streaming, url, raw_clients, closes, pad=32 * 1024, reset=False)
