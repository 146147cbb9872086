"""Servers under test: how each is started as its own process, and stopped by PID.

Each kind says what it needs (modules, executables); one that is missing is
reported as "not measured" with the reason instead of failing the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from forge_streaming.testing import free_port

PACKAGE = Path(__file__).resolve().parent
FIRST_PARTY = ["websocket", "sse", "webtransport", "memory-pubsub", "memory-rooms"]


def node_dir() -> Path:
    """contrib/bench/node in a source checkout (gitignored node_modules), else a user cache dir."""
    checkout = PACKAGE.parents[1]
    if (checkout / "pyproject.toml").exists():
        return checkout / "node"
    return Path.home() / ".cache" / "forge-streaming-bench" / "node"


def ensure_node_ws(timeout: float = 180) -> str | None:
    """Install npm's ``ws`` 8 into node_dir() when missing; return why not, or None when ready."""
    if shutil.which("node") is None:
        return "node not found on PATH"
    target = node_dir()
    if (target / "node_modules" / "ws" / "package.json").exists():
        return None
    if shutil.which("npm") is None:
        return "npm not found on PATH (needed once to install ws)"
    target.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(target), "ws@8"],
                       check=True, capture_output=True, timeout=timeout)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"npm install ws@8 failed: {exc}"
    return None


def ours_config(path: Path, *, plugins: list[str] | None = None, extra: dict[str, object] | None = None) -> Path:
    """The YAML config of our server: first-party plugins only, limits raised for the big cases.

    JSON is YAML, so the file is written with json.dumps.
    """
    config: dict[str, object] = {
        "plugins": {"allow": plugins or FIRST_PARTY},
        "limits": {"max_connections": 1_000_000},
        "logging": {"level": "warning"},
    }
    config.update(extra or {})
    path.write_text(json.dumps(config, indent=2))
    return path


@dataclass(frozen=True)
class ServerKind:
    """One server under test."""

    name: str
    label: str
    dialect: str
    command: Callable[[int, Path], list[str]]
    modules: tuple[str, ...] = ()
    needs_node: bool = False
    env: dict[str, str] = field(default_factory=dict)

    def missing(self) -> str | None:
        """Why this server cannot run here, or None."""
        for module in self.modules:
            if importlib.util.find_spec(module) is None:
                return f"{module} not installed (pip install -e 'contrib/bench[peers]')"
        if self.needs_node:
            return ensure_node_ws()
        return None


def _python(module: str) -> Callable[[int, Path], list[str]]:
    return lambda port, workdir: [sys.executable, "-m", module, "--port", str(port)]


def _ours(port: int, workdir: Path) -> list[str]:
    config = ours_config(workdir / f"ours-{port}.yaml")
    return [str(Path(sys.executable).parent / "forge-streaming"), "serve", "--host", "127.0.0.1",
            "--port", str(port), "--config", str(config)]


def _node(port: int, workdir: Path) -> list[str]:
    return ["node", str(PACKAGE / "peers" / "node_ws_server.js"), str(port)]


KINDS: dict[str, ServerKind] = {
    kind.name: kind
    for kind in [
        ServerKind("ours", "forge-streaming (/ws)", "room", _ours, ("forge_streaming_websocket",)),
        ServerKind("websockets", "websockets.broadcast", "room", _python("forge_streaming_bench.peers.raw_websockets"),
                   ("websockets",)),
        ServerKind("starlette", "Starlette send loop", "room", _python("forge_streaming_bench.peers.starlette_loop"),
                   ("starlette", "uvicorn")),
        ServerKind("socketio", "python-socketio", "socketio", _python("forge_streaming_bench.peers.socketio_app"),
                   ("socketio",)),
        ServerKind("node-ws", "Node ws", "room", _node, needs_node=True),
        ServerKind("sse-starlette", "sse-starlette, queue per client", "room",
                   _python("forge_streaming_bench.peers.sse_queue"), ("sse_starlette",)),
    ]
}


class Running:
    """A started server process; ``stop()`` kills it by PID (also on errors: use as a context manager)."""

    def __init__(self, kind: str, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.kind = kind
        self.proc = proc
        self.pid = proc.pid
        self.port = port
        self.log = log

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"not listening on {port} after {timeout}s")


LOG_LIMIT = 5 * 2**20


def _capped_log(stream: IO[bytes], path: Path, limit: int = LOG_LIMIT) -> None:
    """Copy a server's output to ``path`` up to ``limit`` bytes, then only drain it.

    A node out of file descriptors logs every failed accept() with a
    traceback (1.4 GB in four minutes once): the log must not fill the disk,
    and the pipe must keep draining or the server would block on writing.
    """
    written = dropped = 0
    with path.open("wb") as out:
        for line in stream:
            if written + len(line) <= limit:
                out.write(line)
                written += len(line)
            else:
                dropped += 1
        if dropped:
            out.write(f"[bench] {dropped:,} more lines dropped (log capped at {limit:,} bytes)\n".encode())


def start_process(name: str, command: list[str], workdir: Path, *, port: int, env: dict[str, str] | None = None,
                  timeout: float = 30) -> Running:
    """Start ``command`` (which listens on ``port``) and wait until it accepts connections."""
    log = workdir / f"{name}-{port}.log"
    log.touch()
    environ = {**os.environ, "NODE_PATH": str(node_dir() / "node_modules"), **(env or {})}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environ, cwd=workdir)
    threading.Thread(target=_capped_log, args=(proc.stdout, log), daemon=True, name=f"log-{name}").start()
    running = Running(name, proc, port, log)
    try:
        wait_port(port, proc, timeout, log)
    except BaseException:
        running.stop()
        raise
    return running


def start(kind: ServerKind, workdir: Path) -> Running:
    port = free_port()
    return start_process(kind.name, kind.command(port, workdir), workdir, port=port, env=kind.env)


def wait_idle(pids: list[int], *, threshold: float = 0.05, window: float = 0.5, limit: float = 30) -> None:
    """Wait until the servers use under ``threshold`` of a core (cleanup of the last run is over)."""
    from .procstat import cpu_seconds

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = sum(cpu_seconds(p) for p in pids)
        time.sleep(window)
        if sum(cpu_seconds(p) for p in pids) - before < threshold * window:
            return
