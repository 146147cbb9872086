"""The kernel's failure table on WebTransport: the same failure has the same outcome as on WebSocket.

Each test runs a real aioquic server (the plugin's) and an aioquic client on
loopback; what the client sees is the CLOSE_WEBTRANSPORT_SESSION capsule
(or the HTTP status of the CONNECT), what the kernel saw is what
``streaming_disconnected`` was told and whether the session stays counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from forge_streaming import ConnectionClosed, Handler, Refused, Streaming, hookimpl
from forge_streaming.testing import serve
from forge_streaming_webtransport import WebTransportSession

if TYPE_CHECKING:
    from conftest import ClientKit  # the wt fixture's type (test modules do not import conftest at run time)


class Disconnects:
    """Records what streaming_disconnected is told, by path."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[int, str]] = {}
        self.changed = asyncio.Event()

    @hookimpl
    def streaming_disconnected(self, connection: Any, code: int, reason: str) -> None:
        self.seen[connection.request.path] = (code, reason)
        self.changed.set()

    async def wait(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        async def waiter() -> tuple[int, str]:
            while path not in self.seen:
                self.changed.clear()
                await self.changed.wait()
            return self.seen[path]

        return await asyncio.wait_for(waiter(), timeout)


async def _returns(session: WebTransportSession) -> None:
    return None


async def _raises(session: WebTransportSession) -> None:
    raise RuntimeError("handler bug")


async def _refuses(session: WebTransportSession) -> None:
    raise Refused("members only", close_code=4003)


@pytest.mark.parametrize(("handler", "outcome"), [
    (_returns, (1000, "")),
    (_raises, (1011, "internal error")),
    (_refuses, (4003, "members only")),
], ids=["handler-returns", "handler-raises", "handler-refuses"])
async def test_handler_outcome_is_the_close_code(make_streaming: Callable[..., Streaming], wt: ClientKit,
                                                  handler: Handler, outcome: tuple[int, str]) -> None:
    disconnects = Disconnects()
    streaming = make_streaming(plugins=[disconnects])
    streaming.handle_webtransport("/h", handler)
    async with serve(streaming) as srv, wt.client(srv.port) as client:
        other = await wt.session(client, srv.port, "/wt")
        session = await wt.session(client, srv.port, "/h")
        assert session.status == 200
        assert await session.closed_by_server() == outcome
        assert await disconnects.wait("/h") == outcome
        await wt.until(lambda: len(srv.streaming.connections) == 1)
        other.send_message({"type": "join", "room_id": "r"})  # the other session is untouched
        assert (await other.read_frame("system"))["event"] == "room.joined"


async def test_failing_connected_hook_closes_only_that_session_uncounted(make_streaming: Callable[..., Streaming],
                                                                         wt: ClientKit) -> None:
    class FailOnQuery:
        @hookimpl
        def streaming_connected(self, connection: Any) -> None:
            if connection.query("fail"):
                raise RuntimeError("plugin bug")

    disconnects = Disconnects()
    streaming = make_streaming({"limits": {"max_connections_per_ip": 2}}, plugins=[FailOnQuery(), disconnects])
    async with serve(streaming) as srv, wt.client(srv.port) as client:
        other = await wt.session(client, srv.port, "/wt")
        broken = await wt.session(client, srv.port, "/wt?fail=1")
        assert await broken.closed_by_server() == (1011, "internal error")
        assert await disconnects.wait("/wt") == (1011, "internal error")
        await wt.until(lambda: len(srv.streaming.connections) == 1)
        # uncounted: with one of two per-IP places taken, the next session from this address is let in
        again = await wt.session(client, srv.port, "/wt")
        assert again.status == 200
        for session in (other, again):
            session.send_message({"type": "join", "room_id": "r"})
            assert (await session.read_frame("system"))["event"] == "room.joined"


async def test_kernel_refusals_answer_the_connect(make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    class Auth:
        @hookimpl
        def streaming_authenticate(self, request: Any) -> None:
            if request.query.get("token") != "good":
                raise Refused("token required", status=401, code="unauthorized")

    streaming = make_streaming({"limits": {"max_connections": 1}}, plugins=[Auth()])
    async with serve(streaming) as srv, wt.client(srv.port) as client:
        assert (await wt.session(client, srv.port, "/wt")).status == 401
        assert (await wt.session(client, srv.port, "/wt?token=good")).status == 200
        full = await wt.session(client, srv.port, "/wt?token=good")
        assert full.status == 503  # limits.max_connections
        assert await client.wait_for(lambda: full.session_id in client.session_ended)
        assert len(srv.streaming.connections) == 1


async def test_handler_ending_on_connection_closed_closes_the_session(make_streaming: Callable[..., Streaming],
                                                                      wt: ClientKit) -> None:
    """A handler that lets ConnectionClosed out while the session is still open: the session closes with it."""
    disconnects = Disconnects()
    streaming = make_streaming(plugins=[disconnects])

    @streaming.handle_webtransport("/read")
    async def read(session: WebTransportSession) -> None:
        await session.read_message()  # the client finishes the message stream: ConnectionClosed(1000)

    async with serve(streaming) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/read")
        sid = session.open_stream()
        session.send(sid, b"", end_stream=True)
        expected = (1000, "message stream finished by the client")
        assert await session.closed_by_server() == expected
        assert await disconnects.wait("/read") == expected
        await wt.until(lambda: not srv.streaming.connections)


async def test_session_ended_under_a_handler_stops_it(make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    """The client leaves while the handler waits on something else: the kernel cancels it after the grace."""
    disconnects = Disconnects()
    streaming = make_streaming({"server": {"handler_grace": "100ms"}}, plugins=[disconnects])
    cancelled = asyncio.Event()

    @streaming.handle_webtransport("/stuck")
    async def stuck(session: WebTransportSession) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serve(streaming) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/stuck")
        await wt.until(lambda: srv.streaming.connections)
        session.close(4000, "bye")
        assert await disconnects.wait("/stuck") == (4000, "bye")
        await asyncio.wait_for(cancelled.wait(), 5)
        assert srv.streaming.connections == {}


async def test_stream_calls_after_the_end_raise_connection_closed(make_streaming: Callable[..., Streaming],
                                                                  wt: ClientKit) -> None:
    results: list[Any] = []
    done = asyncio.Event()

    streaming = make_streaming()

    @streaming.handle_webtransport("/after")
    async def after(session: WebTransportSession) -> None:
        await session.wait_closed()
        for call in (session.receive_datagram, session.accept_bidirectional_stream, session.read_message):
            try:
                await call()
            except ConnectionClosed as exc:
                results.append((exc.code, exc.reason))
        done.set()

    async with serve(streaming) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/after")
        await wt.until(lambda: srv.streaming.connections)
        session.close(4001, "gone")
        await asyncio.wait_for(done.wait(), 5)
        assert results == [(4001, "gone")] * 3
