"""A member is told ``room.joined`` only once this node receives the room (found reading the code, by a helper).

The first join of a room on a node subscribes the node to it; a second
member joining while that subscribe was on its way used to be told
``room.joined`` at once, and a message published in between reached nobody
on the node. A real server and real websockets clients; the backend's
subscribe is held open by the test.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import websockets
from forge_streaming import PubSubBackend, Streaming, StreamingConfig, hookimpl
from forge_streaming.testing import RoomClient, eventually, serve
from forge_streaming_memory.pubsub import MemoryPubSub


class SlowSubscribe(MemoryPubSub):
    """Subscribing to a room takes until the test opens the gate (a broker slow to acknowledge)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.subscribes = 0

    async def subscribe(self, room: str) -> None:
        self.subscribes += 1
        await self.gate.wait()
        await super().subscribe(room)


class SlowSubscribePlugin:
    @hookimpl
    def streaming_register_pubsub_backends(self) -> dict[str, Callable[[StreamingConfig], PubSubBackend]]:
        return {"slow-subscribe": lambda config: SlowSubscribe()}


async def test_members_joining_while_the_room_is_being_subscribed_wait_for_it(
        make_streaming: Callable[..., Streaming]) -> None:
    streaming = make_streaming({"pubsub": {"backend": "slow-subscribe"}}, plugins=[SlowSubscribePlugin()],
                               only=["websocket", "memory-pubsub", "memory-rooms"])
    async with serve(streaming) as server:
        backend = streaming.backend
        assert isinstance(backend, SlowSubscribe)
        clients = [RoomClient(await websockets.connect(f"{server.ws_url}/ws")) for _ in range(3)]
        for client in clients:
            await client.ws.send(json.dumps({"type": "join", "room_id": "r"}))
        await asyncio.sleep(0.3)  # every join has reached the server
        assert [c.events() for c in clients] == [[], [], []], "room.joined before the node receives the room"
        assert backend.subscribes == 1, "one subscription for the three joins"
        backend.gate.set()
        await eventually(lambda: all("room.joined" in c.events() for c in clients), 5, what="the three joins")
        await clients[1].send("r", "right after joining")
        await eventually(lambda: clients[0].data() == clients[2].data() == ["right after joining"], 5,
                         what="the message, at both other members")
        for client in clients:
            await client.close()


async def test_a_failed_subscribe_is_tried_again_by_the_next_join(make_streaming: Callable[..., Streaming]) -> None:
    class FailingOnce(MemoryPubSub):
        failed = False

        async def subscribe(self, room: str) -> None:
            if not FailingOnce.failed:
                FailingOnce.failed = True
                raise ConnectionError("broker went away")
            await super().subscribe(room)

    class Plugin:
        @hookimpl
        def streaming_register_pubsub_backends(self) -> dict[str, Callable[[StreamingConfig], PubSubBackend]]:
            return {"failing-once": lambda config: FailingOnce()}

    streaming = make_streaming({"pubsub": {"backend": "failing-once"}}, plugins=[Plugin()],
                               only=["websocket", "memory-pubsub", "memory-rooms"])
    async with serve(streaming) as server:
        first = RoomClient(await websockets.connect(f"{server.ws_url}/ws"))
        await first.ws.send(json.dumps({"type": "join", "room_id": "r"}))
        await asyncio.sleep(0.3)  # its join failed (the connection is closed 1011)
        member = RoomClient(await websockets.connect(f"{server.ws_url}/ws"))
        sender = RoomClient(await websockets.connect(f"{server.ws_url}/ws"))
        await member.join("r")
        await sender.join("r")
        await sender.send("r", "after the failure")
        await eventually(lambda: member.data() == ["after the failure"], 5, what="the message")
        for client in (first, member, sender):
            await client.close()


async def test_a_publisher_that_waits_for_the_position_waits_for_a_subscription_on_its_way(
        make_streaming: Callable[..., Streaming]) -> None:
    """Streaming.publish listens to the room to hear its message back; a join's subscribe on its way counts."""
    streaming = make_streaming({"pubsub": {"backend": "slow-subscribe"}}, plugins=[SlowSubscribePlugin()],
                               only=["websocket", "memory-pubsub", "memory-rooms"])
    async with serve(streaming) as server:
        backend = streaming.backend
        assert isinstance(backend, SlowSubscribe)
        member = RoomClient(await websockets.connect(f"{server.ws_url}/ws"))
        await member.ws.send(json.dumps({"type": "join", "room_id": "r"}))
        await eventually(lambda: backend.subscribes == 1, 5, what="the join's subscribe")
        publishing = asyncio.ensure_future(streaming.publish("r", "from the server", timeout=5))
        await asyncio.sleep(0.2)
        assert not publishing.done(), "published before the node receives the room"
        backend.gate.set()
        position = await asyncio.wait_for(publishing, 5)
        await eventually(lambda: member.messages() == [(position, "from the server")], 5, what="the message")
        await member.close()
