"""Two Streaming services in one process, each a node on one real broker: the cluster at kernel level."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import pytest
from forge_streaming import BackendState, Streaming
from forge_streaming.testing import RecordingConnection, open_connection
from forge_streaming_mqtt import MqttSettings


@pytest.fixture(autouse=True)
def _only_these_plugins(streaming_plugins_only: Callable[..., None]) -> None:
    """Whatever the workspace installs, these nodes load the MQTT plugin only (no transports)."""
    streaming_plugins_only("mqtt")


def node_config(url: str, node: str, prefix: str, **mqtt: Any) -> dict[str, Any]:
    settings = {"url": url, "topic_prefix": prefix, "keepalive": "2s", "reconnect_min": "50ms",
                "reconnect_max": "300ms", "connect_timeout": "3s", **mqtt}
    return {"plugins": {"allow": ["mqtt"]}, "server": {"node_id": node},
            "pubsub": {"backend": "mqtt", "mqtt": settings}, "rooms": {"store": "mqtt"}}


@asynccontextmanager
async def nodes(url: str, *names: str, **mqtt: Any) -> AsyncIterator[list[Streaming]]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    async with AsyncExitStack() as stack:
        services = [await stack.enter_async_context(Streaming(node_config(url, n, prefix, **mqtt)).running())
                    for n in names]
        yield services


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    async def poll() -> None:
        while not (await predicate() if asyncio.iscoroutinefunction(predicate) else predicate()):
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def data_of(conn: RecordingConnection) -> list[Any]:
    return [m["data"] for m in conn.frames("message")]


def resynced(conn: RecordingConnection) -> bool:
    return any(f["event"] == "resync" for f in conn.frames("system"))


@pytest.mark.parametrize("qos", [0, 1])
async def test_message_on_one_node_reaches_every_member_once(broker: Any, qos: int) -> None:
    async with nodes(broker.url, "a", "b", qos=qos) as (a, b):
        alice, carol = await open_connection(a), await open_connection(a)
        bob = await open_connection(b)
        for conn in (alice, carol, bob):
            await conn.join_room("r")
        for n in range(20):
            await (alice.broadcast_to_room("r", n) if n % 2 else b.publish("r", n, user_id="srv"))
        await eventually(lambda: len(data_of(bob)) >= 20 and len(data_of(carol)) >= 20, what="20 messages")
        await asyncio.sleep(0.2)  # anything duplicated would have arrived by now
        assert sorted(data_of(bob)) == list(range(20)), "lost or duplicated on node b"
        assert sorted(data_of(carol)) == list(range(20)), "lost or duplicated on node a"
        assert data_of(alice) == [n for n in range(20) if n % 2 == 0], "the sender got its own messages"
        # per-publisher order, and both nodes see the broker's one order
        assert [d for d in data_of(bob) if d % 2] == list(range(1, 20, 2))
        assert data_of(bob) == data_of(carol)
        seqs = [m["sequence"] for m in bob.frames("message")]
        assert seqs == [m["sequence"] for m in carol.frames("message")]


async def test_presence_and_rooms_are_cluster_wide(broker: Any) -> None:
    async with nodes(broker.url, "a", "b") as (a, b):
        alice = await open_connection(a)
        bob = await open_connection(b)
        await alice.join_room("lobby")
        await bob.join_room("lobby")
        await bob.join_room("other")

        async def everyone_sees_everyone() -> bool:
            return all([set(await s.presence("lobby")) == {alice.user_id, bob.user_id}
                        and await s.rooms() == ["lobby", "other"] for s in (a, b)])

        await eventually(everyone_sees_everyone, what="cluster-wide presence")
        await eventually(lambda: [f["user_id"] for f in alice.frames("join")] == [bob.user_id],
                         what="the join notice crossing nodes")
        await bob.close()

        async def bob_gone() -> bool:
            return await a.presence("lobby") == [alice.user_id] and await a.rooms() == ["lobby"]

        await eventually(bob_gone, what="bob leaving presence on node a")
        assert [f["user_id"] for f in alice.frames("leave")] == [bob.user_id]


async def test_resume_on_another_node_gets_what_was_missed(broker: Any) -> None:
    async with nodes(broker.url, "a", "b") as (a, b):
        alice = await open_connection(a)
        await alice.join_room("r")
        seqs = [await a.publish("r", n) for n in range(5)]
        await eventually(lambda: len(data_of(alice)) == 5, what="alice hearing her room")
        # a client last saw seqs[1] on node a, reconnects to node b (which never had the room)
        late = await open_connection(b)
        await late.join_room("r", since=seqs[1])
        assert data_of(late) == [2, 3, 4]
        assert [m["sequence"] for m in late.frames("message")] == seqs[2:]
        assert all(f["event"] != "resync" for f in late.frames("system"))
        # a position nobody can vouch for gets resync (then what this node does hold), never a silent hole
        stale = await open_connection(b)
        await stale.join_room("r", since=1)
        assert [f["event"] for f in stale.frames("system")][-1] == "resync"
        assert data_of(stale) in ([], [2, 3, 4])
        # and new messages keep flowing to the resumed member, once
        await a.publish("r", 5)
        await eventually(lambda: data_of(late) == [2, 3, 4, 5], what="live after resume")


async def test_device_publish_and_mosquitto_sub(broker: Any) -> None:
    async with nodes(broker.url, "a", "b") as (a, b):
        prefix = a.config.section("pubsub.mqtt", MqttSettings).topic_prefix
        alice, bob = await open_connection(a), await open_connection(b)
        await alice.join_room("sensors")
        await bob.join_room("sensors")
        sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t",
                                f"{prefix}/rooms/sensors/messages", "-C", "2", "-W", "10"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            await asyncio.sleep(0.3)  # let mosquitto_sub subscribe
            pub = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-t",
                   f"{prefix}/rooms/sensors/publish"]
            subprocess.run([*pub, "-m", '{"data": {"t": 21.5}, "user_id": "sensor-1"}'], check=True, timeout=10)
            subprocess.run([*pub, "-m", "door open"], check=True, timeout=10)
            await eventually(lambda: len(data_of(alice)) >= 2 and len(data_of(bob)) >= 2, what="device messages")
            await asyncio.sleep(0.2)
            for conn in (alice, bob):
                got = conn.frames("message")
                assert [(m["data"], m["user_id"]) for m in got] == [
                    ({"t": 21.5}, "device:sensor-1"), ("door open", "device:mqtt")]
            assert [m["sequence"] for m in alice.frames("message")] == [m["sequence"] for m in bob.frames("message")]
            out, _ = await asyncio.to_thread(sub.communicate, timeout=10)
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.wait()
        seen = [json.loads(line) for line in out.decode().splitlines()]
        assert [(f["type"], f["data"]) for f in seen] == [("message", {"t": 21.5}), ("message", "door open")]
        # On the broker a frame has no position: the sequencer puts it in the forge-sequence user property,
        # and each node adds it to the frame it delivers.
        assert "sequence" not in seen[0]


async def test_broker_outage_resync_buffer_and_recovery(own_broker: Any) -> None:
    async with nodes(own_broker.url, "a", "b") as (a, b):
        alice, bob = await open_connection(a), await open_connection(b)
        await alice.join_room("r")
        await bob.join_room("r")
        before = await a.publish("r", "before")
        await eventually(lambda: data_of(bob) == ["before"], what="first message")

        own_broker.kill()
        await eventually(lambda: a.health().state is BackendState.DOWN, what="node a noticing the outage")
        assert "unreachable" in a.health().detail
        # buffered, sent once the broker is back: the publisher learns its position then
        during = asyncio.create_task(a.publish("r", "during"))
        await asyncio.sleep(0.2)
        assert not during.done()

        own_broker.start()
        await eventually(lambda: a.health().ok and b.health().ok, timeout=10, what="reconnection")
        for conn in (alice, bob):
            await eventually(partial(resynced, conn), what="resync notice")
        await eventually(lambda: data_of(bob) == ["before", "during"], what="buffered message after reconnect")
        position = await during
        assert position is not None and before is not None and position > before
        await a.publish("r", "after")
        await b.publish("r", "after-b")
        await eventually(lambda: data_of(bob)[-2:] == ["after", "after-b"], what="delivery resumed on b")
        await eventually(lambda: data_of(alice)[-1:] == ["after-b"], what="delivery resumed on a")

        async def presence_rebuilt() -> bool:
            return set(await a.presence("r")) == {alice.user_id, bob.user_id}

        await eventually(presence_rebuilt, what="presence after the broker lost its retained messages")
        # nobody can vouch for what happened during the outage: a resume across it gets resync
        late = await open_connection(b)
        await late.join_room("r", since=before)
        assert [f["event"] for f in late.frames("system")][-1] == "resync"


async def test_healthz_state_covers_the_room_store_connection(broker: Any) -> None:
    async with nodes(broker.url, "a") as (a,):
        assert a.health().ok and "connected to" in a.health().detail
        link = a.store._link  # type: ignore[attr-defined]  # cut only the room store's connection
        await link.stop()
        health = a.health()
        assert not health.ok and health.detail.startswith("room store:")


async def test_a_node_that_stops_announces_itself_offline(broker: Any) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    async with Streaming(node_config(broker.url, "leaving", prefix)).running():
        pass
    # the status is retained: a subscriber that comes later reads the node's last word
    read = await asyncio.to_thread(subprocess.run, [
        "mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", f"{prefix}/nodes/leaving/status",
        "-C", "1", "-W", "5"], capture_output=True, timeout=10)
    assert json.loads(read.stdout)["state"] == "offline", read

