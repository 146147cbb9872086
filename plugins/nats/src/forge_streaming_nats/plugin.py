"""The hook implementations: backend ``nats``, room store ``nats``, config section ``pubsub.nats``.

nats-py and the backend are imported when a service builds one, not when
the plugin loads: every ``Streaming()`` loads every installed plugin, and
most do not use NATS (it would add about 35 ms to every start).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from forge_streaming import ConfigSection, PubSubBackend, RoomStore, StreamingConfig, hookimpl

from .settings import SECTION, NatsSettings


def _backend(config: StreamingConfig) -> PubSubBackend:
    from .pubsub import NatsPubSub

    return NatsPubSub.from_config(config)


def _store(config: StreamingConfig) -> RoomStore:
    from .rooms import NatsRoomStore

    return NatsRoomStore.from_config(config)


@hookimpl
def streaming_config_sections() -> Mapping[str, type[ConfigSection]]:
    return {SECTION: NatsSettings}


@hookimpl
def streaming_register_pubsub_backends() -> Mapping[str, Callable[[StreamingConfig], PubSubBackend]]:
    return {"nats": _backend}


@hookimpl
def streaming_register_room_stores() -> Mapping[str, Callable[[StreamingConfig], RoomStore]]:
    return {"nats": _store}
