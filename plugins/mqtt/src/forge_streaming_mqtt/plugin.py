"""The hook implementations: backend ``mqtt``, room store ``mqtt``, config section ``pubsub.mqtt``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from forge_streaming import ConfigSection, PubSubBackend, RoomStore, StreamingConfig, hookimpl

from . import pubsub, rooms
from .settings import SECTION, MqttSettings


@hookimpl
def streaming_config_sections() -> Mapping[str, type[ConfigSection]]:
    return {SECTION: MqttSettings}


@hookimpl
def streaming_register_pubsub_backends() -> Mapping[str, Callable[[StreamingConfig], PubSubBackend]]:
    return pubsub.factories()


@hookimpl
def streaming_register_room_stores() -> Mapping[str, Callable[[StreamingConfig], RoomStore]]:
    return rooms.factories()

