"""The Streaming service's rooms, presence, history and publishing, without a transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from forge_streaming import (
    Connection,
    ConnectionRequest,
    Envelope,
    EnvelopeKind,
    Identity,
    PublishMessage,
    PubSubBackend,
    Refused,
    Streaming,
    StreamingConfig,
    hookimpl,
)
from forge_streaming.testing import open_connection
from forge_streaming_memory.pubsub import MemoryPubSub


@pytest.fixture
async def streaming() -> AsyncIterator[Streaming]:
    service = Streaming({})
    async with service.running():
        yield service


async def test_broadcast_to_room_reaches_the_others_once(streaming: Streaming) -> None:
    alice, bob, carol = [await open_connection(streaming) for _ in range(3)]
    for conn in (alice, bob, carol):
        await conn.join_room("lobby")
    seq = await alice.broadcast_to_room("lobby", {"text": "hi"})
    for conn in (bob, carol):
        messages = conn.frames("message")
        assert [(m["data"], m["sequence"], m["user_id"]) for m in messages] == [({"text": "hi"}, seq, alice.user_id)]
    assert alice.frames("message") == []


async def test_presence_and_empty_rooms_removed(streaming: Streaming) -> None:
    alice, bob = await open_connection(streaming), await open_connection(streaming)
    await alice.join_room("r")
    await bob.join_room("r")
    assert await streaming.presence("r") == [alice.user_id, bob.user_id]
    assert [f["user_id"] for f in alice.frames("join")] == [bob.user_id]
    joined = bob.frames("system")[-1]
    assert joined["event"] == "room.joined" and joined["data"]["users"] == [alice.user_id, bob.user_id]
    await bob.close()
    assert [f["user_id"] for f in alice.frames("leave")] == [bob.user_id]
    await alice.leave_room("r")
    assert await streaming.rooms() == []


async def test_history_resume_and_resync(streaming: Streaming) -> None:
    alice, bob = await open_connection(streaming), await open_connection(streaming)
    await alice.join_room("r")
    await bob.join_room("r")
    seqs: list[int] = []
    for n in range(5):
        seq = await alice.broadcast_to_room("r", n)
        assert seq is not None
        seqs.append(seq)
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    late = await open_connection(streaming)
    await late.join_room("r", since=seqs[1])
    assert [m["data"] for m in late.frames("message")] == [2, 3, 4]
    stale = await open_connection(streaming)
    await stale.join_room("r", since=1)
    assert [f["event"] for f in stale.frames("system")][-1] == "resync"
    assert [m["data"] for m in stale.frames("message")] == [0, 1, 2, 3, 4], "then what history holds"


async def test_protocol_errors_are_error_frames(streaming: Streaming) -> None:
    conn = await open_connection(streaming)
    cases: list[tuple[str | bytes, str]] = [
        ("{", "invalid_json"), ("[]", "invalid_frame"), ('{"type":"nope","room_id":"r"}', "unknown_type"),
        ('{"type":"join"}', "missing_room"), ('{"type":"message","room_id":"r","data":1}', "not_member"),
        (b"\x00", "binary_not_supported"), ("[" * 100000 + "]" * 100000, "too_large")]
    for raw, code in cases:
        await streaming.room_protocol_frame(conn, raw)
        assert conn.frames("error")[-1]["data"]["code"] == code, raw[:20]


async def test_hooks_authenticate_refuse_join_and_transform() -> None:
    class Policy:
        @hookimpl
        def streaming_authenticate(self, request: ConnectionRequest) -> Identity:
            if request.headers.get("x-user") == "mallory":
                raise Refused("no")
            return Identity(request.headers.get("x-user", "anon"))

        @hookimpl
        async def streaming_join_room(self, connection: Connection, room: str) -> bool:
            return room != "secret"

        @hookimpl
        def streaming_before_publish(self, message: PublishMessage) -> bool | None:
            if message.data == "drop":
                return False
            message.data = str(message.data).upper()
            return None

    service = Streaming({}, plugins=[Policy()])
    async with service.running():
        with pytest.raises(Refused):
            await open_connection(service, headers={"x-user": "mallory"})
        alice = await open_connection(service, headers={"x-user": "alice"})
        bob = await open_connection(service, headers={"x-user": "bob"})
        assert alice.user_id == "alice"
        await service.room_protocol_frame(alice, '{"type":"join","room_id":"secret"}')
        assert alice.frames("error")[-1]["data"]["code"] == "join_refused"
        for conn in (alice, bob):
            await conn.join_room("open")
        assert await alice.broadcast_to_room("open", "drop") is None
        await alice.broadcast_to_room("open", "hello")
        assert [m["data"] for m in bob.frames("message")] == ["HELLO"]


async def test_rate_limit_answers_with_a_retry_hint() -> None:
    service = Streaming({"limits": {"messages_per_second": 1, "message_burst": 2}})
    async with service.running():
        alice, bob = await open_connection(service), await open_connection(service)
        await alice.join_room("r")  # joins go through the API, not the limited frame path
        await bob.join_room("r")
        for n in range(4):
            await service.room_protocol_frame(alice, f'{{"type":"message","room_id":"r","data":{n}}}')
        assert [m["data"] for m in bob.frames("message")] == [0, 1]
        errors = alice.frames("error")
        assert [e["data"]["code"] for e in errors] == ["rate_limited", "rate_limited"]
        assert errors[0]["data"]["retry_after_ms"] > 0


async def test_idle_connections_are_closed_and_leave_their_rooms() -> None:
    import asyncio

    service = Streaming({"limits": {"idle_timeout": "200ms"}})
    async with service.running():
        idle, busy = await open_connection(service), await open_connection(service)
        await idle.join_room("r")
        for _ in range(8):
            await asyncio.sleep(0.1)
            await service.room_protocol_frame(busy, '{"type":"typing","room_id":"x","data":true}')
        assert idle.id not in service.connections and busy.id in service.connections
        assert idle.close_reason == "idle timeout"
        assert await service.presence("r") == []


async def test_history_survives_a_room_emptying_for_a_moment(streaming: Streaming) -> None:
    alone = await open_connection(streaming)
    await alone.join_room("solo")
    first = await streaming.broadcast("solo", "before")
    await alone.close()
    missed = await streaming.broadcast("solo", "while away")  # nobody in the room: still recorded
    back = await open_connection(streaming)
    await back.join_room("solo", since=first)
    assert [m["data"] for m in back.frames("message")] == ["while away"]
    assert [m["sequence"] for m in back.frames("message")] == [missed]


async def test_after_the_linger_a_publish_listens_again_and_a_resume_is_exact() -> None:
    """The log is freed after the linger; publishing listens to the room again, so nothing is lost or repeated."""
    import asyncio

    service = Streaming({"rooms": {"history_linger": "50ms"}})
    async with service.running():
        conn = await open_connection(service)
        await conn.join_room("r")
        first = await service.broadcast("r", 1)
        await conn.close()
        await asyncio.sleep(0.2)
        assert service._history.usage()["rooms"] == 0  # noqa: SLF001 (the log was freed)
        later = await service.broadcast("r", "published while nobody was in the room")
        assert first is not None and later == first + 1, "the engine numbers the room on, across the pause"
        back = await open_connection(service)
        await back.join_room("r", since=first)
        assert [m["data"] for m in back.frames("message")] == ["published while nobody was in the room"]
        assert [f["event"] for f in back.frames("system")] == ["room.joined"]


async def test_resync_is_followed_by_what_history_still_holds() -> None:
    service = Streaming({"rooms": {"history_size": 3}})
    async with service.running():
        member = await open_connection(service)
        await member.join_room("r")
        first = await service.broadcast("r", 0)
        for n in range(1, 6):
            await service.broadcast("r", n)
        late = await open_connection(service)
        await late.join_room("r", since=first)
        kinds = [(f["type"], f.get("event") or f.get("data")) for f in late.frames() if f["type"] != "join"]
        assert kinds[-4:] == [("system", "resync"), ("message", 3), ("message", 4), ("message", 5)]
        joined = late.frames("system")[0]
        assert joined["event"] == "room.joined" and joined["data"]["sequence"] >= first


async def test_connection_and_room_limits_refuse_with_a_status() -> None:
    class ByHeader:
        @hookimpl
        def streaming_authenticate(self, request: ConnectionRequest) -> Identity:
            return Identity(request.headers.get("x-user", "anon"))

    service = Streaming({"limits": {"max_connections": 4, "max_connections_per_ip": 3,
                                    "max_connections_per_user": 2, "max_rooms_per_connection": 2}},
                        plugins=[ByHeader()])
    async with service.running():
        a1 = await open_connection(service, headers={"x-user": "a"})
        a2 = await open_connection(service, headers={"x-user": "a"})
        with pytest.raises(Refused) as per_user:
            await open_connection(service, headers={"x-user": "a"})
        assert (per_user.value.status, per_user.value.code) == (429, "too_many_connections")
        await open_connection(service, headers={"x-user": "b"})
        with pytest.raises(Refused) as per_ip:
            await open_connection(service, headers={"x-user": "c"})
        assert per_ip.value.status == 429
        await open_connection(service, headers={"x-user": "d"}, client=("127.0.0.2", 1))
        with pytest.raises(Refused) as full:
            await open_connection(service, headers={"x-user": "e"}, client=("127.0.0.3", 1))
        assert (full.value.status, full.value.code) == (503, "server_full")
        await a1.close()
        await open_connection(service, headers={"x-user": "e"}, client=("127.0.0.3", 1))
        await a2.join_room("one")
        await a2.join_room("two")
        with pytest.raises(Refused, match="at most 2 rooms"):
            await a2.join_room("three")


async def test_a_resync_for_one_room_reaches_that_room_only(streaming: Streaming) -> None:
    alice = await open_connection(streaming)
    await alice.join_room("hole")
    await alice.join_room("fine")
    hole = await streaming.broadcast("hole", 1)
    fine = await streaming.broadcast("fine", 1)
    assert hole is not None and fine is not None
    streaming.on_resync("the backend noticed a hole", rooms=["hole", "not-here"])
    resyncs = [f["data"] for f in alice.frames("system") if f["event"] == "resync"]
    assert [(r["room_id"], r["reason"]) for r in resyncs] == [("hole", "the backend noticed a hole")]
    # a resume across the hole is a resync; in the other room history still vouches
    for room, since, expected in (("hole", hole, "resync"), ("fine", fine, "room.joined")):
        late = await open_connection(streaming)
        await late.join_room(room, since=since - 1)
        assert late.frames("system")[-1]["event"] == expected, room
    streaming.on_resync("broker reconnected")
    resynced = sorted(f["data"]["room_id"] for f in alice.frames("system") if f["event"] == "resync")
    assert resynced == ["fine", "hole", "hole"]


class HeldBackend(MemoryPubSub):
    """A backend that numbers room messages only when told to (a broker outage, a sequencer failing over)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Envelope] = []

    async def publish(self, envelope: Envelope) -> None:
        if envelope.kind is EnvelopeKind.MESSAGE:
            self.held.append(envelope)
        else:
            await super().publish(envelope)

    async def release(self) -> None:
        held, self.held = self.held, []
        for envelope in held:
            await super().publish(envelope)


class HeldBackendPlugin:
    @hookimpl
    def streaming_register_pubsub_backends(self) -> dict[str, Callable[[StreamingConfig], PubSubBackend]]:
        return {"held": lambda config: HeldBackend()}


async def test_a_publish_the_backend_does_not_number_in_time_times_out_and_is_delivered_later() -> None:
    """publish() raises TimeoutError, POST /api/publish answers 202 without a position; both arrive once numbered."""
    import httpx
    from forge_streaming.testing import serve

    service = Streaming({"pubsub": {"backend": "held"}, "api": {"key": "k"}}, plugins=[HeldBackendPlugin()])
    async with serve(service) as server:
        backend = service.backend
        assert isinstance(backend, HeldBackend)
        member = await open_connection(service)
        await member.join_room("r")
        with pytest.raises(TimeoutError, match="it may still be delivered"):
            await service.publish("r", "from python", timeout=0.05)
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{server.url}/api/publish", json={"room_id": "r", "data": "api"},
                                       headers={"Authorization": "Bearer k"}, timeout=10)
        assert response.status_code == 202
        assert response.json()["published"] is True and response.json()["sequence"] is None
        assert [m["data"] for m in member.frames("message")] == []
        await backend.release()
        assert [m["data"] for m in member.frames("message")] == ["from python", "api"]


async def test_local_members_publish_each_changed_room_once_after_the_delay() -> None:
    import asyncio

    from forge_streaming import LocalMembers, Member

    published: list[str] = []
    local = LocalMembers(published.append, delay=0.02)
    local.add("b", Member("c1", "alice"))
    local.add("b", Member("c1", "alice"))  # already there: no change
    local.add("a", Member("c2", "bob"))
    local.remove("a", "c2")
    local.remove("a", "nobody")
    assert local.pending == {"a", "b"} and published == []
    await asyncio.sleep(0.06)
    assert published == ["a", "b"] and not local.pending  # once each, in one go
    assert [m.user_id for m in local.members("b")] == ["alice"] and "a" not in local.rooms
    local.add("c", Member("c3", "carol"))
    local.cancel()
    await asyncio.sleep(0.06)
    assert published == ["a", "b"] and not local.pending


def test_room_positions_count_up_and_start_new_runs_above_earlier_ones() -> None:
    from forge_streaming import RoomPositions

    positions = RoomPositions(max_rooms=2)
    first, previous = positions.next("r")
    assert previous is None and first > positions.start
    assert positions.next("r", 3) == (first + 1, first) and positions.last("r") == first + 3
    assert positions.next("s", after=41) == (42, 41), "a room heard elsewhere continues after it"
    assert not positions.forgot
    positions.next("t")  # past max_rooms: the least recently used ("r") is forgotten
    assert positions.forgot and positions.last("r") is None
    again, previous = positions.next("r")
    assert previous is None and again > first + 3, "a forgotten room starts a run above its old one"
