"""The MQTT backend's own promises beyond the contract kit: subscriptions, the outage buffer, settings."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from forge_streaming import BackendState, ConfigError, Envelope, EnvelopeKind, Streaming
from forge_streaming.testing import RecordingListener, run
from forge_streaming_mqtt import MqttPubSub, MqttSettings


def _envelope(room: str, n: int) -> Envelope:
    return Envelope(room=room, payload=f'{{"n":{n}}}'.encode(), kind=EnvelopeKind.MESSAGE, sequence=1000 + n,
                    node="b")


def test_a_room_emptied_locally_is_unsubscribed_at_the_broker(broker) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        a, b = MqttPubSub(MqttSettings(url=broker.url, topic_prefix=prefix)), MqttPubSub(
            MqttSettings(url=broker.url, topic_prefix=prefix))
        la, lb = RecordingListener(), RecordingListener()
        await a.start("a", la)
        await b.start("b", lb)
        try:
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
        finally:
            await a.stop()
            await b.stop()

    run(scenario(), timeout=30)


def test_outage_buffer_is_bounded_and_drops_the_oldest(own_broker) -> None:
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


def test_room_ids_with_topic_characters_stay_one_level(broker) -> None:
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
