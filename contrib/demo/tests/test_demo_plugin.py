"""The demo plugin without a browser: its routes, the connection count and guest names.

The page itself is tested end to end in headless Chromium in
tests/test_browser_demo.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from forge_streaming import ConnectionRequest, Identity, Streaming, hookimpl
from forge_streaming.testing import open_connection

ALLOW = ["memory-pubsub", "memory-rooms", "demo"]


@pytest.fixture(autouse=True)
def _only_these_plugins(streaming_plugins_only: Callable[..., None]) -> None:
    """Only the demo and the memory backend, whatever else is installed (the stats count transports)."""
    streaming_plugins_only(*ALLOW)


def make(demo: dict[str, Any] | None = None, plugins: tuple[object, ...] = ()) -> Streaming:
    """A service with the demo enabled (``demo.enabled: true``) plus the ``demo`` keys given."""
    config: dict[str, Any] = {"plugins": {"allow": ALLOW}, "demo": {"enabled": True, **(demo or {})}}
    return Streaming(config, plugins=plugins)


def client(streaming: Streaming) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=streaming.asgi_app()), base_url="http://test")


async def test_page_script_and_client_are_served() -> None:
    streaming = make()
    async with streaming.running(), client(streaming) as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert '<script type="module" src="/demo/app.js">' in page.text
        config = json.loads(re.search(r'id="demo-config">(.*?)</script>', page.text).group(1))  # type: ignore[union-attr]
        assert config["defaultRoom"] == "lobby"
        assert config["transports"] == sorted(streaming.transports)
        script = await http.get("/demo/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert 'from "/forge-streaming.js"' in script.text
        library = await http.get("/forge-streaming.js")
        assert library.status_code == 200
        assert "export class ForgeStreamingClient" in library.text
        assert (await http.get("/demo/secrets.txt")).status_code == 404


async def test_stats_count_open_connections_by_transport() -> None:
    streaming = make()
    async with streaming.running(), client(streaming) as http:
        assert (await http.get("/demo/stats")).json() == {"connections": 0, "by_transport": {}}
        conn = await open_connection(streaming)
        assert (await http.get("/demo/stats")).json() == {"connections": 1, "by_transport": {"fake": 1}}
        await conn.close()
        assert (await http.get("/demo/stats")).json()["connections"] == 0


async def test_page_can_be_turned_off_for_the_kernel_status_page() -> None:
    streaming = make({"page": False})
    async with streaming.running(), client(streaming) as http:
        page = await http.get("/")
        assert "demo-config" not in page.text
        assert "<h1>forge-streaming" in page.text
        assert (await http.get("/demo/stats")).status_code == 200


async def identity_of(streaming: Streaming, query: str) -> Identity | None:
    """The identity the service gives a connection opened with ``query`` (through the authenticate hooks)."""
    conn = await open_connection(streaming, path="/ws", query=query)
    try:
        return conn.identity
    finally:
        await conn.close()


async def test_guest_names_only_anonymous_connections() -> None:
    streaming = make()
    async with streaming.running():
        identity = await identity_of(streaming, "guest=Ada%20L.")
        assert identity == Identity("guest:Ada L.", {"name": "Ada L.", "guest": True})
        assert await identity_of(streaming, "guest=%3Cscript%3E") == Identity(
            "guest:script", {"name": "script", "guest": True})
        assert await identity_of(streaming, "") is None
        assert await identity_of(streaming, "guest=%3C%3E") is None


async def test_a_real_identity_wins_over_the_guest_name() -> None:
    class Auth:
        @hookimpl
        def streaming_authenticate(self, request: ConnectionRequest) -> Identity | None:
            token = request.query.get("token")
            return Identity("user-42") if token == "ok" else None

    streaming = make(plugins=(Auth(),))
    async with streaming.running():
        assert await identity_of(streaming, "token=ok&guest=mallory") == Identity("user-42")
        assert (await identity_of(streaming, "guest=mallory")).user_id == "guest:mallory"  # type: ignore[union-attr]


async def test_guest_names_can_be_turned_off() -> None:
    streaming = make({"guest_names": False})
    async with streaming.running():
        assert await identity_of(streaming, "guest=ada") is None


async def test_installed_but_not_enabled_it_does_nothing() -> None:
    """Without ``demo.enabled`` the plugin is loaded, and adds no route and names no guest."""
    streaming = Streaming({"plugins": {"allow": ALLOW}})
    assert "demo" in {info.name for info in streaming.plugins.info()}
    async with streaming.running(), client(streaming) as http:
        assert "demo-config" not in (await http.get("/")).text
        assert (await http.get("/demo/stats")).status_code == 404
        assert (await http.get("/demo/app.js")).status_code == 404
        assert await identity_of(streaming, "guest=ada") is None
