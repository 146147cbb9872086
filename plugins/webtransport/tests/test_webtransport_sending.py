"""How datagrams leave: UDP GSO runs, and the transport's sendto for everything else."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest
from forge_streaming_webtransport.aioquic_adapter import DatagramSender


class _Collect(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.append(data)


async def _pair() -> tuple[asyncio.DatagramTransport, asyncio.DatagramTransport, _Collect, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    receiver, collect = await loop.create_datagram_endpoint(_Collect, local_addr=("127.0.0.1", 0))
    sender, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    return sender, receiver, collect, receiver.get_extra_info("sockname")


async def _received(collect: _Collect, count: int) -> list[bytes]:
    for _ in range(200):
        if len(collect.got) >= count:
            break
        await asyncio.sleep(0.01)
    return collect.got


@pytest.mark.skipif(sys.platform != "linux", reason="UDP GSO is Linux's")
async def test_runs_of_equal_datagrams_arrive_as_the_datagrams_they_were() -> None:
    sender_transport, receiver, collect, addr = await _pair()
    sender = DatagramSender(sender_transport)
    try:
        assert sender.gso
        datagrams = [bytes([i]) * 1350 for i in range(5)] + [b"last" * 10, b"x" * 1350, b"y" * 2000, b"z"]
        sender.send([(data, addr) for data in datagrams])
        assert await _received(collect, len(datagrams)) == datagrams  # one host, loopback: in order
        assert sender.gso  # the OS took the segments
    finally:
        sender.close()
        sender_transport.close()
        receiver.close()
    assert not sender.gso


async def test_without_gso_every_datagram_goes_through_the_transport() -> None:
    sender_transport, receiver, collect, addr = await _pair()
    sender = DatagramSender(sender_transport)
    sender.close()  # as on an OS without UDP_SEGMENT
    sent: list[bytes] = []
    original = sender_transport.sendto

    def sendto(data: bytes, address: tuple[str, int] | None = None) -> None:
        sent.append(data)
        original(data, address)

    sender_transport.sendto = sendto  # type: ignore[method-assign,assignment]
    try:
        datagrams = [b"a" * 1350, b"b" * 1350, b"c" * 100]
        sender.send([(data, addr) for data in datagrams])
        assert sent == datagrams
        assert await _received(collect, 3) == datagrams
    finally:
        sender_transport.close()
        receiver.close()


def test_udp_segment_constant() -> None:
    assert getattr(socket, "UDP_SEGMENT", 103) == 103
