"""Graceful drain on SIGTERM/Ctrl-C, a restarted server under clients, and a bounded soak."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import websockets
from forge_streaming import Streaming
from forge_streaming.testing import ServerProcess, serve
from websockets.asyncio.client import ClientConnection

pytest.importorskip("forge_streaming_websocket")
pytest.importorskip("forge_streaming_sse")


async def recv_json(ws: ClientConnection, predicate: Callable[[Any], bool] = lambda f: True,
                    timeout: float = 5.0) -> Any:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if predicate(frame):
            return frame


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_shutdown_tells_clients_flushes_then_closes(server_factory: Callable[..., ServerProcess],
                                                          sig: signal.Signals) -> None:
    from httpx_sse import aconnect_sse

    server = server_factory(config="server:\n  drain_timeout: 3s\n  reconnect_hint: 2s\n")
    ws = await websockets.connect(server.ws_url + "/ws")
    await ws.send(json.dumps({"type": "join", "room_id": "r"}))
    await recv_json(ws, lambda f: f.get("event") == "room.joined")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        async with aconnect_sse(client, "GET", "/sse?rooms=r") as source:
            events = source.aiter_sse()
            await anext(events)  # session
            started = time.monotonic()
            server.proc.send_signal(sig)
            notice = await recv_json(ws, lambda f: f.get("event") == "server.shutdown")
            assert notice["data"]["reconnect_after_ms"] == 2000
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1001
            sse_frames = [json.loads(e.data) async for e in events if e.data.startswith("{")]
            assert any(f.get("event") == "server.shutdown" for f in sse_frames)
    await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 10)
    assert time.monotonic() - started < 10
    assert server.proc.returncode in (0, -signal.SIGTERM)


async def test_restarted_server_clients_reconnect_and_learn_of_the_gap(
        server_factory: Callable[..., ServerProcess]) -> None:
    first = server_factory()
    ws = await websockets.connect(first.ws_url + "/ws")
    await ws.send(json.dumps({"type": "join", "room_id": "r"}))
    await recv_json(ws, lambda f: f.get("event") == "room.joined")
    other = await websockets.connect(first.ws_url + "/ws")
    await other.send(json.dumps({"type": "join", "room_id": "r"}))
    await other.send(json.dumps({"type": "message", "room_id": "r", "data": "before"}))
    last = (await recv_json(ws, lambda f: f.get("type") == "message"))["sequence"]
    first.stop(signal.SIGTERM)
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    await other.close()
    second = server_factory()
    ws = await websockets.connect(second.ws_url + "/ws")
    await ws.send(json.dumps({"type": "join", "room_id": "r", "since": last}))
    frame = await recv_json(ws, lambda f: f.get("type") == "system" and f.get("event") == "resync")
    assert frame["data"]["since"] == last
    await ws.close()


def resources() -> tuple[int, int]:
    gc.collect()
    return len(os.listdir("/proc/self/fd")), len(asyncio.all_tasks())


@pytest.mark.slow
async def test_soak_thousands_of_connections_open_chat_close() -> None:
    """2,000 WebSocket connections in waves of 100: join, chat, leave. Nothing may be left behind."""
    streaming = Streaming({})
    async with serve(streaming) as server:
        url = server.ws_url + "/ws"
        fds_before, tasks_before = resources()
        received = 0

        async def member(n: int, room: str) -> int:
            async with websockets.connect(url) as ws:
                await ws.send(json.dumps({"type": "join", "room_id": room}))
                await recv_json(ws, lambda f: f.get("event") == "room.joined", timeout=20)
                await ws.send(json.dumps({"type": "message", "room_id": room, "data": n}))
                await ws.send(json.dumps({"type": "typing", "room_id": room, "data": True}))
                got = 0
                try:
                    while True:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), 0.3))
                        got += frame.get("type") == "message"
                except TimeoutError:
                    pass
                return got

        deadline = time.monotonic() + 90
        for wave in range(20):
            if time.monotonic() > deadline:
                break
            results = await asyncio.gather(*(member(n, f"room-{wave}-{n % 5}") for n in range(100)))
            received += sum(results)
        assert received > 0
        for _ in range(100):
            if not streaming.connections and resources()[0] <= fds_before + 2:
                break
            await asyncio.sleep(0.1)
        fds_after, tasks_after = resources()
        assert streaming.connections == {}
        assert await streaming.rooms() == []
        assert fds_after <= fds_before + 2, (fds_before, fds_after)
        assert tasks_after <= tasks_before + 2, (tasks_before, tasks_after)
