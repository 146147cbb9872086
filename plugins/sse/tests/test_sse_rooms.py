"""The /sse room endpoint: session, joins, POSTed frames, cleanup, Last-Event-ID resume, shutdown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from forge_streaming import Member, RoomStore, StreamingConfig, hookimpl
from forge_streaming.testing import RunningServer, open_connection, serve

if TYPE_CHECKING:
    from conftest import Kit, RawSSE, SSEEvent  # the kit's types (test modules do not import conftest at run time)


async def open_member(kit: type[Kit], server: RunningServer, query: str = "",
                      headers: dict[str, str] | None = None) -> tuple[RawSSE, dict[str, Any]]:
    raw = await kit.RawSSE.open(server.url, "/sse" + query, headers)
    assert raw.status == 200
    session = await asyncio.wait_for(raw.next_event(), 5)
    assert session is not None and session.event == "session"
    return raw, session.json()


async def post(client: httpx.AsyncClient, session: dict[str, Any], frame: Any,
               token: str | None = None) -> httpx.Response:
    body = frame if isinstance(frame, (str, bytes)) else json.dumps(frame)
    return await client.post(session["send_url"], content=body,
                             headers={"x-stream-token": session["token"] if token is None else token})


def messages(events: Iterable[SSEEvent]) -> list[Any]:
    return [e.json()["data"] for e in events if e.event == "message" and e.json().get("type") == "message"]


async def test_session_event_then_joins_from_the_query(kit: type[Kit]) -> None:
    streaming = kit.make_streaming()
    async with serve(streaming) as server:
        raw, session = await open_member(kit, server, "?rooms=a,b%20c")
        try:
            assert set(session) == {"connection_id", "token", "send_url"}
            assert session["send_url"] == f"/sse/send?connection_id={session['connection_id']}"
            assert len(session["token"]) >= 32
            joined = await raw.until(lambda e: kit.is_system(e, "room.joined") and e.json()["data"]["room_id"] == "b c")
            rooms = [e.json()["data"]["room_id"] for e in joined if kit.is_system(e, "room.joined")]
            assert rooms == ["a", "b c"]
            assert joined[-1].id is not None and "a:" in joined[-1].id and "b%20c:" in joined[-1].id
            assert await streaming.presence("a") == [session["connection_id"]]
        finally:
            await raw.close()


async def test_posted_message_reaches_the_other_member_with_a_resume_id(kit: type[Kit]) -> None:
    streaming = kit.make_streaming()
    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        alice, alice_session = await open_member(kit, server, "?rooms=r")
        bob, _ = await open_member(kit, server, "?rooms=r")
        try:
            await alice.until(lambda e: e.event == "message" and e.json().get("type") == "join")  # bob arrived
            answer = await post(client, alice_session, {"type": "message", "room_id": "r", "data": {"text": "hi"}})
            assert answer.status_code == 202 and answer.json() == {"accepted": True}
            got = (await bob.until(lambda e: kit.is_message(e)))[-1]
            frame = got.json()
            assert frame["data"] == {"text": "hi"} and frame["user_id"] == alice_session["connection_id"]
            assert got.id == f"r:{frame['sequence']}"
            await post(client, alice_session, {"type": "typing", "room_id": "r", "data": True})
            typing = (await bob.until(lambda e: e.json().get("type") == "typing"))[-1].json()
            assert typing["user_id"] == alice_session["connection_id"] and typing["data"] is True
            # alice does not get her own message back
            await post(client, alice_session, {"type": "leave", "room_id": "r"})
            rest = await alice.until(lambda e: kit.is_system(e, "room.left"))
            assert messages(rest) == []
        finally:
            await alice.close()
            await bob.close()


async def test_posts_are_bound_to_their_stream_by_its_secret(kit: type[Kit]) -> None:
    streaming = kit.make_streaming({"sse": {"max_post_size": 100}})
    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        alice, alice_session = await open_member(kit, server, "?rooms=r")
        mallory, mallory_session = await open_member(kit, server)
        try:
            join = {"type": "join", "room_id": "x"}
            missing = await client.post(alice_session["send_url"], content=json.dumps(join))
            assert missing.status_code == 401 and missing.json()["error"] == "missing_token"
            wrong = await post(client, alice_session, join, token=mallory_session["token"])
            assert wrong.status_code == 403 and wrong.json()["error"] == "bad_token"
            gone = await client.post("/sse/send?connection_id=nope", content="{}", headers={"x-stream-token": "t"})
            assert gone.status_code == 404
            big = await post(client, alice_session, {"type": "message", "room_id": "r", "data": "x" * 200})
            assert big.status_code == 413
            latin = await post(client, alice_session, b"\xff\xfe")
            assert latin.status_code == 400 and latin.json()["error"] == "invalid_utf8"
            assert [c.rooms for c in streaming.connections.values()] == [{"r"}, set()], "nothing acted for alice"
            # the frame itself is judged like on WebSocket: an error frame on the stream
            bad = await post(client, alice_session, "{nope")
            assert bad.status_code == 202
            error = (await alice.until(lambda e: e.json().get("type") == "error"))[-1].json()
            assert error["data"]["code"] == "invalid_json"
            await post(client, alice_session, {"type": "message", "room_id": "elsewhere", "data": 1})
            error = (await alice.until(lambda e: e.json().get("type") == "error"))[-1].json()
            assert error["data"]["code"] == "not_member"
        finally:
            await alice.close()
            await mallory.close()


async def test_disconnect_cleans_up_connection_rooms_and_presence(kit: type[Kit]) -> None:
    streaming = kit.make_streaming()
    async with serve(streaming) as server:
        alice, alice_session = await open_member(kit, server, "?rooms=r,s")
        bob, bob_session = await open_member(kit, server, "?rooms=r")
        try:
            await alice.until(lambda e: e.json().get("type") == "join")
            assert await streaming.presence("r") == [alice_session["connection_id"], bob_session["connection_id"]]
            await bob.close()
            left = (await alice.until(lambda e: e.json().get("type") == "leave"))[-1].json()
            assert left["user_id"] == bob_session["connection_id"]
            assert await streaming.presence("r") == [alice_session["connection_id"]]
            assert list(streaming.connections) == [alice_session["connection_id"]]
            await alice.close()
            await kit.eventually(lambda: not streaming.connections)
            assert await streaming.rooms() == []
            assert streaming.local_members("r") == []
        finally:
            await alice.close()


@pytest.mark.parametrize("resume_by", ["header", "query"])
async def test_reconnect_with_last_event_id_gets_exactly_what_it_missed(kit: type[Kit], resume_by: str) -> None:
    streaming = kit.make_streaming()
    async with serve(streaming) as server:
        keeper, _ = await open_member(kit, server, "?rooms=r")  # keeps the room alive while alice is away
        alice, _ = await open_member(kit, server, "?rooms=r")
        try:
            for n in range(3):
                await streaming.broadcast("r", n)
            seen = await alice.until(lambda e: kit.is_message(e, 2))
            assert messages(seen) == [0, 1, 2]
            last_id = seen[-1].id
            assert last_id is not None
            await alice.close()
            await kit.eventually(lambda: len(streaming.connections) == 1)
            for n in range(3, 6):
                await streaming.broadcast("r", n)
            if resume_by == "header":
                alice, _ = await open_member(kit, server, "?rooms=r", {"Last-Event-ID": last_id})
            else:
                alice, _ = await open_member(kit, server, f"?rooms=r&last_event_id={last_id}")
            await streaming.broadcast("r", 6)
            resumed = await alice.until(lambda e: kit.is_message(e, 6))
            assert messages(resumed) == [3, 4, 5, 6]
            sequences = [e.json()["sequence"] for e in resumed if kit.is_message(e)]
            assert [e.id for e in resumed if kit.is_message(e)] == [f"r:{s}" for s in sequences]
            await streaming.broadcast("r", 7)
            assert messages(await alice.until(lambda e: kit.is_message(e, 7))) == [7]
        finally:
            await keeper.close()
            await alice.close()


async def test_resume_in_several_rooms_from_one_id(kit: type[Kit]) -> None:
    streaming = kit.make_streaming()
    async with serve(streaming) as server:
        keeper, _ = await open_member(kit, server, "?rooms=a,b,c")
        alice, _ = await open_member(kit, server, "?rooms=a,b")
        try:
            await streaming.broadcast("a", "a0")
            await streaming.broadcast("b", "b0")
            seen = await alice.until(lambda e: kit.is_message(e, "b0"))
            last_id = seen[-1].id
            assert last_id is not None
            assert last_id.startswith("a:") and ",b:" in last_id
            await alice.close()
            await kit.eventually(lambda: len(streaming.connections) == 1)
            for data in ("a1", "b1", "a2", "c1", "b2"):
                await streaming.broadcast(data[0], data)
            # the cursor names the rooms: it resumes them even without ?rooms=
            alice, _ = await open_member(kit, server, "", {"Last-Event-ID": last_id})
            await streaming.broadcast("b", "b3")
            resumed = messages(await alice.until(lambda e: kit.is_message(e, "b3")))
            assert [m for m in resumed if m.startswith("a")] == ["a1", "a2"]
            assert [m for m in resumed if m.startswith("b")] == ["b1", "b2", "b3"]
            assert "c1" not in resumed and len(resumed) == 5
        finally:
            await keeper.close()
            await alice.close()


async def test_a_gap_older_than_history_gets_resync_not_a_hole(kit: type[Kit]) -> None:
    streaming = kit.make_streaming({"rooms": {"history_size": 3}})
    async with serve(streaming) as server:
        keeper, _ = await open_member(kit, server, "?rooms=r")
        alice, _ = await open_member(kit, server, "?rooms=r")
        try:
            await streaming.broadcast("r", 0)
            last_id = (await alice.until(lambda e: kit.is_message(e, 0)))[-1].id
            assert last_id is not None
            await alice.close()
            await kit.eventually(lambda: len(streaming.connections) == 1)
            for n in range(1, 6):
                await streaming.broadcast("r", n)
            alice, _ = await open_member(kit, server, "?rooms=r", {"Last-Event-ID": last_id})
            await streaming.broadcast("r", 6)
            resumed = await alice.until(lambda e: kit.is_message(e, 6))
            resync = [e.json()["data"] for e in resumed if kit.is_system(e, "resync")]
            assert len(resync) == 1 and resync[0]["room_id"] == "r"
            assert messages(resumed) == [3, 4, 5, 6], "after resync: what history still holds, then live"
        finally:
            await keeper.close()
            await alice.close()


async def test_malformed_last_event_id_is_ignored_and_said_so(kit: type[Kit]) -> None:
    streaming = kit.make_streaming()
    async with serve(streaming) as server:
        alice, _ = await open_member(kit, server, "?rooms=r", {"Last-Event-ID": "not a cursor"})
        try:
            seen = await alice.until(lambda e: kit.is_system(e, "room.joined"))
            ignored = [e.json()["data"] for e in seen if kit.is_system(e, "resume.ignored")]
            assert ignored and ignored[0]["last_event_id"] == "not a cursor"
            await streaming.broadcast("r", "live")
            assert messages(await alice.until(lambda e: kit.is_message(e))) == ["live"]
        finally:
            await alice.close()


async def test_posted_join_with_since_replays_in_order(kit: type[Kit]) -> None:
    streaming = kit.make_streaming()
    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        keeper, _ = await open_member(kit, server, "?rooms=r")
        alice, session = await open_member(kit, server)
        try:
            first = await streaming.broadcast("r", 0)
            for n in range(1, 4):
                await streaming.broadcast("r", n)
            answer = await post(client, session, {"type": "join", "room_id": "r", "since": first})
            assert answer.status_code == 202
            await streaming.broadcast("r", 4)
            assert messages(await alice.until(lambda e: kit.is_message(e, 4))) == [1, 2, 3, 4]
        finally:
            await keeper.close()
            await alice.close()


async def test_shutdown_tells_streams_and_ends_them(kit: type[Kit]) -> None:
    streaming = kit.make_streaming({"server": {"reconnect_hint": "1500ms"}})
    async with serve(streaming) as server:
        alice, _ = await open_member(kit, server, "?rooms=r")
        await alice.until(lambda e: kit.is_system(e, "room.joined"))
    # the server has stopped: what alice got before her stream ended
    try:
        rest = [e async for e in alice.events()]
        assert alice.ended
        names = [e.json().get("event") for e in rest]
        assert names[:2] == ["server.shutdown", "connection.closed"]
        assert rest[0].json()["data"] == {"reconnect_after_ms": 1500}
        assert rest[1].retry == 1500 and rest[1].json()["data"]["code"] == 1001
    finally:
        await alice.close()


@pytest.mark.parametrize("linger", ["30s", "0s"])
async def test_resume_into_a_room_left_empty(kit: type[Kit], linger: str) -> None:
    """Alone in a room: while she is away the node keeps hearing it for rooms.history_linger,
    so she resumes exactly; past it (0s here) the node stopped hearing: resync, no silent hole."""
    streaming = kit.make_streaming({"rooms": {"history_linger": linger}})
    async with serve(streaming) as server:
        alice, _ = await open_member(kit, server, "?rooms=solo")
        try:
            await streaming.broadcast("solo", 0)
            last_id = (await alice.until(lambda e: kit.is_message(e, 0)))[-1].id
            assert last_id is not None
            await alice.close()
            await kit.eventually(lambda: not streaming.connections)
            await streaming.broadcast("solo", 1)  # nobody here is in "solo" now
            alice, _ = await open_member(kit, server, "?rooms=solo", {"Last-Event-ID": last_id})
            await streaming.broadcast("solo", 2)
            resumed = await alice.until(lambda e: kit.is_message(e, 2))
            resyncs = [e.json()["data"]["room_id"] for e in resumed if kit.is_system(e, "resync")]
            if linger == "0s":
                assert resyncs == ["solo"] and messages(resumed) == [2]
            else:
                assert resyncs == [] and messages(resumed) == [1, 2]
        finally:
            await alice.close()


class SlowStore(RoomStore):
    """A room store that takes its time to add a member (a remote store would): live traffic
    reaches a resuming member while its join is still awaiting, before history is replayed."""

    name = "slow"

    def __init__(self) -> None:
        self._rooms: dict[str, dict[str, Member]] = {}
        self.adding = asyncio.Event()
        self.release = asyncio.Event()

    async def add_member(self, room: str, member: Member) -> None:
        self._rooms.setdefault(room, {})[member.connection_id] = member
        if member.connection_id.startswith("ss-") and len(self._rooms[room]) > 1:
            self.adding.set()
            await self.release.wait()

    async def remove_member(self, room: str, connection_id: str) -> None:
        self._rooms.get(room, {}).pop(connection_id, None)
        if not self._rooms.get(room, True):
            del self._rooms[room]

    async def members(self, room: str) -> list[Member]:
        return list(self._rooms.get(room, {}).values())

    async def rooms(self) -> list[str]:
        return sorted(self._rooms)


async def test_live_traffic_during_a_resuming_join_is_sent_in_order_once(kit: type[Kit]) -> None:
    store = SlowStore()

    class Stores:
        @hookimpl
        def streaming_register_room_stores(self) -> dict[str, Callable[[StreamingConfig], RoomStore]]:
            return {"slow": lambda config: store}

    streaming = kit.make_streaming({"rooms": {"store": "slow"}}, plugins=(Stores(),))
    async with serve(streaming) as server:
        keeper = await open_connection(streaming)  # in-process member: keeps the room heard
        await keeper.join_room("r")
        alice, _ = await open_member(kit, server, "?rooms=r")
        store.release.set()
        try:
            await streaming.broadcast("r", 0)
            last_id = (await alice.until(lambda e: kit.is_message(e, 0)))[-1].id
            assert last_id is not None
            await alice.close()
            await kit.eventually(lambda: len(streaming.connections) == 1)
            await streaming.broadcast("r", 1)
            store.adding.clear()
            store.release.clear()
            opening = asyncio.ensure_future(open_member(kit, server, "?rooms=r", {"Last-Event-ID": last_id}))
            await asyncio.wait_for(store.adding.wait(), 5)  # alice is a local member now, history not replayed yet
            await streaming.broadcast("r", 2)  # live, reaches her before the replay of 1
            store.release.set()
            alice, _ = await opening
            await streaming.broadcast("r", 3)
            resumed = await alice.until(lambda e: kit.is_message(e, 3))
            assert messages(resumed) == [1, 2, 3]
        finally:
            await alice.close()


async def test_the_cursor_is_the_engines_position_not_the_clock(kit: type[Kit]) -> None:
    """A member joining a room whose positions began long ago: its cursor is where the room stands.

    Positions are the engine's (the memory backend counts up from the clock at the room's first message);
    a cursor taken from the clock at the join stood above every later message, so a resume from it missed
    them all.
    """
    import asyncio

    streaming = kit.make_streaming()
    async with serve(streaming) as server:
        keeper, _ = await open_member(kit, server, "?rooms=r")
        await streaming.broadcast("r", "before")
        await asyncio.sleep(0.1)  # 100,000 us on the clock, one position in the room
        alice, _ = await open_member(kit, server, "?rooms=r")
        try:
            await streaming.broadcast("r", 0)
            seen = await alice.until(lambda e: kit.is_message(e, 0))
            last_id = seen[-1].id
            assert last_id == f"r:{seen[-1].json()['sequence']}"
            await alice.close()
            await kit.eventually(lambda: len(streaming.connections) == 1)
            for n in (1, 2):
                await streaming.broadcast("r", n)
            alice, _ = await open_member(kit, server, "?rooms=r", {"Last-Event-ID": last_id})
            resumed = await alice.until(lambda e: kit.is_message(e, 2))
            assert messages(resumed) == [1, 2]
        finally:
            await keeper.close()
            await alice.close()
