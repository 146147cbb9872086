"""What an open, idle connection keeps: no handshake leftovers, no per-connection deques.

These pin the state, not sizes: the parsed request and the handshake
response are gone once the handshake is done, the receive queue and the
``writable`` event are the plugin's light ones, and the kernel's request
headers are a view over the ASGI scope rather than a second copy.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from forge_streaming import Streaming
from forge_streaming.connection import ConnectionRequest, ScopeHeaders
from forge_streaming.testing import serve
from forge_streaming_websocket.protocol import ForgeWebSocketProtocol, _ReceiveQueue, _WritableEvent
from websockets.asyncio.client import connect


async def test_open_connection_keeps_no_handshake_leftovers() -> None:
    streaming = Streaming()
    seen: dict[str, Any] = {}
    release = asyncio.Event()

    async def idle(conn: Any) -> None:
        seen["conn"] = conn
        seen["protocol"] = conn._protocol
        await conn.write_message("ready")
        await release.wait()

    streaming.handle_websocket("/idle", idle)

    async with serve(streaming) as server:
        headers = {"Cookie": "a=1; b=two", "X-Token": "t1"}
        async with connect(server.ws_url + "/idle?room=k", additional_headers=headers) as ws:
            assert await asyncio.wait_for(ws.recv(), 5) == "ready"
            protocol: Any = seen["protocol"]
            assert isinstance(seen["protocol"], ForgeWebSocketProtocol)
            assert protocol.handshake_complete
            # uvicorn's copies of the handshake are released...
            assert not hasattr(protocol, "request")
            assert not hasattr(protocol, "response")
            # ...and so are the headers of the Request websockets' parser generator still refers to
            frame = protocol.conn.parser.gi_frame
            request = frame.f_locals.get("request") if frame is not None else None
            if request is not None:
                assert not request.headers
            # light replacements for asyncio.Queue / asyncio.Event, no waiter list while nobody waits
            assert type(protocol.queue) is _ReceiveQueue
            assert type(protocol.writable) is _WritableEvent
            assert protocol.writable.is_set() and protocol.writable._waiters is None
            # uvicorn's attributes are in slots: the instance dict stays empty
            assert vars(protocol) == {}, f"add {sorted(vars(protocol))} to _PROTOCOL_SLOTS"
            # the kernel's request reads the scope's header list instead of copying it
            conn = seen["conn"]
            assert isinstance(conn.request.headers, ScopeHeaders)
            assert conn.request.headers["x-token"] == "t1"
            assert conn.request.headers["host"] == f"127.0.0.1:{server.port}"
            assert conn.request.cookies == {"a": "1", "b": "two"}
            assert conn.query("room") == "k"
            # the connection still works both ways
            release.set()
            await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1000


def test_scope_headers_view_reads_like_the_dict_it_replaces() -> None:
    raw = [(b"Host", b"example.org"), (b"x-dup", b"first"), (b"cookie", b"a=1"), (b"X-Dup", b"caf\xe9")]
    request = ConnectionRequest.from_scope("websocket", {"path": "/ws", "headers": raw})
    expected = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
    assert request.headers == expected
    assert list(request.headers) == list(expected)
    assert len(request.headers) == 3
    assert request.headers["x-dup"] == "café"  # the last of a repeated header, as the dict had it
    assert request.headers.get("Host") is None  # names are lower-case, lookups are exact
    assert request.headers.get(None) is None  # type: ignore[call-overload]  # a wrong key on purpose, as a dict takes it
    assert "cookie" in request.headers and request.cookies == {"a": "1"}
    with pytest.raises(KeyError):
        request.headers["origin"]
    assert request.origin is None
    # direct construction with a dict keeps working (other transports and tests build requests)
    assert ConnectionRequest("fake", "/", headers={"origin": "o"}).origin == "o"
    # a one-shot iterable of headers is read once, not consumed by the first lookup
    once = ConnectionRequest.from_scope("websocket", {"headers": iter(raw)})
    assert once.headers["host"] == "example.org" and once.headers["host"] == "example.org"


async def test_receive_queue_is_fifo_and_passes_on_a_cancelled_wakeup() -> None:
    queue: _ReceiveQueue[int] = _ReceiveQueue()
    assert queue.empty() and queue.qsize() == 0 and not queue.full()
    for n in range(5):
        queue.put_nowait(n)
    assert queue.qsize() == 5
    assert [await queue.get() for _ in range(3)] == [0, 1, 2]
    queue.put_nowait(5)
    assert [queue.get_nowait() for _ in range(3)] == [3, 4, 5]
    assert queue.empty() and queue._items is None and queue._head == 0
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()

    first = asyncio.ensure_future(queue.get())
    second = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait(7)  # wakes the first getter, which is cancelled before it runs
    first.cancel()
    assert await asyncio.wait_for(second, 1) == 7
    assert first.cancelled()
    assert not queue._getters


async def test_writable_event_waits_and_wakes_every_waiter() -> None:
    event = _WritableEvent()
    assert not event.is_set()
    waiters = [asyncio.ensure_future(event.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert event._waiters is not None and len(event._waiters) == 3
    event.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True, True]
    assert event._waiters is None
    assert await event.wait() is True  # set: returns at once
    event.clear()
    cancelled = asyncio.ensure_future(event.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert event._waiters is None and not event.is_set()


async def test_reading_stops_only_when_the_handler_falls_behind() -> None:
    """No pause per message (two epoll syscalls each): reading stops past READ_AHEAD waiting messages."""
    from forge_streaming_websocket.protocol import READ_AHEAD

    streaming = Streaming()
    seen: dict[str, Any] = {}
    go = asyncio.Event()

    async def lazy(conn: Any) -> None:
        seen["protocol"] = conn._protocol
        await conn.write_message("ready")
        await go.wait()
        while True:
            seen.setdefault("read", []).append((await conn.read_message()).data)

    streaming.handle_websocket("/lazy", lazy)

    async with serve(streaming) as server:
        async with connect(server.ws_url + "/lazy") as ws:
            assert await asyncio.wait_for(ws.recv(), 5) == "ready"
            protocol: Any = seen["protocol"]
            await ws.send("first")
            for _ in range(50):
                if protocol.queue.qsize() == 1:
                    break
                await asyncio.sleep(0.01)
            assert protocol.queue.qsize() == 1 and not protocol.read_paused, "one waiting message: keep reading"
            for n in range(READ_AHEAD * 4):
                await ws.send(f"m{n}")
            for _ in range(100):
                if protocol.read_paused:
                    break
                await asyncio.sleep(0.01)
            assert protocol.read_paused, "past READ_AHEAD waiting messages, reading stops"
            go.set()
            for _ in range(200):
                if len(seen.get("read", [])) == READ_AHEAD * 4 + 1:
                    break
                await asyncio.sleep(0.01)
            assert seen["read"] == ["first"] + [f"m{n}" for n in range(READ_AHEAD * 4)]
            assert not protocol.read_paused


async def test_idle_room_connection_keeps_no_asgi_chain_no_timer_and_packed_headers(
        kit: Any, make_streaming: Any, frames: Any) -> None:
    """A room-protocol connection's life runs in one task of its own; its request headers are one bytes object."""
    from forge_streaming_websocket.headers import PackedHeaderList

    streaming: Streaming = make_streaming({"websocket": {"ping_interval": "30s", "ping_timeout": "10s"}})
    async with serve(streaming) as server:
        headers = {"Cookie": "a=1; b=two", "X-Token": "t1"}
        async with connect(server.ws_url + "/ws?room=k", additional_headers=headers) as ws:
            await frames.send(ws, type="join", room_id="k")
            await frames.next(ws, "system", event="room.joined")
            (conn,) = streaming.connections.values()
            protocol: Any = conn._protocol  # type: ignore[attr-defined]
            assert protocol.detached and protocol.direct
            # the ASGI call returned: no uvicorn run_asgi task, only the connection's own lifecycle task
            names = [task.get_coro().__qualname__ for task in protocol.tasks]
            assert "WebSocketsSansIOProtocol.run_asgi" not in names and "ForgeWebSocketProtocol.run_asgi" not in names
            assert len(names) == 1, names
            # keepalive: no TimerHandle of its own, an entry in the shared wheel
            assert protocol.ping_timer is None and protocol.pong_timer is None
            assert protocol.keepalive is not None and protocol.keepalive_key > 0
            # websockets' handshake leftovers: the server parser with its Request, the uuid
            assert protocol.conn.parser.gi_code.co_qualname == "Protocol.parse"
            assert protocol.conn.id is None
            assert vars(protocol) == {}
            # the headers: packed in the scope, read through the request as before
            assert isinstance(conn.request.scope["headers"], PackedHeaderList)  # type: ignore[index]
            assert conn.request.headers["x-token"] == "t1"
            assert conn.request.headers["host"] == f"127.0.0.1:{server.port}"
            assert conn.request.cookies == {"a": "1", "b": "two"}
            assert conn.query("room") == "k"
            assert "log" not in vars(conn)
            conn.log.info("a line with the connection id")  # built on use
            # it still works both ways
            await streaming.broadcast("k", "hello")
            assert (await frames.next(ws, "message"))["data"] == "hello"
        await kit.until(lambda: not streaming.connections)
        await kit.until(lambda: not protocol.tasks)
        assert protocol.keepalive_key == 0


def test_packed_headers_read_like_the_scope_list_and_the_kernel_view() -> None:
    from forge_streaming_websocket.headers import PackedHeaderList

    raw = [(b"Host", b"example.org"), (b"x-dup", b"first"), (b"cookie", b"a=1"), (b"X-Dup", b"caf\xe9")]
    packed = PackedHeaderList.pack(raw)
    assert packed is not None
    assert list(packed) == raw and len(packed) == 4 and packed[1] == raw[1] and packed == raw
    assert list(reversed(packed)) == raw[::-1]
    mine, kernel = ScopeHeaders(packed), ScopeHeaders(raw)
    assert dict(mine) == dict(kernel) and list(mine) == list(kernel) and len(mine) == len(kernel) == 3
    assert mine["x-dup"] == "café" and mine.get("Host") is None and mine.get(None) is None  # type: ignore[call-overload]
    empty = PackedHeaderList.pack([])
    assert empty is not None and list(empty) == [] and len(empty) == 0 and dict(ScopeHeaders(empty)) == {}
    assert PackedHeaderList.pack([(b"x", b"a\x00b")]) is None  # cannot be packed: the kernel's view is used


async def test_keepalive_wheel_pings_and_times_out_never_early() -> None:
    from forge_streaming_websocket.protocol import _Keepalive

    loop = asyncio.get_running_loop()
    fired: list[tuple[str, float]] = []

    class Fake:
        keepalive_key = 0

        def __init__(self, name: str) -> None:
            self.name = name
            self.client = name

        def keepalive_due(self) -> None:
            fired.append((self.name, loop.time()))

    wheel = _Keepalive(loop, _Keepalive.tick_for(0.1, 0.2))
    assert wheel.tick == 0.005
    a, b, c = Fake("a"), Fake("b"), Fake("c")
    start = loop.time()
    wheel.add(a, 0.05)  # type: ignore[arg-type]
    wheel.add(b, 0.02)  # type: ignore[arg-type]
    wheel.add(c, 0.03)  # type: ignore[arg-type]
    wheel.remove(c)  # type: ignore[arg-type]
    wheel.add(c, 0.0)  # type: ignore[arg-type]  # moved: now due first
    await asyncio.sleep(0.1)
    assert [name for name, _ in fired] == ["c", "b", "a"]
    at = dict(fired)
    assert at["b"] - start >= 0.02 - 0.002 and at["a"] - start >= 0.05 - 0.002  # uvloop timers are per millisecond
    assert at["a"] - start < 0.05 + 0.05
    assert len(wheel) == 0 and a.keepalive_key == 0
    assert _Keepalive.tick_for(20, 20) == 1.0 and _Keepalive.tick_for(None, None) == 1.0
