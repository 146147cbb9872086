"""The bridge against hostile input: what a device, or anyone else on the broker, cannot do to the nodes.

Real Mosquitto brokers (conftest.py), real nodes (``Streaming`` with the MQTT
backend and room store), and raw paho clients playing devices and forgers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as paho
import pytest
from forge_streaming import Streaming
from forge_streaming.testing import RecordingConnection, open_connection
from forge_streaming_mqtt import MqttPubSub, MqttRoomStore
from forge_streaming_mqtt.topics import (
    PROP_COUNT,
    PROP_KIND,
    PROP_NODE,
    PROP_SEQUENCE,
    Topics,
    decode_level,
    encode_level,
)
from forge_streaming_mqtt.wire import UserProperties
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

NOT_AUTHORIZED = 135  # MQTT v5 reason code 0x87
MAX_ROOM_ID_LENGTH = 128  # the kernel's rule for room ids: printable, at most 128 characters


@pytest.fixture(autouse=True)
def _only_these_plugins(streaming_plugins_only: Callable[..., None]) -> None:
    streaming_plugins_only("mqtt")


def node_config(url: str, node: str, prefix: str, **mqtt: Any) -> dict[str, Any]:
    settings = {"url": url, "topic_prefix": prefix, "keepalive": "2s", "reconnect_min": "50ms",
                "reconnect_max": "300ms", "connect_timeout": "3s", "history_timeout": "500ms", **mqtt}
    return {"plugins": {"allow": ["mqtt"]}, "server": {"node_id": node},
            "pubsub": {"backend": "mqtt", "mqtt": settings}, "rooms": {"store": "mqtt"}}


@asynccontextmanager
async def nodes(url: str, *names: str, prefix: str | None = None, **mqtt: Any) -> AsyncIterator[list[Streaming]]:
    prefix = prefix or f"t{uuid.uuid4().hex[:8]}"
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Streaming(node_config(url, n, prefix, **mqtt)).running())
               for n in names]


def backend(node: Streaming) -> MqttPubSub:
    return cast(MqttPubSub, node.backend)


def store(node: Streaming) -> MqttRoomStore:
    return cast(MqttRoomStore, node.store)


def prefix_of(node: Streaming) -> str:
    return backend(node).topics.prefix


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    async def poll() -> None:
        while not (await predicate() if asyncio.iscoroutinefunction(predicate) else predicate()):
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def data_of(conn: RecordingConnection) -> list[Any]:
    return [m["data"] for m in conn.frames("message")]


class Raw:
    """A raw MQTT v5 client (a device, a watcher or a forger) that reports the broker's reason codes."""

    def __init__(self, port: int, *, username: str | None = None, password: str | None = None) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connect_rc: int | None = None
        self.acks: dict[int, int] = {}  # mid -> PUBACK / SUBACK reason code
        self.received: list[paho.MQTTMessage] = []
        self.on_message: Callable[[paho.MQTTMessage], None] | None = None
        self._changed = threading.Condition()
        self.client.on_connect = self._connected
        self.client.on_publish = self._published
        self.client.on_subscribe = self._subscribed
        self.client.on_message = self._message
        self.port = port

    def _connected(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._changed:
            self.connect_rc = reason.value
            self._changed.notify_all()

    def _published(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._changed:
            self.acks[mid] = reason.value
            self._changed.notify_all()

    def _subscribed(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._changed:
            self.acks[mid] = max(r.value for r in reasons)
            self._changed.notify_all()

    def _message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        self.received.append(message)
        if self.on_message is not None:
            self.on_message(message)

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        with self._changed:
            if not self._changed.wait_for(ready, 10):
                raise AssertionError(f"no answer from the broker to {what}")

    def __enter__(self) -> Raw:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        self._wait(lambda: self.connect_rc is not None, "CONNECT")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes | str, *, props: list[tuple[str, str]] | None = None,
                retain: bool = False, properties: Properties | None = None) -> int:
        """Publish at QoS 1 and return the broker's reason code (0 accepted, 16 no subscribers, 135 refused)."""
        if props is not None:
            properties = cast(Properties, UserProperties(props))
        info = self.client.publish(topic, payload, 1, retain, properties)
        self._wait(lambda: info.mid in self.acks, f"PUBLISH {topic!r}")
        return self.acks[info.mid]

    def subscribe(self, topic: str) -> int:
        _, mid = self.client.subscribe(topic, 1)
        assert mid is not None
        self._wait(lambda: mid in self.acks, f"SUBSCRIBE {topic!r}")
        return self.acks[mid]


def node_props(node: str, sequence: str | None = None, count: str = "s1:1") -> list[tuple[str, str]]:
    pairs = [(PROP_KIND, "message"), (PROP_NODE, node), (PROP_COUNT, count)]
    return [*pairs, (PROP_SEQUENCE, sequence)] if sequence is not None else pairs


# -- 1. room ids from the wire ------------------------------------------------------------------

BAD_LEVELS = [
    "%01", "%1F", "%7F", "%C2%85", "%EF%BF%BF", "%EF%B7%90", "%F4%8F%BF%BE",  # controls, noncharacters
    "%ED%A0%80", "%FF", "%C0%AF",  # a surrogate, bytes that are not UTF-8, an overlong '/'
    "%E2%80%8B", "a%00b", "%25",  # a format character, NUL, a lone '%' ... and '%25' is fine: see GOOD_LEVELS
    "", "%6Cobby", "caf%C3%A9", "a%2fb", "%", "%2",  # empty; other spellings of valid ids; broken escapes
    "x" * (MAX_ROOM_ID_LENGTH + 1), "%25" * (MAX_ROOM_ID_LENGTH + 1),  # too long
]
BAD_LEVELS.remove("%25")
GOOD_LEVELS = {"lobby": "lobby", "café": "café", "a%2Fb": "a/b", "%25": "%", "a b": "a b",
               "%2B%23": "+#", "x" * MAX_ROOM_ID_LENGTH: "x" * MAX_ROOM_ID_LENGTH}


def test_topic_levels_encode_any_string_validly_and_decode_only_their_own_form() -> None:
    nasty = ["\0", "\x01", "\x1f", "\x7f", "\x85", "\x9f", "\ufdd0", "\ufffe", "\uffff", "\U0010fffe", "\ud800",
             "\udfff", "\u200b", "\u2028", "\ue000", "a/b", "+", "#", "%", "$SYS", "lobby", "café", " "]
    for value in [*nasty, "".join(nasty)]:
        level = encode_level(value)
        encoded = level.encode("utf-8")  # raises on a surrogate: it never gets there
        assert not any(c in level for c in "/+#\0"), (value, level)
        assert level.isprintable(), f"{value!r} gives {level!r}, which Mosquitto may call malformed"
        assert len(encoded) <= 12 * len(value)
        valid = value.isprintable() and len(value) <= MAX_ROOM_ID_LENGTH
        assert decode_level(level) == (value if valid else None), value
    for level, room in GOOD_LEVELS.items():
        assert decode_level(level) == room and encode_level(room) == level
    for level in BAD_LEVELS:
        assert decode_level(level) is None, level
    topics = Topics("forge")
    assert topics.room_of("forge/rooms/%6Cobby/publish") is None
    assert topics.room_of("forge/rooms/%01/publish") is None
    assert topics.presence_of("forge/presence/n%01/r") is None
    assert topics.node_of_status("forge/nodes/%FF/status") is None
    assert topics.room_of("forge/rooms/a%2Fb/publish") == ("a/b", "publish")


async def test_a_device_publish_with_an_invalid_room_id_never_cuts_a_node_off(broker: Any) -> None:
    """Each bad level once made the ingesting node publish a topic Mosquitto calls malformed and drop it."""
    async with nodes(broker.url, "a", "b") as (a, b):
        prefix = prefix_of(a)
        alice, bob, lurker = await open_connection(a), await open_connection(b), await open_connection(b)
        await alice.join_room("r")
        await bob.join_room("r")
        await lurker.join_room("lobby")
        sent = 0
        with Raw(broker.port) as device:
            for rounds in range(2):
                for level in BAD_LEVELS:
                    device.publish(f"{prefix}/rooms/{level}/publish", f"bad {level}")
                    await a.publish("r", sent)
                    await b.publish("r", sent + 1)
                    sent += 2
                    assert a.health().ok and b.health().ok, f"round {rounds}, level {level!r}"
            # The same levels in presence topics: a node clears a dead node's retained presence (here "ghost",
            # or a node whose id is itself a bad level) by publishing to the very topic it decoded.
            for level in ["ghost", *BAD_LEVELS]:
                for room in BAD_LEVELS if level == "ghost" else ["r"]:
                    device.publish(f"{prefix}/presence/{level}/{room}", '[{"connection_id": "c", "user_id": "u"}]',
                                   retain=True)
                device.publish(f"{prefix}/nodes/{level}/status", '{"state": "offline"}', retain=True)
        await until(lambda: len(data_of(alice)) == sent and len(data_of(bob)) == sent, what="every message")
        await asyncio.sleep(0.3)
        assert (backend(a).connects, backend(b).connects, store(a).connects, store(b).connects) == (1, 1, 1, 1)
        assert store(a).counters["bad_topics"] >= 2 * len(BAD_LEVELS)
        assert data_of(lurker) == [], "'%6Cobby' is not a way into 'lobby'"
        refused = backend(a).counters["bad_topics"] + backend(b).counters["bad_topics"]
        assert refused == 2 * len(BAD_LEVELS)
        assert sorted(data_of(alice)) == list(range(sent))


# -- 2. numbers from the wire ----------------------------------------------------------------------

BAD_SEQUENCES = [str(10**20), "9" * 4300, str(2**63), "-5", "1e20", "٣", " 7", ""]


async def test_sequences_from_the_wire_are_bounded(broker: Any) -> None:
    """``forge-sequence`` 1e20 or 4,300 digits once broke the room on every node."""
    async with nodes(broker.url, "a", "b") as (a, b):
        prefix = prefix_of(a)
        alice, bob = await open_connection(a), await open_connection(b)
        await alice.join_room("r")
        await bob.join_room("r")
        topic = Topics(prefix).messages("r")
        with Raw(broker.port) as forger:
            for n, bad in enumerate(BAD_SEQUENCES):
                forger.publish(topic, json.dumps({"type": "message", "room_id": "r", "data": f"forged {n}",
                                                  "sequence": 1}), props=node_props("x", bad, f"s1:{n + 1}"))
            for position, count in enumerate(("s1:" + "9" * 30, "s1:²", "s" * 100 + ":1"), start=5):
                forger.publish(topic, b'{"type":"message","data":"forged count"}',
                               props=node_props("y", str(position), count))
            forger.publish(Topics(prefix).marks("x"), json.dumps({"r": "s1:²"}))
        sequence = await a.publish("r", "after")
        assert sequence is not None and 0 < sequence < 2**63
        await until(lambda: data_of(alice) == ["after"] and data_of(bob) == ["after"], what="the room still works")
        for node in (a, b):
            # 3 counts; the mark from "x", not the sequencer, is ignored before its number is read
            assert backend(node).counters["bad_numbers"] == len(BAD_SEQUENCES) + 3
            assert node.health().ok and f"{len(BAD_SEQUENCES) + 3} publishes refused" in node.health().detail
            assert node.room_position("r") == sequence
        late = await open_connection(b)
        await late.join_room("r", since=0)
        assert data_of(late) == ["after"]


# -- 3. forged node traffic --------------------------------------------------------------------------

async def test_a_forged_offline_status_does_not_hide_a_live_nodes_members(broker: Any) -> None:
    async with nodes(broker.url, "a", "b") as (a, b):
        prefix = prefix_of(a)
        alice, bob = await open_connection(a), await open_connection(b)
        await alice.join_room("r")
        await bob.join_room("r")
        everyone = {alice.user_id, bob.user_id}

        async def b_sees_everyone() -> bool:
            return set(await b.presence("r")) == everyone

        await until(b_sees_everyone, what="presence across nodes")
        status = Topics(prefix).status("a")
        with Raw(broker.port) as forger:
            forger.publish(status, json.dumps({"state": "offline", "time": time.time()}), retain=True)
            forger.publish(status, json.dumps({"state": "offline", "proof": "00" * 16}), retain=True)
            forger.publish(status, b"", retain=True)
        await asyncio.sleep(0.5)
        assert set(await b.presence("r")) == everyone, "one forged status hid node a's members"
        async with nodes(broker.url, "c", prefix=prefix) as (c,):
            async def c_sees_everyone() -> bool:
                return set(await c.presence("r")) == everyone

            await until(c_sees_everyone, what="a node started later seeing node a's members")
        assert store(b).counters["forged_status"] >= 2


async def test_a_node_puts_back_its_status_and_presence_when_a_forger_overwrites_them(broker: Any) -> None:
    """A forger that announces its own ``life`` for node a can then prove an ``offline``: b believes it, for
    as long as it takes node a to see its status overwritten and announce itself again."""
    async with nodes(broker.url, "a", "b") as (a, b):
        prefix = prefix_of(a)
        alice, bob = await open_connection(a), await open_connection(b)
        await alice.join_room("r")
        await bob.join_room("r")
        everyone = {alice.user_id, bob.user_id}

        async def b_sees_everyone() -> bool:
            return set(await b.presence("r")) == everyone

        await until(b_sees_everyone, what="presence across nodes")
        topics = Topics(prefix)
        with Raw(broker.port) as forger:
            proof = "forged-secret"
            life = hashlib.sha256(proof.encode()).hexdigest()
            forger.publish(topics.status("a"), json.dumps({"state": "online", "life": life}), retain=True)
            forger.publish(topics.status("a"), json.dumps({"state": "offline", "proof": proof}), retain=True)
            forger.publish(topics.presence("a", "r"), b"", retain=True)
        await until(b_sees_everyone, timeout=5, what="node a's members back on node b")
        assert store(a).counters["restored"] >= 1
        async with nodes(broker.url, "c", prefix=prefix) as (c,):
            async def c_sees_everyone() -> bool:
                return set(await c.presence("r")) == everyone

            await until(c_sees_everyone, what="a node started later seeing node a's members")


def _answer_like_a_forger(forger: Raw, body: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Answer every history request at once, on its response topic, with ``body(request)``."""
    def answer(message: paho.MQTTMessage) -> None:
        props = message.properties
        reply = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        reply.CorrelationData = getattr(props, "CorrelationData", b"")
        forger.client.publish(getattr(props, "ResponseTopic", ""), json.dumps(body(json.loads(message.payload))),
                              1, properties=reply)

    forger.on_message = answer


@pytest.mark.parametrize("forgery", ["another room", "frames of another room", "sequences out of bounds"])
async def test_a_forged_history_reply_is_ignored(broker: Any, forgery: str) -> None:
    async with nodes(broker.url, "b") as (b,):
        prefix = prefix_of(b)

        def body(request: dict[str, Any]) -> dict[str, Any]:
            room, since = request["room_id"], request["since"]
            frame = {"type": "message", "room_id": room, "user_id": "admin", "data": "forged", "sequence": since + 1}
            message = {"sequence": since + 1, "sender": None, "node": "x", "payload": json.dumps(frame)}
            if forgery == "another room":
                room = "elsewhere"
            elif forgery == "frames of another room":
                message["payload"] = json.dumps({**frame, "room_id": "elsewhere"})
            else:
                message["sequence"] = 10**20
            return {"room_id": room, "node": "x", "complete": True, "messages": [message]}

        with Raw(broker.port) as forger:
            assert forger.subscribe(Topics(prefix).history_request) == 1
            _answer_like_a_forger(forger, body)
            late = await open_connection(b)
            await late.join_room("r", since=5)  # b holds nothing of "r": it asks the cluster, the forger answers
            assert data_of(late) == []
            assert [f["event"] for f in late.frames("system")][-1] == "resync"
            assert backend(b).counters["history_replies_refused"] == 1


async def test_a_history_request_cannot_send_the_reply_to_any_topic(broker: Any) -> None:
    """A node replies only on ``history/response/{requesting node}``: not into a room, never to a wildcard."""
    async with nodes(broker.url, "a") as (a,):
        prefix = prefix_of(a)
        topics = Topics(prefix)
        alice = await open_connection(a)
        await alice.join_room("r")
        await a.publish("r", "kept")
        await until(lambda: data_of(alice) == ["kept"], what="the message")
        request = json.dumps({"room_id": "r", "since": 0, "node": "x"})
        with Raw(broker.port) as watcher, Raw(broker.port) as forger:
            assert watcher.subscribe(f"{prefix}/#") == 1
            for response_topic in [topics.messages("r"), f"{prefix}/rooms/+/messages", topics.status("a"),
                                   topics.history_response("y"), f"{prefix}/history/response/#"]:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ResponseTopic = response_topic
                props.CorrelationData = b"c"
                forger.publish(topics.history_request, request, properties=props)
            for since in (10**20, -1, 1e400, "1"):
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ResponseTopic = topics.history_response("x")
                forger.publish(topics.history_request, json.dumps({"room_id": "r", "since": since, "node": "x"}),
                               properties=props)
            await asyncio.sleep(0.5)
            replies = [m.topic for m in watcher.received if b'"complete"' in m.payload]  # history replies
        assert replies == [], "a node replied to a topic the request named"
        assert backend(a).connects == 1
        assert backend(a).counters["history_requests_refused"] == 9


# -- 4. device identity --------------------------------------------------------------------------------

async def test_a_device_cannot_claim_a_members_user_id(broker: Any) -> None:
    async with nodes(broker.url, "a") as (a,):
        prefix = prefix_of(a)
        alice = await open_connection(a)
        await alice.join_room("sensors")
        topic = Topics(prefix).publish("sensors")
        with Raw(broker.port) as device:
            for payload in [{"data": 1, "user_id": alice.user_id}, {"data": 2}, {"data": 3, "user_id": "x\x01"},
                            {"data": 4, "user_id": "x" * 200}, {"data": 5, "user_id": "device:thermo"}]:
                device.publish(topic, json.dumps(payload))
            device.publish(topic, "plain text")
        await until(lambda: len(data_of(alice)) == 4, what="device messages")
        await asyncio.sleep(0.2)
        got = [(m["data"], m["user_id"]) for m in alice.frames("message")]
        assert got == [(1, f"device:{alice.user_id}"), (2, "device:mqtt"), (5, "device:thermo"),
                       ("plain text", "device:mqtt")]
        assert backend(a).counters["ingest_rejected"] == 2


# -- 5. the shipped ACL ---------------------------------------------------------------------------------

async def test_the_shipped_acl_lets_devices_publish_only_into_rooms(acl_broker: Any) -> None:
    port = acl_broker.port
    with Raw(port) as anonymous, Raw(port, username="forge-node-1", password="wrong") as impostor:
        assert anonymous.connect_rc == impostor.connect_rc == NOT_AUTHORIZED
    async with AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(Streaming(node_config(
            acl_broker.url, node, "forge", username=f"forge-{node}", password=f"{node}-secret")).running())
            for node in ("node-1", "node-2")]
        assert a.health().ok and b.health().ok
        alice, bob = await open_connection(a), await open_connection(b)
        everyone = {alice.user_id, bob.user_id}
        await alice.join_room("r")
        await bob.join_room("r")
        await a.publish("r", "between nodes")
        await until(lambda: data_of(bob) == ["between nodes"], what="a message between nodes")

        async def b_sees_everyone() -> bool:
            return set(await b.presence("r")) == everyone

        await until(b_sees_everyone, what="presence across nodes")
        topics = Topics("forge")
        with Raw(port, username="thermo-1", password="device-secret") as device:
            # Mosquitto grants any subscription and filters what it delivers: a device reads nothing of forge/
            assert device.subscribe("forge/#") == 1
            assert device.publish(topics.publish("r"), json.dumps({"data": 21.5, "user_id": alice.user_id})) == 0
            shutdown = json.dumps({"type": "system", "event": "server.shutdown", "data": {}})
            forged = {
                topics.messages("r"): device.publish(topics.messages("r"), shutdown, props=node_props("node-1", "9")),
                topics.status("node-1"): device.publish(topics.status("node-1"), '{"state": "offline"}', retain=True),
                topics.presence("node-1", "r"): device.publish(topics.presence("node-1", "r"), b"", retain=True),
                topics.marks("node-1"): device.publish(topics.marks("node-1"), '{"r": "x:9"}'),
                topics.history_request: device.publish(topics.history_request, '{"room_id": "r", "since": 0}'),
                topics.history_response("node-1"): device.publish(topics.history_response("node-1"), "{}"),
            }
            assert forged == dict.fromkeys(forged, NOT_AUTHORIZED), forged
            await until(lambda: len(data_of(alice)) == 2 and len(data_of(bob)) == 2, what="the device's message")
            late = await open_connection(b)
            await late.join_room("r")  # more node traffic: presence, a notice
            await b.publish("r", "more")
            await until(lambda: data_of(alice)[-1:] == ["more"], what="the last message")
            await asyncio.sleep(0.3)
            assert [m.topic for m in device.received] == [], "a device read node traffic"
        for member in (alice, bob):
            assert [(m["data"], m["user_id"]) for m in member.frames("message")] == [
                ("between nodes", "server"), (21.5, f"device:{alice.user_id}"), ("more", "server")]
            assert "server.shutdown" not in [f.get("event") for f in member.frames("system")]
        assert set(await b.presence("r")) == {*everyone, late.user_id}
        assert (backend(a).connects, backend(b).connects) == (1, 1)


def test_the_readme_documents_the_acl_and_names_tests_that_exist() -> None:
    here = Path(__file__).parent
    readme = (here.parent / "README.md").read_text()
    assert "acl.example" in readme and "mosquitto_passwd" in readme
    named = re.findall(r"tests/(test_\w+\.py)::(test_\w+)", readme)
    assert ("test_mqtt_hardening.py", "test_the_shipped_acl_lets_devices_publish_only_into_rooms") in named
    for module, test in named:
        assert re.search(rf"^(async )?def {test}\(", (here / module).read_text(), re.M), f"{module}::{test}"
