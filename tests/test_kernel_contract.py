"""The contract: one place names what plugins may use, and plugins use nothing else.

Also the hook rules that make the contract safe to write against: every
hook parameter documented, a misspelled hook named with the real ones, an
``async def`` synchronous hook refused at load, ``firstresult`` where the
first answer wins.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import forge_streaming
import pytest
from forge_streaming import PLUGIN_API, Identity, PluginLoadError, Streaming, hookimpl, hookspecs
from forge_streaming.testing import open_connection

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_MODULES = {"forge_streaming", "forge_streaming.hookspecs", "forge_streaming.testing"}
STREAMING_NAMES = re.compile(r"\bstreaming$")


@pytest.fixture(autouse=True)
def only_memory_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_STREAMING_PLUGINS_ALLOW", "memory-pubsub,memory-rooms")


def _plugin_sources() -> list[Path]:
    files = []
    for top in ("plugins", "contrib"):
        for path in sorted((ROOT / top).glob("*/src/**/*.py")):
            files.append(path)
    assert files, "no plugin sources found"
    return files


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "forge_streaming" or node.module.startswith("forge_streaming.")):
            if node.module not in ALLOWED_MODULES:
                found.append(f"line {node.lineno}: imports from private kernel module {node.module}")
            elif node.module == "forge_streaming":
                for alias in node.names:
                    if alias.name not in forge_streaming.__all__:
                        found.append(f"line {node.lineno}: imports {alias.name}, not in forge_streaming.__all__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("forge_streaming.") and alias.name not in ALLOWED_MODULES:
                    found.append(f"line {node.lineno}: imports private kernel module {alias.name}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute)):
            owner = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
            if STREAMING_NAMES.search(owner) and node.attr not in PLUGIN_API and not node.attr.startswith("__"):
                found.append(f"line {node.lineno}: uses {owner}.{node.attr}, which is not in PLUGIN_API")
    return found


def test_plugins_and_contrib_use_only_the_contract() -> None:
    problems = {}
    for path in _plugin_sources():
        found = _violations(path)
        if found:
            problems[str(path.relative_to(ROOT))] = found
    assert not problems, f"kernel names outside the contract: {problems}"


def test_the_contract_check_catches_a_private_use(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from forge_streaming.service import Streaming\n"
                   "from forge_streaming import RoomProtocol\n"
                   "def f(self):\n    self.streaming.flusher.mark(1)\n    return streaming.counters\n")
    found = _violations(bad)
    assert len(found) == 4, found


def test_every_contract_name_exists_and_every_plugin_api_name_is_on_the_service() -> None:
    for name in forge_streaming.__all__:
        assert hasattr(forge_streaming, name), name
    for name in PLUGIN_API:
        assert hasattr(Streaming, name) or name in {"config", "node_id", "state", "started_at", "http_address",
                                                    "transports", "backend", "store", "plugins"}, name


def test_every_hook_parameter_is_documented() -> None:
    hooks = [getattr(hookspecs, name) for name in dir(hookspecs) if name.startswith("streaming_")]
    assert len(hooks) >= 18
    for hook in hooks:
        doc = inspect.getdoc(hook) or ""
        assert doc, f"{hook.__name__} has no docstring"
        for param in inspect.signature(hook).parameters:
            assert f":param {param}:" in doc, f"{hook.__name__}: parameter {param!r} is not documented"


def test_every_hook_is_in_the_plugin_guide() -> None:
    guide = (ROOT / "plugin-guide.md").read_text(encoding="utf-8")
    missing = [name for name in dir(hookspecs) if name.startswith("streaming_") and name not in guide]
    assert not missing, f"hooks missing from plugin-guide.md: {missing}"


def test_a_misspelled_hook_names_the_hooks_that_exist() -> None:
    class Typo:
        @hookimpl
        def streaming_conected(self, connection: object) -> None: ...

    with pytest.raises(PluginLoadError) as info:
        Streaming({}, plugins=[Typo()])
    message = str(info.value)
    assert "streaming_conected" in message and "did you mean 'streaming_connected'" in message
    assert "streaming_authenticate" in message and "streaming_disconnected" in message


def test_an_async_implementation_of_a_synchronous_hook_is_refused_at_load() -> None:
    class Counting:
        @hookimpl
        async def streaming_delivered(self, envelope: object, recipients: int) -> None: ...

    with pytest.raises(PluginLoadError, match=r"streaming_delivered with 'async def'.*synchronous"):
        Streaming({}, plugins=[Counting()])


def test_async_implementations_of_awaitable_hooks_load() -> None:
    class Fine:
        @hookimpl
        async def streaming_connected(self, connection: object) -> None: ...

    Streaming({}, plugins=[Fine()])


async def test_the_first_identity_wins_and_later_plugins_are_not_asked() -> None:
    asked: list[str] = []

    class Later:
        @hookimpl
        def streaming_authenticate(self) -> Identity:
            asked.append("later")
            return Identity("later")

    class First:
        @hookimpl
        async def streaming_authenticate(self) -> Identity:
            asked.append("first")
            return Identity("first")

    class NoOpinion:
        @hookimpl
        async def streaming_authenticate(self) -> None:
            asked.append("none")

    # pluggy asks the plugin registered last first
    streaming = Streaming({}, plugins=[Later(), First(), NoOpinion()])
    spec = hookspecs.streaming_authenticate.forge_streaming_spec  # type: ignore[attr-defined]  # set by pluggy's marker
    assert spec["firstresult"] is True
    async with streaming.running():
        conn = await open_connection(streaming)
        assert conn.user_id == "first"
        assert asked == ["none", "first"]


async def test_a_hook_nobody_implements_costs_nothing_and_a_later_registration_is_seen() -> None:
    from forge_streaming.plugins import make_plugin_manager

    manager = make_plugin_manager(entry_points=False)
    assert not manager.implemented("streaming_before_publish")
    assert await manager.acall("streaming_before_publish", message=None) == []
    seen: list[object] = []

    class Late:
        @hookimpl
        def streaming_before_publish(self, message: object) -> None:
            seen.append(message)

    manager.register(Late())
    assert manager.implemented("streaming_before_publish")
    await manager.acall("streaming_before_publish", message="m")
    assert seen == ["m"]
