"""handle_sse handlers over a real uvicorn server: the README ticker, framing, keep-alive, disconnects."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from forge_streaming import ConfigError, Connection, ConnectionRequest, Identity, Refused, hookimpl
from forge_streaming.testing import open_connection, serve
from forge_streaming_sse import Event, SSEConnection, SSETransport
from httpx_sse import aconnect_sse

if TYPE_CHECKING:
    from conftest import Kit  # the kit fixture's type (test modules do not import conftest at run time)

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
    """The README's python code block that contains ``marker``."""
    blocks: list[str] = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    matching = [b for b in blocks if marker in b]
    assert matching, f"no python block with {marker!r} in README.md"
    return matching[0]


async def test_readme_ticker_runs_as_written() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(readme_block("/ticker"), str(README), "exec"), namespace)
    streaming = namespace["streaming"]
    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        async with aconnect_sse(client, "GET", "/ticker") as source:
            ticks = []
            async for sse in source.aiter_sse():
                ticks.append((sse.event, sse.id, json.loads(sse.data)))
                if len(ticks) == 2:
                    break
        assert ticks == [("tick", "0", {"n": 0}), ("tick", "1", {"n": 1})]
        await asyncio.sleep(0)  # the server notices the disconnect and the handler leaves its loop
        for _ in range(300):
            if not streaming.connections:
                break
            await asyncio.sleep(0.01)
        assert streaming.connections == {}


async def test_headers_and_framing_are_byte_exact(kit: type[Kit]) -> None:
    streaming = kit.make_streaming({"sse": {"retry": "2500ms"}})

    async def once(stream: SSEConnection) -> None:
        await stream.send_event(Event(data="line one\nline two", type="note", id="7"))
        await stream.send_event(Event(data={"é": [1, 2]}))
        await stream.send_event(Event(data="", retry=100))

    streaming.handle_sse("/once", once)

    async with serve(streaming) as server:
        raw = await kit.RawSSE.open(server.url, "/once")
        try:
            assert raw.status == 200
            assert raw.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert raw.headers["cache-control"] == "no-cache"
            assert raw.headers["x-accel-buffering"] == "no"
            assert raw.headers["transfer-encoding"] == "chunked"
            while await raw._read_chunk():
                pass
            assert raw.body == (
                b"retry: 2500\nid: 7\nevent: note\ndata: line one\ndata: line two\n\n"
                b'data: {"\xc3\xa9":[1,2]}\n\n'
                b"data: \nretry: 100\n\n"
            )
            assert raw.ended, "the response ends when the handler returns"
        finally:
            await raw.close()


async def test_keep_alive_comments_on_an_idle_stream(kit: type[Kit]) -> None:
    streaming = kit.make_streaming({"sse": {"keep_alive_interval": "100ms"}})

    async def idle(stream: SSEConnection) -> None:
        await stream.wait_closed()

    streaming.handle_sse("/idle", idle)

    async with serve(streaming) as server:
        raw = await kit.RawSSE.open(server.url, "/idle")
        try:
            blocks = [await asyncio.wait_for(raw.next_block(), 5) for _ in range(2)]
            assert blocks == [b": keep-alive", b": keep-alive"]
        finally:
            await raw.close()


async def test_disconnect_is_noticed_and_cleaned_up(kit: type[Kit]) -> None:
    ended: list[tuple[str, int, str]] = []
    handler_saw_done = asyncio.Event()

    class Audit:
        @hookimpl
        def streaming_disconnected(self, connection: Connection, code: int, reason: str) -> None:
            ended.append((connection.transport, code, reason))

    streaming = kit.make_streaming(plugins=(Audit(),))

    async def wait(stream: SSEConnection) -> None:
        await stream.send_event(Event(data="hello"))
        await stream.wait_closed()
        assert stream.done
        handler_saw_done.set()

    streaming.handle_sse("/wait", wait)

    async with serve(streaming) as server:
        raw = await kit.RawSSE.open(server.url, "/wait")
        await raw.until(lambda e: e.data == "hello")
        assert len(streaming.connections) == 1
        await raw.close()
        await asyncio.wait_for(handler_saw_done.wait(), 5)
        await kit.eventually(lambda: not streaming.connections and ended)
        assert ended == [("sse", 1001, "client disconnected")]
        sse = streaming.transports["sse"]
        assert isinstance(sse, SSETransport)
        assert sse.streams == {}


async def test_send_event_after_disconnect_raises_and_handler_ends_quietly(
        kit: type[Kit], caplog: pytest.LogCaptureFixture) -> None:
    finished = asyncio.Event()
    streaming = kit.make_streaming()

    async def fast(stream: SSEConnection) -> None:
        try:
            while True:  # never looks at stream.done: send_event must stop it
                await stream.send_event(Event(data="x" * 100))
                await asyncio.sleep(0.01)
        finally:
            finished.set()

    streaming.handle_sse("/fast", fast)

    async with serve(streaming) as server:
        raw = await kit.RawSSE.open(server.url, "/fast")
        await raw.until(lambda e: e.data.startswith("x"))
        await raw.close()
        await asyncio.wait_for(finished.wait(), 5)
        await kit.eventually(lambda: not streaming.connections)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and "forge_streaming" in r.name]


async def test_refused_authentication_answers_before_the_stream(kit: type[Kit]) -> None:
    class Gate:
        @hookimpl
        def streaming_authenticate(self, request: ConnectionRequest) -> Identity | None:
            if request.headers.get("authorization") != "Bearer good":
                raise Refused("send a valid bearer token", status=401, code="unauthorized")
            return None

    streaming = kit.make_streaming(plugins=(Gate(),))

    async def private(stream: SSEConnection) -> None:
        await stream.send_event(Event(data="secret"))

    streaming.handle_sse("/private", private)

    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        refused = await client.get("/private")
        assert refused.status_code == 401
        assert refused.json() == {"error": "unauthorized", "message": "send a valid bearer token"}
        ok = await client.get("/private", headers={"authorization": "Bearer good"})
        assert ok.status_code == 200 and "data: secret" in ok.text
        refused_room = await client.get("/sse")
        assert refused_room.status_code == 401
        assert streaming.connections == {}


async def test_failing_handler_is_logged_with_its_connection_and_ends_only_its_stream(
        kit: type[Kit], caplog: pytest.LogCaptureFixture) -> None:
    streaming = kit.make_streaming()

    async def boom(stream: SSEConnection) -> None:
        await stream.send_event(Event(data="before"))
        raise RuntimeError("handler bug")

    streaming.handle_sse("/boom", boom)

    async def fine(stream: SSEConnection) -> None:
        await stream.send_event(Event(data="fine"))

    streaming.handle_sse("/fine", fine)

    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        response = await client.get("/boom")
        assert response.status_code == 200 and "data: before" in response.text
        assert "data: fine" in (await client.get("/fine")).text
        await kit.eventually(lambda: not streaming.connections)
    failures = [r for r in caplog.records if "handler bug" in str(r.exc_info) or "handler bug" in r.getMessage()]
    assert failures and failures[0].name == "forge_streaming.sse"
    assert getattr(failures[0], "connection_id", "").startswith("ss-")


async def test_handler_reads_frames_posted_with_its_token(kit: type[Kit]) -> None:
    streaming = kit.make_streaming()

    async def echo(stream: SSEConnection) -> None:
        await stream.send_event(Event(type="session", data={"send_url": stream.send_url, "token": stream.token}))
        message = await stream.read_message()
        await stream.write_message("echo:" + message.text)

    streaming.handle_sse("/echo", echo)

    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        async with aconnect_sse(client, "GET", "/echo") as source:
            events = source.aiter_sse()
            session = json.loads((await anext(events)).data)
            posted = await client.post(session["send_url"], content="ping",
                                       headers={"x-stream-token": session["token"]})
            assert posted.status_code == 202
            assert (await anext(events)).data == "echo:ping"


def test_event_encoding_refuses_bad_values() -> None:
    from forge_streaming_sse.events import encode_event

    with pytest.raises(ValueError, match="retry"):
        encode_event(Event(data="x", retry=-1))
    with pytest.raises(ValueError, match="NUL"):
        encode_event(Event(data="x", id="a\x00b"))
    assert encode_event(Event(data=b"bytes", type="t")) == b"event: t\ndata: bytes\n\n"


async def test_readme_python_client_talks_to_the_room_endpoint(kit: type[Kit]) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(readme_block("async def say_hello"), str(README), "exec"), namespace)
    say_hello = namespace["say_hello"]
    streaming = kit.make_streaming()
    async with serve(streaming) as server:
        other = await open_connection(streaming)  # a member of another transport, in process
        await other.join_room("lobby")
        talking = asyncio.ensure_future(say_hello(server.url, "lobby"))
        await kit.eventually(lambda: [f["data"] for f in other.frames("message")] == ["hello"])
        await other.broadcast_to_room("lobby", "hi back")
        frame = await asyncio.wait_for(talking, 5)
        assert frame["data"] == "hi back" and frame["user_id"] == other.user_id


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("keep_alive_interval", "soon", "duration"),
    ("send_buffer", "lots", "size"),
    ("send_path", "sse/send", "starting with '/'"),
    ("keepalive", "1s", "unknown key"),
])
def test_bad_settings_are_refused_with_their_key(kit: type[Kit], key: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        kit.make_streaming({"sse": {key: value}})
    assert f"sse.{key}" in str(info.value) and expected in str(info.value)


def test_settings_from_the_environment(kit: type[Kit]) -> None:
    from forge_streaming import Streaming
    from forge_streaming_sse import SSESettings

    streaming = Streaming({}, environ={"FORGE_STREAMING__SSE__KEEP_ALIVE_INTERVAL": "30s",
                                       "FORGE_STREAMING__SSE__SEND_BUFFER": "256KiB"})
    settings = streaming.config.section("sse", SSESettings)
    assert (settings.keep_alive_interval, settings.send_buffer, settings.retry) == (30.0, 256 * 1024, 3.0)
