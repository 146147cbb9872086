"""The hooks this plugin added to the contract, exercised by a recording plugin of their own.

``streaming_published``, ``streaming_frame_rejected``, ``streaming_register_routes``
and the ``streaming`` argument of ``streaming_delivered``: what a metrics
plugin needs that the original hooks could not give.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from forge_streaming import Connection, Envelope, EnvelopeKind, Streaming, hookimpl
from forge_streaming.testing import open_connection, serve
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

pytestmark = pytest.mark.timeout(30)

MEMORY_ONLY: dict[str, Any] = {"plugins": {"allow": ["memory-pubsub", "memory-rooms"]}}


@pytest.fixture(autouse=True)
def _only_these_plugins(streaming_plugins_only: Callable[..., None]) -> None:
    """The memory backend only (and the recorder each test registers)."""
    streaming_plugins_only(*MEMORY_ONLY["plugins"]["allow"])


class Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[Streaming, str, EnvelopeKind, float]] = []
        self.rejected: list[tuple[str, str, str]] = []
        self.delivered: list[tuple[Streaming, str, int]] = []

    @hookimpl
    def streaming_published(self, streaming: Streaming, envelope: Envelope, seconds: float) -> None:
        self.published.append((streaming, envelope.room, envelope.kind, seconds))

    @hookimpl
    def streaming_frame_rejected(self, connection: Connection, code: str, message: str) -> None:
        self.rejected.append((connection.id, code, message))

    @hookimpl
    def streaming_delivered(self, envelope: Envelope, recipients: int, streaming: Streaming) -> None:
        self.delivered.append((streaming, envelope.room, recipients))

    @hookimpl
    def streaming_register_routes(self, streaming: Streaming) -> list[BaseRoute]:
        async def hello(request: Request) -> Response:
            return PlainTextResponse(f"hello from {streaming.node_id}")

        # A clash with a kernel route: the kernel's own wins.
        return [Route("/hello", hello), Route("/healthz", hello)]


async def test_published_rejected_and_delivered_hooks() -> None:
    recorder = Recorder()
    streaming = Streaming(MEMORY_ONLY, plugins=[recorder])
    async with streaming.running():
        conn = await open_connection(streaming)
        await conn.join_room("r")
        await streaming.broadcast("r", "hi")
        await streaming.room_protocol_frame(conn, "{broken")
        await streaming.room_protocol_frame(conn, json.dumps({"type": "message", "room_id": "other", "data": 1}))
    kinds = [(room, kind) for _, room, kind, _ in recorder.published]
    assert ("r", EnvelopeKind.MESSAGE) in kinds and ("r", EnvelopeKind.NOTICE) in kinds
    assert all(s is streaming and seconds >= 0 for s, _, _, seconds in recorder.published)
    assert [code for _, code, _ in recorder.rejected] == ["invalid_json", "not_member"]
    assert all(cid == conn.id and message for cid, _, message in recorder.rejected)
    assert (streaming, "r", 1) in recorder.delivered


async def test_plugin_routes_are_served_after_the_kernels() -> None:
    streaming = Streaming(MEMORY_ONLY, plugins=[Recorder()])
    async with serve(streaming) as server, httpx.AsyncClient(timeout=10) as http:
        hello = await http.get(server.url + "/hello")
        assert hello.status_code == 200 and hello.text == f"hello from {streaming.node_id}"
        health = await http.get(server.url + "/healthz")
        assert health.json()["status"] == "ok"
