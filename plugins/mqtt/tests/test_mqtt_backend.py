"""The MQTT backend's own promises beyond the contract kit: subscriptions, the outage buffer, settings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from forge_streaming import BackendState, ConfigError, Envelope, EnvelopeKind, Streaming
from forge_streaming.testing import RecordingListener, run
from forge_streaming_mqtt import MqttPubSub, MqttSettings
from forge_streaming_mqtt.continuity import DUPLICATE, MALFORMED, Continuity, Numbering
from forge_streaming_mqtt.sequencer import MARK_DELAY, announcement
from forge_streaming_mqtt.topics import Topics
from paho.mqtt.enums import CallbackAPIVersion


def _envelope(room: str, n: int) -> Envelope:
    return Envelope(room=room, payload=f'{{"n":{n}}}'.encode(), kind=EnvelopeKind.MESSAGE, node="b")


@contextlib.asynccontextmanager
async def started(url: str, prefix: str, *nodes: str) -> AsyncIterator[list[tuple[MqttPubSub, RecordingListener]]]:
    """One started backend, with the listener recording what it hands over, per node name."""
    pairs = [(MqttPubSub(MqttSettings(url=url, topic_prefix=prefix)), RecordingListener()) for _ in nodes]
    try:
        for node, (backend, listener) in zip(nodes, pairs, strict=True):
            await backend.start(node, listener)
        yield pairs
    finally:
        for backend, _ in pairs:
            await backend.stop()


def test_a_room_emptied_locally_is_unsubscribed_at_the_broker(broker: Any) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        async with started(broker.url, prefix, "a", "b") as [(a, la), (b, lb)]:
            await a.subscribe("r")
            await b.subscribe("r")
            await b.publish(_envelope("r", 1))
            await la.wait_for(lambda e: len(e) == 1, timeout=10)
            await a.unsubscribe("r")
            for n in range(2, 12):
                await b.publish(_envelope("r", n))
            await lb.wait_for(lambda e: len(e) == 11, timeout=10)
            await asyncio.sleep(0.2)
            assert len(la.envelopes) == 1
            assert a.counters["unsubscribed_dropped"] == 0, "the broker still sends the room to node a"

    run(scenario(), timeout=30)


def _announce(port: int, prefix: str, node: str) -> None:
    """Announce ``node`` as the sequencer (retained), as the sequencer itself does."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(Topics(prefix).sequencer, announcement(node), 1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_the_sequencers_mark_reveals_the_lost_end_of_a_burst(broker: Any, publish_as_node: Any) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        await asyncio.to_thread(_announce, broker.port, prefix, "seq")
        async with started(broker.url, prefix, "a") as [(backend, listener)]:
            await backend.subscribe("r")
            await backend.subscribe("quiet")
            # positions 1001 and 1002 arrive; the sequencer's mark says the room reached 1004: the end was lost.
            # "quiet" was never heard: its mark is not ours to judge. A mark from a node not holding the role
            # is stale, and ignored.
            await asyncio.to_thread(publish_as_node, broker.port, prefix, "r", "seq", ["s1:1", "s1:2"],
                                    {"r": "1004", "quiet": "1007", "not-subscribed": "1"})
            await listener.wait_for(lambda e: len(e) >= 2, timeout=10)
            await asyncio.to_thread(publish_as_node, broker.port, prefix, "r", "old", [], {"r": "99999"})
            deadline = asyncio.get_running_loop().time() + 10
            while not listener.resyncs and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            assert listener.resynced_rooms == [["r"]]
            assert (backend.counters["position_holes"], backend.counters["marks_ignored"]) == (1, 1)

    run(scenario(), timeout=30)


def test_nodes_in_step_see_no_holes_in_the_sequencers_marks(broker: Any) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        async with started(broker.url, prefix, "a", "b") as [(a, la), (b, lb)]:
            for backend in (a, b):
                await backend.subscribe("r")
            for n in range(50):
                await a.publish(_envelope("r", n))
            await lb.wait_for(lambda e: len(e) == 50, timeout=10)
            await asyncio.sleep(MARK_DELAY + 0.5)  # the sequencer's mark has come and gone
            assert a.counters["marks_sent"] + b.counters["marks_sent"] >= 1
            assert (a.counters["position_holes"], b.counters["position_holes"], la.resyncs, lb.resyncs) == (
                0, 0, [], [])

    run(scenario(), timeout=30)


def test_a_hole_in_a_rooms_numbers_resyncs_that_room_and_a_duplicate_is_dropped(broker: Any,
                                                                                publish_as_node: Any) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        async with started(broker.url, prefix, "a") as [(backend, listener)]:
            await backend.subscribe("r")
            await backend.subscribe("other")
            counts = ["s1:1", "s1:2", "s1:4", "s1:4", "s1:3", "s2:1", "s2:2"]  # 3 lost, 4 twice, then a restart
            await asyncio.to_thread(publish_as_node, broker.port, prefix, "r", "b", counts)
            await listener.wait_for(lambda e: len(e) >= 5, timeout=10)
            await asyncio.sleep(0.2)
            assert [e.payload for e in listener.envelopes] == [
                json.dumps({"count": c, "pad": ""}).encode() for c in ("s1:1", "s1:2", "s1:4", "s2:1", "s2:2")]
            assert listener.resynced_rooms == [["r"]]
            assert (backend.counters["holes"], backend.counters["missed"], backend.counters["duplicates_dropped"]) \
                == (1, 1, 2)
            assert "1 messages lost between the broker and this node" in backend.health().detail

    run(scenario(), timeout=30)


def _publish_as_device(port: int, topic: str, payloads: list[bytes]) -> None:
    """Publish bare payloads as a device would (no forge metadata), with plain paho; returns once sent."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"device-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for info in [client.publish(topic, payload, 1) for payload in payloads]:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("ingest", [True, False])
def test_device_publishes_are_handed_to_the_listener_to_ingest(broker: Any, ingest: bool) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        backend, listener = MqttPubSub(MqttSettings(url=broker.url, topic_prefix=prefix, ingest=ingest)), \
            RecordingListener()
        await backend.start("a", listener)
        try:
            topic = backend.topics.publish("sensors")
            await asyncio.to_thread(_publish_as_device, broker.port, topic, [
                b'{"data": {"t": 21.5}, "user_id": "sensor-1"}', b"door open", b"\xff not utf-8"])
            deadline = asyncio.get_running_loop().time() + (10 if ingest else 0.5)
            while len(listener.ingested) < 2 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            if ingest:
                assert listener.ingested == [("sensors", {"t": 21.5}, "device:sensor-1"),
                                             ("sensors", "door open", "device:mqtt")]
                assert (backend.counters["ingested"], backend.counters["ingest_rejected"]) == (2, 1)
            else:
                assert listener.ingested == [] and backend.counters["ingested"] == 0
            assert listener.envelopes == [], "a device publish is not a room message until the service publishes it"
        finally:
            await backend.stop()

    run(scenario(), timeout=30)


def test_numbering_and_continuity() -> None:
    numbering = Numbering(max_rooms=2)
    first = [numbering.next("a") for _ in range(3)]
    stream = first[0].split(":")[0]
    assert first == [f"{stream}:1", f"{stream}:2", f"{stream}:3"]
    numbering.next("b")
    numbering.next("c")  # "a" is the least recently used of three: forgotten, its next number starts a new stream
    again = numbering.next("a")
    assert again.endswith(":1") and not again.startswith(stream)
    seen = Continuity()
    assert [seen.check("r", "n", c) for c in ("x:5", "x:6", "x:9", "x:7", "y:1")] == [0, 0, 2, DUPLICATE, 0]
    for junk in ("junk", "y:", "y:-1", "y:²", "y:" + "9" * 20, "s" * 33 + ":1"):
        assert seen.check("r", "n", junk) == MALFORMED, junk
    assert seen.check("r", "other", "x:1") == 0  # numbers are per origin node
    seen.forget("r")
    assert seen.check("r", "n", "y:5") == 0  # a room subscribed again counts afresh


def test_outage_buffer_is_bounded_and_drops_the_oldest(own_broker: Any) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    settings = MqttSettings(url=own_broker.url, topic_prefix=prefix, outgoing_buffer=3, reconnect_min=0.05,
                            reconnect_max=0.2)

    async def scenario() -> None:
        backend, listener = MqttPubSub(settings), RecordingListener()
        await backend.start("a", listener)
        try:
            await backend.subscribe("r")
            own_broker.kill()
            while backend.health().state is BackendState.UP:
                await asyncio.sleep(0.02)
            for n in range(5):
                await backend.publish(_envelope("r", n))
            await asyncio.sleep(0.05)  # a loop turn's messages are handed over at its end, together
            health = backend.health()
            assert health.state is BackendState.DOWN and "2 messages dropped" in health.detail
            own_broker.start()
            await listener.wait_for(lambda e: len(e) >= 3, timeout=10)
            await asyncio.sleep(0.2)
            assert listener.payloads() == [b'{"n":2}', b'{"n":3}', b'{"n":4}']
            assert listener.resyncs == ["broker reconnected"]
            assert backend.health().state is BackendState.UP
        finally:
            await backend.stop()

    run(scenario(), timeout=30)


def test_a_node_starts_degraded_without_a_broker_and_catches_up() -> None:
    from forge_streaming.testing import free_port

    settings = MqttSettings(url=f"mqtt://127.0.0.1:{free_port()}", connect_timeout=0.3, reconnect_max=0.2)

    async def scenario() -> None:
        backend = MqttPubSub(settings)
        await backend.start("a", RecordingListener())
        try:
            health = backend.health()
            assert health.state is BackendState.DOWN and "unreachable" in health.detail
        finally:
            await backend.stop()

    run(scenario(), timeout=30)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("url", "http://broker:1883", "pubsub.mqtt.url: expected a broker URL like mqtt://host:1883"),
    ("qos", 3, "pubsub.mqtt.qos"),
    ("topic_prefix", "a/#", "pubsub.mqtt.topic_prefix: expected a topic prefix without"),
    ("keepalive", "500ms", "pubsub.mqtt.keepalive: expected a keep-alive of at least 1s"),
    ("subscribe_mode", "all", "pubsub.mqtt.subscribe_mode"),
    ("colour", "blue", "pubsub.mqtt.colour: unknown key"),
])
def test_bad_settings_are_refused_with_their_key(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        Streaming({"plugins": {"allow": ["mqtt"]}, "pubsub": {"backend": "mqtt", "mqtt": {key: value}}})
    assert expected in str(info.value)


def test_url_credentials_and_tls() -> None:
    broker = MqttSettings(url="mqtts://u%40x:p%2Fw@broker.example").broker()
    assert (broker.host, broker.port, broker.tls, broker.username, broker.password) == (
        "broker.example", 8883, True, "u@x", "p/w")
    plain = MqttSettings(url="mqtt://h:1999", username="me", password="pw").broker()
    assert (plain.port, plain.tls, plain.username, plain.password) == (1999, False, "me", "pw")


def test_room_ids_with_topic_characters_stay_one_level(broker: Any) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    odd = "a/b+c#d%e é"

    async def scenario() -> None:
        backend, listener = MqttPubSub(MqttSettings(url=broker.url, topic_prefix=prefix)), RecordingListener()
        await backend.start("a", listener)
        try:
            assert backend.topics.messages(odd) == f"{prefix}/rooms/a%2Fb%2Bc%23d%25e é/messages"
            await backend.subscribe(odd)
            await backend.subscribe("a")
            await backend.publish(_envelope(odd, 1))
            await listener.wait_for(lambda e: len(e) == 1)
            assert listener.envelopes[0].room == odd
        finally:
            await backend.stop()

    run(scenario(), timeout=30)


def test_a_burst_travels_as_one_batch_and_comes_back_numbered_one_by_one(broker: Any) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        async with started(broker.url, prefix, "a", "b") as [(a, la), (b, lb)]:
            for backend in (a, b):
                await backend.subscribe("r")
            await a.publish(_envelope("r", -1))  # alone, before the burst: travels as the frame itself
            await lb.wait_for(lambda e: len(e) == 1, timeout=10)
            burst = [Envelope(room="r", payload=f'{{"n":{n}}}'.encode(), kind=EnvelopeKind.MESSAGE, node="a",
                              sender=f"ws-{n}", binary=n == 3, id="m-7" if n == 7 else None) for n in range(50)]
            for envelope in burst:  # one loop turn: one submit, one numbered publish, one batch on every node
                await a.publish(envelope)
            await lb.wait_for(lambda e: len(e) == 51, timeout=10)
            got = lb.envelopes[1:]
            assert a.counters["batches_sent"] == 1
            assert [(e.payload, e.sender, e.binary, e.id) for e in got] == [
                (e.payload, e.sender, e.binary, e.id) for e in burst]
            positions = [e.sequence for e in lb.envelopes]
            assert positions == list(range(positions[0] or 0, (positions[0] or 0) + 51)), "consecutive, in order"
            assert [e.sequence for e in la.envelopes] == positions, "the same positions on both nodes"

    run(scenario(), timeout=30)


def test_batch_encoding_round_trips_and_refuses_anything_else() -> None:
    from forge_streaming_mqtt import batch

    items = [batch.Item(b'{"n":1}', "s:1"), batch.Item(b"\x00\xff" * 3, "s:2", "ws-1", True, "id-2")]
    encoded = batch.encode(items)
    assert batch.decode(encoded, 2) == items
    for payload, expected in [(encoded, 3), (encoded, 1), (encoded[:-1], 2), (encoded + b"\x00", 2),
                              (b"", 1), (encoded, 0), (encoded, batch.MAX_ITEMS + 1)]:
        with pytest.raises(ValueError):
            batch.decode(payload, expected)
    bad_header = batch.encode([batch.Item(b"x", "s:1")]).replace(b'"c"', b'"x"')
    with pytest.raises(ValueError):
        batch.decode(bad_header, 1)
