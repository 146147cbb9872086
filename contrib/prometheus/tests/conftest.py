"""Fixtures: a scraper that reads /metrics as numbers, and `forge-streaming serve` subprocesses."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from forge_streaming.testing import ServerProcess
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


@pytest.fixture
def cli_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``forge-streaming serve ARGS`` with a YAML config; every process is killed by PID at the end."""
    started: list[ServerProcess] = []

    def start(*args: str, config: str = "", ready_timeout: float = 20) -> ServerProcess:
        server = ServerProcess(tmp_path, *args, config=config, ready_timeout=ready_timeout)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL, timeout=5)
