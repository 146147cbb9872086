"""One NATS connection that stays up, and says when it comes back.

nats-py reconnects by itself once connected (and resends core
subscriptions), but it gives up on a first connection that fails. This
wraps both: the first connect is retried in the background while the node
runs degraded, and every (re)connection runs the owner's ``on_up`` (create
the stream, recreate the consumer, check for holes), serialised so that two
quick reconnects never run it twice at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from forge_streaming import BackendHealth, BackendState
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.manager import JetStreamManager

from .settings import NatsSettings

log = logging.getLogger("forge_streaming.nats")

UpHandler = Callable[[], Awaitable[None]]


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"
    STOPPED = "stopped"


def _tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    if not settings.uses_tls:
        return None
    context = ssl.create_default_context(cafile=settings.ca_file)
    if settings.cert_file is not None and settings.key_file is not None:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


class NatsLink:
    """A NATS connection with its JetStream context; ``on_up`` after every (re)connect, ``on_down`` when lost."""

    def __init__(self, settings: NatsSettings, *, name: str, on_up: UpHandler,
                 on_down: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.name = name
        self._fresh_client()
        self.state = LinkState.CONNECTING
        self.connects = 0
        self.last_error = ""
        self._on_up = on_up
        self._on_down = on_down
        self._ready = False  # connected and on_up finished
        self._first: asyncio.Task[None] | None = None
        self._up_task: asyncio.Task[None] | None = None
        self._up_again = False
        self._stopping = False
        self._logged_at = -math.inf

    def _fresh_client(self) -> None:
        self.nc = Client()
        self.js: JetStreamContext = self.nc.jetstream(timeout=self.settings.ack_timeout)
        self.jsm: JetStreamManager = self.nc.jsm(timeout=self.settings.ack_timeout)

    @property
    def ready(self) -> bool:
        """Connected, and the owner's ``on_up`` has finished for this connection."""
        return self._ready and self.nc.is_connected

    async def start(self) -> None:
        """Connect within ``connect_timeout``; past it, keep trying in the background (the node starts degraded)."""
        self._first = asyncio.create_task(self._connect_forever(), name=f"forge-nats-connect-{self.name}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._first), self.settings.connect_timeout)
        if not self.ready:
            log.warning("NATS %s: not connected to %s within %.1fs (%s); starting degraded, retrying",
                        self.name, ", ".join(self.settings.servers), self.settings.connect_timeout,
                        self.last_error or "no answer")

    async def _connect_forever(self) -> None:
        delay = self.settings.reconnect_wait
        while not self._stopping:
            try:
                await self.nc.connect(**self._options())
            except Exception as exc:  # no server reachable, refused credentials, TLS: keep trying, say why
                self.state = LinkState.DOWN
                self.last_error = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(Exception):
                    await self.nc.close()
                self._fresh_client()  # nats-py's client is not reusable after a failed first connect
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            await self._run_up()
            if self._up_task is not None:
                await asyncio.shield(self._up_task)  # start() waits for the set-up too, not only the socket
            return

    def _options(self) -> dict[str, Any]:
        s = self.settings
        options: dict[str, Any] = {
            "servers": list(s.servers), "name": self.name, "connect_timeout": max(1, round(s.connect_timeout)),
            "reconnect_time_wait": s.reconnect_wait, "max_reconnect_attempts": -1,
            "ping_interval": s.ping_interval, "max_outstanding_pings": 2, "allow_reconnect": True,
            "error_cb": self._error, "disconnected_cb": self._disconnected, "reconnected_cb": self._reconnected,
            "closed_cb": self._closed,
        }
        if s.user is not None:
            options.update(user=s.user, password=s.password)
        if s.token is not None:
            options["token"] = s.token
        if s.creds_file is not None:
            options["user_credentials"] = s.creds_file
        context = _tls_context(s)
        if context is not None:
            options["tls"] = context
        return options

    async def _run_up(self) -> None:
        """Run ``on_up`` for the current connection; a reconnect during it runs it once more afterwards."""
        if self._up_task is not None and not self._up_task.done():
            self._up_again = True
            return
        self._up_task = asyncio.create_task(self._up_loop(), name=f"forge-nats-up-{self.name}")

    async def _up_loop(self) -> None:
        while not self._stopping:
            self._up_again = False
            self._ready = False
            if not self.nc.is_connected:
                return  # the reconnected callback runs us again
            try:
                await self._on_up()
            except Exception as exc:  # JetStream not ready yet (cluster electing a leader), stream refused, ...
                error = f"{type(exc).__name__}: {exc}"
                now = time.monotonic()
                if error != self.last_error or now - self._logged_at > 30:  # the first time, then every 30 s
                    log.warning("NATS %s: setting up after connecting failed (%s); retrying", self.name, error)
                    self._logged_at = now
                self.last_error = error
                await asyncio.sleep(self.settings.reconnect_wait)
                continue
            if self._up_again:
                continue
            self.connects += 1
            self.state = LinkState.UP
            self._ready = True
            self.last_error = ""
            return

    async def _error(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.debug("NATS %s: %s", self.name, self.last_error)

    async def _disconnected(self) -> None:
        if self._stopping:
            return
        self._ready = False
        if self.state is LinkState.UP:
            log.warning("NATS %s: connection lost; reconnecting", self.name)
        self.state = LinkState.CONNECTING
        if self._on_down is not None:
            self._on_down()

    async def _reconnected(self) -> None:
        url = self.nc.connected_url
        log.info("NATS %s: reconnected to %s", self.name, url.netloc if url is not None else "?")
        await self._run_up()

    async def _closed(self) -> None:
        if not self._stopping:
            self.state = LinkState.DOWN

    def health(self) -> BackendHealth:
        if self.state is LinkState.UP and self.ready:
            url = self.nc.connected_url
            return BackendHealth(BackendState.UP, f"connected to {url.netloc if url is not None else '?'}")
        if self.nc.is_connected:  # connected, but setting up (again) has not finished: JetStream, the stream
            url = self.nc.connected_url
            doing = f"setting up failed: {self.last_error}" if self.last_error else "setting up"
            return BackendHealth(BackendState.CONNECTING,
                                 f"connected to {url.netloc if url is not None else '?'}, {doing}")
        why = f" ({self.last_error})" if self.last_error else ""
        return BackendHealth(BackendState.DOWN if self.state is LinkState.DOWN else BackendState.CONNECTING,
                             f"not connected to {', '.join(self.settings.servers)}{why}")

    async def stop(self) -> None:
        self._stopping = True
        self.state = LinkState.STOPPED
        self._ready = False
        for task in (self._first, self._up_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self.nc.is_connected or self.nc.is_reconnecting or self.nc.is_connecting:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)


__all__ = ["LinkState", "NatsLink", "nats"]
