"""Hot-path writing for transports that own an asyncio transport.

Fan-out calls :meth:`BufferedWriter.write` once per recipient. The bytes
are not written at once: every writer touched in one event-loop iteration
is flushed by a single callback at the end of it, so a burst of M messages
to a member becomes one ``transport.write()`` (one syscall) instead of M.
No task is created per delivery. The bytes waiting here plus those the
transport holds are the connection's unsent data; past ``limit`` *on top of
one message* (the largest one written since the unsent data last fitted in
``limit``) the writer calls ``on_overflow`` once and accepts nothing more. So
a single message up to ``limits.max_message_size`` is never the reason a
connection is dropped, while a reader that stays behind still is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

DRAIN_POLL = 0.005
"""Seconds between looks at the unsent bytes while :meth:`BufferedWriter.drained` has no wake-up to wait on."""


class WriteTarget(Protocol):
    """What a writer writes to: an asyncio transport, or an adapter of one."""

    def write(self, data: bytes) -> None: ...

    def get_write_buffer_size(self) -> int: ...

    def is_closing(self) -> bool: ...


class Flushable(Protocol):
    """Anything that writes what it gathered in one go: a :class:`BufferedWriter`, a QUIC connection."""

    def flush(self) -> None: ...


class FlushScheduler:
    """Flushes everything marked during one loop iteration, once, at its end.

    A writer marks itself when it gets its first pending bytes; a transport
    with its own send path (a QUIC connection) marks itself when it has
    packets to send. Either is flushed once, however many deliveries came.

    With a ``window`` (seconds, > 0) the flush is not at the end of the loop
    iteration but ``window`` seconds after the first mark since the last
    flush: one ``call_later`` timer for every writer marked meanwhile, never
    one per connection. Paced traffic (a message every few ms) then leaves
    in one write per member per window instead of one per message, and no
    byte waits longer than ``window`` (plus the loop's own lag). Default 0:
    the end of the loop iteration, as before.
    """

    __slots__ = ("_dirty", "_scheduled", "_loop", "window")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, *, window: float = 0.0) -> None:
        if window < 0:
            raise ValueError(f"flush window must be >= 0 seconds, got {window!r}")
        self._loop = loop
        self._dirty: list[Flushable] = []
        self._scheduled = False
        self.window = window

    def mark(self, writer: Flushable) -> None:
        self._dirty.append(writer)
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            if self.window:
                loop.call_later(self.window, self.flush_all)
            else:
                loop.call_soon(self.flush_all)

    def flush_all(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for writer in dirty:
            writer.flush()


class BufferedWriter:
    """Bounded, coalescing writes to one connection's transport."""

    __slots__ = ("_target", "_limit", "_scheduler", "_on_overflow", "_pending", "_pending_size", "closed", "_join",
                 "_allowance")

    def __init__(
        self,
        target: WriteTarget,
        *,
        limit: int,
        scheduler: FlushScheduler,
        on_overflow: Callable[[int], None],
        join: Callable[[list[bytes], int], bytes] | None = None,
    ) -> None:
        """``join(pending, size)``, if given, makes the one write of a flush from the pending
        pieces (it may consume the list), e.g. to frame them as one unit of the wire protocol."""
        self._target = target
        self._limit = limit
        self._scheduler = scheduler
        self._on_overflow = on_overflow
        self._join = join
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._allowance = 0  # the one message allowed on top of ``limit`` (0 while the unsent data fits)
        self.closed = False

    @property
    def unsent(self) -> int:
        """Bytes accepted but not yet handed to the socket."""
        return self._pending_size + self._target.get_write_buffer_size()

    def write(self, data: bytes) -> bool:
        """Queue ``data`` for the scheduler's next flush (end of this loop turn, or its window); False once closed."""
        if self.closed:
            return False
        if not self._pending:
            self._scheduler.mark(self)
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self._limit:
            return self._behind(len(data))
        return True

    def _behind(self, size: int) -> bool:
        """The pending bytes passed ``limit`` (rare): allow one message on top of it, the largest pending."""
        if self._pending_size - size <= self._limit:  # just crossed: look at every pending piece once
            biggest = max(map(len, self._pending))
        else:
            biggest = size
        if biggest > self._allowance:
            self._allowance = biggest
        if self._pending_size > self._limit + self._allowance:
            self._overflow()
            return False
        return True

    def flush(self) -> None:
        """Write everything pending in one call to the transport."""
        if not self._pending or self.closed:
            return
        pending = self._pending
        size = self._pending_size
        self._pending = []
        self._pending_size = 0
        target = self._target
        if target.is_closing():
            return
        check = size + target.get_write_buffer_size() > self._limit
        if check:  # the unsent data will not fit in the bound: one message on top of it is allowed
            biggest = max(map(len, pending))
            if biggest > self._allowance:
                self._allowance = biggest
        elif self._allowance:
            self._allowance = 0
        if self._join is not None:
            data = self._join(pending, size)
        else:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
        target.write(data)
        if check and target.get_write_buffer_size() > self._limit + self._allowance:
            self._overflow()

    async def drained(self, below: int, wait: Callable[[], Awaitable[object]] | None = None) -> None:
        """Return once at most ``below`` bytes are unsent, or the writer is closed.

        What is pending is written first. ``wait`` waits until the target
        takes more (e.g. an asyncio protocol's ``resume_writing``); the writer
        looks again after it, and every :data:`DRAIN_POLL` seconds when the
        target is not paused yet holds more than ``below``. Not the hot path:
        a replay calls it between messages so that it goes as fast as the
        client reads.
        """
        if self.closed or self._pending_size + self._target.get_write_buffer_size() <= below:
            return
        self.flush()
        while not self.closed and not self._target.is_closing() and self.unsent > below:
            if wait is not None:
                await wait()
                if self.closed or self.unsent <= below:
                    return
            await asyncio.sleep(DRAIN_POLL)

    def _overflow(self) -> None:
        unsent = self.unsent
        self.closed = True
        self._pending = []
        self._pending_size = 0
        self._on_overflow(unsent)

    def discard(self) -> None:
        """Stop accepting data and drop what is pending (the connection is gone)."""
        self.closed = True
        self._pending = []
        self._pending_size = 0
