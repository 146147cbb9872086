"""docs/forge.md, row by row: every Forge API, config key and wire frame maps to what forge-streaming has.

- API rows: the Python name exists (on the module, the class, or a live connection).
- Config rows: the key is accepted at its example value and applied (the effective config shows it).
- Frame rows: a real server (uvicorn on loopback) and real WebSocket clients; each client frame is
  sent as the page shows it and does what the row says, each server frame arrives with exactly the
  keys the page shows.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import forge_streaming
import pytest
import yaml
from forge_streaming import Connection, Streaming
from forge_streaming.testing import open_connection, serve

pytestmark = pytest.mark.timeout(60)

FORGE = Path(__file__).resolve().parent.parent / "docs" / "forge.md"
TRANSPORTS = ("websocket", "sse", "memory-pubsub", "memory-rooms")


@pytest.fixture(autouse=True)
def _only_these_plugins(streaming_plugins_only: Callable[..., None]) -> None:
    streaming_plugins_only(*TRANSPORTS)


def table(heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the table under ``## heading``."""
    text = FORGE.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:]]  # no header


def code(cell: str) -> str:
    """The first inline code of a cell."""
    match = re.search(r"`([^`]+)`", cell)
    assert match, f"no code in {cell!r}"
    return match.group(1)


API_ROWS = table("API")
CONFIG_ROWS = table("Configuration keys")
FRAME_ROWS = table("Wire frames")
FLAT_ROWS = table("Forge's flat keys")


def test_the_page_has_its_tables() -> None:
    assert len(API_ROWS) >= 13 and len(CONFIG_ROWS) >= 4 and len(FRAME_ROWS) >= 13


def test_every_forge_name_from_the_brief_has_a_row() -> None:
    forge_names = " ".join(row[0] for row in API_ROWS)
    for name in ("NewExtension", "GetStreaming", "HandleWebSocket", "HandleSSE", "Broadcast(", "BroadcastToRoom",
                 "Query", "JoinRoom", "LeaveRoom", "ReadMessage", "WriteMessage", "SendEvent", "Context().Done"):
        assert name in forge_names, f"docs/forge.md maps no {name}"
    keys = {code(row[0]) for row in CONFIG_ROWS}
    assert {"websocket.read_buffer_size", "websocket.write_buffer_size", "websocket.enable_compression",
            "sse.keep_alive_interval"} <= keys


# -- API ------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", API_ROWS, ids=[code(row[0]) for row in API_ROWS])
async def test_api_row_names_something_that_exists(row: list[str]) -> None:
    sse = pytest.importorskip("forge_streaming_sse")
    target = code(row[1])
    owner, _, name = target.rpartition(".")
    streaming = Streaming({})
    async with streaming.running():
        conn = await open_connection(streaming)
        namespaces: dict[str, Any] = {
            "forge_streaming": forge_streaming, "forge_streaming_sse": sse, "Streaming": streaming,
            "Connection": conn, "SSEConnection": sse.SSEConnection,
        }
        assert owner in namespaces, f"{target}: the test does not know {owner!r}"
        assert hasattr(namespaces[owner], name), f"docs/forge.md maps {row[0]} to {target}, which does not exist"
        if owner == "Connection":
            assert isinstance(conn, Connection) and hasattr(Connection, name), f"{target} is not on every connection"
        await conn.close()


# -- configuration --------------------------------------------------------------------------


def nested(dotted: str, value: Any) -> dict[str, Any]:
    *parents, last = dotted.split(".")
    tree: dict[str, Any] = {last: value}
    for part in reversed(parents):
        tree = {part: tree}
    return tree


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("row", CONFIG_ROWS, ids=[code(row[0]) for row in CONFIG_ROWS])
def test_config_row_is_accepted_and_applied(row: list[str]) -> None:
    key, example = code(row[1]), yaml.safe_load(code(row[2]))
    default = lookup(Streaming({}).config.effective(), key)
    applied = lookup(Streaming(nested(key, example)).config.effective(), key)
    assert applied != default, f"{key}: {example!r} left the default {default!r}"
    assert applied == example or isinstance(example, str), f"{key}: {example!r} became {applied!r}"  # 64KiB: 65536
    with pytest.raises(forge_streaming.ConfigError, match=re.escape(key)):
        Streaming(nested(key, {"not": "a value"}))


def test_every_forge_key_the_config_knows_has_a_row() -> None:
    from forge_streaming.config import FORGE_KEYS, FORGE_SWITCHES

    listed = {code(row[0]) for row in FLAT_ROWS}
    assert set(FORGE_KEYS) | set(FORGE_SWITCHES) | {"backend", "enable_message_history"} <= listed


@pytest.mark.parametrize("row", FLAT_ROWS, ids=[code(row[0]) for row in FLAT_ROWS])
def test_a_forge_flat_key_in_a_forge_file_is_applied_or_refused(row: list[str], tmp_path: Path) -> None:
    from forge_streaming.config import FORGE_SWITCHES

    forge_key, example = code(row[0]), yaml.safe_load(code(row[2]))
    config = tmp_path / "forge.yaml"
    config.write_text(yaml.safe_dump({"extensions": {"streaming": {forge_key: example}}}))
    streaming = Streaming(str(config))  # accepted at the row's example value
    if forge_key in FORGE_SWITCHES:
        holds, _ = FORGE_SWITCHES[forge_key]
        config.write_text(yaml.safe_dump({"extensions": {"streaming": {forge_key: not holds}}}))
        with pytest.raises(forge_streaming.ConfigError, match=forge_key):
            Streaming(str(config))
        return
    ours = code(row[1])
    applied = lookup(streaming.config.effective(), ours)
    expected = {"backend": "memory", "enable_message_history": 0}.get(forge_key, example)  # local; false
    assert applied == expected, f"{forge_key}: {example!r} became {ours} = {applied!r}"


# -- wire frames ----------------------------------------------------------------------------


def shape(cell: str) -> dict[str, Any]:
    """The page's frame notation as a dict: ``"key":"value"`` is fixed, a bare ``"key"`` is None (any value)."""
    text = code(cell)
    text = re.sub(r'(?<=[{,])"(\w+)"(?=[,}])', r'"\1":null', text)
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def frame_name(frame: dict[str, Any]) -> str:
    return f"{frame['type']} {frame['event']}" if frame["type"] == "system" else str(frame["type"])


CLIENT_ROWS = [row for row in FRAME_ROWS if row[1] == "client → server"]
SERVER_ROWS = [row for row in FRAME_ROWS if row[1] == "server → client"]


class Client:
    """A real WebSocket client that keeps every frame it receives."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            self.frames.append(json.loads(raw))

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        async def seen() -> dict[str, Any]:
            while True:
                for frame in self.frames:
                    if predicate(frame):
                        return frame
                await asyncio.sleep(0.01)

        try:
            return await asyncio.wait_for(seen(), 5)
        except TimeoutError:
            raise AssertionError(f"never received {what}; got {self.frames}") from None

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


async def test_frames_are_what_a_running_server_sends() -> None:
    websockets = pytest.importorskip("websockets")
    pytest.importorskip("forge_streaming_websocket")
    assert len(CLIENT_ROWS) == 4 and len(SERVER_ROWS) == len(FRAME_ROWS) - 4
    streaming = Streaming({"rooms": {"history_size": 1}})
    async with serve(streaming) as server:
        alice = Client(await websockets.connect(server.ws_url + "/ws"))
        bob = Client(await websockets.connect(server.ws_url + "/ws"))
        carol = Client(await websockets.connect(server.ws_url + "/ws"))
        try:
            # Each client frame exactly as the page shows it, and what it does.
            sent = {shape(row[2])["type"]: shape(row[2]) for row in CLIENT_ROWS}
            assert set(sent) == {"join", "leave", "message", "typing"}
            room = sent["join"]["room_id"]
            assert all(frame["room_id"] == room for frame in sent.values())
            await alice.send(sent["join"])
            await alice.wait_for(lambda f: f.get("event") == "room.joined", "alice's room.joined")
            await bob.send({"type": "join", "room_id": room})
            await alice.wait_for(lambda f: f["type"] == "join", "the join notice of bob")
            await alice.send(sent["typing"])
            await bob.wait_for(lambda f: f["type"] == "typing" and f["data"] == sent["typing"]["data"], "typing")
            await alice.send(sent["message"])
            await bob.wait_for(lambda f: f["type"] == "message" and f["data"] == sent["message"]["data"], "message")
            await bob.send(sent["leave"])
            await bob.wait_for(lambda f: f.get("event") == "room.left", "bob's room.left")
            await alice.wait_for(lambda f: f["type"] == "leave", "the leave notice of bob")
            # A refused frame, a resume history cannot fill, and a shutdown.
            await alice.send("{not json")
            await alice.wait_for(lambda f: f["type"] == "error", "an error frame")
            first = await streaming.broadcast(room, "one")
            for text in ("two", "three"):
                await streaming.broadcast(room, text)
            await alice.wait_for(lambda f: f.get("data") == "three", "the broadcasts")
            assert first is not None
            await carol.send({"type": "join", "room_id": room, "since": first})
            await carol.wait_for(lambda f: f.get("event") == "resync", "resync")
            await streaming.drain(timeout=5)
            await alice.wait_for(lambda f: f.get("event") == "server.shutdown", "server.shutdown")
        finally:
            for client in (alice, bob, carol):
                await client.close()

    received: dict[str, dict[str, Any]] = {}
    for frame in alice.frames + bob.frames + carol.frames:
        received.setdefault(frame_name(frame), frame)
    documented = {frame_name(shape(row[2])): shape(row[2]) for row in SERVER_ROWS}
    assert sorted(received) == sorted(documented), "frames the server sent vs the page's server frames"
    for name, doc in documented.items():
        real = received[name]
        assert sorted(real) == sorted(doc), f"{name}: the server sends keys {sorted(real)}, the page {sorted(doc)}"
        for key, value in doc.items():
            if isinstance(value, dict):
                assert sorted(real[key]) == sorted(value), f"{name}.{key}: {sorted(real[key])} vs {sorted(value)}"
            elif value is not None:
                assert real[key] == value, f"{name}.{key}: {real[key]!r} vs the page's {value!r}"


async def test_the_pages_chat_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ported Forge chat handler at the top of the page, with a config file, on a real server."""
    websockets = pytest.importorskip("websockets")
    pytest.importorskip("forge_streaming_websocket")
    block = re.search(r"```python\n(.*?)```", FORGE.read_text(encoding="utf-8"), flags=re.S)
    assert block, "docs/forge.md has no python example"
    (tmp_path / "config.yaml").write_text("websocket:\n  enable_compression: true\nsse:\n  keep_alive_interval: 15s\n")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), "docs/forge.md example", "exec"), namespace)
    streaming = namespace["streaming"]
    assert streaming.config.section("websocket").enable_compression is True
    async with serve(streaming) as server:
        url = server.ws_url + "/chat?room=kitchen"
        async with websockets.connect(url) as alice, websockets.connect(url) as bob:
            async def frame(ws: Any, kind: str) -> dict[str, Any]:
                while True:
                    got: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    if got["type"] == kind:
                        return got

            await frame(alice, "join")  # bob's join notice: both are in the room
            await bob.send("soup is ready")
            message = await frame(alice, "message")
            assert (message["room_id"], message["data"]) == ("kitchen", "soup is ready")
