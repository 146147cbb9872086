"""Admission: who may connect, how many, and the count of who is connected.

One job: decide whether a connection may open (the authenticate hook,
then the limits), count it while it is open, and uncount it exactly once.
The idle sweeper lives here too, since it reads the same table.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .config import LimitSettings
from .connection import CloseCode, Connection, ConnectionRequest, ConnectionState, Identity
from .errors import HookFailed, Refused
from .limits import TokenBucket
from .plugins import PluginManager

if TYPE_CHECKING:
    from .service import Streaming

log = logging.getLogger("forge_streaming")

DEVICE_PREFIX = "device:"
"""User ids of messages that entered through a backend (a device on the broker); no connection may have one."""


def _ip(conn: Connection) -> str:
    return conn.request.client[0] if conn.request.client else ""


class Admission:
    """The table of open connections and the limits on it."""

    def __init__(self, streaming: Streaming, plugins: PluginManager, limits: LimitSettings) -> None:
        self._streaming = streaming
        self._plugins = plugins
        self._limits = limits
        self.connections: dict[str, Connection] = {}
        self._per_ip: Counter[str] = Counter()
        self._per_user: Counter[str] = Counter()
        self._sweeper: asyncio.Future[None] | None = None

    @property
    def view(self) -> Mapping[str, Connection]:
        return self.connections

    async def authenticate(self, request: ConnectionRequest, *, accepting: bool) -> Identity | None:
        """The first identity a ``streaming_authenticate`` implementation returns, or None.

        Raises :class:`Refused` when a hook refuses, when the service is not
        accepting connections, or (500) when a hook fails.
        """
        if not accepting:
            raise Refused("server is not accepting connections", status=503, close_code=CloseCode.TRY_AGAIN_LATER,
                          code="unavailable")
        try:
            result = await self._plugins.first("streaming_authenticate", request=request, streaming=self._streaming)
        except HookFailed as exc:
            log.error("%s; refusing the %s connection to %s", exc, request.transport, request.path,
                      exc_info=exc.error)
            raise Refused("internal error", status=500, close_code=CloseCode.INTERNAL_ERROR,
                          code="internal_error") from exc
        if result is not None and not isinstance(result, Identity):
            log.error("streaming_authenticate returned %r, not an Identity or None; refusing the %s connection",
                      result, request.transport)
            raise Refused("internal error", status=500, close_code=CloseCode.INTERNAL_ERROR, code="internal_error")
        if result is not None and result.user_id.startswith(DEVICE_PREFIX):
            # messages that entered through the broker carry "device:..." user ids: no member may pose as one
            log.warning("refusing the %s connection: its identity %r is in the %r namespace, kept for devices",
                        request.transport, result.user_id[:80], DEVICE_PREFIX)
            raise Refused(f"user ids starting with {DEVICE_PREFIX!r} are kept for devices", status=403,
                          code="reserved_user_id")
        return result

    def admit(self, conn: Connection) -> None:
        """Count an authenticated connection as open; raise Refused past a limit."""
        limits = self._limits
        ip = _ip(conn)
        if len(self.connections) >= limits.max_connections:
            raise Refused(f"server is full ({limits.max_connections} connections)", status=503,
                          close_code=CloseCode.TRY_AGAIN_LATER, code="server_full")
        if limits.max_connections_per_ip and self._per_ip[ip] >= limits.max_connections_per_ip:
            raise Refused(f"too many connections from {ip}", status=429, close_code=CloseCode.POLICY_VIOLATION,
                          code="too_many_connections")
        if limits.max_connections_per_user and self._per_user[conn.user_id] >= limits.max_connections_per_user:
            raise Refused(f"too many connections for user {conn.user_id!r}", status=429,
                          close_code=CloseCode.POLICY_VIOLATION, code="too_many_connections")
        if limits.messages_per_second:
            conn.rate_limit = TokenBucket(limits.messages_per_second, limits.message_burst)
        self.connections[conn.id] = conn
        self._per_ip[ip] += 1
        self._per_user[conn.user_id] += 1
        conn.state = ConnectionState.OPEN
        conn.log.debug("connection %s open from %s as %s", conn.id, ip, conn.user_id)

    def release(self, conn: Connection) -> bool:
        """Uncount ``conn``; False if it was not counted (never admitted, or released already)."""
        if self.connections.pop(conn.id, None) is None:
            return False
        for counter, key in ((self._per_ip, _ip(conn)), (self._per_user, conn.user_id)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]
        return True

    # -- idle connections ---------------------------------------------------------

    def start_sweeper(self) -> None:
        if self._limits.idle_timeout:
            self._sweeper = asyncio.ensure_future(self._sweep_idle(self._limits.idle_timeout))

    def stop_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _sweep_idle(self, timeout: float) -> None:
        """Close connections that sent nothing for ``limits.idle_timeout``; one task for all."""
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            cutoff = time.monotonic() - timeout
            for conn in [c for c in self.connections.values() if c.last_activity < cutoff]:
                self._streaming._dropped(conn, "idle timeout")  # noqa: SLF001
                self._streaming._background(conn.close(CloseCode.GOING_AWAY, "idle timeout"))  # noqa: SLF001
