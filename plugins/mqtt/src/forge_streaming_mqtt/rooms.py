"""The MQTT room store: cluster-wide membership from retained messages.

Each node owns one retained message per room it has members in
(``{prefix}/presence/{node}/{room}``: a JSON list of its members) and one
retained status (``{prefix}/nodes/{node}/status``) whose last-will says
``offline``. Every node subscribes to all of them and keeps a cluster
view; a node that goes offline (cleanly or by its will) drops out of it.
Local changes update the view at once and reach the broker coalesced,
so a burst of joins is one publish per room, not one per join.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import aiomqtt
from forge_streaming import BackendHealth, BackendState, Member, RoomStore, StreamingConfig

from .link import MqttLink
from .settings import SECTION, MqttSettings
from .topics import Topics

log = logging.getLogger("forge_streaming.mqtt")

PUBLISH_DELAY = 0.02
"""Seconds local membership changes wait to be published together."""


def _status(state: str) -> bytes:
    return json.dumps({"state": state, "time": time.time()}).encode()


def _encode_members(members: list[Member]) -> bytes:
    return json.dumps([{"connection_id": m.connection_id, "user_id": m.user_id, "node": m.node,
                        "transport": m.transport, "joined_at": m.joined_at} for m in members],
                      ensure_ascii=False).encode()


def _decode_members(payload: bytes, node: str) -> list[Member]:
    items = json.loads(payload)
    if not isinstance(items, list):
        raise ValueError("expected a JSON list of members")
    return [Member(connection_id=str(i["connection_id"]), user_id=str(i["user_id"]), node=node,
                   transport=str(i.get("transport") or ""), joined_at=float(i.get("joined_at") or 0.0))
            for i in items]


class MqttRoomStore(RoomStore):
    name: ClassVar[str] = "mqtt"

    def __init__(self, settings: MqttSettings | None = None) -> None:
        self.settings = settings or MqttSettings()
        self.topics = Topics(self.settings.topic_prefix)
        self._node = ""
        self._link: MqttLink | None = None
        self._local: dict[str, dict[str, Member]] = {}
        self._remote: dict[str, dict[str, list[Member]]] = {}  # node -> room -> members
        self._offline: set[str] = set()
        self._dirty: set[str] = set()
        self._flush_handle: asyncio.TimerHandle | None = None

    @classmethod
    def from_config(cls, config: StreamingConfig) -> MqttRoomStore:
        return cls(config.section(SECTION, MqttSettings))

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, node_id: str) -> None:
        self._node = node_id
        base = self.settings.client_id or f"{self.settings.topic_prefix}-{node_id}"
        will = aiomqtt.Will(self.topics.status(node_id), _status("offline"), qos=1, retain=True)
        self._link = MqttLink(self.settings, client_id=f"{base}-rooms", role="rooms", on_message=self._on_message,
                              on_connect=self._on_connect, will=will)
        await self._link.start()

    async def stop(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        link = self._link
        if link is not None and link.client is not None:
            for room in self._local:
                link.publish_nowait(self.topics.presence(self._node, room), b"", qos=1, retain=True)
            if not await link.publish_and_wait(self.topics.status(self._node), _status("offline"), qos=1,
                                               retain=True, timeout=2):
                log.warning("MQTT rooms: could not announce this node offline in 2s; its last will will")
        if link is not None:
            await link.stop()
        self._local.clear()
        self._remote.clear()

    def health(self) -> BackendHealth:
        """The room store's broker connection; ``Streaming.health()`` (``/healthz``) is degraded while it is not up."""
        return self._link.health() if self._link is not None else BackendHealth(BackendState.CONNECTING)

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        assert self._link is not None
        self._link.publish_nowait(self.topics.status(self._node), _status("online"), qos=1, retain=True)
        # A broker restart may have lost what others told us; the retained messages rebuild it.
        self._remote.clear()
        await self._link.subscribe([self.topics.all_status, self.topics.all_presence], 1)
        for room in list(self._local):
            self._publish_room(room)

    # -- membership --------------------------------------------------------------------

    async def add_member(self, room: str, member: Member) -> None:
        members = self._local.setdefault(room, {})
        if member.connection_id not in members:
            members[member.connection_id] = member
            self._mark(room)

    async def remove_member(self, room: str, connection_id: str) -> None:
        members = self._local.get(room)
        if members is None or members.pop(connection_id, None) is None:
            return
        if not members:
            del self._local[room]
        self._mark(room)

    async def members(self, room: str) -> list[Member]:
        found = list(self._local.get(room, {}).values())
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

    def _mark(self, room: str) -> None:
        self._dirty.add(room)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(PUBLISH_DELAY, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        dirty, self._dirty = self._dirty, set()
        for room in dirty:
            self._publish_room(room)

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

    def _on_status(self, node: str, payload: bytes) -> None:
        if node == self._node:
            return
        state = "offline"
        if payload:
            try:
                state = str(json.loads(payload).get("state", "offline"))
            except (ValueError, AttributeError):
                log.warning("MQTT rooms: malformed status of node %r ignored", node)
                return
        if state == "online":
            self._offline.discard(node)
            return
        rooms = self._remote.pop(node, {})
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

    def _on_presence(self, node: str, room: str, payload: bytes, *, retained: bool) -> None:
        if node == self._node:
            if payload and room not in self._local and room not in self._dirty:
                # Left over from an earlier life of a node with this id.
                self._publish_room(room)
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
            rooms[room] = _decode_members(payload, node)
        except (ValueError, KeyError, TypeError):
            log.warning("MQTT rooms: malformed presence of node %r in room %r ignored", node, room)


def factories() -> Mapping[str, Callable[[StreamingConfig], RoomStore]]:
    return {"mqtt": MqttRoomStore.from_config}
