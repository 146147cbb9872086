"""HTTP long-polling: the whole transport, for clients behind proxies that pass neither WebSocket nor SSE.

``POST {path}`` opens a session, ``GET {path}/poll`` takes what is queued for
it, ``POST {path}/send`` hands the server one message, ``DELETE {path}`` ends
it. Every request but the first names its session (``?session=``) and
proves it with the token the first one answered (header ``X-Session-Token``).

Frames for the client wait in a bounded queue until its next poll takes
them all, as one JSON array: room frames are objects, and what a handler
wrote with ``write_message`` is a string. Messages from the client wait in
a bounded inbox until ``read_message`` (the room protocol, or your handler)
reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any

from forge_streaming import (
    CloseCode,
    ConfigSection,
    Connection,
    ConnectionClosed,
    ConnectionRequest,
    Duration,
    Handler,
    Message,
    Meta,
    OutboundFrame,
    Size,
    Streaming,
    Transport,
    hookimpl,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

TOKEN_HEADER = "x-session-token"
SLOW_CONSUMER = "slow consumer"


class LongPollSettings(ConfigSection):
    """The ``longpoll`` config section."""

    poll_timeout: Duration = 25.0
    """How long a poll waits for frames before it answers ``[]`` (stay under your proxies' timeout)."""
    session_timeout: Duration = 60.0
    """A session that nobody polls for this long has ended (close code 1006, ``session timeout``)."""
    send_buffer: Size | None = None
    """Bytes queued between two polls before the session is dropped as a ``slow consumer``
    (default: ``limits.send_buffer``)."""
    inbox: Annotated[int, Meta(ge=1)] = 32
    """Client messages waiting to be read; a send past it is answered 429."""


class LongPollConnection(Connection):
    """One session: a queue that polls empty, an inbox that sends fill, a timer that ends it unpolled."""

    transport = "longpoll"

    def __init__(self, request: ConnectionRequest, owner: LongPollTransport) -> None:
        super().__init__(request, owner.streaming)
        self.owner = owner
        self.token = secrets.token_urlsafe(32)
        self.polling = False
        self.opening: asyncio.Future[tuple[int, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._queue: list[bytes] = []  # encoded JSON values, joined into one array per poll
        self._queued = 0
        self._inbox: deque[str] = deque()
        self._woken = asyncio.Event()  # something to poll: a frame was queued, or the session ended
        self._taken = asyncio.Event()  # a poll took the queue, or the session ended (see drained)
        self._received = asyncio.Event()  # something to read: a message arrived, or the session ended
        self._timer: asyncio.TimerHandle | None = None

    # -- the opening request: the kernel calls accept() or refuse() ----------------

    async def accept(self) -> None:
        self.owner.sessions[self.id] = self
        self._expire_later()
        self.answer(200, {"session": self.id, "token": self.token})

    async def refuse(self, status: int, code: str, reason: str) -> None:
        self.answer(status, {"error": code, "message": reason})

    def answer(self, status: int, body: dict[str, Any]) -> None:
        if not self.opening.done():
            self.opening.set_result((status, body))

    # -- client to server ----------------------------------------------------------

    def receive(self, text: str) -> bool:
        """Queue one client message for ``read_message``; False when the inbox is full."""
        if len(self._inbox) >= self.owner.settings.inbox:
            return False
        self._inbox.append(text)
        self.touch()
        self._received.set()
        return True

    async def read_message(self) -> Message:
        while not self.is_ended:
            if self._inbox:
                return Message(self._inbox.popleft())
            self._received.clear()
            await self._received.wait()
        raise ConnectionClosed(self.close_code or CloseCode.ABNORMAL, self.close_reason)

    # -- server to client ----------------------------------------------------------

    def deliver(self, frame: OutboundFrame) -> None:
        if not self.is_ended:  # JSON text: a binary room message comes as its base64 JSON frame
            self._push(frame.as_text().payload)

    async def write_message(self, message: str | bytes) -> None:
        if not isinstance(message, str):
            raise TypeError("long-polling carries text only: write a str")
        if self.is_ended or not self._push(json.dumps(message, ensure_ascii=False).encode()):
            raise ConnectionClosed(self.close_code or CloseCode.ABNORMAL, self.close_reason)

    async def drained(self, below: int) -> None:
        """Wait until a poll has taken the queue (the kernel's replays go at the pace of the polls)."""
        while self._queued > min(below, self.owner.send_buffer // 2) and not self.is_ended:
            self._taken.clear()
            await self._taken.wait()

    def _push(self, value: bytes) -> bool:
        """Queue one JSON value and wake the poll; past the bound, drop the session (never waits)."""
        self._queue.append(value)
        self._queued += len(value)
        if self._queued > self.owner.send_buffer:
            self._queue, self._queued = [], 0
            self.drop(SLOW_CONSUMER)
            return False
        self._woken.set()
        return True

    async def poll(self) -> bytes | None:
        """Wait up to ``poll_timeout`` for frames and take them all, as a JSON array.

        None once the session has ended and nothing is left to take.
        """
        self.polling = True
        self._stop_timer()
        try:
            if not self._queue and not self.is_ended:
                self._woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), self.owner.settings.poll_timeout)
        finally:
            self.polling = False
            self._expire_later()
        if not self._queue and self.is_ended:
            return None
        batch, self._queue, self._queued = self._queue, [], 0
        self._taken.set()
        return b"[" + b",".join(batch) + b"]"

    # -- the end -------------------------------------------------------------------

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        self.ended(code, reason)  # the client takes what is queued, then its next poll answers 410

    def ended(self, code: int, reason: str) -> None:
        super().ended(code, reason)
        self._woken.set()
        self._received.set()
        self._taken.set()

    def forget(self) -> None:
        """Take the session out of the transport's table (it has ended and the client knows, or is gone)."""
        self._stop_timer()
        self.owner.sessions.pop(self.id, None)

    def _expire_later(self) -> None:
        self._stop_timer()
        self._timer = asyncio.get_running_loop().call_later(self.owner.settings.session_timeout, self._expire)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        """Nobody polled for ``session_timeout``: the client is gone."""
        self.ended(CloseCode.ABNORMAL, "session timeout")
        self.forget()


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def _ended(conn: LongPollConnection) -> JSONResponse:
    return JSONResponse({"error": "session_ended", "code": conn.close_code, "reason": conn.close_reason},
                        status_code=410)


class LongPollTransport(Transport):
    """Four routes per endpoint, and the table of open sessions by id."""

    name = "longpoll"
    default_path = "/lp"

    def __init__(self, streaming: Streaming) -> None:
        super().__init__(streaming)
        self.settings = streaming.config.section("longpoll", LongPollSettings)
        chosen = self.settings.send_buffer
        self.send_buffer = chosen if chosen is not None else streaming.config.limits.send_buffer
        self.sessions: dict[str, LongPollConnection] = {}
        self._serving: set[asyncio.Task[None]] = set()

    def routes(self, endpoints: Mapping[str, Handler | None]) -> list[BaseRoute]:
        routes: list[BaseRoute] = []
        for path, handler in endpoints.items():
            routes += [
                Route(path, self._opener(handler), methods=["POST"]),
                Route(path, self.end, methods=["DELETE"]),
                Route(f"{path}/poll", self.poll, methods=["GET"]),
                Route(f"{path}/send", self.send, methods=["POST"]),
            ]
        return routes

    def _opener(self, handler: Handler | None) -> Callable[[Request], Awaitable[Response]]:
        async def open_session(request: Request) -> Response:
            conn = LongPollConnection(ConnectionRequest.from_scope(self.name, request.scope), self)
            task = asyncio.ensure_future(self.streaming.serve_connection(conn, handler))
            self._serving.add(task)
            task.add_done_callback(lambda _: self._served(task, conn))
            status, body = await conn.opening  # the kernel called accept() or refuse()
            return JSONResponse(body, status_code=status)

        return open_session

    def _served(self, task: asyncio.Task[None], conn: LongPollConnection) -> None:
        self._serving.discard(task)
        conn.answer(500, {"error": "internal_error", "message": "internal error"})  # if it never answered

    def _session(self, request: Request) -> LongPollConnection | Response:
        conn = self.sessions.get(request.query_params.get("session", ""))
        if conn is None:
            return _error(404, "unknown_session", "no such session (ended or timed out): open a new one")
        if not hmac.compare_digest(request.headers.get(TOKEN_HEADER, "").encode(), conn.token.encode()):
            return _error(403, "forbidden", f"send the session's token in the {TOKEN_HEADER} header")
        return conn

    async def poll(self, request: Request) -> Response:
        conn = self._session(request)
        if isinstance(conn, Response):
            return conn
        if conn.polling:
            return _error(409, "already_polling", "one poll at a time per session")
        batch = await conn.poll()
        if batch is None:  # ended, and the client has had everything: tell it how, then forget it
            conn.forget()
            return _ended(conn)
        return Response(batch, media_type="application/json")

    async def send(self, request: Request) -> Response:
        conn = self._session(request)
        if isinstance(conn, Response):
            return conn
        limit, body = self.streaming.config.limits.max_message_size, bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return _error(413, "too_large", f"a message may be at most {limit} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return _error(400, "invalid_utf8", "a message is UTF-8 text")
        if conn.is_ended:
            return _ended(conn)
        if not conn.receive(text):
            return _error(429, "inbox_full", "the server has not read your previous messages yet; retry")
        return Response(status_code=202)

    async def end(self, request: Request) -> Response:
        conn = self._session(request)
        if isinstance(conn, Response):
            return conn
        conn.ended(CloseCode.NORMAL, "client ended the session")
        conn.forget()
        return Response(status_code=204)

    async def stop(self) -> None:
        for conn in list(self.sessions.values()):
            conn.ended(CloseCode.GOING_AWAY, "server shutting down")
            conn.forget()
        for task in self._serving:
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        return {"path": self.default_path, "sessions": len(self.sessions),
                "poll_timeout": self.settings.poll_timeout, "send_buffer": self.send_buffer}


@hookimpl
def streaming_config_sections() -> Mapping[str, type[ConfigSection]]:
    return {"longpoll": LongPollSettings}


@hookimpl
def streaming_register_transports() -> Sequence[type[Transport]]:
    return [LongPollTransport]
