"""Logs: no token or secret in any line, and no client-made traceback (issue 16, items 7 and 8).

Checked on the output of a real ``forge-streaming serve`` process: uvicorn's
access lines carry the request path with its query, so a JWT passed as
``?token=`` used to be written at INFO; an invalid UTF-8 text frame used to
make uvicorn log an ERROR with a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
import struct
from collections.abc import Callable

import httpx
import pytest
import websockets
from forge_streaming.cli import RedactingFilter, redact
from forge_streaming.testing import ServerProcess

pytestmark = pytest.mark.timeout(60)

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0."
       "c2lnbmF0dXJlLW9mLWFsaWNlLXRoYXQtbXVzdC1ub3QtbGVhaw")
SECRETS = [JWT, "hunter2-password", "sk-live-apikey-123", "stream-secret-xyz", "basic-credentials-abc"]


@pytest.fixture(autouse=True)
def transports(streaming_plugins_only: Callable[..., None]) -> None:
    streaming_plugins_only("websocket", "sse", "memory-pubsub", "memory-rooms", "http-api")


async def leak_attempts(server: ServerProcess) -> None:
    """Clients that put credentials where logs used to show them."""
    async with websockets.connect(f"{server.ws_url}/ws?room=a&token={JWT}") as ws:
        await ws.send(json.dumps({"type": "join", "room_id": "a"}))
        await asyncio.wait_for(ws.recv(), 5)
    async with httpx.AsyncClient(timeout=5) as http:
        await http.get(f"{server.url}/healthz?access_token={JWT}&password=hunter2-password")
        await http.get(f"{server.url}/api/stats?api_key=sk-live-apikey-123",
                       headers={"Authorization": f"Bearer {JWT}"})
        await http.get(f"{server.url}/nowhere/{JWT}?key=stream-secret-xyz")
        creds = base64.b64encode(b"u:basic-credentials-abc").decode()
        await http.get(f"{server.url}/api/rooms", headers={"Authorization": f"Basic {creds}"})
        async with http.stream("GET", f"{server.url}/sse?rooms=a&jwt={JWT}") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data:"):
                    break


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_secret_reaches_the_log(server_factory: Callable[..., ServerProcess], fmt: str) -> None:
    server = server_factory("--log-level", "debug", "--log-format", fmt)
    asyncio.run(leak_attempts(server))
    server.stop(signal.SIGINT)
    output = server.output()
    assert '"GET /healthz?access_token=[redacted]&password=[redacted] HTTP/1.1" 200' in output \
        or 'GET /healthz?access_token=[redacted]&password=[redacted] HTTP/1.1\\" 200' in output, output[-3000:]
    assert "/ws?room=a&token=[redacted]" in output
    for secret in SECRETS:
        assert secret not in output, f"{secret[:12]}... is in the log"


def test_the_filter_keeps_arguments_and_redacts_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        # uvicorn's access line: five arguments that its AccessFormatter unpacks
        logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", f"/ws?token={JWT}", "1.1", 101)
        record_args: list[object] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                record_args.extend(record.args or ())

        keep = Keep()
        keep.addFilter(RedactingFilter())
        logger.addHandler(keep)
        logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/sse?password=hunter2-password", "1.1", 200)
        assert record_args == ["127.0.0.1:5", "GET", "/sse?password=[redacted]", "1.1", 200]
        logger.removeHandler(keep)
        try:
            raise ValueError(f"bad token {JWT} in header Authorization: Bearer {JWT}")
        except ValueError:
            logger.exception("failed with headers %r", {"authorization": "Bearer sk-live-apikey-123"})
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "Traceback" in text and "[redacted]" in text
    for secret in SECRETS:
        assert secret not in text
    assert redact("server.prot: unknown key (value 1)") == "server.prot: unknown key (value 1)"


# -- invalid UTF-8: a WARNING, not an ERROR with a traceback ------------------------------------


async def send_invalid_utf8(port: int) -> tuple[int, bytes]:
    """A raw client: handshake, one masked text frame that is not UTF-8; the close code it gets back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    payload = b'{"type":"join","room_id":"\xff\xfe"}'
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    writer.write(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    frame = await asyncio.wait_for(reader.read(2), 5)
    assert frame[0] & 0x0F == 0x8, frame  # a close frame
    body = await asyncio.wait_for(reader.readexactly(frame[1] & 0x7F), 5)
    writer.close()
    return struct.unpack("!H", body[:2])[0], body[2:]


def test_invalid_utf8_is_a_rate_limited_warning(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory()

    async def many() -> list[tuple[int, bytes]]:
        return [await send_invalid_utf8(server.port) for _ in range(20)]

    closes = asyncio.run(many())
    assert {code for code, _ in closes} == {1007}
    assert httpx.get(server.url + "/healthz").status_code == 200
    server.stop(signal.SIGINT)
    output = server.output()
    assert "Traceback" not in output and " ERROR " not in output, output[-3000:]
    warnings = [line for line in output.splitlines() if "not UTF-8" in line and "WARNING" in line]
    assert 1 <= len(warnings) <= 3, warnings  # 20 clients within a second or two: not 20 lines
