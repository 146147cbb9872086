"""TLS material for the HTTP/3 server: a loaded pair or a development certificate.

Browsers accept a self-signed certificate for WebTransport only through
``serverCertificateHashes``, and only if it is ECDSA P-256 and valid for
less than 14 days; the development certificate is made to fit exactly that.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from forge_streaming import ConfigError

if TYPE_CHECKING:  # cryptography is imported when a certificate is made or loaded, not with the plugin
    from cryptography import x509

DEV_VALIDITY = datetime.timedelta(days=10)


@dataclass(frozen=True)
class CertificatePair:
    """PEM files on disk (aioquic loads from paths) and the certificate's SHA-256."""

    cert_file: str
    key_file: str
    sha256: bytes
    development: bool

    @property
    def sha256_hex(self) -> str:
        return self.sha256.hex()


def _san_names(host: str | None) -> list[x509.GeneralName]:
    from cryptography import x509

    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    ips = {"127.0.0.1", "::1"}
    if host and host not in ("0.0.0.0", "::", "localhost"):
        try:
            ips.add(str(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in sorted(ips)]
    return names


def make_development_certificate(host: str | None, directory: str | None = None) -> CertificatePair:
    """A fresh ECDSA P-256 certificate valid for 10 days, written to a private temp dir."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forge-streaming development")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + DEV_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_san_names(host)), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder = Path(directory or tempfile.mkdtemp(prefix="forge-streaming-wt-"))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    der = cert.public_bytes(serialization.Encoding.DER)
    return CertificatePair(str(cert_path), str(key_path), hashlib.sha256(der).digest(), development=True)


def load_certificate(cert_file: str | None, key_file: str | None) -> CertificatePair:
    """Check the configured pair is readable; name the key and file when it is not."""
    if not cert_file or not key_file:
        missing = "webtransport.key_file" if cert_file else "webtransport.cert_file"
        raise ConfigError(f"{missing}: not set; set both webtransport.cert_file and webtransport.key_file, "
                          "or neither for a development certificate")
    for key, path in (("webtransport.cert_file", cert_file), ("webtransport.key_file", key_file)):
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ConfigError(f"{key}: cannot read {path!r}; expected a readable PEM file")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except ValueError as exc:
        raise ConfigError(f"webtransport.cert_file: {cert_file!r} is not a PEM certificate ({exc})") from None
    # checked here, at start: the QUIC server loads the pair later, off the event loop, where a bad key
    # would only turn WebTransport off instead of stopping the server with the key's name
    try:
        private_key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"webtransport.key_file: {key_file!r} is not an unencrypted PEM private key "
                          f"({exc})") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private_key.public_key().public_bytes(serialization.Encoding.DER, public)
            != cert.public_key().public_bytes(serialization.Encoding.DER, public)):
        raise ConfigError(f"webtransport.key_file: {key_file!r} is not the key of webtransport.cert_file "
                          f"{cert_file!r}")
    der = cert.public_bytes(serialization.Encoding.DER)
    return CertificatePair(cert_file, key_file, hashlib.sha256(der).digest(), development=False)
