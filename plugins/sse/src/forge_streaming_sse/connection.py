"""One SSE stream: the kernel's Connection, and what a ``handle_sse`` handler gets.

Writing never waits: events go through a :class:`forge_streaming.BufferedWriter`
that joins everything sent to this stream in one event-loop iteration into one
write and ends the stream as a slow consumer when its unsent bytes pass the
bound. The writer's target is the socket itself on the fast path
(:mod:`forge_streaming_sse.protocol`) or, under any other ASGI server, a queue
drained by a single pump task through ASGI ``send``.

Room messages carry an ``id:`` cursor (:mod:`forge_streaming_sse.cursor`) with
this member's position in each of its rooms; a reconnect with it as
``Last-Event-ID`` replays exactly what came after, room by room, as fast as
the client reads (the kernel awaits :meth:`SSEConnection.drained` between
messages). A stream cut as a slow consumer on the fast path is reset
(``SO_LINGER`` 0), so the unread bytes it held in the kernel are freed at once.

The kernel runs the stream's life (``streaming.serve_connection``); this
class is its I/O: :meth:`SSEConnection.accept` starts the response,
:meth:`SSEConnection.refuse` answers with a JSON error, and every way a
stream ends (client gone, closed, slow consumer, the kernel ending it) goes
through one place that ends the response and tells the kernel (``ended``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from forge_streaming import (
    BufferedWriter,
    CloseCode,
    Connection,
    ConnectionClosed,
    ConnectionRequest,
    Event,
    FlushScheduler,
    Message,
    OutboundFrame,
    Streaming,
)

from . import cursor, events
from .protocol import DirectWrite, chunk_join

if TYPE_CHECKING:
    from .transport import SSETransport

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

STREAM_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)

SLOW_CONSUMER = "slow consumer"

INBOX_LIMIT = 64
"""Frames POSTed to a handler stream that its handler has not read yet."""


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


async def json_response(send: Send, status: int, body: dict[str, Any],
                        headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A complete JSON response (refusals, and the send URL's answers)."""
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload)), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def system_event(event: str, data: Any) -> bytes:
    """A room-protocol system frame as an unnamed SSE event (what a WebSocket member would get as text)."""
    frame = {"type": "system", "event": event, "data": data, "timestamp": now_iso()}
    return b"data: " + json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class QueueTarget:
    """Fallback write target: bytes wait here for the pump task, which sends them with ASGI ``send``.

    Its size counts toward the stream's bound, so a client that stops reading
    (``send`` blocks) is ended as a slow consumer like on the fast path.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._wake = asyncio.Event()
        self._sent = asyncio.Event()
        self._closing = False

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._wake.set()

    def get_write_buffer_size(self) -> int:
        return self._size

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._sent.set()

    async def sent(self) -> None:
        """Wait until the pump has sent a batch (or the target closes)."""
        if self._closing:
            return
        self._sent.clear()
        await self._sent.wait()

    async def pump(self, send: Send) -> None:
        """Send what was written, one ``send`` per batch; end the body once closed."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._chunks:
                data = b"".join(self._chunks)
                self._chunks = []
                await send({"type": "http.response.body", "body": data, "more_body": True})
                self._size -= len(data)
                self._sent.set()
            if self._closing and not self._chunks:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return


def _never_started() -> BufferedWriter:
    """The writer of a stream whose response has not started: closed, so it takes nothing."""
    writer = BufferedWriter(QueueTarget(), limit=0, scheduler=FlushScheduler(), on_overflow=_ignore)
    writer.discard()
    return writer


def _ignore(unsent: int) -> None:
    pass


NOT_STARTED = _never_started()


class SSEConnection(Connection):
    """An SSE stream: ``await stream.send_event(Event(...))`` until ``stream.done``.

    ``stream.closed`` is an :class:`asyncio.Event` set when the stream has
    ended for any reason (Forge's ``Context().Done()``); ``await
    stream.wait_closed()`` waits for it. ``stream.last_event_id`` is what the
    client sent to resume (header or ``last_event_id`` query).
    """

    transport = "sse"
    # This class's attributes are slots: with them in the instance dict too, a stream has more
    # attributes than CPython shares dict keys for (30), which slows every attribute and
    # method lookup on it, `deliver` included. The kernel's attributes stay in __dict__.
    __slots__ = ("_sse", "room_endpoint", "token", "send_url", "last_event_id", "closed", "_receive", "_send",
                 "_writer", "_target", "_direct", "_pump", "_watcher", "_keepalive", "_active", "_prefix",
                 "_pos", "_pending", "_resuming", "_one", "_one_seq", "_pinged_seq",
                 "_ticked", "_quiet_since", "_inbox", "_inbox_ready")

    def __init__(self, request: ConnectionRequest, streaming: Streaming, *, sse: SSETransport,
                 room_endpoint: bool, receive: Receive, send: Send) -> None:
        super().__init__(request, streaming)
        self._sse = sse
        self.room_endpoint = room_endpoint
        self.token = secrets.token_urlsafe(24)
        """The secret a client proves with ``X-Stream-Token`` when it POSTs to :attr:`send_url`."""
        root = (request.scope or {}).get("root_path", "")
        self.send_url = f"{root}{sse.settings.send_path}?connection_id={self.id}"
        self.last_event_id: str | None = request.headers.get("last-event-id") or request.query.get("last_event_id")
        self.closed = asyncio.Event()
        self._receive = receive
        self._send = send
        self._writer: BufferedWriter = NOT_STARTED
        self._target: DirectWrite | QueueTarget | None = None
        self._direct: DirectWrite | None = None
        self._pump: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._active = False
        self._ticked = self._quiet_since = 0.0  # the keep-alive timer's last tick; the earliest the last write was
        self._prefix = b""  # the retry: hint, sent in front of the first event
        # resume state: position per room, and the rooms being resumed with the position the client had
        self._pos: dict[str, int] = {}
        self._pending: set[str] = set()
        self._resuming: dict[str, int] = {}
        # the fast path (see deliver): while the cursor is one room and nothing is resumed or
        # prefixed, that room and its position live here instead of in _pos
        self._one: str | None = None
        self._one_seq = 0
        self._pinged_seq = 0
        self._inbox: deque[str] = deque()
        self._inbox_ready = asyncio.Event()

    # -- the handler's API ------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the stream has ended (client gone, server closing, slow consumer)."""
        return self.closed.is_set()

    async def wait_closed(self) -> None:
        await self.closed.wait()

    async def send_event(self, event: Event) -> None:
        """Send one event; raise ConnectionClosed once the stream has ended."""
        if self._writer.closed or self.closed.is_set():
            raise ConnectionClosed(self.close_code or CloseCode.GOING_AWAY, self.close_reason or "stream ended")
        self._write(events.encode_event(event))

    async def send_comment(self, text: str) -> None:
        """Send an SSE comment line (clients ignore it; proxies see traffic)."""
        await self.send_event_bytes(b"".join(b": " + line.encode() + b"\n" for line in text.splitlines() or [""])
                                    + b"\n")

    async def send_event_bytes(self, data: bytes) -> None:
        """Send pre-encoded SSE bytes (``data: ...\\n\\n``) as they are."""
        if self._writer.closed or self.closed.is_set():
            raise ConnectionClosed(self.close_code or CloseCode.GOING_AWAY, self.close_reason or "stream ended")
        self._write(data)

    # -- Connection ---------------------------------------------------------------------------

    async def read_message(self) -> Message:
        """The next frame the client POSTed to :attr:`send_url` (handler streams only)."""
        while True:
            if self._inbox:
                return Message(self._inbox.popleft())
            if self.closed.is_set():
                raise ConnectionClosed(self.close_code or CloseCode.GOING_AWAY, self.close_reason)
            self._inbox_ready.clear()
            await self._inbox_ready.wait()

    def offer(self, text: str) -> bool:
        """Queue a POSTed frame for :meth:`read_message`; False when the inbox is full."""
        if len(self._inbox) >= INBOX_LIMIT:
            return False
        self._inbox.append(text)
        self._inbox_ready.set()
        return True

    async def write_message(self, message: str | bytes) -> None:
        """Send ``message`` as one unnamed event (bytes must be UTF-8 text: SSE carries text only)."""
        text = message.decode("utf-8") if isinstance(message, bytes) else message
        await self.send_event(Event(text))

    def deliver(self, frame: OutboundFrame) -> None:
        if frame.binary:  # SSE is text: a binary room message goes as JSON, its data in base64 (once per message)
            frame = frame.as_text()
        seq = frame.sequence
        if seq is not None and seq > self._one_seq and frame.room == self._one:
            # the fast path: a member of one room (the common case) gets the frame's shared
            # `id: room:seq` event; its position is the sequence of the last frame it was given
            self._one_seq = seq
            self._writer.write(frame.encoded("sse.id1", _single_id))
            return
        writer = self._writer
        if writer.closed:
            return
        self._settle()
        room = frame.room
        if seq is not None and room is not None:
            if self._resuming and room in self._resuming and seq <= self._resuming[room]:
                return  # resuming from a later position: the client has this one already
            pos = self._pos
            last = pos.get(room)
            if last is None or seq > last:
                pos[room] = seq
                single = len(pos) == 1
            else:
                single = False  # arrived late (another node): the cursor stays at the newest
            if single:
                data = frame.encoded("sse.id1", _single_id)
            else:
                cache: dict[tuple[tuple[str, int], ...], bytes] = frame.encoded("sse.idn", _new_cache)
                key = tuple(pos.items())
                cached = cache.get(key)
                if cached is None:
                    cached = cache[key] = events.with_id(cursor.encode(pos), frame)
                data = cached
        elif room is None and self._sync_rooms():
            data = events.with_id(cursor.encode(self._pos), frame)  # room.joined / room.left: new cursor
        else:
            data = frame.encoded("sse", events.plain)
        if self._prefix:
            data, self._prefix = self._prefix + data, b""
        self._active = True
        writer.write(data)
        if len(self._pos) == 1:
            self._refresh()

    def _settle(self) -> None:
        """Leave the fast path: the room's position goes back into ``_pos``."""
        one = self._one
        if one is not None:
            self._pos[one] = self._one_seq
            self._one = None

    def _refresh(self) -> None:
        """Take the fast path when the cursor names one room and nothing is being resumed or prefixed."""
        self._settle()
        pos = self._pos
        if (len(pos) == 1 and not self._resuming and not self._pending and not self._prefix
                and not self._writer.closed):
            for room, seq in pos.items():
                self._one, self._one_seq = room, seq

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """End the stream, telling the client why (a ``connection.closed`` system event unless a plain 1000).

        Returns once the last bytes are handed to the socket (fast path) or
        sent by the pump (fallback, within ``server.handler_grace``).
        """
        notice = None
        if reason or code != CloseCode.NORMAL:
            notice = system_event("connection.closed", {"code": int(code), "reason": reason})
            if code == CloseCode.GOING_AWAY:
                notice = events.retry(self.streaming.config.server.reconnect_hint) + notice
        self._end(code, reason, notice)
        pump = self._pump
        if pump is not None and not pump.done() and pump is not asyncio.current_task():
            await asyncio.wait({pump})  # bounded: _end_response cancels it after the grace

    def ended(self, code: int, reason: str) -> None:
        """The stream is over (whoever says so, the kernel included): stop its I/O and tell the kernel, once."""
        self._end(code, reason, None)

    # -- resume ---------------------------------------------------------------------------------

    def _sync_rooms(self) -> bool:
        """Bring the cursor's rooms in line with the joined rooms; True if it changed."""
        self._settle()
        want = self.rooms | self._pending if self._pending else self.rooms
        if want == self._pos.keys():
            return False
        latest = self.streaming.room_position
        positions: dict[str, int] = {}
        for room in sorted(want):
            seq = self._pos.get(room)
            if seq is None:
                # joined just now: where the kernel says the room stands (what room.joined carries), so that
                # resuming from here replays only what comes next; 0 (unknown) resumes as a resync, never a hole
                seq = latest(room) or 0
            positions[room] = seq
        self._pos = positions
        self._refresh()
        return True

    async def join_from(self, raw: str, room: str, since: int | None) -> None:
        """Act on a join frame; with ``since``, replay history and live traffic of the room in order, once.

        The kernel sends the replay as fast as the client reads, then the live
        frames of the room that arrived meanwhile (it holds them, bounded, and
        drops those the replay had); this stream skips what the client
        already has (at or before its position in the room).
        """
        if since is None:
            await self.streaming.room_protocol_frame(self, raw)
            return
        self._settle()
        have = self._pos.get(room, since) if room in self.rooms else since
        if room not in self.rooms:
            self._pending.add(room)
            self._pos.setdefault(room, since)
        self._resuming[room] = have
        try:
            await self.streaming.room_protocol_frame(self, raw)
        finally:
            self._pending.discard(room)
            self._resuming.pop(room, None)
            if room not in self.rooms:
                self._sync_rooms()
            self._refresh()

    async def drained(self, below: int) -> None:
        """Wait until at most ``below`` bytes (at most half this stream's bound) are unsent."""
        writer = self._writer
        if writer.closed:
            return
        target = self._target
        wait: Callable[[], Awaitable[object]] | None = None
        if isinstance(target, QueueTarget):
            wait = target.sent
        elif self._direct is not None:  # uvicorn's flow control of the socket: paused above its high-water mark
            wait = getattr(getattr(self._direct.cycle, "flow", None), "drain", None)
        await writer.drained(min(below, self._send_buffer() // 2), wait)

    # -- life of the stream -------------------------------------------------------------------

    async def accept(self) -> None:
        """Start the response: headers, then the writer (socket or pump), the disconnect watcher, keep-alive.

        The ``retry:`` hint goes in front of the first event. From now on
        events can be written, and POSTs can reach this stream.
        """
        settings = self._sse.settings
        send = self._send
        await send({"type": "http.response.start", "status": 200, "headers": list(STREAM_HEADERS)})
        if self.closed.is_set():  # ended (server drain) while the headers went out
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            raise ConnectionClosed(self.close_code or CloseCode.GOING_AWAY, self.close_reason)
        scope = self.request.scope or {}
        direct = scope.get("extensions", {}).get("forge_streaming.sse") if settings.fast_path else None
        if isinstance(direct, DirectWrite) and direct.usable():
            # the writer writes to the socket itself, each flush framed as one HTTP chunk
            self._direct = self._target = direct
            sink: asyncio.Transport | QueueTarget = direct.transport
            join: Callable[[list[bytes], int], bytes] | None = chunk_join
        else:
            sink = self._target = QueueTarget()
            join = None
            self._pump = asyncio.ensure_future(sink.pump(send))
        self._writer = BufferedWriter(sink, limit=self._send_buffer(), scheduler=self.streaming.flush_scheduler,
                                      on_overflow=self._overflow, join=join)
        self._watcher = asyncio.ensure_future(self._watch(self._receive))
        if settings.keep_alive_interval > 0:
            loop = asyncio.get_running_loop()
            self._ticked = self._quiet_since = loop.time()
            self._keepalive = loop.call_later(settings.keep_alive_interval / 10, self._ping)  # after the opening
        self._prefix = events.retry(settings.retry)
        self._sse.streams[self.id] = self

    async def refuse(self, status: int, code: str, reason: str) -> None:
        """Answer the opening request with ``status`` and ``{"error": code, "message": reason}``."""
        await json_response(self._send, status, {"error": code, "message": reason})

    def _send_buffer(self) -> int:
        """The bound on this stream's unsent bytes."""
        return self._sse.settings.send_buffer or self.streaming.config.limits.send_buffer

    def _write(self, data: bytes) -> None:
        if self._prefix:
            data, self._prefix = self._prefix + data, b""
            self._refresh()
        self._active = True
        self._writer.write(data)

    def _ping(self) -> None:
        """The keep-alive timer: a comment once the stream has sent nothing for ``sse.keep_alive_interval``.

        A tick only learns whether something was written since the previous
        tick, so ``_quiet_since`` is the earliest the last write can have
        been. The next tick comes when that is an interval old, and never
        sooner than a tenth of an interval: no silence lasts more than 1.1
        intervals (it was up to two: the first comment of a stream came after
        two intervals), and a busy stream costs about one tick per interval.
        """
        if self.closed.is_set():
            return
        if self._writer.unsent == 0:
            self.touch()  # the client drained all we sent: a listening stream is not idle
        loop = asyncio.get_running_loop()
        now = loop.time()
        interval = self._sse.settings.keep_alive_interval
        wrote = self._active or self._one_seq != self._pinged_seq  # something sent, the fast path included
        self._active = False
        self._pinged_seq = self._one_seq
        if wrote:
            self._quiet_since = self._ticked  # the last write came after the previous tick
        elif now >= self._quiet_since + interval - 0.001:
            self._writer.write(events.KEEP_ALIVE)
            self._quiet_since = now
        self._ticked = now
        due = self._quiet_since + interval
        self._keepalive = loop.call_at(max(due, now + interval / 10) if wrote else due, self._ping)

    async def _watch(self, receive: Receive) -> None:
        """Notice the client going away (uvicorn answers ``http.disconnect`` when the socket closes)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.closed.is_set():
            self.log.debug("stream %s: client disconnected", self.id)
            self._writer.discard()
            self._end(CloseCode.GOING_AWAY, "client disconnected", None)

    def _overflow(self, unsent: int) -> None:
        if self.closed.is_set():
            return  # the last bytes of a stream that is ending anyway
        self.log.warning("stream %s is %d bytes behind (bound %d on top of one message): ending it as a slow "
                         "consumer", self.id, unsent, self._send_buffer())
        if self._direct is not None:  # the client is not reading: what it has not read goes, now
            _reset(self._direct.transport)
        self._end(CloseCode.POLICY_VIOLATION, SLOW_CONSUMER,
                  system_event("connection.closed", {"code": int(CloseCode.POLICY_VIOLATION),
                                                     "reason": SLOW_CONSUMER, "unsent_bytes": unsent}))
        self.drop(SLOW_CONSUMER)  # counted, the hook, out of its rooms at once

    def _end(self, code: int, reason: str, notice: bytes | None) -> None:
        """The one way a stream ends (once): tell the kernel, send the last words, end the response."""
        if self.closed.is_set():
            return
        self.closed.set()
        super().ended(code, reason)
        self._inbox_ready.set()
        self._sse.streams.pop(self.id, None)
        if self._keepalive is not None:
            self._keepalive.cancel()
        writer = self._writer
        if not writer.closed:
            writer.flush()
            writer.discard()
        if notice and self._target is not None and not self._target.is_closing():
            self._target.write(notice)
        self._end_response()

    def _end_response(self) -> None:
        """End the HTTP response without waiting on the client.

        On the fast path the socket closes once its last bytes are taken (cut
        after ``server.handler_grace``); on the fallback the pump gets that
        long to send them.
        """
        grace = self.streaming.config.server.handler_grace
        loop = asyncio.get_running_loop()
        if self._direct is not None:
            if self.close_reason == SLOW_CONSUMER:  # cut (by its writer or the kernel): what it did not read goes
                _reset(self._direct.transport)
            self._direct.end()  # the response is complete for uvicorn (nothing more is written to a reset socket)
            loop.call_later(grace, _abort, self._direct.transport)
        elif self._pump is not None and isinstance(self._target, QueueTarget):
            self._target.close()
            pump = self._pump
            if not pump.done():
                timer = loop.call_later(grace, self._give_up, pump, grace)
                pump.add_done_callback(lambda _: timer.cancel())

    def _give_up(self, pump: asyncio.Task[None], grace: float) -> None:
        if not pump.done():
            self.log.info("stream %s: client did not take its last bytes in %.1fs", self.id, grace)
            pump.cancel()

    async def finish(self) -> None:
        """After the kernel is done with the stream: end it if it is not yet, stop its helper tasks."""
        if self._target is not None:  # it was accepted (a refused request has nothing to end)
            self._end(self.close_code or CloseCode.NORMAL, self.close_reason, None)
        pump = self._pump
        if pump is not None and not pump.done():
            await asyncio.wait({pump})  # bounded by _give_up
        for task in (self._pump, self._watcher):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def _reset(transport: asyncio.Transport) -> None:
    """Abort ``transport`` with a TCP reset (``SO_LINGER`` 0), so the kernel frees its unsent data at once
    (closed the ordinary way, a socket whose client stopped reading keeps it in FIN-WAIT for minutes)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _abort(transport: asyncio.Transport) -> None:
    """Cut a socket whose client did not take the stream's last bytes in time."""
    with contextlib.suppress(Exception):
        transport.abort()


def _single_id(frame: OutboundFrame) -> bytes:
    return events.with_id(cursor.quoted(frame.room or "") + b":%d" % (frame.sequence or 0), frame)


def _new_cache(frame: OutboundFrame) -> dict[tuple[tuple[str, int], ...], bytes]:
    return {}
