"""Resumes and large messages on the message stream are paced by the client's acknowledgements (issue 16).

- 16.3: a resume of 100 x 15 KB (more than the default ``limits.send_buffer``) is
  sent as fast as the client acknowledges it, followed by the live messages
  published meanwhile, in order and once; the session is not cut (it used to be,
  after about 70 of the 100), and another member keeps receiving meanwhile.
- 16.4: a single message up to ``limits.max_message_size`` never cuts the session,
  whether it is a room message (``deliver``) or a handler's ``write_message``.
The TCP transports' twins are tests/test_replay_pacing.py and tests/test_large_messages.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from forge_streaming import Streaming
from forge_streaming.testing import DropRecorder, serve
from forge_streaming_webtransport import WebTransportSession

if TYPE_CHECKING:
    from conftest import ClientKit  # the wt fixture's type (test modules do not import conftest at run time)

pytestmark = pytest.mark.timeout(90)

HISTORY = 100
LIVE = 20
PAD = "x" * 15_000
MiB = 1024 * 1024



def at_least(items: list[Any], count: int) -> bool:
    return len(items) >= count



async def test_resume_larger_than_send_buffer_is_paced_not_cut(make_streaming: Callable[..., Streaming],
                                                               wt: ClientKit) -> None:
    drops = DropRecorder()
    streaming = make_streaming({"rooms": {"history_max_bytes": "4MiB"}}, plugins=(drops,))
    assert streaming.config.limits.send_buffer < HISTORY * len(PAD)
    async with serve(streaming) as srv, wt.client(srv.port) as client, wt.client(srv.port) as other:
        keeper = await wt.session(other, srv.port, "/wt")
        keeper.send_message({"type": "join", "room_id": "r"})
        since = (await keeper.read_frame("system"))["data"]["sequence"]
        kept: list[int] = []

        async def keep_reading() -> None:
            while True:
                kept.append((await keeper.read_frame("message", timeout=30))["data"]["n"])

        reading = asyncio.ensure_future(keep_reading())
        try:
            for n in range(HISTORY):
                await streaming.broadcast("r", {"n": n, "pad": PAD})
                if n % 10 == 9:
                    await wt.until(functools.partial(at_least, kept, n + 1))
            session = await wt.session(client, srv.port, "/wt")
            session.send_message({"type": "join", "room_id": "r", "since": since})
            got: list[int] = []
            while len(got) < HISTORY + LIVE:
                got.append((await session.read_frame("message", timeout=10))["data"]["n"])
                if len(got) == 10:  # live traffic while the replay is in progress
                    for n in range(HISTORY, HISTORY + LIVE):
                        await streaming.broadcast("r", {"n": n, "pad": "live"})
                    await wt.until(lambda: len(kept) == HISTORY + LIVE)  # the other member is not held back
            assert got == list(range(HISTORY + LIVE))
            assert drops.reasons == []
            assert len(streaming.connections) == 2
        finally:
            reading.cancel()
        assert kept == list(range(HISTORY + LIVE))


@pytest.mark.parametrize("size", [1 * MiB, 4 * MiB, 16 * MiB], ids=["1MiB", "4MiB", "16MiB"])
async def test_a_room_message_up_to_max_message_size_does_not_cut_its_receiver(
        make_streaming: Callable[..., Streaming], wt: ClientKit, size: int) -> None:
    drops = DropRecorder()
    streaming = make_streaming({"limits": {"max_message_size": "20MiB"}}, plugins=(drops,))
    assert streaming.config.limits.send_buffer == MiB
    async with serve(streaming) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/wt")
        session.send_message({"type": "join", "room_id": "big"})
        await session.read_frame("system")
        data = "y" * size
        await streaming.broadcast("big", data)
        frame = await session.read_frame("message", timeout=60)
        assert frame["data"] == data
        await streaming.broadcast("big", "after")
        assert (await session.read_frame("message"))["data"] == "after"
        assert drops.reasons == []


async def test_handler_writes_up_to_max_message_size_do_not_cut_the_session(
        make_streaming: Callable[..., Streaming], wt: ClientKit) -> None:
    drops = DropRecorder()
    streaming = make_streaming({"limits": {"max_message_size": "20MiB"}}, plugins=(drops,))

    @streaming.handle_webtransport("/echo")
    async def echo(session: WebTransportSession) -> None:
        while True:
            message = await session.read_message()
            await session.write_message(message.data)

    async with serve(streaming) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/echo")
        for size in (1 * MiB, 4 * MiB, 16 * MiB):
            for message in (b"\x01" * size, "t" * size):
                session.send_message(message)
                echoed: Any = await session.read_message(timeout=60)
                assert type(echoed) is type(message) and len(echoed) == size and echoed == message
        assert drops.reasons == []
        session.send_message(json.dumps("still open"))
        assert await session.read_message() == json.dumps("still open")
