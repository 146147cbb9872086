"""The ``webtransport`` transport: the kernel's view of the HTTP/3 server.

Over HTTP (ASGI) it serves only ``GET /webtransport/certificate-hash`` and
the ``Alt-Svc`` header; sessions arrive over UDP at the aioquic server that
``start`` runs and ``stop`` closes.

Startup (issue 19): ``start`` binds the UDP socket and returns; aioquic and
cryptography (about 0.1 s of imports) and the development certificate are
loaded in a worker thread while the HTTP server starts, and the QUIC server
then serves the socket. So once the service is up (``/healthz`` 200) the
port is WebTransport's and no client is refused: packets that arrive in that
first tenth of a second wait in the socket's buffer (QUIC resends any that
overflow it), and ``/webtransport/certificate-hash`` waits for the certificate.

Which UDP port: ``webtransport.port`` when set, else the port the HTTP
server listens on, once a server that knows it has said so by assigning
``streaming.http_address`` (``forge-streaming serve`` and the test kit do,
before startup). Under a server that does not (plain ``uvicorn app:app``)
that port is unknown, and WebTransport stays off, saying so once in the
log, rather than guess (it used to bind ``server.port``, 8080, whatever
port uvicorn was given).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import fcntl
import hashlib
import logging
import os
import re
import socket
import stat
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from forge_streaming import Handler, Streaming, Transport
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import udp
from .certificate import CertificatePair, load_certificate, make_development_certificate
from .settings import WebTransportSettings

if TYPE_CHECKING:  # aioquic (the server) and cryptography are imported when WebTransport starts, not with the plugin
    from .server import WebTransportServer

log = logging.getLogger("forge_streaming.webtransport")
HASH_PATH = "/webtransport/certificate-hash"

OFF_UNKNOWN_PORT = ("WebTransport is off: the HTTP port is unknown (this app was not started by "
                    "`forge-streaming serve`); set webtransport.port: N in the config (the UDP port for "
                    "HTTP/3, usually the HTTP port) to turn it on")


class WebTransportTransport(Transport):
    name: ClassVar[str] = "webtransport"
    default_path: ClassVar[str] = "/wt"

    def __init__(self, streaming: Streaming) -> None:
        super().__init__(streaming)
        self.settings: WebTransportSettings = streaming.config.section("webtransport", WebTransportSettings)
        self.certificate: CertificatePair | None = None
        self.server: WebTransportServer | None = None
        self.off: str | None = None
        """Why WebTransport is not served (None while it is, or before start)."""
        self.address: tuple[str, int] | None = None
        """The UDP address bound at start (the socket is bound before aioquic is loaded)."""
        self.udp_buffers: dict[str, int] = {}
        """The socket's buffer sizes the OS granted (``receive``, ``send``, bytes), after start."""
        self._loading: asyncio.Task[None] | None = None
        """Loads aioquic and the certificate, then serves the socket (see :meth:`start`)."""
        self._configured_address = streaming.http_address  # the config's; a server that knows replaces it

    @property
    def host(self) -> str:
        return self.settings.host or self.streaming.http_address[0]

    @property
    def http_port_known(self) -> bool:
        """The HTTP server said where it listens (assigned ``streaming.http_address``)."""
        return self.streaming.http_address is not self._configured_address

    @property
    def port(self) -> int | None:
        """The UDP port: the bound one once started, else the configured or HTTP one; None when unknown."""
        if self.address is not None:
            return self.address[1]
        if self.settings.port is not None:
            return self.settings.port
        return self.streaming.http_address[1] if self.http_port_known else None

    def routes(self, endpoints: Mapping[str, Handler | None]) -> list[BaseRoute]:
        """Only the certificate hash: sessions arrive over UDP, and the server looks their paths up itself."""
        return [Route(HASH_PATH, self._certificate_hash)]

    def response_headers(self) -> Mapping[str, str]:
        if self.off is not None:
            return {}
        # before start this is provisional (the app is built before the server knows its port); the
        # kernel reads it again once the service runs
        port = self.port if self.port is not None else self.streaming.http_address[1]
        return {"Alt-Svc": f'h3=":{port}"; ma=86400'}

    async def start(self) -> None:
        settings = self.settings
        if settings.cert_file or settings.key_file:  # a bad pair is refused at start, served or not
            self.certificate = load_certificate(settings.cert_file, settings.key_file)
        port = self.port
        if port is None:
            self.off = OFF_UNKNOWN_PORT
            log.warning(OFF_UNKNOWN_PORT)
            return
        self.off = None
        try:  # taken now, or refused at start: before the service says it is up
            sock = udp.bind(self.host, port)
        except OSError as exc:
            where = "webtransport.port" if settings.port is not None else "the HTTP port (webtransport.port unset)"
            raise OSError(exc.errno, f"WebTransport cannot bind udp {self.host}:{port} ({where}): "
                                     f"{exc.strerror}") from exc
        self.address = (self.host, int(sock.getsockname()[1]))
        if settings.udp_buffer:
            self._size_buffers(sock, settings.udp_buffer)
        self._loading = asyncio.ensure_future(self._serve(sock))

    def _size_buffers(self, sock: socket.socket, size: int) -> None:
        try:
            received, sent = udp.size_buffers(sock, size)
        except OSError as exc:
            log.warning("WebTransport could not size its UDP buffers (webtransport.udp_buffer=%d): %s", size, exc)
            return
        self.udp_buffers = {"receive": received, "send": sent}
        if min(received, sent) < size:  # said at INFO unless the key was set: most development machines cap it
            level = logging.WARNING if self.streaming.config.is_set("webtransport.udp_buffer") else logging.INFO
            log.log(level, "WebTransport's UDP buffers are %d KiB (receive) and %d KiB (send), below the %d KiB of "
                    "webtransport.udp_buffer: many clients at once may overflow them and datagrams are lost (and "
                    "resent). Raise net.core.rmem_max and net.core.wmem_max (sysctl) or run with CAP_NET_ADMIN",
                    received // 1024, sent // 1024, size // 1024)

    def _prepare(self) -> tuple[CertificatePair, type[WebTransportServer]]:
        """In a worker thread: import aioquic and make the development certificate (if none was configured).

        About 0.1 s of CPU the event loop does not wait for: the HTTP server starts meanwhile.
        """
        from .server import WebTransportServer

        certificate = self.certificate
        if certificate is None and self.settings.port:
            certificate = shared_development_certificate(self.host, self.settings.port)  # workers share the port
        elif certificate is None:
            certificate = make_development_certificate(self.host)
        return certificate, WebTransportServer

    async def _serve(self, sock: socket.socket) -> None:
        """Serve ``sock`` once aioquic and the certificate are loaded; on failure, say why and turn off."""
        try:
            certificate, server_class = await asyncio.to_thread(self._prepare)
            server = server_class(self.streaming, self.settings, certificate)
            await server.start(sock)
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, Exception):
                raise
            self.off = f"WebTransport failed to start: {type(exc).__name__}: {exc}"
            log.error("%s", self.off, exc_info=exc)
            return
        self.certificate, self.server = certificate, server
        kind = "development certificate" if certificate.development else "certificate"
        log.info("WebTransport (HTTP/3) listening on udp %s:%d", self.host, self.port)
        log.info("WebTransport certificate SHA-256: %s", certificate.sha256_hex)
        if certificate.development:
            print(f"WebTransport on udp {self.host}:{self.port}, {kind} SHA-256: {certificate.sha256_hex}",
                  file=sys.stderr, flush=True)

    async def ready(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` seconds) until the QUIC server serves the socket; False if it does not."""
        if self._loading is not None and not self._loading.done():
            await asyncio.wait([self._loading], timeout=timeout)  # never cancels the loading
        return self.server is not None

    async def stop(self) -> None:
        if self._loading is not None:
            await asyncio.wait([self._loading])  # its thread cannot be interrupted: let it end, then close
        if self.server is not None:
            await self.server.stop()

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"port": self.port, "path": self.default_path}
        if self.off is not None:
            info["off"] = self.off
        if self.server is not None:
            info["sessions"] = len(self.server.sessions)
        elif self._loading is not None and not self._loading.done():
            info["starting"] = True
        if self.udp_buffers:
            info["udp_buffers"] = self.udp_buffers
        if self.certificate is not None:
            info["certificate_sha256"] = self.certificate.sha256_hex
            info["development_certificate"] = self.certificate.development
        return info

    async def _certificate_hash(self, request: Request) -> Response:
        timeout = self.streaming.config.server.handshake_timeout
        if not await self.ready(timeout if timeout > 0 else None) or self.certificate is None:
            message = self.off or "the WebTransport server is not running"
            return JSONResponse({"error": "unavailable", "message": message}, status_code=503)
        host = request.url.hostname or self.host
        if ":" in host:
            host = f"[{host}]"
        return JSONResponse({
            "sha256_hex": self.certificate.sha256_hex,
            "sha256_base64": base64.b64encode(self.certificate.sha256).decode("ascii"),
            "development": self.certificate.development,
            "port": self.port,
            "url": f"https://{host}:{self.port}{self.default_path}",
        }, headers={"Cache-Control": "no-store"})


def shared_development_certificate(host: str, port: int) -> CertificatePair:
    """One development certificate for every process serving ``host``:``port`` (``uvicorn --workers N``).

    The workers share the UDP port (``SO_REUSEPORT``), and a browser checks
    the certificate of whichever worker its datagrams reach against the hash
    that whichever worker answered ``/webtransport/certificate-hash``: they
    must be one certificate. The first worker makes it in a private folder
    (0700, this user's) named after the address, under a lock; the others,
    and later runs, use it while it has more than a day left.
    """
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", host)
    folder = Path(tempfile.gettempdir()) / f"forge-streaming-wt-{os.getuid()}-{safe}-{port}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise PermissionError(f"{folder} is not a private folder of this user")
        with open(folder / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                pair = _reuse(folder)
                return pair or make_development_certificate(host, str(folder))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError as exc:
        log.warning("WebTransport: cannot share a development certificate in %s (%s); this process makes its "
                    "own, so several workers would each have another one: set webtransport.cert_file", folder, exc)
        return make_development_certificate(host)


def _reuse(folder: Path) -> CertificatePair | None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < datetime.timedelta(days=1):
        return None
    der = cert.public_bytes(serialization.Encoding.DER)
    return CertificatePair(str(cert_path), str(key_path), hashlib.sha256(der).digest(), development=True)
