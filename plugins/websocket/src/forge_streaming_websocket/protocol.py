"""uvicorn's sans-I/O WebSocket protocol, opened up for zero-task delivery.

The app finds this protocol in ``scope["extensions"][EXTENSION]`` and
writes pre-framed bytes straight to its asyncio transport through a
:class:`forge_streaming.BufferedWriter`. Everything uvicorn writes itself
(pong, ping, close echo) goes through :class:`_OrderedTransport`, which
flushes the writer's pending bytes first, so control frames never
overtake or split delivery data. Closes initiated here flush first too,
and a peer that does not finish the closing handshake is cut after a
timeout instead of holding its socket open forever.
"""

from __future__ import annotations

import asyncio
from typing import Any

from forge_streaming import BufferedWriter
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.http11 import Request

EXTENSION = "forge_streaming.websocket"
"""ASGI scope extension key under which the app finds the protocol."""

GOING_AWAY_REASON = "server shutting down"
SHUTDOWN_CLOSE_TIMEOUT = 2.0


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


class ForgeWebSocketProtocol(WebSocketsSansIOProtocol):
    """Pass as uvicorn's ``ws=`` (``Transport.server_options`` does)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw_transport: asyncio.Transport | None = None
        self.writer: BufferedWriter | None = None
        self.close_record: tuple[int, str] | None = None

    # -- wiring ---------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.raw_transport = transport
        super().connection_made(_OrderedTransport(transport, self))  # type: ignore[arg-type]

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None and not self.close_sent:
            # The app task was created but has not run yet: it will see this.
            scope["extensions"][EXTENSION] = self

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            # uvicorn would log "returned without completing handshake" for a deliberate HTTP refusal
            self.handshake_complete = True

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
        super().connection_lost(exc)
