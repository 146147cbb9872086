"""Peer: a Starlette WebSocket endpoint on uvicorn relaying with a plain ``send_text`` loop."""

from __future__ import annotations

import argparse
import json

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

JOINED = '{"type":"system","event":"room.joined"}'
rooms: dict[str, set[WebSocket]] = {}


async def endpoint(ws: WebSocket) -> None:
    await ws.accept()
    joined: list[str] = []
    try:
        while True:
            text = await ws.receive_text()
            frame = json.loads(text)
            room = frame.get("room_id", "")
            if frame.get("type") == "join":
                rooms.setdefault(room, set()).add(ws)
                joined.append(room)
                await ws.send_text(JOINED)
            elif frame.get("type") == "message":
                for member in list(rooms.get(room, ())):
                    if member is not ws:
                        await member.send_text(text)
    except WebSocketDisconnect:
        pass
    finally:
        for room in joined:
            rooms.get(room, set()).discard(ws)


app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvicorn.run(app, host="127.0.0.1", port=parser.parse_args().port, log_level="warning", backlog=4096)
