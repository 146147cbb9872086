"""The kernel's contract kits, run against the MQTT backend and room store on a real broker."""

from __future__ import annotations

from typing import Any

import pytest
from forge_streaming.testing import PubSubBackendContract, RoomStoreContract
from forge_streaming_mqtt import MqttPubSub, MqttRoomStore, MqttSettings


@pytest.fixture(autouse=True)
def _broker_url(request: pytest.FixtureRequest, broker: Any) -> None:
    request.instance.url = broker.url


class TestMqttBackend(PubSubBackendContract):
    url: str

    def make_backend(self) -> MqttPubSub:
        return MqttPubSub(MqttSettings(url=self.url, topic_prefix="contract"))


class TestMqttBackendWildcard(PubSubBackendContract):
    url: str

    def make_backend(self) -> MqttPubSub:
        return MqttPubSub(MqttSettings(url=self.url, topic_prefix="contract-wild", subscribe_mode="wildcard"))


class TestMqttRoomStore(RoomStoreContract):
    url: str

    def make_store(self) -> MqttRoomStore:
        return MqttRoomStore(MqttSettings(url=self.url, topic_prefix="contract-rooms"))
