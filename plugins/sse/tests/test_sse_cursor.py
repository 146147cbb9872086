"""The resume cursor across room changes and late frames (members of one room take a faster path)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import httpx
from forge_streaming import Envelope
from forge_streaming.testing import RunningServer, serve

if TYPE_CHECKING:
    from conftest import Kit, RawSSE, SSEEvent  # the kit's types (test modules do not import conftest at run time)


async def open_member(kit: type[Kit], server: RunningServer, query: str = "",
                      headers: dict[str, str] | None = None) -> tuple[RawSSE, dict[str, Any]]:
    raw = await kit.RawSSE.open(server.url, "/sse" + query, headers)
    assert raw.status == 200
    session = await asyncio.wait_for(raw.next_event(), 5)
    assert session is not None and session.event == "session"
    return raw, session.json()


async def post(client: httpx.AsyncClient, session: dict[str, Any], frame: dict[str, Any]) -> httpx.Response:
    return await client.post(session["send_url"], content=json.dumps(frame),
                             headers={"x-stream-token": session["token"]})


def messages(events: Iterable[SSEEvent]) -> list[Any]:
    return [e.json()["data"] for e in events if e.event == "message" and e.json().get("type") == "message"]


def late_envelope(room: str, sequence: int, data: str) -> Envelope:
    frame = {"type": "message", "id": "late", "room_id": room, "user_id": "other-node", "data": data,
             "timestamp": "2026-01-01T00:00:00.000Z", "sequence": sequence}
    return Envelope(room=room, payload=json.dumps(frame).encode(), sequence=sequence, sender="other-node")


async def test_a_frame_arriving_late_does_not_move_the_cursor_back(kit: type[Kit]) -> None:
    streaming = kit.make_streaming()
    async with serve(streaming) as server:
        alice, _ = await open_member(kit, server, "?rooms=r")
        try:
            await alice.until(lambda e: kit.is_system(e, "room.joined"))
            first = await streaming.broadcast("r", 1)
            newest = await streaming.broadcast("r", 2)
            assert first is not None and newest is not None
            got = await alice.until(lambda e: kit.is_message(e, 2))
            assert [e.id for e in got if kit.is_message(e)] == [f"r:{first}", f"r:{newest}"]
            streaming.on_envelope(late_envelope("r", first + 1, "late"))  # another node's, older than newest
            third = await streaming.broadcast("r", 3)
            rest = await alice.until(lambda e: kit.is_message(e, 3))
            assert messages(rest) == ["late", 3]
            assert [e.id for e in rest] == [f"r:{newest}", f"r:{third}"]
        finally:
            await alice.close()


async def test_cursor_follows_joins_and_leaves_and_resumes_exactly(kit: type[Kit]) -> None:
    streaming = kit.make_streaming()
    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        alice, session = await open_member(kit, server, "?rooms=r")
        try:
            await alice.until(lambda e: kit.is_system(e, "room.joined"))
            seqs = [await streaming.broadcast("r", n) for n in range(3)]
            got = await alice.until(lambda e: kit.is_message(e, 2))
            assert got[-1].id == f"r:{seqs[-1]}"
            # joining a second room: the cursor keeps r's position and adds s
            assert (await post(client, session, {"type": "join", "room_id": "s"})).status_code == 202
            joined = (await alice.until(lambda e: kit.is_system(e, "room.joined")))[-1]
            assert joined.id is not None and joined.id.startswith(f"r:{seqs[-1]},s:")
            s_pos = joined.id.split(",")[1]
            r3 = await streaming.broadcast("r", 3)
            got = await alice.until(lambda e: kit.is_message(e, 3))
            assert got[-1].id == f"r:{r3},{s_pos}"
            s4 = await streaming.broadcast("s", 4)
            got = await alice.until(lambda e: kit.is_message(e, 4))
            assert got[-1].id == f"r:{r3},s:{s4}"
            # leaving it: back to one room, positions carried on
            assert (await post(client, session, {"type": "leave", "room_id": "s"})).status_code == 202
            left = (await alice.until(lambda e: kit.is_system(e, "room.left")))[-1]
            assert left.id == f"r:{r3}"
            r5 = await streaming.broadcast("r", 5)
            got = await alice.until(lambda e: kit.is_message(e, 5))
            assert got[-1].id == f"r:{r5}"
            last_id = got[-1].id
        finally:
            await alice.close()
        await kit.eventually(lambda: not streaming.connections)
        missed = [await streaming.broadcast("r", n) for n in (6, 7)]
        assert None not in missed
        alice, _ = await open_member(kit, server, "", {"Last-Event-ID": last_id})
        try:
            resumed = await alice.until(lambda e: kit.is_message(e, 7))
            assert messages(resumed) == [6, 7]
            assert resumed[-1].id == f"r:{missed[-1]}"
            r8 = await streaming.broadcast("r", 8)
            got = await alice.until(lambda e: kit.is_message(e, 8))
            assert messages(got) == [8] and got[-1].id == f"r:{r8}"
        finally:
            await alice.close()


async def test_joins_that_would_overflow_the_resume_id_are_refused_and_the_stream_still_resumes(
        kit: type[Kit]) -> None:
    """100 rooms with long names made a 152 KB ``id:`` on every event, which no resume could carry back (issue 16)."""
    streaming = kit.make_streaming({"limits": {"max_rooms_per_connection": 200}})
    names = [f"{n:03d}-" + "é" * 120 for n in range(100)]  # percent-encoded: about 750 bytes each
    async with serve(streaming) as server, httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        alice, session = await open_member(kit, server)
        try:
            for name in names:
                assert (await post(client, session, {"type": "join", "room_id": name})).status_code == 202
            refused = await alice.until(lambda e: e.json().get("type") == "error"
                                        and e.json()["data"]["code"] == "cursor_full")
            joined = [e for e in refused if kit.is_system(e, "room.joined")]
            assert 10 < len(joined) < 30, len(joined)  # as many as one Last-Event-ID can carry back
            seq = await streaming.broadcast(names[0], "after")
            got = await alice.until(lambda e: kit.is_message(e, "after"))
            last_id = got[-1].id
            assert last_id is not None and len(last_id.encode()) <= 16_384
        finally:
            await alice.close()
        await kit.eventually(lambda: not streaming.connections)
        missed = await streaming.broadcast(names[0], "missed")
        assert missed is not None and seq is not None
        again, _ = await open_member(kit, server, "", {"Last-Event-ID": last_id})
        try:
            resumed = await again.until(lambda e: kit.is_message(e, "missed"))
            assert not any(kit.is_system(e, "resume.ignored") for e in resumed)
        finally:
            await again.close()
