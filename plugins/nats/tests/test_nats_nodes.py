"""Forge nodes as separate ``forge-streaming serve`` processes over real nats-servers, with real WebSocket clients:
one order everywhere under concurrent publishers, exact resume from any node, history that outlives every
forge node and a nats-server SIGKILL, outages seen and recovered, dead nodes' users leaving; and three
nats-servers in a cluster (routes on loopback, the stream and the presence bucket on three replicas) whose
stream leader is SIGKILLed under traffic: no acknowledged message lost, none delivered twice, one order."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import nats
import pytest
from forge_streaming.testing import RoomClient, free_port

pytest.importorskip("forge_streaming_websocket")

from websockets.asyncio.client import connect  # noqa: E402

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def ws_member(node: Any, room: str, since: int | None = None) -> AsyncIterator[RoomClient]:
    async with connect(f"{node.ws_url}/ws") as ws:
        member = RoomClient(ws)
        try:
            await member.join(room, since)
            yield member
        finally:
            await member.close()


async def until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def _has_messages(member: RoomClient, count: int) -> Callable[[], bool]:
    return lambda: len(member.messages()) == count


def strictly_increasing(positions: list[int]) -> bool:
    return all(b > a for a, b in zip(positions, positions[1:], strict=False))


async def http_publish(node: Any, room: str, data: Any) -> int:
    async with httpx.AsyncClient(timeout=15) as http:
        r = await http.post(f"{node.url}/api/publish", json={"room_id": room, "data": data},
                            headers={"Authorization": "Bearer test-key"})
        r.raise_for_status()
        return int(r.json()["sequence"])


async def health(node: Any) -> int:
    async with httpx.AsyncClient(timeout=5) as http:
        try:
            return (await http.get(f"{node.url}/healthz")).status_code
        except httpx.HTTPError:
            return 0


async def test_two_publishers_on_two_nodes_give_every_member_one_order(nats_server: Any, forge_nodes: Any) -> None:
    a, b = forge_nodes([nats_server.url], "a", "b", stream="NODES1", subject_prefix="nodes1",
                       presence_bucket="NODES1_P")
    room = "chat"
    async with ws_member(a, room) as alice, ws_member(b, room) as bob, ws_member(a, room) as watch_a, \
            ws_member(b, room) as watch_b:

        async def talk(member: RoomClient, who: str) -> None:
            for n in range(40):
                await member.send(room, f"{who}{n}")
                if n % 5 == 0:
                    await asyncio.sleep(0.005)

        posts = [http_publish(n, room, f"{n.name}-http{i}") for i in range(10) for n in (a, b)]
        http_sent = await asyncio.gather(talk(alice, "alice"), talk(bob, "bob"), *posts)
        await until(lambda: len(watch_a.messages()) == 100 and len(watch_b.messages()) == 100,
                    what="both watchers hearing all 100 messages")
        await asyncio.sleep(0.3)
        seen_a, seen_b = watch_a.messages(), watch_b.messages()
        assert seen_a == seen_b, "the two nodes' members disagree on the order or the positions"
        positions = [p for p, _ in seen_a]
        assert strictly_increasing(positions), "positions not strictly increasing"
        assert len({d for _, d in seen_a}) == 100, "a message lost or repeated"
        assert sorted(p for p in http_sent if isinstance(p, int)) == sorted(
            p for p, d in seen_a if str(d).endswith(tuple(f"http{i}" for i in range(10)))), \
            "the HTTP API returns the position the members see"
        # each sender hears everyone but itself, in the same order
        assert alice.messages() == [(p, d) for p, d in seen_a if not str(d).startswith("alice")]
        assert bob.messages() == [(p, d) for p, d in seen_a if not str(d).startswith("bob")]
        assert "resync" not in watch_a.events() + watch_b.events()


async def test_resume_from_any_node_is_exact(nats_server: Any, forge_nodes: Any) -> None:
    a, b = forge_nodes([nats_server.url], "a", "b", stream="NODES2", subject_prefix="nodes2",
                       presence_bucket="NODES2_P")
    async with ws_member(a, "r") as watcher:
        for i in range(12):
            await http_publish(a if i % 2 else b, "r", i)
        await until(lambda: len(watcher.messages()) == 12, what="12 messages")
    seen = watcher.messages()
    for node in (a, b):
        for cut in (0, 5, 11):
            async with ws_member(node, "r", since=seen[cut][0]) as back:
                await until(_has_messages(back, 11 - cut), what="the replay")
                await asyncio.sleep(0.2)
                assert back.messages() == seen[cut + 1:], f"resume on {node.name} after message {cut}"
                assert "resync" not in back.events()
    (c,) = forge_nodes([nats_server.url], "c", stream="NODES2", subject_prefix="nodes2",
                       presence_bucket="NODES2_P")  # a node that heard none of it: the stream answers
    async with ws_member(c, "r", since=seen[3][0]) as late:
        await until(lambda: len(late.messages()) == 8, what="the replay from the stream on node c")
        assert late.messages() == seen[4:] and "resync" not in late.events()


async def test_a_burst_is_stored_in_batches_yet_one_order_and_exact_to_resume_from_anywhere(
        nats_server: Any, forge_nodes: Any) -> None:
    """A member writes 30 messages at once: node a stores them in a few batches (fewer stored messages than
    room messages); members of both nodes see them in the order sent under the same strictly increasing
    positions, and a resume from any of them, on either node, gets exactly the rest."""
    a, b = forge_nodes([nats_server.url], "a", "b", stream="NODES5", subject_prefix="nodes5",
                       presence_bucket="NODES5_P")
    async with ws_member(a, "burst") as talker, ws_member(a, "burst") as watch_a, \
            ws_member(b, "burst") as watch_b:
        for n in range(30):  # back to back: the node reads them in one loop turn, or a few
            await talker.send("burst", n)
        await until(lambda: len(watch_a.messages()) == 30 and len(watch_b.messages()) == 30, what="30 messages")
        seen = watch_a.messages()
        assert seen == watch_b.messages() and [d for _, d in seen] == list(range(30))
        assert strictly_increasing([p for p, _ in seen])
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jsm().stream_info("NODES5", subjects_filter="nodes5.rooms.burst")
        stored = (info.state.subjects or {}).get("nodes5.rooms.burst", 0)
    finally:
        await nc.close()
    assert 0 < stored < 30, f"{stored} stored messages for 30 room messages: no batch"
    for node in (a, b):
        for cut in (0, 7, 15, 28, 29):
            async with ws_member(node, "burst", since=seen[cut][0]) as back:
                await until(_has_messages(back, 29 - cut), what=f"the replay on {node.name} after {cut}")
                await asyncio.sleep(0.1)
                assert back.messages() == seen[cut + 1:] and "resync" not in back.events(), (node.name, cut)


async def test_history_outlives_every_forge_node_and_a_nats_server_sigkill(own_nats: Any, forge_nodes: Any) -> None:
    a, b = forge_nodes([own_nats.url], "a", "b", stream="NODES3", subject_prefix="nodes3", presence_bucket="NODES3_P")
    first = [await http_publish(a if i % 2 else b, "h", i) for i in range(6)]
    assert strictly_increasing(first)
    for node in (a, b):
        node.stop()
    own_nats.kill(signal.SIGKILL)  # file storage: what was acknowledged is on disk
    own_nats.start()
    for node in (a, b):
        node.start()
    for node in (a, b):
        async with ws_member(node, "h", since=first[1]) as back:
            await until(_has_messages(back, 4), what=f"the replay on {node.name}")
            assert [p for p, _ in back.messages()] == first[2:] and [d for _, d in back.messages()] == [2, 3, 4, 5]
            assert "resync" not in back.events()
    later = await http_publish(b, "h", 6)
    assert later > first[-1], "a position after the restarts is above every earlier one"


async def test_a_nats_outage_is_seen_then_recovered_without_resync(own_nats: Any, forge_nodes: Any) -> None:
    a, b = forge_nodes([own_nats.url], "a", "b", stream="NODES4", subject_prefix="nodes4", presence_bucket="NODES4_P")
    async with ws_member(a, "live") as alice, ws_member(b, "live") as bob:
        await http_publish(a, "live", "before")
        await until(lambda: len(bob.messages()) == 1 and len(alice.messages()) == 1, what="the first message")
        own_nats.kill(signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (await health(a), await health(b)) != (503, 503):
            await asyncio.sleep(0.05)
        assert (await health(a), await health(b)) == (503, 503), "/healthz did not report the outage"
        async with httpx.AsyncClient(timeout=5) as http:
            body = (await http.get(f"{b.url}/healthz")).json()
        assert body["backend"]["name"] == "nats" and body["backend"]["state"] in ("down", "connecting"), body
        await alice.send("live", "during")  # held by node a until JetStream answers again
        own_nats.start()
        await until(lambda: [d for _, d in bob.messages()] == ["before", "during"], timeout=20,
                    what="the message sent during the outage, once the server is back")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (await health(a), await health(b)) != (200, 200):
            await asyncio.sleep(0.05)
        assert (await health(a), await health(b)) == (200, 200)
        await http_publish(b, "live", "after")
        await until(lambda: [d for _, d in bob.messages()] == ["before", "during", "after"], what="after")
        assert strictly_increasing([p for p, _ in bob.messages()])
        assert "resync" not in alice.events() + bob.events(), "nothing was lost: no resync"
        async with httpx.AsyncClient(timeout=5) as http:
            stats = (await http.get(f"{a.url}/healthz")).json()["backend"]["detail"]
        assert "stream NODES4" in stats and "lag" in stats, stats


async def test_a_killed_nodes_users_leave_within_a_bounded_time(nats_server: Any, forge_nodes: Any) -> None:
    a, b = forge_nodes([nats_server.url], "a", "b", stream="NODES5", subject_prefix="nodes5",
                       presence_bucket="NODES5_P")
    async with ws_member(a, "p") as alice, ws_member(b, "p") as bob:
        bob_id = bob.joined("p")["user_id"]
        await until(lambda: bob_id in [f["user_id"] for f in alice.of("join")], what="alice hearing bob join")
        await until(lambda: len(a.rooms().get("p", [])) == 2, what="bob in presence on a")
        b.stop(signal.SIGKILL)
        killed = time.monotonic()
        await until(lambda: bob_id in [f["user_id"] for f in alice.of("leave")], timeout=15,
                    what="a leave frame for the killed node's user")
        took = time.monotonic() - killed
        assert took < 2 + 4, f"the leave came {took:.1f}s after the kill (presence_ttl is 2s)"
        assert a.rooms()["p"] == [alice.joined("p")["user_id"]]


async def test_a_node_stopped_past_its_presence_ttl_is_a_leave_and_back_a_join(nats_server: Any,
                                                                              forge_nodes: Any) -> None:
    """A partition (SIGSTOP past presence_ttl): the others hear 'leave'; when it comes back, 'join'."""
    a, b = forge_nodes([nats_server.url], "a", "b", stream="NODES6", subject_prefix="nodes6",
                       presence_bucket="NODES6_P")
    async with ws_member(a, "p") as alice, ws_member(b, "p") as bob:
        bob_id = bob.joined("p")["user_id"]

        def heard() -> list[str]:
            return [f["type"] for f in alice.frames if f.get("user_id") == bob_id and f["type"] in ("join", "leave")]

        await until(lambda: heard() == ["join"], what="alice hearing bob join")
        await until(lambda: len(a.rooms().get("p", [])) == 2, what="bob in presence on a")  # in the bucket
        assert b.server is not None
        b.server.proc.send_signal(signal.SIGSTOP)
        try:
            await until(lambda: heard() == ["join", "leave"], timeout=15, what="a leave once b's liveness expired")
        finally:
            b.server.proc.send_signal(signal.SIGCONT)
        await until(lambda: heard() == ["join", "leave", "join"], timeout=15, what="a join once b is back")
        await until(lambda: len(a.rooms().get("p", [])) == 2, what="bob in presence on a again")


async def _stream_leader(urls: list[str], stream: str, timeout: float = 20) -> str:
    nc = await nats.connect(urls)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = await nc.jsm().stream_info(stream)
                if info.cluster is not None and info.cluster.leader:
                    return info.cluster.leader
            except Exception:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def test_the_stream_leader_killed_under_traffic_loses_and_repeats_nothing(make_nats_server: Any,
                                                                             forge_nodes: Any) -> None:
    cluster_ports = [free_port() for _ in range(3)]
    servers = [make_nats_server(f"s{i + 1}", cluster_port=cluster_ports[i], routes=cluster_ports) for i in range(3)]
    for server in servers:
        server.start()
    urls = [s.url for s in servers]
    settings = {"stream": "CLUSTER", "subject_prefix": "cluster", "presence_bucket": "CLUSTER_P", "replicas": 3,
                "connect_timeout": "10s"}
    a, b = forge_nodes(urls, "a", "b", **settings)
    leader = await _stream_leader(urls, "CLUSTER")
    victim = next(s for s in servers if s.name == leader)

    acknowledged: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def publisher(node: Any) -> None:
        n = 0
        async with httpx.AsyncClient(timeout=15) as http:
            while not stop.is_set():
                data = f"{node.name}{n}"
                n += 1
                try:
                    r = await http.post(f"{node.url}/api/publish", json={"room_id": "c", "data": data},
                                        headers={"Authorization": "Bearer test-key"})
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    acknowledged.append((int(r.json()["sequence"]), data))
                await asyncio.sleep(0.01)

    async with ws_member(a, "c") as watch_a, ws_member(b, "c") as watch_b:
        tasks = [asyncio.create_task(publisher(node)) for node in (a, b)]
        try:
            await until(lambda: len(acknowledged) >= 40, what="traffic before the kill")
            victim.kill(signal.SIGKILL)
            mark = len(acknowledged)
            await until(lambda: len(acknowledged) >= mark + 60, timeout=40, what="traffic going on after the kill")
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        expected = sorted(acknowledged)
        await until(lambda: {p for p, _ in expected} <= {p for p, _ in watch_a.messages()}
                    and {p for p, _ in expected} <= {p for p, _ in watch_b.messages()}, timeout=30,
                    what="every acknowledged message reaching both nodes' members")
        await asyncio.sleep(0.5)
        seen_a, seen_b = watch_a.messages(), watch_b.messages()
        for seen in (seen_a, seen_b):
            assert strictly_increasing([p for p, _ in seen]), "out of order"
            assert len({d for _, d in seen}) == len(seen), "a message delivered twice"
            assert set(expected) <= set(seen), "an acknowledged message lost"
        assert seen_a == seen_b, "the nodes' members disagree"
        assert "resync" not in watch_a.events() + watch_b.events()
