"""The kernel stays `mypy --strict` clean and the tree stays ruff clean, in CI too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_kernel_is_mypy_strict_clean():
    result = subprocess.run([str(BIN / "mypy"), "kernel/src"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean():
    contrib = [str(p.parent.relative_to(ROOT)) for p in ROOT.glob("contrib/*/pyproject.toml")]
    targets = ["kernel", "plugins", "tests", *contrib]
    result = subprocess.run([str(BIN / "ruff"), "check", *targets], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
