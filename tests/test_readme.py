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
import yaml
from forge_streaming import Streaming
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


def section(title: str) -> str:
    text = README.read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_use_it_in_your_project_names_real_distributions() -> None:
    """Every distribution the section tells you to pip install is one of the workspace's, with the path shown."""
    import tomllib

    root = README.parent
    projects = {tomllib.loads(p.read_text())["project"]["name"]: p.parent.relative_to(root).as_posix()
                for p in root.glob("*/pyproject.toml")} | {
        tomllib.loads(p.read_text())["project"]["name"]: p.parent.relative_to(root).as_posix()
        for p in root.glob("*/*/pyproject.toml")}
    text = section("Use it in your project")
    named = set(re.findall(r"pip install ((?:forge-streaming[\w-]*\s*)+)", text)[0].split())
    assert {"forge-streaming", "forge-streaming-memory", "forge-streaming-websocket", "forge-streaming-sse"} <= named
    for name in set(re.findall(r"\bforge-streaming[\w-]*", text)) - {"forge-streaming"}:
        assert name in projects, f"README names {name}, which is no distribution of this repository"
    paths = re.findall(r"pip install (\./[^`]+)`", text)[0].split()
    assert sorted(p.removeprefix("./") for p in paths) == sorted(projects[n] for n in named), (paths, named)
    assert ".venv/bin" in README.read_text().split("## Contents")[0], "the intro says where `make` puts the commands"


async def test_rooms_presence_and_members_answer_as_the_table_says() -> None:
    """The quick start's table of calls, on a real server with real WebSocket clients."""
    pytest.importorskip("forge_streaming_websocket")
    from forge_streaming import ConnectionRequest, Identity, Member, Streaming, get_streaming, hookimpl, new_extension

    class Names:
        @hookimpl
        def streaming_authenticate(self, request: ConnectionRequest) -> Identity | None:
            name = request.query.get("name")
            return Identity(name) if name else None

    table = section("Quick start")
    for call in ("streaming.rooms()", "streaming.presence(", "streaming.members(", "new_extension(", "get_streaming("):
        assert call in table, call
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Mount, Route

    streaming = new_extension({"plugins": {"deny": ["webtransport"]}}, plugins=[Names()])
    assert isinstance(streaming, Streaming)

    async def node(request: Request) -> Response:  # an app's own route finds the service
        return PlainTextResponse(get_streaming(request).node_id)

    app = Starlette(routes=[Route("/node", node), Mount("/rt", app=streaming.asgi_app())],
                    lifespan=streaming.lifespan)
    async with serve(app) as server:
        async with httpx.AsyncClient() as http:
            assert (await http.get(server.url + "/node")).text == streaming.node_id
        clients = [await websockets.connect(f"{server.ws_url}/rt/ws?{query}")
                   for query in ("name=ada", "name=grace", "")]
        try:
            for ws, room in zip(clients, ("lobby", "lobby", "ops"), strict=True):
                await ws.send(json.dumps({"type": "join", "room_id": room}))
                while json.loads(await asyncio.wait_for(ws.recv(), 5)).get("event") != "room.joined":
                    pass
            assert sorted(await streaming.rooms()) == ["lobby", "ops"]
            assert sorted(await streaming.presence("lobby")) == ["ada", "grace"]
            members = await streaming.members("lobby")
            assert [m.user_id for m in members] == ["ada", "grace"] and all(isinstance(m, Member) for m in members)
            assert {m.transport for m in members} == {"websocket"} and all(m.node == streaming.node_id for m in members)
            anonymous = (await streaming.members("ops"))[0]
            assert await streaming.presence("ops") == [anonymous.connection_id]
        finally:
            for ws in clients:
                await ws.close()


def test_the_configuration_block_is_the_kernels_defaults() -> None:
    """The YAML under *Configuration* shows each kernel key with its default: loaded, it is the empty config."""
    text = README.read_text()
    block = re.search(r"```yaml\n(.*?)```", text[text.index("effective configuration."):], flags=re.S)
    assert block is not None
    shown = Streaming(yaml.safe_load(block.group(1))).config
    default = Streaming({}).config
    for section in ("server", "pubsub", "rooms", "limits", "api", "plugins", "logging"):
        assert getattr(shown, section) == getattr(default, section), section
