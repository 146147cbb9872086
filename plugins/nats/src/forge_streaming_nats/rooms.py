"""The NATS room store: cluster-wide membership in a JetStream key-value bucket, with per-key TTL.

Each node owns two kinds of keys in the bucket (``FORGE_PRESENCE``):

- ``nodes.<node>``: its liveness, ``{"life": ...}``, written with a
  message TTL of ``presence_ttl`` and refreshed every third of it. A node
  that dies, hangs or is partitioned away stops refreshing; the server
  then removes the key and leaves a delete marker (NATS 2.11+), which every
  other node reads: that node's members leave, and the kernel sends
  ``leave`` frames, within ``presence_ttl`` plus a second or so;
- ``rooms.<room>.<node>``: the node's members of a room (a JSON list,
  tagged with the node's life), written when they change (coalesced),
  removed when the last one leaves.

Every node reads the whole bucket through one consumer (last value per key
first, then every change) and keeps a view: a member counts while its
node's liveness key holds the same life as its room key. So a node
restarted under the same id hides what its previous life left behind at
once, and those members are reported gone. A node whose liveness comes
back (a healed partition) brings its members back (``join``), and puts its
keys back if the others cleared them meanwhile; the keys of a node dead
for longer than ``presence_ttl`` are cleared by the survivors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import nats.js.errors
from forge_streaming import (
    BackendHealth,
    BackendState,
    LocalMembers,
    Member,
    RoomStore,
    RoomStoreListener,
    StreamingConfig,
)
from nats.aio.msg import Msg
from nats.js import api

from .feed import Feed
from .link import NatsLink
from .names import decode_node, decode_room, encode
from .settings import SECTION, NatsSettings

log = logging.getLogger("forge_streaming.nats")

PUBLISH_DELAY = 0.02
"""Seconds local membership changes wait to be written together."""
RETURN_WINDOW = 5.0
"""After a node's liveness comes back, how long its members appearing count as returning (told to the kernel)."""
RESTORE_INTERVAL = 1.0
"""At least this long between two restorations of this node's own keys (two processes with one node id
would otherwise overwrite each other without pause)."""
MARKER_TTL = 60
"""Seconds a removal marker stays in the bucket (then the key is gone for good)."""


@dataclass
class _View:
    """What the bucket says about the other nodes."""

    lives: dict[str, str] = field(default_factory=dict)  # node -> the life its liveness key holds
    entries: dict[str, dict[str, tuple[str, list[Member]]]] = field(default_factory=dict)  # room -> node -> ...

    def visible(self, room: str) -> dict[str, Member]:
        out: dict[str, Member] = {}
        for node, (life, members) in self.entries.get(room, {}).items():
            if self.lives.get(node) == life:
                for member in members:
                    out[member.connection_id] = member
        return out

    def rooms_of(self, node: str) -> list[str]:
        return [room for room, nodes in self.entries.items() if node in nodes]


def _encode_members(life: str, members: list[Member]) -> bytes:
    return json.dumps({"life": life, "members": [
        {"connection_id": m.connection_id, "user_id": m.user_id, "transport": m.transport, "joined_at": m.joined_at}
        for m in members]}, ensure_ascii=False).encode()


def _decode_members(payload: bytes, node: str) -> tuple[str, list[Member]]:
    body = json.loads(payload)
    if not isinstance(body, dict) or not isinstance(body.get("life"), str) or not isinstance(body.get("members"), list):
        raise ValueError("expected {\"life\": ..., \"members\": [...]}")
    members = []
    for item in body["members"]:
        joined_at = float(item.get("joined_at") or 0.0)
        members.append(Member(connection_id=str(item["connection_id"]), user_id=str(item["user_id"]), node=node,
                              transport=str(item.get("transport") or ""),
                              joined_at=joined_at if math.isfinite(joined_at) else 0.0))
    return body["life"], members


def _is_removal(msg: Msg) -> bool:
    headers = msg.headers
    if not headers:
        return False
    return headers.get("KV-Operation") in ("DEL", "PURGE") or headers.get("Nats-Marker-Reason") is not None


class NatsRoomStore(RoomStore):
    name: ClassVar[str] = "nats"

    def __init__(self, settings: NatsSettings | None = None) -> None:
        self.settings = settings or NatsSettings()
        self.bucket = self.settings.presence_bucket
        self._stream = f"KV_{self.bucket}"
        self._prefix = f"$KV.{self.bucket}."
        self._node = ""
        self._life = secrets.token_hex(8)
        self._link: NatsLink | None = None
        self._feed: Feed | None = None
        self._listener: RoomStoreListener | None = None
        # this node's members, each changed room written PUBLISH_DELAY after its first change
        self._members = LocalMembers(self._publish_room, PUBLISH_DELAY)
        self._local = self._members.rooms
        self._view = _View()
        self._building: _View | None = None  # a fresh view being read after a (re)connect
        self._returning: dict[str, float] = {}
        self._cleanups: dict[str, asyncio.TimerHandle] = {}
        self._writes: asyncio.Queue[tuple[str, bytes, dict[str, str] | None]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None
        self._restored_at = -math.inf
        self._stopping = False
        self._synced = asyncio.Event()
        self.counters: Counter[str] = Counter()

    @classmethod
    def from_config(cls, config: StreamingConfig) -> NatsRoomStore:
        return cls(config.section(SECTION, NatsSettings))

    # -- lifecycle ------------------------------------------------------------------

    def watch(self, listener: RoomStoreListener) -> None:
        self._listener = listener

    async def start(self, node_id: str) -> None:
        self._node = node_id
        self._stopping = False
        self._link = NatsLink(self.settings, name=self.settings.name or f"forge-{node_id}-rooms",
                              on_up=self._on_up, on_down=self._on_down)
        self._writer = asyncio.create_task(self._write_loop(), name="forge-nats-rooms-writer")
        self._beat = asyncio.create_task(self._beat_loop(), name="forge-nats-rooms-heartbeat")
        await self._link.start()
        if self._link.ready:  # the view of the others before the first join is answered
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._synced.wait(), self.settings.connect_timeout)

    async def stop(self) -> None:
        self._stopping = True
        self._members.cancel()
        for handle in self._cleanups.values():
            handle.cancel()
        self._cleanups.clear()
        if self._beat is not None:
            self._beat.cancel()
        link = self._link
        if link is not None and link.ready:
            for room in list(self._local):  # this node's part goes now, not after presence_ttl
                self._remove(self._room_key(room, self._node))
            self._remove(self._node_key(self._node))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._writes.join(), 2)
        if self._writer is not None:
            self._writer.cancel()
        for task in (self._beat, self._writer):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        if self._feed is not None:
            await self._feed.stop()
        if link is not None:
            await link.stop()
        self._local.clear()
        self._view = _View()

    def health(self) -> BackendHealth:
        if self._link is None:
            return BackendHealth(BackendState.CONNECTING, "not started")
        health = self._link.health()
        if health.ok and (self._feed is None or not self._feed.open_ or not self._synced.is_set()):
            return BackendHealth(BackendState.CONNECTING, f"reading bucket {self.bucket}")
        return BackendHealth(health.state, f"{health.detail}; bucket {self.bucket}, "
                                           f"{len(self._view.lives)} other node(s) alive")

    # -- keys ---------------------------------------------------------------------------

    @staticmethod
    def _node_key(node: str) -> str:
        return f"nodes.{encode(node)}"

    @staticmethod
    def _room_key(room: str, node: str) -> str:
        return f"rooms.{encode(room)}.{encode(node)}"

    def _parse_key(self, subject: str) -> tuple[str, str | None] | None:
        """``(node, room)`` of a key (room None for a liveness key); None when not one of ours, exactly."""
        if not subject.startswith(self._prefix):
            return None
        tokens = subject[len(self._prefix):].split(".")
        if len(tokens) == 2 and tokens[0] == "nodes":
            node = decode_node(tokens[1])
            return None if node is None else (node, None)
        if len(tokens) == 3 and tokens[0] == "rooms":
            room, node = decode_room(tokens[1]), decode_node(tokens[2])
            return None if room is None or node is None else (node, room)
        return None

    # -- writing this node's part ---------------------------------------------------------

    def _put(self, key: str, value: bytes, ttl: int | None = None) -> None:
        self._writes.put_nowait((self._prefix + key, value, {"Nats-TTL": str(ttl)} if ttl else None))

    def _remove(self, key: str) -> None:
        ttl = str(max(MARKER_TTL, int(self.settings.presence_ttl)))
        headers = {"KV-Operation": "PURGE", "Nats-Rollup": "sub", "Nats-TTL": ttl}
        self._writes.put_nowait((self._prefix + key, b"", headers))

    async def _write_loop(self) -> None:
        """Write the bucket in order, one at a time; a write that fails while disconnected is dropped (the
        next connect writes everything again)."""
        while True:
            subject, value, headers = await self._writes.get()
            try:
                if self._link is not None and self._link.nc.is_connected:
                    await self._link.js.publish(subject, value, headers=headers, timeout=self.settings.ack_timeout)
            except Exception as exc:
                self.counters["write_failures"] += 1
                log.debug("NATS rooms: writing %s failed: %s", subject, exc)
            finally:
                self._writes.task_done()

    def _announce(self) -> None:
        self._put(self._node_key(self._node), json.dumps({"life": self._life, "time": time.time()}).encode(),
                  ttl=int(self.settings.presence_ttl))

    async def _beat_loop(self) -> None:
        interval = self.settings.presence_ttl / 3
        while True:
            await asyncio.sleep(interval)
            if self._link is not None and self._link.ready:
                self._announce()

    def _publish_room(self, room: str) -> None:
        members = self._local.get(room)
        if members:
            self._put(self._room_key(room, self._node), _encode_members(self._life, list(members.values())))
        else:
            self._remove(self._room_key(room, self._node))

    def _restore(self) -> None:
        """Write our liveness and every room again (someone removed them, or the server lost them)."""
        now = time.monotonic()
        if self._stopping or now - self._restored_at < RESTORE_INTERVAL:
            return
        self._restored_at = now
        self.counters["restored"] += 1
        self._announce()
        for room in list(self._local):
            self._publish_room(room)

    # -- connection events ---------------------------------------------------------------

    async def _on_up(self) -> None:
        assert self._link is not None
        await self._ensure_bucket()
        self._announce()
        for room in list(self._local):
            self._publish_room(room)
        if self._feed is None:
            self._feed = Feed(self._link, self._stream, f"{self._prefix}>", on_message=self._on_message,
                              on_broken=self._on_broken, heartbeat=self.settings.heartbeat,
                              max_pending=self.settings.max_pending)
        await self._reread()

    def _on_down(self) -> None:
        if self._feed is not None:
            self._feed.open_ = False

    def _on_broken(self, why: str) -> None:
        if self._link is not None and self._link.ready:
            asyncio.ensure_future(self._reread_quietly())

    async def _reread_quietly(self) -> None:
        try:
            await self._reread()
        except Exception as exc:
            log.warning("NATS rooms: reading bucket %s again failed (%s: %s)", self.bucket, type(exc).__name__, exc)

    async def _reread(self) -> None:
        """Read every key's last value into a fresh view; once read, what changed unseen is told to the kernel."""
        assert self._feed is not None
        self._building = _View()
        info = await self._feed.open(last_per_subject=True)
        if not info.num_pending:
            self._finish_reading()

    async def _ensure_bucket(self) -> None:
        assert self._link is not None
        s = self.settings
        try:
            info = await self._link.jsm.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            try:
                await self._link.js.create_key_value(api.KeyValueConfig(
                    bucket=self.bucket, description="forge-streaming presence: liveness per node, members per room",
                    history=1, storage=api.StorageType(s.storage), replicas=s.replicas,
                    limit_marker_ttl=max(MARKER_TTL, s.presence_ttl)))
                log.info("NATS rooms: created key-value bucket %s", self.bucket)
            except nats.js.errors.BadRequestError:  # another node created it just now
                pass
            return
        if not info.config.allow_msg_ttl or not info.config.subject_delete_marker_ttl:
            config = info.config
            config.allow_msg_ttl = True
            config.subject_delete_marker_ttl = max(MARKER_TTL, s.presence_ttl)
            try:
                await self._link.jsm.update_stream(config)
            except nats.js.errors.Error as exc:
                raise RuntimeError(f"bucket {self.bucket} has no per-key TTL and cannot be given one ({exc}): "
                                   f"NATS server 2.11 or later is needed") from exc

    # -- the cluster view -------------------------------------------------------------------

    def _on_message(self, msg: Msg, sseq: int, pending: int) -> None:
        parsed = self._parse_key(msg.subject)
        if parsed is None:
            self.counters["bad_keys"] += 1
            if self.counters["bad_keys"] in (1, 10, 100, 1000):
                log.warning("NATS rooms: ignoring key %r: not a valid node or room id in its one encoded form",
                            msg.subject)
        else:
            node, room = parsed
            removed = _is_removal(msg)
            if node == self._node:
                self._own(room, msg, removed)
            elif self._building is not None:
                self._apply(self._building, node, room, msg, removed, report=False)
            else:
                self._apply(self._view, node, room, msg, removed, report=True)
        if self._building is not None and pending == 0:
            self._finish_reading()

    def _finish_reading(self) -> None:
        fresh, self._building = self._building, None
        if fresh is None:
            return
        old, self._view = self._view, fresh
        for room in set(old.entries) | set(fresh.entries):
            self._report(room, old.visible(room), fresh.visible(room))
        for node in set(old.lives) - set(fresh.lives):
            self._dead(node)
        self._synced.set()

    def _apply(self, view: _View, node: str, room: str | None, msg: Msg, removed: bool, *, report: bool) -> None:
        if room is None:  # a liveness key
            rooms = view.rooms_of(node)
            before = {r: view.visible(r) for r in rooms} if report else {}
            if removed:
                if view.lives.pop(node, None) is not None and report:
                    log.info("NATS rooms: node %r is gone (%s); its members left", node,
                             (msg.headers or {}).get("Nats-Marker-Reason") or "removed")
                self._dead(node)
            else:
                try:
                    life = json.loads(msg.data)["life"]
                except (ValueError, KeyError, TypeError, RecursionError):
                    self.counters["malformed"] += 1
                    return
                if node not in view.lives and rooms:  # back (a healed partition): its members return
                    self._returning[node] = time.monotonic() + RETURN_WINDOW
                view.lives[node] = str(life)
                handle = self._cleanups.pop(node, None)
                if handle is not None:
                    handle.cancel()
            if report:
                for r in rooms:
                    self._report(r, before[r], view.visible(r))
            return
        nodes = view.entries.setdefault(room, {})
        before_room = view.visible(room) if report else {}
        if removed:
            nodes.pop(node, None)
        else:
            try:
                nodes[node] = _decode_members(msg.data, node)
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                self.counters["malformed"] += 1
                log.warning("NATS rooms: malformed members of node %r in room %r ignored", node, room)
                return
        if not nodes:
            del view.entries[room]
        if report and time.monotonic() < self._returning.get(node, -math.inf):
            after = view.visible(room)
            back = [m for cid, m in after.items() if cid not in before_room]
            if back and self._listener is not None:  # a returning node's members: nobody announced them here
                self._listener.on_members_changed(room, back, ())

    def _report(self, room: str, before: dict[str, Member], after: dict[str, Member]) -> None:
        left = [m for cid, m in before.items() if cid not in after]
        joined = [m for cid, m in after.items() if cid not in before]
        if (left or joined) and self._listener is not None:
            self._listener.on_members_changed(room, joined, left)

    def _dead(self, node: str) -> None:
        """Clear a dead node's keys after ``presence_ttl`` more, unless it comes back meanwhile."""
        if node in self._cleanups or self._stopping:
            return
        loop = asyncio.get_running_loop()
        self._cleanups[node] = loop.call_later(self.settings.presence_ttl, self._clear_node, node)

    def _clear_node(self, node: str) -> None:
        self._cleanups.pop(node, None)
        if node in self._view.lives or self._link is None or not self._link.ready:
            return
        for room in self._view.rooms_of(node):
            self._remove(self._room_key(room, node))

    def _own(self, room: str | None, msg: Msg, removed: bool) -> None:
        """Our own keys as the bucket holds them: put back what someone else removed or overwrote."""
        if self._stopping:
            return
        if room is None:
            if removed or not msg.data:
                self._restore()  # our liveness expired (we were away) or was removed: the others took us for dead
                return
            try:
                life = json.loads(msg.data).get("life")
            except (ValueError, AttributeError, RecursionError):
                life = None
            if life != self._life:
                self._restore()
            return
        if room in self._members.pending:
            return  # our next write of it is on its way
        if removed:
            if room in self._local:
                self._restore()
            return
        try:
            life, _ = _decode_members(msg.data, self._node)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            life = ""
        if life != self._life:  # left by an earlier life of this node id, or written by someone else
            if room in self._local:
                self._publish_room(room)
            else:
                self._remove(self._room_key(room, self._node))
        elif room not in self._local:
            self._remove(self._room_key(room, self._node))

    # -- membership --------------------------------------------------------------------

    async def add_member(self, room: str, member: Member) -> None:
        self._members.add(room, member)

    async def remove_member(self, room: str, connection_id: str) -> None:
        self._members.remove(room, connection_id)

    async def members(self, room: str) -> list[Member]:
        found = self._members.members(room)
        found.extend(self._view.visible(room).values())
        found.sort(key=lambda m: m.joined_at)
        return found

    async def rooms(self) -> list[str]:
        names = set(self._local)
        names.update(room for room in self._view.entries if self._view.visible(room))
        return sorted(names)
