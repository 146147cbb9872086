"""Whole data frames read by the plugin itself, everything else by websockets (``whole_data_frames``).

Held against websockets' own client (the frames it writes) and parser (what
it reads), and end to end: a raw socket writes text, binary, fragmented,
control and large frames in one go to a real server, and every message
arrives, in order, at another member of the room.
"""

from __future__ import annotations

import asyncio
import json
import os
import random

import websockets
from forge_streaming.testing import RoomClient, eventually, serve
from forge_streaming_websocket.protocol import whole_data_frames
from websockets.frames import Frame, Opcode
from websockets.protocol import CLIENT, SERVER, Protocol

OP_TEXT, OP_BINARY, OP_CONT, OP_PING = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PING


def _client_bytes(frames: list[Frame]) -> bytes:
    """``frames`` as a websockets client writes them (masked)."""
    client = Protocol(CLIENT)
    for frame in frames:
        client.send_frame(frame)
    return b"".join(client.data_to_send())


def _websockets_reads(data: bytes) -> list[tuple[bool, bytes]]:
    """The data frames websockets' server parser reads from ``data``."""
    server = Protocol(SERVER, max_size=None)
    server.receive_data(data)
    return [(f.opcode == OP_TEXT, bytes(f.data)) for f in server.events_received()
            if isinstance(f, Frame) and f.opcode in (OP_TEXT, OP_BINARY)]


def test_reads_what_websockets_reads_up_to_the_first_other_frame() -> None:
    rng = random.Random(7)
    for _ in range(200):
        frames = []
        for _ in range(rng.randint(1, 6)):
            size = rng.choice([0, 1, 5, 125, 126, 127, 300, 65535, 65536, 70000])
            if rng.random() < 0.5:
                frames.append(Frame(OP_TEXT, "é".encode() * (size // 2)))
            else:
                frames.append(Frame(OP_BINARY, os.urandom(size)))
        data = _client_bytes(frames)
        read = whole_data_frames(data, None)
        expected = _websockets_reads(data)
        assert [(text, payload) for text, payload, _ in read] == expected[:len(read)]
        # it reads every frame up to the first with a 64-bit length, and stops there
        short = next((i for i, f in enumerate(frames) if len(f.data) > 65535), len(frames))
        assert len(read) == short
        if read:
            assert read[-1][2] == len(_client_bytes(frames[:short]))


def test_stops_at_control_frames_fragments_and_partial_frames() -> None:
    text = Frame(OP_TEXT, b"one")
    data = _client_bytes([text, Frame(OP_PING, b"p"), Frame(OP_TEXT, b"two")])
    assert [p for _, p, _ in whole_data_frames(data, None)] == [b"one"]
    fragmented = _client_bytes([Frame(OP_TEXT, b"a", fin=False), Frame(OP_CONT, b"b")])
    assert whole_data_frames(fragmented, None) == []
    whole = _client_bytes([text, Frame(OP_BINARY, b"\x00\x01")])
    for cut in range(len(whole)):
        read = whole_data_frames(whole[:cut], None)
        assert all(end <= cut for _, _, end in read)
        assert len(read) == (0 if cut < 9 else 1), cut  # 9 bytes: the first frame (2 + 4 mask + 3)


def test_a_frame_over_the_limit_is_left_to_websockets() -> None:
    data = _client_bytes([Frame(OP_TEXT, b"x" * 10), Frame(OP_TEXT, b"y" * 200)])
    assert [p for _, p, _ in whole_data_frames(data, 100)] == [b"x" * 10]


def test_an_unmasked_frame_is_left_to_websockets() -> None:
    unmasked = bytes([0x81, 3]) + b"abc"
    assert whole_data_frames(unmasked, None) == []


async def test_every_kind_of_frame_in_one_write_arrives_in_order() -> None:
    from forge_streaming import Streaming

    service = Streaming({"plugins": {"allow": ["websocket", "memory-pubsub", "memory-rooms"]},
                         "limits": {"max_message_size": 200_000}})
    async with serve(service) as server:
        member = RoomClient(await websockets.connect(f"{server.ws_url}/ws", max_size=None))
        await member.join("r")
        sender = RoomClient(await websockets.connect(f"{server.ws_url}/ws", max_size=None))
        await sender.join("r")

        def message(n: object) -> bytes:
            return json.dumps({"type": "message", "room_id": "r", "data": n}).encode()

        frames = [Frame(OP_TEXT, message(0)), Frame(OP_TEXT, message(1)), Frame(OP_PING, b"ping"),
                  Frame(OP_TEXT, message(2)[:10], fin=False), Frame(OP_CONT, message(2)[10:]),
                  Frame(OP_TEXT, message("x" * 70_000)), Frame(OP_TEXT, message(4)), Frame(OP_TEXT, message(5))]
        reader, writer = await asyncio.open_connection(server.host, server.port)
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        writer.write(f"GET /ws HTTP/1.1\r\nHost: {server.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        assert b" 101 " in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.write(_client_bytes([Frame(OP_TEXT, b'{"type":"join","room_id":"r"}')]))
        received = b""
        while b"room.joined" not in received:  # the raw client's join answered
            received += await asyncio.wait_for(reader.read(4096), 10)
        writer.write(_client_bytes(frames))  # all at once: read in one data_received (or a few)
        await eventually(lambda: len(member.data()) == 6, 10, what="six messages")
        assert member.data() == [0, 1, 2, "x" * 70_000, 4, 5]
        while b"\x8a\x04ping" not in received:  # the pong, among what else the raw client got
            received += await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
        await member.close()
        await sender.close()
