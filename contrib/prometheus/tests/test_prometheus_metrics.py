"""/metrics scraped with a real HTTP client while real WebSocket and SSE clients chat.

Counters are compared before and after, and must move by exactly what the
clients sent and received.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from forge_streaming import Streaming
from forge_streaming.testing import open_connection, serve

pytestmark = pytest.mark.timeout(60)

ENABLED: dict[str, Any] = {"plugins": {"deny": ["webtransport"]}, "prometheus": {"enabled": True}}
CONFIG: dict[str, Any] = {**ENABLED, "api": {"key": "k"}}


@pytest.fixture(autouse=True)
def _only_these_plugins(streaming_plugins_only: Callable[..., None]) -> None:
    """The transports and the plugin under test only, whatever else is installed (no WebTransport)."""
    streaming_plugins_only("websocket", "sse", "memory-pubsub", "memory-rooms", "prometheus")


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    """Poll an async predicate until it holds (bounded)."""
    async def loop() -> None:
        while not await predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(loop(), timeout)


class WsClient:
    """A room-protocol WebSocket client that keeps every frame it receives."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            self.frames.append(json.loads(raw))

    def messages(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "message"]

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))


class SseClient:
    """A room-endpoint SSE client: reads the stream, POSTs frames with its session token."""

    def __init__(self, http: httpx.AsyncClient, url: str, rooms: str) -> None:
        self.http = http
        self.url = url
        self.rooms = rooms
        self.frames: list[dict[str, Any]] = []
        self.session: dict[str, Any] = {}
        self.ready = asyncio.Event()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        from httpx_sse import aconnect_sse

        async with aconnect_sse(self.http, "GET", f"{self.url}/sse?rooms={self.rooms}") as source:
            async for event in source.aiter_sse():
                if event.event == "session":
                    self.session = json.loads(event.data)
                    self.ready.set()
                    continue
                try:
                    self.frames.append(json.loads(event.data))
                except ValueError:
                    continue

    def messages(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "message"]

    async def send(self, frame: dict[str, Any]) -> None:
        await asyncio.wait_for(self.ready.wait(), 10)
        send_url = self.session["send_url"]
        response = await self.http.post(self.url + send_url if send_url.startswith("/") else send_url,
                                        content=json.dumps(frame),
                                        headers={"X-Stream-Token": self.session["token"]})
        assert response.status_code == 202, response.text

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


async def test_counters_move_by_exactly_what_websocket_and_sse_clients_sent(scraper: Any) -> None:
    pytest.importorskip("forge_streaming_websocket")
    pytest.importorskip("forge_streaming_sse")
    websockets = pytest.importorskip("websockets")
    streaming = Streaming(CONFIG)
    if not {"websocket", "sse"} <= set(streaming.transports):
        pytest.skip("the websocket and sse transports are not both installed")
    v: Callable[..., float] = scraper.value

    async with serve(streaming) as server, httpx.AsyncClient(timeout=10) as http:
        before = await scraper(server.url)
        assert v(before, "forge_streaming_backend_up", backend="memory") == 1
        assert v(before, "forge_streaming_backend_state", backend="memory", state="up") == 1

        ws1 = WsClient(await websockets.connect(server.ws_url + "/ws"))
        ws2 = WsClient(await websockets.connect(server.ws_url + "/ws"))
        sse = SseClient(http, server.url, "chat")
        try:
            for client in (ws1, ws2):
                await client.send({"type": "join", "room_id": "chat"})

            async def everyone_joined() -> bool:
                now = await scraper(server.url)
                return (v(now, "forge_streaming_room_members", transport="websocket") == 2
                        and v(now, "forge_streaming_room_members", transport="sse") == 1)

            await wait_until(everyone_joined)
            joined = await scraper(server.url)
            assert v(joined, "forge_streaming_connections", transport="websocket") == 2
            assert v(joined, "forge_streaming_connections", transport="sse") == 1
            assert v(joined, "forge_streaming_rooms") == 1 and v(joined, "forge_streaming_local_rooms") == 1

            for n in range(3):
                await ws1.send({"type": "message", "room_id": "chat", "data": f"ws1-{n}"})
            for n in range(2):
                await ws2.send({"type": "message", "room_id": "chat", "data": f"ws2-{n}"})
            for n in range(4):
                await sse.send({"type": "message", "room_id": "chat", "data": f"sse-{n}"})
            await ws1.send("{not json")  # an error: rejected with invalid_json
            await sse.send({"type": "message", "room_id": "elsewhere", "data": "x"})  # not_member

            async def everyone_received() -> bool:
                return len(ws1.messages()) == 6 and len(ws2.messages()) == 7 and len(sse.messages()) == 5

            await wait_until(everyone_received)
            after = await scraper(server.url)
        finally:
            for client in (ws1, ws2):
                await client.ws.close()
                client.reader.cancel()
            await sse.close()

        def moved(name: str, **labels: str) -> float:
            return v(after, name, **labels) - v(before, name, **labels)

        assert moved("forge_streaming_messages_in_total", transport="websocket", type="message") == 5
        assert moved("forge_streaming_messages_in_total", transport="sse", type="message") == 5  # 4 + not_member
        assert moved("forge_streaming_messages_in_total", transport="websocket", type="join") == 2
        assert moved("forge_streaming_messages_out_total", transport="websocket") == 6 + 7
        assert moved("forge_streaming_messages_out_total", transport="sse") == 5
        assert moved("forge_streaming_envelopes_delivered_total", kind="message") == 9
        # 18 messages, plus the join notices: to 0, 1 and 2 members whatever the order.
        assert moved("forge_streaming_deliveries_total") == 18 + 3
        assert moved("forge_streaming_frames_rejected_total", code="invalid_json") == 1
        assert moved("forge_streaming_frames_rejected_total", code="not_member") == 1
        assert moved("forge_streaming_connections_opened_total", transport="websocket") == 2
        assert moved("forge_streaming_connections_opened_total", transport="sse") == 1
        # 9 room messages and 3 join notices went through the backend, each timed.
        assert moved("forge_streaming_backend_publish_seconds_count", backend="memory") == 12

        async def everyone_gone() -> bool:
            now = await scraper(server.url)
            return (v(now, "forge_streaming_connections", transport="websocket") == 0
                    and v(now, "forge_streaming_connections", transport="sse") == 0)

        await wait_until(everyone_gone)
        gone = await scraper(server.url)
        assert v(gone, "forge_streaming_room_members", transport="websocket") == 0
        assert v(gone, "forge_streaming_rooms") == 0
        closed = sum(value for (name, labels), value in gone.items()
                     if name == "forge_streaming_connections_closed_total")
        assert closed == 3


async def test_drops_by_reason_and_rate_limited_frames(scraper: Any) -> None:
    """Drops come from ``Connection.drop`` (what transports call); rate limiting from real frames."""
    streaming = Streaming({**ENABLED, "limits": {"messages_per_second": 0.001, "message_burst": 1}})
    v: Callable[..., float] = scraper.value
    async with serve(streaming) as server:
        conn = await open_connection(streaming)
        await streaming.room_protocol_frame(conn, json.dumps({"type": "join", "room_id": "r"}))  # the burst
        await streaming.room_protocol_frame(conn, json.dumps({"type": "message", "room_id": "r", "data": 1}))
        for reason in ("slow consumer", "slow consumer", "rate limited", "too large"):
            (await open_connection(streaming)).drop(reason)
        samples = await scraper(server.url)
        assert v(samples, "forge_streaming_frames_rejected_total", code="rate_limited") == 1
        assert v(samples, "forge_streaming_connections_dropped_total", reason="slow consumer") == 2
        assert v(samples, "forge_streaming_connections_dropped_total", reason="rate limited") == 1
        assert v(samples, "forge_streaming_connections_dropped_total", reason="too large") == 1


async def test_each_service_has_its_own_registry(scraper: Any) -> None:
    """Two services in one process never count into each other's series."""
    a, b = Streaming(ENABLED), Streaming(ENABLED)
    v: Callable[..., float] = scraper.value
    async with serve(a) as server_a, serve(b) as server_b:
        for _ in range(3):
            await a.broadcast("room", "only on a")
        conn = await open_connection(a)
        await conn.join_room("room")
        await a.broadcast("room", "to the member")
        samples_a, samples_b = await scraper(server_a.url), await scraper(server_b.url)
        assert v(samples_a, "forge_streaming_backend_publish_seconds_count", backend="memory") == 5  # 4 + join notice
        assert v(samples_a, "forge_streaming_deliveries_total") == 1
        assert v(samples_b, "forge_streaming_backend_publish_seconds_count", backend="memory") == 0
        assert v(samples_b, "forge_streaming_deliveries_total") == 0
        assert v(samples_a, "forge_streaming_info", node=a.node_id, version="0.1.0") == 1


async def test_path_and_api_key_come_from_the_prometheus_config_section() -> None:
    streaming = Streaming({**ENABLED, "api": {"key": "secret"},
                          "prometheus": {"enabled": True, "path": "/internal/metrics", "require_api_key": True}})
    async with serve(streaming) as server, httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(server.url + "/metrics")).status_code == 404
        assert (await http.get(server.url + "/internal/metrics")).status_code == 401
        wrong = await http.get(server.url + "/internal/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = await http.get(server.url + "/internal/metrics", headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200 and "forge_streaming_backend_up" in ok.text


async def test_a_token_protects_the_endpoint() -> None:
    streaming = Streaming({**ENABLED, "api": {"key": "api-key"},
                           "prometheus": {"enabled": True, "token": "scrape-token"}})
    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        refused = await http.get("/metrics")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        for wrong in ("Bearer nope", "Bearer api-key", "Basic scrape-token", "scrape-token"):
            assert (await http.get("/metrics", headers={"Authorization": wrong})).status_code == 401, wrong
        ok = await http.get("/metrics", headers={"Authorization": "Bearer scrape-token"})
        assert ok.status_code == 200 and "forge_streaming_backend_up" in ok.text


async def test_token_and_api_key_together_accept_either() -> None:
    streaming = Streaming({**ENABLED, "api": {"key": "api-key"},
                           "prometheus": {"enabled": True, "token": "scrape-token", "require_api_key": True}})
    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert (await http.get("/metrics")).status_code == 401
        for good in ("scrape-token", "api-key"):
            assert (await http.get("/metrics", headers={"Authorization": f"Bearer {good}"})).status_code == 200


async def test_disabled_it_serves_nothing_and_counts_nothing() -> None:
    """Installed but not enabled: no route, and the hooks leave the service's registry untouched."""
    from forge_streaming_prometheus import metrics_for

    streaming = Streaming({"plugins": {"deny": ["webtransport"]}})
    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        assert (await http.get("/metrics")).status_code == 404
        conn = await open_connection(streaming)
        await conn.join_room("r")
        await streaming.broadcast("r", "hi")
        await conn.close()
        registry = metrics_for(streaming).registry
        assert registry.get_sample_value("forge_streaming_connections_opened_total", {"transport": "fake"}) is None
        assert registry.get_sample_value("forge_streaming_deliveries_total") == 0
