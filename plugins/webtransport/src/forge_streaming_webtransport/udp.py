"""The HTTP/3 server's UDP socket, bound without aioquic.

The transport binds it at start, so the port is taken (or its refusal
raised) before the service reports itself up, while aioquic (about 0.1 s of
imports) loads in a worker thread: what clients send meanwhile waits in the
socket's receive buffer, and the QUIC server reads it once it serves the
socket (see ``WebTransportTransport.start``).

One socket serves every client, so its buffers are sized up front
(``webtransport.udp_buffer``): at Linux's default (208 KiB) the
datagrams of 1,000 clients (handshakes, acknowledgements of a burst)
overflowed it, and the bench's WebTransport case lost ~45,000 datagrams a
run (resent by QUIC).
"""

from __future__ import annotations

import socket
import sys

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


def size_buffers(sock: socket.socket, size: int) -> tuple[int, int]:
    """Ask for ``size`` bytes of receive and of send buffer; return what the OS granted (receive, send).

    Past ``net.core.rmem_max`` / ``wmem_max`` Linux grants the maximum, or all of it to a process with
    CAP_NET_ADMIN through ``SO_RCVBUFFORCE`` / ``SO_SNDBUFFORCE``, which is tried next. Linux reports
    twice what it books (its bookkeeping overhead), so a grant counts as ``getsockopt`` over two there.
    """
    granted = []
    for option, forced in ((socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", None)),
                           (socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", None))):
        sock.setsockopt(socket.SOL_SOCKET, option, size)
        if _granted(sock, option) < size and forced is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, forced, size)
            except OSError:  # not privileged: the capped size stays
                pass
        granted.append(_granted(sock, option))
    return granted[0], granted[1]


def _granted(sock: socket.socket, option: int) -> int:
    value = sock.getsockopt(socket.SOL_SOCKET, option)
    return value // 2 if sys.platform == "linux" else value
