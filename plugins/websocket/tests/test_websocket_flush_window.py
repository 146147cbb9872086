"""``websocket.flush_window``: paced messages to a member leave in fewer writes, each late by at most the window.

A raw client on a real socket records every chunk its socket gives it (one
``read()`` each, read at once in the test's loop): messages written a few
milliseconds apart by separate ``write()`` calls arrive in separate chunks,
messages the server wrote in one call arrive in one.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from forge_streaming import ConfigError, Streaming
from forge_streaming.testing import serve
from websockets.frames import Opcode

pytestmark = pytest.mark.timeout(30)

ROOM = "paced"
SLACK = 0.15
"""Seconds a loop stall on a busy test machine may add on top of the window (a flush is a timer)."""


class Chunk:
    def __init__(self, at: float, numbers: list[int]) -> None:
        self.at = at
        self.numbers = numbers


async def _paced(streaming: Streaming, raw_clients: Any, kit: Any, *, count: int, pace: float
                 ) -> tuple[list[Chunk], dict[int, float]]:
    """Join a raw client to ROOM, publish ``count`` messages ``pace`` s apart; the chunks that carried them."""
    async with serve(streaming) as server:
        client = await raw_clients(server.ws_url + "/ws")
        client.send_text(json.dumps({"type": "join", "room_id": ROOM}).encode())
        await client.read_events(kit.is_json("system", "room.joined"))
        await kit.until(lambda: len(streaming.local_members(ROOM)) == 1)
        await asyncio.sleep(0.3)  # whatever the join sent (presence) is out of the window by now
        chunks: list[Chunk] = []
        seen: set[int] = set()

        async def read() -> None:
            while len(seen) < count:
                data = await client.reader.read(65536)
                assert data, "server closed"
                at = time.monotonic()
                client.protocol.receive_data(data)
                numbers = []
                for frame in client.protocol.events_received():
                    if frame.opcode is Opcode.TEXT:
                        obj = json.loads(frame.data)
                        if obj.get("type") == "message" and str(obj.get("data", "")).startswith("p"):
                            numbers.append(int(obj["data"][1:]))
                if numbers:
                    chunks.append(Chunk(at, numbers))
                    seen.update(numbers)

        reader = asyncio.ensure_future(read())
        sent: dict[int, float] = {}
        for i in range(count):
            sent[i] = time.monotonic()
            await streaming.broadcast(ROOM, f"p{i}")
            await asyncio.sleep(pace)
        await asyncio.wait_for(reader, 10)
        return chunks, sent


def _latencies(chunks: list[Chunk], sent: dict[int, float]) -> dict[int, float]:
    return {n: chunk.at - sent[n] for chunk in chunks for n in chunk.numbers}


async def test_without_window_each_paced_message_is_its_own_write(kit: Any, make_streaming: Any,
                                                                  raw_clients: Any) -> None:
    """The control: the default flushes at the end of the loop turn, so 5 ms apart means one write each."""
    chunks, sent = await _paced(make_streaming(), raw_clients, kit, count=5, pace=0.005)
    assert sorted(n for c in chunks for n in c.numbers) == list(range(5))
    assert len(chunks) >= 4, [c.numbers for c in chunks]
    assert max(_latencies(chunks, sent).values()) < 0.05


async def test_window_puts_paced_messages_in_one_write_late_by_at_most_the_window(
        kit: Any, make_streaming: Any, raw_clients: Any) -> None:
    window = 0.1
    streaming = make_streaming({"websocket": {"flush_window": "100ms"}})
    chunks, sent = await _paced(streaming, raw_clients, kit, count=5, pace=0.004)
    assert sorted(n for c in chunks for n in c.numbers) == list(range(5))
    latencies = _latencies(chunks, sent)
    if sent[4] - sent[0] < window * 0.8:  # the machine kept the pace: all five were marked within one window
        assert [c.numbers for c in chunks] == [[0, 1, 2, 3, 4]]
    else:
        assert len(chunks) <= 2, [c.numbers for c in chunks]
    assert latencies[0] >= window * 0.8  # the first message waited for the window ...
    assert max(latencies.values()) <= window + SLACK  # ... and none waited much longer than it


async def test_sustained_paced_traffic_fewer_writes_latency_bounded(kit: Any, make_streaming: Any,
                                                                    raw_clients: Any) -> None:
    window = 0.02
    streaming = make_streaming({"websocket": {"flush_window": "20ms"}})
    chunks, sent = await _paced(streaming, raw_clients, kit, count=40, pace=0.004)
    numbers = [n for c in chunks for n in c.numbers]
    assert numbers == list(range(40))  # in order, none lost
    assert len(chunks) <= 40 // 2, [c.numbers for c in chunks]
    lat = _latencies(chunks, sent)
    assert max(lat.values()) <= window + SLACK, ([(c.numbers, round(c.at - sent[0], 4)) for c in chunks], lat)


def test_flush_window_config(make_streaming: Any) -> None:
    default = make_streaming()
    assert default.transports["websocket"].settings.flush_window == 0
    assert default.transports["websocket"].flush_scheduler is None  # the kernel's end-of-turn flush
    on = make_streaming({"websocket": {"flush_window": "10ms"}})
    assert on.transports["websocket"].flush_scheduler.window == pytest.approx(0.01)
    for bad, expected in (("-5ms", "expected a duration"), ("soon", "expected a duration"), ("2s", "<= 1.0")):
        with pytest.raises(ConfigError) as info:
            make_streaming({"websocket": {"flush_window": bad}})
        assert "websocket.flush_window" in str(info.value) and expected in str(info.value)
