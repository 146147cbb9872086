"""JWT over real transports: refused before the WebSocket upgrade (403) and the SSE stream (401);
a live WebSocket is closed with 1008 when its token expires."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from forge_streaming import Streaming
from forge_streaming.testing import serve

pytest.importorskip("forge_streaming_websocket")
pytest.importorskip("forge_streaming_sse")

SECRET = "test-secret-that-is-long-enough-for-hs256"
PLUGINS = ["websocket", "sse", "memory-pubsub", "memory-rooms", "jwt"]


@pytest.fixture(autouse=True)
def _only_these_plugins(streaming_plugins_only: Callable[..., None]) -> None:
    """The plugins under test only, whatever else is installed."""
    streaming_plugins_only(*PLUGINS)


def token(**claims: Any) -> str:
    claims.setdefault("sub", "alice")
    claims.setdefault("exp", int(time.time()) + 3600)
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_refused_before_the_websocket_upgrade_and_the_sse_stream() -> None:
    async with serve(Streaming({"jwt": {"secret": SECRET}})) as server:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(server.ws_url + "/ws?token=garbage")
        assert refused.value.response.status_code == 401
        async with httpx.AsyncClient(timeout=5) as client:
            answer = await client.get(server.url + "/sse?rooms=r")
            assert answer.status_code == 401 and answer.json()["error"] == "unauthenticated"
        async with websockets.connect(server.ws_url + "/ws",
                                      additional_headers={"Authorization": f"Bearer {token()}"}) as ws:
            await ws.send(json.dumps({"type": "join", "room_id": "r"}))
            joined = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert joined["data"]["user_id"] == "alice"


async def test_expired_token_closes_a_live_websocket_with_1008() -> None:
    async with serve(Streaming({"jwt": {"secret": SECRET}})) as server:
        async with websockets.connect(server.ws_url + f"/ws?token={token(exp=int(time.time()) + 1)}") as ws:
            frames = []
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    frames.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
            assert ws.close_code == 1008 and ws.close_reason == "token expired"
            assert frames[-1]["event"] == "token.expired"


@pytest.mark.parametrize("algorithms", [["HS256"], ["RS256", "HS256"]])
async def test_an_hs256_token_signed_with_the_rsa_public_key_is_a_401_not_a_500(
        tmp_path: Path, algorithms: list[str], caplog: pytest.LogCaptureFixture) -> None:
    """The algorithm-confusion forgery: PyJWT refuses the PEM as an HMAC key (InvalidKeyError); that is a 401."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "public.pem").write_bytes(public_pem)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "mallory", "exp": int(time.time()) + 60}).encode())
    signature = b64(hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    forged = f"{head}.{body}.{signature}"
    config = {"jwt": {"public_key_file": str(tmp_path / "public.pem"), "algorithms": algorithms}}
    async with serve(Streaming(config)) as server:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(server.ws_url + f"/ws?token={forged}")
        assert refused.value.response.status_code == 401
        async with httpx.AsyncClient(timeout=5) as client:
            answer = await client.get(server.url + "/sse?rooms=r", headers={"Authorization": f"Bearer {forged}"})
            assert answer.status_code == 401 and answer.json()["error"] == "invalid_token"
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "no traceback for a forged token"
