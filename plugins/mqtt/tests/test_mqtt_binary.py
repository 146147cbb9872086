"""Binary room messages across nodes on a real Mosquitto: the ``forge-binary`` user property and history replies."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import pytest

pytest.importorskip("forge_streaming_websocket")

from websockets.asyncio.client import ClientConnection, connect  # noqa: E402

ROOM = "bin"
PAYLOAD = bytes(range(256)) + b"\n{}\n"


async def joined(ws: ClientConnection, since: int | None = None) -> None:
    join: dict[str, Any] = {"type": "join", "room_id": ROOM}
    if since is not None:
        join["since"] = since
    await ws.send(json.dumps(join))
    while json.loads(await asyncio.wait_for(ws.recv(), 10)).get("event") != "room.joined":
        pass


async def next_message(ws: ClientConnection) -> str | bytes:
    while True:
        raw = await asyncio.wait_for(ws.recv(), 10)
        if isinstance(raw, bytes) or json.loads(raw).get("type") == "message":
            return raw


def binary(raw: str | bytes) -> tuple[dict[str, Any], bytes]:
    assert isinstance(raw, bytes), f"expected a binary frame, got {raw!r:.200}"
    header, newline, payload = raw.partition(b"\n")
    assert newline
    decoded: dict[str, Any] = json.loads(header)
    assert decoded["binary"] is True and decoded["room_id"] == ROOM
    return decoded, payload


@pytest.mark.timeout(60)
async def test_binary_messages_cross_nodes(broker: Any, cluster: Any) -> None:
    a, b = cluster(broker, "a", "b")
    async with connect(f"{a.ws_url}/ws") as on_a, connect(f"{b.ws_url}/ws") as on_b:
        await joined(on_a)
        await joined(on_b)
        await on_a.send(json.dumps({"type": "message", "room_id": ROOM}).encode() + b"\n" + PAYLOAD)
        assert binary(await next_message(on_b))[1] == PAYLOAD
        async with httpx.AsyncClient(timeout=5) as http:
            answer = await http.post(f"{b.url}/api/publish", headers=b._headers(),
                                     json={"room_id": ROOM, "data_base64": base64.b64encode(b"\x00api").decode()})
            assert answer.status_code == 200, answer.text
        assert binary(await next_message(on_a))[1] == b"\x00api"
        assert binary(await next_message(on_b))[1] == b"\x00api"
        await on_a.send(json.dumps({"type": "message", "room_id": ROOM, "data": "text"}))
        assert json.loads(await next_message(on_b))["data"] == "text"


@pytest.mark.timeout(60)
async def test_binary_messages_come_back_from_cluster_history(broker: Any, cluster: Any) -> None:
    a, b = cluster(broker, "a", "b")
    async with connect(f"{a.ws_url}/ws") as on_a, connect(f"{b.ws_url}/ws") as on_b:
        await joined(on_a)
        await joined(on_b)
        await on_a.send(json.dumps({"type": "message", "room_id": ROOM}).encode() + b"\n" + PAYLOAD)
        first = binary(await next_message(on_b))[0]["sequence"]
        await on_a.send(json.dumps({"type": "message", "room_id": ROOM, "data": "text"}))
        assert json.loads(await next_message(on_b))["data"] == "text"
        # a third node never heard the room: its history asks the cluster, binary frames stay binary
        (c,) = cluster(broker, "c")
        async with connect(f"{c.ws_url}/ws") as late:
            await joined(late, since=first - 1)
            assert binary(await next_message(late))[1] == PAYLOAD
            assert json.loads(await next_message(late))["data"] == "text"

