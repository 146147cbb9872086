"""Every test of the workspace sees only the workspace's own plugins.

Whatever else is installed in the environment (a third-party transport, a
plugin that logs differently), the suite never loads it: every installed
entry point that kernel/, plugins/ and contrib/ do not declare is put on
the deny list users have (``FORGE_STREAMING_PLUGINS_DENY``, which adds to a
config's ``plugins.deny``). A test narrows the plugins further with the
``streaming_plugins_only`` fixture or its config's ``plugins.allow``.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def workspace_plugins() -> set[str]:
    names: set[str] = set()
    for pyproject in sorted(ROOT.glob("*/*/pyproject.toml")):
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        names.update(data.get("project", {}).get("entry-points", {}).get("forge_streaming", {}))
    return names


def foreign_plugins() -> list[str]:
    """Installed plugins this workspace does not declare."""
    return sorted({ep.name for ep in entry_points(group="forge_streaming")} - workspace_plugins())


@pytest.fixture(autouse=True)
def only_workspace_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    foreign = foreign_plugins()
    if foreign:
        monkeypatch.setenv("FORGE_STREAMING_PLUGINS_DENY", ",".join(foreign))
    else:
        monkeypatch.delenv("FORGE_STREAMING_PLUGINS_DENY", raising=False)
