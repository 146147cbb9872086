"""Inside your own app, under plain uvicorn and ``--workers 2`` (issue 17).

``python -m uvicorn app:app --port P`` used to bind WebTransport to 8080
(``server.port``), advertise ``Alt-Svc: h3=":8080"`` and name 8080 at the
certificate-hash endpoint, so a second app on the host failed to start and
``--workers 2`` died on the UDP bind; ``websocket.*`` keys were silently not
applied. Now WebTransport is off with one log line unless ``webtransport.port``
is set, workers share that port (``SO_REUSEPORT``) and one development
certificate, and the WebSocket transport says which keys uvicorn decides.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
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
from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent
from cryptography.hazmat.primitives import serialization
from forge_streaming.testing import ServerProcess, free_port

pytestmark = pytest.mark.timeout(120)

APP = "from forge_streaming import Streaming\n\nstreaming = Streaming()\napp = streaming.asgi_app()\n"
OFF_LINE = "WebTransport is off"


class Uvicorn:
    """``python -m uvicorn app:app`` in a process of its own, with a config file through the environment."""

    def __init__(self, workdir: Path, config: str, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "app.py").write_text(APP)
        stamp = f"{self.port}"
        config_path = workdir / f"config-{stamp}.yaml"
        config_path.write_text(config)
        self.log = workdir / f"uvicorn-{stamp}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(self.port), *args],
                cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "FORGE_STREAMING_CONFIG": str(config_path)})
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"uvicorn did not start:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def uvicorn_factory(tmp_path: Path, streaming_plugins_only: Callable[..., None]) -> Iterator[Callable[..., Uvicorn]]:
    streaming_plugins_only("websocket", "sse", "webtransport", "memory-pubsub", "memory-rooms", "http-api")
    started: list[Uvicorn] = []

    def start(config: str = "", *args: str) -> Uvicorn:
        server = Uvicorn(tmp_path, config, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class _Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived) and not self.status.done():
                self.status.set_result(int(dict(h3_event.headers)[b":status"]))


async def wt_session(port: int) -> tuple[int, str]:
    """Open a WebTransport session on UDP ``port``: its status and the SHA-256 of the server's certificate."""
    configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE,
                                      max_datagram_frame_size=65536, server_name="localhost")
    async with quic_connect("127.0.0.1", port, configuration=configuration, create_protocol=_Client) as client:
        assert isinstance(client, _Client)
        certificate = client._quic.tls._peer_certificate
        assert certificate is not None
        digest = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
        stream = client._quic.get_next_available_stream_id()
        client.h3.send_headers(stream, [
            (b":method", b"CONNECT"), (b":scheme", b"https"), (b":authority", f"127.0.0.1:{port}".encode()),
            (b":path", b"/wt"), (b":protocol", b"webtransport")])
        client.transmit()
        return await asyncio.wait_for(client.status, 5), digest


def test_plain_uvicorn_keeps_webtransport_off_with_one_line(uvicorn_factory: Callable[..., Uvicorn]) -> None:
    first = uvicorn_factory()
    second = uvicorn_factory()  # a second app on the same host starts too
    for server in (first, second):
        response = httpx.get(server.url + "/healthz")
        assert response.status_code == 200 and "alt-svc" not in response.headers
        info = httpx.get(server.url + "/webtransport/certificate-hash")
        assert info.status_code == 503 and "webtransport.port" in info.json()["message"]
        assert "8080" not in info.text
    first.stop()
    output = first.output()
    assert output.count(OFF_LINE) == 1, output
    assert "webtransport.port: N" in output


def test_webtransport_port_turns_it_on_under_plain_uvicorn(uvicorn_factory: Callable[..., Uvicorn]) -> None:
    udp = free_port()
    server = uvicorn_factory(f"webtransport:\n  port: {udp}\n")
    response = httpx.get(server.url + "/healthz")
    assert response.headers["alt-svc"] == f'h3=":{udp}"; ma=86400'
    info = httpx.get(server.url + "/webtransport/certificate-hash").json()
    assert info["port"] == udp and info["url"].endswith(f":{udp}/wt")
    status, digest = asyncio.run(wt_session(udp))
    assert status == 200 and digest == info["sha256_hex"]


def test_two_workers_share_the_udp_port_and_one_certificate(uvicorn_factory: Callable[..., Uvicorn]) -> None:
    udp = free_port()
    server = uvicorn_factory(f"webtransport:\n  port: {udp}\n", "--workers", "2")
    deadline = time.monotonic() + 20
    while server.output().count(f"WebTransport on udp 127.0.0.1:{udp}") < 2:  # both workers are up
        assert time.monotonic() < deadline and server.proc.poll() is None, server.output()
        time.sleep(0.1)
    hashes = {httpx.get(server.url + "/webtransport/certificate-hash").json()["sha256_hex"] for _ in range(10)}
    sessions = [asyncio.run(wt_session(udp)) for _ in range(8)]  # new client ports: both workers answer
    assert len(hashes) == 1
    assert {status for status, _ in sessions} == {200}
    assert {digest for _, digest in sessions} == hashes
    server.stop()
    assert "Address already in use" not in server.output() and "Traceback" not in server.output()


def test_two_workers_without_a_webtransport_port(uvicorn_factory: Callable[..., Uvicorn]) -> None:
    server = uvicorn_factory("", "--workers", "2")
    deadline = time.monotonic() + 20
    while server.output().count(OFF_LINE) < 2:
        assert time.monotonic() < deadline and server.proc.poll() is None, server.output()
        time.sleep(0.1)
    assert httpx.get(server.url + "/healthz").status_code == 200
    server.stop()
    assert "Traceback" not in server.output()


def test_websocket_keys_uvicorn_decides_are_named(uvicorn_factory: Callable[..., Uvicorn]) -> None:
    server = uvicorn_factory("websocket:\n  enable_compression: true\n  ping_interval: 5s\n")
    server.stop()
    lines = [line for line in server.output().splitlines() if "not served by `forge-streaming serve`" in line]
    assert len(lines) == 1, server.output()
    assert "websocket.enable_compression, websocket.ping_interval" in lines[0]


def test_sse_post_body_timeout_applies_under_plain_uvicorn(uvicorn_factory: Callable[..., Uvicorn]) -> None:
    server = uvicorn_factory("server:\n  body_timeout: 1s\n")

    async def trickle() -> bytes:
        async with httpx.AsyncClient(timeout=5) as http, http.stream("GET", server.url + "/sse") as stream:
            import json

            session: dict[str, Any] = {}
            async for line in stream.aiter_lines():
                if line.startswith("data:"):
                    session = json.loads(line[5:])
                    break
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write((f"POST {session['send_url']} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"X-Stream-Token: {session['token']}\r\nContent-Length: 50\r\n\r\n{{").encode())
            answer = await asyncio.wait_for(reader.read(200), 5)
            writer.close()
            return answer

    assert asyncio.run(trickle()).startswith(b"HTTP/1.1 408 ")


def test_serve_binds_webtransport_to_the_http_port(tmp_path: Path,
                                                   server_factory: Callable[..., ServerProcess],
                                                   streaming_plugins_only: Callable[..., None]) -> None:
    streaming_plugins_only("websocket", "sse", "webtransport", "memory-pubsub", "memory-rooms", "http-api")
    (tmp_path / "app.py").write_text(APP)
    server = server_factory("app:app")
    assert httpx.get(server.url + "/healthz").headers["alt-svc"] == f'h3=":{server.port}"; ma=86400'
    assert httpx.get(server.url + "/webtransport/certificate-hash").json()["port"] == server.port
    assert asyncio.run(wt_session(server.port))[0] == 200
