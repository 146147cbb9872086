"""Batched socket I/O (batching.py): a burst from the broker is handed to the kernel in one loop iteration."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from typing import Any

import paho.mqtt.client as paho
import pytest
from forge_streaming import Envelope
from forge_streaming.testing import RecordingListener, run
from forge_streaming_mqtt import MqttPubSub, MqttSettings
from forge_streaming_mqtt.batching import MAX_PACKETS_PER_READ, BatchingSocket
from forge_streaming_mqtt.link import MqttLink, Sent
from forge_streaming_mqtt.topics import PROP_KIND, PROP_NODE, PROP_SEQUENCE, Topics
from forge_streaming_mqtt.wire import UserProperties, parse_user_properties, qos0_publish_packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode


class IterationListener(RecordingListener):
    """Records envelopes and how many event-loop iterations handed them over (like the kernel's
    FlushScheduler: the first envelope of an iteration schedules the end-of-iteration callback)."""

    def __init__(self) -> None:
        super().__init__()
        self.iterations = 0
        self._open = False

    def on_envelope(self, envelope: Envelope) -> None:
        if not self._open:
            self._open = True
            self.iterations += 1
            asyncio.get_running_loop().call_soon(self._close)
        super().on_envelope(envelope)

    def _close(self) -> None:
        self._open = False


def _publish_burst_blocking(url_port: int, prefix: str, room: str, count: int) -> None:
    """Publish ``count`` node messages with a plain threaded paho client; returns once the broker has them all."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"burst-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv5)
    client.connect("127.0.0.1", url_port)
    client.loop_start()
    try:
        topic = Topics(prefix).messages(room)
        infos = [client.publish(topic, f'{{"n":{n}}}'.encode(), 1, properties=UserProperties(
            [(PROP_KIND, "message"), (PROP_NODE, "x"), (PROP_SEQUENCE, str(1000 + n))]))  # type: ignore[arg-type]
            for n in range(count)]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_burst_from_the_broker_reaches_the_listener_in_one_loop_iteration(broker: Any) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    count = 100

    async def scenario() -> None:
        backend, listener = MqttPubSub(MqttSettings(url=broker.url, topic_prefix=prefix)), IterationListener()
        await backend.start("b", listener)
        try:
            await backend.subscribe("r")
            # The event loop is blocked meanwhile: the whole burst waits in the node's socket, as it does
            # when a node is busy fanning out. Per-packet reading would take one iteration per message.
            _publish_burst_blocking(broker.port, prefix, "r", count)
            time.sleep(0.3)  # the broker forwards the burst to the node
            await listener.wait_for(lambda e: len(e) == count, timeout=10)
            assert [e.sequence for e in listener.envelopes] == [1000 + n for n in range(count)]
            assert [e.payload for e in listener.envelopes] == [f'{{"n":{n}}}'.encode() for n in range(count)]
            assert listener.iterations <= 2, f"{count} messages took {listener.iterations} loop iterations"
        finally:
            await backend.stop()

    run(scenario(), timeout=30)


def test_socket_options_reach_the_real_socket(broker: Any) -> None:
    async def scenario() -> None:
        backend = MqttPubSub(MqttSettings(url=broker.url, topic_prefix=f"t{uuid.uuid4().hex[:8]}"))
        await backend.start("b", RecordingListener())
        try:
            assert backend._link is not None and backend._link._paho is not None
            wrapped = backend._link._paho.socket()
            assert isinstance(wrapped, BatchingSocket)
            assert wrapped.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), "TCP_NODELAY is not set"
        finally:
            await backend.stop()

    run(scenario(), timeout=30)


class _FakeSocket:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.sent: list[bytes] = []
        self.recv_calls = 0

    def recv(self, size: int) -> bytes:
        self.recv_calls += 1
        if not self.chunks:
            raise BlockingIOError()
        return self.chunks.pop(0)[:size]

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def setsockopt(self, *args: object) -> None:
        pass

    def close(self) -> None:
        pass


def test_batching_socket_serves_small_reads_from_one_recv_and_corks_sends() -> None:
    fake = _FakeSocket([b"\x30\x05hello\x40\x02\x00\x01"])
    sock = BatchingSocket(fake)
    assert [sock.recv(1), sock.recv(1), sock.recv(5), sock.recv(1), sock.recv(1), sock.recv(2)] == [
        b"\x30", b"\x05", b"hello", b"\x40", b"\x02", b"\x00\x01"]
    assert fake.recv_calls == 1 and sock.buffered == 0
    sock.corked = True
    assert sock.send(b"ab") == 2 and sock.send(b"cd") == 2
    sock.corked = False
    assert fake.sent == [] and sock.unsent == 4
    assert sock.flush() and fake.sent == [b"abcd"]


def test_user_properties_parse_back_and_anything_else_falls_back_to_paho() -> None:
    packed = UserProperties([("forge-node", "n1"), ("k", "café")]).pack()
    parsed = parse_user_properties(b"xx" + packed + b"payload", 2)
    assert parsed is not None
    props, end = parsed
    assert props.UserProperty == [("forge-node", "n1"), ("k", "café")]
    assert (b"xx" + packed + b"payload")[end:] == b"payload"
    assert getattr(parse_user_properties(b"\x00", 0)[0], "UserProperty", None) is None  # type: ignore[index]
    assert parse_user_properties(b"\x03\x08\x00\x01", 0) is None  # a Response Topic: paho parses it
    assert parse_user_properties(packed[:-1], 0) is None  # truncated


@pytest.mark.parametrize("size", [0, 100, 200, 20_000, 3_000_000])  # remaining length in 1, 2, 3 and 4 bytes
def test_our_qos0_publish_packet_is_the_one_paho_builds(size: int) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    captured: list[bytes] = []
    client._sock = object()  # type: ignore[assignment]  # _send_publish only checks that it is set

    def capture(command: int, packet: bytes | bytearray, mid: int, qos: int,
                info: paho.MQTTMessageInfo | None = None) -> MQTTErrorCode:
        captured.append(bytes(packet))
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    client._packet_queue = capture  # type: ignore[method-assign]
    topic, payload = "forge/rooms/caf\u00e9/messages".encode(), bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    props = UserProperties([(PROP_KIND, "message"), (PROP_NODE, "n\u00f6de"), (PROP_SEQUENCE, "12345")])
    try:
        client._send_publish(0, topic, payload, 0, False, False, None, props)  # type: ignore[arg-type]
    finally:
        client._sock = None
    assert qos0_publish_packet(topic, props, payload) == captured[0]


class _StubPaho:
    def __init__(self, sock: object | None, queued: int) -> None:
        self._sock = sock
        self._out_packet: list[dict[str, Any]] = [{}] * queued
        self.queued: list[tuple[int, bytes]] = []

    def _packet_queue(self, command: int, packet: bytes, mid: int, qos: int, info: object) -> None:
        self.queued.append((command, packet))


def test_qos0_publishes_are_bounded_like_paho_bounds_qos1() -> None:
    link = MqttLink(MqttSettings(outgoing_buffer=0), client_id="x", role="test", on_message=lambda m: None,
                    on_connect=lambda c: asyncio.sleep(0))
    props = UserProperties([(PROP_KIND, "message")])
    for sock, queued, expected in ((None, 0, Sent.DOWN), (object(), 999, Sent.OK), (object(), 1000, Sent.FULL)):
        stub = _StubPaho(sock, queued)
        link._paho = stub  # type: ignore[assignment]
        assert link.publish_nowait("t", b"p", qos=0, properties=props) is expected
        assert len(stub.queued) == (expected is Sent.OK)


def test_a_burst_larger_than_one_iterations_share_is_read_to_its_end(broker: Any) -> None:
    """Past MAX_PACKETS_PER_READ the rest waits in our buffer: it must be read on, not wait for the next packet."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    count = 5 * MAX_PACKETS_PER_READ

    async def scenario() -> None:
        backend, listener = MqttPubSub(MqttSettings(url=broker.url, topic_prefix=prefix)), IterationListener()
        await backend.start("b", listener)
        try:
            await backend.subscribe("r")
            _publish_burst_blocking(broker.port, prefix, "r", count)  # the loop is blocked: it all waits
            time.sleep(0.3)
            await listener.wait_for(lambda e: len(e) == count, timeout=5)  # nothing comes after it (keepalive: 10 s)
            assert listener.iterations >= 2, "fairness: not all of it in one iteration"
        finally:
            await backend.stop()

    run(scenario(), timeout=30)
