"""One Origin rule for WebSocket, SSE and WebTransport (issue 16, item 8).

SSE used to ignore ``Origin``: a page of ``evil.example`` got 200 and
joined rooms, where WebSocket and WebTransport answered 403. The rule now
lives in the kernel (:func:`forge_streaming.origin_allowed`) and every
transport asks it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import websockets
from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent
from forge_streaming import Streaming, origin_allowed
from forge_streaming.testing import serve

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("origin", "host", "allowed", "ok"), [
    (None, "a.example:8080", [], True),
    ("http://a.example:8080", "a.example:8080", [], True),
    ("http://A.Example:8080", "a.example:8080", [], True),
    ("http://a.example", "a.example:80", [], True),
    ("https://a.example", "a.example:443", [], True),
    ("http://[::1]:9000", "[::1]:9000", [], True),
    ("http://[::1]:9001", "[::1]:9000", [], False),
    ("http://evil.example", "a.example:8080", [], False),
    ("null", "a.example", [], False),
    ("null", "a.example", ["null"], True),
    ("https://app.example.com", "x", ["https://*.example.com"], True),
    ("https://example.com", "x", ["https://*.example.com"], False),
    ("http://127.0.0.1:5173", "x", ["http://127.0.0.1:*"], True),
    ("http://127.0.0.1:5173", "127.0.0.1:5173", ["https://*.example.com"], True),  # own pages, list or not
])
def test_the_rule(origin: str | None, host: str, allowed: list[str], ok: bool) -> None:
    assert origin_allowed(origin, {"host": host}, allowed, scheme="http") is ok


def test_other_addresses_of_the_server_count_as_its_own() -> None:
    assert origin_allowed("http://127.0.0.1:8080", {"host": "127.0.0.1:4433"}, also=["127.0.0.1:8080"])
    assert not origin_allowed("http://127.0.0.1:8081", {"host": "127.0.0.1:4433"}, also=["127.0.0.1:8080"])


@pytest.fixture(autouse=True)
def transports(streaming_plugins_only: Callable[..., None]) -> None:
    streaming_plugins_only("websocket", "sse", "webtransport", "memory-pubsub", "memory-rooms")


async def sse_status(url: str, origin: str | None) -> tuple[int, str]:
    headers = {"Origin": origin} if origin else {}
    async with httpx.AsyncClient(timeout=5) as http, \
            http.stream("GET", url + "/sse?rooms=lobby", headers=headers) as response:
        if response.status_code != 200:
            return response.status_code, (await response.aread()).decode()
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                return 200, line
    return 200, ""


async def test_sse_refuses_a_foreign_origin_on_the_stream_and_the_send_url() -> None:
    streaming = Streaming({"sse": {"allowed_origins": ["https://*.partner.example"]}})
    async with serve(streaming) as server:
        status, body = await sse_status(server.url, "https://evil.example")
        assert status == 403 and "sse.allowed_origins" in body
        assert await streaming.rooms() == []  # nothing was joined
        assert (await sse_status(server.url, f"http://127.0.0.1:{server.port}"))[0] == 200
        assert (await sse_status(server.url, "https://app.partner.example"))[0] == 200
        assert (await sse_status(server.url, None))[0] == 200  # not a browser
        async with httpx.AsyncClient(timeout=5) as http:
            refused = await http.post(server.url + "/sse/send?connection_id=x", content=b"{}",
                                      headers={"Origin": "https://evil.example", "X-Stream-Token": "t"})
            assert refused.status_code == 403 and refused.json()["error"] == "origin_not_allowed"


# -- the same answer on every transport ---------------------------------------------------------


class _Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived) and not self.status.done():
                self.status.set_result(int(dict(h3_event.headers)[b":status"]))


async def wt_status(port: int, origin: str) -> int:
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE,
                                      max_datagram_frame_size=65536, server_name="localhost")
    async with quic_connect("127.0.0.1", port, configuration=configuration, create_protocol=_Client) as client:
        assert isinstance(client, _Client)
        stream = client._quic.get_next_available_stream_id()
        client.h3.send_headers(stream, [
            (b":method", b"CONNECT"), (b":scheme", b"https"), (b":authority", f"127.0.0.1:{port}".encode()),
            (b":path", b"/wt"), (b":protocol", b"webtransport"), (b"origin", origin.encode())])
        client.transmit()
        return await asyncio.wait_for(client.status, 5)


async def ws_status(url: str, origin: str) -> int:
    try:
        async with websockets.connect(url + "/ws", origin=websockets.Origin(origin)) as ws:
            await ws.send(json.dumps({"type": "join", "room_id": "lobby"}))
            await asyncio.wait_for(ws.recv(), 5)
            return 200
    except websockets.InvalidStatus as refused:
        return refused.response.status_code


@pytest.mark.parametrize(("origin", "ok"), [
    ("https://evil.example", False),
    ("http://evil.example:{port}", False),
    ("https://app.partner.example", True),
    ("http://127.0.0.1:{port}", True),
    ("null", False),
])
async def test_every_transport_gives_the_same_answer(origin: str, ok: bool) -> None:
    allowed = ["https://*.partner.example"]
    streaming = Streaming({"websocket": {"allowed_origins": allowed}, "sse": {"allowed_origins": allowed},
                           "webtransport": {"allowed_origins": allowed}})
    async with serve(streaming) as server:
        origin = origin.format(port=server.port)
        answers = {
            "websocket": await ws_status(server.ws_url, origin),
            "sse": (await sse_status(server.url, origin))[0],
            "webtransport": await wt_status(server.port, origin),
        }
    assert answers == dict.fromkeys(answers, 200 if ok else 403), answers
