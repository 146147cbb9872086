"""The plugin manager: entry points, allow/deny lists, and errors that name the plugin."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from forge_streaming import Connection, PluginLoadError, Streaming, hookimpl
from forge_streaming.plugins import make_plugin_manager

ROOT = Path(__file__).resolve().parents[1]


def install_fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, module_source: str,
                              entry: str) -> None:
    """A real distribution on sys.path: dist-info with an entry point, and its module."""
    dist = tmp_path / f"{name.replace('-', '_')}-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text(f"[forge_streaming]\n{entry}\n")
    module = entry.split("=")[1].strip()
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(module_source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("FORGE_STREAMING_PLUGINS_DENY", raising=False)  # as a user's environment: all of it loads


GOOD = """
    from forge_streaming import hookimpl
    JOINED = []

    @hookimpl
    def streaming_room_joined(connection, room):
        JOINED.append(room)
"""


def test_entry_point_plugin_is_listed_with_dist_version_and_hooks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_distribution(tmp_path, monkeypatch, "fake-audit", GOOD, "fake-audit = fake_audit_mod")
    manager = make_plugin_manager()
    info = {i.name: i for i in manager.info()}["fake-audit"]
    assert (info.distribution, info.version, info.hooks) == ("fake-audit", "1.2.3", ["streaming_room_joined"])


def test_deny_and_allow_lists_from_config_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_distribution(tmp_path, monkeypatch, "fake-audit", GOOD, "fake-audit = fake_audit_mod2")
    assert "fake-audit" not in make_plugin_manager(deny=["fake-audit"]).names()
    monkeypatch.setenv("FORGE_STREAMING_PLUGINS_ALLOW", "memory-pubsub,memory-rooms")
    assert sorted(make_plugin_manager().names()) == ["http-api", "memory-pubsub", "memory-rooms"]
    assert "http-api" not in make_plugin_manager(deny=["http-api"]).names()
    monkeypatch.setenv("FORGE_STREAMING_PLUGINS_ALLOW", "memory-pubsub,nope")
    with pytest.raises(PluginLoadError, match="nope"):
        make_plugin_manager()


def test_plugin_that_fails_to_import_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_distribution(tmp_path, monkeypatch, "broken-plugin", "import no_such_module_here\n",
                              "broken = broken_plugin_mod")
    with pytest.raises(PluginLoadError) as info:
        Streaming({})
    message = str(info.value)
    assert "'broken'" in message and "broken-plugin" in message and "no_such_module_here" in message


def test_misspelled_hook_is_an_error_at_load_time() -> None:
    class Typo:
        # misspelled: the real hook is streaming_room_joined
        @hookimpl
        def streaming_room_join(self, connection: Connection, room: str) -> None:
            pass

    with pytest.raises(PluginLoadError, match="streaming_room_join"):
        Streaming({}, plugins=[Typo()])


def test_hookimpl_with_unknown_argument_is_an_error() -> None:
    class WrongArgs:
        @hookimpl
        def streaming_room_joined(self, connection: Connection, room: str, extra: object) -> None:
            pass

    with pytest.raises(PluginLoadError, match="extra"):
        Streaming({}, plugins=[WrongArgs()])


async def test_entry_point_plugin_hooks_fire_in_a_running_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from forge_streaming.testing import open_connection

    install_fake_distribution(tmp_path, monkeypatch, "fake-audit", GOOD, "fake-audit = fake_audit_mod3")
    fake_audit_mod3 = importlib.import_module("fake_audit_mod3")  # written by the test: no module for mypy to find

    streaming = Streaming({})
    async with streaming.running():
        conn = await open_connection(streaming)
        await conn.join_room("audited")
    assert fake_audit_mod3.JOINED == ["audited"]


def test_the_suite_sees_only_the_workspace_plugins_whatever_else_is_installed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party plugin in the environment (here: one that breaks every connection) changes no test."""
    import importlib.util
    import sys

    install_fake_distribution(tmp_path, monkeypatch, "noisy-plugin", NOISY, "noisy = noisy_plugin_mod")
    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    assert spec is not None and spec.loader is not None
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    assert root_conftest.foreign_plugins() == ["noisy"]
    monkeypatch.setenv("FORGE_STREAMING_PLUGINS_DENY", "noisy")  # what the root conftest sets for every test
    names = make_plugin_manager(deny=["webtransport"]).names()
    assert "noisy" not in names and "webtransport" not in names and {"websocket", "memory-pubsub"} <= set(names)
    assert "noisy_plugin_mod" not in sys.modules


NOISY = """
    from forge_streaming import hookimpl

    @hookimpl
    def streaming_connected(connection):
        raise RuntimeError("a plugin the suite does not know")
"""
