"""MQTT pub/sub backend and room store for forge-streaming: a cluster of nodes behind one broker.

The backend and the store (and aiomqtt and paho-mqtt with them) are imported
on first use of their names, so that loading the plugin costs a service that
does not use MQTT nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .settings import MqttSettings

if TYPE_CHECKING:
    from .pubsub import MqttPubSub
    from .rooms import MqttRoomStore

__all__ = ["MqttPubSub", "MqttRoomStore", "MqttSettings"]


def __getattr__(name: str) -> Any:
    if name == "MqttPubSub":
        from .pubsub import MqttPubSub

        return MqttPubSub
    if name == "MqttRoomStore":
        from .rooms import MqttRoomStore

        return MqttRoomStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
