"""Keep-alive on time: no stream stays silent longer than ``sse.keep_alive_interval`` (issue 17).

The first ``: keep-alive`` used to come after twice the interval (4 s at
2 s, about 30 s with Forge's 15 s): what a stream sends when it opens made
the first check skip it. Real uvicorn server, byte-exact raw SSE client.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from forge_streaming.testing import serve
from forge_streaming_sse import Event, SSEConnection

if TYPE_CHECKING:
    from conftest import Kit, RawSSE

pytestmark = pytest.mark.timeout(30)

INTERVAL = 1.0
SLACK = 1.2  # the first comment, and every silence, within 1.2 x the interval
KEEP_ALIVE = b": keep-alive"


async def blocks_with_times(raw: RawSSE, until: float) -> list[tuple[float, bytes]]:
    """Every event block (comments included) until ``until`` (loop time), with the time it arrived."""
    loop = asyncio.get_running_loop()
    seen: list[tuple[float, bytes]] = []
    while (left := until - loop.time()) > 0:
        try:
            block = await asyncio.wait_for(raw.next_block(), left)
        except TimeoutError:
            break
        assert block is not None, "the stream ended"
        seen.append((loop.time(), block))
    return seen


async def test_first_keep_alive_of_a_room_stream_within_the_interval(kit: type[Kit]) -> None:
    """A room-endpoint stream sends its session and room.joined at once; the first comment still comes on time."""
    streaming = kit.make_streaming({"sse": {"keep_alive_interval": INTERVAL}})
    async with serve(streaming) as server:
        raw = await kit.RawSSE.open(server.url, "/sse?rooms=lobby")
        try:
            opened = asyncio.get_running_loop().time()
            seen = await blocks_with_times(raw, opened + INTERVAL * 2.5)
            comments = [t - opened for t, block in seen if block == KEEP_ALIVE]
            assert [b for _, b in seen if b != KEEP_ALIVE], "the stream's opening events"
            assert comments, f"no keep-alive in {INTERVAL * 2.5}s: {seen}"
            assert comments[0] <= INTERVAL * SLACK, f"first keep-alive after {comments[0]:.2f}s"
        finally:
            await raw.close()


async def test_first_keep_alive_after_a_handlers_opening_event(kit: type[Kit]) -> None:
    streaming = kit.make_streaming({"sse": {"keep_alive_interval": INTERVAL}})

    async def hello_then_quiet(stream: SSEConnection) -> None:
        await stream.send_event(Event("hello"))
        await stream.wait_closed()

    streaming.handle_sse("/quiet", hello_then_quiet)
    async with serve(streaming) as server:
        raw = await kit.RawSSE.open(server.url, "/quiet")
        try:
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(raw.next_block(), 5) == b"retry: 3000\ndata: hello"
            hello = loop.time()
            assert await asyncio.wait_for(raw.next_block(), INTERVAL * 3) == KEEP_ALIVE
            assert loop.time() - hello <= INTERVAL * SLACK, f"first keep-alive after {loop.time() - hello:.2f}s"
        finally:
            await raw.close()


async def test_no_silence_longer_than_the_interval_with_sporadic_traffic(kit: type[Kit]) -> None:
    """Events at odd moments: every silence on the wire ends within 1.2 x the interval."""
    streaming = kit.make_streaming({"sse": {"keep_alive_interval": INTERVAL}})
    streams: list[SSEConnection] = []

    async def talker(stream: SSEConnection) -> None:
        streams.append(stream)
        await stream.wait_closed()

    streaming.handle_sse("/talk", talker)
    async with serve(streaming) as server:
        raw = await kit.RawSSE.open(server.url, "/talk")
        try:
            loop = asyncio.get_running_loop()
            opened = loop.time()

            async def speak() -> None:
                await kit.eventually(lambda: bool(streams))
                for at in (0.3, 1.45, 1.9, 3.35):  # fractions of the interval apart, never on a tick
                    await asyncio.sleep(opened + at * INTERVAL - loop.time())
                    await streams[0].send_event(Event(f"at {at}"))

            speaker = asyncio.ensure_future(speak())
            seen = await blocks_with_times(raw, opened + INTERVAL * 5.5)
            await speaker
            times = [opened] + [t for t, _ in seen]
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            events = [b for _, b in seen if b != KEEP_ALIVE]
            assert len(events) == 4, seen
            assert max(gaps) <= INTERVAL * SLACK, f"a silence of {max(gaps):.2f}s: {seen}"
        finally:
            await raw.close()


async def test_a_busy_stream_gets_no_keep_alive(kit: type[Kit]) -> None:
    """Comments are for idle streams: one that sends more often than the interval is left alone."""
    streaming = kit.make_streaming({"sse": {"keep_alive_interval": INTERVAL}})

    async def busy(stream: SSEConnection) -> None:
        n = 0
        while not stream.done:
            await stream.send_event(Event(str(n)))
            n += 1
            await asyncio.sleep(INTERVAL / 10)

    streaming.handle_sse("/busy", busy)
    async with serve(streaming) as server:
        raw = await kit.RawSSE.open(server.url, "/busy")
        try:
            seen = await blocks_with_times(raw, asyncio.get_running_loop().time() + INTERVAL * 3)
            assert len(seen) >= 15
            assert [b for _, b in seen if b == KEEP_ALIVE] == []
        finally:
            await raw.close()
