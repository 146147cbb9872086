"""The NATS room store beyond the contract kit: a node that dies, hangs or restarts leaves presence within
a bounded time (per-key TTL on the server), and the kernel is told who left or came back."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from forge_streaming import Member
from forge_streaming.testing import eventually, run
from forge_streaming_nats import NatsRoomStore, NatsSettings

TTL = 2


class Changes:
    """A RoomStoreListener that records (room, joined user ids, left user ids)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[str], list[str]]] = []

    def on_members_changed(self, room: str, joined: Sequence[Member], left: Sequence[Member]) -> None:
        self.seen.append((room, [m.user_id for m in joined], [m.user_id for m in left]))


def _settings(url: str, bucket: str) -> NatsSettings:
    return NatsSettings(servers=(url,), presence_bucket=bucket, storage="memory", presence_ttl=TTL, heartbeat=0.5,
                        reconnect_wait=0.1, ping_interval=1)


@contextlib.asynccontextmanager
async def stores(url: str, *nodes: str,
                 bucket: str | None = None) -> AsyncIterator[list[tuple[NatsRoomStore, Changes]]]:
    name = bucket or f"P{uuid.uuid4().hex[:8].upper()}"
    made = [(NatsRoomStore(_settings(url, name)), Changes()) for _ in nodes]
    try:
        for node, (store, changes) in zip(nodes, made, strict=True):
            store.watch(changes)
            await store.start(node)
        yield made
    finally:
        for store, _ in made:
            with contextlib.suppress(Exception):
                await store.stop()


async def _die(store: NatsRoomStore) -> None:
    """As a SIGKILL would: no more heartbeats, the connection gone, nothing cleaned up."""
    assert store._beat is not None and store._link is not None
    store._beat.cancel()
    store._stopping = True
    await store._link.nc.close()


def test_a_dead_node_leaves_presence_within_its_ttl(nats_server: Any) -> None:
    async def scenario() -> None:
        async with stores(nats_server.url, "a", "b") as [(a, changes), (b, _)]:
            await a.add_member("r", Member("a1", "alice", "a"))
            await b.add_member("r", Member("b1", "bob", "b"))
            await eventually(lambda: _users(a, "r") == {"alice", "bob"}, what="a seeing bob")
            await _die(b)
            died = time.monotonic()
            await eventually(lambda: ("r", [], ["bob"]) in changes.seen, timeout=TTL + 5, what="bob reported gone")
            took = time.monotonic() - died
            assert took < TTL + 3, f"bob left after {took:.1f}s"
            assert await a.users("r") == ["alice"]
            assert "1 other node" not in a.health().detail

    run(scenario(), timeout=30)


def test_a_node_back_from_a_pause_brings_its_members_back(nats_server: Any) -> None:
    async def scenario() -> None:
        async with stores(nats_server.url, "a", "b") as [(a, changes), (b, _)]:
            await b.add_member("r", Member("b1", "bob", "b"))
            await eventually(lambda: _users(a, "r") == {"bob"}, what="a seeing bob")
            assert b._beat is not None
            b._beat.cancel()  # a partition: b stops refreshing its liveness
            await eventually(lambda: ("r", [], ["bob"]) in changes.seen, timeout=TTL + 5, what="bob gone")
            b._beat = asyncio.create_task(b._beat_loop())  # healed: its own delete marker makes it announce itself
            await eventually(lambda: ("r", ["bob"], []) in changes.seen, timeout=TTL + 5, what="bob back")
            assert _users(a, "r") == {"bob"}

    run(scenario(), timeout=30)


def test_a_node_restarted_under_the_same_id_hides_its_previous_life(nats_server: Any) -> None:
    bucket = f"P{uuid.uuid4().hex[:8].upper()}"

    async def scenario() -> None:
        async with stores(nats_server.url, "a", "b", bucket=bucket) as [(a, changes), (b, _)]:
            await b.add_member("r", Member("b1", "bob", "b"))
            await eventually(lambda: _users(a, "r") == {"bob"}, what="a seeing bob")
            await _die(b)
            async with stores(nats_server.url, "b", bucket=bucket) as [(b2, _)]:  # back at once, empty
                await b2.add_member("s", Member("b2", "carol", "b"))
                await eventually(lambda: ("r", [], ["bob"]) in changes.seen, timeout=TTL + 3,
                                 what="bob of b's previous life reported gone")
                await eventually(lambda: _users(a, "s") == {"carol"}, what="carol seen")
                assert _users(a, "r") == set()

    run(scenario(), timeout=30)


def test_a_clean_stop_removes_the_nodes_part_at_once(nats_server: Any) -> None:
    async def scenario() -> None:
        async with stores(nats_server.url, "a", "b") as [(a, _), (b, _)]:
            await b.add_member("r", Member("b1", "bob", "b"))
            await eventually(lambda: _users(a, "r") == {"bob"}, what="a seeing bob")
            started = time.monotonic()
            await b.stop()
            await eventually(lambda: not _users(a, "r"), timeout=TTL, what="bob gone without waiting for the TTL")
            assert time.monotonic() - started < TTL
            assert await a.rooms() == []

    run(scenario(), timeout=30)


def test_room_ids_of_any_printable_characters(nats_server: Any) -> None:
    async def scenario() -> None:
        async with stores(nats_server.url, "a", "b.c *>") as [(a, _), (b, _)]:
            for room in ("a.b", "*", ">", "with space", "café"):
                await b.add_member(room, Member(f"c-{room}", "bob", "b.c *>"))
            await eventually(lambda: len(a._view.entries) == 5, what="five rooms seen on a")
            assert sorted(await a.rooms()) == sorted(["a.b", "*", ">", "with space", "café"])
            assert (await a.members("*"))[0].node == "b.c *>"

    run(scenario(), timeout=30)


def _users(store: NatsRoomStore, room: str) -> set[str]:
    return {m.user_id for m in store._view.visible(room).values()} | {
        m.user_id for m in store._local.get(room, {}).values()}

