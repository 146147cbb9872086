"""The hook implementations: backend ``mqtt``, room store ``mqtt``, config section ``pubsub.mqtt``.

aiomqtt, paho-mqtt and the backend are imported when a service builds one,
not when the plugin loads: every ``Streaming()`` loads every installed
plugin, and most do not use MQTT (it would add about 30 ms to every start).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from forge_streaming import ConfigSection, PubSubBackend, RoomStore, StreamingConfig, hookimpl

from .settings import SECTION, MqttSettings


def _backend(config: StreamingConfig) -> PubSubBackend:
    from .pubsub import MqttPubSub

    return MqttPubSub.from_config(config)


def _store(config: StreamingConfig) -> RoomStore:
    from .rooms import MqttRoomStore

    return MqttRoomStore.from_config(config)


@hookimpl
def streaming_config_sections() -> Mapping[str, type[ConfigSection]]:
    return {SECTION: MqttSettings}


@hookimpl
def streaming_register_pubsub_backends() -> Mapping[str, Callable[[StreamingConfig], PubSubBackend]]:
    return {"mqtt": _backend}


@hookimpl
def streaming_register_room_stores() -> Mapping[str, Callable[[StreamingConfig], RoomStore]]:
    return {"mqtt": _store}
