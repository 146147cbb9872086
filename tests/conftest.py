"""Shared fixtures: `forge-streaming serve` subprocesses on free loopback ports."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from forge_streaming.testing import ServerProcess


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start `forge-streaming serve` processes; every one is killed by its PID at the end."""
    started: list[ServerProcess] = []

    def factory(*args: str, **kwargs: Any) -> ServerProcess:
        server = ServerProcess(tmp_path, *args, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop(signal.SIGKILL, timeout=5)
