"""The ``webtransport`` transport: the kernel's view of the HTTP/3 server.

Over HTTP (ASGI) it serves only ``GET /webtransport/certificate-hash`` and
the ``Alt-Svc`` header; sessions arrive over UDP at the aioquic server that
``start`` runs and ``stop`` closes.
"""

from __future__ import annotations

import base64
import logging
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

from forge_streaming import Handler, Streaming, Transport
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .certificate import CertificatePair, load_certificate, make_development_certificate
from .server import WebTransportServer
from .settings import WebTransportSettings

log = logging.getLogger("forge_streaming.webtransport")
HASH_PATH = "/webtransport/certificate-hash"


class WebTransportTransport(Transport):
    name: ClassVar[str] = "webtransport"
    default_path: ClassVar[str] = "/wt"

    def __init__(self, streaming: Streaming) -> None:
        super().__init__(streaming)
        self.settings: WebTransportSettings = streaming.config.section("webtransport", WebTransportSettings)
        self.certificate: CertificatePair | None = None
        self.server: WebTransportServer | None = None

    @property
    def host(self) -> str:
        return self.settings.host or self.streaming.http_address[0]

    @property
    def port(self) -> int:
        """The UDP port: the bound one once started, else the configured or HTTP one."""
        if self.server is not None and self.server.address is not None:
            return self.server.address[1]
        return self.settings.port if self.settings.port is not None else self.streaming.http_address[1]

    def routes(self, endpoints: Mapping[str, Handler | None]) -> list[BaseRoute]:
        """Only the certificate hash: sessions arrive over UDP, and the server looks their paths up itself."""
        return [Route(HASH_PATH, self._certificate_hash)]

    def response_headers(self) -> Mapping[str, str]:
        return {"Alt-Svc": f'h3=":{self.port}"; ma=86400'}

    async def start(self) -> None:
        settings = self.settings
        if settings.cert_file or settings.key_file:
            self.certificate = load_certificate(settings.cert_file, settings.key_file)
        else:
            self.certificate = make_development_certificate(self.host)
        server = WebTransportServer(self.streaming, settings, self.certificate)
        await server.start(self.host, self.port)
        self.server = server
        kind = "development certificate" if self.certificate.development else "certificate"
        log.info("WebTransport (HTTP/3) listening on udp %s:%d", self.host, self.port)
        log.info("WebTransport certificate SHA-256: %s", self.certificate.sha256_hex)
        if self.certificate.development:
            print(f"WebTransport on udp {self.host}:{self.port}, {kind} SHA-256: {self.certificate.sha256_hex}",
                  file=sys.stderr, flush=True)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"port": self.port, "path": self.default_path}
        if self.server is not None:
            info["sessions"] = len(self.server.sessions)
        if self.certificate is not None:
            info["certificate_sha256"] = self.certificate.sha256_hex
            info["development_certificate"] = self.certificate.development
        return info

    async def _certificate_hash(self, request: Request) -> Response:
        if self.certificate is None or self.server is None:
            return JSONResponse({"error": "unavailable", "message": "the WebTransport server is not running"},
                                status_code=503)
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
