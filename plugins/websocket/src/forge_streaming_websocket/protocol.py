"""uvicorn's sans-I/O WebSocket protocol, opened up for zero-task delivery.

The app finds this protocol in ``scope["extensions"][EXTENSION]`` and
writes pre-framed bytes straight to its asyncio transport through a
:class:`forge_streaming.BufferedWriter`. Everything uvicorn writes itself
(pong, ping, close echo) goes through :class:`_OrderedTransport`, which
flushes the writer's pending bytes first, so control frames never
overtake or split delivery data. Closes initiated here flush first too,
and a peer that does not finish the closing handshake is cut after a
timeout instead of holding its socket open forever.

Idle connections are kept small: the parsed handshake request and the
handshake response are let go once the handshake is done (the app keeps
the ASGI scope's header list), uvicorn's ``asyncio.Queue`` and
``asyncio.Event`` (a deque each, ~760 bytes, four in all) are replaced by
:class:`_ReceiveQueue` and :class:`_WritableEvent`, which allocate only
while something is queued or waiting, and uvicorn's attributes live in
slots (a protocol has more attributes than CPython shares dict keys for).
A room-protocol connection goes further (:meth:`ForgeWebSocketProtocol.run_detached`):
its life runs in one task of its own while the ASGI call returns, so no
chain of suspended coroutines through the middleware stays; its reader
awaits a bare future on the queue; keepalive deadlines live in one shared
wheel per loop (:class:`_Keepalive`) instead of a ``TimerHandle`` each; and
websockets' handshake parser (holding the Request) gives way to its frame
parser. The bench's idle memory case went from 15.7 to 7.7 KB a connection.

This module is the plugin's one adapter to uvicorn's internals: it
subclasses ``WebSocketsSansIOProtocol`` and uses its attributes. Every name
it relies on (``close_timer``, ``pending_ping_payload``, ``stop_keepalive``,
``keepalive_timeout``, ...) exists from uvicorn 0.52.1, checked in the
sources of 0.52.1 to 0.54.0; hence ``uvicorn>=0.52.1,<0.55`` in the
plugin's ``pyproject.toml``. Check again before raising the ceiling.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import random
import socket
import struct
import time
import weakref
from collections.abc import Coroutine
from typing import Any, Generic, Protocol, TypeVar

from forge_streaming import BufferedWriter, CloseCode, ConnectionClosed
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.http11 import Request
from websockets.protocol import OPEN, SERVER
from websockets.protocol import Protocol as WebSocketsProtocol

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

EXTENSION = "forge_streaming.websocket"
"""ASGI scope extension key under which the app finds the protocol."""

GOING_AWAY_REASON = "server shutting down"
SHUTDOWN_CLOSE_TIMEOUT = 2.0

log = logging.getLogger("forge_streaming.websocket")


class _ClientErrorLog:
    """Bad input from a client is a WARNING without a traceback, at most one a second (the rest DEBUG).

    Each connection reports its own bad input once (it is closed for it);
    the limit keeps many such clients from flooding the log.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last = -interval
        self._quiet = 0

    def report(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._quiet += 1
            log.debug(message, *args)
            return
        if self._quiet:
            message += f" ({self._quiet} more like it were logged at DEBUG)"
        self._last, self._quiet = now, 0
        log.warning(message, *args)


client_errors = _ClientErrorLog()


class _OrderedTransport:
    """The asyncio transport as uvicorn's code sees it: writes go after pending delivery bytes."""

    __slots__ = ("_transport", "_protocol")

    def __init__(self, transport: asyncio.Transport, protocol: ForgeWebSocketProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        self._protocol.flush_pending()
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_T = TypeVar("_T")


class _Connection(Protocol):
    def socket_lost(self) -> None: ...

    def offer(self, data: str | bytes) -> bool: ...


class _ReceiveQueue(Generic[_T]):
    """What uvicorn uses of ``asyncio.Queue`` (unbounded, FIFO), allocating only while in use.

    Items live in a list read from ``_head`` (no deque per connection); the
    list exists only while something is queued. Besides uvicorn's ``get()``
    (a coroutine), :meth:`waiter` gives the connection's one reader a bare
    future to await: no coroutine frame stays suspended while it is idle.
    """

    __slots__ = ("_items", "_head", "_getters", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._head = 0
        self._getters: list[asyncio.Future[None]] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        items = self._items
        return 0 if items is None else len(items) - self._head

    def empty(self) -> bool:
        items = self._items
        return items is None or self._head >= len(items)

    def full(self) -> bool:
        return False

    def put_nowait(self, item: _T) -> None:
        items = self._items
        if items is None:
            self._items = [item]
        else:
            items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if self._getters:
            self._wake_next()

    async def put(self, item: _T) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> _T:
        items = self._items
        head = self._head
        if items is None or head >= len(items):
            raise asyncio.QueueEmpty
        item: _T = items[head]
        head += 1
        if head >= len(items):
            self._items = None
            head = 0
        else:
            items[head - 1] = None  # drop the reference now
        self._head = head
        return item

    def waiter(self) -> asyncio.Future[None]:
        """A future done once an item is queued (the caller awaits it, then takes the item)."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    async def get(self) -> _T:
        while self.empty():
            if self._getters is None:
                self._getters = []
            getter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                if getter in self._getters:
                    self._getters.remove(getter)
                elif not self.empty():
                    self._wake_next()  # this getter was woken for an item it will not take
                raise
        return self.get_nowait()

    def _wake_next(self) -> None:
        getters = self._getters
        while getters:
            getter = getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                return


class _WritableEvent:
    """What uvicorn uses of ``asyncio.Event``, in two slots; the waiter list exists only while someone waits."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            waiters = self._waiters
            if waiters:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = []
        waiters.append(waiter)
        try:
            return await waiter
        finally:
            waiters.remove(waiter)
            if not waiters and self._waiters is waiters:
                self._waiters = None


class _Keepalive:
    """Every connection's keepalive deadlines on one loop, behind one timer (not two ``call_later`` each).

    A deadline goes into the bucket of the first tick at or after it, so a
    ping or a pong timeout fires at most one ``tick`` late and never early.
    A connection is in at most one bucket; it remembers which (its
    ``keepalive_key``), so moving or removing it costs one dict operation.
    An idle connection costs one entry in one bucket (~50 bytes) where a
    ``TimerHandle`` with its libuv timer cost ~600.
    """

    __slots__ = ("loop", "tick", "_buckets", "_keys", "_timer", "_timer_key", "_fired")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self.loop = loop
        self.tick = tick
        self._buckets: dict[int, dict[ForgeWebSocketProtocol, None]] = {}
        self._keys: list[int] = []  # heap of the buckets' keys
        self._timer: asyncio.TimerHandle | None = None
        self._timer_key = 0
        self._fired = 0  # the last tick fired

    @staticmethod
    def tick_for(*periods: float | None) -> float:
        """A twentieth of the shortest period, between 5 ms and 1 s."""
        shortest = min((p for p in periods if p), default=20.0)
        return min(1.0, max(0.005, shortest / 20))

    def __len__(self) -> int:
        return sum(map(len, self._buckets.values()))

    def add(self, protocol: ForgeWebSocketProtocol, delay: float) -> None:
        self.remove(protocol)
        now = self.loop.time()
        # the first tick at or after the deadline, and never the tick being fired (no loop within _fire)
        key = max(math.ceil((now + max(0.0, delay)) / self.tick), math.floor(now / self.tick) + 1,
                  self._fired + 1)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            heapq.heappush(self._keys, key)
            if self._timer is None or key < self._timer_key:
                self._arm(key)
        bucket[protocol] = None
        protocol.keepalive_key = key

    def remove(self, protocol: ForgeWebSocketProtocol) -> None:
        key = protocol.keepalive_key
        if key:
            protocol.keepalive_key = 0
            bucket = self._buckets.get(key)
            if bucket is not None:
                bucket.pop(protocol, None)  # an emptied bucket goes when its tick comes

    def _arm(self, key: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_key = key
        self._timer = self.loop.call_at(key * self.tick, self._fire)

    def _fire(self) -> None:
        self._timer = None
        # the timer was armed for _timer_key; uvloop's millisecond timers may wake a little before it
        now = self._fired = max(math.floor(self.loop.time() / self.tick), self._timer_key)
        keys, buckets = self._keys, self._buckets
        while keys and keys[0] <= now:
            bucket = buckets.pop(heapq.heappop(keys))
            for protocol in bucket:
                protocol.keepalive_key = 0
            for protocol in bucket:
                try:
                    protocol.keepalive_due()
                except Exception:  # one connection's failure never stops the others' keepalive
                    log.exception("keepalive of WebSocket connection %s failed", protocol.client)
        if keys:
            self._arm(keys[0])


_keepalives: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, _Keepalive]] = (
    weakref.WeakKeyDictionary())


def _keepalive(loop: asyncio.AbstractEventLoop, tick: float) -> _Keepalive:
    """The wheel of ``loop`` for ``tick`` (one per loop and tick, i.e. per server config; gone with the loop)."""
    wheels = _keepalives.get(loop)
    if wheels is None:
        wheels = _keepalives[loop] = {}
    wheel = wheels.get(tick)
    if wheel is None:
        wheel = wheels[tick] = _Keepalive(loop, tick)
    return wheel


# Every instance attribute of uvicorn's protocol and ours: over 30 names, CPython stops sharing
# the instance dict's keys and each protocol would carry a full dict of its own (~1.6 KB).
# A name missing here (a newer uvicorn) simply lands in the instance dict.
_PROTOCOL_SLOTS = (
    "config", "app", "loop", "logger", "root_path", "asgi_version", "app_state", "connections", "tasks",
    "default_headers", "transport", "server", "client", "scheme", "queue", "handshake_initiated",
    "handshake_complete", "close_sent", "disconnected", "close_timer", "close_timeout", "initial_response",
    "conn", "read_paused", "writable", "ping_interval", "ping_timeout", "ping_timer", "pong_timer",
    "pending_ping_payload", "ping_sent_at", "last_ping_rtt", "frames", "curr_msg_data_type", "request",
    "response", "scope",
    "raw_transport", "writer", "close_record", "connection", "handshake_timer",
    "direct", "detached", "keepalive", "keepalive_key",
)

_READS_FRAMES = {"current_size", "max_message_size"} <= set(vars(WebSocketsProtocol(SERVER)))
"""The websockets attributes :meth:`ForgeWebSocketProtocol.data_received` reads (websockets 15 and later)."""

_TEXT, _BINARY = 0x81, 0x82
"""First byte of an unfragmented text / binary frame (FIN set, no RSV bits): the only frames read here."""


def whole_data_frames(data: bytes, max_size: int | None) -> list[tuple[bool, bytes, int]]:
    """The complete, unfragmented, masked data frames at the front of ``data``.

    ``(is_text, payload, end)`` each: the payload unmasked, ``end`` the
    offset just past the frame. Stops at anything else (a control frame,
    a fragment, an extension bit, a 64-bit length, a frame over
    ``max_size``, a partial frame): websockets' own parser reads from
    there, so its rules and errors stay the only ones.
    """
    frames: list[tuple[bool, bytes, int]] = []
    pos, end = 0, len(data)
    while end - pos >= 6:
        first, second = data[pos], data[pos + 1]
        if (first != _TEXT and first != _BINARY) or second < 0x80:  # noqa: PLR1714 (two ints: faster than a tuple)
            break
        length = second & 0x7F
        header = 6
        if length == 126:
            if end - pos < 8:
                break
            length = (data[pos + 2] << 8) | data[pos + 3]
            header = 8
            if length < 126:  # not the shortest encoding: websockets decides
                break
        elif length == 127:
            break
        if max_size is not None and length > max_size:
            break
        start = pos + header
        pos = start + length
        if pos > end:
            break
        frames.append((first == _TEXT, apply_mask(data[start:pos], data[start - 4:start]), pos))
    return frames


_addresses: dict[tuple[str, int | None], tuple[str, int | None]] = {}


def _shared_address(address: tuple[str, int | None] | None) -> tuple[str, int | None] | None:
    """One tuple for the server's own address (the same for every connection of a listening socket)."""
    if address is None:
        return None
    shared = _addresses.get(address)
    if shared is None:
        if len(_addresses) >= 64:  # a few listening addresses in practice; never grows without bound
            _addresses.clear()
        shared = _addresses[address] = address
    return shared


_EMPTY: Any = ()
"""Stands for an empty list nobody appends to: ``frames`` between messages (uvicorn starts a new list per
message), websockets' extension lists when there are none."""


def reset(transport: asyncio.Transport) -> None:
    """Abort ``transport`` with a TCP reset (``SO_LINGER`` 0): the kernel drops its unsent data now."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


READ_AHEAD = 16
"""Messages a connection may have waiting for its handler before reading stops."""


class ForgeWebSocketProtocol(WebSocketsSansIOProtocol):
    """Pass as uvicorn's ``ws=`` (``Transport.server_options`` does)."""

    __slots__ = _PROTOCOL_SLOTS
    queue: _ReceiveQueue[Any]  # type: ignore[assignment]  # uvicorn's asyncio.Queue, made lean
    writable: _WritableEvent  # type: ignore[assignment]  # uvicorn's asyncio.Event, made lean

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _ReceiveQueue()
        writable = _WritableEvent()
        writable.set()
        self.writable = writable
        self.raw_transport: asyncio.Transport | None = None
        self.writer: BufferedWriter | None = None
        self.close_record: tuple[int, str] | None = None
        self.connection: _Connection | None = None
        """The app's connection on this socket, told once when the socket is gone."""
        self.handshake_timer: asyncio.TimerHandle | None = None
        self.frames = _EMPTY
        self.direct = False
        """Received messages go into ``queue`` as they are (str or bytes) for a :class:`DirectConnection`,
        not as ASGI events; set before the app reads anything but the connect event."""
        self.detached = False
        """The connection's life runs in its own task (:meth:`run_detached`), not under the ASGI app."""
        self.keepalive: _Keepalive | None = None
        self.keepalive_key = 0

    # -- wiring ---------------------------------------------------------------

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The request was only needed to build the response and the scope (which has its own copy of
        # the headers). uvicorn never reads ``self.request`` again, and websockets' parser generator
        # keeps the Request object alive for the connection's life: drop its headers too.
        del self.request
        event.headers.clear()
        self.lighten_parser()
        scope = getattr(self, "scope", None)
        if scope is not None and not self.close_sent:
            # The app task was created but has not run yet: it will see this.
            scope["extensions"][EXTENSION] = self

    def lighten_parser(self) -> None:
        """Let go of what websockets keeps of the handshake for the connection's life.

        Its server parser is a generator that parsed the request and then
        delegates to the frame parser, keeping the Request (method, path,
        headers object) in its frame. At a frame boundary (nothing buffered)
        the frame parser alone takes over, as it would have. Also dropped: the
        connection's uuid4 (for websockets' own logs, which uvicorn never
        reads), and the empty extension lists (a shared empty tuple reads the same).
        """
        conn = self.conn
        conn.id = None  # type: ignore[assignment]
        if not conn.available_extensions:
            conn.available_extensions = _EMPTY
        parser = conn.parser
        inner = getattr(parser, "gi_yieldfrom", None)  # the frame parser, Protocol.parse
        waiting = getattr(inner, "gi_yieldfrom", None)
        if (getattr(inner, "__name__", None) == "parse" and getattr(waiting, "__name__", None) == "at_eof"
                and not conn.reader.buffer and conn.parser_exc is None):
            fresh = WebSocketsProtocol.parse(conn)
            next(fresh)  # to its first wait for data, as the old one was
            conn.parser = fresh
            parser.close()

    def connection_made(self, transport: Any) -> None:
        self.raw_transport = transport
        super().connection_made(_OrderedTransport(transport, self))  # type: ignore[arg-type]
        self.server = _shared_address(self.server)

    async def send(self, message: Any) -> None:
        handshake_pending = not self.handshake_complete
        if message["type"] == "websocket.accept" and (self.disconnected or self.close_sent):
            # the client left (or the handshake timed out) while the app was deciding: nothing to accept
            raise ConnectionClosed(*(self.close_record or (CloseCode.ABNORMAL, "client left during the handshake")))
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            # uvicorn would log "returned without completing handshake" for a deliberate HTTP refusal
            self.handshake_complete = True
        if handshake_pending and self.handshake_complete:
            self.release_handshake()
            if not self.conn.extensions:
                self.conn.extensions = _EMPTY

    def send_receive_event_to_app(self) -> None:
        """Queue a received message; stop reading only when the app is READ_AHEAD messages behind.

        uvicorn pauses reading after every message and resumes when the app
        takes it: two epoll syscalls per message. Reading ahead a little keeps
        memory bounded and saves them (telling uvicorn it is already paused
        skips its pause). For a :class:`DirectConnection` (``direct``) the
        message is first offered to the kernel (``Connection.received``),
        which may act on it at once; else it is queued as it is, a str or
        bytes, without an ASGI event.

        A text message that is not UTF-8 closes the connection 1007 with a
        WARNING (:data:`client_errors`), where uvicorn logs an ERROR with a
        traceback: a client's bad input is not the server's error.
        """
        frames = self.frames
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        text = self.curr_msg_data_type == "text"
        if text and not self.close_sent and not data.isascii():
            try:
                data.decode()
            except UnicodeDecodeError as exc:
                self.frames = _EMPTY
                self.invalid_utf8(exc)
                return
        queue = self.queue
        if not self.direct:
            if self.read_paused or queue.qsize() >= READ_AHEAD:
                super().send_receive_event_to_app()
            else:
                self.read_paused = True
                try:
                    super().send_receive_event_to_app()
                finally:
                    self.read_paused = False
            self.frames = _EMPTY
            return
        self.frames = _EMPTY
        if self.close_sent:  # past our close: drop it (as uvicorn does), keep reading until the peer's close
            return
        message = data.decode() if text else data
        connection = self.connection
        if connection is not None and queue.empty() and connection.offer(message):
            return  # the kernel acted on it in this callback: no queue, no task switch
        queue.put_nowait(message)
        if not self.read_paused and queue.qsize() > READ_AHEAD:
            self.read_paused = True
            self.transport.pause_reading()

    def take_received(self) -> Any:
        """The oldest queued item (a message, or an ASGI disconnect event); resumes reading once all are taken."""
        queue = self.queue
        item = queue.get_nowait()
        if self.read_paused and queue.empty():
            self.read_paused = False
            self.transport.resume_reading()
        return item

    def data_received(self, data: bytes) -> None:
        """uvicorn's, but whole data frames at the front of ``data`` are read here, not by websockets' parser.

        websockets parses a frame through a chain of generators (a tenth of
        the server's CPU under the bench's echo case). Between frames,
        with no compression and no fragmented message under way, a complete
        masked text or binary frame is read here (:func:`whole_data_frames`)
        and handed on as uvicorn would; everything else, from the first
        byte not read here, goes through websockets as before.
        """
        conn = self.conn
        if (self.direct and _READS_FRAMES and not self.close_sent and not conn.extensions and conn.current_size is None
                and conn.state is OPEN and not conn.reader.buffer and conn.parser_exc is None):
            taken = 0
            for text, payload, end in whole_data_frames(data, conn.max_message_size):
                self.curr_msg_data_type = "text" if text else "bytes"
                self.frames = [payload]
                self.send_receive_event_to_app()
                taken = end
                if self.close_sent:  # what follows is websockets' to read (the peer's close reply)
                    break
            if taken:
                if taken == len(data):
                    return
                data = data[taken:]
        super().data_received(data)

    # -- the connection's own task ----------------------------------------------------

    def run_detached(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run the rest of this connection's life as ``coro`` in a task of its own; the ASGI app returns now.

        Nothing of the ASGI call chain (uvicorn's ``run_asgi``, the middleware,
        the router, the endpoint: a dozen suspended coroutines, ~4 KB) stays
        alive for the connection's life. The task is one of uvicorn's
        ``server_state.tasks``, so a shutdown waits for it as it waited for
        ``run_asgi``, and its end is handled as ``run_asgi``'s was.
        """
        self.detached = True
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._detached_done)

    def _detached_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(exc, ClientDisconnected):
                self.logger.error("Exception in ASGI application\n", exc_info=exc)
                self.send_500_response()
            elif not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
        if self.close_timer is None:
            self.transport.close()

    async def run_asgi(self) -> None:
        """uvicorn's, except that an app that handed the connection to :meth:`run_detached` returns at once."""
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            if not self.detached:
                self.send_500_response()
        else:
            if self.detached:
                return
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
        if not self.detached and self.close_timer is None:
            self.transport.close()

    # -- keepalive: one shared timer ---------------------------------------------------

    def _wheel(self) -> _Keepalive:
        wheel = self.keepalive
        if wheel is None:
            wheel = self.keepalive = _keepalive(self.loop, _Keepalive.tick_for(self.ping_interval, self.ping_timeout))
        return wheel

    def schedule_ping(self) -> None:
        assert self.ping_interval is not None
        self._wheel().add(self, self.ping_interval - self.last_ping_rtt)

    def stop_keepalive(self) -> None:
        wheel = self.keepalive
        if wheel is not None:
            wheel.remove(self)
        super().stop_keepalive()

    def keepalive_due(self) -> None:
        """The wheel's call: a ping is due, or (a ping is out and a timeout set) its pong is late."""
        if self.ping_timeout is not None and self.pending_ping_payload is not None:
            self.keepalive_timeout()
        else:
            self.send_keepalive_ping()

    def send_keepalive_ping(self) -> None:
        """uvicorn's, with the pong deadline (or the next ping) in the shared wheel."""
        self.ping_timer = None
        if self.close_sent or self.transport.is_closing():
            return
        payload = self.pending_ping_payload = struct.pack("!I", random.getrandbits(32))
        self.ping_sent_at = self.loop.time()
        self.conn.send_ping(payload)
        self.transport.write(b"".join(self.conn.data_to_send()))
        if self.ping_timeout is not None:
            self._wheel().add(self, self.ping_timeout)
        else:
            self.schedule_ping()

    def handle_pong(self, event: Frame) -> None:
        """uvicorn's: an answer to the ping in flight ends its deadline and schedules the next ping."""
        if self.pending_ping_payload is None or bytes(event.data) != self.pending_ping_payload:
            return
        self.last_ping_rtt = self.loop.time() - self.ping_sent_at
        self.pending_ping_payload = None
        if self.ping_timeout is not None and self.keepalive_key:  # the pong deadline was pending
            self.schedule_ping()

    def release_handshake(self) -> None:
        """Let go of the handshake response: uvicorn reads it only to send the accept."""
        self._stop_handshake_timer()
        try:
            del self.response
        except AttributeError:
            pass

    # -- handshake deadline ---------------------------------------------------------

    def limit_handshake(self, timeout: float) -> None:
        """The app must accept or refuse within ``timeout`` seconds (``server.handshake_timeout``), else 503."""
        if timeout > 0 and not self.handshake_complete and self.handshake_timer is None:
            self.handshake_timer = self.loop.call_later(timeout, self.handshake_expired, timeout)

    def _stop_handshake_timer(self) -> None:
        timer, self.handshake_timer = self.handshake_timer, None
        if timer is not None:
            timer.cancel()

    def handshake_expired(self, timeout: float) -> None:
        self.handshake_timer = None
        transport = self.raw_transport
        if self.handshake_complete or self.close_sent or transport is None or transport.is_closing():
            return
        log.info("WebSocket handshake from %s not answered within server.handshake_timeout (%gs); closing",
                 self.client, timeout)
        self.close_record = (CloseCode.ABNORMAL, "handshake timeout")
        response = self.conn.reject(503, f"handshake not completed within {timeout:g}s\n")
        self.conn.send_response(response)
        transport.write(b"".join(self.conn.data_to_send()))
        self.handshake_complete = True
        self.close_sent = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": CloseCode.ABNORMAL})
        transport.close()

    def flush_pending(self) -> None:
        writer = self.writer
        if writer is not None:
            writer.flush()

    def stop_writer(self) -> None:
        writer = self.writer
        if writer is not None:
            writer.discard()

    # -- closing ----------------------------------------------------------------

    def send_close_now(self, code: int, reason: str, *, timeout: float) -> bool:
        """Flush pending data, send a close frame, wake the app's reader; False if already closing.

        The socket is cut after ``timeout`` unless the peer answers the close
        first (uvicorn's ``handle_close`` then closes it cleanly).
        """
        transport = self.raw_transport
        if transport is None or not self.handshake_complete or self.close_sent or transport.is_closing():
            return False
        self.flush_pending()
        self.stop_writer()
        self.writable.set()  # a handler blocked in write_message wakes up and finds the connection closing
        self.close_record = (code, reason)
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.conn.send_close(code, reason)
        transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(timeout, transport.abort)
        return True

    def reset_now(self, code: int, reason: str) -> None:
        """Cut the connection at once with a TCP reset, recording ``code``/``reason`` as how it ended.

        For a slow consumer: a close frame would wait behind the data the
        client is not reading, and a socket closed the ordinary way keeps
        that data (megabytes) in the kernel in FIN-WAIT for minutes.
        ``SO_LINGER`` 0 makes the close a reset, which frees it at once.
        """
        self.stop_writer()
        self.writable.set()  # a handler blocked in write_message wakes up and finds the connection closed
        if self.close_record is None:
            self.close_record = (code, reason)
        transport = self.raw_transport
        if transport is None or self.disconnected:
            return
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.close_sent = True
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        reset(transport)

    def final_close(self) -> tuple[int, str]:
        """How this connection ended: our close, the peer's, a protocol failure, or lost (1006)."""
        if self.close_record is not None:
            return self.close_record
        if self.conn.close_rcvd is not None:
            return self.conn.close_rcvd.code, self.conn.close_rcvd.reason
        if self.conn.close_sent is not None:
            return self.conn.close_sent.code, self.conn.close_sent.reason
        return 1006, "connection lost"

    def handle_close(self, event: Frame) -> None:
        super().handle_close(event)  # echoes the close after pending data (ordered transport)
        self.stop_writer()

    def handle_parser_exception(self) -> None:
        """Too big (1009), invalid UTF-8 (1007), bad framing (1002): no more data after that close."""
        self.stop_writer()
        super().handle_parser_exception()

    def invalid_utf8(self, exc: UnicodeDecodeError) -> None:
        """A text message that is not UTF-8: close 1007, one WARNING without a traceback."""
        client_errors.report("WebSocket client %s sent a text message that is not UTF-8 (%s at byte %d); "
                             "closing it with 1007", self.client, exc.reason, exc.start)
        self.conn.send_close(CloseCode.INVALID_DATA, "invalid UTF-8")
        self.handle_parser_exception()

    def keepalive_timeout(self) -> None:
        """A dead peer cannot drain a buffer: abort instead of waiting on a graceful close."""
        self.pong_timer = None
        self.pending_ping_payload = None
        transport = self.raw_transport
        if transport is None or self.close_sent or transport.is_closing():
            return
        self.logger.info("WebSocket peer %s did not answer a ping within %ss; closing", self.client, self.ping_timeout)
        self.stop_writer()
        self.close_record = (1006, "keepalive ping timeout")
        self.conn.fail(1011, "keepalive ping timeout")
        transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        transport.abort()

    def shutdown(self) -> None:
        """Server shutdown: 1001 after the pending data (not uvicorn's bare 1012), bounded in time."""
        transport = self.raw_transport
        if transport is None or not self.handshake_complete or self.initial_response is not None:
            super().shutdown()
            return
        self.stop_keepalive()
        self.send_close_now(1001, GOING_AWAY_REASON, timeout=SHUTDOWN_CLOSE_TIMEOUT)
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(SHUTDOWN_CLOSE_TIMEOUT, transport.abort)
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_writer()
        self._stop_handshake_timer()
        super().connection_lost(exc)
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.socket_lost()
