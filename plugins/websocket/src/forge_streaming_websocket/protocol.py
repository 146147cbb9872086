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
import logging
import socket
import struct
import time
from typing import Any, Generic, Protocol, TypeVar

from forge_streaming import BufferedWriter, CloseCode, ConnectionClosed
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.http11 import Request

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


class _ReceiveQueue(Generic[_T]):
    """What uvicorn uses of ``asyncio.Queue`` (unbounded, FIFO), allocating only while in use.

    Items live in a list read from ``_head`` (no deque per connection); the
    list is emptied whenever the reader catches up, so it stays short.
    """

    __slots__ = ("_items", "_head", "_getters")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._head = 0
        self._getters: list[asyncio.Future[None]] | None = None

    def qsize(self) -> int:
        return len(self._items) - self._head

    def empty(self) -> bool:
        return self._head >= len(self._items)

    def full(self) -> bool:
        return False

    def put_nowait(self, item: _T) -> None:
        self._items.append(item)
        if self._getters:
            self._wake_next()

    async def put(self, item: _T) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> _T:
        items = self._items
        head = self._head
        if head >= len(items):
            raise asyncio.QueueEmpty
        item: _T = items[head]
        head += 1
        if head >= len(items):
            items.clear()
            head = 0
        else:
            items[head - 1] = None  # drop the reference now
        self._head = head
        return item

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


class _WritableEvent(asyncio.Event):
    """``asyncio.Event`` whose waiter list exists only while someone waits (it is set almost always)."""

    def __init__(self) -> None:  # not super().__init__(): that allocates the deque this class avoids
        self._value = False
        self._waiters: list[asyncio.Future[bool]] | None = None  # type: ignore[assignment]

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

    async def wait(self) -> bool:  # type: ignore[override]
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
)


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _ReceiveQueue()  # type: ignore[assignment]
        writable = _WritableEvent()
        writable.set()
        self.writable = writable
        self.raw_transport: asyncio.Transport | None = None
        self.writer: BufferedWriter | None = None
        self.close_record: tuple[int, str] | None = None
        self.connection: _Connection | None = None
        """The app's connection on this socket, told once when the socket is gone."""
        self.handshake_timer: asyncio.TimerHandle | None = None

    # -- wiring ---------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.raw_transport = transport
        super().connection_made(_OrderedTransport(transport, self))  # type: ignore[arg-type]

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The request was only needed to build the response and the scope (which has its own copy of
        # the headers). uvicorn never reads ``self.request`` again, and websockets' parser generator
        # keeps the Request object alive for the connection's life: drop its headers too.
        del self.request
        event.headers.clear()
        scope = getattr(self, "scope", None)
        if scope is not None and not self.close_sent:
            # The app task was created but has not run yet: it will see this.
            scope["extensions"][EXTENSION] = self

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

    def send_receive_event_to_app(self) -> None:
        """Queue a received message; stop reading only when the app is READ_AHEAD messages behind.

        uvicorn pauses reading after every message and resumes when the app
        takes it: two epoll syscalls per message. Reading ahead a little keeps
        memory bounded and saves them (telling uvicorn it is already paused
        skips its pause).

        A text message that is not UTF-8 closes the connection 1007 with a
        WARNING (:data:`client_errors`), where uvicorn logs an ERROR with a
        traceback: a client's bad input is not the server's error.
        """
        if self.curr_msg_data_type == "text" and not self.close_sent:
            frames = self.frames
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            if not data.isascii():
                try:
                    data.decode()
                except UnicodeDecodeError as exc:
                    self.frames = []
                    self.invalid_utf8(exc)
                    return
        if self.read_paused or self.queue.qsize() >= READ_AHEAD:
            super().send_receive_event_to_app()
            return
        self.read_paused = True
        try:
            super().send_receive_event_to_app()
        finally:
            self.read_paused = False

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
