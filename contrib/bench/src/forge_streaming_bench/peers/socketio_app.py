"""Peer: python-socketio (ASGI) on uvicorn, a room emit per message."""

from __future__ import annotations

import argparse
from typing import Any

# python-socketio ships no type information, and it is an optional peer (the [peers] extra): either
# code applies, depending on whether it is installed.
import socketio  # type: ignore[import-not-found, import-untyped, unused-ignore]
import uvicorn

sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*")
app = socketio.ASGIApp(sio)


async def join(sid: str, room: str) -> None:
    await sio.enter_room(sid, room)
    await sio.emit("joined", room, to=sid)


async def message(sid: str, frame: dict[str, Any]) -> None:
    await sio.emit("message", frame, room=frame["room_id"], skip_sid=sid)


# registered by call rather than with the (untyped) decorator, so that the handlers stay typed
sio.on("join", join)
sio.on("message", message)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvicorn.run(app, host="127.0.0.1", port=parser.parse_args().port, log_level="warning", backlog=4096)
