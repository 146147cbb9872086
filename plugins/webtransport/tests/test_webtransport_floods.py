"""What a session's client sends and nobody reads is bounded per session (issue 16.5).

Unread stream data, messages not read yet, datagrams and incoming streams not
accepted yet all count against ``webtransport.read_buffer``; past it (on top of
one message on the message stream, which ``limits.max_message_size`` bounds)
the session is closed 1009 and dropped as ``too large``. The attack of the
issue, 99 unidirectional streams of 1 MB each to the room endpoint (which
never reads them), is run against a ``forge-streaming serve`` process whose
RSS is measured before and after, while two WebSocket members of the same
room keep talking.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import websockets
from forge_streaming import Streaming
from forge_streaming.testing import DropRecorder, ServerProcess, serve
from forge_streaming_webtransport import WebTransportSession

if TYPE_CHECKING:
    from conftest import ClientKit  # the wt fixture's type (test modules do not import conftest at run time)

pytestmark = pytest.mark.timeout(120)

MB = 1_000_000
KiB = 1024


def rss(pid: int) -> int:
    """Resident set size of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")




async def test_99_unread_streams_of_1_mb_close_the_session_and_memory_stays_flat(wt: ClientKit,
                                                                                 tmp_path: Path) -> None:
    env = {"FORGE_STREAMING_PLUGINS_ALLOW": "webtransport,websocket,memory-pubsub,memory-rooms"}
    server = ServerProcess(tmp_path, env=env, config="logging:\n  level: warning\n")
    try:
        async with websockets.connect(server.ws_url + "/ws") as sender, \
                websockets.connect(server.ws_url + "/ws") as keeper, wt.client(server.port) as client:
            for ws in (sender, keeper):
                await ws.send(json.dumps({"type": "join", "room_id": "r"}))
                while json.loads(await ws.recv()).get("event") != "room.joined":
                    pass
            session = await wt.session(client, server.port, "/wt")
            session.send_message({"type": "join", "room_id": "r"})
            await session.read_frame("system")
            before = rss(server.pid)

            # the other members keep talking, 50 messages a second, and the keeper must get each at once
            sent: list[float] = []
            late: list[float] = []

            async def talk() -> None:
                for n in range(10_000):
                    sent.append(time.monotonic())
                    await sender.send(json.dumps({"type": "message", "room_id": "r", "data": n}))
                    await asyncio.sleep(0.02)

            async def keep() -> None:
                while True:
                    frame = json.loads(await keeper.recv())
                    if frame["type"] == "message":
                        late.append(time.monotonic() - sent[frame["data"]])

            talking = asyncio.ensure_future(talk())
            keeping = asyncio.ensure_future(keep())
            try:
                streams = [session.open_stream(unidirectional=True) for _ in range(99)]
                chunk = b"\xaa" * (64 * KiB)
                started = time.monotonic()
                pushed = 0
                for _ in range(MB // len(chunk) + 1):  # 1 MB per stream, a round of 64 KiB on each at a time
                    if session.session_id in client.session_ended or client.terminated:
                        break
                    for sid in streams:
                        session.send(sid, chunk)
                    pushed += len(chunk) * len(streams)
                    await asyncio.sleep(0.05)
                try:
                    closed: tuple[int, str] | None = await asyncio.wait_for(session.closed_by_server(), 15)
                except TimeoutError:
                    closed = None
                closed_after = time.monotonic() - started
                await asyncio.sleep(1.0)  # whatever was in flight has arrived
                after = rss(server.pid)
                stop = len(sent)
                await asyncio.sleep(0.5)
            finally:
                talking.cancel()
                keeping.cancel()
            growth = after - before
            summary = (f"server RSS {before / MB:.1f} MB -> {after / MB:.1f} MB (+{growth / MB:.1f} MB); client "
                       f"pushed {pushed / MB:.1f} MB; session closed: {closed} after {closed_after:.2f}s")
            print(summary)
            assert closed == (1009, "read buffer overflow"), summary
            assert growth < 20 * MB, summary
            # the room kept its pace: every message reached the keeper, none late by more than half a second
            assert len(late) >= stop - 1 and max(late) < 0.5, (len(late), stop, max(late, default=0))
        assert "Traceback" not in server.output()
    finally:
        server.stop()


async def test_unread_data_counts_across_streams_datagrams_and_pending_streams(
        make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    """A handler that reads nothing: many streams each under the bound still close the session past it."""
    drops = DropRecorder()
    streaming = make_streaming({"webtransport": {"read_buffer": "256KiB"}}, plugins=(drops,))
    opened: list[str] = []

    @streaming.handle_webtransport("/deaf")
    async def deaf(session: WebTransportSession) -> None:
        opened.append(session.id)
        await session.wait_closed()

    async with serve(streaming) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/deaf")
        await wt.until(lambda: opened)
        for _ in range(50):
            session.send_datagram(b"d" * 1000)  # about 50 KB of datagrams nobody reads
        for _ in range(8):  # 8 streams of 30 KB: each far under 256 KiB, together over it
            sid = session.open_stream(unidirectional=True)
            session.send(sid, b"s" * 30_000)
            await asyncio.sleep(0.05)
        assert await asyncio.wait_for(session.closed_by_server(), 10) == (1009, "read buffer overflow")
        await wt.until(lambda: not srv.streaming.connections)
        assert drops.reasons == [(opened[0], "too large")]


async def test_reading_handler_is_never_cut_by_the_bound(make_streaming: Callable[..., Streaming],
                                                         wt: ClientKit) -> None:
    """Data that is read does not count: 4 MiB through one stream with a 256 KiB bound."""
    drops = DropRecorder()
    streaming = make_streaming({"webtransport": {"read_buffer": "256KiB"}}, plugins=(drops,))
    received: list[int] = []

    @streaming.handle_webtransport("/sink")
    async def sink(session: WebTransportSession) -> None:
        stream = await session.accept_unidirectional_stream()
        received.append(len(await stream.read_all()))
        await session.wait_closed()

    async with serve(streaming) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/sink")
        sid = session.open_stream(unidirectional=True)
        for _ in range(64):
            session.send(sid, b"r" * (64 * KiB))
            await asyncio.sleep(0.01)
        session.send(sid, b"", end_stream=True)
        await wt.until(lambda: received, timeout=20)
        assert received == [4 * 1024 * 1024]
        assert drops.reasons == []
