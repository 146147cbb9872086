"""The one Origin rule of every transport (cross-site WebSocket, SSE and WebTransport requests).

A browser names the page that opens a connection in the ``Origin`` header;
a page of another site must not be able to open one with the user's
cookies. Each transport asks :func:`origin_allowed` before anything else
(WebSocket before the upgrade, SSE before the stream and the send URL,
WebTransport before answering the CONNECT) and answers 403 when it says no.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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


def origin_allowed(origin: str | None, headers: Mapping[str, str], allowed: Sequence[str] = (),
                   *, scheme: str = "http", also: Iterable[str] = ()) -> bool:
    """Whether a client sending ``origin`` may connect.

    - No Origin header: a non-browser client, allowed (browsers always send
      one on cross-site requests).
    - The server's own pages: the Origin names the same host and port as
      the request's ``Host`` header (default ports by scheme, so
      ``https://a.example`` is ``a.example:443``), or one of the ``also``
      host:port values (WebTransport adds the HTTP server's address).
    - Any other origin must match one of ``allowed``, shell-style patterns
      compared case-insensitively: ``https://*.example.com``,
      ``http://127.0.0.1:*``.
    - ``null`` (sandboxed frames, ``file:`` pages) is refused unless a
      pattern names it.
    """
    if origin is None:
        return True
    origin = origin.strip().lower()
    if any(fnmatchcase(origin, pattern.strip().lower().rstrip("/")) for pattern in allowed):
        return True
    if origin == "null":
        return False
    parts = urlsplit(origin)
    if not parts.netloc:
        return False
    mine = _host_port(parts.netloc, _DEFAULT_PORTS.get(parts.scheme))
    request_default = _DEFAULT_PORTS.get(scheme, 80)
    hosts = [headers.get("host") or "", *also]
    return any(host and mine == _host_port(host, request_default) for host in hosts)
