"""Every key of the ``websocket`` section, enforced on a real server with real clients."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from forge_streaming import ConfigError, Streaming
from forge_streaming.testing import serve
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol


def only_conn(streaming: Streaming) -> Any:
    (conn,) = streaming.connections.values()
    return conn


@pytest.mark.parametrize("enabled", [True, False])
async def test_compression_negotiated_only_when_enabled(make_streaming: Any, frames: Any, enabled: bool) -> None:
    streaming: Streaming = make_streaming({"websocket": {"enable_compression": enabled}})
    async with serve(streaming) as server:
        async with connect(server.ws_url + "/ws", compression="deflate") as ws:
            assert ws.response is not None
            header = ws.response.headers.get("Sec-WebSocket-Extensions")
            names = [type(e).__name__ for e in ws.protocol.extensions]
            if enabled:
                assert header is not None and header.startswith("permessage-deflate")
                assert names == ["PerMessageDeflate"]
                assert only_conn(streaming).compression == "permessage-deflate"
            else:
                assert header is None and names == []
                assert only_conn(streaming).compression is None
            # room traffic both ways still decodes (compressed per connection when negotiated)
            await frames.send(ws, type="join", room_id="z")
            await frames.next(ws, "system", event="room.joined")
            big = "squeeze " * 2000
            await streaming.broadcast("z", big)
            assert (await frames.next(ws, "message"))["data"] == big


async def test_default_max_message_size_is_64kib(make_streaming: Any) -> None:
    streaming: Streaming = make_streaming()
    async with serve(streaming) as server:
        async with connect(server.ws_url + "/ws", max_size=None) as ws:
            await ws.send("x" * (64 * 1024))  # at the limit: accepted (an error frame: not JSON)
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "error"
            await ws.send("x" * (64 * 1024 + 1))
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 1009
            assert ws.close_reason is not None
            assert "65537" in ws.close_reason and "65536" in ws.close_reason


async def test_configured_max_message_size_closes_1009(make_streaming: Any) -> None:
    streaming: Streaming = make_streaming({"websocket": {"max_message_size": "1KiB"}})

    async def echo(conn: Any) -> None:
        while True:
            await conn.write_message((await conn.read_message()).data)

    streaming.handle_websocket("/echo", echo)

    async with serve(streaming) as server:
        async with connect(server.ws_url + "/echo") as ws:
            (conn,) = streaming.connections.values()
            await ws.send(b"y" * 1024)
            assert await asyncio.wait_for(ws.recv(), 5) == b"y" * 1024
            await ws.send(b"y" * 1025)
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_reason is not None
            assert ws.close_code == 1009 and "1025" in ws.close_reason

        async def gone() -> None:
            while streaming.connections:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(gone(), 5)
        assert conn.close_code == 1009  # what the kernel (and the disconnect hook) was told


async def test_same_origin_by_default(make_streaming: Any) -> None:
    streaming: Streaming = make_streaming()
    async with serve(streaming) as server:
        same = f"http://127.0.0.1:{server.port}"
        async with connect(server.ws_url + "/ws", origin=Origin(same)) as ws:
            assert ws.protocol.state.name == "OPEN"
        async with connect(server.ws_url + "/ws") as ws:  # no Origin: not a browser, allowed
            assert ws.protocol.state.name == "OPEN"
        for origin in ("http://evil.example", f"http://127.0.0.1:{server.port + 1}", "http://localhost", "null"):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(server.ws_url + "/ws", origin=Origin(origin)):
                    pass
            assert refused.value.response.status_code == 403, origin
            assert b"websocket.allowed_origins" in refused.value.response.body
        assert not streaming.connections


async def test_allowed_origins_with_wildcards(make_streaming: Any) -> None:
    streaming: Streaming = make_streaming(
        {"websocket": {"allowed_origins": ["https://*.example.com", "http://localhost:*"]}})
    async with serve(streaming) as server:
        # the server's own pages are always allowed; the list adds more (one rule on every transport)
        for origin in ("https://app.example.com", "https://a.b.example.com", "http://localhost:3000",
                       f"http://127.0.0.1:{server.port}"):
            async with connect(server.ws_url + "/ws", origin=Origin(origin)):
                pass
        for origin in ("https://example.org", "http://app.example.com"):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(server.ws_url + "/ws", origin=Origin(origin)):
                    pass
            assert refused.value.response.status_code == 403, origin


async def test_subprotocol_is_the_first_offered_that_the_server_speaks(make_streaming: Any) -> None:
    streaming: Streaming = make_streaming({"websocket": {"subprotocols": ["chat.v2", "chat.v1"]}})

    async def proto(conn: Any) -> None:
        await conn.write_message(str(conn.subprotocol))

    streaming.handle_websocket("/proto", proto)

    async with serve(streaming) as server:
        offered = [Subprotocol("chat.v1"), Subprotocol("chat.v2")]
        async with connect(server.ws_url + "/proto", subprotocols=offered) as ws:
            assert ws.subprotocol == "chat.v1"
            assert await asyncio.wait_for(ws.recv(), 5) == "chat.v1"
        async with connect(server.ws_url + "/proto") as ws:
            assert ws.subprotocol is None
            assert await asyncio.wait_for(ws.recv(), 5) == "None"


async def test_socket_buffer_sizes_applied(make_streaming: Any) -> None:
    streaming: Streaming = make_streaming({"websocket": {"read_buffer_size": "32KiB", "write_buffer_size": "48KiB"}})
    async with serve(streaming) as server:
        async with connect(server.ws_url + "/ws"):
            rcv, snd = only_conn(streaming).socket_buffers()
            # Linux doubles what is asked (bookkeeping overhead); other systems give it as asked
            assert rcv in (32 * 1024, 64 * 1024) and snd in (48 * 1024, 96 * 1024)
    defaults: Streaming = make_streaming()
    async with serve(defaults) as server:
        async with connect(server.ws_url + "/ws"):
            rcv, snd = only_conn(defaults).socket_buffers()
            assert rcv not in (32 * 1024, 64 * 1024)


def test_server_options_follow_the_config(make_streaming: Any) -> None:
    from forge_streaming_websocket import ForgeWebSocketProtocol

    streaming: Streaming = make_streaming({"websocket": {"ping_interval": "2s", "ping_timeout": "500ms",
                                                         "enable_compression": True},
                                           "limits": {"max_message_size": "10KiB"}})
    assert streaming.server_options() == {"ws": ForgeWebSocketProtocol, "ws_max_size": 10 * 1024,
                                          "ws_per_message_deflate": True, "ws_ping_interval": 2.0,
                                          "ws_ping_timeout": 0.5}
    off: Streaming = make_streaming({"websocket": {"ping_interval": 0}})
    assert off.server_options()["ws_ping_interval"] is None
    assert off.server_options()["ws_per_message_deflate"] is False


@pytest.mark.parametrize(("section", "key"), [
    ({"max_message_size": "lots"}, "websocket.max_message_size"),
    ({"ping_interval": "soon"}, "websocket.ping_interval"),
    ({"enable_compresion": True}, "websocket.enable_compresion"),
    ({"allowed_origins": "https://a.example"}, "websocket.allowed_origins"),
])
def test_bad_values_refused_with_the_key(make_streaming: Any, section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        make_streaming({"websocket": section})
    assert key in str(exc.value)
