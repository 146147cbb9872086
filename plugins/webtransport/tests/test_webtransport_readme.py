"""The README's examples run as written."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from forge_streaming import Streaming
from forge_streaming.testing import serve
from forge_streaming_webtransport import WebTransportTransport

if TYPE_CHECKING:
    from conftest import ClientKit  # the wt fixture's type (test modules do not import conftest at run time)

README = (Path(__file__).parent.parent / "README.md").read_text()


def block(language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", README, re.S)
    assert match is not None, f"no {language} block in README.md"
    return match.group(1)


def test_readme_config_is_valid(make_streaming: Callable[..., Streaming]) -> None:
    streaming = make_streaming(yaml.safe_load(block("yaml")))
    transport = streaming.transports["webtransport"]
    assert isinstance(transport, WebTransportTransport)
    settings = transport.settings
    assert settings.idle_timeout == 60 and settings.read_buffer == 1024 * 1024
    assert settings.allowed_origins == ["https://*.example.com"]


async def test_readme_echo_handler(wt: ClientKit) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(block("python"), "README.md", "exec"), namespace)
    async with serve(namespace["streaming"]) as srv, wt.client(srv.port) as client:
        session = await wt.session(client, srv.port, "/echo")
        sid = session.open_stream()
        session.send(sid, b"readme", end_stream=True)
        assert await session.read_until_end(sid) == b"readme"
        for _ in range(20):
            session.send_datagram(b"dgram")
            try:
                await client.wait_for(lambda: b"dgram" in client.datagrams, timeout=0.25)
                break
            except TimeoutError:
                continue
        assert b"dgram" in client.datagrams
