"""The built-in room protocol endpoint at /ws, with real clients."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from forge_streaming import Identity, Streaming, hookimpl
from forge_streaming.testing import open_connection, serve
from websockets.asyncio.client import connect


class NamedUsers:
    """Names each client from ``?user=`` so presence is readable."""

    @hookimpl
    def streaming_authenticate(self, request: Any) -> Identity | None:
        user = request.query.get("user")
        return Identity(user) if user else None


async def test_three_clients_join_broadcast_leave_presence(make_streaming: Any, frames: Any) -> None:
    streaming: Streaming = make_streaming(plugins=[NamedUsers()])
    async with serve(streaming) as server:
        url = server.ws_url + "/ws?user="
        async with connect(url + "alice") as alice, connect(url + "bob") as bob, connect(url + "carol") as carol:
            await frames.send(alice, type="join", room_id="lobby")
            joined = await frames.next(alice, "system", event="room.joined")
            assert joined["data"]["users"] == ["alice"]
            await frames.send(bob, type="join", room_id="lobby")
            await frames.next(bob, "system", event="room.joined")
            assert (await frames.next(alice, "join"))["user_id"] == "bob"
            await frames.send(carol, type="join", room_id="lobby")
            joined = await frames.next(carol, "system", event="room.joined")
            assert joined["data"]["users"] == ["alice", "bob", "carol"]
            for ws in (alice, bob):
                assert (await frames.next(ws, "join"))["user_id"] == "carol"

            await frames.send(alice, type="message", room_id="lobby", data={"text": "hello"})
            for ws in (bob, carol):
                got = await frames.next(ws, "message")
                assert (got["user_id"], got["data"], got["room_id"]) == ("alice", {"text": "hello"}, "lobby")
            await frames.send(bob, type="typing", room_id="lobby", data=True)
            typing = await frames.next(alice, "typing")
            assert (typing["user_id"], typing["data"]) == ("bob", True)

            await frames.send(carol, type="leave", room_id="lobby")
            await frames.next(carol, "system", event="room.left")
            for ws in (alice, bob):
                assert (await frames.next(ws, "leave"))["user_id"] == "carol"
            assert await streaming.presence("lobby") == ["alice", "bob"]
            # a message after leaving is refused with an error frame, the connection stays usable
            await frames.send(carol, type="message", room_id="lobby", data="ghost")
            assert (await frames.next(carol, "error"))["data"]["code"] == "not_member"

            # alice sent it, so she does not get her own message back; bob's next message is next in line
            await frames.send(bob, type="message", room_id="lobby", data="second")
            got = await frames.next(alice, "message")
            assert got["data"] == "second"

        async def room_empty() -> None:
            while await streaming.presence("lobby"):
                await asyncio.sleep(0.02)

        await asyncio.wait_for(room_empty(), 5)


async def test_bad_input_gets_error_frames_and_connection_stays(make_streaming: Any, frames: Any) -> None:
    streaming: Streaming = make_streaming()
    async with serve(streaming) as server:
        async with connect(server.ws_url + "/ws") as ws:
            cases: list[tuple[str | bytes, str]] = [
                ("{", "invalid_json"), ("[1]", "invalid_frame"), ('{"type":"shout","room_id":"r"}', "unknown_type"),
                ('{"type":"join"}', "missing_room"), (b"\x01\x02", "binary_not_supported")]
            for raw, code in cases:
                await ws.send(raw)
                assert (await frames.next(ws, "error"))["data"]["code"] == code, raw
            await frames.send(ws, type="join", room_id="r")
            await frames.next(ws, "system", event="room.joined")


async def test_room_messages_cross_transports(make_streaming: Any, frames: Any) -> None:
    """A WebSocket member and a member on another transport (the kernel's test connection) share a room."""
    streaming: Streaming = make_streaming()
    async with serve(streaming) as server:
        other = await open_connection(streaming)
        await other.join_room("mixed")
        async with connect(server.ws_url + "/ws") as ws:
            await frames.send(ws, type="join", room_id="mixed")
            await frames.next(ws, "system", event="room.joined")
            await frames.send(ws, type="message", room_id="mixed", data="from websocket")

            async def other_got_it() -> None:
                while not other.frames("message"):
                    await asyncio.sleep(0.02)

            await asyncio.wait_for(other_got_it(), 5)
            assert other.frames("message")[0]["data"] == "from websocket"
            await other.broadcast_to_room("mixed", "from elsewhere")
            assert (await frames.next(ws, "message"))["data"] == "from elsewhere"
            await streaming.broadcast("mixed", {"n": 1})
            assert (await frames.next(ws, "message"))["data"] == {"n": 1}
        await other.close()


async def test_resume_with_since_after_reconnect(make_streaming: Any, frames: Any) -> None:
    streaming: Streaming = make_streaming()
    async with serve(streaming) as server:
        keeper = await open_connection(streaming)  # the room lives on while the client is away
        await keeper.join_room("log")
        async with connect(server.ws_url + "/ws") as ws:
            await frames.send(ws, type="join", room_id="log")
            await frames.next(ws, "system", event="room.joined")
            seqs = [await streaming.broadcast("log", n) for n in range(3)]
            assert [(await frames.next(ws, "message"))["sequence"] for _ in range(3)] == seqs
        for n in range(3, 5):
            await streaming.broadcast("log", n)
        async with connect(server.ws_url + "/ws") as ws:
            await ws.send(json.dumps({"type": "join", "room_id": "log", "since": seqs[-1]}))
            assert [(await frames.next(ws, "message"))["data"] for _ in range(2)] == [3, 4]
        await keeper.close()
