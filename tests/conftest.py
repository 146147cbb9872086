"""Shared fixtures: a `forge-streaming serve` subprocess on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from forge_streaming.testing import free_port

BIN = Path(sys.executable).parent


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[str], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_server(tmp_path: Path, *args: str, config: str | None = None, env: dict[str, str] | None = None,
                 ready_timeout: float = 20) -> ServerProcess:
    port = free_port()
    command = [str(BIN / "forge-streaming"), "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    if config is not None:
        path = tmp_path / f"config-{port}.yaml"
        path.write_text(config)
        command += ["--config", str(path)]
    log = tmp_path / f"server-{port}.log"
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, cwd=tmp_path)
    server = ServerProcess(proc, port, log)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
        try:
            with urllib.request.urlopen(server.url + "/healthz", timeout=1):
                return server
        except OSError:
            time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise TimeoutError(f"server not ready in {ready_timeout}s:\n{server.output()}")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    """Start `forge-streaming serve` processes; every one is stopped by PID at the end."""
    started: list[ServerProcess] = []

    def factory(*args: str, **kwargs: object) -> ServerProcess:
        server = start_server(tmp_path, *args, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop(signal.SIGKILL, timeout=5)
