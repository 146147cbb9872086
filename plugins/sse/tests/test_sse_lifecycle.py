"""The kernel's failure table on SSE: the same failure gives the same close code as on every transport.

Real uvicorn servers on loopback, real clients; what the client sees (the
``connection.closed`` system event) and what ``streaming_disconnected`` is told.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from forge_streaming import Connection, Refused, hookimpl
from forge_streaming.testing import RunningServer, serve
from forge_streaming_sse import Event, SSEConnection

if TYPE_CHECKING:
    from conftest import Kit, RawSSE, SSEEvent  # the kit's types (test modules do not import conftest at run time)


class Audit:
    """Records ``streaming_disconnected``; ``streaming_connected`` fails for requests with ``?fail``."""

    def __init__(self) -> None:
        self.disconnected: list[tuple[str, int, str]] = []

    @hookimpl
    def streaming_connected(self, connection: Connection) -> None:
        if connection.query("fail") is not None:
            raise RuntimeError("connected hook bug")

    @hookimpl
    def streaming_disconnected(self, connection: Connection, code: int, reason: str) -> None:
        self.disconnected.append((connection.id, code, reason))


async def read_to_end(kit: type[Kit], server: RunningServer, path: str) -> list[SSEEvent]:
    """Every event of a stream, up to the end of its response."""
    raw = await kit.RawSSE.open(server.url, path)
    try:
        assert raw.status == 200
        return [event async for event in _events_with_timeout(raw)]
    finally:
        await raw.close()


async def _events_with_timeout(raw: RawSSE) -> AsyncIterator[SSEEvent]:
    while (event := await asyncio.wait_for(raw.next_event(), 5)) is not None:
        yield event


def closed_notice(kit: type[Kit], events: list[SSEEvent]) -> dict[str, Any] | None:
    notices = [e.json()["data"] for e in events if e.data.startswith("{") and kit.is_system(e, "connection.closed")]
    assert len(notices) <= 1, notices
    return notices[0] if notices else None


async def test_refused_by_a_handler_closes_with_its_code_and_reason(kit: type[Kit]) -> None:
    audit = Audit()
    streaming = kit.make_streaming(plugins=(audit,))

    async def vip(stream: SSEConnection) -> None:
        await stream.send_event(Event(data="hello"))
        raise Refused("members only", close_code=1008)

    streaming.handle_sse("/vip", vip)

    async with serve(streaming) as server:
        events = await read_to_end(kit, server, "/vip")
        assert events[0].data == "hello"
        assert closed_notice(kit, events) == {"code": 1008, "reason": "members only"}
        await kit.eventually(lambda: audit.disconnected and not streaming.connections)
        assert [(code, reason) for _, code, reason in audit.disconnected] == [(1008, "members only")]


@pytest.mark.parametrize("path", ["/hello?fail", "/sse?rooms=r&fail"], ids=["handler", "room-endpoint"])
async def test_a_failing_connected_hook_closes_only_that_stream_1011(kit: type[Kit], path: str) -> None:
    audit = Audit()
    streaming = kit.make_streaming(plugins=(audit,))
    handler_ran = asyncio.Event()

    async def hello(stream: SSEConnection) -> None:
        handler_ran.set()
        await stream.send_event(Event(data="hello"))
        await stream.wait_closed()

    streaming.handle_sse("/hello", hello)

    async with serve(streaming) as server:
        bystander = await kit.RawSSE.open(server.url, "/hello")
        try:
            assert (await bystander.until(lambda e: e.data == "hello"))[-1].data == "hello"
            handler_ran.clear()
            bystander_id = next(iter(streaming.connections))
            events = await read_to_end(kit, server, path)
            assert closed_notice(kit, events) == {"code": 1011, "reason": "internal error"}
            assert not [e for e in events if e.event == "session" or e.data == "hello"], "no handler ran"
            assert not handler_ran.is_set()
            await kit.eventually(lambda: len(audit.disconnected) == 1 and list(streaming.connections) == [bystander_id])
            await asyncio.sleep(0.1)  # nothing fires twice
            assert [(code, reason) for _, code, reason in audit.disconnected] == [(1011, "internal error")]
            assert await streaming.rooms() == []
            # the other stream carried on
            still_open = streaming.connections[bystander_id]
            assert isinstance(still_open, SSEConnection)
            assert not still_open.done
        finally:
            await bystander.close()
        await kit.eventually(lambda: not streaming.connections)
        assert [code for _, code, _ in audit.disconnected] == [1011, 1001]


async def test_a_returning_handler_closes_1000_without_a_notice(kit: type[Kit]) -> None:
    audit = Audit()
    streaming = kit.make_streaming(plugins=(audit,))

    async def once(stream: SSEConnection) -> None:
        await stream.send_event(Event(data="only"))

    streaming.handle_sse("/once", once)

    async with serve(streaming) as server:
        events = await read_to_end(kit, server, "/once")
        assert [e.data for e in events] == ["only"]
        await kit.eventually(lambda: audit.disconnected and not streaming.connections)
        assert [(code, reason) for _, code, reason in audit.disconnected] == [(1000, "")]


async def test_a_failing_handler_closes_1011_and_tells_the_client(kit: type[Kit]) -> None:
    audit = Audit()
    streaming = kit.make_streaming(plugins=(audit,))

    async def boom(stream: SSEConnection) -> None:
        await stream.send_event(Event(data="before"))
        raise RuntimeError("handler bug")

    streaming.handle_sse("/boom", boom)

    async with serve(streaming) as server:
        events = await read_to_end(kit, server, "/boom")
        assert events[0].data == "before"
        assert closed_notice(kit, events) == {"code": 1011, "reason": "internal error"}
        await kit.eventually(lambda: audit.disconnected and not streaming.connections)
        assert [(code, reason) for _, code, reason in audit.disconnected] == [(1011, "internal error")]


async def test_a_handler_that_outlives_its_stream_is_cancelled_after_handler_grace(kit: type[Kit]) -> None:
    audit = Audit()
    streaming = kit.make_streaming({"server": {"handler_grace": "200ms"}}, plugins=(audit,))
    cancelled = asyncio.Event()

    async def stubborn(stream: SSEConnection) -> None:
        await stream.send_event(Event(data="hi"))
        try:
            await asyncio.sleep(60)  # never looks at stream.done
        except asyncio.CancelledError:
            cancelled.set()
            raise

    streaming.handle_sse("/stubborn", stubborn)

    async with serve(streaming) as server:
        raw = await kit.RawSSE.open(server.url, "/stubborn")
        await raw.until(lambda e: e.data == "hi")
        await raw.close()
        await asyncio.wait_for(cancelled.wait(), 5)
        await kit.eventually(lambda: audit.disconnected and not streaming.connections)
        assert [(code, reason) for _, code, reason in audit.disconnected] == [(1001, "client disconnected")]


async def test_a_head_request_gets_the_headers_and_ends(kit: type[Kit]) -> None:
    audit = Audit()
    streaming = kit.make_streaming(plugins=(audit,))

    async def ticker(stream: SSEConnection) -> None:
        raise AssertionError("a HEAD request runs no handler")

    streaming.handle_sse("/ticker", ticker)

    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        for path in ("/ticker", "/sse"):
            head = await client.head(path)
            assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
        await kit.eventually(lambda: len(audit.disconnected) == 2 and not streaming.connections)
        assert [(code, reason) for _, code, reason in audit.disconnected] == [(1000, ""), (1000, "")]
