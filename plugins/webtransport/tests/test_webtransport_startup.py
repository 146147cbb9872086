"""Startup (issue 19): the UDP port is bound at start, aioquic loads in a thread meanwhile.

``WebTransportTransport.start`` binds the socket and returns; aioquic,
cryptography and the development certificate are loaded off the event loop
(``_prepare``, in a worker thread), and the QUIC server then serves the
socket. These tests hold ``_prepare`` on an event, so what they check does
not depend on how fast the machine is: the service is up (``/healthz``
200) while it is held, the port is taken, and a client that connects then
is served once it is let go.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from forge_streaming import Streaming
from forge_streaming.testing import free_port, serve
from forge_streaming_webtransport import WebTransportTransport

if TYPE_CHECKING:
    from conftest import ClientKit  # the wt fixture's type (test modules do not import conftest at run time)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold every transport's loading (``_prepare``) until the event is set (at the latest when the test ends)."""
    release = threading.Event()
    prepare = WebTransportTransport._prepare

    def waiting(self: WebTransportTransport) -> Any:
        release.wait(20)
        return prepare(self)

    monkeypatch.setattr(WebTransportTransport, "_prepare", waiting)
    try:
        yield release
    finally:
        release.set()


def _port_taken(port: int) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind(("127.0.0.1", port))
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    finally:
        probe.close()
    return False


async def test_service_is_up_with_the_port_bound_while_aioquic_loads_and_the_early_client_is_served(
        make_streaming: Callable[..., Streaming], wt: ClientKit, held: threading.Event) -> None:
    async with serve(make_streaming()) as srv:
        transport = srv.streaming.transports["webtransport"]
        assert isinstance(transport, WebTransportTransport)
        async with httpx.AsyncClient() as http:
            health = await http.get(f"{srv.url}/healthz")
            assert health.status_code == 200
            assert health.headers["alt-svc"] == f'h3=":{srv.port}"; ma=86400'
            assert transport.server is None and transport.describe()["starting"] is True
            assert _port_taken(srv.port)  # WebTransport's: nobody else gets it meanwhile

            async def open_session() -> int:
                async with wt.client(srv.port) as client:
                    return (await wt.session(client, srv.port, "/wt")).status

            session = asyncio.ensure_future(open_session())
            certificate = asyncio.ensure_future(http.get(f"{srv.url}/webtransport/certificate-hash"))
            await asyncio.sleep(0.3)
            assert not session.done() and not certificate.done()  # both wait: the packets in the socket's buffer
            held.set()
            assert await asyncio.wait_for(session, 10) == 200
            info = (await asyncio.wait_for(certificate, 10)).json()
        assert transport.certificate is not None and info["sha256_hex"] == transport.certificate.sha256_hex
        assert "starting" not in transport.describe()


async def test_stopping_while_aioquic_loads_waits_for_it_and_frees_the_port(
        make_streaming: Callable[..., Streaming], held: threading.Event) -> None:
    streaming = make_streaming()
    streaming.http_address = ("127.0.0.1", free_port())
    await streaming.start()
    transport = streaming.transports["webtransport"]
    assert isinstance(transport, WebTransportTransport) and transport.port is not None
    port = transport.port
    stopping = asyncio.ensure_future(streaming.stop())
    await asyncio.sleep(0.1)
    assert not stopping.done()
    held.set()
    await asyncio.wait_for(stopping, 10)
    assert not _port_taken(port)


async def test_a_failure_while_loading_turns_webtransport_off_and_says_why(
        make_streaming: Callable[..., Streaming], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: WebTransportTransport) -> Any:
        raise RuntimeError("no QUIC here")

    monkeypatch.setattr(WebTransportTransport, "_prepare", broken)
    async with serve(make_streaming()) as srv:
        transport = srv.streaming.transports["webtransport"]
        assert isinstance(transport, WebTransportTransport)
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{srv.url}/webtransport/certificate-hash")
        assert response.status_code == 503 and "no QUIC here" in response.json()["message"]
        assert transport.off is not None and "RuntimeError: no QUIC here" in transport.off
        assert not _port_taken(srv.port)  # the socket was closed


async def test_a_port_in_use_stops_the_start_naming_the_address(make_streaming: Callable[..., Streaming]) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        streaming = make_streaming({"webtransport": {"port": port}})
        with pytest.raises(OSError, match=f"udp 127.0.0.1:{port} \\(webtransport.port\\)"):
            await streaming.start()
        await streaming.stop()
    finally:
        taken.close()


def test_start_returns_before_aioquic_or_cryptography_is_imported() -> None:
    """In a fresh interpreter: ``Streaming.start()`` (the lifespan, so ``/healthz``) does not wait for them."""
    port = free_port()
    code = f"""
import asyncio, json, sys, threading
from forge_streaming import Streaming
from forge_streaming_webtransport import WebTransportTransport

release = threading.Event()
prepare = WebTransportTransport._prepare
WebTransportTransport._prepare = lambda self: (release.wait(20), prepare(self))[1]

def loaded():
    return sorted({{m.split(".")[0] for m in sys.modules}} & {{"aioquic", "cryptography"}})

async def main():
    streaming = Streaming({{"plugins": {{"allow": ["webtransport", "memory-pubsub", "memory-rooms"]}}}})
    streaming.http_address = ("127.0.0.1", {port})
    await streaming.start()
    started = loaded()
    release.set()
    served = await streaming.transports["webtransport"].ready(20)
    print(json.dumps([started, loaded(), served]))
    await streaming.stop()

asyncio.run(main())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_STREAMING")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    started, after, served = json.loads(out.stdout.strip().splitlines()[-1])
    assert started == []
    assert after == ["aioquic", "cryptography"] and served is True


def _can_force_buffers() -> bool:
    """Whether this process may pass net.core.rmem_max (CAP_NET_ADMIN; CI runs as root)."""
    return os.geteuid() == 0


def test_size_buffers_grants_a_size_below_the_os_cap() -> None:
    from forge_streaming_webtransport import udp

    sock = udp.bind("127.0.0.1", 0)
    try:
        received, sent = udp.size_buffers(sock, 64 * 1024)  # below Linux's default cap (208 KiB)
        assert received >= 64 * 1024 and sent >= 64 * 1024
    finally:
        sock.close()


async def test_the_shared_udp_socket_gets_the_configured_buffers(make_streaming: Callable[..., Streaming]) -> None:
    """The defect: at the OS default (208 KiB) the bench's 1,000 clients overflowed the one socket."""
    if not _can_force_buffers() and int(open("/proc/sys/net/core/rmem_max").read()) < 4 * 1024 * 1024:
        pytest.skip("neither root nor net.core.rmem_max >= 4 MiB: the OS caps the buffer (logged at start)")
    async with serve(make_streaming()) as srv:
        transport = srv.streaming.transports["webtransport"]
        assert isinstance(transport, WebTransportTransport)
        assert transport.udp_buffers["receive"] >= 4 * 1024 * 1024
        assert transport.udp_buffers["send"] >= 4 * 1024 * 1024
        assert transport.describe()["udp_buffers"] == transport.udp_buffers  # in /api/stats' transports


async def test_buffers_below_the_configured_size_are_logged_with_the_fix(
        make_streaming: Callable[..., Streaming], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from forge_streaming_webtransport import udp

    monkeypatch.setattr(udp, "size_buffers", lambda sock, size: (212992, 212992))
    async with serve(make_streaming({"webtransport": {"udp_buffer": "8MiB"}})):
        pass
    line = next(r for r in caplog.records if "webtransport.udp_buffer" in r.getMessage())
    assert line.levelname == "WARNING"  # the key was set: the operator asked for it
    assert "208 KiB (receive)" in line.getMessage() and "net.core.rmem_max" in line.getMessage()
