"""The kernel's Connection over a WebSocket, in two flavours.

:class:`DirectConnection` (served by :class:`ForgeWebSocketProtocol`)
writes pre-framed bytes through a coalescing :class:`BufferedWriter`: a
room broadcast costs one dict lookup and one list append per member, and
all frames a member got in one loop iteration leave in one write.

:class:`QueuedConnection` is the fallback under any other ASGI server: a
bytes-bounded queue per connection drained by one writer task through the
ASGI ``send``. Same bound, same ``slow consumer`` rule, more overhead.

:class:`DirectConnection` reads from the protocol's queue (the raw messages,
no ASGI events), :class:`QueuedConnection` through the ASGI ``receive``; both
enforce the message size limit themselves, since the server's own limit may be far larger. Both bound what
waits for the client at ``send_buffer`` on top of one message, so a single
message up to the size limit never drops its receiver, and both implement
``drained`` so that the kernel's replays go as fast as the client reads. A
slow consumer that :class:`DirectConnection` cuts is reset (``SO_LINGER`` 0):
the unread data it held in the kernel is freed at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from forge_streaming import (
    BufferedWriter,
    CloseCode,
    Connection,
    ConnectionClosed,
    ConnectionRequest,
    FlushScheduler,
    Message,
    OutboundFrame,
)
from websockets.exceptions import InvalidState

from .framing import ENCODING_KEY, frame_bytes, make_ws_frame

if TYPE_CHECKING:
    from forge_streaming import Streaming

    from .protocol import ForgeWebSocketProtocol

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_log = logging.getLogger("forge_streaming.websocket")

SLOW_CONSUMER = "slow consumer"
WRITE_HIGH_WATER = 64 * 1024
"""``write_message`` waits for the socket to drain once this much is unsent (handler backpressure)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The per-connection numbers, resolved once from the config by the transport."""

    max_message_size: int
    send_buffer: int
    close_timeout: float
    read_buffer_size: int | None = None
    write_buffer_size: int | None = None


async def reject(scope: Mapping[str, Any], send: Any, status: int, message: str) -> None:
    """Answer the upgrade request with an HTTP error (before any WebSocket exists)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "websocket.http.response.body", "body": message.encode("utf-8")})
    else:  # servers without the denial-response extension answer 403
        await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION, "reason": message[:120]})



class WebSocketConnection(Connection):
    """What both flavours share: the size limit, how a disconnect event ends the connection."""

    __slots__ = ("limits",)
    transport = "websocket"
    subprotocol: str | None = None
    """The negotiated subprotocol (kept in the instance only when there is one)."""
    _ended: tuple[int, str] | None = None

    def __init__(self, request: ConnectionRequest, streaming: Streaming, limits: Limits,
                 subprotocol: str | None) -> None:
        super().__init__(request, streaming)
        self.limits = limits
        if subprotocol is not None:
            self.subprotocol = subprotocol

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """The connection's logger, built when something is logged (rarely) rather than kept (~150 bytes each)."""
        return logging.LoggerAdapter(_log, {"connection_id": self.id})

    @log.setter
    def log(self, value: logging.LoggerAdapter[logging.Logger]) -> None:
        """The kernel's ``__init__`` sets one; the property above stands for it."""

    async def _message(self, data: str | bytes) -> Message:
        """``data`` as a Message, or the connection closed 1009 when it is over the size limit."""
        limit = self.limits.max_message_size
        if len(data) > limit // 4 and _size(data) > limit:
            reason = f"message of {_size(data)} bytes is over the limit of {limit} bytes"
            await self.close(CloseCode.MESSAGE_TOO_BIG, reason)
            raise ConnectionClosed(CloseCode.MESSAGE_TOO_BIG, reason)
        self.touch()
        return Message(data)

    def _event(self, event: dict[str, Any]) -> str | bytes:
        """The data of an ASGI receive event; ConnectionClosed for a disconnect (or anything else)."""
        kind = event["type"]
        if kind == "websocket.receive":
            text = event.get("text")
            return text if text is not None else (event.get("bytes") or b"")
        if kind == "websocket.disconnect":
            self._ended = self.final_close(int(event.get("code", 1005)), str(event.get("reason") or ""))
            self.ended(*self._ended)
            raise ConnectionClosed(*self._ended)
        raise ConnectionClosed(CloseCode.PROTOCOL_ERROR, f"unexpected ASGI event {kind!r}")

    def final_close(self, code: int = CloseCode.ABNORMAL, reason: str = "connection lost") -> tuple[int, str]:
        """The close code and reason the kernel is told (``streaming.closed``)."""
        return self._ended or (code, reason)

    def attach(self) -> None:
        """Start writing: called once the handshake response was sent."""


def _size(data: str | bytes) -> int:
    return len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))


def _as_payload(message: str | bytes) -> tuple[bytes, bool]:
    if isinstance(message, str):
        return message.encode("utf-8"), False
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message), True
    raise TypeError(f"write_message takes str (text frame) or bytes (binary frame), got {type(message).__name__}")


class DirectConnection(WebSocketConnection):
    """Writes straight to the socket through the protocol, reads from its queue; see the module docstring."""

    __slots__ = ("_send", "_protocol", "_scheduler", "_writer", "_compressed")

    def __init__(self, request: ConnectionRequest, streaming: Streaming, send: Send, limits: Limits,
                 subprotocol: str | None, protocol: ForgeWebSocketProtocol, *,
                 scheduler: FlushScheduler | None = None) -> None:
        super().__init__(request, streaming, limits, subprotocol)
        self._send: Send | None = send
        """The ASGI ``send`` (through any middleware) for the handshake answer; let go once it is sent."""
        self._protocol = protocol
        self._scheduler = scheduler  # the transport's windowed one (websocket.flush_window), else the kernel's
        self._writer: BufferedWriter | None = None
        self._compressed = False
        protocol.direct = True

    async def accept(self) -> None:
        send, self._send = self._send, None
        await (send or self._protocol.send)({"type": "websocket.accept", "subprotocol": self.subprotocol})
        self.attach()

    async def refuse(self, status: int, code: str, reason: str) -> None:
        send, self._send = self._send, None
        scope = self.request.scope if self.request.scope is not None else self._protocol.scope
        await reject(scope, send or self._protocol.send, status, reason)

    async def read_message(self) -> Message:
        """The next message from the protocol's queue: an idle reader awaits a bare future, nothing more."""
        if self._ended is not None:
            raise ConnectionClosed(*self._ended)
        protocol = self._protocol
        queue = protocol.queue
        while queue.empty():
            await queue.waiter()
        item = protocol.take_received()
        if type(item) is dict:  # a disconnect (or a message queued before the connection went direct)
            item = self._event(item)
        return await self._message(item)

    def offer(self, data: str | bytes) -> bool:
        """A message the protocol just read, offered to the kernel before it is queued (within the size limit)."""
        limit = self.limits.max_message_size
        if self._ended is not None or (len(data) > limit // 4 and _size(data) > limit):
            return False  # the reader closes it 1009, in order
        return self.received(data)

    def attach(self) -> None:
        protocol = self._protocol
        transport = protocol.raw_transport
        if transport is None:
            return
        self._set_socket_buffers(transport)
        self._compressed = bool(protocol.conn.extensions)
        self._writer = BufferedWriter(transport, limit=self.limits.send_buffer,
                                      scheduler=self._scheduler or self.streaming.flush_scheduler,
                                      on_overflow=self._overflow)
        self._scheduler = None  # the writer has it
        protocol.writer = self._writer
        protocol.connection = self

    def socket_lost(self) -> None:
        """The socket is gone (whoever closed it): a handler that is not reading learns it too."""
        self.ended(*self._protocol.final_close())

    def _set_socket_buffers(self, transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        if self.limits.read_buffer_size is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.limits.read_buffer_size)
        if self.limits.write_buffer_size is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.write_buffer_size)

    def socket_buffers(self) -> tuple[int, int] | None:
        """(SO_RCVBUF, SO_SNDBUF) as the OS granted them (Linux doubles a request), for stats and tests."""
        transport = self._protocol.raw_transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return None
        return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))

    @property
    def compression(self) -> str | None:
        """The negotiated extension (``permessage-deflate``) or None."""
        extensions = self._protocol.conn.extensions
        return extensions[0].name if extensions else None

    def _encode_for_this_connection(self, payload: bytes, binary: bool) -> bytes:
        """Frame ``payload`` through the websockets protocol (compression state is per connection)."""
        conn = self._protocol.conn
        try:
            if binary:
                conn.send_binary(payload)
            else:
                conn.send_text(payload)
        except InvalidState:  # closing: nothing more may be sent (never raise into the fan-out)
            self._protocol.stop_writer()
            return b""
        return b"".join(conn.data_to_send())

    def deliver(self, frame: OutboundFrame) -> None:
        writer = self._writer
        if writer is None or writer.closed:
            return
        if self._compressed:
            data = self._encode_for_this_connection(frame.payload, frame.binary)
            if data:
                writer.write(data)
        else:
            writer.write(frame.encoded(ENCODING_KEY, make_ws_frame))

    async def write_message(self, message: str | bytes) -> None:
        writer = self._writer
        if writer is None or writer.closed:
            raise ConnectionClosed(*self._protocol.final_close())
        payload, binary = _as_payload(message)
        if self._compressed:
            data = self._encode_for_this_connection(payload, binary)
        else:
            data = frame_bytes(payload, binary=binary)
        if not data or not writer.write(data):
            raise ConnectionClosed(*self._protocol.final_close())
        if writer.unsent > WRITE_HIGH_WATER:
            writer.flush()
            await self._protocol.writable.wait()

    async def drained(self, below: int) -> None:
        writer = self._writer
        if writer is not None:
            await writer.drained(min(below, self.limits.send_buffer // 2), self._protocol.writable.wait)

    def _overflow(self, unsent: int) -> None:
        self.log.warning("connection %s has %d unsent bytes (limit %d on top of one message): resetting it as %s",
                         self.id, unsent, self.limits.send_buffer, SLOW_CONSUMER)
        self._protocol.reset_now(CloseCode.POLICY_VIOLATION, SLOW_CONSUMER)
        self.drop(SLOW_CONSUMER)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if code == CloseCode.POLICY_VIOLATION and reason == SLOW_CONSUMER:  # cut by the kernel (its replay's bound)
            self._protocol.reset_now(int(code), reason)
        else:
            self._protocol.send_close_now(int(code), reason, timeout=self.limits.close_timeout)
        self.ended(*self._protocol.final_close())

    def final_close(self, code: int = CloseCode.ABNORMAL, reason: str = "connection lost") -> tuple[int, str]:
        return self._protocol.final_close()


class QueuedConnection(WebSocketConnection):
    """Fallback for ASGI servers without the protocol extension; see the module docstring."""

    def __init__(self, request: ConnectionRequest, streaming: Streaming, receive: Receive, send: Send,
                 scope: dict[str, Any], limits: Limits, subprotocol: str | None) -> None:
        super().__init__(request, streaming, limits, subprotocol)
        self._receive = receive
        self._send = send
        self._scope = scope
        self._queue: deque[tuple[str | bytes, int]] = deque()
        self._queued = 0
        self._allowance = 0  # the largest message queued since the queue was last empty
        self._wakeup = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._close_record: tuple[int, str] | None = None
        self._closing: asyncio.Future[None] | None = None

    async def accept(self) -> None:
        await self._send({"type": "websocket.accept", "subprotocol": self.subprotocol})
        self.attach()

    async def refuse(self, status: int, code: str, reason: str) -> None:
        await reject(self._scope, self._send, status, reason)

    async def read_message(self) -> Message:
        if self._ended is not None:
            raise ConnectionClosed(*self._ended)
        return await self._message(self._event(await self._receive()))

    def attach(self) -> None:
        self._accepting = True
        self._task = asyncio.ensure_future(self._write_loop())

    async def _write_loop(self) -> None:
        send = self._send
        try:
            while True:
                while not self._queue:
                    self._allowance = 0
                    self._empty.set()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                item, size = self._queue.popleft()
                self._queued -= size
                if isinstance(item, bytes):
                    await send({"type": "websocket.send", "bytes": item})
                else:
                    await send({"type": "websocket.send", "text": item})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client is gone: stop writing, the reader will see the end
            self.log.debug("writer of connection %s stopped: %r", self.id, exc)
            self._accepting = False
            self._queue.clear()
            self._empty.set()

    def _enqueue(self, item: str | bytes, size: int) -> bool:
        self._queue.append((item, size))
        self._queued += size
        if size > self._allowance:
            self._allowance = size
        if self._queued > self.limits.send_buffer + self._allowance:  # the bound, on top of one message
            self._overflow()
            return False
        self._empty.clear()
        self._wakeup.set()
        return True

    def deliver(self, frame: OutboundFrame) -> None:
        if not self._accepting:
            return
        if frame.binary:
            self._enqueue(frame.payload, len(frame.payload))
        else:
            self._enqueue(frame.encoded("asgi-text", _decode), len(frame.payload))

    async def write_message(self, message: str | bytes) -> None:
        if not self._accepting:
            raise ConnectionClosed(*self.final_close())
        payload, binary = _as_payload(message)
        if not self._enqueue(payload if binary else str(message), len(payload)):
            raise ConnectionClosed(*self.final_close())
        if self._queued > WRITE_HIGH_WATER:
            await self._empty.wait()

    async def drained(self, below: int) -> None:
        if self._accepting and self._queued > min(below, self.limits.send_buffer // 2):
            await self._empty.wait()  # set when the writer caught up, or stopped

    def _overflow(self) -> None:
        self.log.warning("connection %s has %d queued bytes (limit %d): closing as %s",
                         self.id, self._queued, self.limits.send_buffer, SLOW_CONSUMER)
        self._accepting = False
        self._queue.clear()
        self._queued = 0
        if self._task is not None:
            self._task.cancel()
        self._close_record = (CloseCode.POLICY_VIOLATION, SLOW_CONSUMER)
        self._closing = asyncio.ensure_future(self._send_close(CloseCode.POLICY_VIOLATION, SLOW_CONSUMER))
        self.drop(SLOW_CONSUMER)

    async def _send_close(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self._send({"type": "websocket.close", "code": code, "reason": reason}),
                                   self.limits.close_timeout)
        except Exception as exc:  # already gone, or never drained: the server cuts it
            self.log.debug("close of connection %s not sent: %r", self.id, exc)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self._close_record is not None or self._ended is not None:
            return
        self._close_record = (int(code), reason)
        self._accepting = False
        if self._task is not None:
            try:  # what was queued goes out before the close frame
                await asyncio.wait_for(self._empty.wait(), self.limits.close_timeout)
            except TimeoutError:
                pass
            self._task.cancel()
        await self._send_close(int(code), reason)
        self.ended(*self.final_close())

    def final_close(self, code: int = CloseCode.ABNORMAL, reason: str = "connection lost") -> tuple[int, str]:
        return self._close_record or self._ended or (code, reason)

    def ended(self, code: int, reason: str) -> None:
        """Over: the writer task stops too."""
        self._accepting = False
        if self._task is not None:
            self._task.cancel()
        self._empty.set()  # nothing more will be written: whoever waits for the queue to drain goes on
        super().ended(code, reason)


def _decode(frame: OutboundFrame) -> str:
    return frame.payload.decode("utf-8")
