"""The SSE transport: user handlers, the ``/sse`` room endpoint and the send URL.

The kernel runs each stream's life (``streaming.serve_connection``):
authenticate and admit (a refusal is a JSON error with its status), the
response headers plus ``retry:`` (:meth:`SSEConnection.accept`), then the
user's handler or the room endpoint's (``session`` event, joins from
``?rooms=`` and the resume cursor, then wait), until the client goes, the
server closes it or it falls too far behind. Frames the client POSTs to the
send URL go to the handler's inbox, or through the room protocol
(``streaming.room_protocol_frame``) for the room endpoint.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Mapping
from typing import Any

from forge_streaming import (
    ConnectionRequest,
    Handler,
    Streaming,
    Transport,
    origin_allowed,
)
from starlette.routing import BaseRoute, Route

from . import cursor, events
from .connection import Receive, Send, SSEConnection, json_response, system_event
from .protocol import SSEHttpToolsProtocol
from .settings import SSESettings

log = logging.getLogger("forge_streaming.sse")


class SSETransport(Transport):
    """Server-Sent Events: one-way streams plus POSTs bound to them by a secret."""

    name = "sse"
    default_path = "/sse"

    def __init__(self, streaming: Streaming) -> None:
        super().__init__(streaming)
        self.settings: SSESettings = streaming.config.section("sse", SSESettings)
        self.streams: dict[str, SSEConnection] = {}

    def routes(self, endpoints: Mapping[str, Handler | None]) -> list[BaseRoute]:
        """A GET route per endpoint (None: the room endpoint), plus the send URL when there is any."""
        routes: list[BaseRoute] = [Route(path, StreamEndpoint(self, handler), methods=["GET"])
                                   for path, handler in endpoints.items()]
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

    async def origin_refused(self, request: ConnectionRequest, scope: dict[str, Any], send: Send) -> bool:
        """Answer 403 (and say True) when the request's Origin is not allowed: the rule of every transport."""
        allowed = self.settings.allowed_origins
        if origin_allowed(request.origin, request.headers, allowed, scheme=scope.get("scheme", "http")):
            return False
        log.info("refused SSE %s to %s from origin %r (allowed: %s)", scope.get("method", "GET"), request.path,
                 request.origin, allowed or "same origin only")
        await json_response(send, 403, {"error": "origin_not_allowed", "message":
                                        f"origin {request.origin!r} is not allowed; list it in sse.allowed_origins"})
        return True


class StreamEndpoint:
    """ASGI app of one SSE path: a user handler, or the room endpoint when ``handler`` is None."""

    def __init__(self, sse: SSETransport, handler: Handler | None) -> None:
        self.sse = sse
        self.handler = handler

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        request = ConnectionRequest.from_scope("sse", scope)
        if await self.sse.origin_refused(request, scope, send):
            return
        conn = SSEConnection(request, self.sse.streaming, sse=self.sse,
                             room_endpoint=self.handler is None, receive=receive, send=send)
        handler: Handler
        if scope.get("method") == "HEAD":
            handler = _head  # the headers only: nothing to stream
        elif self.handler is None:
            handler = self._rooms
        else:
            handler = self.handler
        try:
            await self.sse.streaming.serve_connection(conn, handler)
        finally:
            await conn.finish()

    async def _rooms(self, conn: SSEConnection) -> None:
        """The room endpoint's handler: session event, joins (resuming where the cursor says), then wait.

        Frames the client POSTs meanwhile are acted on by :class:`SendEndpoint`.
        """
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
        await conn.wait_ended()


async def _head(conn: SSEConnection) -> None:
    """A HEAD request gets the stream's headers and nothing else."""


class SendEndpoint:
    """``POST <send_path>?connection_id=<id>`` with ``X-Stream-Token``: a client frame for that stream."""

    def __init__(self, sse: SSETransport) -> None:
        self.sse = sse

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        request = ConnectionRequest.from_scope("sse", scope)
        if await self.sse.origin_refused(request, scope, send):
            return
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
        timeout = self.sse.streaming.config.server.body_timeout
        try:
            body = await read_body(receive, limit, timeout=timeout or None)
        except TimeoutError:
            await json_response(send, 408, {"error": "body_timeout", "message":
                                            f"body not received within server.body_timeout ({timeout:g}s)"})
            return
        except BodyIncomplete:
            return  # the client went away before the end of its body: nobody to answer
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
                await self.sse.streaming.room_protocol_frame(conn, text)
        await json_response(send, 202, {"accepted": True})


class BodyIncomplete(Exception):
    """The client disconnected before its request body was complete."""


async def read_body(receive: Receive, limit: int, *, timeout: float | None = None) -> bytes | None:
    """The request body, or None as soon as it passes ``limit`` bytes.

    TimeoutError when the whole body has not arrived within ``timeout``
    seconds (a client trickling its body holds no connection open for
    long); :class:`BodyIncomplete` when the client left before its end.
    """
    if timeout is not None:
        async with asyncio.timeout(timeout):
            return await read_body(receive, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BodyIncomplete
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
    except (ValueError, RecursionError):  # not a resuming join: the room protocol answers it (invalid_json)
        return None, None
    if (isinstance(obj, dict) and obj.get("type") == "join" and isinstance(obj.get("room_id"), str)
            and isinstance(obj.get("since"), int) and not isinstance(obj.get("since"), bool)):
        return obj["room_id"], obj["since"]
    return None, None
