"""The forge-streaming command: plugins, check-config, serve, publish, stats, drain."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
from forge_streaming.testing import ServerProcess, free_port

BIN = Path(sys.executable).parent / "forge-streaming"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=60, env=env)


def test_plugins_lists_installed_plugins_as_json() -> None:
    result = run("plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["memory-pubsub"]["distribution"] == "forge-streaming-memory"
    assert plugins["memory-pubsub"]["hooks"] == ["streaming_register_pubsub_backends"]
    text = run("plugins").stdout
    assert "memory-rooms  (forge-streaming-memory 0.1.0)" in text


def test_check_config_prints_effective_config_and_refuses_bad_values(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("server:\n  port: 9001\nlimits:\n  idle_timeout: 2m\n")
    result = run("check-config", str(good))
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["server"]["port"] == 9001 and effective["limits"]["idle_timeout"] == 120
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits:\n  max_message_size: lots\n")
    result = run("check-config", str(bad))
    assert result.returncode == 2
    assert "limits.max_message_size" in result.stderr and "'lots'" in result.stderr


def test_serve_healthz_publish_stats_and_clean_exit(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(config="api:\n  key: test-key\n")
    health = httpx.get(server.url + "/healthz").json()
    assert health["status"] == "ok" and health["backend"]["name"] == "memory"
    assert httpx.post(server.url + "/api/publish", json={"room_id": "r", "data": 1}).status_code == 401
    ok = httpx.post(server.url + "/api/publish", json={"room_id": "r", "data": 1},
                    headers={"Authorization": "Bearer test-key"})
    assert ok.status_code == 200 and ok.json()["published"] is True
    published = run("publish", "r", '{"text": "from the shell"}', "--url", server.url, "--api-key", "test-key")
    assert published.returncode == 0, published.stderr
    assert json.loads(published.stdout)["room_id"] == "r"
    refused = run("publish", "r", "x", "--url", server.url, "--api-key", "wrong")
    assert refused.returncode == 2 and "401" in refused.stderr
    stats = run("stats", "--url", server.url, "--api-key", "test-key")
    assert stats.returncode == 0 and "published" in stats.stdout
    assert "forge-streaming" in httpx.get(server.url + "/").text
    assert server.stop(signal.SIGINT) == 0
    assert "stopped" in server.output()


def test_serve_refuses_a_bad_config_with_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  drain_timeout: forever\n")
    result = run("serve", "--config", str(bad), "--port", "1")
    assert result.returncode == 2
    assert "server.drain_timeout" in result.stderr


def test_serve_a_users_module(tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    (tmp_path / "myapp.py").write_text(
        "from forge_streaming import Streaming\nstreaming = Streaming({'api': {'key': 'k'}})\n")
    server = server_factory("myapp:streaming")
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/api/stats", headers={"Authorization": "Bearer k"}).status_code == 200


# -- issue 17: --config with a target, every config error at once, Forge's file --------------


def test_serve_a_target_honours_config(tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    (tmp_path / "cfgapp.py").write_text("from forge_streaming import Streaming\nstreaming = Streaming()\n")
    server = server_factory("cfgapp:streaming", config="api:\n  key: from-the-file\n")
    stats = httpx.get(server.url + "/api/stats", headers={"Authorization": "Bearer from-the-file"})
    assert stats.status_code == 200, server.output()


def test_serve_refuses_a_config_file_its_target_does_not_read(tmp_path: Path) -> None:
    (tmp_path / "ownapp.py").write_text(
        "from forge_streaming import Streaming\nstreaming = Streaming({'api': {'key': 'k'}})\n")
    config = tmp_path / "file.yaml"
    config.write_text("api:\n  key: other\nlimits:\n  max_connections: 7\n")
    result = subprocess.run([str(BIN), "serve", "ownapp:streaming", "--config", str(config),
                             "--port", str(free_port())], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "api.key" in result.stderr and "limits.max_connections" in result.stderr
    assert "Streaming()" in result.stderr


def test_check_config_lists_every_error_with_suggestions(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  prot: 80\nlimits:\n  idle_timeout: soon\nwebsocket:\n  ping_intervall: 3\n"
                   "serverr: {}\n")
    result = run("check-config", str(bad))
    assert result.returncode == 2
    for needle in ["server.prot", "did you mean 'port'", "limits.idle_timeout", "'soon'",
                   "websocket.ping_intervall", "did you mean 'ping_interval'", "serverr", "did you mean 'server'"]:
        assert needle in result.stderr, f"{needle!r} missing from:\n{result.stderr}"


def test_check_config_reads_forge_s_shape(tmp_path: Path) -> None:
    forge = tmp_path / "forge.yaml"
    forge.write_text("extensions:\n  streaming:\n    backend: local\n    enable_rooms: true\n"
                     "    max_message_size: 32768\n    ping_interval: 30s\n    sse:\n      keep_alive_interval: 15s\n")
    result = run("check-config", str(forge))
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["limits"]["max_message_size"] == 32768 and effective["pubsub"]["backend"] == "memory"
    assert effective["websocket"]["ping_interval"] == 30 and effective["sse"]["keep_alive_interval"] == 15
    forge.write_text("extensions:\n  streaming:\n    backend: redis\n    message_retention: 720h\n")
    result = run("check-config", str(forge))
    assert result.returncode == 2
    assert "extensions.streaming.backend" in result.stderr and "pubsub: {backend: mqtt" in result.stderr
    assert "extensions.streaming.message_retention" in result.stderr and "rooms.history_size" in result.stderr


# -- issue 19: the collector's policy of a server process --------------------------------


GC_APP = '''import gc
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from forge_streaming import Streaming

streaming = Streaming()


async def collector(request):
    return JSONResponse({"thresholds": list(gc.get_threshold()), "frozen": gc.get_freeze_count()})


app = Starlette(routes=[Route("/gc", collector), Mount("/rt", app=streaming.asgi_app())],
                lifespan=streaming.lifespan)
'''


def test_serve_sets_the_collectors_thresholds_and_freezes_what_it_loaded(
        tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    """Python's thresholds (700, 10, 10) made a full collection every few seconds at 1,000 WebTransport
    sessions, 0.15-0.2 s each: the bench's figure swung between 7 and 12 us per delivery with where they fell."""
    (tmp_path / "gcapp.py").write_text(GC_APP)
    default = server_factory("gcapp:app").url
    chosen = server_factory("gcapp:app", config="server:\n  gc_thresholds: [1000, 5, 2]\n").url
    first = httpx.get(default + "/gc").json()
    assert first["thresholds"] == [10_000, 10, 10] and first["frozen"] > 10_000, first
    assert httpx.get(chosen + "/gc").json()["thresholds"] == [1000, 5, 2]


def test_the_test_kits_server_process_is_one_process_unless_told(
        server_factory: Callable[..., ServerProcess]) -> None:
    """``ServerProcess`` is a node whose PID tests signal: ``--workers 1`` whatever serve's default would be."""
    def argv(server: ServerProcess) -> list[str]:
        return Path(f"/proc/{server.pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")

    assert argv(server_factory())[-2:] == ["--workers", "1"]
    assert "--workers" not in argv(server_factory("--workers=1"))
