"""The "Writing a transport" section of plugin-guide.md shows the shipped code, byte for byte."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "contrib" / "longpoll"
CAPTIONED_BLOCK = re.compile(r"`(contrib/longpoll/[^`]+)`:\n\n```(?:python|toml)\n(.*?)```", re.S)


def section() -> str:
    guide = (ROOT / "plugin-guide.md").read_text()
    start = guide.index("\n## Writing a transport\n")
    end = guide.find("\n## ", start + 1)
    return guide[start:end if end != -1 else None]


def test_each_code_block_is_the_file_it_names() -> None:
    shown = CAPTIONED_BLOCK.findall(section())
    assert shown, "no captioned code blocks under ## Writing a transport"
    for path, code in shown:
        assert code == (ROOT / path).read_text(), f"plugin-guide.md shows an outdated {path}"


def test_every_python_block_is_captioned_and_every_module_is_shown() -> None:
    text = section()
    shown = {path for path, _ in CAPTIONED_BLOCK.findall(text)}
    assert text.count("```python\n") == sum(path.endswith(".py") for path in shown)
    modules = {str(p.relative_to(ROOT)) for p in (PACKAGE / "src").rglob("*.py")}
    assert modules <= shown, f"modules missing from the guide: {sorted(modules - shown)}"
    assert "contrib/longpoll/pyproject.toml" in shown
