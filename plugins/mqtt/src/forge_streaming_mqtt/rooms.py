"""The MQTT room store: cluster-wide membership from retained messages.

Each node owns one retained message per room it has members in
(``{prefix}/presence/{node}/{room}``: a JSON list of its members) and one
retained status (``{prefix}/nodes/{node}/status``) whose last-will says
``offline``. Every node subscribes to all of them and keeps a cluster
view; a node that goes offline (cleanly or by its will) drops out of it.
Local changes update the view at once and reach the broker coalesced,
so a burst of joins is one publish per room, not one per join.

An ``offline`` status has to prove itself: each connection of a node draws
a secret, announces its SHA-256 (``life``) in its ``online`` status and puts
the secret itself (``proof``) only in its last will and in the ``offline`` it
publishes when it stops. So the broker's will for a dead node is believed,
and an ``offline`` written by anyone else for a node that is still alive
(which only a forger could write) is ignored. A node also restores its own
status and presence when it sees them overwritten.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import aiomqtt
from forge_streaming import (
    BackendHealth,
    BackendState,
    LocalMembers,
    Member,
    RoomStore,
    RoomStoreListener,
    StreamingConfig,
)

from .link import LinkState, MqttLink
from .settings import SECTION, MqttSettings
from .topics import Topics

log = logging.getLogger("forge_streaming.mqtt")

PUBLISH_DELAY = 0.02
"""Seconds local membership changes wait to be published together."""
RESTORE_INTERVAL = 1.0
"""Seconds between two restorations of this node's own status (two processes with one node id would
otherwise overwrite each other's status without pause)."""
RETURN_WINDOW = 5.0
"""After a node comes back online, how long its presence counts as members returning (told to the kernel)."""


def _status(state: str, **extra: str) -> bytes:
    return json.dumps({"state": state, "time": time.time(), **extra}).encode()


def _commitment(proof: str) -> str:
    return hashlib.sha256(proof.encode("utf-8", "surrogatepass")).hexdigest()


def _encode_members(members: list[Member]) -> bytes:
    return json.dumps([{"connection_id": m.connection_id, "user_id": m.user_id, "node": m.node,
                        "transport": m.transport, "joined_at": m.joined_at} for m in members],
                      ensure_ascii=False).encode()


def _decode_members(payload: bytes, node: str) -> list[Member]:
    items = json.loads(payload)
    if not isinstance(items, list):
        raise ValueError("expected a JSON list of members")
    members = []
    for i in items:
        joined_at = float(i.get("joined_at") or 0.0)
        members.append(Member(connection_id=str(i["connection_id"]), user_id=str(i["user_id"]), node=node,
                              transport=str(i.get("transport") or ""),
                              joined_at=joined_at if math.isfinite(joined_at) else 0.0))
    return members


class MqttRoomStore(RoomStore):
    name: ClassVar[str] = "mqtt"

    def __init__(self, settings: MqttSettings | None = None) -> None:
        self.settings = settings or MqttSettings()
        self.topics = Topics(self.settings.topic_prefix)
        self._node = ""
        self._link: MqttLink | None = None
        # this node's members, each changed room published PUBLISH_DELAY after its first change
        self._members = LocalMembers(self._publish_room, PUBLISH_DELAY)
        self._local = self._members.rooms
        self._remote: dict[str, dict[str, list[Member]]] = {}  # node -> room -> members
        self._offline: set[str] = set()
        self._proof = ""  # this connection's secret; its hash is in our online status, itself in our will
        self._lives: dict[str, str] = {}  # node -> the hash its online status announced
        self._restored_at = -math.inf
        self._restore_handle: asyncio.TimerHandle | None = None
        self._restore_rooms: set[str] | None = set()  # rooms to publish again with our status; None: all
        self._stopping = False
        self.counters: Counter[str] = Counter()
        self._listener: RoomStoreListener | None = None
        self._returning: dict[str, float] = {}  # node back from offline -> until when its presence is a return

    @classmethod
    def from_config(cls, config: StreamingConfig) -> MqttRoomStore:
        return cls(config.section(SECTION, MqttSettings))

    # -- lifecycle ------------------------------------------------------------------

    def watch(self, listener: RoomStoreListener) -> None:
        self._listener = listener

    async def start(self, node_id: str) -> None:
        self._node = node_id
        base = self.settings.client_id or f"{self.settings.topic_prefix}-{node_id}"
        self._stopping = False
        self._link = MqttLink(self.settings, client_id=f"{base}-rooms", role="rooms", on_message=self._on_message,
                              on_connect=self._on_connect, will=self._new_life)
        await self._link.start()

    def _new_life(self) -> aiomqtt.Will:
        """A secret for the next connection, and the last will that reveals it (called once per connection)."""
        self._proof = secrets.token_hex(16)
        return aiomqtt.Will(self.topics.status(self._node), _status("offline", proof=self._proof), qos=1, retain=True)

    def _online(self) -> bytes:
        return _status("online", life=_commitment(self._proof))

    async def stop(self) -> None:
        self._stopping = True
        if self._restore_handle is not None:
            self._restore_handle.cancel()
            self._restore_handle = None
        self._members.cancel()
        link = self._link
        if link is not None and link.client is not None:
            for room in self._local:
                link.publish_nowait(self.topics.presence(self._node, room), b"", qos=1, retain=True)
            if not await link.publish_and_wait(self.topics.status(self._node), _status("offline", proof=self._proof),
                                               qos=1, retain=True, timeout=2):
                log.warning("MQTT rooms: could not announce this node offline in 2s; its last will will")
        if link is not None:
            await link.stop()
        self._local.clear()
        self._remote.clear()

    @property
    def connects(self) -> int:
        """How many times this store has connected to the broker (1 while it never lost the connection)."""
        return self._link.connects if self._link is not None else 0

    def health(self) -> BackendHealth:
        """The room store's broker connection; ``Streaming.health()`` (``/healthz``) is degraded while it is not up."""
        return self._link.health() if self._link is not None else BackendHealth(BackendState.CONNECTING)

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        assert self._link is not None
        self._link.publish_nowait(self.topics.status(self._node), self._online(), qos=1, retain=True)
        # A broker restart may have lost what others told us; the retained messages rebuild it.
        self._remote.clear()
        await self._link.subscribe([self.topics.all_status, self.topics.all_presence], 1)
        for room in list(self._local):
            self._publish_room(room)

    # -- membership --------------------------------------------------------------------

    async def add_member(self, room: str, member: Member) -> None:
        self._members.add(room, member)

    async def remove_member(self, room: str, connection_id: str) -> None:
        self._members.remove(room, connection_id)

    async def members(self, room: str) -> list[Member]:
        found = self._members.members(room)
        for node, rooms in self._remote.items():
            if node != self._node and node not in self._offline:
                found.extend(rooms.get(room, ()))
        found.sort(key=lambda m: m.joined_at)
        return found

    async def rooms(self) -> list[str]:
        names = set(self._local)
        for node, rooms in self._remote.items():
            if node != self._node and node not in self._offline:
                names.update(r for r, members in rooms.items() if members)
        return sorted(names)

    # -- publishing this node's part ---------------------------------------------------------

    def _publish_room(self, room: str) -> None:
        """Publish ``room``'s retained member list of this node; if disconnected, on_connect will."""
        if self._link is None:
            return
        members = self._local.get(room)
        payload = _encode_members(list(members.values())) if members else b""
        self._link.publish_nowait(self.topics.presence(self._node, room), payload, qos=1, retain=True)

    # -- the cluster view -------------------------------------------------------------------

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload or "").encode()
        node = self.topics.node_of_status(topic)
        if node is not None:
            self._on_status(node, payload)
            return
        parsed = self.topics.presence_of(topic)
        if parsed is not None:
            self._on_presence(parsed[0], parsed[1], payload, retained=bool(message.retain))
            return
        self.counters["bad_topics"] += 1  # a node or room id that is not valid, or not in the form we encode
        if self.counters["bad_topics"] in (1, 10, 100, 1000) or self.counters["bad_topics"] % 10_000 == 0:
            log.warning("MQTT rooms: ignoring a publish on %r: not a valid node or room id in its topic "
                        "(%d such publishes so far)", topic, self.counters["bad_topics"])

    def _on_status(self, node: str, payload: bytes) -> None:
        status: Any = {"state": "offline"}  # an empty payload clears a retained status: the node is gone
        if payload:
            try:
                status = json.loads(payload)
            except (ValueError, RecursionError):
                status = None
            if not isinstance(status, dict):
                self.counters["malformed_status"] += 1
                log.warning("MQTT rooms: malformed status of node %r ignored", node)
                return
        if node == self._node:
            self._on_own_status(status)
            return
        state, life, proof = status.get("state"), status.get("life"), status.get("proof")
        if state == "online":
            # a node restarted, or reconnected, announces a new life; a node of an older version, none
            if isinstance(life, str):
                self._lives[node] = life
            else:
                self._lives.pop(node, None)
            if node in self._offline:  # back (restarted, or the partition healed): its presence is a return
                self._returning[node] = time.monotonic() + RETURN_WINDOW
            self._offline.discard(node)
            return
        known = self._lives.get(node)
        if known is not None and (not isinstance(proof, str) or _commitment(proof) != known):
            # Only the node itself (its clean stop) or the broker (its last will) knows the proof of this life.
            self.counters["forged_status"] += 1
            log.warning("MQTT rooms: ignoring a status %r of node %r without the proof of its current life: "
                        "not from the node or its last will (%d such statuses so far)", str(state)[:20], node,
                        self.counters["forged_status"])
            return
        self._lives.pop(node, None)
        rooms = self._remote.pop(node, {})
        self._returning.pop(node, None)
        if self._listener is not None and node not in self._offline:
            for room, members in rooms.items():  # they vanished without a leave of their own: the kernel says it
                if members:
                    self._listener.on_members_changed(room, (), members)
        if node not in self._offline:
            self._offline.add(node)
            if payload:
                log.info("MQTT rooms: node %r went offline; its members left presence", node)
        self._clear_retained(node, rooms, cleared_status=bool(payload))

    def _clear_retained(self, node: str, rooms: Mapping[str, Any], *, cleared_status: bool) -> None:
        """Clear a dead node's retained messages so that they do not haunt nodes started later."""
        if self._link is None:
            return
        for room in rooms:
            self._link.publish_nowait(self.topics.presence(node, room), b"", qos=1, retain=True)
        if cleared_status:
            self._link.publish_nowait(self.topics.status(node), b"", qos=1, retain=True)

    def _on_own_status(self, status: dict[str, Any]) -> None:
        """Our own status as the broker holds it: if it is not our current ``online``, put it back."""
        if status.get("state") == "online" and status.get("life") == _commitment(self._proof):
            return
        if self._stopping or self._link is None or self._link.state is not LinkState.UP:
            return  # stopping (our own offline), or the old will of the previous connection: on_connect sends online
        log.warning("MQTT rooms: this node's status was overwritten (%r); announcing it online again",
                    str(status.get("state"))[:20])
        self._restore()

    def _restore(self, room: str | None = None) -> None:
        """Publish our online status again, then ``room``'s members (None: every room's), soon.

        At most once per RESTORE_INTERVAL: a node that took us for dead clears each presence we
        publish until it gets our status, which goes out first.
        """
        if room is None:
            self._restore_rooms = None
        elif self._restore_rooms is not None:
            self._restore_rooms.add(room)
        if self._restore_handle is None:
            delay = max(0.0, self._restored_at + RESTORE_INTERVAL - time.monotonic())
            self._restore_handle = asyncio.get_running_loop().call_later(delay, self._publish_again)

    def _publish_again(self) -> None:
        self._restore_handle = None
        rooms, self._restore_rooms = self._restore_rooms, set()
        if self._stopping or self._link is None or self._link.state is not LinkState.UP:
            return  # the next on_connect publishes everything anyway
        self._restored_at = time.monotonic()
        self.counters["restored"] += 1
        self._link.publish_nowait(self.topics.status(self._node), self._online(), qos=1, retain=True)
        for room in list(self._local) if rooms is None else [r for r in rooms if r in self._local]:
            self._publish_room(room)

    def _on_presence(self, node: str, room: str, payload: bytes, *, retained: bool) -> None:
        if node == self._node:
            if room in self._members.pending:
                return  # our next publish for it is on its way
            if payload and room not in self._local:
                # Left over from an earlier life of a node with this id.
                self._publish_room(room)
            elif not payload and room in self._local:
                # Cleared by a node that believed this one dead: tell everyone again that we live, and who is here.
                self._restore(room)
            return
        if node in self._offline:
            if payload and self._link is not None:
                self._link.publish_nowait(self.topics.presence(node, room), b"", qos=1, retain=True)
            return
        rooms = self._remote.setdefault(node, {})
        if not payload:
            rooms.pop(room, None)
            return
        try:
            members = _decode_members(payload, node)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            log.warning("MQTT rooms: malformed presence of node %r in room %r ignored", node, room)
            return
        before = {m.connection_id for m in rooms.get(room, ())}
        rooms[room] = members
        if self._listener is not None and time.monotonic() < self._returning.get(node, -math.inf):
            back = [m for m in members if m.connection_id not in before]
            if back:  # a returning node's members: nobody announced them on this node
                self._listener.on_members_changed(room, back, ())


def factories() -> Mapping[str, Callable[[StreamingConfig], RoomStore]]:
    return {"mqtt": MqttRoomStore.from_config}
