"""An SSE member and a WebSocket member of one room see each other's messages, as the same JSON frames."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from forge_streaming.testing import serve

if TYPE_CHECKING:
    from conftest import Kit  # the kit fixture's type (test modules do not import conftest at run time)

pytest.importorskip("forge_streaming_websocket")
websockets_client = pytest.importorskip("websockets.asyncio.client")


async def test_sse_and_websocket_members_share_a_room(
        kit: type[Kit], streaming_plugins_only: Callable[..., None]) -> None:
    streaming_plugins_only("sse", "websocket", "memory-pubsub", "memory-rooms")
    streaming = kit.make_streaming()
    assert {"sse", "websocket"} <= set(streaming.transports)
    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        sse = await kit.RawSSE.open(server.url, "/sse?rooms=mixed")
        first = await sse.next_event()
        assert first is not None
        session = first.json()
        await sse.until(lambda e: kit.is_system(e, "room.joined"))
        async with websockets_client.connect(server.ws_url + "/ws") as ws:

            async def ws_next(kind: str) -> dict[str, Any]:
                while True:
                    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    if frame.get("type") == kind:
                        return frame

            await ws.send(json.dumps({"type": "join", "room_id": "mixed"}))
            await sse.until(lambda e: e.json().get("type") == "join")  # the WebSocket member arrived
            await ws.send(json.dumps({"type": "message", "room_id": "mixed", "data": {"from": "ws"}}))
            from_ws = (await sse.until(lambda e: kit.is_message(e)))[-1]
            assert from_ws.json()["data"] == {"from": "ws"}
            assert from_ws.id == f"mixed:{from_ws.json()['sequence']}"

            answer = await client.post(session["send_url"], headers={"x-stream-token": session["token"]},
                                       content=json.dumps({"type": "message", "room_id": "mixed",
                                                           "data": {"from": "sse"}}))
            assert answer.status_code == 202
            ws_frame = await ws_next("message")
            assert ws_frame["data"] == {"from": "sse"} and ws_frame["user_id"] == session["connection_id"]

            # both get the same bytes for a server broadcast
            await streaming.broadcast("mixed", {"from": "server"})
            ws_raw = None
            while ws_raw is None:
                text = await asyncio.wait_for(ws.recv(), 5)
                if json.loads(text).get("type") == "message":
                    ws_raw = text
            sse_event = (await sse.until(lambda e: kit.is_message(e, {"from": "server"})))[-1]
            assert sse_event.data == ws_raw
        await sse.close()
