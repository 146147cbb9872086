"""The rest of the observability story, end to end on a real `forge-streaming serve` process.

``GET /api/stats`` and ``forge-streaming stats --url`` (for people without
Prometheus) agree with ``/metrics``; ``--log-format json --log-level debug``
gives one JSON object per line, and lines about a connection carry its id.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.timeout(90)

BIN = Path(sys.executable).parent
CONFIG = "api:\n  key: stats-key\nplugins:\n  deny: [webtransport]\nprometheus:\n  enabled: true\n"


@pytest.fixture(autouse=True)
def _only_these_plugins(streaming_plugins_only: Callable[..., None]) -> None:
    """The servers these tests start load these only (the allow list reaches them through the environment)."""
    streaming_plugins_only("websocket", "sse", "memory-pubsub", "memory-rooms", "prometheus")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "forge-streaming"), *args], capture_output=True, text=True, timeout=30)


async def test_stats_api_cli_metrics_and_json_logs_with_connection_ids(cli_server: Any, scraper: Any) -> None:
    websockets = pytest.importorskip("websockets")
    pytest.importorskip("forge_streaming_websocket")
    pytest.importorskip("forge_streaming_sse")
    from httpx_sse import aconnect_sse

    server = cli_server("--log-format", "json", "--log-level", "debug", config=CONFIG)
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(server.url + "/api/stats")).status_code == 401
        async with websockets.connect(server.ws_url + "/ws") as ws, \
                aconnect_sse(http, "GET", server.url + "/sse?rooms=lobby") as source:
            events = source.aiter_sse()
            session = json.loads((await asyncio.wait_for(anext(events), 10)).data)
            sse_id = session["connection_id"]

            async def sse_got(needle: str) -> None:
                async for event in events:
                    if needle in event.data:
                        return

            # The stream joins ?rooms= after its session event: a message sent before room.joined may miss it.
            await asyncio.wait_for(sse_got('"room.joined"'), 10)
            await ws.send(json.dumps({"type": "join", "room_id": "lobby"}))
            await ws.send(json.dumps({"type": "message", "room_id": "lobby", "data": "hello"}))
            await asyncio.wait_for(sse_got('"hello"'), 10)

            stats = (await http.get(server.url + "/api/stats", headers={"Authorization": "Bearer stats-key"})).json()
            assert stats["connections"] == {"total": 2, "by_transport": {"sse": 1, "websocket": 1}}
            assert stats["rooms"]["total"] == 1
            assert stats["backend"]["name"] == "memory" and stats["backend"]["state"] == "up"
            assert stats["counters"]["messages_in.websocket"] == 1

            text = await asyncio.to_thread(cli, "stats", "--url", server.url, "--api-key", "stats-key")
            assert text.returncode == 0, text.stderr
            assert re.search(r"^connections\s+2 \(sse 1, websocket 1\)$", text.stdout, re.M), text.stdout
            assert re.search(r"^rooms\s+1$", text.stdout, re.M) and "memory: up" in text.stdout
            as_json = await asyncio.to_thread(cli, "stats", "--json", "--url", server.url, "--api-key", "stats-key")
            assert json.loads(as_json.stdout)["connections"]["total"] == 2
            refused = await asyncio.to_thread(cli, "stats", "--url", server.url, "--api-key", "wrong")
            assert refused.returncode == 2 and "401" in refused.stderr

            samples = await scraper(server.url)
            v = scraper.value
            assert v(samples, "forge_streaming_connections", transport="websocket") == 1
            assert v(samples, "forge_streaming_connections", transport="sse") == 1
            assert v(samples, "forge_streaming_messages_in_total", transport="websocket", type="message") == 1
            assert v(samples, "forge_streaming_messages_out_total", transport="sse") == 1
            assert v(samples, "forge_streaming_rooms") == 1
    assert server.stop() == 0

    lines = [line for line in server.output().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(entries) >= len(lines) - 2, "every log line but the banner is JSON:\n" + "\n".join(lines)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["level"] == "debug" for e in entries), "--log-level debug lets debug lines through"
    about_sse = [e for e in entries if sse_id in e["message"]]
    assert about_sse, "the SSE connection was logged"
    assert all(e.get("connection_id") == sse_id for e in about_sse), about_sse
    transport_lines = [e for e in entries if e["logger"] in ("forge_streaming.websocket", "forge_streaming.sse")]
    assert transport_lines and all(e.get("connection_id") for e in transport_lines), transport_lines
    assert {e["logger"] for e in transport_lines} == {"forge_streaming.websocket", "forge_streaming.sse"}
