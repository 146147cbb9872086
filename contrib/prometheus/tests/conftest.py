"""Fixtures: a scraper that reads /metrics as numbers, and `forge-streaming serve` subprocesses."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from forge_streaming.testing import free_port
from prometheus_client.parser import text_string_to_metric_families

BIN = Path(sys.executable).parent

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition as {(name, sorted labels): value}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


class Scraper:
    """Reads ``/metrics`` with a real HTTP client; ``value`` looks up one sample (0 when absent)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def __call__(self, url: str) -> Samples:
        response = await self.client.get(url + "/metrics")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        return parse(response.text)

    @staticmethod
    def value(samples: Samples, name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def scraper() -> AsyncIterator[Scraper]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield Scraper(client)


class ServerProcess:
    """A ``forge-streaming serve`` subprocess on a free loopback port; stopped by its PID."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def cli_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``forge-streaming serve ARGS`` with a YAML config; every process is killed by PID at the end."""
    started: list[ServerProcess] = []

    def start(*args: str, config: str = "", ready_timeout: float = 20) -> ServerProcess:
        port = free_port()
        path = tmp_path / f"config-{port}.yaml"
        path.write_text(config)
        log = tmp_path / f"server-{port}.log"
        command = [str(BIN / "forge-streaming"), "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--config", str(path), *args]
        with log.open("wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        server = ServerProcess(proc, port, log)
        started.append(server)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
            try:
                with urllib.request.urlopen(server.url + "/healthz", timeout=1):
                    return server
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"server not ready in {ready_timeout}s:\n{server.output()}")

    yield start
    for server in started:
        server.stop(signal.SIGKILL, timeout=5)
