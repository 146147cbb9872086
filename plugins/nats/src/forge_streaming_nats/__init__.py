"""NATS JetStream pub/sub backend and room store for forge-streaming: engine-ordered, durable room history.

The backend and the store (and nats-py with them) are imported on first use
of their names, so that loading the plugin costs a service that does not
use NATS nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .settings import NatsSettings

if TYPE_CHECKING:
    from .pubsub import NatsPubSub
    from .rooms import NatsRoomStore

__all__ = ["NatsPubSub", "NatsRoomStore", "NatsSettings"]


def __getattr__(name: str) -> Any:
    if name == "NatsPubSub":
        from .pubsub import NatsPubSub

        return NatsPubSub
    if name == "NatsRoomStore":
        from .rooms import NatsRoomStore

        return NatsRoomStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
