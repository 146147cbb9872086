"""The plugin's modules talk through public methods, and only the adapter touches aioquic's privates."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path

import aioquic
import forge_streaming_webtransport
from forge_streaming_webtransport import aioquic_adapter, server, session, streams, transport

SRC = Path(forge_streaming_webtransport.__file__).parent
ADAPTER = "aioquic_adapter.py"


def _private_uses(path: Path) -> list[tuple[int, str, str]]:
    """(line, owner, name) of every ``x._name`` in ``path`` whose ``x`` is not ``self``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            if owner not in ("self", "cls"):
                found.append((node.lineno, owner, node.attr))
    return found


def test_no_module_reaches_into_another_objects_privates() -> None:
    offenders = {path.name: uses for path in SRC.glob("*.py") if path.name != ADAPTER
                 and (uses := _private_uses(path))}
    assert offenders == {}


def _self_privates(cls: type) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr.startswith("_")
            and not node.attr.startswith("__")}


def test_aioquic_privates_only_in_the_adapter() -> None:
    """A subclass of an aioquic class outside the adapter uses none of its base's private names."""
    for module in (server, session, streams, transport):
        for cls in vars(module).values():
            if not (isinstance(cls, type) and cls.__module__ == module.__name__):
                continue
            bases = [b for b in cls.__mro__ if b.__module__.startswith("aioquic.")]
            inherited = set().union(*(_self_privates(b) | {n for n in vars(b) if n.startswith("_")} for b in bases))
            clash = _self_privates(cls) & inherited
            assert not clash, f"{cls.__name__} uses aioquic's {sorted(clash)}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_adapter_names_the_installed_aioquic_and_the_requirement_admits_only_those() -> None:
    checked = sorted(aioquic_adapter.CHECKED_VERSIONS, key=_version)
    assert aioquic.__version__ in checked
    assert all(v in (aioquic_adapter.__doc__ or "") for v in checked)
    pyproject = (SRC.parent.parent / "pyproject.toml").read_text()
    requirement = re.search(r'"aioquic>=([\d.]+),<([\d.]+)"', pyproject)
    assert requirement is not None, "aioquic needs a floor and a ceiling"
    floor, ceiling = requirement.groups()
    assert _version(floor) == _version(checked[0])  # the oldest release the tests ran on
    major, minor = _version(checked[-1])[:2]
    assert _version(ceiling) == (major, minor + 1)  # patch releases of the newest minor checked, no further
