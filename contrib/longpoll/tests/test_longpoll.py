"""The long-polling transport over a real uvicorn server, with httpx long-poll clients and
`websockets` members in the same rooms."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import websockets
from forge_streaming import ConfigError, ConnectionRequest, Identity, Refused, Streaming, hookimpl
from forge_streaming.testing import serve
from forge_streaming_longpoll import LongPollConnection, LongPollTransport

pytestmark = pytest.mark.timeout(60)

ALLOW = "longpoll,websocket,memory-pubsub,memory-rooms"


@pytest.fixture(autouse=True)
def only_these_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_STREAMING_PLUGINS_ALLOW", ALLOW)


class LongPollClient:
    """A long-polling client as a browser script would be: open, send, poll, end."""

    def __init__(self, http: httpx.AsyncClient, base: str) -> None:
        self.http, self.base = http, base
        self.session = self.token = ""
        self.frames: list[Any] = []

    async def open(self, **kwargs: Any) -> httpx.Response:
        answer = await self.http.post(self.base, **kwargs)
        if answer.status_code == 200:
            self.session, self.token = answer.json()["session"], answer.json()["token"]
        return answer

    def auth(self) -> dict[str, Any]:
        return {"params": {"session": self.session}, "headers": {"X-Session-Token": self.token}}

    async def send(self, frame: dict[str, Any] | str) -> httpx.Response:
        body = frame if isinstance(frame, str) else json.dumps(frame)
        return await self.http.post(self.base + "/send", content=body.encode(), **self.auth())

    async def poll(self) -> httpx.Response:
        answer = await self.http.get(self.base + "/poll", **self.auth())
        if answer.status_code == 200:
            self.frames += answer.json()
        return answer

    async def end(self) -> httpx.Response:
        return await self.http.delete(self.base, **self.auth())

    async def poll_until(self, wanted: Callable[[Any], bool], timeout: float = 5.0) -> Any:
        async def until() -> Any:
            while True:
                found = next((f for f in self.frames if wanted(f)), None)
                if found is not None:
                    return found
                answer = await self.poll()
                assert answer.status_code == 200, answer.text

        return await asyncio.wait_for(until(), timeout)


async def ws_next(ws: Any, wanted: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
    async def until() -> dict[str, Any]:
        while True:
            frame: dict[str, Any] = json.loads(await ws.recv())
            if wanted(frame):
                return frame

    return await asyncio.wait_for(until(), timeout)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async def until() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(until(), timeout)


def sessions(streaming: Streaming) -> dict[str, LongPollConnection]:
    transport = streaming.transports["longpoll"]
    assert isinstance(transport, LongPollTransport)
    return transport.sessions


def is_message(data: Any) -> Callable[[Any], bool]:
    return lambda f: isinstance(f, dict) and f.get("type") == "message" and f.get("data") == data


def is_joined(room: str) -> Callable[[Any], bool]:
    return lambda f: isinstance(f, dict) and f.get("event") == "room.joined" and f["data"]["room_id"] == room


class Recorder:
    def __init__(self) -> None:
        self.disconnected: list[tuple[str, int, str]] = []
        self.dropped: list[tuple[str, str]] = []

    @hookimpl
    def streaming_disconnected(self, connection: Any, code: int, reason: str) -> None:
        self.disconnected.append((connection.id, code, reason))

    @hookimpl
    def streaming_connection_dropped(self, connection: Any, reason: str) -> None:
        self.dropped.append((connection.id, reason))


async def test_longpoll_and_websocket_members_share_a_room() -> None:
    async with serve(Streaming({})) as server, httpx.AsyncClient(timeout=10) as http:
        lp = LongPollClient(http, server.url + "/lp")
        assert (await lp.open()).status_code == 200
        assert (await lp.send({"type": "join", "room_id": "lobby"})).status_code == 202
        await lp.poll_until(is_joined("lobby"))
        async with websockets.connect(server.ws_url + "/ws") as ws:
            await ws.send(json.dumps({"type": "join", "room_id": "lobby"}))
            await ws_next(ws, lambda f: f.get("event") == "room.joined")

            await lp.send({"type": "message", "room_id": "lobby", "data": "from long-poll"})
            got = await ws_next(ws, lambda f: f.get("type") == "message")
            assert got["data"] == "from long-poll" and got["user_id"] == lp.session

            await ws.send(json.dumps({"type": "message", "room_id": "lobby", "data": "from websocket"}))
            got = await lp.poll_until(is_message("from websocket"))
            assert got["room_id"] == "lobby" and isinstance(got["sequence"], int)
        assert sorted(c.transport for c in server.streaming.connections.values()) == ["longpoll"]
        assert (await lp.end()).status_code == 204


async def test_refused_authentication_answers_401_on_open() -> None:
    class Gate:
        @hookimpl
        def streaming_authenticate(self, request: ConnectionRequest) -> Identity:
            if request.headers.get("authorization") != "Bearer open-sesame":
                raise Refused("bad or missing token", status=401, code="unauthenticated")
            return Identity(user_id="alice")

    async with serve(Streaming({}, plugins=[Gate()])) as server, httpx.AsyncClient(timeout=10) as http:
        lp = LongPollClient(http, server.url + "/lp")
        refused = await lp.open()
        assert refused.status_code == 401
        assert refused.json() == {"error": "unauthenticated", "message": "bad or missing token"}
        assert server.streaming.connections == {} and sessions(server.streaming) == {}

        assert (await lp.open(headers={"Authorization": "Bearer open-sesame"})).status_code == 200
        await lp.send({"type": "join", "room_id": "r"})
        joined = await lp.poll_until(is_joined("r"))
        assert joined["data"]["user_id"] == "alice"


async def test_an_unpolled_session_ends_after_session_timeout_once() -> None:
    recorder = Recorder()
    streaming = Streaming({"longpoll": {"session_timeout": "300ms"}}, plugins=[recorder])
    async with serve(streaming) as server, httpx.AsyncClient(timeout=10) as http:
        lp = LongPollClient(http, server.url + "/lp")
        await lp.open()
        await lp.send({"type": "join", "room_id": "r"})
        await wait_until(lambda: len(recorder.disconnected) > 0)
        await asyncio.sleep(0.5)  # and not a second time
        assert recorder.disconnected == [(lp.session, 1006, "session timeout")]
        assert recorder.dropped == []
        assert streaming.connections == {} and await streaming.presence("r") == []
        assert (await lp.poll()).status_code == 404


async def test_a_client_that_never_polls_is_dropped_past_its_bound_and_the_room_carries_on() -> None:
    recorder = Recorder()
    streaming = Streaming({"longpoll": {"send_buffer": "4KiB"}}, plugins=[recorder])
    async with serve(streaming) as server, httpx.AsyncClient(timeout=10) as http:
        slow = LongPollClient(http, server.url + "/lp")
        await slow.open()
        await slow.send({"type": "join", "room_id": "r"})
        await wait_until(lambda: len(streaming.local_members("r")) == 1)
        async with websockets.connect(server.ws_url + "/ws") as ws:
            await ws.send(json.dumps({"type": "join", "room_id": "r"}))
            await ws_next(ws, lambda f: f.get("event") == "room.joined")
            for n in range(40):
                await streaming.broadcast("r", {"n": n, "pad": "x" * 200})
            await wait_until(lambda: recorder.dropped != [])
            assert recorder.dropped == [(slow.session, "slow consumer")]
            assert [c.transport for c in streaming.local_members("r")] == ["websocket"]
            await streaming.broadcast("r", "still here")
            await ws_next(ws, lambda f: f.get("data") == "still here")
        gone = await slow.poll()
        assert gone.status_code == 410
        assert gone.json() == {"error": "session_ended", "code": 1008, "reason": "slow consumer"}
        assert (await slow.poll()).status_code == 404
        await wait_until(lambda: len(recorder.disconnected) == 2)  # the slow client and the WebSocket member
        assert [d for d in recorder.disconnected if d[0] == slow.session] == [(slow.session, 1008, "slow consumer")]


async def test_a_poll_waits_for_frames_and_answers_an_empty_array_on_timeout() -> None:
    streaming = Streaming({"longpoll": {"poll_timeout": "200ms"}})
    async with serve(streaming) as server, httpx.AsyncClient(timeout=10) as http:
        lp = LongPollClient(http, server.url + "/lp")
        await lp.open()
        await lp.send({"type": "join", "room_id": "r"})
        await lp.poll_until(is_joined("r"))
        started = asyncio.get_running_loop().time()
        empty = await lp.poll()
        assert empty.json() == [] and asyncio.get_running_loop().time() - started >= 0.19

        waiting = asyncio.ensure_future(lp.poll())
        await wait_until(lambda: sessions(streaming)[lp.session].polling)
        assert (await lp.poll()).status_code == 409  # one poll at a time
        await streaming.broadcast("r", "wake up")
        assert is_message("wake up")((await waiting).json()[0])


async def test_bad_requests_are_answered_and_the_session_stays() -> None:
    streaming = Streaming({"limits": {"max_message_size": 1024}})
    async with serve(streaming) as server, httpx.AsyncClient(timeout=10) as http:
        lp = LongPollClient(http, server.url + "/lp")
        await lp.open()
        stranger = LongPollClient(http, server.url + "/lp")
        stranger.session, stranger.token = lp.session, "guessed"
        assert (await stranger.poll()).status_code == 403
        stranger.session = "no-such-session"
        assert (await stranger.poll()).status_code == 404
        assert (await lp.send("x" * 2000)).json()["error"] == "too_large"
        assert (await http.post(server.url + "/lp/send", content=b"\xff", **lp.auth())).status_code == 400
        assert (await lp.send("not json")).status_code == 202
        error = await lp.poll_until(lambda f: f.get("type") == "error")
        assert error["data"]["code"] == "invalid_json"
        assert list(streaming.connections) == [lp.session]
        await lp.send({"type": "join", "room_id": "r"})
        await lp.poll_until(is_joined("r"))


async def test_inbox_full_is_429() -> None:
    started = asyncio.Event()

    async def never_reads(conn: Any) -> None:
        started.set()
        await conn.wait_ended()

    streaming = Streaming({"longpoll": {"inbox": 2}})
    streaming.handle("longpoll", "/quiet", never_reads)
    async with serve(streaming) as server, httpx.AsyncClient(timeout=10) as http:
        lp = LongPollClient(http, server.url + "/quiet")
        await lp.open()
        await asyncio.wait_for(started.wait(), 5)
        assert [(await lp.send(f'"{n}"')).status_code for n in range(3)] == [202, 202, 429]
        assert (await lp.send("x")).json()["error"] == "inbox_full"


async def test_a_handler_reads_and_writes_and_ending_the_session_tells_it() -> None:
    recorder = Recorder()
    ended: list[tuple[int | None, str]] = []

    async def echo(conn: Any) -> None:
        try:
            while True:
                message = await conn.read_message()
                await conn.write_message(f"echo: {message.data}")
        finally:
            ended.append((conn.close_code, conn.close_reason))

    streaming = Streaming({}, plugins=[recorder])
    streaming.handle("longpoll", "/echo", echo)
    async with serve(streaming) as server, httpx.AsyncClient(timeout=10) as http:
        lp = LongPollClient(http, server.url + "/echo")
        await lp.open()
        await lp.send("héllo")
        assert await lp.poll_until(lambda f: f == "echo: héllo") == "echo: héllo"
        assert (await lp.end()).status_code == 204
        await wait_until(lambda: len(recorder.disconnected) == 1)
        assert ended == [(1000, "client ended the session")]
        assert recorder.disconnected[0][1:] == (1000, "client ended the session")
        assert (await lp.poll()).status_code == 404


async def test_a_handler_that_returns_closes_the_session_and_the_client_learns_the_code() -> None:
    async def bye(conn: Any) -> None:
        conn.send_frame({"type": "system", "event": "bye"})
        raise Refused("not today", close_code=4000)

    streaming = Streaming({})
    streaming.handle("longpoll", "/bye", bye)
    async with serve(streaming) as server, httpx.AsyncClient(timeout=10) as http:
        lp = LongPollClient(http, server.url + "/bye")
        await lp.open()
        assert (await lp.poll()).json() == [{"type": "system", "event": "bye"}]  # what was queued comes first
        last = await lp.poll()
        assert last.status_code == 410 and last.json() == {"error": "session_ended", "code": 4000,
                                                            "reason": "not today"}


async def test_shutdown_tells_a_waiting_poll() -> None:
    streaming = Streaming({})
    async with serve(streaming) as server:
        async with httpx.AsyncClient(timeout=10) as http:
            lp = LongPollClient(http, server.url + "/lp")
            await lp.open()
            await lp.send({"type": "join", "room_id": "r"})
            await lp.poll_until(is_joined("r"))
            waiting = asyncio.ensure_future(lp.poll())
            await wait_until(lambda: sessions(streaming)[lp.session].polling)
            await streaming.drain(timeout=2)
            frames = (await asyncio.wait_for(waiting, 5)).json()
            assert [f.get("event") for f in frames] == ["server.shutdown"]
            assert (await lp.poll()).json()["code"] == 1001


def test_bad_settings_are_refused_with_the_key() -> None:
    with pytest.raises(ConfigError, match="longpoll.poll_timeout"):
        Streaming({"longpoll": {"poll_timeout": "soon"}})
    with pytest.raises(ConfigError, match="longpoll.inbox"):
        Streaming({"longpoll": {"inbox": 0}})


async def test_a_client_that_lost_a_poll_response_rejoins_with_since_and_gets_it_again() -> None:
    async with serve(Streaming({})) as server, httpx.AsyncClient(timeout=10) as http:
        lp = LongPollClient(http, server.url + "/lp")
        await lp.open()
        await lp.send({"type": "join", "room_id": "r"})
        await lp.poll_until(is_joined("r"))
        first = await server.streaming.broadcast("r", "seen")
        await lp.poll_until(is_message("seen"))
        await server.streaming.broadcast("r", "lost 1")
        await server.streaming.broadcast("r", "lost 2")
        await lp.poll_until(is_message("lost 2"))
        lp.frames.clear()  # as if that response never arrived
        await lp.send({"type": "join", "room_id": "r", "since": first})
        await lp.poll_until(is_message("lost 2"))
        assert [f["data"] for f in lp.frames if f.get("type") == "message"] == ["lost 1", "lost 2"]
