"""Issue 17's yardstick: a Forge chat app, ported line by line, with Forge's config file.

The app below is Forge's chat handler in Python names (``new_extension``,
``HandleWebSocket``, ``conn.Query``, ``JoinRoom``, ``ReadMessage``,
``BroadcastToRoom``); the config file nests everything under Forge's
``extensions: streaming:``. It runs under ``forge-streaming serve``, plain
``uvicorn`` and ``uvicorn --workers 2`` (rooms shared through a real
Mosquitto, since two workers are two nodes), and a text and a binary
message from one chat client reach the other chat client, an SSE member and
a WebTransport member of the room, whichever worker each landed on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection
from aioquic.h3.events import HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent
from forge_streaming.testing import free_port
from forge_streaming.workers import usable_cores

pytestmark = [pytest.mark.timeout(180), pytest.mark.mosquitto]

FORGE_CHAT = '''\
from forge_streaming import new_extension

streaming = new_extension()  # Forge: ext := streaming.NewExtension(config)


@streaming.handle_websocket("/chat")  # Forge: ext.HandleWebSocket("/chat", handler)
async def chat(conn):
    room = conn.query("room") or "lobby"  # Forge: conn.Query("room")
    await conn.join_room(room)  # Forge: conn.JoinRoom(room)
    while True:
        message = await conn.read_message()  # Forge: conn.ReadMessage()
        await conn.broadcast_to_room(room, message)  # Forge: conn.BroadcastToRoom(room, msg)


app = streaming
'''

FORGE_CONFIG = '''\
extensions:
  streaming:
    max_message_size: 65536
    ping_interval: 30s
    pubsub:
      backend: mqtt
      mqtt: {{url: "mqtt://127.0.0.1:{broker}", keepalive: 2s}}
    rooms:
      store: mqtt
    webtransport:
      port: {port}
'''

HEADER = struct.Struct(">BI")
BINARY = b"\x00\xffforge"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[int]:
    path = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(path):
        pytest.skip("mosquitto is not installed (make test installs it)")
    port = free_port()
    with (tmp_path / "mosquitto.log").open("wb") as out:
        proc = subprocess.Popen([path, "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)
    yield port
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)


def start(how: str, workdir: Path, broker: int) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    (workdir / "forge_chat.py").write_text(FORGE_CHAT)
    config = workdir / "forge.yaml"
    config.write_text(FORGE_CONFIG.format(broker=broker, port=port))
    bin_dir = Path(sys.executable).parent
    command = {
        "serve": [str(bin_dir / "forge-streaming"), "serve", "forge_chat:app", "--config", str(config)],
        "uvicorn": [sys.executable, "-m", "uvicorn", "forge_chat:app"],
        "workers": [sys.executable, "-m", "uvicorn", "forge_chat:app", "--workers", "2"],
    }[how] + ["--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "FORGE_STREAMING_CONFIG": str(config), "PYTHONPATH": str(workdir)}
    log = workdir / f"{how}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    # Every worker must be listening before a QUIC client starts: the kernel spreads a shared UDP port's packets
    # over the sockets bound to it, and a worker binding mid-handshake would move the client's packets to a worker
    # that does not know its connection (docs: Ways to run).
    # serve's default on this shared (MQTT) backend: one worker per usable core.
    workers = {"workers": 2, "serve": usable_cores()}.get(how, 1)
    deadline = time.monotonic() + 30
    try:
        while True:
            assert proc.poll() is None, f"{how} exited:\n{log.read_text()}"
            try:
                up = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                up = False
            if up and log.read_text(errors="replace").count("WebTransport on udp") >= workers:  # one line per worker
                break
            assert time.monotonic() < deadline, f"{how} not ready:\n{log.read_text()}"
            time.sleep(0.1)
    except BaseException:
        stop(proc)  # a server that did not come up is ended too, by its PID
        raise
    return proc, port, log


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT (uvicorn drains and stops its workers), then SIGKILL if it does not end in time."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class WtMember(QuicConnectionProtocol):
    """A room-protocol member over WebTransport: one session at /wt, one message stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.session = self.stream = -1
        self.buffer = b""
        self.messages: list[tuple[int, bytes]] = []

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived) and h3_event.stream_id == self.session:
                if not self.status.done():
                    self.status.set_result(int(dict(h3_event.headers)[b":status"]))
            elif isinstance(h3_event, WebTransportStreamDataReceived) and h3_event.stream_id == self.stream:
                self.buffer += h3_event.data
                while len(self.buffer) >= HEADER.size:
                    kind, size = HEADER.unpack_from(self.buffer)
                    if len(self.buffer) < HEADER.size + size:
                        break
                    self.messages.append((kind, self.buffer[HEADER.size:HEADER.size + size]))
                    self.buffer = self.buffer[HEADER.size + size:]

    async def join(self, port: int, room: str) -> None:
        self.session = self._quic.get_next_available_stream_id()
        self.h3.send_headers(self.session, [
            (b":method", b"CONNECT"), (b":scheme", b"https"), (b":authority", f"127.0.0.1:{port}".encode()),
            (b":path", b"/wt"), (b":protocol", b"webtransport")])
        self.transmit()
        assert await asyncio.wait_for(self.status, 10) == 200
        self.stream = self.h3.create_webtransport_stream(self.session, is_unidirectional=False)
        with self.h3._get_or_create_stream(self.stream) as h3_stream:  # test client: read replies as WT data
            h3_stream.frame_type = FrameType.WEBTRANSPORT_STREAM
            h3_stream.session_id = self.session
        frame = json.dumps({"type": "join", "room_id": room}).encode()
        self._quic.send_stream_data(self.stream, HEADER.pack(1, len(frame)) + frame)
        self.transmit()

    def room_messages(self) -> list[Any]:
        """Text messages' data, and binary messages' payload bytes."""
        out: list[Any] = []
        for kind, payload in self.messages:
            if kind == 2:
                header, _, data = payload.partition(b"\n")
                if json.loads(header).get("type") == "message":
                    out.append(data)
            elif (frame := json.loads(payload)).get("type") == "message":
                out.append(frame["data"])
        return out


def ws_room_messages(frames: list[str | bytes]) -> list[Any]:
    out: list[Any] = []
    for raw in frames:
        if isinstance(raw, bytes):
            header, _, data = raw.partition(b"\n")
            if json.loads(header).get("type") == "message":
                out.append(data)
        elif (frame := json.loads(raw)).get("type") == "message":
            out.append(frame["data"])
    return out


async def until(check: Any, what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["serve", "uvicorn", "workers"])
async def test_the_forge_chat_app_runs_with_forge_config_and_every_member_gets_every_message(
        how: str, tmp_path: Path, mosquitto: int) -> None:
    proc, port, log = start(how, tmp_path, mosquitto)
    try:
        configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE,
                                          max_datagram_frame_size=65536, server_name="localhost")
        async with websockets.connect(f"ws://127.0.0.1:{port}/chat?room=lobby") as alice, \
                websockets.connect(f"ws://127.0.0.1:{port}/chat?room=lobby") as bob, \
                httpx.AsyncClient(timeout=30) as http, \
                http.stream("GET", f"http://127.0.0.1:{port}/sse?rooms=lobby") as sse, \
                quic_connect("127.0.0.1", port, configuration=configuration, create_protocol=WtMember) as wt:
            assert isinstance(wt, WtMember)
            await wt.join(port, "lobby")
            bob_frames: list[str | bytes] = []
            sse_lines: list[str] = []

            async def read_bob() -> None:
                async for raw in bob:
                    bob_frames.append(raw)

            async def read_sse() -> None:
                async for line in sse.aiter_lines():
                    sse_lines.append(line)

            readers = [asyncio.ensure_future(read_bob()), asyncio.ensure_future(read_sse())]
            try:
                def sse_messages() -> list[Any]:
                    out = []
                    for line in sse_lines:
                        if line.startswith("data:") and '"type":"message"' in line:
                            frame = json.loads(line[5:])
                            data = frame["data"]
                            out.append(base64.b64decode(data) if frame.get("encoding") == "base64" else data)
                    return out

                await asyncio.sleep(0.5)  # the joins cross the broker when workers share the room
                n = 0
                # keep saying hello until every member hears one: joins on another worker take a moment to arrive
                while not (ws_room_messages(bob_frames) and sse_messages() and wt.room_messages()):
                    await alice.send(f"hello {n}")
                    n += 1
                    assert n < 100, f"not every member heard alice; see {log}"
                    await asyncio.sleep(0.1)
                await alice.send("text from forge")
                await alice.send(BINARY)
                expected = ["text from forge", BINARY]
                await until(lambda: ws_room_messages(bob_frames)[-2:] == expected, "bob got both")
                await until(lambda: sse_messages()[-2:] == expected, "the SSE member got both")
                await until(lambda: wt.room_messages()[-2:] == expected, "the WebTransport member got both")
            finally:
                for reader in readers:
                    reader.cancel()
    finally:
        stop(proc)
