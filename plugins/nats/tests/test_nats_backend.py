"""The NATS backend's own promises beyond the contract kit: exact history, holes, outages, positions that
only go up (even across a lost stream), settings that say what is wrong; and batches (batch.py): a loop
turn's room messages to one room are one stored message, yet each keeps a position of its own."""

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
from forge_streaming_nats import NatsPubSub, NatsSettings, batch
from forge_streaming_nats.names import Subjects
from forge_streaming_nats.pubsub import H_BATCH_COMMIT, H_BATCH_ID, H_BATCH_SEQ, H_MSG_ID, H_NODE, SETTLE_DELAY


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


async def _one_by_one(backend: NatsPubSub, room: str, numbers: range) -> None:
    """Each message in a loop turn of its own and sent before the next: one stored message each (no batch)."""
    for n in numbers:
        await backend.publish(_envelope(room, n))
        await backend.flush()


def _numbers(listener: RecordingListener, room: str) -> list[int]:
    return [int(e.payload.split(b":")[1].rstrip(b"}")) for e in listener.envelopes
            if e.room == room and e.kind is EnvelopeKind.MESSAGE]


def _name() -> str:
    return f"T{uuid.uuid4().hex[:8].upper()}"


def test_fetch_history_is_exact_and_refuses_what_the_stream_dropped(nats_server: Any) -> None:
    async def scenario() -> None:
        async with started(_settings(nats_server.url, _name(), max_msgs_per_subject=5), "a") as [(a, la)]:
            await a.subscribe("r")
            await _one_by_one(a, "r", range(1, 11))
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


async def _settled(*backends: NatsPubSub) -> None:
    """Past the check a new subscription makes (pubsub._settle): its sleep, then its reads of the stream,
    which a loaded machine can stretch past any fixed wait."""
    await asyncio.sleep(SETTLE_DELAY)
    await eventually(lambda: not any(backend._tasks for backend in backends), timeout=10,
                     what="the subscriptions' settle checks to end")


async def _miss(backend: NatsPubSub, *rooms: str) -> None:
    """The server stops sending ``rooms`` to ``backend`` (as it drops messages for a node that fell behind)."""
    await _settled(backend)
    for room in rooms:
        sub = backend._rooms[room].sub
        assert sub is not None
        await sub.unsubscribe()
    assert backend._link is not None
    await backend._link.nc.flush()  # the server has it before anything is published


async def _hear_again(backend: NatsPubSub, *rooms: str, publisher: NatsPubSub) -> None:
    assert backend._link is not None
    await publisher.flush()  # every message published so far is stored
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
            await _one_by_one(a, "lost", range(1, 13))
            await _one_by_one(a, "kept", range(1, 4))
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
            await _one_by_one(a, "r", range(1, 8))
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
    assert backend.settings.servers == ("nats://127.0.0.1:1",), "one URL is a list of one"


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
            await a.flush()  # acknowledged (a lost acknowledgement is retried, and a
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


# -- batches ------------------------------------------------------------------------------

def _positions(listener: RecordingListener, room: str) -> list[int]:
    return [e.sequence or 0 for e in listener.envelopes if e.room == room and e.kind is EnvelopeKind.MESSAGE]


def _increasing(positions: list[int]) -> bool:
    return all(b > a for a, b in zip(positions, positions[1:], strict=False))


async def _stored(url: str, stream: str, subject: str) -> int:
    """How many messages the stream holds on ``subject``."""
    nc = await nats.connect(url)
    try:
        info = await nc.jsm().stream_info(stream, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)
    finally:
        await nc.close()


def test_the_batch_codec_keeps_every_field_and_refuses_what_is_not_a_batch() -> None:
    envelopes = [Envelope(room="r", payload=b'{"n":1}', sender="c1", id="m1"),
                 Envelope(room="r", payload=b'{"h":1}\n\x00\xff', binary=True),
                 Envelope(room="r", payload=b"", sender="caf\u00e9 \U0001f600")]
    encoded = batch.encode(envelopes)
    assert batch.decode(encoded, 3) == [batch.Item(b'{"n":1}', "c1", False, "m1"),
                                        batch.Item(b'{"h":1}\n\x00\xff', None, True, None),
                                        batch.Item(b"", "caf\u00e9 \U0001f600", False, None)]
    assert all(batch.size(e) >= len(batch.encode([e])) for e in envelopes), "size() is an upper bound"
    for payload, count in ((encoded, 2), (encoded, 4), (encoded[:-1], 3), (encoded + b"\x00", 3), (b"", 2),
                           (encoded, 1), (encoded, batch.MAX_ITEMS + 1), (b"\x08" + encoded[1:], 3),
                           (batch.encode([Envelope(room="r", payload=b"", sender="x")] * 2).replace(b"x", b"\xff"), 2)):
        with pytest.raises(ValueError):
            batch.decode(payload, count)


def test_a_turns_messages_to_a_room_are_one_stored_message_at_positions_of_their_own(nats_server: Any) -> None:
    """Five messages to 'r' and two to 'q' in one loop turn, then one more to 'r': one stored message per room
    and turn, yet each room message has its own position, the same on both nodes and in the stream, strictly
    increasing in the order published; every field travels; a resume from any position (inside a batch
    included), on any node (one started later too), is exact."""
    stream = _name()
    settings = _settings(nats_server.url, stream)

    async def scenario() -> None:
        async with started(settings, "a", "b") as [(a, la), (b, lb)]:
            for backend in (a, b):
                await backend.subscribe("r")
                await backend.subscribe("q")
            sent = [Envelope(room="r", payload=b'{"n":1}', node="a", sender="c1", id="m1"), _envelope("q", 1, "a"),
                    _envelope("r", 2, "a"), Envelope(room="r", payload=b'{"h":1}\n\x00\xff', node="a", binary=True),
                    _envelope("q", 2, "a"), _envelope("r", 4, "a"), _envelope("r", 5, "a")]
            for envelope in sent:  # one loop turn: publish() does not wait for the network
                await a.publish(envelope)
            await a.flush()
            await a.publish(_envelope("r", 6, "a"))
            await a.flush()
            for listener in (la, lb):
                await listener.wait_for(lambda e: len(e) == 8, timeout=10)
            assert a.counters["batches_sent"] == 2, "one batch for 'r', one for 'q'"
            assert await _stored(nats_server.url, stream, a.subjects.room("r")) == 2, "a batch and a single"
            assert await _stored(nats_server.url, stream, a.subjects.room("q")) == 1
            got = [e for e in lb.envelopes if e.room == "r"]
            assert [(e.payload, e.sender, e.binary, e.id, e.node) for e in got] == [
                (b'{"n":1}', "c1", False, "m1", "a"), (b'{"n":2}', None, False, None, "a"),
                (b'{"h":1}\n\x00\xff', None, True, None, "a"), (b'{"n":4}', None, False, None, "a"),
                (b'{"n":5}', None, False, None, "a"), (b'{"n":6}', None, False, None, "a")]
            positions = _positions(lb, "r")
            assert _increasing(positions) and _increasing(_positions(lb, "q"))
            assert positions == _positions(la, "r") and _positions(lb, "q") == _positions(la, "q"), "one order"
            assert positions[4] - positions[0] == 4, "a batch of k takes the k stream sequences it reserved"
            assert await b.position("r") == positions[-1]
            for since in [positions[0] - 1, *positions]:  # a resume from anywhere, inside the batch too
                history = await b.fetch_history("r", since)
                assert history is not None, since
                assert [(e.sequence, e.payload, e.binary, e.id) for e in history] == [
                    (e.sequence, e.payload, e.binary, e.id) for e in got if (e.sequence or 0) > since]
            async with started(settings, "c") as [(c, _)]:  # a node that heard none of it: the stream answers
                history = await c.fetch_history("r", positions[1])
                assert history is not None and [e.sequence for e in history] == positions[2:]
                assert [e.payload for e in history] == [e.payload for e in got[2:]]
                assert await c.position("r") == positions[-1]

    run(scenario(), timeout=40)


def test_a_node_that_missed_batches_reads_them_from_the_stream_in_order(nats_server: Any) -> None:
    """b misses three batches of room 'r'; at the next live message it reads them from the stream: every
    message once, in order, at the positions a delivered them under, no resync."""
    async def scenario() -> None:
        async with started(_settings(nats_server.url, _name()), "a", "b") as [(a, la), (b, lb)]:
            for backend in (a, b):
                await backend.subscribe("r")
            await a.publish(_envelope("r", 0, "a"))
            await lb.wait_for(lambda e: len(e) == 1)
            await _miss(b, "r")
            for turn in range(3):
                for n in range(1 + 4 * turn, 5 + 4 * turn):
                    await a.publish(_envelope("r", n, "a"))
                await a.flush()
            await _hear_again(b, "r", publisher=a)
            await a.publish(_envelope("r", 13, "a"))
            await lb.wait_for(lambda e: len(e) == 14, timeout=10)
            await asyncio.sleep(0.2)
            assert _numbers(lb, "r") == list(range(14)) and lb.resyncs == []
            assert _positions(lb, "r") == _positions(la, "r") and _increasing(_positions(lb, "r"))
            assert a.counters["batches_sent"] == 3 and b.counters["filled"] >= 1

    run(scenario(), timeout=30)


def test_a_resume_inside_a_batch_is_exact_while_the_stream_holds_it_and_refused_once_dropped(
        nats_server: Any) -> None:
    """The stream keeps 2 stored messages per room: three batches of three, the oldest dropped. From any
    position of a batch still held the history is exact; from one of the dropped batch it is not vouched
    for (the client resyncs), never silently short."""
    async def scenario() -> None:
        async with started(_settings(nats_server.url, _name(), max_msgs_per_subject=2), "a") as [(a, la)]:
            await a.subscribe("r")
            for turn in range(3):
                for n in range(3 * turn, 3 * turn + 3):
                    await a.publish(_envelope("r", n, "a"))
                await a.flush()
            await la.wait_for(lambda e: len(e) == 9, timeout=10)
            positions = _positions(la, "r")
            assert _increasing(positions)
            for index in range(3, 9):  # the second batch on: held
                history = await a.fetch_history("r", positions[index])
                assert history is not None and [e.sequence for e in history] == positions[index + 1:], index
            for index in range(2):  # inside the dropped batch: the rest of it is gone
                assert await a.fetch_history("r", positions[index]) is None, index
            history = await a.fetch_history("r", positions[2])  # its last: exact, or not vouched for
            assert history is None or [e.sequence for e in history] == positions[3:]

    run(scenario(), timeout=30)


def test_a_batch_sent_again_after_a_lost_acknowledgement_is_stored_once(nats_server: Any) -> None:
    stream = _name()

    async def scenario() -> None:
        async with started(_settings(nats_server.url, stream), "a", "b") as [(a, _), (b, lb)]:
            await b.subscribe("r")
            [item] = a._gather([_envelope("r", n, "a") for n in range(3)])
            assert item.count == 3
            assert await a._send(item, 2.0)
            assert await a._send(item, 2.0), "the same batch again: the stream says it has it"
            await lb.wait_for(lambda e: len(e) == 3, timeout=5)
            await asyncio.sleep(0.3)
            assert _numbers(lb, "r") == [0, 1, 2] and a.counters["publish_refused"] == 0
            assert await _stored(nats_server.url, stream, a.subjects.room("r")) == 1

    run(scenario(), timeout=30)


def test_a_batch_the_stream_refuses_is_sent_again_one_message_at_a_time(nats_server: Any) -> None:
    """The stream stops taking atomic batches behind the node's back: the batch is refused as a whole
    (nothing of it stored), its messages go one by one, in order, and the node stops batching."""
    stream = _name()

    async def scenario() -> None:
        async with started(_settings(nats_server.url, stream, heartbeat=30), "a", "b") as [(a, _), (b, lb)]:
            await b.subscribe("r")
            nc = await nats.connect(nats_server.url)
            try:
                jsm = nc.jsm()
                config = (await jsm.stream_info(stream)).config
                config.allow_atomic = False
                await jsm.update_stream(config)
            finally:
                await nc.close()
            assert a._atomic, "the node has not looked at the stream since"
            for n in range(5):
                await a.publish(_envelope("r", n, "a"))
            await lb.wait_for(lambda e: len(e) == 5, timeout=10)
            assert _numbers(lb, "r") == [0, 1, 2, 3, 4] and _increasing(_positions(lb, "r"))
            assert a.counters["batches_refused"] == 1 and a.counters["publish_refused"] == 0
            assert await _stored(nats_server.url, stream, a.subjects.room("r")) == 5

    run(scenario(), timeout=30)


def test_a_stored_batch_that_cannot_be_read_is_skipped_the_same_way_everywhere(nats_server: Any) -> None:
    """An atomic batch someone else stored in a room, whose payload is not a batch: every node drops it (and
    counts it), live or from the stream, and the room goes on without a hole to fill again and again."""
    stream = _name()

    async def scenario() -> None:
        async with started(_settings(nats_server.url, stream), "a", "b") as [(a, la), (b, lb)]:
            for backend in (a, b):
                await backend.subscribe("r")
            await a.publish(_envelope("r", 1, "a"))
            await lb.wait_for(lambda e: len(e) == 1)
            await _settled(a, b)
            # Message 1 may have been read from the stream by b's settle check (the server may not republish
            # to a subscription made milliseconds earlier: pubsub._settle), so count fills from here on.
            filled = b.counters["filled"]
            nc = await nats.connect(nats_server.url)
            try:
                await nc.publish(a.subjects.pads, b"", headers={H_BATCH_ID: "x1", H_BATCH_SEQ: "1"})
                ack = await nc.request(a.subjects.room("r"), b"not a batch", timeout=5, headers={
                    H_NODE: "x", H_MSG_ID: "x1", H_BATCH_ID: "x1", H_BATCH_SEQ: "2", H_BATCH_COMMIT: "1"})
                assert b'"count":2' in ack.data, ack.data
            finally:
                await nc.close()
            await eventually(lambda: b.counters["bad_batches"] >= 1, timeout=5, what="b dropping the batch")
            await a.publish(_envelope("r", 2, "a"))
            await lb.wait_for(lambda e: len(e) == 2, timeout=5)
            await asyncio.sleep(0.3)
            assert _numbers(lb, "r") == [1, 2] and lb.resyncs == [] and b.counters["filled"] == filled
            assert "could not be read" in b.health().detail
            history = await b.fetch_history("r", _positions(lb, "r")[0])
            assert history is not None and [e.payload for e in history] == [b'{"n":2}']
            assert _positions(la, "r") == _positions(lb, "r")

    run(scenario(), timeout=30)


def test_a_turn_larger_than_a_batch_is_several_batches_in_order(nats_server: Any) -> None:
    """2,500 messages in one turn (batches hold 1,000 at most) to one room of a stream taking messages of
    4 KiB at most: batches of the size the stream takes, delivered in order, each at its own position."""
    async def scenario() -> None:
        settings = _settings(nats_server.url, _name(), max_msg_size=4096)
        async with started(settings, "a", "b") as [(a, _), (b, lb)]:
            await b.subscribe("r")
            for n in range(2500):
                await a.publish(_envelope("r", n, "a"))
            await a.flush()
            await lb.wait_for(lambda e: len(e) == 2500, timeout=20)
            assert _numbers(lb, "r") == list(range(2500)) and _increasing(_positions(lb, "r"))
            assert a.counters["batches_sent"] > 2500 * 10 // 4096 and a.counters["publish_refused"] == 0

    run(scenario(), timeout=40)


def test_with_batches_off_every_room_message_is_a_stored_message(nats_server: Any) -> None:
    stream = _name()

    async def scenario() -> None:
        async with started(_settings(nats_server.url, stream, batch=False), "a") as [(a, la)]:
            await a.subscribe("r")
            for n in range(5):
                await a.publish(_envelope("r", n, "a"))
            await la.wait_for(lambda e: len(e) == 5, timeout=10)
            assert a.counters["batches_sent"] == 0 and _increasing(_positions(la, "r"))
            assert await _stored(nats_server.url, stream, a.subjects.room("r")) == 5

    run(scenario(), timeout=30)
