"""A slow consumer that is cut is reset at once, so that no data lingers in the kernel (issue 16.8).

A member that stops reading holds its unsent bytes in the server's socket
buffer (megabytes on Linux, which autotunes it); closed the ordinary way, that
socket sits in FIN-WAIT for minutes with all of it. Once the member is cut
as a slow consumer, its TCP connection is reset (``SO_LINGER`` 0): the
server's socket is gone from ``/proc/net/tcp`` right after the drop, the
client's next read gets a reset, and the other member of the room keeps
receiving everything. WebSocket and SSE; WebTransport (QUIC) has no kernel
socket per client.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
from typing import Any

import pytest
import websockets
from forge_streaming import Streaming
from forge_streaming.testing import DropRecorder, eventually, serve

pytestmark = pytest.mark.timeout(60)

ALLOW = ("websocket", "sse", "memory-pubsub", "memory-rooms")
PAD = "z" * 16_000


@pytest.fixture(autouse=True)
def only_these(streaming_plugins_only: Any) -> None:
    streaming_plugins_only(*ALLOW)



def at_least(items: list[Any], count: int) -> bool:
    return len(items) >= count



def server_side(server_port: int, client_port: int) -> list[tuple[str, int]]:
    """(state, bytes not yet acknowledged) of the server's end of the TCP connection from ``client_port``."""
    found = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
            if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
                found.append((state, int(queues.split(":")[0], 16)))
    return found


def stalled_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


async def flood_until_dropped(streaming: Streaming, drops: DropRecorder, fast: Any, port: int,
                              client_port: int) -> tuple[int, int]:
    """Broadcast to room ``r`` at the fast member's pace until the stalled one is dropped;
    (messages sent, most bytes the server's socket held for the stalled member)."""
    got: list[int] = []

    async def read_fast() -> None:
        while True:
            frame = json.loads(await fast.recv())
            if frame["type"] == "message":
                got.append(frame["data"]["n"])

    reader = asyncio.ensure_future(read_fast())
    held = sent = 0
    try:
        while not drops.reasons and sent < 3000:
            await eventually(functools.partial(at_least, got, sent - 4), what="the fast member keeps up")
            await streaming.broadcast("r", {"n": sent, "pad": PAD})
            sent += 1
            held = max([held, *(queued for _, queued in server_side(port, client_port))])
        assert drops.reasons and drops.reasons[0][1] == "slow consumer", f"not dropped after {sent} messages"
        # right after the drop: the server's socket is gone, with everything it held
        dropped_at = asyncio.get_running_loop().time()
        await eventually(lambda: not server_side(port, client_port), timeout=1.0,
                         what="the server's socket of the dropped member gone")
        print(f"the server's socket held up to {held} unacknowledged bytes; gone "
              f"{asyncio.get_running_loop().time() - dropped_at:.3f}s after the drop")
        await eventually(lambda: len(got) == sent, what="the fast member got everything")
        assert got == list(range(sent))
    finally:
        reader.cancel()
    return sent, held


async def test_websocket_slow_consumer_is_reset_right_after_the_drop(make_streaming: Any) -> None:
    drops = DropRecorder()
    streaming: Streaming = make_streaming(plugins=(drops,))
    async with serve(streaming) as server, websockets.connect(server.ws_url + "/ws", max_size=None) as fast:
        await fast.send(json.dumps({"type": "join", "room_id": "r"}))
        while json.loads(await fast.recv()).get("event") != "room.joined":
            pass
        sock = stalled_socket(server.port)
        client_port = sock.getsockname()[1]
        slow = await websockets.connect(server.ws_url + "/ws", sock=sock, max_size=None, max_queue=1)
        try:
            await slow.send(json.dumps({"type": "join", "room_id": "r"}))
            await eventually(lambda: len(streaming.local_members("r")) == 2)
            _, held = await flood_until_dropped(streaming, drops, fast, server.port, client_port)
            assert held > 64 * 1024  # the kernel did hold the stalled member's data until the reset
            # the stalled client, reading at last, finds the connection reset
            with pytest.raises(websockets.ConnectionClosedError):
                while True:
                    await asyncio.wait_for(slow.recv(), 5)
            assert slow.close_code == 1006
        finally:
            await slow.close()
        await eventually(lambda: len(streaming.connections) == 1)


async def test_sse_slow_consumer_is_reset_right_after_the_drop(make_streaming: Any) -> None:
    drops = DropRecorder()
    streaming: Streaming = make_streaming(plugins=(drops,))
    async with serve(streaming) as server, websockets.connect(server.ws_url + "/ws", max_size=None) as fast:
        await fast.send(json.dumps({"type": "join", "room_id": "r"}))
        while json.loads(await fast.recv()).get("event") != "room.joined":
            pass
        sock = stalled_socket(server.port)
        client_port = sock.getsockname()[1]
        sock.sendall(f"GET /sse?rooms=r HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        try:
            await eventually(lambda: len(streaming.local_members("r")) == 2)
            _, held = await flood_until_dropped(streaming, drops, fast, server.port, client_port)
            assert held > 64 * 1024
            sock.settimeout(5)
            with pytest.raises(ConnectionResetError):
                while sock.recv(65536):
                    pass
        finally:
            sock.close()
        await eventually(lambda: len(streaming.connections) == 1)
