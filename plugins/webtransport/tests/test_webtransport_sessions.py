"""Sessions over a real aioquic server on loopback UDP, driven by an aioquic client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from forge_streaming import Connection, ConnectionRequest, Identity, Refused, Streaming, hookimpl
from forge_streaming.testing import RunningServer, serve
from forge_streaming_webtransport import StreamClosed, WebTransportSession

if TYPE_CHECKING:
    from conftest import ClientKit  # the wt fixture's type (test modules do not import conftest at run time)


async def test_bidirectional_echo_both_openers(make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    streaming = make_streaming()
    results: list[bytes] = []

    @streaming.handle_webtransport("/echo")
    async def echo(session: WebTransportSession) -> None:
        stream = await session.accept_bidirectional_stream()
        stream.write(await stream.read_all(), end_stream=True)
        outgoing = await session.open_bidirectional_stream()
        outgoing.write(b"ping from server", end_stream=True)
        results.append(await outgoing.read_all())
        await session.wait_closed()

    async with serve(streaming) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/echo")
        assert session.status == 200
        sid = session.open_stream()
        session.send(sid, b"hello ")
        session.send(sid, b"world", end_stream=True)
        assert await session.read_until_end(sid) == b"hello world"
        await client.wait_for(lambda: [s for s in client.server_streams if s % 4 == 1])
        server_sid = next(s for s in client.server_streams if s % 4 == 1)
        assert await session.read_until_end(server_sid) == b"ping from server"
        session.send(server_sid, b"pong", end_stream=True)
        await wt.until(lambda: results)
        assert results == [b"pong"]


async def test_unidirectional_streams_both_ways(make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    streaming = make_streaming()

    @streaming.handle_webtransport("/uni")
    async def uni(session: WebTransportSession) -> None:
        incoming = await session.accept_unidirectional_stream()
        data = await incoming.read_all()
        with pytest.raises(StreamClosed):
            incoming.write(b"no")
        outgoing = await session.open_unidirectional_stream()
        outgoing.write(data.upper(), end_stream=True)
        await session.wait_closed()

    async with serve(streaming) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/uni")
        sid = session.open_stream(unidirectional=True)
        session.send(sid, b"one way", end_stream=True)
        await client.wait_for(lambda: [s for s in client.server_streams if s % 4 == 3])
        server_sid = next(s for s in client.server_streams if s % 4 == 3)
        assert await session.read_until_end(server_sid) == b"ONE WAY"


async def test_datagrams_both_ways_and_size_limit(make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    streaming = make_streaming({"webtransport": {"max_datagram_size": 100}})
    errors: list[str] = []

    @streaming.handle_webtransport("/dgram")
    async def dgram(session: WebTransportSession) -> None:
        try:
            session.send_datagram(b"x" * 101)
        except ValueError as exc:
            errors.append(str(exc))
        while True:
            data = await session.receive_datagram()
            session.send_datagram(b"echo:" + data)

    async with serve(streaming) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/dgram")

        def send_until_echoed() -> bool:  # datagrams may be lost: resend until one comes back
            return b"echo:hi" in client.datagrams

        for _ in range(20):
            session.send_datagram(b"hi")
            session.send_datagram(b"y" * 150)  # over the limit: dropped by the server
            try:
                await client.wait_for(send_until_echoed, timeout=0.25)
                break
            except TimeoutError:
                continue
        assert b"echo:hi" in client.datagrams
        assert all(len(d) <= 100 for d in client.datagrams)
        assert errors and "webtransport.max_datagram_size" in errors[0] and "101" in errors[0]
        assert srv.streaming.stats_counters().get("webtransport.datagrams_dropped", 0) >= 1


async def test_unknown_path_is_404_and_plain_requests_too(server: RunningServer, wt: ClientKit) -> None:
    async with wt.client(server.port) as client:
        session = await wt.session(client, server.port, "/nowhere")
        assert session.status == 404
        stream_id = client._quic.get_next_available_stream_id()
        client.h3.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"https"),
                                           (b":authority", b"127.0.0.1"), (b":path", b"/")], end_stream=True)
        client.transmit()
        response = await client.wait_for(lambda: client.responses.get(stream_id))
        assert response[b":status"] == b"404"
    assert server.streaming.connections == {}


async def test_origins_refused_allowed_and_own(make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    streaming = make_streaming({"webtransport": {"allowed_origins": ["https://*.example.com"]}})
    async with serve(streaming) as srv, wt.client(srv.port) as client:
        evil = await wt.session(client, srv.port, "/wt", [(b"origin", b"https://evil.test")])
        assert evil.status == 403
        partner = await wt.session(client, srv.port, "/wt", [(b"origin", b"https://app.example.com")])
        assert partner.status == 200
        own = await wt.session(client, srv.port, "/wt", [(b"origin", f"http://127.0.0.1:{srv.port}".encode())])
        assert own.status == 200
        await wt.until(lambda: len(srv.streaming.connections) == 2)


async def test_authentication_refused_is_403_and_identity_kept(make_streaming: Callable[..., Streaming],
                                                               wt: ClientKit) -> None:
    class Auth:
        @hookimpl
        def streaming_authenticate(self, request: ConnectionRequest) -> Identity:
            token = request.query.get("token")
            if token != "good":
                raise Refused("bad token")
            return Identity("alice")

    streaming = make_streaming(plugins=[Auth()])
    async with serve(streaming) as srv, wt.client(srv.port) as client:
        refused = await wt.session(client, srv.port, "/wt?token=bad")
        assert refused.status == 403
        accepted = await wt.session(client, srv.port, "/wt?token=good")
        assert accepted.status == 200
        await wt.until(lambda: srv.streaming.connections)
        (conn,) = srv.streaming.connections.values()
        assert conn.user_id == "alice" and conn.transport == "webtransport"


async def test_session_learns_peer_went_away(make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    streaming = make_streaming()
    seen: list[tuple[int, str]] = []
    ended = asyncio.Event()

    class Watch:
        @hookimpl
        def streaming_disconnected(self, connection: Connection, code: int, reason: str) -> None:
            seen.append((code, reason))
            ended.set()

    streaming.plugins.register(Watch())
    learned = asyncio.Event()

    @streaming.handle_webtransport("/watch")
    async def watch(session: WebTransportSession) -> None:
        await session.wait_closed()
        learned.set()

    async with serve(streaming) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/watch")
        await wt.until(lambda: srv.streaming.connections)
        session.close(4000, "bye")
        await asyncio.wait_for(learned.wait(), 5)
        await asyncio.wait_for(ended.wait(), 5)
        assert seen == [(4000, "bye")]
        assert srv.streaming.connections == {}


async def test_connection_loss_ends_session(make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    streaming = make_streaming()
    async with serve(streaming) as srv:
        async with wt.client(srv.port) as client:
            session = await wt.session(client, srv.port, "/wt")
            session.send_message({"type": "join", "room_id": "r"})
            await session.read_frame("system")
            assert await srv.streaming.presence("r")
        for _ in range(100):  # the client closed its QUIC connection on exit
            if not srv.streaming.connections:
                break
            await asyncio.sleep(0.05)
        assert srv.streaming.connections == {}
        assert await srv.streaming.presence("r") == []


async def test_stream_limit_per_session(make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    streaming = make_streaming({"webtransport": {"max_streams_per_session": 2}})
    accepted: list[int] = []

    @streaming.handle_webtransport("/many")
    async def many(session: WebTransportSession) -> None:
        while True:
            stream = await session.accept_bidirectional_stream()
            accepted.append(stream.stream_id)

    async with serve(streaming) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/many")
        sids = [session.open_stream() for _ in range(3)]
        for sid in sids:
            session.send(sid, b"x")
        await client.wait_for(lambda: sids[2] in client.reset)
        assert accepted == sids[:2]


async def test_max_sessions_is_503(make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    streaming = make_streaming({"webtransport": {"max_sessions": 1}})
    async with serve(streaming) as srv, wt.client(srv.port) as client:
        first = await wt.session(client, srv.port, "/wt")
        second = await wt.session(client, srv.port, "/wt")
        assert (first.status, second.status) == (200, 503)


async def test_handler_failure_closes_only_its_session(make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    streaming = make_streaming()

    @streaming.handle_webtransport("/boom")
    async def boom(session: WebTransportSession) -> None:
        raise RuntimeError("handler bug")

    async with serve(streaming) as srv, wt.client(srv.port) as client:
        other = await wt.session(client, srv.port, "/wt")
        broken = await wt.session(client, srv.port, "/boom")
        assert await broken.closed_by_server() == (1011, "internal error")
        other.send_message({"type": "join", "room_id": "r"})
        assert (await other.read_frame("system"))["event"] == "room.joined"
