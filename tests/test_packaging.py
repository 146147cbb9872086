"""Package hygiene: every distribution in the workspace is typed, says what it supports, and installs.

Static checks (fast) read each ``pyproject.toml``. The slow test builds a
wheel of every distribution, installs them all into a fresh virtualenv
(dependencies from the package index), and checks that the plugins load
and ``forge-streaming serve`` answers ``/healthz`` from there: what a user
gets from ``pip install``, without the editable checkouts of this repo.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Any

import pytest
from forge_streaming.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
DISTS = [ROOT / "kernel"] + sorted(p.parent for p in (*ROOT.glob("plugins/*/pyproject.toml"),
                                                      *ROOT.glob("contrib/*/pyproject.toml")))
IDS = [str(d.relative_to(ROOT)) for d in DISTS]


def project(dist: Path) -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((dist / "pyproject.toml").read_text())["project"]
    return data


def packages(dist: Path) -> list[str]:
    """Top-level import packages of a src-layout distribution."""
    return sorted(p.name for p in (dist / "src").iterdir()
                  if p.is_dir() and not p.name.endswith(".egg-info") and not p.name.startswith(("_", ".")))


def plugin_entry_points(dist: Path) -> dict[str, str]:
    return dict(project(dist).get("entry-points", {}).get("forge_streaming", {}))


@pytest.mark.parametrize("dist", DISTS, ids=IDS)
def test_declares_python_versions_and_entry_points(dist: Path) -> None:
    meta = project(dist)
    assert meta.get("requires-python") == ">=3.11", f"{dist.name}: requires-python must be '>=3.11'"
    versions = [c for c in meta.get("classifiers", []) if c.startswith("Programming Language :: Python :: 3.")]
    assert versions, f"{dist.name}: no 'Programming Language :: Python :: 3.x' classifier"
    assert "Typing :: Typed" in meta.get("classifiers", []), f"{dist.name}: no 'Typing :: Typed' classifier"
    if dist.name == "kernel":
        assert meta["scripts"]["forge-streaming"] == "forge_streaming.cli:main"
    else:
        assert plugin_entry_points(dist) or meta.get("scripts"), (
            f"{dist.name}: declares no [project.entry-points.forge_streaming] (nor a console script)")
        assert "forge-streaming" in " ".join(meta.get("dependencies", [])), f"{dist.name}: must depend on the kernel"


@pytest.mark.parametrize("dist", DISTS, ids=IDS)
def test_ships_py_typed(dist: Path) -> None:
    names = packages(dist)
    assert names, f"{dist.name}: no package under src/"
    data = tomllib.loads((dist / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
    for name in names:
        assert (dist / "src" / name / "py.typed").is_file(), f"{dist.name}: src/{name}/py.typed is missing"
        assert "py.typed" in data.get("package-data", {}).get(name, []), (
            f"{dist.name}: [tool.setuptools.package-data] {name} does not include py.typed")


def _run(command: list[str], *, timeout: float, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _clean_env() -> dict[str, str]:
    """The environment minus this checkout's venv and any forge-streaming settings."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("FORGE_STREAMING_", "PYTHON", "VIRTUAL_ENV"))}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheels_build_install_into_a_clean_venv_and_serve(tmp_path: Path) -> None:
    # Build from copies: setuptools writes build/ and *.egg-info next to the sources it builds.
    sources = []
    for dist in DISTS:
        copy = tmp_path / "src" / str(dist.relative_to(ROOT)).replace("/", "-")
        shutil.copytree(dist, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
        sources.append(copy)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), *map(str, sources)],
         timeout=600, env=_clean_env())
    built = sorted(wheels.glob("*.whl"))
    assert len(built) == len(DISTS), [w.name for w in built]

    problems = [problem for dist in DISTS for problem in _wheel_problems(dist, built)]

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120, env=_clean_env())
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    env = {**_clean_env(), "VIRTUAL_ENV": str(venv), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    _run([str(python), "-m", "pip", "install", "-q", *map(str, built)], timeout=600, env=env)

    imports = "; ".join(f"import {p}" for dist in DISTS for p in packages(dist))
    _run([str(python), "-c", f"{imports}; import forge_streaming; print(forge_streaming.__file__)"],
         timeout=60, cwd=tmp_path, env=env)
    located = _run([str(python), "-c", "import forge_streaming; print(forge_streaming.__file__)"],
                   timeout=60, cwd=tmp_path, env=env).stdout
    assert str(venv) in located, f"imported from the checkout, not the wheel: {located}"

    listed = json.loads(_run([str(bin_dir / "forge-streaming"), "plugins", "--json"], timeout=60, cwd=tmp_path,
                             env=env).stdout)
    names = {p["name"] for p in listed}
    expected = {ep for dist in DISTS for ep in plugin_entry_points(dist)}
    assert expected <= names, f"not loaded from the wheels: {sorted(expected - names)}"

    if "prometheus" in names:
        env["FORGE_STREAMING__PROMETHEUS__ENABLED"] = "true"  # /metrics is opt-in
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(bin_dir / "forge-streaming"), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"serve exited:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                    health = json.loads(response.read())
                    break
            except OSError:
                assert time.monotonic() < deadline, f"serve not ready:\n{log.read_text()}"
                time.sleep(0.2)
        assert health["status"] == "ok", health
        if "prometheus" in names:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                assert b"forge_streaming_backend_up" in response.read()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert problems == [], "wheels that install and serve, but are incomplete:\n" + "\n".join(problems)


def _wheel_problems(dist: Path, built: list[Path]) -> list[str]:
    """What the wheel of ``dist`` lacks: py.typed, Requires-Python, Python classifiers, entry points."""
    name = project(dist)["name"].replace("-", "_").lower()
    wheel = next((w for w in built if w.name.lower().startswith(name + "-")), None)
    if wheel is None:
        return [f"{dist.name}: no wheel built"]
    problems = []
    with zipfile.ZipFile(wheel) as archive:
        files = archive.namelist()
        problems += [f"{wheel.name} does not ship {package}/py.typed"
                     for package in packages(dist) if f"{package}/py.typed" not in files]
        metadata_path = next(f for f in files if f.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(metadata_path).decode())
        if metadata["Requires-Python"] != ">=3.11":
            problems.append(f"{wheel.name}: Requires-Python is {metadata['Requires-Python']!r}")
        if not any(c.startswith("Programming Language :: Python :: 3.") for c in metadata.get_all("Classifier") or []):
            problems.append(f"{wheel.name}: no Python version classifier")
        entry_points = next((f for f in files if f.endswith(".dist-info/entry_points.txt")), None)
        text = archive.read(entry_points).decode() if entry_points else ""
        if not text:
            problems.append(f"{wheel.name} declares no entry points")
        problems += [f"{wheel.name}: entry point {ep!r} missing from entry_points.txt"
                     for ep in plugin_entry_points(dist) if ep not in text]
    return problems
