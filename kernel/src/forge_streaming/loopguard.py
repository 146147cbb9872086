"""Keep the event loop's error log readable when the same error repeats fast.

When a server runs out of file descriptors, asyncio logs every failed
``accept()`` with a traceback: gigabytes of log in minutes. The guard lets
the first report of each kind through, then one line every ``interval``
seconds saying how many were held back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("forge_streaming.loop")


class ThrottledExceptionHandler:
    """A loop exception handler: full report once per kind and interval, a count otherwise."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        kind = f"{context.get('message', '')}|{type(exc).__name__ if exc else ''}"
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval) < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        if held:
            log.error("%d more like the next one in the last %.0f s were not logged", held, self.interval)
        loop.default_exception_handler(context)


def install(loop: asyncio.AbstractEventLoop, interval: float = 10.0) -> None:
    """Throttle the loop's error reports, unless the application set its own handler."""
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(ThrottledExceptionHandler(interval))
