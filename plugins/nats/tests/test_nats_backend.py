"""The NATS backend's own promises beyond the contract kit: exact history, holes, outages, positions that
only go up (even across a lost stream), settings that say what is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from forge_streaming import BackendState, ConfigError, Envelope, EnvelopeKind, Streaming
from forge_streaming.testing import RecordingListener, eventually, run
from forge_streaming_nats import NatsPubSub, NatsSettings
from forge_streaming_nats.names import Subjects
from forge_streaming_nats.pubsub import SETTLE_DELAY


def _envelope(room: str, n: int, node: str = "b") -> Envelope:
    return Envelope(room=room, payload=f'{{"n":{n}}}'.encode(), kind=EnvelopeKind.MESSAGE, node=node)


def _settings(url: str, stream: str, **more: Any) -> NatsSettings:
    values: dict[str, Any] = {"servers": [url], "stream": stream, "subject_prefix": stream.lower(), "heartbeat": 0.5,
                              "reconnect_wait": 0.1, "ping_interval": 1, "connect_timeout": 3, **more}
    return NatsSettings(**values)


@contextlib.asynccontextmanager
async def started(settings: NatsSettings, *nodes: str, history_size: int = 100,
                  healthy: bool = True) -> AsyncIterator[list[tuple[NatsPubSub, RecordingListener]]]:
    """Started backends (up, unless ``healthy`` is false: a fresh server's JetStream may take a while)."""
    pairs = [(NatsPubSub(settings, history_size=history_size), RecordingListener()) for _ in nodes]
    try:
        for node, (backend, listener) in zip(nodes, pairs, strict=True):
            await backend.start(node, listener)
        if healthy:
            await eventually(lambda: all(b.health().ok for b, _ in pairs), timeout=20, what="the backends up")
        yield pairs
    finally:
        for backend, _ in pairs:
            await backend.stop()


def _numbers(listener: RecordingListener, room: str) -> list[int]:
    return [int(e.payload.split(b":")[1].rstrip(b"}")) for e in listener.envelopes
            if e.room == room and e.kind is EnvelopeKind.MESSAGE]


def _name() -> str:
    return f"T{uuid.uuid4().hex[:8].upper()}"


def test_fetch_history_is_exact_and_refuses_what_the_stream_dropped(nats_server: Any) -> None:
    async def scenario() -> None:
        async with started(_settings(nats_server.url, _name(), max_msgs_per_subject=5), "a") as [(a, la)]:
            await a.subscribe("r")
            for n in range(1, 11):
                await a.publish(_envelope("r", n))
            await la.wait_for(lambda e: len(e) == 10)
            positions = [e.sequence or 0 for e in la.envelopes]
            assert positions == sorted(set(positions))
            # the stream keeps the last 5 of the room: from the 6th on, exact; from before it, not vouched for
            got = await a.fetch_history("r", positions[5])
            assert got is not None and [e.sequence for e in got] == positions[6:]
            assert [e.payload for e in got] == [e.payload for e in la.envelopes[6:]], "payloads as published"
            # from the last one dropped: all after it is held, but nothing shows that nothing else of the room
            # was dropped after it, so the backend does not vouch (a resync, never a silent hole)
            assert await a.fetch_history("r", positions[4]) is None
            assert await a.fetch_history("r", positions[3]) is None
            assert await a.fetch_history("r", positions[9]) == []
            assert await a.fetch_history("r", positions[9] + 10**9) is None, "a cursor from a lost stream"
            assert await a.position("r") == positions[9]
            # a room that never had a message: complete from where the stream stood
            where = await a.position("quiet")
            assert where is not None and where >= positions[9]
            await a.publish(_envelope("quiet", 1))
            got = await a.fetch_history("quiet", where)
            assert got is not None and len(got) == 1 and (got[0].sequence or 0) > where

    run(scenario(), timeout=30)


def test_every_field_travels_and_binary_and_id_come_back(nats_server: Any) -> None:
    async def scenario() -> None:
        async with started(_settings(nats_server.url, _name()), "a", "b") as [(a, _), (b, lb)]:
            await b.subscribe("r é.*>")
            await a.publish(Envelope(room="r é.*>", payload=b'{"h":1}\n\x00\xff', node="a", sender="c1",
                                     binary=True, id="m1"))
            await lb.wait_for(lambda e: len(e) == 1)
            got = lb.envelopes[0]
            assert (got.room, got.payload, got.sender, got.node, got.binary, got.id) == (
                "r é.*>", b'{"h":1}\n\x00\xff', "c1", "a", True, "m1")
            history = await b.fetch_history("r é.*>", (got.sequence or 1) - 1)
            assert history is not None and (history[0].payload, history[0].binary) == (got.payload, True)

    run(scenario(), timeout=30)


async def _miss(backend: NatsPubSub, *rooms: str) -> None:
    """The server stops sending ``rooms`` to ``backend`` (as it drops messages for a node that fell behind)."""
    await asyncio.sleep(SETTLE_DELAY + 0.1)  # past the check a new subscription makes (pubsub._settle)
    for room in rooms:
        sub = backend._rooms[room].sub
        assert sub is not None
        await sub.unsubscribe()
    assert backend._link is not None
    await backend._link.nc.flush()  # the server has it before anything is published


async def _hear_again(backend: NatsPubSub, *rooms: str, publisher: NatsPubSub) -> None:
    assert backend._link is not None and publisher._link is not None
    await publisher._link.js.publish_async_completed()  # every message sent so far is stored
    await asyncio.sleep(0.3)  # and republished (the acknowledgement may come just before)
    for room in rooms:
        backend._rooms[room].sub = await backend._subscribe(backend.subjects.live(room))
    await backend._link.nc.flush()
    backend._spawn(backend._settle(list(rooms)))  # as the backend does after subscribing


def test_a_node_that_fell_behind_resyncs_only_the_rooms_that_lost_messages(nats_server: Any) -> None:
    """Node b misses live messages; room 'lost' meanwhile gets more than the stream keeps, room 'kept' fewer.
    At b's next live message of each room, b reads what it missed from the stream: everything the stream
    still holds, in order, and resync for 'lost' only."""
    async def scenario() -> None:
        settings = _settings(nats_server.url, _name(), max_msgs_per_subject=5)
        async with started(settings, "a", "b") as [(a, _), (b, lb)]:
            for room in ("lost", "kept", "old"):
                await b.subscribe(room)
            for room in ("old", "kept", "lost"):  # 'old' keeps the stream's head below the hole
                await a.publish(_envelope(room, 0))
            await lb.wait_for(lambda e: len(e) == 3)
            await _miss(b, "lost", "kept")
            for n in range(1, 13):
                await a.publish(_envelope("lost", n))
            for n in range(1, 4):
                await a.publish(_envelope("kept", n))
            await _hear_again(b, "lost", "kept", publisher=a)
            await a.publish(_envelope("lost", 13))
            await a.publish(_envelope("kept", 4))
            await lb.wait_for(lambda e: len(_numbers(lb, "kept")) == 5 and len(_numbers(lb, "lost")) == 6, timeout=10)
            await asyncio.sleep(0.2)
            assert lb.resynced_rooms == [["lost"]], lb.resynced_rooms
            assert _numbers(lb, "lost") == [0, 9, 10, 11, 12, 13], "what the stream still holds, in order"
            assert _numbers(lb, "kept") == [0, 1, 2, 3, 4], "nothing lost, nothing repeated"
            positions = [e.sequence or 0 for e in lb.envelopes if e.room == "lost"]
            assert positions == sorted(set(positions))
            assert "1 room resyncs" in b.health().detail and "holes filled from the stream" in b.health().detail

    run(scenario(), timeout=30)


def test_a_hole_at_the_head_of_the_stream_resyncs_too(nats_server: Any) -> None:
    async def scenario() -> None:
        settings = _settings(nats_server.url, _name(), max_msgs_per_subject=3)
        async with started(settings, "a", "b") as [(a, _), (b, lb)]:
            await b.subscribe("r")
            await a.publish(_envelope("r", 0))
            try:
                await lb.wait_for(lambda e: len(e) == 1)
            except TimeoutError:
                raise AssertionError(f"{b._rooms} {b.health()} {a.health()} {a._inflight} {a._buffer}") from None
            await _miss(b, "r")
            for n in range(1, 8):
                await a.publish(_envelope("r", n))
            await _hear_again(b, "r", publisher=a)
            await a.publish(_envelope("r", 8))
            await lb.wait_for(lambda e: len(e) == 4, timeout=10)
            assert lb.resynced_rooms == [["r"]]
            assert _numbers(lb, "r") == [0, 6, 7, 8]

    run(scenario(), timeout=30)


def test_a_message_missed_as_a_node_subscribes_is_read_from_the_stream(nats_server: Any) -> None:
    """nats-server may not republish a message stored just after a node subscribed (the new interest is not
    seen yet): a moment later the node compares the room's last position with its own and reads the rest."""
    async def scenario() -> None:
        async with started(_settings(nats_server.url, _name()), "a", "b") as [(a, _), (b, lb)]:
            await b.subscribe("r")
            sub = b._rooms["r"].sub
            assert sub is not None and b._link is not None
            await sub.unsubscribe()  # as if the server did not see b's interest yet
            await b._link.nc.flush()
            await a.publish(_envelope("r", 1))  # and no message after it
            await lb.wait_for(lambda e: len(e) == 1, timeout=5)
            assert _numbers(lb, "r") == [1] and lb.resyncs == [] and b.counters["settled"] == 1

    run(scenario(), timeout=30)


def test_a_lost_stream_comes_back_above_every_position_given(nats_server: Any) -> None:
    """Deleting the stream (an operator, a memory stream after a restart) never makes a position repeat."""
    stream = _name()

    async def scenario() -> None:
        async with started(_settings(nats_server.url, stream, storage="memory"), "a") as [(a, la)]:
            await a.subscribe("r")
            for n in range(3):
                await a.publish(_envelope("r", n))
            await la.wait_for(lambda e: len(e) == 3)
            before = la.envelopes[-1].sequence or 0
            nc = await nats.connect(nats_server.url)
            try:
                await nc.jsm().delete_stream(stream)
            finally:
                await nc.close()
            await eventually(lambda: la.resynced_rooms == [["r"]], timeout=10,
                             what="the backend noticing the stream was lost, creating it, resyncing the room")
            assert a.health().ok
            await a.publish(_envelope("r", 3))
            await la.wait_for(lambda e: len(e) == 4, timeout=10)
            assert (la.envelopes[-1].sequence or 0) > before
            assert la.resynced_rooms == [["r"]], "the messages of the lost stream are gone: resync"

    run(scenario(), timeout=40)


def test_an_outage_is_seen_and_recovered_without_resync_when_nothing_was_lost(own_nats: Any) -> None:
    async def scenario() -> None:
        async with started(_settings(own_nats.url, _name()), "a", "b") as [(a, la), (b, lb)]:
            for backend in (a, b):
                await backend.subscribe("r")
            await a.publish(_envelope("r", 1))
            await lb.wait_for(lambda e: len(e) == 1)
            own_nats.kill()
            await eventually(lambda: not b.health().ok, timeout=10, what="b's health degraded")
            await a.publish(_envelope("r", 2))  # held while the server is gone
            assert "waiting to be sent" in a.health().detail
            own_nats.start()  # file storage: the stream is back as it was
            await eventually(lambda: a.health().ok and b.health().ok, timeout=20, what="both back up")
            await a.publish(_envelope("r", 3))
            for backend, listener in ((a, la), (b, lb)):
                try:
                    await listener.wait_for(lambda e: len(e) == 3, timeout=10)
                except TimeoutError:
                    raise AssertionError(f"{backend._node}: {_numbers(listener, 'r')} {listener.resyncs} "
                                         f"{backend._rooms} {backend.health()} {backend.counters}") from None
                assert _numbers(listener, "r") == [1, 2, 3]
                assert listener.resyncs == [], "nothing was lost: no resync"
            assert [e.sequence for e in la.envelopes] == [e.sequence for e in lb.envelopes]
            assert a.connects == 2 and b.connects == 2

    run(scenario(), timeout=60)


def test_a_server_that_is_not_there_at_start_is_waited_for(make_nats_server: Any) -> None:
    server = make_nats_server()

    async def scenario() -> None:
        settings = _settings(server.url, _name(), connect_timeout=0.5)
        async with started(settings, "a", healthy=False) as [(a, la)]:
            assert a.health().state in (BackendState.DOWN, BackendState.CONNECTING)
            await asyncio.to_thread(server.start)
            await eventually(lambda: a.health().ok, timeout=20, what="connected once the server is up")
            await a.subscribe("r")
            await a.publish(_envelope("r", 1))
            await la.wait_for(lambda e: len(e) == 1, timeout=10)

    run(scenario(), timeout=40)


def test_subject_tokens_are_one_exact_form() -> None:
    from forge_streaming_nats.names import decode_room, encode

    subjects = Subjects("forge")
    for room in ("lobby", "a.b", "*", ">", "with space", "café", "=41", "x=", "😀", "a_b-c"):
        token = encode(room)
        assert all(c.isascii() and (c.isalnum() or c in "_-=") for c in token), token
        assert decode_room(token) == room
        assert subjects.room_of(subjects.room(room)) == room
    assert encode("a.b") == "a=2Eb" and encode("café") == "caf=C3=A9"
    for forged in ("=61", "a=2eb", "=2", "=ZZ", "a.b", "", "=00", "=C3"):
        assert decode_room(forged) is None, forged
    assert subjects.room_of("forge.rooms.a.b") is None and subjects.room_of("other.rooms.a") is None


@pytest.mark.parametrize(("nats", "key"), [
    ({"servers": ["http://x:1"]}, "servers"),
    ({"servers": []}, "servers"),
    ({"token": "t", "user": "u", "password": "p"}, "token"),
    ({"presence_ttl": "1500ms"}, "presence_ttl"),
    ({"storage": "disk"}, "storage"),
    ({"stream": "a.b"}, "stream"),
    ({"subject_prefix": "a.>"}, "subject_prefix"),
    ({"ca_file": "/nonexistent/ca.pem"}, "ca_file"),
])
def test_bad_settings_are_refused_with_the_key(nats: dict[str, Any], key: str) -> None:
    config = {"pubsub": {"backend": "nats", "nats": nats}, "rooms": {"store": "nats"},
              "plugins": {"allow": ["nats"]}}
    with pytest.raises(ConfigError) as caught:
        Streaming(config)
    assert "pubsub.nats" in str(caught.value) and key in str(caught.value), caught.value


def test_history_size_sets_the_per_room_limit_above_a_floor() -> None:
    streaming = Streaming({"pubsub": {"backend": "nats", "nats": {"servers": "nats://127.0.0.1:1"}},
                           "rooms": {"store": "nats", "history_size": 7}, "plugins": {"allow": ["nats"]}})
    backend = streaming.backend
    assert isinstance(backend, NatsPubSub) and backend.per_room == 1000, "at least 1,000: the catch-up buffer"
    assert NatsPubSub(history_size=5000).per_room == 5000
    assert NatsPubSub(NatsSettings(max_msgs_per_subject=7), history_size=5000).per_room == 7
    assert backend.settings.servers == ["nats://127.0.0.1:1"], "one URL is a list of one"


def test_a_memory_stream_after_a_server_restart_never_repeats_a_position(own_nats: Any) -> None:
    """A memory stream loses its messages when the server restarts (and may start its sequence again):
    no position is given twice, and both nodes agree on the positions after it."""
    async def scenario() -> None:
        async with started(_settings(own_nats.url, _name(), storage="memory"), "a", "b") as [(a, la), (b, lb)]:
            for backend in (a, b):
                await backend.subscribe("r")
            for n in range(3):
                await a.publish(_envelope("r", n))
            try:
                await lb.wait_for(lambda e: len(e) == 3)
            except TimeoutError:
                raise AssertionError(f"{b._rooms} {b.health()} {a.health()} {a._inflight} {a._buffer} {a._failed} "
                                     f"{la.envelopes} {lb.envelopes}") from None
            assert a._link is not None
            await a._link.js.publish_async_completed()  # acknowledged (a lost acknowledgement is retried, and a
            before = lb.envelopes[-1].sequence or 0     # memory stream lost with the server cannot dedupe it)
            own_nats.kill()
            own_nats.start()
            await eventually(lambda: a.health().ok and b.health().ok and a.connects == 2 and b.connects == 2,
                             timeout=20, what="both back")
            await a.publish(_envelope("r", 3))
            for backend, listener in ((a, la), (b, lb)):
                try:
                    await listener.wait_for(lambda e: len(e) == 4, timeout=10)
                except TimeoutError:
                    raise AssertionError(f"{backend._node}: rooms {backend._rooms} buffer {len(backend._buffer)} "
                                         f"{backend.health()} {[e.sequence for e in listener.envelopes]}") from None
                assert (listener.envelopes[-1].sequence or 0) > before
                # resync when the node finds the stream created anew; none when it finds it restored empty at
                # the same sequence (nothing after what it delivered was lost)
                assert listener.resynced_rooms in ([], [["r"]]), listener.resynced_rooms
            assert [e.sequence for e in la.envelopes] == [e.sequence for e in lb.envelopes]

    run(scenario(), timeout=60)


def test_a_stream_recreated_by_hand_from_sequence_one_is_moved_above_every_position(nats_server: Any) -> None:
    stream = _name()

    async def scenario() -> None:
        async with started(_settings(nats_server.url, stream, storage="memory"), "a") as [(a, la)]:
            await a.subscribe("r")
            await a.publish(_envelope("r", 0))
            await la.wait_for(lambda e: len(e) == 1)
            before = la.envelopes[-1].sequence or 0
            nc = await nats.connect(nats_server.url)
            try:
                jsm = nc.jsm()
                config = (await jsm.stream_info(stream)).config
                await jsm.delete_stream(stream)
                config.first_seq = None  # as `nats stream add` would make it: from sequence 1
                await jsm.add_stream(config)
            finally:
                await nc.close()
            await eventually(lambda: a.counters["moved_up"] == 1, timeout=10, what="the stream moved up")
            await eventually(lambda: a.health().ok, timeout=10, what="reading again")
            await a.publish(_envelope("r", 1))
            await la.wait_for(lambda e: len(e) == 2, timeout=10)
            assert (la.envelopes[-1].sequence or 0) > before
            assert la.resynced_rooms == [None], "every room: the history it had is gone"

    run(scenario(), timeout=40)


def test_a_stream_that_cannot_be_created_says_why(nats_server: Any) -> None:
    """Two stream names on one subject prefix: the second cannot take the subjects, and health says so."""
    first = _name()

    async def scenario() -> None:
        async with started(_settings(nats_server.url, first), "a"):
            clash = _settings(nats_server.url, _name(), subject_prefix=first.lower(), connect_timeout=1)
            async with started(clash, "b", healthy=False) as [(b, _)]:
                await eventually(lambda: "another stream takes these subjects" in b.health().detail, timeout=10,
                                 what="the clash in /healthz")
                assert not b.health().ok

    run(scenario(), timeout=30)
