"""Half-sent requests time out, and count against a bound (issue 16, item 2).

Raw sockets on loopback, against the server ``forge-streaming serve`` runs
(in process through the test kit, and as a process of its own with a low
open-file limit): unfinished headers, a half-done WebSocket upgrade and a
trickled POST body are closed (408 once a request had begun) after their
timeout, while /healthz and new WebSockets keep working meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent
from forge_streaming import ConnectionRequest, Identity, Streaming, hookimpl
from forge_streaming.testing import free_port, serve

pytestmark = pytest.mark.timeout(90)

PARTIAL_GET = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow"
PARTIAL_UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


@pytest.fixture(autouse=True)
def transports(streaming_plugins_only: Callable[..., None]) -> None:
    streaming_plugins_only("websocket", "sse", "webtransport", "memory-pubsub", "memory-rooms", "http-api")


async def open_raw(port: int, sent: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if sent:
        writer.write(sent)
        await writer.drain()
    return reader, writer


async def server_answer(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the socket (a reset counts as closed)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


async def healthy(url: str, ws_url: str) -> None:
    """/healthz answers and a new WebSocket joins a room, each within a second."""
    async with httpx.AsyncClient(timeout=1) as http:
        assert (await http.get(url + "/healthz")).status_code == 200
    async with websockets.connect(ws_url + "/ws", open_timeout=1) as ws:
        await ws.send(json.dumps({"type": "join", "room_id": "meanwhile"}))
        joined = json.loads(await asyncio.wait_for(ws.recv(), 1))
        assert joined["event"] == "room.joined", joined


async def test_unfinished_headers_and_upgrades_are_closed_after_the_header_timeout() -> None:
    streaming = Streaming({"server": {"header_timeout": "1s"}})
    async with serve(streaming) as server:
        half_sent = ([await open_raw(server.port, PARTIAL_GET) for _ in range(100)]
                     + [await open_raw(server.port, PARTIAL_UPGRADE) for _ in range(100)]
                     + [await open_raw(server.port, b"") for _ in range(100)])
        started = time.monotonic()
        await healthy(server.url, server.ws_url)  # meanwhile
        answers = await asyncio.gather(*(server_answer(reader, 5) for reader, _ in half_sent))
        elapsed = time.monotonic() - started
        for _, writer in half_sent:
            writer.close()
        assert elapsed < 4, f"closed after {elapsed:.1f}s"
        begun, silent = answers[:200], answers[200:]
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in begun), {a[:40] for a in begun}
        assert all(a == b"" for a in silent), {a[:40] for a in silent}
        assert streaming.stats_counters()["http.header_timeout"] == 300
        print(f"\n300 half-sent requests (header_timeout 1s) all closed {elapsed:.2f}s after opening")
        await healthy(server.url, server.ws_url)  # and after


async def test_a_trickled_post_body_gets_408(caplog: pytest.LogCaptureFixture) -> None:
    streaming = Streaming({"server": {"body_timeout": "1s"}, "api": {"key": "k"}})
    async with serve(streaming) as server:
        reader, writer = await open_raw(server.port, b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                        b"Authorization: Bearer k\r\nContent-Type: application/json\r\n"
                                        b"Content-Length: 100\r\n\r\n{\"room_id\"")
        started = time.monotonic()
        answer = await server_answer(reader, 5)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert 0.9 < time.monotonic() - started < 3
        writer.close()
        await asyncio.sleep(0.2)
        caplog.clear()  # httpapi's body reader logs the disconnect it then reads as an ERROR (not ours)

        # an SSE POST to a live stream's send URL, trickled
        async with httpx.AsyncClient(timeout=5) as http, http.stream("GET", server.url + "/sse") as stream:
            lines = stream.aiter_lines()
            session: dict[str, Any] = {}
            async for line in lines:
                if line.startswith("data:"):
                    session = json.loads(line[5:])
                    break
            path = session["send_url"]
            reader, writer = await open_raw(server.port, (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Stream-Token: {session['token']}\r\n"
                "Content-Type: application/json\r\nContent-Length: 60\r\n\r\n{\"type\":").encode())
            for _ in range(3):  # a byte now and then does not extend the deadline
                await asyncio.sleep(0.4)
                writer.write(b" ")
            answer = await server_answer(reader, 5)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            writer.close()
        assert streaming.stats_counters()["http.body_timeout"] == 2
        await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.levelno >= 40], [r.getMessage() for r in caplog.records]


async def test_connections_sending_headers_are_bounded_oldest_cut_first() -> None:
    streaming = Streaming({"server": {"header_timeout": "30s"}, "limits": {"max_pending_connections": 50}})
    async with serve(streaming) as server:
        idle = [await open_raw(server.port, b"") for _ in range(120)]
        await healthy(server.url, server.ws_url)
        closed = await asyncio.gather(*(server_answer(reader, 2) for reader, _ in idle[:60]))
        assert closed == [b""] * 60  # the oldest went first
        assert streaming.stats_counters()["http.pending_evicted"] >= 70
        for _, writer in idle:
            writer.close()


class SlowAuth:
    """An authenticate hook that takes longer than the handshake may."""

    @hookimpl
    async def streaming_authenticate(self, request: ConnectionRequest) -> Identity | None:
        if "slow" in request.query_string:
            await asyncio.sleep(3)
        return None


async def test_handshakes_not_answered_in_time_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    streaming = Streaming({"server": {"handshake_timeout": "0.5s"}}, plugins=[SlowAuth()])
    async with serve(streaming) as server:
        started = time.monotonic()
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(server.ws_url + "/ws?slow=1", open_timeout=5):
                pass
        assert refused.value.response.status_code == 503
        assert time.monotonic() - started < 2
        status, elapsed = await wt_connect(server.port, "/wt?slow=1")
        assert status == 503 and elapsed < 2
        status, elapsed = await wt_connect(server.port, "/wt")
        assert status == 200 and elapsed < 1
        closed_after = await quic_without_request(server.port)
        assert 0.4 < closed_after < 2
        await asyncio.sleep(3)  # the slow hooks return: nothing is logged as an error
    assert not [r for r in caplog.records if r.levelno >= 40], [r.getMessage() for r in caplog.records]


class _Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.terminated: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated) and not self.terminated.done():
            self.terminated.set_result(None)
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived) and not self.status.done():
                self.status.set_result(int(dict(h3_event.headers)[b":status"]))


def _quic_configuration() -> QuicConfiguration:
    return QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE,
                             max_datagram_frame_size=65536, server_name="localhost")


async def wt_connect(port: int, path: str) -> tuple[int, float]:
    async with quic_connect("127.0.0.1", port, configuration=_quic_configuration(), create_protocol=_Client) as c:
        assert isinstance(c, _Client)
        started = time.monotonic()
        stream = c._quic.get_next_available_stream_id()
        c.h3.send_headers(stream, [(b":method", b"CONNECT"), (b":scheme", b"https"),
                                   (b":authority", f"127.0.0.1:{port}".encode()), (b":path", path.encode()),
                                   (b":protocol", b"webtransport")])
        c.transmit()
        status = await asyncio.wait_for(c.status, 5)
        return status, time.monotonic() - started


async def quic_without_request(port: int) -> float:
    """Seconds until the server closes a QUIC connection that asks for nothing."""
    async with quic_connect("127.0.0.1", port, configuration=_quic_configuration(), create_protocol=_Client) as c:
        assert isinstance(c, _Client)
        started = time.monotonic()
        await asyncio.wait_for(c.terminated, 5)
        return time.monotonic() - started


# -- a server process with 256 file descriptors --------------------------------------------------


@pytest.fixture
def low_fd_server(tmp_path: Path) -> Iterator[tuple[str, str, int]]:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  header_timeout: 3s\nplugins:\n  allow: [websocket, sse, memory-pubsub, "
                      "memory-rooms, http-api]\n")
    log = (tmp_path / "server.log").open("wb")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.Popen([str(Path(sys.executable).parent / "forge-streaming"), "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=limit, env={**os.environ, "FORGE_STREAMING_CONFIG": ""})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", str(tmp_path / "server.log"), proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        log.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_half_open_sockets_cannot_exhaust_a_low_fd_limit(low_fd_server: tuple[str, str, int]) -> None:
    url, log_path, pid = low_fd_server
    port = int(url.rsplit(":", 1)[1])
    before = open_fds(pid)
    half_sent = [await open_raw(port, PARTIAL_GET if n % 2 else PARTIAL_UPGRADE) for n in range(260)]
    started = time.monotonic()
    for _ in range(3):  # while they are held
        await healthy(url, url.replace("http", "ws"))
        await asyncio.sleep(0.3)
    during = open_fds(pid)
    answers = await asyncio.gather(*(server_answer(reader, 8) for reader, _ in half_sent))
    elapsed = time.monotonic() - started
    for _, writer in half_sent:
        writer.close()
    assert all(a in (b"",) or a.startswith(b"HTTP/1.1 408 ") for a in answers)
    assert elapsed < 6, f"held for {elapsed:.1f}s"
    assert during < 200, f"server held {during} fds (from {before}) under a limit of 256"
    await healthy(url, url.replace("http", "ws"))
    output = Path(log_path).read_text(errors="replace")
    assert "Too many open files" not in output and "out of system resource" not in output, output[-2000:]
    print(f"\nserver fds: {before} before, {during} with 260 half-sent requests; all closed in {elapsed:.1f}s")
