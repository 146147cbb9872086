"""Hot-path writing for transports that own an asyncio transport.

Fan-out calls :meth:`BufferedWriter.write` once per recipient. The bytes
are not written at once: every writer touched in one event-loop iteration
is flushed by a single callback at the end of it, so a burst of M messages
to a member becomes one ``transport.write()`` (one syscall) instead of M.
No task is created per delivery. The bytes waiting here plus those the
transport holds are the connection's unsent data; past ``limit`` the
writer calls ``on_overflow`` once and accepts nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol


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
    """

    __slots__ = ("_dirty", "_scheduled", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._dirty: list[Flushable] = []
        self._scheduled = False

    def mark(self, writer: Flushable) -> None:
        self._dirty.append(writer)
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(self.flush_all)

    def flush_all(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for writer in dirty:
            writer.flush()


class BufferedWriter:
    """Bounded, coalescing writes to one connection's transport."""

    __slots__ = ("_target", "_limit", "_scheduler", "_on_overflow", "_pending", "_pending_size", "closed", "_join")

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
        self.closed = False

    @property
    def unsent(self) -> int:
        """Bytes accepted but not yet handed to the socket."""
        return self._pending_size + self._target.get_write_buffer_size()

    def write(self, data: bytes) -> bool:
        """Queue ``data`` for the end of this loop iteration; False once closed."""
        if self.closed:
            return False
        if not self._pending:
            self._scheduler.mark(self)
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self._limit:
            self._overflow()
            return False
        return True

    def flush(self) -> None:
        """Write everything pending in one call to the transport."""
        if not self._pending or self.closed:
            return
        pending = self._pending
        if self._join is not None:
            data = self._join(pending, self._pending_size)
        else:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        self._pending_size = 0
        if self._target.is_closing():
            return
        self._target.write(data)
        if self._target.get_write_buffer_size() > self._limit:
            self._overflow()

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
