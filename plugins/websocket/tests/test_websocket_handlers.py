"""User handlers over a real uvicorn server: echo, chat, the README's examples."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from forge_streaming import Streaming
from forge_streaming.testing import serve
from websockets.asyncio.client import connect

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_namespace() -> dict[str, Any]:
    """Exec the README's first python block, as a user would paste it into a module."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README has no python example"
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    return namespace


async def test_readme_echo_keeps_text_and_binary_distinct() -> None:
    streaming = readme_namespace()["streaming"]
    async with serve(streaming) as server:
        async with connect(server.ws_url + "/echo") as ws:
            assert streaming.transports["websocket"].describe()["direct"] == 1  # the zero-task path is in use
            await ws.send("héllo")
            assert await asyncio.wait_for(ws.recv(), 5) == "héllo"
            await ws.send(b"\x00\xffbin")
            got = await asyncio.wait_for(ws.recv(), 5)
            assert isinstance(got, bytes) and got == b"\x00\xffbin"
            await ws.send("text again")
            got = await asyncio.wait_for(ws.recv(), 5)
            assert isinstance(got, str) and got == "text again"
            # a binary message that is valid UTF-8 still comes back as a binary frame
            await ws.send(b"plain ascii")
            assert await asyncio.wait_for(ws.recv(), 5) == b"plain ascii"
            # every header length form of a hand-built frame: 7-bit, 16-bit and 64-bit lengths
            for size in (0, 125, 126, 65535, 65536):
                await ws.send("é" * (size // 2) + "a" * (size % 2))
                assert await asyncio.wait_for(ws.recv(), 5) == "é" * (size // 2) + "a" * (size % 2)
                await ws.send(bytes(size))
                assert await asyncio.wait_for(ws.recv(), 5) == bytes(size)
        async with connect(server.ws_url + "/echo") as ws:  # the first close did not hurt the server
            await ws.send("again")
            assert await asyncio.wait_for(ws.recv(), 5) == "again"
        await _until(lambda: not streaming.connections)


async def test_readme_chat_three_clients(frames: Any) -> None:
    streaming = readme_namespace()["streaming"]
    async with serve(streaming) as server:
        url = server.ws_url + "/chat?room=kitchen"
        async with connect(url) as a, connect(url) as b, connect(url) as c:
            await _until(lambda: len(streaming.local_members("kitchen")) == 3)
            await a.send("hi from a")
            for ws in (b, c):
                got = await frames.next(ws, "message")
                assert (got["data"], got["room_id"]) == ("hi from a", "kitchen")
            await b.send("hi from b")
            got = await frames.next(a, "message")
            assert got["data"] == "hi from b"
        await _until(lambda: streaming.local_members("kitchen") == [] and not streaming.connections)
        assert await streaming.presence("kitchen") == []


async def test_handler_exception_closes_only_its_connection_with_1011(
        make_streaming: Any, caplog: pytest.LogCaptureFixture) -> None:
    streaming: Streaming = make_streaming()

    async def fragile(conn: Any) -> None:
        while True:
            msg = await conn.read_message()
            if msg.data == "boom":
                raise ValueError("handler bug")
            await conn.write_message(msg.data)

    streaming.handle_websocket("/fragile", fragile)

    closes: list[tuple[int, str]] = []

    class Recorder:
        from forge_streaming import hookimpl

        @hookimpl
        def streaming_disconnected(self, connection: Any, code: int, reason: str) -> None:
            closes.append((code, reason))

    streaming.plugins.register(Recorder())
    async with serve(streaming) as server:
        async with connect(server.ws_url + "/fragile") as good, connect(server.ws_url + "/fragile") as bad:
            await bad.send("boom")
            await asyncio.wait_for(bad.wait_closed(), 5)
            assert bad.close_code == 1011 and bad.close_reason == "internal error"
            await good.send("still here")
            assert await asyncio.wait_for(good.recv(), 5) == "still here"
        await _until(lambda: len(closes) == 2)
    assert (1011, "internal error") in closes
    failures = [r for r in caplog.records if r.name == "forge_streaming.websocket" and r.levelname == "ERROR"]
    assert failures and "/fragile" in failures[0].getMessage() and "handler bug" in failures[0].getMessage()


async def test_handler_return_closes_1000_and_refused_closes_1008(make_streaming: Any) -> None:
    from forge_streaming import Refused

    streaming: Streaming = make_streaming()

    async def once(conn: Any) -> None:
        await conn.write_message("bye")

    streaming.handle_websocket("/once", once)

    async def policy(conn: Any) -> None:
        raise Refused("members only")

    streaming.handle_websocket("/policy", policy)

    async with serve(streaming) as server:
        async with connect(server.ws_url + "/once") as ws:
            assert await asyncio.wait_for(ws.recv(), 5) == "bye"
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 1000
        async with connect(server.ws_url + "/policy") as ws:
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert (ws.close_code, ws.close_reason) == (1008, "members only")


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(wait(), timeout)
