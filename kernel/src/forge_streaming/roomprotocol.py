"""The room protocol: what the built-in endpoints (``/ws``, ``/sse``, ``/wt``, ...) speak.

One job: read client frames (``join``, ``leave``, ``message``, ``typing``)
and act on them; anything refused is answered with an error frame and the
connection stays open. It is the handler the kernel runs for a transport's
room endpoint, the same on every transport.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from . import frames
from .connection import CloseCode, Connection
from .errors import ConnectionClosed, HookFailed, Refused
from .fanout import FanOut
from .frames import ClientFrame, ProtocolError
from .membership import Membership

if TYPE_CHECKING:
    from .service import Streaming

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

    async def serve(self, conn: Connection) -> None:
        """Read room-protocol frames from ``conn`` until it ends."""
        try:
            while True:
                message = await conn.read_message()
                await self.handle(conn, message.data)
        except ConnectionClosed:
            return

    async def handle(self, conn: Connection, raw: str | bytes) -> None:
        """Act on one client frame; answer anything refused with an error frame.

        A failing plugin hook closes only this connection (1011), whoever
        called: the read loop, or a transport that receives frames
        out of band (an SSE POST).
        """
        conn.touch()
        s = self._s
        if conn.rate_limit is not None:
            wait = conn.rate_limit.take()
            if wait:
                text = f"more than {conn.rate_limit.rate:g} messages a second"
                s._rejected(conn, "rate_limited", text)  # noqa: SLF001
                conn.send_frame(frames.error_frame("rate_limited", text, retry_after_ms=max(1, int(wait * 1000))))
                return
        try:
            frame = frames.parse_client_frame(raw, max_size=s.config.limits.max_message_size,
                                              max_depth=s.config.limits.max_json_depth)
            await self._act(conn, frame)
        except ProtocolError as exc:
            s._rejected(conn, exc.code, exc.message)  # noqa: SLF001
            conn.send_frame(frames.error_frame(exc.code, exc.message))
        except Refused as exc:
            s._rejected(conn, exc.code, exc.reason)  # noqa: SLF001
            conn.send_frame(frames.error_frame(exc.code, exc.reason))
        except HookFailed as exc:
            conn.log.error("%s while serving connection %s; closing it", exc, conn.id, exc_info=exc.error)
            await conn.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def _act(self, conn: Connection, frame: ClientFrame) -> None:
        plugins = self._s.plugins
        if plugins.implemented("streaming_message_received"):  # else no coroutine is made per frame
            for result in await plugins.acall("streaming_message_received", connection=conn, frame=frame):
                if result is False:
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
            counter = _MESSAGES_IN.get(conn.transport)
            if counter is None:
                counter = _MESSAGES_IN[conn.transport] = f"messages_in.{conn.transport}"
            self._counters[counter] += 1
            await self._fanout.publish(room, frame.data, sender=conn, wait=False)
        elif frame.type == "typing":
            await self._fanout.notify(room, frames.presence_frame("typing", room_id=room, user_id=conn.user_id,
                                                                  data=bool(frame.data)), sender=conn)
