"""Two nodes that take the free sequencer role at nearly the same moment end with exactly one holder.

Seen under load in ``test_sigstop_a_node_past_the_keepalive_then_sigcont``: after the old
sequencer was frozen, nodes b and c both took the role 40 ms apart. c's connection took the
client id over from b (b gave the role up, as it should), then c heard b's announcement and gave
the role up too, leaving c's own announcement retained. Every node then believed c sequenced,
nobody did, and rooms stalled until the end of the test. Real Mosquitto, real links; the race is
replayed at several offsets between the two takeovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest
from forge_streaming_mqtt import sequencer as sequencer_module
from forge_streaming_mqtt.sequencer import Sequencer, announced_node
from forge_streaming_mqtt.settings import MqttSettings
from forge_streaming_mqtt.topics import Topics

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(120)]

OFFSETS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08)
"""Seconds between the two takeovers; a round at each."""
STEADY = 1.0
"""Seconds the one holder must stay the one holder."""


class Candidate:
    """A node's part in the role: its sequencer, and the announcements its own connection hears."""

    def __init__(self, node: str, settings: MqttSettings, topics: Topics) -> None:
        self.node = node
        self.topics = topics
        self.settings = settings
        self.sequencer = Sequencer(settings, topics, node, heard=lambda room: None, connected=lambda: True,
                                   counters=Counter())
        self.heard: str | None = None
        self._listening: asyncio.Task[None] | None = None

    async def listen(self) -> None:
        ready = asyncio.Event()
        self._listening = asyncio.create_task(self._listen(ready))
        await asyncio.wait_for(ready.wait(), 10)

    async def _listen(self, ready: asyncio.Event) -> None:
        async with aiomqtt.Client("127.0.0.1", self.settings_port, identifier=f"{self.topics.prefix}-{self.node}",
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe(self.topics.sequencer, qos=1)
            ready.set()
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b""
                self.heard = announced_node(payload)
                self.sequencer.on_announcement(payload)

    @property
    def settings_port(self) -> int:
        return int(self.settings.url.rsplit(":", 1)[1])

    @property
    def holds(self) -> bool:
        """Leads, on a connection the broker accepted."""
        link = self.sequencer._link
        return link is not None and link.client is not None

    async def close(self) -> None:
        await self.sequencer.stop()
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._listening


@contextlib.asynccontextmanager
async def candidates(port: int, *nodes: str) -> AsyncIterator[list[Candidate]]:
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{port}", keepalive=1.0, reconnect_min=0.05, reconnect_max=0.5)
    topics = Topics(f"role{uuid.uuid4().hex[:10]}")
    made = [Candidate(node, settings, topics) for node in nodes]
    try:
        for candidate in made:
            await candidate.listen()
        yield made
    finally:
        for candidate in made:
            await candidate.close()
        async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.publish(topics.sequencer, b"", qos=1, retain=True)  # leave no retained announcement


def _one_holder(group: list[Candidate]) -> Candidate | None:
    """The one candidate that holds the role and that everybody heard announced, else None."""
    leading = [c for c in group if c.sequencer.leading]  # (connecting included)
    if len(leading) != 1 or not leading[0].holds or any(c.heard != leading[0].node for c in group):
        return None
    return leading[0]


async def _settled_holder(group: list[Candidate], timeout: float) -> Candidate:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (holder := _one_holder(group)) is None:
        assert loop.time() < deadline, f"no single announced holder of the role after {timeout}s: " + ", ".join(
            f"{c.node} holds {c.holds}, heard {c.heard!r}" for c in group)
        await asyncio.sleep(0.01)
    return holder


@pytest.mark.parametrize("offset", OFFSETS)
async def test_two_nodes_taking_the_free_role_at_once_leave_one_holder(
        broker: Any, monkeypatch: pytest.MonkeyPatch, offset: float) -> None:
    monkeypatch.setattr(sequencer_module, "TAKEOVER_JITTER", 0.0)
    async with candidates(broker.port, "b", "c") as (b, c):
        b.sequencer._try_later(0.0)
        await asyncio.sleep(offset)
        c.sequencer._try_later(0.0)
        holder = await _settled_holder([b, c], timeout=10)
        await asyncio.sleep(STEADY)
        assert _one_holder([b, c]) is holder, "the role moved again without a failure"


async def test_a_node_cut_off_from_the_broker_does_not_keep_taking_the_role(own_broker: Any) -> None:
    """A sequencer never reconnects (a term is one connection), so while the broker is away the node must
    not start term after term: only once its own connection is back, and then it takes the role once."""
    from forge_streaming.testing import RecordingListener
    from forge_streaming_mqtt import MqttPubSub

    settings = MqttSettings(url=own_broker.url, topic_prefix=f"role{uuid.uuid4().hex[:10]}", keepalive=1.0,
                            reconnect_min=0.05, reconnect_max=0.2, connect_timeout=0.5)
    backend = MqttPubSub(settings)
    await backend.start("a", RecordingListener())
    try:
        assert await _wait(lambda: backend._sequencer is not None and backend._sequencer.leading, 10)
        own_broker.kill()
        terms = backend.counters["sequencer_terms"]
        await asyncio.sleep(4.0)
        assert backend.counters["sequencer_terms"] - terms <= 1, "a new term every few hundred ms, broker down"
        own_broker.start()
        assert await _wait(lambda: backend._sequencer is not None and backend._sequencer.leading
                           and backend._sequencer._link is not None and backend._sequencer._link.client is not None, 15)
    finally:
        await backend.stop()


async def _wait(predicate: Any, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_a_term_that_fails_while_the_node_is_connected_is_followed_by_another(
        own_broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sequencer's first connection fails in its setup (here: its subscribe raises): with nobody
    holding the role, the node takes it again rather than leave the cluster without a sequencer."""
    from forge_streaming.testing import RecordingListener
    from forge_streaming_mqtt import MqttPubSub

    failures: list[str] = []
    original = Sequencer._on_connect

    async def failing_once(self: Sequencer, client: aiomqtt.Client) -> None:
        if not failures:
            failures.append(self.node)
            raise aiomqtt.MqttError("refused for the test")
        await original(self, client)

    monkeypatch.setattr(Sequencer, "_on_connect", failing_once)
    settings = MqttSettings(url=own_broker.url, topic_prefix=f"role{uuid.uuid4().hex[:10]}")
    backend = MqttPubSub(settings)
    await backend.start("a", RecordingListener())
    try:
        assert await _wait(lambda: backend._sequencer is not None and backend._sequencer.holder == "a", 10), \
            f"no sequencer after a failed term (terms: {backend.counters['sequencer_terms']})"
        assert failures == ["a"] and backend.counters["sequencer_terms"] == 2
    finally:
        await backend.stop()
