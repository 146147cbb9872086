"""Room history is bounded in bytes (per room and in total) as well as in count, and freed with its room
(issue 16, item 1): evicting moves the room's floor, so a resume across what was evicted is a resync."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import websockets
from forge_streaming import ConfigError, Envelope, RoomHistory, Streaming
from forge_streaming.config import build_config
from forge_streaming.testing import eventually, open_connection, serve

KIB = 1024


def envelope(room: str, sequence: int, size: int) -> Envelope:
    return Envelope(room=room, payload=b"x" * size, sequence=sequence)


def history(**kwargs: Any) -> RoomHistory:
    settings: dict[str, Any] = {"size": 100, "max_rooms": 100, "max_bytes": 10 * KIB, "total_bytes": 25 * KIB}
    settings.update(kwargs)
    return RoomHistory(**settings)


def sequences(found: list[Envelope] | None) -> list[int | None] | None:
    return None if found is None else [e.sequence for e in found]


def test_a_room_keeps_its_newest_messages_within_its_byte_bound() -> None:
    log = history()
    base = time.time_ns() // 1000 + 10**6  # ahead of every log's floor
    for n in range(10):
        log.record(envelope("r", base + n, 3 * KIB))
    assert sequences(log.since("r", base + 6)) == [base + 7, base + 8, base + 9]  # 9 KiB of 10
    assert log.bytes_held == 9 * KIB
    assert log.since("r", base + 5) is None, "a resume across evicted messages is a resync, never a hole"


def test_the_total_bound_evicts_the_least_recently_used_room_first() -> None:
    log = history()
    base = time.time_ns() // 1000 + 10**6  # ahead of every log's floor
    for room in ("old", "mid", "new"):
        for n in range(3):
            log.record(envelope(room, base + n, 3 * KIB))  # 9 KiB each, 27 KiB > 25 KiB in all
    assert log.bytes_held <= 25 * KIB
    assert log.since("old", base - 1) is None, "the least recently used room lost its oldest message"
    assert sequences(log.since("old", base)) == [base + 1, base + 2]
    assert sequences(log.since("new", base - 1)) == [base, base + 1, base + 2]
    assert sequences(log.since("mid", base - 1)) == [base, base + 1, base + 2]


def test_a_message_larger_than_the_room_bound_is_not_kept_and_moves_the_floor() -> None:
    log = history()
    base = time.time_ns() // 1000 + 10**6  # ahead of every log's floor
    log.record(envelope("r", base, KIB))
    log.record(envelope("r", base + 1, 11 * KIB))
    assert log.bytes_held == 0
    assert log.since("r", base) is None
    assert log.since("r", base + 1) == []


def test_merged_history_respects_the_bounds() -> None:
    log = history()
    base = time.time_ns() // 1000 + 10**6  # ahead of every log's floor
    log.track("r")
    log.merge("r", base - 100, [envelope("r", base - 50 + n, 2 * KIB) for n in range(20)])
    assert log.bytes_held == 10 * KIB
    assert sequences(log.since("r", base - 50 + 14)) == [base - 50 + n for n in range(15, 20)]
    assert log.since("r", base - 50 + 13) is None


def test_forgetting_a_room_frees_its_bytes() -> None:
    log = history()
    base = time.time_ns() // 1000 + 10**6  # ahead of every log's floor
    for n in range(3):
        log.record(envelope("a", base + n, KIB))
        log.record(envelope("b", base + n, KIB))
    log.forget("a")
    assert log.bytes_held == 3 * KIB and log.usage() == {"rooms": 1, "messages": 3, "bytes": 3 * KIB}
    log.forget("b")
    assert log.bytes_held == 0 and log.usage()["rooms"] == 0


def test_the_bounds_are_config_keys_with_defaults() -> None:
    rooms = build_config({}, environ={}).rooms
    assert (rooms.history_max_bytes, rooms.history_total_bytes) == (1 * 1024 * KIB, 64 * 1024 * KIB)
    rooms = build_config({"rooms": {"history_max_bytes": "256KiB", "history_total_bytes": "8MiB"}}, environ={}).rooms
    assert (rooms.history_max_bytes, rooms.history_total_bytes) == (256 * KIB, 8 * 1024 * KIB)
    with pytest.raises(ConfigError, match="rooms.history_max_bytes"):
        build_config({"rooms": {"history_max_bytes": "lots"}}, environ={})


async def test_history_of_an_empty_room_is_freed_after_the_linger() -> None:
    service = Streaming({"rooms": {"history_linger": "100ms"}})
    async with service.running():
        conn = await open_connection(service)
        await conn.join_room("r")
        first = await service.broadcast("r", "kept while the room lives")
        assert first is not None
        await conn.close()
        stats = service._history.usage()  # noqa: SLF001 (the kernel's own accounting)
        assert stats["messages"] == 1
        await eventually(lambda: service._history.usage()["rooms"] == 0, timeout=5,  # noqa: SLF001
                         what="history freed after the linger")
        back = await open_connection(service)
        await back.join_room("r", since=first - 1)
        assert back.frames("message") == [], "a newcomer is not replayed what was freed"
        assert back.frames("system")[-1]["event"] == "resync"


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def test_one_client_filling_40_rooms_is_bounded_and_freed_after_the_linger() -> None:
    """The issue's attack: 100 x 60 KB messages into each of 40 rooms, then everyone leaves."""
    rooms, per_room, size = 40, 100, 60_000
    service = Streaming({"rooms": {"history_linger": "500ms"}, "api": {"key": "k"}})
    async with serve(service) as server:
        rss_before = rss_bytes()
        started = time.monotonic()
        async with websockets.connect(server.ws_url + "/ws", max_size=None) as ws:
            for n in range(rooms):
                await ws.send(json.dumps({"type": "join", "room_id": f"room-{n}"}))
            joined = 0
            while joined < rooms:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
                joined += frame.get("event") == "room.joined"
            first = service.room_position("room-0")
            data = "x" * size
            for _ in range(per_room):
                for n in range(rooms):
                    await ws.send(json.dumps({"type": "message", "room_id": f"room-{n}", "data": data}))
            await eventually(lambda: service.stats_counters()["published"] == rooms * per_room, timeout=60,
                             what="every message published")
            held = service._history.usage()  # noqa: SLF001
            rss_full = rss_bytes()
        elapsed = time.monotonic() - started
        config = service.config.rooms
        assert held["bytes"] <= min(config.history_total_bytes, rooms * config.history_max_bytes)
        assert held["messages"] < rooms * per_room
        grown = rss_full - rss_before
        assert grown < 150 * 1024 * KIB, f"RSS grew by {grown / 2**20:.0f} MiB holding {held['bytes'] / 2**20:.0f} MiB"
        # everyone left: after the linger the history is freed
        await eventually(lambda: service._history.usage()["bytes"] == 0, timeout=10,  # noqa: SLF001
                         what="history freed after the linger")
        assert service._history.usage()["rooms"] == 0  # noqa: SLF001
        async with websockets.connect(server.ws_url + "/ws") as newcomer:
            await newcomer.send(json.dumps({"type": "join", "room_id": "room-0", "since": (first or 1) - 1}))
            seen: list[dict[str, Any]] = []
            while not any(f.get("event") == "resync" for f in seen):
                seen.append(json.loads(await asyncio.wait_for(newcomer.recv(), 5)))
            with pytest.raises(TimeoutError):
                while True:
                    frame = json.loads(await asyncio.wait_for(newcomer.recv(), 0.5))
                    assert frame.get("type") != "message", "a newcomer is not replayed the old messages"
        print(f"40 rooms x 100 x 60 KB in {elapsed:.1f}s: history held {held['bytes'] / 2**20:.1f} MiB "
              f"in {held['messages']} messages; RSS +{grown / 2**20:.0f} MiB")
