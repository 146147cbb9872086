"""The HTTP side: certificate hash endpoint, Alt-Svc, certificates from config."""

from __future__ import annotations

import base64
import datetime
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from forge_streaming import ConfigError, Streaming
from forge_streaming.testing import RunningServer, serve
from forge_streaming_webtransport import make_development_certificate

if TYPE_CHECKING:
    from conftest import ClientKit  # the wt fixture's type (test modules do not import conftest at run time)


async def test_certificate_hash_endpoint_and_alt_svc(server: RunningServer, wt: ClientKit) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{server.url}/webtransport/certificate-hash")
        health = await http.get(f"{server.url}/healthz")
    info = response.json()
    assert response.status_code == 200
    assert info["port"] == server.port
    assert info["url"] == f"https://127.0.0.1:{server.port}/wt"
    assert base64.b64decode(info["sha256_base64"]).hex() == info["sha256_hex"]
    assert health.headers["alt-svc"] == f'h3=":{server.port}"; ma=86400'
    transport = server.streaming.transports["webtransport"]
    der = x509.load_pem_x509_certificate(open(transport.certificate.cert_file, "rb").read()).public_bytes(
        serialization.Encoding.DER)
    assert hashlib.sha256(der).hexdigest() == info["sha256_hex"]
    async with wt.client(server.port) as client:  # and the UDP server is on that same port number
        assert (await wt.session(client, server.port, "/wt")).status == 200


def test_development_certificate_fits_browser_rules(tmp_path: Path) -> None:
    pair = make_development_certificate("127.0.0.1", str(tmp_path))
    cert = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < datetime.timedelta(days=14)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}
    assert pair.sha256 == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


async def test_configured_certificate_is_served(make_streaming: Callable[..., Streaming], tmp_path: Path,
                                                wt: ClientKit) -> None:
    pair = make_development_certificate("127.0.0.1", str(tmp_path))
    streaming = make_streaming({"webtransport": {"cert_file": pair.cert_file, "key_file": pair.key_file}})
    async with serve(streaming) as srv:
        async with httpx.AsyncClient() as http:
            info = (await http.get(f"{srv.url}/webtransport/certificate-hash")).json()
        assert info["sha256_hex"] == pair.sha256_hex and info["development"] is False
        async with wt.client(srv.port) as client:
            assert (await wt.session(client, srv.port, "/wt")).status == 200


@pytest.mark.parametrize(("config", "key"), [
    ({"cert_file": "/nonexistent/cert.pem", "key_file": "/nonexistent/key.pem"}, "webtransport.cert_file"),
    ({"cert_file": "/nonexistent/cert.pem"}, "webtransport.key_file"),
])
async def test_bad_certificate_config_names_the_key(make_streaming: Callable[..., Streaming], config: dict[str, Any],
                                                     key: str) -> None:
    streaming = make_streaming({"webtransport": config})
    with pytest.raises(ConfigError, match=key):
        async with streaming.running():
            pass
    await streaming.stop()


@pytest.mark.parametrize("key_file", ["not-a-key", "another-pair"])
async def test_a_key_that_is_not_the_certificates_is_refused_at_start(
        make_streaming: Callable[..., Streaming], tmp_path: Path, key_file: str) -> None:
    """Checked at start, although the QUIC server loads the pair later, in a thread (startup, issue 19)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pair = make_development_certificate("127.0.0.1", str(tmp_path / "a"))
    other = make_development_certificate("127.0.0.1", str(tmp_path / "b"))
    if key_file == "not-a-key":
        key = tmp_path / "key.pem"
        key.write_text("not a key\n")
    else:
        key = Path(other.key_file)
    streaming = make_streaming({"webtransport": {"cert_file": pair.cert_file, "key_file": str(key)}})
    with pytest.raises(ConfigError, match=f"webtransport.key_file: '{key}'"):
        async with streaming.running():
            pass
    await streaming.stop()


def test_bad_setting_is_refused_with_its_key(make_streaming: Callable[..., Streaming]) -> None:
    with pytest.raises(ConfigError, match="webtransport.idle_timeout"):
        make_streaming({"webtransport": {"idle_timeout": "soon"}})
