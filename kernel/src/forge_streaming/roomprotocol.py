"""The room protocol: what the built-in endpoints (``/ws``, ``/sse``, ``/wt``, ...) speak.

One job: read client frames (``join``, ``leave``, ``message``, ``typing``)
and act on them; anything refused is answered with an error frame and the
connection stays open. It is the handler the kernel runs for a transport's
room endpoint, the same on every transport.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from . import frames
from .connection import CloseCode, Connection
from .errors import ConnectionClosed, HookFailed, Refused
from .fanout import FanOut
from .frames import ClientFrame, ProtocolError
from .lifecycle import INTERNAL_ERROR
from .membership import Membership
from .pubsub import Envelope

if TYPE_CHECKING:
    from .service import Streaming

MESSAGE_RECEIVED = "streaming_message_received"
_MESSAGES_IN: dict[str, str] = {}  # transport -> its counter's name, formatted once


class RoomProtocol:
    """Reads and acts on room-protocol frames for one service.

    Per message, it calls the parts that do the work (membership, fan-out)
    directly rather than through the service's facade coroutines.
    """

    def __init__(self, streaming: Streaming, membership: Membership, fanout: FanOut,
                 counters: Counter[str]) -> None:
        self._s = streaming
        self._membership = membership
        self._fanout = fanout
        self._counters = counters
        self._receive_now = self.receive_now  # one bound method for every connection (kept while it waits)

    async def serve(self, conn: Connection) -> None:
        """Read room-protocol frames from ``conn`` until it ends.

        While this reader waits, the transport may offer each frame the
        moment it reads it (:meth:`Connection.received`), and the hot one, a
        room message, is acted on there and then (:meth:`receive_now`): no
        task wakes up per message. Whatever must wait is queued for this
        reader as before, so frames are acted on in the order they came.
        """
        receive_now = self._receive_now
        try:
            while True:
                conn._receive_now = receive_now  # noqa: SLF001 (the kernel's own class)
                try:
                    message = await conn.read_message()
                finally:
                    conn._receive_now = None  # noqa: SLF001
                busy = conn._busy  # noqa: SLF001
                if busy is not None:  # a message taken at once whose publish had to wait goes first
                    await busy
                await self.handle(conn, message.data)
        except ConnectionClosed:
            return

    def receive_now(self, conn: Connection, raw: str | bytes) -> bool:
        """Act on a frame the transport just read, if it is a room message; False: queue it for :meth:`serve`.

        Taken here: a valid room message to a room the member is in, while
        this connection has nothing in flight, no plugin implements
        ``streaming_message_received`` with ``async def``, and nothing must
        await the publish (:meth:`FanOut.can_publish_now`). Everything else
        (joins, leaves, typing, invalid frames) is left untouched for the
        reader, which handles it as ever, so a frame is never acted on twice.
        What a taken frame still has to wait for (the backend is behind, a
        hook's answer to await, a hook that made it another frame) goes on
        in a task that the connection's next frames wait for.
        """
        s = self._s
        if conn._busy is not None:  # noqa: SLF001 (the kernel's own class)
            return False
        plugins = s.plugins
        hooked = plugins.implemented(MESSAGE_RECEIVED)
        if (hooked and not plugins.synchronous(MESSAGE_RECEIVED)) or not self._fanout.can_publish_now():
            return False
        try:
            frame = frames.parse_client_frame(raw, max_size=s.config.limits.max_message_size,
                                              max_depth=s.config.limits.max_json_depth)
        except ProtocolError:
            return False  # the reader answers it, in order
        if frame.type != "message" or frame.room_id not in conn.rooms:
            return False
        try:
            conn.touch()
            if conn.rate_limit is not None and self._limited(conn):
                return True
            if hooked:
                results = plugins.call(MESSAGE_RECEIVED, connection=conn, frame=frame)
                if frame.type != "message" or frame.room_id not in conn.rooms \
                        or any(inspect.isawaitable(r) for r in results):
                    self._in_flight(conn, self._act_answering(conn, frame, results))
                    return True
                if any(r is False for r in results):
                    return True
            self._count_in(conn)
            envelope = self._fanout.message_envelope(frame.room_id, frame.data, conn.user_id, conn)
            if not self._fanout.publish_now(envelope):  # the backend makes publishers wait: in order, in a task
                self._in_flight(conn, self._publish_later(conn, envelope))
        except (ProtocolError, Refused) as exc:
            self._reject(conn, exc)
        except Exception as exc:  # a failed hook, or a bug: as the reader would, this connection only, 1011
            self._failed(conn, exc)
            s._background(conn.close(CloseCode.INTERNAL_ERROR, INTERNAL_ERROR))  # noqa: SLF001
        return True

    @staticmethod
    def _in_flight(conn: Connection, work: Coroutine[Any, Any, None]) -> None:
        """Finish a frame taken at once in a task; the connection's next frames wait for it (:meth:`serve`)."""
        conn._busy = busy = asyncio.ensure_future(work)  # noqa: SLF001
        busy.add_done_callback(lambda _: setattr(conn, "_busy", None))

    async def _publish_later(self, conn: Connection, envelope: Envelope) -> None:
        try:
            await self._fanout.publish_envelope(envelope)
            self._counters["published"] += 1
        except Exception as exc:
            self._failed(conn, exc)
            await conn.close(CloseCode.INTERNAL_ERROR, INTERNAL_ERROR)

    async def _act_answering(self, conn: Connection, frame: ClientFrame, results: list[Any] | None = None) -> None:
        """:meth:`_act`, answering what it refuses; any other failure closes this connection 1011."""
        try:
            await self._act(conn, frame, results)
        except (ProtocolError, Refused) as exc:
            self._reject(conn, exc)
        except Exception as exc:
            self._failed(conn, exc)
            await conn.close(CloseCode.INTERNAL_ERROR, INTERNAL_ERROR)

    def _reject(self, conn: Connection, exc: ProtocolError | Refused) -> None:
        """Answer a refused frame with an error frame (the connection stays open)."""
        code, text = (exc.code, exc.message) if isinstance(exc, ProtocolError) else (exc.code, exc.reason)
        self._s._rejected(conn, code, text)  # noqa: SLF001
        conn.send_frame(frames.error_frame(code, text))

    @staticmethod
    def _failed(conn: Connection, exc: Exception) -> None:
        if isinstance(exc, HookFailed):
            conn.log.error("%s while serving connection %s; closing it", exc, conn.id, exc_info=exc.error)
        else:
            conn.log.error("acting on a frame of connection %s failed: %r; closing it", conn.id, exc, exc_info=exc)

    def _limited(self, conn: Connection) -> bool:
        """Over its rate limit: answered with ``rate_limited`` (the frame is not acted on)."""
        assert conn.rate_limit is not None
        wait = conn.rate_limit.take()
        if not wait:
            return False
        text = f"more than {conn.rate_limit.rate:g} messages a second"
        self._s._rejected(conn, "rate_limited", text)  # noqa: SLF001
        conn.send_frame(frames.error_frame("rate_limited", text, retry_after_ms=max(1, int(wait * 1000))))
        return True

    def _count_in(self, conn: Connection) -> None:
        counter = _MESSAGES_IN.get(conn.transport)
        if counter is None:
            counter = _MESSAGES_IN[conn.transport] = f"messages_in.{conn.transport}"
        self._counters[counter] += 1

    async def handle(self, conn: Connection, raw: str | bytes) -> None:
        """Act on one client frame; answer anything refused with an error frame.

        A failing plugin hook closes only this connection (1011), whoever
        called: the read loop, or a transport that receives frames
        out of band (an SSE POST).
        """
        conn.touch()
        s = self._s
        if conn.rate_limit is not None and self._limited(conn):
            return
        try:
            frame = frames.parse_client_frame(raw, max_size=s.config.limits.max_message_size,
                                              max_depth=s.config.limits.max_json_depth)
            await self._act(conn, frame)
        except (ProtocolError, Refused) as exc:
            self._reject(conn, exc)
        except HookFailed as exc:
            self._failed(conn, exc)
            await conn.close(CloseCode.INTERNAL_ERROR, INTERNAL_ERROR)

    async def _act(self, conn: Connection, frame: ClientFrame, results: list[Any] | None = None) -> None:
        """Act on ``frame``; ``results``: what ``streaming_message_received`` answered already, if it was called."""
        plugins = self._s.plugins
        if results is not None:
            results = await plugins.settle(MESSAGE_RECEIVED, results)
        elif plugins.implemented(MESSAGE_RECEIVED):  # else no coroutine is made per frame
            results = await plugins.acall(MESSAGE_RECEIVED, connection=conn, frame=frame)
        if results and any(r is False for r in results):
            return
        room = frame.room_id
        if frame.type == "join":
            await self._membership.join(conn, room, since=frame.since)
        elif frame.type == "leave":
            if room not in conn.rooms:
                raise ProtocolError("not_member", f"not a member of room {room!r}")
            await self._membership.leave(conn, room)
        elif room not in conn.rooms:
            raise ProtocolError("not_member", f"join room {room!r} before sending to it")
        elif frame.type == "message":
            self._count_in(conn)
            await self._fanout.publish(room, frame.data, sender=conn, wait=False)
        elif frame.type == "typing":
            await self._fanout.notify(room, frames.presence_frame("typing", room_id=room, user_id=conn.user_id,
                                                                  data=bool(frame.data)), sender=conn)
