"""A resume is paced by the reader, not dropped (issue 16.3), on every TCP transport.

100 messages of 15 KB sit in a room's history (1.5 MB, more than the default
``limits.send_buffer`` of 1 MiB). A client resumes from before them (``join``
with ``since`` on WebSocket, ``Last-Event-ID`` on SSE, ``since`` on long-polling)
while reading slowly, and live messages are published while its replay is in
progress: it gets the replay, then the live messages, in order and once, and is
not dropped. Another member of the room gets every live message meanwhile.
WebTransport's twin is plugins/webtransport/tests/test_webtransport_pacing.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from forge_streaming import Streaming
from forge_streaming.testing import DropRecorder, RunningServer, eventually, serve

pytestmark = pytest.mark.timeout(60)

ALLOW = ("websocket", "sse", "longpoll", "memory-pubsub", "memory-rooms")
HISTORY = 100
LIVE = 20
PAD = "x" * 15_000


@pytest.fixture(autouse=True)
def only_these(streaming_plugins_only: Any) -> None:
    streaming_plugins_only(*ALLOW)



def at_least(items: list[Any], count: int) -> bool:
    return len(items) >= count



def small_socket(rcvbuf: int = 16 * 1024) -> socket.socket:
    """A client socket with a small receive buffer: when its reader stops, the server feels it soon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    return sock


class Keeper:
    """A WebSocket member that reads everything as it comes, noting each message's ``n``."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.got: list[int] = []
        self.joined_at = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self, room: str) -> None:
        await self.ws.send(json.dumps({"type": "join", "room_id": room}))
        while True:
            frame = json.loads(await self.ws.recv())
            if frame["type"] == "system" and frame["event"] == "room.joined":
                self.joined_at = frame["data"]["sequence"]
                break
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            frame = json.loads(raw)
            if frame["type"] == "message":
                self.got.append(frame["data"]["n"])

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


@contextlib.asynccontextmanager
async def room_with_history(streaming: Streaming) -> AsyncIterator[tuple[RunningServer, Keeper]]:
    """A served service whose room ``r`` holds HISTORY big messages (n = 0..99), and its keeper member."""
    async with serve(streaming) as server, websockets.connect(server.ws_url + "/ws", max_size=None) as ws:
        keeper = Keeper(ws)
        await keeper.start("r")
        try:
            for n in range(HISTORY):
                await streaming.broadcast("r", {"n": n, "pad": PAD})
                if n % 10 == 9:  # published at the pace the keeper reads
                    await eventually(functools.partial(at_least, keeper.got, n + 1), what="the keeper got the history")
            yield server, keeper
        finally:
            keeper.stop()


async def publish_live(streaming: Streaming) -> None:
    for n in range(HISTORY, HISTORY + LIVE):
        await streaming.broadcast("r", {"n": n, "pad": "live"})


def make(make_streaming: Any, drops: DropRecorder) -> Streaming:
    """Default limits (send_buffer 1 MiB); history large enough for the 1.5 MB; a small server-side
    SO_SNDBUF so that the replay cannot all hide in the kernel's socket buffers and a slow reader paces it."""
    streaming: Streaming = make_streaming({"websocket": {"write_buffer_size": "64KiB"},
                                           "rooms": {"history_max_bytes": "4MiB"}}, plugins=(drops,))
    assert streaming.config.limits.send_buffer == 1024 * 1024 < HISTORY * len(PAD)
    return streaming


async def test_websocket_resume_larger_than_send_buffer_is_paced_by_the_reader(make_streaming: Any) -> None:
    drops = DropRecorder()
    streaming = make(make_streaming, drops)
    async with room_with_history(streaming) as (server, keeper):
        sock = small_socket()
        sock.connect(("127.0.0.1", server.port))
        async with websockets.connect(server.ws_url + "/ws", sock=sock, max_size=None, max_queue=2) as ws:
            await ws.send(json.dumps({"type": "join", "room_id": "r", "since": keeper.joined_at}))
            got: list[int] = []
            live_seen_by_keeper_at = -1
            while len(got) < HISTORY + LIVE:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if frame["type"] != "message":
                    continue
                got.append(frame["data"]["n"])
                if len(got) == 10:  # the replay is in progress: live traffic arrives now
                    await publish_live(streaming)
                    await eventually(lambda: len(keeper.got) == HISTORY + LIVE, what="live traffic at the keeper")
                    live_seen_by_keeper_at = len(got)
                if len(got) < 40:
                    await asyncio.sleep(0.01)  # a slow reader
            assert got == list(range(HISTORY + LIVE))  # the replay, then live, in order, once
            assert live_seen_by_keeper_at == 10  # the other member was not held back by the replay
            assert drops.reasons == []
            assert ws.close_code is None
    assert keeper.got == list(range(HISTORY + LIVE))


# -- SSE: Last-Event-ID ------------------------------------------------------------------------------------


class RawSSE:
    """Just enough HTTP/1.1 to read a chunked SSE stream from a socket with a small receive buffer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._body = bytearray()

    @classmethod
    async def open(cls, port: int, path: str, headers: dict[str, str]) -> RawSSE:
        sock = small_socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0], head
        return cls(reader, writer)

    async def event(self) -> dict[str, str] | None:
        """The next event's fields, None at the end of the stream."""
        while b"\n\n" not in self._body:
            size_line = await self.reader.readline()
            if not size_line:
                return None
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                return None
            self._body += await self.reader.readexactly(size)
            await self.reader.readexactly(2)
        block, _, rest = bytes(self._body).partition(b"\n\n")
        self._body = bytearray(rest)
        fields: dict[str, str] = {}
        for line in block.decode().split("\n"):
            name, _, value = line.partition(":")
            fields[name] = fields.get(name, "") + value.removeprefix(" ")
        return fields

    def close(self) -> None:
        self.writer.close()


async def test_sse_resume_larger_than_send_buffer_is_paced_by_the_reader(make_streaming: Any) -> None:
    drops = DropRecorder()
    streaming = make(make_streaming, drops)
    async with room_with_history(streaming) as (server, keeper):
        stream = await RawSSE.open(server.port, "/sse?rooms=r", {"Last-Event-ID": f"r:{keeper.joined_at}"})
        try:
            got: list[int] = []
            ids: list[str] = []
            while len(got) < HISTORY + LIVE:
                event = await asyncio.wait_for(stream.event(), 10)
                assert event is not None, f"the stream ended after {len(got)} messages: {drops.reasons}"
                frame = json.loads(event.get("data") or "{}")
                if frame.get("type") != "message":
                    continue
                got.append(frame["data"]["n"])
                ids.append(event["id"])
                if len(got) == 10:
                    await publish_live(streaming)
                    await eventually(lambda: len(keeper.got) == HISTORY + LIVE, what="live traffic at the keeper")
                if len(got) < 40:
                    await asyncio.sleep(0.01)
            assert got == list(range(HISTORY + LIVE))
            assert drops.reasons == []
            # each event's id is the cursor after it: resuming from the 50th replays the rest only
            assert ids[-1] == f"r:{streaming.room_position('r')}"
        finally:
            stream.close()
    assert keeper.got == list(range(HISTORY + LIVE))


# -- long-polling: since -------------------------------------------------------------------------------------


async def test_longpoll_resume_larger_than_send_buffer_is_paced_by_polls(make_streaming: Any) -> None:
    drops = DropRecorder()
    streaming = make(make_streaming, drops)
    async with room_with_history(streaming) as (server, keeper), httpx.AsyncClient(
            base_url=server.url, timeout=10) as http:
        opened = (await http.post("/lp")).json()
        auth: dict[str, Any] = {"params": {"session": opened["session"]},
                                "headers": {"X-Session-Token": opened["token"]}}
        join = {"type": "join", "room_id": "r", "since": keeper.joined_at}
        assert (await http.post("/lp/send", content=json.dumps(join), **auth)).status_code == 202
        got: list[int] = []
        polls = 0
        while len(got) < HISTORY + LIVE:
            answer = await http.get("/lp/poll", **auth)
            assert answer.status_code == 200, (answer.text[:200], drops.reasons)
            polls += 1
            before = len(got)
            got += [f["data"]["n"] for f in answer.json() if f.get("type") == "message"]
            if before < 10 <= len(got) and len(got) < HISTORY:
                await publish_live(streaming)
        assert got == list(range(HISTORY + LIVE))
        assert drops.reasons == []
        assert polls > 2  # several polls carried the replay, none more than the bound
    assert keeper.got == list(range(HISTORY + LIVE))


async def test_live_traffic_held_for_a_stalled_resume_is_bounded_by_send_buffer(make_streaming: Any) -> None:
    """A resumer that stops reading mid-replay: the live traffic held for it counts against
    ``limits.send_buffer`` (on top of one message), past which it is dropped; the room goes on."""
    drops = DropRecorder()
    streaming = make(make_streaming, drops)
    async with room_with_history(streaming) as (server, keeper):
        sock = small_socket(4096)
        sock.connect(("127.0.0.1", server.port))
        async with websockets.connect(server.ws_url + "/ws", sock=sock, max_size=None, max_queue=1) as ws:
            await ws.send(json.dumps({"type": "join", "room_id": "r", "since": keeper.joined_at}))
            await eventually(lambda: len(streaming.local_members("r")) == 2)  # then it reads nothing more
            n = HISTORY
            while not drops.reasons and n < 3 * HISTORY:
                await streaming.broadcast("r", {"n": n, "pad": PAD})
                n += 1
                await eventually(functools.partial(at_least, keeper.got, n - 4), what="the keeper keeps up")
            assert [reason for _, reason in drops.reasons] == ["slow consumer"]
            assert (n - HISTORY) * len(PAD) > streaming.config.limits.send_buffer  # live traffic past the bound
            await eventually(lambda: len(streaming.local_members("r")) == 1)
            assert await streaming.presence("r") == [streaming.local_members("r")[0].user_id]
        await eventually(lambda: len(keeper.got) == n)
    assert keeper.got == list(range(n))
