"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from forge_streaming.testing import serve

README = (Path(__file__).parent.parent / "README.md").read_text()


def block(language: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", README, re.S).group(1)  # type: ignore[union-attr]


def test_readme_config_is_valid(make_streaming):
    streaming = make_streaming(yaml.safe_load(block("yaml")))
    settings = streaming.transports["webtransport"].settings
    assert settings.idle_timeout == 60 and settings.read_buffer == 1024 * 1024
    assert settings.allowed_origins == ["https://*.example.com"]


async def test_readme_echo_handler(wt):
    namespace: dict = {}
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
