"""The SSE transport: user handlers, the ``/sse`` room endpoint and the send URL.

A stream's life: authenticate (Refused -> JSON error with its status), open
(limits), headers plus ``retry:``, then the user's handler or the room
endpoint (``session`` event, joins from ``?rooms=`` and the resume cursor),
until the client goes, the server closes it or it falls too far behind;
then ``streaming.closed`` exactly once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Mapping
from typing import Any

from forge_streaming import (
    CloseCode,
    ConnectionClosed,
    ConnectionRequest,
    Handler,
    Refused,
    Streaming,
    Transport,
)
from starlette.routing import BaseRoute, Route

from . import cursor, events
from .connection import Receive, Send, SSEConnection, system_event
from .protocol import SSEHttpToolsProtocol
from .settings import SSESettings

log = logging.getLogger("forge_streaming.sse")

STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def json_response(send: Send, status: int, body: dict[str, Any],
                        headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload)), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


class SSETransport(Transport):
    """Server-Sent Events: one-way streams plus POSTs bound to them by a secret."""

    name = "sse"
    default_path = "/sse"

    def __init__(self, streaming: Streaming) -> None:
        super().__init__(streaming)
        self.settings: SSESettings = streaming.config.section("sse", SSESettings)
        self.streams: dict[str, SSEConnection] = {}

    def routes(self, handlers: Mapping[str, Handler], *, room_endpoint: bool) -> list[BaseRoute]:
        routes: list[BaseRoute] = [Route(path, StreamEndpoint(self, handler), methods=["GET"])
                                   for path, handler in handlers.items()]
        if room_endpoint and self.default_path not in handlers:
            routes.append(Route(self.default_path, StreamEndpoint(self, None), methods=["GET"]))
        if routes:
            routes.append(Route(self.settings.send_path, SendEndpoint(self), methods=["POST"]))
        return routes

    def server_options(self) -> dict[str, Any]:
        return {"http": SSEHttpToolsProtocol} if self.settings.fast_path else {}

    def describe(self) -> dict[str, Any]:
        return {"path": self.default_path, "send_path": self.settings.send_path, "streams": len(self.streams),
                "keep_alive_interval": self.settings.keep_alive_interval}

    @property
    def post_limit(self) -> int:
        return self.settings.max_post_size or self.streaming.config.limits.max_message_size


class StreamEndpoint:
    """ASGI app of one SSE path: a user handler, or the room endpoint when ``handler`` is None."""

    def __init__(self, sse: SSETransport, handler: Handler | None) -> None:
        self.sse = sse
        self.handler = handler

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        streaming = self.sse.streaming
        request = ConnectionRequest.from_scope("sse", scope)
        try:
            identity = await streaming.authenticate(request)
        except Refused as exc:
            await json_response(send, exc.status, {"error": exc.code, "message": exc.reason})
            return
        conn = SSEConnection(request, streaming, sse=self.sse, room_endpoint=self.handler is None)
        conn.identity = identity
        try:
            await streaming.open(conn)
        except Refused as exc:
            await json_response(send, exc.status, {"error": exc.code, "message": exc.reason})
            return
        except Exception:
            log.exception("opening SSE stream %s failed", conn.id)
            await streaming.closed(conn, CloseCode.INTERNAL_ERROR, "open failed")
            await json_response(send, 500, {"error": "internal", "message": "the stream could not be opened"})
            return
        self.sse.streams[conn.id] = conn
        handler_task: asyncio.Future[None] | None = None
        try:
            await conn.start(scope, receive, send, list(STREAM_HEADERS), fast_path=self.sse.settings.fast_path)
            if scope.get("method") == "HEAD":
                return
            if self.handler is None:
                await self._rooms(conn)
                await conn.wait_closed()
            else:
                handler_task = asyncio.ensure_future(self.handler(conn))
                closed = asyncio.ensure_future(conn.wait_closed())
                try:
                    await asyncio.wait({handler_task, closed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closed.cancel()
                if handler_task.done():
                    self._handler_result(conn, handler_task)
        except ConnectionClosed:
            pass  # ended (server drain, slow consumer) while it was opening
        except Exception as exc:
            conn.log.error("SSE stream %s at %s failed: %r", conn.id, request.path, exc, exc_info=exc)
            conn.close_code, conn.close_reason = CloseCode.INTERNAL_ERROR, "internal error"
        finally:
            self.sse.streams.pop(conn.id, None)
            await conn.finish()
            if handler_task is not None and not handler_task.done():
                await self._stop_handler(conn, handler_task)

    def _handler_result(self, conn: SSEConnection, task: asyncio.Future[None]) -> None:
        exc = task.exception()
        if exc is None or isinstance(exc, ConnectionClosed):
            return
        conn.log.error("handler for %s failed on stream %s: %r", conn.request.path, conn.id, exc, exc_info=exc)
        if not conn.done:
            conn._end(CloseCode.INTERNAL_ERROR, "handler failed", None)  # noqa: SLF001

    async def _stop_handler(self, conn: SSEConnection, task: asyncio.Future[None]) -> None:
        """The stream ended under a running handler: let it notice ``stream.done``, then cancel it."""
        done, _ = await asyncio.wait({task}, timeout=self.sse.settings.close_grace)
        if not done:
            conn.log.info("handler for %s did not return after stream %s ended; cancelling it",
                          conn.request.path, conn.id)
            task.cancel()
            await asyncio.wait({task})
        if not task.cancelled():
            self._handler_result(conn, task)

    async def _rooms(self, conn: SSEConnection) -> None:
        """The room endpoint's opening: session event, then joins (resuming where the cursor says)."""
        streaming = self.sse.streaming
        await conn.send_event_bytes(events.named("session", {
            "connection_id": conn.id, "token": conn.token, "send_url": conn.send_url}))
        positions: dict[str, int] = {}
        if conn.last_event_id:
            try:
                positions = cursor.parse(conn.last_event_id,
                                         max_rooms=streaming.config.limits.max_rooms_per_connection)
            except cursor.CursorError as exc:
                conn.log.info("stream %s: ignoring Last-Event-ID: %s", conn.id, exc)
                await conn.send_event_bytes(system_event("resume.ignored", {
                    "last_event_id": conn.last_event_id[:200],
                    "reason": f"not a cursor of this server ({exc}); joined without replay"}))
        rooms = [r.strip() for r in (conn.query("rooms") or "").split(",") if r.strip()]
        rooms += [r for r in positions if r not in rooms]
        for room in dict.fromkeys(rooms):
            if conn.done:
                return
            since = positions.get(room)
            frame: dict[str, Any] = {"type": "join", "room_id": room}
            if since is not None:
                frame["since"] = since
            await conn.join_from(json.dumps(frame), room, since)


class SendEndpoint:
    """``POST <send_path>?connection_id=<id>`` with ``X-Stream-Token``: a client frame for that stream."""

    def __init__(self, sse: SSETransport) -> None:
        self.sse = sse

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        request = ConnectionRequest.from_scope("sse", scope)
        token = request.headers.get("x-stream-token", "")
        if not token:
            await json_response(send, 401, {"error": "missing_token",
                                            "message": "send the stream's token in the X-Stream-Token header"})
            return
        conn_id = request.query.get("connection_id", "")
        conn = self.sse.streams.get(conn_id)
        if conn is None or conn.done:
            await json_response(send, 404, {"error": "no_stream", "message":
                                            f"no open stream with connection_id {conn_id[:64]!r}; reconnect first"})
            return
        if not hmac.compare_digest(token.encode(), conn.token.encode()):
            await json_response(send, 403, {"error": "bad_token",
                                            "message": "X-Stream-Token does not match this stream"})
            return
        limit = self.sse.post_limit
        body = await read_body(receive, limit)
        if body is None:
            await json_response(send, 413, {"error": "too_large", "message": f"body is over {limit} bytes"})
            return
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            await json_response(send, 400, {"error": "invalid_utf8", "message": "body must be UTF-8 JSON text"})
            return
        if not conn.room_endpoint:
            if not conn.offer(text):
                await json_response(send, 429, {"error": "inbox_full",
                                                "message": "the stream's handler has not read earlier frames yet"})
                return
        else:
            room, since = _resume_join(text)
            if room is not None:
                await conn.join_from(text, room, since)
            else:
                await self.sse.streaming.handle_client_frame(conn, text)
        await json_response(send, 202, {"accepted": True})


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _resume_join(text: str) -> tuple[str | None, int | None]:
    """(room, since) when ``text`` is a join frame with a ``since``: its replay is held in order."""
    if '"since"' not in text:
        return None, None
    try:
        obj = json.loads(text)
    except ValueError:
        return None, None
    if (isinstance(obj, dict) and obj.get("type") == "join" and isinstance(obj.get("room_id"), str)
            and isinstance(obj.get("since"), int) and not isinstance(obj.get("since"), bool)):
        return obj["room_id"], obj["since"]
    return None, None
