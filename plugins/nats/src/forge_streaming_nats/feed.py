"""The room store's push consumer of its key-value bucket: in stream order, gaps noticed.

nats-py's ordered consumer recreates itself silently when it notices a
gap. The room store must know when it may have missed a change (it then
reads the whole bucket again and tells the kernel what changed unseen), so
this module runs the consumer itself, on nats-py's public API: an ephemeral
push consumer (no acks, flow control, idle heartbeats, in memory)
delivering to an inbox of our own. It reports

- every message, with its stream sequence and the consumer's pending count,
  to ``on_message`` (synchronously, from the subscription's callback);
- a broken consumer to ``on_broken``: a consumer sequence that skips
  (the client dropped messages for a slow callback), a heartbeat that says
  more was sent than we got, or silence past three heartbeats. The owner
  opens it again (:meth:`Feed.open`).

It answers flow-control requests and stall notices as it reads, which
is what keeps a push consumer flowing. (Room messages do not go through it:
the stream republishes them to core NATS, see pubsub.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from .link import NatsLink

log = logging.getLogger("forge_streaming.nats")

MessageHandler = Callable[[Msg, int, int], None]  # (message, stream sequence, pending)


def ack_numbers(reply: str) -> tuple[int, int, int] | None:
    """``(stream sequence, consumer sequence, pending)`` from a JetStream delivery's reply subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (9 tokens), or the
    form with a domain and account hash in front (12 or more tokens).
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        offset = 0
    elif len(tokens) >= 12:
        offset = 2
    else:
        return None
    try:
        return int(tokens[5 + offset]), int(tokens[6 + offset]), int(tokens[8 + offset])
    except ValueError:
        return None


class Feed:
    """One ephemeral push consumer of ``stream`` filtered on ``subject``, recreated by its owner when broken."""

    def __init__(self, link: NatsLink, stream: str, subject: str, *, on_message: MessageHandler,
                 on_broken: Callable[[str], None], heartbeat: float, max_pending: int) -> None:
        self._link = link
        self.stream = stream
        self.subject = subject
        self._on_message = on_message
        self._on_broken = on_broken
        self._heartbeat = heartbeat
        self._max_pending = max_pending
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._generation = 0
        self._cseq = 0  # the consumer sequence of the last message handled
        self._last_activity = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self.open_ = False
        self.pending = 0
        """Messages the server still has to deliver to this consumer (the lag), as of the last one read."""

    async def open(self, *, start: int | None = None, last_per_subject: bool = False) -> api.ConsumerInfo:
        """(Re)create the consumer: from stream sequence ``start``, or each subject's last message."""
        await self.close()
        self._generation += 1
        generation = self._generation
        self._cseq = 0  # before subscribing: the new consumer's first message may arrive before add_consumer returns
        self._last_activity = time.monotonic()  # not the silence of the outage that made us recreate it
        self.open_ = True
        nc = self._link.nc
        inbox = nc.new_inbox()

        async def deliver(msg: Msg) -> None:
            if generation == self._generation:
                self._handle(msg)

        self._sub = await nc.subscribe(inbox, cb=deliver, pending_msgs_limit=self._max_pending,
                                       pending_bytes_limit=max(64 << 20, self._max_pending * 1024))
        policy = api.DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else api.DeliverPolicy.BY_START_SEQUENCE
        config = api.ConsumerConfig(
            deliver_subject=inbox, ack_policy=api.AckPolicy.NONE, flow_control=True,
            idle_heartbeat=self._heartbeat, filter_subject=self.subject, mem_storage=True, num_replicas=1,
            inactive_threshold=max(30.0, 10 * self._heartbeat), max_deliver=1,
            deliver_policy=policy,
            opt_start_seq=None if last_per_subject else max(1, start or 1),
        )
        try:
            info = await self._link.jsm.add_consumer(self.stream, config=config)
        except BaseException:
            self.open_ = False
            await self._unsubscribe()
            raise
        if generation != self._generation:  # broken or closed while it was being created
            raise ConnectionError(f"the consumer of {self.stream} broke while it was being created")
        self._consumer = info.name
        if self._cseq == 0:
            self.pending = info.num_pending or 0
        self._last_activity = time.monotonic()
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch(), name=f"forge-nats-feed-{self.stream}")
        return info

    def _handle(self, msg: Msg) -> None:
        self._last_activity = time.monotonic()
        headers = msg.headers
        if headers is not None and headers.get("Status") is not None and not msg.data:
            self._control(msg, headers)
            return
        numbers = ack_numbers(msg.reply) if msg.reply else None
        if numbers is None:
            return  # not a JetStream delivery: someone published into our inbox
        sseq, cseq, pending = numbers
        if cseq != self._cseq + 1:
            if cseq <= self._cseq:
                return  # redelivered (cannot happen with max_deliver 1, but never twice to the kernel)
            self._broken(f"consumer skipped from {self._cseq} to {cseq}")
            return
        self._cseq = cseq
        self.pending = pending
        self._on_message(msg, sseq, pending)

    def _control(self, msg: Msg, headers: dict[str, str]) -> None:
        """An idle heartbeat or a flow-control request (status 100)."""
        if msg.reply:  # flow control: everything before it has been handled, answer now
            self._respond(msg.reply)
        stalled = headers.get("Nats-Consumer-Stalled")
        if stalled:
            self._respond(stalled)
        last = headers.get("Nats-Last-Consumer")
        if last is not None and last.isdigit() and int(last) > self._cseq:
            self._broken(f"heartbeat says {last} messages were sent, {self._cseq} arrived")

    def _respond(self, subject: str) -> None:
        asyncio.ensure_future(self._publish_quietly(subject))

    async def _publish_quietly(self, subject: str) -> None:
        with contextlib.suppress(Exception):
            await self._link.nc.publish(subject, b"")

    def _broken(self, why: str) -> None:
        if not self.open_:
            return
        self.open_ = False
        self._generation += 1  # nothing more from this consumer reaches the owner
        log.info("NATS feed of %s: %s; recreating the consumer", self.stream, why)
        self._on_broken(why)

    async def _watch(self) -> None:
        """Silence past three heartbeats while connected: the consumer is gone (server restarted, stream deleted)."""
        while True:
            await asyncio.sleep(self._heartbeat)
            if self.open_ and self._link.nc.is_connected and \
                    time.monotonic() - self._last_activity > 3 * self._heartbeat:
                self._broken(f"no heartbeat for {3 * self._heartbeat:.1f}s")

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def close(self) -> None:
        """Stop reading and delete the consumer (best effort: an ephemeral one goes away by itself anyway)."""
        self.open_ = False
        self._generation += 1
        await self._unsubscribe()
        consumer, self._consumer = self._consumer, None
        if consumer is not None and self._link.nc.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._link.jsm.delete_consumer(self.stream, consumer), 1.0)

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(BaseException):
                await self._watchdog
            self._watchdog = None
        await self.close()
