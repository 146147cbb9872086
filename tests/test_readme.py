"""The README's examples, run as written: echo, chat, SSE ticker, Starlette and FastAPI mounting."""

from __future__ import annotations

import asyncio
import json
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from forge_streaming.testing import serve
from websockets.asyncio.client import ClientConnection

README = Path(__file__).resolve().parent.parent / "README.md"


def example(name: str) -> types.ModuleType:
    """Execute the README block that starts with ``# README example: <name>`` as a module."""
    blocks = re.findall(r"```python\n(# README example: (\w+)\n.*?)```", README.read_text(), flags=re.S)
    source = {key: code for code, key in blocks}[name]
    module = types.ModuleType(f"readme_{name}")
    exec(compile(source, f"README.md example {name}", "exec"), module.__dict__)
    return module


async def test_readme_opens_with_the_two_commands() -> None:
    lines = [line for line in README.read_text().splitlines() if line.strip()]
    assert lines[1] == "```sh" and lines[2].startswith("make run") and lines[3].startswith("make test")


async def test_echo_example() -> None:
    pytest.importorskip("forge_streaming_websocket")
    module = example("echo")
    async with serve(module.streaming) as server:
        async with websockets.connect(server.ws_url + "/echo") as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), 5) == "hello"
            await ws.send(b"\x00\x01binary")
            assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01binary"


async def test_chat_example() -> None:
    pytest.importorskip("forge_streaming_websocket")
    module = example("chat")
    async with serve(module.streaming) as server:
        url = server.ws_url + "/chat?room=kitchen"
        async with websockets.connect(url) as alice, websockets.connect(url) as bob:
            async def frames_until(ws: ClientConnection, predicate: Callable[[Any], bool]) -> Any:
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    if predicate(frame):
                        return frame

            await frames_until(alice, lambda f: f.get("type") == "join")  # bob's join notice
            await bob.send("soup is ready")
            frame = await frames_until(alice, lambda f: f.get("type") == "message")
            assert frame["data"] == "soup is ready" and frame["room_id"] == "kitchen"


async def test_ticker_example() -> None:
    pytest.importorskip("forge_streaming_sse")
    from httpx_sse import aconnect_sse

    module = example("ticker")
    async with serve(module.streaming) as server:
        async with httpx.AsyncClient(timeout=10) as client:
            async with aconnect_sse(client, "GET", server.url + "/ticker") as source:
                events: list[tuple[str, Any]] = []
                async for event in source.aiter_sse():
                    if event.event == "tick":
                        events.append((event.id, json.loads(event.data)))
                    if len(events) == 2:
                        break
    assert events == [("0", {"n": 0}), ("1", {"n": 1})]


@pytest.mark.parametrize("name", ["starlette", "fastapi"])
async def test_mounting_examples(name: str) -> None:
    pytest.importorskip("forge_streaming_websocket")
    module = example(name)
    async with serve(module.app) as server:
        async with websockets.connect(server.ws_url + "/rt/ws") as ws:
            await ws.send(json.dumps({"type": "join", "room_id": "lobby"}))
            joined = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert joined["event"] == "room.joined"
            if name == "fastapi":
                async with httpx.AsyncClient() as client:
                    reply = await client.post(server.url + "/announce", params={"text": "hello"})
                sequence = reply.json()["sequence"]
                frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert (frame["data"], frame["sequence"]) == ({"text": "hello"}, sequence)
            else:
                async with httpx.AsyncClient() as client:
                    assert (await client.get(server.url + "/")).text == "my app"
