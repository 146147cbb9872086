"""docs/api.md names every public name: ``forge_streaming.__all__`` and ``PLUGIN_API``, one row each."""

from __future__ import annotations

import re
from pathlib import Path

import forge_streaming
import pytest

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"


def sections() -> dict[str, str]:
    """The page's ``## `` sections by heading."""
    parts = re.split(r"^## (.+)$", API.read_text(encoding="utf-8"), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def first_cells(text: str) -> list[str]:
    """What the first cell of each table row names: the code at its start (``name`` of ```name(...)``)."""
    return re.findall(r"^\| `([\w.]+)", text, flags=re.M)


def kernel_rows() -> list[str]:
    return [name for heading, text in sections().items() if heading.startswith("`forge_streaming`")
            for name in first_cells(text)]


def service_rows() -> list[str]:
    text = next(text for heading, text in sections().items() if heading.startswith("The service"))
    return [name.removeprefix("streaming.") for name in first_cells(text)]


@pytest.mark.parametrize("name", sorted(forge_streaming.__all__))
def test_every_name_of_the_contract_has_a_row(name: str) -> None:
    assert name in kernel_rows(), f"docs/api.md has no row for forge_streaming.{name}"


@pytest.mark.parametrize("name", sorted(forge_streaming.PLUGIN_API))
def test_every_attribute_a_plugin_may_use_has_a_row(name: str) -> None:
    assert name in service_rows(), f"docs/api.md has no row for streaming.{name} (PLUGIN_API)"


def test_no_row_names_something_that_is_not_there() -> None:
    kernel = kernel_rows()
    assert sorted(set(kernel) - set(forge_streaming.__all__)) == [], "rows for names not in forge_streaming.__all__"
    assert len(kernel) == len(set(kernel)), "a name has two rows"
    service = service_rows()
    assert sorted(set(service) - set(forge_streaming.PLUGIN_API)) == [], "service rows not in PLUGIN_API"
    assert len(service) == len(set(service)), "an attribute has two rows"


def test_each_row_says_something() -> None:
    rows = re.findall(r"^\| `[\w.]+[^|]*\| *(.*?) *\|$", API.read_text(encoding="utf-8"), flags=re.M)
    assert rows and all(len(what) > 10 for what in rows), [w for w in rows if len(w) <= 10]


def test_the_sse_event_class_lives_beside_streaming() -> None:
    """``Event`` is the kernel's (plain data; the SSE plugin encodes it), still importable from the plugin."""
    text = API.read_text(encoding="utf-8")
    assert "from forge_streaming import Event" in text
    sse = pytest.importorskip("forge_streaming_sse")
    assert sse.Event is forge_streaming.Event and "Event" in sse.__all__


def test_the_readme_links_the_reference() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/api.md)" in readme and "(docs/forge.md)" in readme and "(docs/deploy.md)" in readme
