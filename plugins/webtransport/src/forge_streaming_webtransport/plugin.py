"""Hook implementations: the entry point ``webtransport`` in group ``forge_streaming``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from forge_streaming import ConfigSection, Transport, hookimpl

from .settings import WebTransportSettings
from .transport import WebTransportTransport


@hookimpl
def streaming_register_transports() -> Sequence[type[Transport]]:
    return [WebTransportTransport]


@hookimpl
def streaming_config_sections() -> Mapping[str, type[ConfigSection]]:
    return {"webtransport": WebTransportSettings}
