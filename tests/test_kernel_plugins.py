"""The plugin manager: entry points, allow/deny lists, and errors that name the plugin."""

from __future__ import annotations

import textwrap

import pytest
from forge_streaming import PluginLoadError, Streaming, hookimpl
from forge_streaming.plugins import make_plugin_manager


def install_fake_distribution(tmp_path, monkeypatch, name: str, module_source: str, entry: str) -> None:
    """A real distribution on sys.path: dist-info with an entry point, and its module."""
    dist = tmp_path / f"{name.replace('-', '_')}-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text(f"[forge_streaming]\n{entry}\n")
    module = entry.split("=")[1].strip()
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(module_source))
    monkeypatch.syspath_prepend(str(tmp_path))


GOOD = """
    from forge_streaming import hookimpl
    JOINED = []

    @hookimpl
    def streaming_room_joined(connection, room):
        JOINED.append(room)
"""


def test_entry_point_plugin_is_listed_with_dist_version_and_hooks(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, monkeypatch, "fake-audit", GOOD, "fake-audit = fake_audit_mod")
    manager = make_plugin_manager()
    info = {i.name: i for i in manager.info()}["fake-audit"]
    assert (info.distribution, info.version, info.hooks) == ("fake-audit", "1.2.3", ["streaming_room_joined"])


def test_deny_and_allow_lists_from_config_and_environment(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, monkeypatch, "fake-audit", GOOD, "fake-audit = fake_audit_mod2")
    assert "fake-audit" not in make_plugin_manager(deny=["fake-audit"]).names()
    monkeypatch.setenv("FORGE_STREAMING_PLUGINS_ALLOW", "memory-pubsub,memory-rooms")
    assert sorted(make_plugin_manager().names()) == ["memory-pubsub", "memory-rooms"]
    monkeypatch.setenv("FORGE_STREAMING_PLUGINS_ALLOW", "memory-pubsub,nope")
    with pytest.raises(PluginLoadError, match="nope"):
        make_plugin_manager()


def test_plugin_that_fails_to_import_is_named(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path, monkeypatch, "broken-plugin", "import no_such_module_here\n",
                              "broken = broken_plugin_mod")
    with pytest.raises(PluginLoadError) as info:
        Streaming({})
    message = str(info.value)
    assert "'broken'" in message and "broken-plugin" in message and "no_such_module_here" in message


def test_misspelled_hook_is_an_error_at_load_time():
    class Typo:
        @hookimpl
        def streaming_room_join(self, connection, room):  # the real hook is streaming_room_joined
            pass

    with pytest.raises(PluginLoadError, match="streaming_room_join"):
        Streaming({}, plugins=[Typo()])


def test_hookimpl_with_unknown_argument_is_an_error():
    class WrongArgs:
        @hookimpl
        def streaming_room_joined(self, connection, room, extra):
            pass

    with pytest.raises(PluginLoadError, match="extra"):
        Streaming({}, plugins=[WrongArgs()])


async def test_entry_point_plugin_hooks_fire_in_a_running_server(tmp_path, monkeypatch):
    from forge_streaming.testing import open_connection

    install_fake_distribution(tmp_path, monkeypatch, "fake-audit", GOOD, "fake-audit = fake_audit_mod3")
    import fake_audit_mod3

    streaming = Streaming({})
    async with streaming.running():
        conn = await open_connection(streaming)
        await conn.join_room("audited")
    assert fake_audit_mod3.JOINED == ["audited"]
