"""The browser client and binary room messages, in headless Chromium (issue 17).

On each transport, the page's ``message`` handler gets a binary message's
``data`` as a ``Uint8Array`` (``binary: true``): a binary WebSocket or
WebTransport frame, a base64 frame on SSE. ``client.send(room, bytes)`` sends
a binary frame on WebSocket and WebTransport; the SSE transport refuses it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from typing import Any

import pytest
import websockets
from forge_streaming import Streaming
from forge_streaming.testing import serve

pytest.importorskip("playwright")
from playwright.async_api import async_playwright  # noqa: E402

CHROMIUM = os.environ.get("FORGE_STREAMING_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ROOM = "bin"

OPEN = """async (transport) => {
  const { ForgeStreamingClient } = await import("/forge-streaming.js");
  const client = new ForgeStreamingClient({ transport });
  window.got = [];
  client.addEventListener("message", (e) => {
    const d = e.detail;
    window.got.push({ binary: d.binary, u8: d.data instanceof Uint8Array,
                      data: d.data instanceof Uint8Array ? Array.from(d.data) : d.data });
  });
  const joined = new Promise((resolve) => client.addEventListener("joined", resolve, { once: true }));
  client.connect();
  client.join("bin");
  await joined;
  window.client = client;
  return client.transport;
}"""

SEND = """async () => {
  try {
    await window.client.send("bin", new Uint8Array([0, 10, 255, 7]));
    return "sent";
  } catch (err) {
    return err.code || String(err);
  }
}"""


@pytest.fixture(autouse=True)
def three_transports(streaming_plugins_only: Any) -> None:
    streaming_plugins_only("websocket", "sse", "webtransport", "memory-pubsub", "memory-rooms", "http-api")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no Chromium")
@pytest.mark.parametrize("transport", ["websocket", "webtransport", "sse"])
@pytest.mark.timeout(60)
async def test_page_gets_and_sends_binary_messages(transport: str) -> None:
    async with serve(Streaming()) as server, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(server.url + "/healthz")  # same origin, and no CSP (the status page has one)
            assert await page.evaluate(OPEN, transport) == transport
            async with websockets.connect(f"{server.ws_url}/ws", open_timeout=5) as peer:
                await peer.send(json.dumps({"type": "join", "room_id": ROOM}))
                while json.loads(await asyncio.wait_for(peer.recv(), 5)).get("event") != "room.joined":
                    pass
                await server.streaming.broadcast(ROOM, b"\x00\n\xffbytes")
                await server.streaming.broadcast(ROOM, {"text": "hi"})
                await page.wait_for_function("window.got.length >= 2", timeout=5000)
                got = await page.evaluate("window.got")
                assert got[0] == {"binary": True, "u8": True, "data": list(b"\x00\n\xffbytes")}
                assert got[1] == {"binary": False, "u8": False, "data": {"text": "hi"}}
                answer = await page.evaluate(SEND)
                if transport == "sse":
                    assert answer == "binary_not_supported"
                    return
                assert answer == "sent"
                while True:  # the peer got the broadcasts too: the page's message is the one not from "server"
                    raw = await asyncio.wait_for(peer.recv(), 5)
                    if isinstance(raw, bytes) and json.loads(raw.partition(b"\n")[0])["user_id"] != "server":
                        break
                header, _, payload = raw.partition(b"\n")
                assert payload == bytes([0, 10, 255, 7]) and json.loads(header)["binary"] is True
        finally:
            await browser.close()
