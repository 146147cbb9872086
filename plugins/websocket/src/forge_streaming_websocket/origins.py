"""The Origin check done before the upgrade (cross-site WebSocket hijacking)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _host_port(host: str, default_port: int | None) -> str:
    """``Example.com`` -> ``example.com:80`` so that equal endpoints compare equal."""
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal, maybe with a port
        end = host.find("]")
        name, rest = host[: end + 1], host[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = host.partition(":")
    if not port and default_port is not None:
        port = str(default_port)
    return f"{name}:{port}"


def origin_allowed(origin: str | None, headers: Mapping[str, str], allowed: Sequence[str],
                   *, scheme: str = "http") -> bool:
    """Whether a client sending ``origin`` may connect.

    No Origin header means a non-browser client: allowed (browsers always
    send one). With no allow-list, the Origin must name the same host and
    port as the Host header. Otherwise it must match one pattern, e.g.
    ``https://*.example.com`` or ``http://127.0.0.1:*`` (case-insensitive).
    """
    if origin is None:
        return True
    origin = origin.strip().lower()
    if allowed:
        return any(fnmatchcase(origin, pattern.strip().lower().rstrip("/")) for pattern in allowed)
    if origin == "null":
        return False
    parts = urlsplit(origin)
    if not parts.netloc:
        return False
    host = headers.get("host")
    if not host:
        return False
    origin_default = _DEFAULT_PORTS.get(parts.scheme)
    request_default = _DEFAULT_PORTS.get(scheme, 80)
    return _host_port(parts.netloc, origin_default) == _host_port(host, request_default)
