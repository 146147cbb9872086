"""Peer: an sse-starlette endpoint with an asyncio.Queue per client, on uvicorn.

Members GET /sse (first event: ``room.joined``); the publisher is a
WebSocket at /ws (the same join/message frames as the other peers) whose
messages are put on every member's queue, each member's generator yielding
them one event at a time: the common sse-starlette pattern.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator

import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

JOINED = '{"type":"system","event":"room.joined"}'
queues: set[asyncio.Queue[str]] = set()


async def stream(request: Request) -> EventSourceResponse:
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def events() -> AsyncIterator[dict[str, str]]:
        queues.add(queue)
        try:
            yield {"data": JOINED}
            while True:
                yield {"data": await queue.get()}
        finally:
            queues.discard(queue)

    return EventSourceResponse(events(), sep="\n")


async def publisher(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            text = await ws.receive_text()
            if json.loads(text).get("type") == "join":
                await ws.send_text(JOINED)
                continue
            for queue in queues:
                queue.put_nowait(text)
    except WebSocketDisconnect:
        pass


app = Starlette(routes=[Route("/sse", stream), WebSocketRoute("/ws", publisher)])

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvicorn.run(app, host="127.0.0.1", port=parser.parse_args().port, log_level="warning", backlog=4096)
