"""The kernel's contract kits, run against the NATS backend and room store on a real nats-server."""

from __future__ import annotations

from typing import Any

import pytest
from forge_streaming.testing import PubSubBackendContract, RoomStoreContract
from forge_streaming_nats import NatsPubSub, NatsRoomStore, NatsSettings


@pytest.fixture(autouse=True)
def _server_url(request: pytest.FixtureRequest, nats_server: Any) -> None:
    request.instance.url = nats_server.url


class TestNatsBackend(PubSubBackendContract):
    multi_node = True
    url: str

    def make_backend(self) -> NatsPubSub:
        return NatsPubSub(NatsSettings(servers=(self.url,), stream="CONTRACT", subject_prefix="contract",
                                       storage="memory", heartbeat=0.5))


class TestNatsBackendWildcard(PubSubBackendContract):
    multi_node = True
    url: str

    def make_backend(self) -> NatsPubSub:
        return NatsPubSub(NatsSettings(servers=(self.url,), stream="CONTRACT_WILD", subject_prefix="contract-wild",
                                       storage="memory", heartbeat=0.5, subscribe_mode="wildcard"))


class TestNatsRoomStore(RoomStoreContract):
    multi_node = True
    url: str

    def make_store(self) -> NatsRoomStore:
        return NatsRoomStore(NatsSettings(servers=(self.url,), presence_bucket="CONTRACT_PRESENCE", storage="memory",
                                          presence_ttl=2, heartbeat=0.5))
