"""Headless Chromium as the independent client: WebTransport with serverCertificateHashes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import websockets
from forge_streaming import Streaming
from forge_streaming.testing import serve
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

README = Path(__file__).parent.parent / "README.md"
_JS_BLOCK = re.search(r"```js\n(.*?)```", README.read_text(), re.S)
assert _JS_BLOCK is not None, "no js block in README.md"
README_JS = _JS_BLOCK.group(1)

PAGE = """<!doctype html><meta charset=utf-8><title>wt</title><script>""" + README_JS + """
window.received = [];
window.status = "starting";
connectRooms(frame => window.received.push(frame)).then(({transport, send}) => {
  window.sendFrame = send;
  window.closeTransport = () => transport.close({closeCode: 4000, reason: "page done"});
  send({type: "join", room_id: "lobby"});
  window.status = "open";
}).catch(e => { window.status = "failed: " + e; console.error("webtransport failed: " + e); });
</script>"""


def page_app(streaming: Any, html: str) -> Starlette:
    """The service plus a test page at /page, so the page's origin is the server's own."""
    async def page(request: Any) -> HTMLResponse:
        return HTMLResponse(html)

    async def no_icon(request: Any) -> Response:
        return Response(status_code=204)

    routes = [Route("/page", page), Route("/favicon.ico", no_icon), Mount("/", streaming.asgi_app())]
    app = Starlette(routes=routes, lifespan=streaming.lifespan)
    app.state.streaming = streaming
    return app


async def ws_frame(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame.get("type") == kind:
            return frame


@contextlib.asynccontextmanager
async def chromium_page(url: str, problems: list[str]) -> AsyncIterator[Any]:
    """Headless Chromium on ``url``; console errors and page errors go to ``problems``."""
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        try:
            tab = await browser.new_page()
            tab.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: problems.append(str(e)))
            await tab.goto(url)
            yield tab
        finally:
            await browser.close()


@pytest.mark.browser
async def test_chromium_and_websocket_members_share_a_room(make_streaming: Callable[..., Streaming]) -> None:
    streaming = make_streaming()

    app = page_app(streaming, PAGE)
    problems: list[str] = []

    async with serve(app) as srv, chromium_page(f"{srv.url}/page", problems) as tab:
        await tab.wait_for_function("window.received.some(f => f.event === 'room.joined')", timeout=15_000)
        assert await tab.evaluate("window.status") == "open"
        (wt_conn,) = [c for c in streaming.connections.values() if c.transport == "webtransport"]

        async with websockets.connect(f"{srv.ws_url}/ws") as ws:
            await ws.send(json.dumps({"type": "join", "room_id": "lobby"}))
            await ws_frame(ws, "system")
            await tab.wait_for_function("window.received.some(f => f.type === 'join')", timeout=10_000)

            await tab.evaluate("window.sendFrame({type: 'message', room_id: 'lobby', data: 'from chromium'})")
            got = await ws_frame(ws, "message")
            assert got["data"] == "from chromium" and got["user_id"] == wt_conn.user_id

            await ws.send(json.dumps({"type": "message", "room_id": "lobby", "data": {"n": 1, "s": "ws ✓"}}))
            await tab.wait_for_function("window.received.some(f => f.type === 'message')", timeout=10_000)
            messages = await tab.evaluate("window.received.filter(f => f.type === 'message')")
            assert [m["data"] for m in messages] == [{"n": 1, "s": "ws ✓"}]

            await tab.evaluate("window.closeTransport()")
            left = await ws_frame(ws, "leave")
            assert left["user_id"] == wt_conn.user_id
        for _ in range(100):
            if not streaming.connections:
                break
            await asyncio.sleep(0.05)
        assert streaming.connections == {}
        assert wt_conn.close_code == 4000 and wt_conn.close_reason == "page done"
    assert problems == [], problems


ECHO_PAGE = """<!doctype html><meta charset=utf-8><title>echo</title><script>
async function readAll(readable) {
  const reader = readable.getReader(); const parts = [];
  for (;;) { const {value, done} = await reader.read(); if (done) break; parts.push(...value); }
  return new TextDecoder().decode(new Uint8Array(parts));
}
async function main() {
  const info = await (await fetch("/webtransport/certificate-hash")).json();
  const hash = Uint8Array.from(atob(info.sha256_base64), c => c.charCodeAt(0));
  const url = info.url.replace(/\\/wt$/, "/echo");
  const t = new WebTransport(url, {serverCertificateHashes: [{algorithm: "sha-256", value: hash}]});
  await t.ready;
  const result = {};
  const bidi = await t.createBidirectionalStream();
  const w = bidi.writable.getWriter();
  await w.write(new TextEncoder().encode("bidi hello")); await w.close();
  result.bidi = await readAll(bidi.readable);
  const uni = await t.createUnidirectionalStream();
  const uw = uni.getWriter();
  await uw.write(new TextEncoder().encode("uni hello")); await uw.close();
  const incoming = (await t.incomingUnidirectionalStreams.getReader().read()).value;
  result.uni = await readAll(incoming);
  const dw = t.datagrams.writable.getWriter(); const dr = t.datagrams.readable.getReader();
  for (let i = 0; i < 50 && !result.datagram; i++) {  // datagrams may be lost: resend until echoed
    await dw.write(new TextEncoder().encode("dgram"));
    const got = await Promise.race([dr.read(), new Promise(r => setTimeout(() => r(null), 100))]);
    if (got && got.value) result.datagram = new TextDecoder().decode(got.value);
  }
  result.closed = await t.closed;
  return result;
}
</script>"""


@pytest.mark.browser
async def test_chromium_streams_datagrams_and_server_close(make_streaming: Callable[..., Streaming]) -> None:
    streaming = make_streaming()

    @streaming.handle_webtransport("/echo")
    async def echo(session: Any) -> None:
        bidi = await session.accept_bidirectional_stream()
        bidi.write(await bidi.read_all(), end_stream=True)
        uni = await session.accept_unidirectional_stream()
        out = await session.open_unidirectional_stream()
        out.write((await uni.read_all()).upper(), end_stream=True)
        data = await session.receive_datagram()
        session.send_datagram(data[::-1])
        await session.close(4100, "echo done")

    app = page_app(streaming, ECHO_PAGE)
    problems: list[str] = []
    async with serve(app) as srv, chromium_page(f"{srv.url}/page", problems) as tab:
        result = await asyncio.wait_for(tab.evaluate("main()"), 20)
    assert result == {"bidi": "bidi hello", "uni": "UNI HELLO", "datagram": "margd",
                      "closed": {"closeCode": 4100, "reason": "echo done"}}
    assert problems == [], problems
