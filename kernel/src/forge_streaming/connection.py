"""The transport-neutral connection every transport plugin implements.

A WebSocket, an SSE stream and a WebTransport session all look the same to
a handler and to the kernel: ``read_message``, ``write_message``, rooms,
``close``. The one method on the hot path is :meth:`Connection.deliver`,
which must never block: it writes or queues, and drops the connection when
its bounded buffer overflows.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from .frames import Message, OutboundFrame, encode
from .limits import TokenBucket

if TYPE_CHECKING:
    from .service import Streaming

_ids = itertools.count(1)
_process_tag = os.urandom(4).hex()
"""Part of every connection id: ids are unique across the processes (workers, nodes) of a cluster."""


def _new_process() -> None:
    global _process_tag
    _process_tag = os.urandom(4).hex()


os.register_at_fork(after_in_child=_new_process)


class ConnectionState(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class CloseCode(enum.IntEnum):
    """WebSocket close codes (RFC 6455), used as the reason code on every transport."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    ABNORMAL = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is on the other end, as the authenticate hook decided."""

    user_id: str
    claims: Mapping[str, Any] = field(default_factory=dict)


class ScopeHeaders(Mapping[str, str]):
    """A read-only view of an ASGI scope's header list, as ``{lower-case name: value}``.

    Names and values are decoded (latin-1) when looked up, not copied at
    connection time; a repeated header gives its last value, as a dict built
    from the list would.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: Sequence[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def __getitem__(self, name: str) -> str:
        if not isinstance(name, str):
            raise KeyError(name)
        size = len(name)
        for key, value in reversed(self._raw):
            if len(key) == size and key.decode("latin-1").lower() == name:
                return value.decode("latin-1")
        raise KeyError(name)

    def _names(self) -> dict[str, None]:
        return dict.fromkeys(key.decode("latin-1").lower() for key, _ in self._raw)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.items())!r})"


@dataclass(frozen=True, slots=True)
class ConnectionRequest:
    """What a client sent when it opened a connection, on any transport.

    Header names are lower-case. ``scope`` is the ASGI scope where there is
    one (WebSocket, SSE); WebTransport requests have none.
    """

    transport: str
    path: str
    query_string: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    client: tuple[str, int] | None = None
    scope: Mapping[str, Any] | None = None

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(self.query_string, keep_blank_values=True))

    @property
    def cookies(self) -> dict[str, str]:
        jar: SimpleCookie = SimpleCookie()
        jar.load(self.headers.get("cookie", ""))
        return {key: morsel.value for key, morsel in jar.items()}

    @property
    def origin(self) -> str | None:
        return self.headers.get("origin")

    @classmethod
    def from_scope(cls, transport: str, scope: Mapping[str, Any]) -> ConnectionRequest:
        raw = scope.get("headers", ())
        headers = ScopeHeaders(raw if isinstance(raw, Sequence) else tuple(raw))  # any sequence of pairs, as is
        client = scope.get("client")
        if client and not (type(client) is tuple and type(client[0]) is str and type(client[1]) is int):
            client = (str(client[0]), int(client[1]))
        return cls(
            transport=transport,
            path=scope.get("path", "/"),
            query_string=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            client=client or None,
            scope=scope,
        )


class Connection(ABC):
    """One client connection, whatever its transport.

    The kernel runs every connection's life (:meth:`Streaming.serve_connection`):
    admission, authentication, :meth:`accept` or :meth:`refuse`, the handler
    or the room protocol, the close code, and ``closed`` exactly once. A
    transport's subclass supplies only the I/O:

    - :meth:`accept` / :meth:`refuse`: answer the opening request;
    - :meth:`read_message`: the next client message, ``ConnectionClosed`` at the end;
    - :meth:`write_message` and :meth:`deliver` (the hot path, never waits);
    - :meth:`drained` (optional): wait until the client has taken most of what was delivered;
    - :meth:`close`: end it, telling the client a code and reason;
    - :meth:`ended`: call it as soon as the I/O is over, whoever ended it.

    The room methods here go through the service so that hooks, presence and
    the pub/sub backend are involved.
    """

    transport: str = "unknown"

    # Defaults that most connections keep live here, not in each instance's dict: an idle
    # connection's memory is mostly its dict (a few hundred bytes per extra key past a size class).
    identity: Identity | None = None
    rate_limit: TokenBucket | None = None
    close_code: int | None = None
    close_reason: str = ""
    _end_waiter: asyncio.Future[None] | None = None
    _receive_now: Callable[[Connection, str | bytes], bool] | None = None
    """Set by the room protocol while its reader waits: where :meth:`received` offers a frame."""
    _busy: asyncio.Future[None] | None = None
    """A frame taken by :meth:`received` that is still being acted on: later frames wait for it."""

    def __init__(self, request: ConnectionRequest, streaming: Streaming) -> None:
        self.id = f"{self.transport[:2]}-{next(_ids):x}-{_process_tag}"
        self.request = request
        self.streaming = streaming
        self.rooms: set[str] = set()
        self.state = ConnectionState.CONNECTING
        self.opened_at = time.monotonic()
        self.last_activity = self.opened_at
        self.log = logging.LoggerAdapter(
            logging.getLogger(f"forge_streaming.{self.transport}"), {"connection_id": self.id}
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.state.value} user={self.user_id!r}>"

    @property
    def user_id(self) -> str:
        """The identity's user id, else the connection id (what presence shows)."""
        return self.identity.user_id if self.identity else self.id

    def touch(self) -> None:
        """Note that the client did something (the idle timeout counts from here)."""
        self.last_activity = time.monotonic()

    def query(self, name: str, default: str | None = None) -> str | None:
        """A query-string parameter of the opening request."""
        return self.request.query.get(name, default)

    # -- rooms ---------------------------------------------------------------

    async def join_room(self, room: str, *, since: int | None = None) -> None:
        """Join ``room``; with ``since``, replay what history holds after it.

        Raises :class:`~forge_streaming.Refused` when a hook refuses the join.
        """
        await self.streaming.join(self, room, since=since)

    async def leave_room(self, room: str) -> None:
        await self.streaming.leave(self, room)

    async def broadcast_to_room(self, room: str, data: Any) -> int | None:
        """Publish ``data`` to the other members of ``room``; return its sequence.

        ``data`` is JSON data, bytes (a binary room message), or a received
        :class:`Message` (``broadcast_to_room(room, await conn.read_message())``).
        """
        return await self.streaming.publish(room, data, sender=self)

    # -- transport I/O -------------------------------------------------------

    async def accept(self) -> None:
        """Complete the opening handshake (WebSocket accept, SSE headers, WebTransport 200).

        Called by the kernel once the connection is admitted and counted,
        before the ``streaming_connected`` hook and the handler.
        """

    async def refuse(self, status: int, code: str, reason: str) -> None:
        """Answer the opening request with a refusal, before anything was accepted.

        ``status`` is an HTTP status (401, 403, 429, 500, 503); ``code`` the
        machine-readable reason (``forbidden``, ``server_full``, ...).
        """

    def ended(self, code: int, reason: str) -> None:
        """The transport tells the kernel this connection's I/O is over (idempotent).

        The first call records ``code`` and ``reason`` (what ``streaming_disconnected``
        is told) and wakes the kernel, which then stops the handler and
        removes the connection from its rooms. Later calls change nothing.
        """
        if self.close_code is not None:
            return
        self.close_code, self.close_reason = int(code), reason
        if self.state is not ConnectionState.CLOSED:
            self.state = ConnectionState.CLOSING
        waiter = self._end_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def is_ended(self) -> bool:
        """True once :meth:`ended` was called (``close_code`` is set then, and only then)."""
        return self.close_code is not None

    async def wait_ended(self) -> None:
        """Wait until :meth:`ended` is called (the kernel stops a handler that outlives its connection)."""
        if self.close_code is not None:
            return
        if self._end_waiter is None:
            self._end_waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._end_waiter)

    def drop(self, reason: str, code: int = CloseCode.POLICY_VIOLATION) -> None:
        """The transport cut this connection for cause (``slow consumer``, ``too large``, ...).

        Synchronous, for the hot path: counts the drop, fires
        ``streaming_connection_dropped``, marks the connection ended and
        takes it out of its rooms at once, whatever its handler is doing.
        The transport itself stops the I/O (e.g. a close frame, then a reset).
        """
        self.ended(code, reason)
        self.streaming._dropped(self, reason)  # noqa: SLF001 (the kernel's own class)

    def received(self, data: str | bytes) -> bool:
        """Offer a client message the moment the transport reads it; True: the kernel took it, do not queue it.

        Optional, for a transport that reads in a callback (the WebSocket
        plugin): when nothing is queued for :meth:`read_message`, it offers
        each message here first and queues it only on False. The room
        protocol acts on a room message there and then, sparing the task
        switch per message; it takes nothing while its reader is busy (or
        while a plugin's ``async def`` hook must see each frame first), so
        frames keep their order.
        The transport checks its size limit before offering.
        """
        receive = self._receive_now
        return receive is not None and receive(self, data)

    @abstractmethod
    async def read_message(self) -> Message:
        """Wait for the next message; raise ConnectionClosed when it has ended."""

    @abstractmethod
    async def write_message(self, message: str | bytes) -> None:
        """Send one message to this client (text stays text, bytes stay binary)."""

    @abstractmethod
    def deliver(self, frame: OutboundFrame) -> None:
        """Hand a shared frame to this client without waiting.

        Called once per recipient on the hot path: write straight through
        while the transport accepts data, queue within the bound when it
        pushes back, and close with reason ``slow consumer`` past the bound.
        Must not raise for a closed connection.
        """

    async def drained(self, below: int) -> None:
        """Return once at most ``below`` bytes delivered to this client are still unsent, or it has ended.

        The kernel awaits it between the messages of a replay (a resume, a
        large history), so that the replay goes as fast as the client reads
        instead of all at once into the bounded buffer of :meth:`deliver`.
        A transport answers from its writer's unsent bytes (or the client's
        unacknowledged ones) and may wait for less than ``below`` when its own
        bound is small. This default returns at once: the whole replay is
        then delivered in one go, as :meth:`deliver` takes it.
        """

    @abstractmethod
    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """End the connection, telling the client ``code`` and ``reason``."""

    def send_frame(self, frame: dict[str, Any]) -> None:
        """Deliver a one-off protocol frame (error, system notice) to this client."""
        self.deliver(OutboundFrame(payload=encode(frame)))

    @property
    def is_open(self) -> bool:
        return self.state is ConnectionState.OPEN
