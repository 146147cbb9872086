"""Presence follows people, not connections (issue 15, item 3): a user on two tabs is one ``join`` and one ``leave``.

Real server, real WebSocket and SSE clients; the user id comes from an
authenticate hook, as with any real login.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets
from forge_streaming import ConnectionRequest, Identity, Streaming, hookimpl
from forge_streaming.testing import serve


class LoginByQuery:
    @hookimpl
    def streaming_authenticate(self, request: ConnectionRequest) -> Identity | None:
        user = request.query.get("user")
        return Identity(user) if user else None


async def joined(ws: Any, room: str) -> None:
    await ws.send(json.dumps({"type": "join", "room_id": room}))
    while json.loads(await asyncio.wait_for(ws.recv(), 5)).get("event") != "room.joined":
        pass


async def presence_frames(ws: Any, quiet: float = 0.3) -> list[tuple[str, str]]:
    """The join/leave notices ``ws`` receives until nothing comes for ``quiet`` seconds."""
    seen: list[tuple[str, str]] = []
    while True:
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), quiet))
        except TimeoutError:
            return seen
        if frame.get("type") in ("join", "leave"):
            seen.append((frame["type"], frame["user_id"]))


async def test_a_second_tab_is_no_news_and_only_the_last_tab_leaving_is_a_leave(make_streaming: Any) -> None:
    streaming: Streaming = make_streaming(only=["websocket", "memory-pubsub", "memory-rooms"],
                                          plugins=[LoginByQuery()])
    async with serve(streaming) as server:
        url = server.ws_url + "/ws?user="
        async with websockets.connect(url + "bob") as bob:
            await joined(bob, "r")
            tab1 = await websockets.connect(url + "alice")
            await joined(tab1, "r")
            assert await presence_frames(bob) == [("join", "alice")]
            tab2 = await websockets.connect(url + "alice")
            await joined(tab2, "r")
            assert await presence_frames(bob) == [], "alice's second tab was announced as a new join"
            await tab1.close()
            assert await presence_frames(bob) == [], "alice was announced gone while her other tab is open"
            assert await streaming.presence("r") == ["bob", "alice"]
            await tab2.send(json.dumps({"type": "leave", "room_id": "r"}))
            assert await presence_frames(bob) == [("leave", "alice")]
            await tab2.close()
            assert await streaming.presence("r") == ["bob"]
