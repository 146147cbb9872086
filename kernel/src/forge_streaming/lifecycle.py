"""Every connection's life, once, for every transport.

::

    authenticate -> admit (limits, count) -> accept -> streaming_connected
      -> handler or room protocol -> close code -> closed (exactly once)

A transport builds its :class:`Connection` and hands it to
:meth:`Streaming.serve_connection`; it supplies only the I/O (accept or
refuse, receive, deliver, close, and ``ended`` when the I/O is over). So the
same failure has the same outcome on every transport:

==============================  ==========================================
what happens                    outcome
==============================  ==========================================
authenticate raises Refused     refused with its status (401/403/...)
authenticate hook fails         refused, 500
a limit is reached              refused, 503 (full) or 429 (per IP/user)
accept raises                   closed 1011, counted and uncounted
streaming_connected fails       closed 1011 "internal error"
handler returns                 closed 1000
handler raises Refused          closed with its close_code (1008) and reason
handler raises anything else    closed 1011 "internal error"
a room-protocol hook fails      closed 1011 "internal error"
the client goes away            ``ended`` by the transport with its code
==============================  ==========================================
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .admission import Admission
from .connection import CloseCode, Connection, ConnectionState
from .errors import ConnectionClosed, HookFailed, Refused
from .membership import Membership
from .transports import Handler

if TYPE_CHECKING:
    from .service import Streaming

log = logging.getLogger("forge_streaming")

INTERNAL_ERROR = "internal error"


class Lifecycle:
    """Runs connections from their opening request to ``streaming_disconnected``."""

    def __init__(self, streaming: Streaming, admission: Admission, membership: Membership) -> None:
        self._s = streaming
        self._admission = admission
        self._membership = membership

    async def serve(self, conn: Connection, handler: Handler | None) -> None:
        """Run ``conn`` to its end; ``handler`` None serves the room protocol."""
        s = self._s
        try:
            identity = await self._admission.authenticate(conn.request, accepting=s.accepting)
            if identity is not None:
                conn.identity = identity
            self._admission.admit(conn)
        except Refused as exc:
            conn.log.info("%s connection to %s refused (%d %s): %s", conn.transport, conn.request.path,
                          exc.status, exc.code, exc.reason)
            await self._refuse(conn, exc.status, exc.code, exc.reason)
            return
        except Exception as exc:
            conn.log.error("admitting a %s connection to %s failed: %r", conn.transport, conn.request.path, exc,
                           exc_info=exc)
            await self._refuse(conn, 500, "internal_error", INTERNAL_ERROR)
            return
        s.count(f"connections_opened.{conn.transport}")
        try:
            await conn.accept()
            await s.plugins.acall("streaming_connected", connection=conn)
            if handler is None:
                await s._room_protocol.serve(conn)  # noqa: SLF001
            else:
                await self._run_handler(conn, handler)
        except ConnectionClosed as exc:
            conn.ended(exc.code, exc.reason)
        except Refused as exc:
            conn.log.info("connection %s refused by its handler: %s", conn.id, exc.reason)
            await self._close(conn, exc.close_code, exc.reason)
        except HookFailed as exc:
            conn.log.error("%s while serving connection %s; closing it", exc, conn.id, exc_info=exc.error)
            await self._close(conn, CloseCode.INTERNAL_ERROR, INTERNAL_ERROR)
        except asyncio.CancelledError:
            conn.ended(CloseCode.GOING_AWAY, "server shutting down")
            raise
        except Exception as exc:
            conn.log.error("serving %s connection %s at %s failed: %r", conn.transport, conn.id,
                           conn.request.path, exc, exc_info=exc)
            await self._close(conn, CloseCode.INTERNAL_ERROR, INTERNAL_ERROR)
        else:
            if not conn.is_ended:
                await self._close(conn, CloseCode.NORMAL, "")
        finally:
            await self.closed(conn)

    async def _run_handler(self, conn: Connection, handler: Handler) -> None:
        """Run a user's handler; if the connection ends under it, give it a grace period, then cancel it."""
        task = asyncio.ensure_future(handler(conn))
        ended = asyncio.ensure_future(conn.wait_ended())
        try:
            await asyncio.wait({task, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                done, _ = await asyncio.wait({task}, timeout=self._s.config.server.handler_grace)
                if not done:
                    conn.log.info("handler for %s did not return within server.handler_grace after connection "
                                  "%s ended; cancelling it", conn.request.path, conn.id)
                    task.cancel()
                    await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            ended.cancel()
        if not task.cancelled():
            task.result()  # the handler's own exception, if any, decides the close code

    async def _refuse(self, conn: Connection, status: int, code: str, reason: str) -> None:
        conn.state = ConnectionState.CLOSED
        try:
            await conn.refuse(status, code, reason)
        except Exception as exc:  # the client is gone already
            conn.log.debug("refusing connection %s failed: %r", conn.id, exc)

    async def _close(self, conn: Connection, code: int, reason: str) -> None:
        try:
            await conn.close(code, reason)
        except Exception as exc:
            conn.log.debug("closing connection %s failed: %r", conn.id, exc)
        conn.ended(code, reason)

    async def closed(self, conn: Connection) -> None:
        """Forget a connection that ended: uncount it, leave its rooms, fire the hook. Exactly once."""
        if not conn.is_ended:
            conn.ended(CloseCode.ABNORMAL, "connection lost")
        conn.state = ConnectionState.CLOSED
        if not self._admission.release(conn):
            return
        await self._membership.leave_all(conn)
        code, reason = conn.close_code or CloseCode.ABNORMAL, conn.close_reason
        conn.log.debug("connection %s closed (%s %s)", conn.id, code, reason)
        try:
            await self._s.plugins.acall("streaming_disconnected", connection=conn, code=code, reason=reason)
        except HookFailed as exc:
            conn.log.error("%s (connection %s)", exc, conn.id, exc_info=exc.error)
