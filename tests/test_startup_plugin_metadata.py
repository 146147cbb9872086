"""Startup (issue 19): building the plugin manager parses no distribution's metadata.

Naming a plugin's distribution and version means parsing its METADATA
file (about 0.15 ms a plugin, at every start); only ``forge-streaming
plugins`` and the errors need them, so they are read then. Plugins are still
found anew at every start (a plugin installed later is found: see
``test_kernel_plugins.py``, which installs one while the tests run).
"""

from __future__ import annotations

from importlib.metadata import PathDistribution

import pytest
from forge_streaming.plugins import make_plugin_manager


def test_plugins_are_loaded_without_reading_metadata_and_listed_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    make_plugin_manager()  # whatever a first import of the plugins reads is not counted
    reads: list[str] = []
    read_text = PathDistribution.read_text

    def counting(self: PathDistribution, filename: str) -> str | None:
        if filename in ("METADATA", "PKG-INFO"):
            reads.append(filename)
        return read_text(self, filename)

    monkeypatch.setattr(PathDistribution, "read_text", counting)
    manager = make_plugin_manager()
    assert {"websocket", "memory-pubsub"} <= set(manager.names())
    assert reads == []
    infos = {info.name: info for info in manager.info()}
    assert (infos["memory-pubsub"].distribution, infos["memory-pubsub"].version) == ("forge-streaming-memory", "0.1.0")
    assert infos["http-api"].distribution == "forge-streaming"
    assert reads
