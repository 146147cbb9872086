"""MQTT pub/sub backend and room store for forge-streaming: a cluster of nodes behind one broker."""

from .pubsub import MqttPubSub
from .rooms import MqttRoomStore
from .settings import MqttSettings

__all__ = ["MqttPubSub", "MqttRoomStore", "MqttSettings"]
