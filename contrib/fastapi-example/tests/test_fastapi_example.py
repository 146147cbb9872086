"""The FastAPI example end to end: a real uvicorn server, real WebSocket, SSE and HTTP clients.

Claims: the mounted service runs (the parent's lifespan starts and stops it),
the app's dependency and the authenticate hook accept and refuse the same
tokens, and a message POSTed to a normal route reaches room members on
every transport, with the user id the app's dependency found.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from forge_streaming import ServiceState, get_streaming
from forge_streaming.testing import free_port, serve
from forge_streaming_fastapi_example import create_app, user_for_token

pytestmark = pytest.mark.timeout(60)

CONFIG: dict[str, Any] = {"plugins": {"deny": ["webtransport"]}}
ALICE = {"Authorization": "Bearer alice-token"}
BOB = {"Authorization": "Bearer bob-token"}


@pytest.fixture(autouse=True)
def _only_these_plugins(streaming_plugins_only: Callable[..., None]) -> None:
    """The example's transports and backend only, whatever else is installed (the served module too)."""
    streaming_plugins_only("websocket", "sse", "memory-pubsub", "memory-rooms")


def test_one_token_check_for_both_sides() -> None:
    assert user_for_token("alice-token") == "alice"
    assert user_for_token("alice-token ") is None and user_for_token("") is None and user_for_token(None) is None


async def test_app_routes_use_the_apps_dependency() -> None:
    app = create_app(CONFIG)
    streaming = get_streaming(app)
    async with serve(app) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert server.streaming is streaming
        assert streaming.state is ServiceState.RUNNING, "the parent's lifespan started the mounted service"
        assert (await http.get("/api/me")).status_code == 401
        assert (await http.get("/api/me", headers={"Authorization": "Bearer nope"})).status_code == 401
        assert (await http.get("/api/me", headers=ALICE)).json() == {"user_id": "alice"}
        assert (await http.get("/api/me", params={"token": "bob-token"})).json() == {"user_id": "bob"}
        refused = await http.post("/api/rooms/lobby/messages", json={"data": "x"})
        assert refused.status_code == 401
        health = await http.get("/rt/healthz")
        assert health.status_code == 200 and health.json()["state"] == "running"
    assert get_streaming(app).state is ServiceState.STOPPED, "and stopped it"


async def test_websocket_auth_shares_the_rule_and_a_post_reaches_the_room() -> None:
    websockets = pytest.importorskip("websockets")
    pytest.importorskip("forge_streaming_websocket")
    app = create_app(CONFIG)
    async with serve(app) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        for url in (server.ws_url + "/rt/ws", server.ws_url + "/rt/ws?token=nope"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(url):
                    pass
            assert refused.value.response.status_code in (401, 403)

        async with websockets.connect(server.ws_url + "/rt/ws?token=alice-token") as alice, \
                websockets.connect(server.ws_url + "/rt/ws", additional_headers=BOB) as bob:
            for ws in (alice, bob):
                await ws.send(json.dumps({"type": "join", "room_id": "lobby"}))
                await next_frame(ws, lambda f: f.get("event") == "room.joined")
            users = (await http.get("/api/rooms/lobby/users", headers=ALICE)).json()["users"]
            assert sorted(users) == ["alice", "bob"], "presence shows the ids the authenticate hook gave"

            posted = await http.post("/api/rooms/lobby/messages", json={"data": {"text": "hi from a route"}},
                                     headers=BOB)
            assert posted.status_code == 200, posted.text
            assert posted.json()["user_id"] == "bob"
            for ws in (alice, bob):
                frame = await next_frame(ws, lambda f: f.get("type") == "message")
                assert frame["room_id"] == "lobby" and frame["user_id"] == "bob"
                assert frame["data"] == {"text": "hi from a route"}
                assert frame["sequence"] == posted.json()["sequence"]


async def test_sse_auth_shares_the_rule_and_a_post_reaches_the_room() -> None:
    pytest.importorskip("forge_streaming_sse")
    from httpx_sse import aconnect_sse

    app = create_app(CONFIG)
    async with serve(app) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert (await http.get("/rt/sse?rooms=lobby")).status_code in (401, 403)
        assert (await http.get("/rt/sse?rooms=lobby&token=nope")).status_code in (401, 403)
        async with aconnect_sse(http, "GET", "/rt/sse?rooms=lobby&token=alice-token") as source:
            events = source.aiter_sse()

            async def next_event(predicate: Any) -> dict[str, Any]:
                async for event in events:
                    try:
                        data = json.loads(event.data)
                    except ValueError:
                        continue
                    if predicate(event.event, data):
                        return data  # type: ignore[no-any-return]
                raise AssertionError("stream ended")

            session = await asyncio.wait_for(next_event(lambda name, _: name == "session"), 10)
            assert session["send_url"].startswith("/rt/"), "the send URL honours the mount point"
            await asyncio.wait_for(next_event(lambda _, d: d.get("event") == "room.joined"), 10)
            posted = await http.post("/api/rooms/lobby/messages", json={"data": "to sse"}, headers=BOB)
            assert posted.status_code == 200
            frame = await asyncio.wait_for(next_event(lambda _, d: d.get("type") == "message"), 10)
            assert (frame["user_id"], frame["data"]) == ("bob", "to sse")


async def next_frame(ws: Any, predicate: Any, timeout: float = 10) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        while True:
            frame = json.loads(await ws.recv())
            if predicate(frame):
                return frame  # type: ignore[no-any-return]

    return await asyncio.wait_for(read(), timeout)


def test_forge_streaming_serve_runs_the_example_module(tmp_path: Path) -> None:
    """``forge-streaming serve forge_streaming_fastapi_example.main:app`` finds the mounted service."""
    port = free_port()
    log = tmp_path / "serve.log"
    command = [str(Path(sys.executable).parent / "forge-streaming"), "serve",
               "forge_streaming_fastapi_example.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env={**os.environ, "FORGE_STREAMING_PLUGINS_DENY": "webtransport"})
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/rt/healthz", timeout=1) as response:
                    assert json.loads(response.read())["status"] == "ok"
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/me", headers=ALICE)
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.loads(response.read()) == {"user_id": "alice"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


async def test_installed_contrib_plugins_add_nothing_to_the_app(streaming_plugins_only: Callable[..., None]) -> None:
    """With the demo and Prometheus installed in the same venv, the app serves neither (they are opt-in)."""
    pytest.importorskip("forge_streaming_demo")
    pytest.importorskip("forge_streaming_prometheus")
    streaming_plugins_only("websocket", "sse", "memory-pubsub", "memory-rooms", "demo", "prometheus")
    app = create_app(CONFIG)
    assert {"demo", "prometheus"} <= {info.name for info in get_streaming(app).plugins.info()}
    async with serve(app) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        for path in ("/rt/metrics", "/rt/demo/stats", "/rt/demo/app.js"):
            assert (await http.get(path)).status_code == 404, path
        assert "demo-config" not in (await http.get("/rt/")).text
