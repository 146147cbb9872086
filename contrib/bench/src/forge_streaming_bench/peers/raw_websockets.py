"""Peer: a raw ``websockets`` (asyncio) server relaying with ``websockets.broadcast``."""

from __future__ import annotations

import argparse
import json

import uvloop
import websockets
from websockets.asyncio.server import ServerConnection, serve

JOINED = '{"type":"system","event":"room.joined"}'
rooms: dict[str, set[ServerConnection]] = {}


async def handler(ws: ServerConnection) -> None:
    joined: list[str] = []
    try:
        async for text in ws:
            frame = json.loads(text)
            room = frame.get("room_id", "")
            if frame.get("type") == "join":
                rooms.setdefault(room, set()).add(ws)
                joined.append(room)
                await ws.send(JOINED)
            elif frame.get("type") == "message":
                websockets.broadcast([m for m in rooms.get(room, ()) if m is not ws], text)
    finally:
        for room in joined:
            rooms.get(room, set()).discard(ws)


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, compression=None, backlog=4096) as server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(main(parser.parse_args().port))
