"""Room messages acted on the moment the WebSocket transport reads them (``Connection.received``).

The kernel publishes a room message from the transport's read callback
when nothing must wait; everything else goes through the connection's
reader as before. These tests run a real server and real websockets
clients, and hold the two promises that path must keep: each sender's
frames are acted on in the order sent, and a backend is never bypassed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
import websockets
from forge_streaming import (
    ClientFrame,
    Envelope,
    EnvelopeKind,
    PubSubBackend,
    Refused,
    StreamingConfig,
    hookimpl,
)
from forge_streaming.service import Streaming
from forge_streaming.testing import RoomClient, eventually, serve
from forge_streaming_memory.pubsub import MemoryPubSub


class CountingBackend(MemoryPubSub):
    """The memory backend, counting which door each room message came through."""

    def __init__(self) -> None:
        super().__init__()
        self.nowait = 0
        self.awaited = 0

    def publish_nowait(self, envelope: Envelope) -> bool:
        if envelope.kind is EnvelopeKind.MESSAGE:
            self.nowait += 1
        return super().publish_nowait(envelope)

    async def publish(self, envelope: Envelope) -> None:
        if envelope.kind is EnvelopeKind.MESSAGE:
            self.awaited += 1
        MemoryPubSub.publish_nowait(self, envelope)  # not counted as taken at once


class SometimesBehindBackend(MemoryPubSub):
    """Every third room message must be awaited, and its publish takes a while (a broker that is behind)."""

    def __init__(self) -> None:
        super().__init__()
        self.offered = 0
        self.awaited = 0

    def publish_nowait(self, envelope: Envelope) -> bool:
        if envelope.kind is EnvelopeKind.MESSAGE:
            self.offered += 1
            if self.offered % 3 == 0:
                return False
        return super().publish_nowait(envelope)

    async def publish(self, envelope: Envelope) -> None:
        if envelope.kind is EnvelopeKind.MESSAGE:
            self.awaited += 1
            await asyncio.sleep(0.01)
        super().publish_nowait(envelope)


class PublishOnlyBackend(MemoryPubSub):
    """Overrides ``publish`` alone: the ``publish_nowait`` it inherits must not be used."""

    def __init__(self) -> None:
        super().__init__()
        self.awaited = 0

    async def publish(self, envelope: Envelope) -> None:
        if envelope.kind is EnvelopeKind.MESSAGE:
            self.awaited += 1
        await super().publish(envelope)


class Backends:
    @hookimpl
    def streaming_register_pubsub_backends(self) -> dict[str, Callable[[StreamingConfig], PubSubBackend]]:
        return {"counting": lambda config: CountingBackend(), "behind": lambda config: SometimesBehindBackend(),
                "publish-only": lambda config: PublishOnlyBackend()}


ServiceOn = Callable[[str], Streaming]


@pytest.fixture
def service_on(make_streaming: Callable[..., Streaming]) -> ServiceOn:
    """A service on one of the backends above, with no plugin that must see each frame first (jwt, prometheus)."""
    return lambda backend: make_streaming({"pubsub": {"backend": backend}}, plugins=[Backends()],
                                          only=["websocket", "memory-pubsub", "memory-rooms"])


async def _pair(url: str) -> tuple[RoomClient, RoomClient]:
    member = RoomClient(await websockets.connect(f"{url}/ws"))
    sender = RoomClient(await websockets.connect(f"{url}/ws"))
    await member.join("r")
    await sender.join("r")
    return member, sender


async def test_room_messages_read_by_websocket_are_published_without_waiting(service_on: ServiceOn) -> None:
    streaming = service_on("counting")
    async with serve(streaming) as server:
        member, sender = await _pair(server.ws_url)
        for n in range(50):
            await sender.send("r", n)
        await eventually(lambda: len(member.data()) == 50, 10, what="50 messages")
        assert member.data() == list(range(50))
        positions = [p for p, _ in member.messages()]
        assert positions == sorted(positions) and len(set(positions)) == 50
        backend = streaming.backend
        assert isinstance(backend, CountingBackend)
        assert (backend.nowait, backend.awaited) == (50, 0)
        await member.close()
        await sender.close()


async def test_a_backend_that_makes_publishers_wait_keeps_each_senders_order(service_on: ServiceOn) -> None:
    """Frames sent back to back, some published at once, some awaited: the member gets them in order, once."""
    streaming = service_on("behind")
    async with serve(streaming) as server:
        member, sender = await _pair(server.ws_url)
        frames = []
        for n in range(60):
            frames.append({"type": "message", "room_id": "r", "data": n})
            if n % 20 == 10:  # frames the reader must handle, between the others
                frames.append({"type": "typing", "room_id": "r", "data": True})
                frames.append({"type": "join", "room_id": f"other-{n}"})
        sent = 0
        for i, frame in enumerate(frames):
            await sender.ws.send(json.dumps(frame))
            sent += frame["type"] == "message"
            if i % 4 == 3:  # now and then a pause until all is through: the next frames find the reader idle
                def through(count: int = sent) -> bool:
                    return len(member.data()) == count

                await eventually(through, 10, what=f"{sent} messages")
        groups = len(frames) // 4
        await eventually(lambda: len(member.data()) == 60, 10, what="60 messages")
        await asyncio.sleep(0.1)
        assert member.data() == list(range(60))
        backend = streaming.backend
        assert isinstance(backend, SometimesBehindBackend)
        # (not a fixed share: a loaded machine's reader falls behind more often and offers fewer)
        assert backend.offered >= groups, "the first frame after each pause was taken at once"
        assert backend.awaited >= groups // 3, "every third one offered was published through the awaited path"
        await eventually(lambda: len([e for e in sender.events() if e == "room.joined"]) == 4, 5,
                         what="the joins between the messages")
        await member.close()
        await sender.close()


async def test_a_join_and_messages_sent_at_once_are_acted_on_in_order(service_on: ServiceOn) -> None:
    """The join is the reader's (it waits for the backend); the messages after it wait for it."""
    streaming = service_on("counting")
    async with serve(streaming) as server:
        member = RoomClient(await websockets.connect(f"{server.ws_url}/ws"))
        await member.join("r")
        sender = RoomClient(await websockets.connect(f"{server.ws_url}/ws"))
        await sender.ws.send(json.dumps({"type": "join", "room_id": "r"}))
        for n in range(20):
            await sender.send("r", n)
        await eventually(lambda: len(member.data()) == 20, 10, what="20 messages")
        assert member.data() == list(range(20))
        assert not [f for f in sender.of("error")], sender.of("error")
        await member.close()
        await sender.close()


async def test_a_backend_that_overrides_publish_alone_is_not_bypassed(service_on: ServiceOn) -> None:
    streaming = service_on("publish-only")
    async with serve(streaming) as server:
        member, sender = await _pair(server.ws_url)
        for n in range(10):
            await sender.send("r", n)
        await eventually(lambda: len(member.data()) == 10, 10, what="10 messages")
        backend = streaming.backend
        assert isinstance(backend, PublishOnlyBackend)
        assert backend.awaited == 10
        await member.close()
        await sender.close()


async def test_invalid_and_foreign_frames_are_answered_by_the_reader_in_order(service_on: ServiceOn) -> None:
    """A bad frame or a message to a room not joined is not taken at once: the reader answers it, in order."""
    streaming = service_on("counting")
    async with serve(streaming) as server:
        member, sender = await _pair(server.ws_url)
        await sender.ws.send("not json")
        await sender.send("elsewhere", "x")
        await sender.send("r", "after")
        await eventually(lambda: member.data() == ["after"], 10, what="the valid message")
        await eventually(lambda: len(sender.of("error")) == 2, 5, what="two errors")
        assert [f["data"]["code"] for f in sender.of("error")] == ["invalid_json", "not_member"]
        await member.close()
        await sender.close()


class SyncHook:
    """A plain-function ``streaming_message_received``: the frame is still taken at once."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    @hookimpl
    def streaming_message_received(self, connection: object, frame: ClientFrame) -> bool | None:
        if frame.type != "message":
            return None
        self.seen.append(frame.data)
        if frame.data == "drop":
            return False
        if frame.data == "forbidden":
            raise Refused("not this one", code="forbidden_send")
        if frame.data == "elsewhere":
            frame.room_id = "other"  # a hook may send it to another room: that goes on in order, in a task
        if isinstance(frame.data, str):
            frame.data = frame.data.upper()
        return None


class AsyncHook:
    @hookimpl
    async def streaming_message_received(self, connection: object, frame: ClientFrame) -> None:
        await asyncio.sleep(0)


async def test_a_synchronous_message_hook_still_lets_messages_be_taken_at_once(
        make_streaming: Callable[..., Streaming]) -> None:
    hook = SyncHook()
    streaming = make_streaming({"pubsub": {"backend": "counting"}}, plugins=[Backends(), hook],
                               only=["websocket", "memory-pubsub", "memory-rooms"])
    async with serve(streaming) as server:
        member, sender = await _pair(server.ws_url)
        await member.join("other")
        await sender.join("other")
        for data in ["a", "drop", "b", "forbidden", "elsewhere", "c"]:
            await sender.send("r", data)
        await eventually(lambda: member.data() == ["A", "B", "ELSEWHERE", "C"], 10, what="the hooked messages")
        assert [f["room_id"] for f in member.of("message")] == ["r", "r", "other", "r"]
        await eventually(lambda: len(sender.of("error")) == 1, 5, what="the refusal")
        assert sender.of("error")[0]["data"]["code"] == "forbidden_send"
        assert hook.seen == ["a", "drop", "b", "forbidden", "elsewhere", "c"]
        backend = streaming.backend
        assert isinstance(backend, CountingBackend)
        assert backend.nowait == 4 and backend.awaited == 0
        await member.close()
        await sender.close()


async def test_an_async_message_hook_sends_every_frame_through_the_reader(
        make_streaming: Callable[..., Streaming]) -> None:
    streaming = make_streaming({"pubsub": {"backend": "counting"}}, plugins=[Backends(), AsyncHook()],
                               only=["websocket", "memory-pubsub", "memory-rooms"])
    async with serve(streaming) as server:
        member, sender = await _pair(server.ws_url)
        for n in range(5):
            await sender.send("r", n)
        await eventually(lambda: member.data() == list(range(5)), 10, what="five messages")
        backend = streaming.backend
        assert isinstance(backend, CountingBackend)
        assert (backend.nowait, backend.awaited) == (0, 5)
        await member.close()
        await sender.close()
