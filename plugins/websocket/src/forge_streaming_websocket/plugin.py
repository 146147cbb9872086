"""The entry point the kernel loads (group ``forge_streaming``, name ``websocket``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from forge_streaming import ConfigSection, Transport
from forge_streaming.hookspecs import hookimpl

from .settings import WebSocketSettings
from .transport import WebSocketTransport


@hookimpl
def streaming_register_transports() -> Sequence[type[Transport]]:
    return [WebSocketTransport]


@hookimpl
def streaming_config_sections() -> Mapping[str, type[ConfigSection]]:
    return {"websocket": WebSocketSettings}
