"""Every lifecycle, connection, room and message hook fires when documented, once."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pytest
from forge_streaming import (
    ClientFrame,
    ConfigError,
    ConfigSection,
    Connection,
    ConnectionRequest,
    Duration,
    Envelope,
    Handler,
    Identity,
    PubSubBackend,
    Refused,
    RoomStore,
    Streaming,
    StreamingConfig,
    Transport,
    hookimpl,
)
from forge_streaming.testing import open_connection
from forge_streaming_memory import MemoryPubSub, MemoryRoomStore
from starlette.routing import BaseRoute


class RecorderSettings(ConfigSection):
    greeting: str = "hello"
    every: Duration = 1.0


class NullTransport(Transport):
    name = "null"
    default_path = "/null"
    started = False

    def routes(self, endpoints: Mapping[str, Handler | None]) -> list[BaseRoute]:
        return []

    async def start(self) -> None:
        NullTransport.started = True


class Recorder:
    """Implements every hook and writes down what fired."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    @hookimpl
    def streaming_config_sections(self) -> dict[str, type[ConfigSection]]:
        return {"recorder": RecorderSettings}

    @hookimpl
    def streaming_configure(self, config: StreamingConfig) -> None:
        self.calls.append(("configure", config.section("recorder", RecorderSettings).greeting))

    @hookimpl
    def streaming_register_transports(self) -> Sequence[type[Transport]]:
        return [NullTransport]

    @hookimpl
    def streaming_register_pubsub_backends(self) -> dict[str, Callable[[StreamingConfig], PubSubBackend]]:
        return {"recorded": lambda config: MemoryPubSub()}

    @hookimpl
    def streaming_register_room_stores(self) -> dict[str, Callable[[StreamingConfig], RoomStore]]:
        return {"recorded": lambda config: MemoryRoomStore()}

    @hookimpl
    async def streaming_startup(self, streaming: Streaming) -> None:
        self.calls.append(("startup", streaming.state.value))

    @hookimpl
    async def streaming_shutdown(self, streaming: Streaming) -> None:
        self.calls.append(("shutdown", None))

    @hookimpl
    def streaming_connected(self, connection: Connection) -> None:
        self.calls.append(("connected", connection.id))

    @hookimpl
    def streaming_disconnected(self, connection: Connection, code: int, reason: str) -> None:
        self.calls.append(("disconnected", (connection.id, code, reason)))

    @hookimpl
    def streaming_room_joined(self, connection: Connection, room: str) -> None:
        self.calls.append(("joined", room))

    @hookimpl
    def streaming_room_left(self, connection: Connection, room: str) -> None:
        self.calls.append(("left", room))

    @hookimpl
    async def streaming_message_received(self, connection: Connection, frame: ClientFrame) -> bool | None:
        self.calls.append(("received", frame.type))
        if frame.data == "secret":
            return False
        return None

    @hookimpl
    def streaming_delivered(self, envelope: Envelope, recipients: int) -> None:
        self.calls.append(("delivered", recipients))

    @hookimpl
    def streaming_connection_dropped(self, connection: Connection, reason: str) -> None:
        self.calls.append(("dropped", reason))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


async def test_every_hook_fires_in_order() -> None:
    recorder = Recorder()
    config = {"recorder": {"greeting": "hi", "every": "2s"}, "pubsub": {"backend": "recorded"},
              "rooms": {"store": "recorded"}}
    streaming = Streaming(config, plugins=[recorder])
    assert streaming.config.section("recorder", RecorderSettings).every == 2.0
    assert isinstance(streaming.backend, PubSubBackend) and isinstance(streaming.store, RoomStore)
    assert "null" in streaming.transports
    async with streaming.running():
        assert NullTransport.started
        a, b = await open_connection(streaming), await open_connection(streaming)
        await a.join_room("r")
        await b.join_room("r")
        await streaming.room_protocol_frame(a, '{"type":"message","room_id":"r","data":"x"}')
        await streaming.room_protocol_frame(a, '{"type":"message","room_id":"r","data":"secret"}')
        b.drop("slow consumer")
        await b.close(1008, "slow consumer")
    names = recorder.names()
    assert recorder.calls[0] == ("configure", "hi")
    assert ("startup", "running") in recorder.calls
    assert names.count("connected") == 2
    assert names.count("received") == 2, "a dropped frame is still seen by the hook"
    delivered = [n for name, n in recorder.calls if name == "delivered"]
    assert 1 in delivered, "the message reached b only"
    assert ("dropped", "slow consumer") in recorder.calls
    assert ("disconnected", (b.id, 1008, "slow consumer")) in recorder.calls
    assert names.index("left") < names.index("disconnected")
    assert names[-1] == "shutdown"
    assert sum(1 for n in names if n == "joined") == 2


async def test_configure_can_refuse() -> None:
    class Strict:
        @hookimpl
        def streaming_configure(self, config: StreamingConfig) -> None:
            raise ConfigError("limits.send_buffer: too small for this plugin")

    with pytest.raises(ConfigError, match="send_buffer"):
        Streaming({}, plugins=[Strict()])


async def test_refused_join_raises_with_the_reason() -> None:
    class Gate:
        @hookimpl
        def streaming_join_room(self, connection: Connection, room: str) -> bool | None:
            if room == "vip":
                raise Refused("members only", code="members_only")
            return None

    streaming = Streaming({}, plugins=[Gate()])
    async with streaming.running():
        conn = await open_connection(streaming)
        with pytest.raises(Refused, match="members only"):
            await conn.join_room("vip")
        await streaming.room_protocol_frame(conn, '{"type":"join","room_id":"vip"}')
        assert conn.frames("error")[-1]["data"] == {"code": "members_only", "message": "members only"}
        assert conn.rooms == set()


async def test_a_failing_plugin_is_named_and_closes_only_the_connection_it_served(
        caplog: pytest.LogCaptureFixture) -> None:
    class Buggy:
        @hookimpl
        async def streaming_message_received(self, connection: Connection, frame: ClientFrame) -> bool | None:
            if frame.data == "boom":
                raise ZeroDivisionError("bug in the plugin")
            return None

    streaming = Streaming({}, plugins=[Buggy()])
    async with streaming.running():
        victim, bystander = await open_connection(streaming), await open_connection(streaming)
        for conn in (victim, bystander):
            await conn.join_room("r")
        await streaming.room_protocol_frame(victim, '{"type":"message","room_id":"r","data":"boom"}')
        assert victim.id not in streaming.connections and victim.close_code == 1011
        assert bystander.id in streaming.connections
        await streaming.room_protocol_frame(bystander, '{"type":"message","room_id":"r","data":"fine"}')
        assert bystander.close_code is None
    failure = [r for r in caplog.records if "failed in streaming_message_received" in r.getMessage()]
    assert failure and "Buggy" in failure[0].getMessage() and failure[0].levelname == "ERROR"


async def test_a_failing_authenticate_hook_refuses_with_500() -> None:
    class Broken:
        @hookimpl
        def streaming_authenticate(self, request: ConnectionRequest) -> Identity | None:
            raise KeyError("no such header")

    streaming = Streaming({}, plugins=[Broken()])
    async with streaming.running():
        with pytest.raises(Refused) as info:
            await open_connection(streaming)
        assert (info.value.status, info.value.code) == (500, "internal_error")


async def test_failing_counting_hooks_do_not_break_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        @hookimpl
        def streaming_connection_dropped(self, connection: Connection, reason: str) -> None:
            raise RuntimeError("metrics down")

        @hookimpl
        def streaming_frame_rejected(self, connection: Connection, code: str, message: str) -> None:
            raise RuntimeError("metrics down")

    streaming = Streaming({}, plugins=[Broken()])
    async with streaming.running():
        conn, dropped = await open_connection(streaming), await open_connection(streaming)
        dropped.drop("slow consumer")  # must not raise into a transport's write path
        await streaming.room_protocol_frame(conn, "{")
        assert conn.frames("error")[-1]["data"]["code"] == "invalid_json"
    assert sum("metrics down" in r.getMessage() for r in caplog.records) == 2
