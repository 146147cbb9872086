"""Slow readers are ended without slowing the room, on the fast path and on the ASGI-send fallback."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
import pytest
import uvicorn
from forge_streaming.testing import DropRecorder, free_port, serve
from forge_streaming_sse import Event, SSEConnection
from httpx_sse import aconnect_sse
from starlette.types import ASGIApp

if TYPE_CHECKING:
    from conftest import Kit  # the kit fixture's type (test modules do not import conftest at run time)




@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "asgi-send"])
async def test_slow_reader_is_ended_with_a_reason_and_the_room_is_not_slowed(kit: type[Kit], fast_path: bool) -> None:
    drops = DropRecorder()
    streaming = kit.make_streaming({"sse": {"send_buffer": "64KiB", "fast_path": fast_path}}, plugins=(drops,))
    async with serve(streaming) as server:
        slow = await kit.RawSSE.open(server.url, "/sse?rooms=r", rcvbuf=4096, limit=4096)
        fast = await kit.RawSSE.open(server.url, "/sse?rooms=r")
        try:
            session = await slow.next_event()  # the session event; then it stops reading
            assert session is not None
            slow_id = session.json()["connection_id"]
            await fast.until(lambda e: e.json().get("type") == "system" and e.json()["event"] == "room.joined")
            payload = "x" * 8000  # the kernel's socket buffers take a few MiB before the stream's own bound counts
            total = 0
            for _batch in range(1000):
                for _ in range(4):  # 32 KiB per loop iteration: under the 64 KiB bound for a reader that keeps up
                    await streaming.broadcast("r", {"n": total, "pad": payload})
                    total += 1
                await asyncio.sleep(0)  # let the loop flush and the sockets move
                if drops.reasons:
                    break
            assert drops.reasons == [(slow_id, "slow consumer")]
            await kit.eventually(lambda: slow_id not in streaming.connections)
            assert [c.id for c in streaming.local_members("r")] != [] and slow_id not in {
                c.id for c in streaming.local_members("r")}
            # the room went on: the fast member got every message, in order
            last = total - 1
            got = [e.json()["data"]["n"] for e in await fast.until(
                lambda e: kit.is_message(e) and e.json()["data"]["n"] == last, timeout=20) if kit.is_message(e)]
            assert got == list(range(total))
            # the slow reader finally reads: on the fast path its connection was reset (SO_LINGER 0) so that the
            # server freed what it held at once; under the ASGI fallback, which has no socket, the stream ends with
            # the reason
            if fast_path:  # the reset discards what was queued, the notice too (tests/test_slow_consumer_reset.py)
                rest = [e async for e in slow.events()]
                assert not any(e.json().get("event") == "connection.closed" for e in rest if e.data.startswith("{"))
            else:
                rest = [e async for e in slow.events()]
                assert rest, "the slow reader got nothing"
                final = rest[-1].json()
                assert final["type"] == "system" and final["event"] == "connection.closed"
                assert final["data"]["reason"] == "slow consumer" and final["data"]["code"] == 1008
        finally:
            await slow.close()
            await fast.close()


async def test_asgi_send_fallback_serves_rooms_and_resume(kit: type[Kit]) -> None:
    streaming = kit.make_streaming({"sse": {"fast_path": False}})
    assert streaming.server_options() == {}
    async with serve(streaming) as server:
        keeper = await kit.RawSSE.open(server.url, "/sse?rooms=r")
        alice = await kit.RawSSE.open(server.url, "/sse?rooms=r")
        try:
            await streaming.broadcast("r", 1)
            last_id = (await alice.until(lambda e: kit.is_message(e, 1)))[-1].id
            assert last_id is not None
            await alice.close()
            await kit.eventually(lambda: len(streaming.connections) == 1)
            await streaming.broadcast("r", 2)
            alice = await kit.RawSSE.open(server.url, "/sse?rooms=r", {"Last-Event-ID": last_id})
            assert [e.json()["data"] for e in await alice.until(lambda e: kit.is_message(e, 2))
                    if kit.is_message(e)] == [2]
        finally:
            await keeper.close()
            await alice.close()


@contextlib.asynccontextmanager
async def h11_server(app: ASGIApp) -> AsyncIterator[str]:
    """uvicorn with its h11 protocol and none of the plugin's options: a plain ASGI server."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http="h11", lifespan="on", log_config=None,
                            log_level="warning", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        assert not task.done(), "server stopped during startup"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def test_under_another_asgi_server_handlers_and_rooms_work(kit: type[Kit]) -> None:
    streaming = kit.make_streaming()

    async def ticker(stream: SSEConnection) -> None:
        n = 0
        while not stream.done:
            await stream.send_event(Event(type="tick", data={"n": n}, id=str(n)))
            n += 1
            await asyncio.sleep(0.05)

    streaming.handle_sse("/ticker", ticker)

    async with h11_server(streaming.asgi_app()) as url, httpx.AsyncClient(base_url=url, timeout=5) as client:
        async with aconnect_sse(client, "GET", "/ticker") as source:
            ticks: list[int] = []
            async for sse in source.aiter_sse():
                ticks.append(json.loads(sse.data)["n"])
                if len(ticks) == 3:
                    break
        assert ticks == [0, 1, 2]
        async with aconnect_sse(client, "GET", "/sse?rooms=r") as source:
            events = source.aiter_sse()
            session = json.loads((await anext(events)).data)
            other = await kit.RawSSE.open(url, "/sse?rooms=r")
            await other.until(lambda e: kit.is_system(e, "room.joined"))
            answer = await client.post(session["send_url"], headers={"x-stream-token": session["token"]},
                                       content=json.dumps({"type": "message", "room_id": "r", "data": "via h11"}))
            assert answer.status_code == 202
            assert [e.json()["data"] for e in await other.until(lambda e: kit.is_message(e))
                    if kit.is_message(e)] == ["via h11"]
            await other.close()
        await kit.eventually(lambda: not streaming.connections)
