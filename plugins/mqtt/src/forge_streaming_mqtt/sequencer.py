"""The sequencer: one node at a time numbers every room's messages, so that all nodes share one order.

MQTT has no order of its own that nodes could number alike (each node
hears a room from the moment it subscribed, and a broker may drop some of
it). So nodes publish room messages to ``{prefix}/rooms/{room}/submit``,
and the sequencer takes them in the broker's order, gives each the room's
next position, and publishes it to ``{prefix}/rooms/{room}/messages``,
where every node listening to the room receives it: the same message under
the same position everywhere, positions going up in the order nodes
receive them. Each message also carries the room's position before it
(``forge-previous``), so a node sees any hole (:class:`Positions`), and
half a second after numbering a room's messages the sequencer announces
the room's last position (``{prefix}/marks/{node}``), so a node also sees
the lost end of a burst.

Who sequences. The sequencer connects with one fixed client id,
``{prefix}-sequencer``, and a session the broker keeps for
:data:`SESSION_EXPIRY` seconds. A broker lets only one connection hold a
client id (a second one takes it over), so two nodes never sequence at
once for long; and while nobody holds it, the broker queues the submitted
messages in the session (QoS 1) for the next sequencer. The holder
announces itself in the retained ``{prefix}/sequencer`` topic; its last
will clears the announcement. A node that sees no announcement (at start,
or when the holder died: its will, 1.5x ``keepalive`` later) waits a
random moment and takes the role; one that sees another node announced
after itself gives it up (see :meth:`Sequencer.on_announcement` for two
nodes taking the role at once). A term is one connection: a sequencer that
loses it, or whose connection fails, gives the role up rather than
reconnect and take it back from whoever took over.

The sequencer acknowledges a submitted message only after it sent it on,
numbered, on the same connection: one that dies in between leaves it
unacknowledged, and the broker gives it to the next sequencer (a node that
heard it already drops the second copy by its ``forge-count``).

A new sequencer continues a room from the last position its node heard
in it; where it heard none, it starts a new run from the microsecond clock
(above any position the room had), without ``forge-previous``, so every
node resyncs that room's members once: it cannot vouch that nothing was
lost while the role moved.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import Counter
from collections.abc import Callable

import aiomqtt
from forge_streaming import RoomPositions

from . import batch
from .link import MqttLink, Sent
from .settings import MqttSettings
from .topics import MAX_NODE_ID_LENGTH, PROP_BATCH, PROP_PREVIOUS, PROP_SEQUENCE, Topics, valid_id
from .wire import UserProperties

log = logging.getLogger("forge_streaming.mqtt")

SESSION_EXPIRY = 300
"""Seconds the broker keeps the sequencer's session (and queues submitted messages) while no node holds it."""
TAKEOVER_JITTER = 0.3
"""A node waits up to this many seconds (at random) before taking the free role: one node wins, seldom two."""
ANNOUNCEMENT_WAIT = 0.5
"""After connecting, how long a node waits for the retained announcement before it takes the role as free."""
MAX_ROOMS = 100_000
"""Rooms whose last position the sequencer remembers; a room forgotten past it starts a new run."""
MARK_DELAY = 0.5
"""Seconds after numbering messages of a room until the sequencer announces the room's last position."""
MARK_ROOMS = 500
"""Rooms per mark message, at most."""


def announcement(node: str) -> bytes:
    return json.dumps({"node": node}).encode()


def announced_node(payload: bytes) -> str | None:
    """The node an announcement names; None for an empty (cleared) or malformed one."""
    if not payload:
        return None
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    node = body.get("node") if isinstance(body, dict) else None
    return node if isinstance(node, str) and valid_id(node, MAX_NODE_ID_LENGTH) else None


class Positions:
    """The receiving side: is a numbered message the next of its room, or is something missing?"""

    NEXT = 0
    HOLE = 1  # something before it never arrived (or a new run began): the room's members resync
    STALE = 2  # at or below a position already heard: dropped

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def check(self, room: str, position: int, previous: int | None, count: int = 1) -> int:
        """``count`` messages from ``position`` on (a batch), the room's position before them ``previous``."""
        last = self._last.get(room)
        if last is not None and position <= last:
            return self.STALE
        self._last[room] = position + count - 1
        if last is None or previous == last:
            return self.NEXT
        return self.HOLE

    def last(self, room: str) -> int | None:
        return self._last.get(room)

    def advance(self, room: str, position: int) -> None:
        """The sequencer's mark says the room reached ``position``: what is missing is a hole, reported once."""
        self._last[room] = position

    def forget(self, room: str) -> None:
        """This node stopped listening to ``room``: the next subscription starts afresh."""
        self._last.pop(room, None)

    def reset(self) -> None:
        """A new connection: what was lost meanwhile is covered by the reconnect's own resync."""
        self._last.clear()


class Sequencer:
    """This node's part in numbering: a candidate, and while it holds the role, the numbering itself."""

    def __init__(self, settings: MqttSettings, topics: Topics, node: str, *, heard: Callable[[str], int | None],
                 connected: Callable[[], bool], counters: Counter[str]) -> None:
        self.settings = settings
        self.topics = topics
        self.node = node
        self.holder: str | None = None  # who announced the role, as last heard
        self._heard = heard  # the last position this node heard in a room
        self._connected = connected  # the node's own connection is up (else it waits for on_connected)
        self._counters = counters
        self._link: MqttLink | None = None
        self._positions = RoomPositions(MAX_ROOMS)  # the positions given in this term
        self._attempt: asyncio.Task[None] | None = None
        self._waiting = False  # an attempt is waiting to take the role
        self._stopped = False
        # submits the broker sent with its CONNACK (queued while nobody held the role), before the link is usable
        self._early: list[aiomqtt.Message] = []
        self._unmarked: set[str] = set()  # rooms numbered since the last marks
        self._confirmed = False  # this term's own announcement heard back (see on_announcement)
        self._mark_timer: asyncio.TimerHandle | None = None

    @property
    def leading(self) -> bool:
        return self._link is not None

    # -- the role ---------------------------------------------------------------------

    def on_connected(self) -> None:
        """The node's own connection is (back) up: take the role if nobody announces it soon."""
        self.holder = None
        self._try_later(ANNOUNCEMENT_WAIT)

    def on_announcement(self, payload: bytes) -> None:
        """Follow the retained announcement, which every node hears in the broker's one order.

        Another node's announcement ends this node's attempt while its connection is not yet
        accepted (the other holds the client id, or will be taken over by it and try again). Once
        accepted, only one heard after this node's own announcement means a takeover: one heard
        before it was made before this node took the client id over (two nodes took the free role
        at once), and giving the role up for it would leave nobody. This node named while it does
        not lead is a term it gave up: nobody holds the role.
        """
        holder = announced_node(payload)
        self.holder = holder
        if holder is None:
            self._try_later(0.0)
        elif holder == self.node:
            if self._link is not None:
                self._confirmed = True
            else:
                self.holder = None
                self._try_later(ANNOUNCEMENT_WAIT)
        elif self._link is not None and (self._confirmed or self._link.client is None):
            log.info("MQTT sequencer: node %r announced the role; this node gives it up", holder)
            self._give_up()

    def _try_later(self, wait: float) -> None:
        if self._stopped or self._link is not None or self._waiting:
            return
        self._waiting = True
        self._attempt = asyncio.get_running_loop().create_task(self._try(wait), name="forge-mqtt-sequencer-try")

    async def _try(self, wait: float) -> None:
        """Take the role if it is still free; a term that fails (even while it starts) may be followed by another."""
        try:
            await asyncio.sleep(wait + random.uniform(0, TAKEOVER_JITTER))
        finally:
            self._waiting = False
        if self._stopped or self.holder is not None or self._link is not None or not self._connected():
            return  # (cut off from the broker: on_connected tries again)
        self._positions = RoomPositions(MAX_ROOMS)
        self._early.clear()
        self._confirmed = False
        self._counters["sequencer_terms"] += 1
        log.info("MQTT sequencer: no node holds the role; node %r takes it", self.node)
        self._link = MqttLink(self.settings, client_id=f"{self.topics.prefix}-sequencer", role="sequencer",
                              on_message=self._on_submit, on_connect=self._on_connect,
                              on_disconnect=self._on_lost,
                              will=aiomqtt.Will(self.topics.sequencer, b"", qos=1, retain=True),
                              session_expiry=SESSION_EXPIRY, manual_ack=True, once=True)
        await self._link.start()

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        assert self._link is not None
        early, self._early = self._early, []
        for message in early:
            self._on_submit(message)
        await self._link.subscribe([self.topics.all_submits], 1)
        self._link.publish_nowait(self.topics.sequencer, announcement(self.node), qos=1, retain=True)

    def _on_lost(self) -> None:
        """Lost the connection (or another node took the client id over): give the role up, never fight for it."""
        log.info("MQTT sequencer: node %r lost its sequencer connection; giving the role up", self.node)
        asyncio.get_running_loop().call_soon(self._give_up)

    def _give_up(self) -> None:
        self._stop_marks()
        link, self._link = self._link, None
        if link is not None:
            asyncio.get_running_loop().create_task(link.stop(), name="forge-mqtt-sequencer-stop")
        if self.holder in (None, self.node):  # (this node's announcement outlives its term: not a holder)
            self.holder = None
            self._try_later(ANNOUNCEMENT_WAIT)

    async def stop(self) -> None:
        """Leave the role with a clean disconnect: the queued submits wait in the session for the next holder."""
        self._stopped = True
        self._stop_marks()
        if self._attempt is not None:
            self._attempt.cancel()
        link, self._link = self._link, None
        if link is not None:
            await link.publish_and_wait(self.topics.sequencer, b"", qos=1, retain=True, timeout=1.0)
            await link.stop()

    # -- numbering (hot path on the sequencer's node) ---------------------------------

    def _on_submit(self, message: aiomqtt.Message) -> None:
        link = self._link
        if link is not None and link.client is None:  # arrived with the CONNACK: numbered once the link is up
            self._early.append(message)
            return
        parsed = self.topics.room_of(message.topic.value)
        if link is None or parsed is None or parsed[1] != "submit":
            self._counters["bad_topics"] += 1
            if link is not None:
                link.ack(message)
            return
        room = parsed[0]
        props = getattr(message.properties, "UserProperty", None) or []
        size = next((v for k, v in props if k == PROP_BATCH), "1")
        count = int(size) if size.isascii() and size.isdigit() and len(size) <= 5 else 0
        if not 0 < count <= batch.MAX_ITEMS:
            self._counters["bad_batches"] += 1
            link.ack(message)
            return
        # a room this term has not numbered continues from what this node heard in it, else a new run
        position, previous = self._positions.next(room, count, after=self._heard(room))
        pairs = [(k, v) for k, v in props if k not in (PROP_SEQUENCE, PROP_PREVIOUS)]
        pairs.append((PROP_SEQUENCE, str(position)))
        if previous is not None:
            pairs.append((PROP_PREVIOUS, str(previous)))
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        sent = link.publish_nowait(self.topics.messages(room), payload, qos=self.settings.qos,
                                   properties=UserProperties(pairs))
        self._unmarked.add(room)
        if self._mark_timer is None:
            self._mark_timer = asyncio.get_running_loop().call_later(MARK_DELAY, self._send_marks)
        # Acknowledged only after the numbered message, on the same connection: a sequencer that dies between
        # taking a message and sending it on leaves it unacknowledged, and the broker gives it to the next one.
        link.ack(message)
        # Not sent (the broker is far behind): every node sees the hole through forge-previous and resyncs.
        self._counters["sequenced" if sent is Sent.OK else "sequencer_dropped"] += 1

    def _send_marks(self) -> None:
        """Announce the last position of every room numbered since the last marks.

        The end of a burst is where a broker drops most (for a node that
        fell behind), and no later message would reveal the hole; a mark
        follows the messages on the same connection, so a node that gets it
        has got them, or lost them.
        """
        self._mark_timer = None
        rooms, self._unmarked = self._unmarked, set()
        link = self._link
        items = [(room, str(last)) for room in rooms if (last := self._positions.last(room)) is not None]
        if link is None or not items:
            return
        for start in range(0, len(items), MARK_ROOMS):
            payload = json.dumps(dict(items[start:start + MARK_ROOMS]), ensure_ascii=False).encode()
            link.publish_nowait(self.topics.marks(self.node), payload, qos=self.settings.qos)
        self._counters["marks_sent"] += 1

    def _stop_marks(self) -> None:
        if self._mark_timer is not None:
            self._mark_timer.cancel()
            self._mark_timer = None
        self._unmarked.clear()

    def given(self, room: str) -> int | None:
        """The last position this node gave in ``room`` while it holds the role; None otherwise."""
        return self._positions.last(room) if self._link is not None else None
