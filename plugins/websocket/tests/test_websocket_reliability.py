"""How connections end: dead peers, slow consumers, shutdown, refusals, bad input."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from forge_streaming import Identity, Refused, Streaming, hookimpl
from forge_streaming.testing import serve
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.frames import Opcode


async def test_dead_peer_closed_and_rooms_cleaned(kit: Any, make_streaming: Any, frames: Any, raw_clients: Any) -> None:
    closes = kit.Closes()
    streaming: Streaming = make_streaming({"websocket": {"ping_interval": "200ms", "ping_timeout": "300ms"}},
                                          plugins=[closes])
    async with serve(streaming) as server:
        async with connect(server.ws_url + "/ws") as alive:  # the websockets client answers pings
            await frames.send(alive, type="join", room_id="r")
            await frames.next(alive, "system", event="room.joined")
            (alive_id,) = streaming.connections
            dead = await raw_clients(server.ws_url + "/ws")
            dead.send_text(b'{"type":"join","room_id":"r"}')
            await dead.read_events(kit.is_json("system", "room.joined"))
            (dead_id,) = set(streaming.connections) - {alive_id}
            assert await streaming.presence("r") == [alive_id, dead_id]
            # from now on the raw client reads nothing, so it never answers a ping
            leave = await frames.next(alive, "leave", timeout=5)
            assert leave["user_id"] == dead_id
            assert await streaming.presence("r") == [alive_id]
            await kit.until(lambda: dead_id in closes.closed)
            assert closes.closed == {dead_id: (1006, "keepalive ping timeout")}
            # the live client kept answering pings over several intervals and is still served
            await asyncio.sleep(0.6)
            await streaming.broadcast("r", "still there")
            assert (await frames.next(alive, "message"))["data"] == "still there"
            assert alive_id in streaming.connections


async def test_slow_consumer_removed_fast_one_gets_everything(kit: Any, make_streaming: Any, raw_clients: Any) -> None:
    closes = kit.Closes()
    streaming: Streaming = make_streaming({"websocket": {"send_buffer": "256KiB", "write_buffer_size": "32KiB"}},
                                          plugins=[closes])
    async with serve(streaming) as server:
        await kit.race(streaming, server.ws_url, raw_clients, closes)


async def test_shutdown_flushes_then_closes_1001(kit: Any, make_streaming: Any, frames: Any) -> None:
    from websockets.exceptions import ConnectionClosed

    streaming: Streaming = make_streaming()
    async with serve(streaming) as server:
        ws = await connect(server.ws_url + "/ws")
        await frames.send(ws, type="join", room_id="bye")
        await frames.next(ws, "system", event="room.joined")
        for n in range(50):
            await streaming.broadcast("bye", n)
    # the server is gone; what the client was sent is all there, in order, then the notice and a 1001
    got: list[Any] = []
    try:
        while True:
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    except ConnectionClosed:
        pass
    assert [f["data"] for f in got if f["type"] == "message"] == list(range(50))
    assert got[-1]["type"] == "system" and got[-1]["event"] == "server.shutdown"
    assert (ws.close_code, ws.close_reason) == (1001, "server shutting down")


async def test_refused_before_upgrade_with_status(kit: Any, make_streaming: Any) -> None:
    class Gate:
        @hookimpl
        def streaming_authenticate(self, request: Any) -> Identity:
            token = request.query.get("token")
            if token != "good":
                raise Refused("a valid ?token= is required", status=401)
            return Identity("u1")

    streaming: Streaming = make_streaming({"limits": {"max_connections_per_user": 1}}, plugins=[Gate()])
    async with serve(streaming) as server:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(server.ws_url + "/ws?token=bad"):
                pass
        assert refused.value.response.status_code == 401
        assert b"token" in refused.value.response.body
        async with connect(server.ws_url + "/ws?token=good"):
            with pytest.raises(InvalidStatus) as full:
                async with connect(server.ws_url + "/ws?token=good"):
                    pass
            assert full.value.response.status_code == 429
        await kit.until(lambda: not streaming.connections)


async def test_invalid_utf8_closes_1007(kit: Any, make_streaming: Any, raw_clients: Any) -> None:
    streaming: Streaming = make_streaming()
    async with serve(streaming) as server:
        client = await raw_clients(server.ws_url + "/ws")
        client.send_text(b"\xff\xfe not utf-8")
        await client.read_events(lambda f: f.opcode is Opcode.CLOSE)
        assert client.protocol.close_rcvd is not None and client.protocol.close_rcvd.code == 1007
        await kit.until(lambda: not streaming.connections)
        async with connect(server.ws_url + "/ws") as ws:  # the server is fine
            await ws.send('{"type":"join","room_id":"ok"}')
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["event"] == "room.joined"


async def test_close_timeout_cuts_a_peer_that_never_answers_the_close(
        kit: Any, make_streaming: Any, raw_clients: Any) -> None:
    streaming: Streaming = make_streaming({"websocket": {"close_timeout": "200ms"}})

    async def hangup(conn: Any) -> None:
        await conn.close(1000, "done")

    streaming.handle_websocket("/hangup", hangup)

    async with serve(streaming) as server:
        client = await raw_clients(server.ws_url + "/hangup")
        received = b""

        async def read_until_cut() -> None:
            nonlocal received
            # raw bytes only: the client's protocol never sees the close, so it never answers it
            while chunk := await client.reader.read(65536):
                received += chunk

        try:
            await asyncio.wait_for(read_until_cut(), 5)
        except ConnectionResetError:
            pass
        assert client.protocol.close_rcvd is not None and client.protocol.close_rcvd.code == 1000
