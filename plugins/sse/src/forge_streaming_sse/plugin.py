"""Entry point ``sse`` (group ``forge_streaming``): registers the transport and its config section."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from forge_streaming import ConfigSection, Transport, hookimpl

from .settings import SSESettings
from .transport import SSETransport


@hookimpl
def streaming_register_transports() -> Sequence[type[Transport]]:
    return [SSETransport]


@hookimpl
def streaming_config_sections() -> Mapping[str, type[ConfigSection]]:
    return {"sse": SSESettings}
