"""Every package stays `mypy --strict` clean and the tree stays ruff clean, in CI too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


SOURCES = ["kernel/src", *sorted(str(p.parent.relative_to(ROOT) / "src")
                                 for pattern in ("plugins/*/pyproject.toml", "contrib/*/pyproject.toml")
                                 for p in ROOT.glob(pattern))]


TEST_DIRS = ["tests", *sorted(str(p.relative_to(ROOT)) for pattern in ("plugins/*/tests", "contrib/*/tests")
                               for p in ROOT.glob(pattern))]


@pytest.mark.slow
def test_every_package_is_mypy_strict_clean() -> None:
    """The kernel, every plugin and every contrib package (pyproject.toml sets strict = true)."""
    assert len(SOURCES) >= 11
    result = subprocess.run([str(BIN / "mypy"), *SOURCES, "conftest.py"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("tests", TEST_DIRS)
def test_every_test_directory_is_mypy_strict_clean(tests: str) -> None:
    """One run per directory: each has its own conftest module."""
    result = subprocess.run([str(BIN / "mypy"), tests], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    contrib = [str(p.parent.relative_to(ROOT)) for p in ROOT.glob("contrib/*/pyproject.toml")]
    targets = ["kernel", "plugins", "tests", "conftest.py", *contrib]
    result = subprocess.run([str(BIN / "ruff"), "check", *targets], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
