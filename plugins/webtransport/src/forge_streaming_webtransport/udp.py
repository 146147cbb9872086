"""The HTTP/3 server's UDP socket, bound without aioquic.

The transport binds it at start, so the port is taken (or its refusal
raised) before the service reports itself up, while aioquic (about 0.1 s of
imports) loads in a worker thread: what clients send meanwhile waits in the
socket's receive buffer, and the QUIC server reads it once it serves the
socket (see ``WebTransportTransport.start``).
"""

from __future__ import annotations

import socket

REUSE_PORT = hasattr(socket, "SO_REUSEPORT")


def bind(host: str, port: int, *, reuse_port: bool = REUSE_PORT) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` (what ``create_datagram_endpoint(local_addr=...)`` does).

    With ``reuse_port`` (``SO_REUSEPORT``, where the OS has it) several processes of one user bind the
    same port, as ``uvicorn --workers N`` does with its TCP port: the kernel hands each client's
    datagrams to one of them, always the same one for a given client address. Each address ``host``
    resolves to is tried in turn; the last failure is raised when none binds.
    """
    error: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM,
                                                              proto=socket.IPPROTO_UDP):
        sock = socket.socket(family, kind, proto)
        try:
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setblocking(False)
        return sock
    raise error or OSError(f"getaddrinfo({host!r}, {port}) returned no address")
