"""Peer: python-socketio (ASGI) on uvicorn, a room emit per message."""

from __future__ import annotations

import argparse
from typing import Any

import socketio
import uvicorn

sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*")
app = socketio.ASGIApp(sio)


@sio.on("join")
async def join(sid: str, room: str) -> None:
    await sio.enter_room(sid, room)
    await sio.emit("joined", room, to=sid)


@sio.on("message")
async def message(sid: str, frame: dict[str, Any]) -> None:
    await sio.emit("message", frame, room=frame["room_id"], skip_sid=sid)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvicorn.run(app, host="127.0.0.1", port=parser.parse_args().port, log_level="warning", backlog=4096)
