"""Installing a contrib package never changes what a user's own app serves (issue 17).

Every plugin of the workspace is loaded here, as in a venv where ``make run``
installed them all. A plain ``Streaming()`` must then serve no demo page at
``/``, no ``/demo/*``, no ``/metrics``, and must not name connections from
``?guest=``; the config sections ``demo.enabled`` and ``prometheus.enabled``
turn them on. Real uvicorn servers on loopback, real HTTP and WebSocket clients.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from forge_streaming import ConfigError, Streaming
from forge_streaming.testing import serve

pytestmark = pytest.mark.timeout(60)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "demo.yaml"
# WebTransport's UDP server is not what these tests are about.
NO_WT: dict[str, Any] = {"plugins": {"deny": ["webtransport"]}}


@pytest.fixture(autouse=True)
def _installed(request: pytest.FixtureRequest) -> None:
    for module in ("forge_streaming_websocket", "forge_streaming_demo", "forge_streaming_prometheus"):
        pytest.importorskip(module)


async def user_id_of(ws_url: str, query: str) -> str:
    """The user id the server gives a WebSocket client opened with ``query`` (from its room.joined frame)."""
    async with websockets.connect(f"{ws_url}/ws?{query}") as ws:
        await ws.send(json.dumps({"type": "join", "room_id": "lobby"}))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if frame.get("event") == "room.joined":
                return str(frame["data"]["user_id"])


async def test_a_plain_service_serves_no_demo_no_metrics_and_ignores_guest_names() -> None:
    streaming = Streaming(NO_WT)
    assert {"demo", "prometheus"} <= {info.name for info in streaming.plugins.info()}, "the plugins are loaded"
    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        home = await http.get("/")
        assert "demo-config" not in home.text, "the demo chat is served at / by a plain Streaming()"
        assert "<h1>forge-streaming" in home.text  # the kernel's status page
        for path in ("/demo/stats", "/demo/app.js", "/metrics"):
            assert (await http.get(path)).status_code == 404, f"{path} is served by a plain Streaming()"
        user = await user_id_of(server.ws_url, "guest=mallory")
        assert not user.startswith("guest:"), f"?guest= named an anonymous connection {user!r}"


async def test_the_config_sections_turn_them_on() -> None:
    streaming = Streaming({**NO_WT, "demo": {"enabled": True}, "prometheus": {"enabled": True}})
    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert "demo-config" in (await http.get("/")).text
        assert (await http.get("/demo/stats")).json()["connections"] == 0
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200 and "forge_streaming_backend_up" in metrics.text
        assert await user_id_of(server.ws_url, "guest=ada") == "guest:ada"


async def test_each_one_alone() -> None:
    only_metrics = Streaming({**NO_WT, "prometheus": {"enabled": True}})
    async with serve(only_metrics) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert (await http.get("/metrics")).status_code == 200
        assert (await http.get("/demo/stats")).status_code == 404
    only_demo = Streaming({**NO_WT, "demo": {"enabled": True}})
    async with serve(only_demo) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert (await http.get("/metrics")).status_code == 404
        assert "demo-config" in (await http.get("/")).text


async def test_the_environment_can_turn_the_demo_on() -> None:
    streaming = Streaming(NO_WT, environ={"FORGE_STREAMING__DEMO__ENABLED": "true"})
    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert "demo-config" in (await http.get("/")).text


def test_the_checked_in_demo_config_enables_the_demo() -> None:
    """``make run`` serves with contrib/demo/demo.yaml; it turns the demo on and only that."""
    from forge_streaming_demo import DemoSettings
    from forge_streaming_prometheus.plugin import PrometheusSettings

    streaming = Streaming(str(DEMO_CONFIG))
    assert streaming.config.section("demo", DemoSettings).enabled
    assert not streaming.config.section("prometheus", PrometheusSettings).enabled
    result = subprocess.run([str(Path(sys.executable).parent / "forge-streaming"), "check-config", str(DEMO_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["demo"]["enabled"] is True


@pytest.mark.parametrize(("section", "values", "key"), [
    ("demo", {"enable": True}, "demo.enable"),
    ("demo", {"enabled": "maybe"}, "demo.enabled"),
    ("prometheus", {"enabeld": True}, "prometheus.enabeld"),
    ("prometheus", {"enabled": True, "token": ""}, "prometheus.token"),
])
def test_the_switches_are_validated_keys(section: str, values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Streaming({**NO_WT, section: values})


def test_make_run_serves_the_demo(tmp_path: Path) -> None:
    """README's ``make run`` still serves the demo: the command it runs, run as a real process."""
    import shlex
    import signal

    from forge_streaming.testing import ServerProcess

    root = DEMO_CONFIG.parents[2]
    dry = subprocess.run(["make", "-s", "-n", "run", f"VENV={Path(sys.executable).parent.parent}"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    line = next(line for line in dry.stdout.splitlines() if "forge-streaming serve" in line)
    args = shlex.split(line)[2:]
    assert args[:2] == ["--config", "contrib/demo/demo.yaml"], line
    server = ServerProcess(tmp_path, "--config", str(root / args[1]))
    try:
        home = httpx.get(server.url + "/", timeout=10)
        assert "demo-config" in home.text
    finally:
        server.stop(signal.SIGKILL)


def test_make_run_says_what_it_installs(tmp_path: Path) -> None:
    """``make run`` from a fresh clone is not silent for minutes: a line per step, pip's own progress shown."""
    root = DEMO_CONFIG.parents[2]
    dry = subprocess.run(["make", "-n", "run", f"VENV={tmp_path / 'fresh-venv'}"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    steps = [line for line in lines if line.startswith("echo \"==>")]
    assert len(steps) >= 4, lines  # venv, pip, install, serve
    big = next(line for line in lines if "pip install" in line and " -e kernel" in line)
    assert " -q" not in big, f"the long install hides its progress: {big}"
