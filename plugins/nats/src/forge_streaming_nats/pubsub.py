"""The NATS JetStream pub/sub backend: the stream orders each room, its sequence is the position.

Every room message is published once into one stream (``FORGE_ROOMS``),
on the room's own subject (``forge.rooms.<room>``), keeping the last
``max_msgs_per_subject`` stored messages of each room. JetStream gives it a
stream sequence (in a batch, one of the sequences the batch reserved):
unique, increasing within the room, the same for every node, so it *is* the
room position (no clock, no node numbering).

Live delivery: the stream republishes every message it stores, in order,
to core NATS (``forge.live.<room>``) with its sequence and the room's
previous sequence in headers (``Nats-Sequence``, ``Nats-Last-Sequence``).
A node subscribes to the rooms it has members in and hands their messages
to the kernel, which fans them out locally: one delivery per node per
message, only for the rooms the node listens to. A message whose previous
sequence is above the last one the node delivered in that room shows a hole
(the server dropped messages for a node that fell behind, or the node was
away): the node holds the room's live messages, reads what it missed from
the stream, delivers it in order, and resyncs the room only when the stream
no longer holds it all. After an outage, every room is read again from the
last position the node delivered, the same way; and a moment after a node
subscribes to a room it checks the stream for a message the server did
not republish to the brand-new subscription (:meth:`NatsPubSub._settle`).

Batches (batch.py): the room messages a node publishes to one room in one
turn of its event loop are stored as one message, an atomic batch whose
``k - 1`` empty pads reserve the stream sequences before it, so its ``k``
room messages still have a sequence each (``S - k + 1 .. S``). A burst then
costs the server, the acknowledgements and every node one message per room
and turn instead of one per room message, and each node hands the kernel the
whole burst at once (one write per member instead of several).

Publishing is pipelined: a publish returns once the message is gathered,
one task sends each turn's messages in order, their acknowledgements are
awaited apart, and one that fails or does not come is sent again with the
same ``Nats-Msg-Id`` (the stream stores it once; a batch whose id it has is
refused as a duplicate, which means the same). While JetStream is
unreachable messages wait, in order, in a bounded buffer.

Positions only go up, even when the stream is lost: a stream this backend
creates starts at ``first_seq`` = the current time in microseconds (and
above every position the node has seen), so a recreated stream never
hands out a position again; one found below positions this node already
handed out (recreated by hand from 1) is moved up (purged to a higher first
sequence), and every room gets ``resync``.

Whether the stream still holds everything of a room after a position:
see :meth:`NatsPubSub._complete`. That one rule decides an exact resume
(``fetch_history``) and which holes become ``resync``.

Presence notices are live only: core NATS on ``forge.notices.<room>``, never stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar

import nats.errors
import nats.js.errors
from forge_streaming import (
    BackendHealth,
    BackendListener,
    BackendState,
    Envelope,
    EnvelopeKind,
    PubSubBackend,
    StreamingConfig,
)
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from . import batch
from .dispatch import dispatch
from .link import NatsLink
from .names import Subjects, valid_id
from .settings import SECTION, NatsSettings

log = logging.getLogger("forge_streaming.nats")

H_NODE = "Forge-Node"
H_SENDER = "Forge-Sender"
H_BINARY = "Forge-Binary"  # "1" on a binary room message (Envelope.binary); absent on text
H_ID = "Forge-Id"  # the message id, when the publisher waits for its position (Envelope.id)
H_MSG_ID = "Nats-Msg-Id"
H_SEQUENCE = "Nats-Sequence"  # set by the stream's republish: the message's stream sequence
H_PREVIOUS = "Nats-Last-Sequence"  # set by the stream's republish: the room's sequence before it (0: none held)
H_BATCH_ID = "Nats-Batch-Id"  # an atomic batch's id (batch.py): on its pads and on the message that commits it
H_BATCH_SEQ = "Nats-Batch-Sequence"  # on the message committing a batch: how many messages the batch stored
H_BATCH_COMMIT = "Nats-Batch-Commit"  # "1" on the message committing a batch (stored, republished)
ERR_BATCH_DUPLICATE = 10201  # "atomic publish batch contains duplicate message id": stored already
MAX_HISTORY_READ = 100_000  # messages one read of a room's history takes at most
MIN_PER_ROOM = 1_000
"""Messages the stream keeps per room at least, whatever ``rooms.history_size``: a node that falls behind
in a burst reads what it missed from there, so the stream is also each node's catch-up buffer."""
MAX_QUEUED = 1_000  # stored messages gathered but not sent yet, past which a publisher waits its turn
FILL_CONCURRENCY = 8  # rooms read again at once after an outage
SETTLE_DELAY = 0.25  # seconds after subscribing until a node checks what its new rooms hold (see _settle)

_RETRYABLE = (TimeoutError, nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError,
              nats.errors.NoRespondersError, nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
              nats.errors.OutboundBufferLimitError, nats.errors.StaleConnectionError)


@dataclass(slots=True)
class _Outgoing:
    """One message to store: a room message alone, or a batch of them (``envelopes``, see batch.py)."""

    subject: str
    payload: bytes
    headers: dict[str, str]
    envelopes: tuple[Envelope, ...] = ()  # a batch: the room messages it carries (2 or more)

    @property
    def count(self) -> int:
        """Room messages it carries."""
        return len(self.envelopes) or 1


def _now_us() -> int:
    return time.time_ns() // 1000


def _limit(value: int | None) -> int:
    """A JetStream limit: -1 for none."""
    return -1 if value is None else value


def _span(headers: dict[str, str] | None) -> int:
    """The positions a stored message takes: ``k`` for the message committing an atomic batch of ``k`` (checked
    by the server: the batch's messages are at the ``k`` sequences ending at its own), else 1."""
    if not headers or headers.get(H_BATCH_COMMIT) != "1" or H_BATCH_ID not in headers:
        return 1
    text = headers.get(H_BATCH_SEQ) or ""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 7 else 0  # 0: not a count


def _milestone(count: int) -> bool:
    """Log a recurring event at its 1st, 10th, 100th, 1000th and every 10,000th time, not each time."""
    return count in (1, 10, 100, 1000) or count % 10_000 == 0


class StreamUnusable(Exception):
    """The stream cannot be used as it is (missing, clashing, or below positions already handed out)."""


@dataclass(slots=True)
class _Room:
    """A room this node listens to."""

    last: int | None = None  # the room is delivered (or resynced) up to this position (None: none heard yet)
    held: list[Msg] | None = None  # live messages kept while what came before them is read from the stream
    sub: Subscription | None = None  # its live subscription (subscribe_mode: rooms)
    fills: int = field(default=0)  # reads from the stream so far (for tests and health)


class NatsPubSub(PubSubBackend):
    name: ClassVar[str] = "nats"

    def __init__(self, settings: NatsSettings | None = None, *, history_size: int = 100) -> None:
        self.settings = settings or NatsSettings()
        self.subjects = Subjects(self.settings.subject_prefix)
        self.per_room = self.settings.max_msgs_per_subject or max(history_size, MIN_PER_ROOM)
        self.counters: Counter[str] = Counter()
        self._node = ""
        self._boot = secrets.token_hex(4)  # message ids are unique per process, not only per node id
        self._count = 0
        self._listener: BackendListener | None = None
        self._link: NatsLink | None = None
        self._live: Subscription | None = None  # subscribe_mode: wildcard
        self._notices: Subscription | None = None
        self._rooms: dict[str, _Room] = {}
        self._room_of: dict[str, str | None] = {}  # live subject -> room (decoded once per subject)
        self._highest = 0  # the highest position this node has seen (delivered or acknowledged)
        self._last_seq = 0  # the stream's last sequence as last seen
        self._stream_created: object = None
        self._buffer: deque[_Outgoing] = deque()  # held while JetStream is unreachable, sent in order
        self._failed: deque[_Outgoing] = deque()  # sent but not acknowledged: sent again before the held ones
        # message id -> (message, sent at, acknowledgement), in send order
        self._inflight: dict[str, tuple[_Outgoing, float, asyncio.Future[api.PubAck]]] = {}
        self._ack_watch: asyncio.Task[None] | None = None
        self._atomic = False  # the stream takes atomic batches (and has the pads subject): see batch.py
        self._batch_prefix = secrets.token_hex(6)  # batch ids are unique while in flight, across nodes too
        self._batches = 0
        self._turn: dict[str, list[Envelope]] = {}  # room -> its messages published in this loop turn
        self._turn_scheduled = False
        self._queue: deque[_Outgoing] = deque()  # gathered, to be sent in order by the sender task
        self._sender: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._problem = ""

    @classmethod
    def from_config(cls, config: StreamingConfig) -> NatsPubSub:
        return cls(config.section(SECTION, NatsSettings), history_size=config.rooms.history_size)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self, node_id: str, listener: BackendListener) -> None:
        self._node = node_id
        self._listener = listener
        self._link = NatsLink(self.settings, name=self.settings.name or f"forge-{node_id}-pubsub",
                              on_up=self._on_up)
        await self._link.start()

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), self.settings.ack_timeout)  # let the last acknowledgements come
        unsent = len(self._buffer) + len(self._failed)
        if unsent:
            log.warning("NATS pubsub: stopping with %d messages not acknowledged by JetStream; they are lost", unsent)
        for task in [self._sender, self._flusher, self._ack_watch, self._watcher, *self._tasks]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._link is not None:
            await self._link.stop()
        self._rooms.clear()
        self._listener = None

    async def flush(self) -> None:
        """Send what this loop turn gathered and wait until JetStream acknowledged every message sent so far."""
        if self._turn:
            self._submit()
        if self._sender is not None and not self._sender.done():
            await asyncio.shield(self._sender)
        if self._inflight and self._link is not None and self._link.ready:
            await self._link.js.publish_async_completed()

    @property
    def connects(self) -> int:
        """How many times this backend has connected and set up (1 while it never lost the connection)."""
        return self._link.connects if self._link is not None else 0

    def lag(self) -> int:
        """Live messages received but not handed to the kernel yet: held while their rooms are read again
        from the stream (the rest is handed over as it arrives)."""
        return sum(len(r.held) for r in self._rooms.values() if r.held)

    def health(self) -> BackendHealth:
        if self._link is None:
            return BackendHealth(BackendState.CONNECTING, "not started")
        link = self._link.health()
        s = self.settings
        parts = [link.detail, f"stream {s.stream} ({s.storage}, {s.replicas} replica{'s' if s.replicas > 1 else ''}, "
                              f"{self.per_room} per room) at {self._last_seq}", f"lag {self.lag()}"]
        if self._buffer or self._failed:
            parts.append(f"{len(self._buffer) + len(self._failed)} messages waiting to be sent")
        if self.counters["buffer_dropped"]:
            parts.append(f"{self.counters['buffer_dropped']} messages dropped from the outgoing buffer")
        if self.counters["filled"]:
            parts.append(f"{self.counters['filled']} holes filled from the stream")
        if self.counters["rooms_resynced"]:
            parts.append(f"{self.counters['rooms_resynced']} room resyncs (messages the stream no longer held)")
        if self.counters["bad_batches"]:
            parts.append(f"{self.counters['bad_batches']} stored batches that could not be read (see the log)")
        if self.counters["publish_refused"]:
            parts.append(f"{self.counters['publish_refused']} messages refused by JetStream (see the log)")
        if self._problem:
            parts.append(self._problem)
        return BackendHealth(link.state, "; ".join(parts))

    # -- connection events --------------------------------------------------------

    async def _on_up(self) -> None:
        """After every (re)connect: the stream, the subscriptions, and each room read again from where it stood."""
        assert self._link is not None
        nc = self._link.nc
        seen = self._highest  # before asking: everything delivered so far is in the stream the answer shows
        await self._check_stream(await self._ensure_stream(), seen, "reconnected to NATS", fill=False)  # filled below
        rooms = [room for room, state in self._rooms.items() if state.last is not None]  # read again below
        for room, state in list(self._rooms.items()):  # subscribed before the first connect: where they stand
            if state.last is None:  # (before subscribing: see _settle)
                state.last = await self._room_last(room)
        if self._notices is None:  # nats-py resubscribes core subscriptions by itself on reconnect
            self._notices = await nc.subscribe(self.subjects.all_notices, cb=self._on_notice)
        if self.settings.subscribe_mode == "wildcard":
            if self._live is None:
                self._live = await self._subscribe(self.subjects.all_live)
        else:
            for room, state in list(self._rooms.items()):
                if state.sub is None:
                    state.sub = await self._subscribe(self.subjects.live(room))
        await nc.flush(timeout=max(1, round(self.settings.ack_timeout)))
        rooms = [room for room in rooms if room in self._rooms]
        for room in rooms:  # hold their live messages until what came before is read
            if self._rooms[room].held is None:
                self._rooms[room].held = []
        semaphore = asyncio.Semaphore(FILL_CONCURRENCY)

        async def fill(room: str) -> None:
            async with semaphore:
                await self._fill(room, "this node was away")

        await asyncio.gather(*(fill(room) for room in rooms))
        self._spawn(self._settle(list(self._rooms)))  # the subscriptions made (again) just now
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch_stream(), name="forge-nats-stream-watch")
        self._kick_flusher()

    async def _subscribe(self, subject: str) -> Subscription:
        """A live subscription whose messages reach :meth:`_on_live_msg` as they arrive (dispatch.py)."""
        assert self._link is not None
        return dispatch(await self._link.nc.subscribe(subject, pending_bytes_limit=0), self._on_live_msg)

    async def _ensure_stream(self) -> api.StreamInfo:
        assert self._link is not None
        jsm, s = self._link.jsm, self.settings
        try:
            info = await jsm.stream_info(s.stream)
        except nats.js.errors.NotFoundError:
            if not s.manage_stream:
                raise StreamUnusable(f"stream {s.stream} does not exist and pubsub.nats.manage_stream is false: "
                                     f"create it on subjects {' and '.join(self._wanted_subjects())}, republishing "
                                     f"{self.subjects.all_rooms} to {self.subjects.all_live}"
                                     f"{' (allow_atomic: batches)' if s.batch else ''}") from None
            first = max(_now_us(), self._highest + 1)
            try:
                info = await jsm.add_stream(self._stream_config(first))
                log.info("NATS pubsub: created stream %s (%s, %d replicas) starting at position %d", s.stream,
                         s.storage, s.replicas, first)
            except nats.js.errors.BadRequestError as refused:  # another node created it just now, or a clash
                try:
                    info = await jsm.stream_info(s.stream)
                except nats.js.errors.NotFoundError:
                    raise StreamUnusable(
                        f"cannot create stream {s.stream} on {self.subjects.all_rooms}: {refused.description} "
                        f"(another stream takes these subjects? set pubsub.nats.subject_prefix or stream)") from None
            return info
        if s.manage_stream and self._differs(info.config):
            wanted = self._stream_config(None)
            wanted.first_seq = info.config.first_seq
            wanted.metadata = info.config.metadata
            wanted.subjects = self._wanted_subjects(info.config.subjects)
            if not s.batch:  # what nodes with batches on need stays (pubsub.nats.batch is per node)
                wanted.allow_atomic = info.config.allow_atomic
            try:
                info = await jsm.update_stream(wanted)
                log.info("NATS pubsub: stream %s updated to the configured limits", s.stream)
            except nats.js.errors.Error as exc:
                log.warning("NATS pubsub: could not bring stream %s to the configured limits (%s); using it as it is",
                            s.stream, exc)
        republish = info.config.republish
        if republish is None or republish.src != self.subjects.all_rooms or republish.dest != self.subjects.all_live \
                or republish.headers_only:
            raise StreamUnusable(f"stream {s.stream} does not republish {self.subjects.all_rooms} to "
                                 f"{self.subjects.all_live} (with the messages): nodes would hear nothing live")
        return info

    def _stream_config(self, first_seq: int | None) -> api.StreamConfig:
        s = self.settings
        return api.StreamConfig(
            name=s.stream, description="forge-streaming room messages: one subject per room, position = sequence",
            subjects=self._wanted_subjects(), retention=api.RetentionPolicy.LIMITS, discard=api.DiscardPolicy.OLD,
            max_msgs_per_subject=self.per_room, max_bytes=_limit(s.max_bytes), max_age=s.max_age,
            max_msg_size=_limit(s.max_msg_size), max_msgs=-1, storage=api.StorageType(s.storage),
            num_replicas=s.replicas, duplicate_window=s.duplicate_window, allow_direct=True, first_seq=first_seq,
            republish=api.RePublish(src=self.subjects.all_rooms, dest=self.subjects.all_live, headers_only=False),
            allow_atomic=True if self.settings.batch else None,
        )

    def _wanted_subjects(self, current: list[str] | None = None) -> list[str]:
        """The room subjects, and the pads subject of batches when this node sends batches or it is there."""
        if self.settings.batch or self.subjects.pads in (current or []):
            return [self.subjects.all_rooms, self.subjects.pads]
        return [self.subjects.all_rooms]

    def _differs(self, config: api.StreamConfig) -> bool:
        s = self.settings
        republish = config.republish
        return (config.max_msgs_per_subject != self.per_room or (config.max_bytes or -1) != _limit(s.max_bytes)
                or (config.max_age or 0) != s.max_age or (config.num_replicas or 1) != s.replicas
                or config.subjects != self._wanted_subjects(config.subjects)
                or (self.settings.batch and not config.allow_atomic)
                or (config.max_msg_size or -1) != _limit(s.max_msg_size)
                or republish is None or republish.dest != self.subjects.all_live or bool(republish.headers_only))

    async def _check_stream(self, info: api.StreamInfo, seen: int, why: str, *, fill: bool = True) -> None:
        """A stream created anew, or gone back below positions handed out: say which rooms lost messages.

        ``seen`` is the highest position this node had delivered *before* it asked for ``info``: a message
        delivered while the answer was on its way may be above the answer's last sequence, and is no sign
        of a stream gone back.
        """
        assert self._link is not None
        atomic = self.settings.batch and bool(info.config.allow_atomic) \
            and self.subjects.pads in (info.config.subjects or [])
        if self.settings.batch and not atomic and (self._atomic or not self.counters["no_batches"]):
            self.counters["no_batches"] += 1
            log.warning("NATS pubsub: stream %s does not take atomic batches on %s (nats-server 2.12+, allow_atomic, "
                        "subject %s): one stored message per room message", self.settings.stream,
                        self.subjects.all_rooms, self.subjects.pads)
        self._atomic = atomic
        state = info.state
        if state.last_seq > self._last_seq or state.last_seq < seen:
            self._last_seq = state.last_seq
        if state.last_seq < seen:  # recreated by hand from 1, or a memory stream after a restart
            if not self.settings.manage_stream:
                self._problem = (f"stream {self.settings.stream} restarted at sequence {state.last_seq + 1}, below "
                                 f"position {self._highest} already handed out: positions would repeat")
                raise StreamUnusable(self._problem + "; purge it with a higher sequence (nats stream purge --seq) "
                                                     "or let forge-streaming manage it (pubsub.nats.manage_stream)")
            floor = max(_now_us(), self._highest + 1)
            log.warning("NATS pubsub: stream %s restarted at sequence %d, below position %d already handed out; "
                        "moving it to %d (what it holds now is dropped) and resyncing every room",
                        self.settings.stream, state.last_seq + 1, self._highest, floor)
            await self._link.jsm.purge_stream(self.settings.stream, seq=floor)
            self.counters["moved_up"] += 1
            self._highest = floor - 1
            self._stream_created = None
            for room_state in self._rooms.values():
                room_state.last = None
            self._resync(None, "the NATS stream was lost; its history starts again")
            return
        if self._stream_created is not None and info.created != self._stream_created:  # deleted and created again
            self._stream_created = info.created
            log.warning("NATS pubsub: stream %s was created again (%s); rooms whose messages it lost resync",
                        self.settings.stream, why)
            for room, room_state in self._rooms.items():
                if fill and room_state.held is None and room_state.last is not None:
                    room_state.held = []
                    self._spawn(self._fill(room, "the stream was created again"))
        self._stream_created = info.created

    async def _watch_stream(self) -> None:
        """Every heartbeat: the stream's position for /healthz, and whether it was lost or went back meanwhile."""
        assert self._link is not None
        while True:
            await asyncio.sleep(self.settings.heartbeat)
            if not self._link.ready:
                continue
            seen = self._highest
            try:
                info = await self._link.jsm.stream_info(self.settings.stream)
            except nats.js.errors.NotFoundError:
                try:
                    info = await self._ensure_stream()
                except Exception as exc:
                    self._problem = f"stream {self.settings.stream} is gone and cannot be created: {exc}"
                    continue
            except Exception:
                continue
            try:
                await self._check_stream(info, seen, "the stream was lost")
                self._problem = ""
            except Exception as exc:
                self._problem = str(exc)

    # -- holes ----------------------------------------------------------------------

    async def _complete(self, room: str, after: int) -> bool:
        """Whether the stream still holds every message of ``room`` after position ``after``.

        The stream drops a subject's messages oldest first (per-subject limit), and the whole
        stream's oldest first (age, bytes). So nothing of the room after ``after`` is gone when the
        room still holds a message at or before ``after`` (a batch: whose first position is; the sequences
        a batch reserved are above every earlier message of the room); or when nothing past ``after`` was
        dropped from the head of the stream and the room is below its per-subject limit (it never dropped one).
        A message deleted by hand from the middle of a room is not noticed.
        """
        assert self._link is not None
        jsm, subject = self._link.jsm, self.subjects.room(room)
        try:
            first = await jsm.get_msg(self.settings.stream, seq=1, subject=subject, next=True)
            if first.seq is not None and first.seq - max(1, _span(first.headers)) + 1 <= after:
                return True  # (a batch: its first position)
        except nats.js.errors.NotFoundError:
            pass
        info = await jsm.stream_info(self.settings.stream, subjects_filter=subject)
        if info.state.first_seq > after + 1:
            return False
        held = (info.state.subjects or {}).get(subject, 0)
        return self.per_room <= 0 or held < self.per_room

    def _resync(self, rooms: list[str] | None, reason: str) -> None:
        self.counters["rooms_resynced"] += len(self._rooms) if rooms is None else len(rooms)
        self.counters["resyncs"] += 1
        if _milestone(self.counters["resyncs"]):
            log.warning("NATS pubsub: %s: resyncing %s (%d resyncs so far)", reason,
                        "every room" if rooms is None else f"room(s) {rooms[:5]}", self.counters["resyncs"])
        if self._listener is not None:
            self._listener.on_resync(reason, rooms)

    async def _fill(self, room: str, why: str) -> None:
        """Read what ``room`` had after the last position delivered from the stream and deliver it, then the
        live messages held meanwhile; ``resync`` the room if the stream no longer holds it all."""
        state = self._rooms.get(room)
        if state is None or state.held is None:
            return
        state.fills += 1
        fetched: list[Envelope] = []
        complete, accounted, read = True, 0, 0
        try:
            if state.last is not None:
                fetched, complete, accounted, read = await self._read_held(room, state.last)
        except Exception as exc:  # cannot tell: the room may have lost some
            log.info("NATS pubsub: reading room %r again failed (%s: %s)", room, type(exc).__name__, exc)
            complete, accounted = False, self._last_seq
        if self._rooms.get(room) is not state:
            return  # unsubscribed meanwhile
        if not complete:
            self._resync([room], f"messages lost ({why}) that the stream no longer holds")
        elif fetched:
            self.counters["filled"] += 1
        for envelope in fetched:  # what the stream still holds, in order, after the resync if there was one
            if state.last is None or (envelope.sequence or 0) > state.last:
                self._deliver(room, state, envelope)
        if state.last is not None and read > state.last:
            self._account(state, read)  # read up to there (the last may be a batch that cannot be read)
        if not complete and state.last is not None and accounted > state.last:
            state.last = accounted  # up to there the room is delivered or resynced: no hole to find again
        held, state.held = state.held or [], None
        for msg in held:
            self._on_live_msg(msg)

    # -- the hot path --------------------------------------------------------------------

    def _on_live_msg(self, msg: Msg) -> None:
        subject = msg.subject
        room = self._room_of.get(subject, "")
        if room == "":
            room = self.subjects.room_of_live(subject)
            if len(self._room_of) > 100_000:
                self._room_of.clear()
            self._room_of[subject] = room
        state = self._rooms.get(room) if room is not None else None
        if state is None or room is None:
            if room is None:
                self.counters["bad_subjects"] += 1
                if _milestone(self.counters["bad_subjects"]):
                    log.warning("NATS pubsub: ignoring a message on %r: not a valid room id in the one form it is "
                                "encoded in (%d such messages so far)", subject, self.counters["bad_subjects"])
            return  # a room this node does not listen to (wildcard mode, or just unsubscribed)
        if state.held is not None:
            state.held.append(msg)
            return
        headers = msg.headers
        try:
            sequence = int(headers[H_SEQUENCE])  # type: ignore[index]
            previous = int(headers.get(H_PREVIOUS) or 0)  # type: ignore[union-attr]
        except (TypeError, KeyError, ValueError):
            self.counters["unnumbered_dropped"] += 1  # not from the stream's republish: someone else published it
            return
        last = state.last
        if last is not None:
            if sequence <= last:
                return  # heard already (read from the stream while this one was on its way)
            if previous > last:  # a hole: the room had messages between what this node delivered and this one
                state.held = [msg]
                self._spawn(self._fill(room, "this node fell behind, or the server dropped messages for it"))
                return
            # previous < last: what came before it is gone from the stream (age, purge) or was resynced already
        if H_BATCH_COMMIT not in headers:  # type: ignore[operator]
            self._deliver(room, state, Envelope(
                room=room, payload=msg.data, kind=EnvelopeKind.MESSAGE, sequence=sequence,
                sender=headers.get(H_SENDER), node=headers.get(H_NODE, ""),  # type: ignore[union-attr]
                binary=headers.get(H_BINARY) == "1", id=headers.get(H_ID)))  # type: ignore[union-attr]
            return
        envelopes = self._stored(room, sequence, headers, msg.data)  # type: ignore[arg-type]
        if envelopes is None:
            self._account(state, sequence)
            return
        for envelope in envelopes:  # a batch: positions sequence - k + 1 .. sequence
            if last is None or (envelope.sequence or 0) > last:
                self._deliver(room, state, envelope)

    def _stored(self, room: str, sequence: int, headers: dict[str, str], data: bytes) -> list[Envelope] | None:
        """The room messages of the message stored at ``sequence``: itself, or the ``k`` of a batch, at the
        positions ``sequence - k + 1 .. sequence`` (batch.py); None for a batch that cannot be read (counted)."""
        node = headers.get(H_NODE, "")
        count = _span(headers)
        if count == 1:
            return [Envelope(room=room, payload=data, kind=EnvelopeKind.MESSAGE, sequence=sequence,
                             sender=headers.get(H_SENDER), node=node, binary=headers.get(H_BINARY) == "1",
                             id=headers.get(H_ID))]
        try:
            items = batch.decode(data, count)
        except ValueError as exc:
            self.counters["bad_batches"] += 1
            if _milestone(self.counters["bad_batches"]):
                log.warning("NATS pubsub: dropped the batch stored at %d in room %r: %s (%d such so far)", sequence,
                            room, exc, self.counters["bad_batches"])
            return None
        first = sequence - count + 1
        return [Envelope(room=room, payload=item.payload, kind=EnvelopeKind.MESSAGE, sequence=first + index,
                         sender=item.sender, node=node, binary=item.binary, id=item.id)
                for index, item in enumerate(items)]

    def _account(self, state: _Room, sequence: int) -> None:
        """The room is delivered up to ``sequence`` though nothing was (a batch that cannot be read)."""
        if state.last is None or sequence > state.last:
            state.last = sequence
        self._highest = max(self._highest, sequence)

    def _deliver(self, room: str, state: _Room, envelope: Envelope) -> None:
        sequence = envelope.sequence or 0
        state.last = sequence
        if sequence > self._highest:
            self._highest = sequence
            if sequence > self._last_seq:
                self._last_seq = sequence
        if self._listener is not None:
            self._listener.on_envelope(envelope)

    async def _on_notice(self, msg: Msg) -> None:
        room = self.subjects.room_of_notice(msg.subject)
        if room is not None and room in self._rooms and self._listener is not None:
            headers = msg.headers or {}
            self._listener.on_envelope(Envelope(room=room, payload=msg.data, kind=EnvelopeKind.NOTICE,
                                                sender=headers.get(H_SENDER), node=headers.get(H_NODE, "")))

    async def publish(self, envelope: Envelope) -> None:
        if envelope.kind is EnvelopeKind.NOTICE:  # live only: core NATS, not stored
            if self._link is not None and self._link.nc.is_connected:
                with contextlib.suppress(Exception):
                    await self._link.nc.publish(self.subjects.notice(envelope.room), envelope.payload,
                                                headers=self._headers(envelope))
            return
        if self._at_once():
            await self._publish(self._single(envelope))  # at once (held at once while JetStream is away)
            return
        while self._behind():
            self.counters["publish_waits"] += 1  # JetStream is behind (4,000 unacknowledged): the publisher waits
            await asyncio.sleep(0.001)
        self._add_to_turn(envelope)

    def publish_nowait(self, envelope: Envelope) -> bool:
        """Gather a room message into this loop turn's batch; False when publish() must be awaited."""
        if envelope.kind is EnvelopeKind.NOTICE or self._at_once() or self._behind():
            return False
        self._add_to_turn(envelope)
        return True

    def _at_once(self) -> bool:
        """A room message goes out alone, now: batches are off, or JetStream is away with nothing gathered."""
        away = self._link is None or not self._link.ready or bool(self._buffer) or bool(self._failed)
        idle = not self._turn and not self._queue and (self._sender is None or self._sender.done())
        return not self.settings.batch or (away and idle)

    def _behind(self) -> bool:
        return len(self._queue) >= MAX_QUEUED and self._sender is not None and not self._sender.done()

    def _add_to_turn(self, envelope: Envelope) -> None:
        """Gathered per room until the end of this loop turn, then sent in order by one task (_submit): two or
        more to one room travel as one stored message (batch.py); a room's messages keep their order."""
        pending = self._turn.get(envelope.room)
        if pending is not None:
            pending.append(envelope)
            return
        self._turn[envelope.room] = [envelope]
        if not self._turn_scheduled:
            self._turn_scheduled = True
            asyncio.get_running_loop().call_soon(self._submit)

    def _headers(self, envelope: Envelope) -> dict[str, str]:
        headers = {H_NODE: envelope.node or self._node}
        if envelope.sender is not None:
            headers[H_SENDER] = envelope.sender
        if envelope.binary:
            headers[H_BINARY] = "1"
        if envelope.id is not None:
            headers[H_ID] = envelope.id
        return headers

    def _msg_id(self) -> str:
        self._count += 1
        return f"{self._node}.{self._boot}.{self._count}"

    def _single(self, envelope: Envelope) -> _Outgoing:
        headers = self._headers(envelope)
        headers[H_MSG_ID] = self._msg_id()
        return _Outgoing(self.subjects.room(envelope.room), envelope.payload, headers)

    def _submit(self) -> None:
        """This loop turn's room messages, in order: one stored message per room when the stream takes batches."""
        self._turn_scheduled = False
        turn, self._turn = self._turn, {}
        for envelopes in turn.values():
            if len(envelopes) == 1 or not self._atomic:
                self._queue.extend(self._single(envelope) for envelope in envelopes)
            else:
                self._queue.extend(self._gather(envelopes))
        if self._queue and (self._sender is None or self._sender.done()):
            self._sender = asyncio.create_task(self._send_queue(), name="forge-nats-publish")

    def _gather(self, envelopes: list[Envelope]) -> list[_Outgoing]:
        """One room's messages as batches of at most ``batch.MAX_ITEMS`` and of a size the server takes."""
        limit = self._batch_bytes()
        out: list[_Outgoing] = []
        group: list[Envelope] = []
        size = 0
        for envelope in envelopes:
            more = batch.size(envelope)
            if group and (len(group) == batch.MAX_ITEMS or size + more > limit):
                out.append(self._batch(group))
                group, size = [], 0
            group.append(envelope)
            size += more
        out.append(self._batch(group))
        return out

    def _batch_bytes(self) -> int:
        """The payload a batch may have: half the server's ``max_payload`` (and the stream's ``max_msg_size``)."""
        limit = self._link.nc.max_payload // 2 if self._link is not None and self._link.nc.max_payload else 512 * 1024
        if self.settings.max_msg_size is not None:
            limit = min(limit, self.settings.max_msg_size - 1024)
        return limit

    def _batch(self, envelopes: list[Envelope]) -> _Outgoing:
        if len(envelopes) == 1:
            return self._single(envelopes[0])
        first = envelopes[0]
        headers = {H_NODE: first.node or self._node, H_MSG_ID: self._msg_id(), H_BATCH_SEQ: str(len(envelopes)),
                   H_BATCH_COMMIT: "1"}
        self.counters["batches_sent"] += 1
        return _Outgoing(self.subjects.room(first.room), batch.encode(envelopes), headers, tuple(envelopes))

    async def _send_queue(self) -> None:
        while self._queue:
            item = self._queue.popleft()
            try:
                await self._publish(item)
            except Exception:  # one message that cannot be sent never stops the ones after it
                self.counters["publish_refused"] += item.count
                log.exception("NATS pubsub: publishing %d messages of %r failed", item.count, item.subject)

    async def _publish(self, item: _Outgoing) -> None:
        if self._buffer or self._failed or self._link is None or not self._link.ready:
            self._hold(item)
            return
        # Pipelined: the acknowledgement is awaited apart (_acked), so a publisher's next message need not
        # wait a round trip for this one, and nats-py writes a burst in a few socket writes. One connection
        # keeps a node's publishes in order; a publish that fails is retried, with its message id.
        try:  # no wait_stall: waiting for a free slot only when 4,000 are unacknowledged (no task per publish)
            if item.envelopes:
                await self._send_pads(item)
            future = await self._link.js.publish_async(item.subject, item.payload, headers=item.headers)
        except _RETRYABLE:  # not sent (a batch without its last message is not stored: the server drops it)
            self._hold(item)
            return
        msg_id = item.headers[H_MSG_ID]
        self._inflight[msg_id] = (item, time.monotonic(), future)
        future.add_done_callback(functools.partial(self._acked, msg_id))
        if self._ack_watch is None or self._ack_watch.done():
            self._ack_watch = asyncio.create_task(self._watch_acks(), name="forge-nats-acks")

    async def _send_pads(self, item: _Outgoing) -> None:
        """The first ``k - 1`` messages of a batch of ``k``: empty, on the pads subject, under a new batch id
        (each attempt has its own; the message id of the last one is the batch's for good)."""
        assert self._link is not None
        self._batches += 1
        batch_id = f"{self._batch_prefix}{self._batches:x}"
        item.headers[H_BATCH_ID] = batch_id
        publish, subject = self._link.nc.publish, self.subjects.pads
        for index in range(1, len(item.envelopes)):
            await publish(subject, b"", headers={H_BATCH_ID: batch_id, H_BATCH_SEQ: str(index)})

    def _acked(self, msg_id: str, future: asyncio.Future[api.PubAck]) -> None:
        entry = self._inflight.pop(msg_id, None)
        if entry is None:
            return  # given up on already (and sent again: the stream stores it once)
        item = entry[0]
        error = None if future.cancelled() else future.exception()
        if error is None and not future.cancelled():
            seq = future.result().seq
            if seq is not None and seq > self._last_seq:
                self._last_seq = seq
            return
        if isinstance(error, nats.js.errors.APIError) and self._refused(item, error):
            return
        self._retry(item)

    def _refused(self, item: _Outgoing, error: nats.js.errors.APIError) -> bool:
        """Whether JetStream's answer ``error`` settles ``item``: stored already, or refused for good (a batch
        refused is sent again as single messages, a single one is dropped and counted). False: retry it."""
        if isinstance(error, nats.js.errors.NoStreamResponseError) or (error.code or 0) >= 500 or error.code == 503:
            return False
        if error.err_code == ERR_BATCH_DUPLICATE:
            return True  # a batch sent again after its acknowledgement was lost: stored the first time
        if item.envelopes:  # not stored (atomic): its messages one by one, first, with message ids of their own
            self.counters["batches_refused"] += 1
            if _milestone(self.counters["batches_refused"]):
                log.warning("NATS pubsub: JetStream refused a batch of %d messages of %r (%s); sending them one by "
                            "one (%d batches refused so far)", item.count, item.subject, error,
                            self.counters["batches_refused"])
            self._failed.extendleft(reversed([self._single(e) for e in item.envelopes]))
            self._kick_flusher()
            return True
        self.counters["publish_refused"] += 1  # refused for good (too large, wrong subject): never retried
        if _milestone(self.counters["publish_refused"]):
            log.warning("NATS pubsub: JetStream refused a message of %r: %s (%d refused so far)",
                        item.subject, error, self.counters["publish_refused"])
        return True

    def _retry(self, item: _Outgoing) -> None:
        self.counters["publish_retries"] += 1
        self._failed.append(item)
        self._kick_flusher()

    async def _watch_acks(self) -> None:
        """Publishes unacknowledged past ``ack_timeout`` are sent again (same message id)."""
        while self._inflight:
            await asyncio.sleep(self.settings.ack_timeout / 4)
            limit = time.monotonic() - self.settings.ack_timeout
            for msg_id, (item, sent_at, future) in list(self._inflight.items()):
                if sent_at > limit:
                    break  # in send order: the rest are younger
                del self._inflight[msg_id]
                future.cancel()  # frees nats-py's slot for it (its futures never time out by themselves)
                self._retry(item)

    async def _send(self, item: _Outgoing, patience: float) -> bool:
        """Publish and wait for JetStream's acknowledgement, retrying (same message id) for ``patience`` s;
        True once it is settled (stored, or refused for good: see :meth:`_refused`)."""
        assert self._link is not None
        deadline = time.monotonic() + patience
        while True:
            try:
                if item.envelopes:
                    await self._send_pads(item)
                ack = await self._link.js.publish(item.subject, item.payload, timeout=self.settings.ack_timeout,
                                                  headers=item.headers)
            except nats.js.errors.APIError as exc:
                if self._refused(item, exc):
                    return True
                problem = f"{type(exc).__name__}: {exc}"
            except _RETRYABLE as exc:
                problem = type(exc).__name__
            else:
                if ack.seq is not None and ack.seq > self._last_seq:
                    self._last_seq = ack.seq
                return True
            self.counters["publish_retries"] += 1
            if time.monotonic() >= deadline or self._link.nc.is_closed:
                log.warning("NATS pubsub: no acknowledgement from JetStream for %.1fs (%s); holding messages "
                            "until it answers", patience, problem)
                return False
            await asyncio.sleep(min(0.2, self.settings.reconnect_wait))

    def _hold(self, item: _Outgoing) -> None:
        """Keep ``item`` (never sent) for when JetStream is back: a batch as its messages, which the buffer counts."""
        if item.envelopes:
            for envelope in item.envelopes:
                self._hold(self._single(envelope))
            return
        limit = self.settings.outgoing_buffer
        if limit == 0:
            self.counters["buffer_dropped"] += 1
            return
        if len(self._buffer) >= limit:
            self._buffer.popleft()
            self.counters["buffer_dropped"] += 1
            if _milestone(self.counters["buffer_dropped"]):
                log.warning("NATS pubsub: outgoing buffer full (pubsub.nats.outgoing_buffer=%d); %d oldest messages "
                            "dropped so far", limit, self.counters["buffer_dropped"])
        self._buffer.append(item)
        self._kick_flusher()

    def _kick_flusher(self) -> None:
        if (self._buffer or self._failed) and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush(), name="forge-nats-flush")

    async def _flush(self) -> None:
        """Send the failed, then the held messages, in order, once JetStream answers again (new publishes
        queue behind them), each waiting for its acknowledgement."""
        sent = 0
        while self._failed or self._buffer:
            queue = self._failed if self._failed else self._buffer
            if self._link is None or not self._link.ready:
                await asyncio.sleep(self.settings.reconnect_wait)
                continue
            item = queue[0]
            if not await self._send(item, self.settings.ack_timeout * 2):
                await asyncio.sleep(self.settings.reconnect_wait)
                continue
            if queue and queue[0] is item:
                queue.popleft()
                sent += item.count
            else:  # a refused batch put its messages in front of it
                queue.remove(item)
        if sent:
            log.info("NATS pubsub: sent %d held messages", sent)

    # -- subscriptions -------------------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        if room in self._rooms:
            return
        state = _Room()
        self._rooms[room] = state
        if self._link is None or not self._link.ready:
            return  # the next connect subscribes
        # Where the room stands before this node listens: a later message whose previous position is above
        # it shows one this node missed (see _settle for why that can happen right after subscribing).
        baseline = await self._room_last(room)
        if self._rooms.get(room) is state and state.last is None:
            state.last = baseline
        if self.settings.subscribe_mode == "rooms":
            try:
                sub = await self._subscribe(self.subjects.live(room))
                await self._link.nc.flush(timeout=max(1, round(self.settings.ack_timeout)))
            except Exception as exc:
                log.warning("NATS pubsub: subscribing to room %r failed (%s); the next connect subscribes", room, exc)
                return
            if self._rooms.get(room) is state and state.sub is None:
                state.sub = sub
            else:  # unsubscribed (or subscribed by a reconnect) meanwhile
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                return
        self._spawn(self._settle([room]))

    async def _room_last(self, room: str) -> int | None:
        """The room's last position in the stream; where the stream stands if it holds none; None if unknown."""
        assert self._link is not None
        jsm = self._link.jsm
        try:
            try:
                return (await jsm.get_last_msg(self.settings.stream, self.subjects.room(room))).seq
            except nats.js.errors.NotFoundError:  # no message in the room: it stands where the stream stands
                return (await jsm.stream_info(self.settings.stream)).state.last_seq
        except Exception as exc:
            log.debug("NATS pubsub: where room %r stands is unknown (%s)", room, exc)
            return None

    async def _settle(self, rooms: list[str]) -> None:
        """Once new subscriptions have settled, read what the rooms hold beyond what was delivered.

        Seen with nats-server 2.15: a message stored a few milliseconds after a node subscribed to its
        room may not be republished to that node (the new interest is not yet seen on the stream's side),
        and without a later message in the room nothing would show it was missed. So, a moment later, the
        node compares each new room's last position in the stream with the last one it delivered, and
        reads the difference from the stream.
        """
        await asyncio.sleep(SETTLE_DELAY)
        for room in rooms:
            state = self._rooms.get(room)
            if state is None or state.held is not None or state.last is None or self._link is None \
                    or not self._link.ready:
                continue
            last = await self._room_last(room)
            if last is not None and last > state.last and state.held is None and self._rooms.get(room) is state:
                self.counters["settled"] += 1
                state.held = []
                await self._fill(room, "a message came as this node subscribed")

    async def unsubscribe(self, room: str) -> None:
        state = self._rooms.pop(room, None)
        if state is not None and state.sub is not None:
            with contextlib.suppress(Exception):
                await state.sub.unsubscribe()

    # -- history and positions -------------------------------------------------------------

    async def position(self, room: str) -> int | None:
        """Where ``room`` stands: the last position this node delivered in it (or stood at when it began to
        listen), else the room's last message in the stream, else (no message held) where the stream stands:
        below any position the room will get, above any of an earlier stream. None: cannot tell."""
        if self._link is None or not self._link.ready:
            return None
        state = self._rooms.get(room)
        if state is not None and state.last is not None:
            return state.last
        return await self._room_last(room)

    async def fetch_history(self, room: str, since: int) -> list[Envelope] | None:
        """``room``'s messages after position ``since``, exactly, from the stream; None if it lost some of them."""
        if self._link is None or not self._link.ready or not valid_id(room):
            return None
        try:
            return await self._read_room(room, since)
        except Exception as exc:
            log.info("NATS pubsub: history of room %r after %d could not be read (%s: %s)", room, since,
                     type(exc).__name__, exc)
            return None

    async def _read_room(self, room: str, since: int) -> list[Envelope] | None:
        """``room``'s messages after ``since`` from the stream, or None when it no longer holds them all."""
        envelopes, complete, _, _ = await self._read_held(room, since)
        return envelopes if complete else None

    async def _read_held(self, room: str, since: int) -> tuple[list[Envelope], bool, int, int]:
        """What the stream holds of ``room`` after ``since``, in order; whether that is all there was; the
        stream's last sequence before reading (everything of the room up to it is in the answer, or lost); and
        the sequence of the last stored message read (``since`` if none)."""
        assert self._link is not None
        jsm, stream, subject = self._link.jsm, self.settings.stream, self.subjects.room(room)
        last = (await jsm.stream_info(stream)).state.last_seq
        if since > last:
            return [], False, last, since  # a cursor from a lost stream
        complete = await self._complete(room, since)
        envelopes: list[Envelope] = []
        cursor = since
        while len(envelopes) < MAX_HISTORY_READ:
            try:
                raw = await jsm.get_msg(stream, seq=cursor + 1, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break
            if raw.seq is None or raw.seq <= cursor:
                break
            cursor = raw.seq
            stored = self._stored(room, raw.seq, raw.headers or {}, raw.data or b"")
            if stored is not None:  # a batch from before ``since`` on: only its messages after it
                envelopes.extend(e for e in stored if (e.sequence or 0) > since)
        if complete and not await self._complete(room, since):  # dropped while we read: cannot vouch
            complete = False
        return envelopes, complete, last, cursor

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
