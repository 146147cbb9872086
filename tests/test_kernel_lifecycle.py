"""The kernel's one lifecycle and fan-out isolation, with a transport-less connection.

The same table runs over real transports in test_failure_table.py; here
each row is checked against the kernel alone, including the counts that a
client cannot see (connections, per-IP totals, hooks fired once).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from forge_streaming import (
    CloseCode,
    Connection,
    Identity,
    OutboundFrame,
    Refused,
    Streaming,
    UnknownTransport,
    hookimpl,
)
from forge_streaming.testing import RecordingConnection, open_connection


@pytest.fixture(autouse=True)
def only_memory_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_STREAMING_PLUGINS_ALLOW", "memory-pubsub,memory-rooms")


class Disconnects:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []
        self.dropped: list[tuple[str, str]] = []

    @hookimpl
    def streaming_disconnected(self, connection: Connection, code: int, reason: str) -> None:
        self.calls.append((connection.id, code, reason))

    @hookimpl
    def streaming_connection_dropped(self, connection: Connection, reason: str) -> None:
        self.dropped.append((connection.id, reason))


async def serve(streaming: Streaming, conn: RecordingConnection, handler: Any) -> None:
    await asyncio.wait_for(streaming.serve_connection(conn, handler), 5)


async def test_a_failing_connected_hook_closes_only_that_connection_1011_and_uncounts_it() -> None:
    class Broken:
        @hookimpl
        def streaming_connected(self, connection: Connection) -> None:
            raise RuntimeError("audit log down")

    seen = Disconnects()
    streaming = Streaming({"limits": {"max_connections_per_ip": 1}}, plugins=[seen, Broken()])
    async with streaming.running():
        handled: list[str] = []

        async def handler(conn: Connection) -> None:
            handled.append(conn.id)

        for _ in range(3):  # were it still counted, the per-IP limit of 1 would refuse the next ones
            conn = RecordingConnection(streaming)
            await serve(streaming, conn, handler)
            assert conn.refused is None and (conn.close_code, conn.close_reason) == (1011, "internal error")
        assert not handled
        assert len(streaming.connections) == 0
        assert [(code, reason) for _, code, reason in seen.calls] == [(1011, "internal error")] * 3


@pytest.mark.parametrize(("raised", "expected"), [
    (None, (1000, "")),
    (Refused("not today", close_code=4003), (4003, "not today")),
    (RuntimeError("bug"), (1011, "internal error")),
])
async def test_a_handler_ends_with_the_same_close_code_whatever_the_transport(
        raised: BaseException | None, expected: tuple[int, str]) -> None:
    seen = Disconnects()
    streaming = Streaming({}, plugins=[seen])
    async with streaming.running():
        async def handler(conn: Connection) -> None:
            if raised is not None:
                raise raised

        conn = RecordingConnection(streaming)
        await serve(streaming, conn, handler)
        assert (conn.close_code, conn.close_reason) == expected
        assert [(c, r) for _, c, r in seen.calls] == [expected]
        assert len(streaming.connections) == 0


async def test_a_failing_accept_is_closed_1011_and_uncounted() -> None:
    class BrokenAccept(RecordingConnection):
        async def accept(self) -> None:
            raise OSError("socket gone")

    seen = Disconnects()
    streaming = Streaming({}, plugins=[seen])
    async with streaming.running():
        conn = BrokenAccept(streaming)
        await serve(streaming, conn, None)
        assert conn.close_code == 1011
        assert len(streaming.connections) == 0 and len(seen.calls) == 1


async def test_refusals_before_accept_answer_with_their_status_and_fire_no_disconnect() -> None:
    class NoGuests:
        @hookimpl
        def streaming_authenticate(self) -> None:
            raise Refused("log in first", status=401, code="unauthorized")

    seen = Disconnects()
    streaming = Streaming({}, plugins=[seen, NoGuests()])
    async with streaming.running():
        conn = RecordingConnection(streaming)
        await serve(streaming, conn, None)
        assert conn.refused == (401, "unauthorized", "log in first")
        assert not seen.calls and len(streaming.connections) == 0


async def test_a_handler_that_outlives_its_connection_is_cancelled_after_the_grace() -> None:
    streaming = Streaming({"server": {"handler_grace": "50ms"}})
    async with streaming.running():
        cancelled = asyncio.Event()

        async def sleeper(conn: Connection) -> None:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        conn = RecordingConnection(streaming)
        serving = asyncio.ensure_future(streaming.serve_connection(conn, sleeper))
        await asyncio.wait_for(conn.accepted.wait(), 5)
        conn.ended(CloseCode.GOING_AWAY, "client left")
        await asyncio.wait_for(serving, 5)
        assert cancelled.is_set() and (conn.close_code, conn.close_reason) == (1001, "client left")
        assert len(streaming.connections) == 0


async def test_a_member_whose_delivery_fails_is_dropped_and_the_room_carries_on() -> None:
    class Exploding(RecordingConnection):
        def deliver(self, frame: OutboundFrame) -> None:
            if frame.sequence is not None:
                raise RuntimeError("transport bug")
            super().deliver(frame)

    seen = Disconnects()
    streaming = Streaming({}, plugins=[seen])
    async with streaming.running():
        sender, bystander = await open_connection(streaming), await open_connection(streaming)
        broken = Exploding(streaming)
        broken.serving = asyncio.ensure_future(streaming.serve_connection(broken, _hold))
        await asyncio.wait_for(broken.accepted.wait(), 5)
        for conn in (sender, broken, bystander):
            await conn.join_room("r")
        for n in range(3):
            await streaming.room_protocol_frame(sender, f'{{"type":"message","room_id":"r","data":{n}}}')
        await asyncio.sleep(0.05)
        assert [f["data"] for f in bystander.frames("message")] == [0, 1, 2]
        assert sender.is_open and sender.close_code is None
        assert (broken.id, "delivery failed") in seen.dropped
        assert [c.id for c in streaming.local_members("r")] == [sender.id, bystander.id]
        assert broken.close_code == 1011


async def _hold(conn: Connection) -> None:
    await conn.wait_ended()


def test_handler_mistakes_are_refused_at_registration(make_streaming: Any) -> None:
    streaming: Streaming = make_streaming(only=["websocket", "memory-pubsub", "memory-rooms"])

    async def first(conn: Connection) -> None: ...

    async def second(conn: Connection) -> None: ...

    def not_async(conn: Connection) -> None: ...

    streaming.handle_websocket("/x", first)
    with pytest.raises(ValueError, match="already registered at '/x'"):
        streaming.handle_websocket("/x", second)
    with pytest.raises(TypeError, match="must be an async function"):
        streaming.handle_websocket("/y", not_async)  # type: ignore[type-var]  # the mistake under test
    with pytest.raises(UnknownTransport, match="no installed plugin provides the transport 'nope'"):
        streaming.handle("nope", "/x", first)


async def test_no_member_may_pose_as_a_device() -> None:
    """Messages a device publishes on the broker carry ``device:...`` user ids (issue 15): a login cannot claim one."""

    class Impostor:
        @hookimpl
        def streaming_authenticate(self) -> Identity:
            return Identity("device:thermostat")

    streaming = Streaming({}, plugins=[Impostor()])
    async with streaming.running():
        conn = RecordingConnection(streaming)
        await serve(streaming, conn, None)
        assert conn.refused is not None and conn.refused[:2] == (403, "reserved_user_id")
        assert not streaming.connections
