"""The MQTT pub/sub backend: room messages numbered by one sequencer node, delivered by every node.

A room message goes to the broker once (``.../submit``), is numbered by the
sequencer (sequencer.py) and comes back once to every node listening to
the room (``.../messages``), its own node included: every node hears the
room's messages in one order, under the same positions. The messages a
node publishes to one room within one turn of its event loop travel as
one batch (batch.py). Presence notices
skip the sequencer. While the broker is unreachable (or before any
sequencer is known), outgoing messages wait in a bounded buffer (oldest
dropped first, counted); once reconnected the node resubscribes, flushes
the buffer and tells its clients to ``resync``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import aiomqtt
from forge_streaming import (
    BackendHealth,
    BackendListener,
    Envelope,
    EnvelopeKind,
    PubSubBackend,
    RoomHistory,
    StreamingConfig,
)

from . import batch
from .continuity import DUPLICATE, MALFORMED, Continuity, Numbering
from .ingest import parse_device_payload
from .link import MqttLink, Sent, publish_properties, read_user_properties
from .sequencer import Positions, Sequencer
from .settings import SECTION, MqttSettings
from .topics import (
    MAX_NODE_ID_LENGTH,
    MAX_POSITION,
    PROP_BATCH,
    PROP_BINARY,
    PROP_COUNT,
    PROP_ID,
    PROP_KIND,
    PROP_NODE,
    PROP_PREVIOUS,
    PROP_SENDER,
    PROP_SEQUENCE,
    Topics,
    valid_id,
    wire_number,
)
from .wire import UserProperties

log = logging.getLogger("forge_streaming.mqtt")

_Outgoing = tuple[str, bytes, UserProperties, int]  # topic, payload, properties, QoS
MAX_CORRELATION = 64  # bytes of a history request's Correlation Data (ours: 32)


def _milestone(count: int) -> bool:
    """Log a recurring loss at its 1st, 10th, 100th, 1000th and every 10,000th time, not each time."""
    return count in (1, 10, 100, 1000) or count % 10_000 == 0


class MqttPubSub(PubSubBackend):
    name: ClassVar[str] = "mqtt"

    def __init__(self, settings: MqttSettings | None = None, *, history_size: int = 100,
                 max_message_size: int = 64 * 1024) -> None:
        self.settings = settings or MqttSettings()
        self.topics = Topics(self.settings.topic_prefix)
        self.counters: Counter[str] = Counter()
        self._qos = self.settings.qos
        self._node = ""
        self._listener: BackendListener | None = None
        self._link: MqttLink | None = None
        self._rooms: set[str] = set()
        self._logs = RoomHistory(size=history_size, max_rooms=100_000)
        self._numbering = Numbering()
        self._continuity = Continuity()
        self._positions = Positions()
        self._sequencer: Sequencer | None = None
        self._sequenced = False  # a sequencer was announced since this connection began: room messages go out
        self._buffer: deque[_Outgoing] = deque()
        self._ready = False  # connected and resubscribed: publish goes straight out (room messages: once sequenced)
        self._flushing = False  # the buffer is being sent: new messages queue behind it
        self._batches: dict[str, list[tuple[Envelope, str]]] = {}  # room -> (message, its count), this loop turn
        self._submit_scheduled = False
        self._gap = False  # a connection was lost (or never made): resync on the next connect
        # history requests in flight: correlation -> (room, since, answer); a reply must match its request
        self._pending: dict[bytes, tuple[str, int, asyncio.Future[list[Envelope]]]] = {}
        self._max_message_size = max_message_size
        self._ingest_queue: asyncio.Queue[tuple[str, bytes]] | None = None
        self._ingest_task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: StreamingConfig) -> MqttPubSub:
        return cls(config.section(SECTION, MqttSettings), history_size=config.rooms.history_size,
                   max_message_size=config.limits.max_message_size)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, node_id: str, listener: BackendListener) -> None:
        self._node = node_id
        self._listener = listener
        if self.settings.ingest:
            # Device publishes become room messages through the listener (the service): hooks, sequence, history.
            self._ingest_queue = asyncio.Queue(maxsize=max(self.settings.outgoing_buffer, 1))
            self._ingest_task = asyncio.create_task(self._ingest_loop(listener), name="forge-mqtt-ingest")
        self._sequencer = Sequencer(self.settings, self.topics, node_id, heard=self._positions.last,
                                    connected=lambda: self._ready, counters=self.counters)
        base = self.settings.client_id or f"{self.settings.topic_prefix}-{node_id}"
        self._link = MqttLink(self.settings, client_id=f"{base}-pubsub", role="pubsub",
                              on_message=self._on_message, on_connect=self._on_connect, on_disconnect=self._on_lost)
        await self._link.start()
        if not self._ready:
            self._gap = True

    async def stop(self) -> None:
        if self._ingest_task is not None:
            self._ingest_task.cancel()
            self._ingest_task = None
        self._ingest_queue = None
        if self._sequencer is not None:
            await self._sequencer.stop()
        if self._link is not None:
            await self._link.stop()
        self._ready = False
        for _, _, future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._rooms.clear()
        self._listener = None

    @property
    def connects(self) -> int:
        """How many times this backend has connected to the broker (1 while it never lost the connection)."""
        return self._link.connects if self._link is not None else 0

    def health(self) -> BackendHealth:
        if self._link is None:
            return super().health()
        health = self._link.health()
        losses = []
        if self.counters["buffer_dropped"]:
            losses.append(f"{self.counters['buffer_dropped']} messages dropped from the outgoing buffer")
        if self.counters["missed"]:
            losses.append(f"{self.counters['missed']} messages lost between the broker and this node "
                          f"({self.counters['holes']} holes, members resynced)")
        refused = sum(self.counters[k] for k in ("bad_topics", "bad_numbers", "history_requests_refused",
                                                  "history_replies_refused"))
        if refused:
            losses.append(f"{refused} publishes refused (invalid ids in topics, numbers out of bounds, "
                          f"history traffic not from a node; see the log)")
        return BackendHealth(health.state, "; ".join([health.detail, *losses])) if losses else health

    # -- connection events ------------------------------------------------------------

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        assert self._link is not None
        topics = [self.topics.history_request, self.topics.history_response(self._node), self.topics.all_marks,
                  self.topics.sequencer]
        if self.settings.subscribe_mode == "wildcard":
            topics.append(self.topics.all_room_messages)
        else:
            topics.extend(self.topics.messages(room) for room in sorted(self._rooms))
        if self._ingest_queue is not None:
            topics.append(self.topics.ingest_shared)
        self._sequenced = False
        assert self._sequencer is not None
        self._sequencer.on_connected()
        await self._link.subscribe(topics, self._qos)
        self._continuity.reset()
        self._positions.reset()
        for room in self._rooms:
            self._logs.track(room)  # vouch only from the new subscription on
        self._ready = True
        if self._sequenced:  # the sequencer's retained announcement came with the subscription
            await self._flush()
        if self._gap:
            self._gap = False
            self._logs.gap()
            self.counters["resyncs"] += 1
            if self._listener is not None:
                self._listener.on_resync("broker reconnected")

    async def _flush(self) -> None:
        """Send what waited for the broker (or for a sequencer), in order, before anything newer."""
        if self._flushing or self._link is None:
            return
        self._flushing = True
        flushed = 0
        try:
            while self._buffer and self._link is not None:
                item = self._buffer.popleft()
                sent = self._link.publish_nowait(item[0], item[1], qos=item[3], properties=item[2])
                if sent is Sent.DOWN:
                    self._buffer.appendleft(item)
                    raise aiomqtt.MqttError("connection lost while flushing the outgoing buffer")
                if sent is Sent.FULL:
                    self._buffer.appendleft(item)
                    await asyncio.sleep(0.001)  # new publishes keep buffering behind it until the end
                    continue
                flushed += 1
        finally:  # however it ends (a lost connection included), the next flush must be able to run
            self._flushing = False
        if flushed:
            log.info("MQTT pubsub: flushed %d buffered messages", flushed)

    def _on_announcement(self, message: aiomqtt.Message) -> None:
        assert self._sequencer is not None
        self._sequencer.on_announcement(message.payload if isinstance(message.payload, bytes) else b"")
        if self._sequencer.holder is not None and not self._sequenced:
            self._sequenced = True  # from now on room messages go out (queued by the broker if the holder dies)
            if self._ready and self._buffer and not self._flushing:
                asyncio.get_running_loop().create_task(self._flush_quietly(), name="forge-mqtt-flush")

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):  # the reconnect flushes again
            await self._flush()
    def _on_lost(self) -> None:
        self._ready = False
        self._sequenced = False
        self._gap = True

    # -- the hot path ------------------------------------------------------------------

    async def publish(self, envelope: Envelope) -> None:
        while not self.publish_nowait(envelope):  # the broker is behind: this publisher waits its turn
            self.counters["publish_waits"] += 1
            await asyncio.sleep(0.001)

    def publish_nowait(self, envelope: Envelope) -> bool:
        """Hand ``envelope`` on (into this loop turn's batch), unless the broker is behind: False then."""
        if self._flushing and self._ready:
            return False
        room = envelope.room
        if envelope.kind is EnvelopeKind.MESSAGE:  # to the sequencer, with what this loop turn adds to the room
            count = self._numbering.next(room)  # numbered per origin to see losses and duplicates
            pending = self._batches.get(room)
            if pending is not None:
                pending.append((envelope, count))
                return True
            self._batches[room] = [(envelope, count)]
            if not self._submit_scheduled:
                self._submit_scheduled = True
                asyncio.get_running_loop().call_soon(self._submit)
            return True
        self._send(self.topics.messages(room), envelope.payload, self._properties(envelope), self._qos)
        return True

    def _properties(self, envelope: Envelope, count: str | None = None) -> UserProperties:
        pairs = [(PROP_KIND, envelope.kind.value), (PROP_NODE, envelope.node or self._node)]
        if count is not None:
            pairs.append((PROP_COUNT, count))
        if envelope.sender is not None:
            pairs.append((PROP_SENDER, envelope.sender))
        if envelope.binary:
            pairs.append((PROP_BINARY, "1"))
        if envelope.id is not None:
            pairs.append((PROP_ID, envelope.id))
        return UserProperties(pairs)

    def _submit(self) -> None:
        """Submit this loop turn's room messages, one publish per room (QoS 1: while no node holds the
        sequencer role, the broker queues them in the role's session)."""
        self._submit_scheduled = False
        batches, self._batches = self._batches, {}
        held = not (self._sequenced and self._ready) or self._flushing or bool(self._buffer)
        for room, pending in batches.items():
            if held:  # kept one by one, as outgoing_buffer counts them, and sent so when the broker is back
                for envelope, count in pending:
                    self._hold(self.topics.submit(room), envelope.payload, self._properties(envelope, count), 1)
                continue
            if len(pending) == 1:  # alone: the frame itself, its fields in user properties
                envelope, count = pending[0]
                payload, props = envelope.payload, self._properties(envelope, count)
            else:
                first = pending[0][0]
                payload = batch.encode([batch.Item(e.payload, count, e.sender, e.binary, e.id) for e, count in pending])
                props = UserProperties([(PROP_KIND, EnvelopeKind.MESSAGE.value), (PROP_NODE, first.node or self._node),
                                        (PROP_BATCH, str(len(pending)))])
                self.counters["batches_sent"] += 1
            self._send(self.topics.submit(room), payload, props, 1, ready=self._sequenced)

    def _send(self, topic: str, payload: bytes, props: UserProperties, qos: int, *, ready: bool = True) -> None:
        """Publish now if the link takes it; otherwise keep it, in order, for the flush."""
        if ready and self._ready and not self._flushing and not self._buffer and self._link is not None:
            sent = self._link.publish_nowait(topic, payload, qos=qos, properties=props)
            if sent is Sent.OK:
                return
            if sent is Sent.FULL:  # the broker acknowledges slower than we publish: the flush sends it
                self._hold(topic, payload, props, qos)
                asyncio.get_running_loop().create_task(self._flush_quietly(), name="forge-mqtt-flush")
                return
        self._hold(topic, payload, props, qos)

    def _on_marks(self, node: str, message: aiomqtt.Message) -> None:
        """The sequencer's last position per room (sequencer.py): one above what this node heard is a hole."""
        if self._listener is None or self._sequencer is None or node != self._sequencer.holder:
            self.counters["marks_ignored"] += 1  # only the holder's marks say what was sent; others are stale
            return
        try:
            marks = json.loads(message.payload) if isinstance(message.payload, bytes) else None
        except (ValueError, RecursionError):
            marks = None
        if not isinstance(marks, dict):
            self.counters["marks_ignored"] += 1
            return
        for room, text in marks.items():
            if room not in self._rooms or not isinstance(text, str):
                continue
            mark = wire_number(text)
            if mark is None:
                self._refuse_number(message.topic.value, "mark", text)
                continue
            last = self._positions.last(room)
            if last is not None and mark > last:  # the room's latest messages never reached this node
                self._positions.advance(room, mark)
                self._on_position_hole(room, mark, stale=False)

    def _hold(self, topic: str, payload: bytes, props: UserProperties, qos: int) -> None:
        limit = self.settings.outgoing_buffer
        if limit == 0:
            self.counters["buffer_dropped"] += 1
            return
        if len(self._buffer) >= limit:
            self._buffer.popleft()
            self.counters["buffer_dropped"] += 1
            if _milestone(self.counters["buffer_dropped"]):
                log.warning("MQTT pubsub: outgoing buffer full (pubsub.mqtt.outgoing_buffer=%d); "
                            "%d oldest messages dropped so far", limit, self.counters["buffer_dropped"])
        self._buffer.append((topic, payload, props, qos))

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        parsed = self.topics.room_of(topic)
        if parsed is not None:
            room, leaf = parsed
            if leaf == "messages":
                self._on_room_message(room, message)
            elif leaf == "publish":
                self._on_device_publish(room, message)
        elif (node := self.topics.node_of_marks(topic)) is not None:
            self._on_marks(node, message)
        elif topic == self.topics.sequencer:
            self._on_announcement(message)
        elif topic == self.topics.history_request:
            self._answer_history(message)
        elif topic == self.topics.history_response(self._node):
            self._on_history_response(message)
        else:  # a room or node id that is not valid, or not in the one form we encode it in
            self.counters["bad_topics"] += 1
            if _milestone(self.counters["bad_topics"]):
                log.warning("MQTT pubsub: ignoring a publish on %r: not a valid room or node id in its topic "
                            "(%d such publishes so far)", topic, self.counters["bad_topics"])

    def _on_room_message(self, room: str, message: aiomqtt.Message) -> None:
        if room not in self._rooms or self._listener is None:
            self.counters["unsubscribed_dropped"] += 1
            return
        props = read_user_properties(message)
        node = props.get(PROP_NODE)
        if node is None:
            # Not from a node (no metadata): devices publish to .../publish instead.
            self.counters["foreign_ignored"] += 1
            if self.counters["foreign_ignored"] == 1:
                log.warning("MQTT pubsub: ignoring a publish without forge metadata on %s; devices should "
                            "publish to %s", message.topic.value, self.topics.publish(room))
            return
        kind = EnvelopeKind.NOTICE if props.get(PROP_KIND) == EnvelopeKind.NOTICE.value else EnvelopeKind.MESSAGE
        payload = message.payload if isinstance(message.payload, bytes) else bytes(str(message.payload), "utf-8")
        if kind is EnvelopeKind.NOTICE:
            self._listener.on_envelope(Envelope(room=room, payload=payload, kind=kind, sender=props.get(PROP_SENDER),
                                                node=node))
            return
        text, before, size = props.get(PROP_SEQUENCE), props.get(PROP_PREVIOUS), props.get(PROP_BATCH)
        if text is None:  # a room message the sequencer never numbered: not from a node of this version
            self.counters["unnumbered_dropped"] += 1
            if _milestone(self.counters["unnumbered_dropped"]):
                log.warning("MQTT pubsub: dropped a room message on %r without a position: every node of a "
                            "cluster must run the same forge-streaming-mqtt (room messages go through the "
                            "sequencer)", message.topic.value)
            return
        sequence = wire_number(text)
        if sequence is None:
            self._refuse_number(message.topic.value, PROP_SEQUENCE, text)
            return
        previous = None if before is None else wire_number(before)
        if before is not None and previous is None:
            self._refuse_number(message.topic.value, PROP_PREVIOUS, before)
            return
        if size is None:
            items = [batch.Item(payload, props.get(PROP_COUNT) or "", props.get(PROP_SENDER),
                                props.get(PROP_BINARY) == "1", props.get(PROP_ID))]
        else:
            try:  # before the positions move on: a batch that cannot be read is a hole, seen at the next message
                items = batch.decode(payload, wire_number(size) or 0)
            except (ValueError, RecursionError) as exc:
                self.counters["bad_batches"] += 1
                log.warning("MQTT pubsub: dropped a batch on %r: %s", message.topic.value, exc)
                return
        verdict = self._positions.check(room, sequence, previous, len(items))
        if verdict is not Positions.NEXT:
            if verdict == Positions.STALE:
                self.counters["stale_dropped"] += 1
            self._on_position_hole(room, sequence, stale=verdict == Positions.STALE)
            if verdict == Positions.STALE:
                return
        listener = self._listener
        for offset, item in enumerate(items):
            if item.count:
                missing = self._continuity.check(room, node, item.count)
                if missing == DUPLICATE:
                    self.counters["duplicates_dropped"] += 1
                    continue
                if missing == MALFORMED:
                    self._refuse_number(message.topic.value, PROP_COUNT, item.count)
                    continue
                if missing:
                    self._on_hole(room, node, missing)
            envelope = Envelope(room=room, payload=item.payload, kind=kind, sequence=sequence + offset,
                                sender=item.sender, node=node, binary=item.binary, id=item.id)
            self._logs.record(envelope)
            listener.on_envelope(envelope)

    def _refuse_number(self, topic: str, what: str, value: str) -> None:
        """A number from the wire out of bounds (only a forger or a bug sends one): the message is dropped."""
        self.counters["bad_numbers"] += 1
        if _milestone(self.counters["bad_numbers"]):
            log.warning("MQTT pubsub: dropped a publish on %r: %s %r is not a number from 0 to 2**63-1 "
                        "(%d such publishes so far)", topic, what, value[:40], self.counters["bad_numbers"])

    def _on_hole(self, room: str, node: str, missing: int) -> None:
        """Messages of ``room`` from ``node`` never arrived: its members resync, history stops vouching."""
        self.counters["holes"] += 1
        self.counters["missed"] += missing
        if _milestone(self.counters["holes"]):
            log.warning("MQTT pubsub: %d message(s) from node %r in room %r never arrived (%d such holes so "
                        "far; the broker drops messages for a subscriber that falls behind: raise Mosquitto's "
                        "max_queued_messages); the room's members get resync", missing, node, room,
                        self.counters["holes"])
        self._logs.gap([room])
        assert self._listener is not None
        self._listener.on_resync("messages lost between the broker and this node", rooms=[room])

    def _on_position_hole(self, room: str, position: int, *, stale: bool) -> None:
        """The room's positions do not follow on (the sequencer moved, or the broker dropped some): resync."""
        self.counters["position_holes"] += 1
        if _milestone(self.counters["position_holes"]):
            log.warning("MQTT pubsub: room %r: position %d %s (%d such holes so far; the sequencer moved, or the "
                        "broker dropped messages); the room's members get resync", room, position,
                        "was already passed" if stale else "does not follow the last one heard",
                        self.counters["position_holes"])
        self._logs.gap([room])
        assert self._listener is not None
        self._listener.on_resync("the room's order has a hole on this node", rooms=[room])

    async def position(self, room: str) -> int | None:
        """Known only on the sequencer's node, for rooms it numbered in its current term."""
        return self._sequencer.given(room) if self._sequencer is not None else None

    # -- subscriptions -------------------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        if room in self._rooms:
            return
        self._rooms.add(room)
        self._logs.track(room)
        if self.settings.subscribe_mode == "rooms":
            await self._subscribe_quietly([self.topics.messages(room)])
        self._logs.track(room)  # again: vouch only from the acknowledged subscription on

    async def unsubscribe(self, room: str) -> None:
        if room not in self._rooms:
            return
        self._rooms.discard(room)
        self._logs.forget(room)
        self._continuity.forget(room)
        self._positions.forget(room)
        if self.settings.subscribe_mode == "rooms" and self._link is not None:
            await self._link.unsubscribe([self.topics.messages(room)])

    async def _subscribe_quietly(self, topics: list[str]) -> None:
        """Subscribe if connected; a failure is the reconnect loop's job (it resubscribes everything)."""
        if self._link is None:
            return
        try:
            await self._link.subscribe(topics, self._qos)
        except aiomqtt.MqttError as exc:
            log.warning("MQTT pubsub: subscribing to %s failed (%s); will resubscribe on reconnect", topics, exc)

    # -- device publishes ---------------------------------------------------------------

    def _on_device_publish(self, room: str, message: aiomqtt.Message) -> None:
        if self._ingest_queue is None:
            return
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        try:
            self._ingest_queue.put_nowait((room, payload))
        except asyncio.QueueFull:
            self.counters["ingest_dropped"] += 1
            log.warning("MQTT pubsub: device publish to room %r dropped, ingest queue full", room)

    async def _ingest_loop(self, listener: BackendListener) -> None:
        queue = self._ingest_queue
        assert queue is not None
        while True:
            room, payload = await queue.get()
            try:
                data, user_id = parse_device_payload(payload, max_size=self._max_message_size)
                await listener.ingest(room, data, user_id=user_id)
                self.counters["ingested"] += 1
            except ValueError as exc:  # DevicePayloadError, or the kernel refusing the data (InvalidInput)
                self.counters["ingest_rejected"] += 1
                if _milestone(self.counters["ingest_rejected"]):
                    log.warning("MQTT pubsub: device publish to %s refused: %s (%d refused so far)",
                                self.topics.publish(room), exc, self.counters["ingest_rejected"])
            except Exception:
                log.exception("MQTT pubsub: publishing a device message to room %r failed", room)

    # -- history across nodes ---------------------------------------------------------------

    async def fetch_history(self, room: str, since: int) -> list[Envelope] | None:
        """Ask the other nodes; the first one that can vouch for everything after ``since`` answers."""
        if not self._ready or self._link is None:
            return None
        correlation = uuid.uuid4().hex.encode()
        future: asyncio.Future[list[Envelope]] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = (room, since, future)
        props = publish_properties()
        props.ResponseTopic = self.topics.history_response(self._node)
        props.CorrelationData = correlation
        request = json.dumps({"room_id": room, "since": since, "node": self._node}).encode()
        try:
            if self._link.publish_nowait(self.topics.history_request, request, qos=1, properties=props) is not Sent.OK:
                return None
            return await asyncio.wait_for(future, self.settings.history_timeout)
        except TimeoutError:
            log.info("MQTT pubsub: no node could vouch for room %r after %d within %.1fs", room, since,
                     self.settings.history_timeout)
            return None
        finally:
            self._pending.pop(correlation, None)

    def _answer_history(self, message: aiomqtt.Message) -> None:
        if self._link is None:
            return
        props: Any = message.properties
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        try:
            request = json.loads(message.payload) if isinstance(message.payload, bytes) else None
        except (ValueError, RecursionError):
            request = None
        if not isinstance(request, dict):
            self._refuse_request("not a JSON object")
            return
        room, since, node = request.get("room_id"), request.get("since"), request.get("node")
        if node == self._node:
            return  # our own request
        if not isinstance(node, str) or not valid_id(node, MAX_NODE_ID_LENGTH):
            self._refuse_request(f"node {node!r} is not a node id")
        elif not isinstance(room, str) or not valid_id(room):
            self._refuse_request(f"room_id {room!r} is not a room id")
        elif type(since) is not int or not 0 <= since < MAX_POSITION:
            self._refuse_request(f"since {since!r} is not a number from 0 to 2**63-1")
        elif response_topic != self.topics.history_response(node):
            # A node answers only on the requesting node's own response topic: never into a room,
            # another node's topic, or a wildcard (which would make the broker drop this node).
            self._refuse_request(f"response topic {response_topic!r} is not node {node!r}'s")
        elif correlation is not None and (not isinstance(correlation, bytes) or len(correlation) > MAX_CORRELATION):
            self._refuse_request("correlation data longer than 64 bytes")
        elif room in self._rooms:
            entries = self._logs.since(room, since)
            body = {"room_id": room, "node": self._node, "complete": entries is not None,
                    "messages": [_history_entry(e) for e in entries or ()]}
            reply = publish_properties()
            if correlation is not None:
                reply.CorrelationData = correlation
            self._link.publish_nowait(response_topic, json.dumps(body, ensure_ascii=False).encode(), qos=1,
                                      properties=reply)

    def _refuse_request(self, why: str) -> None:
        self.counters["history_requests_refused"] += 1
        if _milestone(self.counters["history_requests_refused"]):
            log.warning("MQTT pubsub: history request on %s ignored: %s (%d such requests so far)",
                        self.topics.history_request, why, self.counters["history_requests_refused"])

    def _on_history_response(self, message: aiomqtt.Message) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        pending = self._pending.get(correlation) if isinstance(correlation, bytes) else None
        if pending is None or pending[2].done():
            return  # late (another node answered first, or the wait is over) or not ours
        room, since, future = pending
        try:
            envelopes = _history_reply(message.payload, room, since)
        except (ValueError, RecursionError) as exc:
            self.counters["history_replies_refused"] += 1
            if _milestone(self.counters["history_replies_refused"]):
                log.warning("MQTT pubsub: history reply for room %r ignored: %s (%d such replies so far)",
                            room, exc, self.counters["history_replies_refused"])
            return
        if envelopes is not None:
            future.set_result(envelopes)


def _history_entry(envelope: Envelope) -> dict[str, Any]:
    """One message of a history reply: a text frame as ``payload``, a binary one as ``payload_base64``."""
    entry: dict[str, Any] = {"sequence": envelope.sequence, "sender": envelope.sender, "node": envelope.node}
    if envelope.binary:
        entry["binary"] = True
        entry["payload_base64"] = base64.b64encode(envelope.payload).decode("ascii")
    else:
        entry["payload"] = envelope.payload.decode("utf-8")
    return entry


def _history_reply(payload: Any, room: str, since: int) -> list[Envelope] | None:
    """The envelopes of a reply to a history request for ``room`` after ``since``; None if the node could not
    vouch (``complete`` false). ValueError when the reply does not answer that request: another room, frames
    of another room, sequences out of bounds or out of order."""
    body = json.loads(payload) if isinstance(payload, bytes | str) else None
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    if body.get("room_id") != room:
        raise ValueError(f"it answers for room {body.get('room_id')!r}")
    if body.get("complete") is not True:
        return None
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ValueError("'messages' is not a list")
    envelopes = []
    last = since
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError("a message is not a JSON object")
        sequence, text, sender, node = m.get("sequence"), m.get("payload"), m.get("sender"), m.get("node") or ""
        binary = m.get("binary") is True
        if binary:
            text = m.get("payload_base64")
        if type(sequence) is not int or not last < sequence < MAX_POSITION:
            raise ValueError(f"sequence {sequence!r} is not above {last} and below 2**63")
        if not isinstance(text, str) or not (sender is None or isinstance(sender, str)) or not isinstance(node, str):
            raise ValueError("a message's payload, sender or node is not a string")
        if binary:
            try:
                payload = base64.b64decode(text, validate=True)
            except binascii.Error:
                raise ValueError("a binary message's payload_base64 is not base64") from None
            header, newline, _ = payload.partition(b"\n")
            frame = json.loads(header) if newline else None
        else:
            payload = text.encode("utf-8")
            frame = json.loads(text)
        if not isinstance(frame, dict) or frame.get("room_id") != room:
            raise ValueError("a message is a frame of another room")
        last = sequence
        envelopes.append(Envelope(room=room, payload=payload, kind=EnvelopeKind.MESSAGE,
                                  sequence=sequence, sender=sender, node=node, binary=binary))
    return envelopes


def factories() -> Mapping[str, Callable[[StreamingConfig], PubSubBackend]]:
    return {"mqtt": MqttPubSub.from_config}
