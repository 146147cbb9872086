"""Hand a core NATS subscription's messages over as nats-py reads them: in arrival order, no task per message.

nats-py runs one task per subscription that has a callback, and each takes
its messages from its own queue. With one subscription per room, a burst
then reaches the kernel room by room (each task drains its queue before the
next runs) instead of in the order the server sent it; and every message
costs a task switch. So the live subscriptions have no callback, and their
pending queue is replaced by one whose ``put_nowait`` (what nats-py's read
loop calls for each message) calls the handler at once, as the MQTT
backend does with aiomqtt's queue.

This uses two private attributes of nats-py's ``Subscription``
(``_pending_queue`` and ``_pending_size``); the plugin pins nats-py to the
minor version checked, and ``tests/test_nats_third_party.py`` names them.
The subscription is made with ``pending_bytes_limit=0``: nothing is ever
pending, so nats-py's slow-consumer check has nothing to count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger("forge_streaming.nats")


class DispatchQueue(asyncio.Queue[Msg]):
    """Stands in a subscription's pending queue: each message goes to the handler as it is put."""

    def __init__(self, sub: Subscription, handler: Callable[[Msg], None]) -> None:
        super().__init__()
        self._sub = sub
        self._handler = handler

    def put_nowait(self, item: Msg) -> None:
        self._sub._pending_size = 0  # counted up by nats-py per message; nothing waits here
        try:
            self._handler(item)
        except Exception:  # a bad message must never break nats-py's read loop
            log.exception("NATS: handling a message on %r failed", item.subject)


def dispatch(sub: Subscription, handler: Callable[[Msg], None]) -> Subscription:
    """Make ``sub`` (subscribed without a callback) hand every message to ``handler`` as it arrives."""
    waiting = sub._pending_queue
    sub._pending_queue = DispatchQueue(sub, handler)
    while not waiting.empty():  # arrived between the SUB and now
        handler(waiting.get_nowait())
    return sub
